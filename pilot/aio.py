# -*- test-case-name: tests.test_aio -*-
"""
asyncio over a running daemon (``docs/api.md``), with no Twisted reactor::

    reader, writer = await pilot.aio.open_connection("agent-b", 1000)
    server = await pilot.aio.start_server(handle, 1000)        # handle(reader, writer), as asyncio's
    await pilot.aio.send_message("agent-b", "hello")              # port 1001, the peer's ACK
    await pilot.aio.publish("agent-b", "alerts", "disk full")      # port 1002
    async for event in pilot.aio.subscribe("agent-b", "alerts"):
        ...

Each call opens a Unix connection to the daemon's control socket
(``docs/control.md``: 4-byte length, a JSON object); after a ``connect`` or
``attach`` reply that connection *is* the stream, so the
``(StreamReader, StreamWriter)`` pair is asyncio's own and back-pressure is
asyncio's (``await writer.drain()`` waits while the daemon's buffer toward
the Pilot connection is full; a reader that stops reading closes the Pilot
window).  The frames are the codec of :mod:`pilot.wire.control`, the same
bytes the Twisted side (:mod:`pilot.endpoints`) writes.

Errors are :class:`~pilot.errors.PilotError` subclasses with the CLI's codes;
cancelling any of these coroutines closes its Unix connection.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from typing import Any, Awaitable, Callable

from pilot.control_client import SOCKET_NAME, START_HINT, connect_request, default_socket_path
from pilot.errors import (ConnectionFailed, InvalidArgument, MalformedFrame, NotRunning, PilotError, Timeout,
                          error_for)
from pilot.wire.control import decode_message
from pilot.wire.dataexchange import FILE, MAX_PAYLOAD as MAX_MESSAGE, TEXT, TYPES_BY_NAME
from pilot.wire.dataexchange import encode_frame as encode_frame_1001
from pilot.wire.events import MAX_PAYLOAD, MAX_TOPIC, check_topic, encode_event
from pilot.wire.packet import DATA_EXCHANGE as DATA_EXCHANGE_PORT, EVENT_STREAM as EVENT_STREAM_PORT
from pilot.wire.registry import MAX_FRAME, encode_frame

#: Seconds to wait for the daemon's reply to a plain request.
DEFAULT_TIMEOUT = 30.0
#: ... and to ``connect`` (the daemon itself gives up dialling after 30 s).
CONNECT_TIMEOUT = 45.0

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


def socket_for(socket: str | None = None, home: str | None = None) -> str:
    """The control socket: ``socket``, else ``home/pilot.sock``, else ``$PILOT_SOCKET`` / ``$PILOT_HOME``."""
    if socket:
        return socket
    if home:
        return os.path.join(os.path.expanduser(home), SOCKET_NAME)
    return default_socket_path()


async def _open(path: str, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_unix_connection(path, limit=limit)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
        raise NotRunning(f"the daemon is not running (cannot connect to its control socket {path}: "
                         f"{e.strerror or e})", START_HINT) from None
    except PermissionError:
        raise ConnectionFailed(f"permission denied on the control socket {path}",
                               "the daemon belongs to another user; run as that user or set PILOT_HOME") from None
    except OSError as e:
        raise ConnectionFailed(f"cannot connect to the control socket {path}: {e.strerror or e}",
                               "check that the daemon runs: `pilotctl daemon status`") from None


async def _read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        header = await reader.readexactly(4)
        (length,) = struct.unpack(">I", header)
        if length > MAX_FRAME:
            raise PilotError(f"the daemon sent a {length}-byte frame (at most {MAX_FRAME})")
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ConnectionFailed("the daemon closed the control connection",
                               "the daemon may be stopping; `pilotctl daemon status` tells") from None
    try:
        return decode_message(body)
    except MalformedFrame as e:
        raise PilotError(f"the daemon sent a bad control frame: {e.reason}") from None


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cmd: str,
                   args: dict[str, Any], after: bytes = b"") -> Any:
    """Send ``cmd`` (and ``after``, a stream's first bytes, behind it); its result (events skipped)."""
    try:
        frame = encode_frame({**args, "id": 1, "cmd": cmd})
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"the request cannot be sent: {e}") from None
    writer.write(frame + after if after else frame)
    await writer.drain()
    while True:
        reply = await _read_frame(reader)
        if "event" not in reply:
            break
    if reply.get("ok") is True:
        return reply.get("result")
    found = reply.get("error")
    error: dict[str, Any] = found if isinstance(found, dict) else {}
    hint = error.get("hint")
    raise error_for(error.get("code", "internal"), str(error.get("message", "failed")),
                    hint if isinstance(hint, str) else None)


async def _channel(path: str, cmd: str, args: dict[str, Any], limit: int = 2 ** 16,
                   timeout: float | None = DEFAULT_TIMEOUT,
                   after: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]:
    """A Unix connection that sent ``cmd`` and got its result; closed if anything fails (or is cancelled)."""
    reader, writer = await _open(path, limit)
    try:
        result = await asyncio.wait_for(_request(reader, writer, cmd, args, after), timeout)
    except asyncio.TimeoutError:
        writer.close()
        raise Timeout(f"the daemon did not answer {cmd!r} within {timeout:g} s") from None
    except BaseException:
        writer.close()
        raise
    return reader, writer, result


# --- plain requests ------------------------------------------------------------------------------

async def call(cmd: str, /, *, socket: str | None = None, home: str | None = None,
               timeout: float | None = DEFAULT_TIMEOUT, **args: Any) -> Any:
    """Any control command (``docs/control.md``), e.g. ``await call("info")``; its result."""
    reader, writer, result = await _channel(socket_for(socket, home), cmd, args, timeout=timeout)
    writer.close()
    return result


#: Ports and limits of the services every node runs (docs/reference-wire.md §8.1, §8.2).
#: Data exchange frame types; the peer's reply is a text frame.
MESSAGE_TYPES = {name: number for name, number in TYPES_BY_NAME.items() if number != FILE}
_MAX_REPLY = 64 * 1024


def _event(topic: str, payload: bytes = b"") -> bytes:
    """One event on the wire (``pilot.wire.events``), bad input as InvalidArgument."""
    problem = check_topic(topic)
    if problem is not None:
        raise InvalidArgument(f"{problem}: a topic is 1 to {MAX_TOPIC} bytes of UTF-8",
                              "`*` subscribes to every topic")
    try:
        return encode_event(topic, payload)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


async def send_message(target: str, data: str | bytes, *, type: str = "text", socket: str | None = None,
                       home: str | None = None, timeout: float | None = DEFAULT_TIMEOUT) -> str:
    """
    A message to ``target``'s inbox (data exchange, port 1001), as ``pilotctl
    send-message``: ``type`` is ``text``, ``json`` or ``binary``.  Returns the
    peer's reply (``ACK TEXT 5 bytes``); an ``ERR`` reply is
    :class:`~pilot.errors.ConnectionFailed` with the peer's reason.
    """
    kind = MESSAGE_TYPES.get(type)
    if kind is None:
        raise InvalidArgument(f"type must be one of {', '.join(MESSAGE_TYPES)}, not {type!r}")
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if len(payload) > MAX_MESSAGE:
        raise InvalidArgument(f"a message is at most {MAX_MESSAGE} bytes, not {len(payload)}")
    reader, writer = await open_connection(target, DATA_EXCHANGE_PORT, socket=socket, home=home)
    try:
        writer.write(encode_frame_1001(kind, payload))
        await writer.drain()
        reply = await asyncio.wait_for(_exchange_reply(reader, target), timeout)
    except asyncio.TimeoutError:
        raise Timeout(f"no reply from {target} port {DATA_EXCHANGE_PORT} within {timeout:g} s") from None
    finally:
        writer.close()
    if reply.startswith("ERR "):
        raise ConnectionFailed(f"{target} could not save the message: {reply}",
                               "the peer's disk may be full, or the message too large for it")
    return reply


async def _exchange_reply(reader: asyncio.StreamReader, target: str) -> str:
    try:
        kind, length = struct.unpack(">II", await reader.readexactly(8))
        if kind != TEXT or length > _MAX_REPLY:
            raise ConnectionFailed(f"{target}'s reply is not a data exchange text frame")
        return (await reader.readexactly(length)).decode("utf-8", "replace")
    except asyncio.IncompleteReadError:
        raise ConnectionFailed(f"{target} closed the stream without a reply",
                               "the peer may not run data exchange on port 1001") from None


async def publish(target: str, topic: str, data: str | bytes, *, socket: str | None = None,
                  home: str | None = None) -> None:
    """
    An event on ``topic`` to ``target``'s broker (event stream, port 1002), as
    ``pilotctl publish``.  Nothing is acknowledged (the reference's broker
    answers nothing): it returns once the event is handed to the stream.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    frames = _event(topic) + _event(topic, payload)  # the first event on a connection subscribes (§8.2)
    reader, writer = await open_connection(target, EVENT_STREAM_PORT, socket=socket, home=home)
    try:
        writer.write(frames)
        await writer.drain()
    finally:
        writer.close()


def subscribe(target: str, topic: str, *, socket: str | None = None, home: str | None = None) -> Subscription:
    """
    The events on ``topic`` (``*``: every topic) at ``target``'s broker
    (event stream, port 1002), as ``pilotctl subscribe``: an async iterator
    of ``{"topic", "data", "bytes"}`` (``data`` as text, or base64 with
    ``"encoding": "base64"`` when it is not UTF-8), until the stream ends.
    ``async with`` (or :meth:`Subscription.start`) returns once the
    subscription is sent; leaving it, or :meth:`Subscription.aclose`, ends it.
    """
    _event(topic)  # checked now
    return Subscription(target, topic, socket_for(socket, home))


class Subscription:
    """A subscription to a peer's broker; see :func:`subscribe`."""

    def __init__(self, target: str, topic: str, path: str) -> None:
        self.target = target
        self.topic = topic
        self.path = path
        self._opened: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ended = False

    async def start(self) -> None:
        """Open the stream and send the subscription (once)."""
        if self._opened is None:
            self._opened = asyncio.ensure_future(self._open())
        await asyncio.shield(self._opened)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await open_connection(self.target, EVENT_STREAM_PORT, socket=self.path)
        self._writer = writer
        writer.write(_event(self.topic))
        await writer.drain()
        if self._ended:
            writer.close()
        return reader, writer

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._ended:
            raise StopAsyncIteration
        await self.start()
        assert self._opened is not None
        reader, _ = self._opened.result()
        try:
            (t,) = struct.unpack(">H", await reader.readexactly(2))
            topic = await reader.readexactly(t)
            (p,) = struct.unpack(">I", await reader.readexactly(4))
            if t > MAX_TOPIC or p > MAX_PAYLOAD:
                raise MalformedFrame(f"an event of topic {t} and payload {p} bytes is over the limits")
            payload = await reader.readexactly(p)
            event: dict[str, Any] = {"topic": topic.decode("utf-8"), "bytes": p}
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close()
            raise StopAsyncIteration from None
        except (MalformedFrame, UnicodeDecodeError) as e:
            self.close()
            raise ConnectionFailed(f"the broker sent a malformed event: {e}") from None
        try:
            event["data"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            event.update(data=base64.b64encode(payload).decode("ascii"), encoding="base64")
        return event

    def close(self) -> None:
        self._ended = True
        if self._writer is not None:
            self._writer.close()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Subscription:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


# --- streams ----------------------------------------------------------------------------------------

async def open_connection(target: str, port: int, *, socket: str | None = None, home: str | None = None,
                          limit: int = 2 ** 16, timeout: float | None = CONNECT_TIMEOUT,
                          first: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """
    A Pilot stream to ``target:port`` as asyncio's ``(StreamReader, StreamWriter)``;
    ``first`` is written the moment it opens (``ControlClient.open_stream``).
    """
    args, after = connect_request(target, port, first)
    reader, writer, _ = await _channel(socket_for(socket, home), "connect", args, limit, timeout, after)
    return reader, writer


class Server:
    """
    A bound Pilot port: each accepted stream is attached on a connection of
    its own and handed to the callback as ``(reader, writer)``.  As asyncio's
    ``Server``: :meth:`close`, :meth:`wait_closed`, :meth:`serve_forever`,
    ``async with``.
    """

    def __init__(self, path: str, port: int, callback: Handler, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, limit: int) -> None:
        self.path = path
        self.port = port
        self._callback = callback
        self._reader = reader
        self._writer = writer
        self._limit = limit
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.get_running_loop().create_future()
        self._accepting = asyncio.ensure_future(self._accept())

    async def _accept(self) -> None:
        try:
            while True:
                try:
                    event = await _read_frame(self._reader)
                except ConnectionFailed:
                    return
                conn_id = event.get("conn_id")
                if event.get("event") == "accepted" and isinstance(conn_id, int):
                    task = asyncio.ensure_future(self._attach(conn_id))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            self._writer.close()
            if not self._closed.done():
                self._closed.set_result(None)

    async def _attach(self, conn_id: int) -> None:
        try:
            reader, writer, _ = await _channel(self.path, "attach", {"conn_id": conn_id}, self._limit)
        except PilotError:
            return  # the stream was gone (closed, or not attached in time)
        try:
            result = self._callback(reader, writer)
            if result is not None:
                await result
        except Exception as e:
            writer.close()
            asyncio.get_running_loop().call_exception_handler(
                {"message": f"the handler of a stream on Pilot port {self.port} failed", "exception": e})

    def is_serving(self) -> bool:
        return not self._closed.done()

    def close(self) -> None:
        """Unbind the port; streams already handed out carry on."""
        self._accepting.cancel()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def serve_forever(self) -> None:
        try:
            await self.wait_closed()
        finally:
            self.close()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def start_server(client_connected_cb: Handler, port: int, *, socket: str | None = None,
                       home: str | None = None, limit: int = 2 ** 16,
                       timeout: float | None = DEFAULT_TIMEOUT) -> Server:
    """Bind Pilot ``port``; ``client_connected_cb(reader, writer)`` for each stream, as asyncio's."""
    path = socket_for(socket, home)
    reader, writer, _ = await _channel(path, "listen", {"port": port}, timeout=timeout)
    return Server(path, port, client_connected_cb, reader, writer, limit)
