"""pilot.server.replication: the publisher's pushes, the follower's copy, synchronous acknowledgements."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import MalformedFrame
from pilot.identity import Identity, b64encode
from pilot.server.journal import Feed, Tracker
from pilot.server.registry import Peer, Registry
from pilot.server.replication import Follower, Gap, Publisher, adopt, tokens_match
from pilot.server.state import RegistryState
from pilot.wire import replication as wire
from tests.server.test_state import load_vector

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
        self.publisher = Publisher(self.clock, self.registry.state.to_bytes, Feed(Tracker(self.registry.state)))
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
