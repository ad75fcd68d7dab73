"""
Tests for L{pilot.server.timing}: request durations counted into a
histogram's buckets, and the registry timing each request on its clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.server.registry import Peer, Registry
from pilot.server.timing import BOUNDS, Durations

INF = float("inf")


class DurationsTests(SynchronousTestCase):
    def test_buckets(self) -> None:
        d = Durations((0.001, 0.01))
        for seconds in (0.0, 0.001, 0.002, 0.01, 0.5, -1.0):
            d.observe("lookup", seconds)
        d.observe("register", 0.005)
        buckets, total = d.cumulative()["lookup"]
        # the bound itself is in its bucket (le); a clock stepped back counts as 0
        self.assertEqual(buckets, [(0.001, 3), (0.01, 5), (INF, 6)])
        self.assertAlmostEqual(total, 0.513)
        self.assertEqual(d.cumulative()["register"], ([(0.001, 0), (0.01, 1), (INF, 1)], 0.005))

    def test_cumulative_is_a_copy(self) -> None:
        d = Durations()
        d.observe("lookup", 0.0)
        reading = d.cumulative()
        d.observe("lookup", 0.0)
        self.assertEqual(reading["lookup"][0][-1], (INF, 1))
        self.assertEqual(len(reading["lookup"][0]), len(BOUNDS) + 1)


class SteppingClock(Clock):
    """Every reading moves time on by ``step`` seconds (a request then takes a known time)."""

    step = 0.002

    def seconds(self) -> float:
        self.advance(self.step)
        return super().seconds()


class RegistryTimingTests(SynchronousTestCase):
    def test_each_request_timed_by_type(self) -> None:
        registry = Registry(SteppingClock())
        peer = Peer("192.0.2.1", 5000)
        registry.handle({"type": "lookup", "node_id": 1}, peer)  # refused: still timed
        registry.handle({"type": "no such thing"}, peer)
        registry.handle({"type": "lookup", "node_id": 2}, peer)
        timed = registry.durations.cumulative()
        self.assertEqual(set(timed), {"lookup", "unknown"})
        buckets, total = timed["lookup"]
        self.assertEqual(buckets[-1], (INF, 2))
        self.assertGreater(total, 0.0)
        self.assertEqual(dict(buckets)[0.001], 0)
        self.assertEqual(timed["unknown"][0][-1], (INF, 1))
        self.assertEqual(registry.counters["request.lookup"], 2)
        self.assertEqual(registry.counters["request.unknown"], 1)
