"""
pilot.aio (docs/api.md) against a fake daemon: an asyncio server on a Unix
socket in a temporary folder speaking the control protocol
(docs/control.md).  Requests and errors, a raw stream, listen/attach,
subscribe's events, cancellation.  The real daemon is
tests/integration/test_examples.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import tempfile
from typing import Any, Awaitable, Callable

from twisted.trial.unittest import SynchronousTestCase

from pilot import aio
from pilot.errors import ConnectionFailed, InvalidArgument, NotFound, NotRunning, Timeout
from pilot.wire.control import decode_message
from pilot.wire.registry import encode_frame


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    return decode_message(await reader.readexactly(length))


TYPES = {1: "TEXT", 2: "BINARY", 3: "JSON"}


def event(topic: str, payload: bytes = b"") -> bytes:
    raw = topic.encode()
    return struct.pack(">H", len(raw)) + raw + struct.pack(">I", len(payload)) + payload


async def read_event(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    (t,) = struct.unpack(">H", await reader.readexactly(2))
    topic = (await reader.readexactly(t)).decode()
    (p,) = struct.unpack(">I", await reader.readexactly(4))
    return topic, await reader.readexactly(p)


class FakeDaemon:
    """Answers each request by its ``cmd``; records ``(cmd, args)``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.server: asyncio.base_events.Server | None = None
        self.hold = asyncio.Event()  # "slow" answers wait for it
        self.closed: list[str] = []
        self.messages: list[tuple[int, bytes]] = []
        self.events: list[tuple[str, bytes]] = []

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self.serve, self.path)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_frame(reader)
        except asyncio.IncompleteReadError:
            return
        cmd = request.pop("cmd")
        request_id = request.pop("id")
        self.requests.append((cmd, request))

        def reply(result: Any) -> None:
            writer.write(encode_frame({"id": request_id, "ok": True, "result": result}))

        if cmd == "slow":
            await self.hold.wait()
        if cmd == "missing":
            writer.write(encode_frame({"id": request_id, "ok": False, "error": {
                "code": "not_found", "message": "no such node", "hint": "check the name"}}))
        elif cmd in ("info", "slow"):
            reply({"cmd": cmd, **request})
        elif cmd == "connect" and request["port"] == 1001:  # a data exchange peer
            reply({"target": "0:0000.0000.0005", "port": 1001})
            kind, length = struct.unpack(">II", await reader.readexactly(8))
            payload = await reader.readexactly(length)
            self.messages.append((kind, payload))
            text = (b"ERR TEXT save failed: disk full" if payload == b"fail"
                    else f"ACK {TYPES[kind]} {length} bytes".encode())
            writer.write(struct.pack(">II", 1, len(text)) + text)
        elif cmd == "connect" and request["port"] == 1002:  # an event broker
            reply({"target": "0:0000.0000.0005", "port": 1002})
            self.events.append(await read_event(reader))  # the subscription
            if self.events[-1][0] == "alerts":
                for n in range(3):
                    writer.write(event("alerts", f"m{n}".encode()))
                writer.write(event("alerts", b"\xff\x00"))
            while True:
                try:
                    self.events.append(await read_event(reader))
                except asyncio.IncompleteReadError:
                    break
        elif cmd == "connect":
            reply({"target": "0:0000.0000.0005", "port": request["port"]})
            writer.write(b"HELLO ")
            data = await reader.read(100)
            writer.write(data.upper())
        elif cmd == "listen":
            reply({"port": request["port"]})
            writer.write(encode_frame({"event": "accepted", "conn_id": 7, "from": "0:0000.0000.0005", "port": 9}))
            await reader.read()  # until the client closes the listen
            self.closed.append("listen")
        elif cmd == "attach":
            reply({"conn_id": request["conn_id"], "from": "0:0000.0000.0005", "port": 9})
            writer.write(b"from the peer")
            self.closed.append(f"attach got {await reader.read()!r}")
        elif cmd == "listen_early":
            writer.write(encode_frame({"event": "early", "n": 0}))  # skipped: the API waits for the reply
            reply({"port": 1})
        try:
            await writer.drain()
        except ConnectionError:
            self.closed.append(f"{cmd}: the client hung up")  # a timed-out or cancelled request
        writer.close()


def run(test: Callable[[FakeDaemon], Awaitable[None]]) -> None:
    folder = tempfile.mkdtemp(prefix="pa-")
    try:
        async def main() -> None:
            daemon = FakeDaemon(os.path.join(folder, "pilot.sock"))
            await daemon.start()
            try:
                await asyncio.wait_for(test(daemon), 10)
            finally:
                await daemon.stop()
        asyncio.run(main())
    finally:
        shutil.rmtree(folder, True)


class RequestTests(SynchronousTestCase):
    def test_call_and_error_codes(self) -> None:
        async def test(daemon: FakeDaemon) -> None:
            self.assertEqual(await aio.call("info", socket=daemon.path), {"cmd": "info"})
            with self.assertRaises(NotFound) as caught:
                await aio.call("missing", socket=daemon.path)
            self.assertEqual((caught.exception.message, caught.exception.hint), ("no such node", "check the name"))
        run(test)

    def test_events_before_the_reply_are_skipped(self) -> None:
        async def test(daemon: FakeDaemon) -> None:
            self.assertEqual(await aio.call("listen_early", socket=daemon.path), {"port": 1})
        run(test)

    def test_home_names_the_socket(self) -> None:
        async def test(daemon: FakeDaemon) -> None:
            self.assertEqual(await aio.call("info", home=os.path.dirname(daemon.path)), {"cmd": "info"})
        run(test)

    def test_no_daemon(self) -> None:
        async def test(daemon: FakeDaemon) -> None:
            with self.assertRaises(NotRunning):
                await aio.call("info", socket=daemon.path + ".none")
        run(test)

    def test_timeout_and_cancel(self) -> None:
        async def test(daemon: FakeDaemon) -> None:
            with self.assertRaises(Timeout):
                await aio.call("slow", socket=daemon.path, timeout=0.01)
            task = asyncio.ensure_future(aio.call("slow", socket=daemon.path))
            while len(daemon.requests) < 2:
                await asyncio.sleep(0)
            task.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await task
            daemon.hold.set()
            while len(daemon.closed) < 2:
                await asyncio.sleep(0)
            self.assertEqual(daemon.closed, ["slow: the client hung up"] * 2)
        run(test)

    def test_send_message(self) -> None:
        async def test(daemon: FakeDaemon) -> None:
            self.assertEqual(await aio.send_message("agent-b", "hi", socket=daemon.path), "ACK TEXT 2 bytes")
            self.assertEqual(await aio.send_message("agent-b", b"\x00\x01", type="binary", socket=daemon.path),
                             "ACK BINARY 2 bytes")
            self.assertEqual(daemon.messages, [(1, b"hi"), (2, b"\x00\x01")])
            self.assertEqual(daemon.requests[0], ("connect", {"target": "agent-b", "port": 1001}))
            with self.assertRaises(ConnectionFailed) as caught:
                await aio.send_message("agent-b", "fail", socket=daemon.path)
            self.assertIn("disk full", caught.exception.message)
            with self.assertRaises(InvalidArgument):
                await aio.send_message("agent-b", "x", type="video", socket=daemon.path)
        run(test)

    def test_publish(self) -> None:
        async def test(daemon: FakeDaemon) -> None:
            await aio.publish("agent-b", "news", "disk full", socket=daemon.path)
            while len(daemon.events) < 2:
                await asyncio.sleep(0)
            # the first event on a connection is its subscription (docs/reference-wire.md §8.2)
            self.assertEqual(daemon.events, [("news", b""), ("news", b"disk full")])
            with self.assertRaises(InvalidArgument):
                await aio.publish("agent-b", "", "x", socket=daemon.path)
        run(test)

    def test_subscribe_yields_events(self) -> None:
        async def test(daemon: FakeDaemon) -> None:
            events = []
            async with aio.subscribe("agent-b", "alerts", socket=daemon.path) as subscription:
                async for e in subscription:
                    events.append(e)
                    if len(events) == 4:
                        break
            self.assertEqual([e["data"] for e in events[:3]], ["m0", "m1", "m2"])
            self.assertEqual(events[0], {"topic": "alerts", "data": "m0", "bytes": 2})
            self.assertEqual(events[3], {"topic": "alerts", "data": "/wA=", "bytes": 2, "encoding": "base64"})
            self.assertEqual([e async for e in subscription], [])  # closed by the with
            self.assertEqual(daemon.events[0], ("alerts", b""))
            self.assertEqual(daemon.requests, [("connect", {"target": "agent-b", "port": 1002})])
            self.assertRaises(InvalidArgument, aio.subscribe, "agent-b", "x" * 1025, socket=daemon.path)
        run(test)


class StreamTests(SynchronousTestCase):
    def test_open_connection(self) -> None:
        async def test(daemon: FakeDaemon) -> None:
            reader, writer = await aio.open_connection("agent-b", 1000, socket=daemon.path)
            writer.write(b"world")
            await writer.drain()
            self.assertEqual(await reader.read(), b"HELLO WORLD")
            writer.close()
            self.assertEqual(daemon.requests, [("connect", {"target": "agent-b", "port": 1000})])
        run(test)

    def test_open_connection_with_first_bytes(self) -> None:
        """``first`` goes behind the request (which says how many bytes follow): the stream's bytes."""
        async def test(daemon: FakeDaemon) -> None:
            reader, writer = await aio.open_connection("agent-b", 1000, socket=daemon.path, first=b"first")
            self.assertEqual(await reader.read(), b"HELLO FIRST")
            writer.close()
            self.assertEqual(daemon.requests, [("connect", {"target": "agent-b", "port": 1000, "first": 5})])
            with self.assertRaises(InvalidArgument):
                await aio.open_connection("agent-b", 1000, socket=daemon.path, first=b"x" * 65537)
        run(test)

    def test_start_server_attaches_each_stream(self) -> None:
        async def test(daemon: FakeDaemon) -> None:
            got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                got.set_result(await reader.read(13))
                writer.write(b"answer")
                writer.close()

            async with await aio.start_server(handle, 1000, socket=daemon.path) as server:
                self.assertTrue(server.is_serving())
                self.assertEqual(await got, b"from the peer")
            self.assertFalse(server.is_serving())
            while len(daemon.closed) < 2:
                await asyncio.sleep(0)
            self.assertEqual(sorted(daemon.closed), ["attach got b'answer'", "listen"])
            self.assertEqual([r[0] for r in daemon.requests], ["listen", "attach"])
        run(test)

    def test_daemon_hangs_up(self) -> None:
        async def test(daemon: FakeDaemon) -> None:
            with self.assertRaises(ConnectionFailed):
                await aio.call("nothing-answers-this", socket=daemon.path)
        run(test)
