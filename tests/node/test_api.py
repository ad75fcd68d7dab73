"""pilot.services.api over a real node pair on a clock: what the control socket's commands answer."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import ConnectionFailed, NotTrusted
from pilot.nodeconfig import NodeSettings
from pilot.services.api import NodeAPIImpl
from tests.node.fakes import Host, pair

PORT = 1000


def api(host: Host) -> NodeAPIImpl:
    settings = NodeSettings(home="/nonexistent", identity="/nonexistent/identity.json", socket="/nonexistent/s")
    return NodeAPIImpl(host.node, host.node.clock, settings, {})  # type: ignore[arg-type]


class ConnectRefusedTests(SynchronousTestCase):
    """A refused connection says not_trusted when trust is the reason we can tell."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.network, self.a, self.b = pair(self.clock)
        self.b.node.stack.listen(PORT, Factory.forProtocol(Protocol))

    def connect(self) -> Any:
        d = api(self.a).connect(str(self.b.node.own_id), PORT, Protocol())
        for _ in range(300):
            self.clock.advance(0.01)
        return self.failureResultOf(d)

    def forget(self, host: Host, other: Host) -> None:
        """``host`` no longer trusts ``other`` (but still knows its key and endpoint)."""
        del host.trust_store.trusted[other.node.own_id]
        host.node.peers.peer(other.node.own_id).public_key = other.identity.public_key

    def test_neither_trusts_the_other(self) -> None:
        self.forget(self.a, self.b)
        self.forget(self.b, self.a)
        failure = self.connect()
        failure.trap(NotTrusted)
        self.assertIn("handshake", failure.value.hint)

    def test_we_trust_it_it_refuses(self) -> None:
        # we cannot tell "nothing listens" from "it no longer trusts us": stay with the refusal
        self.forget(self.b, self.a)
        failure = self.connect()
        failure.trap(ConnectionFailed)
        self.assertNotIsInstance(failure.value, NotTrusted)
