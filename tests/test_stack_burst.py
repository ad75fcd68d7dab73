"""
Tests for L{pilot.stack} with many streams: a trusted peer's burst of new
streams, SYN floods shed without growing memory, hostile and malformed SYNs,
and per-packet and per-timer work that does not grow with the number of
streams (``docs/stack.md``, "SYNs and half-open connections" and "Many
streams").  Everything runs on a L{task.Clock}.
"""

from __future__ import annotations

import heapq
import itertools
import sys
from typing import Any, Callable, Sequence

from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.address import Address
from pilot.stack import Stack, StreamTransport
from pilot.stack import ports as limits
from pilot.wire.packet import ACK, FIN, RST, STREAM, SYN, Packet
from tests.stackfakes import A, B, FakeTunnel, Recorder, RecordingFactory

STEP = 0.005  # the fake tunnel's one-way delay


class HeapClock(Clock):
    """
    A L{Clock} with its calls in a heap.  L{Clock} sorts all its calls on
    every ``callLater`` and after every call it runs: with thousands of
    streams that is quadratic, and a test of 1,000 streams takes a minute.
    Same order: by time, then by when scheduled.  Cancelled and moved calls
    leave stale entries that are skipped.
    """

    def __init__(self) -> None:
        super().__init__()
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._order = itertools.count()

    def callLater(self, delay: float, callable: Callable[..., object], *args: object,
                  **kw: object) -> IDelayedCall:
        call = DelayedCall(self.seconds() + delay, callable, args, kw, lambda c: None, self._push,
                           self.seconds)
        self._push(call)
        return call

    def _push(self, call: DelayedCall) -> None:
        heapq.heappush(self._heap, (call.getTime(), next(self._order), call))

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        live = {id(c): c for t, _, c in self._heap if c.active() and c.getTime() == t}
        return sorted(live.values(), key=lambda c: c.getTime())

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        while self._heap and self._heap[0][0] <= self.rightNow:
            when, _, call = heapq.heappop(self._heap)
            if call.active() and call.getTime() == when:
                call.called = 1
                call.func(*call.args, **call.kw)


def dial_many(tunnel: FakeTunnel, a: Stack, b: Stack, count: int, port: int = 1000,
              limit: float = 0.2) -> tuple[RecordingFactory, list[Any]]:
    """``count`` dials from ``a`` to ``b:port`` at once; the clock runs until all are established or ``limit``."""
    factory = RecordingFactory()
    b.listen(port, factory)
    results: list[Any] = []
    for _ in range(count):
        a.connect(B, port, Recorder()).addBoth(results.append)
    clock = tunnel.clock
    end = clock.seconds() + limit
    while clock.seconds() < end and not (len(results) == count and len(factory.built) == count):
        clock.advance(STEP)
    return factory, results


class BurstTests(SynchronousTestCase):

    def setUp(self) -> None:
        self.clock = HeapClock()
        self.tunnel = FakeTunnel(self.clock, delay=STEP)
        self.a = self.tunnel.add(A)
        self.b = self.tunnel.add(B)

    def test_burst_of_1000_from_a_trusted_peer(self) -> None:
        """
        1,000 dials at once all open within a few round trips, each with one
        SYN (none dropped, so no dial waits the 1 s initial RTO), accepted
        in the order they were dialled.
        """
        factory, results = dial_many(self.tunnel, self.a, self.b, 1000)
        self.assertEqual(len(results), 1000)
        self.assertTrue(all(isinstance(r, StreamTransport) for r in results), results[:3])
        self.assertEqual(len(factory.built), 1000)
        self.assertLess(self.clock.seconds(), 4 * STEP + 1e-9)
        syns = [p for p in self.tunnel.sent(A) if p.flags & (SYN | ACK) == SYN]
        self.assertEqual(len(syns), 1000)
        accepted = [peer.port for peer in factory.addresses]
        self.assertEqual(accepted, [p.src_port for p in syns])
        self.assertEqual(accepted, sorted(accepted))
        for name in ("dropped.syn_rate", "reset.half_open", "refused.limit", "errors"):
            self.assertEqual(self.b.counters[name], 0, name)
        self.assertEqual(self.b.streams.half_open_count, {True: 0, False: 0})

    def test_second_burst_after_a_second(self) -> None:
        """The trusted bucket refills at 1,000 a second: a second burst a second later opens as fast."""
        dial_many(self.tunnel, self.a, self.b, 1000)
        self.clock.advance(1.0)
        _, results = dial_many(self.tunnel, self.a, self.b, 1000, port=1001)
        self.assertEqual(sum(isinstance(r, StreamTransport) for r in results), 1000)
        self.assertEqual(self.b.counters["dropped.syn_rate"], 0)


class FloodTests(SynchronousTestCase):
    """One stack at B fed SYNs by hand; what it sends is counted, not kept."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.sent = 0
        self.untrusted: set[int] = set()
        self.trust_all_but = True
        self.stack = Stack(self.clock, lambda: B, self.count, self.trusted)
        self.factory = RecordingFactory()
        self.stack.listen(1000, self.factory)
        self.stack.listen(1001, self.factory)
        self.stack.listen(444, self.factory)

    def count(self, packet: Packet) -> None:
        self.sent += 1

    def trusted(self, node: int) -> bool:
        return self.trust_all_but and node not in self.untrusted

    def syn(self, node: int, src_port: int, dst_port: int = 1000, **kw: Any) -> None:
        self.stack.packet_received(Packet(protocol=STREAM, flags=SYN, src=Address(0, node), dst=B,
                                          src_port=src_port, dst_port=dst_port, window=512, **kw))

    def test_trusted_flood_is_shed(self) -> None:
        """
        10,000 SYNs a second from one trusted node for half a second: the
        bucket passes its burst and 1,000 a second, and the half-open cap
        holds the connections at ``HALF_OPEN`` by resetting the flood's own
        oldest handshakes; another node still gets in.
        """
        for i in range(5000):
            self.syn(0x5000, 1 + i, dst_port=1000 + i % 2)
            self.clock.advance(0.0001)
        streams = len(self.stack.streams)
        self.assertLessEqual(streams, limits.HALF_OPEN)
        passed = 5000 - self.stack.counters["dropped.syn_rate"]
        self.assertGreaterEqual(passed, 1024 + 450)
        self.assertLessEqual(passed, 1024 + 550)
        self.assertEqual(self.stack.counters["reset.half_open"], passed - limits.HALF_OPEN)
        self.syn(0x6000, 50000)
        self.assertEqual(len(self.stack.streams), limits.HALF_OPEN)
        self.assertIn(str(Address(0, 0x6000)), {c["remote_addr"] for c in self.stack.connections()})
        self.assertEqual(self.stack.counters["errors"], 0)
        # the handshakes time out: nothing is left behind
        self.clock.advance(61)
        for _ in range(60):
            self.clock.advance(1)
        self.assertEqual(len(self.stack.streams), 0)
        self.assertEqual(self.stack.streams.half_open, {True: {}, False: {}})

    def test_untrusted_flood_from_many_nodes_is_shed(self) -> None:
        """
        12,000 untrusted nodes, one SYN each to port 444 every 0.1 ms: 100 a
        second get through (the rest dropped silently), at most 64 are ever
        half-open, and the rate limiter keeps at most 10,000 buckets.
        """
        self.trust_all_but = False
        for i in range(12000):
            self.syn(0x10000 + i, 50000, dst_port=444)
            self.clock.advance(0.0001)
        self.assertLessEqual(len(self.stack.streams), limits.ACCEPT_QUEUE)
        self.assertLessEqual(self.stack.streams.half_open_count[True], limits.ACCEPT_QUEUE)
        self.assertLessEqual(len(self.stack._syn_per_node), 10_000)
        passed = 12000 - self.stack.counters["dropped.syn_rate"]
        self.assertLessEqual(passed, 100 + 2 * 100 + 1)
        self.assertEqual(self.stack.counters["errors"], 0)
        self.untrusted = set()
        self.trust_all_but = True
        sent = self.sent
        self.syn(0x5000, 50000)  # a trusted node is not held to the untrusted nodes' limit
        self.assertEqual(self.sent, sent + 1)
        self.assertEqual(self.stack.streams.half_open_count[False], 1)

    def test_hostile_and_malformed_syns(self) -> None:
        """Odd SYNs are answered at most once each, never raise, and never open a second stream."""
        odd: list[dict[str, Any]] = [
            dict(flags=SYN | FIN), dict(flags=SYN | ACK, payload=b"x" * 1000), dict(flags=SYN, seq=0xFFFFFFFF),
            dict(flags=SYN, window=0), dict(flags=SYN | ACK, ack=12345), dict(flags=SYN | RST),
            dict(flags=0xF),
        ]
        for i, fields in enumerate(odd):
            sent = self.sent
            self.stack.packet_received(Packet(protocol=STREAM, src=Address(0, 0x5000), dst=B,
                                              src_port=40000 + i, dst_port=1000, **fields))
            self.assertLessEqual(self.sent - sent, 1, fields)
        for port in (0, 1, 65535):  # unbound ports: one RST each
            sent = self.sent
            self.syn(0x5000, 41000, dst_port=port)
            self.assertEqual(self.sent - sent, 1)
        before = len(self.stack.streams)
        for _ in range(20):  # the same SYN again: the stream's business, not a new one
            self.syn(0x5000, 42000)
        self.assertEqual(len(self.stack.streams), before + 1)
        self.assertEqual(self.stack.streams.half_open_count[False], before + 1)
        self.stack.packet_received(b"\x01\x02SYN")  # type: ignore[arg-type]
        self.assertEqual(self.stack.counters["dropped.malformed"], 1)
        self.assertEqual(self.stack.counters["errors"], 0)


class ScaleTests(SynchronousTestCase):
    """The work per packet and per idle second does not grow with the number of streams."""

    def pair(self, count: int) -> tuple[HeapClock, FakeTunnel, Stack, Stack, list[Any]]:
        clock = HeapClock()
        tunnel = FakeTunnel(clock, delay=STEP, encode=False)
        a, b = tunnel.add(A), tunnel.add(B)
        factory, results = dial_many(tunnel, a, b, count)
        self.assertEqual(len(factory.built), count)
        clock.advance(1.0)  # delayed ACKs and the like are over
        return clock, tunnel, a, b, results

    def calls_to_deliver(self, count: int) -> int:
        """Python calls made to deliver one data segment to one of ``count`` established streams."""
        clock, tunnel, a, b, results = self.pair(count)
        transport: StreamTransport = results[count // 2]
        transport.write(b"warm")
        clock.advance(1.0)
        tunnel.rules.append(lambda p: p.payload == b"hello")  # held back, fed below
        transport.write(b"hello")
        clock.advance(0.1)
        [packet] = [p for p in tunnel.sent(A) if p.payload == b"hello"]
        calls = 0

        def profile(frame: Any, event: str, arg: Any) -> None:
            nonlocal calls
            if event in ("call", "c_call"):
                calls += 1

        sys.setprofile(profile)
        try:
            b.packet_received(packet)
        finally:
            sys.setprofile(None)
        return calls

    def test_per_packet_work_does_not_grow(self) -> None:
        self.assertEqual(self.calls_to_deliver(10), self.calls_to_deliver(1000))

    def timer_work(self, count: int) -> tuple[float, float]:
        """Delayed calls pending per stream, and scheduled per stream in an idle minute."""
        clock, tunnel, a, b, results = self.pair(count)
        pending = len(clock.getDelayedCalls())
        scheduled = 0
        call_later = clock.callLater

        def counting(*args: Any, **kw: Any) -> Any:
            nonlocal scheduled
            scheduled += 1
            return call_later(*args, **kw)

        clock.callLater = counting  # type: ignore[method-assign]
        for _ in range(60):
            clock.advance(1.0)
        self.assertEqual((len(a.streams), len(b.streams)), (count, count))
        return pending / count, scheduled / count

    def test_idle_streams_do_not_poll(self) -> None:
        """
        Idle streams wait on timers that fire once in tens of seconds (the
        keepalive), not on a polling loop: per stream, the pending calls and
        the calls scheduled in an idle minute are the same for 10 and 1,000.
        """
        few, many = self.timer_work(10), self.timer_work(1000)
        self.assertEqual(few, many)
        pending, scheduled = many
        self.assertLessEqual(pending, 4)  # both ends of a stream together
        self.assertLessEqual(scheduled, 10)
