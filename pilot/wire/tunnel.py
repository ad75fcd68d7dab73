# -*- test-case-name: tests.wire.test_tunnel -*-
"""
Tunnel frames: what daemons send each other over UDP (docs/reference-wire.md §4.1-4.4).

A datagram whose first byte is below 0x10 is a beacon message
(``pilot.wire.beacon``); anything else starts with a 4-byte magic::

    PILT  magic, Pilot packet (34-byte header + payload)       plaintext
    PILS  magic, sender node id (4), nonce (12), ciphertext+tag encrypted packet
    PILK  magic, sender node id (4), X25519 public key (32)    40 bytes
    PILA  magic, sender node id (4), X25519 key (32),
          Ed25519 key (32), signature (64)                     136 bytes
    PILP  magic                                                4 bytes, ignored

The PILA signature covers :func:`auth_message`: ``auth``, the node id
(4 bytes big-endian) and the X25519 key.  The sender id in a PILS frame only
selects the key; nothing binds it (no additional data).

Like the reference, the decoders ignore bytes after a fixed-size frame (PILK,
PILA, PILP) and after a packet's payload; encoding gives the exact sizes.
Decoders raise only :class:`~pilot.errors.MalformedFrame`; constructors raise
``ValueError`` for values that cannot be sent.

The session crypto (key derivation, sealing, nonces, replay window) is in
:mod:`pilot.wire.tunnel_crypto` and re-exported here.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, Callable, Union

import attr

from pilot.errors import MalformedFrame
from pilot.identity import verify
from pilot.wire.packet import Packet, as_bytes
from pilot.wire.tunnel_crypto import (
    KEY_CONTEXT, NONCE_LEN, NONCE_PREFIX_LEN, TAG_LEN, WINDOW_SIZE, Nonce, NonceSequence,
    ReplayWindow, TunnelSession, derive_key, open_, seal,
)

__all__ = [
    "PILT", "PILS", "PILK", "PILA", "PILP", "FrameKind", "classify", "decode_frame",
    "PlainFrame", "SealedFrame", "KeyExchange", "AuthKeyExchange", "PunchProbe", "auth_message",
    "KEY_CONTEXT", "NONCE_LEN", "NONCE_PREFIX_LEN", "TAG_LEN", "WINDOW_SIZE", "Nonce",
    "NonceSequence", "ReplayWindow", "TunnelSession", "derive_key", "open_", "seal",
]

PILT = b"PILT"
PILS = b"PILS"
PILK = b"PILK"
PILA = b"PILA"
PILP = b"PILP"
MAGIC_LEN = 4
BEACON_LIMIT = 0x10

X25519_LEN = 32
ED25519_LEN = 32
SIGNATURE_LEN = 64
SEALED_MIN = MAGIC_LEN + 4 + NONCE_LEN + TAG_LEN
KEY_EXCHANGE_LEN = MAGIC_LEN + 4 + X25519_LEN
AUTH_KEY_EXCHANGE_LEN = KEY_EXCHANGE_LEN + ED25519_LEN + SIGNATURE_LEN
AUTH_CONTEXT = b"auth"

_ID = struct.Struct(">I")
_COUNTER = struct.Struct(">Q")
_set = object.__setattr__


class FrameKind(enum.Enum):
    BEACON = "beacon"
    PLAIN = "PILT"
    SEALED = "PILS"
    KEY_EXCHANGE = "PILK"
    AUTH_KEY_EXCHANGE = "PILA"
    PUNCH = "PILP"


_BY_MAGIC = {
    PILT: FrameKind.PLAIN, PILS: FrameKind.SEALED, PILK: FrameKind.KEY_EXCHANGE,
    PILA: FrameKind.AUTH_KEY_EXCHANGE, PILP: FrameKind.PUNCH,
}


def classify(datagram: Any) -> FrameKind:
    """What a received datagram is; ``MalformedFrame`` if it is none of them."""
    data = as_bytes(datagram, "datagram")
    if not data:
        raise MalformedFrame("empty datagram")
    if data[0] < BEACON_LIMIT:
        return FrameKind.BEACON
    kind = _BY_MAGIC.get(data[:MAGIC_LEN])
    if kind is None:
        raise MalformedFrame(f"unknown tunnel magic {data[:MAGIC_LEN].hex()}")
    return kind


def _expect(datagram: Any, magic: bytes, minimum: int) -> bytes:
    data = as_bytes(datagram)
    if data[:MAGIC_LEN] != magic:
        raise MalformedFrame(f"not a {magic.decode()} frame (magic {data[:MAGIC_LEN].hex()})")
    if len(data) < minimum:
        raise MalformedFrame(f"{magic.decode()} frame of {len(data)} bytes is shorter than {minimum}")
    return data


def _node_id(instance: object, attribute: "attr.Attribute[int]", value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{attribute.name} must be a 32-bit node id, not {value!r}")


def _exactly(length: int) -> Callable[[object, "attr.Attribute[bytes]", bytes], None]:
    def check(instance: object, attribute: "attr.Attribute[bytes]", value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != length:
            raise ValueError(f"{attribute.name} must be {length} bytes")
    return check


def auth_message(node_id: int, x25519_public: bytes) -> bytes:
    """What a PILA signature covers: ``auth`` ‖ node id (4 bytes BE) ‖ X25519 key."""
    return AUTH_CONTEXT + _ID.pack(node_id) + x25519_public


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PlainFrame:
    packet: Packet

    def encode(self) -> bytes:
        return PILT + self.packet.encode()

    @classmethod
    def decode(cls, data: Any) -> "PlainFrame":
        data = _expect(data, PILT, MAGIC_LEN)
        return cls(Packet.decode(data[MAGIC_LEN:]))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SealedFrame:
    sender: int = attr.ib(validator=_node_id)
    nonce: bytes = attr.ib(validator=_exactly(NONCE_LEN))
    ciphertext: bytes = attr.ib()

    @ciphertext.validator
    def _check_ciphertext(self, attribute: "attr.Attribute[bytes]", value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) < TAG_LEN:
            raise ValueError(f"ciphertext must be bytes of at least the {TAG_LEN}-byte tag")

    @property
    def nonce_prefix(self) -> bytes:
        return self.nonce[:NONCE_PREFIX_LEN]

    @property
    def counter(self) -> int:
        return int(_COUNTER.unpack_from(self.nonce, NONCE_PREFIX_LEN)[0])

    def encode(self) -> bytes:
        return PILS + _ID.pack(self.sender) + self.nonce + self.ciphertext

    @classmethod
    def decode(cls, data: Any) -> "SealedFrame":
        return cls._from(_expect(data, PILS, SEALED_MIN))

    @classmethod
    def _from(cls, data: bytes) -> "SealedFrame":
        """From ``data``, known to be bytes with the PILS magic and at least SEALED_MIN long."""
        nonce_end = MAGIC_LEN + 4 + NONCE_LEN
        # every field comes from bytes of its own width (the ciphertext at least the tag):
        # built without the validators, once per received frame
        frame = _new(cls)
        _set_sender(frame, _unpack_id(data, MAGIC_LEN)[0])
        _set_nonce(frame, data[MAGIC_LEN + 4:nonce_end])
        _set_ciphertext(frame, data[nonce_end:])
        return frame

    @classmethod
    def seal(cls, session: TunnelSession, sender: int, packet: Packet) -> "SealedFrame":
        """Encrypt ``packet`` under the next nonce of ``session``."""
        nonce, ciphertext = session.seal(packet.encode())
        return cls(sender, nonce, ciphertext)

    @staticmethod
    def sealed(session: TunnelSession, sender: int, packet: Packet) -> bytes:
        """``seal(session, sender, packet).encode()`` without the frame object: once per packet sent."""
        nonce, ciphertext = session.seal(packet.encode())
        return b"".join((PILS, _pack_id(sender), nonce, ciphertext))

    def open(self, session: TunnelSession) -> Packet:
        """Check replay, decrypt, decode; ``MalformedFrame`` if any step fails."""
        return Packet.decode(session.open(self.nonce, self.ciphertext))



_new = object.__new__
_pack_id, _unpack_id = _ID.pack, _ID.unpack_from
# the slots' own setters, per received frame (object.__setattr__ looks each one up again)
_set_sender, _set_nonce, _set_ciphertext = (getattr(SealedFrame, name).__set__
                                            for name in ("sender", "nonce", "ciphertext"))

@attr.s(frozen=True, slots=True, auto_attribs=True)
class KeyExchange:
    sender: int = attr.ib(validator=_node_id)
    x25519_public: bytes = attr.ib(validator=_exactly(X25519_LEN))

    def encode(self) -> bytes:
        return PILK + _ID.pack(self.sender) + self.x25519_public

    @classmethod
    def decode(cls, data: Any) -> "KeyExchange":
        data = _expect(data, PILK, KEY_EXCHANGE_LEN)
        return cls(_ID.unpack_from(data, MAGIC_LEN)[0], data[8:KEY_EXCHANGE_LEN])


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AuthKeyExchange:
    sender: int = attr.ib(validator=_node_id)
    x25519_public: bytes = attr.ib(validator=_exactly(X25519_LEN))
    ed25519_public: bytes = attr.ib(validator=_exactly(ED25519_LEN))
    signature: bytes = attr.ib(validator=_exactly(SIGNATURE_LEN))

    @classmethod
    def build(cls, sender: int, x25519_public: bytes, ed25519_public: bytes,
              sign: Callable[[bytes], bytes]) -> "AuthKeyExchange":
        """A signed frame; ``sign`` is the node's Ed25519 signing function (``Identity.sign``)."""
        return cls(sender, x25519_public, ed25519_public, sign(auth_message(sender, x25519_public)))

    @property
    def signed_message(self) -> bytes:
        return auth_message(self.sender, self.x25519_public)

    def verify(self, expected_ed25519_public: bytes) -> bool:
        """
        True if the frame carries ``expected_ed25519_public`` (the key the
        registry holds for :attr:`sender`) and its signature verifies with it.
        """
        return (self.ed25519_public == expected_ed25519_public
                and verify(expected_ed25519_public, self.signed_message, self.signature))

    def encode(self) -> bytes:
        return PILA + _ID.pack(self.sender) + self.x25519_public + self.ed25519_public + self.signature

    @classmethod
    def decode(cls, data: Any) -> "AuthKeyExchange":
        data = _expect(data, PILA, AUTH_KEY_EXCHANGE_LEN)
        return cls(_ID.unpack_from(data, MAGIC_LEN)[0], data[8:40], data[40:72], data[72:136])


@attr.s(frozen=True, slots=True)
class PunchProbe:
    def encode(self) -> bytes:
        return PILP

    @classmethod
    def decode(cls, data: Any) -> "PunchProbe":
        _expect(data, PILP, MAGIC_LEN)
        return cls()


TunnelFrame = Union[PlainFrame, SealedFrame, KeyExchange, AuthKeyExchange, PunchProbe]

_DECODERS: dict[FrameKind, Callable[[bytes], TunnelFrame]] = {
    FrameKind.PLAIN: PlainFrame.decode, FrameKind.SEALED: SealedFrame.decode,
    FrameKind.KEY_EXCHANGE: KeyExchange.decode, FrameKind.AUTH_KEY_EXCHANGE: AuthKeyExchange.decode,
    FrameKind.PUNCH: PunchProbe.decode,
}


def decode_frame(datagram: Any) -> TunnelFrame:
    """Decode a tunnel frame; a beacon message is ``MalformedFrame`` here (use the beacon codec)."""
    if type(datagram) is bytes and datagram[:MAGIC_LEN] == PILS and len(datagram) >= SEALED_MIN:
        return SealedFrame._from(datagram)  # nearly every frame: without the classification
    data = as_bytes(datagram, "datagram")
    kind = classify(data)
    if kind is FrameKind.BEACON:
        raise MalformedFrame("a beacon message, not a tunnel frame")
    return _DECODERS[kind](data)
