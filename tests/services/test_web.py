"""
Tests for L{pilot.services.web}: the HTTP side's port and sampler on a
memory reactor, inside the rendezvous when C{--http} is given and inside the
node with C{--metrics}.
"""

from __future__ import annotations

import os
from typing import Any
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from pilot import tap
from pilot.identity import Identity
from pilot.nodeconfig import load_settings
from pilot.services.node import NodeService
from pilot.services.rendezvous import RendezvousService, RendezvousSettings
from pilot.services.web import HTTPService, NodeMetricsHTTP, RendezvousHTTP
from pilot.web.stats import SAMPLE_INTERVAL
from tests.services.test_rendezvous import FakeReactor


class HTTPServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.reactor.advance(1_800_000_000)

    def rendezvous(self, **kw: Any) -> RendezvousService:
        return RendezvousService(RendezvousSettings(store=None, raise_open_files=False, **kw), self.reactor)

    def test_off_by_default(self) -> None:
        service = self.rendezvous()
        service.startService()
        self.assertIsNone(service.http)
        self.assertEqual(len(self.reactor.tcpServers), 1)  # the registry only

    def test_listens_and_closes(self) -> None:
        service = self.rendezvous(http="127.0.0.1:0")
        assert service.http is not None
        with capturedLogs() as events:
            service.startService()
        [registry, (port, site, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        self.assertIsInstance(site, Site)
        self.assertIn(f"Dashboard listening on 127.0.0.1:{service.http.port()}", [formatEvent(e) for e in events])
        service.stopService()
        self.assertTrue(all(p.closed for p in self.reactor.ports))
        self.assertRaises(RuntimeError, service.http.port)

    def test_privileged_start_binds_once(self) -> None:
        service = HTTPService(":8080", Resource(), self.reactor)
        service.privilegedStartService()
        service.startService()
        self.assertEqual(len(self.reactor.tcpServers), 1)
        self.assertEqual(service.port(), 8080)

    def test_sampler(self) -> None:
        service = self.rendezvous(http=":0")
        assert isinstance(service.http, RendezvousHTTP)
        service.startService()
        self.assertEqual(len(service.http.stats.history), 1)  # TimerService runs at once
        self.reactor.pump([SAMPLE_INTERVAL] * 3)
        self.assertEqual(len(service.http.stats.history), 4)
        service.stopService()
        self.reactor.pump([SAMPLE_INTERVAL] * 3)
        self.assertEqual(len(service.http.stats.history), 4)

    def test_options(self) -> None:
        values = tap.parse_values({"http": "127.0.0.1:3000", "metrics_public": True, "no_store": True})
        settings = tap.settings_from(values)
        self.assertEqual((settings.http, settings.metrics_public), ("127.0.0.1:3000", True))
        settings = tap.settings_from(tap.parse_values({"no_store": True}))
        self.assertEqual((settings.http, settings.metrics_public), (None, False))
        self.assertRaises(ValueError, tap.parse_values, {"http": "nowhere:x", "no_store": True})
        env = tap.values_from_environment({"PILOT_HTTP": ":3000", "PILOT_NO_STORE": "1"})
        self.assertEqual(tap.settings_from(tap.parse_values(env)).http, ":3000")


class NodeMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()

    def test_no_host_is_loopback(self) -> None:
        service = NodeMetricsHTTP(":0", lambda: {}, self.reactor)
        service.startService()
        [(port, site, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        self.assertIsInstance(site, Site)
        self.assertEqual(site.resource.children[b"metrics"].__class__.__name__, "WSGIResource")
        service.stopService()
        self.assertTrue(self.reactor.ports[0].closed)

    def test_named_host(self) -> None:
        NodeMetricsHTTP("0.0.0.0:9101", lambda: {}, self.reactor).startService()
        self.assertEqual(self.reactor.tcpServers[0][0::3], (9101, "0.0.0.0"))

    def test_in_the_node_service(self) -> None:
        home = self.mktemp()
        os.makedirs(home)
        Identity.generate().save(os.path.join(home, "identity.json"))
        settings = load_settings({"metrics": ":0"}, environ={}, home=home)
        self.assertEqual(settings.metrics, ":0")
        self.assertIsNone(load_settings({}, environ={}, home=home).metrics)
        self.assertEqual(load_settings({}, environ={"PILOT_METRICS": "127.0.0.1:9"}, home=home).metrics,
                         "127.0.0.1:9")
        service = NodeService(settings, self.reactor)
        self.assertEqual([type(s).__name__ for s in service if isinstance(s, NodeMetricsHTTP)], ["NodeMetricsHTTP"])
        without = NodeService(load_settings({}, environ={}, home=home), self.reactor)
        self.assertEqual([s for s in without if isinstance(s, NodeMetricsHTTP)], [])
