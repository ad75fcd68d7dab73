"""
pilotctl's application commands (pilot.cli_apps) in-process, against the fake
control client of tests.test_cli_node: a socket pair stands in for the
stream, and the peer's end runs the real data exchange receiver or a broker
script.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import threading
from typing import Any, Callable

from pilot.apps.exchange import Budget, Receiver
from pilot.apps.storage import Storage
from pilot.errors import ErrorCode, NotFound
from pilot.wire.dataexchange import TEXT, FrameReader, encode_frame
from pilot.wire.events import Event, EventDecoder, encode_event
from tests.test_cli import Ran
from tests.test_cli_node import CLITestCase


class PeerTestCase(CLITestCase):
    def peer(self, behaviour: Callable[[socket.socket], None]) -> None:
        mine, theirs = self.fake.pair()
        self.fake.stream = mine
        thread = threading.Thread(target=behaviour, args=(theirs,), daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)


class DataExchangeTests(PeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.storage = Storage(self.mktemp(), reserve=0)

    def receiver(self, sock: socket.socket) -> None:
        """The peer: our node's receiver, on a socket."""
        rx = Receiver(self.storage, "0:0000.0000.0002", lambda: 1_780_000_000.0, Budget(),
                      collections.Counter())
        reader = FrameReader()
        while True:
            data = sock.recv(65536)
            if not data:
                break
            for reply in rx.events(reader.feed(data)):
                sock.sendall(encode_frame(TEXT, reply.encode()))
        sock.close()

    def test_send_message(self) -> None:
        self.peer(self.receiver)
        ran = self.run_ok(["send-message", "agent-b", "--data", "hello"])
        self.assertEqual(ran.stdout, "ACK TEXT 5 bytes\n")
        self.assertEqual(self.fake.calls, [("connect", {"target": "agent-b", "port": 1001})])
        self.fake.stream.close()  # type: ignore[union-attr]

    def test_send_message_json(self) -> None:
        self.peer(self.receiver)
        out = self.run_json(["send-message", "agent-b", "--data", '{"a": 1}', "--type", "json"])
        self.assertEqual(out, {"target": "agent-b", "type": "json", "bytes": 8, "reply": "ACK JSON 8 bytes",
                               "acked": True})
        self.fake.stream.close()  # type: ignore[union-attr]

    def test_bad_json(self) -> None:
        error = self.run_error(["send-message", "agent-b", "--data", "{nope", "--type", "json"],
                               ErrorCode.invalid_argument)
        self.assertIn("not JSON", error["message"])
        self.assertEqual(self.fake.calls, [])

    def test_bad_type(self) -> None:
        self.assertEqual(Ran(["send-message", "agent-b", "--data", "x", "--type", "xml"]).status, 2)

    def test_missing_data(self) -> None:
        self.assertEqual(Ran(["send-message", "agent-b"]).status, 2)

    def test_err_reply(self) -> None:
        def refusing(sock: socket.socket) -> None:
            sock.recv(65536)
            sock.sendall(encode_frame(TEXT, b"ERR TEXT save failed: disk full"))
            sock.close()

        self.peer(refusing)
        error = self.run_error(["send-message", "agent-b", "--data", "x"], ErrorCode.connection_failed)
        self.assertIn("disk full", error["message"])

    def test_closed_without_reply(self) -> None:
        def closing(sock: socket.socket) -> None:
            sock.recv(65536)
            sock.close()

        self.peer(closing)
        error = self.run_error(["send-message", "agent-b", "--data", "x"], ErrorCode.connection_failed)
        self.assertIn("without a reply", error["message"])

    def test_no_reply_in_time(self) -> None:
        mine, theirs = self.fake.pair()
        self.fake.stream = mine
        self.run_error(["send-message", "agent-b", "--data", "x", "--timeout", "0.2"], ErrorCode.timeout)

    def test_daemon_refuses(self) -> None:
        self.fake.answers["connect"] = NotFound("no node agent-b")
        self.run_error(["send-message", "agent-b", "--data", "x"], ErrorCode.not_found)

    def test_send_file(self) -> None:
        path = os.path.join(self.mktemp() + "-d", "data.bin")
        os.makedirs(os.path.dirname(path))
        content = os.urandom(300_000)
        with open(path, "wb") as f:
            f.write(content)
        self.peer(self.receiver)
        out = self.run_json(["send-file", "agent-b", path])
        self.assertEqual(out["reply"], "ACK FILE 300000 bytes")
        self.assertTrue(out["acked"])
        self.assertGreater(out["seconds"], 0)  # the final figures (progress shows on a terminal only)
        self.assertGreater(out["bytes_per_second"], 0)
        self.fake.stream.close()  # type: ignore[union-attr]
        [entry] = self.storage.files()
        with open(entry["path"], "rb") as f:
            self.assertEqual(f.read(), content)

    def test_send_file_missing(self) -> None:
        self.run_error(["send-file", "agent-b", "/nonexistent/x"], ErrorCode.not_found)
        self.assertEqual(self.fake.calls, [])

    def test_send_file_too_large(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.truncate(17 * 1024 * 1024)
        self.run_error(["send-file", "agent-b", path], ErrorCode.invalid_argument)


class StorageCommandTests(CLITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.home = os.path.abspath(self.mktemp())
        self.patch(os, "environ", {**os.environ, "PILOT_HOME": self.home})
        self.storage = Storage(self.home, reserve=0)

    def test_inbox(self) -> None:
        self.assertIn("inbox is empty", self.run_ok(["inbox"]).stdout)
        self.storage.save_message(TEXT, "0:0000.0000.0002", b"hi there", 1_780_000_000.0)
        ran = self.run_ok(["inbox"])
        self.assertIn("TEXT from 0:0000.0000.0002: hi there", ran.stdout)
        out = self.run_json(["inbox"])
        self.assertEqual((out["total"], out["messages"][0]["data"]), (1, "hi there"))
        self.assertEqual(self.run_json(["inbox", "--clear"])["cleared"], 1)
        self.assertEqual(self.run_json(["inbox"])["total"], 0)

    def test_received(self) -> None:
        self.assertIn("no files", self.run_ok(["received"]).stdout)
        f = self.storage.begin_file("r.txt", 2, "a", 1_780_000_000.0)
        f.write(b"ok")
        f.commit()
        out = self.run_json(["received"])
        self.assertEqual((out["total"], out["files"][0]["bytes"]), (1, 2))
        self.assertIn("r-20260528", self.run_ok(["received"]).stdout)
        self.assertEqual(self.run_json(["received", "--clear"])["cleared"], 1)
        self.assertEqual(self.fake.calls, [])


class EventTests(PeerTestCase):
    def test_publish(self) -> None:
        got: list[Any] = []

        def broker(sock: socket.socket) -> None:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            got.extend(EventDecoder().feed(data))
            sock.close()

        self.peer(broker)
        out = self.run_json(["publish", "agent-b", "alerts", "--data", "fire"])
        self.assertEqual(out, {"target": "agent-b", "topic": "alerts", "bytes": 4})
        self.fake.stream.close()  # type: ignore[union-attr]
        threading.Event().wait(0.05)
        self.assertEqual(got, [Event("alerts"), Event("alerts", b"fire")])
        self.assertEqual(self.fake.calls, [("connect", {"target": "agent-b", "port": 1002})])

    def test_bad_topic(self) -> None:
        self.run_error(["publish", "agent-b", "", "--data", "x"], ErrorCode.invalid_argument)
        self.run_error(["subscribe", "agent-b", "t" * 1025], ErrorCode.invalid_argument)

    def sending(self, events: list[bytes], seen: list[Any]) -> Callable[[socket.socket], None]:
        def broker(sock: socket.socket) -> None:
            seen.extend(EventDecoder().feed(sock.recv(65536)))
            for e in events:
                sock.sendall(e)
        return broker

    def test_subscribe_json_lines(self) -> None:
        seen: list[Any] = []
        self.peer(self.sending([encode_event("t", b"one"), encode_event("t", b"\xff"),
                                encode_event("t", b"three")], seen))
        ran = self.run_ok(["--json", "subscribe", "agent-b", "t", "--count", "2", "--timeout", "5"])
        lines = [json.loads(line) for line in ran.stdout.splitlines()]
        self.assertEqual(lines, [{"topic": "t", "data": "one", "bytes": 3},
                                 {"topic": "t", "data": "/w==", "encoding": "base64", "bytes": 1}])
        self.assertEqual(seen, [Event("t")])
        self.fake.stream.close()  # type: ignore[union-attr]

    def test_subscribe_human(self) -> None:
        self.peer(self.sending([encode_event("news", b"hello")], []))
        ran = self.run_ok(["subscribe", "agent-b", "*", "--count", "1", "--timeout", "5"])
        self.assertEqual(ran.stdout, "[news] hello\n")
        self.fake.stream.close()  # type: ignore[union-attr]

    def test_subscribe_timeout(self) -> None:
        self.peer(self.sending([encode_event("t", b"1")], []))
        ran = Ran(["--json", "subscribe", "agent-b", "t", "--count", "2", "--timeout", "0.3"])
        self.assertEqual(ran.status, int(ErrorCode.timeout))
        self.assertEqual(ran.stdout, '{"topic":"t","data":"1","bytes":1}\n')  # what came is printed
        self.assertIn("1 of 2", ran.json_error()["message"])
        self.fake.stream.close()  # type: ignore[union-attr]

    def test_subscribe_until_timeout(self) -> None:
        """Without --count it runs until --timeout, and that is success."""
        self.peer(self.sending([], []))
        ran = self.run_ok(["subscribe", "agent-b", "t", "--timeout", "0.2"])
        self.assertEqual(ran.stdout, "")
        self.fake.stream.close()  # type: ignore[union-attr]


class ConnectionTests(CLITestCase):
    ROW = {"id": 3, "local_port": 1001, "remote_addr": "0:0000.0000.0002", "remote_port": 49152,
           "state": "ESTABLISHED", "bytes_sent": 10, "bytes_recv": 20, "srtt_ms": 1.5}

    def test_connections(self) -> None:
        self.fake.answers["info"] = {"conn_list": [self.ROW]}
        ran = self.run_ok(["connections"])
        self.assertIn("0:0000.0000.0002:49152", ran.stdout)
        self.assertEqual(self.run_json(["connections"]), [self.ROW])
        self.fake.answers["info"] = {"conn_list": []}
        self.assertEqual(self.run_ok(["connections"]).stdout, "no connections\n")

    def test_disconnect(self) -> None:
        self.fake.answers["disconnect"] = {"status": "reset", "id": 3}
        self.assertEqual(self.run_ok(["disconnect", "3"]).stdout, "connection 3 reset\n")
        self.assertEqual(self.fake.calls, [("disconnect", {"conn_id": 3})])

    def test_disconnect_unknown(self) -> None:
        self.fake.answers["disconnect"] = NotFound("no connection with id 9")
        self.run_error(["disconnect", "9"], ErrorCode.not_found)

    def test_disconnect_bad_id(self) -> None:
        self.assertEqual(Ran(["disconnect", "abc"]).status, 2)
        self.assertEqual(self.fake.calls, [])
