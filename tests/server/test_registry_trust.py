"""
Tests for L{pilot.server.registry}, the trust side: signatures (the
reference's and our replay-proof ``auth``), proven keys, directed trust and
visibility, the handshake relay, and the event pushes.
"""

from __future__ import annotations

import json
from typing import Any

from pilot.address import Address
from pilot.errors import ErrorCode
from pilot.identity import b64encode
from pilot.server.handshakes import MAX_INBOX, MAX_RESPONSES
from pilot.server.registry import Peer, RegistryConfig
from pilot.server.state import Node, RegistryState

from tests.server.test_registry import (
    NO_LIMITS, OTHER_PEER, PEER, T0, Recorder, RegistryTestCase, World, ident, rotation,
)

CAROL_PEER = Peer("192.0.2.99", 30003)


class Trio(RegistryTestCase):
    """alice (a), bob (b) and carol (c), all private, nobody trusting anybody."""

    config: RegistryConfig | None = None

    def setUp(self) -> None:
        self.world = World(self.config)
        self.alice, self.bob, self.carol = ident(1), ident(2), ident(3)
        self.a = self.world.join(self.alice, PEER, listen="0.0.0.0:4001")
        self.b = self.world.join(self.bob, OTHER_PEER, listen="0.0.0.0:4002")
        self.c = self.world.join(self.carol, CAROL_PEER, listen="0.0.0.0:4003")

    def legacy(self, who: Any, msg: dict[str, Any], peer: Peer = PEER, session: Any = None) -> dict[str, Any]:
        return self.world.send(self.world.legacy(who, msg), peer, session)

    def authed(self, who: Any, msg: dict[str, Any], peer: Peer = PEER, session: Any = None,
               **kw: Any) -> dict[str, Any]:
        return self.world.send(self.world.authed(who, msg, **kw), peer, session)

    def resolve(self, who: Any, requester: int, target: int) -> dict[str, Any]:
        return self.legacy(who, {"type": "resolve", "requester_id": requester, "node_id": target})

    def trust(self, who: Any, truster: int, trustee: int) -> None:
        self.assertOk(self.legacy(who, {"type": "report_trust", "node_id": truster, "peer_id": trustee}),
                      "report_trust")

    def prove(self, who: Any, node_id: int) -> None:
        self.assertOk(self.authed(who, {"type": "heartbeat", "node_id": node_id}), "heartbeat")
        self.assertIn(node_id, self.world.registry.state.proven)


# --- signatures ------------------------------------------------------------------------------

class LegacySignatureTests(Trio):
    def test_accepted_for_unproven_node(self) -> None:
        self.assertOk(self.legacy(self.alice, {"type": "heartbeat", "node_id": self.a}), "heartbeat")
        self.assertNotIn(self.a, self.world.registry.state.proven)

    def test_replayable_for_unproven_node(self) -> None:
        # the reference's rule, kept for nodes that never proved their key (docs/reference-wire.md §9 item 3)
        msg = self.world.legacy(self.alice, {"type": "heartbeat", "node_id": self.a})
        for _ in range(3):
            self.world.advance(30)
            self.assertOk(self.world.send(msg), "heartbeat")

    def test_wrong_key(self) -> None:
        reply = self.legacy(self.bob, {"type": "set_visibility", "node_id": self.a, "public": True})
        self.assertError(reply, ErrorCode.unauthorized)
        self.assertFalse(self.world.node(self.a).public)

    def test_missing(self) -> None:
        for kind in ("set_hostname", "set_visibility", "set_tags", "set_task_exec", "heartbeat", "deregister",
                     "poll_handshakes"):
            reply = self.world.send({"type": kind, "node_id": self.a, "hostname": "x", "public": True,
                                     "tags": [], "enabled": True})
            self.assertError(reply, ErrorCode.unauthorized)
        self.assertIn(self.a, self.world.registry.state.nodes)

    def test_garbage(self) -> None:
        good = self.alice.sign_b64(f"heartbeat:{self.a}".encode())
        urlsafe = good.replace("+", "-").replace("/", "_")
        self.assertNotEqual(urlsafe, good)
        for sig in ("", "!!!", "AAAA", good[:-2], good + "=", " " + good, urlsafe, 5, None, [good],
                    {"sig": good}, b64encode(b"\x00" * 64),
                    self.alice.sign_b64(f"heartbeat:{self.b}".encode()),
                    self.alice.sign_b64(f"heartbeat:{self.a}:x".encode())):
            reply = self.world.send({"type": "heartbeat", "node_id": self.a, "signature": sig})
            self.assertError(reply, ErrorCode.unauthorized)

    def test_signed_for_another_node(self) -> None:
        # alice's own valid signature over bob's challenge is not bob's
        reply = self.legacy(self.alice, {"type": "deregister", "node_id": self.b})
        self.assertError(reply, ErrorCode.unauthorized)
        self.assertIn(self.b, self.world.registry.state.nodes)


class AuthTests(Trio):
    def test_accepted_and_proves_the_key(self) -> None:
        changes = self.world.changes
        self.assertOk(self.authed(self.alice, {"type": "heartbeat", "node_id": self.a}), "heartbeat")
        self.assertEqual(self.world.registry.state.proven, {self.a})
        self.assertEqual(self.world.changes, changes + 1)  # proven is persisted

    def test_both_forms_together(self) -> None:
        reply = self.authed(self.alice, {"type": "set_hostname", "node_id": self.a, "hostname": "alice"},
                            legacy=True)
        self.assertOk(reply, "set_hostname")
        self.assertIn(self.a, self.world.registry.state.proven)

    def test_register_with_auth_proves_new_key(self) -> None:
        dave = ident(4)
        reply = self.world.register(dave, auth=True)
        self.assertOk(reply, "register")
        self.assertIn(reply["node_id"], self.world.registry.state.proven)

    def test_legacy_refused_once_proven(self) -> None:
        captured = self.world.legacy(self.alice, {"type": "set_visibility", "node_id": self.a,
                                                  "public": True})
        self.prove(self.alice, self.a)
        self.assertError(self.world.send(captured), ErrorCode.unauthorized)
        self.assertError(self.legacy(self.alice, {"type": "heartbeat", "node_id": self.a}),
                         ErrorCode.unauthorized)
        self.assertFalse(self.world.node(self.a).public)

    def test_unsigned_register_cannot_move_a_proven_endpoint(self) -> None:
        self.prove(self.alice, self.a)
        before = self.world.node(self.a).real_addr
        reply = self.world.register(self.alice, Peer("203.0.113.66", 6666), listen="0.0.0.0:6666")
        self.assertError(reply, ErrorCode.unauthorized)
        self.assertEqual(self.world.node(self.a).real_addr, before)
        # even after the node has gone away (its id and proof stay with the key)
        self.assertOk(self.authed(self.alice, {"type": "deregister", "node_id": self.a}), "deregister")
        reply = self.world.register(self.alice, Peer("203.0.113.66", 6666), listen="0.0.0.0:6666")
        self.assertError(reply, ErrorCode.unauthorized)
        self.assertNotIn(self.a, self.world.registry.state.nodes)

    def test_unsigned_register_moves_an_unproven_endpoint(self) -> None:
        # the reference's rule (docs/reference-wire.md §9 item 2), kept for reference nodes
        self.world.register(self.alice, Peer("203.0.113.66", 6666), listen="0.0.0.0:6666")
        self.assertEqual(self.world.node(self.a).real_addr, "203.0.113.66:6666")

    def test_signed_register_moves_a_proven_endpoint(self) -> None:
        self.prove(self.alice, self.a)
        reply = self.world.register(self.alice, Peer("203.0.113.77", 7777), listen="0.0.0.0:7777", auth=True)
        self.assertOk(reply, "register")
        self.assertEqual(reply["node_id"], self.a)
        self.assertEqual(self.world.node(self.a).real_addr, "203.0.113.77:7777")

    def test_register_signed_by_another_key(self) -> None:
        msg = {"type": "register", "public_key": self.alice.public_key_b64, "listen_addr": "0.0.0.0:6666"}
        reply = self.world.send(self.world.authed(self.carol, msg), Peer("203.0.113.66", 1))
        self.assertError(reply, ErrorCode.unauthorized)
        self.assertEqual(self.world.node(self.a).real_addr, "198.51.100.7:4001")
        self.assertNotIn(self.a, self.world.registry.state.proven)

    def test_register_tampered_after_signing(self) -> None:
        self.prove(self.alice, self.a)
        msg = self.world.authed(self.alice, {"type": "register", "public_key": self.alice.public_key_b64,
                                             "listen_addr": "0.0.0.0:7777"})
        for key, value in (("listen_addr", "0.0.0.0:6666"), ("hostname", "evil"), ("owner", "mallory")):
            reply = self.world.send({**msg, key: value}, Peer("203.0.113.66", 1))
            self.assertError(reply, ErrorCode.unauthorized)
        self.assertEqual(self.world.node(self.a).real_addr, "198.51.100.7:4001")

    def test_replay_refused(self) -> None:
        msg = self.world.authed(self.alice, {"type": "set_visibility", "node_id": self.a, "public": True})
        self.assertOk(self.world.send(msg), "set_visibility")
        self.assertError(self.world.send(msg), ErrorCode.unauthorized)
        self.world.advance(60)
        self.assertError(self.world.send(msg), ErrorCode.unauthorized)
        self.world.advance(600)
        self.assertError(self.world.send(msg), ErrorCode.unauthorized)

    def test_replayed_register_refused(self) -> None:
        msg = self.world.authed(self.alice, {"type": "register", "public_key": self.alice.public_key_b64,
                                             "listen_addr": "0.0.0.0:7777"})
        self.assertOk(self.world.send(msg, Peer("203.0.113.77", 1)), "register")
        self.world.register(self.alice, auth=True)  # back home
        self.assertError(self.world.send(msg, Peer("203.0.113.77", 1)), ErrorCode.unauthorized)
        self.assertEqual(self.world.node(self.a).real_addr, "198.51.100.7:4000")

    def test_time_window(self) -> None:
        for n, offset in enumerate((-121, 121, -3600, 86400)):
            reply = self.authed(self.alice, {"type": "heartbeat", "node_id": self.a}, ts=T0 + offset)
            self.assertError(reply, ErrorCode.unauthorized)
        self.assertNotIn(self.a, self.world.registry.state.proven)
        for offset in (-119, 119, 0):
            self.assertOk(self.authed(self.alice, {"type": "heartbeat", "node_id": self.a}, ts=T0 + offset),
                          "heartbeat")

    def test_time_window_follows_the_clock(self) -> None:
        self.world.advance(10_000)
        self.assertError(self.authed(self.alice, {"type": "heartbeat", "node_id": self.a}, ts=T0),
                         ErrorCode.unauthorized)
        self.assertOk(self.authed(self.alice, {"type": "heartbeat", "node_id": self.a}), "heartbeat")

    def test_configured_skew(self) -> None:
        world = World(RegistryConfig(max_skew=5))
        a = world.join(self.alice)
        late = world.authed(self.alice, {"type": "heartbeat", "node_id": a}, ts=T0 - 6)
        self.assertError(world.send(late), ErrorCode.unauthorized)
        ok = world.authed(self.alice, {"type": "heartbeat", "node_id": a}, ts=T0 - 4)
        self.assertOk(world.send(ok), "heartbeat")

    def test_covers_field_values(self) -> None:
        msg = self.world.authed(self.alice, {"type": "set_hostname", "node_id": self.a, "hostname": "alice"})
        self.assertError(self.world.send({**msg, "hostname": "mallory"}), ErrorCode.unauthorized)
        self.assertEqual(self.world.node(self.a).hostname, "")
        msg = self.world.authed(self.alice, {"type": "set_visibility", "node_id": self.a, "public": False})
        self.assertError(self.world.send({**msg, "public": True}), ErrorCode.unauthorized)
        self.assertFalse(self.world.node(self.a).public)
        msg = self.world.authed(self.alice, {"type": "set_tags", "node_id": self.a, "tags": ["a"]})
        self.assertError(self.world.send({**msg, "tags": ["b"]}), ErrorCode.unauthorized)
        msg = self.world.authed(self.alice, {"type": "respond_handshake", "node_id": self.a,
                                             "peer_id": self.b,
                                             "accept": False})
        self.assertError(self.world.send({**msg, "accept": True}), ErrorCode.unauthorized)
        self.assertEqual(self.world.registry.state.trust, set())
        msg = self.world.authed(self.alice, {"type": "rotate_key", "node_id": self.a,
                                             "new_public_key": ident(8).public_key_b64})
        self.assertError(self.world.send({**msg, "new_public_key": ident(9).public_key_b64}),
                         ErrorCode.unauthorized)
        self.assertEqual(self.world.node(self.a).public_key, self.alice.public_key)

    def test_tampered_request_leaves_nonce_usable(self) -> None:
        msg = self.world.authed(self.alice, {"type": "set_hostname", "node_id": self.a, "hostname": "alice"})
        self.assertError(self.world.send({**msg, "hostname": "mallory"}), ErrorCode.unauthorized)
        self.assertOk(self.world.send(msg), "set_hostname")
        self.assertEqual(self.world.node(self.a).hostname, "alice")

    def test_signed_for_another_node(self) -> None:
        reply = self.authed(self.alice, {"type": "set_visibility", "node_id": self.b, "public": True})
        self.assertError(reply, ErrorCode.unauthorized)
        self.assertNotIn(self.b, self.world.registry.state.proven)
        self.assertNotIn(self.a, self.world.registry.state.proven)

    def test_rotate_key_of_proven_node(self) -> None:
        self.prove(self.alice, self.a)
        new = ident(9)
        reply = self.legacy(self.alice, rotation(self.a, self.alice, new))
        self.assertError(reply, ErrorCode.unauthorized)
        reply = self.authed(self.alice, rotation(self.a, self.alice, new))
        self.assertOk(reply, "rotate_key")
        # the node stays proven: the new key must use 'auth' too
        self.assertError(self.legacy(new, {"type": "heartbeat", "node_id": self.a}), ErrorCode.unauthorized)
        self.assertOk(self.authed(new, {"type": "heartbeat", "node_id": self.a}), "heartbeat")
        self.assertError(self.authed(self.alice, {"type": "heartbeat", "node_id": self.a}),
                         ErrorCode.unauthorized)


class RestartReplayTests(Trio):
    """The nonce memory is lost on restart; the saved ``auth_ts`` keeps replays out."""

    def restarted(self, seconds: float = 15) -> World:
        saved = json.loads(json.dumps(self.world.registry.state.to_json()))
        world = World(self.config, RegistryState.from_json(saved), now=self.world.clock.seconds() + seconds)
        world._nonce = self.world._nonce
        return world

    def test_register_replayed_after_restart(self) -> None:
        msg = self.world.authed(self.alice, {"type": "register", "public_key": self.alice.public_key_b64,
                                             "listen_addr": "0.0.0.0:4001"})
        self.assertOk(self.world.send(msg), "register")
        self.assertEqual(self.world.registry.state.auth_ts[self.a], msg["auth"]["ts"])
        world = self.restarted(15)
        reply = world.send(msg, Peer("203.0.113.66", 6666))
        self.assertError(reply, ErrorCode.unauthorized)
        self.assertIn("restarted", reply["error"])
        self.assertEqual(world.node(self.a).real_addr, "198.51.100.7:4001")
        # the node's own new requests still pass, and become the new floor
        fresh = world.authed(self.alice, {"type": "heartbeat", "node_id": self.a})
        self.assertOk(world.send(fresh), "heartbeat")
        self.assertEqual(world.registry.state.auth_ts[self.a], fresh["auth"]["ts"])

    def test_signed_request_replayed_after_restart(self) -> None:
        msg = self.world.authed(self.alice, {"type": "set_visibility", "node_id": self.a, "public": True})
        self.assertOk(self.world.send(msg), "set_visibility")
        self.assertOk(self.authed(self.alice, {"type": "set_visibility", "node_id": self.a, "public": False}),
                      "set_visibility")
        world = self.restarted(5)
        self.assertError(world.send(msg), ErrorCode.unauthorized)
        self.assertFalse(world.node(self.a).public)

    def test_touch_reported_once_per_newer_request(self) -> None:
        touches: list[None] = []
        self.world.registry.on_touch = lambda: touches.append(None)
        msg = self.world.authed(self.alice, {"type": "heartbeat", "node_id": self.a})
        older = self.world.authed(self.alice, {"type": "heartbeat", "node_id": self.a},
                                  ts=self.world.clock.seconds() - 1)
        self.assertOk(self.world.send(msg), "heartbeat")
        self.assertOk(self.world.send(older), "heartbeat")  # out of order, within the window: fine
        self.assertEqual(len(touches), 1)
        self.assertEqual(self.world.registry.state.auth_ts[self.a], msg["auth"]["ts"])


class PoloScoreAuthTests(Trio):
    def test_unproven_target_unsigned(self) -> None:
        self.assertOk(self.world.send({"type": "update_polo_score", "node_id": self.a, "delta": 2}),
                      "update_polo_score")
        self.assertOk(self.world.send({"type": "set_polo_score", "node_id": self.a, "polo_score": 9}),
                      "set_polo_score")
        self.assertEqual(self.world.node(self.a).polo_score, 9)

    def test_proven_target_needs_signed_request(self) -> None:
        self.prove(self.alice, self.a)
        for msg in ({"type": "update_polo_score", "node_id": self.a, "delta": 2},
                    {"type": "update_polo_score", "node_id": self.a, "delta": 2, "requester_id": self.b},
                    {"type": "set_polo_score", "node_id": self.a, "polo_score": 9, "requester_id": self.b}):
            reply = self.world.send(msg)
            self.assertEqual(reply["type"], "error")
            self.assertIn(reply["code"], ("unauthorized", "invalid_argument"))
        self.assertEqual(self.world.node(self.a).polo_score, 0)
        reply = self.authed(self.bob, {"type": "update_polo_score", "node_id": self.a, "delta": 2,
                                       "requester_id": self.b})
        self.assertEqual(reply["polo_score"], 2)
        # signed by a key that is not the requester's
        reply = self.authed(self.carol, {"type": "update_polo_score", "node_id": self.a, "delta": 2,
                                         "requester_id": self.b})
        self.assertError(reply, ErrorCode.unauthorized)
        # a requester that is not registered
        reply = self.authed(ident(9), {"type": "set_polo_score", "node_id": self.a, "polo_score": 5,
                                       "requester_id": 424242})
        self.assertError(reply, ErrorCode.not_found)
        self.assertEqual(self.world.node(self.a).polo_score, 2)


# --- visibility ------------------------------------------------------------------------------

class VisibilityTests(Trio):
    def test_private_untrusted_denied(self) -> None:
        reply = self.resolve(self.alice, self.a, self.b)
        self.assertError(reply, ErrorCode.not_trusted)
        self.assertNotIn("203.0.113.9", reply["error"])

    def test_target_trusts_requester(self) -> None:
        self.trust(self.bob, self.b, self.a)  # bob trusts alice
        self.assertEqual(self.resolve(self.alice, self.a, self.b),
                         {"type": "resolve_ok", "node_id": self.b, "real_addr": "203.0.113.9:4002"})
        # directed: alice has not said she trusts bob
        self.assertError(self.resolve(self.bob, self.b, self.a), ErrorCode.not_trusted)
        # and carol is nobody's friend
        self.assertError(self.resolve(self.carol, self.c, self.b), ErrorCode.not_trusted)

    def test_requester_alone_cannot_open_the_target(self) -> None:
        # unlike the reference, where either side's report_trust creates the pair
        # (docs/reference-wire.md §2.7)
        self.trust(self.alice, self.a, self.b)  # alice says she trusts bob
        self.assertError(self.resolve(self.alice, self.a, self.b), ErrorCode.not_trusted)
        # it opens alice to bob instead
        self.assertOk(self.resolve(self.bob, self.b, self.a), "resolve")

    def test_mutual(self) -> None:
        self.trust(self.alice, self.a, self.b)
        self.trust(self.bob, self.b, self.a)
        self.assertOk(self.resolve(self.alice, self.a, self.b), "resolve")
        self.assertOk(self.resolve(self.bob, self.b, self.a), "resolve")

    def test_self(self) -> None:
        self.assertEqual(self.resolve(self.alice, self.a, self.a)["real_addr"], "198.51.100.7:4001")

    def test_public(self) -> None:
        self.legacy(self.bob, {"type": "set_visibility", "node_id": self.b, "public": True})
        self.assertOk(self.resolve(self.alice, self.a, self.b), "resolve")
        self.assertOk(self.resolve(self.carol, self.c, self.b), "resolve")
        self.legacy(self.bob, {"type": "set_visibility", "node_id": self.b, "public": False})
        self.assertError(self.resolve(self.alice, self.a, self.b), ErrorCode.not_trusted)

    def test_revoke_closes(self) -> None:
        self.trust(self.bob, self.b, self.a)
        self.assertOk(self.legacy(self.bob, {"type": "revoke_trust", "node_id": self.b, "peer_id": self.a}),
                      "revoke_trust")
        self.assertError(self.resolve(self.alice, self.a, self.b), ErrorCode.not_trusted)

    def test_revoke_by_the_trusted_side(self) -> None:
        self.trust(self.bob, self.b, self.a)
        self.assertOk(self.legacy(self.alice, {"type": "revoke_trust", "node_id": self.a, "peer_id": self.b}),
                      "revoke_trust")
        self.assertError(self.resolve(self.alice, self.a, self.b), ErrorCode.not_trusted)

    def test_requester_must_be_registered(self) -> None:
        self.legacy(self.bob, {"type": "set_visibility", "node_id": self.b, "public": True})
        stranger = ident(9)
        reply = self.world.send(self.world.legacy(stranger, {"type": "resolve", "requester_id": 31337,
                                                             "node_id": self.b}))
        self.assertError(reply, ErrorCode.not_found)

    def test_requester_must_sign(self) -> None:
        self.trust(self.bob, self.b, self.a)
        reply = self.world.send({"type": "resolve", "requester_id": self.a, "node_id": self.b})
        self.assertError(reply, ErrorCode.unauthorized)
        # carol cannot borrow alice's trust by naming alice as requester
        reply = self.legacy(self.carol, {"type": "resolve", "requester_id": self.a, "node_id": self.b})
        self.assertError(reply, ErrorCode.unauthorized)

    def test_lookup_never_shows_private_endpoints(self) -> None:
        self.trust(self.bob, self.b, self.a)
        reply = self.world.send({"type": "lookup", "node_id": self.b})
        self.assertNotIn("real_addr", reply)
        self.assertNotIn("203.0.113.9", str(reply))

    def test_shared_network(self) -> None:
        state = RegistryState()
        for node_id, seed, networks in ((10, 1, [0, 5]), (11, 2, [0, 5]), (12, 3, [0, 6])):
            state.nodes[node_id] = Node(id=node_id, public_key=ident(seed).public_key,
                                        real_addr=f"192.0.2.{node_id}:1", networks=networks)
        state.rebuild_indexes()
        world = World(state=state)
        reply = world.send(world.legacy(ident(1), {"type": "resolve", "requester_id": 10, "node_id": 11}))
        self.assertEqual(reply["real_addr"], "192.0.2.11:1")
        # the backbone (network 0) does not count
        reply = world.send(world.legacy(ident(1), {"type": "resolve", "requester_id": 10, "node_id": 12}))
        self.assertError(reply, ErrorCode.not_trusted)

    def test_punch(self) -> None:
        msg = {"type": "punch", "requester_id": self.a, "node_a": self.a, "node_b": self.b}
        self.assertError(self.legacy(self.alice, msg), ErrorCode.not_trusted)
        self.trust(self.bob, self.b, self.a)
        self.assertEqual(self.legacy(self.alice, msg), {
            "type": "punch_ok", "node_a": self.a, "node_a_addr": "198.51.100.7:4001",
            "node_b": self.b, "node_b_addr": "203.0.113.9:4002"})
        # the other order of the pair
        reply = self.legacy(self.alice, {"type": "punch", "requester_id": self.a, "node_a": self.b,
                                         "node_b": self.a})
        self.assertOk(reply, "punch")
        self.assertEqual(reply["node_a_addr"], "203.0.113.9:4002")

    def test_punch_directed(self) -> None:
        self.trust(self.alice, self.a, self.b)  # alice trusts bob: bob may punch alice, not the reverse
        self.assertError(self.legacy(self.alice, {"type": "punch", "requester_id": self.a, "node_a": self.a,
                                                  "node_b": self.b}), ErrorCode.not_trusted)
        self.assertOk(self.legacy(self.bob, {"type": "punch", "requester_id": self.b, "node_a": self.a,
                                             "node_b": self.b}), "punch")

    def test_punch_requester_must_be_one_of_the_pair(self) -> None:
        self.legacy(self.alice, {"type": "set_visibility", "node_id": self.a, "public": True})
        self.legacy(self.bob, {"type": "set_visibility", "node_id": self.b, "public": True})
        reply = self.legacy(self.carol, {"type": "punch", "requester_id": self.c, "node_a": self.a,
                                         "node_b": self.b})
        self.assertError(reply)
        self.assertNotIn("node_a_addr", reply)

    def test_punch_public(self) -> None:
        self.legacy(self.bob, {"type": "set_visibility", "node_id": self.b, "public": True})
        reply = self.legacy(self.alice, {"type": "punch", "requester_id": self.a, "node_a": self.a,
                                         "node_b": self.b})
        self.assertOk(reply, "punch")

    def test_punch_unknown_node(self) -> None:
        reply = self.legacy(self.alice, {"type": "punch", "requester_id": self.a, "node_a": self.a,
                                         "node_b": 4242})
        self.assertError(reply, ErrorCode.not_found)


# --- the handshake relay -----------------------------------------------------------------------

class HandshakeTests(Trio):
    config = NO_LIMITS

    def request(self, who: Any, sender: int, target: int, why: str = "please") -> dict[str, Any]:
        return self.legacy(who, {"type": "request_handshake", "from_node_id": sender, "to_node_id": target,
                                 "justification": why})

    def poll(self, who: Any, node_id: int) -> dict[str, Any]:
        reply = self.legacy(who, {"type": "poll_handshakes", "node_id": node_id})
        self.assertOk(reply, "poll_handshakes")
        return reply

    def respond(self, who: Any, node_id: int, peer_id: int, accept: bool) -> dict[str, Any]:
        return self.legacy(who, {"type": "respond_handshake", "node_id": node_id, "peer_id": peer_id,
                                 "accept": accept})

    def test_request_and_poll(self) -> None:
        self.world.advance(0.75)
        self.assertEqual(self.request(self.alice, self.a, self.b, "let me in"),
                         {"type": "request_handshake_ok", "status": "delivered"})
        self.world.advance(30)
        reply = self.poll(self.bob, self.b)
        self.assertEqual(reply, {"type": "poll_handshakes_ok", "requests": [
            {"from_node_id": self.a, "justification": "let me in",
             "timestamp": int(T0 + 0.75)}], "responses": []})
        self.assertIsInstance(reply["requests"][0]["timestamp"], int)
        # polling empties the queue
        self.assertEqual(self.poll(self.bob, self.b), {"type": "poll_handshakes_ok", "requests": [],
                                                       "responses": []})
        # a request grants nothing by itself
        self.assertEqual(self.world.registry.state.trust, set())

    def test_repeat_replaces(self) -> None:
        self.request(self.alice, self.a, self.b, "first")
        self.world.advance(5)
        self.assertOk(self.request(self.alice, self.a, self.b, "second"), "request_handshake")
        self.request(self.carol, self.c, self.b, "carol")
        requests = self.poll(self.bob, self.b)["requests"]
        self.assertEqual([(r["from_node_id"], r["justification"]) for r in requests],
                         [(self.a, "second"), (self.c, "carol")])
        self.assertEqual(requests[0]["timestamp"], int(T0 + 5))

    def test_inbox_limit(self) -> None:
        senders = [ident(100 + n) for n in range(MAX_INBOX + 1)]
        ids = [self.world.join(s, Peer(f"10.0.{n >> 8}.{n & 255}", 1)) for n, s in enumerate(senders)]
        self.assertEqual(MAX_INBOX, 100)
        for who, node_id in zip(senders[:MAX_INBOX], ids):
            self.assertOk(self.request(who, node_id, self.b), "request_handshake")
        self.assertError(self.request(senders[-1], ids[-1], self.b), ErrorCode.rate_limited)
        # a pending sender may still update its request
        self.assertOk(self.request(senders[0], ids[0], self.b, "again"), "request_handshake")
        self.assertEqual(len(self.world.registry.state.inbox[self.b]), MAX_INBOX)
        # other targets are unaffected
        self.assertOk(self.request(senders[-1], ids[-1], self.a), "request_handshake")
        # polling makes room
        self.assertEqual(len(self.poll(self.bob, self.b)["requests"]), MAX_INBOX)
        self.assertOk(self.request(senders[-1], ids[-1], self.b), "request_handshake")

    def test_accept_pending_request_creates_both_edges(self) -> None:
        self.request(self.alice, self.a, self.b)
        self.world.advance(2)
        reply = self.respond(self.bob, self.b, self.a, True)
        self.assertEqual(reply, {"type": "respond_handshake_ok", "accept": True, "peer_id": self.a})
        self.assertEqual(self.world.registry.state.trust, {(self.b, self.a), (self.a, self.b)})
        self.assertOk(self.resolve(self.alice, self.a, self.b), "resolve")
        self.assertOk(self.resolve(self.bob, self.b, self.a), "resolve")
        # the answered request has left bob's inbox; alice has the answer
        self.assertEqual(self.poll(self.bob, self.b)["requests"], [])
        self.assertEqual(self.poll(self.alice, self.a)["responses"],
                         [{"from_node_id": self.b, "accept": True, "timestamp": int(T0 + 2)}])

    def test_accept_after_poll_opens_responder_to_requester(self) -> None:
        # the reference daemon's order: poll, then answer (go-session-2)
        self.request(self.alice, self.a, self.b)
        self.poll(self.bob, self.b)
        self.assertOk(self.respond(self.bob, self.b, self.a, True), "respond_handshake")
        self.assertIn((self.b, self.a), self.world.registry.state.trust)
        self.assertOk(self.resolve(self.alice, self.a, self.b), "resolve")
        # the polled request stays the requester's consent: trust is both ways at once,
        # as the reference's undirected pair (a reference requester sends no report_trust)
        self.assertIn((self.a, self.b), self.world.registry.state.trust)
        self.assertOk(self.resolve(self.bob, self.b, self.a), "resolve")
        self.assertEqual(self.world.registry.state.asked, set())

    def test_accept_without_request_is_one_way(self) -> None:
        self.assertOk(self.respond(self.bob, self.b, self.a, True), "respond_handshake")
        self.assertEqual(self.world.registry.state.trust, {(self.b, self.a)})
        self.assertError(self.resolve(self.bob, self.b, self.a), ErrorCode.not_trusted)

    def test_request_by_someone_else_is_not_consent(self) -> None:
        # carol asked bob; bob "accepting" alice must not make alice trust bob
        self.request(self.carol, self.c, self.b)
        self.respond(self.bob, self.b, self.a, True)
        self.assertNotIn((self.a, self.b), self.world.registry.state.trust)
        self.assertEqual(len(self.world.registry.state.inbox[self.b]), 1)

    def test_reject(self) -> None:
        self.request(self.alice, self.a, self.b)
        self.assertEqual(self.respond(self.bob, self.b, self.a, False),
                         {"type": "respond_handshake_ok", "accept": False, "peer_id": self.a})
        self.assertEqual(self.world.registry.state.trust, set())
        self.assertEqual([r["accept"] for r in self.poll(self.alice, self.a)["responses"]], [False])
        self.assertError(self.resolve(self.alice, self.a, self.b), ErrorCode.not_trusted)

    def test_duplicate_response_kept_once(self) -> None:
        self.request(self.alice, self.a, self.b)
        self.respond(self.bob, self.b, self.a, True)
        self.respond(self.bob, self.b, self.a, True)
        self.assertEqual(len(self.poll(self.alice, self.a)["responses"]), 1)

    def test_responses_bounded(self) -> None:
        responders = [ident(300 + n) for n in range(MAX_RESPONSES + 5)]
        for n, who in enumerate(responders):
            node_id = self.world.join(who, Peer(f"10.1.{n >> 8}.{n & 255}", 1))
            self.assertOk(self.respond(who, node_id, self.a, False), "respond_handshake")
        self.assertEqual(len(self.world.registry.state.responses[self.a]), MAX_RESPONSES)
        self.assertEqual(len(self.poll(self.alice, self.a)["responses"]), MAX_RESPONSES)

    def test_refused(self) -> None:
        self.assertError(self.request(self.alice, self.a, 4242), ErrorCode.not_found)
        self.assertError(self.request(self.alice, self.a, self.a), ErrorCode.invalid_argument)
        self.assertError(self.request(self.alice, self.a, self.b, "x" * 100_000))
        self.assertError(self.request(self.bob, self.a, self.b), ErrorCode.unauthorized)
        self.assertError(self.respond(self.bob, self.b, 4242, True), ErrorCode.not_found)
        self.assertError(self.respond(self.bob, self.b, self.b, True), ErrorCode.invalid_argument)
        self.assertError(self.respond(self.alice, self.b, self.a, True), ErrorCode.unauthorized)
        self.assertEqual(self.world.registry.state.trust, set())
        self.assertEqual({k: v for k, v in self.world.registry.state.inbox.items() if v}, {})

    def test_respond_to_deregistered_requester(self) -> None:
        # its key keeps its id, so the answer is still queued for when it returns
        self.request(self.alice, self.a, self.b)
        self.legacy(self.alice, {"type": "deregister", "node_id": self.a})
        self.assertOk(self.respond(self.bob, self.b, self.a, True), "respond_handshake")
        self.world.join(self.alice)
        self.assertEqual(len(self.poll(self.alice, self.a)["responses"]), 1)

    def test_queues_survive_persistence(self) -> None:
        self.request(self.alice, self.a, self.b, "persist me")
        self.respond(self.carol, self.c, self.a, True)
        state = RegistryState.from_json(self.world.registry.state.to_json())
        world = World(NO_LIMITS, state=state)
        reply = world.send(world.legacy(self.bob, {"type": "poll_handshakes", "node_id": self.b}))
        self.assertEqual([(r["from_node_id"], r["justification"]) for r in reply["requests"]],
                         [(self.a, "persist me")])
        reply = world.send(world.legacy(self.alice, {"type": "poll_handshakes", "node_id": self.a}))
        self.assertEqual([(r["from_node_id"], r["accept"]) for r in reply["responses"]], [(self.c, True)])


# --- events ------------------------------------------------------------------------------------

class EventTests(Trio):
    def subscribe(self, who: Any, node_id: int) -> Recorder:
        session = Recorder()
        reply = self.authed(who, {"type": "subscribe_events", "node_id": node_id}, session=session)
        self.assertOk(reply, "subscribe_events")
        return session

    def test_subscribe_reply(self) -> None:
        self.legacy(self.alice, {"type": "request_handshake", "from_node_id": self.a, "to_node_id": self.b,
                                 "justification": "hi"})
        session = Recorder()
        reply = self.authed(self.bob, {"type": "subscribe_events", "node_id": self.b}, session=session)
        self.assertEqual(reply, {"type": "subscribe_events_ok", "node_id": self.b, "pending_requests": 1,
                                 "pending_responses": 0})
        self.assertEqual(session.pushed, [])

    def test_subscribe_needs_auth(self) -> None:
        session = Recorder()
        for msg in ({"type": "subscribe_events", "node_id": self.b},
                    {"type": "subscribe_events", "node_id": self.b,
                     "signature": self.bob.sign_b64(f"subscribe_events:{self.b}".encode())},
                    {"type": "subscribe_events", "node_id": self.b, "auth": None},
                    self.world.authed(self.alice, {"type": "subscribe_events", "node_id": self.b})):
            self.assertError(self.world.send(msg, session=session), ErrorCode.unauthorized)
        self.assertError(self.authed(self.bob, {"type": "subscribe_events", "node_id": 4242},
                                     session=session),
                         ErrorCode.not_found)
        self.assertEqual(self.world.registry.subscribers, {})
        # the events do not reach a refused session
        self.legacy(self.alice, {"type": "request_handshake", "from_node_id": self.a, "to_node_id": self.b})
        self.assertEqual(session.pushed, [])

    def test_subscribe_needs_a_connection(self) -> None:
        reply = self.authed(self.bob, {"type": "subscribe_events", "node_id": self.b}, session=None)
        self.assertError(reply)
        self.assertEqual(self.world.registry.subscribers, {})

    def test_handshake_request_event(self) -> None:
        bob = self.subscribe(self.bob, self.b)
        carol = self.subscribe(self.carol, self.c)
        self.world.advance(3)
        self.legacy(self.alice, {"type": "request_handshake", "from_node_id": self.a, "to_node_id": self.b,
                                 "justification": "hi"})
        self.assertEqual(bob.pushed, [{"type": "event", "event": "handshake_request", "from_node_id": self.a,
                                       "justification": "hi", "timestamp": int(T0 + 3)}])
        self.assertEqual(carol.pushed, [])

    def test_handshake_response_event(self) -> None:
        alice = self.subscribe(self.alice, self.a)
        self.legacy(self.alice, {"type": "request_handshake", "from_node_id": self.a, "to_node_id": self.b})
        self.world.advance(4)
        self.legacy(self.bob, {"type": "respond_handshake", "node_id": self.b, "peer_id": self.a,
                               "accept": True})
        self.assertEqual(alice.events("handshake_response"), [{
            "type": "event", "event": "handshake_response", "from_node_id": self.b, "accept": True,
            "timestamp": int(T0 + 4)}])

    def test_trust_events(self) -> None:
        alice = self.subscribe(self.alice, self.a)
        self.legacy(self.bob, {"type": "report_trust", "node_id": self.b, "peer_id": self.a})
        self.assertEqual(alice.pushed, [{"type": "event", "event": "trust_granted", "node_id": self.b}])
        # reporting again changes nothing and says nothing
        self.legacy(self.bob, {"type": "report_trust", "node_id": self.b, "peer_id": self.a})
        self.assertEqual(len(alice.pushed), 1)
        self.legacy(self.bob, {"type": "revoke_trust", "node_id": self.b, "peer_id": self.a})
        self.assertEqual(alice.pushed[-1], {"type": "event", "event": "trust_revoked", "node_id": self.b})

    def test_endpoint_changed(self) -> None:
        bob = self.subscribe(self.bob, self.b)
        carol = self.subscribe(self.carol, self.c)
        self.legacy(self.alice, {"type": "report_trust", "node_id": self.a,
                                 "peer_id": self.b})  # alice trusts bob
        bob.pushed.clear()
        self.world.register(self.alice, Peer("203.0.113.50", 1), listen="0.0.0.0:5050")
        self.assertEqual(bob.pushed, [{"type": "event", "event": "endpoint_changed", "node_id": self.a,
                                       "real_addr": "203.0.113.50:5050"}])
        # carol, whom alice does not trust, learns nothing
        self.assertEqual(carol.pushed, [])

    def test_endpoint_unchanged_no_event(self) -> None:
        bob = self.subscribe(self.bob, self.b)
        self.legacy(self.alice, {"type": "report_trust", "node_id": self.a, "peer_id": self.b})
        bob.pushed.clear()
        self.world.register(self.alice, PEER, listen="0.0.0.0:4001")
        self.assertEqual(bob.pushed, [])

    def test_only_endpoint_changes_are_endpoint_changed(self) -> None:
        """A re-registration that moves nothing (a new hostname, a first proof) sends no endpoint_changed."""
        bob = self.subscribe(self.bob, self.b)
        self.legacy(self.alice, {"type": "report_trust", "node_id": self.a, "peer_id": self.b})
        bob.pushed.clear()
        self.world.register(self.alice, PEER, listen="0.0.0.0:4001", hostname="alice")
        self.world.register(self.alice, PEER, listen="0.0.0.0:4001", owner="alice@example.com")
        self.world.register(self.alice, PEER, listen="0.0.0.0:4001", auth=True)
        self.assertEqual(self.world.node(self.a).hostname, "alice")
        self.assertEqual(bob.events("endpoint_changed"), [])

    def test_local_addr_only_behind_the_same_nat(self) -> None:
        """A node's LAN endpoint is given only to a requester with the same public address."""
        self.legacy(self.alice, {"type": "report_trust", "node_id": self.a, "peer_id": self.b})
        self.world.register(self.alice, PEER, listen="0.0.0.0:4001", local_addr="10.1.0.5:4001")
        reply = self.resolve(self.bob, self.b, self.a)
        same_nat = self.world.node(self.b).real_addr.rpartition(":")[0] == \
            self.world.node(self.a).real_addr.rpartition(":")[0]
        self.assertEqual(reply.get("local_addr"), "10.1.0.5:4001" if same_nat else None)
        self.world.node(self.b).real_addr = "203.0.113.99:5000"  # bob elsewhere
        self.assertNotIn("local_addr", self.resolve(self.bob, self.b, self.a))
        self.world.register(self.alice, PEER, listen="0.0.0.0:4001", local_addr="not an endpoint")
        self.assertEqual(self.world.node(self.a).local_addr, "")

    def test_returning_node_is_endpoint_changed(self) -> None:
        """
        A node that deregistered (a daemon restart) and registers again is
        announced to the peers it trusts, even on the same endpoint: they may
        hold a session or an endpoint from before it left.
        """
        bob = self.subscribe(self.bob, self.b)
        self.legacy(self.alice, {"type": "report_trust", "node_id": self.a, "peer_id": self.b})
        self.legacy(self.alice, {"type": "deregister", "node_id": self.a})
        bob.pushed.clear()
        self.world.register(self.alice, PEER, listen="0.0.0.0:4009")
        [event] = bob.events("endpoint_changed")
        self.assertEqual((event["node_id"], event["real_addr"].rpartition(":")[2]), (self.a, "4009"))

    def test_session_closed(self) -> None:
        bob = self.subscribe(self.bob, self.b)
        other = self.subscribe(self.bob, self.b)  # a second connection of bob's
        self.world.registry.session_closed(bob)
        self.legacy(self.alice, {"type": "request_handshake", "from_node_id": self.a, "to_node_id": self.b})
        self.assertEqual(bob.pushed, [])
        self.assertEqual(len(other.pushed), 1)
        self.world.registry.session_closed(other)
        self.assertEqual(self.world.registry.subscribers, {})
        # closing an unknown session is harmless
        self.world.registry.session_closed(Recorder())

    def test_events_are_sent_in_every_session(self) -> None:
        first = self.subscribe(self.bob, self.b)
        second = self.subscribe(self.bob, self.b)
        self.legacy(self.alice, {"type": "report_trust", "node_id": self.a, "peer_id": self.b})
        self.assertEqual(first.pushed, second.pushed)
        self.assertEqual(len(first.pushed), 1)

    def test_address_in_replies(self) -> None:
        # a small cross-check that ids and addresses agree
        reply = self.world.send({"type": "lookup", "node_id": self.c})
        self.assertEqual(reply["address"], str(Address(0, self.c)))
