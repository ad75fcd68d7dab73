# -*- test-case-name: tests.test_tls -*-
"""
The registry over TLS (docs/reference-wire.md §2.10), with pyOpenSSL through Twisted.

Server side: :func:`server_context` serves a given certificate and key; with
none given, :func:`ensure_self_signed` makes a self-signed ECDSA P-256
certificate once (SAN ``localhost``, 127.0.0.1, ::1; one year) and keeps it
beside the store, so its fingerprint stays the same across restarts (the
reference makes a new one at every start, which breaks every pin).

Client side, as the reference daemon: the server is accepted when the SHA-256
of its leaf certificate's DER bytes, in lowercase hex (:func:`fingerprint`),
is the configured one, whatever the chain.  Without a fingerprint, a
hostname is verified against the platform's roots (service-identity).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from typing import Sequence, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from pilot.persist import StateFileError, atomic_write_bytes

CERT_NAME = "registry-tls.crt"
KEY_NAME = "registry-tls.key"
VALIDITY = datetime.timedelta(days=365)
ORGANISATION = "Pilot Protocol"

PathOrBytes = Union[str, "os.PathLike[str]", bytes]

log = Logger(namespace="pilot.tls")


# --- certificates -----------------------------------------------------------------

def self_signed() -> tuple[bytes, bytes]:
    """A new self-signed certificate and its key, both PEM: ``(cert, key)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_self_signed(folder: str) -> tuple[str, str]:
    """
    Paths of the self-signed certificate and key kept in ``folder``, made on
    first use (the key with mode 0600, both written atomically).  Existing
    files are reused as long as they load; ones that do not raise
    :class:`~pilot.persist.StateFileError` and are left alone.
    """
    cert_path = os.path.join(folder, CERT_NAME)
    key_path = os.path.join(folder, KEY_NAME)
    if os.path.exists(cert_path) and os.path.exists(key_path):
        cert = _load_certificates(cert_path)[0]
        _load_key(key_path)
        if _not_after(cert) < datetime.datetime.now(datetime.timezone.utc):
            log.warn("the registry's self-signed TLS certificate {path} has expired; clients that pin its "
                     "fingerprint still accept it, others will not (delete both files to make a new one)",
                     path=cert_path)
        return cert_path, key_path
    cert_pem, key_pem = self_signed()
    atomic_write_bytes(key_path, key_pem, mode=0o600)
    atomic_write_bytes(cert_path, cert_pem, mode=0o644)
    log.info("made a self-signed TLS certificate for the registry: {path}", path=cert_path)
    return cert_path, key_path


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    after = getattr(cert, "not_valid_after_utc", None)  # cryptography >= 42
    if after is None:
        after = cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return after


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as e:
        raise StateFileError(path, f"cannot read: {e.strerror or e}") from e


def _load_certificates(path: str) -> list[x509.Certificate]:
    data = _read(path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        try:
            certs = [x509.load_der_x509_certificate(data)]
        except ValueError as e:
            raise StateFileError(path, f"not a PEM or DER certificate ({e})") from e
    if not certs:
        raise StateFileError(path, "holds no certificate")
    return certs


def _load_key(path: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as e:
        raise StateFileError(path, f"not an unencrypted PEM private key ({e})") from e


def server_context(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """
    TLS options for the registry's listening port: the leaf (and any chain
    after it) from ``cert_path``, its key from ``key_path``; TLS 1.2 or later.
    """
    return _server_options(_load_certificates(cert_path), _load_key(key_path), cert_path, key_path)


def server_context_from_pem(cert_pem: bytes, key_pem: bytes) -> ssl.CertificateOptions:
    """As :func:`server_context`, from PEM bytes (an ephemeral :func:`self_signed` pair)."""
    certs = x509.load_pem_x509_certificates(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    return _server_options(certs, key, "<certificate>", "<key>")


def _server_options(certs: list[x509.Certificate], key: PrivateKeyTypes, cert_where: str,
                    key_where: str) -> ssl.CertificateOptions:
    try:
        # pyOpenSSL >= 24.3 takes cryptography's objects (its own X509/PKey
        # are deprecated); CertificateOptions passes them through untouched.
        return _options(certs[0], certs[1:], key)
    except TypeError:
        pass  # an older pyOpenSSL: give it its own types
    except (SSL.Error, ValueError) as e:
        raise StateFileError(key_where, f"cannot serve TLS with it and {cert_where} ({e})") from e
    try:
        return _options(crypto.X509.from_cryptography(certs[0]),
                        [crypto.X509.from_cryptography(c) for c in certs[1:]],
                        crypto.PKey.from_cryptography_key(key))  # type: ignore[arg-type]
    except (SSL.Error, ValueError, TypeError) as e:
        raise StateFileError(key_where, f"cannot serve TLS with it and {cert_where} ({e})") from e


def _options(leaf: object, chain: Sequence[object], key: object) -> ssl.CertificateOptions:
    options = ssl.CertificateOptions(privateKey=key, certificate=leaf, extraCertChain=chain,  # type: ignore[arg-type]
                                     raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    options.getContext()  # build it now, so a key that does not match fails at start
    return options


def fingerprint(cert: PathOrBytes) -> str:
    """
    The reference's pin: lowercase hex SHA-256 of the leaf certificate's DER.
    ``cert`` is DER bytes, PEM bytes, or the path of a PEM or DER file (the
    first certificate in it is the leaf).
    """
    if isinstance(cert, bytes):
        der = cert
        if cert.lstrip().startswith(b"-----BEGIN"):
            der = x509.load_pem_x509_certificates(cert)[0].public_bytes(serialization.Encoding.DER)
    else:
        der = _load_certificates(os.fspath(cert))[0].public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def normalise_fingerprint(text: str) -> str:
    """``text`` as 64 lowercase hex digits (colons and spaces dropped); ValueError otherwise."""
    value = text.replace(":", "").replace(" ", "").strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"a TLS fingerprint is 64 hex digits (SHA-256), not {text!r}")
    return value


# --- client side -----------------------------------------------------------------------

@implementer(IOpenSSLClientConnectionCreator)
class PinnedCertificate:
    """
    Accepts exactly the server whose leaf certificate has ``pin`` as its
    :func:`fingerprint`, whatever its chain, names or dates (the reference's
    rule: the pin is the whole of the trust).  ``hostname``, if given, is only
    sent as SNI.
    """

    def __init__(self, pin: str, hostname: str | None = None) -> None:
        self.pin = normalise_fingerprint(pin)
        self.hostname = hostname
        self._options = ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2)

    def _verify(self, connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if depth > 0:
            return True  # the chain is not ours to judge; the leaf's pin decides
        der = cert.to_cryptography().public_bytes(serialization.Encoding.DER)
        return hashlib.sha256(der).hexdigest() == self.pin

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        if self.hostname and not _is_ip(self.hostname):
            connection.set_tlsext_host_name(self.hostname.encode("idna"))
        return connection


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def client_options(hostname: str | None = None, fingerprint: str | None = None) -> IOpenSSLClientConnectionCreator:
    """
    How our node verifies the registry: by ``fingerprint`` when given (see
    :class:`PinnedCertificate`), else by ``hostname`` against the platform's
    trusted roots.  One of the two is required.
    """
    if fingerprint:
        return PinnedCertificate(fingerprint, hostname)
    if hostname:
        return ssl.optionsForClientTLS(hostname)
    raise ValueError("TLS to the registry needs a certificate fingerprint or a hostname to verify")
