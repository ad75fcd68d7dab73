"""
pilot.services.replication: a primary and a standby, each a RendezvousService
on a memory reactor, their replication stream through iosim's fake
transports; time only from the reactors' clocks.
"""

from __future__ import annotations

import os
from typing import Any

import attr
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import capturedLogs
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase

from pilot.server import replication as server_replication
from pilot.server.replication import Publisher
from pilot.server.state import RegistryState
from pilot.services import replication
from pilot.services.rendezvous import RendezvousService, RendezvousSettings
from pilot.services.replication import BothSaved, ReplicationSettings
from tests.server.test_replication import PEER, register
from tests.services.test_rendezvous import FakeReactor

TOKEN = b"0123456789abcdef"


def settings(**replication: Any) -> RendezvousSettings:
    return RendezvousSettings(listen="127.0.0.1:0", beacon_listen="127.0.0.1:0", raise_open_files=False,
                              flush_delay=0.1, replication=ReplicationSettings(token=TOKEN, **replication))


class PairTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.p_reactor, self.s_reactor = FakeReactor(), FakeReactor()
        self.primary = self.service(settings(), self.p_reactor)
        self.primary.startService()
        self.addCleanup(self.primary.stopService)
        self.address = f"127.0.0.1:{self.primary.registry_port()}"
        self.standby = self.start_standby(self.address)
        self.pump: IOPump | None = None

    def start_standby(self, primary: str, **more: Any) -> RendezvousService:
        service = self.service(settings(standby_of=primary, takeover_after=10.0, **more), self.s_reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def service(self, settings: RendezvousSettings, reactor: FakeReactor) -> RendezvousService:
        return RendezvousService(settings, reactor)

    def connect(self, dialled: RendezvousService | None = None, dialler_reactor: FakeReactor | None = None,
                n: int = -1) -> IOPump:
        """Join the last connection attempt (of the standby, by default) to ``dialled``'s registry port."""
        dialled = dialled or self.primary
        reactor = dialler_reactor or self.s_reactor
        host, port, factory = reactor.tcpClients[n][:3]
        server = dialled.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        client = factory.buildProtocol(None)
        peer = IPv4Address("TCP", "127.0.0.1", 50000)
        self.pump = connect(server, FakeTransport(server, True, peerAddress=peer),
                            client, FakeTransport(client, False), greet=False)
        self.pump.flush()
        return self.pump

    def advance(self, seconds: float, step: float = 0.5) -> None:
        while seconds > 1e-9:
            dt = min(step, seconds)
            self.p_reactor.advance(dt)
            self.s_reactor.advance(dt)
            if self.pump is not None:
                self.pump.flush()
            seconds -= dt

    def assertSameStore(self, a: RendezvousService, b: RendezvousService) -> None:
        """
        The two registries hold the same store.  ``pilot_journal_seq`` aside: a
        standby applies each record to its state and its own store's writer
        journals it, numbered in that store's journal (``docs/deploy.md``).
        """
        mine, theirs = a.registry.state.to_json(), b.registry.state.to_json()
        for store in (mine, theirs):
            store.pop("pilot_journal_seq", None)
        self.assertEqual(mine, theirs)

    def test_standby_dials_its_primary(self) -> None:
        self.s_reactor.advance(0)
        host, port = self.s_reactor.tcpClients[0][:2]
        self.assertEqual((host, port, self.s_reactor.tcpClients[0][3]), ("127.0.0.1", self.primary.registry_port(),
                                                                          10.0))

    def test_standby_holds_the_primary_store(self) -> None:
        register(self.primary.registry, "early")
        self.s_reactor.advance(0)
        self.connect()
        self.assertSameStore(self.standby, self.primary)
        node = register(self.primary.registry, "late")
        self.primary.registry.handle({"type": "deregister", "node_id": node}, PEER)
        register(self.primary.registry, "later")
        self.advance(0.2)  # pushed, applied to the standby's state and acknowledged (no wait for a load)
        self.assertIn("later", self.standby.registry.state.hostnames)
        self.assertSameStore(self.standby, self.primary)
        reply = self.standby.registry.handle({"type": "resolve_hostname", "hostname": "later"}, PEER)
        self.assertEqual((reply["type"], reply["term"]), ("resolve_hostname_ok", 1))
        refused = self.standby.registry.handle({"type": "set_hostname", "node_id": 1, "hostname": "x"}, PEER)
        self.assertEqual((refused["code"], refused["primary"]), ("not_primary", self.address))

    def test_records_applied_to_the_state_no_whole_load(self) -> None:
        """Each record goes to the standby's state at once; no store is loaded or adopted whole for it."""
        register(self.primary.registry, "early")
        self.s_reactor.advance(0)
        self.connect()

        def whole(*args: object, **kwargs: object) -> Any:
            raise AssertionError("a whole state was adopted for a record")
        self.patch(replication, "adopt", whole)
        self.patch(server_replication, "_load", whole)  # nor a whole store loaded
        node = register(self.primary.registry, "moved")
        self.advance(0.2)
        self.assertEqual(self.standby.registry.state.hostnames["moved"], node)
        self.primary.registry.remove(node)  # as a signed deregister or the reaper does
        self.primary.registry.on_change()
        self.advance(0.2)
        self.assertNotIn("moved", self.standby.registry.state.hostnames)
        self.assertNotIn(node, self.standby.registry.state.nodes)
        early = self.primary.registry.state.hostnames["early"]
        self.primary.registry.state.auth_ts[early] = 123_456  # as a signed request accepted there
        self.primary.registry.on_change()
        self.advance(0.2)
        self.assertEqual(self.standby.registry.restored_ts[early], 123_456)  # the replay floor follows
        del self.primary.registry.state.auth_ts[early]
        self.primary.registry.on_change()
        self.advance(0.2)
        self.assertNotIn(early, self.standby.registry.restored_ts)
        self.advance(1)
        self.assertSameStore(self.standby, self.primary)
        self.assertEqual(self.standby.replication.follower.pending, 0)  # type: ignore[union-attr]

    def test_takeover_loads_what_was_acknowledged_first(self) -> None:
        self.s_reactor.advance(0)
        self.connect()
        register(self.primary.registry, "just-pushed")
        self.advance(0.2)  # the delta arrived; not loaded yet
        self.pump = None
        self.standby.replication.replica.role.promoted("test")  # type: ignore[union-attr]
        self.assertIn("just-pushed", self.standby.registry.state.hostnames)
        self.assertEqual(self.standby.replication.replica.term, 2)  # type: ignore[union-attr]

    def test_heartbeats_keep_it_standby_silence_promotes(self) -> None:
        register(self.primary.registry, "a")
        self.s_reactor.advance(0)
        self.connect()
        self.advance(30)  # heartbeats every 2.5 s
        self.assertTrue(self.standby.replication.replica.standby)  # type: ignore[union-attr]
        self.pump = None  # the primary dies: nothing more arrives
        with capturedLogs() as events:
            self.advance(10.5)
        replica = self.standby.replication.replica  # type: ignore[union-attr]
        self.assertEqual((replica.standby, replica.term), (False, 2))
        self.assertTrue(any("PROMOTED" in e.get("log_format", "") for e in events))
        reply = self.standby.registry.handle({"type": "resolve_hostname", "hostname": "a"}, PEER)
        self.assertEqual(reply["term"], 2)
        self.assertGreater(register(self.standby.registry, "b"), 0)

    def test_never_synchronised_standby_does_not_take_over(self) -> None:
        with capturedLogs() as events:
            self.advance(25)
        self.assertTrue(self.standby.replication.replica.standby)  # type: ignore[union-attr]
        self.assertTrue(any("not taking over by itself" in e.get("log_format", "") for e in events))
        # it kept trying every 3 s meanwhile
        self.assertGreaterEqual(len(self.s_reactor.tcpClients), 1)

    def test_promoted_standby_makes_the_returning_primary_step_down(self) -> None:
        register(self.primary.registry, "a")
        self.s_reactor.advance(0)
        self.connect()
        self.pump = None
        self.advance(11)
        self.assertFalse(self.standby.replication.replica.standby)  # type: ignore[union-attr]
        register(self.standby.registry, "after-takeover")
        # the old primary comes back (same term 1, still primary); the new one probes it
        self.advance(3.5)
        self.connect()
        old = self.primary.replication.replica  # type: ignore[union-attr]
        self.assertEqual((old.standby, old.term), (True, 2))
        self.assertEqual(old.primary, f"127.0.0.1:{self.standby.registry_port()}")
        # it now follows the new primary: its next attempt, joined to it
        self.p_reactor.advance(0)
        self.connect(dialled=self.standby, dialler_reactor=self.p_reactor)
        self.assertSameStore(self.primary, self.standby)
        self.assertIn("after-takeover", self.primary.registry.state.hostnames)

    def test_partition_two_primaries_until_it_heals_then_the_newer_term_wins(self) -> None:
        """
        The standby cannot see the primary, the nodes can: the standby takes over
        (term 2) while the old primary keeps taking writes (term 1) from nodes
        that never failed over.  When the probe gets through, the old primary
        steps down and takes the new store: its partition-time writes are gone
        from the registry until their nodes register again (docs/deploy.md).
        """
        register(self.primary.registry, "before")
        self.s_reactor.advance(0)
        self.connect()
        self.pump = None  # the partition
        self.advance(11)
        new, old = self.standby.replication.replica, self.primary.replication.replica  # type: ignore[union-attr]
        self.assertEqual((new.standby, new.term, old.standby, old.term), (False, 2, False, 1))
        register(self.primary.registry, "old-side")  # accepted: a split brain while it lasts
        register(self.standby.registry, "new-side")
        self.advance(3.5)
        self.connect()  # healed: the new primary's probe reaches the old one
        self.p_reactor.advance(0)
        self.connect(dialled=self.standby, dialler_reactor=self.p_reactor)
        self.assertEqual((old.standby, old.term), (True, 2))
        self.assertSameStore(self.primary, self.standby)
        self.assertEqual(sorted(self.primary.registry.state.hostnames), ["before", "new-side"])

    def test_wrong_token_refused_and_logged(self) -> None:
        other = RendezvousService(attr.evolve(settings(standby_of=self.address),
                                              replication=ReplicationSettings(token=b"x" * 16,
                                                                              standby_of=self.address)),
                                  self.s_reactor)
        other.startService()
        self.addCleanup(other.stopService)
        self.s_reactor.advance(0)
        with capturedLogs() as events:
            self.connect()
        self.assertTrue(any("check the replication token" in str(e.get("hint", "")) for e in events))
        self.assertTrue(other.replication.replica.standby)  # type: ignore[union-attr]

    def test_gap_resubscribes(self) -> None:
        self.s_reactor.advance(0)
        pump = self.connect()
        follower = self.standby.replication.follower  # type: ignore[union-attr]
        follower.seq -= 1  # as if a delta had been lost
        register(self.primary.registry, "x")
        with capturedLogs() as events:
            self.advance(0.2)
        self.assertTrue(any("replication gap" in e.get("log_format", "") for e in events))
        self.advance(3.5)
        self.connect()
        self.assertIn("x", self.standby.registry.state.hostnames)
        del pump


class StoredPairTests(PairTests):
    """
    The same, each server with a store: the primary's pushes come from its
    store writer's feed (the journal's records, issue 16).
    """

    def service(self, settings: RendezvousSettings, reactor: FakeReactor) -> RendezvousService:
        folder = self.mktemp()
        os.makedirs(folder)
        stored = attr.evolve(settings, store=os.path.join(folder, "registry.json"))
        return RendezvousService(stored, reactor, run_writes=maybeDeferred)

    def test_pushes_come_from_the_store_writers_feed(self) -> None:
        assert self.primary.store is not None and self.primary.replication is not None
        self.assertIs(self.primary.replication.publisher.feed, self.primary.store.feed)
        register(self.primary.registry, "early")
        self.s_reactor.advance(0)
        self.connect()
        self.advance(0.5)

        def whole(*args: object, **kwargs: object) -> Any:
            raise AssertionError("the whole store was made on the reactor")
        self.patch(RegistryState, "to_bytes", whole)
        self.patch(replication, "adopt", whole)  # the standby applies records: no whole state adopted
        assert self.standby.store is not None
        snapshots, journal_seq = self.standby.store.snapshots, self.standby.registry.state.journal_seq
        sent, applied = self.primary.replication.publisher.deltas_sent, \
            self.standby.replication.follower.deltas  # type: ignore[union-attr]
        node = register(self.primary.registry, "late")
        self.primary.registry.handle({"type": "deregister", "node_id": node}, PEER)
        register(self.primary.registry, "later")
        self.advance(0.2)
        register(self.primary.registry, "latest")
        self.advance(0.2)
        self.assertEqual(self.primary.replication.publisher.deltas_sent, sent + 2)
        self.assertGreaterEqual(self.primary.store.writes, 2)  # the writer took its records meanwhile
        self.advance(0.5)
        self.assertEqual(self.standby.replication.follower.deltas, applied + 2)  # type: ignore[union-attr]
        self.assertIn("latest", self.standby.registry.state.hostnames)
        self.assertSameStore(self.standby, self.primary)
        # the standby's own store followed by journal records (its writer's tracker saw the changes)
        self.assertEqual(self.standby.store.snapshots, snapshots)
        self.assertEqual(self.standby.registry.state.journal_seq, journal_seq + 2)


class SyncSettingsTests(SynchronousTestCase):
    def test_sync_holds_replies_by_the_publisher(self) -> None:
        service = RendezvousService(settings(sync=True), FakeReactor())
        self.assertIsInstance(service.factory.durability, Publisher)
        self.assertEqual(service.replication.push_delay, 0.0)  # type: ignore[union-attr]

    def test_sync_and_durable_wait_for_both(self) -> None:
        folder = self.mktemp()
        import os
        os.makedirs(folder)
        durable = attr.evolve(settings(sync=True), store=os.path.join(folder, "r.json"), durable=True)
        service = RendezvousService(durable, FakeReactor(), run_writes=lambda f: Deferred())
        self.assertIsInstance(service.factory.durability, BothSaved)

    def test_unpaired_has_no_replication(self) -> None:
        service = RendezvousService(RendezvousSettings(listen="127.0.0.1:0", beacon_listen="127.0.0.1:0"),
                                    FakeReactor())
        self.assertIsNone(service.replication)
        self.assertIsNone(service.registry.replica)

    def test_standby_of_a_tls_primary_pins_it(self) -> None:
        reactor = FakeReactor()
        service = RendezvousService(settings(standby_of="127.0.0.1:9000", primary_fingerprint="ab" * 32), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        reactor.advance(0)
        self.assertEqual(reactor.tcpClients, [])
        [(host, port, _, options, timeout, _)] = reactor.sslClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9000, 10.0))
        self.assertEqual(type(options).__name__, "PinnedCertificate")
