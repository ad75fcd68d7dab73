"""
The control client (pilot.control_client) against real Unix sockets: a scripted
daemon in a thread for exact wire behaviour, and the real control server on
the reactor (the client runs in a thread) end to end.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pilot.address import Address, SocketAddress
from pilot.control_client import MAX_FIRST, ControlClient, Subscription, default_socket_path
from pilot.errors import (ConnectionFailed, ErrorCode, Internal, InvalidArgument, NotFound, NotRunning,
                          NotTrusted, PilotError, Timeout)
from pilot.protocols.control_server import ControlServerFactory
from pilot.wire.registry import encode_frame
from tests.protocols.test_control_server import FakeAPI, FakeListening


def short_dir(test: SynchronousTestCase) -> str:
    """A temporary directory with a path short enough for a Unix socket."""
    path = tempfile.mkdtemp(prefix="pilotctl-")
    test.addCleanup(shutil.rmtree, path, True)
    return path


def read_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_request(conn: socket.socket) -> dict[str, Any]:
    import json
    (length,) = struct.unpack(">I", read_exact(conn, 4))
    return json.loads(read_exact(conn, length))  # type: ignore[no-any-return]


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def ok(request: dict[str, Any], result: Any) -> bytes:
    return encode_frame({"id": request["id"], "ok": True, "result": result})


class ScriptedDaemon:
    """A Unix socket whose every connection is handled by ``script(conn)`` in a thread of its own."""

    def __init__(self, test: SynchronousTestCase, script: Callable[[socket.socket], None]) -> None:
        self.path = os.path.join(short_dir(test), "pilot.sock")
        self.script = script
        self.accepted = 0
        self.errors: list[BaseException] = []
        self.release = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        test.addCleanup(self.stop)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.script(conn)
        except EOFError:
            pass
        except BaseException as e:
            self.errors.append(e)
        finally:
            conn.close()

    def stop(self) -> None:
        self.release.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(2)


def answer_all(conn: socket.socket) -> None:
    """Answer every request with its command and arguments."""
    while True:
        req = read_request(conn)
        conn.sendall(ok(req, {k: v for k, v in req.items() if k != "id"}))


class CallTests(SynchronousTestCase):
    def test_call_and_reuse(self) -> None:
        daemon = ScriptedDaemon(self, answer_all)
        with ControlClient(daemon.path, timeout=5) as client:
            self.assertEqual(client.call("info"), {"cmd": "info"})
            self.assertEqual(client.call("approve", node_id=5), {"cmd": "approve", "node_id": 5})
            self.assertEqual(client.request("ping", {"target": "a", "timeout": 3}, timeout=2),
                             {"cmd": "ping", "target": "a", "timeout": 3})
        self.assertEqual(daemon.accepted, 1)
        self.assertEqual(daemon.errors, [])

    def test_ids_increase(self) -> None:
        seen: list[int] = []

        def script(conn: socket.socket) -> None:
            while True:
                req = read_request(conn)
                seen.append(req["id"])
                conn.sendall(ok(req, None))

        daemon = ScriptedDaemon(self, script)
        with ControlClient(daemon.path, timeout=5) as client:
            for _ in range(3):
                client.call("info")
        self.assertEqual(seen, [1, 2, 3])

    def test_error_reply(self) -> None:
        def script(conn: socket.socket) -> None:
            req = read_request(conn)
            conn.sendall(encode_frame({"id": req["id"], "ok": False, "error": {
                "code": "not_found", "message": "no node has the hostname 'x'", "hint": "try peers"}}))
            answer_all(conn)

        daemon = ScriptedDaemon(self, script)
        with ControlClient(daemon.path, timeout=5) as client:
            e = self.assertRaises(NotFound, client.call, "find", hostname="x")
            self.assertEqual(e.message, "no node has the hostname 'x'")
            self.assertEqual(e.hint, "try peers")
            self.assertEqual(client.call("info"), {"cmd": "info"})  # same connection, still in step
        self.assertEqual(daemon.accepted, 1)

    def test_error_codes(self) -> None:
        cases: list[tuple[Any, type[PilotError], ErrorCode]] = [
            ("not_trusted", NotTrusted, ErrorCode.not_trusted), (3, NotFound, ErrorCode.not_found),
            ("exploded", Internal, ErrorCode.internal), ("malformed", PilotError, ErrorCode.malformed)]
        for code, cls, expected in cases:
            def script(conn: socket.socket, code: Any = code) -> None:
                req = read_request(conn)
                conn.sendall(encode_frame({"id": req["id"], "ok": False,
                                           "error": {"code": code, "message": "m", "hint": ""}}))

            daemon = ScriptedDaemon(self, script)
            with ControlClient(daemon.path, timeout=5) as client:
                e = self.assertRaises(cls, client.call, "info")
                self.assertEqual(e.code, expected)

    def test_no_socket(self) -> None:
        path = os.path.join(short_dir(self), "pilot.sock")
        e = self.assertRaises(NotRunning, ControlClient(path).call, "info")
        self.assertIn(path, e.message)
        self.assertIn("pilotctl daemon start", e.hint)

    def test_no_directory(self) -> None:
        path = os.path.join(short_dir(self), "nowhere", "pilot.sock")
        self.assertRaises(NotRunning, ControlClient(path).call, "info")

    def test_nobody_listening(self) -> None:
        path = os.path.join(short_dir(self), "pilot.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()  # the file stays; nothing accepts
        e = self.assertRaises(NotRunning, ControlClient(path).call, "info")
        # not "no control socket": the file is there, and daemon stop removes it
        self.assertIn(f"nobody listens on the control socket {path}", e.message)
        self.assertIn("daemon stop", e.hint)

    def test_path_too_long(self) -> None:
        path = os.path.join(short_dir(self), "x" * 200, "pilot.sock")
        e = self.assertRaises(PilotError, ControlClient(path).call, "info")
        self.assertIn(e.code, (ErrorCode.invalid_argument, ErrorCode.not_running))

    def test_timeout_then_reconnect(self) -> None:
        calls = []

        def script(conn: socket.socket) -> None:
            calls.append(1)
            if len(calls) == 1:
                read_request(conn)
                daemon.release.wait(5)
                return
            answer_all(conn)

        daemon = ScriptedDaemon(self, script)
        with ControlClient(daemon.path, timeout=0.3) as client:
            started = time.monotonic()
            e = self.assertRaises(Timeout, client.call, "info")
            self.assertLess(time.monotonic() - started, 3)
            self.assertIn("did not answer", e.message)
            self.assertEqual(client.call("info"), {"cmd": "info"})
        self.assertEqual(daemon.accepted, 2)

    def test_daemon_hangs_up(self) -> None:
        daemon = ScriptedDaemon(self, read_request)  # reads, then closes
        e = self.assertRaises(ConnectionFailed, ControlClient(daemon.path, timeout=5).call, "info")
        self.assertIn("closed", e.message)

    def test_daemon_stops_before_answering(self) -> None:
        def script(conn: socket.socket) -> None:
            read_request(conn)
            daemon.stop()  # the socket file goes, then the connection
            os.unlink(daemon.path)

        daemon = ScriptedDaemon(self, script)
        e = self.assertRaises(NotRunning, ControlClient(daemon.path, timeout=5).call, "info")
        self.assertIn("stopped", e.message)

    def test_daemon_refuses_at_once(self) -> None:
        daemon = ScriptedDaemon(self, lambda conn: None)
        self.assertRaises(ConnectionFailed, ControlClient(daemon.path, timeout=5).call, "info")

    def test_malformed_replies(self) -> None:
        bodies = [b"not json", b"[1]", b'{"id": 1}', b'{"id": 99, "ok": true, "result": 1}',
                  b'{"id": 1, "ok": false, "error": "x"}', b'{"id": 1, "ok": false, "error": {"code": true}}']
        for body in bodies:
            def script(conn: socket.socket, body: bytes = body) -> None:
                read_request(conn)
                conn.sendall(struct.pack(">I", len(body)) + body)

            daemon = ScriptedDaemon(self, script)
            e = self.assertRaises(PilotError, ControlClient(daemon.path, timeout=5).call, "info")
            self.assertEqual(e.code, ErrorCode.malformed, body)

    def test_oversized_reply(self) -> None:
        def script(conn: socket.socket) -> None:
            read_request(conn)
            conn.sendall(struct.pack(">I", 0xFFFFFFF0))

        daemon = ScriptedDaemon(self, script)
        e = self.assertRaises(PilotError, ControlClient(daemon.path, timeout=5).call, "info")
        self.assertEqual(e.code, ErrorCode.malformed)

    def test_request_too_large(self) -> None:
        daemon = ScriptedDaemon(self, answer_all)
        client = ControlClient(daemon.path, timeout=5)
        self.assertRaises(InvalidArgument, client.call, "send", data="x" * (2 << 20))
        self.assertRaises(InvalidArgument, client.call, "info", x=object())
        self.assertEqual(client.call("info"), {"cmd": "info"})
        client.close()


class StreamTests(SynchronousTestCase):
    def test_open_stream(self) -> None:
        requests = []

        def script(conn: socket.socket) -> None:
            req = read_request(conn)
            requests.append(req)
            conn.sendall(ok(req, {"conn": 1}) + b"first bytes|")
            got = read_all(conn)  # until the client shuts down its side
            conn.sendall(got + b"|bye")

        daemon = ScriptedDaemon(self, script)
        sock = ControlClient(daemon.path, timeout=5).open_stream("sensor-1", 1000)
        with sock:
            sock.sendall(b"\x00raw\xff")
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(read_all(sock), b"first bytes|\x00raw\xff|bye")
        self.assertEqual(requests, [{"id": 1, "cmd": "connect", "target": "sensor-1", "port": 1000}])

    def test_open_stream_with_first_bytes(self) -> None:
        """``first`` goes in the same write right behind the request, which says how many bytes follow."""
        received: list[Any] = []

        def script(conn: socket.socket) -> None:
            req = read_request(conn)
            received.append(req)
            received.append(read_exact(conn, 6))
            conn.sendall(ok(req, {}) + b"ping-1")

        daemon = ScriptedDaemon(self, script)
        sock = ControlClient(daemon.path, timeout=5).open_stream("sensor-1", 7, first=b"ping-1")
        with sock:
            self.assertEqual(read_exact(sock, 6), b"ping-1")
        self.assertEqual(received, [{"id": 1, "cmd": "connect", "target": "sensor-1", "port": 7, "first": 6},
                                    b"ping-1"])

    def test_open_stream_first_bytes_checked(self) -> None:
        client = ControlClient(os.path.join(short_dir(self), "none.sock"), timeout=5)
        self.assertRaises(InvalidArgument, client.open_stream, "x", 7, first="text")
        self.assertRaises(InvalidArgument, client.open_stream, "x", 7, first=b"x" * (MAX_FIRST + 1))

    def test_open_stream_refused(self) -> None:
        def script(conn: socket.socket) -> None:
            req = read_request(conn)
            conn.sendall(encode_frame({"id": req["id"], "ok": False, "error": {
                "code": "not_trusted", "message": "peer does not trust you", "hint": "handshake"}}))

        daemon = ScriptedDaemon(self, script)
        self.assertRaises(NotTrusted, ControlClient(daemon.path, timeout=5).open_stream, "x", 7)

    def test_attach(self) -> None:
        requests = []

        def script(conn: socket.socket) -> None:
            req = read_request(conn)
            requests.append(req)
            conn.sendall(ok(req, {"conn_id": 9}) + b"payload")

        daemon = ScriptedDaemon(self, script)
        with ControlClient(daemon.path, timeout=5).attach(9) as sock:
            self.assertEqual(read_all(sock), b"payload")
        self.assertEqual(requests, [{"id": 1, "cmd": "attach", "conn_id": 9}])

    def test_subscribe(self) -> None:
        def event(n: int) -> bytes:
            return encode_frame({"event": "datagram", "from": "0:0000.0000.0009", "src_port": n,
                                 "data": base64.b64encode(b"d%d" % n).decode()})

        def script(conn: socket.socket) -> None:
            req = read_request(conn)
            conn.sendall(ok(req, {"port": req["port"]}) + event(1))
            time.sleep(0.05)
            conn.sendall(event(2)[:5])
            time.sleep(0.05)
            conn.sendall(event(2)[5:])
            daemon.release.wait(5)

        daemon = ScriptedDaemon(self, script)
        started = time.monotonic()
        with ControlClient(daemon.path, timeout=5).subscribe("recv", time.monotonic() + 0.5, port=5) as sub:
            self.assertIsInstance(sub, Subscription)
            self.assertEqual(sub.result, {"port": 5})
            events = list(sub)
            self.assertTrue(sub.expired)
        self.assertEqual([e["src_port"] for e in events], [1, 2])
        self.assertGreaterEqual(time.monotonic() - started, 0.45)

    def test_subscribe_read_events(self) -> None:
        def script(conn: socket.socket) -> None:
            req = read_request(conn)
            conn.sendall(ok(req, None) + encode_frame({"event": "accepted", "conn_id": 1}))
            daemon.release.wait(5)

        daemon = ScriptedDaemon(self, script)
        with ControlClient(daemon.path, timeout=5).subscribe("listen", port=5) as sub:
            events = sub.take_buffered() or sub.read_events(2)  # often read along with the reply
            self.assertEqual(events, [{"event": "accepted", "conn_id": 1}])
            self.assertEqual(sub.read_events(0.05), [])

    def test_subscription_closed_by_the_daemon(self) -> None:
        def script(conn: socket.socket) -> None:
            req = read_request(conn)
            conn.sendall(ok(req, None))

        daemon = ScriptedDaemon(self, script)
        sub = ControlClient(daemon.path, timeout=5).subscribe("recv", port=5)
        with sub:
            self.assertRaises(ConnectionFailed, next, sub)

    def test_subscription_daemon_stopped(self) -> None:
        def script(conn: socket.socket) -> None:
            req = read_request(conn)
            conn.sendall(ok(req, None))
            daemon.stop()
            os.unlink(daemon.path)

        daemon = ScriptedDaemon(self, script)
        with ControlClient(daemon.path, timeout=5).subscribe("recv", port=5) as sub:
            self.assertRaises(NotRunning, next, sub)

    def test_subscribe_refused(self) -> None:
        def script(conn: socket.socket) -> None:
            req = read_request(conn)
            conn.sendall(encode_frame({"id": req["id"], "ok": False, "error": {
                "code": "already_exists", "message": "port 5 is bound", "hint": ""}}))

        daemon = ScriptedDaemon(self, script)
        e = self.assertRaises(PilotError, ControlClient(daemon.path, timeout=5).subscribe, "listen", port=5)
        self.assertEqual(e.code, ErrorCode.already_exists)


class DefaultPathTests(SynchronousTestCase):
    def test_pilot_socket(self) -> None:
        self.patch(os, "environ", {"PILOT_SOCKET": "/run/x.sock", "PILOT_HOME": "/h", "HOME": "/home/u"})
        self.assertEqual(default_socket_path(), "/run/x.sock")
        self.assertEqual(ControlClient().socket_path, "/run/x.sock")

    def test_pilot_home(self) -> None:
        self.patch(os, "environ", {"PILOT_HOME": "/h", "HOME": "/home/u"})
        self.assertEqual(default_socket_path(), "/h/pilot.sock")

    def test_home(self) -> None:
        self.patch(os, "environ", {"HOME": "/home/u"})
        self.assertEqual(default_socket_path(), "/home/u/.pilot/pilot.sock")

    def test_explicit(self) -> None:
        self.assertEqual(ControlClient("/a/b.sock").socket_path, "/a/b.sock")


# --- end to end: the real server on the reactor, the client in a thread -----------------------

class LoopPilot:
    """A Pilot connection whose peer answers every write in upper case and closes when we close."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.closed = False
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data
        reactor.callLater(0, self._deliver, data.upper())

    def _deliver(self, data: bytes) -> None:
        if not self.closed:
            self.protocol.dataReceived(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if not self.closed:
            reactor.callLater(0, self._lost)

    def _lost(self) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def pauseProducing(self) -> None: pass
    def resumeProducing(self) -> None: pass
    def stopProducing(self) -> None: pass
    def registerProducer(self, producer: Any, streaming: bool) -> None: pass
    def unregisterProducer(self) -> None: pass
    def getPeer(self) -> Any: return None
    def getHost(self) -> Any: return None


class EndToEndTests(TestCase):
    def setUp(self) -> None:
        self.api = FakeAPI()
        self.dir = tempfile.mkdtemp(prefix="pilotctl-")
        self.path = os.path.join(self.dir, "pilot.sock")
        self.factory = ControlServerFactory(self.api, reactor)
        self.port = reactor.listenUNIX(self.path, self.factory, mode=0o600)

    @inlineCallbacks
    def tearDown(self) -> Any:
        yield self.port.stopListening()
        yield self.wait_for(lambda: not self.factory.connections)
        shutil.rmtree(self.dir, True)

    @inlineCallbacks
    def wait_for(self, condition: Callable[[], bool], timeout: float = 5.0) -> Any:
        end = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > end:
                self.fail("condition not reached")
            yield deferLater(reactor, 0.01, lambda: None)

    @inlineCallbacks
    def test_calls(self) -> Any:
        self.api.answers["info"] = {"node_id": 5, "hostname": "sensor-1"}
        self.api.answers["find"] = NotFound("no node has the hostname 'x'", "hint!")

        def run() -> Any:
            with ControlClient(self.path, timeout=5) as client:
                info = client.call("info")
                try:
                    client.call("find", hostname="x")
                except NotFound as e:
                    missing = (e.message, e.hint)
                uid = [p.uid for p in self.factory.connections]
                return info, missing, uid

        info, missing, uid = yield deferToThread(run)
        self.assertEqual(info, {"node_id": 5, "hostname": "sensor-1"})
        self.assertEqual(missing, ("no node has the hostname 'x'", "hint!"))
        self.assertEqual(uid, [os.getuid()])  # SO_PEERCRED on the real socket

    @inlineCallbacks
    def test_stream_with_half_close(self) -> Any:
        def connected(target: str, port: int) -> Any:
            bridge = self.api.protocols[-1]
            bridge.makeConnection(LoopPilot(bridge))
            return {"target": target, "port": port}

        self.api.answers["connect"] = connected

        def run() -> bytes:
            sock = ControlClient(self.path, timeout=5).open_stream("peer", 7)
            with sock:
                sock.settimeout(5)
                sock.sendall(b"hello ")
                sock.sendall(b"world")
                sock.shutdown(socket.SHUT_WR)
                return read_all(sock)

        answer = yield deferToThread(run)
        self.assertEqual(answer, b"HELLO WORLD")

    @inlineCallbacks
    def test_stream_with_first_bytes(self) -> Any:
        """The first bytes reach the stream the moment it opens, before anything written later."""
        def connected(target: str, port: int) -> Any:
            bridge = self.api.protocols[-1]
            bridge.makeConnection(LoopPilot(bridge))
            return {"target": target, "port": port}

        self.api.answers["connect"] = connected

        def run() -> bytes:
            sock = ControlClient(self.path, timeout=5).open_stream("peer", 7, first=b"first ")
            with sock:
                sock.settimeout(5)
                sock.sendall(b"then")
                sock.shutdown(socket.SHUT_WR)
                return read_all(sock)

        answer = yield deferToThread(run)
        self.assertEqual(answer, b"FIRST THEN")

    @inlineCallbacks
    def test_stream_with_first_bytes_refused(self) -> Any:
        """A refused open with first bytes: the error, and the bytes never read as a request."""
        self.api.answers["connect"] = NotTrusted("peer does not trust you", "handshake")

        def run() -> None:
            client = ControlClient(self.path, timeout=5)
            behind = encode_frame({"id": 2, "cmd": "info"})
            self.assertRaises(NotTrusted, client.open_stream, "peer", 7, first=behind)

        yield deferToThread(run)
        self.assertEqual([name for name, _ in self.api.calls], ["connect"])

    @inlineCallbacks
    def test_listen_and_attach(self) -> Any:
        listening = FakeListening()
        self.api.answers["listen"] = listening

        def run() -> Any:
            client = ControlClient(self.path, timeout=5)
            with client.subscribe("listen", time.monotonic() + 5, port=1000) as sub:
                event = next(sub)
                with client.attach(event["conn_id"]) as sock:
                    sock.settimeout(5)
                    data = read_all(sock)
            return event, data

        d = deferToThread(run)
        yield self.wait_for(lambda: bool(self.api.factories))
        bridge = self.api.factories[0].buildProtocol(SocketAddress(Address(0, 9), 40000))
        pilot = LoopPilot(bridge)
        bridge.makeConnection(pilot)
        bridge.dataReceived(b"greetings")
        pilot.loseConnection()
        event, data = yield d
        self.assertEqual(event["from"], "0:0000.0000.0009")
        self.assertEqual(event["port"], 40000)
        self.assertEqual(data, b"greetings")
        yield self.wait_for(lambda: listening.closed == 1)

    @inlineCallbacks
    def test_daemon_stops_while_asked(self) -> Any:
        from twisted.internet.defer import Deferred
        self.api.answers["info"] = Deferred()  # never answered
        d = deferToThread(ControlClient(self.path, timeout=5).call, "info")
        yield self.wait_for(lambda: bool(self.api.calls))
        yield self.port.stopListening()
        e = yield self.assertFailure(d, NotRunning)
        self.assertIn("stopped", e.message)

    @inlineCallbacks
    def test_refused_user(self) -> Any:
        self.factory.credentials = lambda transport: self.factory.allowed_uid + 4242

        def run() -> None:
            ControlClient(self.path, timeout=5).call("info")

        yield self.assertFailure(deferToThread(run), ConnectionFailed)
        self.assertEqual(self.api.calls, [])

    @inlineCallbacks
    def test_hostile_bytes_then_a_good_request(self) -> Any:
        def run() -> Any:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(self.path)
            with sock:
                sock.sendall(struct.pack(">I", 3) + b"{{{" + encode_frame({"id": 2, "cmd": "info"}))
                return [read_request(sock), read_request(sock)]

        first, second = yield deferToThread(run)
        self.assertEqual(first["error"]["code"], "invalid_argument")
        self.assertEqual(second["id"], 2)
        self.assertTrue(second["ok"])

