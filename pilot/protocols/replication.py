# -*- test-case-name: tests.protocols.test_replication -*-
"""
The replication stream, subscriber side: a standby's connection to its
primary (or a promoted server's probe of its former primary).

Thin: on connect it sends the subscription; each frame is decoded
(``pilot.wire.replication``) and handed to the :class:`Receiver`; it writes
the acknowledgements it is asked to.  A frame that does not decode closes the
connection (the stream cannot be trusted after it).  Nothing received for
``read_deadline`` seconds (the reference's 45 s) closes it too.  The primary's
side is the registry's own connection (``pilot.protocols.registry``).
"""

from __future__ import annotations

from typing import Any, Protocol as Typed

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.errors import MalformedFrame
from pilot.protocols.registry import abort
from pilot.server.pair_defaults import READ_DEADLINE
from pilot.wire import replication as wire
from pilot.wire.registry import FrameDecoder, encode_frame



class Receiver(Typed):
    """Where the stream's events go (``pilot.services.replication``)."""

    def frame_received(self, link: ReplicationClientProtocol, frame: wire.Frame) -> None: ...

    def link_lost(self, attempt: ReplicationClientFactory, reason: str) -> None:
        """The attempt ``attempt`` failed, or its connection was lost."""


class ReplicationClientProtocol(Protocol):
    log = Logger()

    def __init__(self, attempt: ReplicationClientFactory, subscription: dict[str, Any], receiver: Receiver,
                 clock: IReactorTime, read_deadline: float = READ_DEADLINE,
                 max_frame: int = wire.MAX_REPLICATION_FRAME) -> None:
        self.attempt = attempt
        self.subscription = subscription
        self.receiver = receiver
        self.clock = clock
        self.read_deadline = read_deadline
        self._decoder = FrameDecoder(max_frame)
        self._deadline: IDelayedCall | None = None
        self._closing = False
        self._why = "closed"

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(encode_frame(self.subscription))
        self._restart_deadline()

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            frames = self._decoder.feed(data)
        except MalformedFrame as e:
            self._drop(f"a bad frame length: {e.reason}")
            return
        if frames:
            self._restart_deadline()
        for item in frames:
            if self._closing:
                return
            try:
                if isinstance(item, MalformedFrame):
                    raise item
                frame = wire.decode(item)
            except MalformedFrame as e:
                self._drop(f"a malformed replication frame: {e.reason}")
                return
            self.receiver.frame_received(self, frame)

    def send_ack(self, seq: int) -> None:
        if not self._closing and self.transport is not None:
            self.transport.write(encode_frame(wire.encode_ack(seq)))

    def close(self, why: str) -> None:
        """Close the stream (the receiver hears :meth:`Receiver.link_lost` with ``why``)."""
        if not self._closing and self.transport is not None:
            self._closing = True
            self._why = why
            self.transport.loseConnection()

    def _drop(self, why: str) -> None:
        self._closing = True
        self._why = why
        abort(self)

    def _restart_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self.read_deadline)
        else:
            self._deadline = self.clock.callLater(self.read_deadline, self._timed_out)

    def _timed_out(self) -> None:
        self._deadline = None
        self._drop(f"nothing received for {self.read_deadline:.0f} s")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        why = self._why if self._closing else reason.getErrorMessage()
        self._closing = True
        self.receiver.link_lost(self.attempt, why)


class ReplicationClientFactory(ClientFactory):
    """One connection attempt; a failed attempt is reported like a lost link."""

    noisy = False

    def __init__(self, subscription: dict[str, Any], receiver: Receiver, clock: IReactorTime,
                 read_deadline: float = READ_DEADLINE) -> None:
        self.subscription = subscription
        self.receiver = receiver
        self.clock = clock
        self.read_deadline = read_deadline
        self.protocol_made: ReplicationClientProtocol | None = None

    def buildProtocol(self, addr: IAddress | None) -> ReplicationClientProtocol:
        self.protocol_made = ReplicationClientProtocol(self, self.subscription, self.receiver, self.clock,
                                                       self.read_deadline)
        return self.protocol_made

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.receiver.link_lost(self, reason.getErrorMessage())
