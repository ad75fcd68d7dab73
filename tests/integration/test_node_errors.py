"""
The node daemon and pilotctl given bad input, as real processes on 127.0.0.1:

* every node command with bad arguments: the documented error code (the
  exit status), the ``{"error": {code, message, hint}}`` shape with
  ``--json``, ``error:``/``hint:`` lines without, nothing on stdout, never a
  traceback; and every node command without a daemon: ``not_running``;
* garbage on the control socket from a plain socket (not a frame, oversized
  lengths, not JSON, not an object, bad ids, unknown commands, wrong-typed
  arguments, truncated frames, pipelined requests): an error reply or a
  closed connection, and the daemon answers ``info`` afterwards;
* a second ``daemon start`` on the same ``PILOT_HOME``: ``already_exists``;
* ``daemon start`` with a corrupt identity: a clear error, a non-zero exit,
  the file untouched, no daemon left behind;
* ``daemon stop`` racing the daemon's own shutdown;
* what a new user hits (issue 9): a registry nobody listens on, the files a
  killed daemon leaves, a second daemon under twistd, an unusable home.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.control_client import ControlClient
from pilot.errors import ErrorCode, NotRunning, PilotError

from tests.integration.nodes import CtlResult, Node, NodeTestMixin, RawControl
from tests.integration.procs import TWISTD, wait_until

#: (arguments, the error code).  "agent-b" is a running, registered node; "agent-a" is the node asked.
BAD_COMMANDS: list[tuple[tuple[str, ...], str]] = [
    # ports
    (("connect", "agent-b", "70000"), "invalid_argument"),
    (("connect", "agent-b", "-1"), "invalid_argument"),
    (("recv", "abc"), "invalid_argument"),
    (("listen", "65536"), "invalid_argument"),
    # node ids and addresses
    (("approve", "not-an-id"), "invalid_argument"),
    (("approve", "4294967296"), "invalid_argument"),
    (("untrust", "0:0000.ZZZZ.0001"), "invalid_argument"),
    (("ping", "0:0000.ZZZZ.0001"), "invalid_argument"),
    (("ping", "99999999999"), "invalid_argument"),
    (("ping", "0", "--count", "1"), "invalid_argument"),
    (("ping", "4294967295", "--count", "1"), "invalid_argument"),
    (("ping", "Bad_Name"), "invalid_argument"),
    (("find", "UPPER_case"), "invalid_argument"),
    (("set-hostname", "Bad Name"), "invalid_argument"),
    (("set-tags", "bad tag!"), "invalid_argument"),
    (("handshake", "agent-a"), "invalid_argument"),  # this node
    # other values
    (("ping", "agent-b", "--count", "0"), "invalid_argument"),
    (("ping", "agent-b", "--count", "20000"), "invalid_argument"),
    (("ping", "agent-b", "--timeout", "nan"), "invalid_argument"),
    (("handshake", "agent-b", "x" * 2000), "invalid_argument"),
    # missing arguments, unknown options and commands
    (("ping",), "invalid_argument"),
    (("connect", "agent-b"), "invalid_argument"),
    (("send", "agent-b", "5000"), "invalid_argument"),
    (("approve",), "invalid_argument"),
    (("peers", "--search"), "invalid_argument"),
    (("ping", "agent-b", "--cou", "1"), "invalid_argument"),
    (("no-such-command",), "invalid_argument"),
    # well-formed, but nothing by that name or id
    (("find", "unknown-name"), "not_found"),
    (("ping", "unknown-name", "--count", "1"), "not_found"),
    (("connect", "unknown-name", "7", "--message", "x"), "not_found"),
    (("send", "unknown-name", "5000", "--data", "x"), "not_found"),
    (("handshake", "unknown-name"), "not_found"),
    (("approve", "12345"), "not_found"),
    (("untrust", "12345"), "not_found"),
]

#: Every node command, well-formed, for a node whose daemon is not running.
NOT_RUNNING: list[tuple[str, ...]] = [
    ("info",), ("find", "agent-b"), ("peers",), ("handshake", "agent-b"), ("pending",), ("approve", "5"),
    ("ping", "agent-b", "--count", "1"), ("connect", "agent-b", "7", "--message", "x"),
    ("send", "agent-b", "7", "--data", "x"), ("recv", "7", "--timeout", "1"), ("listen", "7", "--timeout", "1"),
    ("set-hostname", "x"), ("daemon", "stop"), ("daemon", "status"),
]


def _many(node: Node, commands: list[tuple[str, ...]], json_output: bool = True) -> list[CtlResult]:
    """Run pilotctl commands two at a time (2 cores); the results in order."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda args: node.run(*args, json_output=json_output), commands))


class BadArgumentTests(NodeTestMixin, SynchronousTestCase):
    def test_bad_arguments(self) -> None:
        rendezvous = self.start_rendezvous()
        a, b = self.start_nodes(rendezvous, "agent-a", "agent-b")
        failures = []
        for (args, code), result in zip(BAD_COMMANDS, _many(a, [args for args, _ in BAD_COMMANDS])):
            try:
                self.assertEqual((result.status, result.stdout), (ErrorCode[code].value, ""))
                error = result.error
                self.assertEqual(error["code"], code)
                self.assertTrue(error["message"] and error["hint"], error)
            except AssertionError:
                failures.append(result.describe())
        self.assertEqual(failures, [], "\n".join(failures))

        # without --json: error: and hint: lines, nothing on stdout, the same exit status
        sample = [args for args, _ in BAD_COMMANDS[::8]]
        for args, result in zip(sample, _many(a, sample, json_output=False)):
            code = dict(BAD_COMMANDS)[args]
            self.assertEqual((result.status, result.stdout), (ErrorCode[code].value, ""), result.describe())
            lines = result.stderr.splitlines()
            self.assertTrue(lines[0].startswith("error: "), result.describe())
            self.assertTrue(any(line.startswith("hint: ") for line in lines), result.describe())

        # the daemon is unharmed
        self.assertEqual(a.ok("info")["hostname"], "agent-a")
        self.assertEqual(a.ok("find", "agent-b")["address"], b.address)
        self.assertNotIn("Traceback", a.log())

    def test_no_daemon(self) -> None:
        """Every node command on a node that was never started: not_running, exit status 4."""
        c = self.make_node("agent-c", None)
        failures = []
        for result in _many(c, NOT_RUNNING):
            try:
                self.assertEqual((result.status, result.stdout), (4, ""))
                self.assertEqual(result.error["code"], "not_running")
                self.assertIn("daemon start", result.error["hint"])
            except AssertionError:
                failures.append(result.describe())
        self.assertEqual(failures, [], "\n".join(failures))


class ControlSocketGarbageTests(NodeTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        rendezvous = self.start_rendezvous()
        [self.node] = self.start_nodes(rendezvous, "agent-a")
        self.pid = self.node.read_pid()

    def raw(self) -> RawControl:
        return RawControl(self.node.socket_path, timeout=5.0)

    def assertStillAnswers(self) -> None:
        """``info`` on a new connection answers, from the same daemon."""
        self.assertEqual(self.node.call("info")["address"], self.node.address)
        self.assertEqual(self.node.read_pid(), self.pid)

    def assertErrorReply(self, reply: dict[str, Any] | None, request_id: Any, code: str = "invalid_argument") -> None:
        self.assertIsNotNone(reply, "the daemon closed the connection instead of answering")
        assert reply is not None
        self.assertEqual((reply.get("id"), reply.get("ok")), (request_id, False), reply)
        self.assertEqual(set(reply["error"]), {"code", "message", "hint"}, reply)
        self.assertEqual(reply["error"]["code"], code, reply)
        self.assertTrue(reply["error"]["message"], reply)

    def test_invalid_lengths_close_the_connection(self) -> None:
        """Bytes that are not a frame, or a length over 1 MiB: an error reply, then the connection closes."""
        for data in (b"hello, this is not a frame\n", struct.pack(">I", 1 << 31) + b"{}",
                     struct.pack(">I", 1024 * 1024 + 1), b"\xff\xff\xff\xff" + b"x" * 100):
            with self.raw() as c:
                c.send_raw(data)
                reply = c.reply()
                self.assertErrorReply(reply, None)
                self.assertIn("exceeds", reply["error"]["message"])  # type: ignore[index]
                self.assertTrue(c.closed())
            self.assertStillAnswers()

    def test_bad_frames_get_error_replies(self) -> None:
        """Frames that are not a request: an error reply each, and the connection goes on."""
        bodies = [b"not json", b"", b"\xff\xfe\xfd", b"[1, 2, 3]", b'"a string"', b"null",
                  b'{"id": 1, "cmd": "info", "x": NaN}', b"[" * 100_000, b'{"cmd": "info"}',
                  b'{"id": true, "cmd": "info"}', b'{"id": -1, "cmd": "info"}', b'{"id": 1e300, "cmd": "info"}',
                  b'{"id": "1", "cmd": "info"}', b'{"id": 1, "cmd": "info"' + b" " * 10]
        with self.raw() as c:
            for n, body in enumerate(bodies):
                c.send_frame(body)
                self.assertErrorReply(c.reply(), None)
                c.send_json({"id": 1000 + n, "cmd": "info"})  # the same connection still works
                reply = c.reply()
                self.assertEqual((reply or {}).get("id"), 1000 + n, reply)
                self.assertTrue((reply or {}).get("ok"), reply)
        self.assertStillAnswers()

    def test_bad_requests_get_error_replies(self) -> None:
        """Unknown commands and wrong-typed, missing or out-of-range arguments: invalid_argument."""
        requests: list[dict[str, Any]] = [
            {"cmd": "frobnicate"}, {"cmd": 5}, {"cmd": None}, {"cmd": ["info"]},
            {"cmd": "ping"}, {"cmd": "ping", "target": 5}, {"cmd": "ping", "target": ["agent-a"]},
            {"cmd": "ping", "target": ""}, {"cmd": "ping", "target": "x" * 10_000},
            {"cmd": "ping", "target": "agent-b", "count": "many"}, {"cmd": "ping", "target": "agent-b", "count": 0},
            {"cmd": "ping", "target": "agent-b", "count": 1.5}, {"cmd": "ping", "target": "agent-b", "timeout": -1},
            {"cmd": "ping", "target": "agent-b", "interval": "x"}, {"cmd": "ping", "target": "0"},
            {"cmd": "approve", "node_id": "abc"}, {"cmd": "approve", "node_id": -5},
            {"cmd": "approve", "node_id": 1 << 40}, {"cmd": "approve", "node_id": True},
            {"cmd": "reject", "node_id": 5, "reason": 5}, {"cmd": "untrust"},
            {"cmd": "send", "target": "agent-b", "port": 7, "data": "!!not base64"},
            {"cmd": "send", "target": "agent-b", "port": 70000, "data": ""},
            {"cmd": "send", "target": "agent-b", "port": 7},
            {"cmd": "set_public", "public": "yes"}, {"cmd": "set_tags", "tags": "x"}, {"cmd": "set_tags", "tags": [1]},
            {"cmd": "set_hostname", "hostname": 7}, {"cmd": "set_hostname", "hostname": "Bad Name"},
            {"cmd": "find", "hostname": None}, {"cmd": "find", "hostname": {"a": 1}},
            {"cmd": "peers", "search": 5}, {"cmd": "handshake", "target": "agent-b", "justification": 5},
            {"cmd": "connect", "target": "agent-b", "port": -1}, {"cmd": "connect", "target": "agent-b", "port": "7"},
            {"cmd": "attach", "conn_id": "x"}, {"cmd": "listen", "port": "x"}, {"cmd": "listen"},
            {"cmd": "recv", "port": -3},
        ]
        with self.raw() as c:
            for n, request in enumerate(requests, 1):
                c.send_json({"id": n, **request})
                self.assertErrorReply(c.reply(), n)
            # not_found, not invalid: a well-formed attach of a stream that is not there
            c.send_json({"id": 999, "cmd": "attach", "conn_id": 999})
            self.assertErrorReply(c.reply(), 999, "not_found")
            # unknown extra arguments are ignored
            c.send_json({"id": 1000, "cmd": "info", "extra": {"deep": [1, 2]}})
            self.assertTrue((c.reply() or {}).get("ok"))
        self.assertStillAnswers()

    def test_pipelined_truncated_and_abandoned(self) -> None:
        # requests in one write, good and bad: replies in request order
        with self.raw() as c:
            frames = [json.dumps({"id": n, "cmd": "info" if n % 2 else "frobnicate"}).encode() for n in range(1, 9)]
            c.send_raw(b"".join(struct.pack(">I", len(f)) + f for f in frames))
            replies = [c.reply() for _ in frames]
            self.assertEqual([(r or {}).get("id") for r in replies], list(range(1, 9)))
            self.assertEqual([(r or {}).get("ok") for r in replies], [n % 2 == 1 for n in range(1, 9)])
        # a frame cut short, then the connection closed; a connection that sends nothing
        with self.raw() as c:
            c.send_raw(struct.pack(">I", 100) + b'{"id": 1, "cmd": "in')
        with self.raw():
            pass
        # a client that closes before its reply is read, mid-ping
        with self.raw() as c:
            c.send_json({"id": 1, "cmd": "ping", "target": "0:0000.0000.0005", "count": 1, "timeout": 1})
        self.assertStillAnswers()
        # many connections at once
        conns = [self.raw() for _ in range(50)]
        try:
            for n, c in enumerate(conns):
                c.send_json({"id": n, "cmd": "info"})
            for n, c in enumerate(conns):
                self.assertEqual((c.reply() or {}).get("id"), n)
        finally:
            for c in conns:
                c.close()
        self.assertStillAnswers()
        self.assertEqual(self.node.ok("info")["hostname"], "agent-a")
        self.assertNotIn("Traceback", self.node.log())
        self.assertNotIn("Unhandled", self.node.log())


class DaemonStartTests(NodeTestMixin, SynchronousTestCase):
    def test_second_start(self) -> None:
        """A second ``daemon start`` on the same PILOT_HOME: already_exists; the first goes on."""
        rendezvous = self.start_rendezvous()
        [a] = self.start_nodes(rendezvous, "agent-a")
        pid = a.read_pid()
        for extra in ((), ("--foreground",)):
            error = a.fails("already_exists", "daemon", "start", *extra, timeout=20)
            self.assertIn("already running", error["message"])
            self.assertIn("daemon stop", error["hint"])
        result = a.run("daemon", "start", json_output=False)
        self.assertEqual((result.status, result.stdout), (5, ""), result.describe())
        self.assertTrue(result.stderr.startswith("error: the daemon is already running\nhint: "), result.stderr)
        self.assertEqual(a.read_pid(), pid)
        status = a.ok("daemon", "status")
        self.assertEqual((status["pid"], status["registry"]["state"]), (pid, "registered"))

    def test_corrupt_identity(self) -> None:
        """
        ``daemon start`` with an identity that cannot be read: a clear error
        naming the file, a non-zero exit, the file untouched, no daemon.  The
        code is ``malformed`` (13), as for ``--foreground`` and as
        docs/cli.md defines it ("a file could not be decoded").
        """
        node = self.make_node("agent-x", None)
        codes = []
        for content in (b'{"private_key": "garbage", ', b'{"private_key": "c2hvcnQ=", "public_key": 5}'):
            with open(node.identity_path, "wb") as f:
                f.write(content)
            digest = hashlib.sha256(content).hexdigest()
            for extra in ((), ("--foreground",)):
                result = node.start(*extra, json_output=True, timeout=30)
                self.assertNotEqual(result.status, 0, result.describe())
                self.assertEqual(result.stdout, "", result.describe())
                error = result.error
                self.assertIn(node.identity_path, error["message"], result.describe())
                self.assertIn("identity", error["message"])
                self.assertTrue(error["hint"])
                codes.append((content[:12], extra, result.status, error["code"]))
                with open(node.identity_path, "rb") as f:
                    self.assertEqual(hashlib.sha256(f.read()).hexdigest(), digest, "the identity was changed")
                self.assertFalse(os.path.exists(node.pid_path), node.describe())
                self.assertEqual(node.run("daemon", "status").status, 4)
            # init refuses it too, and leaves it alone
            error = node.fails("invalid_argument", "init")
            self.assertIn("--force", error["hint"])
            with open(node.identity_path, "rb") as f:
                self.assertEqual(hashlib.sha256(f.read()).hexdigest(), digest)
        # BUG: in the background (the default) the code is internal (10, "a bug"), not the
        # daemon's own malformed (13) that --foreground gives
        wrong = [f"daemon start {' '.join(extra) or '(background)'} with {content!r}...: exit status {status} {code}"
                 for content, extra, status, code in codes if code != "malformed"]
        self.assertEqual(wrong, [], "expected malformed (exit status 13):\n" + "\n".join(wrong))


class StopTests(NodeTestMixin, SynchronousTestCase):
    def test_stop_after_traffic(self) -> None:
        """
        ``daemon stop`` right after a ping: exit status 0, "stopped".  And
        what it relies on: after ``shutdown``, a request on a new connection
        is answered or finds no daemon (not_running).

        BUG: while the daemon stops it accepts control connections and then
        resets them (ECONNRESET: connection_failed), and ``daemon stop``,
        whose status poll treats only not_running as "stopped", fails with
        exit status 6 although the daemon does stop.
        """
        rendezvous = self.start_rendezvous()
        a, b = self.start_nodes(rendezvous, "agent-a", "agent-b")
        self.trust_each_other(a, b)
        stops = []
        for _ in range(2):
            a.ok("ping", "agent-b", "--count", "1")
            stops.append(a.stop(strict=False))
            a.started()

        # requests in flight when the daemon stops: four clients asking `info` as fast as they can
        a.ok("ping", "agent-b", "--count", "1")
        outcomes: list[str] = []
        done = threading.Event()

        def ask() -> None:
            deadline = time.monotonic() + 15.0
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    ControlClient(a.socket_path, 2.0).call("info")
                    outcomes.append("answered")
                except NotRunning:
                    done.set()
                except PilotError as e:
                    outcomes.append(f"{e.code.name}: {e.message}")

        clients = [threading.Thread(target=ask) for _ in range(4)]
        for t in clients:
            t.start()
        try:
            with ControlClient(a.socket_path, 5.0) as c:
                self.assertEqual(c.call("shutdown"), {"status": "stopping"})
        finally:
            for t in clients:
                t.join(20.0)
        self.assertTrue(done.is_set(), a.describe())
        self.assertIn("answered", outcomes)
        self.assertEqual([o for o in outcomes if o != "answered"], [])
        self.assertEqual([r.describe() for r in stops if r.status != 0], [])


class NewUserErrorTests(NodeTestMixin, SynchronousTestCase):
    """Issue 9: what a new user hits, as real processes."""

    def test_wrong_registry_is_registry_unavailable(self) -> None:
        """Nothing listens on --registry: exit 8 with the cause, soon; the daemon keeps retrying."""
        node = self.make_node("agent-x", None)  # its registry port has nobody listening
        started = time.monotonic()
        result = node.start(json_output=True, timeout=30)
        took = time.monotonic() - started
        self.assertEqual((result.status, result.stdout), (ErrorCode.registry_unavailable.value, ""),
                         result.describe())
        error = result.error
        self.assertEqual(error["code"], "registry_unavailable")
        self.assertIn("Connection refused", error["message"])
        self.assertIn(f"127.0.0.1:{node.registry_port}", error["message"])
        self.assertIn("keeps retrying", error["hint"])
        self.assertLess(took, 12.0, f"daemon start took {took:.1f} s to give up")
        self.assertTrue(node.ok("daemon", "status")["running"])  # left running, as the hint says

    def test_stale_files_after_a_crash(self) -> None:
        rendezvous = self.start_rendezvous()
        [a] = self.start_nodes(rendezvous, "agent-a")
        pid = a.read_pid()
        assert pid is not None
        os.kill(pid, 9)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}/status") or _zombie(pid), 10.0, "the daemon to die")
        self.assertTrue(os.path.exists(a.socket_path) and os.path.exists(a.pid_path))
        info = a.fails("not_running", "info")
        self.assertIn("nobody listens", info["message"])
        error = a.fails("not_running", "daemon", "stop")
        self.assertIn("removed", error["message"])
        self.assertFalse(os.path.exists(a.pid_path))
        self.assertFalse(os.path.exists(a.socket_path))
        self.assertIn("no control socket", a.fails("not_running", "info")["message"])
        a.started()  # and it starts again

    def test_twistd_second_daemon_is_one_line(self) -> None:
        rendezvous = self.start_rendezvous()
        [a] = self.start_nodes(rendezvous, "agent-a")
        for argv in (["-n", "--pidfile=", "pilot-node"], ["-n", "--pidfile=", "-y", "tac/node.tac"]):
            proc = self.spawn_python(TWISTD[1:] + argv, "twistd-node", env=dict(a.env, PILOT_LISTEN="127.0.0.1:0"))
            status = proc.wait(20)
            self.assertEqual(status, ErrorCode.already_exists.value, proc.describe())
            output = proc.stdout() + proc.stderr()
            self.assertNotIn("Traceback", output)
            [line] = [x for x in output.splitlines() if "error:" in x]
            self.assertIn("another daemon answers on", line)
            self.assertTrue(line.endswith("[already_exists]"), line)
        self.assertTrue(a.ok("daemon", "status")["running"])

    def test_unwritable_home(self) -> None:
        node = self.make_node("agent-y", None, init=False)
        home = os.path.join(node.identity_path, "below-a-file")  # a path through a file: no one can write it
        with open(node.identity_path, "w") as f:
            f.write("{}")
        env = dict(node.env, PILOT_HOME=home)
        for args in (("init",), ("daemon", "start", "--hostname", "my-agent")):
            result = node.run(*args, env=env)
            self.assertEqual((result.status, result.stdout), (ErrorCode.invalid_argument.value, ""),
                             result.describe())
            self.assertIn(home, result.error["message"])
            self.assertIn("PILOT_HOME", result.error["hint"])


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except OSError:
        return True
