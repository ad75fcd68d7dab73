"""
pilotctl's node commands (pilot.cli_node) in-process: a fake control client
injected for exact requests and every output shape, error and bad argument;
then the real client and control server over a Unix socket.  The traffic
commands (pilot.cli_traffic) have tests.test_cli_traffic, which uses the
fake client and CLITestCase of this module.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pilot import cli_node
from pilot.control_client import Subscription
from pilot.errors import ErrorCode, InvalidArgument, NotFound, RateLimited
from pilot.protocols.control_server import ControlServerFactory
from pilot.wire.control import frame_decoder
from tests.protocols.test_control_server import FakeAPI, FakeListening
from tests.test_cli import Ran
from tests.test_control_client import LoopPilot


class FakeClient:
    """Stands in for ControlClient: records requests, answers from :attr:`answers`."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.test = test
        self.answers: dict[str, Any] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.timeouts: list[float | None] = []
        self.closed = 0
        self.stream: socket.socket | None = None
        self.subscription_result: Any = {"port": 0}
        self.subscription_peer: socket.socket | None = None
        self.attached: dict[int, socket.socket] = {}

    def pair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.test.addCleanup(a.close)
        self.test.addCleanup(b.close)
        return a, b

    def _answer(self, cmd: str) -> Any:
        answer = self.answers[cmd]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def call(self, cmd: str, /, **args: Any) -> Any:
        return self.request(cmd, args)

    def request(self, cmd: str, args: Any = None, timeout: float | None = None) -> Any:
        self.calls.append((cmd, dict(args or {})))
        self.timeouts.append(timeout)
        return self._answer(cmd)

    def open_stream(self, target: str, port: int, timeout: float | None = None) -> socket.socket:
        self.calls.append(("connect", {"target": target, "port": port}))
        if "connect" in self.answers:
            self._answer("connect")
        assert self.stream is not None
        return self.stream

    def subscribe(self, cmd: str, /, deadline: float | None = None, **args: Any) -> Subscription:
        self.calls.append((cmd, args))
        if cmd in self.answers:
            self._answer(cmd)
        assert self.subscription_peer is not None
        mine = self.subscription_peer
        return Subscription(mine, frame_decoder(), self.subscription_result, deadline)

    def attach(self, conn_id: int, timeout: float | None = None) -> socket.socket:
        self.calls.append(("attach", {"conn_id": conn_id}))
        return self.attached[conn_id]

    def close(self) -> None:
        self.closed += 1


class CLITestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.fake = FakeClient(self)
        self.made: list[tuple[str | None, float]] = []

        def make(path: str | None, timeout: float) -> FakeClient:
            self.made.append((path, timeout))
            return self.fake

        self.patch(cli_node, "make_client", make)

    def run_ok(self, argv: list[str]) -> Ran:
        ran = Ran(argv)
        self.assertEqual(ran.status, 0, ran.stderr)
        self.assertNotIn("Traceback", ran.stderr)
        return ran

    def run_json(self, argv: list[str]) -> Any:
        ran = self.run_ok(["--json", *argv])
        lines = ran.stdout.splitlines()
        self.assertEqual(len(lines), 1, ran.stdout)
        return json.loads(lines[0])

    def run_error(self, argv: list[str], code: ErrorCode) -> dict[str, Any]:
        ran = Ran(["--json", *argv])
        self.assertEqual(ran.status, int(code), ran.stderr)
        self.assertEqual(ran.stdout, "")
        error = ran.json_error()
        self.assertEqual(error["code"], code.name)
        return error


NODE_INFO = {"node_id": 5, "address": "0:0000.0000.0005", "hostname": "sensor-1", "public": True,
             "public_key": "AAAA", "endpoint": "203.0.113.50:4000", "registry": "rv:9000",
             "uptime_secs": 3725.5, "peers": 2, "connections": 1, "counters": {"b": 2, "a": 1}}

# argv, daemon cmd, its arguments, the daemon's answer, the text printed
SIMPLE: list[tuple[list[str], str, dict[str, Any], Any, str]] = [
    (["set-hostname", "sensor-1"], "set_hostname", {"hostname": "sensor-1"}, {"hostname": "sensor-1"},
     "hostname set: sensor-1"),
    (["clear-hostname"], "set_hostname", {"hostname": ""}, {"hostname": ""}, "hostname cleared"),
    (["set-public"], "set_public", {"public": True}, {"visibility": "public"}, "visibility: public"),
    (["set-private"], "set_public", {"public": False}, {"visibility": "private"}, "visibility: private"),
    (["set-tags", "#gpu", "fast", "gpu"], "set_tags", {"tags": ["gpu", "fast"]}, {"tags": ["gpu", "fast"]},
     "tags set: #gpu #fast"),
    (["find", "sensor-1"], "find", {"hostname": "sensor-1"},
     {"hostname": "sensor-1", "address": "1:0001.0000.0001", "node_id": 1, "public": True,
      "endpoint": "203.0.113.50:4000"},
     "sensor-1 1:0001.0000.0001 public 203.0.113.50:4000"),
    (["find", "hidden"], "find", {"hostname": "hidden"},
     {"hostname": "hidden", "address": "0:0000.0000.0007", "node_id": 7, "public": False,
      "endpoint": "198.51.100.1:4000"},
     "hidden 0:0000.0000.0007 private -"),
    (["find", "fresh"], "find", {"hostname": "fresh"},
     {"hostname": "fresh", "address": "0:0000.0000.0008", "node_id": 8, "public": True, "endpoint": None},
     "fresh 0:0000.0000.0008 public -"),
    (["peers"], "peers", {}, [], "no peers"),
    (["peers"], "peers", {},
     [{"hostname": "sensor-1", "address": "0:0000.0000.0001", "node_id": 1, "endpoint": "203.0.113.4:4000",
       "mtu": 1472, "mss": 1402, "mtu_state": "complete"},
      {"hostname": None, "address": "0:0000.0000.0022", "node_id": 34, "endpoint": None},
      {"hostname": "new", "address": "0:0000.0000.0023", "node_id": 35, "endpoint": "203.0.113.5:4000",
       "mtu": 1252, "mss": 1182, "mtu_state": "searching"}],
     "HOSTNAME  ADDRESS           NODE ID  ENDPOINT          PATH  MTU\n"
     "sensor-1  0:0000.0000.0001  1        203.0.113.4:4000  -     1472\n"
     "-         0:0000.0000.0022  34       -                 -     -\n"
     "new       0:0000.0000.0023  35       203.0.113.5:4000  -     1252 searching"),
    (["peers"], "peers", {},
     [{"hostname": "a", "address": "0:0000.0000.0001", "node_id": 1, "endpoint": "203.0.113.4:4000",
       "path": "relay", "path_reason": "collision_recovering"},
      {"hostname": "b", "address": "0:0000.0000.0002", "node_id": 2, "endpoint": "198.51.100.8:4000",
       "path": "punched", "path_reason": None, "mtu": 1400, "mtu_state": "complete"}],
     "HOSTNAME  ADDRESS           NODE ID  ENDPOINT           PATH                          MTU\n"
     "a         0:0000.0000.0001  1        203.0.113.4:4000   relay (collision_recovering)  -\n"
     "b         0:0000.0000.0002  2        198.51.100.8:4000  punched                       1400"),
    (["handshake", "sensor-1", "fleet enrollment"], "handshake",
     {"target": "sensor-1", "justification": "fleet enrollment"}, {"status": "sent", "node_id": 1},
     "handshake request sent to node 1; it must approve (or send a handshake back)"),
    (["handshake", "0:0000.0000.0001"], "handshake", {"target": "0:0000.0000.0001", "justification": ""},
     {"status": "approved", "node_id": 1}, "trust established with node 1"),
    (["handshake", "17"], "handshake", {"target": "17", "justification": ""},
     {"status": "sent", "node_id": 17},
     "handshake request sent to node 17; it must approve (or send a handshake back)"),
    (["pending"], "pending", {}, [], "no pending handshake requests"),
    (["pending"], "pending", {},
     [{"node_id": 9, "public_key": "k", "justification": "let me in", "received_at": 0}],
     "NODE ID  HOSTNAME  JUSTIFICATION  RECEIVED\n9        -         let me in      1970-01-01 00:00:00 UTC"),
    (["pending"], "pending", {},
     [{"node_id": 9, "public_key": "k", "hostname": "agent-a", "justification": "let me in",
       "received_at": 0}],
     "NODE ID  HOSTNAME  JUSTIFICATION  RECEIVED\n9        agent-a   let me in      1970-01-01 00:00:00 UTC"),
    (["trust"], "trust", {},
     [{"node_id": 9, "public_key": "k", "hostname": "agent-a", "approved_at": 86400, "mutual": False}],
     "NODE ID  HOSTNAME  MUTUAL  APPROVED\n9        agent-a   no      1970-01-02 00:00:00 UTC"),
    (["approve", "9"], "approve", {"node_id": 9}, {"status": "approved", "node_id": 9},
     "trust established with node 9"),
    (["approve", "0:0000.0000.0009"], "approve", {"node_id": 9}, {"status": "approved", "node_id": 9},
     "trust established with node 9"),
    (["reject", "9", "who are you"], "reject", {"node_id": 9, "reason": "who are you"},
     {"status": "rejected", "node_id": 9}, "handshake from node 9 rejected"),
    (["reject", "9"], "reject", {"node_id": 9, "reason": ""}, {"status": "rejected", "node_id": 9},
     "handshake from node 9 rejected"),
    (["trust"], "trust", {}, [], "no trusted peers"),
    (["trust"], "trust", {},
     [{"node_id": 9, "public_key": "k", "approved_at": 86400, "mutual": True, "network": 0}],
     "NODE ID  HOSTNAME  MUTUAL  APPROVED\n9        -         yes     1970-01-02 00:00:00 UTC"),
    (["untrust", "9"], "untrust", {"node_id": 9}, {"status": "revoked", "node_id": 9},
     "trust revoked for node 9"),
    (["send", "sensor-1", "5000", "--data", "hello"], "send",
     {"target": "sensor-1", "port": 5000, "data": base64.b64encode(b"hello").decode()},
     {"sent": 5, "target": "0:0000.0000.0001", "port": 5000}, "sent 5 bytes to sensor-1 port 5000"),
]

# every node command, with arguments that parse
EVERY = [["info"], ["set-hostname", "a"], ["clear-hostname"], ["set-public"], ["set-private"],
         ["set-tags", "a"], ["find", "a"], ["peers"], ["handshake", "a"], ["pending"], ["approve", "1"],
         ["reject", "1"], ["trust"], ["untrust", "1"], ["ping", "a"], ["connect", "a", "1"], ["listen", "1"],
         ["send", "a", "1", "--data", "x"], ["recv", "1"]]


class SimpleCommandTests(CLITestCase):
    def test_human(self) -> None:
        for argv, cmd, args, answer, text in SIMPLE:
            self.fake.calls.clear()
            self.fake.answers[cmd] = answer
            ran = self.run_ok(argv)
            self.assertEqual(ran.stdout, text + "\n", argv)
            self.assertEqual(ran.stderr, "", argv)
            self.assertEqual(self.fake.calls, [(cmd, args)], argv)

    def test_json(self) -> None:
        for argv, cmd, args, answer, text in SIMPLE:
            self.fake.answers[cmd] = answer
            self.assertEqual(self.run_json(argv), answer, argv)

    def test_json_after_the_command(self) -> None:
        self.fake.answers["approve"] = {"status": "approved", "node_id": 9}
        ran = self.run_ok(["approve", "9", "--json"])
        self.assertEqual(json.loads(ran.stdout), {"status": "approved", "node_id": 9})

    def test_daemon_errors(self) -> None:
        for argv, cmd, args, answer, text in SIMPLE:
            self.fake.answers[cmd] = NotFound("no node has the hostname 'x'", "try `pilotctl peers`")
            error = self.run_error(argv, ErrorCode.not_found)
            self.assertEqual(error["message"], "no node has the hostname 'x'")
            self.assertEqual(error["hint"], "try `pilotctl peers`")
            ran = Ran(argv)
            self.assertEqual(ran.stdout, "")
            self.assertEqual(ran.stderr, "error: no node has the hostname 'x'\nhint: try `pilotctl peers`\n")

    def test_client_closed(self) -> None:
        self.fake.answers["pending"] = []
        self.run_ok(["pending"])
        self.assertEqual(self.fake.closed, 1)

    def test_socket_option(self) -> None:
        self.fake.answers["trust"] = []
        self.run_ok(["trust", "--socket", "/run/p.sock"])
        self.run_ok(["trust"])
        self.assertEqual([path for path, _ in self.made], ["/run/p.sock", None])

    def test_info(self) -> None:
        self.fake.answers["info"] = NODE_INFO
        ran = self.run_ok(["info"])
        self.assertEqual(ran.stdout.splitlines(), [
            "Node ID:      5", "Address:      0:0000.0000.0005", "Hostname:     sensor-1",
            "Visibility:   public", "Public key:   AAAA", "Endpoint:     203.0.113.50:4000",
            "NAT:          -", "Registry:     rv:9000", "Uptime:       01:02:05", "Peers:        2", "Connections:  1",
            "Counters:", "  a: 1", "  b: 2"])
        self.assertEqual(self.run_json(["info"]), NODE_INFO)

    def test_info_nested(self) -> None:
        self.fake.answers["info"] = {**NODE_INFO, "registry": {"server": "rv:9000", "state": "registered"},
                                     "counters": {"stack": {"sent": 3, "received": 4}, "udp": {}}}
        ran = self.run_ok(["info"])
        self.assertIn("Registry:     rv:9000 (registered)\n", ran.stdout)
        self.assertTrue(ran.stdout.endswith("Counters:\n  stack.received: 4\n  stack.sent: 3\n"), ran.stdout)

    def test_info_rendezvous_entry_and_term(self) -> None:
        """With a list of rendezvous servers, the entry in use and the term seen (docs/registration.md)."""
        self.fake.answers["info"] = {**NODE_INFO, "registry": {
            "server": "rv-b:9000", "state": "registered", "servers": ["rv-a:9000", "rv-b:9000"],
            "server_index": 1, "term": 3}}
        ran = self.run_ok(["info"])
        self.assertIn("Registry:     rv-b:9000 (registered, entry 2 of 2, term 3)\n", ran.stdout)

    def test_info_path_mtu(self) -> None:
        """Each peer's discovered datagram size and segment (docs/tunnel.md), in text and --json."""
        peers = [{"address": "0:0000.0000.0007", "mtu": 1472, "mss": 1402, "mtu_state": "complete"},
                 {"address": "0:0000.0000.0008", "mtu": None}]
        self.fake.answers["info"] = {**NODE_INFO, "peer_list": peers}
        ran = self.run_ok(["info"])
        self.assertIn("Path MTU:\n  0:0000.0000.0007: 1472 B datagrams, 1402 B segments (complete)\nCounters:",
                      ran.stdout)
        self.assertEqual(self.run_json(["info"])["peer_list"], peers)

    def test_info_sparse(self) -> None:
        self.fake.answers["info"] = {"node_id": 5}
        ran = self.run_ok(["info"])
        self.assertIn("Hostname:     -", ran.stdout)
        self.assertIn("Uptime:       -", ran.stdout)

    def test_unexpected_shapes_never_trace(self) -> None:
        for argv, cmd, args, answer, text in SIMPLE:
            for odd in (None, "text", 5, [1, 2], {"x": [1]}):
                self.fake.answers[cmd] = odd
                ran = Ran(argv)
                self.assertIn(ran.status, (0, 10), (argv, odd))
                self.assertNotIn("Traceback", ran.stderr)
        self.fake.answers["info"] = ["odd"]
        self.assertEqual(Ran(["info"]).status, 0)


class BadArgumentTests(CLITestCase):
    BAD = [
        (["set-hostname"], "NAME"),
        (["set-hostname", "Bad_Name"], "lower-case"),
        (["set-hostname", "localhost"], "reserved"),
        (["set-hostname", "x" * 64], "63"),
        (["set-tags"], "TAG"),
        (["set-tags", "no spaces"], "invalid tag"),
        (["set-tags", *[f"t{i}" for i in range(11)]], "at most"),
        (["find"], "NAME"),
        (["find", "UPPER"], "lower-case"),
        (["handshake"], "NAME|ADDR"),
        (["handshake", "not a host"], "not a hostname"),
        (["handshake", "1:0002.0000.0001"], "network mismatch"),
        (["handshake", "99999999999"], "out of range"),
        (["handshake", "a", "x" * 2000], "1024"),
        (["approve"], "NODE_ID"),
        (["approve", "-1"], "node id"),
        (["approve", "4294967296"], "node id"),
        (["approve", "abc"], "node id"),
        (["reject", "x"], "node id"),
        (["reject", "1", "x" * 2000], "1024"),
        (["untrust", "1.5"], "node id"),
        (["ping"], "NAME|ADDR"),
        (["ping", "a", "--count", "0"], "count"),
        (["ping", "a", "--count", "-3"], "count"),
        (["ping", "a", "--count", "x"], "count"),
        (["ping", "a", "--count", "5000"], "at most"),
        (["ping", "a", "--timeout", "0"], "timeout"),
        (["ping", "a", "--timeout", "nan"], "timeout"),
        (["ping", "a", "--timeout", "soon"], "timeout"),
        (["connect", "a"], "PORT"),
        (["connect", "a", "65536"], "port"),
        (["connect", "a", "-1"], "port"),
        (["connect", "a", "http"], "port"),
        (["connect", "a", "7", "--timeout", "-1"], "timeout"),
        (["listen"], "PORT"),
        (["listen", "70000"], "port"),
        (["listen", "80", "--count", "0"], "count"),
        (["listen", "80", "--timeout", "inf"], "timeout"),
        (["send", "a", "1"], "--data"),
        (["send", "a", "x", "--data", "d"], "port"),
        (["send", "Bad!", "1", "--data", "d"], "hostname"),
        (["recv", "1.0"], "port"),
        (["recv", "1", "--count", "1e3"], "count"),
        (["peers", "--search", "x" * 65], "64"),
        (["peers", "--search", " "], "64"),
        (["peers", "extra"], "unrecognized"),
        (["info", "--bogus"], "--bogus"),
        (["pending", "--sock", "x"], "--sock"),
    ]

    def test_bad_arguments(self) -> None:
        for argv, needle in self.BAD:
            for json_first in (True, False):
                ran = Ran(["--json", *argv] if json_first else [*argv, "--json"])
                self.assertEqual(ran.status, 2, (argv, ran.stderr))
                self.assertEqual(ran.stdout, "", argv)
                error = ran.json_error()
                self.assertEqual(error["code"], "invalid_argument", argv)
                self.assertIn(needle, error["message"], argv)
                self.assertIn("--help", error["hint"], argv)
        self.assertEqual(self.made, [])  # the daemon was never asked

    def test_help_everywhere(self) -> None:
        for argv in EVERY:
            ran = Ran([argv[0], "--help"])
            self.assertEqual(ran.status, 0, argv)
            self.assertIn(f"usage: pilotctl {argv[0]}", ran.stdout)
            self.assertIn("--socket PATH", ran.stdout)
            self.assertIn("--json", ran.stdout)
            self.assertEqual(ran.stderr, "")
        self.assertEqual(self.made, [])


class NotRunningTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pilotctl-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "pilot.sock")

    def test_every_command(self) -> None:
        for argv in EVERY:
            ran = Ran(["--json", *argv, "--socket", self.path])
            self.assertEqual(ran.status, 4, (argv, ran.stderr))
            self.assertEqual(ran.stdout, "")
            error = ran.json_error()
            self.assertEqual(error["code"], "not_running")
            self.assertIn(self.path, error["message"])
            self.assertIn("pilotctl daemon start", error["hint"])

    def test_human(self) -> None:
        ran = Ran(["info", "--socket", self.path])
        self.assertEqual(ran.status, 4)
        self.assertTrue(ran.stderr.startswith("error: the daemon is not running"))
        self.assertIn("\nhint: start the daemon with `pilotctl daemon start`", ran.stderr)

    def test_environment(self) -> None:
        self.patch(os, "environ", {**os.environ, "PILOT_SOCKET": self.path})
        self.assertIn(self.path, Ran(["--json", "info"]).json_error()["message"])
        env = {k: v for k, v in os.environ.items() if k != "PILOT_SOCKET"}
        self.patch(os, "environ", {**env, "PILOT_HOME": self.dir})
        self.assertIn(self.path, Ran(["--json", "info"]).json_error()["message"])


class RealDaemonTests(TestCase):
    """pilotctl (in a thread) against the real control server on the reactor."""

    def setUp(self) -> None:
        self.api = FakeAPI()
        self.dir = tempfile.mkdtemp(prefix="pilotctl-")
        self.path = os.path.join(self.dir, "pilot.sock")
        self.factory = ControlServerFactory(self.api, reactor)
        self.port = reactor.listenUNIX(self.path, self.factory, mode=0o600)

    @inlineCallbacks
    def tearDown(self) -> Any:
        yield self.port.stopListening()
        while self.factory.connections:
            yield deferLater(reactor, 0.01, lambda: None)
        shutil.rmtree(self.dir, True)

    def pilotctl(self, *argv: str) -> Any:
        return deferToThread(Ran, [*argv, "--socket", self.path])

    @inlineCallbacks
    def test_info_and_find(self) -> Any:
        self.api.answers["info"] = NODE_INFO
        self.api.answers["find"] = {"hostname": "sensor-1", "address": "1:0001.0000.0001", "node_id": 65537,
                                    "public": True, "endpoint": "203.0.113.50:4000"}
        ran = yield self.pilotctl("--json", "info")
        self.assertEqual((ran.status, json.loads(ran.stdout)), (0, NODE_INFO))
        ran = yield self.pilotctl("find", "sensor-1")
        self.assertEqual(ran.stdout, "sensor-1 1:0001.0000.0001 public 203.0.113.50:4000\n")

    @inlineCallbacks
    def test_error_from_the_node(self) -> Any:
        self.api.answers["untrust"] = NotFound("node 9 is not trusted", "see `pilotctl trust`")
        ran = yield self.pilotctl("untrust", "9")
        self.assertEqual(ran.status, 3)
        self.assertEqual(ran.stderr, "error: node 9 is not trusted\nhint: see `pilotctl trust`\n")
        self.assertEqual(self.api.calls, [("untrust", (9,))])

    @inlineCallbacks
    def test_connect_message(self) -> Any:
        def connected(target: str, port: int) -> Any:
            bridge = self.api.protocols[-1]
            bridge.makeConnection(LoopPilot(bridge))
            return {"target": target, "port": port}

        self.api.answers["connect"] = connected
        ran = yield self.pilotctl("--json", "connect", "sensor-1", "7", "--message", "echo me")
        self.assertEqual(ran.status, 0, ran.stderr)
        self.assertEqual(json.loads(ran.stdout), {"sent": 7, "received": "ECHO ME"})

    @inlineCallbacks
    def test_recv(self) -> Any:
        listening = FakeListening()
        self.api.answers["bind_datagrams"] = listening
        d = self.pilotctl("--json", "recv", "5000", "--count", "2", "--timeout", "10")
        while not self.api.receivers:
            yield deferLater(reactor, 0.01, lambda: None)
        yield deferLater(reactor, 0.05, lambda: None)
        for payload in (b"a", b"b"):
            self.api.receivers[0]({"from": "0:0000.0000.0009", "src_port": 7}, payload)
        ran = yield d
        self.assertEqual(ran.status, 0, ran.stderr)
        self.assertEqual([e["data"] for e in json.loads(ran.stdout)], ["a", "b"])
        while not listening.closed:
            yield deferLater(reactor, 0.01, lambda: None)


# --- peers --search ----------------------------------------------------------------------------

SENSORS = [{"hostname": "sensor-1", "address": "0:0000.0000.0001", "node_id": 1, "public": True,
            "tags": ["temp"]},
           {"hostname": "sensor-2", "address": "0:0000.0000.0002", "node_id": 2, "public": False, "tags": []}]


class PeersSearchTests(CLITestCase):
    """``peers --search`` asks the daemon to search the registry (``search``), not its known peers."""

    def test_json_is_a_list_for_jq(self) -> None:
        # the articles: pilotctl --json peers --search "sensor" | jq -r '.[].hostname'
        self.fake.answers["search"] = {"nodes": SENSORS, "source": "registry", "truncated": False, "note": None}
        ran = self.run_ok(["--json", "peers", "--search", "sensor"])
        self.assertEqual(self.fake.calls, [("search", {"query": "sensor"})])
        self.assertEqual(json.loads(ran.stdout), SENSORS)
        self.assertEqual([n["hostname"] for n in json.loads(ran.stdout)], ["sensor-1", "sensor-2"])
        self.assertEqual(ran.stderr, "")

    def test_human(self) -> None:
        self.fake.answers["search"] = {"nodes": SENSORS, "source": "registry", "truncated": False, "note": None}
        ran = self.run_ok(["peers", "--search", "sensor"])
        self.assertEqual(ran.stdout, "HOSTNAME  ADDRESS           NODE ID  VISIBILITY  TAGS\n"
                                     "sensor-1  0:0000.0000.0001  1        public      #temp\n"
                                     "sensor-2  0:0000.0000.0002  2        private     -\n")

    def test_nothing_found(self) -> None:
        self.fake.answers["search"] = {"nodes": [], "source": "registry", "truncated": False, "note": None}
        self.assertEqual(self.run_ok(["peers", "--search", "sen"]).stdout, "no nodes matching 'sen'\n")
        self.assertEqual(self.run_json(["peers", "--search", "sen"]), [])

    def test_registry_note_on_stderr(self) -> None:
        known = [{"hostname": "sensor-2", "address": "0:0000.0000.0002", "node_id": 2, "public": None,
                  "tags": []}]
        self.fake.answers["search"] = {"nodes": known, "source": "known peers", "truncated": False,
                                       "note": "the registry does not know search_nodes"}
        ran = self.run_ok(["--json", "peers", "--search", "sensor"])
        self.assertEqual(json.loads(ran.stdout), known)
        self.assertEqual(ran.stderr, "note: the registry does not know search_nodes\n")

    def test_old_daemon_falls_back_to_known_peers(self) -> None:
        self.fake.answers["search"] = InvalidArgument("unknown command 'search'")
        self.fake.answers["peers"] = [{"hostname": "sensor-1", "address": "0:0000.0000.0001", "node_id": 1,
                                       "endpoint": "1.2.3.4:4000", "trusted": True}]
        ran = self.run_ok(["--json", "peers", "--search", "sensor"])
        self.assertEqual(self.fake.calls, [("search", {"query": "sensor"}), ("peers", {"search": "sensor"})])
        self.assertEqual(json.loads(ran.stdout), [{"hostname": "sensor-1", "address": "0:0000.0000.0001",
                                                   "node_id": 1, "public": None, "tags": []}])
        self.assertIn("only the peers it already knows", ran.stderr)

    def test_other_errors_pass_through(self) -> None:
        self.fake.answers["search"] = RateLimited("too many searches from this node")
        self.run_error(["peers", "--search", "sensor"], ErrorCode.rate_limited)
