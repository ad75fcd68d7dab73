# -*- test-case-name: tests.protocols.test_bridge -*-
"""
The raw-stream bridge of the control socket (``docs/control.md``).

After ``connect`` or ``attach``, a control connection becomes a raw byte
stream: :class:`StreamBridge` is the protocol on the Pilot connection that
joins it to the control connection (an :class:`IStreamRelay`, in practice
:class:`~pilot.protocols.control_server.ControlProtocol`), with flow control
both ways (:class:`Pauser`, :class:`Throttle`).  :class:`HeldStreams` keeps
the streams a ``listen`` accepted until a client attaches them.

This module knows the control connection only through :class:`IStreamRelay`,
so it imports nothing of the control server.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

#: Bytes from the Pilot side buffered before the Unix side is attached; past it the Pilot side is paused.
MAX_UNATTACHED_BUFFER = 256 * 1024


class IStreamRelay(Interface):
    """The control connection a :class:`StreamBridge` relays a Pilot stream to, once attached."""

    def stream_data(data: bytes) -> None:
        """Bytes from the Pilot side, for the client."""

    def stream_lost() -> None:
        """The Pilot side closed: close the client's connection."""

    def pause_reading(reason: str) -> None:
        """Stop reading from the client while ``reason`` holds (the Pilot side is full)."""

    def resume_reading(reason: str) -> None:
        """``reason`` no longer holds."""


# --- flow control helpers -----------------------------------------------------------------------

class Pauser:
    """Pauses a producer (a transport's reading) while any reason holds."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self._reasons: set[str] = set()
        #: Set once the target is closing: it is left alone from then on.
        self.closed = False

    def pause(self, reason: str) -> None:
        if not self._reasons and not self.closed:
            _call(self._target, "pauseProducing")
        self._reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._reasons:
            self._reasons.discard(reason)
            if not self._reasons and not self.closed:
                _call(self._target, "resumeProducing")

    def paused_for(self, reason: str) -> bool:
        return reason in self._reasons


_log = Logger()


def _call(target: Any, method: str) -> None:
    fn = getattr(target, method, None)
    if fn is not None:
        try:
            fn()
        except Exception:
            _log.failure("{method} failed on {target!r}", method=method, target=target)


@implementer(IPushProducer)
class Throttle:
    """A streaming producer whose pause/resume run two callables (one side's buffer pausing the other)."""

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self._pause = pause
        self._resume = resume

    def pauseProducing(self) -> None:
        self._pause()

    def resumeProducing(self) -> None:
        self._resume()

    def stopProducing(self) -> None:
        pass


# --- the Pilot side of a raw stream -----------------------------------------------------------

def describe_address(address: Any) -> tuple[str, int]:
    """``(address text, port)`` for what a Pilot stream factory is given (a SocketAddress or alike)."""
    inner = getattr(address, "address", None)
    port = getattr(address, "port", None)
    if inner is not None and isinstance(port, int):
        return str(inner), port
    host = getattr(address, "host", None)
    if isinstance(host, str) and isinstance(port, int):
        return host, port
    return (str(address) if address is not None else ""), 0


class StreamBridge(Protocol):
    """
    The protocol driving a Pilot stream for a control client.

    Until a control connection is attached (the ``connect`` reply is written,
    or ``attach`` is answered), bytes from the Pilot side are buffered (the
    Pilot side is paused past :data:`MAX_UNATTACHED_BUFFER`) and a close from
    the Pilot side is remembered.  Attached: Pilot bytes are written to the
    Unix transport, :meth:`write` sends Unix bytes to the Pilot transport, and
    each side's full send buffer pauses the other side's reading.
    """

    log = Logger()
    transport: Any = None  # the Pilot connection: an ITransport, maybe a producer and a consumer

    def __init__(self, address: Any = None) -> None:
        self.address = address
        self.peer, self.peer_port = describe_address(address)
        self.control: IStreamRelay | None = None
        self.made: Callable[[StreamBridge], None] | None = None
        self.lost = False
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._outgoing: list[bytes] = []
        self._close_wanted = False
        self._pauser: Pauser | None = None

    # --- Pilot side --------------------------------------------------------------

    def connectionMade(self) -> None:
        self._pauser = Pauser(self.transport)
        outgoing, self._outgoing = self._outgoing, []
        for chunk in outgoing:
            self.transport.write(chunk)
        if self._close_wanted:
            self._pauser.closed = True
            self.transport.loseConnection()
            return
        if self._buffered > MAX_UNATTACHED_BUFFER:
            self._pauser.pause("unattached")
        if self.made is not None:
            made, self.made = self.made, None
            made(self)

    def dataReceived(self, data: bytes) -> None:
        if self.control is not None:
            self.control.stream_data(data)
            return
        if self._close_wanted:
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > MAX_UNATTACHED_BUFFER and self._pauser is not None:
            self._pauser.pause("unattached")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        if self._pauser is not None:
            self._pauser.closed = True
        if self.control is not None:
            self.control.stream_lost()

    # --- control side ----------------------------------------------------------------

    def attach(self, control: IStreamRelay) -> None:
        """Start relaying to ``control``: flush what was buffered, then pass on a close already seen."""
        self.control = control
        buffered, self._buffer, self._buffered = self._buffer, [], 0
        for chunk in buffered:
            control.stream_data(chunk)
        if self._pauser is not None:
            self._pauser.resume("unattached")
        consumer = getattr(self.transport, "registerProducer", None) if self.transport is not None else None
        if consumer is not None and not self.lost:
            try:
                consumer(Throttle(lambda: control.pause_reading("pilot"),
                                   lambda: control.resume_reading("pilot")), True)
            except Exception:
                self.log.debug("the Pilot transport takes no producer; no flow control toward it")
        if self.lost:
            control.stream_lost()

    def write(self, data: bytes) -> None:
        if self.lost or self._close_wanted:
            return
        if self.transport is None:
            self._outgoing.append(data)  # connected later (a Deferred that fired early)
        else:
            self.transport.write(data)

    def pause(self) -> None:
        if self._pauser is not None:
            self._pauser.pause("unix")

    def resume(self) -> None:
        if self._pauser is not None:
            self._pauser.resume("unix")

    def close(self) -> None:
        """Close the Pilot side gracefully (now, or as soon as it is connected)."""
        if self._close_wanted:
            return
        self._close_wanted = True
        self._buffer, self._buffered = [], 0
        if self.transport is not None and not self.lost:
            if self._pauser is not None:
                self._pauser.closed = True
            self.transport.loseConnection()


# --- accepted streams waiting for attach -------------------------------------------------------

class HeldStreams:
    """
    Accepted streams waiting for a client's ``attach``, by connection id.

    Each waits ``window`` seconds on ``clock``; then it is closed.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, window: float) -> None:
        self.clock = clock
        self.window = window
        self._held: dict[int, tuple[StreamBridge, IDelayedCall]] = {}
        self._next_conn_id = 1

    def hold(self, bridge: StreamBridge) -> int:
        """Keep an accepted stream for ``attach``; its connection id."""
        while self._next_conn_id in self._held:
            self._next_conn_id = self._next_conn_id % 0xFFFFFFFF + 1
        conn_id = self._next_conn_id
        self._next_conn_id = self._next_conn_id % 0xFFFFFFFF + 1
        timer = self.clock.callLater(self.window, self._expire, conn_id)
        self._held[conn_id] = (bridge, timer)
        return conn_id

    def take(self, conn_id: int) -> StreamBridge | None:
        """The stream held as ``conn_id`` (no longer held), or None."""
        held = self._held.pop(conn_id, None)
        if held is None:
            return None
        bridge, timer = held
        if timer.active():
            timer.cancel()
        return bridge

    @property
    def ids(self) -> list[int]:
        return sorted(self._held)

    def close_all(self) -> None:
        for conn_id in list(self._held):
            bridge = self.take(conn_id)
            if bridge is not None:
                bridge.close()

    def _expire(self, conn_id: int) -> None:
        held = self._held.pop(conn_id, None)
        if held is not None:
            self.log.info("closing accepted stream {conn_id} from {peer}: not attached within {window} s",
                          conn_id=conn_id, peer=held[0].peer, window=self.window)
            held[0].close()
