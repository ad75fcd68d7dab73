"""
Tests for L{pilot.server.registry}: the reference's request types and reply
fields (docs/reference-wire.md §2.4), the captured Go sessions replayed, registration,
rate limits, expiry, persistence hooks and hostile input.

The trust side (signatures, visibility, handshakes, events) is in
L{tests.server.test_registry_trust}, which uses the helpers defined here.
"""

from __future__ import annotations

from tests import capture

import copy
import json
import os
import random
from typing import Any, Callable

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.address import Address, node_id_candidates, node_id_for_key
from pilot.errors import ErrorCode
from pilot.identity import Identity, b64encode
from pilot.server.registry import BEACON_TTL, Peer, Registry, RegistryConfig
from pilot.server.state import Node, RegistryState
from pilot.wire.registry import encode_frame, legacy_challenge, rotate_proof_message, sign_request
from pilot.wire.statement import make_statement

#: A realistic Unix time for the registry's clock.
T0 = 1.8e9
PEER = Peer("198.51.100.7", 40001)
OTHER_PEER = Peer("203.0.113.9", 50002)
NO_LIMITS = RegistryConfig(registrations_per_minute=0, requests_per_second=0)
ERROR_CODES = {code.name for code in ErrorCode}


def ident(n: int) -> Identity:
    return Identity.from_seed(n.to_bytes(2, "big") * 16)


def rotation(node_id: int, old: Identity, new: Identity) -> dict[str, Any]:
    """A ``rotate_key`` request (unsigned yet) with the new key's proof of possession."""
    proof = new.sign_b64(rotate_proof_message(node_id, old.public_key, new.public_key))
    return {"type": "rotate_key", "node_id": node_id, "new_public_key": new.public_key_b64,
            "new_key_proof": proof}


# --- the captured vectors ---------------------------------------------------------

def vectors_dir() -> str:
    return capture.vectors_dir()


def load_vector(session: str, name: str) -> Any:
    with open(os.path.join(vectors_dir(), session, name), "rb") as f:
        return json.loads(f.read().decode("utf-8"))


# --- a registry on a fake clock, and nodes that talk to it ----------------------------

class Recorder:
    """A client connection that records what the registry pushes to it."""

    def __init__(self) -> None:
        self.pushed: list[dict[str, Any]] = []

    def push(self, message: dict[str, Any]) -> None:
        self.pushed.append(message)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [m for m in self.pushed if name is None or m.get("event") == name]


class World:
    """A L{Registry} on a L{Clock} at a realistic time, counting C{on_change} calls."""

    def __init__(self, config: RegistryConfig | None = None, state: RegistryState | None = None,
                 now: float = T0) -> None:
        self.clock = Clock()
        self.clock.advance(now)
        self.changes = 0
        self.registry = Registry(self.clock, config, state, on_change=self._changed)
        self._nonce = 0

    def _changed(self) -> None:
        self.changes += 1

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def send(self, msg: dict[str, Any], peer: Peer = PEER, session: Any = None) -> dict[str, Any]:
        reply = self.registry.handle(copy.deepcopy(msg), peer, session)
        check_reply_shape(msg, reply)
        return reply

    # signing

    def legacy(self, who: Identity, msg: dict[str, Any]) -> dict[str, Any]:
        """``msg`` with the reference's fixed-challenge signature."""
        challenge = legacy_challenge(msg)
        assert challenge is not None, msg
        return {**msg, "signature": who.sign_b64(challenge)}

    def authed(self, who: Identity, msg: dict[str, Any], ts: float | None = None,
               nonce: bytes | None = None, legacy: bool = False) -> dict[str, Any]:
        """``msg`` with our replay-proof ``auth`` (a fresh nonce each time)."""
        if nonce is None:
            self._nonce += 1
            nonce = self._nonce.to_bytes(16, "big")
        when = self.clock.seconds() if ts is None else ts
        return sign_request(msg, who.sign, int(when * 1000), nonce, legacy=legacy)

    # common requests

    def register(self, who: Identity, peer: Peer = PEER, listen: str | None = "0.0.0.0:4000",
                 auth: bool = False, **fields: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": "register", "public_key": who.public_key_b64, **fields}
        if listen is not None:
            msg["listen_addr"] = listen
        if auth:
            msg = self.authed(who, msg)
        return self.send(msg, peer)

    def join(self, who: Identity, peer: Peer = PEER, **kw: Any) -> int:
        reply = self.register(who, peer, **kw)
        assert reply["type"] == "register_ok", reply
        return int(reply["node_id"])

    def node(self, node_id: int) -> Node:
        node = self.registry.state.nodes.get(node_id)
        assert node is not None, f"node {node_id} is not registered"
        return node


def check_reply_shape(msg: dict[str, Any], reply: Any) -> None:
    """Every reply is an object with a type; errors have a string reason and a code."""
    if not isinstance(reply, dict):
        raise AssertionError(f"reply {reply!r} to {str(msg)[:200]} is not a dict")
    kind = reply.get("type")
    if kind == "error":
        if not isinstance(reply.get("error"), str) or not reply["error"]:
            raise AssertionError(f"error reply without a reason: {reply!r}")
        if reply.get("code") not in ERROR_CODES:
            raise AssertionError(f"error reply without a known code: {reply!r}")
    elif not (isinstance(kind, str) and isinstance(msg.get("type"), str) and kind == msg["type"] + "_ok"):
        raise AssertionError(f"reply type {kind!r} to a {str(msg.get('type'))[:40]!r} request")


class RegistryTestCase(SynchronousTestCase):
    def assertError(self, reply: dict[str, Any], code: ErrorCode | None = None) -> None:
        self.assertEqual(reply.get("type"), "error", reply)
        self.assertIsInstance(reply.get("error"), str)
        self.assertTrue(reply["error"])
        self.assertIn(reply.get("code"), ERROR_CODES)
        if code is not None:
            self.assertEqual(reply["code"], code.name, reply)

    def assertOk(self, reply: dict[str, Any], kind: str) -> None:
        self.assertEqual(reply.get("type"), kind + "_ok", reply)


# --- replaying the Go sessions ---------------------------------------------------------

#: Unix time of t=0 of each capture, worked out from the captured replies
#: (session 2: heartbeat 'time' and poll timestamps; session 1: the store's
#: handshake timestamp at t=2.0037).
SESSION_START = {"go-session-1": 1795300951.583188798 - 2.0037, "go-session-2": 1795300997.6}


def replay(session: str) -> tuple[World, list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]]:
    """
    Feed every request of the session's TCP transcript to a registry seeded
    with the session store's key index, the clock at each request's time.
    Return (request, captured reply, our reply) triples.
    """
    transcript = load_vector(session, "transcript.json")
    store = load_vector(session, "registry-store.json")
    start = SESSION_START[session]
    world = World(state=RegistryState.from_json({"pub_key_idx": store["pub_key_idx"]}), now=start)
    entries = transcript["tcp"]
    server = str(entries[0]["to"])
    pending: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    triples = []
    for entry in entries:
        source, target = str(entry["from"]), str(entry["to"])
        if target == server:
            world.clock.advance(max(0.0, start + entry["t"] - world.clock.seconds()))
            reply = world.registry.handle(copy.deepcopy(entry["json"]), Peer("127.0.0.1", int(source)))
            pending.setdefault(source, []).append((entry["json"], reply))
        else:
            request, reply = pending[target].pop(0)
            triples.append((request, entry["json"], reply))
    assert not any(pending.values()), "a request without a captured reply"
    return world, triples


class VectorReplayTests(RegistryTestCase):
    def check_session(self, session: str) -> World:
        world, triples = replay(session)
        self.assertGreater(len(triples), 10)
        for request, captured, ours in triples:
            where = f"{session}: {request['type']} -> {captured}"
            self.assertEqual(ours["type"], captured["type"], f"{where}; ours: {ours}")
            self.assertLessEqual(set(captured), set(ours), where)
            for key, value in captured.items():
                if key == "error":
                    continue  # the reference hides every reason behind "request failed"
                if captured["type"] == "poll_handshakes_ok" and key == "responses":
                    # the reference queues the daemon's duplicate respond_handshake twice
                    # (docs/reference-wire.md §9 item 14); we keep one
                    unique = [r for i, r in enumerate(value) if r not in value[:i]]
                    self.assertEqual(ours[key], unique, where)
                    continue
                self.assertEqual(ours[key], value, f"{where}; ours: {ours}")
            if ours["type"] == "error":
                self.assertError(ours)
        return world

    def test_session_1(self) -> None:
        world = self.check_session("go-session-1")
        _, triples = replay("go-session-1")
        denied = [ours for req, cap, ours in triples if req["type"] == "resolve"]
        self.assertEqual(len(denied), 4)
        for reply in denied:
            self.assertError(reply, ErrorCode.not_trusted)
        # the store at the end: both nodes gone, keys remembered, node 2's request still queued
        state = world.registry.state
        self.assertEqual(state.nodes, {})
        store = load_vector("go-session-1", "registry-store.json")
        self.assertEqual(state.to_json()["pub_key_idx"], store["pub_key_idx"])
        self.assertEqual([(r.from_node_id, r.justification) for r in state.inbox[1]], [(2, "vector capture")])

    def test_session_2(self) -> None:
        world = self.check_session("go-session-2")
        _, triples = replay("go-session-2")
        resolves = [ours for req, cap, ours in triples if req["type"] == "resolve"]
        self.assertEqual([r["type"] for r in resolves], ["error", "error", "resolve_ok"])
        state = world.registry.state
        self.assertEqual(state.nodes[2].real_addr, "127.0.0.1:24102")
        # node 2 approved node 1 (report_trust and the accept): 2 trusts 1
        self.assertIn((2, 1), state.trust)
        self.assertEqual(state.proven, set())

    def test_vector_signatures_need_the_seeded_ids(self) -> None:
        """
        Without the store's key index the Go nodes get key-derived ids, and
        their captured signatures (over ids 1 and 2) do not fit them.
        """
        transcript = load_vector("go-session-2", "transcript.json")
        world = World()
        first = transcript["tcp"][0]["json"]
        reply = world.send(first, Peer("127.0.0.1", 36154))
        self.assertEqual(reply["node_id"], node_id_for_key(Identity.from_json(
            load_vector("go-session-2", "identity-agent-a.json")).public_key))
        self.assertNotIn(reply["node_id"], (1, 2))
        set_hostname = transcript["tcp"][2]["json"]
        self.assertError(world.send({**set_hostname, "node_id": reply["node_id"]}), ErrorCode.unauthorized)


# --- registration ------------------------------------------------------------------------

class RegistrationTests(RegistryTestCase):
    def test_fresh_key(self) -> None:
        world = World()
        alice = ident(1)
        reply = world.register(alice)
        node_id = node_id_for_key(alice.public_key)
        self.assertEqual(reply, {"type": "register_ok", "node_id": node_id, "network_id": 0,
                                 "address": str(Address(0, node_id)), "public_key": alice.public_key_b64})
        self.assertEqual(reply["address"], str(alice.address))
        node = world.node(node_id)
        self.assertEqual(node.public_key, alice.public_key)
        self.assertEqual(node.last_seen, T0)
        self.assertFalse(node.public)
        self.assertEqual(node.networks, [0])

    def test_reregister_from_another_endpoint(self) -> None:
        world = World()
        alice = ident(1)
        first = world.register(alice, PEER, listen="0.0.0.0:4000")
        world.advance(10)
        second = world.register(alice, OTHER_PEER, listen="0.0.0.0:4100")
        self.assertEqual(second["node_id"], first["node_id"])
        node = world.node(first["node_id"])
        self.assertEqual(node.real_addr, "203.0.113.9:4100")
        self.assertEqual(node.last_seen, T0 + 10)
        self.assertEqual(len(world.registry.state.nodes), 1)

    def test_listen_host_ignored(self) -> None:
        world = World()
        for n, listen in enumerate(("10.9.8.7:5555", "127.0.0.1:5555", "0.0.0.0:5555", "[::]:5555",
                                    "[2001:db8::1]:5555", "198.51.100.7:5555")):
            reply = world.register(ident(n + 1), listen=listen)
            self.assertEqual(world.node(reply["node_id"]).real_addr, "198.51.100.7:5555", listen)

    def test_listen_host_not_an_ip(self) -> None:
        """
        The reference splits host and port and uses only the port, whatever
        the host is (docs/reference-wire.md §2.6); an empty or named host keeps the port.
        """
        world = World()
        for n, listen in enumerate((":5555", "node.example:5555", "localhost:5555")):
            reply = world.register(ident(n + 1), listen=listen)
            self.assertEqual(world.node(reply["node_id"]).real_addr, "198.51.100.7:5555", listen)

    def test_ipv6_peer(self) -> None:
        world = World()
        reply = world.register(ident(1), Peer("2001:db8::7", 40001), listen="0.0.0.0:4000")
        self.assertEqual(world.node(reply["node_id"]).real_addr, "[2001:db8::7]:4000")

    def test_listen_missing_or_garbage(self) -> None:
        world = World(NO_LIMITS)
        for n, listen in enumerate((None, "", "garbage", ":", "203.0.113.4", "203.0.113.4:", "203.0.113.4:0",
                                    "203.0.113.4:65536", "203.0.113.4:-1", "203.0.113.4:80x", "203.0.113.4:+80",
                                    "203.0.113.4: 80", "[::1]", "203.0.113.4:99999999999999999999", "x" * 100)):
            reply = world.register(ident(n + 1), listen=listen)
            self.assertOk(reply, "register")
            self.assertEqual(world.node(reply["node_id"]).real_addr, "198.51.100.7:40001", repr(listen))

    def test_listen_port_with_non_ascii_digits(self) -> None:
        """str.isdigit() accepts digits int() refuses: the registry must not raise."""
        world = World()
        for n, listen in enumerate(("203.0.113.4:\u00b2", "203.0.113.4:8\u00b2", "203.0.113.4:\u2460",
                                    "203.0.113.4:\u0668\u0660")):
            try:
                reply = world.register(ident(n + 1), listen=listen)
            except Exception as e:  # noqa: BLE001
                self.fail(f"listen_addr {listen!r}: Registry.handle raised {type(e).__name__}: {e}")
            self.assertOk(reply, "register")

    def test_hostname_valid(self) -> None:
        world = World()
        reply = world.register(ident(1), hostname="alice")
        self.assertEqual(reply["hostname"], "alice")
        self.assertNotIn("hostname_error", reply)
        found = world.send({"type": "resolve_hostname", "hostname": "alice"})
        self.assertEqual(found["node_id"], reply["node_id"])

    def test_hostname_invalid_still_registered(self) -> None:
        world = World()
        for n, name in enumerate(("Alice", "-alice", "localhost", "a" * 64, "al ice")):
            reply = world.register(ident(n + 1), hostname=name)
            self.assertOk(reply, "register")
            self.assertIsInstance(reply.get("hostname_error"), str, name)
            self.assertNotIn("hostname", reply)
            self.assertEqual(world.node(reply["node_id"]).hostname, "")

    def test_hostname_taken_silently_skipped(self) -> None:
        world = World()
        world.register(ident(1), hostname="alice")
        reply = world.register(ident(2), hostname="alice")
        self.assertOk(reply, "register")
        self.assertNotIn("hostname", reply)
        self.assertNotIn("hostname_error", reply)
        self.assertEqual(world.send({"type": "resolve_hostname", "hostname": "alice"})["node_id"],
                         node_id_for_key(ident(1).public_key))

    def test_hostname_kept_on_reregister(self) -> None:
        world = World()
        world.register(ident(1), hostname="alice")
        reply = world.register(ident(1))
        self.assertEqual(reply["hostname"], "alice")
        reply = world.register(ident(1), hostname="alice")
        self.assertEqual(reply["hostname"], "alice")
        reply = world.register(ident(1), hostname="alice2")
        self.assertEqual(reply["hostname"], "alice2")
        self.assertError(world.send({"type": "resolve_hostname", "hostname": "alice"}), ErrorCode.not_found)

    def test_collision_takes_next_candidate(self) -> None:
        alice, mallory = ident(1), ident(2)
        candidates = node_id_candidates(alice.public_key)
        first, second = next(candidates), next(candidates)
        state = RegistryState()
        state.index_key(mallory.public_key, first)
        world = World(state=state)
        reply = world.register(alice)
        self.assertEqual(reply["node_id"], second)
        self.assertEqual(reply["node_id"], node_id_for_key(alice.public_key, lambda i: i == first))
        self.assertEqual(world.registry.state.key_index[mallory.public_key], first)
        # and stays there
        self.assertEqual(world.register(alice)["node_id"], second)
        # mallory's key, when it comes, gets the id it holds
        self.assertEqual(world.register(mallory, OTHER_PEER)["node_id"], first)

    def test_owner_recorded_but_never_moves_an_id(self) -> None:
        world = World()
        a = world.join(ident(1), owner="ops@example.com")
        self.assertEqual(world.node(a).owner, "ops@example.com")
        # the reference would hand node a's id to this new key (docs/reference-wire.md §9 item 2)
        b = world.join(ident(2), owner="ops@example.com")
        self.assertNotEqual(a, b)
        self.assertEqual(world.node(a).public_key, ident(1).public_key)

    def test_missing_or_bad_key(self) -> None:
        world = World()
        keys: list[Any] = [None, "", "AAAA", b64encode(b"\x01" * 31), b64encode(b"\x01" * 33), "!" * 44,
                           5, [], {}]
        for key in keys:
            msg: dict[str, Any] = {"type": "register", "listen_addr": "203.0.113.4:5"}
            if key is not None:
                msg["public_key"] = key
            self.assertError(world.send(msg), ErrorCode.invalid_argument)
        self.assertEqual(world.registry.state.nodes, {})

    def test_new_node_is_announced_once(self) -> None:
        world = World()
        world.register(ident(1))
        self.assertEqual(world.changes, 1)
        world.register(ident(1))  # nothing changed
        self.assertEqual(world.changes, 1)
        world.register(ident(1), OTHER_PEER)
        self.assertEqual(world.changes, 2)


# --- every request type ------------------------------------------------------------------

class Pair:
    """Two registered nodes: alice (public key 1) and bob (key 2)."""

    def __init__(self, config: RegistryConfig | None = None) -> None:
        self.world = World(config)
        self.alice, self.bob = ident(1), ident(2)
        self.a = self.world.join(self.alice, PEER, listen="0.0.0.0:4001")
        self.b = self.world.join(self.bob, OTHER_PEER, listen="0.0.0.0:4002")


class RequestTypeTests(RegistryTestCase):
    def setUp(self) -> None:
        p = Pair()
        self.world, self.alice, self.bob, self.a, self.b = p.world, p.alice, p.bob, p.a, p.b

    def signed(self, who: Identity, msg: dict[str, Any]) -> dict[str, Any]:
        return self.world.send(self.world.legacy(who, msg))

    def test_lookup_private(self) -> None:
        reply = self.world.send({"type": "lookup", "node_id": self.b})
        self.assertEqual(reply, {"type": "lookup_ok", "node_id": self.b, "address": str(Address(0, self.b)),
                                 "networks": [0], "public_key": self.bob.public_key_b64, "public": False,
                                 "polo_score": 0})

    def test_lookup_public_and_decorated(self) -> None:
        self.signed(self.bob, {"type": "set_visibility", "node_id": self.b, "public": True})
        self.signed(self.bob, {"type": "set_hostname", "node_id": self.b, "hostname": "bob"})
        self.signed(self.bob, {"type": "set_tags", "node_id": self.b, "tags": ["demo"]})
        self.signed(self.bob, {"type": "set_task_exec", "node_id": self.b, "enabled": True})
        reply = self.world.send({"type": "lookup", "node_id": self.b})
        self.assertEqual(reply["real_addr"], "203.0.113.9:4002")
        self.assertEqual((reply["hostname"], reply["tags"], reply["task_exec"], reply["public"]),
                         ("bob", ["demo"], True, True))

    def test_lookup_unknown(self) -> None:
        self.assertError(self.world.send({"type": "lookup", "node_id": 12345}), ErrorCode.not_found)

    def test_resolve(self) -> None:
        self.signed(self.bob, {"type": "set_visibility", "node_id": self.b, "public": True})
        reply = self.signed(self.alice, {"type": "resolve", "requester_id": self.a, "node_id": self.b})
        self.assertEqual(reply, {"type": "resolve_ok", "node_id": self.b, "real_addr": "203.0.113.9:4002"})

    def test_resolve_missing_target(self) -> None:
        reply = self.signed(self.alice, {"type": "resolve", "requester_id": self.a, "node_id": 777})
        self.assertError(reply, ErrorCode.not_found)

    def test_resolve_hostname(self) -> None:
        self.signed(self.bob, {"type": "set_hostname", "node_id": self.b, "hostname": "bob"})
        reply = self.world.send({"type": "resolve_hostname", "hostname": "bob"})
        self.assertEqual(reply, {"type": "resolve_hostname_ok", "node_id": self.b,
                                 "address": str(Address(0, self.b)), "public": False, "hostname": "bob"})
        self.assertError(self.world.send({"type": "resolve_hostname", "hostname": "nobody"}),
                         ErrorCode.not_found)
        self.assertError(self.world.send({"type": "resolve_hostname", "hostname": ""}), ErrorCode.not_found)
        self.assertError(self.world.send({"type": "resolve_hostname"}))

    def test_set_hostname(self) -> None:
        reply = self.signed(self.alice, {"type": "set_hostname", "node_id": self.a, "hostname": "alice"})
        self.assertEqual(reply, {"type": "set_hostname_ok", "node_id": self.a, "hostname": "alice"})
        self.assertEqual(self.world.registry.state.hostnames, {"alice": self.a})
        # change: the old name is free again
        self.signed(self.alice, {"type": "set_hostname", "node_id": self.a, "hostname": "alice2"})
        self.assertEqual(self.world.registry.state.hostnames, {"alice2": self.a})
        # clear
        reply = self.signed(self.alice, {"type": "set_hostname", "node_id": self.a, "hostname": ""})
        self.assertEqual(reply, {"type": "set_hostname_ok", "node_id": self.a, "hostname": ""})
        self.assertEqual(self.world.registry.state.hostnames, {})
        self.assertEqual(self.world.node(self.a).hostname, "")

    def test_set_hostname_taken(self) -> None:
        self.signed(self.bob, {"type": "set_hostname", "node_id": self.b, "hostname": "bob"})
        reply = self.signed(self.alice, {"type": "set_hostname", "node_id": self.a, "hostname": "bob"})
        self.assertError(reply, ErrorCode.already_exists)
        self.assertEqual(self.world.node(self.a).hostname, "")
        # one's own name again is fine
        self.assertOk(self.signed(self.bob, {"type": "set_hostname", "node_id": self.b, "hostname": "bob"}),
                      "set_hostname")

    def test_set_hostname_invalid(self) -> None:
        for name in ("Bob", "-bob", "bob-", "b_b", "broadcast", "x" * 64, 5, ["bob"]):
            reply = self.signed(self.alice, {"type": "set_hostname", "node_id": self.a, "hostname": name})
            self.assertError(reply, ErrorCode.invalid_argument)
        self.assertEqual(self.world.node(self.a).hostname, "")

    def test_set_visibility(self) -> None:
        reply = self.signed(self.alice, {"type": "set_visibility", "node_id": self.a, "public": True})
        self.assertEqual(reply, {"type": "set_visibility_ok", "node_id": self.a, "visibility": "public"})
        self.assertTrue(self.world.node(self.a).public)
        reply = self.signed(self.alice, {"type": "set_visibility", "node_id": self.a, "public": False})
        self.assertEqual(reply, {"type": "set_visibility_ok", "node_id": self.a, "visibility": "private"})
        self.assertFalse(self.world.node(self.a).public)
        values: list[Any] = ["true", 1, None, [], {}]
        for value in values:
            msg = {"type": "set_visibility", "node_id": self.a}
            if value is not None:
                msg["public"] = value
            self.assertError(self.signed(self.alice, msg), ErrorCode.invalid_argument)

    def test_set_tags(self) -> None:
        reply = self.signed(self.alice, {"type": "set_tags", "node_id": self.a,
                                         "tags": ["#demo", "test", "demo"]})
        self.assertEqual(reply, {"type": "set_tags_ok", "node_id": self.a, "tags": ["demo", "test"]})
        self.assertEqual(self.world.node(self.a).tags, ["demo", "test"])
        reply = self.signed(self.alice, {"type": "set_tags", "node_id": self.a, "tags": []})
        self.assertEqual(reply["tags"], [])
        self.assertNotIn("tags", self.world.send({"type": "lookup", "node_id": self.a}))

    def test_set_tags_refused(self) -> None:
        self.signed(self.alice, {"type": "set_tags", "node_id": self.a, "tags": ["keep"]})
        for tags in ([f"t{i}" for i in range(11)], ["Bad"], ["a b"], ["#"], ["x" * 33], ["-a"], [1], "demo",
                     {"a": 1}, [["a"]], ["x" * 100]):
            reply = self.signed(self.alice, {"type": "set_tags", "node_id": self.a, "tags": tags})
            self.assertError(reply, ErrorCode.invalid_argument)
        self.assertEqual(self.world.node(self.a).tags, ["keep"])

    def test_set_task_exec(self) -> None:
        reply = self.signed(self.alice, {"type": "set_task_exec", "node_id": self.a, "enabled": True})
        self.assertEqual(reply, {"type": "set_task_exec_ok", "node_id": self.a, "task_exec": True})
        self.assertTrue(self.world.send({"type": "lookup", "node_id": self.a})["task_exec"])
        reply = self.signed(self.alice, {"type": "set_task_exec", "node_id": self.a, "enabled": False})
        self.assertEqual(reply["task_exec"], False)
        self.assertNotIn("task_exec", self.world.send({"type": "lookup", "node_id": self.a}))

    def test_heartbeat(self) -> None:
        self.world.advance(12.75)
        reply = self.signed(self.alice, {"type": "heartbeat", "node_id": self.a})
        self.assertEqual(reply, {"type": "heartbeat_ok", "time": int(T0 + 12.75)})
        self.assertIsInstance(reply["time"], int)
        self.assertEqual(self.world.node(self.a).last_seen, T0 + 12.75)

    def test_heartbeat_unknown_node(self) -> None:
        reply = self.signed(self.alice, {"type": "heartbeat", "node_id": 4242})
        self.assertError(reply, ErrorCode.not_found)

    def test_deregister(self) -> None:
        self.signed(self.alice, {"type": "set_hostname", "node_id": self.a, "hostname": "alice"})
        reply = self.signed(self.alice, {"type": "deregister", "node_id": self.a})
        self.assertEqual(reply, {"type": "deregister_ok"})
        self.assertNotIn(self.a, self.world.registry.state.nodes)
        self.assertError(self.world.send({"type": "lookup", "node_id": self.a}), ErrorCode.not_found)
        self.assertError(self.world.send({"type": "resolve_hostname", "hostname": "alice"}),
                         ErrorCode.not_found)
        # the key keeps its id
        self.assertEqual(self.world.registry.state.key_index[self.alice.public_key], self.a)
        self.assertEqual(self.world.register(self.alice)["node_id"], self.a)

    def test_deregister_unknown(self) -> None:
        self.assertEqual(self.world.send({"type": "deregister", "node_id": 99999}), {"type": "deregister_ok"})

    def test_deregister_needs_the_nodes_key(self) -> None:
        reply = self.world.send(self.world.legacy(self.bob, {"type": "deregister", "node_id": self.a}))
        self.assertError(reply, ErrorCode.unauthorized)
        self.assertError(self.world.send({"type": "deregister", "node_id": self.a}), ErrorCode.unauthorized)
        self.assertIn(self.a, self.world.registry.state.nodes)

    def test_rotate_key(self) -> None:
        new = ident(3)
        reply = self.signed(self.alice, rotation(self.a, self.alice, new))
        self.assertEqual(reply, {"type": "rotate_key_ok", "node_id": self.a,
                                 "address": str(Address(0, self.a)),
                                 "public_key": new.public_key_b64})
        self.assertEqual(self.world.node(self.a).public_key, new.public_key)
        # the new key signs from now on, the old one no longer does
        self.assertOk(self.signed(new, {"type": "heartbeat", "node_id": self.a}), "heartbeat")
        self.assertError(self.signed(self.alice, {"type": "heartbeat", "node_id": self.a}),
                         ErrorCode.unauthorized)
        self.assertEqual(self.world.send({"type": "lookup", "node_id": self.a})["public_key"],
                         new.public_key_b64)
        # the new key re-registers to the same node; the old key is a stranger now
        self.assertEqual(self.world.register(new)["node_id"], self.a)
        self.assertNotIn(self.alice.public_key, self.world.registry.state.key_index)
        self.assertNotEqual(self.world.register(self.alice, OTHER_PEER)["node_id"], self.a)

    def test_rotate_key_without_proof_of_possession(self) -> None:
        # the attack: alice rotates to carol's key before carol registers, so that
        # carol, when she starts, would be given alice's id
        carol = ident(3)
        reply = self.signed(self.alice, {"type": "rotate_key", "node_id": self.a,
                                         "new_public_key": carol.public_key_b64})
        self.assertError(reply, ErrorCode.unauthorized)
        self.assertIn("new_key_proof", reply["error"])
        # a proof by the wrong key, for another node, over another old key, or garbage
        for bad in (rotation(self.a, self.alice, self.alice)["new_key_proof"],
                    rotation(self.b, self.alice, carol)["new_key_proof"],
                    rotation(self.a, self.bob, carol)["new_key_proof"],
                    "AAAA", 7, ""):
            msg = {**rotation(self.a, self.alice, carol), "new_key_proof": bad}
            self.assertError(self.signed(self.alice, msg), ErrorCode.unauthorized)
        self.assertEqual(self.world.node(self.a).public_key, self.alice.public_key)
        self.assertNotEqual(self.world.register(carol, OTHER_PEER)["node_id"], self.a)

    def test_rotate_key_signed_by_new_key_refused(self) -> None:
        new = ident(3)
        reply = self.signed(new, {"type": "rotate_key", "node_id": self.a,
                                  "new_public_key": new.public_key_b64})
        self.assertError(reply, ErrorCode.unauthorized)
        self.assertEqual(self.world.node(self.a).public_key, self.alice.public_key)

    def test_rotate_to_a_key_held_by_another_node(self) -> None:
        reply = self.signed(self.alice, {"type": "rotate_key", "node_id": self.a,
                                         "new_public_key": self.bob.public_key_b64})
        self.assertError(reply, ErrorCode.already_exists)
        # also a key whose node is gone but which keeps its id
        self.signed(self.bob, {"type": "deregister", "node_id": self.b})
        reply = self.signed(self.alice, {"type": "rotate_key", "node_id": self.a,
                                         "new_public_key": self.bob.public_key_b64})
        self.assertError(reply, ErrorCode.already_exists)
        self.assertEqual(self.world.node(self.a).public_key, self.alice.public_key)

    def test_rotate_key_bad_new_key(self) -> None:
        for key in (None, "", "AAAA", 5, b64encode(b"\x00" * 31)):
            msg = {"type": "rotate_key", "node_id": self.a}
            if key is not None:
                msg["new_public_key"] = key
            self.assertError(self.signed(self.alice, msg), ErrorCode.invalid_argument)

    def test_report_and_revoke_trust(self) -> None:
        reply = self.signed(self.alice, {"type": "report_trust", "node_id": self.a, "peer_id": self.b})
        self.assertEqual(reply, {"type": "report_trust_ok"})
        self.assertEqual(self.world.registry.state.trust, {(self.a, self.b)})
        reply = self.signed(self.alice, {"type": "revoke_trust", "node_id": self.a, "peer_id": self.b})
        self.assertEqual(reply, {"type": "revoke_trust_ok"})
        self.assertEqual(self.world.registry.state.trust, set())

    def test_revoke_without_pair(self) -> None:
        reply = self.signed(self.alice, {"type": "revoke_trust", "node_id": self.a, "peer_id": self.b})
        self.assertError(reply, ErrorCode.not_found)

    def test_report_trust_in_oneself(self) -> None:
        reply = self.signed(self.alice, {"type": "report_trust", "node_id": self.a, "peer_id": self.a})
        self.assertError(reply)
        self.assertEqual(self.world.registry.state.trust, set())

    def test_list_nodes_refused(self) -> None:
        self.assertError(self.world.send({"type": "list_nodes", "network_id": 0}), ErrorCode.invalid_argument)
        self.assertError(self.world.send({"type": "list_nodes"}), ErrorCode.invalid_argument)
        self.assertError(self.world.send({"type": "list_nodes", "network_id": 5}), ErrorCode.not_found)

    def test_list_networks(self) -> None:
        reply = self.world.send({"type": "list_networks"})
        self.assertEqual(reply, {"type": "list_networks_ok", "networks": [
            {"id": 0, "name": "backbone", "members": 2, "join_rule": "open"}]})

    def test_polo_score(self) -> None:
        want = {"node_id": self.a, "address": str(Address(0, self.a))}
        self.assertEqual(self.world.send({"type": "get_polo_score", "node_id": self.a}),
                         {"type": "get_polo_score_ok", **want, "polo_score": 0})
        self.assertEqual(self.world.send({"type": "update_polo_score", "node_id": self.a, "delta": 5}),
                         {"type": "update_polo_score_ok", **want, "polo_score": 5})
        self.assertEqual(self.world.send({"type": "update_polo_score", "node_id": self.a, "delta": -7}),
                         {"type": "update_polo_score_ok", **want, "polo_score": -2})
        self.assertEqual(self.world.send({"type": "set_polo_score", "node_id": self.a, "polo_score": 40}),
                         {"type": "set_polo_score_ok", **want, "polo_score": 40})
        self.assertEqual(self.world.send({"type": "get_polo_score", "node_id": self.a})["polo_score"], 40)
        self.assertEqual(self.world.send({"type": "lookup", "node_id": self.a})["polo_score"], 40)

    def test_polo_score_refused(self) -> None:
        for msg in ({"type": "update_polo_score", "node_id": self.a},
                    {"type": "update_polo_score", "node_id": self.a, "delta": "5"},
                    {"type": "update_polo_score", "node_id": self.a, "delta": True},
                    {"type": "update_polo_score", "node_id": self.a, "delta": 1e300},
                    {"type": "set_polo_score", "node_id": self.a},
                    {"type": "set_polo_score", "node_id": self.a, "polo_score": 1 << 31},
                    {"type": "set_polo_score", "node_id": self.a, "polo_score": [1]},
                    {"type": "get_polo_score", "node_id": 31337},
                    {"type": "update_polo_score", "node_id": 31337, "delta": 1}):
            self.assertError(self.world.send(msg))
        self.assertEqual(self.world.node(self.a).polo_score, 0)

    def test_polo_score_saturates(self) -> None:
        self.world = Pair(NO_LIMITS).world
        for _ in range(3000):
            self.world.send({"type": "update_polo_score", "node_id": self.a, "delta": 1e6})
        self.assertEqual(self.world.node(self.a).polo_score, (1 << 31) - 1)

    def test_networks_are_wip(self) -> None:
        for kind in ("create_network", "join_network", "leave_network"):
            reply = self.world.send(self.world.legacy(self.alice, {"type": "heartbeat", "node_id": self.a})
                                    | {"type": kind, "name": "lab", "join_rule": "open", "network_id": 1})
            self.assertError(reply)

    def test_beacons(self) -> None:
        reply = self.world.send({"type": "beacon_register", "beacon_id": 7, "addr": "192.0.2.1:9001"})
        self.assertEqual(reply, {"type": "beacon_register_ok", "beacon_id": 7})
        self.world.advance(30)
        self.world.send({"type": "beacon_register", "beacon_id": 8, "addr": "192.0.2.2:9001"})
        self.assertEqual(self.world.send({"type": "beacon_list"}), {"type": "beacon_list_ok", "beacons": [
            {"id": 7, "addr": "192.0.2.1:9001"}, {"id": 8, "addr": "192.0.2.2:9001"}]})
        self.world.advance(31)  # beacon 7 is 61 s old
        self.assertEqual(self.world.send({"type": "beacon_list"})["beacons"],
                         [{"id": 8, "addr": "192.0.2.2:9001"}])
        # re-registering refreshes
        self.world.send({"type": "beacon_register", "beacon_id": 7, "addr": "192.0.2.1:9001"})
        self.assertEqual([b["id"] for b in self.world.send({"type": "beacon_list"})["beacons"]], [7, 8])
        self.world.advance(BEACON_TTL + 1)
        self.assertEqual(self.world.send({"type": "beacon_list"})["beacons"], [])
        self.world.registry.reap()
        self.assertEqual(self.world.registry.beacons, {})

    def test_beacon_register_refused(self) -> None:
        for msg in ({"type": "beacon_register", "beacon_id": 0, "addr": "192.0.2.1:9001"},
                    {"type": "beacon_register", "addr": "192.0.2.1:9001"},
                    {"type": "beacon_register", "beacon_id": 7},
                    {"type": "beacon_register", "beacon_id": 7, "addr": 5},
                    {"type": "beacon_register", "beacon_id": "7", "addr": "192.0.2.1:9001"}):
            self.assertError(self.world.send(msg))
        self.assertEqual(self.world.send({"type": "beacon_list"})["beacons"], [])

    def test_beacon_table_bounded(self) -> None:
        for i in range(1, 1100):
            self.world.send({"type": "beacon_register", "beacon_id": i, "addr": "192.0.2.1:9001"})
        self.assertLessEqual(len(self.world.registry.beacons), 1024)

    def test_subscribe_replication(self) -> None:
        self.assertError(self.world.send({"type": "subscribe_replication", "token": "secret"}))
        self.assertError(self.world.send({"type": "subscribe_replication"}))

    def test_unknown_type(self) -> None:
        for msg in ({"type": "frobnicate"}, {"type": ""}, {"type": "register_ok"}, {"type": "error"},
                    {"type": "Register"}, {"type": "x" * 10_000}, {"type": "__init__"}, {"type": "handle"},
                    {"type": "_need", "node_id": 1}, {"type": "networks_wip"}, {"type": "touch"}):
            self.assertError(self.world.send(msg), ErrorCode.invalid_argument)
        odd: list[dict[str, Any]] = [{}, {"type": None}, {"type": 5}, {"type": ["register"]},
                                     {"type": {"register": 1}}, {"node_id": self.a}]
        for odd_msg in odd:
            reply = self.world.registry.handle(odd_msg, PEER)
            self.assertError(reply, ErrorCode.invalid_argument)

    def test_error_replies_are_well_formed(self) -> None:
        """Every way of failing gives {"type": "error", "error": str, "code": str}."""
        w, alice = self.world, self.alice
        failing: list[dict[str, Any]] = [
            {"type": "nope"},
            {"type": "register"},
            {"type": "lookup", "node_id": 9},
            {"type": "lookup", "node_id": "x"},
            {"type": "resolve", "requester_id": self.a, "node_id": self.b},
            w.legacy(alice, {"type": "resolve", "requester_id": self.a, "node_id": self.b}),
            w.legacy(alice, {"type": "set_hostname", "node_id": self.a, "hostname": "BAD"}),
            w.legacy(alice, {"type": "revoke_trust", "node_id": self.a, "peer_id": self.b}),
            {"type": "create_network"},
            {"type": "subscribe_replication"},
            {"type": "subscribe_events", "node_id": self.a},
            {"type": "list_nodes", "network_id": 0},
        ]
        for msg in failing:
            reply = w.send(msg)
            self.assertError(reply)
            self.assertEqual(set(reply), {"type", "error", "code"})
            json.dumps(reply)


# --- rate limits ---------------------------------------------------------------------------

class RateLimitTests(RegistryTestCase):
    def test_eleventh_registration_refused(self) -> None:
        world = World()
        for n in range(10):
            self.assertOk(world.register(ident(n + 1)), "register")
        reply = world.register(ident(11))
        self.assertError(reply, ErrorCode.rate_limited)
        self.assertNotIn(node_id_for_key(ident(11).public_key), world.registry.state.nodes)
        # other addresses are not affected
        self.assertOk(world.register(ident(11), OTHER_PEER), "register")

    def test_known_key_still_accepted(self) -> None:
        world = World()
        for n in range(10):
            world.register(ident(n + 1))
        for _ in range(5):
            self.assertOk(world.register(ident(1)), "register")
        # a key whose node is gone but whose id is remembered is known too
        world.send(world.legacy(ident(2), {"type": "deregister",
                                           "node_id": node_id_for_key(ident(2).public_key)}))
        self.assertOk(world.register(ident(2)), "register")

    def test_refill(self) -> None:
        world = World()
        for n in range(10):
            world.register(ident(n + 1))
        world.advance(5)
        self.assertError(world.register(ident(11)), ErrorCode.rate_limited)
        world.advance(1.5)  # 6.5 s: one registration's worth
        self.assertOk(world.register(ident(11)), "register")
        self.assertError(world.register(ident(12)), ErrorCode.rate_limited)
        world.advance(60)
        for n in range(12, 22):
            self.assertOk(world.register(ident(n)), "register")
        self.assertError(world.register(ident(22)), ErrorCode.rate_limited)

    def test_registration_limit_configurable(self) -> None:
        world = World(RegistryConfig(registrations_per_minute=2))
        self.assertOk(world.register(ident(1)), "register")
        self.assertOk(world.register(ident(2)), "register")
        self.assertError(world.register(ident(3)), ErrorCode.rate_limited)

    def test_registration_limit_disabled(self) -> None:
        world = World(RegistryConfig(registrations_per_minute=0))
        for n in range(50):
            self.assertOk(world.register(ident(n + 1)), "register")

    def test_requests_per_second(self) -> None:
        world = World(RegistryConfig(requests_per_second=2, request_burst=3))
        replies = [world.send({"type": "list_networks"}) for _ in range(5)]
        self.assertEqual([r["type"] for r in replies], ["list_networks_ok"] * 3 + ["error"] * 2)
        self.assertError(replies[-1], ErrorCode.rate_limited)
        # per address
        self.assertOk(world.send({"type": "list_networks"}, OTHER_PEER), "list_networks")
        # every kind of request counts, unknown ones too
        world.advance(1)
        self.assertOk(world.send({"type": "list_networks"}), "list_networks")
        self.assertError(world.send({"type": "bogus"}), ErrorCode.invalid_argument)
        self.assertError(world.send({"type": "list_networks"}), ErrorCode.rate_limited)
        world.advance(0.5)
        self.assertOk(world.send({"type": "list_networks"}), "list_networks")

    def test_requests_limit_disabled(self) -> None:
        world = World(RegistryConfig(requests_per_second=0))
        for _ in range(5000):
            self.assertOk(world.send({"type": "list_networks"}), "list_networks")

    def test_default_limits_allow_normal_use(self) -> None:
        world = World()
        for _ in range(2000):
            self.assertOk(world.send({"type": "list_networks"}), "list_networks")
        self.assertError(world.send({"type": "list_networks"}), ErrorCode.rate_limited)


# --- expiry --------------------------------------------------------------------------------

class ExpiryTests(RegistryTestCase):
    def test_reap_removes_silent_nodes(self) -> None:
        world = World()
        alice, bob = ident(1), ident(2)
        a = world.join(alice, hostname="alice")
        world.advance(100)
        b = world.join(bob, OTHER_PEER)
        world.advance(80)  # alice silent 180 s: not more than stale_after yet
        self.assertEqual(world.registry.reap(), [])
        world.advance(1)
        changes = world.changes
        self.assertEqual(world.registry.reap(), [a])
        self.assertEqual(world.changes, changes + 1)
        self.assertEqual(set(world.registry.state.nodes), {b})
        # the hostname is free
        self.assertError(world.send({"type": "resolve_hostname", "hostname": "alice"}), ErrorCode.not_found)
        self.assertEqual(world.register(bob, OTHER_PEER, hostname="alice")["hostname"], "alice")
        # the key keeps its id
        self.assertEqual(world.registry.state.key_index[alice.public_key], a)
        self.assertEqual(world.join(alice), a)

    def test_dead_keys_are_forgotten(self) -> None:
        """A key whose node left more than key_retention ago leaves memory and the store, with its state."""
        world = World(RegistryConfig(key_retention=3600))
        alice, bob, carol = ident(1), ident(2), ident(3)
        a = world.join(alice)
        b = world.join(bob, OTHER_PEER, auth=True)
        c = world.join(carol, OTHER_PEER)
        world.send(world.legacy(alice, {"type": "report_trust", "node_id": a, "peer_id": b}))
        world.send(world.legacy(bob, {"type": "report_trust", "node_id": b, "peer_id": a}))
        world.send(world.authed(bob, {"type": "deregister", "node_id": b}))
        state = world.registry.state
        self.assertEqual(state.gone, {b: T0})
        for _ in range(4):  # alice and carol stay; bob's key stays for the retention
            world.advance(900)
            world.send(world.legacy(alice, {"type": "heartbeat", "node_id": a}))
            world.send(world.legacy(carol, {"type": "heartbeat", "node_id": c}))
            world.registry.reap()
        self.assertIn(bob.public_key, state.key_index)
        world.advance(1)
        world.registry.reap()
        self.assertNotIn(bob.public_key, state.key_index)
        self.assertNotIn(b, state.id_keys)
        self.assertNotIn(b, state.auth_ts)
        self.assertNotIn(b, state.proven)
        self.assertEqual(state.trust, set())
        self.assertEqual(state.gone, {})
        self.assertNotIn(b64encode(bob.public_key), json.dumps(state.to_json()))
        self.assertEqual(world.registry.counters["keys_forgotten"], 1)
        # bob comes back: a fresh registration (its id is derived from the key again)
        self.assertEqual(world.join(bob, OTHER_PEER), b)
        self.assertNotIn(b, state.proven)

    def test_reaped_and_returning_keys(self) -> None:
        """A reaped node's key is kept for the retention; coming back within it clears the clock."""
        world = World(RegistryConfig(key_retention=600))
        alice = ident(1)
        a = world.join(alice)
        world.advance(181)
        self.assertEqual(world.registry.reap(), [a])
        self.assertEqual(world.registry.state.gone, {a: T0 + 181})
        world.advance(300)
        self.assertEqual(world.join(alice), a)
        self.assertEqual(world.registry.state.gone, {})
        world.advance(181)
        world.registry.reap()
        world.advance(601)
        world.registry.reap()
        self.assertEqual((world.registry.state.key_index, world.registry.state.gone), ({}, {}))

    def test_reference_store_dead_keys_get_the_full_retention(self) -> None:
        state = RegistryState()
        state.index_key(ident(1).public_key, 7)  # a key with no node, as a reference store may hold
        world = World(RegistryConfig(key_retention=600), state=RegistryState.from_json(state.to_json()))
        self.assertEqual(world.registry.state.gone, {7: T0})
        world.advance(601)
        world.registry.reap()
        self.assertEqual(world.registry.state.key_index, {})

    def test_reap_nothing_is_no_change(self) -> None:
        world = World()
        world.join(ident(1))
        changes = world.changes
        self.assertEqual(world.registry.reap(), [])
        self.assertEqual(world.changes, changes)

    def test_heartbeats_keep_alive(self) -> None:
        world = World()
        alice = ident(1)
        a = world.join(alice)
        for _ in range(20):
            world.advance(30)
            self.assertOk(world.send(world.legacy(alice, {"type": "heartbeat", "node_id": a})), "heartbeat")
            self.assertEqual(world.registry.reap(), [])
        self.assertIn(a, world.registry.state.nodes)
        world.advance(181)
        self.assertEqual(world.registry.reap(), [a])

    def test_configurable_stale_after(self) -> None:
        world = World(RegistryConfig(stale_after=10))
        a = world.join(ident(1))
        world.advance(11)
        self.assertEqual(world.registry.reap(), [a])

    def test_loaded_nodes_get_a_grace_period(self) -> None:
        state = RegistryState()
        state.nodes[7] = Node(id=7, public_key=ident(1).public_key, real_addr="192.0.2.1:4000",
                              last_seen=T0 - 86400)
        state.rebuild_indexes()
        world = World(state=RegistryState.from_json(state.to_json()))
        self.assertEqual(world.registry.reap(), [])
        world.advance(179)
        self.assertEqual(world.registry.reap(), [])
        world.advance(2)
        self.assertEqual(world.registry.reap(), [7])

    def test_vector_store_grace_period(self) -> None:
        store = load_vector("go-session-2", "registry-store.json")
        world = World(state=RegistryState.from_json(store))  # the store is from 2026; the clock says T0
        self.assertEqual(world.registry.reap(), [])
        self.assertEqual(world.node(1).hostname, "agent-a")


class LoadedStateTests(RegistryTestCase):
    def test_duplicate_hostnames_in_a_store(self) -> None:
        """
        A damaged store may give two nodes one hostname; whatever the registry
        does with it, the name must keep resolving to a node that holds it,
        and never end up held by a third.
        """
        key5, key6 = ident(5).public_key_b64, ident(6).public_key_b64
        store = {"nodes": {"5": {"id": 5, "public_key": key5, "hostname": "dup", "networks": [0]},
                           "6": {"id": 6, "public_key": key6, "hostname": "dup", "networks": [0]}}}
        world = World(state=RegistryState.from_json(store))
        holders = {n.id for n in world.registry.state.nodes.values() if n.hostname == "dup"}
        reply = world.send({"type": "resolve_hostname", "hostname": "dup"})
        self.assertIn(reply["node_id"], holders)
        # the node the index does not point at leaves
        other = ({5, 6} - {reply["node_id"]}).pop()
        world.send(world.legacy(ident(other), {"type": "deregister", "node_id": other}))
        survivor = ({5, 6} - {other}).pop()
        if world.node(survivor).hostname == "dup":
            self.assertEqual(world.send({"type": "resolve_hostname", "hostname": "dup"}).get("node_id"),
                             survivor)
            third = world.join(ident(7), hostname="dup")
            self.assertNotEqual(world.node(third).hostname, "dup")

    def test_loaded_state_round_trips_through_the_registry(self) -> None:
        p = Pair()
        w = p.world
        w.send(w.legacy(p.alice, {"type": "set_hostname", "node_id": p.a, "hostname": "alice"}))
        w.send(w.legacy(p.alice, {"type": "report_trust", "node_id": p.a, "peer_id": p.b}))
        w.send(w.authed(p.bob, {"type": "heartbeat", "node_id": p.b}))
        state = RegistryState.from_json(json.loads(json.dumps(w.registry.state.to_json())))
        again = World(state=state, now=T0 + 1)  # a restart takes time: ts newer than any before
        self.assertEqual(again.send({"type": "resolve_hostname", "hostname": "alice"})["node_id"], p.a)
        self.assertEqual(again.registry.state.trust, {(p.a, p.b)})
        self.assertEqual(again.registry.state.proven, {p.b})
        self.assertOk(again.send(again.authed(p.bob, {"type": "resolve", "requester_id": p.b,
                                                      "node_id": p.a})),
                      "resolve")
        self.assertError(again.send(again.legacy(p.bob, {"type": "heartbeat", "node_id": p.b})),
                         ErrorCode.unauthorized)
        self.assertEqual(again.register(p.alice, OTHER_PEER)["node_id"], p.a)


# --- persistence hook ----------------------------------------------------------------------------

class OnChangeTests(RegistryTestCase):
    def setUp(self) -> None:
        p = Pair()
        self.world, self.alice, self.bob, self.a, self.b = p.world, p.alice, p.bob, p.a, p.b

    def changes_for(self, msg: dict[str, Any], peer: Peer = PEER) -> int:
        before = self.world.changes
        reply = self.world.send(msg, peer)
        self.assertNotEqual(reply["type"], "error", reply)
        return self.world.changes - before

    def test_registration(self) -> None:
        self.assertEqual(self.world.changes, 2)  # two new nodes
        self.assertGreaterEqual(self.changes_for({"type": "register", "public_key": ident(9).public_key_b64,
                                                  "listen_addr": "203.0.113.4:5"}), 1)

    def test_persistent_changes(self) -> None:
        w, alice, bob, a, b = self.world, self.alice, self.bob, self.a, self.b
        for msg in (
            w.legacy(alice, {"type": "set_hostname", "node_id": a, "hostname": "alice"}),
            w.legacy(alice, {"type": "set_hostname", "node_id": a, "hostname": ""}),
            w.legacy(alice, {"type": "set_visibility", "node_id": a, "public": True}),
            w.legacy(alice, {"type": "set_tags", "node_id": a, "tags": ["x"]}),
            w.legacy(alice, {"type": "set_task_exec", "node_id": a, "enabled": True}),
            w.legacy(alice, {"type": "report_trust", "node_id": a, "peer_id": b}),
            w.legacy(alice, {"type": "revoke_trust", "node_id": a, "peer_id": b}),
            w.legacy(alice, {"type": "request_handshake", "from_node_id": a, "to_node_id": b,
                             "justification": "hi"}),
            w.legacy(bob, {"type": "poll_handshakes", "node_id": b}),
            w.legacy(bob, {"type": "respond_handshake", "node_id": b, "peer_id": a, "accept": True}),
            w.legacy(alice, {"type": "poll_handshakes", "node_id": a}),
            w.legacy(alice, rotation(a, alice, ident(5))),
            {"type": "update_polo_score", "node_id": b, "delta": 3},
            {"type": "set_polo_score", "node_id": b, "polo_score": 3},
            w.legacy(bob, {"type": "deregister", "node_id": b}),
        ):
            self.assertGreaterEqual(self.changes_for(msg), 1, msg["type"])

    def test_no_change(self) -> None:
        w, alice, a, b = self.world, self.alice, self.a, self.b
        w.send(w.legacy(self.bob, {"type": "report_trust", "node_id": b, "peer_id": a}))
        w.send(w.legacy(self.bob, {"type": "set_hostname", "node_id": b, "hostname": "bob"}))
        for msg in (
            w.legacy(alice, {"type": "heartbeat", "node_id": a}),
            {"type": "lookup", "node_id": a},
            w.legacy(alice, {"type": "resolve", "requester_id": a, "node_id": b}),
            {"type": "resolve_hostname", "hostname": "bob"},
            w.legacy(alice, {"type": "poll_handshakes", "node_id": a}),  # nothing queued
            {"type": "get_polo_score", "node_id": a},
            {"type": "list_networks"},
            {"type": "beacon_register", "beacon_id": 3, "addr": "192.0.2.1:9001"},
            {"type": "beacon_list"},
            {"type": "deregister", "node_id": 4321},
            # setting what is already set
            w.legacy(alice, {"type": "set_visibility", "node_id": a, "public": False}),
            w.legacy(alice, {"type": "set_tags", "node_id": a, "tags": []}),
            w.legacy(alice, {"type": "set_hostname", "node_id": a, "hostname": ""}),
            w.legacy(self.bob, {"type": "report_trust", "node_id": b, "peer_id": a}),
        ):
            self.assertEqual(self.changes_for(msg), 0, msg["type"])

    def test_refused_requests_change_nothing(self) -> None:
        w = self.world
        before = w.changes
        w.send({"type": "set_hostname", "node_id": self.a, "hostname": "x"})
        w.send(w.legacy(self.bob, {"type": "set_visibility", "node_id": self.a, "public": True}))
        w.send(w.legacy(self.alice, {"type": "set_tags", "node_id": self.a, "tags": ["BAD"]}))
        w.send({"type": "register", "public_key": "AAAA"})
        self.assertEqual(w.changes, before)
        self.assertFalse(w.node(self.a).public)


# --- hostile input -------------------------------------------------------------------------

#: Values of the wrong type or range for a field holding a node id (a u32).
BAD_IDS: list[Any] = ["1", "", "0x1", 1.5, -1, -0.5, 1 << 32, 1 << 64, 10 ** 100, 1e300, -1e300, True, False,
                      [], [1], {}, {"id": 1}, "9" * 100_000]
BAD_STRINGS: list[Any] = [1, 1.5, -1, True, False, [], ["x"], {}, {"s": "x"}, "x" * 100_000]
BAD_BOOLS: list[Any] = ["true", "false", 1, 0, 1.0, [], {}, "x" * 100_000]
BAD_NUMBERS: list[Any] = ["1", True, [], {}, [1], {"n": 1}, 10 ** 100, 1e300, -1e300, "x" * 100_000]
BAD_TAGS: list[Any] = ["demo", 5, True, {}, {"a": 1}, [1], [None], [["a"]], [{}], ["x" * 100_000], ["A"],
                       ["x"] * 1000]

#: For each field: what it holds.
FIELD_KIND = {
    "node_id": "id", "requester_id": "id", "peer_id": "id", "from_node_id": "id", "to_node_id": "id",
    "node_a": "id", "node_b": "id", "network_id": "id", "beacon_id": "id",
    "hostname": "str", "listen_addr": "str", "owner": "str", "justification": "str", "addr": "str",
    "public_key": "str", "new_public_key": "str", "token": "str",
    "public": "bool", "enabled": "bool", "accept": "bool",
    "delta": "number", "polo_score": "number", "tags": "tags",
}
BAD_VALUES = {"id": BAD_IDS, "str": BAD_STRINGS, "bool": BAD_BOOLS, "number": BAD_NUMBERS, "tags": BAD_TAGS}


class Scene:
    """Three nodes (a trusts b, b trusts a, c is private), a valid request of every type."""

    def __init__(self) -> None:
        self.world = World(NO_LIMITS)
        w = self.world
        self.alice, self.bob, self.carol = ident(1), ident(2), ident(3)
        self.a = w.join(self.alice, listen="0.0.0.0:4001")
        self.b = w.join(self.bob, OTHER_PEER, listen="0.0.0.0:4002", hostname="bob")
        self.c = w.join(self.carol, Peer("192.0.2.99", 1), listen="0.0.0.0:4003")
        w.send(w.legacy(self.alice, {"type": "report_trust", "node_id": self.a, "peer_id": self.b}))
        w.send(w.legacy(self.bob, {"type": "report_trust", "node_id": self.b, "peer_id": self.a}))
        w.send(w.legacy(self.carol, {"type": "request_handshake", "from_node_id": self.c,
                                     "to_node_id": self.b,
                                     "justification": "hello"}))

    def valid(self, kind: str) -> tuple[dict[str, Any], set[str]]:
        """A valid request of this type, and its required fields."""
        w, a, b, c = self.world, self.a, self.b, self.c
        alice, bob = self.alice, self.bob
        table: dict[str, tuple[Callable[[], dict[str, Any]], set[str]]] = {
            "register": (lambda: {"type": "register", "public_key": ident(7).public_key_b64,
                                  "listen_addr": "203.0.113.4:5", "owner": "o", "hostname": "seven"},
                         {"public_key"}),
            "lookup": (lambda: {"type": "lookup", "node_id": a}, {"node_id"}),
            "resolve": (lambda: w.legacy(alice, {"type": "resolve", "requester_id": a, "node_id": b}),
                        {"node_id", "requester_id", "signature"}),
            "resolve_hostname": (lambda: {"type": "resolve_hostname", "hostname": "bob"}, {"hostname"}),
            "set_hostname": (lambda: w.legacy(alice, {"type": "set_hostname", "node_id": a,
                                                      "hostname": "al"}),
                             {"node_id", "signature"}),
            "set_visibility": (lambda: w.legacy(alice, {"type": "set_visibility", "node_id": a,
                                                        "public": True}),
                               {"node_id", "public", "signature"}),
            "set_tags": (lambda: w.legacy(alice, {"type": "set_tags", "node_id": a, "tags": ["x"]}),
                         {"node_id", "signature"}),
            "set_task_exec": (lambda: w.legacy(alice, {"type": "set_task_exec", "node_id": a,
                                                       "enabled": True}),
                              {"node_id", "enabled", "signature"}),
            "heartbeat": (lambda: w.legacy(alice, {"type": "heartbeat", "node_id": a}),
                          {"node_id", "signature"}),
            "deregister": (lambda: w.legacy(alice, {"type": "deregister", "node_id": a}),
                           {"node_id", "signature"}),
            "rotate_key": (lambda: w.legacy(alice, rotation(a, alice, ident(8))),
                           {"node_id", "new_public_key", "new_key_proof", "signature"}),
            "report_trust": (lambda: w.legacy(alice, {"type": "report_trust", "node_id": a, "peer_id": c}),
                             {"node_id", "peer_id", "signature"}),
            "revoke_trust": (lambda: w.legacy(alice, {"type": "revoke_trust", "node_id": a, "peer_id": b}),
                             {"node_id", "peer_id", "signature"}),
            "request_handshake": (lambda: w.legacy(alice, {"type": "request_handshake", "from_node_id": a,
                                                           "to_node_id": c, "justification": "hi"}),
                                  {"from_node_id", "to_node_id", "signature"}),
            "poll_handshakes": (lambda: w.legacy(bob, {"type": "poll_handshakes", "node_id": b}),
                                {"node_id", "signature"}),
            "respond_handshake": (lambda: w.legacy(bob, {"type": "respond_handshake", "node_id": b,
                                                         "peer_id": c,
                                                         "accept": True}),
                                  {"node_id", "peer_id", "accept", "signature"}),
            "punch": (lambda: w.legacy(alice, {"type": "punch", "requester_id": a, "node_a": a, "node_b": b}),
                      {"requester_id", "node_a", "node_b", "signature"}),
            "list_nodes": (lambda: {"type": "list_nodes", "network_id": 0}, set()),
            "list_networks": (lambda: {"type": "list_networks"}, set()),
            "get_polo_score": (lambda: {"type": "get_polo_score", "node_id": a}, {"node_id"}),
            "update_polo_score": (lambda: {"type": "update_polo_score", "node_id": a, "delta": 1},
                                  {"node_id", "delta"}),
            "set_polo_score": (lambda: {"type": "set_polo_score", "node_id": a, "polo_score": 1},
                               {"node_id", "polo_score"}),
            "create_network": (lambda: {"type": "create_network", "node_id": a, "name": "n",
                                        "join_rule": "open"},
                               set()),
            "join_network": (lambda: {"type": "join_network", "node_id": a, "network_id": 1}, set()),
            "leave_network": (lambda: {"type": "leave_network", "node_id": a, "network_id": 1}, set()),
            "beacon_register": (lambda: {"type": "beacon_register", "beacon_id": 5, "addr": "192.0.2.1:9001"},
                                {"beacon_id", "addr"}),
            "beacon_list": (lambda: {"type": "beacon_list"}, set()),
            "subscribe_replication": (lambda: {"type": "subscribe_replication", "token": "t"}, set()),
            "replication_promote": (lambda: {"type": "replication_promote", "token": "t"}, set()),
            "replication_ack": (lambda: {"type": "replication_ack", "seq": 1}, set()),
            "subscribe_events": (lambda: w.authed(alice, {"type": "subscribe_events", "node_id": a}),
                                 {"node_id", "auth"}),
            "search_nodes": (lambda: w.authed(alice, {"type": "search_nodes", "requester_id": a,
                                                      "query": "b"}),
                             {"requester_id", "query", "auth"}),
            "put_trust_statements": (lambda: w.authed(alice, {
                "type": "put_trust_statements", "node_id": a, "statements": [make_statement(
                    a, alice.public_key, b, bob.public_key, 1, 1, False, alice.sign).encode()]}),
                {"node_id", "statements", "auth"}),
            "get_trust_statements": (lambda: w.authed(alice, {"type": "get_trust_statements", "node_id": a}),
                                     {"node_id", "auth"}),
        }
        make, required = table[kind]
        return make(), required


#: Types that always fail in this version.
ALWAYS_ERROR = {"list_nodes", "create_network", "join_network", "leave_network", "subscribe_replication",
                "replication_promote", "replication_ack"}
ALL_TYPES = ["register", "lookup", "resolve", "resolve_hostname", "set_hostname", "set_visibility",
             "set_tags", "set_task_exec", "heartbeat", "deregister", "rotate_key", "report_trust",
             "revoke_trust", "request_handshake", "poll_handshakes", "respond_handshake", "punch",
             "list_nodes", "list_networks", "get_polo_score", "update_polo_score", "set_polo_score",
             "create_network", "join_network", "leave_network", "beacon_register", "beacon_list",
             "subscribe_replication", "subscribe_events", "search_nodes", "put_trust_statements",
             "get_trust_statements", "replication_promote", "replication_ack"]


class HostileInputTests(RegistryTestCase):
    def handle(self, world: World, msg: dict[str, Any], problems: list[str], session: Any = None) -> Any:
        try:
            reply = world.registry.handle(copy.deepcopy(msg), PEER, session)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            problems.append(f"{str(msg)[:160]}: raised {type(e).__name__}: {e}")
            return None
        try:
            check_reply_shape(msg, reply)
        except AssertionError as e:
            problems.append(str(e)[:300])
            return None
        return reply

    def test_every_type_has_a_scene(self) -> None:
        from pilot.server.registry import _HANDLERS
        self.assertEqual(set(ALL_TYPES), set(_HANDLERS))

    def test_valid_requests_succeed(self) -> None:
        for kind in ALL_TYPES:
            scene = Scene()
            msg, _ = scene.valid(kind)
            reply = scene.world.send(msg, session=Recorder())
            if kind in ALWAYS_ERROR:
                self.assertError(reply)
            else:
                self.assertOk(reply, kind)

    def test_missing_fields(self) -> None:
        problems: list[str] = []
        for kind in ALL_TYPES:
            scene = Scene()
            msg, required = scene.valid(kind)
            for field in required:
                broken = {k: v for k, v in msg.items() if k != field}
                reply = self.handle(scene.world, broken, problems, Recorder())
                if reply is not None and reply["type"] != "error":
                    problems.append(f"{kind} without {field!r}: {reply}")
                broken = {**msg, field: None}
                reply = self.handle(scene.world, broken, problems, Recorder())
                if reply is not None and reply["type"] != "error":
                    problems.append(f"{kind} with {field!r}: null: {reply}")
        self.assertEqual(problems, [])

    def test_wrong_types(self) -> None:
        """
        Every field of every type, given a value of the wrong type or range:
        an error reply, never an exception.
        """
        problems: list[str] = []
        for kind in ALL_TYPES:
            scene = Scene()
            msg, _ = scene.valid(kind)
            for field in [f for f in msg if f in FIELD_KIND]:
                for bad in BAD_VALUES[FIELD_KIND[field]]:
                    broken = {**msg, field: bad}
                    reply = self.handle(scene.world, broken, problems, Recorder())
                    if reply is None:
                        continue
                    if kind == "register" and field in ("listen_addr", "hostname"):
                        # as the reference: an unusable address falls back to the TCP peer's,
                        # an unusable hostname is skipped (with hostname_error when it is text)
                        continue
                    if reply["type"] != "error":
                        problems.append(f"{kind} with {field}={str(bad)[:40]}: {str(reply)[:160]}")
        self.assertEqual(problems, [])

    def test_bad_auth_objects(self) -> None:
        problems: list[str] = []
        for kind in ALL_TYPES:
            scene = Scene()
            msg, _ = scene.valid(kind)
            good = scene.world.authed(scene.alice, {k: v for k, v in msg.items() if k != "signature"})["auth"]
            for auth in (None, 1, "x", [], [good], {}, {**good, "ts": "1"}, {**good, "ts": 1e300},
                         {**good, "ts": 10 ** 100}, {**good, "ts": -1}, {**good, "nonce": 5},
                         {**good, "nonce": {"a": 1}}, {**good, "sig": ["x"]}, {**good, "sig": "x" * 100_000},
                         {"ts": good["ts"]}):
                self.handle(scene.world, {**msg, "auth": auth}, problems, Recorder())
        self.assertEqual(problems, [])

    def test_huge_and_nested_values_everywhere(self) -> None:
        problems: list[str] = []
        nested: Any = 1
        for _ in range(200):
            nested = {"n": [nested]}
        for kind in ALL_TYPES:
            scene = Scene()
            msg, _ = scene.valid(kind)
            for extra in ({"junk": nested}, {"junk": "x" * 1_000_000}, {"junk": list(range(100_000))},
                          {"x" * 10_000: 1}):
                self.handle(scene.world, {**msg, **extra}, problems, Recorder())
            for field in msg:
                if field == "type":
                    continue
                self.handle(scene.world, {**msg, field: nested}, problems, Recorder())
        self.assertEqual(problems, [])

    def test_no_session(self) -> None:
        problems: list[str] = []
        for kind in ALL_TYPES:
            scene = Scene()
            msg, _ = scene.valid(kind)
            reply = self.handle(scene.world, msg, problems, None)
            if kind == "subscribe_events" and reply is not None:
                self.assertError(reply)
        self.assertEqual(problems, [])

    def test_replies_echoing_client_text_can_be_framed(self) -> None:
        """
        JSON lets a client send a lone surrogate ('\\ud800'); whatever the
        registry stores and sends back must still encode as a frame, for the
        sender and for everyone else who is sent it.
        """
        scene = Scene()
        w = scene.world
        odd = "x\ud800y"
        events = Recorder()
        w.send(w.authed(scene.carol, {"type": "subscribe_events", "node_id": scene.c}), session=events)
        replies = [
            w.send({"type": "beacon_register", "beacon_id": 9, "addr": odd}),
            w.send({"type": "beacon_list"}),
            w.send(w.legacy(scene.alice, {"type": "request_handshake", "from_node_id": scene.a,
                                          "to_node_id": scene.c, "justification": odd})),
            w.send(w.legacy(scene.carol, {"type": "poll_handshakes", "node_id": scene.c})),
            w.send({"type": "resolve_hostname", "hostname": odd}),
            w.send({"type": "lookup", "node_id": odd}),
            w.send({"type": odd}),
            w.send({"type": "register", "public_key": ident(9).public_key_b64, "owner": odd,
                    "hostname": odd}),
        ]
        problems = []
        for message in replies + events.pushed:
            try:
                encode_frame(message)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{str(message)[:120]}: {type(e).__name__}: {e}")
        self.assertEqual(problems, [])


#: The fields each request type reads (and the field naming its signer).
TYPE_FIELDS: dict[str, tuple[str, ...]] = {
    "register": ("public_key", "listen_addr", "owner", "hostname"),
    "lookup": ("node_id",), "resolve": ("requester_id", "node_id"), "resolve_hostname": ("hostname",),
    "set_hostname": ("node_id", "hostname"), "set_visibility": ("node_id", "public"),
    "set_tags": ("node_id", "tags"), "set_task_exec": ("node_id", "enabled"), "heartbeat": ("node_id",),
    "deregister": ("node_id",), "rotate_key": ("node_id", "new_public_key"),
    "report_trust": ("node_id", "peer_id"), "revoke_trust": ("node_id", "peer_id"),
    "request_handshake": ("from_node_id", "to_node_id", "justification"), "poll_handshakes": ("node_id",),
    "respond_handshake": ("node_id", "peer_id", "accept"), "punch": ("requester_id", "node_a", "node_b"),
    "list_nodes": ("network_id",), "list_networks": (), "get_polo_score": ("node_id",),
    "update_polo_score": ("node_id", "delta", "requester_id"),
    "set_polo_score": ("node_id", "polo_score", "requester_id"),
    "create_network": ("node_id", "name", "join_rule"), "join_network": ("node_id", "network_id", "token"),
    "leave_network": ("node_id", "network_id"), "beacon_register": ("beacon_id", "addr"), "beacon_list": (),
    "subscribe_replication": ("token",), "subscribe_events": ("node_id",),
    "replication_promote": ("token",), "replication_ack": ("seq",),
    "search_nodes": ("requester_id", "query"),
    "put_trust_statements": ("node_id", "statements"), "get_trust_statements": ("node_id",),
}
SIGNER = {"resolve": "requester_id", "punch": "requester_id", "search_nodes": "requester_id", "request_handshake": "from_node_id",
          "set_polo_score": "requester_id", "update_polo_score": "requester_id"}


class FuzzTests(RegistryTestCase):
    """A bounded, fixed-seed random walk over every request type."""

    def test_fuzz(self) -> None:
        rng = random.Random(0x5EED)
        world = World(NO_LIMITS)
        people = [ident(n) for n in range(1, 9)]
        by_key = {p.public_key: p for p in people}
        for n, who in enumerate(people[:5]):
            world.join(who, Peer(f"192.0.2.{n + 1}", 1000 + n))
        keys = [p.public_key_b64 for p in people] + [ident(40).public_key_b64]
        extra_fields = list(FIELD_KIND) + ["signature", "auth", "name", "join_rule", "inviter_id",
                                           "admin_token"]
        types = ALL_TYPES + ["", "nope", "register_ok", "event"]
        problems: list[str] = []
        succeeded: set[str] = set()

        def ids() -> list[Any]:
            return list(world.registry.state.nodes) * 3 + list(world.registry.state.id_keys)

        def plausible(field: str) -> Any:
            kind = FIELD_KIND.get(field)
            if kind == "id":
                return rng.choice(ids() * 3 + [0, 1, 2, 7, 0xFFFFFFFF])
            if kind == "bool":
                return rng.choice([True, False])
            if kind == "number":
                return rng.choice([0, 1, -5, 1000, 2.5, -1e6])
            if kind == "tags":
                return rng.sample(["a", "#b", "c-d", "e", "a", "Bad"], rng.randint(0, 5))
            if field in ("public_key", "new_public_key"):
                return rng.choice(keys)
            if field in ("listen_addr", "addr"):
                return rng.choice(["203.0.113.4:5", "[::1]:9", "garbage", ":", "", "203.0.113.4:65536",
                                   "203.0.113.4:\u00b2"])
            if field == "hostname":
                return rng.choice(["alpha", "beta", "", "Bad", "localhost", "x" * 63])
            return rng.choice(["", "x", "hello", "\u00e9\u00e8", "\ud83d\ude00", "x\ud800"])

        def hostile(field: str) -> Any:
            pool = BAD_VALUES.get(FIELD_KIND.get(field, "str"), BAD_STRINGS)
            return copy.deepcopy(rng.choice(pool + [None, 0, -1, "", {}, [], 1 << 40]))

        def signer_for(msg: dict[str, Any]) -> Identity:
            field = SIGNER.get(msg["type"], "node_id")
            named = msg.get(field)
            key = world.registry.state.id_keys.get(named) if isinstance(named, int) else None
            if msg["type"] == "register":
                key = next((p.public_key for p in people if p.public_key_b64 == msg.get("public_key")), None)
            if key in by_key and rng.random() < 0.85:
                return by_key[key]
            return rng.choice(people)

        for i in range(3000):
            kind = rng.choice(types)
            msg: dict[str, Any] = {"type": kind}
            for field in TYPE_FIELDS.get(kind, ()):
                if rng.random() < 0.92:
                    msg[field] = plausible(field) if rng.random() < 0.85 else hostile(field)
            if rng.random() < 0.25:
                field = rng.choice(extra_fields)
                msg[field] = plausible(field) if rng.random() < 0.5 else hostile(field)
            roll = rng.random()
            if roll < 0.45:
                try:
                    if legacy_challenge(msg) is not None:
                        msg = world.legacy(signer_for(msg), msg)
                except Exception:  # noqa: BLE001 - ids the challenge cannot hold
                    pass
            elif roll < 0.8:
                bare = {k: v for k, v in msg.items() if k != "auth"}
                try:
                    msg = world.authed(signer_for(msg), bare, legacy=rng.random() < 0.3)
                except Exception:  # noqa: BLE001 - the legacy challenge needs good ids
                    msg = world.authed(signer_for(msg), bare)
            session = Recorder() if rng.random() < 0.5 else None
            try:
                reply = world.registry.handle(copy.deepcopy(msg), rng.choice([PEER, OTHER_PEER]), session)
            except Exception as e:  # noqa: BLE001
                problems.append(f"#{i} {str(msg)[:200]}: raised {type(e).__name__}: {e}")
                continue
            try:
                check_reply_shape(msg, reply)
                if reply["type"] != "error":
                    succeeded.add(reply["type"])
                encode_frame(reply)
                for pushed in session.pushed if session else ():
                    encode_frame(pushed)
            except (AssertionError, TypeError, ValueError) as e:
                problems.append(f"#{i}: {type(e).__name__}: {str(e)[:200]}")
            if i % 100 == 99:
                world.advance(rng.choice([0.5, 5, 30, 200]))
                world.registry.reap()
                for n, who in enumerate(people[:5]):  # keep some nodes around
                    if rng.random() < 0.7:
                        world.registry.handle(world.authed(who, {"type": "register",
                                                                 "public_key": who.public_key_b64,
                                                                 "listen_addr": "0.0.0.0:4000"}),
                                              Peer(f"192.0.2.{n + 1}", 1))
            if i % 500 == 499:
                try:
                    RegistryState.from_json(json.loads(json.dumps(world.registry.state.to_json())))
                except Exception as e:  # noqa: BLE001
                    problems.append(f"#{i}: state no longer round-trips: {type(e).__name__}: {e}")
        self.assertFalse(problems, "\n".join([f"{len(problems)} problems, the first:"] + problems[:10]))
        # the walk got past the signature checks of most request types
        self.assertGreaterEqual(len(succeeded), 20, sorted(succeeded))
