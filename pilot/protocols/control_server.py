# -*- test-case-name: tests.protocols.test_control_server -*-
"""
The node daemon's control socket, server side (``docs/control.md``).

:class:`ControlServerFactory` serves :class:`ControlProtocol` on the Unix
socket; every request becomes one call on the :class:`~pilot.nodeapi.NodeAPI`.
The client pilotctl uses is :mod:`pilot.control_client`.  The frame codec and
the argument checks are :mod:`pilot.wire.control`; the plain requests
:mod:`pilot.protocols.control_commands`; ``connect``, ``attach``, ``listen``
and ``recv`` :mod:`pilot.protocols.control_streams`; the raw-stream bridge
:mod:`pilot.protocols.bridge`; ``listen`` and ``recv`` events
:mod:`pilot.protocols.subscription`.

What the protocol guarantees:

* replies go out in request order, whatever order the API's Deferreds fire in;
* a bad request (not JSON, not an object, no integer ``id``, unknown ``cmd``,
  a missing, mistyped or oversized argument) gets an ``invalid_argument``
  reply and the connection goes on; only an invalid length prefix closes it,
  after the reply, since the stream cannot be resynchronised;
* a :class:`~pilot.errors.PilotError` from the API is answered with its code,
  message and hint; any other failure is logged and answered ``internal``;
  nothing raises into the reactor;
* ``connect`` and ``attach`` turn the connection into a raw byte stream
  (:class:`StreamBridge` joins it to the Pilot connection, with flow control
  both ways); ``listen`` and ``recv`` stream event frames until the client
  closes the connection, which closes the :class:`~pilot.nodeapi.Listening`;
* at most :data:`MAX_INFLIGHT` requests are handled at once per connection,
  and reading stops while the client does not read its replies (event frames
  for datagrams are dropped past :data:`MAX_UNSENT`: datagrams are lossy);
* only the owner of ``PILOT_HOME`` (or root) may connect: the uid comes from
  ``SO_PEERCRED`` (:mod:`pilot.protocols.peercred`).
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (IAddress, IDelayedCall, IHalfCloseableProtocol, IPushProducer,
                                         IReactorTime, ITransport)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pilot.errors import ErrorCode, InvalidArgument, MalformedFrame, PilotError
from pilot.nodeapi import NodeAPI
from pilot.protocols.bridge import HeldStreams, IStreamRelay, Pauser, StreamBridge
from pilot.protocols.control_commands import api_commands
from pilot.protocols.control_streams import CLOSED, COMMAND, RAW, Slot, StreamModes
from pilot.protocols.subscription import IEventWriter, Subscription
from pilot.protocols.peercred import peer_uid, unix_credentials_known
from pilot.protocols.sendnow import write_now
from pilot.wire.control import MAX_ID, Arguments, error_reply, frame_decoder, ok_reply
from pilot.wire.registry import encode_frame

#: Requests one connection may have in progress; past it, reading stops.
MAX_INFLIGHT = 64
#: Bytes of event frames queued after the transport said "full" before datagram events are dropped.
MAX_UNSENT = 4 * 1024 * 1024
#: How long an accepted stream waits for its ``attach``.
ATTACH_WINDOW = 10.0


# --- the control connection ---------------------------------------------------------------------


@implementer(IPushProducer, IHalfCloseableProtocol, IStreamRelay, IEventWriter)
class ControlProtocol(StreamModes, Protocol):
    """One client connection to the control socket."""

    log = Logger()
    transport: Any = None  # the Unix connection: ITransport, IConsumer, IPushProducer, IHalfCloseable

    def __init__(self, factory: ControlServerFactory) -> None:
        self.factory = factory
        self.api = factory.api
        self._decoder = frame_decoder()
        self._slots: deque[Slot] = deque()
        self._mode = COMMAND
        self._awaiting_stream = False
        self._pending_bridge: StreamBridge | None = None
        self._bridge: StreamBridge | None = None
        self._subscriptions: list[Subscription] = []
        self._pauser: Pauser | None = None
        self._writes_paused = False
        self._unsent = 0
        self._dropped = 0
        self._read_closed = False
        self._processing = False
        self._broken = False
        self._raw_out: list[bytes] = []
        self._raw_send: IDelayedCall | None = None
        self.uid: int | None = None
        self._commands = api_commands(self.api)
        #: The requests that change what this connection carries.
        self._handlers: dict[str, Callable[[Slot, Arguments], Deferred[Any]]] = {
            "connect": self._connect, "attach": self._attach, "listen": self._listen, "recv": self._recv,
        }

    # --- connection -----------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.uid = self.factory.credentials(self.transport)
        if not self.factory.permits(self.uid):
            self.log.warn("refused a control connection from uid {uid} (allowed: {allowed} and root)",
                          uid=self.uid, allowed=self.factory.allowed_uid)
            self._mode = CLOSED
            self.transport.loseConnection()
            return
        self.factory.connections.add(self)
        self._pauser = Pauser(self.transport)
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        was = self._mode
        self._mode = CLOSED
        self._drop_raw()
        self.factory.connections.discard(self)
        self._slots.clear()
        for subscription in self._subscriptions:
            subscription.close()
        self._subscriptions = []
        for bridge in (self._pending_bridge, self._bridge):
            if bridge is not None:
                bridge.close()
        self._pending_bridge = None
        if was != CLOSED:
            self.log.debug("control connection closed: {reason}", reason=reason.getErrorMessage())

    def readConnectionLost(self) -> None:
        """The client shut down its write side."""
        self._read_closed = True
        if self._mode == RAW and self._bridge is not None:
            self._bridge.close()
        elif self._mode == COMMAND:
            self._process()

    def writeConnectionLost(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        if self._mode == RAW:
            if self._bridge is not None:
                self._bridge.write(data)
        elif self._mode == COMMAND:
            self._decoder.receive(data)
            self._process()

    # --- requests -----------------------------------------------------------------------

    def _process(self) -> None:
        if self._processing or self._mode != COMMAND:
            return
        self._processing = True
        try:
            while (self._mode == COMMAND and not self._awaiting_stream and not self._writes_paused
                   and not self._broken and len(self._slots) < MAX_INFLIGHT):
                try:
                    item = self._decoder.next_frame()
                except MalformedFrame as e:
                    self._bad_length(e.reason)
                    break
                if item is None:
                    break
                self._handle(item)
        finally:
            self._processing = False
        if self._mode == COMMAND and self._pauser is not None:
            if len(self._slots) >= MAX_INFLIGHT:
                self._pauser.pause("inflight")
            else:
                self._pauser.resume("inflight")
        self._maybe_finish()

    def _bad_length(self, reason: str) -> None:
        self.log.info("closing a control connection: {reason}", reason=reason)
        self._broken = True
        if self._pauser is not None:
            self._pauser.pause("broken")
        slot = Slot(None, "")
        slot.frame = encode_frame(error_reply(None, InvalidArgument(reason, "the client is broken")))
        slot.on_ok = slot.on_error = self._close
        slot.succeeded = False
        self._slots.append(slot)
        self._flush()

    def _handle(self, item: dict[str, Any] | MalformedFrame) -> None:
        if isinstance(item, MalformedFrame):
            slot = Slot(None, "")
            self._slots.append(slot)
            self._finish(slot, InvalidArgument(item.reason))
            return
        request_id = item.get("id")
        if isinstance(request_id, bool) or not isinstance(request_id, int) or not 0 <= request_id <= MAX_ID:
            slot = Slot(None, "")
            self._slots.append(slot)
            self._finish(slot, InvalidArgument("a request needs an integer 'id' (0 to 2^53-1)"))
            return
        cmd = item.get("cmd")
        slot = Slot(request_id, cmd if isinstance(cmd, str) else "")
        self._slots.append(slot)
        command = self._commands.get(slot.cmd)
        handler = self._handlers.get(slot.cmd)
        if command is None and handler is None:
            shown = cmd[:40] if isinstance(cmd, str) else cmd if cmd is None else type(cmd).__name__
            self._finish(slot, InvalidArgument(f"unknown command {shown!r}",
                                               "see docs/control.md for the commands"))
            return
        try:
            args = Arguments(item)
            d = command(args) if command is not None else self._handlers[slot.cmd](slot, args)
            if not isinstance(d, Deferred):
                raise TypeError(f"NodeAPI returned {type(d).__name__}, not a Deferred")
        except PilotError as e:
            self._finish(slot, e)
            return
        except Exception:
            self.log.failure("control command {cmd!r} failed", cmd=slot.cmd)
            self._finish(slot, PilotError("internal error", code=ErrorCode.internal))
            return
        d.addCallbacks(lambda result: self._finish(slot, result, ok=True),
                       lambda failure: self._failed(slot, failure))
        d.addErrback(lambda failure: self.log.failure("answering control command {cmd!r} failed",
                                                      failure, cmd=slot.cmd))

    def _failed(self, slot: Slot, failure: Failure) -> None:
        if isinstance(failure.value, PilotError):
            self._finish(slot, failure.value)
            return
        self.log.failure("control command {cmd!r} failed", failure, cmd=slot.cmd)
        self._finish(slot, PilotError("internal error", code=ErrorCode.internal))

    def _finish(self, slot: Slot, value: Any, ok: bool = False) -> None:
        if ok:
            try:
                slot.frame = encode_frame(ok_reply(slot.request_id, value))
                slot.succeeded = True
            except Exception as e:
                self.log.error("cannot encode the result of control command {cmd!r}: {error}",
                               cmd=slot.cmd, error=str(e)[:200])
                value = PilotError(f"the result could not be encoded: {str(e)[:200]}",
                                   code=ErrorCode.internal)
        if not slot.succeeded:
            error = (value if isinstance(value, PilotError)
                     else PilotError("internal error", code=ErrorCode.internal))
            slot.frame = encode_frame(error_reply(slot.request_id, error))
        self._flush()

    def _flush(self) -> None:
        while self._slots and self._slots[0].frame is not None and self._mode != CLOSED:
            slot = self._slots.popleft()
            assert slot.frame is not None
            self._write(slot.frame)
            after = slot.on_ok if slot.succeeded else slot.on_error
            if after is not None:
                after()
        self._process()

    def _maybe_finish(self) -> None:
        """
        After the client shut down its side: close once every request is
        answered.  A subscription ends too: a socket's close and its
        half-close look the same from here.
        """
        if (self._read_closed and self._mode == COMMAND and not self._slots and not self._awaiting_stream
                and not self._broken and not self._decoder.has_frame):
            self._mode = CLOSED
            self._close()

    def _close(self) -> None:
        """Close the Unix connection (after what was written); reading is left alone from now on."""
        if self._pauser is not None:
            self._pauser.closed = True
        self.transport.loseConnection()

    # --- writing ------------------------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        if self._writes_paused:
            self._unsent += len(frame)
        # sent in this reactor pass (a connect's reply, a ping's result), not the next
        write_now(self.transport, frame)

    def write_event(self, event: dict[str, Any], droppable: bool) -> None:
        if self._mode != COMMAND:
            return
        if droppable and self._writes_paused and self._unsent > MAX_UNSENT:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                self.log.warn("a control client does not read its events; {dropped} dropped so far",
                              dropped=self._dropped)
            return
        try:
            frame = encode_frame(event)
        except Exception:
            self.log.failure("cannot encode a control event")
            return
        self._write(frame)

    # IPushProducer: the Unix transport's send buffer (command mode only)

    def pauseProducing(self) -> None:
        if not self._writes_paused:
            self._writes_paused = True
            self._unsent = 0
            self.pause_reading("writes")

    def resumeProducing(self) -> None:
        if self._writes_paused:
            self._writes_paused = False
            self._unsent = 0
            self.resume_reading("writes")
            self._process()

    def stopProducing(self) -> None:
        pass


class ControlServerFactory(Factory):
    """
    Serves the control socket for ``api``.

    ``allowed_uid`` is the uid allowed besides root (the owner of
    ``PILOT_HOME``, see :func:`~pilot.protocols.peercred.home_owner`; default: this process's uid).
    ``credentials`` finds a connection's uid (default
    :func:`~pilot.protocols.peercred.peer_uid`);
    a connection whose uid cannot be found is refused where ``SO_PEERCRED``
    exists.  Accepted streams wait ``attach_window`` seconds on ``clock`` for
    their ``attach``.
    """

    log = Logger()
    protocol = ControlProtocol

    def __init__(self, api: NodeAPI, clock: IReactorTime, allowed_uid: int | None = None, *,
                 credentials: Callable[[ITransport], int | None] = peer_uid,
                 attach_window: float = ATTACH_WINDOW) -> None:
        self.api = api
        self.clock = clock
        self.allowed_uid = os.getuid() if allowed_uid is None else allowed_uid
        self.credentials = credentials
        self.attach_window = attach_window
        self.connections: set[ControlProtocol] = set()
        self.streams = HeldStreams(clock, attach_window)

    def buildProtocol(self, addr: IAddress | None) -> ControlProtocol:
        return ControlProtocol(self)

    def permits(self, uid: int | None) -> bool:
        if uid is None:
            return not unix_credentials_known()  # no way to ask: the socket's mode is the only guard
        return uid == 0 or uid == self.allowed_uid

    @property
    def held(self) -> list[int]:
        """The ids of the accepted streams waiting for ``attach``."""
        return self.streams.ids

    def stopFactory(self) -> None:
        """The socket is no longer served: close held streams and every client connection."""
        self.streams.close_all()
        for connection in list(self.connections):
            connection.transport.loseConnection()
