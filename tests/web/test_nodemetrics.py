"""
Tests for L{pilot.web.nodemetrics}: a real node pair on a clock (the fakes
of C{tests.node}), its control API's C{info} turned into Prometheus families
that C{prometheus_client} parses back, moving as the nodes talk.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.address import Address
from pilot.nodeconfig import NodeSettings
from pilot.services.api import NodeAPIImpl
from pilot.web.metrics import collector_registry, scrape
from pilot.web.nodemetrics import METRICS, NodeCollector, figures, fired, node_families
from tests.node.fakes import Host, pair
from tests.web.test_metrics import parsed

PORT = 1000


def api(host: Host) -> NodeAPIImpl:
    settings = NodeSettings(home="/nonexistent", identity="/nonexistent/identity.json", socket="/nonexistent/s")
    return NodeAPIImpl(host.node, host.node.clock, settings, {"received": 3})  # type: ignore[arg-type]


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class NodeMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.network, self.a, self.b = pair(self.clock)
        self.b.node.stack.listen(PORT, Factory.forProtocol(Echo))
        self.api = api(self.a)
        self.registry = collector_registry(NodeCollector(self.api.info, self.clock))  # type: ignore[arg-type]

    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds / 0.01)):
            self.clock.advance(0.01)

    def read(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return parsed(scrape(self.registry))

    def test_every_family_present_when_idle(self) -> None:
        names = {f.name for f in text_string_to_metric_families(scrape(self.registry).decode())}
        expected = {f"pilot_node_{name}" for name in METRICS}
        self.assertEqual(names, expected)
        self.assertEqual(self.read()[("pilot_node_udp_events_total", (("event", "received"),))], 3)

    def test_counters_move_as_nodes_talk(self) -> None:
        before = self.read()
        self.assertEqual(before.get(("pilot_node_peers", (("path", "direct"),))), None)
        client = Protocol()
        d = self.api.connect(str(self.b.node.own_id), PORT, client)
        self.advance(2.0)
        self.successResultOf(d)
        client.transport.write(b"x" * 20000)  # type: ignore[union-attr]
        self.advance(2.0)
        after = self.read()
        self.assertEqual(after[("pilot_node_peers", (("path", "direct"),))], 1)
        path = "direct"
        self.assertGreater(after[("pilot_node_peer_sent_bytes", (("path", path),))], 20000)
        self.assertGreater(after[("pilot_node_peer_received_bytes", (("path", path),))], 20000)
        self.assertGreater(after[("pilot_node_packets_sent_total", ())], before[("pilot_node_packets_sent_total", ())])
        self.assertEqual(after[("pilot_node_connections", ())], 1)
        self.assertEqual(after[("pilot_node_tunnels", (("state", "established"),))], 1)
        peer = str(Address(0, self.b.node.own_id))
        self.assertGreater(after[("pilot_node_path_mtu_bytes", (("peer", peer),))], 1200)


class FiguresTests(SynchronousTestCase):
    def test_empty_and_odd_documents(self) -> None:
        for info in ({}, {"peer_list": None, "counters": None},
                     {"peer_list": [{"path": None, "bytes_rx": "x", "mtu": True}, "junk"],
                      "counters": {"tunnel": {"a": 1, "b": "x", "c": {"d": 2}, "e": True}},
                      "conn_list": [{"retransmits": 4, "fast_retx": None}]}):
            values = figures(info)
            self.assertEqual(set(values), set(METRICS))
            list(node_families(info))
        odd = figures({"peer_list": [{"path": None, "bytes_rx": "x"}],
                       "counters": {"tunnel": {"a": 1, "b": "x", "c": {"d": 2}, "e": True}},
                       "conn_list": [{"retransmits": 4}]})
        self.assertEqual(odd["peers"], {"none": 1})
        self.assertEqual(odd["tunnel_events"], {"a": 1.0, "c.d": 2.0})
        self.assertEqual(odd["retransmits"], 4)

    def test_fired(self) -> None:
        self.assertEqual(fired(succeed({"a": 1})), {"a": 1})
        self.assertEqual(fired({"b": 2}), {"b": 2})
        self.assertRaises(ZeroDivisionError, fired, fail(ZeroDivisionError()))
        from twisted.internet.defer import Deferred
        self.assertRaises(RuntimeError, fired, Deferred())


