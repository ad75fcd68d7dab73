"""pilot.server.replication: the publisher's pushes, the follower's copy, synchronous acknowledgements."""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import MalformedFrame
from pilot.identity import Identity, b64encode
from pilot.server.journal import Feed, Tracker
from pilot.server.registry import Peer, Registry
from pilot.server import replication
from pilot.server.replication import Follower, Gap, Publisher, adopt, tokens_match
from pilot.server.state import HandshakeRequest, HandshakeResponse, Node, RegistryState, node_json
from pilot.wire import replication as wire
from pilot.wire.statement import make_statement
from tests.server.test_journal import ALICE
from tests.server.test_state import KEYS, T0, load_vector, sample_state

PEER = Peer("192.0.2.7", 5000)
#: a subscription of a standby of ours
OURS = wire.Subscribe("t", deltas=True, records=True)


class Session:
    """A subscriber's connection: records what was pushed, as the standby would read it."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def push(self, message: dict[str, Any]) -> None:
        self.frames.append(json.loads(json.dumps(message)))

    def push_body(self, body: bytes) -> None:
        self.frames.append(json.loads(body))


def register(registry: Registry, hostname: str = "") -> int:
    msg: dict[str, Any] = {"type": "register", "public_key": b64encode(Identity.generate().public_key),
                           "listen_addr": "0.0.0.0:4000"}
    if hostname:
        msg["hostname"] = hostname
    reply = registry.handle(msg, PEER)
    assert reply["type"] == "register_ok", reply
    node_id: int = reply["node_id"]
    return node_id


class PublisherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(self.clock, on_change=lambda: self.publisher.changed())
        self.publisher = Publisher(self.clock, self.registry.state.to_bytes,
                                   Feed(Tracker(self.registry.state)))
        self.publisher.term = 3

    def follow(self, session: Session, follower: Follower) -> RegistryState | None:
        state = None
        for frame in session.frames:
            decoded = wire.decode(frame)
            if isinstance(decoded, wire.Snapshot):
                state = follower.snapshot(decoded)
            elif isinstance(decoded, wire.Delta):
                follower.delta(decoded)
                state = follower.load()
        session.frames.clear()
        return state

    def test_reference_subscriber_gets_whole_snapshots(self) -> None:
        register(self.registry)
        ref = Session()
        reply = self.publisher.subscribe(ref, wire.Subscribe("t"), "ref")
        self.assertEqual(reply, {"type": "replication_snapshot", "snapshot": self.registry.state.to_json()})
        register(self.registry)
        self.publisher.publish()
        [frame] = ref.frames
        self.assertEqual(frame, {"type": "replication_snapshot", "term": 3,
                                 "snapshot": json.loads(self.registry.state.to_bytes())})

    def test_our_subscriber_follows_by_deltas(self) -> None:
        register(self.registry, "first")
        ours, follower = Session(), Follower()
        reply = self.publisher.subscribe(ours, OURS, "ours")
        self.assertEqual(reply["type"], "subscribe_replication_ok")
        first = self.follow(ours, follower)
        assert first is not None
        self.assertEqual(first.to_json(), self.registry.state.to_json())
        node = register(self.registry, "second")
        self.registry.handle({"type": "deregister", "node_id": node}, PEER)
        register(self.registry, "third")
        self.publisher.publish()
        self.assertEqual(ours.frames[0]["type"], "replication_delta")
        self.assertEqual(ours.frames[0]["term"], 3)
        state = self.follow(ours, follower)
        self.assertEqual(state.to_json(), self.registry.state.to_json())  # type: ignore[union-attr]
        self.publisher.publish()  # nothing changed: nothing sent
        self.assertEqual(ours.frames, [])

    def test_late_subscriber_does_not_cost_the_others_a_change(self) -> None:
        ours, follower = Session(), Follower()
        self.publisher.subscribe(ours, OURS, "a")
        self.follow(ours, follower)
        register(self.registry, "unpushed")  # changed, not pushed yet...
        self.publisher.subscribe(Session(), OURS, "b")  # ...when b comes
        state = self.follow(ours, follower)
        self.assertEqual(state.to_json(), self.registry.state.to_json())  # type: ignore[union-attr]

    def test_captured_reference_store_travels_unchanged(self) -> None:
        value = load_vector("go-session-1", "registry-store.json")
        state = RegistryState.from_json(value)
        publisher = Publisher(self.clock, state.to_bytes, Feed(Tracker(state)))
        reply = publisher.subscribe(Session(), wire.Subscribe("t"), "ref")
        self.assertEqual(reply["snapshot"], state.to_json())
        self.assertEqual(RegistryState.from_json(reply["snapshot"]).to_json(), state.to_json())

    def test_store_too_big_for_a_reference_standby(self) -> None:
        from pilot.server.requests import RequestError
        publisher = Publisher(self.clock, lambda: b'{"nodes":{},"x":"' + b"y" * (1 << 20) + b'"}',
                              Feed(Tracker(RegistryState())))
        self.assertRaises(RequestError, publisher.subscribe, Session(), wire.Subscribe("t"), "ref")
        self.assertEqual(publisher.subscriptions, {})
        ours = OURS
        self.assertEqual(publisher.subscribe(Session(), ours, "ours")["type"], "subscribe_replication_ok")

    def test_store_too_big_by_its_nodes_is_not_made(self) -> None:
        from pilot.server.requests import RequestError
        state = RegistryState()
        for i in range(1, 8000):
            state.nodes[i] = Node(id=i, public_key=i.to_bytes(4, "big") * 8)

        def whole() -> bytes:
            raise AssertionError("made")
        publisher = Publisher(self.clock, whole, Feed(Tracker(state)))
        e = self.assertRaises(RequestError, publisher.subscribe, Session(), wire.Subscribe("t"), "ref")
        self.assertIn("7999 nodes", str(e))
        self.assertFalse(publisher.feed.joined(publisher))

    def test_heartbeats_at_the_asked_interval(self) -> None:
        ref, ours = Session(), Session()
        self.publisher.subscribe(ref, wire.Subscribe("t"), "ref")
        self.publisher.subscribe(ours, wire.Subscribe("t", deltas=True, heartbeat=2.5, records=True), "ours")
        ours.frames.clear()
        for _ in range(30):
            self.clock.advance(0.5)
            self.publisher.beat()
        self.assertEqual(len(ref.frames), 1)  # 15 s
        self.assertEqual(len(ours.frames), 6)  # every 2.5 s
        self.assertEqual(ref.frames[0], {"type": "heartbeat", "term": 3})

    def test_closed_subscriber_gets_nothing(self) -> None:
        s = Session()
        self.publisher.subscribe(s, wire.Subscribe("t"), "ref")
        self.publisher.closed(s)
        register(self.registry)
        self.publisher.publish()
        self.clock.advance(20)
        self.publisher.beat()
        self.assertEqual(s.frames, [])


class SyncTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(self.clock, on_change=lambda: self.publisher.changed())
        self.publisher = Publisher(self.clock, self.registry.state.to_bytes,
                                   Feed(Tracker(self.registry.state)), sync_timeout=2.0)
        self.session = Session()
        self.publisher.subscribe(self.session, OURS, "ours")

    def test_reply_waits_for_the_standby(self) -> None:
        register(self.registry)
        d = self.publisher.when_saved(self.publisher.generation)
        self.assertNoResult(d)
        self.publisher.publish()
        self.assertNoResult(d)
        seq = self.session.frames[-1]["seq"]
        self.publisher.acked(self.session, wire.Ack(seq))
        self.successResultOf(d)

    def test_timeout_answers_anyway_and_says_so(self) -> None:
        register(self.registry)
        d = self.publisher.when_saved(self.publisher.generation)
        self.publisher.publish()
        with capturedLogs() as events:
            self.clock.advance(2.0)
        self.successResultOf(d)
        self.assertTrue(any("no standby acknowledged" in e["log_format"] for e in events))

    def test_without_a_standby_answers_at_once(self) -> None:
        self.publisher.closed(self.session)
        register(self.registry)
        self.successResultOf(self.publisher.when_saved(self.publisher.generation))

    def test_ack_from_the_future_or_a_stranger_ignored(self) -> None:
        register(self.registry)
        d = self.publisher.when_saved(self.publisher.generation)
        self.publisher.publish()
        self.publisher.acked(self.session, wire.Ack(99))
        self.publisher.acked(Session(), wire.Ack(1))
        self.assertNoResult(d)


class FollowerTests(SynchronousTestCase):
    def test_gap_and_no_snapshot(self) -> None:
        follower = Follower()
        self.assertRaises(Gap, follower.delta, wire.Delta(1, {}))
        follower.snapshot(wire.Snapshot(RegistryState().to_json(), seq=4))
        self.assertRaises(Gap, follower.delta, wire.Delta(6, {}))
        follower.delta(wire.Delta(5, {}))
        self.assertEqual(follower.seq, 5)

    def test_store_that_does_not_load(self) -> None:
        follower = Follower()
        self.assertRaises(MalformedFrame, follower.snapshot, wire.Snapshot({"nodes": {"1": 5}}))
        self.assertIsNone(follower.store)
        follower.snapshot(wire.Snapshot(RegistryState().to_json(), seq=1))
        follower.delta(wire.Delta(2, {"nodes": {"x": {"id": "bad"}}}))
        self.assertRaises(MalformedFrame, follower.load)

    def test_deltas_wait_for_a_load(self) -> None:
        follower = Follower()
        follower.snapshot(wire.Snapshot(RegistryState().to_json(), seq=1))
        follower.delta(wire.Delta(2, {"set": {"pilot_term": 3}}))
        follower.delta(wire.Delta(3, {}))
        self.assertEqual(follower.pending, 2)
        self.assertEqual(follower.load().term, 3)
        self.assertEqual(follower.pending, 0)

    def test_adopt_keeps_the_object(self) -> None:
        target, source = RegistryState(), RegistryState(term=7)
        source.proven.add(5)
        adopt(target, source)
        self.assertEqual((target.term, target.proven), (7, {5}))

    def test_tokens_match(self) -> None:
        self.assertTrue(tokens_match(b"0123456789abcdef", "0123456789abcdef"))
        self.assertFalse(tokens_match(b"0123456789abcdef", "0123456789abcdeg"))
        self.assertFalse(tokens_match(b"0123456789abcdef", "\udcff"))


class RecordDeltaTests(SynchronousTestCase):
    """
    Our standbys get the journal's records (issue 16): a push costs what
    changed, and the standby's store ends byte for byte the primary's.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.state = sample_state()
        self.state.term = 2
        self.feed = Feed(Tracker(self.state))
        self.writer = object()  # the store's writer, the feed's other reader
        self.feed.join(self.writer)
        self.publisher = Publisher(self.clock, self.state.to_bytes, self.feed)
        self.publisher.term = 2
        self.session, self.follower = Session(), Follower()
        self.publisher.subscribe(self.session, OURS, "ours")
        self.standby = self.follow()

    def follow(self) -> RegistryState:
        """Apply what was pushed, as a standby does; the state it loads."""
        for frame in self.session.frames:
            decoded = wire.decode(frame)
            if isinstance(decoded, wire.Snapshot):
                self.follower.snapshot(decoded)
            else:
                assert isinstance(decoded, wire.Delta)
                self.follower.delta(decoded)
        self.session.frames.clear()
        return self.follower.load()

    def assertIdentical(self) -> None:
        self.assertEqual(self.follow().to_bytes(), self.state.to_bytes())

    def changes(self) -> list[Callable[[RegistryState], None]]:
        """Changes of every kind the store holds, one after another."""
        def statement(s: RegistryState, n: int) -> None:
            s.statements.setdefault(7, {})[99] = make_statement(7, ALICE.public_key, 99, b"", n, n, n == 2,
                                                                ALICE.sign)
        return [
            lambda s: setattr(s.nodes[7], "real_addr", "192.0.2.1:4001"),
            lambda s: (s.nodes.__setitem__(5, Node(id=5, public_key=KEYS[4], real_addr="192.0.2.9:1",
                                                   last_seen=T0)), s.index_key(KEYS[4], 5)),
            lambda s: (setattr(s.nodes[7], "hostname", "beta"), setattr(s.nodes[5], "tags", ["new"])),
            lambda s: (s.nodes.pop(1 << 31), s.gone.__setitem__(1 << 31, T0 + 1.5)),
            lambda s: (s.auth_ts.__setitem__(7, int(T0 * 1000) + 999), s.proven.add(5)),
            lambda s: (s.trust.discard((7, 99)), s.trust.add((0xFFFFFFFE, 5)), s.trust.add((5, 0xFFFFFFFE))),
            lambda s: s.asked.add((7, 0xFFFFFFFE)),
            lambda s: s.inbox[7].append(HandshakeRequest(0xFFFFFFFE, "hi", T0)),
            lambda s: (s.responses.pop(99),
                       s.responses.__setitem__(7, [HandshakeResponse(99, False, T0 + 1)])),
            lambda s: statement(s, 1),
            lambda s: statement(s, 2),
            lambda s: setattr(s, "journal_seq", s.journal_seq + 5),
            lambda s: s.forget(99),
            lambda s: (s.asked.discard((7, 0xFFFFFFFE)), s.inbox[7].clear()),
            lambda s: (s.proven.discard(5), s.proven.add(5), s.trust.add((7, 5)), s.trust.discard((7, 5))),
        ]

    def test_push_costs_what_changed(self) -> None:
        """No push formats, parses or diffs the whole store: only the changes are looked at."""
        def whole(*args: object, **kwargs: object) -> Any:
            raise AssertionError("the whole store was made for a push")
        for target, name in ((RegistryState, "to_bytes"), (RegistryState, "to_json"), (wire, "diff"),
                             (wire, "store_object"), (wire, "encode_snapshot_bytes")):
            self.patch(target, name, whole)
        for change in self.changes():
            change(self.state)
            self.publisher.publish()
            [frame] = self.session.frames
            self.assertEqual((frame["type"], frame["seq"], frame["term"]),
                             ("replication_delta", self.publisher.seq, 2))
            self.assertIn("record", frame)
            self.assertNotIn("changes", frame)
            decoded = wire.decode(frame)
            assert isinstance(decoded, wire.Delta)
            self.follower.delta(decoded)
            self.session.frames.clear()
        self.assertEqual(self.publisher.deltas_sent, len(self.changes()))
        self.publisher.publish()
        self.assertEqual(self.session.frames, [])  # nothing changed: nothing sent

    def test_one_changed_node_one_node_sent(self) -> None:
        self.state.nodes[7].real_addr = "192.0.2.1:4001"
        self.publisher.publish()
        [frame] = self.session.frames
        self.assertEqual(frame["record"], {"set": {"nodes": {"7": json.loads(json.dumps(
            node_json(self.state.nodes[7], self.state.key_text(KEYS[0]))))}}})
        self.assertNotIn("scalars", frame)

    def test_standby_ends_byte_identical(self) -> None:
        """Each change pushed on its own, the writer taking its records in between (they merge)."""
        for i, change in enumerate(self.changes()):
            change(self.state)
            if i % 3:
                self.feed.take(self.writer)
            self.publisher.publish()
            self.assertIdentical()
        self.assertEqual(self.publisher.snapshots_sent, 1)  # the first synchronisation only

    def test_many_changes_in_one_push(self) -> None:
        for i, change in enumerate(self.changes()):
            change(self.state)
            if i % 2:
                self.feed.take(self.writer)
        self.publisher.publish()
        self.assertEqual(len(self.session.frames), 1)
        self.assertIdentical()

    def test_tracking_restarted_pushes_the_whole_store(self) -> None:
        self.state.trust = {(7, 0xFFFFFFFE)}  # replaced whole: the tracker cannot tell what changed
        self.publisher.publish()
        [frame] = self.session.frames
        self.assertEqual((frame["type"], frame["seq"]), ("replication_snapshot", 1))
        self.assertIdentical()
        self.state.nodes[7].hostname = "gamma"
        self.publisher.publish()
        self.assertEqual(self.session.frames[0]["type"], "replication_delta")
        self.assertIdentical()
        self.assertIsNone(self.feed.take(self.writer))  # the writer starts afresh too (a compaction)

    def test_older_standby_gets_numbered_snapshots(self) -> None:
        old, follower = Session(), Follower()
        self.publisher.subscribe(old, wire.Subscribe("t", deltas=True), "old")
        self.state.nodes[7].hostname = "gamma"
        self.publisher.publish()
        self.assertEqual([f["type"] for f in old.frames], ["replication_snapshot"] * 2)
        self.assertEqual([f.get("seq", 0) for f in old.frames], [0, 1])
        for frame in old.frames:
            decoded = wire.decode(frame)
            assert isinstance(decoded, wire.Snapshot)
            state = follower.snapshot(decoded)
        self.assertEqual(state.to_bytes(), self.state.to_bytes())
        self.assertEqual(self.session.frames[0]["type"], "replication_delta")  # ours still get records

    def test_publisher_leaves_the_feed_without_subscribers(self) -> None:
        self.publisher.closed(self.session)
        self.publisher.publish()
        self.assertFalse(self.feed.joined(self.publisher))
        self.state.nodes[7].hostname = "gamma"  # not kept for anyone
        self.feed.take(self.writer)
        again = Session()
        self.publisher.subscribe(again, OURS, "again")
        self.assertEqual([f["type"] for f in again.frames], ["replication_snapshot"])
        self.assertEqual(self.feed.take(self.publisher), {})

    def test_stepping_down_leaves_the_feed(self) -> None:
        self.assertEqual(self.publisher.drop_all(), [self.session])
        self.assertFalse(self.feed.joined(self.publisher))

    def test_follower_refuses_a_record_that_does_not_apply(self) -> None:
        for bad in ({"set": {"networks": {}}}, {"add": {"nodes": []}}, {"add": {"proven": "7"}},
                    {"drop": {"proven": [[7]]}}, {"add": []}):
            self.assertRaises(MalformedFrame, self.follower.delta,
                              wire.Delta(self.follower.seq + 1, {}, record=bad))

    def test_lists_wait_as_sets_until_a_load(self) -> None:
        """An item added to a long list costs the item: the list is sorted once, at the load."""
        self.state.proven.update(range(1000, 3000))
        self.state.trust.add((7, 0xFFFFFFFE))
        self.publisher.publish()
        self.follow()
        for i in range(5):
            self.state.proven.add(5000 + i)
            self.state.proven.discard(1000 + i)
            self.publisher.publish()
            [frame] = self.session.frames
            self.follower.delta(wire.decode(frame))  # type: ignore[arg-type]
            self.session.frames.clear()
        assert self.follower.store is not None
        self.assertNotIn(5004, self.follower.store["proven"])  # not yet: held in a set
        self.assertIdentical()
        self.assertIn(5004, self.follower.store["proven"])


class LiveFollowerTests(SynchronousTestCase):
    """
    A follower given the registry's state applies each record to it at once
    (issue 16): no store is loaded or adopted per delta, and the state after
    every kind of change is the primary's.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.state = sample_state()
        self.state.term = 2
        self.publisher = Publisher(self.clock, self.state.to_bytes, Feed(Tracker(self.state)))
        self.publisher.term = 2
        self.session, self.standby = Session(), RegistryState()
        self.follower = Follower(self.standby)
        self.publisher.subscribe(self.session, OURS, "ours")
        [frame] = self.session.frames
        self.session.frames.clear()
        snapshot = wire.decode(frame)
        assert isinstance(snapshot, wire.Snapshot)
        adopt(self.standby, self.follower.snapshot(snapshot))  # as the service adopts a snapshot

    def push(self) -> set[int] | None:
        self.publisher.publish()
        [frame] = self.session.frames
        self.session.frames.clear()
        delta = wire.decode(frame)
        assert isinstance(delta, wire.Delta)
        return self.follower.delta(delta)

    def test_each_record_applied_to_the_state(self) -> None:
        def whole(*args: object, **kwargs: object) -> Any:
            raise AssertionError("a whole store was loaded for a delta")
        self.patch(replication, "_load", whole)
        changes = RecordDeltaTests("test_standby_ends_byte_identical").changes()
        for change in changes:
            change(self.state)
            self.assertIsNotNone(self.push())
            self.assertEqual((self.follower.pending, self.follower.store, self.follower.holding),
                             (0, None, True))
            self.standby.journal_seq = self.state.journal_seq  # a scalar: the service's, not the follower's
            self.assertEqual(self.standby.to_bytes(), self.state.to_bytes())
            loaded = RegistryState.from_json(json.loads(self.state.to_bytes()))
            self.assertEqual((self.standby.hostnames, self.standby.id_keys),
                             (loaded.hostnames, loaded.id_keys))
        self.assertEqual(self.follower.deltas, len(changes))

    def test_replay_state_changed_is_told(self) -> None:
        self.state.auth_ts[7] += 1
        self.assertEqual(self.push(), {7})

    def test_older_deltas_after_records_need_a_snapshot(self) -> None:
        self.state.nodes[7].hostname = "gamma"
        self.push()
        self.assertRaises(Gap, self.follower.delta, wire.Delta(self.follower.seq + 1, {"set": {}}))

    def test_a_record_that_does_not_load(self) -> None:
        before = self.standby.to_bytes()
        bad = {"set": {"nodes": {"7": {"id": 8}}}}
        self.assertRaises(MalformedFrame, self.follower.delta,
                          wire.Delta(self.follower.seq + 1, {}, record=bad))
        self.assertEqual(self.standby.to_bytes(), before)


class OffReactorSnapshotTests(SynchronousTestCase):
    """A subscriber of ours gets its first snapshot made in another thread (issue 16)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.state = sample_state()
        self.state.term = 2
        self.runs: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        self.publisher = Publisher(self.clock, self.state.to_bytes, Feed(Tracker(self.state)),
                                   off_reactor=self.thread)
        self.publisher.term = 2
        self.session, self.follower = Session(), Follower()

    def thread(self, f: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.runs.append((f, d))
        return d

    def finish(self) -> None:
        f, d = self.runs.pop(0)
        try:
            result = f()
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)

    def follow(self) -> RegistryState:
        state = None
        for frame in self.session.frames:
            decoded = wire.decode(frame)
            if isinstance(decoded, wire.Snapshot):
                state = self.follower.snapshot(decoded)
            elif isinstance(decoded, wire.Delta):
                self.follower.delta(decoded)
                state = self.follower.load()
        self.session.frames.clear()
        assert state is not None
        return state

    def test_made_off_the_reactor_what_was_pushed_meanwhile_follows(self) -> None:
        def whole(*args: object, **kwargs: object) -> Any:
            raise AssertionError("the whole store was made on the reactor")
        self.patch(RegistryState, "to_bytes", whole)
        reply = self.publisher.subscribe(self.session, OURS, "ours")
        self.assertEqual(reply, {"type": "subscribe_replication_ok", "seq": 0})
        self.assertEqual(self.session.frames, [])
        self.state.nodes[7].hostname = "beta"
        self.publisher.publish()
        self.clock.advance(30)
        self.publisher.beat()  # no heartbeat before the snapshot: it would look like a gap
        self.assertEqual(self.session.frames, [])
        self.finish()
        self.assertEqual([(f["type"], f.get("seq", 0)) for f in self.session.frames],
                         [("replication_snapshot", 0), ("replication_delta", 1)])
        self.assertEqual(self.follow().hostnames, {"beta": 7})

    def test_standby_ends_byte_identical(self) -> None:
        self.publisher.subscribe(self.session, OURS, "ours")
        self.state.proven.add(1 << 31)
        self.publisher.publish()
        self.finish()
        self.state.nodes[7].hostname = "beta"
        self.publisher.publish()
        self.assertEqual(self.follow().to_bytes(), self.state.to_bytes())

    def test_gone_before_it_was_made(self) -> None:
        self.publisher.subscribe(self.session, OURS, "ours")
        self.publisher.closed(self.session)
        self.finish()
        self.assertEqual(self.session.frames, [])

    def test_failed_made_here_instead(self) -> None:
        self.publisher.subscribe(self.session, OURS, "ours")
        self.state.nodes[7].hostname = "beta"
        self.publisher.publish()
        f, d = self.runs.pop()
        d.errback(RuntimeError("no thread"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        [frame] = self.session.frames
        self.assertEqual((frame["type"], frame["seq"]), ("replication_snapshot", 1))
        self.assertEqual(self.follow().to_bytes(), self.state.to_bytes())
