"""Tests for L{pilot.details}: hostnames and keys from the registry for pending and trust lists."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from pilot.details import MAX_LOOKUPS, with_details
from pilot.errors import NotFound, RegistryUnavailable

REGISTRY = {9: {"type": "lookup_ok", "node_id": 9, "hostname": "agent-a", "public_key": "S0VZ"},
            10: {"type": "lookup_ok", "node_id": 10, "public_key": "VEVO"}}


class WithDetailsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.asked: list[int] = []

    def lookup(self, node_id: int) -> Deferred[dict[str, Any]]:
        self.asked.append(node_id)
        if node_id in REGISTRY:
            return succeed(REGISTRY[node_id])
        if node_id == 13:
            return fail(RegistryUnavailable("cannot reach the registry"))
        return fail(NotFound(f"node {node_id} is not registered"))

    def test_pending_gets_hostname_and_key(self) -> None:
        rows = [{"node_id": 9, "public_key": "", "justification": "let me in", "received_at": 5}]
        result = self.successResultOf(with_details(rows, self.lookup))
        self.assertEqual(result, [{"node_id": 9, "public_key": "S0VZ", "justification": "let me in",
                                   "received_at": 5, "hostname": "agent-a"}])
        self.assertEqual(rows[0]["public_key"], "")  # the caller's rows are not changed

    def test_a_known_key_is_kept(self) -> None:
        rows = [{"node_id": 9, "public_key": "UElO", "approved_at": 1, "mutual": True}]
        [row] = self.successResultOf(with_details(rows, self.lookup))
        self.assertEqual((row["public_key"], row["hostname"]), ("UElO", "agent-a"))

    def test_no_hostname_and_failures_leave_none(self) -> None:
        rows = [{"node_id": 10, "public_key": ""}, {"node_id": 11, "public_key": ""},
                {"node_id": 13, "public_key": ""}]
        result = self.successResultOf(with_details(rows, self.lookup))
        self.assertEqual([(r["hostname"], r["public_key"]) for r in result],
                         [(None, "VEVO"), (None, ""), (None, "")])

    def test_complete_rows_are_not_looked_up(self) -> None:
        rows = [{"node_id": 9, "public_key": "UElO", "hostname": "agent-a"}]
        self.assertEqual(self.successResultOf(with_details(rows, self.lookup)), rows)
        self.assertEqual(self.asked, [])

    def test_lookups_bounded(self) -> None:
        rows = [{"node_id": 1000 + i, "public_key": ""} for i in range(MAX_LOOKUPS + 10)]
        self.successResultOf(with_details(rows, self.lookup))
        self.assertEqual(len(self.asked), MAX_LOOKUPS)
