"""
A node's ``/metrics`` (``pilotctl daemon start --metrics``), ``pilotctl
stats`` and ``pilotctl bench`` between two of our nodes as real processes on
127.0.0.1: the bench's bytes show in both, and the scrape parses with
``prometheus_client``'s parser.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.nodes import NodeTestMixin
from tests.integration.procs import LOOPBACK, free_tcp_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class NodeMetricsTests(NodeTestMixin, SynchronousTestCase):
    def test_bench_stats_and_metrics(self) -> None:
        rendezvous = self.start_rendezvous()
        port = free_tcp_port()
        a = self.make_node("metrics-a", rendezvous)
        b = self.make_node("metrics-b", rendezvous)
        a.started("--metrics", f":{port}")
        b.started()
        self.trust_each_other(a, b)
        before = scrape(port)
        self.assertEqual(before[("pilot_node_registered", ())], 1)

        bench = a.ok("bench", b.hostname, "2", timeout=120)
        self.assertEqual(bench["bytes"], 2 << 20)
        self.assertGreater(bench["bytes_per_second"], 0)

        stats = a.ok("stats")
        self.assertEqual(sum(stats["peers"].values()), 1, stats)
        self.assertGreaterEqual(sum(stats["peer_sent_bytes"].values()), 2 << 20)
        after = scrape(port)
        sent = sum(v for (name, _), v in after.items() if name == "pilot_node_peer_sent_bytes")
        self.assertGreaterEqual(sent, 2 << 20)
        self.assertGreater(after[("pilot_node_packets_sent_total", ())],
                           before[("pilot_node_packets_sent_total", ())])
        self.assertIn("Peers by path:", a.text("stats"))
