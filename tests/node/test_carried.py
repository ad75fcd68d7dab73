"""
Tests for L{pilot.node.carried}: trust carried by the key, kept at the
registry as signed statements and restored when the trust file is missing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import InvalidArgument, RegistryUnavailable
from pilot.identity import Identity
from pilot.node.carried import CarriedTrust
from pilot.protocols.registry_client import reply_error
from pilot.server.registry import Peer, Registry, RegistryConfig
from pilot.trust import TrustedPeer, TrustStore
from pilot.wire.registry import sign_request
from pilot.wire.statement import decode, make_statement

from tests import natmodel

T0 = 1_795_301_000.0
ALICE = Identity.from_seed(b"a" * 32)
BOB = Identity.from_seed(b"b" * 32)
CAROL = Identity.from_seed(b"c" * 32)
MALLORY = Identity.from_seed(b"m" * 32)
A, B, C = ALICE.address.node, BOB.address.node, CAROL.address.node


class Rendezvous:
    """A real registry on a clock, reached through signed requests as the node's registration sends them."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.registry = Registry(clock, RegistryConfig(registrations_per_minute=0, requests_per_second=0))
        self.sent: list[dict[str, Any]] = []
        self.nonce = 0
        for who in (ALICE, BOB, CAROL):
            self.registry.handle({"type": "register", "public_key": who.public_key_b64,
                                  "listen_addr": "0.0.0.0:4000"}, Peer("192.0.2.1", 1))

    def requester(self, who: Identity) -> Any:
        def request(msg: dict[str, Any]) -> "Deferred[Any]":
            self.sent.append(msg)
            self.nonce += 1
            signed = sign_request(msg, who.sign, int(self.clock.seconds() * 1000),
                                  self.nonce.to_bytes(16, "big"))
            reply = self.registry.handle(signed, Peer("192.0.2.1", 1))
            error = reply_error(reply)
            return fail(error) if error is not None else succeed(reply)
        return request

    def held(self, node_id: int) -> dict[int, Any]:
        return self.registry.state.statements.get(node_id, {})


class CarriedTrustTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.rendezvous = Rendezvous(self.clock)
        self.saves = 0

    def carried(self, store: TrustStore, restore: bool, request: Any = None,
                who: Identity = ALICE) -> CarriedTrust:
        def save() -> None:
            self.saves += 1
        return CarriedTrust(identity=who, store=store, save=save,
                            request=request or self.rendezvous.requester(who), clock=self.clock,
                            node_id=lambda: who.address.node, restore=restore)

    def trusting(self, *peers: Identity) -> TrustStore:
        store = TrustStore()
        for p in peers:
            store.trusted[p.address.node] = TrustedPeer(p.address.node, p.public_key, T0 - 60, mutual=True)
        return store

    def test_grants_deposited_after_registration(self) -> None:
        carried = self.carried(self.trusting(BOB, CAROL), restore=False)
        carried.registered()
        held = self.rendezvous.held(A)
        self.assertEqual(sorted(held), sorted([B, C]))
        self.assertFalse(any(s.revoked for s in held.values()))
        self.assertEqual(held[B].peer_key, BOB.public_key)
        # nothing changed: nothing more is sent
        sent = len(self.rendezvous.sent)
        carried.registered()
        carried.trust_changed()
        self.assertEqual(len(self.rendezvous.sent), sent)

    def test_restore_when_the_file_was_missing(self) -> None:
        self.carried(self.trusting(BOB, CAROL), restore=False).registered()
        fresh = TrustStore()
        carried = self.carried(fresh, restore=True)
        carried.registered()
        self.assertEqual(sorted(fresh.trusted), sorted([B, C]))
        self.assertEqual(fresh.trusted[B].public_key, BOB.public_key)  # pinned as before
        self.assertTrue(fresh.trusted[B].mutual)
        self.assertEqual(fresh.trusted[B].approved_at, T0 - 60)
        self.assertEqual(self.saves, 1)
        self.assertEqual(carried.restored, sorted([B, C]))
        self.assertIn({"type": "report_trust", "node_id": A, "peer_id": B}, self.rendezvous.sent)

    def test_existing_file_is_the_truth(self) -> None:
        self.carried(self.trusting(BOB, CAROL), restore=False).registered()
        kept = self.trusting(BOB)  # the file says: only Bob now
        self.carried(kept, restore=False).registered()
        self.assertEqual(sorted(kept.trusted), [B])
        held = self.rendezvous.held(A)
        self.assertFalse(held[B].revoked)
        self.assertTrue(held[C].revoked)
        # and a later restore brings back Bob only
        fresh = TrustStore()
        self.carried(fresh, restore=True).registered()
        self.assertEqual(sorted(fresh.trusted), [B])

    def test_untrust_withdraws(self) -> None:
        store = self.trusting(BOB)
        carried = self.carried(store, restore=False)
        carried.registered()
        del store.trusted[B]
        carried.trust_changed()
        self.assertTrue(self.rendezvous.held(A)[B].revoked)
        fresh = TrustStore()
        self.carried(fresh, restore=True).registered()
        self.assertEqual(fresh.trusted, {})

    def test_key_pinned_later_is_stated_again(self) -> None:
        store = TrustStore()
        store.trusted[B] = TrustedPeer(B, b"", T0, mutual=True)
        carried = self.carried(store, restore=False)
        carried.registered()
        self.assertEqual(self.rendezvous.held(A)[B].peer_key, b"")
        store.trusted[B] = TrustedPeer(B, BOB.public_key, T0, mutual=True)
        carried.trust_changed()
        self.assertEqual(self.rendezvous.held(A)[B].peer_key, BOB.public_key)

    def served(self, texts: list[Any]) -> TrustStore:
        """Restore from a registry that answers ``texts``."""
        def request(msg: dict[str, Any]) -> "Deferred[Any]":
            if msg["type"] == "get_trust_statements":
                return succeed({"type": "get_trust_statements_ok", "statements": texts})
            return succeed({"type": msg["type"] + "_ok"})
        fresh = TrustStore()
        with capturedLogs() as self.logs:
            self.carried(fresh, restore=True, request=request).registered()
        return fresh

    def grant(self, peer: Identity, seq: int, revoked: bool = False, by: Identity = ALICE,
              peer_key: bytes | None = None, signer: Identity | None = None) -> str:
        return make_statement(by.address.node, by.public_key, peer.address.node,
                              peer.public_key if peer_key is None else peer_key, int(T0), seq, revoked,
                              (signer or by).sign).encode()

    def test_registry_cannot_forge_or_widen(self) -> None:
        bad = [
            self.grant(CAROL, 5, signer=MALLORY),                       # forged: not our signature
            self.grant(BOB, 5, peer_key=MALLORY.public_key, signer=MALLORY),  # widened to another key
            self.grant(CAROL, 5, by=MALLORY),                           # someone else's statement
            self.grant(CAROL, 5)[:-8] + "AAAAAAA=",                     # signature damaged
            "pilot-trust/1 garbage", 7, None, "x" * 5000,               # malformed
        ]
        fresh = self.served(bad + [self.grant(BOB, 5)])
        self.assertEqual(list(fresh.trusted), [B])
        self.assertEqual(fresh.trusted[B].public_key, BOB.public_key)
        self.assertEqual(len([e for e in self.logs if "dropped" in e.get("log_format", "")]), len(bad))

    def test_replayed_older_grant_after_revoke(self) -> None:
        fresh = self.served([self.grant(BOB, 20, revoked=True), self.grant(BOB, 10)])
        self.assertEqual(fresh.trusted, {})
        fresh = self.served([self.grant(BOB, 10), self.grant(BOB, 20, revoked=True), self.grant(BOB, 15)])
        self.assertEqual(fresh.trusted, {})

    def test_reference_registry(self) -> None:
        """A registry that does not know the request: logged once, the node goes on, nothing more sent."""
        sent: list[dict[str, Any]] = []

        def request(msg: dict[str, Any]) -> "Deferred[Any]":
            sent.append(msg)
            return fail(InvalidArgument("unknown request type 'get_trust_statements'"))
        store = self.trusting(BOB)
        with capturedLogs() as logs:
            carried = self.carried(store, restore=True, request=request)
            carried.registered()
            carried.registered()
            carried.trust_changed()
        self.assertEqual(len(sent), 1)
        self.assertEqual(sorted(store.trusted), [B])
        self.assertTrue(any("could not be restored" in e["log_format"].format(**e) for e in logs
                            if "log_format" in e and "what" in e))

    def test_registry_unavailable_retried_at_next_registration(self) -> None:
        answers: list[Any] = [fail(RegistryUnavailable("gone"))]
        real = self.rendezvous.requester(ALICE)
        self.carried(self.trusting(BOB), restore=False).registered()

        def request(msg: dict[str, Any]) -> "Deferred[Any]":
            return answers.pop() if answers else real(msg)
        fresh = TrustStore()
        carried = self.carried(fresh, restore=True, request=request)
        carried.registered()
        self.assertEqual(fresh.trusted, {})
        carried.registered()
        self.assertEqual(sorted(fresh.trusted), [B])

    def test_failed_deposit_refetches(self) -> None:
        store = self.trusting(BOB)
        real = self.rendezvous.requester(ALICE)
        broken = [False]

        def request(msg: dict[str, Any]) -> "Deferred[Any]":
            if broken[0] and msg["type"] == "put_trust_statements":
                return fail(RegistryUnavailable("gone"))
            return real(msg)
        carried = self.carried(store, restore=False, request=request)
        carried.registered()
        broken[0] = True
        store.trusted[C] = TrustedPeer(C, CAROL.public_key, T0, mutual=True)
        carried.trust_changed()
        self.assertIsNone(carried.deposited)
        broken[0] = False
        carried.registered()
        self.assertEqual(sorted(self.rendezvous.held(A)), sorted([B, C]))

    def test_sequence_increases_within_one_millisecond(self) -> None:
        store = self.trusting(BOB)
        carried = self.carried(store, restore=False)
        carried.registered()
        first = self.rendezvous.held(A)[B].seq
        del store.trusted[B]
        carried.trust_changed()
        self.assertGreater(self.rendezvous.held(A)[B].seq, first)
        self.assertEqual(decode(self.rendezvous.held(A)[B].encode()).seq, first + 1)


class MovedNodeTests(SynchronousTestCase):
    """The seeds' promise on the NAT model: the key alone carries the trust."""

    def test_moved_with_its_key_only(self) -> None:
        world = natmodel.World()
        a, b = world.node(natmodel.PUBLIC), world.node(natmodel.FULL_CONE)
        world.start()
        world.run(1.0)
        self.assertEqual(sorted(world.registry.state.statements.get(b.node_id, {})), [a.node_id])
        # b moves: only its identity goes along, no trust file; a new port behind a new mapping
        b.trust_store = natmodel.TrustStore()
        b.restore_trust = True
        b.restart()
        start = world.now()
        self.assertTrue(world.run_until(start + 5.0, lambda: a.node_id in b.trust_store.trusted))
        self.assertEqual(b.trust_store.trusted[a.node_id].public_key, a.identity.public_key)
        # and a reaches it, nobody having done anything
        for seq in range(1, 6):
            a.send(b, seq)
            world.run(1.0)
            if b.received(seq):
                break
        self.assertTrue(b.received(seq), "a's datagrams never reached the moved node")
        self.assertLess(world.now() - start, 5.0 + 1e-9)
