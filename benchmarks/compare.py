#!/usr/bin/env python3
"""
The same workload against our nodes and the reference's, in one run, with
the ratios (issue 11, item 5).

Ours: a rendezvous and two node daemons as ``benchmarks/tunnel.py`` starts
them, driven through our control socket (``pilot/control_client.py``).
Reference: when ``PILOT_REFERENCE_BIN`` names a folder holding the
reference's ``rendezvous``, ``daemon`` and ``pilotctl``, its rendezvous and
two of its daemons, every address pinned to 127.0.0.1 (registry, beacon,
tunnel socket; ``HOME`` a fresh folder), made to trust each other with its
pilotctl and driven through its daemon's IPC socket
(``docs/reference-wire.md`` section 6: Dial, Send, Recv, Close, Bind,
Accept).  Without the variable the reference column is empty and says why.

The workload, the same on both sides, driven from this process:

* **ping**: ``--pings`` times, back to back, what the reference's pilotctl
  ping does: dial port 7, write ``ping-N``, read the echo, close; timed
  from the dial to the whole echo (the client's wall time, IPC included).
  Ours sends ``ping-N`` behind the connect request (``open_stream(first=)``),
  the reference's IPC writes it once the dial is answered;
* **echo**: ``--echoes`` round trips of 6 bytes on one open stream to port 7;
* **throughput**: ``--megabytes`` MB (10^6 B) on one stream to a sink bound
  on the other node (our ``listen`` + ``attach``; the reference's Bind +
  Accept), from the first byte written to the last byte read; checked
  with SHA-256 on both sides;
* **100 concurrent streams**: ``--concurrent`` dials to port 7 sent at once,
  then 1 KiB echoed on each; the time until all are open, and until every
  echo is back.

    python3 benchmarks/compare.py
    PILOT_REFERENCE_BIN=/path/to/reference/bin python3 benchmarks/compare.py

Only 127.0.0.1 is used; every wait is bounded; every process started is
stopped at the end (SIGTERM, then SIGKILL), on error too.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Protocol

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from many_streams import read_frame, unix_connect  # noqa: E402
from procstat import pct, run_stoppable  # noqa: E402
from tunnel import (  # noqa: E402
    HOST, ROOT, Daemon, Failed, Rendezvous, Sink, establish_trust, loadavg, machine, stop_pid, wait_for,
)

from pilot.wire.registry import encode_frame  # noqa: E402

VARIABLE = "PILOT_REFERENCE_BIN"
BINARIES = ("daemon", "pilotctl", "rendezvous")
CHUNK = 64 * 1024
SINK_PORT = 1000
TRUST_TIMEOUT = 90.0  # a reference registry hands a relayed handshake over when a node polls (30 s)


class Stream(Protocol):
    def send(self, data: bytes) -> None: ...
    def recv_exact(self, n: int, timeout: float) -> bytes: ...
    def close(self) -> None: ...


class Side(Protocol):
    name: str

    def open(self, port: int, first: bytes = b"") -> Stream: ...
    def sink(self, port: int, deadline: float) -> Any: ...
    def burst(self, count: int, size: int, limit: float) -> tuple[float, float]: ...
    def stop(self) -> None: ...


# --- ours ---------------------------------------------------------------------------------------------

class OurStream:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        got = bytearray()
        while len(got) < n:
            data = self.sock.recv(n - len(got))
            if not data:
                raise Failed("the stream closed")
            got += data
        return bytes(got)

    def close(self) -> None:
        self.sock.close()


class Ours:
    name = "ours"

    def __init__(self, folder: str) -> None:
        self.rendezvous = Rendezvous(folder)
        self.a = Daemon("bench-a", os.path.join(folder, "a"))
        self.b = Daemon("bench-b", os.path.join(folder, "b"))

    def start(self) -> None:
        self.rendezvous.start()
        self.a.start(self.rendezvous)
        self.b.start(self.rendezvous)
        establish_trust(self.a, self.b)

    def open(self, port: int, first: bytes = b"") -> Stream:
        """``first`` rides behind the connect request (``ControlClient.open_stream``)."""
        assert self.a.client is not None
        return OurStream(self.a.client.open_stream(self.b.address, port, timeout=30.0, first=first))

    def sink(self, port: int, deadline: float) -> Any:
        sink = Sink(self.b, port, deadline)
        sink.start()
        return sink

    def burst(self, count: int, size: int, limit: float) -> tuple[float, float]:
        return asyncio.run(our_burst(self.a, self.b, count, size, limit))

    def stop(self) -> None:
        for d in (self.a, self.b):
            d.stop()
        self.rendezvous.stop()


async def our_burst(a: Daemon, b: Daemon, count: int, size: int, limit: float) -> tuple[float, float]:
    conns = [await asyncio.open_unix_connection(sock=await unix_connect(a.socket_path)) for _ in range(count)]
    try:
        request = encode_frame({"id": 1, "cmd": "connect", "target": b.address, "port": 7})
        payload = os.urandom(size)

        async def open_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(request)
            reply = await read_frame(reader)
            if not reply.get("ok"):
                raise Failed(f"connect failed: {reply.get('error')}")

        async def echo_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(payload)
            if await reader.readexactly(size) != payload:
                raise Failed("port 7 echoed something else")

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(open_one(r, w) for r, w in conns)), limit)
        opened = time.perf_counter() - t0
        await asyncio.wait_for(asyncio.gather(*(echo_one(r, w) for r, w in conns)), limit)
        return opened, time.perf_counter() - t0
    finally:
        for _, writer in conns:
            writer.close()


# --- the reference ------------------------------------------------------------------------------------

def reference_bin() -> tuple[str | None, str]:
    folder = os.environ.get(VARIABLE, "")
    if not folder:
        return None, (f"{VARIABLE} is not set: set it to a folder holding the reference's "
                      f"{', '.join(BINARIES)} to measure them in the same run")
    for name in BINARIES:
        path = os.path.join(folder, name)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return None, f"{VARIABLE}={folder} has no executable {name!r}"
    return os.path.abspath(folder), ""


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class IPC:
    """The reference daemon's IPC socket: 4-byte length, command byte, payload (docs/reference-wire.md §6)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10.0)
        self.sock.connect(path)
        self.buffer = bytearray()
        #: Data received per connection id, and frames not yet taken by kind.
        self.data: dict[int, bytearray] = {}
        self.frames: dict[int, list[bytes]] = {}
        self.lock = threading.Lock()

    def send(self, cmd: int, payload: bytes = b"") -> None:
        body = bytes([cmd]) + payload
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def pump(self, timeout: float) -> None:
        """Read what is there (waiting up to ``timeout``) and file it: Recv data by conn id, the rest by kind."""
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(256 * 1024)
        except socket.timeout:
            return
        if not chunk:
            raise Failed("the reference daemon closed its IPC connection")
        self.buffer += chunk
        while len(self.buffer) >= 4:
            length = struct.unpack(">I", self.buffer[:4])[0]
            if len(self.buffer) < 4 + length:
                break
            body = bytes(self.buffer[4:4 + length])
            del self.buffer[:4 + length]
            cmd = body[0]
            if cmd == 0x07:
                self.data.setdefault(struct.unpack(">I", body[1:5])[0], bytearray()).extend(body[5:])
            elif cmd == 0x0A:
                raise Failed(f"the reference daemon answered an error: {body[3:].decode('utf-8', 'replace')}")
            else:
                self.frames.setdefault(cmd, []).append(body[1:])

    def take(self, cmd: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while not self.frames.get(cmd):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failed(f"no reply 0x{cmd:02x} from the reference daemon within {timeout:g} s")
            self.pump(remaining)
        return self.frames[cmd].pop(0)

    def received(self, conn: int, n: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.data.get(conn, b"")) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failed(f"the reference stream {conn} delivered too little within {timeout:g} s")
            self.pump(remaining)
        got = self.data[conn]
        out = bytes(got[:n])
        del got[:n]
        return out

    def close(self) -> None:
        self.sock.close()


class RefStream:
    def __init__(self, ipc: IPC, conn: int) -> None:
        self.ipc, self.conn = ipc, conn

    def send(self, data: bytes) -> None:
        self.ipc.send(0x06, struct.pack(">I", self.conn) + data)

    def recv_exact(self, n: int, timeout: float) -> bytes:
        return self.ipc.received(self.conn, n, timeout)

    def close(self) -> None:
        self.ipc.send(0x08, struct.pack(">I", self.conn))
        self.ipc.data.pop(self.conn, None)


class RefSink(threading.Thread):
    """Bind a port on the reference's b, take the first Accept, count and hash its bytes until ``deadline``."""

    def __init__(self, ipc: IPC, port: int, deadline: float) -> None:
        super().__init__(daemon=True)
        self.ipc, self.deadline = ipc, deadline
        self.received = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.digest = hashlib.sha256()
        self.error: BaseException | None = None
        self.halt = threading.Event()
        ipc.send(0x01, struct.pack(">H", port))
        ipc.take(0x02, 10.0)

    def run(self) -> None:
        try:
            accepted = self.ipc.take(0x05, self.deadline - time.monotonic())
            conn = struct.unpack(">I", accepted[2:6])[0]
            while not self.halt.is_set() and time.monotonic() < self.deadline:
                self.ipc.pump(0.2)
                got = self.ipc.data.get(conn)
                if got:
                    now = time.perf_counter()
                    self.first_at = self.first_at or now
                    self.last_at = now
                    self.received += len(got)
                    self.digest.update(got)
                    got.clear()
        except BaseException as e:  # reported by the main thread
            self.error = e


class Reference:
    name = "reference"

    def __init__(self, folder: str, bin_dir: str) -> None:
        self.folder, self.bin = folder, bin_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.registry = self.beacon = ""
        self.nodes: dict[str, dict[str, Any]] = {}
        self.ipc: IPC | None = None
        self.sink_ipc: IPC | None = None

    def spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: str) -> None:
        with open(os.path.join(self.folder, f"{name}.log"), "wb") as log:
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                               env=env, cwd=cwd, start_new_session=True))

    def ctl(self, node: str, *args: str, timeout: float = 30.0) -> Any:
        n = self.nodes[node]
        out = subprocess.run([os.path.join(self.bin, "pilotctl"), "--json", *args], stdin=subprocess.DEVNULL,
                             capture_output=True, env=n["env"], cwd=n["home"], timeout=timeout)
        try:
            reply = json.loads(out.stdout)
        except ValueError:
            reply = {}
        if out.returncode != 0 or reply.get("status") != "ok":
            raise Failed(f"reference pilotctl {' '.join(args)} on {node}: {out.stdout!r} {out.stderr!r}")
        return reply.get("data")

    def start(self) -> None:
        rport, bport = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
        self.registry, self.beacon = f"{HOST}:{rport}", f"{HOST}:{bport}"
        env = {"HOME": self.folder, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        self.spawn("ref-rendezvous", [os.path.join(self.bin, "rendezvous"), "-registry-addr", self.registry,
                                      "-beacon-addr", self.beacon, "-log-level", "warn",
                                      "-store", os.path.join(self.folder, "registry.json")], env, self.folder)

        def listening() -> bool:
            with socket.socket() as s:
                s.settimeout(0.2)
                return s.connect_ex((HOST, rport)) == 0

        wait_for(listening, 20, "the reference rendezvous")
        for name in ("ref-a", "ref-b"):
            home = tempfile.mkdtemp(prefix=f"pr-{name}-")  # short: Unix socket paths are limited
            sock = os.path.join(home, "pilot.sock")
            env = {"HOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PILOT_SOCKET": sock,
                   "PILOT_REGISTRY": self.registry}
            self.nodes[name] = {"home": home, "socket": sock, "env": env}
            self.spawn(name, [os.path.join(self.bin, "daemon"), "-registry", self.registry, "-beacon", self.beacon,
                              "-listen", f"{HOST}:0", "-socket", sock, "-identity",
                              os.path.join(home, "identity.key"), "-hostname", name, "-log-level", "warn"],
                       env, home)
        for name in self.nodes:
            def ready(name: str = name) -> bool:
                if not os.path.exists(self.nodes[name]["socket"]):
                    return False
                try:
                    info = self.ctl(name, "info", timeout=5.0)
                except Failed:
                    return False
                self.nodes[name]["node_id"] = int(info.get("node_id") or 0)
                return bool(self.nodes[name]["node_id"])
            wait_for(ready, 30, f"the reference daemon {name}")
        a, b = self.nodes["ref-a"]["node_id"], self.nodes["ref-b"]["node_id"]
        self.ctl("ref-a", "handshake", "ref-b", "benchmark")

        def pending() -> bool:
            return any(p.get("node_id") == a for p in (self.ctl("ref-b", "pending").get("pending") or []))

        wait_for(pending, TRUST_TIMEOUT, "ref-a's request to be pending on ref-b")
        self.ctl("ref-b", "approve", str(a))
        wait_for(lambda: any(t.get("node_id") == b for t in (self.ctl("ref-a", "trust").get("trusted") or [])),
                 TRUST_TIMEOUT, "ref-a to trust ref-b")
        self.ipc = IPC(self.nodes["ref-a"]["socket"])

    def dial(self, port: int) -> int:
        assert self.ipc is not None
        self.ipc.send(0x03, struct.pack(">HIH", 0, self.nodes["ref-b"]["node_id"], port))
        return int(struct.unpack(">I", self.ipc.take(0x04, 30.0)[:4])[0])

    def open(self, port: int, first: bytes = b"") -> Stream:
        """The reference's IPC has no first bytes on a dial: they are sent once it is open."""
        assert self.ipc is not None
        stream = RefStream(self.ipc, self.dial(port))
        if first:
            stream.send(first)
        return stream

    def sink(self, port: int, deadline: float) -> Any:
        self.sink_ipc = IPC(self.nodes["ref-b"]["socket"])
        sink = RefSink(self.sink_ipc, port, deadline)
        sink.start()
        return sink

    def burst(self, count: int, size: int, limit: float) -> tuple[float, float]:
        assert self.ipc is not None
        payload = os.urandom(size)
        t0 = time.perf_counter()
        for _ in range(count):
            self.ipc.send(0x03, struct.pack(">HIH", 0, self.nodes["ref-b"]["node_id"], 7))
        conns = [int(struct.unpack(">I", self.ipc.take(0x04, limit)[:4])[0]) for _ in range(count)]
        opened = time.perf_counter() - t0
        for conn in conns:
            self.ipc.send(0x06, struct.pack(">I", conn) + payload)
        for conn in conns:
            if self.ipc.received(conn, size, limit) != payload:
                raise Failed("the reference's port 7 echoed something else")
        done = time.perf_counter() - t0
        for conn in conns:
            RefStream(self.ipc, conn).close()
        return opened, done

    def stop(self) -> None:
        for ipc in (self.ipc, self.sink_ipc):
            if ipc is not None:
                ipc.close()
        for proc in reversed(self.procs):
            stop_pid(proc.pid, proc)
        for node in self.nodes.values():
            shutil.rmtree(node["home"], ignore_errors=True)


# --- the workload ---------------------------------------------------------------------------------------

def workload(side: Side, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    say(f"{side.name}: ping x{args.pings}")
    rtts = []
    for seq in range(1, args.pings + 1):
        message = f"ping-{seq}".encode()
        t0 = time.perf_counter()
        stream = side.open(7, first=message)
        if stream.recv_exact(len(message), 10.0) != message:
            raise Failed(f"{side.name}: port 7 echoed something else")
        rtts.append((time.perf_counter() - t0) * 1000)
        stream.close()
    out["ping"] = rtts
    time.sleep(1.1)  # SYN buckets refill (the reference's: 10 a second)
    say(f"{side.name}: echo x{args.echoes}")
    stream = side.open(7)
    echoes = []
    for _ in range(args.echoes):
        t0 = time.perf_counter()
        stream.send(b"echo!\n")
        if stream.recv_exact(6, 10.0) != b"echo!\n":
            raise Failed(f"{side.name}: port 7 echoed something else")
        echoes.append((time.perf_counter() - t0) * 1000)
    stream.close()
    out["echo"] = echoes
    say(f"{side.name}: {args.megabytes:g} MB on one stream")
    total = int(args.megabytes * 1_000_000)
    deadline = time.monotonic() + args.time_limit
    sink = side.sink(SINK_PORT, deadline + 5)
    stream = side.open(SINK_PORT)
    block = os.urandom(CHUNK)
    digest = hashlib.sha256()
    sent = 0
    t_start = time.perf_counter()
    while sent < total and time.monotonic() < deadline:
        piece = block[:min(CHUNK, total - sent)]
        stream.send(piece)
        digest.update(piece)
        sent += len(piece)
    while sink.received < sent and time.monotonic() < deadline and sink.error is None:
        time.sleep(0.005)
    stream.close()
    if sink.error is not None:
        raise Failed(f"{side.name}: the sink failed: {sink.error!r}")
    seconds = ((sink.last_at or t_start) - t_start) if sink.received else float("nan")
    out["throughput"] = sink.received / 1e6 / seconds if sink.received else 0.0
    out["throughput_note"] = (f"{sink.received / 1e6:.1f} of {total / 1e6:g} MB in {seconds:.2f} s"
                              + ("; SHA-256 checked" if sink.received == sent == total
                                 and sink.digest.digest() == digest.digest() else "; INCOMPLETE"))
    if sink.received == sent and sink.digest.digest() != digest.digest():
        raise Failed(f"{side.name}: the sink received different bytes")
    halt = getattr(sink, "halt", None)
    if halt is not None:
        halt.set()
    time.sleep(1.1)
    say(f"{side.name}: {args.concurrent} concurrent streams")
    out["concurrent"] = side.burst(args.concurrent, 1024, args.time_limit)
    return out


def ratio(ours: float, ref: float) -> str:
    if not ref or ref != ref or ours != ours:
        return ""
    return f"{ours / ref:.2f}x"


def run(args: argparse.Namespace) -> int:
    bin_dir, why = reference_bin()
    tmp = tempfile.mkdtemp(prefix="pilot-cmp-")
    m = machine()
    print(f"pilot compare: {' '.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}")
    print(f"  machine: {m['cores']} cores, {m['cpu']}, Linux {m['kernel']}, "
          f"Python {m['python']}, Twisted {m['twisted']}; load average {loadavg()}")
    say: Callable[[str], None] = (lambda text: print(f"  .. {text}", file=sys.stderr, flush=True))
    results: dict[str, dict[str, Any]] = {}
    sides: list[Any] = []
    try:
        os.makedirs(os.path.join(tmp, "ours"))
        ours = Ours(os.path.join(tmp, "ours"))
        sides.append(ours)
        ours.start()
        results["ours"] = workload(ours, args, say)
        ours.stop()
        if bin_dir is not None:
            os.makedirs(os.path.join(tmp, "ref"))
            ref = Reference(os.path.join(tmp, "ref"), bin_dir)
            sides.append(ref)
            ref.start()
            results["reference"] = workload(ref, args, say)
            ref.stop()
    except (Failed, OSError) as e:
        print(f"benchmark failed: {e!r}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for side in sides:
            try:
                side.stop()
            except Exception as e:  # keep stopping the others
                print(f"stopping {side.name}: {e!r}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)

    o, r = results["ours"], results.get("reference")
    print()
    print(f"  {'measure':<40} {'ours':>12} {'reference':>12} {'ours/ref':>9}   notes")
    print(f"  {'-' * 40} {'-' * 12} {'-' * 12} {'-' * 9}   {'-' * 30}")

    def line(label: str, ours_v: float, ref_v: float | None, unit: str, note: str = "") -> None:
        ref_s = f"{ref_v:.2f} {unit}" if ref_v is not None else "—"
        print(f"  {label:<40} {ours_v:>9.2f} {unit:<2} {ref_s:>12} {ratio(ours_v, ref_v or 0.0):>9}   {note}"
              .rstrip())

    for name, key, p in (("ping p50", "ping", 50), ("ping p99", "ping", 99), ("echo p50, open stream", "echo", 50),
                         ("echo p99", "echo", 99)):
        line(f"{name} ({len(o[key])})", pct(o[key], p), pct(r[key], p) if r else None, "ms",
             "lower is better" if p == 50 else "")
    line("throughput, one stream", o["throughput"], r["throughput"] if r else None, "MB/s",
         "higher is better; ours " + o["throughput_note"] + ("; ref " + r["throughput_note"] if r else ""))
    line(f"{args.concurrent} streams: all open", o["concurrent"][0] * 1000, r["concurrent"][0] * 1000 if r else None,
         "ms", "dials sent at once")
    line(f"{args.concurrent} streams: 1 KiB echoed on each", o["concurrent"][1] * 1000,
         r["concurrent"][1] * 1000 if r else None, "ms", "from the first dial")
    if r is None:
        print(f"\n  reference column empty: {why}")
    print(f"  load average at the end {loadavg()}")
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pings", type=int, default=200, help="pings (dial, echo, close), back to back")
    p.add_argument("--echoes", type=int, default=1000, help="6-byte round trips on one open stream")
    p.add_argument("--megabytes", type=float, default=10.0, help="MB (10^6 B) on one stream")
    p.add_argument("--concurrent", type=int, default=100, help="streams dialled at once")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds each transfer or burst may take")
    args = p.parse_args()
    if not (1 <= args.pings <= 1000 and 1 <= args.echoes <= 100_000 and 0 < args.megabytes <= 1000
            and 1 <= args.concurrent <= 1000 and 1 <= args.time_limit <= 600):
        raise SystemExit("--pings 1..1000, --echoes 1..100000, --megabytes up to 1000, --concurrent 1..1000, "
                         "--time-limit 1..600")

    run_stoppable(run, args)


if __name__ == "__main__":
    main()
