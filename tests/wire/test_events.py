"""
Tests for L{pilot.wire.events}: the port 1002 events of
docs/reference-wire.md §8.2, and hostile input.
"""

from __future__ import annotations

import struct

from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import MalformedFrame
from pilot.wire.events import MAX_PAYLOAD, MAX_TOPIC, Event, EventDecoder, check_topic, encode_event


class EncodingTests(SynchronousTestCase):
    def test_bytes(self) -> None:
        """Topic length (2 bytes), topic, payload length (4 bytes), payload; big-endian."""
        self.assertEqual(encode_event("news", b"hi"), b"\x00\x04news\x00\x00\x00\x02hi")
        self.assertEqual(encode_event("*"), b"\x00\x01*\x00\x00\x00\x00")

    def test_limits(self) -> None:
        self.assertRaises(ValueError, encode_event, "t" * (MAX_TOPIC + 1))
        encode_event("t" * MAX_TOPIC)
        self.assertIsNone(check_topic("a/b"))
        self.assertIsNotNone(check_topic(""))
        self.assertIsNotNone(check_topic("é" * 600))


class DecoderTests(SynchronousTestCase):
    STREAM = encode_event("sub") + encode_event("t1", b"one") + encode_event("ü", b"\x00" * 300)
    EXPECTED = [Event("sub"), Event("t1", b"one"), Event("ü", b"\x00" * 300)]

    def test_every_split(self) -> None:
        for cut in range(len(self.STREAM)):
            decoder = EventDecoder()
            self.assertEqual(decoder.feed(self.STREAM[:cut]) + decoder.feed(self.STREAM[cut:]),
                             self.EXPECTED, cut)

    def test_byte_by_byte(self) -> None:
        decoder = EventDecoder()
        out: list[object] = []
        for i in range(len(self.STREAM)):
            out += decoder.feed(self.STREAM[i:i + 1])
        self.assertEqual(out, self.EXPECTED)
        self.assertEqual(decoder.buffered, 0)

    def test_truncated_waits(self) -> None:
        decoder = EventDecoder()
        self.assertEqual(decoder.feed(encode_event("t", b"abc")[:-1]), [])
        self.assertEqual(decoder.buffered, 9)

    def test_oversized_topic(self) -> None:
        decoder = EventDecoder()
        self.assertRaises(MalformedFrame, decoder.feed, struct.pack(">H", MAX_TOPIC + 1))
        self.assertIsNotNone(decoder.broken)
        self.assertRaises(MalformedFrame, decoder.feed, encode_event("ok"))

    def test_oversized_payload(self) -> None:
        """Refused at the length, before the payload is awaited."""
        decoder = EventDecoder()
        self.assertRaises(MalformedFrame, decoder.feed, b"\x00\x01t" + struct.pack(">I", MAX_PAYLOAD + 1))
        self.assertEqual(decoder.buffered, 0)
        small = EventDecoder(max_payload=4)
        self.assertRaises(MalformedFrame, small.feed, encode_event("t", b"12345"))

    def test_topic_not_utf8(self) -> None:
        """Returned in its place as a MalformedFrame; the next event still decodes."""
        decoder = EventDecoder()
        out = decoder.feed(b"\x00\x01\xff\x00\x00\x00\x00" + encode_event("ok"))
        self.assertIsInstance(out[0], MalformedFrame)
        self.assertEqual(out[1], Event("ok"))

    def test_garbage(self) -> None:
        import random
        rng = random.Random(2)
        for _ in range(300):
            decoder = EventDecoder(max_payload=1 << 16)
            try:
                for item in decoder.feed(bytes(rng.randrange(256) for _ in range(rng.randrange(40)))):
                    self.assertIsInstance(item, (Event, MalformedFrame))
            except MalformedFrame:
                pass
