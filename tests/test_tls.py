"""
Tests for pilot.tls.  The handshake tests use real sockets on 127.0.0.1 and
the real reactor (the only way to exercise OpenSSL's verification end to end).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import stat
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

import pilot.tls
from pilot.errors import RegistryUnavailable
from pilot.persist import StateFileError
from pilot.protocols.registry import RegistryServerFactory
from pilot.protocols.registry_client import RegistryClientFactory, RegistryClientProtocol
from pilot.server.registry import Registry
from pilot.services.rendezvous import RendezvousService, RendezvousSettings
from pilot.tls import (
    CERT_NAME, KEY_NAME, PinnedCertificate, _not_after, _options, client_options, ensure_self_signed, fingerprint,
    normalise_fingerprint, server_context,
)

reactor: Any = global_reactor


class CertificateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = self.mktemp()
        os.makedirs(self.folder)

    def test_generated_once_and_reused(self) -> None:
        cert, key = ensure_self_signed(self.folder)
        self.assertEqual((cert, key), (os.path.join(self.folder, CERT_NAME), os.path.join(self.folder, KEY_NAME)))
        with open(cert, "rb") as f:
            cert_bytes = f.read()
        with open(key, "rb") as f:
            key_bytes = f.read()
        self.assertEqual(ensure_self_signed(self.folder), (cert, key))
        with open(cert, "rb") as f:
            self.assertEqual(f.read(), cert_bytes)
        with open(key, "rb") as f:
            self.assertEqual(f.read(), key_bytes)
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        self.assertEqual([n for n in os.listdir(self.folder) if n.endswith(".tmp")], [])

    def test_certificate_contents(self) -> None:
        cert_path, key_path = ensure_self_signed(self.folder)
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        self.assertIsInstance(key.curve, ec.SECP256R1)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(set(san.get_values_for_type(x509.IPAddress)),
                         {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value, "Pilot Protocol")
        lifetime = _not_after(cert) - datetime.datetime.now(datetime.timezone.utc)
        self.assertTrue(datetime.timedelta(days=364) < lifetime <= datetime.timedelta(days=365))

    def test_missing_half_regenerates(self) -> None:
        cert, key = ensure_self_signed(self.folder)
        old = fingerprint(cert)
        os.unlink(key)
        ensure_self_signed(self.folder)
        self.assertNotEqual(fingerprint(cert), old)
        server_context(cert, key)  # the new pair matches

    def test_unusable_files_left_alone(self) -> None:
        cert, key = ensure_self_signed(self.folder)
        with open(key, "wb") as f:
            f.write(b"not a key")
        self.assertRaises(StateFileError, ensure_self_signed, self.folder)
        with open(key, "rb") as f:
            self.assertEqual(f.read(), b"not a key")

    def test_key_not_matching(self) -> None:
        cert, _ = ensure_self_signed(self.folder)
        other = os.path.join(self.folder, "other")
        _, other_key = ensure_self_signed(other)
        with self.assertRaises(StateFileError) as raised:
            server_context(cert, other_key)
        self.assertIn(other_key, str(raised.exception))

    def test_older_pyopenssl_gets_its_own_types(self) -> None:
        """Where pyOpenSSL refuses cryptography's objects, they are converted."""
        cert, key = ensure_self_signed(self.folder)
        calls: list[type] = []

        def picky(leaf: object, chain: list[object], private: object) -> Any:
            calls.append(type(leaf))
            if isinstance(leaf, x509.Certificate):
                raise TypeError("old pyOpenSSL")
            return _options(leaf, chain, private)

        self.patch(pilot.tls, "_options", picky)
        server_context(cert, key)
        self.assertEqual(len(calls), 2)
        self.flushWarnings()

    def test_fingerprint_format(self) -> None:
        """Lowercase hex SHA-256 of the leaf's DER, from a path, PEM or DER."""
        cert_path, _ = ensure_self_signed(self.folder)
        with open(cert_path, "rb") as f:
            pem = f.read()
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        expected = hashlib.sha256(der).hexdigest()
        self.assertEqual(len(expected), 64)
        self.assertEqual(fingerprint(cert_path), expected)
        self.assertEqual(fingerprint(pem), expected)
        self.assertEqual(fingerprint(der), expected)
        der_path = os.path.join(self.folder, "leaf.der")
        with open(der_path, "wb") as f:
            f.write(der)
        self.assertEqual(fingerprint(der_path), expected)

    def test_normalise_fingerprint(self) -> None:
        fp = "ab" * 32
        self.assertEqual(normalise_fingerprint(":".join(["AB"] * 32)), fp)
        self.assertEqual(normalise_fingerprint(fp.upper()), fp)
        for bad in ("", "ab" * 31, "zz" * 32, "ab" * 33):
            self.assertRaises(ValueError, normalise_fingerprint, bad)

    def test_client_options(self) -> None:
        pinned = client_options(fingerprint="AB" * 32)
        self.assertIsInstance(pinned, PinnedCertificate)
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(pinned))
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(client_options(hostname="registry.example")))
        self.assertRaises(ValueError, client_options)
        self.assertRaises(ValueError, client_options, fingerprint="nope")


def ca_signed_chain(folder: str) -> tuple[str, str]:
    """A leaf signed by a throwaway CA; the cert file holds the leaf then the CA."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = os.path.join(folder, "chain.pem"), os.path.join(folder, "leaf.key")
    with open(cert_path, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class WatchedClient(RegistryClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


class WatchedClientFactory(RegistryClientFactory):
    def buildProtocol(self, addr: Any) -> WatchedClient:
        return WatchedClient()


class WatchedServerFactory(RegistryServerFactory):
    """Records a Deferred per server connection, fired when it is lost."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = super().buildProtocol(addr)
        lost: Deferred[None] = Deferred()
        self.lost.append(lost)
        original = protocol.connectionLost

        def connection_lost(reason: Failure = connectionDone) -> None:
            original(reason)
            lost.callback(None)

        protocol.connectionLost = connection_lost  # type: ignore[method-assign]
        return protocol


class HandshakeTests(TestCase):
    """Real TLS over 127.0.0.1 between :func:`server_context` and :func:`client_options`."""

    def setUp(self) -> None:
        self.folder = self.mktemp()
        os.makedirs(self.folder)

    def listen(self, cert: str, key: str, max_connections: int = 100) -> int:
        self.server = WatchedServerFactory(Registry(reactor), reactor, max_connections=max_connections)
        port = reactor.listenSSL(0, self.server, server_context(cert, key), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number: int = port.getHost().port
        return number

    @inlineCallbacks
    def exchange(self, port: int, creator: IOpenSSLClientConnectionCreator) -> Any:
        """Connect, send one request; return its reply or its exception, after both sides closed."""
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        known = len(self.server.lost)
        client = yield endpoint.connect(WatchedClientFactory())
        outcome: Any
        try:
            outcome = yield client.request({"type": "list_networks"})
        except Exception as e:
            outcome = e  # (returning a Failure would fail this Deferred)
        client.close()
        yield client.lost
        for lost in self.server.lost[known:]:
            yield lost
        return outcome

    @inlineCallbacks
    def test_right_fingerprint(self) -> Any:
        cert, key = ensure_self_signed(self.folder)
        port = self.listen(cert, key)
        reply = yield self.exchange(port, client_options(fingerprint=fingerprint(cert)))
        self.assertEqual(reply["type"], "list_networks_ok")

    @inlineCallbacks
    def test_right_fingerprint_with_hostname_as_sni(self) -> Any:
        cert, key = ensure_self_signed(self.folder)
        port = self.listen(cert, key)
        reply = yield self.exchange(port, client_options(hostname="localhost", fingerprint=fingerprint(cert)))
        self.assertEqual(reply["type"], "list_networks_ok")

    @inlineCallbacks
    def test_wrong_fingerprint(self) -> Any:
        cert, key = ensure_self_signed(self.folder)
        port = self.listen(cert, key)
        with capturedLogs():
            outcome = yield self.exchange(port, client_options(fingerprint="00" * 32))
        self.assertIsInstance(outcome, RegistryUnavailable)
        self.assertIn("certificate verify failed", outcome.message)

    @inlineCallbacks
    def test_pinned_leaf_whatever_the_chain(self) -> Any:
        """A leaf from an unknown CA is accepted by its pin; another pin refuses it."""
        cert, key = ca_signed_chain(self.folder)
        port = self.listen(cert, key)
        reply = yield self.exchange(port, client_options(fingerprint=fingerprint(cert)))
        self.assertEqual(reply["type"], "list_networks_ok")
        with open(cert, "rb") as f:
            ca_der = x509.load_pem_x509_certificates(f.read())[1].public_bytes(serialization.Encoding.DER)
        with capturedLogs():
            outcome = yield self.exchange(port, client_options(fingerprint=fingerprint(ca_der)))
        self.assertIsInstance(outcome, RegistryUnavailable)

    @inlineCallbacks
    def test_connection_limit_over_tls(self) -> Any:
        """A TLS connection over the limit is aborted; the port keeps serving."""
        cert, key = ensure_self_signed(self.folder)
        port = self.listen(cert, key, max_connections=1)
        creator = client_options(fingerprint=fingerprint(cert))
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        first = yield endpoint.connect(WatchedClientFactory())
        reply = yield first.request({"type": "list_networks"})
        self.assertEqual(reply["type"], "list_networks_ok")
        with capturedLogs():
            outcome = yield self.exchange(port, creator)
        self.assertIsInstance(outcome, RegistryUnavailable)
        self.assertEqual(self.server.refused, 1)
        first.close()
        yield first.lost
        yield self.server.lost[0]
        reply = yield self.exchange(port, creator)
        self.assertEqual(reply["type"], "list_networks_ok")

    @inlineCallbacks
    def test_hostname_verification_refuses_self_signed(self) -> Any:
        cert, key = ensure_self_signed(self.folder)
        port = self.listen(cert, key)
        with capturedLogs():
            outcome = yield self.exchange(port, client_options(hostname="localhost"))
        self.assertIsInstance(outcome, RegistryUnavailable)

    @inlineCallbacks
    def test_rendezvous_service_over_tls(self) -> Any:
        """The whole service with TLS on: the logged fingerprint is the one that works."""
        store = os.path.join(self.folder, "registry.json")
        service = RendezvousService(RendezvousSettings(listen="127.0.0.1:0", beacon_listen="127.0.0.1:0",
                                                       store=store, tls=True), reactor)
        with capturedLogs():
            service.startService()
        try:
            endpoint = wrapClientTLS(client_options(fingerprint=service.tls_fingerprint),
                                     TCP4ClientEndpoint(reactor, "127.0.0.1", service.registry_port()))
            client = yield endpoint.connect(WatchedClientFactory())
            reply = yield client.request({"type": "beacon_list"})
            self.assertEqual(reply, {"type": "beacon_list_ok", "beacons": []})
            client.close()
            yield client.lost
        finally:
            with capturedLogs():
                yield service.stopService()
        self.assertTrue(os.path.exists(store))
