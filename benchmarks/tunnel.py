#!/usr/bin/env python3
"""
Benchmark of the node-to-node path on 127.0.0.1: trust, ping, echo, throughput.

Starts a real rendezvous (``python -m pilot rendezvous start --no-store``) and
two real node daemons (``python -m pilot init`` + ``python -m pilot daemon
start``, each in a temporary PILOT_HOME, tunnel socket on 127.0.0.1), makes
them trust each other over their control sockets (``handshake`` on a, then
``approve`` on b as soon as the request is pending there) and measures:

* trust set-up: ``handshake`` sent on a -> both sides list each other in
  ``trust`` (polled on both control sockets every 2 ms);
* ping: the control socket's ``ping`` (a new stream to port 7 per ping, the
  reference pilotctl's ping, timed as it times it: from the dial to the whole
  echo), ``count=200, interval=0``, p50/p99; then 100 pings 0.12 s apart,
  which stay under the reference's SYN limit (10 new streams/s per node:
  past it a SYN is dropped and the dial waits the 1 s RTO; ours holds only
  untrusted nodes to it, docs/stack.md);
* echo RTT on one open stream: ``open_stream(b, 7)``, write 6 bytes, read the
  6 back, 1000 times (client-side wall time, so both Unix-socket hops of
  daemon a are included);
* single-connection throughput, one direction: a sink on b (the control
  socket's ``listen`` + ``attach``, drained by a thread here) and a stream
  from a (``open_stream``) carrying 20 MB; MB/s = payload bytes delivered to
  the sink / (first write -> last byte read); the bytes are checked (SHA-256);
* wire bytes per payload byte during that transfer, from the daemons' own
  tunnel counters (``info`` -> ``peer_list[].bytes_tx``: UDP payload bytes of
  the encrypted frames, both directions; IP+UDP headers added as 28 bytes per
  packet, from the stack's ``packets.sent``);
* the daemons' RSS (sampled every 100 ms, /proc) and CPU (utime+stime from
  /proc over the transfer), and the CPU the rest of the machine used meanwhile
  (/proc/stat): on a shared machine that says how far to trust the figures.

    python3 benchmarks/tunnel.py
    python3 benchmarks/tunnel.py --megabytes 200 --time-limit 120
    python3 benchmarks/tunnel.py --max-datagram 1400     # the datagrams a 1,500-byte path carries

Only 127.0.0.1 is ever used; every loop is bounded in count and in time; the
processes started are stopped at the end (SIGTERM, then SIGKILL), on error too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pilot.control_client import ControlClient  # noqa: E402
from procstat import cpu_seconds, pct, rss_mb, run_stoppable  # noqa: E402

HOST = "127.0.0.1"
START_TIMEOUT = 30.0   # seconds for a process to come up
STOP_TIMEOUT = 10.0    # seconds for a process to exit after SIGTERM
POLL = 0.002           # trust polling interval
ECHO_PAYLOAD = b"echo!\n"  # 6 bytes
CHUNK = 64 * 1024
PACED_INTERVAL = 0.12  # s between pings: under the reference's SYN limit (10/s per node)


class Failed(Exception):
    pass


# --- machine and processes ------------------------------------------------------------------

def machine() -> dict[str, str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import twisted
        tw = twisted.__version__
    except Exception:
        tw = "?"
    return {"cores": str(os.cpu_count()), "cpu": model, "python": sys.version.split()[0],
            "twisted": tw, "kernel": platform.release()}


def machine_busy_seconds() -> float:
    """CPU seconds spent by the whole machine (all cores, everything but idle and iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL: only this pid, which we started."""
    if not alive(pid):
        if proc is not None:
            proc.poll()
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return
        if proc is None and not alive(pid):
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc is not None:
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass


def child_env(home: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env.pop("PILOT_SOCKET", None)
    if home is not None:
        env["PILOT_HOME"] = home
    return env


class Rendezvous:
    def __init__(self, folder: str, extra_args: tuple[str, ...] = ()) -> None:
        self.folder = folder
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.registry = ""
        self.beacon = ""
        self.cmd: list[str] = []

    def start(self) -> None:
        self.cmd = [sys.executable, "-m", "pilot", "rendezvous", "start", "--listen", f"{HOST}:0",
                    "--beacon", f"{HOST}:0", "--no-store", "--json", "--log-level", "warn", *self.extra_args]
        with open(os.path.join(self.folder, "rendezvous.log"), "wb") as err:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=err,
                                         env=child_env(), cwd=ROOT)
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(START_TIMEOUT):
                raise Failed(f"the rendezvous printed nothing in {START_TIMEOUT:g} s: {' '.join(self.cmd)}")
        finally:
            sel.close()
        line = self.proc.stdout.readline()
        if not line:
            raise Failed("the rendezvous did not start: " + " ".join(self.cmd) + "\n" + self.log_tail())
        info = json.loads(line)
        self.registry = f"{HOST}:{str(info['registry']).rsplit(':', 1)[1]}"
        self.beacon = f"{HOST}:{str(info['beacon']).rsplit(':', 1)[1]}"

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.folder, "rendezvous.log"), "rb") as f:
                return f.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid, self.proc)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None


class Daemon:
    def __init__(self, name: str, home: str) -> None:
        self.name = name
        self.home = home
        self.pid: int | None = None
        self.node_id = 0
        self.address = ""
        self.client: ControlClient | None = None

    @property
    def socket_path(self) -> str:
        return os.path.join(self.home, "pilot.sock")

    def pilot(self, *args: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "pilot", "--json", *args]
        try:
            out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=child_env(self.home),
                                 cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Failed(f"{' '.join(args)} ({self.name}) took more than {timeout:g} s") from None
        if out.returncode != 0:
            raise Failed(f"`pilotctl {' '.join(args)}` ({self.name}) exited {out.returncode}: "
                         f"{out.stderr.decode('utf-8', 'replace').strip()[-1000:]}")
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def start(self, rendezvous: Rendezvous) -> None:
        self.pilot("init", "--hostname", self.name, "--registry", rendezvous.registry,
                   "--beacon", rendezvous.beacon)
        try:
            started = self.pilot("daemon", "start", "--listen", f"{HOST}:0", "--log-level", "warn",
                                 timeout=START_TIMEOUT + 15)
            self.pid = int(started["pid"])
        finally:
            if self.pid is None:
                self.pid = self._pid_from_file()
        self.client = ControlClient(self.socket_path, 30.0)
        info = self.client.call("info")
        if info.get("registry", {}).get("state") != "registered":
            raise Failed(f"{self.name} is not registered: {info.get('registry')}")
        self.node_id = int(info["node_id"])
        self.address = str(info["address"])

    def _pid_from_file(self) -> int | None:
        """The daemon's pid when `daemon start` failed after spawning it (it writes pilot.pid)."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                with open(os.path.join(self.home, "pilot.pid")) as f:
                    return int(f.read().strip())
            except (OSError, ValueError):
                time.sleep(0.05)
        return None

    def call(self, cmd: str, timeout: float | None = None, **args: Any) -> Any:
        assert self.client is not None
        return self.client.request(cmd, args, timeout=timeout)

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.home, "pilot.log"), "rb") as f:
                return f.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.pid is not None:
            stop_pid(self.pid)


# --- measurements ------------------------------------------------------------------------------

def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until ``predicate()``; the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() >= deadline:
            raise Failed(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(POLL)


def establish_trust(a: Daemon, b: Daemon) -> dict[str, float]:
    t0 = time.monotonic()
    sent = a.call("handshake", target=b.name, justification="benchmark")
    t_sent = time.monotonic()
    if sent.get("status") == "approved":
        raise Failed("the nodes trusted each other already")
    t_pending = wait_for(lambda: any(p.get("node_id") == a.node_id for p in b.call("pending")), 30,
                         f"{a.name}'s request to be pending on {b.name}")
    b.call("approve", node_id=a.node_id)
    t_b = wait_for(lambda: any(p.get("node_id") == a.node_id for p in b.call("trust")), 30,
                   f"{b.name} to trust {a.name}")
    t_a = wait_for(lambda: any(p.get("node_id") == b.node_id for p in a.call("trust")), 30,
                   f"{a.name} to trust {b.name}")
    t_both = max(t_a, t_b)
    return {"handshake_call": (t_sent - t0) * 1000, "to_pending": (t_pending - t0) * 1000,
            "approve_to_both": (t_both - t_pending) * 1000, "total": (t_both - t0) * 1000}


def ping(a: Daemon, b: Daemon, count: int, interval: float = 0.0) -> dict[str, Any]:
    before = b.call("info")["counters"]["stack"]
    t0 = time.monotonic()
    assert a.client is not None
    # "timeout" is the ping's own argument (seconds per ping); the reply may take count times that
    result = a.client.request("ping", {"target": b.name, "count": count, "timeout": 5.0,
                                       "interval": interval}, timeout=count * (5.0 + interval) + 30)
    wall = time.monotonic() - t0
    rtts = [float(r["rtt_ms"]) for r in result["results"] if "rtt_ms" in r]
    errors = [r["error"] for r in result["results"] if "error" in r]
    after = b.call("info")["counters"]["stack"]
    syn_dropped = int(after.get("dropped.syn_rate", 0)) - int(before.get("dropped.syn_rate", 0))
    return {"rtts": rtts, "errors": errors, "wall": wall, "count": count, "syn_dropped": syn_dropped}


def echo(a: Daemon, b: Daemon, count: int, limit: float) -> dict[str, Any]:
    assert a.client is not None
    sock = a.client.open_stream(b.name, 7, timeout=30.0)
    rtts: list[float] = []
    try:
        sock.settimeout(5.0)
        deadline = time.monotonic() + limit
        n = len(ECHO_PAYLOAD)
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            sock.sendall(ECHO_PAYLOAD)
            got = b""
            while len(got) < n:
                data = sock.recv(n - len(got))
                if not data:
                    raise Failed("the echo stream closed")
                got += data
            rtts.append((time.perf_counter() - t0) * 1000.0)
            if got != ECHO_PAYLOAD:
                raise Failed(f"port 7 answered {got!r}")
    finally:
        sock.close()
    return {"rtts": rtts, "count": count}


class Sampler(threading.Thread):
    """RSS of the given pids every 100 ms (the peak is kept), until stopped; bounded by ``limit`` s."""

    def __init__(self, pids: list[int], limit: float) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.limit = limit
        self.peak = {pid: 0.0 for pid in pids}
        self.samples = {pid: [] for pid in pids}  # type: dict[int, list[float]]
        self.halt = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.limit
        while not self.halt.is_set() and time.monotonic() < end:
            for pid in self.pids:
                try:
                    r = rss_mb(pid)
                except OSError:
                    continue
                self.samples[pid].append(r)
                self.peak[pid] = max(self.peak[pid], r)
            self.halt.wait(0.1)


class Sink(threading.Thread):
    """``listen`` on b's ``port``; attach the first accepted stream, read it to its end (or the deadline)."""

    def __init__(self, b: Daemon, port: int, deadline: float) -> None:
        super().__init__(daemon=True)
        self.client = ControlClient(b.socket_path, 30.0)
        self.subscription = self.client.subscribe("listen", deadline, port=port)  # bound once this returns
        self.deadline = deadline
        self.received = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.closed = False
        self.error: BaseException | None = None
        self.digest = hashlib.sha256()

    def run(self) -> None:
        try:
            for event in self.subscription:
                if event.get("event") == "accepted":
                    self.drain(self.client.attach(int(event["conn_id"])))
                    return
        except BaseException as e:  # reported by the main thread
            self.error = e
        finally:
            self.subscription.close()
            self.client.close()

    def drain(self, sock: socket.socket) -> None:
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        with sock:
            while True:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    return
                sock.settimeout(min(remaining, 0.5))
                try:
                    n = sock.recv_into(view)
                except socket.timeout:
                    continue
                if n == 0:
                    self.closed = True
                    return
                now = time.perf_counter()
                if self.first_at is None:
                    self.first_at = now
                self.last_at = now
                self.received += n
                self.digest.update(view[:n])


def peer_row(info: dict[str, Any], node_id: int) -> dict[str, Any]:
    for p in info.get("peer_list", []):
        if p.get("node_id") == node_id:
            return p  # type: ignore[no-any-return]
    return {}


def throughput(a: Daemon, b: Daemon, megabytes: float, limit: float, port: int) -> dict[str, Any]:
    assert a.client is not None and a.pid is not None and b.pid is not None
    total = int(megabytes * 1_000_000)
    deadline = time.monotonic() + limit
    sink = Sink(b, port, deadline + 10)
    info_a0, info_b0 = a.call("info"), b.call("info")
    sampler = Sampler([a.pid, b.pid, os.getpid()], limit + 20)
    cpu0 = {pid: cpu_seconds(pid) for pid in (a.pid, b.pid)}
    own0 = os.times()
    busy0 = machine_busy_seconds()
    sink.start()
    sampler.start()
    sock = a.client.open_stream(b.name, port, timeout=30.0)
    block = os.urandom(CHUNK)
    sent = 0
    digest = hashlib.sha256()
    t_start = time.perf_counter()
    wall0 = time.monotonic()
    timed_out = False
    try:
        sock.settimeout(0.5)
        while sent < total:
            if time.monotonic() >= deadline:
                timed_out = True
                break
            try:
                n = sock.send(block[:min(CHUNK, total - sent)])
            except socket.timeout:
                continue
            digest.update(block[:n])
            sent += n
        t_sent = time.perf_counter()
        sock.shutdown(socket.SHUT_WR)
        # wait for the sink to read what was sent (bounded)
        while sink.is_alive() and sink.received < sent and time.monotonic() < deadline + 10:
            time.sleep(0.005)
    finally:
        sock.close()
    wall = time.monotonic() - wall0
    cpu1 = {pid: cpu_seconds(pid) for pid in (a.pid, b.pid)}
    own1 = os.times()
    busy1 = machine_busy_seconds()
    sink.join(15)
    sampler.halt.set()
    sampler.join(2)
    if sink.error is not None:
        raise Failed(f"the sink failed: {sink.error}")
    info_a1, info_b1 = a.call("info"), b.call("info")
    pa0, pa1 = peer_row(info_a0, b.node_id), peer_row(info_a1, b.node_id)
    pb0, pb1 = peer_row(info_b0, a.node_id), peer_row(info_b1, a.node_id)

    def delta(row1: dict[str, Any], row0: dict[str, Any], key: str) -> int:
        return int(row1.get(key) or 0) - int(row0.get(key) or 0)

    def packets(i1: dict[str, Any], i0: dict[str, Any]) -> int:
        sent1, sent0 = i1["counters"]["stack"], i0["counters"]["stack"]
        return int(sent1.get("packets.sent", 0)) - int(sent0.get("packets.sent", 0))

    received = sink.received
    if received == sent and sink.digest.digest() != digest.digest():
        raise Failed("the sink received different bytes from those sent")
    own_cpu = (own1.user - own0.user) + (own1.system - own0.system)
    ours = sum(cpu1[pid] - cpu0[pid] for pid in cpu0) + own_cpu
    seconds = ((sink.last_at or t_start) - t_start) if received else float("nan")
    return {
        "requested": total, "sent": sent, "received": received, "timed_out": timed_out,
        "seconds": seconds, "send_seconds": t_sent - t_start, "wall": wall,
        "a_to_b_wire": delta(pa1, pa0, "bytes_tx"), "b_to_a_wire": delta(pb1, pb0, "bytes_tx"),
        "b_rx_wire": delta(pb1, pb0, "bytes_rx"),
        "a_packets": packets(info_a1, info_a0), "b_packets": packets(info_b1, info_b0),
        "path": pa1.get("path"),
        "mtu": pa1.get("mtu"), "mss": pa1.get("mss"),
        "cpu": {pid: (cpu1[pid] - cpu0[pid]) / wall * 100.0 for pid in cpu0},
        "cpu_seconds": {pid: cpu1[pid] - cpu0[pid] for pid in cpu0},
        "own_cpu": own_cpu / wall * 100.0,
        "others_cpu": max(0.0, (busy1 - busy0) - ours) / wall * 100.0,
        "intact": received == sent,
        "rss_peak": dict(sampler.peak),
        "rss_before": {pid: (sampler.samples[pid][0] if sampler.samples[pid] else float("nan"))
                       for pid in sampler.pids},
    }


# --- report ---------------------------------------------------------------------------------------

def row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<44} {value:>16}   {note}".rstrip())


def run(args: argparse.Namespace) -> int:
    tmp = tempfile.mkdtemp(prefix="pilot-tb-")
    rendezvous = Rendezvous(tmp)
    a = Daemon("bench-a", os.path.join(tmp, "a"))
    b = Daemon("bench-b", os.path.join(tmp, "b"))
    m = machine()
    print(f"pilot tunnel benchmark: {' '.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}")
    print(f"  machine: {m['cores']} cores, {m['cpu']}, Linux {m['kernel']}, "
          f"Python {m['python']}, Twisted {m['twisted']}; load average {loadavg()}")
    try:
        t0 = time.monotonic()
        rendezvous.start()
        a.start(rendezvous)
        b.start(rendezvous)
        assert a.pid is not None and b.pid is not None
        print(f"  rendezvous {rendezvous.registry} (beacon {rendezvous.beacon}), "
              f"bench-a {a.address} pid {a.pid}, bench-b {b.address} pid {b.pid} "
              f"(up in {time.monotonic() - t0:.2f} s)")
        idle = {a.pid: rss_mb(a.pid), b.pid: rss_mb(b.pid)}

        trust = establish_trust(a, b)
        first = ping(a, b, 1)
        time.sleep(1.1)  # a SYN bucket of the reference's size (10/s, burst 10) would refill
        p = ping(a, b, args.pings)
        time.sleep(1.1)
        paced = ping(a, b, args.paced_pings, PACED_INTERVAL)
        e = echo(a, b, args.echoes, 60.0)
        t = throughput(a, b, args.megabytes, args.time_limit, args.port)

        print()
        print(f"  {'measure':<44} {'value':>16}   notes")
        print(f"  {'-' * 44} {'-' * 16}   {'-' * 40}")
        row("trust set-up (handshake -> both trusted)", f"{trust['total']:.1f} ms",
            f"request pending on b after {trust['to_pending']:.1f} ms; approve -> both trusted "
            f"{trust['approve_to_both']:.1f} ms")
        fr = first["rtts"][0] if first["rtts"] else float("nan")
        row("first ping after trust", f"{fr:.3f} ms",
            f"{first['wall'] * 1000:.1f} ms wall through the control socket")
        for label, run in (("interval 0", p), (f"interval {PACED_INTERVAL:g} s", paced)):
            rt = run["rtts"]
            row(f"ping RTT p50, {label} ({len(rt)}/{run['count']} answered)", f"{pct(rt, 50):.3f} ms",
                "daemon-measured like the reference: dial -> whole echo, a new stream to port 7 each")
            row(f"ping RTT p99, {label}", f"{pct(rt, 99):.3f} ms",
                f"min {min(rt, default=float('nan')):.3f}, max {max(rt, default=float('nan')):.3f} ms; "
                f"{run['syn_dropped']} SYNs dropped by b's SYN rate limit (1 s RTO each); "
                f"{run['wall']:.1f} s in all"
                + (f"; {len(run['errors'])} errors: {run['errors'][0]}" if run["errors"] else ""))
        er = e["rtts"]
        row(f"echo RTT p50, open stream ({len(er)} x 6 B)", f"{pct(er, 50):.3f} ms",
            "client wall time: unix socket -> a -> tunnel -> b:7 and back")
        row("echo RTT p99", f"{pct(er, 99):.3f} ms", f"mean {sum(er) / max(len(er), 1):.3f} ms")
        mbps = t["received"] / 1e6 / t["seconds"] if t["received"] else 0.0
        row("throughput, one stream a -> b sink", f"{mbps:.2f} MB/s",
            f"{t['received'] / 1e6:.1f} of {t['requested'] / 1e6:.0f} MB in {t['seconds']:.2f} s"
            + (" (time limit hit)" if t["timed_out"] else "")
            + f"; path {t['path']}, datagrams up to {t.get('mtu')} B (segments {t.get('mss')} B); MB = 10^6 B"
            + ("; SHA-256 checked" if t["intact"] else "; INCOMPLETE"))
        payload = max(t["received"], 1)
        udp = t["a_to_b_wire"] + t["b_to_a_wire"]
        pkts = t["a_packets"] + t["b_packets"]
        row("wire/payload, UDP payload bytes both ways", f"{udp / payload:.4f}",
            f"a->b {t['a_to_b_wire'] / payload:.4f} (data), b->a {t['b_to_a_wire'] / payload:.4f} (acks)")
        row("wire/payload, with IP+UDP headers", f"{(udp + 28 * pkts) / payload:.4f}",
            f"{t['a_packets']} packets a->b, {t['b_packets']} b->a "
            f"({t['received'] / max(t['a_packets'], 1):.0f} payload B per data packet)")
        for name, pid in (("a (sender)", a.pid), ("b (receiver)", b.pid)):
            row(f"daemon {name} CPU during the transfer", f"{t['cpu'][pid]:.0f} %",
                "of one core (utime+stime / wall)")
            per_packet = t["cpu_seconds"][pid] / max(t["a_packets"], 1) * 1e6
            row(f"daemon {name} CPU per data packet", f"{per_packet:.1f} us",
                f"utime+stime / {t['a_packets']} packets a->b (its ACKs and the control socket included): "
                "the figure a busy machine changes least")
            row(f"daemon {name} RSS idle / peak", f"{idle[pid]:.1f} / {t['rss_peak'][pid]:.1f} MB",
                "VmRSS, sampled every 100 ms")
        row("benchmark client CPU during the transfer", f"{t['own_cpu']:.0f} %",
            "sender + sink thread (shares the cores)")
        row("other processes' CPU during the transfer", f"{t['others_cpu']:.0f} %",
            f"of one core (/proc/stat busy minus ours); load average now {loadavg()}")
        return 0
    except Failed as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        for d in (a, b):
            tail = d.log_tail()
            if tail:
                print(f"--- {d.name} log (tail):\n{tail}", file=sys.stderr)
        tail = rendezvous.log_tail()
        if tail:
            print(f"--- rendezvous log (tail):\n{tail}", file=sys.stderr)
        return 1
    finally:
        # a second Ctrl-C or SIGTERM must not cut the clean-up short (it is bounded: STOP_TIMEOUT each)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for d in (a, b):
            try:
                d.stop()
            except Exception as e:  # keep stopping the others
                print(f"stopping {d.name}: {e}", file=sys.stderr)
        rendezvous.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pings", type=int, default=200, help="pings (control socket `ping`, interval 0)")
    p.add_argument("--paced-pings", type=int, default=100,
                   help=f"pings {PACED_INTERVAL:g} s apart (under the peer's SYN rate limit)")
    p.add_argument("--echoes", type=int, default=1000, help="6-byte echoes on one open stream")
    p.add_argument("--megabytes", type=float, default=20.0, help="MB (10^6 B) sent on one stream")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds the transfer may take at most")
    p.add_argument("--port", type=int, default=1000, help="b's sink port")
    p.add_argument("--max-datagram", type=int, default=None,
                   help="bound the daemons' path search (UDP payload; 1400: a 1,500-byte path's "
                        "datagrams), through PILOT_MAX_DATAGRAM in their environment")
    args = p.parse_args()
    if args.max_datagram is not None:
        if not 1200 <= args.max_datagram <= 65507:
            raise SystemExit("--max-datagram 1200..65507")
        os.environ["PILOT_MAX_DATAGRAM"] = str(args.max_datagram)  # child_env() copies it
    if not (1 <= args.pings <= 1000 and 1 <= args.paced_pings <= 1000 and 1 <= args.echoes <= 100_000
            and 0 < args.megabytes <= 1000 and 1 <= args.time_limit <= 600 and 1 <= args.port <= 65535
            and args.port != 7):
        raise SystemExit("--pings 1..1000, --paced-pings 1..1000, --echoes 1..100000, "
                         "--megabytes up to 1000, --time-limit 1..600, --port 1..65535 (not 7)")

    run_stoppable(run, args)


if __name__ == "__main__":
    main()
