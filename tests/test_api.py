"""
pilot.api (docs/api.md): the embedded node's settings and identity, and its
endpoints over a fake node API (dial, cancel, refusal, listen).  The embedded
node on real sockets is tests/integration/test_examples.py.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from pilot.address import Address
from pilot.api import EmbeddedClientEndpoint, EmbeddedNode, EmbeddedServerEndpoint
from pilot.errors import NotTrusted
from pilot.identity import Identity
from pilot.stack.transport import PilotAddress


class FakePeers:
    def node_id(self, target: str) -> Any:
        return {"agent-b": 5}.get(target, 9)


class FakeNode:
    peers = FakePeers()


class FakeAPI:
    def __init__(self) -> None:
        self.node = FakeNode()
        self.dials: list[tuple[str, int, Any, Deferred[Any]]] = []
        self.listens: list[tuple[int, Any]] = []
        self.refuse: Exception | None = None

    def connect(self, target: str, port: int, protocol: Any) -> Deferred[Any]:
        if self.refuse is not None:
            return fail(self.refuse)
        cancelled: list[bool] = []
        d: Deferred[Any] = Deferred(lambda d: cancelled.append(True))
        self.dials.append((target, port, protocol, d))
        return d

    def listen(self, port: int, factory: Any) -> Deferred[Any]:
        self.listens.append((port, factory))
        return succeed(f"listening on {port}")


class Named(Protocol):
    def __init__(self, address: Any) -> None:
        self.address = address


class NamedFactory(Factory):
    def buildProtocol(self, addr: Any) -> Named:
        return Named(addr)


class EmbeddedEndpointTests(SynchronousTestCase):
    def test_connect_builds_the_protocol_for_the_peer(self) -> None:
        api = FakeAPI()
        d = EmbeddedClientEndpoint(api, "agent-b", 1000).connect(NamedFactory())  # type: ignore[arg-type]
        ((target, port, protocol, dial),) = api.dials
        self.assertEqual((target, port), (str(Address(0, 5)), 1000))
        self.assertEqual(protocol.address, PilotAddress(Address(0, 5), 1000))
        self.assertNoResult(d)
        dial.callback({"target": target})
        self.assertIs(self.successResultOf(d), protocol)

    def test_cancel_abandons_the_dial(self) -> None:
        api = FakeAPI()
        d = EmbeddedClientEndpoint(api, "agent-b", 1000).connect(NamedFactory())  # type: ignore[arg-type]
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(api.dials[0][3].called)

    def test_refused(self) -> None:
        api = FakeAPI()
        api.refuse = NotTrusted("no trust")
        d = EmbeddedClientEndpoint(api, "agent-b", 1000).connect(NamedFactory())  # type: ignore[arg-type]
        self.failureResultOf(d, NotTrusted)

    def test_listen(self) -> None:
        api = FakeAPI()
        factory = NamedFactory()
        d = EmbeddedServerEndpoint(api, 1000).listen(factory)  # type: ignore[arg-type]
        self.assertEqual(self.successResultOf(d), "listening on 1000")
        self.assertEqual(api.listens, [(1000, factory)])


class EmbeddedNodeTests(SynchronousTestCase):
    def test_identity_made_once_and_settings_read(self) -> None:
        home = self.mktemp()
        node = EmbeddedNode(MemoryReactorClock(), home, registry="127.0.0.1:9100", hostname="agent-a")
        self.assertEqual(node.settings.registry, "127.0.0.1:9100")
        self.assertEqual(node.settings.beacon, "127.0.0.1:9001")
        self.assertEqual(node.settings.hostname, "agent-a")
        self.assertEqual(node.settings.socket, os.path.join(os.path.abspath(home), "pilot.sock"))
        identity = Identity.load(os.path.join(home, "identity.json"))
        self.assertEqual(node.address, identity.address)
        again = EmbeddedNode(MemoryReactorClock(), home, registry="127.0.0.1:9100")
        self.assertEqual(again.address, identity.address)
        self.assertIs(node.api, node.service.api)
        self.assertEqual(list(node), [node.service])

    def test_environment_is_not_read(self) -> None:
        os.environ["PILOT_HOSTNAME"] = "from-the-environment"
        self.addCleanup(os.environ.pop, "PILOT_HOSTNAME")
        node = EmbeddedNode(MemoryReactorClock(), self.mktemp())
        self.assertIsNone(node.settings.hostname)

    def test_stopping_ends_the_forwards(self) -> None:
        reactor = MemoryReactorClock()
        node = EmbeddedNode(reactor, self.mktemp())
        node.api.forwards.forward(8080, "agent-b", 80)
        node.stopService()
        self.assertEqual(node.api.forwards.list(), {"forwards": [], "exposed": []})

    def test_endpoints(self) -> None:
        node = EmbeddedNode(MemoryReactorClock(), self.mktemp())
        client = node.client_endpoint("agent-b", 7)
        self.assertEqual((client.api, client.target, client.port), (node.api, "agent-b", 7))
        self.assertEqual(node.server_endpoint(7).port, 7)
