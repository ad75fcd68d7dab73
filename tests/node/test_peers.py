"""
Tests for L{pilot.node.peers}: targets to node ids, endpoints cached and
told to the path layer, keys pinned or looked up.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pilot.errors import InvalidArgument, RegistryUnavailable
from pilot.interfaces import IPathEvents
from pilot.node.peers import ENDPOINT_TTL, PeerDirectory


class Registry:
    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []
        self.replies: dict[str, dict[str, Any]] = {}

    def request(self, msg: dict[str, Any], signed_field: Optional[str] = None) -> "Deferred[dict[str, Any]]":
        self.asked.append(msg)
        reply = self.replies.get(msg["type"])
        return succeed(reply) if reply is not None else fail(RegistryUnavailable("away"))


@implementer(IPathEvents)
class Paths:
    def __init__(self) -> None:
        self.learned: list[tuple[int, tuple[str, int]]] = []

    def endpoint_learned(self, node_id: int, endpoint: tuple[str, int]) -> None:
        self.learned.append((node_id, endpoint))

    def direct_frame(self, node_id: int, endpoint: tuple[str, int]) -> None:
        pass

    def relayed_frame(self, node_id: int) -> None:
        pass


class PeerDirectoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.registry = Registry()
        self.pins: dict[int, bytes] = {}
        self.peers = PeerDirectory(self.clock, self.registry.request, self.pinned)
        self.paths = Paths()
        self.peers.wire(self.paths)

    def pinned(self, node_id: int) -> bytes:
        return self.pins.get(node_id, b"")

    def test_targets(self) -> None:
        self.assertEqual(self.successResultOf(self.peers.node_id("42")), 42)
        self.assertEqual(self.successResultOf(self.peers.node_id("0:0000.0000.002A")), 42)
        self.failureResultOf(self.peers.node_id("Not A Name!"), InvalidArgument)

    def test_resolved_endpoint_is_cached_and_told_to_the_paths(self) -> None:
        self.registry.replies["resolve"] = {"real_addr": "203.0.113.5:4000"}
        self.assertEqual(self.successResultOf(self.peers.endpoint(5)), ("203.0.113.5", 4000))
        self.assertEqual(self.paths.learned, [(5, ("203.0.113.5", 4000))])
        self.successResultOf(self.peers.endpoint(5))
        self.assertEqual(len(self.registry.asked), 1)
        self.peers.expire(5)
        self.successResultOf(self.peers.endpoint(5))
        self.assertEqual(len(self.registry.asked), 2)
        self.assertEqual(self.paths.learned, [(5, ("203.0.113.5", 4000))])  # unchanged: told once

    def test_registry_away_keeps_the_last_endpoint(self) -> None:
        self.peers.update(5, ("203.0.113.5", 4000))
        self.clock.advance(ENDPOINT_TTL + 1)
        self.assertEqual(self.successResultOf(self.peers.endpoint(5)), ("203.0.113.5", 4000))
        self.failureResultOf(self.peers.endpoint(6), RegistryUnavailable)

    def test_key_pinned_first(self) -> None:
        self.pins[5] = b"k" * 32
        self.assertEqual(self.successResultOf(self.peers.key(5)), b"k" * 32)
        self.assertIsNone(self.successResultOf(self.peers.key(6)))  # no pin, the registry away
