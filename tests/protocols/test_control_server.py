"""
The control socket's server (pilot.protocols.control_server, docs/control.md) with a
fake NodeAPI: dispatch and argument checking, reply order, hostile frames,
raw streams both ways, listen/attach, recv, flow control and peer credentials.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from pilot.address import Address, SocketAddress
from pilot.errors import NotFound, NotTrusted
from pilot.protocols import control_server
from pilot.protocols.bridge import MAX_UNATTACHED_BUFFER, StreamBridge, describe_address
from pilot.protocols.control_server import ATTACH_WINDOW, MAX_INFLIGHT, ControlProtocol, ControlServerFactory
from pilot.protocols.peercred import peer_uid
from pilot.wire.registry import encode_frame

UID = 1000


class FakeListening:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


class FakeAPI:
    """A NodeAPI recording ``(method, args)``; answers from :attr:`answers` (value, Deferred or exception)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.answers: dict[str, Any] = {}
        self.protocols: list[Any] = []
        self.factories: list[Any] = []
        self.receivers: list[Any] = []

    def _answer(self, name: str, *args: Any) -> Any:
        self.calls.append((name, args))
        answer = self.answers.get(name, {"called": name})
        if callable(answer) and not isinstance(answer, Deferred):
            answer = answer(*args)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, BaseException):
            return fail(answer)
        return succeed(answer)

    def info(self) -> Any: return self._answer("info")
    def set_hostname(self, hostname: str) -> Any: return self._answer("set_hostname", hostname)
    def set_public(self, public: bool) -> Any: return self._answer("set_public", public)
    def set_tags(self, tags: list[str]) -> Any: return self._answer("set_tags", tags)
    def shutdown(self) -> Any: return self._answer("shutdown")
    def find(self, hostname: str) -> Any: return self._answer("find", hostname)
    def peers(self, search: str | None) -> Any: return self._answer("peers", search)
    def search(self, query: str) -> Any: return self._answer("search", query)
    def handshake(self, target: str, justification: str) -> Any:
        return self._answer("handshake", target, justification)
    def pending(self) -> Any: return self._answer("pending")
    def approve(self, node_id: int) -> Any: return self._answer("approve", node_id)
    def reject(self, node_id: int, reason: str) -> Any: return self._answer("reject", node_id, reason)
    def trusted(self) -> Any: return self._answer("trusted")
    def untrust(self, node_id: int) -> Any: return self._answer("untrust", node_id)

    def ping(self, target: str, count: int, timeout: float, interval: float) -> Any:
        return self._answer("ping", target, count, timeout, interval)

    def send_datagram(self, target: str, port: int, data: bytes) -> Any:
        return self._answer("send_datagram", target, port, data)

    def disconnect(self, conn_id: int) -> Any:
        return self._answer("disconnect", conn_id)

    def connect(self, target: str, port: int, protocol: Any) -> Any:
        self.protocols.append(protocol)
        return self._answer("connect", target, port)

    def listen(self, port: int, factory: Any) -> Any:
        self.factories.append(factory)
        self.answers.setdefault("listen", FakeListening())
        return self._answer("listen", port)

    def bind_datagrams(self, port: int, received: Any) -> Any:
        self.receivers.append(received)
        self.answers.setdefault("bind_datagrams", FakeListening())
        return self._answer("bind_datagrams", port)


class PilotTransport(StringTransport):
    """The Pilot side of a stream: records writes, closes, pauses and its registered producer."""


def request(request_id: Any, cmd: Any, **args: Any) -> bytes:
    return encode_frame({"id": request_id, "cmd": cmd, **args})


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def frames(data: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """The frames at the start of ``data``, and what follows them (raw bytes)."""
    out = []
    while len(data) >= 4:
        (length,) = struct.unpack(">I", data[:4])
        if len(data) < 4 + length:
            break
        try:
            value = json.loads(data[4:4 + length])
        except ValueError:
            break
        if not isinstance(value, dict):
            break
        out.append(value)
        data = data[4 + length:]
    return out, data


class Harness:
    def __init__(self, api: FakeAPI | None = None, uid: int | None = UID, allowed: int = UID) -> None:
        self.api = api or FakeAPI()
        self.clock = Clock()
        self.factory = ControlServerFactory(self.api, self.clock, allowed, credentials=lambda t: uid)
        self.proto, self.transport = self.connect()

    def connect(self) -> tuple[ControlProtocol, StringTransport]:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def send(self, data: bytes, proto: ControlProtocol | None = None) -> None:
        (proto or self.proto).dataReceived(data)

    def take(self, transport: StringTransport | None = None) -> list[dict[str, Any]]:
        transport = transport or self.transport
        out, rest = frames(transport.value())
        assert rest == b"", rest
        transport.clear()
        return out

    def ask(self, cmd: Any, **args: Any) -> dict[str, Any]:
        self.send(request(7, cmd, **args))
        replies = self.take()
        assert len(replies) == 1, replies
        return replies[0]


class DispatchTests(SynchronousTestCase):
    CASES: list[tuple[str, dict[str, Any], tuple[str, tuple[Any, ...]]]] = [
        ("info", {}, ("info", ())),
        ("set_hostname", {"hostname": "sensor-1"}, ("set_hostname", ("sensor-1",))),
        ("set_hostname", {"hostname": ""}, ("set_hostname", ("",))),
        ("set_public", {"public": True}, ("set_public", (True,))),
        ("set_public", {"public": False}, ("set_public", (False,))),
        ("set_tags", {"tags": ["a", "b"]}, ("set_tags", (["a", "b"],))),
        ("shutdown", {}, ("shutdown", ())),
        ("find", {"hostname": "sensor-1"}, ("find", ("sensor-1",))),
        ("peers", {}, ("peers", (None,))),
        ("peers", {"search": "sen"}, ("peers", ("sen",))),
        ("handshake", {"target": "sensor-1", "justification": "hi"}, ("handshake", ("sensor-1", "hi"))),
        ("handshake", {"target": "5"}, ("handshake", ("5", ""))),
        ("pending", {}, ("pending", ())),
        ("trust", {}, ("trusted", ())),
        ("approve", {"node_id": 5}, ("approve", (5,))),
        ("reject", {"node_id": 5, "reason": "no"}, ("reject", (5, "no"))),
        ("reject", {"node_id": 5}, ("reject", (5, ""))),
        ("untrust", {"node_id": 4294967295}, ("untrust", (4294967295,))),
        ("ping", {"target": "a", "count": 2, "timeout": 5, "interval": 0.5}, ("ping", ("a", 2, 5.0, 0.5))),
        ("ping", {"target": "a"}, ("ping", ("a", 4, 30.0, 1.0))),
        ("send", {"target": "a", "port": 1000, "data": base64.b64encode(b"\x00hi").decode()},
         ("send_datagram", ("a", 1000, b"\x00hi"))),
        ("disconnect", {"conn_id": 3}, ("disconnect", (3,))),
    ]

    def test_each_command_calls_the_api(self) -> None:
        for cmd, args, call in self.CASES:
            h = Harness()
            h.api.answers[call[0]] = {"answer": cmd}
            reply = h.ask(cmd, **args)
            self.assertEqual(reply, {"id": 7, "ok": True, "result": {"answer": cmd}}, cmd)
            self.assertEqual(h.api.calls, [call], cmd)

    def test_list_results(self) -> None:
        h = Harness()
        h.api.answers["peers"] = [{"hostname": "a"}]
        self.assertEqual(h.ask("peers")["result"], [{"hostname": "a"}])

    def test_integral_float_accepted(self) -> None:
        h = Harness()
        h.ask("approve", node_id=5.0)
        self.assertEqual(h.api.calls, [("approve", (5,))])

    def test_extra_arguments_ignored(self) -> None:
        h = Harness()
        self.assertTrue(h.ask("info", colour="blue")["ok"])

    def test_many_requests_one_connection(self) -> None:
        h = Harness()
        h.send(b"".join(request(i, "info") for i in range(10)))
        self.assertEqual([r["id"] for r in h.take()], list(range(10)))


class BadRequestTests(SynchronousTestCase):
    def assertInvalid(self, h: Harness, reply: dict[str, Any], needle: str = "") -> None:
        self.assertFalse(reply["ok"], reply)
        self.assertEqual(reply["error"]["code"], "invalid_argument")
        self.assertEqual(set(reply["error"]), {"code", "message", "hint"})
        self.assertIn(needle, reply["error"]["message"])
        self.assertEqual(h.api.calls, [])
        self.assertFalse(h.transport.disconnecting)

    BAD = [
        ("set_hostname", {}, "hostname"),
        ("set_hostname", {"hostname": 5}, "hostname"),
        ("set_hostname", {"hostname": "x" * 300}, "longer"),
        ("set_public", {}, "public"),
        ("set_public", {"public": "yes"}, "true or false"),
        ("set_public", {"public": 1}, "true or false"),
        ("set_tags", {"tags": "a"}, "list"),
        ("set_tags", {"tags": ["a", 1]}, "list"),
        ("set_tags", {"tags": ["a"] * 65}, "more than"),
        ("set_tags", {"tags": ["a" * 300]}, "at most"),
        ("find", {}, "hostname"),
        ("find", {"hostname": ["a"]}, "hostname"),
        ("peers", {"search": 5}, "search"),
        ("handshake", {}, "target"),
        ("handshake", {"target": ""}, "empty"),
        ("handshake", {"target": "a", "justification": 5}, "justification"),
        ("handshake", {"target": "a" * 100_000}, "longer"),
        ("approve", {}, "node_id"),
        ("approve", {"node_id": "5"}, "integer"),
        ("approve", {"node_id": True}, "integer"),
        ("approve", {"node_id": -1}, "0 to"),
        ("approve", {"node_id": 1 << 32}, "0 to"),
        ("approve", {"node_id": 1.5}, "integer"),
        ("reject", {"node_id": 5, "reason": {}}, "reason"),
        ("untrust", {"node_id": None}, "node_id"),
        ("ping", {}, "target"),
        ("ping", {"target": "a", "count": 0}, "count"),
        ("ping", {"target": "a", "count": 10**9}, "count"),
        ("ping", {"target": "a", "timeout": "5"}, "timeout"),
        ("ping", {"target": "a", "timeout": 0}, "timeout"),
        ("ping", {"target": "a", "timeout": 1e9}, "timeout"),
        ("ping", {"target": "a", "interval": -1}, "interval"),
        ("send", {"target": "a", "port": 1}, "data"),
        ("send", {"target": "a", "port": 1, "data": "!!notbase64"}, "base64"),
        ("send", {"target": "a", "port": 1, "data": 5}, "base64"),
        ("send", {"target": "a", "port": 65536, "data": ""}, "port"),
        ("send", {"target": "a", "port": "80", "data": ""}, "port"),
        ("connect", {"target": "a"}, "port"),
        ("connect", {"target": "a", "port": -1}, "port"),
        ("connect", {"port": 7}, "target"),
        ("listen", {}, "port"),
        ("listen", {"port": 1 << 16}, "port"),
        ("recv", {"port": None}, "port"),
        ("recv", {"port": [1]}, "port"),
        ("attach", {}, "conn_id"),
        ("attach", {"conn_id": "1"}, "conn_id"),
        ("disconnect", {}, "conn_id"),
        ("disconnect", {"conn_id": -1}, "conn_id"),
    ]

    def test_bad_arguments(self) -> None:
        for cmd, args, needle in self.BAD:
            h = Harness()
            reply = h.ask(cmd, **args)
            self.assertEqual(reply["id"], 7)
            self.assertInvalid(h, reply, needle)

    def test_unknown_command(self) -> None:
        h = Harness()
        self.assertInvalid(h, h.ask("explode"), "unknown command 'explode'")

    def test_command_not_a_string(self) -> None:
        for cmd in (None, 5, ["info"], {"a": 1}, True):
            h = Harness()
            self.assertInvalid(h, h.ask(cmd), "unknown command")

    def test_no_or_bad_id(self) -> None:
        for message in ({"cmd": "info"}, {"id": "1", "cmd": "info"}, {"id": True, "cmd": "info"},
                        {"id": -1, "cmd": "info"}, {"id": 1.5, "cmd": "info"},
                        {"id": 1 << 60, "cmd": "info"}):
            h = Harness()
            h.send(encode_frame(message))
            (reply,) = h.take()
            self.assertIsNone(reply["id"])
            self.assertInvalid(h, reply, "'id'")

    def test_not_json_then_good(self) -> None:
        h = Harness()
        h.send(raw_frame(b"{not json") + raw_frame(b"[1,2]") + raw_frame(b"\xff\xfe") + raw_frame(b"NaN")
               + raw_frame(b'{"id": 1, "cmd": "info", "x": NaN}') + raw_frame(b"") + request(2, "info"))
        replies = h.take()
        self.assertEqual([r["ok"] for r in replies], [False] * 6 + [True])
        for reply in replies[:6]:
            self.assertEqual(reply["error"]["code"], "invalid_argument")
            self.assertIsNone(reply["id"])
        self.assertEqual(replies[6]["id"], 2)
        self.assertFalse(h.transport.disconnecting)

    def test_deep_nesting(self) -> None:
        h = Harness()
        h.send(raw_frame(b"[" * 100_000 + b"]" * 100_000) + request(2, "info"))
        replies = h.take()
        self.assertEqual([r["ok"] for r in replies], [False, True])

    def test_huge_string_within_the_limit(self) -> None:
        h = Harness()
        h.send(request(1, "find", hostname="x" * 900_000))
        (reply,) = h.take()
        self.assertInvalid(h, reply, "longer")

    def test_oversized_length_closes_after_a_reply(self) -> None:
        h = Harness()
        h.send(struct.pack(">I", (1 << 20) + 1) + b"x" * 10)
        (reply,) = h.take()
        self.assertEqual(reply["error"]["code"], "invalid_argument")
        self.assertIn("exceeds", reply["error"]["message"])
        self.assertTrue(h.transport.disconnecting)
        h.send(request(2, "info"))
        self.assertEqual(h.transport.value(), b"")
        self.assertEqual(h.api.calls, [])

    def test_oversized_length_waits_for_earlier_replies(self) -> None:
        h = Harness()
        d: Deferred[Any] = Deferred()
        h.api.answers["info"] = d
        h.send(request(1, "info") + struct.pack(">I", 0xFFFFFFFF))
        self.assertEqual(h.transport.value(), b"")
        self.assertFalse(h.transport.disconnecting)
        d.callback({"a": 1})
        replies = h.take()
        self.assertEqual([r["id"] for r in replies], [1, None])
        self.assertTrue(h.transport.disconnecting)

    def test_random_garbage_never_raises(self) -> None:
        import random
        rng = random.Random(5)
        for _ in range(200):
            h = Harness()
            for _ in range(5):
                h.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))))
            h.send(raw_frame(bytes(rng.randrange(256) for _ in range(30))))
            for reply in frames(h.transport.value())[0]:
                self.assertIn(reply.get("ok"), (True, False))

    def test_byte_by_byte(self) -> None:
        h = Harness()
        data = request(1, "info") + request(2, "pending")
        for i in range(len(data)):
            h.send(data[i:i + 1])
        self.assertEqual([r["id"] for r in h.take()], [1, 2])


class APIErrorTests(SynchronousTestCase):
    def test_pilot_error(self) -> None:
        h = Harness()
        h.api.answers["find"] = NotFound("no node has the hostname 'x'", "try peers")
        reply = h.ask("find", hostname="x")
        self.assertEqual(reply, {"id": 7, "ok": False, "error": {
            "code": "not_found", "message": "no node has the hostname 'x'", "hint": "try peers"}})

    def test_pilot_error_default_hint(self) -> None:
        h = Harness()
        h.api.answers["handshake"] = NotTrusted("nope")
        error = h.ask("handshake", target="a")["error"]
        self.assertEqual(error["code"], "not_trusted")
        self.assertIn("handshake", error["hint"])

    def test_other_failure_is_internal_and_logged(self) -> None:
        h = Harness()
        h.api.answers["info"] = RuntimeError("boom")
        reply = h.ask("info")
        self.assertEqual(reply["error"]["code"], "internal")
        self.assertNotIn("boom", reply["error"]["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_raising_synchronously(self) -> None:
        h = Harness()

        def explode(*args: Any) -> Any:
            raise ValueError("sync boom")

        h.api.answers["pending"] = explode
        self.assertEqual(h.ask("pending")["error"]["code"], "internal")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertTrue(h.ask("info")["ok"])

    def test_pilot_error_raised_synchronously(self) -> None:
        h = Harness()

        def refuse(*args: Any) -> Any:
            raise NotFound("gone")

        h.api.answers["info"] = refuse
        self.assertEqual(h.ask("info")["error"]["code"], "not_found")

    def test_not_a_deferred(self) -> None:
        h = Harness()
        h.api.info = lambda: {"plain": 1}  # type: ignore[method-assign]
        self.assertEqual(h.ask("info")["error"]["code"], "internal")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_unencodable_result(self) -> None:
        h = Harness()
        h.api.answers["info"] = {"x": {1, 2}}
        reply = h.ask("info")
        self.assertEqual(reply["error"]["code"], "internal")
        self.assertIn("encoded", reply["error"]["message"])

    def test_result_too_large(self) -> None:
        h = Harness()
        h.api.answers["peers"] = ["x" * 1000] * 2000
        self.assertEqual(h.ask("peers")["error"]["code"], "internal")

    def test_long_error_message_clipped(self) -> None:
        h = Harness()
        h.api.answers["info"] = NotFound("x" * 100_000, "y" * 100_000)
        error = h.ask("info")["error"]
        self.assertLess(len(error["message"]), 5000)
        self.assertLess(len(error["hint"]), 5000)


class OrderTests(SynchronousTestCase):
    def test_out_of_order_results_answered_in_order(self) -> None:
        h = Harness()
        d1: Deferred[Any] = Deferred()
        d2: Deferred[Any] = Deferred()
        d3: Deferred[Any] = Deferred()
        answers = iter([d1, d2, d3])
        h.api.answers["info"] = lambda: next(answers)
        h.send(request(1, "info") + request(2, "info") + request(3, "info") + request(4, "pending"))
        self.assertEqual(h.transport.value(), b"")
        d3.callback("three")
        d2.errback(NotFound("two"))
        self.assertEqual(h.transport.value(), b"")
        d1.callback("one")
        replies = h.take()
        self.assertEqual([r["id"] for r in replies], [1, 2, 3, 4])
        self.assertEqual(replies[0]["result"], "one")
        self.assertEqual(replies[1]["error"]["code"], "not_found")
        self.assertEqual(replies[2]["result"], "three")

    def test_inflight_limit_pauses_reading(self) -> None:
        h = Harness()
        pending: list[Deferred[Any]] = []

        def slow() -> Deferred[Any]:
            pending.append(Deferred())
            return pending[-1]

        h.api.answers["info"] = slow
        h.send(b"".join(request(i, "info") for i in range(MAX_INFLIGHT + 10)))
        self.assertEqual(len(pending), MAX_INFLIGHT)
        self.assertEqual(h.transport.producerState, "paused")
        for d in list(pending):
            d.callback("ok")
        self.assertEqual(len(pending), MAX_INFLIGHT + 10)
        for d in pending[MAX_INFLIGHT:]:
            d.callback("ok")
        self.assertEqual([r["id"] for r in h.take()], list(range(MAX_INFLIGHT + 10)))
        self.assertEqual(h.transport.producerState, "producing")

    def test_client_not_reading_stops_processing(self) -> None:
        h = Harness()
        h.proto.pauseProducing()
        self.assertEqual(h.transport.producerState, "paused")
        h.send(request(1, "info"))
        self.assertEqual(h.api.calls, [])
        h.proto.resumeProducing()
        self.assertEqual([r["id"] for r in h.take()], [1])

    def test_half_close_answers_then_closes(self) -> None:
        h = Harness()
        d: Deferred[Any] = Deferred()
        h.api.answers["info"] = d
        h.send(request(1, "info"))
        h.proto.readConnectionLost()
        self.assertFalse(h.transport.disconnecting)
        d.callback("x")
        self.assertEqual([r["id"] for r in h.take()], [1])
        self.assertTrue(h.transport.disconnecting)

    def test_half_close_while_not_reading_answers_everything(self) -> None:
        h = Harness()
        h.proto.pauseProducing()
        h.send(request(1, "info") + request(2, "info"))
        h.proto.readConnectionLost()
        self.assertFalse(h.transport.disconnecting)
        h.proto.resumeProducing()
        self.assertEqual([r["id"] for r in h.take()], [1, 2])
        self.assertTrue(h.transport.disconnecting)

    def test_half_close_with_a_partial_frame(self) -> None:
        h = Harness()
        h.send(request(1, "info")[:6])
        h.proto.readConnectionLost()
        self.assertTrue(h.transport.disconnecting)

    def test_results_after_disconnect_are_dropped(self) -> None:
        h = Harness()
        d: Deferred[Any] = Deferred()
        h.api.answers["info"] = d
        h.send(request(1, "info"))
        h.proto.connectionLost()
        d.callback("late")
        self.assertEqual(h.transport.value(), b"")


class CredentialTests(SynchronousTestCase):
    def test_owner_allowed(self) -> None:
        h = Harness(uid=UID)
        self.assertTrue(h.ask("info")["ok"])
        self.assertEqual(h.proto.uid, UID)

    def test_root_allowed(self) -> None:
        h = Harness(uid=0)
        self.assertTrue(h.ask("info")["ok"])

    def test_other_user_refused(self) -> None:
        h = Harness(uid=UID + 1)
        self.assertTrue(h.transport.disconnecting)
        h.send(request(1, "info"))
        self.assertEqual(h.transport.value(), b"")
        self.assertEqual(h.api.calls, [])
        self.assertEqual(h.factory.connections, set())

    def test_unknown_uid_refused(self) -> None:
        if getattr(socket, "SO_PEERCRED", None) is None:
            raise self.skipTest("no SO_PEERCRED here")
        h = Harness(uid=None)
        self.assertTrue(h.transport.disconnecting)

    def test_default_allowed_uid_is_ours(self) -> None:
        factory = ControlServerFactory(FakeAPI(), Clock())
        self.assertEqual(factory.allowed_uid, os.getuid())

    def test_peer_uid_real_socket(self) -> None:
        if getattr(socket, "SO_PEERCRED", None) is None:
            raise self.skipTest("no SO_PEERCRED here")
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(a.close)
        self.addCleanup(b.close)

        class Handle:
            def getHandle(self) -> socket.socket:
                return a

        self.assertEqual(peer_uid(Handle()), os.getuid())

    def test_peer_uid_not_a_unix_socket(self) -> None:
        self.assertIsNone(peer_uid(StringTransport()))
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(s.close)

        class Handle:
            def getHandle(self) -> socket.socket:
                return s

        self.assertIsNone(peer_uid(Handle()))

        class Broken:
            def getHandle(self) -> Any:
                raise OSError("closed")

        self.assertIsNone(peer_uid(Broken()))


class ConnectTests(SynchronousTestCase):
    def open(self, answer: Any = None) -> tuple[Harness, StreamBridge, Deferred[Any]]:
        h = Harness()
        d: Deferred[Any] = Deferred() if answer is None else answer
        h.api.answers["connect"] = d
        h.send(request(1, "connect", target="sensor-1", port=1000) + b"early raw bytes")
        self.assertEqual(h.api.calls, [("connect", ("sensor-1", 1000))])
        (bridge,) = h.api.protocols
        return h, bridge, d

    def test_raw_both_ways(self) -> None:
        h, bridge, d = self.open()
        pilot = PilotTransport()
        bridge.makeConnection(pilot)
        self.assertEqual(h.transport.producerState, "paused")  # nothing read until the reply
        bridge.dataReceived(b"hello from the peer")
        self.assertEqual(h.transport.value(), b"")
        d.callback({"conn_id": 3})
        h.clock.advance(0)  # the end of the reactor pass
        replies, rest = frames(h.transport.value())
        self.assertEqual(replies, [{"id": 1, "ok": True, "result": {"conn_id": 3}}])
        self.assertEqual(rest, b"hello from the peer")
        self.assertEqual(pilot.value(), b"early raw bytes")
        self.assertEqual(h.transport.producerState, "producing")
        h.transport.clear()
        pilot.clear()
        # bytes that look like frames are just bytes now
        h.send(request(2, "info"))
        self.assertEqual(pilot.value(), request(2, "info"))
        self.assertEqual(h.api.calls, [("connect", ("sensor-1", 1000))])
        bridge.dataReceived(b"\x00\x01\x02")
        h.clock.advance(0)  # the end of the reactor pass
        self.assertEqual(h.transport.value(), b"\x00\x01\x02")

    def test_peer_closes(self) -> None:
        h, bridge, d = self.open()
        pilot = PilotTransport()
        bridge.makeConnection(pilot)
        d.callback({})
        bridge.dataReceived(b"last")
        bridge.connectionLost()
        self.assertTrue(h.transport.value().endswith(b"last"))
        self.assertTrue(h.transport.disconnecting)

    def test_peer_closed_before_the_reply(self) -> None:
        h, bridge, d = self.open()
        bridge.makeConnection(PilotTransport())
        bridge.dataReceived(b"said and gone")
        bridge.connectionLost()
        self.assertFalse(h.transport.disconnecting)
        d.callback({})
        self.assertEqual(frames(h.transport.value())[1], b"said and gone")
        self.assertTrue(h.transport.disconnecting)

    def test_unix_side_closes(self) -> None:
        h, bridge, d = self.open()
        pilot = PilotTransport()
        bridge.makeConnection(pilot)
        d.callback({})
        h.proto.connectionLost()
        self.assertTrue(pilot.disconnecting)

    def test_unix_half_close(self) -> None:
        h, bridge, d = self.open()
        pilot = PilotTransport()
        bridge.makeConnection(pilot)
        d.callback({})
        h.transport.clear()
        h.proto.readConnectionLost()
        self.assertTrue(pilot.disconnecting)
        self.assertFalse(h.transport.disconnecting)
        bridge.dataReceived(b"the answer")
        h.clock.advance(0)  # the end of the reactor pass
        self.assertEqual(h.transport.value(), b"the answer")
        bridge.connectionLost()
        self.assertTrue(h.transport.disconnecting)

    def test_half_close_before_the_reply(self) -> None:
        h, bridge, d = self.open()
        pilot = PilotTransport()
        bridge.makeConnection(pilot)
        h.proto.readConnectionLost()
        self.assertFalse(pilot.disconnecting)
        d.callback({})
        self.assertEqual(pilot.value(), b"early raw bytes")
        self.assertTrue(pilot.disconnecting)

    def test_unix_closes_before_connected(self) -> None:
        h, bridge, d = self.open()
        h.proto.connectionLost()
        d.callback({})
        pilot = PilotTransport()
        bridge.makeConnection(pilot)
        self.assertTrue(pilot.disconnecting)

    def test_failure_returns_to_command_mode(self) -> None:
        h = Harness()
        d: Deferred[Any] = Deferred()
        h.api.answers["connect"] = d
        h.send(request(1, "connect", target="x", port=7) + request(2, "info"))
        self.assertEqual(h.api.calls, [("connect", ("x", 7))])
        d.errback(NotTrusted("x does not trust you"))
        replies = h.take()
        self.assertEqual([r["id"] for r in replies], [1, 2])
        self.assertEqual(replies[0]["error"]["code"], "not_trusted")
        self.assertTrue(replies[1]["ok"])
        self.assertEqual(h.transport.producerState, "producing")

    def test_failure_with_first_bytes_closes(self) -> None:
        """
        A connect that said ``first`` bytes follow it fails: the error reply,
        then the connection closes; those bytes are never read as requests.
        """
        h = Harness()
        d: Deferred[Any] = Deferred()
        h.api.answers["connect"] = d
        behind = request(2, "info")
        h.send(request(1, "connect", target="x", port=7, first=len(behind)) + behind)
        d.errback(NotTrusted("x does not trust you"))
        h.send(request(3, "info"))
        replies = h.take()
        self.assertEqual([(r["id"], r["error"]["code"]) for r in replies], [(1, "not_trusted")])
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.api.calls, [("connect", ("x", 7))])

    def test_success_with_first_bytes(self) -> None:
        h = Harness()
        h.api.answers["connect"] = {"ok": 1}
        h.send(request(1, "connect", target="x", port=7, first=4) + b"ping")
        (bridge,) = h.api.protocols
        pilot = PilotTransport()
        bridge.makeConnection(pilot)
        self.assertEqual(pilot.value(), b"ping")
        self.assertFalse(h.transport.disconnecting)

    def test_synchronous_success(self) -> None:
        h = Harness()
        h.api.answers["connect"] = {"ok": 1}
        h.send(request(1, "connect", target="x", port=7) + b"raw")
        (bridge,) = h.api.protocols
        pilot = PilotTransport()
        bridge.makeConnection(pilot)
        self.assertEqual(pilot.value(), b"raw")
        self.assertEqual(frames(h.transport.value())[0], [{"id": 1, "ok": True, "result": {"ok": 1}}])

    def test_api_raises(self) -> None:
        h = Harness()

        def explode(*args: Any) -> Any:
            raise RuntimeError("dial bug")

        h.api.answers["connect"] = explode
        h.send(request(1, "connect", target="x", port=7) + request(2, "info"))
        self.assertEqual([r["ok"] for r in h.take()], [False, True])
        self.flushLoggedErrors(RuntimeError)

    def test_earlier_replies_first(self) -> None:
        h = Harness()
        slow: Deferred[Any] = Deferred()
        h.api.answers["info"] = slow
        h.api.answers["connect"] = {"c": 1}
        h.send(request(1, "info") + request(2, "connect", target="x", port=7) + b"raw")
        (bridge,) = h.api.protocols
        pilot = PilotTransport()
        bridge.makeConnection(pilot)
        bridge.dataReceived(b"peer bytes")
        self.assertEqual(h.transport.value(), b"")
        slow.callback("info")
        h.clock.advance(0)  # the end of the reactor pass
        replies, rest = frames(h.transport.value())
        self.assertEqual([r["id"] for r in replies], [1, 2])
        self.assertEqual(rest, b"peer bytes")

    def test_backpressure_both_ways(self) -> None:
        h, bridge, d = self.open()
        pilot = PilotTransport()
        bridge.makeConnection(pilot)
        d.callback({})
        # the Unix side's send buffer is full: stop reading from the Pilot side
        h.transport.producer.pauseProducing()
        self.assertEqual(pilot.producerState, "paused")
        h.transport.producer.resumeProducing()
        self.assertEqual(pilot.producerState, "producing")
        # the Pilot side's send buffer is full: stop reading from the Unix side
        pilot.producer.pauseProducing()
        self.assertEqual(h.transport.producerState, "paused")
        pilot.producer.resumeProducing()
        self.assertEqual(h.transport.producerState, "producing")

    def test_unattached_buffer_pauses_the_peer(self) -> None:
        h, bridge, d = self.open()
        pilot = PilotTransport()
        bridge.makeConnection(pilot)
        bridge.dataReceived(b"x" * (MAX_UNATTACHED_BUFFER + 1))
        self.assertEqual(pilot.producerState, "paused")
        d.callback({})
        self.assertEqual(pilot.producerState, "producing")
        h.clock.advance(0)  # the end of the reactor pass
        self.assertEqual(len(frames(h.transport.value())[1]), MAX_UNATTACHED_BUFFER + 1)


class ListenTests(SynchronousTestCase):
    ADDR = SocketAddress(Address(0, 9), 49152)

    def start(self) -> tuple[Harness, Any]:
        h = Harness()
        reply = h.ask("listen", port=1000)
        self.assertEqual(reply, {"id": 7, "ok": True, "result": {"port": 1000}})
        self.assertEqual(h.api.calls, [("listen", (1000,))])
        return h, h.api.factories[0]

    def accept(self, h: Harness, factory: Any) -> tuple[StreamBridge, PilotTransport, dict[str, Any]]:
        bridge = factory.buildProtocol(self.ADDR)
        pilot = PilotTransport()
        bridge.makeConnection(pilot)
        (event,) = h.take()
        return bridge, pilot, event

    def test_accepted_event_and_attach(self) -> None:
        h, factory = self.start()
        bridge, pilot, event = self.accept(h, factory)
        self.assertEqual(event, {"event": "accepted", "conn_id": event["conn_id"], "from": "0:0000.0000.0009",
                                 "port": 49152})
        bridge.dataReceived(b"before attach")
        proto2, transport2 = h.connect()
        h.send(request(1, "attach", conn_id=event["conn_id"]) + b"to the peer", proto2)
        h.clock.advance(0)  # the end of the reactor pass
        replies, rest = frames(transport2.value())
        self.assertEqual(replies, [{"id": 1, "ok": True, "result": {
            "conn_id": event["conn_id"], "from": "0:0000.0000.0009", "port": 49152}}])
        self.assertEqual(rest, b"before attach")
        self.assertEqual(pilot.value(), b"to the peer")
        bridge.dataReceived(b"more")
        h.clock.advance(0)  # the end of the reactor pass
        self.assertTrue(transport2.value().endswith(b"more"))
        bridge.connectionLost()
        self.assertTrue(transport2.disconnecting)
        self.assertEqual(h.factory.held, [])

    def test_attach_twice(self) -> None:
        h, factory = self.start()
        _, _, event = self.accept(h, factory)
        proto2, transport2 = h.connect()
        h.send(request(1, "attach", conn_id=event["conn_id"]), proto2)
        proto3, transport3 = h.connect()
        h.send(request(1, "attach", conn_id=event["conn_id"]), proto3)
        (reply,) = h.take(transport3)
        self.assertEqual(reply["error"]["code"], "not_found")

    def test_unattached_stream_closed_after_the_window(self) -> None:
        h, factory = self.start()
        bridge, pilot, event = self.accept(h, factory)
        h.clock.advance(ATTACH_WINDOW - 0.1)
        self.assertFalse(pilot.disconnecting)
        h.clock.advance(0.2)
        self.assertTrue(pilot.disconnecting)
        proto2, transport2 = h.connect()
        h.send(request(1, "attach", conn_id=event["conn_id"]), proto2)
        self.assertEqual(h.take(transport2)[0]["error"]["code"], "not_found")

    def test_stream_closed_before_attach_keeps_its_data(self) -> None:
        h, factory = self.start()
        bridge, pilot, event = self.accept(h, factory)
        bridge.dataReceived(b"hi and bye")
        bridge.connectionLost()
        proto2, transport2 = h.connect()
        h.send(request(1, "attach", conn_id=event["conn_id"]), proto2)
        self.assertEqual(frames(transport2.value())[1], b"hi and bye")
        self.assertTrue(transport2.disconnecting)

    def test_closing_the_listen_connection_unbinds(self) -> None:
        h, factory = self.start()
        listening = h.api.answers["listen"]
        h.proto.connectionLost()
        self.assertEqual(listening.closed, 1)

    def test_listening_after_disconnect_is_closed(self) -> None:
        h = Harness()
        d: Deferred[Any] = Deferred()
        h.api.answers["listen"] = d
        h.send(request(1, "listen", port=5))
        h.proto.connectionLost()
        listening = FakeListening()
        d.callback(listening)
        self.assertEqual(listening.closed, 1)

    def test_listen_failure(self) -> None:
        h = Harness()
        h.api.answers["listen"] = NotFound("port taken")  # any PilotError
        self.assertEqual(h.ask("listen", port=5)["error"]["code"], "not_found")
        self.assertTrue(h.ask("info")["ok"])

    def test_events_wait_for_the_reply(self) -> None:
        h = Harness()
        slow: Deferred[Any] = Deferred()
        h.api.answers["info"] = slow
        h.send(request(1, "info") + request(2, "listen", port=5))
        (factory,) = h.api.factories
        bridge = factory.buildProtocol(self.ADDR)
        bridge.makeConnection(PilotTransport())
        self.assertEqual(h.transport.value(), b"")
        slow.callback("x")
        out = h.take()
        self.assertEqual([o.get("id") for o in out], [1, 2, None])
        self.assertEqual(out[2]["event"], "accepted")

    def test_listen_connection_gone_closes_new_streams(self) -> None:
        h, factory = self.start()
        h.proto.connectionLost()
        bridge = factory.buildProtocol(self.ADDR)
        pilot = PilotTransport()
        bridge.makeConnection(pilot)
        self.assertTrue(pilot.disconnecting)

    def test_stop_factory_closes_everything(self) -> None:
        h, factory = self.start()
        _, pilot, _ = self.accept(h, factory)
        h.factory.stopFactory()
        self.assertTrue(pilot.disconnecting)
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_describe_address(self) -> None:
        self.assertEqual(describe_address(self.ADDR), ("0:0000.0000.0009", 49152))
        self.assertEqual(describe_address(None), ("", 0))
        self.assertEqual(describe_address("x"), ("x", 0))


class RecvTests(SynchronousTestCase):
    def test_datagram_events(self) -> None:
        h = Harness()
        self.assertEqual(h.ask("recv", port=5000)["result"], {"port": 5000})
        (received,) = h.api.receivers
        received({"from": "0:0000.0000.0009", "src_port": 49000}, b"\x00reading")
        received({"from": "0:0000.0000.0009", "src_port": 49000}, b"")
        events = h.take()
        self.assertEqual(events[0], {"event": "datagram", "from": "0:0000.0000.0009", "src_port": 49000,
                                     "data": base64.b64encode(b"\x00reading").decode()})
        self.assertEqual(events[1]["data"], "")
        listening = h.api.answers["bind_datagrams"]
        h.proto.connectionLost()
        self.assertEqual(listening.closed, 1)
        received({"from": "x", "src_port": 1}, b"late")  # nothing raises, nothing written
        self.assertEqual(h.transport.value(), b"")

    def test_requests_still_answered_on_a_subscription(self) -> None:
        h = Harness()
        h.ask("recv", port=5000)
        self.assertTrue(h.ask("info")["ok"])

    def test_client_close_ends_the_subscription(self) -> None:
        # a Unix socket's close reaches us as the end of its input (we are half-closeable)
        h = Harness()
        h.ask("recv", port=5000)
        h.proto.readConnectionLost()
        self.assertTrue(h.transport.disconnecting)
        h.proto.connectionLost()
        self.assertEqual(h.api.answers["bind_datagrams"].closed, 1)

    def test_slow_reader_loses_datagrams_not_replies(self) -> None:
        self.patch(control_server, "MAX_UNSENT", 100)
        h = Harness()
        h.ask("recv", port=5000)
        h.proto.pauseProducing()
        for _ in range(50):
            h.api.receivers[0]({"from": "a", "src_port": 1}, b"x" * 10)
        written = h.take()
        self.assertLess(len(written), 50)
        self.assertGreater(len(written), 0)

    def test_bad_meta_never_raises(self) -> None:
        h = Harness()
        h.ask("recv", port=5000)
        h.api.receivers[0]({"from": object(), "src_port": 1}, b"x")
        self.assertEqual(h.transport.value(), b"")
        self.flushLoggedErrors()


class ClientProtocol(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class LoopbackTests(SynchronousTestCase):
    """The server against a client over iosim's in-memory transports."""

    def setUp(self) -> None:
        self.api = FakeAPI()
        self.clock = Clock()
        self.factory = ControlServerFactory(self.api, self.clock, UID, credentials=lambda t: UID)
        self.server = self.factory.buildProtocol(None)
        self.client = ClientProtocol()
        self.pump = iosim.connect(self.server, iosim.makeFakeServer(self.server),
                                  self.client, iosim.makeFakeClient(self.client), greet=False)

    def test_request_reply(self) -> None:
        self.api.answers["info"] = {"node_id": 5}
        self.client.transport.write(request(1, "info") + request(2, "explode"))
        self.pump.flush()
        replies, _ = frames(self.client.received)
        self.assertEqual(replies[0], {"id": 1, "ok": True, "result": {"node_id": 5}})
        self.assertEqual(replies[1]["error"]["code"], "invalid_argument")

    def test_raw_stream(self) -> None:
        d: Deferred[Any] = Deferred()
        self.api.answers["connect"] = d
        self.client.transport.write(request(1, "connect", target="peer", port=1000))
        self.pump.flush()
        (bridge,) = self.api.protocols
        pilot_peer = ClientProtocol()
        iosim_pump = iosim.connect(pilot_peer, iosim.makeFakeServer(pilot_peer),
                                   bridge, iosim.makeFakeClient(bridge), greet=False)
        d.callback({"connected": True})
        self.pump.flush()
        self.client.transport.write(b"ping?")
        self.pump.flush()
        iosim_pump.flush()
        self.assertEqual(pilot_peer.received, b"ping?")
        pilot_peer.transport.write(b"pong!")
        iosim_pump.flush()
        self.clock.advance(0)  # the end of the reactor pass
        self.pump.flush()
        replies, rest = frames(self.client.received)
        self.assertEqual(replies, [{"id": 1, "ok": True, "result": {"connected": True}}])
        self.assertEqual(rest, b"pong!")
        pilot_peer.transport.loseConnection()
        iosim_pump.flush()
        self.pump.flush()
        self.assertTrue(self.client.lost)


class SearchCommandTests(SynchronousTestCase):
    def test_search_calls_the_api(self) -> None:
        h = Harness()
        h.api.answers["search"] = {"nodes": [], "source": "registry", "truncated": False, "note": None}
        reply = h.ask("search", query="sensor")
        self.assertEqual(reply["result"]["source"], "registry")
        self.assertEqual(h.api.calls, [("search", ("sensor",))])

    def test_search_query_checked(self) -> None:
        for args, needle in (({}, "query"), ({"query": 5}, "query"), ({"query": "x" * 65}, "longer")):
            h = Harness()
            reply = h.ask("search", **args)
            self.assertFalse(reply["ok"], args)
            self.assertEqual(reply["error"]["code"], "invalid_argument")
            self.assertIn(needle, reply["error"]["message"])
            self.assertEqual(h.api.calls, [])
