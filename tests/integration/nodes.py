"""
Node daemons as real processes, for integration tests: a ``PILOT_HOME`` per
node, ``pilotctl init``, ``pilotctl daemon start`` (which puts the daemon in
the background, as a user runs it), pilotctl commands with ``--json`` parsed,
and a cleanup that always ends the daemon, pass or fail: ``daemon stop``,
then SIGKILL of the pid in ``$PILOT_HOME/pilot.pid`` (and of every pid this
node's daemon ever had).

Everything binds and connects to 127.0.0.1 only.  Every pilotctl run has a
deadline (a run that outlives it is killed and fails the test with its
output); waits poll with short sleeps (``procs.wait_until``).

``PILOT_HOME`` is a short folder under the system temp directory, not the
trial temp folder: a Unix socket path is limited to 107 bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

from pilot.control_client import ControlClient
from pilot.errors import ErrorCode

from tests.integration.procs import (
    LOOPBACK, STOP_TIMEOUT, Process, Rendezvous, RendezvousTestMixin, WaitTimeout, free_tcp_port, free_udp_port,
    python_env, wait_until,
)

PILOTCTL = [sys.executable, "-m", "pilot"]
#: Seconds a pilotctl command may take unless the caller says otherwise.
CTL_TIMEOUT = 30.0
#: The keys of every error pilotctl prints with --json.
ERROR_KEYS = {"code", "message", "hint"}


class CtlResult:
    """One finished pilotctl run."""

    def __init__(self, argv: Sequence[str], status: int, stdout: str, stderr: str, elapsed: float) -> None:
        self.argv = list(argv)
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        self.elapsed = elapsed

    @property
    def json(self) -> Any:
        """stdout as the one line of JSON ``--json`` prints."""
        lines = self.stdout.splitlines()
        if len(lines) != 1:
            raise AssertionError(f"expected one line of JSON on stdout\n{self.describe()}")
        return json.loads(lines[0])

    @property
    def error(self) -> dict[str, Any]:
        """The ``{"error": {...}}`` line of stderr (``--json``), checked for its shape."""
        found = []
        for line in self.stderr.splitlines():
            if line.startswith("{"):
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if isinstance(value, dict) and set(value) == {"error"}:
                    found.append(value["error"])
        if len(found) != 1:
            raise AssertionError(f"expected one JSON error line on stderr, found {len(found)}\n{self.describe()}")
        error: dict[str, Any] = found[0]
        if set(error) != ERROR_KEYS or not all(isinstance(error[k], str) for k in ERROR_KEYS):
            raise AssertionError(f"the error is not {{code, message, hint}} strings: {error!r}\n{self.describe()}")
        return error

    def describe(self) -> str:
        return (f"--- $ {' '.join(self.argv[2:])}  (exit status {self.status}, {self.elapsed:.2f} s)\n"
                f"--- stdout:\n{self.stdout[-3000:]}\n--- stderr:\n{self.stderr[-3000:]}")


class Node:
    """One node: its ``PILOT_HOME``, its settings, and pilotctl run against it."""

    def __init__(self, name: str, home: str, rendezvous: Rendezvous | None) -> None:
        self.name = name
        self.hostname = name
        self.home = home
        # without a rendezvous: ports nothing listens on (for daemons that must not get that far)
        self.registry_port = rendezvous.registry_port if rendezvous else free_tcp_port()
        self.beacon_port = rendezvous.beacon_port if rendezvous else free_udp_port()
        self.env = python_env({"PILOT_HOME": home})
        for variable in list(self.env):
            if variable.startswith("PILOT_") and variable != "PILOT_HOME":
                del self.env[variable]
        # from init
        self.address = ""
        self.node_id = 0
        self.public_key = ""
        self.pids: set[int] = set()

    # paths

    @property
    def socket_path(self) -> str:
        return os.path.join(self.home, "pilot.sock")

    @property
    def pid_path(self) -> str:
        return os.path.join(self.home, "pilot.pid")

    @property
    def log_path(self) -> str:
        return os.path.join(self.home, "pilot.log")

    @property
    def identity_path(self) -> str:
        return os.path.join(self.home, "identity.json")

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        return f"--- {self.name} ({self.home}) pilot.log, last lines:\n" + "\n".join(self.log().splitlines()[-40:])

    # pilotctl

    def run(self, *args: str, timeout: float = CTL_TIMEOUT, json_output: bool = True,
            env: dict[str, str] | None = None) -> CtlResult:
        """``pilotctl [--json] ARGS`` for this node; killed (and failed) past ``timeout`` seconds."""
        argv = PILOTCTL + (["--json"] if json_output else []) + list(args)
        started = time.monotonic()
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                                  env=env if env is not None else self.env, start_new_session=True)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode("utf-8", "replace")
            err = (e.stderr or b"").decode("utf-8", "replace")
            raise WaitTimeout(f"pilotctl {' '.join(args)} did not finish within {timeout:.1f} s\n"
                              f"--- stdout:\n{out}\n--- stderr:\n{err}\n{self.describe()}") from None
        result = CtlResult(argv, done.returncode, done.stdout.decode("utf-8", "replace"),
                           done.stderr.decode("utf-8", "replace"), time.monotonic() - started)
        if "Traceback" in result.stdout + result.stderr:
            raise AssertionError(f"pilotctl printed a traceback\n{result.describe()}")
        return result

    def ok(self, *args: str, timeout: float = CTL_TIMEOUT) -> Any:
        """``pilotctl --json ARGS``, which must succeed; its parsed result."""
        result = self.run(*args, timeout=timeout)
        if result.status != 0:
            raise AssertionError(f"pilotctl {' '.join(args)} failed on {self.name}\n"
                                 f"{result.describe()}\n{self.describe()}")
        return result.json

    def text(self, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """``pilotctl ARGS`` without --json, which must succeed; its stdout."""
        result = self.run(*args, timeout=timeout, json_output=False)
        if result.status != 0:
            raise AssertionError(f"pilotctl {' '.join(args)} failed on {self.name}\n"
                                 f"{result.describe()}\n{self.describe()}")
        return result.stdout

    def fails(self, code: str, *args: str, timeout: float = CTL_TIMEOUT) -> dict[str, Any]:
        """``pilotctl --json ARGS``, which must fail with ``code``: exit status, no stdout, the error shape."""
        result = self.run(*args, timeout=timeout)
        expected = ErrorCode[code].value
        if result.status != expected or result.stdout != "":
            raise AssertionError(f"expected {code} (exit status {expected}) from pilotctl {' '.join(args)} "
                                 f"on {self.name}\n{result.describe()}\n{self.describe()}")
        error = result.error
        if error["code"] != code or not error["message"]:
            raise AssertionError(f"expected the error code {code!r}: {error!r}\n{result.describe()}")
        return error

    def client(self, timeout: float = 5.0) -> ControlClient:
        """A control-socket client of this node's daemon, for fast polling."""
        return ControlClient(self.socket_path, timeout)

    def call(self, cmd: str, timeout: float = 5.0, **args: Any) -> Any:
        with self.client(timeout) as c:
            return c.call(cmd, **args)

    # lifecycle

    def init(self, *extra: str) -> dict[str, Any]:
        """``pilotctl --json init`` with this node's hostname and the rendezvous's ports."""
        result = self.ok("init", "--hostname", self.hostname,
                         "--registry", f"{LOOPBACK}:{self.registry_port}",
                         "--beacon", f"{LOOPBACK}:{self.beacon_port}", *extra)
        self.address = result["address"]
        self.node_id = result["node_id"]
        self.public_key = result["public_key"]
        return result  # type: ignore[no-any-return]

    def start(self, *extra: str, json_output: bool = False, timeout: float = 30.0) -> CtlResult:
        """``pilotctl daemon start`` (in the background), always on 127.0.0.1; the result, not checked."""
        if not any(a == "--listen" for a in extra):
            extra = ("--listen", f"{LOOPBACK}:0", *extra)
        result = self.run("daemon", "start", *extra, timeout=timeout, json_output=json_output)
        self.remember_pid()
        return result

    def started(self, *extra: str) -> str:
        """``daemon start``, which must print ``Registered as NAME (ADDRESS)``; stdout."""
        result = self.start(*extra)
        if result.status != 0 or not result.stdout.startswith("Registered as "):
            raise AssertionError(f"{self.name} did not start and register\n{result.describe()}\n{self.describe()}")
        return result.stdout

    def remember_pid(self) -> int | None:
        pid = self.read_pid()
        if pid is not None:
            self.pids.add(pid)
        return pid

    def read_pid(self) -> int | None:
        try:
            with open(self.pid_path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def info(self) -> dict[str, Any]:
        return self.call("info")  # type: ignore[no-any-return]

    def stop(self, strict: bool = True) -> CtlResult:
        """
        ``pilotctl daemon stop``, which must succeed, and the process gone.

        ``strict=False`` also accepts the known failure of ``daemon stop``
        whose status poll races the daemon's shutdown (exit status 6,
        "the daemon closed the control connection"), for tests about
        something else; the process must be gone all the same.
        """
        pids = set(self.pids)
        result = self.run("daemon", "stop")
        raced = (not strict and result.status == ErrorCode.connection_failed.value
                 and "closed the control connection" in result.stderr)
        if result.status != 0 and not raced:
            raise AssertionError(f"pilotctl daemon stop failed on {self.name}\n"
                                 f"{result.describe()}\n{self.describe()}")
        wait_until(lambda: not any(_is_daemon(pid, self.home) for pid in pids), STOP_TIMEOUT,
                   f"{self.name}'s daemon to exit", self.describe)
        return result

    def kill(self) -> None:
        """
        Cleanup: ``daemon stop`` if a socket is there, then SIGKILL whatever
        is left: the pid in ``pilot.pid``, every pid seen before, and any
        daemon process whose ``PILOT_HOME`` is this node's (one whose pid file
        was never written).  Never raises.
        """
        pid = self.read_pid()
        if pid is not None:
            self.pids.add(pid)
        if os.path.exists(self.socket_path):
            try:
                subprocess.run(PILOTCTL + ["daemon", "stop"], stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=STOP_TIMEOUT, env=self.env)
            except (subprocess.TimeoutExpired, OSError):
                pass
        self.pids |= _daemons_of(self.home)
        for pid in self.pids:
            if _is_daemon(pid, self.home):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(_is_daemon(pid, self.home) for pid in self.pids) and time.monotonic() < deadline:
            time.sleep(0.02)


def _is_daemon(pid: int, home: str | None = None) -> bool:
    """
    Is ``pid`` a running (not zombie) pilot daemon, of ``PILOT_HOME`` ``home``
    if given?  Never kill a recycled pid.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
        if home is not None:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"PILOT_HOME={home}".encode() not in f.read().split(b"\0"):
                    return False
    except (OSError, IndexError):
        return False
    return state != b"Z" and b"pilot" in cmdline and b"daemon" in cmdline


def _daemons_of(home: str) -> set[int]:
    """The pids of running pilot daemons whose ``PILOT_HOME`` is ``home``."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _is_daemon(int(entry), home):
            found.add(int(entry))
    return found


class NodeTestMixin(RendezvousTestMixin):
    """
    For ``SynchronousTestCase`` subclasses: nodes whose daemons are always
    ended at cleanup, and the rendezvous they use.
    """

    def make_node(self, name: str, rendezvous: Rendezvous | None, init: bool = True) -> Node:
        home = tempfile.mkdtemp(prefix=f"pn-{name}-")
        os.chmod(home, 0o700)
        node = Node(name, home, rendezvous)
        self.addCleanup(shutil.rmtree, home, True)  # type: ignore[attr-defined]
        self.addCleanup(node.kill)  # type: ignore[attr-defined]  # runs first
        if init:
            node.init()
        return node

    def spawn_ctl(self, node: Node, *args: str, json_output: bool = True) -> Process:
        """``pilotctl [--json] ARGS`` for ``node`` in the background (``recv``, ``listen``); killed at cleanup."""
        name = "-".join([node.name, *args[:2]])
        return self.spawn(PILOTCTL + (["--json"] if json_output else []) + list(args), name,
                          env=node.env)  # type: ignore[attr-defined]

    def start_nodes(self, rendezvous: Rendezvous, *names: str) -> list[Node]:
        """Nodes made, initialised and started (daemon start prints Registered)."""
        nodes = [self.make_node(name, rendezvous) for name in names]
        for node in nodes:
            node.started()
        return nodes

    def trust_each_other(self, asker: Node, approver: Node) -> None:
        """``asker`` handshakes, ``approver`` approves, both list each other (bounded waits)."""
        asker.ok("handshake", approver.hostname, "integration test")
        wait_until(lambda: _ids(approver.call("pending")) & {asker.node_id}, 5.0,
                   f"{asker.name}'s request in {approver.name}'s pending", approver.describe)
        approver.ok("approve", str(asker.node_id))
        for node, other in ((asker, approver), (approver, asker)):
            wait_until(lambda: _ids(node.call("trust")) & {other.node_id}, 5.0,
                       f"{other.name} in {node.name}'s trust", node.describe)

    def measure(self, predicate: Callable[[], Any], timeout: float, what: str,
                details: Callable[[], str] = lambda: "") -> float:
        """Seconds until ``predicate`` holds (polling); fails past ``timeout``."""
        started = time.monotonic()
        wait_until(predicate, timeout, what, details)
        return time.monotonic() - started


def _ids(rows: Any) -> set[int]:
    return {row.get("node_id") for row in rows} if isinstance(rows, list) else set()


ids = _ids


# --- the control socket, raw ----------------------------------------------------------------

class RawControl:
    """A plain Unix-socket connection to a daemon's control socket, for bad input."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, body: bytes) -> None:
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def send_json(self, value: Any) -> None:
        self.send_frame(json.dumps(value).encode("utf-8"))

    def reply(self) -> dict[str, Any] | None:
        """The next frame, or None if the daemon closed the connection (raises on timeout)."""
        while True:
            if len(self.buffer) >= 4:
                (length,) = struct.unpack(">I", self.buffer[:4])
                if len(self.buffer) >= 4 + length:
                    body, self.buffer = self.buffer[4:4 + length], self.buffer[4 + length:]
                    value: dict[str, Any] = json.loads(body)
                    return value
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.buffer += data

    def closed(self) -> bool:
        """Does the daemon close the connection (after any replies)?"""
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return True
            if not data:
                return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawControl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
