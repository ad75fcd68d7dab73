# -*- test-case-name: tests.test_identity -*-
"""
A node's Ed25519 identity: the key pair, its file, signing and verifying.

The file is the reference's format (``docs/identity.md``): a JSON object with
``private_key`` (standard base64 of the 64-byte seed followed by the public
key) and ``public_key`` (base64 of the 32-byte key), mode 0600.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import TYPE_CHECKING, Any

import attr

if TYPE_CHECKING:
    from nacl.signing import SigningKey

from pilot.address import Address, address_for_key
from pilot.persist import StateFileError, atomic_write_json, read_json_object

PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: Any, length: int | None = None, what: str = "value") -> bytes:
    """Strict standard base64; ``ValueError`` with the reason for anything else."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a base64 string, not {type(text).__name__}")
    if length is not None and len(text) != 4 * ((length + 2) // 3):
        raise ValueError(f"{what} must be base64 of {length} bytes")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError(f"{what} is not valid base64") from e
    if length is not None and len(data) != length:
        raise ValueError(f"{what} must be {length} bytes, got {len(data)}")
    return data


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True if ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    buffers = (bytes, bytearray, memoryview)
    if not (isinstance(public_key, buffers) and isinstance(message, buffers) and isinstance(signature, buffers)):
        return False
    public_key, message, signature = bytes(public_key), bytes(message), bytes(signature)
    if len(public_key) != PUBLIC_KEY_LEN or len(signature) != SIGNATURE_LEN:
        return False
    # imported here, as in SigningKey's users below: a rendezvous' start does without nacl and
    # libsodium until its first signed request (docs/performance.md, issue 16)
    from nacl.signing import VerifyKey
    try:
        VerifyKey(public_key).verify(message, signature)
    except Exception:  # BadSignatureError, ValueError, TypeError, and nacl's own for invalid points
        return False
    return True


@attr.s(frozen=True, slots=True, repr=False)
class Identity:
    signing_key: SigningKey = attr.ib()

    @classmethod
    def generate(cls) -> "Identity":
        from nacl.signing import SigningKey
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "Identity":
        from nacl.signing import SigningKey
        return cls(SigningKey(seed))

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def public_key_b64(self) -> str:
        return b64encode(self.public_key)

    @property
    def address(self) -> Address:
        """The address computed from the key alone (the registry confirms it)."""
        return address_for_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    def sign_b64(self, message: bytes) -> str:
        return b64encode(self.sign(message))

    def to_json(self) -> dict[str, str]:
        return {
            "private_key": b64encode(bytes(self.signing_key) + self.public_key),
            "public_key": self.public_key_b64,
        }

    @classmethod
    def from_json(cls, value: Any) -> "Identity":
        if not isinstance(value, dict):
            raise ValueError("an identity is a JSON object")
        private = b64decode(value.get("private_key"), 64, "private_key")
        public = b64decode(value.get("public_key"), 32, "public_key")
        ident = cls.from_seed(private[:32])
        if ident.public_key != public or private[32:] != public:
            raise ValueError("private_key does not match public_key (corrupt identity file)")
        return ident

    def save(self, path: str) -> None:
        atomic_write_json(path, self.to_json(), mode=0o600)

    @classmethod
    def load(cls, path: str) -> "Identity":
        value = read_json_object(path)
        try:
            return cls.from_json(value)
        except ValueError as e:
            raise StateFileError(path, str(e)) from e

    def __repr__(self) -> str:
        return f"Identity({self.address}, {self.public_key_b64})"


def default_home() -> str:
    return os.environ.get("PILOT_HOME") or os.path.join(os.path.expanduser("~"), ".pilot")
