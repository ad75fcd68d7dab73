"""
Tests for L{pilot.wire.packet}: the 34-byte header, its CRC, and SACK options.
"""

from __future__ import annotations

import random
import struct
import zlib
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pilot.address import Address
from pilot.errors import MalformedFrame
from pilot.wire import packet
from pilot.wire.packet import (
    ACK, CONTROL, DATAGRAM, FIN, HEADER_LEN, RST, STREAM, SYN, Packet, decode_sack, encode_sack,
    parse_sack,
)

#: go-session-2, UDP entry 21, without the PILT magic (docs/reference-wire.md §4.5).
GO_SYN = bytes.fromhex("1101" "0000" "0000" "00000001" "0000" "00000002" "c000" "0007"
                       "00000000" "00000000" "0200" "65a71a43")

addresses = st.builds(Address, st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF))
packets = st.builds(
    Packet,
    version=st.integers(0, 15), flags=st.integers(0, 15), protocol=st.integers(0, 255),
    src=addresses, dst=addresses, src_port=st.integers(0, 0xFFFF), dst_port=st.integers(0, 0xFFFF),
    seq=st.integers(0, 0xFFFFFFFF), ack=st.integers(0, 0xFFFFFFFF), window=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=300),
)


def sample(**kw: Any) -> Packet:
    fields: dict[str, Any] = dict(
        protocol=STREAM, src=Address(0, 1), dst=Address(1, 0x00A3F291), flags=SYN | ACK,
        src_port=49152, dst_port=7, seq=1, ack=2, window=512, payload=b"ping-1")
    fields.update(kw)
    return Packet(**fields)


class ConstantTests(SynchronousTestCase):
    def test_values(self) -> None:
        self.assertEqual((SYN, ACK, FIN, RST), (1, 2, 4, 8))
        self.assertEqual((STREAM, DATAGRAM, CONTROL), (1, 2, 3))
        self.assertEqual(
            (packet.ECHO, packet.HANDSHAKE, packet.STDIO, packet.DATA_EXCHANGE, packet.EVENT_STREAM,
             packet.TASK_SUBMIT, packet.EPHEMERAL_START),
            (7, 444, 1000, 1001, 1002, 1003, 49152))
        self.assertEqual(HEADER_LEN, 34)


class GoVectorTests(SynchronousTestCase):
    def test_decode(self) -> None:
        p = Packet.decode(GO_SYN)
        self.assertEqual(p, Packet(version=1, flags=SYN, protocol=STREAM, src=Address(0, 1),
                                   dst=Address(0, 2), src_port=49152, dst_port=packet.ECHO,
                                   seq=0, ack=0, window=512, payload=b""))
        self.assertTrue(p.has(SYN))
        self.assertFalse(p.has(ACK))

    def test_checksum(self) -> None:
        """The carried CRC is zlib's CRC-32 over the header with the field zeroed."""
        self.assertEqual(zlib.crc32(GO_SYN[:30] + bytes(4)), 0x65A71A43)
        self.assertEqual(Packet.decode(GO_SYN).checksum, 0x65A71A43)

    def test_reencode(self) -> None:
        self.assertEqual(Packet.decode(GO_SYN).encode(), GO_SYN)

    def test_every_bit_flip_is_refused(self) -> None:
        for i in range(len(GO_SYN) * 8):
            damaged = bytearray(GO_SYN)
            damaged[i // 8] ^= 1 << (i % 8)
            self.assertRaises(MalformedFrame, Packet.decode, bytes(damaged))

    def test_trailing_bytes_ignored(self) -> None:
        self.assertEqual(Packet.decode(GO_SYN + b"junk").encode(), GO_SYN)


class CodecTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(packets)
    def test_round_trip(self, p: Packet) -> None:
        data = p.encode()
        self.assertEqual(len(data), HEADER_LEN + len(p.payload))
        self.assertEqual(struct.unpack_from(">H", data, 2)[0], len(p.payload))
        self.assertEqual(Packet.decode(data), p)
        self.assertEqual(Packet.decode(bytearray(data)), p)
        self.assertEqual(Packet.decode(memoryview(data)), p)

    def test_layout(self) -> None:
        data = sample(version=1).encode()
        self.assertEqual(data[0], 0x13)
        self.assertEqual(data[1], STREAM)
        self.assertEqual(data[4:10], Address(0, 1).to_bytes())
        self.assertEqual(data[10:16], bytes.fromhex("000100a3f291"))
        self.assertEqual(data[16:20], bytes.fromhex("c0000007"))
        self.assertEqual(data[20:28], bytes.fromhex("0000000100000002"))
        self.assertEqual(data[28:30], bytes.fromhex("0200"))
        self.assertEqual(data[34:], b"ping-1")

    def test_max_payload(self) -> None:
        p = sample(payload=b"x" * 0xFFFF)
        self.assertEqual(Packet.decode(p.encode()), p)
        self.assertRaises(ValueError, sample, payload=b"x" * 0x10000)

    def test_truncated_at_every_length(self) -> None:
        data = sample().encode()
        for n in range(len(data)):
            self.assertRaises(MalformedFrame, Packet.decode, data[:n])

    def test_length_larger_than_data(self) -> None:
        data = bytearray(sample().encode())
        data[2:4] = b"\xff\xff"
        self.assertRaises(MalformedFrame, Packet.decode, bytes(data))

    def test_wrong_types(self) -> None:
        for value in (None, "x" * 40, 34, [0] * 40, 3.5, object()):
            self.assertRaises(MalformedFrame, Packet.decode, value)

    def test_random_bytes(self) -> None:
        rng = random.Random(0x5EED)
        for _ in range(2000):
            data = rng.randbytes(rng.randrange(0, 120))
            try:
                Packet.decode(data)
            except MalformedFrame:
                pass

    def test_random_headers_with_valid_checksum_decode(self) -> None:
        """Any 34 bytes with a fitting length and a right CRC are a packet, and re-encode as given."""
        rng = random.Random(7)
        for _ in range(500):
            payload = rng.randbytes(rng.randrange(0, 40))
            header = bytearray(rng.randbytes(HEADER_LEN))
            header[2:4] = len(payload).to_bytes(2, "big")
            header[30:34] = bytes(4)
            header[30:34] = zlib.crc32(payload, zlib.crc32(bytes(header))).to_bytes(4, "big")
            data = bytes(header) + payload
            self.assertEqual(Packet.decode(data).encode(), data)

    def test_constructor_validates(self) -> None:
        for kw in (dict(version=16), dict(flags=16), dict(protocol=256), dict(protocol=-1),
                   dict(src_port=0x10000), dict(dst_port=-1), dict(seq=1 << 32), dict(ack=-1),
                   dict(window=0x10000), dict(seq=True), dict(seq=1.0), dict(payload="text"),
                   dict(payload=bytearray(b"x")), dict(src="0:0000.0000.0001"), dict(dst=None)):
            self.assertRaises(ValueError, sample, **kw)


class SackTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        for blocks in ([(1, 4097)], [(1, 2), (10, 20), (30, 40), (0xFFFFFFF0, 5)]):
            data = encode_sack(blocks)
            self.assertEqual(len(data), 5 + 8 * len(blocks))
            self.assertEqual(data[:5], b"SACK" + bytes([len(blocks)]))
            self.assertEqual(decode_sack(data), blocks)
            self.assertEqual(parse_sack(data), blocks)

    def test_layout(self) -> None:
        self.assertEqual(encode_sack([(1, 0x1001)]), b"SACK\x01" + bytes.fromhex("0000000100001001"))

    def test_trailing_bytes_ignored(self) -> None:
        """The reference needs only enough bytes; anything after the blocks is ignored."""
        self.assertEqual(parse_sack(encode_sack([(5, 9)]) + b"more"), [(5, 9)])

    def test_not_sack(self) -> None:
        for payload in (b"", b"SACK", b"SACK\x00", b"SACK\x05" + bytes(40), b"SACK\x02" + bytes(15),
                        b"sack\x01" + bytes(8), b"hello world", b"SACX\x01" + bytes(8)):
            self.assertIsNone(parse_sack(payload))
            self.assertRaises(MalformedFrame, decode_sack, payload)

    def test_truncated_at_every_length(self) -> None:
        data = encode_sack([(1, 2), (3, 4), (5, 6)])
        for n in range(len(data)):
            self.assertIsNone(parse_sack(data[:n]))

    def test_wrong_types(self) -> None:
        for value in (None, "SACK\x01", 5):
            self.assertIsNone(parse_sack(value))
            self.assertRaises(MalformedFrame, decode_sack, value)

    def test_encode_refuses(self) -> None:
        self.assertRaises(ValueError, encode_sack, [])
        self.assertRaises(ValueError, encode_sack, [(1, 2)] * 5)
        self.assertRaises(ValueError, encode_sack, [(1 << 32, 2)])
        self.assertRaises(ValueError, encode_sack, [(1, -1)])

    def test_random_bytes(self) -> None:
        rng = random.Random(1)
        for _ in range(2000):
            data = (b"SACK" if rng.random() < 0.5 else b"") + rng.randbytes(rng.randrange(0, 40))
            blocks = parse_sack(data)
            if blocks is not None:
                self.assertTrue(1 <= len(blocks) <= 4)


class UncheckedTests(SynchronousTestCase):
    def test_same_packet_as_the_checked_constructor(self) -> None:
        checked = Packet(protocol=1, flags=3, src=Address(0, 1), dst=Address(2, 3), src_port=4,
                         dst_port=5, seq=6, ack=7, window=8, payload=b"data")
        unchecked = Packet.unchecked(1, 3, 1, Address(0, 1), Address(2, 3), 4, 5, 6, 7, 8, b"data")
        self.assertEqual(unchecked, checked)
        self.assertEqual(hash(unchecked), hash(checked))
        self.assertEqual(unchecked.encode(), checked.encode())
        self.assertEqual(Packet.decode(checked.encode()), checked)
