# -*- test-case-name: tests.wire.test_packet -*-
"""
The Pilot packet: a 34-byte header and a payload (``docs/reference-wire.md`` §4.5).

Layout, all big-endian::

    0  1  version (high nibble) | flags (low nibble)
    1  1  protocol
    2  2  payload length
    4  6  source address (2-byte network, 4-byte node)
   10  6  destination address
   16  2  source port
   18  2  destination port
   20  4  sequence number
   24  4  acknowledgment number
   28  2  window (free receive slots, in segments; 0 = no limit)
   30  4  CRC-32 (zlib's) over the header with this field zeroed, then the payload

Receivers, like the reference, need at least 34 bytes and at least 34 plus
the payload length; bytes after the payload are ignored, the version nibble
is not checked, and a checksum mismatch drops the packet.

A stream ACK may carry a SACK option instead of data (docs/reference-wire.md §4.7): ``SACK``,
a block count 1 to 4, then that many (left, right) sequence-number pairs,
right edge exclusive.  :func:`parse_sack` applies the reference's rule for
telling the two apart.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Sequence

import attr

from pilot.address import Address
from pilot.errors import MalformedFrame
from pilot.wire.value import as_bytes as as_bytes  # re-exported: the tunnel codec takes it from here

VERSION = 1

# Flags (low nibble of byte 0).
SYN = 0x1
ACK = 0x2
FIN = 0x4
RST = 0x8

# Protocols (byte 1).
STREAM = 0x01
DATAGRAM = 0x02
CONTROL = 0x03

# Well-known ports (docs/reference-wire.md §4.6).
PING = 0
ECHO = 7
HANDSHAKE = 444
STDIO = 1000
DATA_EXCHANGE = 1001
EVENT_STREAM = 1002
TASK_SUBMIT = 1003
RESERVED_END = 1023
EPHEMERAL_START = 49152
EPHEMERAL_END = 65535

HEADER_LEN = 34
MAX_PAYLOAD = 0xFFFF
CHECKSUM_OFFSET = 30

# version|flags, protocol, payload length, src net, src node, dst net, dst node,
# src port, dst port, seq, ack, window, checksum
_HEADER = struct.Struct(">BBHHIHIHHIIHI")
assert _HEADER.size == HEADER_LEN
_CHECKSUM = struct.Struct(">I")
_ZERO_CHECKSUM = bytes(4)
_pack_checksum = _CHECKSUM.pack
_pack_header = _HEADER.pack
_crc32 = zlib.crc32


def _uint(bits: int) -> Any:
    limit = 1 << bits

    def check(instance: object, attribute: "attr.Attribute[int]", value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
            raise ValueError(f"{attribute.name} must be an integer in [0, {limit}), not {value!r}")

    return check


def _address(instance: object, attribute: "attr.Attribute[Address]", value: Address) -> None:
    if not isinstance(value, Address):
        raise ValueError(f"{attribute.name} must be an Address, not {type(value).__name__}")


def _payload(instance: object, attribute: "attr.Attribute[bytes]", value: bytes) -> None:
    if not isinstance(value, bytes):
        raise ValueError(f"payload must be bytes, not {type(value).__name__}")
    if len(value) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(value)} bytes exceeds {MAX_PAYLOAD}")


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class Packet:
    """
    One Pilot packet.  Construct with keywords (``protocol``, ``src`` and
    ``dst`` are required); a value that does not fit its field raises
    ``ValueError``.
    """

    version: int = attr.ib(default=VERSION, validator=_uint(4))
    flags: int = attr.ib(default=0, validator=_uint(4))
    protocol: int = attr.ib(validator=_uint(8))
    src: Address = attr.ib(validator=_address)
    dst: Address = attr.ib(validator=_address)
    src_port: int = attr.ib(default=0, validator=_uint(16))
    dst_port: int = attr.ib(default=0, validator=_uint(16))
    seq: int = attr.ib(default=0, validator=_uint(32))
    ack: int = attr.ib(default=0, validator=_uint(32))
    window: int = attr.ib(default=0, validator=_uint(16))
    payload: bytes = attr.ib(default=b"", validator=_payload)

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    @classmethod
    def unchecked(cls, version: int, flags: int, protocol: int, src: Address, dst: Address,
                  src_port: int, dst_port: int, seq: int, ack: int, window: int,
                  payload: bytes) -> "Packet":
        """
        A packet from values already known to fit their fields (the decoder's,
        a stream connection's), built without the validators: they were a
        fifth of a stream's per-packet CPU (docs/performance.md).
        """
        packet = _new(cls)
        # the slots' own setters: object.__setattr__ looks each one up again (0.6 against 1.0 us)
        _set_version(packet, version)
        _set_flags(packet, flags)
        _set_protocol(packet, protocol)
        _set_src(packet, src)
        _set_dst(packet, dst)
        _set_src_port(packet, src_port)
        _set_dst_port(packet, dst_port)
        _set_seq(packet, seq)
        _set_ack(packet, ack)
        _set_window(packet, window)
        _set_payload(packet, payload)
        return packet

    def _header(self, checksum: int) -> bytes:
        return _HEADER.pack(
            (self.version << 4) | self.flags, self.protocol, len(self.payload),
            self.src.network, self.src.node, self.dst.network, self.dst.node,
            self.src_port, self.dst_port, self.seq, self.ack, self.window, checksum)

    @property
    def checksum(self) -> int:
        """The CRC-32 this packet carries on the wire."""
        return zlib.crc32(self.payload, zlib.crc32(self._header(0)))

    def encode(self) -> bytes:
        payload, src, dst = self.payload, self.src, self.dst
        header = _pack_header(  # _header(0), once per packet sent: packed once, the checksum in its last 4 bytes
            (self.version << 4) | self.flags, self.protocol, len(payload), src.network, src.node, dst.network,
            dst.node, self.src_port, self.dst_port, self.seq, self.ack, self.window, 0)
        return b"".join((header[:CHECKSUM_OFFSET], _pack_checksum(_crc32(payload, _crc32(header))), payload))

    @classmethod
    def decode(cls, data: Any) -> "Packet":
        """Parse one packet; ``MalformedFrame`` for anything that is not one."""
        if type(data) is not bytes:
            data = as_bytes(data, "packet")
        if len(data) < HEADER_LEN:
            raise MalformedFrame(f"packet of {len(data)} bytes is shorter than the {HEADER_LEN}-byte header")
        (vf, protocol, length, src_net, src_node, dst_net, dst_node,
         src_port, dst_port, seq, ack, window, checksum) = _HEADER.unpack_from(data)
        end = HEADER_LEN + length
        if len(data) < end:
            raise MalformedFrame(
                f"packet truncated: payload length {length} needs {end} bytes, have {len(data)}")
        payload = data[HEADER_LEN:end]
        computed = _crc32(payload, _crc32(_ZERO_CHECKSUM, _crc32(data[:CHECKSUM_OFFSET])))
        if computed != checksum:
            raise MalformedFrame(f"packet checksum mismatch: carries {checksum:08x}, computed {computed:08x}")
        # every value comes from a field of its own width: nothing to validate; the addresses
        # are interned (a dict hit per peer, not a call)
        src = _ADDRESSES.get((src_net, src_node))
        if src is None:
            src = _interned_address(src_net, src_node)
        dst = _ADDRESSES.get((dst_net, dst_node))
        if dst is None:
            dst = _interned_address(dst_net, dst_node)
        packet = _new(cls)  # unchecked()'s body, without the call: once per packet received
        _set_version(packet, vf >> 4)
        _set_flags(packet, vf & 0x0F)
        _set_protocol(packet, protocol)
        _set_src(packet, src)
        _set_dst(packet, dst)
        _set_src_port(packet, src_port)
        _set_dst_port(packet, dst_port)
        _set_seq(packet, seq)
        _set_ack(packet, ack)
        _set_window(packet, window)
        _set_payload(packet, payload)
        return packet

_new = object.__new__
(_set_version, _set_flags, _set_protocol, _set_src, _set_dst, _set_src_port, _set_dst_port, _set_seq,
 _set_ack, _set_window, _set_payload) = (
    getattr(Packet, name).__set__ for name in ("version", "flags", "protocol", "src", "dst", "src_port",
                                               "dst_port", "seq", "ack", "window", "payload"))

_ADDRESSES: dict[tuple[int, int], Address] = {}
ADDRESS_CACHE = 4096


def _interned_address(network: int, node: int) -> Address:
    """The (immutable) Address for these fields, made once per peer rather than twice per packet."""
    try:
        return _ADDRESSES[network, node]
    except KeyError:
        if len(_ADDRESSES) >= ADDRESS_CACHE:
            _ADDRESSES.clear()
        address = _ADDRESSES[network, node] = Address(network, node)
        return address


# --- SACK option (docs/reference-wire.md §4.7) --------------------------------

SACK_MAGIC = b"SACK"
MAX_SACK_BLOCKS = 4
_SACK_BLOCK = struct.Struct(">II")

SackBlocks = list[tuple[int, int]]


def encode_sack(blocks: Sequence[tuple[int, int]]) -> bytes:
    """The SACK payload for 1 to 4 (left, right) blocks; ``ValueError`` otherwise."""
    if not 1 <= len(blocks) <= MAX_SACK_BLOCKS:
        raise ValueError(f"a SACK option carries 1 to {MAX_SACK_BLOCKS} blocks, not {len(blocks)}")
    out = [SACK_MAGIC, bytes([len(blocks)])]
    for left, right in blocks:
        for edge in (left, right):
            if isinstance(edge, bool) or not isinstance(edge, int) or not 0 <= edge <= 0xFFFFFFFF:
                raise ValueError(f"SACK edges are 32-bit sequence numbers, not {edge!r}")
        out.append(_SACK_BLOCK.pack(left, right))
    return b"".join(out)


def decode_sack(payload: Any) -> SackBlocks:
    """The blocks of a SACK payload; ``MalformedFrame`` with the reason if it is not one."""
    payload = as_bytes(payload, "SACK option")
    if len(payload) < 5 or payload[:4] != SACK_MAGIC:
        raise MalformedFrame("not a SACK option (no 'SACK' and count)")
    count = payload[4]
    if not 1 <= count <= MAX_SACK_BLOCKS:
        raise MalformedFrame(f"SACK block count {count} is not 1 to {MAX_SACK_BLOCKS}")
    if len(payload) < 5 + count * _SACK_BLOCK.size:
        raise MalformedFrame(f"SACK option with {count} blocks is truncated ({len(payload)} bytes)")
    return [_SACK_BLOCK.unpack_from(payload, 5 + i * _SACK_BLOCK.size) for i in range(count)]


def parse_sack(payload: Any) -> SackBlocks | None:
    """
    The reference's test for an ACK's payload: the blocks if it reads as a
    SACK option (``SACK``, count 1-4, enough bytes; any extra bytes are
    ignored), else ``None`` (it is data).
    """
    if type(payload) is bytes and payload[:4] != SACK_MAGIC:
        return None  # data, the common case: decided without an exception
    try:
        return decode_sack(payload)
    except MalformedFrame:
        return None
