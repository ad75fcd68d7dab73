"""
``pilotctl stats`` and ``pilotctl bench`` (L{pilot.cli_stats}) in-process,
against the fake control client of C{tests.test_cli_node}; bench's stream is
a socket pair whose far end echoes (or stops).
"""

from __future__ import annotations

import socket
import threading
from typing import Callable

from pilot.errors import ErrorCode
from tests.test_cli import Ran
from tests.test_cli_node import CLITestCase

INFO = {
    "uptime_secs": 3725.5, "registry": {"state": "registered"},
    "peer_list": [
        {"address": "0:0000.0000.0002", "path": "direct", "state": "established", "bytes_rx": 2048,
         "bytes_tx": 4096, "mtu": 1452},
        {"address": "0:0000.0000.0003", "path": "relay", "state": "established", "bytes_rx": 10,
         "bytes_tx": 20, "mtu": None},
    ],
    "conn_list": [{"retransmits": 3, "fast_retx": 1}],
    "counters": {"tunnel": {"malformed": 2}, "stack": {"packets.sent": 40, "packets.received": 30},
                 "path": {"relay_fallbacks": 1}, "udp": {}, "apps": {"eventstream": {"topics": 2}}},
}


class StatsTests(CLITestCase):
    def test_text(self) -> None:
        self.fake.answers["info"] = INFO
        out = self.run_ok(["stats"]).stdout
        self.assertIn("Uptime:         1:02:06", out)
        self.assertIn("Registered:     yes", out)
        self.assertIn("Peers by path:  direct 1, relay 1", out)
        self.assertIn("Received:       direct 2.0 KiB, relay 10 B", out)
        self.assertIn("Packets out:    40", out)
        self.assertIn("Retransmits:    3", out)
        self.assertIn("Path MTU:       0:0000.0000.0002 1452 B", out)
        self.assertIn("Tunnel:         malformed 2", out)
        self.assertIn("Services:       eventstream.topics 2", out)
        self.assertEqual(self.fake.calls, [("info", {})])

    def test_json(self) -> None:
        self.fake.answers["info"] = INFO
        out = self.run_json(["stats"])
        self.assertEqual(out["peers"], {"direct": 1, "relay": 1})
        self.assertEqual(out["peer_sent_bytes"], {"direct": 4096, "relay": 20})
        self.assertEqual(out["packets_received"], 30)
        self.assertEqual(out["path_mtu_bytes"], {"0:0000.0000.0002": 1452})
        self.assertEqual(out["registered"], 1)


class BenchTests(CLITestCase):
    def peer(self, behaviour: Callable[[socket.socket], None]) -> None:
        mine, theirs = self.fake.pair()
        self.fake.stream = mine
        thread = threading.Thread(target=behaviour, args=(theirs,), daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)

    @staticmethod
    def echo(sock: socket.socket) -> None:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(data)

    def test_bench(self) -> None:
        self.peer(self.echo)
        out = self.run_json(["bench", "agent-b", "0.5"])
        self.assertEqual(out["bytes"], 1 << 19)
        self.assertEqual(out["target"], "agent-b")
        self.assertGreater(out["seconds"], 0)
        self.assertGreater(out["bytes_per_second"], 0)
        self.assertEqual(self.fake.calls, [("connect", {"target": "agent-b", "port": 7})])

    def test_bench_text_and_no_progress_off_a_terminal(self) -> None:
        self.peer(self.echo)
        ran = self.run_ok(["bench", "agent-b"])
        self.assertIn("1.0 MiB to agent-b and back in", ran.stdout)
        self.assertIn("Mbit/s", ran.stdout)
        self.assertEqual(ran.stderr, "")

    def test_peer_closes(self) -> None:
        def half(sock: socket.socket) -> None:
            sock.sendall(sock.recv(1000))
            sock.close()
        self.peer(half)
        error = self.run_error(["bench", "agent-b", "1"], ErrorCode.connection_failed)
        self.assertIn("closed", error["message"])

    def test_sizes(self) -> None:
        for bad in ("0", "-1", "x", "2000"):
            self.assertEqual(Ran(["bench", "agent-b", bad]).status, 2, bad)
