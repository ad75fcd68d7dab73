"""
Tests for L{pilot.web.metrics}: the rendezvous' families parsed back with
C{prometheus_client}'s own parser, counters moving as nodes register and
relay; and C{/api/stats} holding nothing private of any node.
"""

from __future__ import annotations

import json

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import b64encode
from pilot.server.registry import Peer
from pilot.web.metrics import RendezvousCollector, collector_registry, scrape
from pilot.web.stats import RendezvousStats
from tests.web.scene import Fleet


def parsed(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as (name, labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class RendezvousMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fleet = Fleet()
        self.stats = RendezvousStats(self.fleet.registry, self.fleet.beacon, self.fleet.clock)
        self.registry = collector_registry(RendezvousCollector(self.stats, self.fleet.clock))  # type: ignore[arg-type]

    def read(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return parsed(scrape(self.registry))

    def test_reference_names(self) -> None:
        names = {family.name for family in text_string_to_metric_families(scrape(self.registry).decode())}
        for name in ("pilot_requests", "pilot_errors", "pilot_nodes_online", "pilot_nodes_total", "pilot_trust_links",
                     "pilot_task_executors", "pilot_uptime_seconds", "pilot_registrations", "pilot_deregistrations",
                     "pilot_beacon_datagrams", "pilot_beacon_dropped", "pilot_beacon_punches", "pilot_relay_bytes",
                     "pilot_relay_datagrams", "pilot_request_duration_seconds"):
            self.assertIn(name, names)

    def test_counters_move(self) -> None:
        before = self.read()
        self.assertEqual(before[("pilot_nodes_total", ())], 0)
        self.assertEqual(before[("pilot_registrations_total", ())], 0)
        for n in range(1, 5):
            self.fleet.add(n)
        self.fleet.relay(1, 2, 500)
        self.fleet.relay(1, 2, 20)
        after = self.read()
        self.assertEqual(after[("pilot_nodes_total", ())], 4)
        self.assertEqual(after[("pilot_nodes_online", ())], 4)
        self.assertEqual(after[("pilot_registrations_total", ())], 4)
        self.assertEqual(after[("pilot_requests_total", (("type", "register"),))], 4)
        self.assertEqual(after[("pilot_trust_links", ())], 2)
        self.assertEqual(after[("pilot_relay_bytes_total", ())], 520)
        self.assertEqual(after[("pilot_relay_datagrams_total", ())], 2)
        self.assertEqual(after[("pilot_beacon_discovers_total", ())], 4)
        register = (("type", "register"),)
        self.assertEqual(after[("pilot_request_duration_seconds_count", register)], 4)
        self.assertEqual(after[("pilot_request_duration_seconds_bucket", (("le", "+Inf"), *register))], 4)
        self.assertEqual(after[("pilot_request_duration_seconds_bucket", (("le", "0.0001"), *register))], 4)
        self.assertEqual(after[("pilot_request_duration_seconds_sum", register)], 0.0)  # a Clock stands still
        self.fleet.send(b"\xff\xff", ("192.0.2.1", 5))
        self.assertEqual(self.read()[("pilot_beacon_dropped_total", (("reason", "malformed"),))], 1)

    def test_errors_by_code(self) -> None:
        self.fleet.registry.handle({"type": "lookup", "node_id": 12345}, Peer("192.0.2.1", 5000))
        self.assertEqual(self.read()[("pilot_errors_total", (("code", "not_found"),))], 1)

    def test_restricted_by_name(self) -> None:
        """A scrape asking for some names gets those (``describe`` lists the families)."""
        self.fleet.add(1)
        text = self.registry.restricted_registry(["pilot_nodes_total"])
        samples = parsed(scrape(text))  # type: ignore[arg-type]
        self.assertEqual(samples, {("pilot_nodes_total", ()): 1})

    def test_not_on_the_global_registry(self) -> None:
        self.assertNotIn(b"pilot_nodes_total", scrape(REGISTRY))


class PrivacyTests(SynchronousTestCase):
    def test_api_stats_holds_nothing_private(self) -> None:
        fleet = Fleet()
        for n in range(1, 41):
            fleet.add(n, public=n % 4 == 0, tags=(f"tag{n}",), hostname=f"secret-host-{n}")
        for n in range(1, 40):
            fleet.relay(n, n + 1, 100 + n)
        stats = RendezvousStats(fleet.registry, fleet.beacon, fleet.clock)
        stats.sample()
        text = json.dumps(stats.public())
        listed = {r["address"] for r in stats.public()["top_relays"]}
        self.assertTrue(listed)
        for n, node_id in fleet.ids.items():
            node = fleet.registry.state.nodes[node_id]
            host, port = fleet.addrs[n]
            for secret in (host, f"{host}:{port}", node.real_addr, b64encode(node.public_key),
                           node.public_key.hex(), node.hostname, f"tag{n}"):
                self.assertTrue(secret)
                self.assertNotIn(secret, text, (n, secret))
            if not node.public:
                self.assertNotIn(str(node.address), text)
        for ip in (a[0] for a in fleet.addrs.values()):
            self.assertNotIn(ip.rsplit(".", 1)[0] + ".", text)
