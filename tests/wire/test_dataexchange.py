"""
Tests for L{pilot.wire.dataexchange}: the port 1001 frames of
docs/reference-wire.md §8.1, whole and in every split, and hostile input.
"""

from __future__ import annotations

import struct
from typing import Sequence

from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import MalformedFrame
from pilot.wire.dataexchange import (
    BINARY, FILE, JSON, MAX_PAYLOAD, TEXT, Chunk, End, Frame, FrameDecoder, FrameReader, Start,
    ack_text, decode_file, encode_file, encode_frame, err_text, file_prefix, type_name,
)


def whole(events: Sequence[object]) -> list[tuple[int, int, str | None, bytes]]:
    """Events folded into (type, length, name, data) per frame."""
    frames: list[tuple[int, int, str | None, bytes]] = []
    start: Start | None = None
    data = b""
    for e in events:
        if isinstance(e, Start):
            start, data = e, b""
        elif isinstance(e, Chunk):
            data += e.data
        else:
            assert isinstance(e, End) and start is not None
            frames.append((start.type, start.length, start.name, data))
    return frames


class EncodingTests(SynchronousTestCase):
    def test_text_bytes(self) -> None:
        """Type and length, 4 bytes each, big-endian, then the payload."""
        self.assertEqual(encode_frame(TEXT, b"hello"), b"\x00\x00\x00\x01\x00\x00\x00\x05hello")

    def test_file_bytes(self) -> None:
        """A file's payload: 2-byte name length, the name, the content; the length counts all three."""
        self.assertEqual(encode_file("a.txt", b"xyz"),
                         b"\x00\x00\x00\x04\x00\x00\x00\x0a\x00\x05a.txtxyz")
        self.assertEqual(file_prefix("a.txt", 3) + b"xyz", encode_file("a.txt", b"xyz"))

    def test_decode_file(self) -> None:
        self.assertEqual(decode_file(b"\x00\x02ab" + b"content"), ("ab", b"content"))
        self.assertRaises(MalformedFrame, decode_file, b"\x00")
        self.assertRaises(MalformedFrame, decode_file, b"\x00\x09ab")
        self.assertRaises(MalformedFrame, decode_file, b"\x00\x01\xff")

    def test_limits(self) -> None:
        self.assertRaises(ValueError, encode_frame, TEXT, b"x" * (MAX_PAYLOAD + 1))
        self.assertRaises(ValueError, file_prefix, "n" * 70000, 0)
        self.assertRaises(ValueError, encode_frame, -1, b"")

    def test_replies(self) -> None:
        """The reference's reply texts."""
        self.assertEqual(ack_text(TEXT, 5), "ACK TEXT 5 bytes")
        self.assertEqual(ack_text(FILE, 3), "ACK FILE 3 bytes")
        self.assertEqual(err_text(JSON, "disk full"), "ERR JSON save failed: disk full")
        self.assertEqual(type_name(BINARY), "BINARY")
        self.assertEqual(type_name(9), "TYPE9")


class ReaderTests(SynchronousTestCase):
    STREAM = (encode_frame(TEXT, b"hi") + encode_file("dir/f.bin", b"\x00\x01" * 50)
              + encode_frame(BINARY, b"") + encode_frame(JSON, b'{"a":1}'))
    EXPECTED = [(TEXT, 2, None, b"hi"), (FILE, 100, "dir/f.bin", b"\x00\x01" * 50),
                (BINARY, 0, None, b""), (JSON, 7, None, b'{"a":1}')]

    def test_whole(self) -> None:
        reader = FrameReader()
        self.assertEqual(whole(reader.feed(self.STREAM)), self.EXPECTED)
        self.assertTrue(reader.idle)

    def test_byte_by_byte(self) -> None:
        """Any split gives the same frames; a file's content passes through as it comes."""
        reader = FrameReader()
        events: list[object] = []
        for i in range(len(self.STREAM)):
            events += reader.feed(self.STREAM[i:i + 1])
        self.assertEqual(whole(events), self.EXPECTED)
        self.assertTrue(all(len(e.data) == 1 for e in events if isinstance(e, Chunk)))

    def test_every_split(self) -> None:
        for cut in range(len(self.STREAM)):
            reader = FrameReader()
            events = reader.feed(self.STREAM[:cut]) + reader.feed(self.STREAM[cut:])
            self.assertEqual(whole(events), self.EXPECTED, cut)

    def test_truncated(self) -> None:
        """A stream cut inside a frame yields no End for it, and the reader is not idle."""
        data = encode_frame(TEXT, b"hello")[:-2]
        reader = FrameReader()
        events = reader.feed(data)
        self.assertFalse(any(isinstance(e, End) for e in events))
        self.assertFalse(reader.idle)

    def test_oversized_length(self) -> None:
        """A length over the limit breaks the stream: it cannot be resynchronised."""
        reader = FrameReader()
        hostile = struct.pack(">II", TEXT, MAX_PAYLOAD + 1)
        self.assertRaises(MalformedFrame, reader.feed, hostile)
        self.assertIsNotNone(reader.broken)
        self.assertRaises(MalformedFrame, reader.feed, encode_frame(TEXT, b"ok"))

    def test_lower_limit(self) -> None:
        reader = FrameReader(max_payload=10)
        self.assertRaises(MalformedFrame, reader.feed, encode_frame(TEXT, b"x" * 11))

    def test_huge_length_never_buffers(self) -> None:
        """A 4 GiB length is refused at the header, before any payload is awaited."""
        reader = FrameReader()
        with self.assertRaises(MalformedFrame) as caught:
            reader.feed(b"\x00\x00\x00\x01\xff\xff\xff\xff")
        self.assertIn("exceeds", str(caught.exception))

    def test_file_name_longer_than_frame(self) -> None:
        reader = FrameReader()
        hostile = struct.pack(">IIH", FILE, 4, 100) + b"ab"
        self.assertRaises(MalformedFrame, reader.feed, hostile)

    def test_file_frame_too_short_for_name_length(self) -> None:
        reader = FrameReader()
        self.assertRaises(MalformedFrame, reader.feed, struct.pack(">II", FILE, 1) + b"x")

    def test_file_name_not_utf8(self) -> None:
        reader = FrameReader()
        self.assertRaises(MalformedFrame, reader.feed, struct.pack(">IIH", FILE, 4, 2) + b"\xff\xfe")

    def test_unknown_type_passes(self) -> None:
        """A type the reference does not use is the receiver's to refuse; the framing is intact."""
        self.assertEqual(whole(FrameReader().feed(encode_frame(77, b"z"))), [(77, 1, None, b"z")])

    def test_garbage(self) -> None:
        """Random bytes either wait, frame or break the stream with MalformedFrame; nothing else."""
        import random
        rng = random.Random(13)
        for _ in range(300):
            reader = FrameReader(max_payload=1 << 16)
            blob = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
            try:
                reader.feed(blob)
            except MalformedFrame:
                pass


class DecoderTests(SynchronousTestCase):
    def test_frames(self) -> None:
        decoder = FrameDecoder()
        data = encode_frame(TEXT, b"ACK TEXT 2 bytes") + encode_file("n", b"c")
        self.assertEqual(decoder.feed(data[:5]), [])
        self.assertEqual(decoder.feed(data[5:]),
                         [Frame(TEXT, b"ACK TEXT 2 bytes"), Frame(FILE, b"\x00\x01nc")])
        self.assertTrue(decoder.idle)
