"""
Tests for pilot.server.sidecar: a store's sidecar gives the state the store's
JSON gives, is used only while it matches the store, and is checked value by
value (a damaged or crafted one is refused, never loaded malformed).
"""

from __future__ import annotations

import hashlib
import json
import marshal
import struct
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from pilot.server import sidecar
from pilot.server.sidecar import MAGIC, SidecarError, decode, encode
from pilot.server.state import Node, RegistryState
from pilot.identity import Identity
from pilot.wire.statement import make_statement

from tests.server.test_state import KEYS, T0, sample_state


def rich_state() -> RegistryState:
    """:func:`sample_state` and nodes with what a store may hold: fractions of a second, odd text, networks."""
    state = sample_state()
    state.nodes[12] = Node(id=12, public_key=KEYS[4], real_addr="203.0.113.9:1", last_seen=T0 + 0.75,
                           hostname="b\u00e9ta-\ud800", tags=["\u2603"], owner="o", networks=[],
                           local_addr="10.0.0.2:4000")
    state.nodes[0] = Node(id=0, public_key=bytes(32), last_seen=0.0, networks=[0, 5, 0xFFFFFFFF])
    for node_id in (12, 0):
        state.index_key(state.nodes[node_id].public_key, node_id)
    state.rebuild_indexes()
    state.asked = {(7, 12)}
    state.journal_seq = 41
    state.term = 3
    alice = Identity.from_seed(bytes([1]) * 32)  # node 7's key
    state.statements = {7: {12: make_statement(7, alice.public_key, 12, b"", 1, 1, False, alice.sign)}}
    return state


def columns(state: RegistryState) -> dict[str, Any]:
    """Everything a loaded state holds, in order, for comparing two loads."""
    return {
        "nodes": [(k, [(f, getattr(n, f), type(getattr(n, f))) for f in sidecar.NODE_FIELDS])
                  for k, n in state.nodes.items()],
        "key_index": list(state.key_index.items()), "id_keys": list(state.id_keys.items()),
        "hostnames": list(state.hostnames.items()), "auth_ts": list(state.auth_ts.items()),
        "gone": list(state.gone.items()), "trust": state.trust, "proven": state.proven,
        "asked": state.asked, "inbox": state.inbox, "responses": state.responses,
        "statements": state.statements, "created": state.created, "seq": state.journal_seq,
        "term": state.term, "sinks": {n.journal_sink for n in state.nodes.values()},
    }


def forge(value: Any, store: bytes) -> bytes:
    """A sidecar of ``store`` holding the marshal of ``value``, with every digest right (as an attacker can)."""
    payload = marshal.dumps(value)
    return MAGIC + struct.pack(">32sQ32s", hashlib.sha256(store).digest(), len(store),
                               hashlib.sha256(payload).digest()) + payload


class SameStateTests(SynchronousTestCase):
    def test_same_as_the_json(self) -> None:
        """The sidecar's state is the store JSON's, field for field, type for type, in the same order."""
        state = rich_state()
        store = state.to_bytes()
        from_json = RegistryState.from_json(json.loads(store))
        from_side = decode(encode(state, store), store)
        self.assertEqual(columns(from_side), columns(from_json))
        self.assertEqual(from_side.to_bytes(), from_json.to_bytes())
        self.assertEqual(from_side.nodes[12].networks, [0])  # as the JSON gives an empty list back
        self.assertEqual(from_side.nodes[12].last_seen, float(int(T0)))  # the store's second

    def test_nodes_own_their_lists(self) -> None:
        state = rich_state()
        store = state.to_bytes()
        loaded = decode(encode(state, store), store)
        lists = [id(n.tags) for n in loaded.nodes.values()] + [id(n.networks) for n in loaded.nodes.values()]
        self.assertEqual(len(set(lists)), len(lists))

    def test_empty(self) -> None:
        state = RegistryState(created=T0)
        store = state.to_bytes()
        self.assertEqual(decode(encode(state, store), store).to_bytes(), store)

    def test_shared_hostname_settled_as_by_the_json(self) -> None:
        """A (damaged) sidecar where two nodes share a name: the lowest id keeps it, as from a store."""
        state = rich_state()
        store = state.to_bytes()
        value = marshal.loads(encode(state, store)[len(MAGIC) + 72:])
        value["nodes"][4][-1] = "alpha"  # the highest id (0xFFFFFFFE) named like node 7
        loaded = decode(forge(value, store), store)
        self.assertEqual((loaded.hostnames["alpha"], loaded.nodes[0xFFFFFFFE].hostname), (7, ""))


class NotThisStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = rich_state()
        self.store = self.state.to_bytes()
        self.side = encode(self.state, self.store)

    def refused(self, data: bytes, store: bytes | None = None, why: str = "") -> None:
        e = self.assertRaises(SidecarError, decode, data, self.store if store is None else store)
        self.assertIn(why, str(e))

    def test_store_changed_after(self) -> None:
        changed = self.store.replace(b'"alpha"', b'"alphb"')
        self.refused(self.side, changed, "another store")
        self.refused(self.side, self.store + b" ", "another store")

    def test_sidecar_of_another_store(self) -> None:
        other = rich_state()
        del other.nodes[7]
        other_store = other.to_bytes()
        self.refused(encode(other, other_store), why="another store")

    def test_cut_short_anywhere(self) -> None:
        for at in (0, 5, len(MAGIC), len(MAGIC) + 40, len(MAGIC) + 72, len(self.side) - 1):
            self.refused(self.side[:at])

    def test_damaged_payload(self) -> None:
        for at in (len(MAGIC) + 72, len(self.side) // 2, len(self.side) - 1):
            flipped = bytearray(self.side)
            flipped[at] ^= 0x01
            self.refused(bytes(flipped), why="damaged")

    def test_damaged_header(self) -> None:
        self.refused(b"x" + self.side[1:], why="not a sidecar")
        flipped = bytearray(self.side)
        flipped[len(MAGIC) + 3] ^= 0x40
        self.refused(bytes(flipped), why="another store")

    def test_not_marshal(self) -> None:
        self.refused(forge(None, self.store)[:-1] + b"\xff", why="damaged")


class CraftedTests(SynchronousTestCase):
    """A sidecar whose digests are right but whose values a store's checks would refuse: refused too."""

    def setUp(self) -> None:
        self.state = rich_state()
        self.store = self.state.to_bytes()
        self.value = marshal.loads(encode(self.state, self.store)[len(MAGIC) + 72:])

    def crafted(self, change: Callable[[dict[str, Any]], Any]) -> None:
        value = marshal.loads(marshal.dumps(self.value))
        change(value)
        self.assertRaises(SidecarError, decode, forge(value, self.store), self.store)

    def node_column(self, field: str, index: int, bad: Any) -> None:
        def change(value: dict[str, Any]) -> None:
            value["nodes"][sidecar.NODE_FIELDS.index(field)][index] = bad
        self.crafted(change)

    def test_well_formed_is_used(self) -> None:
        """The baseline: the same payload, forged with right digests, loads."""
        expected = RegistryState.from_json(json.loads(self.store)).to_bytes()
        self.assertEqual(decode(forge(self.value, self.store), self.store).to_bytes(), expected)

    def test_bad_node_values(self) -> None:
        for field, bad in [("id", "7"), ("id", -1), ("id", 1 << 32), ("id", True), ("id", 1.0),
                           ("public_key", bytes(31)), ("public_key", "A" * 44),
                           ("real_addr", b"x"), ("real_addr", None), ("hostname", 5), ("owner", []),
                           ("local_addr", None), ("last_seen", float("nan")), ("last_seen", float("inf")),
                           ("last_seen", -1.0), ("last_seen", 1e12), ("last_seen", 5),
                           ("tags", ["a"]), ("tags", (1,)), ("tags", "ab"), ("public", 1), ("task_exec", None),
                           ("polo_score", True), ("polo_score", 1.5), ("networks", ()), ("networks", (-1,)),
                           ("networks", (1 << 32,)), ("networks", [0]), ("networks", ("0",))]:
            self.node_column(field, 0, bad)

    def test_duplicate_id(self) -> None:
        self.node_column("id", 1, self.value["nodes"][0][0])

    def test_columns_misshapen(self) -> None:
        self.crafted(lambda v: v["nodes"].pop())
        self.crafted(lambda v: v["nodes"][3].pop())
        self.crafted(lambda v: v["nodes"].__setitem__(0, tuple(v["nodes"][0])))
        self.crafted(lambda v: v.__setitem__("nodes", None))
        self.crafted(lambda v: v["key_index"][1].pop())
        self.crafted(lambda v: v.pop("auth_ts"))

    def test_bad_indexes(self) -> None:
        self.crafted(lambda v: v["key_index"][0].__setitem__(0, bytes(33)))
        self.crafted(lambda v: v["key_index"][1].__setitem__(0, -5))
        self.crafted(lambda v: v["auth_ts"][1].__setitem__(0, 1 << 53))
        self.crafted(lambda v: v["auth_ts"][1].__setitem__(0, "5"))
        self.crafted(lambda v: v["auth_ts"][0].__setitem__(0, 1 << 40))

    def test_bad_other_sections(self) -> None:
        """The sections kept as the store's JSON get the store's own checks."""
        self.crafted(lambda v: v["rest"].__setitem__("trust_edges", ["7>x"]))
        self.crafted(lambda v: v["rest"].__setitem__("keys_gone", {"99": -1}))
        self.crafted(lambda v: v["rest"].__setitem__("nodes", {"1": {}}))
        self.crafted(lambda v: v["rest"].__setitem__("pub_key_idx", {}))
        self.crafted(lambda v: v.__setitem__("rest", []))

    def test_not_a_payload(self) -> None:
        self.crafted(lambda v: v.__setitem__("version", 2))
        for value in (None, [], (lambda: None).__code__, {"version": 1}):
            self.assertRaises(SidecarError, decode, forge(value, self.store), self.store)
