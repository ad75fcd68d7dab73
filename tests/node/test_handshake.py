"""
Tests for L{pilot.protocols.handshake}: port 444 between two real nodes on
a clock; a handshake request goes over a stream (``OneMessage``) and lands
in the other node's pending list (``HandshakeReceiver``).
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pilot.protocols.handshake import HandshakeFactory, OneMessage
from pilot.wire.handshake import HANDSHAKE_PORT, MAX_MESSAGE
from tests.node.fakes import pair


class HandshakeTests(SynchronousTestCase):
    def test_request_over_port_444(self) -> None:
        """
        The request reaches b's trust machine over a stream; with no registry
        to look a's key up it is dropped there, which the log tells.
        """
        clock = Clock()
        clock.advance(1_700_000_000)
        network, a, b = pair(clock)
        b.trust_store.trusted.clear()  # b does not know a yet: it asks b for trust
        a.trust_store.trusted.clear()
        # the keys the registry's lookup gave each (no pin yet)
        a.node.peers.peer(b.node.own_id).public_key = b.identity.public_key
        b.node.peers.peer(a.node.own_id).public_key = a.identity.public_key
        b.node.stack.listen(HANDSHAKE_PORT, HandshakeFactory(b.node.trust))
        with capturedLogs() as events:
            a.node.trust.handshake(b.node.own_id, "let me in")
            for _ in range(100):
                clock.advance(0.01)
        dropped = [e for e in events if "dropped a direct" in e.get("log_format", "")]
        self.assertEqual(len(dropped), 1, events)
        self.assertEqual(formatEvent(dropped[0]).split(" from node ")[1].split(":")[0], str(a.node.own_id))
        self.assertEqual(a.node.trust.status(b.node.own_id), "requested")

    def test_one_message_writes_and_closes(self) -> None:
        transport = StringTransport()
        OneMessage(b"{}").makeConnection(transport)
        self.assertEqual(transport.value(), b"{}")
        self.assertTrue(transport.disconnecting)

    def test_oversized_garbage_closes(self) -> None:
        clock = Clock()
        network, a, b = pair(clock)
        protocol = HandshakeFactory(b.node.trust).buildProtocol(None)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"x" * (MAX_MESSAGE + 1))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(b.node.trust.pending(), [])
