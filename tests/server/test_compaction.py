"""
Tests for pilot.server.compaction: the store rebuilt from a view and the
journal's records is, byte for byte, what the live state would write.
"""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import Identity
from pilot.server.compaction import StateView, StoreMirror
from pilot.server.journal import Tracker, encode_record
from pilot.server.state import HandshakeRequest, HandshakeResponse, Node, RegistryState
from pilot.wire.statement import make_statement

from tests.server.test_state import KEYS, T0, sample_state

ALICE = Identity.from_seed(b"\x41" * 32)


class MirrorTests(SynchronousTestCase):
    def start(self, state: RegistryState) -> None:
        self.state = state
        self.tracker = Tracker(state)
        self.mirror = StoreMirror(StateView.of(state))

    def record(self) -> None:
        """What the writer does: a record in the reactor, applied to the mirror in the writer thread."""
        delta = self.tracker.delta()
        if delta:
            self.state.journal_seq += 1
            record = {"seq": self.state.journal_seq, **delta}
            # the thread gets the delta itself; the journal's line it makes of it says the same
            line = encode_record(record["seq"], delta)
            self.assertEqual(json.loads(self.mirror.apply(record)), json.loads(line[9:]))
        self.assertEqual(self.mirror.render(), self.state.to_bytes())

    def test_view_alone(self) -> None:
        for state in (sample_state(), RegistryState(created=T0)):
            self.start(state)
            self.record()

    def test_the_replication_term(self) -> None:
        """pilot_term is in the file as to_bytes writes it (it was dropped by compactions)."""
        state = sample_state()
        state.term = 3
        self.start(state)
        self.record()
        self.state.term = self.mirror.term = 4  # a promotion: the writer hands the term over
        self.state.nodes[7].hostname = "beta"
        self.record()

    def test_the_journals_cases(self) -> None:
        """The changes of tests.server.test_journal.TrackerTests, one record after another."""
        self.start(sample_state())
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
        s.auth_ts[7] = int(T0 * 1000) + 999
        s.proven.add(1 << 31)
        s.trust.discard((7, 99))
        s.trust.add((0xFFFFFFFE, 1 << 31))
        s.asked.add((7, 0xFFFFFFFE))
        self.record()
        s.forget(99)
        s.asked.discard((7, 0xFFFFFFFE))
        self.record()
        s.inbox[7].append(HandshakeRequest(0xFFFFFFFE, "hi", T0))
        s.responses.pop(99, None)
        s.responses[7] = [HandshakeResponse(99, False, T0 + 1)]
        statement = make_statement(7, ALICE.public_key, 99, b"", 1, 1, False, ALICE.sign)
        s.statements.setdefault(7, {})[99] = statement
        self.record()
        s.inbox[7].clear()
        s.statements[7][99] = make_statement(7, ALICE.public_key, 99, b"", 2, 2, True, ALICE.sign)
        self.record()

    def test_random_changes(self) -> None:
        rng = random.Random(12)
        self.start(sample_state())
        s = self.state
        for step in range(400):
            op = rng.randrange(9)
            node_id = rng.choice([rng.randrange(1, 40), 1 << 31, 0xFFFFFFFE])
            key = node_id.to_bytes(4, "big") * 8  # one key per id, as the registry keeps them
            if op == 0:
                s.nodes[node_id] = Node(id=node_id, public_key=key, real_addr=f"192.0.2.{step % 250}:{step}",
                                        last_seen=T0 + step, hostname=rng.choice(["", f"h{step}"]))
                s.index_key(key, node_id)
            elif op == 1 and node_id in s.nodes:
                node = s.nodes[node_id]
                node.last_seen = T0 + step + rng.random()
                node.tags = rng.choice([[], ["a", "b"]])
                node.public = not node.public
                node.local_addr = rng.choice(["", "10.0.0.1:5"])
            elif op == 2:
                if s.nodes.pop(node_id, None) is not None:
                    s.gone[node_id] = T0 + step
            elif op == 3 and node_id not in s.nodes:  # as the registry does: only a gone node's key
                s.forget(node_id)
            elif op == 4:
                s.trust.add((node_id, rng.randrange(1, 40)))
                s.trust.discard((rng.randrange(1, 40), node_id))
            elif op == 5:
                s.proven.add(node_id)
                s.auth_ts[node_id] = int(T0 * 1000) + step
            elif op == 6:
                s.inbox.setdefault(node_id, []).append(HandshakeRequest(step, "j", T0 + step / 8))
                s.responses.pop(rng.randrange(1, 40), None)
            elif op == 7:
                s.responses.setdefault(node_id, []).append(HandshakeResponse(step, bool(step % 2), T0))
                s.asked.symmetric_difference_update({(node_id, 3)})
            else:
                s.inbox.get(node_id, []).clear()
            if rng.random() < 0.3:
                self.record()
        self.record()

    def test_random_changes_in_small_chunks(self) -> None:
        """Long sections are made a chunk at a time: the boundaries change nothing."""
        from pilot.server import compaction
        for size in (1, 2, 3):
            self.patch(compaction, "CHUNK", size)
            self.test_random_changes()
            self.test_the_journals_cases()

    def test_built_once_and_lazily(self) -> None:
        """The view is formatted by the first use (in the writer thread), not when it is taken."""
        self.start(sample_state())
        self.assertIsNotNone(self.mirror.view)
        self.assertEqual(self.mirror.maps["nodes"], {})
        self.mirror.build()
        self.assertIsNone(self.mirror.view)
        self.assertEqual(len(self.mirror.maps["nodes"]), 3)
        self.record()

    def test_view_is_a_copy(self) -> None:
        """Changes made after the view was taken reach the mirror only through records."""
        self.start(sample_state())
        self.state.nodes[7].hostname = "changed"
        self.state.trust.add((1, 2))
        self.state.inbox[7].append(HandshakeRequest(1, "x", T0))
        stale: dict[str, Any] = json.loads(self.mirror.render())
        self.assertEqual(stale["nodes"]["7"]["hostname"], "alpha")
        self.assertNotIn("1>2", stale["trust_edges"])
        self.assertEqual(len(stale["handshake_inbox"]["7"]), 2)
        self.record()
