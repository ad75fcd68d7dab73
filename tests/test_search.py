"""
Tests for L{pilot.search}: the node's side of ``peers --search``, with a
recording registry and no node.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import InvalidArgument, PilotError, RateLimited, RegistryUnavailable
from pilot.search import FIELDS, MAX_QUERY, search_network

SENSOR = {"node_id": 11, "address": "0:0000.0000.000B", "hostname": "sensor-1", "public": True,
          "tags": ["temp"]}
KNOWN = [{"node_id": 12, "address": "0:0000.0000.000C", "hostname": "sensor-2", "trusted": True,
          "endpoint": "127.0.0.1:4000"}]


class Recorder:
    def __init__(self, reply: Deferred[dict[str, Any]]) -> None:
        self.reply = reply
        self.sent: list[dict[str, Any]] = []
        self.known_queries: list[str] = []

    def request(self, msg: dict[str, Any]) -> Deferred[dict[str, Any]]:
        self.sent.append(msg)
        return self.reply

    def known(self, query: str) -> Deferred[list[dict[str, Any]]]:
        self.known_queries.append(query)
        return succeed(KNOWN)

    def search(self, query: str) -> Any:
        return search_network(self.request, query, self.known)


class SearchNetworkTests(SynchronousTestCase):
    def test_asks_the_registry(self) -> None:
        r = Recorder(succeed({"type": "search_nodes_ok", "nodes": [SENSOR], "truncated": False}))
        result = self.successResultOf(r.search(" sensor "))
        self.assertEqual(r.sent, [{"type": "search_nodes", "query": "sensor"}])
        self.assertEqual(result, {"nodes": [SENSOR], "source": "registry", "truncated": False, "note": None})
        self.assertEqual(r.known_queries, [])

    def test_every_node_has_the_documented_keys(self) -> None:
        odd = {"node_id": True, "address": 5, "hostname": "", "public": "yes", "tags": ["a", 1],
               "real_addr": "192.0.2.1:4000"}
        r = Recorder(succeed({"type": "search_nodes_ok", "nodes": [odd, "junk"], "truncated": True}))
        result = self.successResultOf(r.search("a"))
        self.assertEqual(result["nodes"], [{"hostname": None, "address": None, "node_id": None,
                                            "public": None, "tags": ["a"]}])
        self.assertEqual(tuple(result["nodes"][0]), FIELDS)
        self.assertTrue(result["truncated"])

    def test_reference_registry_falls_back_to_known_peers(self) -> None:
        r = Recorder(fail(InvalidArgument("unknown request type 'search_nodes'")))
        result = self.successResultOf(r.search("sensor"))
        self.assertEqual(r.known_queries, ["sensor"])
        self.assertEqual(result["source"], "known peers")
        self.assertEqual(result["nodes"], [{"hostname": "sensor-2", "address": "0:0000.0000.000C",
                                            "node_id": 12, "public": None, "tags": []}])
        self.assertIn("does not know search_nodes", result["note"])

    def test_unreachable_registry_falls_back_to_known_peers(self) -> None:
        r = Recorder(fail(RegistryUnavailable("cannot reach the registry: Connection refused")))
        result = self.successResultOf(r.search("sensor"))
        self.assertEqual(result["source"], "known peers")
        self.assertIn("Connection refused", result["note"])

    def test_other_errors_pass_through(self) -> None:
        r = Recorder(fail(RateLimited("too many searches")))
        failure = self.failureResultOf(r.search("sensor"), PilotError)
        self.assertIsInstance(failure.value, RateLimited)
        self.assertEqual(r.known_queries, [])

    def test_query_bounds(self) -> None:
        for query in ("", "   ", "x" * (MAX_QUERY + 1)):
            r = Recorder(succeed({}))
            self.failureResultOf(r.search(query), InvalidArgument)
            self.assertEqual(r.sent, [])
