"""
pilotctl's traffic commands (pilot.cli_traffic) in-process: ping, connect,
listen and recv against the fake control client of tests.test_cli_node, with
a socket pair standing in for each stream and subscription.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from typing import Any

from pilot import cli, cli_traffic
from pilot.errors import ConnectionFailed, ErrorCode, NotFound, NotTrusted
from pilot.wire.registry import encode_frame
from tests.test_cli import Ran
from tests.test_cli_node import CLITestCase


class PingTests(CLITestCase):
    RESULT = {"target": "0:0000.0000.0001", "timeout": False, "results": [
        {"seq": 1, "rtt_ms": 1.5}, {"seq": 2, "error": "no echo in 5 s"}, {"seq": 3, "rtt_ms": 2.5}]}

    def test_human(self) -> None:
        self.fake.answers["ping"] = self.RESULT
        ran = self.run_ok(["ping", "sensor-1", "--count", "3", "--timeout", "2"])
        self.assertEqual(ran.stdout.splitlines(), [
            "PING sensor-1 (0:0000.0000.0001)",
            "seq=1 time=1.500 ms",
            "seq=2 error: no echo in 5 s",
            "seq=3 time=2.500 ms",
            "--- sensor-1 ping statistics ---",
            "3 sent, 2 received, 33% loss, rtt min/avg/max = 1.500/2.000/2.500 ms"])
        self.assertEqual(self.fake.calls, [("ping", {"target": "sensor-1", "count": 3, "timeout": 2.0,
                                                     "interval": 1.0})])
        self.assertGreater(self.fake.timeouts[0], 3 * 3.0)

    def test_defaults(self) -> None:
        self.fake.answers["ping"] = self.RESULT
        self.run_ok(["ping", "0:0000.0000.0001"])
        self.assertEqual(self.fake.calls[0][1], {"target": "0:0000.0000.0001", "count": 4, "timeout": 5.0,
                                                 "interval": 1.0})

    def test_json(self) -> None:
        self.fake.answers["ping"] = self.RESULT
        self.assertEqual(self.run_json(["ping", "sensor-1"]), self.RESULT)

    def test_no_reply_at_all(self) -> None:
        self.fake.answers["ping"] = {"target": "0:0000.0000.0001", "timeout": True, "results": [
            {"seq": 1, "error": "no echo in 5 s"}, {"seq": 2, "error": "no echo in 5 s"}]}
        error = self.run_error(["ping", "sensor-1"], ErrorCode.timeout)
        self.assertIn("no reply from sensor-1", error["message"])
        self.assertIn("no echo", error["message"])
        ran = Ran(["ping", "sensor-1"])
        self.assertEqual((ran.status, ran.stdout), (7, ""))

    def test_refused_by_a_peer_that_does_not_trust_us(self) -> None:
        """Issue 9: a peer refusing every ping is a trust problem (exit 9), not a timeout (exit 7)."""
        refused = "0:0000.0000.0001 refused our ping: it does not trust this node (any more)"
        self.fake.answers["ping"] = {"target": "0:0000.0000.0001", "timeout": True, "results": [
            {"seq": 1, "error": refused, "code": "not_trusted"},
            {"seq": 2, "error": refused, "code": "not_trusted"}]}
        error = self.run_error(["ping", "sensor-1"], ErrorCode.not_trusted)
        self.assertIn("does not trust", error["message"])
        self.assertEqual(Ran(["ping", "sensor-1"]).status, 9)
        # one timeout among the refusals: it may be an outage, keep saying timeout
        self.fake.answers["ping"]["results"][1] = {"seq": 2, "error": "no echo", "code": "timeout"}
        self.run_error(["ping", "sensor-1"], ErrorCode.timeout)

    def test_empty_results(self) -> None:
        self.fake.answers["ping"] = {"target": "x", "results": [], "timeout": True}
        self.run_error(["ping", "a"], ErrorCode.timeout)

    def test_daemon_error(self) -> None:
        self.fake.answers["ping"] = NotTrusted("sensor-1 does not trust this node")
        self.run_error(["ping", "sensor-1"], ErrorCode.not_trusted)


class ConnectTests(CLITestCase):
    def peer(self, behaviour: Any) -> threading.Thread:
        mine, theirs = self.fake.pair()
        self.fake.stream = mine
        thread = threading.Thread(target=behaviour, args=(theirs,), daemon=True)
        thread.start()
        self.addCleanup(thread.join, 2)
        return thread

    @staticmethod
    def shouting(sock: socket.socket) -> None:
        """Read until the client's half-close, answer in upper case, close."""
        got = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        sock.sendall(got.upper())
        sock.close()

    def test_message(self) -> None:
        self.peer(self.shouting)
        ran = self.run_ok(["connect", "sensor-1", "1000", "--message", "hello"])
        self.assertEqual(ran.stdout, "HELLO\n")
        self.assertEqual(self.fake.calls, [("connect", {"target": "sensor-1", "port": 1000})])

    def test_message_json(self) -> None:
        self.peer(self.shouting)
        self.assertEqual(self.run_json(["connect", "sensor-1", "1000", "--message", "héllo"]),
                         {"sent": 6, "received": "HéLLO"})

    def test_message_no_answer_but_closed(self) -> None:
        def sink(sock: socket.socket) -> None:
            while sock.recv(65536):
                pass
            sock.close()

        self.peer(sink)
        ran = self.run_ok(["connect", "sensor-1", "1000", "--message", "hello"])
        self.assertEqual(ran.stdout, "")
        self.assertEqual(ran.stderr, "sent 5 bytes (no response)\n")

    def test_message_timeout(self) -> None:
        done = threading.Event()
        self.peer(lambda sock: done.wait(5))
        self.addCleanup(done.set)
        started = time.monotonic()
        error = self.run_error(["connect", "sensor-1", "1000", "--message", "x", "--timeout", "0.3"],
                               ErrorCode.timeout)
        self.assertIn("no answer", error["message"])
        self.assertLess(time.monotonic() - started, 3)

    def test_partial_answer_at_the_timeout(self) -> None:
        done = threading.Event()

        def dribble(sock: socket.socket) -> None:
            sock.sendall(b"part")
            done.wait(5)

        self.peer(dribble)
        self.addCleanup(done.set)
        self.assertEqual(self.run_json(["connect", "a", "1", "--message", "x", "--timeout", "0.3"]),
                         {"sent": 1, "received": "part"})

    def test_pipe(self) -> None:
        self.patch(cli_traffic, "stdin", lambda: io.BytesIO(b"line one\nline two\n"))
        self.peer(self.shouting)
        ran = self.run_ok(["connect", "sensor-1", "1000"])
        self.assertEqual(ran.stdout, "LINE ONE\nLINE TWO\n")

    def test_pipe_json(self) -> None:
        self.patch(cli_traffic, "stdin", lambda: io.BytesIO(b"abc"))
        self.peer(self.shouting)
        self.assertEqual(self.run_json(["connect", "sensor-1", "1000"]), {"sent": 3, "received": "ABC"})

    def test_pipe_binary_stdout(self) -> None:
        self.patch(cli_traffic, "stdin", lambda: io.BytesIO(b"\xff\x00"))
        self.peer(lambda sock: (sock.recv(10), sock.sendall(b"\xfe\x01\xff"), sock.close()))

        class Binary(io.StringIO):
            def __init__(self) -> None:
                super().__init__()
                self.buffer = io.BytesIO()

        out = Binary()
        status = cli.main(["connect", "a", "1"], stdout=out, stderr=io.StringIO())
        self.assertEqual(status, 0)
        self.assertEqual(out.buffer.getvalue(), b"\xfe\x01\xff")

    def test_pipe_timeout_after_input(self) -> None:
        done = threading.Event()
        self.patch(cli_traffic, "stdin", lambda: io.BytesIO(b"x"))
        self.peer(lambda sock: done.wait(5))
        self.addCleanup(done.set)
        self.run_error(["connect", "a", "1", "--timeout", "0.3"], ErrorCode.timeout)

    def test_refused(self) -> None:
        self.fake.answers["connect"] = ConnectionFailed("cannot reach sensor-1", "is it running?")
        self.fake.stream = self.fake.pair()[0]
        error = self.run_error(["connect", "sensor-1", "1000", "--message", "x"], ErrorCode.connection_failed)
        self.assertEqual(error["hint"], "is it running?")


class SubscriptionTests(CLITestCase):
    def subscription(self, *events: dict[str, Any]) -> socket.socket:
        mine, theirs = self.fake.pair()
        self.fake.subscription_peer = mine
        for event in events:
            theirs.sendall(encode_frame(event))
        return theirs

    def stream(self, conn_id: int, data: bytes, close: bool = True) -> socket.socket:
        mine, theirs = self.fake.pair()
        self.fake.attached[conn_id] = mine
        theirs.sendall(data)
        if close:
            theirs.shutdown(socket.SHUT_WR)
        return theirs

    def accepted(self, conn_id: int, port: int = 40000) -> dict[str, Any]:
        return {"event": "accepted", "conn_id": conn_id, "from": "0:0000.0000.0009", "port": port}

    def datagram(self, data: bytes, src_port: int = 49000) -> dict[str, Any]:
        return {"event": "datagram", "from": "0:0000.0000.0009", "src_port": src_port,
                "data": base64.b64encode(data).decode()}

    # listen

    def test_listen_json(self) -> None:
        self.subscription(self.accepted(1), self.accepted(2, 40001), self.accepted(3))
        self.stream(1, b"first")
        self.stream(2, b"\xffsecond")
        self.stream(3, b"never read")
        data = self.run_json(["listen", "1000", "--count", "2"])
        self.assertEqual(data, [
            {"from": "0:0000.0000.0009", "port": 40000, "data": "first", "bytes": 5},
            {"from": "0:0000.0000.0009", "port": 40001, "data": "\ufffdsecond", "bytes": 7}])
        self.assertEqual(self.fake.calls, [("listen", {"port": 1000}), ("attach", {"conn_id": 1}),
                                           ("attach", {"conn_id": 2})])

    def test_listen_stream_gone_before_attach(self) -> None:
        self.subscription(self.accepted(1), self.accepted(2))
        self.stream(2, b"second")
        real_attach = self.fake.attach

        def attach(conn_id: int, timeout: float | None = None) -> socket.socket:
            if conn_id == 1:
                raise NotFound("no accepted stream 1 is waiting")
            return real_attach(conn_id, timeout)

        self.fake.attach = attach  # type: ignore[method-assign]
        ran = self.run_ok(["listen", "1000", "--count", "1"])
        self.assertEqual(ran.stdout, "[0:0000.0000.0009:40000] second\n")
        self.assertIn("stream 1 from 0:0000.0000.0009 is gone", ran.stderr)

    def test_listen_human(self) -> None:
        self.subscription(self.accepted(1))
        self.stream(1, b"hello\n")
        ran = self.run_ok(["listen", "1000", "--count", "1"])
        self.assertEqual(ran.stdout, "[0:0000.0000.0009:40000] hello\n")
        self.assertEqual(ran.stderr, "listening on port 1000\n")

    def test_listen_timeout_keeps_what_came(self) -> None:
        self.subscription(self.accepted(1))
        self.stream(1, b"partial", close=False)
        self.assertEqual(self.run_json(["listen", "1000", "--timeout", "0.3"]),
                         [{"from": "0:0000.0000.0009", "port": 40000, "data": "partial", "bytes": 7}])

    def test_listen_nothing(self) -> None:
        self.subscription()
        error = self.run_error(["listen", "1000", "--timeout", "0.2"], ErrorCode.timeout)
        self.assertIn("no stream to port 1000", error["message"])

    def test_listen_daemon_gone(self) -> None:
        self.subscription().close()
        self.run_error(["listen", "1000", "--timeout", "5"], ErrorCode.connection_failed)

    def test_listen_refused(self) -> None:
        self.subscription()
        self.fake.answers["listen"] = NotFound("port 1000 is taken")
        self.run_error(["listen", "1000"], ErrorCode.not_found)

    def test_listen_ignores_other_events(self) -> None:
        self.subscription({"event": "weird"}, {"event": "accepted", "conn_id": "x"}, self.accepted(1))
        self.stream(1, b"ok")
        self.assertEqual(len(self.run_json(["listen", "1000", "--count", "1"])), 1)

    # recv

    def test_recv_json(self) -> None:
        self.subscription(self.datagram(b"one"), self.datagram(b"two", 49001), self.datagram(b"three"))
        self.assertEqual(self.run_json(["recv", "5000", "--count", "2"]), [
            {"from": "0:0000.0000.0009", "src_port": 49000, "data": "one", "bytes": 3},
            {"from": "0:0000.0000.0009", "src_port": 49001, "data": "two", "bytes": 3}])
        self.assertEqual(self.fake.calls, [("recv", {"port": 5000})])

    def test_recv_human(self) -> None:
        self.subscription(self.datagram(b"reading=21.5"))
        ran = self.run_ok(["recv", "5000", "--count", "1"])
        self.assertEqual(ran.stdout, "[0:0000.0000.0009:49000] reading=21.5\n")
        self.assertEqual(ran.stderr, "waiting for datagrams on port 5000\n")

    def test_recv_timeout_keeps_what_came(self) -> None:
        self.subscription(self.datagram(b"one"))
        self.assertEqual(len(self.run_json(["recv", "5000", "--count", "5", "--timeout", "0.3"])), 1)

    def test_recv_nothing(self) -> None:
        self.subscription()
        error = self.run_error(["recv", "5000", "--timeout", "0.2"], ErrorCode.timeout)
        self.assertIn("no datagram to port 5000", error["message"])

    def test_recv_bad_event_data_skipped(self) -> None:
        self.subscription({"event": "datagram", "data": "!!"}, self.datagram(b"fine"))
        self.assertEqual(self.run_json(["recv", "5000", "--count", "1"])[0]["data"], "fine")

    def test_recv_daemon_gone(self) -> None:
        self.subscription(self.datagram(b"one")).close()
        self.run_error(["recv", "5000", "--count", "2"], ErrorCode.connection_failed)
