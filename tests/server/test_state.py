"""
Tests for L{pilot.server.state}: the registry's state and its JSON store, which
is the reference's format (docs/reference-wire.md §2.9) plus keys the reference ignores.
"""

from __future__ import annotations

from tests import capture

import copy
import json
import os
import random
from typing import Any

import attr
from twisted.trial.unittest import SynchronousTestCase

from pilot.persist import dump_json
from pilot.identity import Identity, b64encode
from pilot.server.state import (
    HandshakeRequest, HandshakeResponse, Node, RegistryState, StoreFormatError, parse_time, parse_time_ns,
    rfc3339, rfc3339_ns,
)

T0 = 1.8e9
T0_NS = 1_800_000_000 * 1_000_000_000
KEYS = [Identity.from_seed(bytes([i]) * 32).public_key for i in range(1, 6)]


def vectors_dir() -> str:
    return capture.vectors_dir()


def load_vector(session: str, name: str) -> Any:
    with open(os.path.join(vectors_dir(), session, name), "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def sample_state() -> RegistryState:
    state = RegistryState(created=T0 - 1000)
    state.nodes[7] = Node(id=7, public_key=KEYS[0], real_addr="192.0.2.1:4000", last_seen=T0,
                          hostname="alpha", tags=["demo", "x-1"], public=True, owner="a@example.com",
                          polo_score=-12, task_exec=True)
    state.nodes[1 << 31] = Node(id=1 << 31, public_key=KEYS[1], real_addr="[2001:db8::1]:9", last_seen=T0 - 5)
    state.nodes[0xFFFFFFFE] = Node(id=0xFFFFFFFE, public_key=KEYS[2], last_seen=T0 - 7)
    for node in state.nodes.values():
        state.index_key(node.public_key, node.id)
    state.index_key(KEYS[3], 99)  # a key whose node is gone (deregistered or reaped)
    state.rebuild_indexes()
    state.trust = {(7, 1 << 31), (1 << 31, 7), (7, 99), (0xFFFFFFFE, 7)}
    state.proven = {7, 99}
    state.auth_ts = {7: int(T0 * 1000) + 123, 99: 5}
    state.gone = {99: T0 - 60}
    state.inbox = {7: [HandshakeRequest(99, "please", T0 - 3.25), HandshakeRequest(1 << 31, "", T0 - 1.5)]}
    state.responses = {99: [HandshakeResponse(7, True, T0 - 2.125),
                            HandshakeResponse(1 << 31, False, T0 - 1)]}
    return state


def node_fields(node: Node) -> dict[str, Any]:
    return {f: getattr(node, f) for f in ("id", "public_key", "real_addr", "hostname", "tags", "public",
                                         "owner", "polo_score", "task_exec", "networks")}


class RoundTripTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        state = sample_state()
        text = json.dumps(state.to_json())
        back = RegistryState.from_json(json.loads(text))
        self.assertEqual(set(back.nodes), set(state.nodes))
        for node_id, node in state.nodes.items():
            self.assertEqual(node_fields(back.nodes[node_id]), node_fields(node))
            self.assertEqual(back.nodes[node_id].last_seen, int(node.last_seen))  # second precision
        self.assertEqual(back.key_index, state.key_index)
        self.assertEqual(back.id_keys, state.id_keys)
        self.assertEqual(back.trust, state.trust)
        self.assertEqual(back.proven, state.proven)
        self.assertEqual(back.auth_ts, state.auth_ts)
        self.assertEqual(back.gone, state.gone)
        self.assertEqual(back.hostnames, {"alpha": 7})
        self.assertEqual(back.created, state.created)
        self.assertEqual(set(back.inbox), {7})
        self.assertEqual([(r.from_node_id, r.justification) for r in back.inbox[7]],
                         [(99, "please"), (1 << 31, "")])
        for got, want in zip(back.inbox[7], state.inbox[7]):
            self.assertLessEqual(abs(got.timestamp - want.timestamp), 1e-6)
        self.assertEqual([(r.from_node_id, r.accept) for r in back.responses[99]],
                         [(7, True), (1 << 31, False)])
        for got_r, want_r in zip(back.responses[99], state.responses[99]):
            self.assertLessEqual(abs(got_r.timestamp - want_r.timestamp), 1e-6)
        # and again: a stable fixed point
        self.assertEqual(RegistryState.from_json(back.to_json()).to_json(), back.to_json())

    def test_to_bytes_is_the_compact_json(self) -> None:
        """to_bytes (what the store writer saves) is exactly the compact JSON of to_json, and stays so."""
        state = sample_state()
        for step in range(4):
            self.assertEqual(state.to_bytes(), dump_json(state.to_json(), pretty=False), step)
            node = state.nodes[7]
            if step == 0:
                node.hostname, node.tags = "beta", ["changed", "\u00e9\"quoted"]
            elif step == 1:
                node.last_seen += 5
                del state.nodes[1 << 31]
            elif step == 2:
                state.nodes[3] = Node(id=3, public_key=KEYS[3], real_addr="192.0.2.3:1", last_seen=T0)
        self.assertEqual(json.loads(state.to_bytes())["nodes"]["7"]["tags"], ["changed", "\u00e9\"quoted"])

    def test_reference_shape(self) -> None:
        out = sample_state().to_json()
        self.assertEqual(out["nodes"]["7"], {
            "id": 7, "owner": "a@example.com", "public_key": b64encode(KEYS[0]),
            "real_addr": "192.0.2.1:4000", "networks": [0], "public": True, "last_seen": rfc3339(T0),
            "hostname": "alpha", "tags": ["demo", "x-1"], "polo_score": -12, "task_exec": True})
        # optional fields omitted at their defaults, as the reference does
        self.assertEqual(set(out["nodes"][str(0xFFFFFFFE)]), {"id", "public_key", "networks", "last_seen"})
        self.assertEqual(out["networks"]["0"]["name"], "backbone")
        self.assertEqual(out["networks"]["0"]["join_rule"], "open")
        self.assertEqual(out["networks"]["0"]["members"], sorted(sample_state().nodes))
        self.assertEqual(out["next_net"], 1)
        self.assertGreater(out["next_node"], 0xFFFFFFFE)
        self.assertEqual(out["pub_key_idx"][b64encode(KEYS[3])], 99)
        # trust_pairs: only the mutual edges; trust_edges: every directed edge
        self.assertEqual(out["trust_pairs"], [f"7:{1 << 31}"])
        self.assertEqual(sorted(out["trust_edges"]),
                         sorted(["7>2147483648", "2147483648>7", "7>99", "4294967294>7"]))
        self.assertEqual(out["proven"], [7, 99])
        self.assertEqual(out["auth_ts"], {"7": int(T0 * 1000) + 123, "99": 5})
        self.assertTrue(out["handshake_inbox"]["7"][0]["timestamp"].endswith("Z"))
        self.assertEqual(set(out["handshake_responses"]), {"99"})

    def test_empty_state(self) -> None:
        out = RegistryState(created=T0).to_json()
        for key in ("trust_pairs", "pub_key_idx", "handshake_inbox", "handshake_responses", "trust_edges",
                    "proven", "auth_ts"):
            self.assertNotIn(key, out)
        self.assertEqual(out["nodes"], {})
        back = RegistryState.from_json(out)
        self.assertEqual(back.nodes, {})
        self.assertEqual(back.trust, set())

    def test_empty_queues_omitted(self) -> None:
        state = RegistryState(created=T0)
        state.inbox[5] = []
        state.responses[5] = []
        out = state.to_json()
        self.assertNotIn("handshake_inbox", out)
        self.assertNotIn("handshake_responses", out)

    def test_json_serialisable(self) -> None:
        out = sample_state().to_json()
        self.assertEqual(json.loads(json.dumps(out)), out)

    def test_directed_edges_win_over_pairs(self) -> None:
        out = {"nodes": {}, "trust_pairs": ["1:2"], "trust_edges": ["1>2", "3>1"]}
        self.assertEqual(RegistryState.from_json(out).trust, {(1, 2), (3, 1)})
        out = {"nodes": {}, "trust_pairs": ["1:2"], "trust_edges": []}
        self.assertEqual(RegistryState.from_json(out).trust, set())

    def test_minimal_store(self) -> None:
        state = RegistryState.from_json({})
        self.assertEqual(state.nodes, {})
        self.assertEqual(state.key_index, {})

    def test_node_defaults(self) -> None:
        state = RegistryState.from_json({"nodes": {"5": {"id": 5, "public_key": b64encode(KEYS[0])}}})
        node = state.nodes[5]
        self.assertEqual((node.real_addr, node.hostname, node.tags, node.public, node.owner, node.polo_score,
                          node.task_exec, node.networks, node.last_seen),
                         ("", "", [], False, "", 0, False, [0], 0.0))
        self.assertEqual(state.key_index, {KEYS[0]: 5})
        self.assertEqual(state.id_keys, {5: KEYS[0]})

    def test_integral_floats_accepted_as_ids(self) -> None:
        state = RegistryState.from_json({"nodes": {"5": {"id": 5.0, "public_key": b64encode(KEYS[0])}}})
        self.assertEqual(list(state.nodes), [5])


class VectorStoreTests(SynchronousTestCase):
    def test_session_1(self) -> None:
        store = load_vector("go-session-1", "registry-store.json")
        state = RegistryState.from_json(store)
        self.assertEqual(state.nodes, {})
        a = Identity.from_json(load_vector("go-session-1", "identity-agent-a.json"))
        b = Identity.from_json(load_vector("go-session-1", "identity-agent-b.json"))
        # session 1: agent-b registered first
        self.assertEqual(state.key_index, {b.public_key: 1, a.public_key: 2})
        self.assertEqual(state.id_keys, {1: b.public_key, 2: a.public_key})
        self.assertEqual(list(state.inbox), [1])
        (request,) = state.inbox[1]
        self.assertEqual((request.from_node_id, request.justification), (2, "vector capture"))
        self.assertLessEqual(abs(request.timestamp - 1795300951.583188798), 1e-6)
        self.assertEqual(state.created, parse_time("2026-11-21T22:42:28Z"))
        self.assertEqual(state.trust, set())

    def test_session_2(self) -> None:
        store = load_vector("go-session-2", "registry-store.json")
        state = RegistryState.from_json(store)
        a = Identity.from_json(load_vector("go-session-2", "identity-agent-a.json"))
        b = Identity.from_json(load_vector("go-session-2", "identity-agent-b.json"))
        self.assertEqual(state.key_index, {a.public_key: 1, b.public_key: 2})
        # a reference pair is trust both ways
        self.assertEqual(state.trust, {(1, 2), (2, 1)})
        node = state.nodes[1]
        self.assertEqual((node.public_key, node.real_addr, node.hostname),
                         (a.public_key, "127.0.0.1:24101", "agent-a"))
        self.assertEqual(node.last_seen, parse_time("2026-11-21T22:44:17Z"))
        self.assertEqual(state.hostnames, {"agent-a": 1})

    def test_written_back_in_reference_shape(self) -> None:
        for session in ("go-session-1", "go-session-2"):
            store = load_vector(session, "registry-store.json")
            out = RegistryState.from_json(store).to_json()
            for key in ("nodes", "pub_key_idx", "trust_pairs"):
                if key in store:
                    self.assertEqual(out[key], store[key], f"{session} {key}")
            self.assertEqual(out["networks"]["0"]["created"], store["networks"]["0"]["created"])
            self.assertEqual(out["networks"]["0"]["members"], store["networks"]["0"]["members"])
            self.assertEqual("handshake_inbox" in out, "handshake_inbox" in store)
            for target, requests in store.get("handshake_inbox", {}).items():
                self.assertEqual(len(out["handshake_inbox"][target]), len(requests))
                for got, want in zip(out["handshake_inbox"][target], requests):
                    self.assertEqual({**got, "timestamp": None}, {**want, "timestamp": None})
                    # down to the microsecond (see test_reference_nanoseconds_kept for the rest)
                    self.assertEqual(got["timestamp"][:26], want["timestamp"][:26])
            self.assertEqual(out["next_node"], store["next_node"])
            self.assertEqual(out["next_net"], store["next_net"])

    def test_reference_nanoseconds_kept(self) -> None:
        """
        A reference store read and written back keeps its handshake timestamps
        exactly (the reference writes nanoseconds).
        """
        store = load_vector("go-session-1", "registry-store.json")
        out = RegistryState.from_json(store).to_json()
        self.assertEqual(out["handshake_inbox"]["1"][0]["timestamp"], "2026-11-21T22:42:31.583188798Z")


class MalformedStoreTests(SynchronousTestCase):
    def assertBad(self, value: Any) -> None:
        try:
            RegistryState.from_json(value)
        except StoreFormatError as e:
            self.assertTrue(str(e))
        except Exception as e:  # noqa: BLE001 - the point of the test
            self.fail(f"{type(e).__name__}: {e} (not StoreFormatError) for {str(value)[:200]}")
        else:
            self.fail(f"accepted {str(value)[:200]}")

    def good(self) -> dict[str, Any]:
        return sample_state().to_json()

    def test_not_an_object(self) -> None:
        for value in (None, [], [1], "store", 1, 1.5, True):
            self.assertBad(value)

    def test_sections_of_wrong_type(self) -> None:
        for key, value in (("nodes", []), ("nodes", "x"), ("nodes", 1), ("pub_key_idx", []),
                           ("pub_key_idx", "k"), ("trust_pairs", "1:2"), ("trust_pairs", {"1": 2}),
                           ("trust_edges", "1>2"), ("proven", 7), ("proven", {"7": 1}),
                           ("auth_ts", [1]), ("auth_ts", {"x": 1}), ("auth_ts", {"7": -1}),
                           ("auth_ts", {"7": "1"}), ("keys_gone", {"7": -1}), ("keys_gone", [7]),
                           ("keys_gone", {"7": 1.5}), ("auth_ts", {"7": True}), ("auth_ts", {"7": 1 << 53}),
                           ("handshake_inbox", []), ("handshake_responses", "x"), ("networks", [])):
            store = self.good()
            store[key] = value
            self.assertBad(store)

    def test_node_not_an_object(self) -> None:
        for raw in (None, 1, "node", [1]):
            self.assertBad({"nodes": {"1": raw}})

    def test_node_bad_key(self) -> None:
        for key in (None, "", "AAAA", b64encode(b"\x00" * 31), b64encode(b"\x00" * 33), "!" * 44, 5,
                    [b64encode(KEYS[0])], b64encode(KEYS[0])[:-1] + "\u00e9"):
            node: dict[str, Any] = {"id": 1}
            if key is not None:
                node["public_key"] = key
            self.assertBad({"nodes": {"1": node}})

    def test_node_bad_id(self) -> None:
        key = b64encode(KEYS[0])
        for node_id in (None, -1, 1 << 32, 1 << 80, "1", 1.5, True, False, [1], {"id": 1}):
            node: dict[str, Any] = {"public_key": key}
            if node_id is not None:
                node["id"] = node_id
            self.assertBad({"nodes": {"1": node}})
        self.assertBad({"nodes": {"2": {"id": 1, "public_key": key}}})
        self.assertBad({"nodes": {"01": {"id": 1, "public_key": key}}})

    def test_node_id_not_finite(self) -> None:
        # json.loads gives inf for 1e999 and accepts NaN / Infinity: a damaged
        # store can hold them.
        key = b64encode(KEYS[0])
        for text in ('1e999', '-1e999', 'NaN', 'Infinity'):
            self.assertBad(json.loads('{"nodes": {"1": {"id": %s, "public_key": "%s"}}}' % (text, key)))
            self.assertBad(json.loads('{"nodes": {"1": {"id": 1, "polo_score": %s, "public_key": "%s"}}}'
                                      % (text, key)))
            self.assertBad(json.loads('{"handshake_inbox": {"1": [{"from_node_id": %s}]}}' % text))

    def test_node_bad_field_types(self) -> None:
        for field, value in (("tags", "demo"), ("tags", [1]), ("tags", [None]), ("tags", {"a": 1}),
                             ("public", "yes"), ("public", 1), ("task_exec", "true"), ("hostname", 5),
                             ("hostname", ["a"]), ("owner", 1), ("real_addr", 1), ("real_addr", {}),
                             ("polo_score", "5"), ("polo_score", 1.5), ("polo_score", True),
                             ("networks", 0), ("networks", ["0"]), ("networks", [-1]), ("networks", [1.5]),
                             ("last_seen", True), ("last_seen", [1]), ("last_seen", {"t": 1})):
            store = self.good()
            store["nodes"]["7"][field] = value
            self.assertBad(store)

    def test_numeric_times(self) -> None:
        """
        parse_time takes numbers as Unix seconds; a store holding a number no
        date can express is refused, or else it can be written back.
        """
        for text in ("1e300", "-1e300", "1e999", "NaN", "-Infinity", "1e18"):
            for where in ("node", "inbox", "created"):
                store = self.good()
                if where == "node":
                    store["nodes"]["7"]["last_seen"] = json.loads(text)
                elif where == "inbox":
                    store["handshake_inbox"]["7"][0]["timestamp"] = json.loads(text)
                else:
                    store["networks"]["0"]["created"] = json.loads(text)
                try:
                    state = RegistryState.from_json(store)
                except StoreFormatError:
                    continue
                try:
                    state.to_json()
                except Exception as e:  # noqa: BLE001
                    self.fail(f"{where} time {text}: loaded, then to_json raised {type(e).__name__}: {e}")

    def test_bad_time_strings(self) -> None:
        for text in ("yesterday", "2026-13-01T00:00:00Z", "2026-11-31T00:00:00Z", "2026-11-21T25:00:00Z",
                     "2026-11-21T22:42:31+99:00", "T", "Z", ".", "   ", "2026/11/21 22:42:31", "\x00",
                     "2026-11-21T22:42:31.123Zjunk"):
            store = self.good()
            store["nodes"]["7"]["last_seen"] = text
            self.assertBad(store)
            store = self.good()
            store["handshake_inbox"]["7"][0]["timestamp"] = text
            self.assertBad(store)
            store = self.good()
            store["networks"]["0"]["created"] = text
            self.assertBad(store)

    def test_bad_trust_pair_text(self) -> None:
        for text in ("1-2", "1:2:3", "a:b", "1:", ":2", "", ":", "-1:2", "1:-2", f"1:{1 << 32}",
                     " 1:2", "1:2 ", "1.0:2", "0x1:2", 12, None, ["1", "2"], {"1": 2}):
            self.assertBad({"trust_pairs": [text]})
        for text in ("1:2", "1>2>3", "a>b", "1>", ">2", "-1>2", 12, None):
            self.assertBad({"trust_edges": [text]})

    def test_non_ascii_digits_in_ids(self) -> None:
        # str.isdigit() is true for these, int() is not always happy with them
        for text in ("\u00b2", "1\u00b2", "\u2460"):
            self.assertBad({"trust_pairs": [f"1:{text}"]})
            self.assertBad({"trust_edges": [f"{text}>1"]})
            self.assertBad({"handshake_inbox": {text: []}})
            self.assertBad({"handshake_responses": {text: []}})

    def test_bad_pub_key_idx(self) -> None:
        for key, value in (("AAAA", 1), (b64encode(KEYS[0]), "1"), (b64encode(KEYS[0]), -1),
                           (b64encode(KEYS[0]), 1 << 32), (b64encode(KEYS[0]), None),
                           (b64encode(KEYS[0]), True),
                           (b64encode(KEYS[0]), 1.5), ("not base64 at all, forty-four characters!!", 1)):
            self.assertBad({"pub_key_idx": {key: value}})

    def test_bad_proven(self) -> None:
        for value in ("7", -1, 1 << 32, 1.5, True, None, [7]):
            self.assertBad({"proven": [value]})

    def test_bad_queues(self) -> None:
        for section in ("handshake_inbox", "handshake_responses"):
            bad_queues: list[Any] = [
                {"x": []}, {"-1": []}, {"1": "x"}, {"1": [1]}, {"1": {"from_node_id": 2}},
                {"1": [{"from_node_id": "2"}]}, {"1": [{"from_node_id": -2}]},
                {"1": [{}]}, {"1": [{"from_node_id": 2, "timestamp": "later"}]},
                {"1": [{"from_node_id": 2, "timestamp": True}]}, {"1": [None]},
                {str(1 << 32): []}]
            for value in bad_queues:
                self.assertBad({section: value})
        self.assertBad({"handshake_inbox": {"1": [{"from_node_id": 2, "justification": 5}]}})
        self.assertBad({"handshake_responses": {"1": [{"from_node_id": 2, "accept": "yes"}]}})

    def test_fuzzed_stores(self) -> None:
        """
        Random damage to a good store: from_json either refuses it with
        StoreFormatError or gives a state that can be written back.
        """
        rng = random.Random(20261121)
        values: list[Any] = [None, True, False, 0, -1, 1, 7, 1 << 32, 1 << 70, 1.5, -0.0, 1e300, -1e300,
                             float("inf"), float("nan"), "", "x", "7", "1:2", "1>2", "\u00b2", "\ud800",
                             "2026-11-21T22:42:31Z", "2026-11-21T22:42:31.999999999Z", [], [1], ["a"], {},
                             {"a": 1}, b64encode(KEYS[4]), "A" * 10_000]
        failures: list[str] = []
        for _ in range(3000):
            store = self.good()
            for _ in range(rng.randint(1, 3)):
                _mutate(rng, store, values)
            try:
                state = RegistryState.from_json(copy.deepcopy(store))
            except StoreFormatError:
                continue
            except Exception as e:  # noqa: BLE001
                failures.append(f"from_json: {type(e).__name__}: {e}")
                continue
            try:
                json.dumps(state.to_json())
            except Exception as e:  # noqa: BLE001
                failures.append(f"to_json after a successful load: {type(e).__name__}: {e}")
        self.assertFalse(failures, "\n".join(sorted(set(failures))))


def _mutate(rng: random.Random, value: Any, pool: list[Any]) -> None:
    """Replace, delete or add one item somewhere inside ``value`` (a dict or list)."""
    path: list[Any] = []
    node = value
    while True:
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        children = [(k, v) for k, v in children]
        if not children:
            break
        k, v = rng.choice(children)
        if isinstance(v, (dict, list)) and v and rng.random() < 0.7:
            node = v
            path.append(k)
            continue
        break
    action = rng.random()
    if isinstance(node, dict):
        keys = list(node)
        if keys and action < 0.6:
            node[rng.choice(keys)] = copy.deepcopy(rng.choice(pool))
        elif keys and action < 0.8:
            del node[rng.choice(keys)]
        else:
            node[rng.choice(["id", "public_key", "x", "7", "timestamp", "from_node_id", "0"])] = \
                copy.deepcopy(rng.choice(pool))
    elif isinstance(node, list):
        if node and action < 0.6:
            node[rng.randrange(len(node))] = copy.deepcopy(rng.choice(pool))
        elif node and action < 0.8:
            del node[rng.randrange(len(node))]
        else:
            node.append(copy.deepcopy(rng.choice(pool)))


class WellFormedNodeTests(SynchronousTestCase):
    """The loader's fast path for usual nodes takes exactly what the field-by-field checks take."""

    def variants(self) -> list[dict[str, Any]]:
        base = {"id": 7, "public_key": b64encode(KEYS[0]), "real_addr": "192.0.2.1:4000", "networks": [0],
                "last_seen": "2027-01-15T08:00:00Z", "hostname": "alpha", "tags": ["a"], "owner": "o",
                "public": True, "task_exec": False, "polo_score": 3, "local_addr": "10.0.0.2:4000"}
        changes: list[tuple[str, Any]] = [
            ("networks", [0.0]), ("networks", [False]), ("networks", []), ("networks", [0, 1]),
            ("networks", [1.0]), ("networks", None), ("networks", [0xFFFFFFFF + 1]), ("id", 7.0),
            ("polo_score", 2.0), ("polo_score", True), ("polo_score", None), ("tags", []), ("tags", None),
            ("tags", ["a", 1]), ("tags", [True]), ("public", None), ("public", 1), ("task_exec", 0),
            ("public_key", b64encode(KEYS[0])[:-1] + "\n"), ("public_key", " " + b64encode(KEYS[0])[1:]),
            ("public_key", b64encode(KEYS[0])[:-2] + "=="), ("public_key", "=" + b64encode(KEYS[0])[1:]),
            ("last_seen", None), ("last_seen", 1.8e9), ("last_seen", "yesterday"), ("hostname", None),
            ("real_addr", 5), ("owner", None), ("local_addr", [])]
        out = [dict(base)]
        for field, value in changes:
            out.append({**base, field: value})
        without = dict(base)
        for field in ("networks", "tags", "last_seen", "hostname", "public"):
            del without[field]
        out.append(without)
        return out

    def test_same_as_the_checks(self) -> None:
        from pilot.server.state import _node_from_json, _well_formed_node
        for raw in self.variants():
            try:
                slow: Node | None = _node_from_json(copy.deepcopy(raw), "nodes['7']")
            except StoreFormatError:
                slow = None
            try:
                fast = _well_formed_node(copy.deepcopy(raw), {})
            except StoreFormatError:
                self.assertIsNone(slow, raw)  # refused by both (a bad time: the same error)
                continue
            if fast is None:
                continue  # the checks decide
            self.assertIsNotNone(slow, f"the fast path took what the checks refuse: {raw}")
            assert slow is not None
            self.assertIs(type(fast), Node)
            self.assertEqual(attr.asdict(fast, recurse=False), attr.asdict(slow, recurse=False), raw)
            self.assertEqual(node_fields(fast), node_fields(slow), raw)
            self.assertEqual([type(x) for x in fast.networks], [int] * len(fast.networks))

    def test_loaded_nodes_are_tracked_like_others(self) -> None:
        """A node the fast path made is a plain Node: its assignments reach the journal's sink."""
        from pilot.server.state import _well_formed_node
        node = _well_formed_node(self.variants()[0], {})
        assert node is not None
        self.assertEqual({a.name for a in attr.fields(Node)} - {"journal_sink"},
                         {f for f in attr.asdict(node, recurse=False) if f != "journal_sink"})
        sink: set[int] = set()
        node.journal_sink = sink
        node.hostname = "beta"
        self.assertEqual((sink, node.hostname), ({7}, "beta"))

    def test_usual_nodes_take_it(self) -> None:
        from pilot.server.state import _well_formed_node
        self.assertIsNotNone(_well_formed_node(self.variants()[0], {}))
        for node in sample_state().to_json()["nodes"].values():
            self.assertIsNotNone(_well_formed_node(node, {}))


class RebuildIndexesTests(SynchronousTestCase):
    def test_a_hostname_held_twice_goes_to_the_lowest_id(self) -> None:
        """A damaged store naming several nodes alike: the lowest id keeps the name, whatever the order."""
        for order in ([9, 4, 6], [4, 9, 6], [6, 9, 4]):
            state = RegistryState()
            for i, node_id in enumerate(order):
                state.nodes[node_id] = Node(id=node_id, public_key=KEYS[i], hostname="same")
            state.nodes[2] = Node(id=2, public_key=KEYS[3], hostname="other")
            state.rebuild_indexes()
            self.assertEqual(state.hostnames, {"same": 4, "other": 2})
            self.assertEqual({i: n.hostname for i, n in state.nodes.items()},
                             {9: "", 4: "same", 6: "", 2: "other"})
            self.assertEqual(state.id_keys,
                             {order[0]: KEYS[0], order[1]: KEYS[1], order[2]: KEYS[2], 2: KEYS[3]})


    def test_a_key_held_twice_indexed_to_the_first_node(self) -> None:
        """Two nodes with one key (damaged), or a key the store's index gives another id: as one loop did."""
        state = RegistryState()
        state.nodes[5] = Node(id=5, public_key=KEYS[0])
        state.nodes[3] = Node(id=3, public_key=KEYS[0])
        state.nodes[8] = Node(id=8, public_key=KEYS[1])
        state.key_index[KEYS[1]] = 99  # the store's pub_key_idx said so: kept
        state.rebuild_indexes()
        self.assertEqual(list(state.key_index.items()), [(KEYS[1], 99), (KEYS[0], 5)])
        self.assertEqual(state.id_keys, {99: KEYS[1], 5: KEYS[0], 3: KEYS[0], 8: KEYS[1]})


class FloorLastSeenTests(SynchronousTestCase):
    def test_moves_up_only(self) -> None:
        state = sample_state()
        before = {i: n.last_seen for i, n in state.nodes.items()}
        state.floor_last_seen(T0 - 6)
        self.assertEqual({i: n.last_seen for i, n in state.nodes.items()},
                         {i: max(t, T0 - 6) for i, t in before.items()})

    def test_tracked_nodes_go_through_the_hook(self) -> None:
        """A node a journal tracks records the move (none is tracked at a start, but a caller may)."""
        state = sample_state()
        sink: set[int] = set()
        state.nodes[7].journal_sink = sink
        state.floor_last_seen(T0 + 10)
        self.assertEqual(sink, {7})
        self.assertEqual({n.last_seen for n in state.nodes.values()}, {T0 + 10})

class TimeTests(SynchronousTestCase):
    def assertClose(self, got: float, want: float, delta: float, msg: str = "") -> None:
        # trial's assertAlmostEqual ignores its delta argument
        if not abs(got - want) <= delta:
            self.fail(f"{got!r} != {want!r} within {delta} {msg}")

    def test_rfc3339_seconds(self) -> None:
        self.assertEqual(rfc3339(0), "1970-01-01T00:00:00Z")
        self.assertEqual(rfc3339(parse_time("2026-11-21T22:44:17Z")), "2026-11-21T22:44:17Z")
        self.assertEqual(rfc3339(1795301057.75), "2026-11-21T22:44:17Z")  # truncated, not rounded
        self.assertEqual(rfc3339(1795301057.9999995), "2026-11-21T22:44:17Z")

    def test_parse_reference_times(self) -> None:
        self.assertEqual(parse_time("1970-01-01T00:00:00Z"), 0.0)
        base = parse_time("2026-11-21T22:42:31Z")
        self.assertEqual(base, 1795300951.0)
        self.assertClose(parse_time("2026-11-21T22:42:31.583188798Z") - base, 0.583188798, 1e-6)
        self.assertEqual(parse_time("2026-11-21T22:42:31.5Z") - base, 0.5)
        self.assertEqual(parse_time("2026-11-21T23:42:31+01:00"), base)
        self.assertEqual(parse_time("2026-11-21T22:42:31"), base)  # no zone: UTC

    def test_parse_ns(self) -> None:
        self.assertEqual(parse_time_ns("2026-11-21T22:42:31.583188798Z"), 1795300951_583188798)
        self.assertEqual(parse_time_ns("2026-11-21T22:42:31.5Z"), 1795300951_500000000)
        self.assertEqual(parse_time_ns("2026-11-21T22:42:31.000000001Z"), 1795300951_000000001)
        self.assertEqual(parse_time_ns("2026-11-21T22:42:31Z"), 1795300951_000000000)
        self.assertEqual(parse_time_ns("2026-11-21T23:42:31.25+01:00"), 1795300951_250000000)

    def test_absent(self) -> None:
        self.assertEqual(parse_time(None), 0.0)
        self.assertEqual(parse_time(""), 0.0)
        self.assertEqual(parse_time_ns(None), 0)

    def test_nanos_format(self) -> None:
        self.assertEqual(rfc3339(1795300951.5, nanos=True), "2026-11-21T22:42:31.500000000Z")
        self.assertEqual(rfc3339_ns(1795300951_000000001), "2026-11-21T22:42:31.000000001Z")
        self.assertEqual(rfc3339_ns(1795300951_999999999), "2026-11-21T22:42:31.999999999Z")
        self.assertEqual(rfc3339_ns(0), "1970-01-01T00:00:00.000000000Z")
        self.assertRegex(rfc3339(T0 + 0.123456789, nanos=True), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")

    def test_reference_nanos_round_trip(self) -> None:
        for text in ("2026-11-21T22:42:31.583188798Z", "2026-11-21T22:42:31.000000000Z",
                     "2026-11-21T22:42:31.999999999Z", "1970-01-01T00:00:00.000000001Z",
                     "9999-12-31T23:59:59.999999999Z"):
            self.assertEqual(rfc3339_ns(parse_time_ns(text)), text)

    def test_ns_round_trip(self) -> None:
        rng = random.Random(3339)
        for ns in [0, 1, 999_999_999, 1795300951_999999999, T0_NS] + [rng.randrange(0, 253402300799 * 10 ** 9)
                                                                        for _ in range(500)]:
            self.assertEqual(parse_time_ns(rfc3339_ns(ns)), ns, ns)

    def test_float_nanos_round_trip(self) -> None:
        rng = random.Random(3339)
        fractions = [0.0, 0.5, 0.000000001, 0.123456789, 0.999999, 0.9999994, 0.9999995, 0.9999996,
                     0.9999999, 0.99999999] + [rng.random() for _ in range(500)]
        for whole in (1795300951, 0, 1234567890, 4102444800):
            for frac in fractions:
                ts = whole + frac
                text = rfc3339(ts, nanos=True)
                # a float holds about 0.5 us at these magnitudes
                self.assertClose(parse_time(text), ts, 1e-6, f"{ts!r} -> {text}")

    def test_seconds_round_trip(self) -> None:
        for ts in (0, 1795300951, 4102444800, 1234567890):
            self.assertEqual(parse_time(rfc3339(ts)), ts)

    def test_bad(self) -> None:
        bad: list[Any] = ["yesterday", "2026-02-30T00:00:00Z", True, [], {}, b"2026-11-21T22:42:31Z",
                          "2026-11-21T22:42:31.Z", "2026-11-21T22:42:31.1234567890Z", "x" * 10_000,
                          "\u0662\u0660\u0662\u0666-11-21T22:42:31Z", float("nan"), float("inf"), -1, 1e300,
                          "1969-12-31T23:59:59Z"]
        for value in bad:
            self.assertRaises(StoreFormatError, parse_time, value)
            self.assertRaises(StoreFormatError, parse_time_ns, value)


class DerivedTextTests(SynchronousTestCase):
    """The texts the registry caches (a key's base64, an id's address) are the ones it would make."""

    def test_key_text(self) -> None:
        state = RegistryState()
        a, b = Identity.from_seed(b"\x01" * 32).public_key, Identity.from_seed(b"\x02" * 32).public_key
        state.index_key(a, 7)
        self.assertEqual(state.key_text(a), b64encode(a))
        self.assertIs(state.key_text(a), state.key_text(a))
        state.index_key(b, 7)  # a rotation: the old key's text goes
        self.assertNotIn(a, state._key_text)
        self.assertEqual(state.key_text(b), b64encode(b))
        state.forget(7)
        self.assertEqual(state._key_text, {})

    def test_address_text(self) -> None:
        for node_id in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
            node = Node(id=node_id, public_key=b"k" * 32)
            self.assertEqual(node.address_text, str(node.address))
