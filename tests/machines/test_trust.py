"""
Tests for L{pilot.machines.trust}: one node's trust logic against recording
fakes, and two nodes reaching trust through a fake registry and a fake
direct channel, all on a L{Clock}.
"""

from __future__ import annotations

from tests import capture

import json
from typing import Any, Callable

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import ConnectionFailed, InvalidArgument, NotFound, RegistryUnavailable
from pilot.identity import Identity, b64encode
from pilot.machines.trust import (
    MAX_AGE, MAX_AHEAD, MAX_PENDING, PENDING, REQUESTED, TRUSTED, UNKNOWN, AutoApprove, ReplayFilter,
    TrustMachine, transitions,
)
from pilot.machines.trust import table as peer_table
from pilot.trust import OutgoingRequest, PendingRequest, TrustedPeer, TrustStore
from pilot.wire.handshake import (
    ACCEPT, REJECT, REQUEST, REVOKE, HandshakeMessage, challenge, decode, make_message,
)

ME = 1
PEER = 2
OTHER = 3
US = Identity.from_seed(b"1" * 32)
THEM = Identity.from_seed(b"2" * 32)
STRANGER = Identity.from_seed(b"3" * 32)
T0 = 1795301000.0


@attr.s(auto_attribs=True, eq=False)
class Node:
    """One TrustMachine with recording fakes for every collaborator."""

    node_id: int = ME
    identity: Identity = US
    clock: Clock = attr.Factory(Clock)
    store: TrustStore = attr.Factory(TrustStore)
    keys: dict[int, bytes] = attr.Factory(lambda: {ME: US.public_key, PEER: THEM.public_key,
                                                   OTHER: STRANGER.public_key})
    infos: dict[int, dict[str, Any]] = attr.Factory(dict)
    rules: AutoApprove = attr.Factory(AutoApprove)
    direct_result: Callable[[], Any] = lambda: succeed(None)
    registry_result: Callable[[dict[str, Any]], Any] = lambda msg: succeed({"type": msg["type"] + "_ok"})
    events: list[tuple[Any, ...]] = attr.Factory(list)
    logged: list[dict[str, Any]] = attr.Factory(list)
    saved: list[dict[str, Any]] = attr.Factory(list)
    save_error: Exception | None = None

    def __attrs_post_init__(self) -> None:
        if self.clock.seconds() == 0:
            self.clock.advance(T0)
        self.machine = TrustMachine(
            self.node_id, self.identity.public_key, self.identity.sign, self.store, self.save,
            self.send_direct, self.registry_request, self.lookup_key, self.clock,
            log=Logger(observer=self.logged.append), rules=self.rules, peer_info=self.peer_info,
            trust_ended=lambda peer: self.events.append(("ended", peer)))

    def save(self) -> None:
        if self.save_error is not None:
            raise self.save_error
        self.saved.append(json.loads(json.dumps(self.store.to_json())))

    def send_direct(self, peer: int, data: bytes) -> Any:
        message = decode(data)
        self.events.append(("direct", peer, message.type, message))
        return self.direct_result()

    def registry_request(self, msg: dict[str, Any]) -> Any:
        self.events.append(("registry", msg))
        return self.registry_result(msg)

    def lookup_key(self, node_id: int) -> Any:
        self.events.append(("lookup", node_id))
        if node_id in self.keys:
            return succeed(self.keys[node_id])
        return fail(RegistryUnavailable("no such node"))

    def peer_info(self, node_id: int) -> Any:
        self.events.append(("info", node_id))
        if node_id in self.infos:
            return succeed(self.infos[node_id])
        return fail(RegistryUnavailable("lookup failed"))

    # views

    def sent(self) -> list[Any]:
        """What went out, compactly: ("direct", peer, type) and the registry messages."""
        out: list[Any] = []
        for event in self.events:
            if event[0] == "direct":
                out.append(event[:3])
            elif event[0] == "registry":
                out.append(event[1])
        return out

    def direct(self) -> list[HandshakeMessage]:
        return [e[3] for e in self.events if e[0] == "direct"]

    def log_text(self) -> list[str]:
        return [formatEvent(e) for e in self.logged]

    def clear(self) -> None:
        del self.events[:]
        del self.logged[:]
        del self.saved[:]

    # inputs from a peer

    def message(self, kind: str, sender: int = PEER, identity: Identity = THEM, ts: float | None = None,
                justification: str = "", reason: str = "", to: int = ME) -> HandshakeMessage:
        return make_message(kind, sender, to, identity.public_key, identity.sign,
                            int(self.clock.seconds() if ts is None else ts),
                            justification=justification, reason=reason)

    def receive(self, kind: str, sender: int = PEER, identity: Identity = THEM,
                **kw: Any) -> HandshakeMessage:
        message = self.message(kind, sender, identity, **kw)
        self.deliver(sender, message)
        return message

    def deliver(self, sender: int, message: HandshakeMessage) -> None:
        d = self.machine.direct_message_received(sender, message)
        results: list[Any] = []
        d.addBoth(results.append)
        assert results == [None], results


def report(node: int, peer: int) -> dict[str, Any]:
    return {"type": "report_trust", "node_id": node, "peer_id": peer}


def respond(node: int, peer: int, accept: bool) -> dict[str, Any]:
    return {"type": "respond_handshake", "node_id": node, "peer_id": peer, "accept": accept}


def request(node: int, peer: int, justification: str) -> dict[str, Any]:
    return {"type": "request_handshake", "from_node_id": node, "to_node_id": peer,
            "justification": justification}


def revoke(node: int, peer: int) -> dict[str, Any]:
    return {"type": "revoke_trust", "node_id": node, "peer_id": peer}


def trusted_store(key: bytes = THEM.public_key, mutual: bool = True) -> TrustStore:
    return TrustStore(trusted={PEER: TrustedPeer(PEER, key, T0 - 100, mutual)})


def pending_store(key: bytes = b"") -> TrustStore:
    return TrustStore(pending={PEER: PendingRequest(PEER, key, "hi", T0 - 100)})


def requested_store() -> TrustStore:
    return TrustStore(outgoing={PEER: OutgoingRequest(PEER, "me", T0 - 100)})


class OutgoingTests(SynchronousTestCase):
    def test_handshake_sends_direct_and_relay(self) -> None:
        node = Node()
        node.machine.handshake(PEER, "let me in")
        self.assertEqual(node.sent(), [("direct", PEER, REQUEST), request(ME, PEER, "let me in")])
        [message] = node.direct()
        self.assertEqual((message.node_id, message.public_key, message.justification, message.timestamp),
                         (ME, US.public_key, "let me in", int(T0)))
        self.assertTrue(message.verifies(PEER, US.public_key))
        self.assertEqual(node.machine.status(PEER), REQUESTED)
        self.assertEqual(node.machine.outgoing(), [OutgoingRequest(PEER, "let me in", T0)])
        self.assertEqual(node.saved[-1]["outgoing"], [{"node_id": PEER, "justification": "let me in",
                                                       "sent_at": "2026-11-21T22:43:20Z"}])

    def test_unreachable_peer_still_relayed(self) -> None:
        node = Node(direct_result=lambda: fail(ConnectionFailed("resolve refused")))
        node.machine.handshake(PEER, "x")
        self.assertEqual(node.sent(), [("direct", PEER, REQUEST), request(ME, PEER, "x")])
        self.assertEqual(node.machine.status(PEER), REQUESTED)
        self.assertTrue(any("not delivered" in line for line in node.log_text()))

    def test_registry_down_is_logged(self) -> None:
        node = Node(registry_result=lambda msg: fail(RegistryUnavailable("down")))
        node.machine.handshake(PEER, "x")
        self.assertEqual(node.machine.status(PEER), REQUESTED)
        self.assertTrue(any("request_handshake" in line and "down" in line for line in node.log_text()))

    def test_send_direct_raising(self) -> None:
        def boom() -> None:
            raise OSError("no route")
        node = Node(direct_result=boom)
        node.machine.handshake(PEER, "x")
        self.assertEqual(node.machine.status(PEER), REQUESTED)

    def test_handshake_again_resends(self) -> None:
        node = Node(store=requested_store())
        node.machine.handshake(PEER, "second try")
        self.assertEqual(node.sent(), [("direct", PEER, REQUEST), request(ME, PEER, "second try")])
        self.assertEqual(node.machine.outgoing(), [OutgoingRequest(PEER, "second try", T0)])

    def test_handshake_trusted_peer_asks_without_recording(self) -> None:
        node = Node(store=trusted_store())
        node.machine.handshake(PEER, "again")
        self.assertEqual(node.sent(), [("direct", PEER, REQUEST), request(ME, PEER, "again")])
        self.assertEqual(node.machine.status(PEER), TRUSTED)
        self.assertEqual(node.saved, [])

    def test_bad_arguments(self) -> None:
        node = Node()
        for peer in (ME, 0, -1, 1 << 32, True, "2", None):
            self.assertRaises(InvalidArgument, node.machine.handshake, peer, "x")
        self.assertRaises(InvalidArgument, node.machine.handshake, PEER, "x" * 1025)
        self.assertRaises(InvalidArgument, node.machine.handshake, PEER, "\U0001F600" * 1024)  # > 4096 bytes
        self.assertRaises(InvalidArgument, node.machine.handshake, PEER, None)
        self.assertRaises(InvalidArgument, node.machine.reject, PEER, "x" * 1025)
        for call in (node.machine.approve, node.machine.untrust):
            self.assertRaises(InvalidArgument, call, ME)
        self.assertEqual(node.events, [])
        self.assertEqual(node.machine.status(PEER), UNKNOWN)


class AnswerTests(SynchronousTestCase):
    def test_relayed_accept(self) -> None:
        node = Node(store=requested_store())
        node.machine.relayed_response(PEER, True, T0)
        self.assertEqual(node.machine.status(PEER), TRUSTED)
        self.assertEqual(node.machine.trusted(), [TrustedPeer(PEER, THEM.public_key, T0, True)])
        self.assertEqual(node.machine.outgoing(), [])
        self.assertEqual(node.sent(), [report(ME, PEER)])
        self.assertIn(("lookup", PEER), node.events)
        self.assertEqual(node.saved[-1]["trusted"][0]["public_key"], b64encode(THEM.public_key))

    def test_relayed_accept_key_lookup_fails(self) -> None:
        """The entry stays keyless; the first verified key is pinned later."""
        node = Node(store=requested_store(), keys={})
        node.machine.relayed_response(PEER, True, T0)
        self.assertEqual(node.machine.trusted(), [TrustedPeer(PEER, b"", T0, True)])
        self.assertTrue(node.machine.is_trusted(PEER, THEM.public_key))
        self.assertFalse(node.machine.is_trusted(PEER, STRANGER.public_key))

    def test_duplicate_relayed_responses_idempotent(self) -> None:
        """The reference answers twice (``docs/reference-wire.md`` §9 item 14): the second does nothing."""
        node = Node(store=requested_store())
        node.machine.relayed_response(PEER, True, T0)
        node.clear()
        node.clock.advance(5)
        node.machine.relayed_response(PEER, True, T0)
        self.assertEqual(node.events, [])
        self.assertEqual(node.saved, [])
        self.assertEqual(node.machine.trusted()[0].approved_at, T0)

    def test_relayed_reject(self) -> None:
        node = Node(store=requested_store())
        node.machine.relayed_response(PEER, False, T0)
        self.assertEqual(node.machine.status(PEER), UNKNOWN)
        self.assertEqual(node.sent(), [])
        self.assertEqual(node.saved[-1], {"trusted": []})

    def test_direct_accept(self) -> None:
        node = Node(store=requested_store())
        node.receive(ACCEPT)
        self.assertEqual(node.machine.trusted(), [TrustedPeer(PEER, THEM.public_key, T0, True)])
        self.assertEqual(node.sent(), [report(ME, PEER)])

    def test_direct_reject(self) -> None:
        node = Node(store=requested_store())
        node.receive(REJECT, reason="no thanks")
        self.assertEqual(node.machine.status(PEER), UNKNOWN)
        self.assertEqual(node.sent(), [])

    def test_accept_without_request_ignored(self) -> None:
        """Facts §9 item 12: the reference trusts anyone who sends an accept."""
        for store in (TrustStore(), pending_store()):
            node = Node(store=store)
            before = node.store.to_json()
            node.machine.relayed_response(PEER, True, T0)
            node.receive(ACCEPT)
            self.assertEqual(node.store.to_json(), before)
            self.assertEqual(node.sent(), [])
            self.assertEqual(node.saved, [])
            self.assertEqual(len([line for line in node.log_text() if "we sent no request" in line]), 2)

    def test_reject_without_request_ignored(self) -> None:
        for store in (TrustStore(), pending_store(), trusted_store()):
            node = Node(store=store)
            before = node.store.to_json()
            node.machine.relayed_response(PEER, False, T0)
            node.receive(REJECT)
            self.assertEqual(node.store.to_json(), before)
            self.assertEqual(node.sent(), [])


class IncomingTests(SynchronousTestCase):
    def test_relayed_request_pending(self) -> None:
        node = Node()
        node.machine.relayed_request(PEER, "please", T0 - 20)
        self.assertEqual(node.machine.pending(), [PendingRequest(PEER, b"", "please", T0)])
        self.assertEqual(node.sent(), [])
        self.assertEqual(node.saved[-1]["pending"], [{"node_id": PEER, "justification": "please",
                                                      "received_at": "2026-11-21T22:43:20Z"}])

    def test_direct_request_pending_with_registry_key(self) -> None:
        node = Node()
        node.receive(REQUEST, justification="please")
        self.assertEqual(node.machine.pending(), [PendingRequest(PEER, THEM.public_key, "please", T0)])
        self.assertEqual(node.sent(), [])

    def test_repeated_request_keeps_first_time(self) -> None:
        node = Node()
        node.machine.relayed_request(PEER, "please", T0)
        node.clock.advance(10)
        node.receive(REQUEST, justification="")
        self.assertEqual(node.machine.pending(), [PendingRequest(PEER, THEM.public_key, "please", T0)])
        node.clear()
        node.machine.relayed_request(PEER, "please", T0)
        self.assertEqual(node.saved, [])

    def test_request_from_trusted_answered(self) -> None:
        node = Node(store=trusted_store())
        node.machine.relayed_request(PEER, "again?", T0)
        self.assertEqual(node.sent(), [respond(ME, PEER, True), ("direct", PEER, ACCEPT)])
        self.assertEqual(node.machine.status(PEER), TRUSTED)
        self.assertEqual(node.saved, [])

    def test_request_from_trusted_fills_key(self) -> None:
        node = Node(store=trusted_store(key=b""))
        node.receive(REQUEST)
        self.assertEqual(node.machine.trusted()[0].public_key, THEM.public_key)
        self.assertEqual(node.sent(), [respond(ME, PEER, True), ("direct", PEER, ACCEPT)])

    def test_crossing_relayed_request(self) -> None:
        node = Node(store=requested_store())
        node.machine.relayed_request(PEER, "you too", T0)
        self.assertEqual(node.machine.trusted(), [TrustedPeer(PEER, THEM.public_key, T0, True)])
        self.assertEqual(node.machine.outgoing(), [])
        self.assertEqual(node.sent(), [report(ME, PEER), respond(ME, PEER, True), ("direct", PEER, ACCEPT)])

    def test_crossing_direct_request(self) -> None:
        node = Node(store=requested_store())
        node.receive(REQUEST)
        self.assertEqual(node.machine.trusted(), [TrustedPeer(PEER, THEM.public_key, T0, True)])
        self.assertEqual(node.sent(), [report(ME, PEER), respond(ME, PEER, True), ("direct", PEER, ACCEPT)])

    def test_handshake_to_who_asked_approves(self) -> None:
        node = Node(store=pending_store(THEM.public_key))
        node.machine.handshake(PEER, "sure")
        self.assertEqual(node.machine.trusted(), [TrustedPeer(PEER, THEM.public_key, T0, True)])
        self.assertEqual(node.machine.pending(), [])
        self.assertEqual(node.sent(), [report(ME, PEER), respond(ME, PEER, True), ("direct", PEER, ACCEPT)])

    def test_pending_cap(self) -> None:
        store = TrustStore(pending={n: PendingRequest(n, b"", "", T0) for n in range(100, 100 + MAX_PENDING)})
        node = Node(store=store)
        node.machine.relayed_request(PEER, "me too", T0)
        self.assertEqual(node.machine.status(PEER), UNKNOWN)
        self.assertTrue(any("requests are pending" in line for line in node.log_text()))
        node.store.outgoing[PEER] = OutgoingRequest(PEER, "", T0)  # a crossing request still counts
        node.machine.relayed_request(PEER, "me too", T0)
        self.assertEqual(node.machine.status(PEER), TRUSTED)

    def test_long_justification_truncated(self) -> None:
        node = Node()
        node.machine.relayed_request(PEER, "x" * 5000, T0)
        self.assertEqual(len(node.machine.pending()[0].justification), 1024)

    def test_bad_relayed_values_dropped(self) -> None:
        node = Node()
        node.machine.relayed_request(ME, "me", T0)
        node.machine.relayed_request(0, "zero", T0)
        node.machine.relayed_request("2", "text", T0)  # type: ignore[arg-type]
        node.machine.relayed_request(PEER, None, T0)  # type: ignore[arg-type]
        node.machine.relayed_response(True, True, T0)  # type: ignore[arg-type]
        node.machine.relayed_response(PEER, "yes", T0)  # type: ignore[arg-type]
        node.machine.trust_revoked_event(-5)
        self.assertEqual((node.store.to_json(), node.events), ({"trusted": []}, []))


class ApprovalTests(SynchronousTestCase):
    def test_approve(self) -> None:
        node = Node(store=pending_store())
        node.machine.approve(PEER)
        self.assertEqual(node.machine.trusted(), [TrustedPeer(PEER, THEM.public_key, T0, True)])
        self.assertEqual(node.machine.pending(), [])
        self.assertEqual(node.sent(), [report(ME, PEER), respond(ME, PEER, True), ("direct", PEER, ACCEPT)])
        self.assertTrue(node.direct()[0].verifies(PEER, US.public_key))

    def test_approve_in_order_one_response(self) -> None:
        """
        report_trust, then respond_handshake once, then the direct accept once
        the registry has answered (the reference's race, ``docs/reference-wire.md`` §9 item 14);
        a failed direct accept sends no second respond_handshake.
        """
        answers: dict[str, Deferred[Any]] = {}

        def registry(msg: dict[str, Any]) -> Deferred[Any]:
            answers[msg["type"]] = Deferred()
            return answers[msg["type"]]

        node = Node(store=pending_store(THEM.public_key), registry_result=registry,
                    direct_result=lambda: fail(ConnectionFailed("unreachable")))
        node.machine.approve(PEER)
        self.assertEqual(node.sent(), [report(ME, PEER)])
        self.assertEqual(node.machine.status(PEER), TRUSTED)  # state changes at once
        answers["report_trust"].errback(RegistryUnavailable("lost"))
        self.assertEqual(node.sent(), [report(ME, PEER), respond(ME, PEER, True)])
        answers["respond_handshake"].callback({})
        self.assertEqual(node.sent(), [report(ME, PEER), respond(ME, PEER, True), ("direct", PEER, ACCEPT)])
        node.clock.advance(60)
        self.assertEqual(len(node.sent()), 3)

    def test_approve_nothing(self) -> None:
        for store in (TrustStore(), requested_store()):
            node = Node(store=store)
            self.assertRaises(NotFound, node.machine.approve, PEER)
            self.assertEqual(node.events, [])

    def test_approve_trusted_is_a_no_op(self) -> None:
        node = Node(store=trusted_store())
        node.machine.approve(PEER)
        self.assertEqual((node.events, node.saved), ([], []))

    def test_reject(self) -> None:
        node = Node(store=pending_store())
        node.machine.reject(PEER, "who are you")
        self.assertEqual(node.machine.status(PEER), UNKNOWN)
        self.assertEqual(node.sent(), [respond(ME, PEER, False), ("direct", PEER, REJECT)])
        self.assertEqual(node.direct()[0].reason, "who are you")
        self.assertEqual(node.saved[-1], {"trusted": []})

    def test_reject_nothing(self) -> None:
        for store in (TrustStore(), requested_store(), trusted_store()):
            node = Node(store=store)
            self.assertRaises(NotFound, node.machine.reject, PEER, "")
            self.assertEqual(node.events, [])

    def test_untrust(self) -> None:
        node = Node(store=trusted_store())
        node.machine.untrust(PEER)
        self.assertEqual(node.machine.status(PEER), UNKNOWN)
        self.assertEqual(node.sent(), [("direct", PEER, REVOKE), revoke(ME, PEER)])
        self.assertEqual(node.direct()[0].reason, "trust revoked")
        self.assertIn(("ended", PEER), node.events)
        self.assertEqual(node.saved[-1], {"trusted": []})

    def test_untrust_registry_down_warns(self) -> None:
        node = Node(store=trusted_store(), registry_result=lambda msg: fail(RegistryUnavailable("down")))
        node.machine.untrust(PEER)
        self.assertEqual(node.machine.status(PEER), UNKNOWN)
        [warning] = [e for e in node.logged if e["log_level"] >= LogLevel.warn]
        self.assertIn("revoke_trust for node 2 failed: down", formatEvent(warning))

    def test_untrust_registry_has_no_pair_is_quiet(self) -> None:
        """The peer's own revoke_trust (or a pushed event) may already have removed it."""
        node = Node(store=trusted_store(), registry_result=lambda msg: fail(NotFound("no trust")))
        node.machine.untrust(PEER)
        self.assertEqual([e for e in node.logged if e["log_level"] >= LogLevel.warn], [])

    def test_untrust_withdraws_request(self) -> None:
        node = Node(store=requested_store())
        node.machine.untrust(PEER)
        self.assertEqual(node.machine.status(PEER), UNKNOWN)
        self.assertEqual(node.sent(), [])
        node.machine.relayed_response(PEER, True, T0)  # a late accept is now ignored
        self.assertEqual(node.machine.status(PEER), UNKNOWN)

    def test_untrust_nothing(self) -> None:
        for store in (TrustStore(), pending_store()):
            node = Node(store=store)
            self.assertRaises(NotFound, node.machine.untrust, PEER)
            self.assertEqual(node.events, [])


class RevokeTests(SynchronousTestCase):
    def test_direct_revoke(self) -> None:
        node = Node(store=trusted_store())
        node.receive(REVOKE, reason="trust revoked")
        self.assertEqual(node.machine.status(PEER), UNKNOWN)
        self.assertEqual(node.sent(), [revoke(ME, PEER)])
        self.assertIn(("ended", PEER), node.events)

    def test_pushed_revoke_event(self) -> None:
        node = Node(store=trusted_store())
        node.machine.trust_revoked_event(PEER)
        self.assertEqual(node.machine.status(PEER), UNKNOWN)
        self.assertEqual(node.sent(), [])
        self.assertIn(("ended", PEER), node.events)

    def test_revoke_withdraws_pending_and_outgoing(self) -> None:
        for store in (pending_store(), requested_store()):
            node = Node(store=store)
            node.receive(REVOKE)
            self.assertEqual(node.machine.status(PEER), UNKNOWN)
            self.assertEqual(node.sent(), [])
            self.assertNotIn(("ended", PEER), node.events)

    def test_revoke_unknown_ignored(self) -> None:
        node = Node()
        node.machine.trust_revoked_event(PEER)
        node.receive(REVOKE)
        self.assertEqual(node.sent(), [])
        self.assertEqual(node.saved, [])


class PinTests(SynchronousTestCase):
    def test_pinned(self) -> None:
        node = Node(store=trusted_store())
        self.assertTrue(node.machine.is_trusted(PEER, THEM.public_key))
        self.assertEqual(node.logged, [])

    def test_mismatch_refused_and_logged(self) -> None:
        node = Node(store=trusted_store())
        self.assertFalse(node.machine.is_trusted(PEER, STRANGER.public_key))
        self.assertTrue(any("other than the pinned" in line for line in node.log_text()))
        self.assertEqual(node.machine.trusted()[0].public_key, THEM.public_key)

    def test_empty_key_filled_then_pinned(self) -> None:
        node = Node(store=trusted_store(key=b""))
        self.assertTrue(node.machine.is_trusted(PEER, THEM.public_key))
        self.assertEqual(node.saved[-1]["trusted"][0]["public_key"], b64encode(THEM.public_key))
        self.assertFalse(node.machine.is_trusted(PEER, STRANGER.public_key))
        self.assertTrue(node.machine.is_trusted(PEER, THEM.public_key))

    def test_not_trusted(self) -> None:
        for store in (TrustStore(), pending_store(THEM.public_key), requested_store()):
            node = Node(store=store)
            self.assertFalse(node.machine.is_trusted(PEER, THEM.public_key))

    def test_bad_key_never_pinned(self) -> None:
        node = Node(store=trusted_store(key=b""))
        for key in (b"", b"short", None, "text" * 8):
            self.assertFalse(node.machine.is_trusted(PEER, key))  # type: ignore[arg-type]
        self.assertEqual(node.machine.trusted()[0].public_key, b"")

    def test_direct_message_with_other_registry_key(self) -> None:
        """The registry now holds another key for a pinned peer: its messages are refused."""
        node = Node(store=trusted_store())
        node.keys[PEER] = STRANGER.public_key
        node.receive(REVOKE, identity=STRANGER)
        node.receive(REQUEST, identity=STRANGER)
        self.assertEqual(node.machine.status(PEER), TRUSTED)
        self.assertEqual(node.sent(), [])
        self.assertEqual(len([line for line in node.log_text() if "other than the pinned" in line]), 2)


class DirectMessageTests(SynchronousTestCase):
    def assertDropped(self, node: Node, why: str) -> None:
        self.assertEqual(node.machine.status(PEER), UNKNOWN if PEER not in node.store.trusted else TRUSTED)
        self.assertEqual(node.sent(), [])
        self.assertTrue(any("dropped" in line and why in line for line in node.log_text()),
                        node.log_text())

    def test_replayed(self) -> None:
        node = Node(store=trusted_store())
        message = node.receive(REVOKE)
        self.assertEqual(node.machine.status(PEER), UNKNOWN)
        node.store.trusted[PEER] = TrustedPeer(PEER, THEM.public_key, T0, True)  # trusted again
        node.clear()
        node.clock.advance(1)
        node.deliver(PEER, message)
        self.assertDropped(node, "replay")
        self.assertNotIn(("lookup", PEER), node.events)

    def test_replay_of_a_request(self) -> None:
        node = Node()
        message = node.receive(REQUEST, justification="hi")
        node.machine.reject(PEER, "")
        node.clear()
        node.deliver(PEER, message)
        self.assertDropped(node, "replay")
        self.assertEqual(node.machine.pending(), [])

    def test_stale(self) -> None:
        node = Node()
        node.deliver(PEER, node.message(REQUEST, ts=T0 - MAX_AGE - 1))
        self.assertDropped(node, "stale")
        node.deliver(PEER, node.message(REQUEST, ts=T0 - MAX_AGE))
        self.assertEqual(node.machine.status(PEER), PENDING)

    def test_from_the_future(self) -> None:
        node = Node()
        node.deliver(PEER, node.message(REQUEST, ts=T0 + MAX_AHEAD + 1))
        self.assertDropped(node, "ahead")
        node.deliver(PEER, node.message(REQUEST, ts=T0 + MAX_AHEAD))
        self.assertEqual(node.machine.status(PEER), PENDING)

    def test_forged_signature(self) -> None:
        node = Node(store=requested_store())
        forged = node.message(ACCEPT, identity=STRANGER)
        forged = attr.evolve(forged, public_key=THEM.public_key)
        node.deliver(PEER, forged)
        self.assertEqual(node.machine.status(PEER), REQUESTED)
        self.assertTrue(any("signature does not verify" in line for line in node.log_text()))
        node.receive(ACCEPT)  # the genuine one still counts
        self.assertEqual(node.machine.status(PEER), TRUSTED)

    def test_key_in_message_is_not_used(self) -> None:
        """Facts §9 item 12: the reference verifies with the key the message carries."""
        node = Node(store=trusted_store())
        node.receive(REVOKE, identity=STRANGER)  # signed by, and carrying, another key
        self.assertEqual(node.machine.status(PEER), TRUSTED)
        self.assertTrue(any("key the registry does not hold" in line for line in node.log_text()))

    def test_keyless_message_verified_with_registry_key(self) -> None:
        node = Node()
        node.deliver(PEER, attr.evolve(node.message(REQUEST), public_key=b""))
        self.assertEqual(node.machine.pending()[0].public_key, THEM.public_key)

    def test_unsigned(self) -> None:
        node = Node(store=requested_store())
        node.deliver(PEER, HandshakeMessage(ACCEPT, PEER, b"", "", b"", "", int(T0)))
        self.assertEqual(node.machine.status(PEER), REQUESTED)
        self.assertTrue(any("signature does not verify" in line for line in node.log_text()))

    def test_signature_for_another_receiver(self) -> None:
        node = Node(store=requested_store())
        node.deliver(PEER, node.message(ACCEPT, to=OTHER))
        self.assertEqual(node.machine.status(PEER), REQUESTED)

    def test_claims_another_sender(self) -> None:
        node = Node(store=requested_store())
        node.deliver(OTHER, node.message(ACCEPT))  # arrived from node 3, names node 2
        self.assertEqual(node.machine.status(PEER), REQUESTED)
        self.assertTrue(any("names node 2" in line for line in node.log_text()))
        self.assertNotIn(("lookup", PEER), node.events)

    def test_from_self_or_zero(self) -> None:
        node = Node()
        node.deliver(ME, node.message(REQUEST, sender=ME, identity=US))
        node.deliver(0, node.message(REQUEST, sender=0))
        self.assertEqual((node.store.to_json(), node.sent()), ({"trusted": []}, []))

    def test_key_lookup_fails(self) -> None:
        node = Node(keys={})
        message = node.message(REQUEST)
        node.deliver(PEER, message)
        self.assertTrue(any("lookup failed" in line for line in node.log_text()))
        self.assertEqual(node.machine.status(PEER), UNKNOWN)
        node.keys[PEER] = THEM.public_key
        node.deliver(PEER, message)  # not remembered as seen, so it counts once the lookup works
        self.assertEqual(node.machine.status(PEER), PENDING)

    def test_registry_key_malformed(self) -> None:
        node = Node()
        node.keys[PEER] = b"bad"
        node.deliver(PEER, node.message(REQUEST))
        self.assertEqual(node.machine.status(PEER), UNKNOWN)
        self.assertTrue(any("no key" in line for line in node.log_text()))


class ReplayFilterTests(SynchronousTestCase):
    def test_remembers_then_forgets(self) -> None:
        f = ReplayFilter(memory=600, entries=10)
        self.assertTrue(f.first_time(b"a", 0))
        self.assertFalse(f.first_time(b"a", 599))
        self.assertTrue(f.first_time(b"a", 600))

    def test_memory_outlasts_acceptance_window(self) -> None:
        self.assertGreater(ReplayFilter().memory, MAX_AGE + MAX_AHEAD)

    def test_bounded(self) -> None:
        f = ReplayFilter(memory=600, entries=3)
        for i in range(10):
            self.assertTrue(f.first_time(bytes([i]), i))
        self.assertEqual(len(f), 3)
        self.assertFalse(f.first_time(bytes([9]), 10))
        self.assertTrue(f.first_time(bytes([0]), 10))

    def test_expired_reaped(self) -> None:
        f = ReplayFilter(memory=10, entries=100)
        for i in range(50):
            f.first_time(bytes([i]), 0)
        f.first_time(b"new", 11)
        self.assertEqual(len(f), 1)

    def test_forget(self) -> None:
        f = ReplayFilter()
        f.first_time(b"a", 0)
        f.forget(b"a")
        f.forget(b"never")
        self.assertTrue(f.first_time(b"a", 1))


class AutoApproveTests(SynchronousTestCase):
    def test_by_public_key_relayed(self) -> None:
        node = Node(rules=AutoApprove(public_keys=(THEM.public_key,)))
        node.machine.relayed_request(PEER, "hi", T0)
        self.assertEqual(node.machine.trusted(), [TrustedPeer(PEER, THEM.public_key, T0, True)])
        self.assertIn(("lookup", PEER), node.events)
        self.assertEqual(node.sent(), [report(ME, PEER), respond(ME, PEER, True), ("direct", PEER, ACCEPT)])
        self.assertTrue(any("auto-approve rule public key" in line for line in node.log_text()))

    def test_by_public_key_direct(self) -> None:
        node = Node(rules=AutoApprove(public_keys=(THEM.public_key,)))
        node.receive(REQUEST)
        self.assertEqual(node.machine.status(PEER), TRUSTED)

    def test_by_hostname_glob(self) -> None:
        node = Node(rules=AutoApprove(hostnames=("build-*",)), infos={PEER: {"hostname": "build-07"}})
        node.machine.relayed_request(PEER, "hi", T0)
        self.assertEqual(node.machine.status(PEER), TRUSTED)
        self.assertIn(("info", PEER), node.events)

    def test_by_tag(self) -> None:
        node = Node(rules=AutoApprove.from_config({"tags": ["#Fleet"]}),
                    infos={PEER: {"hostname": "x", "tags": ["web", "fleet"]}})
        node.receive(REQUEST)
        self.assertEqual(node.machine.status(PEER), TRUSTED)

    def test_no_match_stays_pending(self) -> None:
        node = Node(rules=AutoApprove(hostnames=("build-*",), tags=("fleet",),
                                      public_keys=(STRANGER.public_key,)),
                    infos={PEER: {"hostname": "rebuild-1", "tags": ["web"]}})
        node.machine.relayed_request(PEER, "hi", T0)
        self.assertEqual(node.machine.status(PEER), PENDING)
        self.assertEqual(node.sent(), [])

    def test_info_lookup_fails(self) -> None:
        node = Node(rules=AutoApprove(hostnames=("*",)))
        node.machine.relayed_request(PEER, "hi", T0)
        self.assertEqual(node.machine.status(PEER), PENDING)
        self.assertTrue(any("auto-approve" in line for line in node.log_text()))

    def test_decided_while_looking_up(self) -> None:
        """The operator rejects while the lookup is out: the rule does not resurrect the request."""
        later: Deferred[dict[str, Any]] = Deferred()
        node = Node(rules=AutoApprove(hostnames=("*",)))
        node.machine.peer_info = lambda peer: later
        node.machine.relayed_request(PEER, "hi", T0)
        node.machine.reject(PEER, "no")
        later.callback({"hostname": "anything"})
        self.assertEqual(node.machine.status(PEER), UNKNOWN)

    def test_info_rules_need_peer_info(self) -> None:
        for rules in (AutoApprove(hostnames=("*",)), AutoApprove(tags=("x",))):
            with self.assertRaises(InvalidArgument):
                TrustMachine(ME, US.public_key, US.sign, TrustStore(), lambda: None, lambda p, d: None,
                             lambda m: succeed(None), lambda n: succeed(b""), Clock(), rules=rules)
        TrustMachine(ME, US.public_key, US.sign, TrustStore(), lambda: None, lambda p, d: None,
                     lambda m: succeed(None), lambda n: succeed(b""), Clock(),
                     rules=AutoApprove(public_keys=(THEM.public_key,)))

    def test_no_rules_no_lookups(self) -> None:
        node = Node()
        node.machine.relayed_request(PEER, "hi", T0)
        self.assertEqual([e for e in node.events if e[0] in ("lookup", "info")], [])

    def test_rules(self) -> None:
        rules = AutoApprove(hostnames=("db-?", "web-[ab]"), tags=("fleet",), public_keys=(US.public_key,))
        self.assertEqual(rules.by_info({"hostname": "db-1"}), "hostname db-?")
        self.assertEqual(rules.by_info({"hostname": "web-b"}), "hostname web-[ab]")
        self.assertIsNone(rules.by_info({"hostname": "db-12"}))
        self.assertEqual(rules.by_info({"tags": ["#fleet"]}), "tag fleet")
        self.assertIsNone(rules.by_info({"hostname": 5, "tags": "fleet"}))
        self.assertIsNone(rules.by_info(None))
        self.assertEqual(rules.by_key(US.public_key), "public key")
        self.assertIsNone(rules.by_key(b""))
        self.assertFalse(AutoApprove())

    def test_from_config(self) -> None:
        rules = AutoApprove.from_config({"hostnames": ["Build-*"], "tags": ["#ci"],
                                         "public_keys": [b64encode(THEM.public_key)]})
        self.assertEqual(rules, AutoApprove(("build-*",), (THEM.public_key,), ("ci",)))
        self.assertEqual(AutoApprove.from_config(None), AutoApprove())
        bad: Any
        for bad in ([], {"hostname": ["x"]}, {"hostnames": "x"}, {"tags": [1]},
                    {"public_keys": ["not base64"]}, {"public_keys": [b64encode(b"short")]}):
            self.assertRaises(InvalidArgument, AutoApprove.from_config, bad)


class StoreTests(SynchronousTestCase):
    def test_saved_after_each_change(self) -> None:
        node = Node()
        node.machine.relayed_request(PEER, "a", T0)
        node.machine.approve(PEER)
        node.machine.untrust(PEER)
        node.machine.handshake(OTHER, "b")
        # pending; trusted; its key filled from the registry; untrusted; requested
        self.assertEqual([len(s.get("pending", [])) for s in node.saved], [1, 0, 0, 0, 0])
        self.assertEqual([len(s["trusted"]) for s in node.saved], [0, 1, 1, 0, 0])
        self.assertEqual(node.saved[1]["trusted"][0]["public_key"], "")
        self.assertEqual(node.saved[2]["trusted"][0]["public_key"], b64encode(THEM.public_key))
        self.assertEqual(node.saved[-1]["outgoing"][0]["node_id"], OTHER)

    def test_save_failure_logged(self) -> None:
        node = Node(save_error=OSError("disk full"))
        node.machine.relayed_request(PEER, "a", T0)
        self.assertEqual(node.machine.status(PEER), PENDING)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 0)
        self.assertTrue(any("could not save" in line for line in node.log_text()))

    def test_transitions_logged(self) -> None:
        node = Node()
        node.machine.relayed_request(PEER, "a", T0)
        self.assertIn("trust: node 2 unknown -> pending", node.log_text())

    def test_every_input_in_every_state(self) -> None:
        """The table is complete: no input in any state escapes as anything but a PilotError."""
        stores: dict[str, Callable[[], TrustStore]] = {
            UNKNOWN: TrustStore, PENDING: pending_store, REQUESTED: requested_store, TRUSTED: trusted_store}
        inputs: dict[str, Callable[[Node], Any]] = {
            "handshake": lambda n: n.machine.handshake(PEER, "x"),
            "approve": lambda n: n.machine.approve(PEER),
            "reject": lambda n: n.machine.reject(PEER, "x"),
            "untrust": lambda n: n.machine.untrust(PEER),
            "relayed_request": lambda n: n.machine.relayed_request(PEER, "x", T0),
            "relayed_accept": lambda n: n.machine.relayed_response(PEER, True, T0),
            "relayed_reject": lambda n: n.machine.relayed_response(PEER, False, T0),
            "revoked_event": lambda n: n.machine.trust_revoked_event(PEER),
            "direct_request": lambda n: n.receive(REQUEST),
            "direct_accept": lambda n: n.receive(ACCEPT),
            "direct_reject": lambda n: n.receive(REJECT),
            "direct_revoke": lambda n: n.receive(REVOKE),
        }
        for state, make_store in stores.items():
            for name, feed in inputs.items():
                node = Node(store=make_store())
                self.assertEqual(node.machine.status(PEER), state)
                try:
                    feed(node)
                except NotFound:
                    self.assertIn(name, ("approve", "reject", "untrust"))

    def test_table_declares_every_pair(self) -> None:
        """Every (state, input) of the per-peer table is declared; the one harmless input says why."""
        inputs = ["handshake_requested", "approved", "rejected", "untrusted", "request_received",
                  "accept_received", "reject_received", "revoke_received"]
        self.assertEqual(peer_table.undeclared(inputs), [])
        ignored = [row for row in transitions(ignored=True) if row not in transitions()]
        self.assertEqual([(row.state, row.input) for row in ignored], [(TRUSTED, "approved")])
        self.assertEqual(peer_table.reasons[(TRUSTED, "approved")], "approving twice changes nothing")
        moves = {(row.state, row.input, row.next) for row in transitions() if row.state != row.next}
        self.assertIn((REQUESTED, "request_received", TRUSTED), moves)
        self.assertIn((PENDING, "rejected", UNKNOWN), moves)


# --- two nodes ---------------------------------------------------------------------------------

@attr.s(auto_attribs=True, eq=False)
class FakeNetwork:
    """
    A registry relay (with push events and directed trust, as ours) and a
    direct channel that reaches a node only if it trusts the sender (a
    private node's endpoint is released only to nodes it trusts).
    ``latency`` None delivers synchronously (re-entering the machines).
    """

    clock: Clock
    latency: float | None = 0.05
    nodes: dict[int, TrustMachine] = attr.Factory(dict)
    keys: dict[int, bytes] = attr.Factory(dict)
    edges: set[tuple[int, int]] = attr.Factory(set)
    inbox: set[tuple[int, int]] = attr.Factory(set)
    log: list[str] = attr.Factory(list)
    warnings: list[str] = attr.Factory(list)

    def add(self, node_id: int, identity: Identity, store: TrustStore | None = None) -> TrustMachine:
        self.keys[node_id] = identity.public_key
        machine = TrustMachine(
            node_id, identity.public_key, identity.sign, store or TrustStore(), lambda: None,
            lambda peer, data: self.direct(node_id, peer, data),
            lambda msg: self.registry(node_id, msg),
            lambda peer: succeed(self.keys[peer]), self.clock,
            log=Logger(observer=self.observe))
        self.nodes[node_id] = machine
        return machine

    def observe(self, event: dict[str, Any]) -> None:
        self.log.append(formatEvent(event))
        if event["log_level"] >= LogLevel.warn:
            self.warnings.append(formatEvent(event))

    def later(self, f: Callable[..., Any], *args: Any) -> None:
        if self.latency is None:
            f(*args)
        else:
            self.clock.callLater(self.latency, f, *args)

    def direct(self, sender: int, target: int, data: bytes) -> Deferred[None]:
        if (target, sender) not in self.edges:
            return fail(ConnectionFailed(f"node {target} is private and does not trust node {sender}"))
        self.later(self.nodes[target].direct_message_received, sender, decode(data))
        return succeed(None)

    def registry(self, sender: int, msg: dict[str, Any]) -> Deferred[dict[str, Any]]:
        kind = msg["type"]
        now = self.clock.seconds()
        if kind == "request_handshake":
            assert msg["from_node_id"] == sender
            target = msg["to_node_id"]
            self.inbox.add((sender, target))
            self.later(self.nodes[target].relayed_request, sender, msg["justification"], now)
        elif kind == "respond_handshake":
            peer = msg["peer_id"]
            asked = (peer, sender) in self.inbox
            self.inbox.discard((peer, sender))
            if msg["accept"]:
                self.edges.add((sender, peer))
                if asked:
                    self.edges.add((peer, sender))
            self.later(self.nodes[peer].relayed_response, sender, msg["accept"], now)
        elif kind == "report_trust":
            self.edges.add((sender, msg["peer_id"]))
        elif kind == "revoke_trust":
            peer = msg["peer_id"]
            if not {(sender, peer), (peer, sender)} & self.edges:
                return fail(NotFound(f"no trust between {sender} and {peer}"))
            self.edges -= {(sender, peer), (peer, sender)}
            self.later(self.nodes[peer].trust_revoked_event, sender)
        return succeed({"type": kind + "_ok"})

    def settle(self) -> None:
        for _ in range(100):
            self.clock.advance(1)


class TwoNodeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)

    def network(self, latency: float | None = 0.05) -> tuple[FakeNetwork, TrustMachine, TrustMachine]:
        net = FakeNetwork(self.clock, latency)
        return net, net.add(ME, US), net.add(PEER, THEM)

    def assertMutual(self, net: FakeNetwork, a: TrustMachine, b: TrustMachine) -> None:
        self.assertEqual((a.status(PEER), b.status(ME)), (TRUSTED, TRUSTED))
        self.assertEqual(a.trusted()[0].public_key, THEM.public_key)
        self.assertEqual(b.trusted()[0].public_key, US.public_key)
        self.assertTrue(a.trusted()[0].mutual and b.trusted()[0].mutual)
        self.assertEqual((a.outgoing(), a.pending(), b.outgoing(), b.pending()), ([], [], [], []))
        self.assertEqual(net.edges, {(ME, PEER), (PEER, ME)})
        self.assertTrue(a.is_trusted(PEER, THEM.public_key) and b.is_trusted(ME, US.public_key))

    def test_request_then_approve(self) -> None:
        for latency in (0.05, None):
            self.clock = Clock()
            self.clock.advance(T0)
            net, a, b = self.network(latency)
            a.handshake(PEER, "let me in")
            net.settle()
            self.assertEqual((a.status(PEER), b.status(ME)), (REQUESTED, PENDING))
            self.assertEqual(b.pending()[0].justification, "let me in")
            b.approve(ME)
            net.settle()
            self.assertMutual(net, a, b)
            self.assertEqual(net.warnings, [], net.log)

    def test_crossing_requests(self) -> None:
        for latency in (0.05, None):
            self.clock = Clock()
            self.clock.advance(T0)
            net, a, b = self.network(latency)
            a.handshake(PEER, "you?")
            b.handshake(ME, "and you?")
            net.settle()
            self.assertMutual(net, a, b)

    def test_approve_by_asking_back(self) -> None:
        net, a, b = self.network()
        a.handshake(PEER, "you?")
        net.settle()
        b.handshake(ME, "ok")
        net.settle()
        self.assertMutual(net, a, b)

    def test_reject(self) -> None:
        net, a, b = self.network()
        a.handshake(PEER, "let me in")
        net.settle()
        b.reject(ME, "no")
        net.settle()
        self.assertEqual((a.status(PEER), b.status(ME)), (UNKNOWN, UNKNOWN))
        self.assertEqual(net.edges, set())

    def test_untrust(self) -> None:
        for who, latency in (("a", 0.05), ("b", 0.05), ("a", None), ("b", None)):
            self.clock = Clock()
            self.clock.advance(T0)
            net, a, b = self.network(latency)
            a.handshake(PEER, "let me in")
            net.settle()
            b.approve(ME)
            net.settle()
            (a.untrust(PEER) if who == "a" else b.untrust(ME))
            net.settle()
            self.assertEqual((a.status(PEER), b.status(ME)), (UNKNOWN, UNKNOWN))
            self.assertEqual(net.edges, set())
            self.assertEqual(net.warnings, [], net.log)

    def test_forged_accept_from_third_node(self) -> None:
        """A node we asked nothing of cannot make us trust it, direct or relayed."""
        net, a, b = self.network()
        net.add(OTHER, STRANGER)
        net.edges.add((ME, OTHER))  # suppose A's endpoint is known to C
        now = int(self.clock.seconds())
        forged = make_message(ACCEPT, OTHER, ME, STRANGER.public_key, STRANGER.sign, now)
        net.direct(OTHER, ME, forged.encode())
        net.registry(OTHER, {"type": "respond_handshake", "node_id": OTHER, "peer_id": ME, "accept": True})
        net.settle()
        self.assertEqual(a.status(OTHER), UNKNOWN)


# --- the reference's capture -------------------------------------------------------------------

def load_vector(name: str) -> Any:
    return capture.load_vector("go-session-2", name)


def unsigned(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k != "signature"}


class VectorTests(SynchronousTestCase):
    """go-session-2: agent-a (node 1) asks agent-b (node 2), which approves."""

    def setUp(self) -> None:
        transcript = load_vector("transcript.json")
        self.tcp = [e["json"] for e in transcript["tcp"]]
        self.a = Identity.from_json(load_vector("identity-agent-a.json"))
        self.b = Identity.from_json(load_vector("identity-agent-b.json"))

    def test_requester_side(self) -> None:
        clock = Clock()
        clock.advance(1795301000)
        node = Node(node_id=1, identity=self.a, clock=clock, keys={2: self.b.public_key},
                    direct_result=lambda: fail(ConnectionFailed("resolve refused")))
        node.machine.handshake(2, "vector capture")
        [captured] = [m for m in self.tcp if m.get("type") == "request_handshake"]
        self.assertEqual(node.sent()[1], unsigned(captured))
        self.assertEqual(b64encode(node.direct()[0].signature), captured["signature"])
        clock.advance(57)  # approved_at in the vector: 2026-11-21T22:44:17Z
        [poll] = [m for m in self.tcp if m.get("type") == "poll_handshakes_ok" and m["responses"]]
        for response in poll["responses"]:  # the reference's two identical responses
            node.machine.relayed_response(response["from_node_id"], response["accept"], response["timestamp"])
        self.assertEqual(node.store.to_json(), load_vector("trust-store.json"))
        self.assertEqual(node.sent()[2:], [report(1, 2)])

    def test_approver_side(self) -> None:
        node = Node(node_id=2, identity=self.b, keys={1: self.a.public_key})
        [poll] = [m for m in self.tcp if m.get("type") == "poll_handshakes_ok" and m["requests"]]
        for r in poll["requests"]:
            node.machine.relayed_request(r["from_node_id"], r["justification"], r["timestamp"])
        self.assertEqual(node.machine.status(1), PENDING)
        node.machine.approve(1)
        captured = [unsigned(m) for m in self.tcp if m.get("type") in ("report_trust", "respond_handshake")]
        self.assertEqual(captured[:2], [node.sent()[0], node.sent()[1]])
        self.assertEqual(len(captured), 3)  # the reference sent respond_handshake twice; we send it once
        self.assertEqual(node.sent()[2:], [("direct", 1, ACCEPT)])
        self.assertEqual(b64encode(self.b.sign(challenge(2, 1))),
                         b64encode(node.direct()[0].signature))
