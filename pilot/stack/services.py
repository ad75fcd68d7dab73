# -*- test-case-name: tests.test_stack -*-
"""
The stack's built-in stream services: the echo server on port 7 and the
client half of the reference pilotctl's ping (docs/reference-wire.md §7).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from pilot.address import Address
from pilot.errors import ConnectionFailed, NotTrusted, Timeout
from pilot.stack.streams import ConnectionRefused

if TYPE_CHECKING:
    from pilot.stack.transport import StreamTransport


class Echo(Protocol):
    """
    Port 7: every byte back.  The transport is registered as its own
    producer, so when the peer does not read what we echo, we stop reading
    what it sends (our send buffer stays bounded).
    """

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.transport, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


def echo_factory() -> Factory[Echo]:
    factory: Factory[Echo] = Factory.forProtocol(Echo)
    factory.noisy = False
    return factory


def ping_payload(seq: int) -> bytes:
    """What pilotctl writes to port 7 for ping number ``seq``."""
    return b"ping-%d" % seq


class Ping(Protocol):
    """
    One ping the reference pilotctl's way: on connection write
    ``ping-<seq>``, read until that many bytes came back, close.  ``done``
    fires with the round trip in milliseconds, timed as the reference times
    it, from the dial to the whole echo (so the two compare), or fails with
    ``ConnectionFailed``.  :attr:`echo_ms` keeps the write-to-echo part.
    """

    def __init__(self, clock: IReactorTime, seq: int, done: Deferred[float]) -> None:
        self.clock = clock
        self.expected = ping_payload(seq)
        self.done = done
        self.received = b""
        self.started = clock.seconds()  # the dial starts now
        self.written = 0.0
        self.echo_ms = 0.0
        #: The dial's Deferred, and the whole exchange's timeout (set by ``Stack.ping``).
        self.connecting: Deferred[Any] | None = None
        self.expiry: IDelayedCall | None = None

    def expire(self, address: Address, timeout: float) -> None:
        """The timeout: fail ``done``, and abandon the dial or reset the stream."""
        self.expiry = None
        if self.done.called:
            return
        self.done.errback(Timeout(f"no echo from {address} within {timeout:g} s",
                                  hint="the peer did not answer; check that it is running and trusts you"))
        if self.transport is not None:
            cast("StreamTransport", self.transport).abortConnection()
        elif self.connecting is not None:
            self.connecting.cancel()

    def finished(self, result: Any, cancel: Callable[[IDelayedCall | None], None]) -> Any:
        """``done`` fired: cancel the timeout (with the stack's ``cancel``)."""
        cancel(self.expiry)
        self.expiry = None
        return result

    def connectionMade(self) -> None:
        self.written = self.clock.seconds()
        self.transport.write(self.expected)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) < len(self.expected) or self.done.called:
            return
        if self.received[:len(self.expected)] == self.expected:
            now = self.clock.seconds()
            self.echo_ms = (now - self.written) * 1000.0
            self.done.callback((now - self.started) * 1000.0)
        else:
            self.done.errback(ConnectionFailed(
                f"port 7 answered {self.received[:64]!r} to {self.expected!r}",
                hint="the peer's port 7 is not an echo service"))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(ConnectionFailed(
                f"the echo connection closed before the echo came back ({reason.getErrorMessage()})"))



def ping_refusal(address: Address, failure: Failure) -> Failure:
    """
    The echo port (7) is open on every node, ours and the reference's: an RST
    to it means the peer does not trust us (the issue-9 case: a moved node
    that lost its trust file), so say ``not_trusted``, not "refused".
    """
    if not failure.check(ConnectionRefused):
        return failure
    return Failure(NotTrusted(f"{address} refused our ping: it does not trust this node (any more)",
                              hint="if it just moved, it restores its trust by itself within seconds; "
                                   "otherwise ask it again with `pilotctl handshake`"))
