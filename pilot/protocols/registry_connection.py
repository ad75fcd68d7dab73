# -*- test-case-name: tests.protocols.test_registry -*-
"""
One registry connection, server side: :class:`RegistryServerProtocol` (the factory and its
connection limits are in ``registry.py``, the client in ``registry_client.py``).

Thin by design: bytes go to a :class:`~pilot.wire.registry.FrameDecoder`, each
message to :meth:`Registry.answer <pilot.server.registry.Registry.answer>`,
and the reply comes back as one frame (``Registry.handle``'s reply, encoded,
or a kept frame of an unchanged answer).  The connection is the registry's
:class:`~pilot.server.registry.Session`, so events are pushed through
:meth:`RegistryServerProtocol.push`.

What the protocol adds to the logic:

* a body that is not a JSON object gets ``{"type":"error","code":"malformed"}``
  and the connection goes on; an oversized length prefix gets the same reply
  and the connection is closed, because the stream cannot be resynchronised;
* an exception inside the registry is logged and answered with an
  ``internal`` error reply; nothing escapes into the reactor;
* an idle timeout (the reference's 5 minutes), restarted by every message;
* limits against slow clients (``docs/security.md``): a frame must arrive
  whole within :data:`FRAME_DEADLINE` of its first byte (trickled bytes do
  not extend it); a request frame may hold at most :data:`MAX_REQUEST` bytes
  (the wire allows 1 MiB, no request comes near); the partial frames of all
  connections together may hold at most :data:`BUFFER_BUDGET` bytes, and a
  connection whose bytes would go over it is aborted; one source address may
  hold at most ``MAX_PER_ADDRESS`` connections (``registry.py``);
* with a :class:`Durability` (``--durable``), a reply to a request that
  changed the registry's state is held until the store holding that change is
  on disk; later replies on the connection wait behind it, so they stay in
  order;
* replies leave in the reactor pass that read their requests
  (:func:`~pilot.protocols.sendnow.write_now`: Twisted's ``write`` would
  wait for the next pass), and the replies to what one read brought go out
  in one write of at most about :data:`BATCH_BYTES` (a pipelining client
  costs one ``send`` a read, not one a request);
* backpressure against a client that sends requests but never reads the
  replies.  The protocol registers itself as the transport's streaming
  producer.  When the transport's send buffer is full it calls
  :meth:`~RegistryServerProtocol.pauseProducing`; the protocol then stops
  reading from the socket and stops answering requests it has already
  decoded, so requests cannot make the buffer grow.  Only pushed events can;
  the bytes written while paused are counted, and past ``max_unsent`` (4 MiB)
  the connection is aborted.  This is exact about what *we* queue after the
  transport said "full"; it does not (and portably cannot) measure the
  transport's own buffer, which is bounded by its high-water mark.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol as Typed, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pilot.endpoint import format_endpoint
from pilot.errors import ErrorCode, MalformedFrame
from pilot.protocols.sendnow import write_now
from pilot.server.registry import Peer, Registry, error_reply
from pilot.wire.registry import FrameDecoder, encode_frame

#: The reference drops a connection idle for 5 minutes.
IDLE_TIMEOUT = 300.0
#: Replies to one read are written together, at most about this many bytes at a time.
BATCH_BYTES = 64 * 1024
#: Bytes we accept to queue after the transport reported a full send buffer.
MAX_UNSENT = 4 * 1024 * 1024
#: Seconds from a frame's first byte to its last; more bytes do not extend it.
FRAME_DEADLINE = 30.0
#: Largest request frame body the server reads (our and the reference's requests are a few KB).
MAX_REQUEST = 64 * 1024
#: Bytes of partial frames all connections together may buffer.
BUFFER_BUDGET = 64 * 1024 * 1024

_INTERNAL = encode_frame(error_reply(ErrorCode.internal, "internal error"))


class StreamTransport(Typed):
    """What the protocol uses of a TCP (or TLS) transport: ``ITCPTransport`` that is also a push producer."""

    def getPeer(self) -> IAddress: ...
    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


class Durability(Typed):
    """What holds replies until their change is on disk (:class:`pilot.services.store.StoreWriter`)."""

    #: changes made so far, and how many of them are on disk
    generation: int
    saved: int

    def when_saved(self, generation: int) -> Deferred[None]: ...


def stream_of(protocol: Protocol) -> StreamTransport:
    """``protocol.transport``, connected: a stream transport (a call before ``makeConnection`` is a bug)."""
    if protocol.transport is None:
        raise RuntimeError(f"{protocol!r} is not connected")
    return cast(StreamTransport, protocol.transport)


def abort(protocol: Protocol) -> None:
    """Abort the connection where the transport can (TCP, TLS); close it otherwise (test transports)."""
    transport = stream_of(protocol)
    abort_connection = getattr(transport, "abortConnection", None)
    if abort_connection is not None:
        abort_connection()
    else:
        transport.loseConnection()


def peer_of(address: IAddress) -> Peer:
    """The :class:`Peer` for a transport address (a non-IP address gives ``Peer("", 0)``)."""
    host = getattr(address, "host", "")
    port = getattr(address, "port", 0)
    return Peer(host if isinstance(host, str) else "", port if isinstance(port, int) else 0)


class ByteBudget:
    """Bytes held in partial frames by every connection of one factory, against a limit."""

    def __init__(self, limit: int = BUFFER_BUDGET) -> None:
        self.limit = limit
        self.held = 0

    def change(self, old: int, new: int) -> bool:
        """A connection now holds ``new`` bytes instead of ``old``; False if that is over the limit."""
        self.held += new - old
        return new <= old or self.held <= self.limit


@implementer(IPushProducer)
class RegistryServerProtocol(Protocol):
    """One client connection to the registry; also that client's event session."""

    log = Logger()

    def __init__(self, registry: Registry, clock: IReactorTime, idle_timeout: float = IDLE_TIMEOUT,
                 max_unsent: int = MAX_UNSENT,
                 connections: set[RegistryServerProtocol] | None = None,
                 frame_deadline: float = FRAME_DEADLINE, max_request: int = MAX_REQUEST,
                 budget: ByteBudget | None = None, durability: Durability | None = None) -> None:
        self.registry = registry
        self.durability = durability
        #: replies held until the change they acknowledge is on disk: (generation needed, frame)
        self._unsaved: deque[tuple[int, bytes]] = deque()
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_unsent = max_unsent
        self.connections: set[RegistryServerProtocol] = connections if connections is not None else set()
        self.frame_deadline = frame_deadline
        self.budget = budget if budget is not None else ByteBudget()
        self.peer = Peer("", 0)
        self._decoder = FrameDecoder(max_request)
        self._pending: deque[dict[str, Any] | MalformedFrame] = deque()
        #: while answering what one read brought: the frames to write, and their bytes
        self._batch: list[bytes] | None = None
        self._batched = 0
        self._idle: IDelayedCall | None = None
        self._frame_timer: IDelayedCall | None = None
        self._held = 0
        self._paused = False
        self._unsent = 0
        self._closing = False
        self._open = False

    # --- connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        self._open = True
        self.peer = peer_of(stream_of(self).getPeer())
        self.connections.add(self)
        stream_of(self).registerProducer(self, True)
        self._restart_idle_timer()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._open = False
        self._closing = True
        self._pending.clear()
        self._unsaved.clear()
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        self._stop_frame_timer()
        self.budget.change(self._held, 0)
        self._held = 0
        self.connections.discard(self)
        try:
            self.registry.session_closed(self)
        except Exception:
            self.log.failure("registry.session_closed failed for {peer}", peer=self._where())

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            frames = self._decoder.feed(data)
        except MalformedFrame as e:
            # The length prefix is garbage: answer, then close; no later byte can be trusted.
            self.log.debug("closing registry connection from {peer}: {reason}", peer=self._where(),
                          reason=e.reason)
            self._pending.clear()
            self._write(encode_frame(error_reply(ErrorCode.malformed, e.reason)))
            self._closing = True
            stream_of(self).loseConnection()
            return
        if not self._account(started=bool(frames)):
            return
        if len(frames) == 1 and not self._pending and not self._paused and self._batch is None:
            self._answer(frames[0])  # the usual request, alone: its reply goes straight out
            return
        self._pending.extend(frames)
        self._process()

    def _account(self, started: bool) -> bool:
        """Charge the partial frame to the budget and time it; False if the connection was aborted."""
        held, self._held = self._held, self._decoder.buffered
        if not held and not self._held and self._frame_timer is None:
            return True  # whole frames only, as most requests come: nothing held, nothing to time
        if not self.budget.change(held, self._held):
            self.log.warn("registry connections hold {held} bytes of partial frames (limit {limit}); "
                          "aborting {peer}, which holds {mine}", held=self.budget.held, limit=self.budget.limit,
                          peer=self._where(), mine=self._held)
            self._abort()
            return False
        if self._held == 0:
            self._stop_frame_timer()
        elif started or self._frame_timer is None:
            # a new frame began (or the first one): its deadline runs from now, and only from now
            self._stop_frame_timer()
            if self.frame_deadline > 0:
                self._frame_timer = self.clock.callLater(self.frame_deadline, self._frame_timed_out)
        return True

    def _stop_frame_timer(self) -> None:
        if self._frame_timer is not None and self._frame_timer.active():
            self._frame_timer.cancel()
        self._frame_timer = None

    def _frame_timed_out(self) -> None:
        if self._paused and not self._closing:
            # we stopped reading (the client does not read its replies): not its frame's fault yet
            self._frame_timer = self.clock.callLater(self.frame_deadline, self._frame_timed_out)
            return
        self._frame_timer = None
        self.log.debug("closing registry connection from {peer}: a frame took over {seconds:.0f} s",
                       peer=self._where(), seconds=self.frame_deadline)
        self._abort()

    def _process(self) -> None:
        if self._batch is not None:  # called again from within (a callback): the outer call sends
            while self._pending and not self._paused and not self._closing:
                self._answer(self._pending.popleft())
            return
        # the replies to what one read brought go out in one write (one send for a pipelined batch)
        self._batch = []
        try:
            while self._pending and not self._paused and not self._closing:
                self._answer(self._pending.popleft())
        finally:
            self._send_batch()
            self._batch = None

    def _answer(self, item: dict[str, Any] | MalformedFrame) -> None:
        if isinstance(item, MalformedFrame):
            self._reply(encode_frame(error_reply(ErrorCode.malformed, item.reason)), 0)
        else:
            before = self.durability.generation if self.durability is not None else 0
            try:
                # no logging here (a fleet's every request passes): refusals are counted by the registry
                frame = self.registry.answer(item, self.peer, self)
            except Exception:
                self.log.failure("registry request {kind!r} from {peer} failed",
                                 kind=str(item.get("type"))[:40], peer=self._where())
                frame = _INTERNAL
            after = self.durability.generation if self.durability is not None else 0
            if after != before or self._unsaved or self._paused or self._batch is not None:
                self._reply(frame, after if after != before else 0)
            else:
                write_now(stream_of(self), frame)  # the usual case, as _reply and _write would
        if not self._closing:
            self._restart_idle_timer()  # after the reply: not on the path its client waits on

    def _reply(self, frame: bytes, generation: int) -> None:
        """Write ``frame`` once change ``generation`` is on disk (0: no change), after earlier replies."""
        if not generation and not self._unsaved:
            self._write(frame)
            return
        self._unsaved.append((generation, frame))
        if generation and self.durability is not None:
            self.durability.when_saved(generation).addCallbacks(self._saved, self._not_saved)

    def _saved(self, _: object) -> None:
        if self._closing or self.durability is None:
            return
        saved = self.durability.saved
        while self._unsaved and self._unsaved[0][0] <= saved and not self._closing:
            self._write(self._unsaved.popleft()[1])

    def _not_saved(self, failure: Failure) -> None:
        self._unsaved.clear()
        if not self._closing and self._open:
            self.log.warn("closing registry connection from {peer}: its changes could not be saved",
                          peer=self._where())
            self._abort()

    # --- the Session interface ---------------------------------------------------------

    def push(self, message: dict[str, Any]) -> None:
        """Send an event; silently dropped once the connection is closing."""
        if self._closing or not self._open:
            return
        try:
            frame = encode_frame(message)
        except Exception:
            self.log.failure("cannot encode an event for {peer}", peer=self._where())
            return
        self._write(frame)

    def push_body(self, body: bytes) -> None:
        """Send an event whose JSON body is already made (a replication snapshot, made once for all)."""
        if self._closing or not self._open:
            return
        self._write(len(body).to_bytes(4, "big") + body)

    # --- writing and backpressure ---------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        if self._paused:
            self._unsent += len(frame)
            if self._unsent > self.max_unsent:
                self.log.warn("registry client {peer} does not read its replies; "
                              "{unsent} bytes queued, disconnecting", peer=self._where(), unsent=self._unsent)
                self._abort()
                return
        if self._batch is not None:
            self._batch.append(frame)
            self._batched += len(frame)
            if self._batched >= BATCH_BYTES:
                self._send_batch()  # the transport may pause us now, as it would for each write
            return
        # sent in this reactor pass when nothing is queued (a waiting client's reply)
        write_now(stream_of(self), frame)

    def _send_batch(self) -> None:
        """Write the replies gathered so far (dropped if the connection was aborted meanwhile)."""
        batch = self._batch
        if not batch:
            return
        self._batch, self._batched = [], 0
        if not self._closing:
            write_now(stream_of(self), batch[0] if len(batch) == 1 else b"".join(batch))

    def pauseProducing(self) -> None:
        """The transport's send buffer is full: stop reading and answering."""
        if not self._paused:
            self._paused = True
            self._unsent = 0
            if not self._closing:
                stream_of(self).pauseProducing()

    def resumeProducing(self) -> None:
        """The send buffer drained: read and answer again."""
        if self._paused:
            self._paused = False
            self._unsent = 0
            if not self._closing:
                stream_of(self).resumeProducing()
                self._process()

    def stopProducing(self) -> None:
        """The connection is going away; ``connectionLost`` does the cleaning up."""
        self._closing = True

    # --- idle timeout -------------------------------------------------------------------------

    def _restart_idle_timer(self) -> None:
        if self.idle_timeout <= 0:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.idle_timeout)
        else:
            self._idle = self.clock.callLater(self.idle_timeout, self._idle_timed_out)

    def _idle_timed_out(self) -> None:
        self._idle = None
        self.log.debug("closing registry connection from {peer}: idle for {seconds:.0f} s",
                      peer=self._where(), seconds=self.idle_timeout)
        self._abort()

    def _abort(self) -> None:
        self._closing = True
        self._pending.clear()
        abort(self)

    def _where(self) -> str:
        return format_endpoint(self.peer.host, self.peer.port) if self.peer.host else "?"
