"""
Tests for pilot.server.journal (records of what changed, and their replay)
and pilot.server.tracked (the containers that remember what changed).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import Identity
from pilot.server import journal
from pilot.server.journal import JournalError, Tracker, encode_record, read_records, replay
from pilot.server.registry import Registry
from pilot.server.state import HandshakeRequest, HandshakeResponse, Node, RegistryState, rfc3339_second
from pilot.server.tracked import TrackedDict, TrackedSet
from pilot.wire.statement import make_statement

from tests.server.test_state import KEYS, T0, sample_state

ALICE = Identity.from_seed(b"\x41" * 32)


def stored(state: RegistryState) -> dict[str, Any]:
    """The store's JSON as a file would hold it (a copy)."""
    value: dict[str, Any] = json.loads(state.to_bytes())
    return value


class TrackedTests(SynchronousTestCase):
    def test_dict_remembers_every_kind_of_change(self) -> None:
        d: TrackedDict[str, int] = TrackedDict({"a": 1, "b": 2, "c": 3, "d": 4})
        d["x"] = 1
        self.assertEqual(d.changes, set())  # not tracked yet: nothing remembered, nothing grows
        d.track()
        del d["x"]
        d.track()
        d["e"] = 5
        del d["a"]
        d.pop("b")
        d.pop("zz", None)
        d.setdefault("c", 9)  # present: no change
        d.setdefault("f", 6)
        d.update(g=7)
        d |= {"h": 8}
        self.assertEqual(d.changes, {"e", "a", "b", "zz", "f", "g", "h"})
        d.changes.clear()
        key, _ = d.popitem()
        d.clear()
        self.assertEqual(d.changes, {key, "c", "d", "e", "f", "g"})

    def test_set_remembers_every_kind_of_change(self) -> None:
        s: TrackedSet[int] = TrackedSet([1, 2, 3, 4, 5])
        s.add(10)
        s.discard(10)
        self.assertEqual(s.changes, set())
        s.track()
        s.add(6)
        s.discard(1)
        s.remove(2)
        s -= {3}
        s |= {7}
        s &= {4, 5, 6, 7, 8}  # drops nothing more
        s ^= {5, 9}
        self.assertEqual(s, {4, 6, 7, 9})
        self.assertEqual(s.changes, {1, 2, 3, 5, 6, 7, 9})
        s.changes.clear()
        item = s.pop()
        s.intersection_update({4, 6, 7, 9} - {item, 4})
        self.assertEqual(s.changes, {item, 4} if item != 4 else {4})


class TrackerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = sample_state()
        self.tracker = Tracker(self.state)
        self.store = stored(self.state)  # the snapshot on disk
        self.records: list[dict[str, Any]] = []

    def record(self) -> None:
        """Journal what changed since the last record."""
        seq = len(self.records) + 1
        records, torn = read_records(encode_record(seq, self.tracker.delta()))
        self.assertEqual(torn, 0)
        self.records += records

    def assertReplayed(self) -> None:
        """The snapshot plus the records, replayed, is the state as it is now."""
        value = json.loads(json.dumps(self.store))
        self.assertEqual(replay(value, self.records), len(self.records))
        replayed = RegistryState.from_json(value)
        replayed.journal_seq = self.state.journal_seq = 0
        self.assertEqual(json.loads(replayed.to_bytes()), json.loads(self.state.to_bytes()))

    def test_no_change_no_content(self) -> None:
        self.assertEqual(self.tracker.delta(), {})

    def test_nodes(self) -> None:
        s = self.state
        s.nodes[5] = Node(id=5, public_key=KEYS[4], real_addr="192.0.2.9:1", last_seen=T0)
        s.index_key(KEYS[4], 5)
        self.record()
        s.nodes[7].hostname = "beta"
        s.nodes[7].tags = ["new"]
        s.nodes[5].last_seen = T0 + 30
        del s.nodes[1 << 31]
        s.gone[1 << 31] = T0 + 1.5
        self.record()
        self.assertEqual(set(self.records[1]["set"]["nodes"]), {"7", "5"})
        self.assertEqual(self.records[1]["del"]["nodes"], [str(1 << 31)])
        self.assertReplayed()

    def test_heard_from_is_not_a_change(self) -> None:
        """
        A heartbeat's ``last_seen`` (``Registry.touch``) is liveness: no record
        holds the node for it (a start floors every ``last_seen`` anyway); the
        node's next real change carries it.
        """
        clock = Clock()
        clock.advance(T0 + 100)
        registry = Registry(clock, state=self.state)
        self.tracker.delta()  # what the registry's start changed (keys without a node)
        node = self.state.nodes[7]
        registry.touch(node)
        self.assertEqual(node.last_seen, T0 + 100)
        self.assertEqual(self.tracker.delta(), {})
        node.hostname = "beta"
        self.record()
        self.assertEqual(set(self.records[0]["set"]["nodes"]), {"7"})
        self.assertEqual(self.records[0]["set"]["nodes"]["7"]["last_seen"], rfc3339_second(T0 + 100))

    def test_keys_replay_state_trust(self) -> None:
        s = self.state
        s.auth_ts[7] = int(T0 * 1000) + 999
        s.proven.add(1 << 31)
        s.trust.discard((7, 99))
        s.trust.add((0xFFFFFFFE, 1 << 31))
        s.asked.add((7, 0xFFFFFFFE))
        self.record()
        s.forget(99)  # its key, replay state and trust go
        s.asked.discard((7, 0xFFFFFFFE))
        self.record()
        self.assertEqual(self.records[0]["add"]["proven"], [1 << 31])
        self.assertReplayed()

    def test_handshakes_and_statements(self) -> None:
        s = self.state
        s.inbox[7].append(HandshakeRequest(0xFFFFFFFE, "hi", T0))  # changed in place
        s.responses.pop(99)
        s.responses[7] = [HandshakeResponse(99, False, T0 + 1)]
        statement = make_statement(7, ALICE.public_key, 99, b"", 1, 1, False, ALICE.sign)
        s.statements.setdefault(7, {})[99] = statement
        self.record()
        s.inbox[7].clear()
        s.statements[7][99] = make_statement(7, ALICE.public_key, 99, b"", 2, 2, True, ALICE.sign)  # in place
        self.record()
        self.assertEqual(self.records[1]["del"]["handshake_inbox"], ["7"])
        self.assertEqual(list(self.records[1]["set"]["trust_statements"]), ["7"])
        self.assertReplayed()
        self.assertEqual(self.tracker.delta(), {})

    def test_only_changed_nodes_are_looked_at(self) -> None:
        """A record costs the nodes that changed, not the store: an assignment names its node to the tracker."""
        s = self.state
        for i in range(200):
            node_id, key = 1000 + i, (1000 + i).to_bytes(4, "big") * 8
            s.nodes[node_id] = Node(id=node_id, public_key=key, real_addr="192.0.2.1:1", last_seen=T0)
            s.index_key(key, node_id)
        self.record()
        made: list[int] = []

        def counted(node: Node, key_text: str) -> dict[str, Any]:
            made.append(node.id)
            return original(node, key_text)
        original = journal.node_json
        self.patch(journal, "node_json", counted)
        s.nodes[1042].hostname = "one"
        s.nodes[7].last_seen = T0 + 60
        self.record()
        self.assertEqual(sorted(made), [7, 1042])
        self.assertEqual(self.tracker.delta(), {})
        self.assertReplayed()

    def test_node_changed_after_it_left(self) -> None:
        """
        A node object a handler still holds, changed after it was removed or
        replaced: the record is still right (it looks the id up in the state).
        """
        s = self.state
        gone, replaced = s.nodes[1 << 31], s.nodes[7]
        del s.nodes[1 << 31]
        s.nodes[7] = Node(id=7, public_key=replaced.public_key, real_addr="192.0.2.77:7", last_seen=T0 + 9)
        self.record()
        gone.hostname = "ghost"
        replaced.hostname = "stale"
        self.record()
        self.assertEqual(self.records[1]["del"]["nodes"], [str(1 << 31)])
        self.assertEqual(self.records[1]["set"]["nodes"]["7"]["real_addr"], "192.0.2.77:7")
        self.assertReplayed()
        self.assertEqual(self.state.nodes[7].hostname, "")

    def test_a_new_tracker_takes_the_nodes_over(self) -> None:
        """After a reset (a snapshot) the nodes report to the new set only: nothing from before leaks in."""
        s = self.state
        s.nodes[7].hostname = "before the snapshot"
        self.tracker.reset()
        self.store = stored(s)
        self.assertEqual(self.tracker.delta(), {})
        s.nodes[0xFFFFFFFE].tags = ["after"]
        self.record()
        self.assertEqual(list(self.records[0]["set"]["nodes"]), [str(0xFFFFFFFE)])
        self.assertReplayed()

    def test_replaced_container_is_noticed(self) -> None:
        """A container replaced whole is not tracked: the writer must take a snapshot."""
        self.assertTrue(self.tracker.intact())
        self.state.proven = {1, 2}
        self.assertFalse(self.tracker.intact())
        self.tracker.reset()
        self.assertTrue(self.tracker.intact())
        self.assertIsInstance(self.state.proven, TrackedSet)

    def test_reference_pairs_become_edges(self) -> None:
        """A reference store has undirected pairs only: a record's edges apply to both directions."""
        self.store.pop("trust_edges")
        self.store["trust_pairs"] = ["7:99"]
        self.state.trust.clear()
        self.state.trust.update({(7, 99), (99, 7)})
        self.tracker.delta()
        self.state.trust.discard((99, 7))
        self.record()
        self.assertReplayed()


class RecordTests(SynchronousTestCase):
    def lines(self, *seqs: int) -> bytes:
        return b"".join(encode_record(seq, {"add": {"proven": [seq]}}) for seq in seqs)

    def test_torn_tail_ignored(self) -> None:
        """A record cut short by a crash (never acknowledged) is ignored; the ones before it count."""
        whole = self.lines(1, 2, 3)
        for cut in (1, 10, len(self.lines(3)) - 1):
            records, torn = read_records(whole[:-cut])
            self.assertEqual([r["seq"] for r in records], [1, 2])
            self.assertEqual(torn, len(self.lines(3)) - cut)
        records, torn = read_records(self.lines(1, 2) + b"\0" * 4096)  # a block never written
        self.assertEqual(([r["seq"] for r in records], torn), ([1, 2], 4096))

    def test_wrong_crc_at_the_end_is_torn(self) -> None:
        data = bytearray(self.lines(1, 2))
        data[-3] ^= 1
        records, torn = read_records(bytes(data))
        self.assertEqual([r["seq"] for r in records], [1])

    def test_damage_before_good_records_refused(self) -> None:
        data = bytearray(self.lines(1, 2, 3))
        data[len(self.lines(1)) + 12] ^= 1
        with self.assertRaises(JournalError):
            read_records(bytes(data))

    def test_numbers_must_go_up(self) -> None:
        with self.assertRaises(JournalError):
            read_records(self.lines(1, 3, 2))

    def test_replay_in_order_after_the_store(self) -> None:
        """
        Records the store already holds (a crash between writing a snapshot and
        emptying the journal) are skipped; the others apply in order.
        """
        records, _ = read_records(b"".join([
            encode_record(4, {"set": {"auth_ts": {"7": 1}}}),
            encode_record(5, {"set": {"auth_ts": {"7": 2}}, "add": {"proven": [7]}}),
            encode_record(6, {"set": {"auth_ts": {"7": 3}}}),
            encode_record(7, {"del": {"auth_ts": ["8"]}, "drop": {"proven": [7]}}),
        ]))
        value: dict[str, Any] = {"pilot_journal_seq": 5, "auth_ts": {"7": 0, "8": 5}}
        self.assertEqual(replay(value, records), 2)
        self.assertEqual(value, {"pilot_journal_seq": 7, "auth_ts": {"7": 3}, "proven": []})
        value = {"auth_ts": {}}
        replay(value, records)
        self.assertEqual(value["auth_ts"], {"7": 3})

    def test_bad_shapes_refused(self) -> None:
        bads: list[dict[str, Any]] = [{"set": {"nodes": []}}, {"set": {"elsewhere": {}}},
                                      {"add": {"proven": [[1]]}}, {"del": {"nodes": "7"}}, {"set": []}]
        for bad in bads:
            records, _ = read_records(encode_record(1, bad))
            with self.assertRaises(JournalError, msg=repr(bad)):
                replay({}, records)


class FeedTests(SynchronousTestCase):
    """One tracker, two readers: each takes what changed since its own last take."""

    def setUp(self) -> None:
        self.state = sample_state()
        self.feed = journal.Feed(Tracker(self.state))
        self.a, self.b = object(), object()
        self.feed.join(self.a)
        self.feed.join(self.b)

    def test_each_reader_gets_every_change(self) -> None:
        self.state.nodes[7].hostname = "beta"
        first = self.feed.take(self.a)
        self.state.proven.add(1 << 31)
        self.assertEqual(self.feed.take(self.a), {"add": {"proven": [1 << 31]}})
        merged = self.feed.take(self.b)
        assert first is not None and merged is not None
        self.assertEqual(merged, {**first, "add": {"proven": [1 << 31]}})
        self.assertEqual(self.feed.take(self.b), {})

    def test_the_last_change_of_a_key_wins(self) -> None:
        s = self.state
        s.nodes[7].hostname = "beta"
        s.proven.add(1 << 31)
        s.trust.discard((7, 99))
        self.feed.take(self.a)
        del s.nodes[7]
        s.proven.discard(1 << 31)
        s.trust.add((7, 99))
        s.auth_ts[7] = 1
        self.feed.take(self.a)
        s.auth_ts.pop(7)
        s.auth_ts[7] = 2
        s.nodes[7] = Node(id=7, public_key=KEYS[0], last_seen=T0)
        self.feed.take(self.a)
        del s.nodes[1 << 31]
        self.assertEqual(self.feed.take(self.b), {
            "set": {"nodes": {"7": json.loads(json.dumps(stored(s)["nodes"]["7"]))}, "auth_ts": {"7": 2}},
            "del": {"nodes": [str(1 << 31)]}, "add": {"trust_edges": ["7>99"]},
            "drop": {"proven": [1 << 31]}})

    def test_a_record_handed_out_is_never_changed(self) -> None:
        self.state.nodes[7].hostname = "beta"
        self.feed.take(self.b)
        self.state.nodes[7].hostname = "gamma"
        taken = self.feed.take(self.a)
        assert taken is not None
        copy = json.loads(json.dumps(taken))
        self.state.nodes[7].hostname = "delta"
        del self.state.nodes[1 << 31]
        self.feed.take(self.b)
        self.feed.take(self.a)
        self.assertEqual(taken, copy)

    def test_lost_reader_starts_from_the_whole_state(self) -> None:
        self.feed.lose(self.a)
        self.state.nodes[7].hostname = "beta"
        self.assertIsNone(self.feed.take(self.a))
        self.assertEqual(self.feed.take(self.a), {})
        self.assertEqual(set(self.feed.take(self.b) or {}), {"set"})
        self.assertIsNone(self.feed.take(object()))  # one that never joined

    def test_replaced_container_restarts_every_reader(self) -> None:
        self.state.nodes[7].hostname = "beta"
        self.feed.take(self.a)
        self.state.trust = {(7, 99)}
        self.assertIsNone(self.feed.take(self.b))
        self.assertIsNone(self.feed.take(self.a))
        self.state.trust.add((99, 7))
        self.assertEqual(self.feed.take(self.a), {"add": {"trust_edges": ["99>7"]}})

    def test_a_reader_that_left_keeps_nothing(self) -> None:
        self.feed.leave(self.b)
        self.state.nodes[7].hostname = "beta"
        self.feed.take(self.a)
        self.assertFalse(self.feed.joined(self.b))
        self.assertIsNone(self.feed.take(self.b))
