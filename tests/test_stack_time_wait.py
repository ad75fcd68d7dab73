"""
Tests for L{pilot.stack.timewait}: TIME_WAIT kept apart from the connection
table (``docs/stack.md``, "TIME_WAIT"): many short streams in a row are not
refused, a TIME_WAIT entry still answers stray FINs and drops old
duplicates, and the entries are bounded and purged.  Everything runs on an
injected clock.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.address import Address
from pilot.stack import Stack
from pilot.stack import ports as limits
from pilot.stack.timewait import MAX_TIME_WAIT, TimeWaits
from pilot.wire.packet import ACK, FIN, RST, SYN
from tests.stackfakes import A, B, FakeTunnel, Recorder, RecordingFactory
from tests.test_stack import HandFedTestCase
from tests.test_stack_burst import HeapClock

PEER = Address(0, 0x5000)


class ShortStreamsTests(SynchronousTestCase):
    """Two stacks joined by a fake tunnel with a 0.2 ms one-way delay."""

    def setUp(self) -> None:
        self.clock = HeapClock()
        self.tunnel = FakeTunnel(self.clock, delay=0.0002, encode=False)
        self.a = self.tunnel.add(A)
        self.b = self.tunnel.add(B)

    def run_until(self, d: Deferred[Any], limit: float = 1.0) -> list[Any]:
        results: list[Any] = []
        d.addBoth(results.append)
        end = self.clock.seconds() + limit
        while not results and self.clock.seconds() < end:
            self.clock.advance(0.0001)
        return results

    def test_5000_sequential_pings_within_10_s(self) -> None:
        """
        5,000 pings in a row (each a new stream to port 7, closed after the
        echo) within 10 s all succeed: the closed ones wait out TIME_WAIT
        outside the per-port limit of 1,024 that refused them before.
        """
        for seq in range(5000):
            results = self.run_until(self.a.ping(B, seq=seq))
            self.assertEqual(len(results), 1, seq)
            self.assertIsInstance(results[0], float, f"ping {seq}: {results[0]}")
        self.assertLess(self.clock.seconds(), 10.0)
        self.assertGreater(len(self.b.time_waits), limits.MAX_PER_PORT)
        self.assertGreater(len(self.a.time_waits), limits.MAX_PER_PORT)
        self.assertLessEqual(len(self.b.streams), 2)
        for stack in (self.a, self.b):
            for name in ("refused.limit", "dropped.syn_rate", "errors", "reset.no_connection"):
                self.assertEqual(stack.counters[name], 0, name)
        for _ in range(1100):  # every TIME_WAIT runs out: nothing is left behind
            self.clock.advance(0.01)
        for stack in (self.a, self.b):
            self.assertEqual((len(stack.time_waits), len(stack.time_waits.ports), len(stack.streams)),
                             (0, 0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_time_wait_ports_are_not_handed_out(self) -> None:
        """An ephemeral port in TIME_WAIT is skipped, so the new stream never meets the old one's strays."""
        results = self.run_until(self.a.ping(B))
        self.assertIsInstance(results[0], float)
        for _ in range(100):
            self.clock.advance(0.0001)
        (_, _, port), = self.a.time_waits._entries
        self.a.ephemeral.next = port
        self.assertNotEqual(self.a.ephemeral.allocate(), port)


class TimeWaitEntryTests(HandFedTestCase):
    """One stack at B fed by hand; PEER dials its port 1000."""

    KEY = (PEER, 50000, 1000)

    def setUp(self) -> None:
        super().setUp()
        self.stack.listen(1000, self.factory)

    def open(self, src_port: int = 50000) -> None:
        self.feed(SYN, src_port=src_port)
        self.feed(ACK, src_port=src_port, seq=1, ack=1, payload=b"hi")
        self.take()

    def peer_closes(self, src_port: int = 50000) -> None:
        self.open(src_port)
        self.feed(FIN, src_port=src_port, seq=3, ack=1)

    def test_peer_fin_moves_to_time_wait(self) -> None:
        """The FIN is answered with FIN+ACK; the connection is gone from the table and the limits."""
        self.peer_closes()
        fin_ack, = self.take()
        self.assertEqual((fin_ack.flags, fin_ack.seq, fin_ack.ack), (FIN | ACK, 1, 4))
        self.assertEqual(len(self.factory.built[0].lost), 1)
        self.assertEqual((len(self.stack.streams), self.stack.streams.port_use[1000]), (0, 0))
        self.assertEqual(self.stack.connections(), [])
        self.assertIn(self.KEY, self.stack.time_waits)
        self.assertEqual(self.stack.time_waits.ports, {1000: 1})
        # a lost FIN+ACK: the repeated FIN is answered the same way, every time
        self.feed(FIN, seq=3, ack=1)
        self.feed(FIN, seq=3, ack=1)
        again = self.take()
        self.assertEqual([(p.flags, p.seq, p.ack, p.window, p.dst_port) for p in again],
                         [(fin_ack.flags, fin_ack.seq, fin_ack.ack, fin_ack.window, 50000)] * 2)
        # the reference echoes our FIN+ACK: one pure ACK, ever
        self.feed(FIN | ACK, seq=4, ack=2)
        self.feed(FIN | ACK, seq=4, ack=2)
        self.assertEqual([(p.flags, p.ack) for p in self.take()], [(ACK, 5)])

    def test_old_duplicates_are_dropped(self) -> None:
        """Data, ACKs and a SYN+ACK for a four-tuple in TIME_WAIT are dropped, not reset, not opened."""
        self.peer_closes()
        self.take()
        self.feed(ACK, seq=1, ack=1, payload=b"hi")
        self.feed(ACK, seq=4, ack=1)
        self.feed(SYN | ACK, seq=0, ack=1)
        self.assertEqual(self.take(), [])
        self.assertEqual(self.stack.counters["dropped.time_wait"], 3)
        self.assertEqual(len(self.factory.built), 1)

    def test_our_close_gets_no_final_ack(self) -> None:
        """We closed first: the FIN+ACK answering our FIN ends it, and its echo gets no ACK."""
        self.open()
        self.factory.built[0].transport.loseConnection()
        self.clock.advance(0.5)
        fin = [p for p in self.take() if p.flags & FIN][0]
        self.feed(FIN | ACK, seq=3, ack=fin.seq + 1)
        self.assertIn(self.KEY, self.stack.time_waits)
        self.feed(FIN | ACK, seq=3, ack=fin.seq + 1)
        self.assertEqual(self.take(), [])

    def test_rst_ends_the_entry(self) -> None:
        self.peer_closes()
        self.feed(RST)
        self.assertNotIn(self.KEY, self.stack.time_waits)
        self.take()
        self.feed(ACK, seq=4, ack=1)
        self.assertEqual(self.answers(), [RST])  # no connection, no TIME_WAIT

    def test_syn_reopens(self) -> None:
        """A SYN for the four-tuple ends the entry and opens a new connection at once."""
        self.peer_closes()
        self.take()
        self.feed(SYN)
        self.assertEqual(self.answers(), [SYN | ACK])
        self.assertNotIn(self.KEY, self.stack.time_waits)
        self.assertEqual(self.stack.counters["time_wait.reopened"], 1)
        self.assertEqual(len(self.stack.streams), 1)

    def test_entries_expire(self) -> None:
        """After TIME_WAIT (10 s) the entry is purged by the table's one delayed call."""
        self.peer_closes()
        self.clock.advance(9.9)
        self.assertIn(self.KEY, self.stack.time_waits)
        self.clock.advance(0.2)
        self.assertEqual((len(self.stack.time_waits), self.stack.time_waits.ports), (0, {}))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_expired_entry_is_not_used_before_the_purge(self) -> None:
        self.peer_closes()
        self.take()
        self.clock.rightNow += 10.5  # the purge has not run yet
        self.feed(ACK, seq=4, ack=1)
        self.assertEqual(self.answers(), [RST])
        self.assertNotIn(self.KEY, self.stack.time_waits)

    def test_bounded_oldest_dropped(self) -> None:
        self.stack.time_waits.limit = 3
        for port in range(50000, 50005):
            self.peer_closes(port)
        self.assertEqual(len(self.stack.time_waits), 3)
        self.assertNotIn((PEER, 50000, 1000), self.stack.time_waits)
        self.assertIn((PEER, 50004, 1000), self.stack.time_waits)
        self.assertEqual(self.stack.counters["time_wait.evicted"], 2)
        self.assertEqual(self.stack.time_waits.ports, {1000: 3})

    def test_trust_ended(self) -> None:
        """A node no longer trusted: what it sends to an accepted connection's entry ends it, unanswered."""
        self.peer_closes()
        self.take()
        self.trusted = False
        self.feed(FIN, seq=3, ack=1)
        self.assertEqual(self.take(), [])
        self.assertNotIn(self.KEY, self.stack.time_waits)
        self.assertEqual(self.stack.counters["refused.untrusted"], 1)

    def test_limits_ignore_time_wait_but_still_refuse(self) -> None:
        """
        TIME_WAIT entries do not count against the per-port limit; open
        connections still do, and a SYN past it is refused as before.
        """
        self.patch(limits, "MAX_PER_PORT", 4)
        for port in range(50000, 50004):
            self.peer_closes(port)
        self.assertEqual(len(self.stack.time_waits), 4)
        for port in range(51000, 51004):
            self.open(port)
        self.assertEqual(len(self.stack.streams), 4)
        self.feed(SYN, src_port=51004)
        self.assertEqual(self.answers(), [RST])
        self.assertEqual(self.stack.counters["refused.limit"], 1)

    def test_stop_clears(self) -> None:
        self.peer_closes()
        self.stack.stop()
        self.assertEqual(len(self.stack.time_waits), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class MemoryTests(SynchronousTestCase):

    def test_memory_per_entry(self) -> None:
        """
        An entry is its key (shared with the connection it replaces) and a
        small tuple: about 390 bytes here, under 600 with the key's Address counted too
        (``docs/stack.md`` has the figure).
        """
        count = 10_000
        clock = Clock()
        table = TimeWaits(clock, lambda p: None, lambda: B, __import__("collections").Counter(), 10.0)
        keys = [(Address(0, 0x10000 + i), 50000 + i % 10000, 7) for i in range(count)]
        del keys
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(count):
                table.add((Address(0, 0x10000 + i), 49152 + i % 16000, 7), 0x12345678 + i, 512, True, True)
            per_entry = (tracemalloc.get_traced_memory()[0] - before) / count
        finally:
            tracemalloc.stop()
        self.assertLess(per_entry, 600)
        self.assertEqual(len(table), count)
        self.assertLess(count, MAX_TIME_WAIT)
