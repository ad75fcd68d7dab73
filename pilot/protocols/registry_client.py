# -*- test-case-name: tests.protocols.test_registry -*-
"""
The registry's TCP protocol, client side: our node and the benchmarks use it.

:meth:`RegistryClientProtocol.request` sends one request and returns a
Deferred for its reply.  Requests may be pipelined: the registry answers them
in order, so replies are matched to requests first-in, first-out.  A frame
whose ``type`` is ``"event"`` is not a reply; it goes to ``on_event``.

A reply that is an error (``type`` ``"error"``, or any string ``error``
field, as the reference client judges it) fails its Deferred with the
:class:`~pilot.errors.PilotError` for its ``code`` (``internal`` when the
registry gave none, as the reference never does); the error keeps the whole
reply as its ``registry_reply`` attribute (a pair's ``term``, a standby's
``primary``: ``docs/registration.md``).  Losing the connection
fails every outstanding request with :class:`~pilot.errors.RegistryUnavailable`;
reconnecting is the caller's business.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IAddress, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.errors import InvalidArgument, MalformedFrame, PilotError, RegistryUnavailable, error_for
from pilot.machines.registration.requests import REPLY_ATTRIBUTE
from pilot.wire.registry import FrameDecoder, encode_frame

EventCallback = Callable[[dict[str, Any]], object]


def reply_error(reply: dict[str, Any]) -> PilotError | None:
    """The error a reply reports, or None for a successful reply."""
    text = reply.get("error")
    if reply.get("type") != "error" and not isinstance(text, str):
        return None
    message = text if isinstance(text, str) and text else "the registry reported an error"
    code = reply.get("code")
    error = error_for(code if isinstance(code, str) and code else "internal", message)
    # the whole reply goes along: the registration screens its term and a
    # standby's ``primary`` (pilot.machines.registration.servers)
    setattr(error, REPLY_ATTRIBUTE, reply)
    return error


class RegistryClientProtocol(Protocol):
    """One connection to a registry; pipelined requests, replies in order."""

    log = Logger()

    def __init__(self, on_event: EventCallback | None = None,
                 on_lost: Callable[["RegistryClientProtocol", str], None] | None = None) -> None:
        self.on_event = on_event
        self.on_lost = on_lost
        self._decoder = FrameDecoder()
        self._waiting: deque[Deferred[dict[str, Any]]] = deque()
        self._connected = False
        self._lost: str | None = None
        self._broken: str | None = None

    @property
    def outstanding(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._waiting)

    def request(self, msg: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """
        Send ``msg``; the Deferred fires with the reply, or fails with the
        reply's error or with ``RegistryUnavailable``.  Cancelling it leaves
        its place in the queue, so the replies that follow still match.
        """
        if not self._connected or self.transport is None:
            reason = self._lost or "not connected"
            return fail(RegistryUnavailable(f"cannot reach the registry: {reason}"))
        try:
            frame = encode_frame(msg)
        except (TypeError, ValueError) as e:
            return fail(InvalidArgument(f"cannot send this registry request: {e}"))
        d: Deferred[dict[str, Any]] = Deferred()
        self._waiting.append(d)
        self.transport.write(frame)
        return d

    def close(self) -> None:
        """Close the connection; outstanding requests fail with ``RegistryUnavailable``."""
        if self.transport is not None:
            self.transport.loseConnection()

    # --- Protocol ----------------------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True

    def dataReceived(self, data: bytes) -> None:
        if self._broken is not None:
            return
        try:
            items = self._decoder.feed(data)
        except MalformedFrame as e:
            self._protocol_error(e.reason)
            return
        for item in items:
            if isinstance(item, MalformedFrame):
                self._protocol_error(item.reason)
                return
            self._received(item)

    def _received(self, message: dict[str, Any]) -> None:
        if message.get("type") == "event":
            if self.on_event is not None:
                with self.log.failuresHandled("registry event handler failed for {event!r}",
                                              event=message.get("event")):
                    self.on_event(message)
            return
        if not self._waiting:
            self.log.warn("unsolicited {kind!r} from the registry, dropped", kind=str(message.get("type"))[:40])
            return
        d = self._waiting.popleft()
        if d.called:  # cancelled by the caller; its reply still had to be consumed
            return
        error = reply_error(message)
        if error is None:
            d.callback(message)
        else:
            d.errback(error)

    def _protocol_error(self, reason: str) -> None:
        # A reply that does not decode cannot be matched to its request, nor
        # can any after it: give up on this connection.
        self.log.warn("registry sent a malformed frame ({reason}); closing the connection", reason=reason)
        self._broken = f"the registry sent a malformed frame: {reason}"
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        elif self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connected = False
        self._lost = self._broken or f"lost the connection to the registry: {reason.getErrorMessage()}"
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            if not d.called:
                d.errback(RegistryUnavailable(self._lost))
        if self.on_lost is not None:
            with self.log.failuresHandled("registry connection-lost handler failed"):
                self.on_lost(self, self._lost)


class RegistryClientFactory(Factory):
    """Builds :class:`RegistryClientProtocol` connections sharing one event callback."""

    noisy = False

    def __init__(self, on_event: EventCallback | None = None,
                 on_lost: Callable[[RegistryClientProtocol, str], None] | None = None) -> None:
        self.on_event = on_event
        self.on_lost = on_lost

    def buildProtocol(self, addr: IAddress | None) -> RegistryClientProtocol:
        protocol = RegistryClientProtocol(self.on_event, self.on_lost)
        protocol.factory = self
        return protocol


def connect_registry(endpoint: IStreamClientEndpoint,
                     on_event: EventCallback | None = None) -> Deferred[RegistryClientProtocol]:
    """Connect to a registry at ``endpoint`` (wrap it with ``wrapClientTLS`` for TLS)."""
    return endpoint.connect(RegistryClientFactory(on_event))  # type: ignore[return-value]
