"""pilot.server.replication_role: standby refusals, terms, promotion and stepping down."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pilot.server.journal import Feed, Tracker
from pilot.server.registry import Peer, Registry
from pilot.server.replication import Publisher
from pilot.server.replication_role import READ_ONLY, Replica, table
from tests.server.test_replication import PEER, Session, register

TOKEN = b"0123456789abcdef"


class Links:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def settle(self) -> None:
        self.calls.append(("settle",))

    def follow(self, primary: str) -> None:
        self.calls.append(("follow", primary))

    def lead(self) -> None:
        self.calls.append(("lead",))

    def persist(self) -> None:
        self.calls.append(("persist",))

    def revive(self) -> None:
        self.calls.append(("revive",))

    def drop_clients(self) -> None:
        self.calls.append(("drop_clients",))


class ReplicaTestCase(SynchronousTestCase):
    def make(self, standby_of: str | None = None, token: bytes | None = TOKEN, term: int = 0) -> Replica:
        self.clock = Clock()
        self.registry = Registry(self.clock)
        self.registry.state.term = term
        self.links = Links()
        self.publisher = Publisher(self.clock, self.registry.state.to_bytes,
                                   Feed(Tracker(self.registry.state)))
        replica = Replica(self.registry.state, self.publisher, token, standby_of, self.links)
        self.registry.replica = replica
        return replica


class StandbyTests(ReplicaTestCase):
    def test_writes_refused_with_the_primary(self) -> None:
        self.make("10.0.0.1:9000", term=4)
        reply = self.registry.handle({"type": "register", "public_key": "x"}, PEER)
        self.assertEqual(reply, {"type": "error", "code": "not_primary", "primary": "10.0.0.1:9000", "term": 4,
                                 "error": "this rendezvous is a standby; the primary is 10.0.0.1:9000"})

    def test_reads_answered_with_the_term(self) -> None:
        self.make("10.0.0.1:9000", term=4)
        reply = self.registry.handle({"type": "list_networks"}, PEER)
        self.assertEqual((reply["type"], reply["term"]), ("list_networks_ok", 4))

    def test_the_reference_standby_list_is_read_only(self) -> None:
        reference = {"lookup", "resolve", "list_networks", "list_nodes", "heartbeat", "poll_handshakes",
                     "resolve_hostname", "beacon_list"}
        self.assertTrue(reference <= READ_ONLY)
        for write in ("register", "set_hostname", "report_trust", "respond_handshake", "deregister",
                      "subscribe_events", "subscribe_replication", "rotate_key", "beacon_register"):
            self.assertNotIn(write, READ_ONLY)

    def test_promotion_takes_the_next_term(self) -> None:
        replica = self.make("10.0.0.1:9000", term=4)
        with capturedLogs() as events:
            replica.primary_silent("10.0.0.1:9000", 11.2)
        self.assertEqual((replica.term, replica.standby, replica.primary), (5, False, ""))
        self.assertEqual(self.links.calls, [("settle",), ("persist",), ("revive",), ("lead",)])
        [event] = [e for e in events if "PROMOTED" in e["log_format"]]
        self.assertEqual((event["term"], event["reason"]), (5, "primary 10.0.0.1:9000 silent for 11 s"))
        self.assertEqual(register(self.registry) > 0, True)  # writes now

    def test_promote_request_needs_the_token(self) -> None:
        replica = self.make("10.0.0.1:9000", term=1)
        bad = self.registry.handle({"type": "replication_promote", "token": "wrong"}, PEER)
        self.assertEqual((bad["code"], replica.standby), ("unauthorized", True))
        ok = self.registry.handle({"type": "replication_promote", "token": TOKEN.decode()}, PEER)
        self.assertEqual(ok, {"type": "replication_promote_ok", "promoted": True, "term": 2})
        again = self.registry.handle({"type": "replication_promote", "token": TOKEN.decode()}, PEER)
        self.assertEqual(again, {"type": "replication_promote_ok", "promoted": False, "term": 2})

    def test_higher_term_elsewhere_switches_the_primary(self) -> None:
        replica = self.make("10.0.0.1:9000", term=2)
        self.assertTrue(replica.saw_term(3, "10.0.0.2:9000"))
        self.assertEqual((replica.term, replica.primary), (3, "10.0.0.2:9000"))
        self.assertIn(("follow", "10.0.0.2:9000"), self.links.calls)


class PrimaryTests(ReplicaTestCase):
    def test_a_new_pair_starts_at_term_one(self) -> None:
        replica = self.make()
        self.assertEqual(replica.term, 1)
        self.assertEqual(self.registry.handle({"type": "list_networks"}, PEER)["term"], 1)

    def test_no_pair_adds_nothing(self) -> None:
        self.clock = Clock()
        registry = Registry(self.clock)
        self.assertNotIn("term", registry.handle({"type": "list_networks"}, PEER))
        reply = registry.handle({"type": "subscribe_replication", "token": "t"}, PEER)
        self.assertEqual(reply["error"], "replication not configured")

    def test_subscription_checks_the_token(self) -> None:
        self.make()
        reply = self.registry.handle({"type": "subscribe_replication", "token": "nope"}, PEER, Session())
        self.assertEqual((reply["error"], reply["code"]), ("invalid replication token", "unauthorized"))

    def test_subscription_gets_the_store(self) -> None:
        self.make(term=2)
        register(self.registry)
        reply = self.registry.handle({"type": "subscribe_replication", "token": TOKEN.decode()}, PEER, Session())
        self.assertEqual(reply["type"], "replication_snapshot")
        self.assertEqual(reply["snapshot"]["pilot_term"], 2)
        self.assertEqual(reply["term"], 2)

    def test_a_higher_term_primary_makes_it_step_down(self) -> None:
        replica = self.make(term=2)
        ours = Session()
        self.registry.handle({"type": "subscribe_replication", "token": TOKEN.decode()}, PEER, ours)
        with capturedLogs() as events:
            reply = self.registry.handle({"type": "subscribe_replication", "token": TOKEN.decode(), "deltas": True,
                                          "term": 3, "role": "primary", "port": 9100}, Peer("10.0.0.9", 4444),
                                         Session())
        self.assertEqual((reply["code"], reply["primary"], reply["term"]), ("not_primary", "10.0.0.9:9100", 3))
        self.assertEqual((replica.standby, replica.term), (True, 3))
        self.assertEqual(self.links.calls[-2:], [("drop_clients",), ("follow", "10.0.0.9:9100")])
        self.assertEqual(self.publisher.subscriptions, {})
        self.assertTrue(any("STEPPING DOWN" in e["log_format"] for e in events))
        self.assertEqual(self.registry.handle({"type": "register", "public_key": "x"}, PEER)["code"],
                         "not_primary")

    def test_a_higher_term_standby_is_refused(self) -> None:
        replica = self.make(term=2)
        reply = self.registry.handle({"type": "subscribe_replication", "token": TOKEN.decode(), "deltas": True,
                                      "term": 3}, PEER, Session())
        self.assertEqual(reply["code"], "not_primary")
        self.assertFalse(replica.standby)

    def test_same_term_prober_wins(self) -> None:
        replica = self.make(term=2)
        self.assertFalse(replica.saw_term(2, "10.0.0.1:9000"))  # the prober keeps its role
        reply = self.registry.handle({"type": "subscribe_replication", "token": TOKEN.decode(), "deltas": True,
                                      "term": 2, "role": "primary", "port": 9100}, PEER, Session())
        self.assertEqual((reply["code"], replica.standby, replica.term), ("not_primary", True, 2))

    def test_events_carry_the_term(self) -> None:
        self.make(term=6)
        session = Session()
        self.registry.subscribers[5] = {session}
        self.registry.push_event(5, {"type": "event", "event": "x"})
        self.assertEqual(session.frames, [{"type": "event", "event": "x", "term": 6}])


class TableTests(SynchronousTestCase):
    def test_every_pair_declared(self) -> None:
        self.assertEqual(table.undeclared(["promoted", "outranked"]), [])

    def test_rows(self) -> None:
        self.assertEqual([(r.state, r.input, r.next) for r in table.transitions()],
                         [("standby", "outranked", "standby"), ("standby", "promoted", "primary"),
                          ("primary", "outranked", "standby")])

