"""
Data exchange (port 1001) and the event stream (port 1002) between two of
our nodes, as real processes on 127.0.0.1 (``docs/apps.md``):
``send-message`` into the peer's inbox, ``send-file`` of a few MiB
byte-exact into its ``received/``, publish to three subscribers, an
untrusted node refused, and hostile frames that leave the node serving.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.control_client import ControlClient
from tests.integration.nodes import Node, NodeTestMixin
from tests.integration.procs import wait_until


def _stream(node: Node, target: str, port: int) -> socket.socket:
    with ControlClient(node.socket_path, 30.0) as c:
        return c.open_stream(target, port, timeout=30.0)


class AppsTests(NodeTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.rendezvous = self.start_rendezvous()
        self.a, self.b = self.start_nodes(self.rendezvous, "apps-a", "apps-b")
        self.trust_each_other(self.a, self.b)

    def test_message_file_and_events(self) -> None:
        a, b = self.a, self.b
        # a message into b's inbox, in the reference's layout
        sent = a.ok("send-message", b.hostname, "--data", "hello from a")
        self.assertEqual((sent["reply"], sent["acked"]), ("ACK TEXT 12 bytes", True))
        sent = a.ok("send-message", b.hostname, "--data", '{"k": [1, 2]}', "--type", "json")
        self.assertEqual(sent["reply"], "ACK JSON 13 bytes")
        inbox = b.ok("inbox")
        self.assertEqual([(m["type"], m["from"], m["data"]) for m in inbox["messages"]],
                         [("TEXT", a.address, "hello from a"), ("JSON", a.address, '{"k": [1, 2]}')])
        self.assertTrue(all(name.endswith(".json") for name in os.listdir(os.path.join(b.home, "inbox"))))

        # a file of 3 MiB, byte-exact, named as the reference names it
        content = os.urandom(3 * 1024 * 1024 + 17)
        path = os.path.join(a.home, "payload.bin")
        with open(path, "wb") as f:
            f.write(content)
        sent = a.ok("send-file", b.hostname, path, timeout=120)
        self.assertEqual(sent["reply"], f"ACK FILE {len(content)} bytes")
        [entry] = b.ok("received")["files"]
        self.assertRegex(entry["name"], r"^payload-\d{8}-\d{6}\.\d{3}\.bin$")
        with open(entry["path"], "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), hashlib.sha256(content).hexdigest())
        self.assertEqual(os.listdir(os.path.join(b.home, "incoming")), [])

        # publish on b's broker reaches three subscribers (one on `*`)
        subs = [self.spawn_ctl(a, "subscribe", b.hostname, topic, "--count", "1", "--timeout", "60")
                for topic in ("alerts", "alerts", "*")]
        wait_until(lambda: _subscribers(b) >= 3, 30.0, "three subscriptions on b's broker", b.describe)
        a.ok("publish", b.hostname, "alerts", "--data", "fire")
        for proc in subs:
            self.assertEqual(proc.wait(30), 0, proc.describe())
            self.assertEqual(json.loads(proc.stdout()), {"topic": "alerts", "data": "fire", "bytes": 4})

        # the connections list shows streams, and disconnect of an unknown id is not_found
        self.assertIsInstance(a.ok("connections"), list)
        a.fails("not_found", "disconnect", "4000000000")

    def test_hostile_frames(self) -> None:
        """Oversized lengths and a traversal name: refused or contained; the node keeps serving."""
        a, b = self.a, self.b
        with _stream(a, b.hostname, 1001) as s:
            s.sendall(struct.pack(">II", 1, 0xFFFFFFFF))
            s.settimeout(10)
            self.assertEqual(_read_all(s), b"")  # closed, nothing saved
        with _stream(a, b.hostname, 1001) as s:
            name = b"../../../../tmp/evil"
            s.sendall(struct.pack(">IIH", 4, 2 + len(name) + 2, len(name)) + name + b"ok")
            s.settimeout(10)
            reply = s.recv(4096)
            self.assertIn(b"ACK FILE 2 bytes", reply)
        [entry] = b.ok("received")["files"]
        self.assertEqual(os.path.dirname(entry["path"]), os.path.join(b.home, "received"))
        with _stream(a, b.hostname, 1002) as s:
            s.sendall(b"".join(struct.pack(">H", len(t)) + t + b"\0\0\0\0"
                               for t in (f"t{i}".encode() for i in range(10_000))))
            s.sendall(struct.pack(">H", 5000))  # a topic length over 1024 ends the connection
            s.settimeout(10)
            self.assertEqual(_read_all(s), b"")
        sent = a.ok("send-message", b.hostname, "--data", "still serving")
        self.assertEqual(sent["reply"], "ACK TEXT 13 bytes")
        counters = b.call("info")["counters"]
        self.assertGreaterEqual(counters["apps"]["dataexchange"]["frames.malformed"], 1)
        self.assertEqual(counters["apps"]["dataexchange"]["names.cleaned"], 1)
        self.assertGreaterEqual(counters["apps"]["eventstream"]["malformed"], 1)

    def test_untrusted_refused(self) -> None:
        """The trust gate holds on 1001 and 1002 as on every port."""
        [c] = self.start_nodes(self.rendezvous, "apps-c")
        c.fails("not_trusted", "send-message", self.b.hostname, "--data", "let me in")
        c.fails("not_trusted", "publish", self.b.hostname, "t", "--data", "x")
        self.assertEqual(self.b.ok("inbox")["total"], 0)


def _subscribers(node: Node) -> int:
    counters: dict[str, Any] = node.call("info")["counters"]
    return int(counters.get("apps", {}).get("eventstream", {}).get("subscribers", 0))


def _read_all(s: socket.socket) -> bytes:
    got = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return got
        if not chunk:
            return got
        got += chunk
