"""
Tests for L{pilot.web.stats}: the figures read from a live registry and
beacon, the hour's ring of samples, and the public document.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pilot.web.stats import HISTORY_LENGTH, ONLINE_WINDOW, SAMPLE_INTERVAL, TOP_RELAYS, RendezvousStats
from tests.web.scene import Fleet


class FiguresTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fleet = Fleet()
        self.stats = RendezvousStats(self.fleet.registry, self.fleet.beacon, self.fleet.clock)

    def test_counts(self) -> None:
        f = self.fleet
        for n in range(1, 7):
            f.add(n, public=n <= 2, tags=("gpu", f"t{n % 2}"), hostname=f"h{n}")
        f.relay(1, 2, 300)
        doc = self.stats.public()
        self.assertEqual(doc["total_nodes"], 6)
        self.assertEqual(doc["active_nodes"], 6)
        self.assertEqual(doc["public_nodes"], 2)
        self.assertEqual(doc["private_nodes"], 4)
        self.assertEqual(doc["total_trust_links"], 2)
        self.assertEqual(doc["unique_tags"], 3)
        self.assertEqual(doc["relayed_bytes"], 300)
        self.assertEqual(doc["relayed_datagrams"], 1)
        self.assertEqual(doc["total_requests"], sum(v for k, v in f.registry.counters.items()
                                                    if k.startswith("request.")))
        self.assertEqual(doc["top_relays"], [{"address": str(f.node_address(1)), "bytes": 300}])

    def test_online_window(self) -> None:
        self.fleet.add(1)
        self.fleet.clock.advance(ONLINE_WINDOW + 1)
        self.fleet.add(2)
        doc = self.stats.public()
        self.assertEqual((doc["total_nodes"], doc["active_nodes"]), (2, 1))

    def test_reading_reused_within_max_age(self) -> None:
        self.fleet.add(1)
        self.assertEqual(self.stats.public()["total_nodes"], 1)
        self.fleet.add(2)
        self.assertEqual(self.stats.public()["total_nodes"], 1)
        self.fleet.clock.advance(1.0)
        self.assertEqual(self.stats.public()["total_nodes"], 2)

    def test_private_relays_counted_not_listed(self) -> None:
        f = self.fleet
        for n in range(1, 5):
            f.add(n, public=n == 1)
        f.relay(2, 3, 1000)
        f.relay(1, 4, 10)
        doc = self.stats.public()
        self.assertEqual(doc["relayed_bytes"], 1010)
        self.assertEqual([r["bytes"] for r in doc["top_relays"]], [10])

    def test_top_relays_ten_busiest(self) -> None:
        f = self.fleet
        for n in range(1, 14):
            f.add(n, public=True)
        for n in range(1, 13):
            f.relay(n, 13, n * 10)
        tops = self.stats.public()["top_relays"]
        self.assertEqual(len(tops), TOP_RELAYS)
        self.assertEqual([t["bytes"] for t in tops], [n * 10 for n in range(12, 2, -1)])

    def test_relayed_by_pruned_with_the_node(self) -> None:
        f = self.fleet
        f.add(1, public=True)
        f.add(2, public=True)
        f.relay(1, 2, 10)
        f.deregister(f.identities[1], f.ids[1])
        f.beacon.prune()
        self.assertEqual(f.beacon.relayed_by, {})

    def test_rates_and_ring(self) -> None:
        f = self.fleet
        f.add(1)
        self.stats.sample()
        for n in range(2, 12):
            f.add(n)
        f.clock.advance(SAMPLE_INTERVAL)
        self.stats.sample()
        chart = self.stats.chart()
        self.assertEqual([p["total"] for p in chart], [1, 11])
        self.assertEqual(chart[0]["requests_per_second"], 0.0)
        self.assertEqual(chart[1]["requests_per_second"], 10 / SAMPLE_INTERVAL)
        for _ in range(HISTORY_LENGTH + 5):
            f.clock.advance(SAMPLE_INTERVAL)
            self.stats.sample()
        self.assertEqual(len(self.stats.chart()), HISTORY_LENGTH)

    def test_requests_per_second_since_last_sample(self) -> None:
        f = self.fleet
        self.stats.sample()
        f.clock.advance(2.0)
        f.add(1)
        f.add(2)
        self.assertEqual(self.stats.public()["requests_per_second"], 1.0)

    def test_chart_ends_with_the_current_reading(self) -> None:
        f = self.fleet
        self.stats.sample()
        f.clock.advance(4.0)
        f.add(1)
        history = self.stats.public()["history"]
        self.assertEqual([p["total"] for p in history], [0, 1])
        self.assertEqual(history[-1]["requests_per_second"], 0.25)
        self.assertEqual(len(self.stats.history), 1)  # the ring itself is unchanged
