"""
Tests for L{pilot.apps.exchange}: frames to saved messages and files and the
reference's ACK/ERR replies; the shared memory budget; a cut connection.
"""

from __future__ import annotations

import collections
import os
import struct

from twisted.trial.unittest import SynchronousTestCase

from pilot.apps.exchange import Budget, Receiver
from pilot.apps.storage import Storage
from pilot.wire.dataexchange import BINARY, FILE, JSON, TEXT, FrameReader, encode_file, encode_frame

NOW = 1_780_000_000.0


class ReceiverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = self.mktemp()
        self.storage = Storage(self.home, reserve=0)
        self.counters: collections.Counter[str] = collections.Counter()
        self.budget = Budget(1000)
        self.receiver = Receiver(self.storage, "0:0000.0000.0009", lambda: NOW, self.budget, self.counters)
        self.reader = FrameReader()

    def feed(self, data: bytes) -> list[str]:
        return self.receiver.events(self.reader.feed(data))

    def test_messages(self) -> None:
        replies = self.feed(encode_frame(TEXT, b"hello") + encode_frame(JSON, b'{"a":1}')
                            + encode_frame(BINARY, b"\x00\x01\x02"))
        self.assertEqual(replies, ["ACK TEXT 5 bytes", "ACK JSON 7 bytes", "ACK BINARY 3 bytes"])
        self.assertEqual([m["type"] for m in self.storage.messages()], ["BINARY", "JSON", "TEXT"])
        self.assertEqual(self.counters["messages.saved"], 3)
        self.assertEqual(self.budget.held, 0)

    def test_file_in_pieces(self) -> None:
        """A file arrives piece by piece; the ACK counts its content."""
        data = encode_file("notes.txt", b"z" * 5000)
        replies: list[str] = []
        for i in range(0, len(data), 700):
            replies += self.feed(data[i:i + 700])
        self.assertEqual(replies, ["ACK FILE 5000 bytes"])
        [entry] = self.storage.files()
        self.assertTrue(entry["name"].startswith("notes-") and entry["name"].endswith(".txt"))
        self.assertEqual(entry["bytes"], 5000)

    def test_traversal_name(self) -> None:
        self.assertEqual(self.feed(encode_file("../../../../tmp/evil.sh", b"#!")), ["ACK FILE 2 bytes"])
        [entry] = self.storage.files()
        self.assertEqual(os.path.dirname(entry["path"]), self.storage.received)
        self.assertTrue(entry["name"].startswith("evil-"))
        self.assertEqual(self.counters["names.cleaned"], 1)
        self.feed(encode_file("plain.txt", b"x"))
        self.assertEqual(self.counters["names.cleaned"], 1)

    def test_unknown_type(self) -> None:
        """Answered with ERR (its bytes skipped); the next frame is served."""
        replies = self.feed(encode_frame(9, b"??") + encode_frame(TEXT, b"ok"))
        self.assertEqual(replies, ["ERR TYPE9 save failed: unknown frame type 9", "ACK TEXT 2 bytes"])
        self.assertEqual(self.counters["messages.refused"], 1)

    def test_budget(self) -> None:
        """A message larger than the budget left is refused, not buffered; the budget comes back."""
        replies = self.feed(encode_frame(TEXT, b"x" * 1001) + encode_frame(TEXT, b"y" * 1000))
        self.assertEqual(replies, ["ERR TEXT save failed: busy: too many messages being received; retry",
                                   "ACK TEXT 1000 bytes"])

    def test_budget_shared(self) -> None:
        other = Receiver(self.storage, "b", lambda: NOW, self.budget, self.counters)
        other_reader = FrameReader()
        other.events(other_reader.feed(struct.pack(">II", TEXT, 800) + b"a"))
        self.assertEqual(self.budget.held, 800)
        self.assertEqual(self.feed(encode_frame(TEXT, b"b" * 300))[0][:3], "ERR")
        other.lost()
        self.assertEqual(self.budget.held, 0)
        self.assertEqual(self.counters["frames.truncated"], 1)

    def test_disk_full(self) -> None:
        self.receiver.storage = Storage(self.home, reserve=1 << 62)
        [reply] = self.feed(encode_file("a", b"123"))
        self.assertTrue(reply.startswith("ERR FILE save failed: disk full"), reply)
        self.assertEqual(self.storage.files(), [])

    def test_cut_file(self) -> None:
        """A connection lost inside a file: nothing in received/, the temporary file removed."""
        self.feed(encode_file("big.bin", b"q" * 100)[:60])
        self.receiver.lost()
        self.assertEqual(self.storage.files(), [])
        self.assertEqual(os.listdir(self.storage.incoming), [])
        self.assertEqual(self.counters["frames.truncated"], 1)

    def test_empty_file(self) -> None:
        self.assertEqual(self.feed(encode_file("e", b"")), ["ACK FILE 0 bytes"])
        self.assertEqual(self.counters["files.saved"], 1)
        self.assertEqual(self.storage.files()[0]["bytes"], 0)
        self.assertEqual(FILE, 4)
