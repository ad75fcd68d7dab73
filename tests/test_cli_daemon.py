"""
pilotctl ``init`` and ``daemon start|stop|status`` (pilot.cli_daemon) in-process:
the identity and its saved settings in a temporary PILOT_HOME, and the daemon
commands against a fake control client (no daemon process is started here;
tests/integration/test_node_process.py starts real ones).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot import cli_daemon
from pilot.errors import ErrorCode, NotRunning
from tests.test_cli import Ran


class FakeDaemon:
    """Stands in for the control client of a running daemon; records its calls."""

    def __init__(self, info: dict[str, Any] | None) -> None:
        self.info = info
        self.calls: list[tuple[str, str]] = []

    def client(self, socket_path: str, timeout: float = 5.0) -> FakeDaemon:
        return self

    def call(self, cmd: str, **args: Any) -> Any:
        self.calls.append((cmd, json.dumps(args)))
        if self.info is None:
            raise NotRunning("no control socket")
        if cmd == "shutdown":
            self.info = None
            return {"status": "stopping"}
        return self.info


class HomeTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = tempfile.mkdtemp(prefix="pilot-cli-daemon-")
        self.addCleanup(shutil.rmtree, self.home, True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PILOT_")}
        self.patch(os, "environ", {**env, "PILOT_HOME": self.home})

    def run_json(self, argv: list[str]) -> Any:
        ran = Ran(["--json", *argv])
        self.assertEqual(ran.status, 0, ran.stderr)
        return json.loads(ran.stdout)

    def daemon(self, info: dict[str, Any] | None) -> FakeDaemon:
        fake = FakeDaemon(info)
        self.patch(cli_daemon, "_client", fake.client)
        return fake


class InitTests(HomeTestCase):
    def test_creates_once(self) -> None:
        first = self.run_json(["init"])
        path = os.path.join(self.home, "identity.json")
        self.assertEqual((first["identity"], first["created"]), (path, True))
        self.assertEqual(os.stat(self.home).st_mode & 0o777, 0o700)
        again = self.run_json(["init"])
        self.assertEqual((again["created"], again["public_key"], again["address"]),
                         (False, first["public_key"], first["address"]))

    def test_force_is_a_new_key(self) -> None:
        first = self.run_json(["init"])
        forced = self.run_json(["init", "--force"])
        self.assertTrue(forced["created"])
        self.assertNotEqual(forced["public_key"], first["public_key"])

    def test_settings_are_saved(self) -> None:
        data = self.run_json(["init", "--hostname", "agent-a", "--registry", "127.0.0.1:9000"])
        self.assertEqual(data["hostname"], "agent-a")
        with open(os.path.join(self.home, "config.json")) as f:
            self.assertEqual(json.load(f), {"hostname": "agent-a", "registry": "127.0.0.1:9000"})

    def test_human(self) -> None:
        ran = Ran(["init"])
        self.assertEqual(ran.status, 0, ran.stderr)
        self.assertIn("Identity created: ", ran.stdout)
        self.assertIn("Virtual address: ", ran.stdout)

    def test_unusable_identity(self) -> None:
        with open(os.path.join(self.home, "identity.json"), "w") as f:
            f.write("not json")
        ran = Ran(["--json", "init"])
        self.assertEqual(ran.status, int(ErrorCode.invalid_argument), ran.stderr)
        self.assertIn("--force", ran.json_error()["hint"])


class DaemonTests(HomeTestCase):
    INFO = {"node_id": 5, "address": "0:0000.0000.0005", "hostname": "agent-a", "uptime_secs": 3,
            "registry": {"server": "127.0.0.1:9000", "state": "registered"}}

    def test_status_not_running(self) -> None:
        self.daemon(None)
        ran = Ran(["--json", "daemon", "status"])
        self.assertEqual(ran.status, int(ErrorCode.not_running))
        self.assertEqual(ran.json_error()["code"], "not_running")

    def test_status_running(self) -> None:
        fake = self.daemon(dict(self.INFO))
        with open(os.path.join(self.home, "pilot.pid"), "w") as f:
            f.write("4242\n")
        ran = Ran(["daemon", "status"])
        self.assertEqual(ran.status, 0, ran.stderr)
        self.assertEqual(ran.stdout.strip(), "Daemon running (pid 4242): agent-a 0:0000.0000.0005, "
                                             "registry 127.0.0.1:9000 registered")
        self.assertEqual(fake.calls, [("info", "{}")])

    def test_start_refuses_a_second_daemon(self) -> None:
        self.daemon(dict(self.INFO))
        ran = Ran(["--json", "daemon", "start"])
        self.assertEqual(ran.status, int(ErrorCode.already_exists), ran.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.home, "identity.json")))

    def test_stop(self) -> None:
        fake = self.daemon(dict(self.INFO))
        self.assertEqual(self.run_json(["daemon", "stop"]), {"status": "stopped", "pid": None})
        self.assertEqual(fake.calls[0], ("shutdown", "{}"))

    def test_stop_not_running(self) -> None:
        self.daemon(None)
        ran = Ran(["--json", "daemon", "stop"])
        self.assertEqual(ran.status, int(ErrorCode.not_running))


class HelperTests(HomeTestCase):
    def test_log_tail_from_this_start(self) -> None:
        path = os.path.join(self.home, "pilot.log")
        with open(path, "w") as f:
            f.write("old run\n")
            start = f.tell()
            f.write("one\ntwo\nthree\n")
        self.assertEqual(cli_daemon._log_tail(path, start), "one | two | three")
        self.assertEqual(cli_daemon._log_tail(path, start, lines=1), "three")
        self.assertEqual(cli_daemon._log_tail(os.path.join(self.home, "missing")), "(no log)")

    def test_pid_file(self) -> None:
        path = os.path.join(self.home, "pid")
        self.assertIsNone(cli_daemon._read_pid(path))
        with open(path, "w") as f:
            f.write("garbage")
        self.assertIsNone(cli_daemon._read_pid(path))
        self.assertTrue(cli_daemon._alive(os.getpid()))
