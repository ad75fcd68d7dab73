"""
pilot.server.applier: a journal record applied to a live state ends where
loading the store with the record replayed would (issue 16: a standby of
ours applies each pushed record, no whole reload).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import b64encode
from pilot.server import directory
from pilot.server.applier import apply_to_state
from pilot.server.journal import Feed, JournalError, Tracker, apply_record
from pilot.server.registry import Peer, Registry
from pilot.server.state import Node, RegistryState
from tests.server import test_replication
from tests.server.test_state import KEYS, T0, sample_state

PEER = Peer("192.0.2.7", 5000)
Change = Callable[[RegistryState], Any]


def rotate(s: RegistryState, node_id: int, key: bytes) -> None:
    """As ``Registry.rotate_key`` does."""
    s.key_index.pop(s.nodes[node_id].public_key, None)
    s.nodes[node_id].public_key = key
    s.index_key(key, node_id)


def rename(s: RegistryState, node_id: int, name: str) -> None:
    """As ``pilot.server.records._set_hostname`` does."""
    node = s.nodes[node_id]
    if node.hostname and s.hostnames.get(node.hostname) == node_id:
        del s.hostnames[node.hostname]
    node.hostname = name
    if name:
        s.hostnames[name] = node_id


def remove(s: RegistryState, node_id: int) -> None:
    """As ``Registry.remove`` does (a deregistration, the reaper)."""
    node = s.nodes.pop(node_id)
    s.gone[node_id] = T0 + 10
    if node.hostname and s.hostnames.get(node.hostname) == node_id:
        del s.hostnames[node.hostname]


def more_changes() -> list[Change]:
    """What the registry does to nodes and their indexes, beyond the store's every kind of change."""
    return [
        lambda s: rename(s, 7, "gamma"),
        lambda s: (rename(s, 7, ""), rename(s, 1 << 31, "gamma")),  # a name moves between nodes
        lambda s: (rename(s, 1 << 31, "delta"), rename(s, 0xFFFFFFFE, "gamma")),
        lambda s: rotate(s, 7, KEYS[4]),
        lambda s: remove(s, 1 << 31),
        lambda s: (s.nodes.__setitem__(1 << 31, Node(id=1 << 31, public_key=KEYS[1], real_addr="192.0.2.5:7",
                                                      last_seen=T0 + 20, hostname="back")),
                   s.hostnames.__setitem__("back", 1 << 31), s.gone.pop(1 << 31)),
        lambda s: (setattr(s.nodes[7], "tags", ["demo", "new"]), setattr(s.nodes[7], "public", False)),
        lambda s: (s.trust.add((1 << 31, 0xFFFFFFFE)), s.trust.discard((7, 1 << 31))),
        lambda s: (remove(s, 7), s.forget(7)),
    ]


class ApplierTests(SynchronousTestCase):
    maxDiff = None

    def setUp(self) -> None:
        self.primary = sample_state()
        self.feed = Feed(Tracker(self.primary))
        self.feed.join(self)
        # the standby's state as a snapshot loads it, tracked as its own store's writer tracks it
        self.standby = RegistryState.from_json(json.loads(self.primary.to_bytes()))
        self.standby_feed = Feed(Tracker(self.standby))
        self.standby_feed.join(self)
        #: the standby's store file as its writer's records keep it
        self.standby_store = json.loads(self.standby.to_bytes())

    def step(self, change: Change) -> None:
        change(self.primary)
        record = self.feed.take(self)
        assert record is not None
        apply_to_state(self.standby, record)
        self.standby.journal_seq = self.primary.journal_seq  # a scalar of the push, not of the record
        self.assertSame()

    def assertSame(self) -> None:
        """The standby's state is the one a load of the primary's store makes, and answers the same."""
        self.assertEqual(self.standby.to_bytes(), self.primary.to_bytes())
        loaded = RegistryState.from_json(json.loads(self.primary.to_bytes()))
        for name in ("key_index", "id_keys", "hostnames", "trust", "proven", "asked", "auth_ts", "gone",
                     "inbox", "responses", "statements", "term"):
            self.assertEqual(getattr(self.standby, name), getattr(loaded, name), name)
        self.assertEqual(set(self.standby.nodes), set(loaded.nodes))
        ours, theirs = Registry(Clock()), Registry(Clock())
        ours.state, theirs.state = self.standby, loaded
        asks: list[dict[str, Any]] = [{"type": "lookup", "node_id": n} for n in [*loaded.nodes, 99, 5]]
        asks += [{"type": "resolve_hostname", "hostname": h}
                 for h in ["alpha", "beta", "gamma", "delta", "back", *loaded.hostnames]]
        for ask in asks:
            self.assertEqual(ours.handle(dict(ask), PEER), theirs.handle(dict(ask), PEER), ask)
        for query in ("#demo", "#new", "gamma", "alpha"):
            self.assertEqual(sorted(n.id for n in self.standby.nodes.values() if directory.matches(n, query)),
                             sorted(n.id for n in loaded.nodes.values() if directory.matches(n, query)))
        # the standby's own store writer saw the same changes, as records (no snapshot needed)
        self.assertTrue(self.standby_feed.tracker.intact())
        own = self.standby_feed.take(self)
        assert own is not None
        apply_record(self.standby_store, {"seq": 1, **own})
        expected = json.loads(self.primary.to_bytes())
        for store in (self.standby_store, expected):
            for name in ("pilot_journal_seq", "trust_pairs", "next_node", "networks"):  # not the journal's
                store.pop(name, None)
            for name in [k for k, v in store.items() if v in ({}, [])]:
                del store[name]  # emptied by records (the store leaves them out)
            for name in [k for k, v in store.items() if isinstance(v, list)]:
                store[name] = sorted(store[name], key=str)  # the replay's order is not the writer's
        self.assertEqual(self.standby_store, expected)

    def test_every_kind_of_change(self) -> None:
        for change in test_replication.RecordDeltaTests("test_standby_ends_byte_identical").changes():
            self.step(change)

    def test_nodes_moved_renamed_rotated_gone(self) -> None:
        for change in more_changes():
            self.step(change)

    def test_a_key_no_longer_indexed_has_no_text_kept(self) -> None:
        self.standby.key_text(KEYS[0])
        self.step(lambda s: rotate(s, 7, KEYS[4]))
        self.assertNotIn(KEYS[0], self.standby._key_text)

    def test_all_in_one_record(self) -> None:
        for change in more_changes():
            change(self.primary)
        self.step(lambda s: None)

    def test_every_kind_in_one_record(self) -> None:
        for change in test_replication.RecordDeltaTests("test_standby_ends_byte_identical").changes():
            change(self.primary)
        self.step(lambda s: None)

    def test_returns_the_replay_state_changed(self) -> None:
        self.primary.auth_ts[1 << 31] = 77
        del self.primary.auth_ts[99]
        record = self.feed.take(self)
        assert record is not None
        self.assertEqual(apply_to_state(self.standby, record), {1 << 31, 99})

    def test_damaged_store_lowest_id_keeps_a_name(self) -> None:
        """A record naming two nodes alike (no registry does): the loader's rule, the lowest id keeps it."""
        node = json.loads(self.primary.to_bytes())["nodes"][str(1 << 31)]
        apply_to_state(self.standby, {"set": {"nodes": {str(1 << 31): {**node, "hostname": "alpha"}}}})
        self.assertEqual((self.standby.hostnames["alpha"], self.standby.nodes[1 << 31].hostname), (7, ""))
        seven = json.loads(self.primary.to_bytes())["nodes"]["7"]
        five = {**seven, "id": 5, "public_key": b64encode(KEYS[4])}
        apply_to_state(self.standby, {"set": {"nodes": {"5": five}}})
        self.assertEqual((self.standby.hostnames["alpha"], self.standby.nodes[7].hostname), (5, ""))

    def test_a_record_that_does_not_load_changes_nothing(self) -> None:
        before = self.standby.to_bytes()
        node = json.loads(before)["nodes"]["7"]
        for bad in ({"set": {"nodes": {"7": {**node, "real_addr": "x:1"}}, "auth_ts": {"7": "soon"}}},
                    {"set": {"nodes": {"8": node}}}, {"del": {"nodes": ["seven"]}},
                    {"del": {"pub_key_idx": ["nokey"]}, "add": {"proven": [1]}},
                    {"add": {"trust_edges": ["7-5"]}}, {"set": {"networks": {}}}, {"add": {"nodes": []}},
                    {"set": {"nodes": []}}, {"drop": {"proven": [[7]]}}, {"add": []}):
            self.assertRaises((ValueError, TypeError, KeyError), apply_to_state, self.standby, bad)
            self.assertEqual(self.standby.to_bytes(), before, bad)

    def test_shape_errors_are_the_journals(self) -> None:
        self.assertRaises(JournalError, apply_to_state, self.standby, {"set": {"proven": {}}})
