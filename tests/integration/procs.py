"""
Real processes for integration tests: start them, find free loopback ports,
wait (always with a deadline) for a port, a line of output or an exit, and
make sure every process is killed when the test ends, pass or fail.

Everything binds and connects to 127.0.0.1 only.  Waits poll with short
sleeps and give up at a deadline with an error that includes the process's
output, so a failure says why.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence, TypeVar

#: The repository root: the folder holding ``pilot/`` and ``twisted/plugins/``.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOOPBACK = "127.0.0.1"

#: Seconds a process gets to start listening, and to exit after a signal.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
POLL = 0.02

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A bounded wait ran out."""


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str,
               details: Callable[[], str] = lambda: "") -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = details()
            raise WaitTimeout(f"gave up after {timeout:.1f} s waiting for {what}" + (f"\n{extra}" if extra else ""))
        time.sleep(POLL)


# --- ports ---------------------------------------------------------------------------------

def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free on 127.0.0.1 right now (for TCP, or UDP with ``socket.SOCK_DGRAM``)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_tcp_port() -> int:
    return free_port(socket.SOCK_STREAM)


def free_udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


def tcp_port_open(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# --- processes -------------------------------------------------------------------------------

def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child Python: the repository first on ``PYTHONPATH``, unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PILOT_LOG_FILE", None)
    if extra:
        env.update(extra)
    return env


def default_signals() -> None:
    """
    In the child, before exec: SIGINT and SIGTERM back to their default
    dispositions.  A suite started as a background job (``trial ... &`` from
    a script) has SIGINT ignored, and an ignored signal stays ignored across
    exec: Python then installs no KeyboardInterrupt handler, Twisted no
    SIGINT handler, and a test's SIGINT would do nothing.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Process:
    """
    A child process whose stdout and stderr go to files in ``folder`` (no
    pipes to fill up), with bounded waits on its output, ports and exit.
    """

    def __init__(self, argv: Sequence[str], folder: str, name: str, cwd: str = REPO,
                 env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.name = name
        os.makedirs(folder, exist_ok=True)
        self.stdout_path = os.path.join(folder, f"{name}.stdout")
        self.stderr_path = os.path.join(folder, f"{name}.stderr")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                          cwd=cwd, env=dict(env) if env is not None else python_env(),
                                          start_new_session=True, preexec_fn=default_signals)
        self.pid = self.popen.pid

    # output

    def stdout(self) -> str:
        return _read(self.stdout_path)

    def stderr(self) -> str:
        return _read(self.stderr_path)

    def describe(self) -> str:
        status = self.popen.poll()
        return (f"--- {self.name} ({' '.join(self.argv)}), "
                f"{'running' if status is None else f'exit status {status}'}\n"
                f"--- stdout:\n{self.stdout()[-4000:]}\n--- stderr:\n{self.stderr()[-4000:]}")

    def wait_for_output(self, pattern: str, timeout: float = START_TIMEOUT, stream: str = "stdout") -> re.Match[str]:
        """The first match of ``pattern`` in the process's stdout (or stderr); fails early if it exits."""
        regex = re.compile(pattern, re.MULTILINE)
        read = self.stdout if stream == "stdout" else self.stderr

        def found() -> re.Match[str] | None:
            m = regex.search(read())
            if m is None and self.popen.poll() is not None:
                m = regex.search(read())
                if m is None:
                    raise AssertionError(f"{self.name} exited before printing {pattern!r}\n{self.describe()}")
            return m

        return wait_until(found, timeout, f"{self.name} to print {pattern!r}", self.describe)

    def wait_for_event(self, log_format: str, timeout: float = START_TIMEOUT,
                       stream: str = "stdout") -> dict[str, Any]:
        """The first JSON log event (one object per line) whose ``log_format`` is ``log_format``."""
        read = self.stdout if stream == "stdout" else self.stderr

        def found() -> dict[str, Any] | None:
            exited = self.popen.poll() is not None
            for line in read().splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a line still being written
                if isinstance(event, dict) and event.get("log_format") == log_format:
                    return event
            if exited:
                raise AssertionError(f"{self.name} exited before logging {log_format!r}\n{self.describe()}")
            return None

        return wait_until(found, timeout, f"{self.name} to log {log_format!r}", self.describe)

    def wait_for_tcp(self, port: int, timeout: float = START_TIMEOUT) -> None:
        """Until 127.0.0.1:``port`` accepts connections; fails early if the process exits."""

        def up() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited before listening on {port}\n{self.describe()}")
            return tcp_port_open(port)

        wait_until(up, timeout, f"{self.name} to listen on TCP {port}", self.describe)

    # ending

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, signum: int) -> None:
        if self.running:
            self.popen.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit status (negative: killed by that signal); fails if it takes longer than ``timeout``."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(f"{self.name} did not exit within {timeout:.1f} s\n{self.describe()}") from None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``signum`` and wait for the exit."""
        self.send_signal(signum)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the process and anything in its session, and reap it.  Safe to call twice."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.popen.kill()
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


class ProcessTestMixin:
    """
    For ``twisted.trial.unittest.SynchronousTestCase`` subclasses: start
    processes that are killed at cleanup whatever happens, with their output
    attached to the failure.
    """

    def spawn(self, argv: Sequence[str], name: str, cwd: str = REPO,
              env: Mapping[str, str] | None = None) -> Process:
        folder = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        proc = Process(argv, folder, name, cwd=cwd, env=env)
        self.addCleanup(proc.kill)  # type: ignore[attr-defined]
        return proc

    def spawn_python(self, args: Sequence[str], name: str, cwd: str = REPO,
                     env: Mapping[str, str] | None = None) -> Process:
        """``sys.executable ARGS`` with the repository importable."""
        return self.spawn([sys.executable, *args], name, cwd=cwd, env=python_env(env))


# --- the rendezvous, three ways ------------------------------------------------------------------

#: ``twistd`` of this Python (Twisted's ``twistd`` script has no ``__main__``;
#: ``python -m twisted`` is ``twist``, a different runner).
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
TWIST = [sys.executable, "-m", "twisted"]
PILOTCTL = [sys.executable, "-m", "pilot"]

REGISTRY_LINE = r"Registry listening on 127\.0\.0\.1:(\d+) \((?:TCP|TLS)\)"
BEACON_LINE = r"Beacon listening on 127\.0\.0\.1:(\d+) \(UDP\)"
REGISTRY_EVENT = "Registry listening on {endpoint} ({kind})"
BEACON_EVENT = "Beacon listening on {endpoint} (UDP)"


def _port_of(endpoint: str) -> int:
    return int(endpoint.rpartition(":")[2])


class Rendezvous:
    """A running rendezvous process and the ports it bound."""

    def __init__(self, proc: Process, registry_port: int, beacon_port: int, store: str | None) -> None:
        self.proc = proc
        self.registry_port = registry_port
        self.beacon_port = beacon_port
        self.store = store


def rendezvous_args(store: str | None, extra: Sequence[str] = ()) -> list[str]:
    """Options for any of the start methods: loopback, port 0, the store (or none)."""
    args = ["--listen", f"{LOOPBACK}:0", "--beacon", f"{LOOPBACK}:0"]
    args += ["--store", store] if store else ["--no-store"]
    return args + list(extra)


def wait_for_rendezvous(proc: Process, store: str | None, stream: str = "stdout",
                        timeout: float = START_TIMEOUT, json_log: bool = False) -> Rendezvous:
    """
    Read the bound ports from the listening lines (printed, or logged as text
    or, with ``json_log``, as JSON events), then wait for the TCP port.
    """
    if json_log:
        registry = _port_of(proc.wait_for_event(REGISTRY_EVENT, timeout, stream)["endpoint"])
        beacon = _port_of(proc.wait_for_event(BEACON_EVENT, timeout, stream)["endpoint"])
    else:
        registry = int(proc.wait_for_output(REGISTRY_LINE, timeout, stream).group(1))
        beacon = int(proc.wait_for_output(BEACON_LINE, timeout, stream).group(1))
    proc.wait_for_tcp(registry, timeout)
    return Rendezvous(proc, registry, beacon, store)


class RendezvousTestMixin(ProcessTestMixin):
    def start_rendezvous(self, store: str | None = None, extra: Sequence[str] = (),
                         name: str = "rendezvous") -> Rendezvous:
        """``python -m pilot rendezvous start`` on loopback with free ports; waits until it listens."""
        proc = self.spawn_python(["-m", "pilot", "rendezvous", "start", *rendezvous_args(store, extra)], name)
        return wait_for_rendezvous(proc, store)
