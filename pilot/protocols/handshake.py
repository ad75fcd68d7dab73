# -*- test-case-name: tests.node.test_handshake -*-
"""
Port 444 of the node's stack: one handshake message per stream
(docs/trust.md; the reference closes after writing it).

* :class:`HandshakeReceiver` reads one message and hands it to the trust
  machine (``TrustMachine.direct_message_received``);
* :class:`OneMessage` writes one message and closes (the direct way out).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.errors import MalformedFrame
from pilot.machines.trust import TrustMachine
from pilot.wire.handshake import MAX_MESSAGE, decode as decode_handshake


class OneMessage(Protocol):
    """Writes one message and closes (the direct handshake path)."""

    def __init__(self, message: bytes) -> None:
        self.message = message

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.message)
        self.transport.loseConnection()


class HandshakeReceiver(Protocol):
    """One JSON message per stream, then the stream is closed."""

    log = Logger()

    def __init__(self, trust: TrustMachine) -> None:
        self.trust = trust
        self.buffer = b""
        self.done = False

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        assert self.transport is not None
        self.buffer += data
        try:
            message = decode_handshake(self.buffer)
        except MalformedFrame:
            if len(self.buffer) > MAX_MESSAGE:
                self.done = True
                self.transport.loseConnection()
            return
        self.done = True
        peer: Any = self.transport.getPeer()
        self.trust.direct_message_received(peer.address.node, message)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done = True


class HandshakeFactory(Factory):
    """Listens on the stack's port 444 for ``trust``."""

    def __init__(self, trust: TrustMachine) -> None:
        self.trust = trust

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[Protocol]:
        protocol = HandshakeReceiver(self.trust)
        protocol.factory = self
        return protocol
