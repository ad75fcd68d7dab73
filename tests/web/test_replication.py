"""
Tests for L{pilot.web.replication}: a primary and a standby, each a
C{RendezvousService} with its HTTP side on a memory reactor, their stream
through iosim's fake transports; each one's C{/metrics} parsed back with
C{prometheus_client}'s own parser as the pair pushes, acknowledges, waits,
falls silent, takes over and steps down.  And the role and term in
C{/api/stats}, with nothing else of the pair.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import attr
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase

from pilot.server.replication import Publisher
from pilot.services.rendezvous import RendezvousService, RendezvousSettings
from pilot.services.replication import ReplicationService
from pilot.web.metrics import scrape
from pilot.web.replication import EMPTY, families
from tests.server.test_replication import PEER, Session, register
from tests.services.test_rendezvous import FakeReactor
from tests.services.test_replication import TOKEN, settings
from tests.web.test_metrics import parsed

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def served(service: RendezvousService) -> Samples:
    """What the service's ``/metrics`` holds now."""
    assert service.http is not None
    return parsed(scrape(service.http.metrics))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def replication_of(service: RendezvousService) -> ReplicationService:
    assert service.replication is not None
    return service.replication


class PairMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.p_reactor, self.s_reactor = FakeReactor(), FakeReactor()
        self.primary = self.start(self.p_reactor)
        self.address = f"127.0.0.1:{self.primary.registry_port()}"
        self.standby = self.start(self.s_reactor, standby_of=self.address, takeover_after=10.0)
        self.pump: IOPump | None = None

    def start(self, reactor: FakeReactor, **replication: Any) -> RendezvousService:
        service = RendezvousService(attr.evolve(settings(**replication), http="127.0.0.1:0"), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def connect(self, dialled: RendezvousService | None = None, reactor: FakeReactor | None = None) -> None:
        """Join the last connection attempt (the standby's, by default) to ``dialled``'s registry."""
        dialled, reactor = dialled or self.primary, reactor or self.s_reactor
        reactor.advance(0)
        factory = reactor.tcpClients[-1][2]
        server = dialled.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        client = factory.buildProtocol(None)
        self.pump = connect(server, FakeTransport(server, True, peerAddress=IPv4Address("TCP", "127.0.0.1", 50000)),
                            client, FakeTransport(client, False), greet=False)
        self.pump.flush()

    def advance(self, seconds: float, step: float = 0.5) -> None:
        while seconds > 1e-9:
            dt = min(step, seconds)
            self.p_reactor.advance(dt)
            self.s_reactor.advance(dt)
            if self.pump is not None:
                self.pump.flush()
            seconds -= dt

    def test_families_parse(self) -> None:
        assert self.primary.http is not None
        names = {f.name for f in text_string_to_metric_families(scrape(self.primary.http.metrics).decode())}
        self.assertEqual({f.name for f in families(EMPTY)} - names, set())
        self.assertIn("pilot_nodes_total", names)  # beside the rendezvous' own

    def test_roles_and_term(self) -> None:
        p, s = served(self.primary), served(self.standby)
        self.assertEqual((value(p, "pilot_replication_role", role="primary"),
                          value(p, "pilot_replication_role", role="standby")), (1, 0))
        self.assertEqual((value(s, "pilot_replication_role", role="primary"),
                          value(s, "pilot_replication_role", role="standby")), (0, 1))
        self.assertEqual((value(p, "pilot_replication_term"), value(s, "pilot_replication_term")), (1, 1))

    def test_standby_connected_synchronised_and_silence(self) -> None:
        before = served(self.primary)
        self.assertEqual(value(before, "pilot_replication_standbys", kind="pilot"), 0)
        self.assertEqual(value(served(self.standby), "pilot_replication_synchronised"), 0)
        self.connect()
        p, s = served(self.primary), served(self.standby)
        self.assertEqual(value(p, "pilot_replication_standbys", kind="pilot"), 1)
        self.assertEqual(value(p, "pilot_replication_standbys", kind="reference"), 0)
        self.assertEqual(value(p, "pilot_replication_synchronised"), 0)  # a primary follows no one
        self.assertEqual(value(s, "pilot_replication_synchronised"), 1)
        self.assertEqual(value(s, "pilot_replication_received_total", kind="snapshot"), 1)
        self.assertEqual(value(p, "pilot_replication_sent_total", kind="snapshot"), 1)
        self.advance(5)  # heartbeats every 2.5 s keep it heard
        self.assertLessEqual(value(served(self.standby), "pilot_replication_primary_silence_seconds"), 2.5)
        self.assertGreater(value(served(self.primary), "pilot_replication_sent_total", kind="heartbeat"), 0)
        self.pump = None  # the primary falls silent
        self.advance(7)
        s = served(self.standby)
        self.assertGreaterEqual(value(s, "pilot_replication_primary_silence_seconds"), 7)
        self.assertEqual(value(served(self.primary), "pilot_replication_primary_silence_seconds"), 0)

    def test_counters_move_when_a_change_is_pushed(self) -> None:
        self.connect()
        before, held_before = served(self.primary), served(self.standby)
        register(self.primary.registry, "one")
        register(self.primary.registry, "two")
        self.advance(1)  # pushed after the flush delay, acknowledged, loaded
        after, held = served(self.primary), served(self.standby)
        pushes = "pilot_replication_pushes_total"
        self.assertEqual(value(after, pushes) - value(before, pushes), 1)  # two changes of one flush delay: one push
        self.assertEqual(value(after, "pilot_replication_sent_total", kind="delta"), 1)
        self.assertGreater(value(after, "pilot_replication_pushed_bytes_total"),
                           value(before, "pilot_replication_pushed_bytes_total"))
        sent = value(after, "pilot_replication_seq", stage="sent")
        self.assertEqual(sent, value(before, "pilot_replication_seq", stage="sent") + 1)
        self.assertEqual(value(after, "pilot_replication_seq", stage="acknowledged"), sent)
        self.assertGreater(value(after, "pilot_replication_acks_total"), value(before, "pilot_replication_acks_total"))
        self.assertEqual(value(held, "pilot_replication_seq", stage="held"), sent)
        self.assertEqual(value(held, "pilot_replication_received_total", kind="delta")
                         - value(held_before, "pilot_replication_received_total", kind="delta"), 1)

    def test_takeover_and_step_down(self) -> None:
        register(self.primary.registry, "a")
        self.connect()
        self.pump = None
        self.advance(11)  # silent past --takeover-after
        s = served(self.standby)
        self.assertEqual((value(s, "pilot_replication_role", role="primary"), value(s, "pilot_replication_term"),
                          value(s, "pilot_replication_takeovers_total")), (1, 2, 1))
        self.assertEqual(value(s, "pilot_replication_primary_silence_seconds"), 0)
        self.advance(3.5)  # the new primary probes the old one
        self.connect()
        p = served(self.primary)
        self.assertEqual((value(p, "pilot_replication_role", role="standby"), value(p, "pilot_replication_term"),
                          value(p, "pilot_replication_step_downs_total"),
                          value(p, "pilot_replication_takeovers_total")), (1, 2, 1, 0))

    def test_reference_standby_counted_apart(self) -> None:
        session: Any = Session()
        replica = replication_of(self.primary).replica
        replica.subscribe({"type": "subscribe_replication", "token": TOKEN.decode()}, PEER, session)
        p = served(self.primary)
        self.assertEqual((value(p, "pilot_replication_standbys", kind="reference"),
                          value(p, "pilot_replication_standbys", kind="pilot")), (1, 0))
        self.assertEqual(value(p, "pilot_replication_sent_total", kind="snapshot"), 1)
        self.assertGreater(value(p, "pilot_replication_pushed_bytes_total"), 0)

    def test_api_stats_role_and_term_only(self) -> None:
        self.connect()
        self.pump = None
        self.advance(11)
        docs = {}
        for name, service in (("primary", self.primary), ("standby", self.standby)):
            assert service.http is not None
            docs[name] = service.http.stats.public()
        self.assertEqual(docs["primary"]["replication"], {"role": "primary", "term": 1})
        self.assertEqual(docs["standby"]["replication"], {"role": "primary", "term": 2})  # it took over
        self.advance(3.5)
        self.connect()
        self.p_reactor.advance(1.0)  # past the reading's max age
        assert self.primary.http is not None
        doc = self.primary.http.stats.public()
        self.assertEqual(doc["replication"], {"role": "standby", "term": 2})
        text = json.dumps(doc)
        for where in (self.address, f"127.0.0.1:{self.standby.registry_port()}", "127.0.0.1", TOKEN.decode()):
            self.assertNotIn(where, text)


class SyncMetricsTests(SynchronousTestCase):
    """``--sync-replication``: the replies that waited, and those the timeout let go."""

    def test_waits_and_timeouts(self) -> None:
        reactor = FakeReactor()
        service = RendezvousService(attr.evolve(settings(sync=True, sync_timeout=2.0), http="127.0.0.1:0"), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        publisher = replication_of(service).publisher
        self.assertIsInstance(service.factory.durability, Publisher)
        session: Any = Session()
        replica = replication_of(service).replica
        replica.subscribe({"type": "subscribe_replication", "token": TOKEN.decode(), "deltas": True}, PEER, session)
        register(service.registry, "held")
        acked = publisher.when_saved(publisher.generation)
        reactor.advance(0)  # pushed at once in sync mode
        replica.ack({"type": "replication_ack", "seq": publisher.seq}, PEER, session)
        self.assertIsNone(self.successResultOf(acked))
        register(service.registry, "lost")
        late = publisher.when_saved(publisher.generation)
        reactor.advance(2.0)  # no acknowledgement: the timeout answers
        self.assertIsNone(self.successResultOf(late))
        m = served(service)
        self.assertEqual((value(m, "pilot_replication_sync_waits_total"),
                          value(m, "pilot_replication_sync_timeouts_total"),
                          value(m, "pilot_replication_acks_total")), (2, 1, 1))


class DocumentedTests(SynchronousTestCase):
    def test_every_family_in_operations_md(self) -> None:
        """docs/operations.md's table names exactly the families the collector makes."""
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(root, "docs", "operations.md")) as f:
            rows = [line for line in f if line.startswith("| `pilot_replication_")]
        documented = {re.match(r"\| `(\w+)`", row).group(1) for row in rows}  # type: ignore[union-attr]
        made = {f.name + ("_total" if f.type == "counter" else "") for f in families(EMPTY)}
        self.assertEqual(documented, made)


class UnpairedTests(SynchronousTestCase):
    def test_no_replication_families(self) -> None:
        service = RendezvousService(RendezvousSettings(listen="127.0.0.1:0", beacon_listen="127.0.0.1:0",
                                                       raise_open_files=False, http="127.0.0.1:0"), FakeReactor())
        assert service.http is not None
        names = {f.name for f in text_string_to_metric_families(scrape(service.http.metrics).decode())}
        self.assertIn("pilot_nodes_total", names)
        self.assertEqual([n for n in names if n.startswith("pilot_replication")], [])
        self.assertIsNone(service.http.stats.public()["replication"])
