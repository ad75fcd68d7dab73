"""
Tests for L{pilot.server.statements}: keeping each node's signed trust statements.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.task import Clock

from pilot.errors import ErrorCode
from pilot.identity import Identity
from pilot.server.registry import Registry
from pilot.server.statements import MAX_PER_NODE, MAX_PER_REQUEST
from pilot.services.store import StoreWriter, load_store
from pilot.wire.statement import TrustStatement, decode, make_statement

from tests.server.test_registry import NO_LIMITS, OTHER_PEER, PEER, RegistryTestCase, World, ident


def statement(who: Identity, peer: int, peer_key: bytes, seq: int, revoked: bool = False) -> TrustStatement:
    return make_statement(who.address.node, who.public_key, peer, peer_key, 1795301000, seq, revoked,
                          who.sign)


class StatementTests(RegistryTestCase):
    def setUp(self) -> None:
        self.world = World(NO_LIMITS)
        self.alice, self.bob, self.carol = ident(1), ident(2), ident(3)
        self.a = self.world.join(self.alice, PEER, auth=True)
        self.b = self.world.join(self.bob, OTHER_PEER, auth=True)

    def put(self, who: Identity, node_id: int, texts: Any) -> dict[str, Any]:
        return self.world.send(self.world.authed(
            who, {"type": "put_trust_statements", "node_id": node_id, "statements": texts}))

    def get(self, who: Identity, node_id: int) -> dict[str, Any]:
        return self.world.send(self.world.authed(who, {"type": "get_trust_statements", "node_id": node_id}))

    def grant_bob(self, seq: int = 10, revoked: bool = False) -> TrustStatement:
        return statement(self.alice, self.b, self.bob.public_key, seq, revoked)

    def test_put_then_get(self) -> None:
        s = self.grant_bob()
        changes = self.world.changes
        reply = self.put(self.alice, self.a, [s.encode()])
        self.assertEqual((reply["type"], reply["stored"], reply["stale"]), ("put_trust_statements_ok", 1, 0))
        self.assertGreater(self.world.changes, changes)
        got = self.get(self.alice, self.a)
        self.assertOk(got, "get_trust_statements")
        self.assertEqual([decode(t) for t in got["statements"]], [s])

    def test_only_the_node_reads_its_own(self) -> None:
        self.put(self.alice, self.a, [self.grant_bob().encode()])
        # Bob signs a request naming Alice: refused, it is not Bob's signature for node a
        self.assertError(self.get(self.bob, self.a), ErrorCode.unauthorized)
        self.assertEqual(self.get(self.bob, self.b)["statements"], [])

    def test_needs_auth(self) -> None:
        for kind in ("put_trust_statements", "get_trust_statements"):
            reply = self.world.send({"type": kind, "node_id": self.a, "statements": []})
            self.assertError(reply, ErrorCode.unauthorized)

    def test_someone_elses_statement_refused(self) -> None:
        theirs = statement(self.bob, self.a, self.alice.public_key, 5)
        self.assertError(self.put(self.alice, self.a, [theirs.encode()]), ErrorCode.unauthorized)
        forged = make_statement(self.a, self.alice.public_key, self.b, self.bob.public_key, 1, 5, False,
                                self.bob.sign)
        self.assertError(self.put(self.alice, self.a, [forged.encode()]), ErrorCode.unauthorized)
        self.assertEqual(self.world.registry.state.statements, {})

    def test_malformed_refused(self) -> None:
        for bad in ([7], ["not a statement"], ["x" * 1000], "not a list"):
            self.assertError(self.put(self.alice, self.a, bad), ErrorCode.invalid_argument)
        self.assertEqual(self.world.registry.state.statements, {})

    def test_replayed_grant_after_revoke_changes_nothing(self) -> None:
        old = self.grant_bob(seq=10)
        revoke = self.grant_bob(seq=11, revoked=True)
        self.put(self.alice, self.a, [old.encode()])
        self.put(self.alice, self.a, [revoke.encode()])
        reply = self.put(self.alice, self.a, [old.encode()])
        self.assertEqual((reply["stored"], reply["stale"]), (0, 1))
        self.assertEqual([decode(t) for t in self.get(self.alice, self.a)["statements"]], [revoke])

    def test_bounds(self) -> None:
        many = [statement(self.alice, 1000 + i, b"", 1).encode() for i in range(MAX_PER_REQUEST + 1)]
        self.assertError(self.put(self.alice, self.a, many), ErrorCode.invalid_argument)
        for start in range(0, MAX_PER_NODE, MAX_PER_REQUEST):
            batch = [statement(self.alice, 1000 + i, b"", 1).encode()
                     for i in range(start, start + MAX_PER_REQUEST)]
            self.assertOk(self.put(self.alice, self.a, batch), "put_trust_statements")
        one_more = statement(self.alice, 999, b"", 1).encode()
        self.assertError(self.put(self.alice, self.a, [one_more]), ErrorCode.rate_limited)
        # a newer statement about a peer already kept still fits
        self.assertOk(self.put(self.alice, self.a, [statement(self.alice, 1000, b"", 2, True).encode()]),
                      "put_trust_statements")

    def test_outlive_deregistration(self) -> None:
        s = self.grant_bob()
        self.put(self.alice, self.a, [s.encode()])
        deregister = self.world.authed(self.alice, {"type": "deregister", "node_id": self.a})
        self.assertOk(self.world.send(deregister), "deregister")
        self.assertEqual(self.world.join(self.alice, PEER, auth=True, listen="0.0.0.0:5000"), self.a)
        self.assertEqual([decode(t) for t in self.get(self.alice, self.a)["statements"]], [s])

    def test_persisted_across_a_store_restart(self) -> None:
        s, r = self.grant_bob(), statement(self.alice, 77, b"", 3, True)
        self.put(self.alice, self.a, [s.encode(), r.encode()])
        path = os.path.join(self.mktemp(), "registry.json")
        os.makedirs(os.path.dirname(path))
        writer = StoreWriter(path, self.world.registry.state.to_json, Clock())
        writer.changed()
        self.assertTrue(writer.flush())
        with open(path) as f:
            self.assertEqual(len(json.load(f)["trust_statements"][str(self.a)]), 2)
        state = load_store(path)
        assert state is not None
        restarted = World(NO_LIMITS, state=state)
        restarted.clock.advance(1)  # a request newer than any accepted before the restart (docs/security.md)
        reply = restarted.send(restarted.authed(self.alice,
                                                {"type": "get_trust_statements", "node_id": self.a}))
        self.assertEqual({decode(t) for t in reply.get("statements", [])}, {s, r}, reply)

    def test_unknown_to_reference_shape_preserved(self) -> None:
        """The extension key sits beside the reference's keys; a store without it loads empty."""
        self.put(self.alice, self.a, [self.grant_bob().encode()])
        saved = self.world.registry.state.to_json()
        self.assertIn("nodes", saved)
        del saved["trust_statements"]
        self.assertEqual(type(self.world.registry.state).from_json(saved).statements, {})

    def test_registry_without_state_answers(self) -> None:
        registry = Registry(Clock())
        reply = registry.handle({"type": "get_trust_statements", "node_id": 5}, PEER)
        self.assertEqual(reply["code"], "not_found")

    def test_damaged_statement_in_store_refused(self) -> None:
        self.put(self.alice, self.a, [self.grant_bob().encode()])
        saved = self.world.registry.state.to_json()
        saved["trust_statements"][str(self.a)][0] += "x"
        from pilot.server.state import RegistryState, StoreFormatError
        self.assertRaises(StoreFormatError, RegistryState.from_json, saved)
        saved["trust_statements"] = {str(self.b): [self.grant_bob().encode()]}
        self.assertRaises(StoreFormatError, RegistryState.from_json, saved)
