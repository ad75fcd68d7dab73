"""
The real programs inside the lab's namespaces, started the way users start
them, and the measurements the NAT tests make with them.

* :class:`Rendezvous`: ``ip netns exec NS python -m pilot rendezvous start
  --listen IP:9000 --beacon IP:9001 --no-store`` on the rendezvous host.
* :class:`Node`: ``ip netns exec NS env PILOT_HOME=... python -m pilot
  daemon start --registry IP:9000 --beacon IP:9001 --hostname NAME`` (the
  background daemon; its log is ``$PILOT_HOME/pilot.log``).  pilotctl then
  talks to it from outside the namespace through its Unix control socket (the
  file system is shared): :meth:`Node.ctl` runs ``python -m pilot --json ...``
  and returns the parsed output and exit status.
* :func:`trust_pair`, :func:`first_ping`, :func:`echo_transfer`: handshake
  and approve; the time to the first answered ping; a byte-exact echo of
  N bytes through port 7 over a stream opened with the control client
  (``pilot.control_client.ControlClient.open_stream``, what ``pilotctl connect``
  uses).
* :func:`stream_transfer`: N bytes one way into a sink on the other node,
  as ``benchmarks/tunnel.py`` measures on 127.0.0.1 (an echo carries every
  byte both ways through both daemons: about three times the CPU per MiB,
  so its speed is not the path's; docs/performance.md).

Every wait has a deadline; nothing here raises on a failed measurement
without saying what was seen (the node's ``info`` counters and log tail are
in :meth:`Node.evidence`).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

from twisted.trial.unittest import SkipTest

from pilot.control_client import ControlClient
from pilot.errors import PilotError

from tests.integration.procs import REPO, python_env
from tests.natlab.topology import Host, Lab, require_lab

REGISTRY_PORT = 9000
BEACON_PORT = 9001
PYTHON = sys.executable
PILOT = [PYTHON, "-m", "pilot"]
ECHO_PORT = 7
#: Log levels (``--log-level``) of the nodes and the rendezvous; the rendezvous at
#: debug logs every datagram its beacon refuses, and why.
NODE_LOG_LEVEL = os.environ.get("NATLAB_NODE_LOG_LEVEL", "info")
RENDEZVOUS_LOG_LEVEL = os.environ.get("NATLAB_RENDEZVOUS_LOG_LEVEL", "debug")


class CtlResult:
    """One pilotctl run: exit status, the parsed ``--json`` value or error, stderr, duration."""

    def __init__(self, argv: Sequence[str], rc: int, stdout: str, stderr: str, seconds: float) -> None:
        self.argv = list(argv)
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.seconds = seconds
        self.data: Any = None
        self.error: dict[str, Any] = {}
        if rc == 0:
            try:
                self.data = json.loads(stdout) if stdout.strip() else None
            except ValueError:
                self.data = None
        else:
            for line in stderr.splitlines():
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if isinstance(value, dict) and isinstance(value.get("error"), dict):
                    self.error = value["error"]
                    break

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def code(self) -> str | None:
        return self.error.get("code") if self.error else None

    def __repr__(self) -> str:
        shown = " ".join(self.argv[2:])
        if self.ok:
            return f"<pilotctl {shown}: ok in {self.seconds:.2f} s: {self.stdout.strip()[:300]}>"
        return f"<pilotctl {shown}: exit {self.rc} in {self.seconds:.2f} s: {self.stderr.strip()[-500:]}>"


class Rendezvous:
    """The rendezvous process on the lab's rendezvous host (registry TCP 9000, beacon UDP 9001)."""

    def __init__(self, lab: Lab, host: Host, extra: Sequence[str] = ()) -> None:
        self.lab = lab
        self.host = host
        self.extra = list(extra)
        self.registry = f"{host.ip}:{REGISTRY_PORT}"
        self.beacon = f"{host.ip}:{BEACON_PORT}"
        self.proc: Any = None
        self.starts = 0

    def start(self, timeout: float = 20.0) -> "Rendezvous":
        self.starts += 1
        argv = [*PILOT, "rendezvous", "start", "--listen", self.registry, "--beacon", self.beacon,
                "--no-store",
                # Every lab node behind one router registers from one address; the lab makes
                # dozens of fresh identities a minute, so the per-IP registration limit is off.
                "--registrations-per-minute", "0", "--log-level", RENDEZVOUS_LOG_LEVEL, *self.extra]
        self.proc = self.lab.spawn(self.host, argv, f"rendezvous-{self.starts}")
        self.proc.wait_for_output(r"^Beacon listening on .*\(UDP\)", timeout)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.running

    def stop(self, timeout: float = 15.0) -> int:
        return int(self.proc.stop(signal.SIGTERM, timeout))

    def log(self) -> str:
        return self.proc.stderr() if self.proc is not None else ""

    def log_tail(self, lines: int = 40, grep: str | None = None) -> str:
        text = self.log().splitlines()
        if grep is not None:
            text = [line for line in text if grep in line]
        return "\n".join(text[-lines:])


class Node:
    """One node daemon on a lab host, with its own ``PILOT_HOME``."""

    def __init__(self, lab: Lab, host: Host, name: str, rendezvous: Rendezvous,
                 home: str | None = None, extra: Sequence[str] = ()) -> None:
        self.lab = lab
        self.host = host
        self.name = name
        self.rendezvous = rendezvous
        # short: the control socket path must fit a sockaddr_un (108 bytes)
        self.home = home or os.path.join(lab.workdir, "n", name)
        self.extra = list(extra)
        self.socket = os.path.join(self.home, "pilot.sock")
        self.log_path = os.path.join(self.home, "pilot.log")
        self.pid: int | None = None
        self.address: str | None = None
        self.node_id: int | None = None
        self.started: CtlResult | None = None
        if len(self.socket.encode()) > 100:
            raise ValueError(f"control socket path too long for a Unix socket: {self.socket}")

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.node_id} on {self.host.name} ({self.host.kind})>"

    # --- starting and stopping ---------------------------------------------------------------------

    def start(self, wait: float = 20.0) -> "Node":
        """``pilotctl daemon start`` inside the host's namespace; waits for the registration."""
        os.makedirs(self.home, mode=0o700, exist_ok=True)
        argv = ["ip", "netns", "exec", self.host.ns, *PILOT, "--json", "daemon", "start",
                "--registry", self.rendezvous.registry, "--beacon", self.rendezvous.beacon,
                "--hostname", self.name, "--log-level", NODE_LOG_LEVEL, "--wait", f"{wait:g}", *self.extra]
        result = _run(argv, env=self._env(), timeout=wait + 15)
        self.started = result
        if result.ok and isinstance(result.data, dict) and result.data.get("pid"):
            self.pid = int(result.data["pid"])
            self.lab.adopt(self.pid, self.host, self.name)
            self.address = result.data.get("address")
            self.node_id = result.data.get("node_id")
        else:
            self._adopt_from_pidfile()
            raise AssertionError(f"{self.name}: daemon start failed: {result!r}\n{self.log_tail()}")
        registry = (result.data.get("registry") or {}) if isinstance(result.data, dict) else {}
        if registry.get("state") != "registered":
            raise AssertionError(f"{self.name}: started but not registered: {result!r}\n{self.log_tail()}")
        return self

    def _adopt_from_pidfile(self) -> None:
        try:
            with open(os.path.join(self.home, "pilot.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return
        self.pid = pid
        self.lab.adopt(pid, self.host, self.name)

    def stop(self) -> CtlResult:
        """``pilotctl daemon stop`` (it deregisters); SIGTERM by PID if that fails."""
        result = self.ctl("daemon", "stop", timeout=20)
        if not result.ok and self.pid is not None:
            try:
                self.lab.kill_adopted(self.pid)
            except Exception:
                pass
        return result

    @property
    def running(self) -> bool:
        return self.pid is not None and self.lab.namespace_of(self.pid) == self.host.ns

    # --- pilotctl ---------------------------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 30.0) -> CtlResult:
        """``python -m pilot --json ARGS`` against this node's socket (from outside the namespace)."""
        return _run([*PILOT, "--json", *args], env=self._env(), timeout=timeout)

    def _env(self) -> dict[str, str]:
        return {"PILOT_HOME": self.home, "PILOT_SOCKET": self.socket}

    def ctl_ok(self, *args: str, timeout: float = 30.0) -> Any:
        result = self.ctl(*args, timeout=timeout)
        if not result.ok:
            raise AssertionError(f"{self.name}: {result!r}")
        return result.data

    def client(self, timeout: float = 10.0) -> ControlClient:
        return ControlClient(self.socket, timeout)

    def call(self, cmd: str, args: dict[str, Any] | None = None, wait: float = 10.0) -> Any:
        """One control-socket request (no pilotctl process: for tight polling)."""
        c = self.client(wait)
        try:
            return c.request(cmd, args or {}, timeout=wait)
        finally:
            c.close()

    def info(self) -> dict[str, Any]:
        try:
            value = self.call("info")
        except (PilotError, OSError) as e:
            return {"error": str(e)}
        return value if isinstance(value, dict) else {}

    def peers(self) -> list[dict[str, Any]]:
        try:
            value = self.call("peers")
        except (PilotError, OSError):
            return []
        return value if isinstance(value, list) else []

    def peer_row(self, other: "Node") -> dict[str, Any] | None:
        """This node's ``peers`` row for ``other`` (``path``, ``tunnel``, ``endpoint``...), or None."""
        for row in self.peers():
            if row.get("node_id") == other.node_id:
                return row
        return None

    def counters(self) -> dict[str, Any]:
        return self.info().get("counters") or {}

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def evidence(self, other: "Node | None" = None, log_lines: int = 25) -> str:
        """What to attach to a failure: the peer row, info counters, the log tail."""
        info = self.info()
        parts = [f"=== {self.name} ({self.host.kind}, host {self.host.ip}, node {self.node_id}, "
                 f"endpoint {info.get('endpoint')}, home {self.home})"]
        if other is not None:
            parts.append(f"peers row for {other.name}: {json.dumps(self.peer_row(other))}")
        parts.append(f"counters: {json.dumps(info.get('counters'), sort_keys=True)}")
        parts.append(f"registry: {json.dumps(info.get('registry'), sort_keys=True)}")
        parts.append(f"--- {self.log_path} (last {log_lines} lines)\n{self.log_tail(log_lines)}")
        return "\n".join(parts)


def _run(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 30.0,
         input: bytes | None = None) -> CtlResult:
    start = time.monotonic()
    try:
        r = subprocess.run(list(argv), capture_output=True, timeout=timeout, cwd=REPO, env=python_env(env),
                           input=input)
        rc, out, err = r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")
    except subprocess.TimeoutExpired as e:
        rc, out = -1, (e.stdout or b"").decode("utf-8", "replace")
        err = (e.stderr or b"").decode("utf-8", "replace") + f"\n(natlab: killed after {timeout:g} s)"
    return CtlResult(argv, rc, out, err, time.monotonic() - start)


def start_nodes(nodes: Sequence[Node]) -> None:
    """Start several nodes at once (each ``daemon start`` waits for its registration)."""
    errors: list[BaseException] = []

    def one(node: Node) -> None:
        try:
            node.start()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]


def stop_nodes(nodes: Sequence[Node]) -> None:
    threads = [threading.Thread(target=n.stop, daemon=True) for n in nodes if n.pid is not None]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


# --- measurements -----------------------------------------------------------------------------------

def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """``predicate()``'s first truthy value, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def trust_pair(a: Node, b: Node, timeout: float = 20.0) -> float:
    """
    ``a`` asks (``pilotctl handshake B``), ``b`` approves (``pilotctl approve
    A``) once the request is pending; returns the seconds from the handshake
    command until both nodes list the other as trusted.  (Polling goes through
    the control socket, so the figure is not mostly pilotctl's start-up time.)
    """
    start = time.monotonic()
    a.ctl_ok("handshake", b.name, "natlab")

    def listed(node: Node, cmd: str, other: Node) -> bool:
        try:
            rows = node.call(cmd)
        except PilotError:
            return False
        return any(isinstance(r, dict) and r.get("node_id") == other.node_id for r in rows or [])

    if not wait_for(lambda: listed(b, "pending", a), timeout, 0.05):
        raise AssertionError(f"{a.name}'s handshake never reached {b.name} in {timeout:g} s\n"
                             f"{a.evidence(b)}\n{b.evidence(a)}")
    b.ctl_ok("approve", str(a.node_id))
    left = max(1.0, timeout - (time.monotonic() - start))
    if not wait_for(lambda: listed(a, "trust", b) and listed(b, "trust", a), left, 0.05):
        raise AssertionError(f"{a.name} and {b.name} do not trust each other {timeout:g} s after the "
                             f"handshake\n"
                             f"{a.name} trust: {a.ctl('trust')!r}\n{b.name} trust: {b.ctl('trust')!r}\n"
                             f"{a.evidence(b)}\n{b.evidence(a)}")
    return time.monotonic() - start


class PingOutcome:
    def __init__(self) -> None:
        self.seconds: float | None = None    # to the first answer, from the first try
        self.rtt_ms: float | None = None
        self.tries = 0
        self.errors: list[str] = []

    @property
    def ok(self) -> bool:
        return self.seconds is not None


def first_ping(a: Node, target: str, deadline: float = 20.0, per_try: float = 2.0) -> PingOutcome:
    """
    Ping ``target`` from ``a`` (one echo per try, over the control socket, as
    ``pilotctl ping --count 1`` does) until one is answered or ``deadline``
    seconds pass; the time from the first try to that answer.
    """
    out = PingOutcome()
    start = time.monotonic()
    end = start + deadline
    while time.monotonic() < end:
        out.tries += 1
        wait = max(0.2, min(per_try, end - time.monotonic()))
        try:
            reply = a.call("ping", {"target": target, "count": 1, "timeout": wait, "interval": 0}, wait + 10)
        except PilotError as e:
            out.errors.append(f"{e.code.name}: {e}")
            time.sleep(0.2)
            continue
        results = reply.get("results") or [] if isinstance(reply, dict) else []
        answered = [r for r in results if "rtt_ms" in r]
        if answered:
            out.seconds = time.monotonic() - start
            out.rtt_ms = float(answered[0]["rtt_ms"])
            return out
        out.errors.extend(str(r.get("error")) for r in results if r.get("error"))
    return out


def ping_once(a: Node, target: str, timeout: float = 2.0) -> bool:
    try:
        reply = a.call("ping", {"target": target, "count": 1, "timeout": timeout, "interval": 0},
                       timeout + 10)
    except PilotError:
        return False
    return isinstance(reply, dict) and any("rtt_ms" in r for r in reply.get("results") or [])


class TransferOutcome:
    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        self.received = 0
        self.exact = False
        self.seconds: float | None = None
        self.error: str | None = None
        self.first_difference: int | None = None
        #: Both daemons' CPU seconds over the transfer (stream_transfer), None if not measured.
        self.cpu_seconds: float | None = None

    @property
    def mib_per_s(self) -> float | None:
        if not self.exact or not self.seconds:
            return None
        return self.size / self.seconds / (1 << 20)

    @property
    def cpu_ms_per_mib(self) -> float | None:
        """Both daemons' CPU milliseconds per MiB carried (None without a CPU figure)."""
        if self.cpu_seconds is None or not self.received:
            return None
        return self.cpu_seconds * 1000.0 / (self.received / (1 << 20))

    def __repr__(self) -> str:
        state = "byte-exact" if self.exact else f"NOT exact (first difference at {self.first_difference})"
        return (f"<echo {self.size} bytes: sent {self.sent}, received {self.received}, {state}, "
                f"{self.seconds if self.seconds is None else round(self.seconds, 2)} s, error {self.error}>")


def echo_transfer(a: Node, target: str, size: int = 1 << 20, timeout: float = 60.0,
                  seed: bytes | None = None, rate: float | None = None) -> TransferOutcome:
    """
    Send ``size`` random bytes to ``target``'s echo port (7) over one stream
    and read the echo back at the same time; byte-exact if what came back is
    what was sent.  ``rate`` (bytes/s): send no faster (a transfer that
    spans a path switch).
    """
    out = TransferOutcome(size)
    data = os.urandom(size) if seed is None else (hashlib.sha256(seed).digest() * (size // 32 + 1))[:size]
    start = time.monotonic()
    try:
        sock = a.client(timeout).open_stream(target, ECHO_PORT, timeout=timeout)
    except PilotError as e:
        out.error = f"connect: {e}"
        return out
    received = bytearray()
    failures: list[str] = []

    def writer() -> None:
        view = memoryview(data)
        try:
            while out.sent < size:
                if rate:
                    ahead = out.sent / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(min(ahead, 0.5))
                        continue
                n = sock.send(view[out.sent:out.sent + (16384 if rate else 65536)])
                out.sent += n
        except OSError as e:
            failures.append(f"send: {e}")

    thread = threading.Thread(target=writer, name="natlab-echo-writer", daemon=True)
    thread.start()
    end = start + timeout
    try:
        while len(received) < size and time.monotonic() < end:
            ready, _, _ = select.select([sock], [], [], 0.25)
            if not ready:
                continue
            try:
                chunk = sock.recv(65536)
            except OSError as e:
                failures.append(f"recv: {e}")
                break
            if not chunk:
                failures.append("the stream closed early")
                break
            received += chunk
    finally:
        out.seconds = time.monotonic() - start
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        thread.join(2)
    out.received = len(received)
    out.exact = bytes(received) == data
    if not out.exact:
        n = min(len(received), size)
        out.first_difference = next((i for i in range(n) if received[i] != data[i]), n)
        if len(received) < size and not failures:
            failures.append(f"timed out after {timeout:g} s")
    out.error = "; ".join(failures) or None
    return out


def daemon_cpu_seconds(pid: int | None) -> float:
    """A process's user + system CPU seconds (``/proc/PID/stat``), 0.0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stream_transfer(a: Node, b: Node, size: int = 1 << 20, timeout: float = 60.0,
                    port: int = 5000) -> TransferOutcome:
    """
    One direction, as ``benchmarks/tunnel.py`` measures on 127.0.0.1: a
    sink on ``b`` (the control socket's ``listen`` on ``port`` and
    ``attach``, read by a thread here) and ``size`` bytes written from ``a``
    over one stream; exact if the sink read as many bytes with the same
    SHA-256.  ``seconds`` runs from the first write to the last byte read;
    ``cpu_seconds`` is both daemons' CPU over the transfer (what a busy
    machine changes least: :attr:`TransferOutcome.cpu_ms_per_mib`).
    """
    out = TransferOutcome(size)
    block = os.urandom(65536)
    deadline = time.monotonic() + timeout
    listener = b.client(timeout)
    try:
        subscription = listener.subscribe("listen", deadline + 5, port=port)
    except PilotError as e:
        listener.close()
        out.error = f"listen: {e}"
        return out
    digest, sent_digest = hashlib.sha256(), hashlib.sha256()
    failures: list[str] = []
    last = [0.0]

    def sink() -> None:
        try:
            for event in subscription:
                if event.get("event") != "accepted":
                    continue
                with listener.attach(int(event["conn_id"])) as sock:
                    buf = bytearray(262144)
                    while time.monotonic() < deadline:
                        sock.settimeout(0.5)
                        try:
                            n = sock.recv_into(buf)
                        except socket.timeout:
                            continue
                        if not n:
                            return
                        out.received += n
                        digest.update(memoryview(buf)[:n])
                        last[0] = time.monotonic()
                return
        except (PilotError, OSError) as e:
            failures.append(f"sink: {e}")
        finally:
            subscription.close()
            listener.close()

    thread = threading.Thread(target=sink, name="natlab-stream-sink", daemon=True)
    thread.start()
    cpu0 = daemon_cpu_seconds(a.pid) + daemon_cpu_seconds(b.pid)
    start = time.monotonic()
    try:
        sock = a.client(timeout).open_stream(b.name, port, timeout=timeout)
    except PilotError as e:
        out.error = f"connect: {e}"
        thread.join(1)
        return out
    try:
        sock.settimeout(0.5)
        while out.sent < size and time.monotonic() < deadline:
            piece = block[:min(len(block), size - out.sent)]
            try:
                n = sock.send(piece)
            except socket.timeout:
                continue
            sent_digest.update(piece[:n])
            out.sent += n
        sock.shutdown(socket.SHUT_WR)
        thread.join(max(0.0, deadline - time.monotonic()) + 1)
    except OSError as e:
        failures.append(f"send: {e}")
    finally:
        sock.close()
    out.cpu_seconds = daemon_cpu_seconds(a.pid) + daemon_cpu_seconds(b.pid) - cpu0
    out.seconds = (last[0] or time.monotonic()) - start
    out.exact = out.sent == size and out.received == size and digest.digest() == sent_digest.digest()
    if not out.exact and not failures:
        failures.append(f"timed out after {timeout:g} s" if out.received < size else "different bytes")
    out.error = "; ".join(failures) or None
    return out


def module_lab(cache: list[Any], make: Callable[[], Any]) -> Any:
    """
    The one lab a test module shares (``make()`` builds it, with a
    ``.lab`` and a ``.rendezvous``), removed at exit; skipped once the lab
    was torn down by an interruption, and the rendezvous restarted if a test
    stopped it.
    """
    require_lab()
    if not cache:
        cache.append(make())
        atexit.register(cache[0].lab.close)
    if cache[0].lab.closed:
        raise SkipTest("the NAT lab was removed (interrupted)")
    if not cache[0].rendezvous.running:
        cache[0].rendezvous.start()
    return cache[0]
