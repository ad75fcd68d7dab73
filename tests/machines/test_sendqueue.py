"""pilot.machines.connection.sendqueue: the writes not yet cut into segments."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from pilot.machines.connection.sendqueue import SendQueue, sack_safe
from pilot.wire.packet import encode_sack, parse_sack


class SendQueueTests(SynchronousTestCase):
    def test_within_the_head_write(self) -> None:
        q = SendQueue()
        q.write(b"abcdefgh")
        q.write(b"")
        self.assertEqual((q.take(3), q.queued), (b"abc", 5))
        self.assertEqual((q.take(5), q.queued), (b"defgh", 0))
        q.write(b"ij")
        self.assertEqual(q.take(2), b"ij")

    def test_across_writes(self) -> None:
        q = SendQueue()
        for chunk in (b"ab", b"cde", b"f"):
            q.write(chunk)
        self.assertEqual(q.take(4), b"abcd")
        self.assertEqual((q.take(2), q.queued), (b"ef", 0))

    def test_a_segment_that_would_read_as_sack_is_cut(self) -> None:
        option = encode_sack([(1, 2)])
        for writes in ([option + b"tail"], [option[:3], option[3:] + b"tail"]):
            q = SendQueue()
            for chunk in writes:
                q.write(chunk)
            first = q.take(len(option) + 4)
            self.assertIsNone(parse_sack(first))
            self.assertEqual(first, sack_safe(option + b"tail"))
            self.assertEqual(first + q.take(q.queued), option + b"tail")

    def test_bytes_come_out_as_written(self) -> None:
        rng = random.Random(7)
        q = SendQueue()
        written = b""
        out = []
        for _ in range(300):
            chunk = bytes(rng.choice(b"SACK\x01\x00x") for _ in range(rng.randrange(0, 40)))
            q.write(chunk)
            written += chunk
            while q.queued and rng.random() < 0.7:
                piece = q.take(rng.randrange(1, q.queued + 1))
                self.assertTrue(piece)
                self.assertIsNone(parse_sack(piece))
                out.append(piece)
        out.append(q.take(q.queued) if q.queued else b"")
        while q.queued:
            out.append(q.take(q.queued))
        self.assertEqual(b"".join(out), written)
