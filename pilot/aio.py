# -*- test-case-name: tests.test_aio -*-
"""
asyncio over a running daemon (``docs/api.md``), with no Twisted reactor::

    reader, writer = await pilot.aio.open_connection("agent-b", 1000)
    server = await pilot.aio.start_server(handle, 1000)        # handle(reader, writer), as asyncio's
    await pilot.aio.send_message("agent-b", "hello")
    await pilot.aio.publish("agent-b", "alerts", "disk full")
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

from pilot.control_client import SOCKET_NAME, START_HINT, default_socket_path
from pilot.errors import (ConnectionFailed, InvalidArgument, MalformedFrame, NotRunning, PilotError, Timeout,
                          error_for)
from pilot.wire.control import decode_message
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
                   args: dict[str, Any]) -> Any:
    """Send ``cmd`` and return its result (event frames before the reply are skipped)."""
    try:
        frame = encode_frame({**args, "id": 1, "cmd": cmd})
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"the request cannot be sent: {e}") from None
    writer.write(frame)
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
                   timeout: float | None = DEFAULT_TIMEOUT) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]:
    """A Unix connection that sent ``cmd`` and got its result; closed if anything fails (or is cancelled)."""
    reader, writer = await _open(path, limit)
    try:
        result = await asyncio.wait_for(_request(reader, writer, cmd, args), timeout)
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


async def send_message(target: str, data: str | bytes, *, type: str = "text", socket: str | None = None,
                       home: str | None = None, timeout: float | None = DEFAULT_TIMEOUT) -> Any:
    """
    A message to ``target``'s data exchange (port 1001), as ``pilotctl
    send-message``: ``type`` is ``text``, ``json`` or ``binary`` (bytes are
    sent base64, as ``data_b64``).
    """
    args: dict[str, Any] = {"target": target, "type": type}
    if isinstance(data, (bytes, bytearray)):
        args["data_b64"] = base64.b64encode(bytes(data)).decode("ascii")
    else:
        args["data"] = data
    return await call("send_message", socket=socket, home=home, timeout=timeout, **args)


async def publish(target: str, topic: str, data: str, *, socket: str | None = None, home: str | None = None,
                  timeout: float | None = DEFAULT_TIMEOUT) -> Any:
    """An event on ``topic`` to ``target``'s event stream (port 1002), as ``pilotctl publish``."""
    return await call("publish", socket=socket, home=home, timeout=timeout, target=target, topic=topic, data=data)


def subscribe(target: str, topic: str, *, socket: str | None = None, home: str | None = None) -> Subscription:
    """
    The events on ``topic`` (``*``: all) at ``target``'s event stream, as
    ``pilotctl subscribe``: an async iterator of the event frames the daemon
    sends (dicts), until the daemon ends the subscription.  ``async with``
    waits until the subscription is live (the daemon answered); leaving it,
    or :meth:`Subscription.aclose`, closes the subscription.
    """
    return Subscription(socket_for(socket, home), "subscribe", {"target": target, "topic": topic})


class Subscription:
    """A control request whose reply is followed by event frames (``subscribe``, ``listen``, ``recv``)."""

    def __init__(self, path: str, cmd: str, args: dict[str, Any]) -> None:
        self.path = path
        self.cmd = cmd
        self.args = args
        #: The reply's result, once :meth:`start` returned.
        self.result: Any = None
        self._opened: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ended = False

    async def start(self) -> Any:
        """Send the request (once); the reply's result."""
        if self._opened is None:
            self._opened = asyncio.ensure_future(self._open())
        await asyncio.shield(self._opened)
        return self.result

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer, self.result = await _channel(self.path, self.cmd, self.args)
        self._writer = writer
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
            return await _read_frame(reader)
        except ConnectionFailed:
            self.close()
            raise StopAsyncIteration from None

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
                          limit: int = 2 ** 16,
                          timeout: float | None = CONNECT_TIMEOUT) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A Pilot stream to ``target:port`` as asyncio's ``(StreamReader, StreamWriter)``."""
    reader, writer, _ = await _channel(socket_for(socket, home), "connect", {"target": target, "port": port},
                                       limit, timeout)
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
