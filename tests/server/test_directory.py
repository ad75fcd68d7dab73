"""
Tests for L{pilot.server.directory}: ``search_nodes``, finding nodes by
hostname, tag or address, and never a private node that does not trust the
asker.
"""

from __future__ import annotations

from typing import Any

from pilot.errors import ErrorCode
from pilot.server.directory import MAX_QUERY, MAX_RESULTS, SEARCH_BURST
from pilot.server.registry import Peer

from tests.server.test_registry import NO_LIMITS, OTHER_PEER, PEER, RegistryTestCase, World, ident

CAROL_PEER = Peer("192.0.2.99", 30003)


class SearchTests(RegistryTestCase):
    """
    The controller (public, no hostname rules) searches a fleet: sensor-1
    (public, tag #temp), sensor-2 (private, trusts the controller) and
    sensor-3 (private, trusts nobody).
    """

    def setUp(self) -> None:
        self.world = World(NO_LIMITS)
        self.controller = ident(10)
        self.c = self.world.join(self.controller, PEER, hostname="controller")
        self.s1 = self.world.join(ident(11), OTHER_PEER, hostname="sensor-1")
        self.s2 = self.world.join(ident(12), CAROL_PEER, hostname="sensor-2")
        self.s3 = self.world.join(ident(13), CAROL_PEER, hostname="sensor-3")
        self.world.node(self.s1).public = True
        self.world.node(self.s1).tags = ["temp"]
        self.world.registry.state.trust.add((self.s2, self.c))

    def search(self, query: Any, who: Any = None, requester: int | None = None) -> dict[str, Any]:
        msg = {"type": "search_nodes", "requester_id": self.c if requester is None else requester,
               "query": query}
        return self.world.send(self.world.authed(who or self.controller, msg), PEER)

    def names(self, reply: dict[str, Any]) -> list[str]:
        self.assertOk(reply, "search_nodes")
        return [n["hostname"] for n in reply["nodes"]]

    def test_public_and_trusting_private_nodes(self) -> None:
        reply = self.search("sensor")
        self.assertEqual(self.names(reply), ["sensor-1", "sensor-2"])
        self.assertFalse(reply["truncated"])

    def test_never_a_private_node_that_does_not_trust_us(self) -> None:
        self.assertEqual(self.names(self.search("sensor-3")), [])
        self.assertEqual(self.names(self.search(str(self.s3))), [])

    def test_result_shape(self) -> None:
        node = self.search("sensor-1")["nodes"][0]
        self.assertEqual(node, {"node_id": self.s1, "address": str(self.world.node(self.s1).address),
                                "hostname": "sensor-1", "public": True, "tags": ["temp"]})
        self.assertNotIn("real_addr", node)

    def test_by_tag(self) -> None:
        self.assertEqual(self.names(self.search("#temp")), ["sensor-1"])
        self.assertEqual(self.names(self.search("TEMP")), ["sensor-1"])

    def test_by_address_and_node_id(self) -> None:
        address = str(self.world.node(self.s2).address)
        self.assertEqual(self.names(self.search(address)), ["sensor-2"])
        self.assertEqual(self.names(self.search(str(self.s2))), ["sensor-2"])

    def test_not_the_asker(self) -> None:
        self.assertEqual(self.names(self.search("controller")), [])

    def test_must_be_signed_by_the_requester(self) -> None:
        reply = self.world.send({"type": "search_nodes", "requester_id": self.c, "query": "sensor"}, PEER)
        self.assertError(reply, ErrorCode.unauthorized)
        self.assertError(self.search("sensor", who=ident(11)), ErrorCode.unauthorized)

    def test_query_bounds(self) -> None:
        self.assertError(self.search(""), ErrorCode.invalid_argument)
        self.assertError(self.search("  "), ErrorCode.invalid_argument)
        self.assertError(self.search("x" * (MAX_QUERY + 1)), ErrorCode.invalid_argument)
        self.assertError(self.search(7), ErrorCode.invalid_argument)

    def test_results_capped(self) -> None:
        for i in range(MAX_RESULTS + 5):
            node = self.world.join(ident(100 + i), Peer("192.0.2.1", 1000 + i), hostname=f"probe-{i}")
            self.world.node(node).public = True
        reply = self.search("probe")
        self.assertEqual(len(reply["nodes"]), MAX_RESULTS)
        self.assertTrue(reply["truncated"])

    def test_rate_limited_per_node(self) -> None:
        for _ in range(int(SEARCH_BURST)):
            self.assertOk(self.search("sensor"), "search_nodes")
        self.assertError(self.search("sensor"), ErrorCode.rate_limited)
        self.world.advance(2)
        self.assertOk(self.search("sensor"), "search_nodes")
