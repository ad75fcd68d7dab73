# -*- test-case-name: tests.wire.test_beacon -*-
"""
Beacon datagrams (docs/reference-wire.md §3): the first byte is the type, integers big-endian.

::

    0x01 Discover        node id (4)                                   5 bytes
    0x02 DiscoverReply   IP length L (1, 4 or 16), IP (L), port (2)    8 or 20
    0x03 PunchRequest    requester id (4), target id (4)               9 bytes
    0x04 PunchCommand    IP length L, IP (L), port (2)                 8 or 20
    0x05 Relay           sender id (4), destination id (4), frame      9 + frame
    0x06 RelayDeliver    sender id (4), frame                          5 + frame
    0x07 Sync            beacon id (4), count N (2), N node ids (4)    7 + 4N

Our extension: a Discover or PunchRequest may be followed by an 80-byte
:class:`Proof`, ``ts_ms (8) ‖ nonce (8) ‖ Ed25519 signature (64)`` over
:func:`proof_message` (``pilot-beacon-v1`` ‖ the 5- or 9-byte message ‖ ts ‖
nonce).  The reference beacon reads only the first 5 or 9 bytes and ignores the
rest, so a reference beacon serves our nodes unchanged; ours accepts both forms.

Decoding is strict where the reference is lax (it ignores trailing bytes
everywhere): Discover is 5 or 85 bytes, PunchRequest 9 or 89, the endpoint
messages exactly 8 or 20, Sync exactly 7 + 4N, and a Relay or RelayDeliver
must carry a non-empty frame.  Every well-formed datagram the reference sends
decodes.  :func:`decode` raises only :class:`~pilot.errors.MalformedFrame`;
constructors raise ``ValueError`` for values that cannot be sent.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Callable, ClassVar, Iterable, Union

from pilot.errors import MalformedFrame
from pilot.identity import SIGNATURE_LEN, verify
from pilot.wire.value import Value, as_bytes, set_field

DISCOVER = 0x01
DISCOVER_REPLY = 0x02
PUNCH_REQUEST = 0x03
PUNCH_COMMAND = 0x04
RELAY = 0x05
RELAY_DELIVER = 0x06
SYNC = 0x07

MAX_DATAGRAM = 0xFFFF
PROOF_CONTEXT = b"pilot-beacon-v1"
PROOF_NONCE_LEN = 8
PROOF_LEN = 8 + PROOF_NONCE_LEN + SIGNATURE_LEN
DISCOVER_LEN = 5
PUNCH_REQUEST_LEN = 9
RELAY_HEADER_LEN = 9
RELAY_DELIVER_HEADER_LEN = 5
SYNC_HEADER_LEN = 7
MAX_RELAY_FRAME = MAX_DATAGRAM - RELAY_HEADER_LEN
MAX_SYNC_IDS = (MAX_DATAGRAM - SYNC_HEADER_LEN) // 4

_ID = struct.Struct(">I")
_TWO_IDS = struct.Struct(">II")
_TS = struct.Struct(">Q")
_PORT = struct.Struct(">H")
_SYNC = struct.Struct(">IH")


# --- validators -----------------------------------------------------------------

def _uint(name: str, value: int, bits: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ValueError(f"{name} must be an integer in [0, {1 << bits}), not {value!r}")


def _frame(name: str, value: bytes, limit: int) -> None:
    if not isinstance(value, bytes) or not 1 <= len(value) <= limit:
        raise ValueError(f"{name} must be 1 to {limit} bytes")


def _exactly(name: str, value: bytes, length: int) -> None:
    if not isinstance(value, bytes) or len(value) != length:
        raise ValueError(f"{name} must be {length} bytes")


def _proof(value: "Proof | None") -> None:
    if value is not None and not isinstance(value, Proof):
        raise ValueError(f"proof must be a Proof or None, not {type(value).__name__}")


def _ip(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``value`` as an IP address, an IPv4-mapped IPv6 address as IPv4 (as Go's ``To4``)."""
    ip = ipaddress.ip_address(value)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def canonical_host(host: str) -> str:
    """The canonical text of an IP address; ``ValueError`` if ``host`` is not one."""
    if not isinstance(host, str):
        raise ValueError(f"host must be an IP address string, not {type(host).__name__}")
    return str(_ip(host))


# --- the proof ----------------------------------------------------------------------

def proof_message(base: bytes, ts_ms: int, nonce: bytes) -> bytes:
    """What a proof's signature covers: context ‖ the 5- or 9-byte message ‖ ts ‖ nonce."""
    return PROOF_CONTEXT + base + _TS.pack(ts_ms) + nonce


def with_proof(base: bytes, sign: Callable[[bytes], bytes], ts_ms: int, nonce: bytes) -> bytes:
    """
    ``base`` (an encoded Discover or PunchRequest without proof) followed by
    its proof; ``sign`` is the node's Ed25519 signing function.
    """
    if not isinstance(base, bytes) or (base[:1], len(base)) not in (
            (bytes([DISCOVER]), DISCOVER_LEN), (bytes([PUNCH_REQUEST]), PUNCH_REQUEST_LEN)):
        raise ValueError("a proof follows a 5-byte Discover or a 9-byte PunchRequest only")
    proof = Proof(ts_ms, nonce, sign(proof_message(base, ts_ms, nonce)))
    return base + proof.encode()


class Proof(Value):
    __slots__ = ("ts_ms", "nonce", "signature")
    ts_ms: int
    nonce: bytes
    signature: bytes

    def __init__(self, ts_ms: int, nonce: bytes, signature: bytes) -> None:
        _uint("ts_ms", ts_ms, 64)
        _exactly("nonce", nonce, PROOF_NONCE_LEN)
        _exactly("signature", signature, SIGNATURE_LEN)
        set_field(self, "ts_ms", ts_ms)
        set_field(self, "nonce", nonce)
        set_field(self, "signature", signature)

    def encode(self) -> bytes:
        return _TS.pack(self.ts_ms) + self.nonce + self.signature

    @classmethod
    def decode(cls, data: bytes) -> "Proof":
        if len(data) != PROOF_LEN:
            raise MalformedFrame(f"beacon proof must be {PROOF_LEN} bytes, not {len(data)}")
        return cls(_TS.unpack_from(data)[0], data[8:16], data[16:])

    def verify(self, public_key: bytes, base: bytes) -> bool:
        """True if the signature over ``base`` (the message without proof) is ``public_key``'s."""
        return verify(public_key, proof_message(base, self.ts_ms, self.nonce), self.signature)


def _split_proof(data: bytes, base_len: int, name: str) -> tuple[bytes, Proof | None]:
    if len(data) == base_len:
        return data, None
    if len(data) == base_len + PROOF_LEN:
        return data[:base_len], Proof.decode(data[base_len:])
    raise MalformedFrame(f"{name} must be {base_len} or {base_len + PROOF_LEN} bytes, not {len(data)}")


# --- messages ------------------------------------------------------------------------

class Discover(Value):
    __slots__ = ("node_id", "proof")
    TYPE: ClassVar[int] = DISCOVER
    node_id: int
    proof: Proof | None

    def __init__(self, node_id: int, proof: Proof | None = None) -> None:
        _uint("node_id", node_id, 32)
        _proof(proof)
        set_field(self, "node_id", node_id)
        set_field(self, "proof", proof)

    @property
    def base(self) -> bytes:
        """The message without proof: what the reference sends, and what the proof signs."""
        return bytes([DISCOVER]) + _ID.pack(self.node_id)

    def encode(self) -> bytes:
        return self.base + (self.proof.encode() if self.proof else b"")

    @classmethod
    def decode(cls, data: bytes) -> "Discover":
        base, proof = _split_proof(_typed(data, DISCOVER), DISCOVER_LEN, "Discover")
        return cls(_ID.unpack_from(base, 1)[0], proof)


class PunchRequest(Value):
    __slots__ = ("requester", "target", "proof")
    TYPE: ClassVar[int] = PUNCH_REQUEST
    requester: int
    target: int
    proof: Proof | None

    def __init__(self, requester: int, target: int, proof: Proof | None = None) -> None:
        _uint("requester", requester, 32)
        _uint("target", target, 32)
        _proof(proof)
        set_field(self, "requester", requester)
        set_field(self, "target", target)
        set_field(self, "proof", proof)

    @property
    def base(self) -> bytes:
        return bytes([PUNCH_REQUEST]) + _TWO_IDS.pack(self.requester, self.target)

    def encode(self) -> bytes:
        return self.base + (self.proof.encode() if self.proof else b"")

    @classmethod
    def decode(cls, data: bytes) -> "PunchRequest":
        base, proof = _split_proof(_typed(data, PUNCH_REQUEST), PUNCH_REQUEST_LEN, "PunchRequest")
        requester, target = _TWO_IDS.unpack_from(base, 1)
        return cls(requester, target, proof)


class _Endpoint(Value):
    """An IP and UDP port: the body of DiscoverReply and PunchCommand."""

    __slots__ = ("host", "port")
    TYPE: ClassVar[int] = 0
    host: str
    port: int

    def __init__(self, host: str, port: int) -> None:
        host = canonical_host(host)
        _uint("port", port, 16)
        set_field(self, "host", host)
        set_field(self, "port", port)

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.host, self.port

    def encode(self) -> bytes:
        packed = _ip(self.host).packed
        return bytes([self.TYPE, len(packed)]) + packed + _PORT.pack(self.port)

    @classmethod
    def _decode(cls, data: bytes) -> tuple[str, int]:
        data = _typed(data, cls.TYPE)
        if len(data) < 2 or data[1] not in (4, 16):
            raise MalformedFrame(f"{cls.__name__} IP length must be 4 or 16, "
                                 f"not {data[1:2].hex() or 'missing'}")
        length = data[1]
        if len(data) != 4 + length:
            raise MalformedFrame(f"{cls.__name__} with a {length}-byte IP must be {4 + length} bytes, "
                                 f"not {len(data)}")
        ip = ipaddress.IPv4Address(data[2:6]) if length == 4 else ipaddress.IPv6Address(data[2:18])
        return str(ip), _PORT.unpack_from(data, 2 + length)[0]


class DiscoverReply(_Endpoint):
    """The address the beacon observed; an IPv4-mapped IPv6 address is sent as IPv4."""

    TYPE: ClassVar[int] = DISCOVER_REPLY

    @classmethod
    def decode(cls, data: bytes) -> "DiscoverReply":
        return cls(*cls._decode(data))


class PunchCommand(_Endpoint):
    """Tells a node to send punch probes to the peer at ``host:port``."""

    TYPE: ClassVar[int] = PUNCH_COMMAND

    @classmethod
    def decode(cls, data: bytes) -> "PunchCommand":
        return cls(*cls._decode(data))


class Relay(Value):
    __slots__ = ("sender", "destination", "frame")
    TYPE: ClassVar[int] = RELAY
    sender: int
    destination: int
    frame: bytes

    def __init__(self, sender: int, destination: int, frame: bytes) -> None:
        _uint("sender", sender, 32)
        _uint("destination", destination, 32)
        _frame("frame", frame, MAX_RELAY_FRAME)
        set_field(self, "sender", sender)
        set_field(self, "destination", destination)
        set_field(self, "frame", frame)

    def encode(self) -> bytes:
        return bytes([RELAY]) + _TWO_IDS.pack(self.sender, self.destination) + self.frame

    @classmethod
    def decode(cls, data: bytes) -> "Relay":
        data = _typed(data, RELAY)
        if len(data) <= RELAY_HEADER_LEN:
            raise MalformedFrame(f"Relay of {len(data)} bytes carries no frame")
        sender, destination = _TWO_IDS.unpack_from(data, 1)
        return cls(sender, destination, data[RELAY_HEADER_LEN:])


class RelayDeliver(Value):
    __slots__ = ("sender", "frame")
    TYPE: ClassVar[int] = RELAY_DELIVER
    sender: int
    frame: bytes

    def __init__(self, sender: int, frame: bytes) -> None:
        _uint("sender", sender, 32)
        _frame("frame", frame, MAX_DATAGRAM - RELAY_DELIVER_HEADER_LEN)
        set_field(self, "sender", sender)
        set_field(self, "frame", frame)

    def encode(self) -> bytes:
        return bytes([RELAY_DELIVER]) + _ID.pack(self.sender) + self.frame

    @classmethod
    def decode(cls, data: bytes) -> "RelayDeliver":
        data = _typed(data, RELAY_DELIVER)
        if len(data) <= RELAY_DELIVER_HEADER_LEN:
            raise MalformedFrame(f"RelayDeliver of {len(data)} bytes carries no frame")
        return cls(_ID.unpack_from(data, 1)[0], data[RELAY_DELIVER_HEADER_LEN:])


def _node_ids(value: tuple[int, ...]) -> None:
    if not isinstance(value, tuple) or len(value) > MAX_SYNC_IDS:
        raise ValueError(f"node_ids must be a tuple of at most {MAX_SYNC_IDS} ids")
    for node_id in value:
        if isinstance(node_id, bool) or not isinstance(node_id, int) or not 0 <= node_id <= 0xFFFFFFFF:
            raise ValueError(f"node_ids must hold 32-bit node ids, not {node_id!r}")


class Sync(Value):
    """Gossip between beacons: the node ids known to the beacon ``beacon_id``."""

    __slots__ = ("beacon_id", "node_ids")
    TYPE: ClassVar[int] = SYNC
    beacon_id: int
    node_ids: tuple[int, ...]

    def __init__(self, beacon_id: int, node_ids: Iterable[int]) -> None:
        node_ids = tuple(node_ids)
        _uint("beacon_id", beacon_id, 32)
        _node_ids(node_ids)
        set_field(self, "beacon_id", beacon_id)
        set_field(self, "node_ids", node_ids)

    def encode(self) -> bytes:
        ids = self.node_ids
        return bytes([SYNC]) + _SYNC.pack(self.beacon_id, len(ids)) + struct.pack(f">{len(ids)}I", *ids)

    @classmethod
    def decode(cls, data: bytes) -> "Sync":
        data = _typed(data, SYNC)
        if len(data) < SYNC_HEADER_LEN:
            raise MalformedFrame(f"Sync of {len(data)} bytes is shorter than its "
                                 f"{SYNC_HEADER_LEN}-byte header")
        beacon_id, count = _SYNC.unpack_from(data, 1)
        if len(data) != SYNC_HEADER_LEN + 4 * count:
            raise MalformedFrame(f"Sync with {count} ids must be {SYNC_HEADER_LEN + 4 * count} bytes, "
                                 f"not {len(data)}")
        return cls(beacon_id, struct.unpack_from(f">{count}I", data, SYNC_HEADER_LEN))


BeaconMessage = Union[Discover, DiscoverReply, PunchRequest, PunchCommand, Relay, RelayDeliver, Sync]

_DECODERS: dict[int, Callable[[bytes], BeaconMessage]] = {
    DISCOVER: Discover.decode, DISCOVER_REPLY: DiscoverReply.decode, PUNCH_REQUEST: PunchRequest.decode,
    PUNCH_COMMAND: PunchCommand.decode, RELAY: Relay.decode, RELAY_DELIVER: RelayDeliver.decode,
    SYNC: Sync.decode,
}


def _typed(datagram: Any, kind: int) -> bytes:
    data = as_bytes(datagram, "beacon datagram")
    if len(data) > MAX_DATAGRAM:
        raise MalformedFrame(f"beacon datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    if data[:1] != bytes([kind]):
        raise MalformedFrame(f"not a beacon message of type 0x{kind:02x} "
                             f"(starts {data[:1].hex() or 'empty'})")
    return data


def decode(datagram: Any) -> BeaconMessage:
    """Decode any beacon datagram by its first byte; only ``MalformedFrame`` escapes."""
    data = as_bytes(datagram, "beacon datagram")
    if not data:
        raise MalformedFrame("empty beacon datagram")
    decoder = _DECODERS.get(data[0])
    if decoder is None:
        raise MalformedFrame(f"unknown beacon message type 0x{data[0]:02x}")
    try:
        return decoder(data)
    except MalformedFrame:
        raise
    except (ValueError, struct.error) as e:  # a constructor refusing a decoded value: still bad input
        raise MalformedFrame(f"bad beacon message: {e}") from None
