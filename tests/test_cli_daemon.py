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
import socket
import subprocess
import sys
import tempfile
import time
import unittest
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

    def test_status_shows_the_term(self) -> None:
        """A rendezvous pair's term (docs/registration.md, "A list of servers")."""
        self.daemon({**self.INFO, "registry": {"server": "127.0.0.1:9100", "state": "registered", "term": 2}})
        ran = Ran(["daemon", "status"])
        self.assertEqual(ran.status, 0, ran.stderr)
        self.assertIn("registry 127.0.0.1:9100 registered (term 2)", ran.stdout)

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


class FakePopen:
    """A daemon process that stays up (``poll`` is None); records its argv."""

    started: list[list[str]] = []

    def __init__(self, argv: list[str], **kwargs: Any) -> None:
        FakePopen.started.append(argv)
        self.pid = 4242
        self.returncode = None

    def poll(self) -> None:
        return None


class StartingDaemon(FakeDaemon):
    """Not running until started; then answers ``info`` with ``registry``."""

    def __init__(self, registry: dict[str, Any]) -> None:
        super().__init__(None)
        self.registry = registry

    def call(self, cmd: str, **args: Any) -> Any:
        if not FakePopen.started:
            raise NotRunning("no control socket")
        return {**DaemonTests.INFO, "registry": self.registry}


class BackgroundStartTests(HomeTestCase):
    """``daemon start`` without ``--foreground``, its child process faked."""

    def start(self, registry: dict[str, Any], *argv: str) -> Ran:
        FakePopen.started = []
        self.patch(subprocess, "Popen", FakePopen)
        self.patch(time, "sleep", lambda seconds: None)
        self.patch(cli_daemon, "_client", StartingDaemon(registry).client)
        return Ran(["--json", "daemon", "start", *argv])

    def test_registered(self) -> None:
        ran = self.start({"server": "127.0.0.1:9000", "state": "registered"})
        self.assertEqual(ran.status, 0, ran.stderr)
        self.assertEqual(json.loads(ran.stdout)["pid"], 4242)

    def test_unreachable_registry_is_an_error(self) -> None:
        # issue 9 item 3: this used to exit 0 with "not registered yet: no answer yet"
        ran = self.start({"server": "127.0.0.1:9999", "state": "waiting", "consecutive_failures": 3,
                          "last_error": "Connection was refused by other side: 111: Connection refused."},
                         "--registry", "127.0.0.1:9999")
        self.assertEqual(ran.status, int(ErrorCode.registry_unavailable), ran.stderr)
        self.assertEqual(ran.stdout, "")
        error = ran.json_error()
        self.assertEqual(error["code"], "registry_unavailable")
        self.assertIn("127.0.0.1:9999", error["message"])
        self.assertIn("Connection refused", error["message"])
        self.assertIn("pid 4242", error["message"])
        self.assertIn("keeps retrying", error["hint"])
        self.assertIn("daemon stop", error["hint"])

    def test_a_list_waits_as_many_attempts_per_entry(self) -> None:
        """Three failures with two rendezvous entries: the second is still to be tried (docs/cli.md)."""
        answers = [{"server": "127.0.0.1:9998", "state": "waiting", "consecutive_failures": n} for n in (3, 4, 5)]
        answers.append({"server": "127.0.0.1:9999", "state": "registered", "consecutive_failures": 0})
        daemon = StartingDaemon(answers[0])
        FakePopen.started = []
        self.patch(subprocess, "Popen", FakePopen)
        self.patch(time, "sleep", lambda seconds: setattr(daemon, "registry", answers.pop(0)))
        self.patch(cli_daemon, "_client", daemon.client)
        ran = Ran(["--json", "daemon", "start", "--registry", "127.0.0.1:9998,127.0.0.1:9999"])
        self.assertEqual(ran.status, 0, ran.stderr)
        self.assertEqual(json.loads(ran.stdout)["registry"]["server"], "127.0.0.1:9999")

    def test_a_list_gives_up_after_every_entry_failed_thrice(self) -> None:
        ran = self.start({"server": "127.0.0.1:9999", "state": "waiting", "consecutive_failures": 6,
                          "last_error": "Connection refused"}, "--registry", "127.0.0.1:9998,127.0.0.1:9999")
        self.assertEqual(ran.status, int(ErrorCode.registry_unavailable), ran.stderr)
        self.assertIn("127.0.0.1:9998,127.0.0.1:9999", ran.json_error()["message"])

    def test_no_answer_within_the_wait(self) -> None:
        ran = self.start({"server": "127.0.0.1:9000", "state": "registering"}, "--wait", "0.01")
        self.assertEqual(ran.status, int(ErrorCode.registry_unavailable), ran.stderr)
        self.assertIn("no answer in", ran.json_error()["message"])

    def test_hostname_kept_for_the_next_plain_start(self) -> None:
        # issue 9 item 5: the first article's first command, without init
        self.start({"server": "127.0.0.1:9000", "state": "registered"}, "--hostname", "my-agent")
        self.assertEqual(cli_daemon.load_settings({}).hostname, "my-agent")
        with open(os.path.join(self.home, "config.json")) as f:
            self.assertEqual(json.load(f), {"hostname": "my-agent"})
        self.assertTrue(os.path.exists(os.path.join(self.home, "identity.json")))

    def test_registry_kept_beside_init_settings(self) -> None:
        self.assertEqual(Ran(["init", "--hostname", "sensor-1"]).status, 0)
        self.start({"server": "127.0.0.1:9000", "state": "registered"}, "--registry", "127.0.0.1:9000")
        with open(os.path.join(self.home, "config.json")) as f:
            self.assertEqual(json.load(f), {"hostname": "sensor-1", "registry": "127.0.0.1:9000"})


class UnusableHomeTests(SynchronousTestCase):
    """issue 9 item 4: a PILOT_HOME that cannot be written is a coded error naming the path, not internal."""

    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="pilot-cli-home-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.afile = os.path.join(self.base, "a-file")
        with open(self.afile, "w") as f:
            f.write("not a directory\n")

    def use_home(self, home: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PILOT_")}
        self.patch(os, "environ", {**env, "PILOT_HOME": home})

    def assertNamesThePath(self, argv: list[str], path: str,
                           code: ErrorCode = ErrorCode.invalid_argument) -> None:
        ran = Ran(["--json", *argv])
        self.assertEqual(ran.status, int(code), ran.stderr)
        error = ran.json_error()
        self.assertEqual(error["code"], code.name)
        self.assertIn(path, error["message"])
        self.assertIn("PILOT_HOME", error["hint"])

    def test_home_under_a_file(self) -> None:
        home = os.path.join(self.afile, "pilot")
        self.use_home(home)
        self.assertNamesThePath(["init"], home)

    def test_permission_denied(self) -> None:
        # the tests may run as root, for whom modes do not deny: the refusal is simulated
        home = os.path.join(self.base, "locked")
        self.use_home(home)

        def refuse(path: str, *args: Any, **kwargs: Any) -> None:
            raise PermissionError(13, "Permission denied", path)

        self.patch(os, "makedirs", refuse)
        self.assertNamesThePath(["init"], home, ErrorCode.permission_denied)
        ran = Ran(["init"])
        self.assertEqual(ran.stderr.splitlines()[0], f"error: cannot use {home}: Permission denied")
        self.assertEqual(ran.status, 14)
        self.assertNamesThePath(["daemon", "start", "--hostname", "my-agent"], home, ErrorCode.permission_denied)


class StaleFilesTests(HomeTestCase):
    """issue 9 item 7: ``daemon stop`` after a crash removes the pid file and socket it left."""

    def leave(self, pid: int) -> tuple[str, str]:
        pid_path = os.path.join(self.home, "pilot.pid")
        with open(pid_path, "w") as f:
            f.write(f"{pid}\n")
        sock_path = os.path.join(self.home, "pilot.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(sock_path)
        stale.close()  # the file stays; nothing listens: what a killed daemon leaves
        return pid_path, sock_path

    def dead_pid(self) -> int:
        proc = subprocess.Popen([sys.executable, "-c", ""])
        proc.wait()
        return proc.pid

    def test_removed_after_a_crash(self) -> None:
        pid_path, sock_path = self.leave(self.dead_pid())
        ran = Ran(["--json", "daemon", "stop"])
        self.assertEqual(ran.status, int(ErrorCode.not_running), ran.stderr)
        message = ran.json_error()["message"]
        self.assertIn(pid_path, message)
        self.assertIn(sock_path, message)
        self.assertFalse(os.path.exists(pid_path))
        self.assertFalse(os.path.exists(sock_path))

    def test_a_zombie_is_not_alive(self) -> None:
        # a killed daemon whose parent never reaps it (a container's init) stays a zombie
        if not hasattr(os, "waitid"):
            raise unittest.SkipTest("needs os.waitid")
        proc = subprocess.Popen([sys.executable, "-c", ""])
        self.addCleanup(proc.wait)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # it has exited; it is not reaped
        self.assertFalse(cli_daemon._alive(proc.pid))
        pid_path, sock_path = self.leave(proc.pid)
        self.assertEqual(Ran(["--json", "daemon", "stop"]).status, int(ErrorCode.not_running))
        self.assertFalse(os.path.exists(pid_path))
        self.assertFalse(os.path.exists(sock_path))

    def test_kept_while_the_pid_lives(self) -> None:
        pid_path, sock_path = self.leave(os.getpid())
        ran = Ran(["--json", "daemon", "stop"])
        self.assertEqual(ran.status, int(ErrorCode.not_running), ran.stderr)
        self.assertTrue(os.path.exists(pid_path))
        self.assertTrue(os.path.exists(sock_path))

    def test_not_a_socket_is_not_removed(self) -> None:
        path = os.path.join(self.home, "pilot.sock")
        with open(path, "w") as f:
            f.write("mine")
        ran = Ran(["--json", "daemon", "stop"])
        self.assertEqual(ran.status, int(ErrorCode.not_running), ran.stderr)
        self.assertTrue(os.path.exists(path))
