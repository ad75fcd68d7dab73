#!/usr/bin/env python3
"""
Benchmark of many streams on 127.0.0.1 (issue 11, item 4).

Starts a real rendezvous and two real node daemons, bench-a and bench-b, as
``benchmarks/tunnel.py`` does (temporary ``PILOT_HOME``s, tunnel sockets on
127.0.0.1), makes them trust each other, and measures:

* **a burst of opens**: 1,000 control connections to a are opened first
  (outside the timing), then each sends ``connect`` to b's port 7 (the echo
  service) at once; the time of each open runs from its request to its reply
  (the stream established), and of the burst from the first request to the
  last reply.  It prints p50/p99/max, how many of b's SYNs were dropped by a
  rate limit (``dropped.syn_rate``) and how many opens took over 0.9 s
  (the mark of a dropped SYN: the 1 s initial RTO).  Then 6 bytes are echoed
  on every stream, to show all of them work;
* **1,000 idle streams**: both daemons' RSS before the burst and after the
  streams have been idle for ``--idle`` seconds, and the difference per
  stream.  On b a stream is the stack's connection and the echo protocol; on
  a it is also the control socket's bridge to the benchmark;
* **100 peers with a stream each, on one node**: 100 more nodes, each with
  its own identity, tunnel socket and control socket, registered with the
  rendezvous, but hosted 25 to a process (4 processes: ``--host-peers``
  mode of this script, one reactor running 25 ``NodeService``s), because 100
  daemon processes of ~35 MB each do not fit 2 busy cores and are not what is
  measured.  b auto-approves them (``auto_approve`` hostnames ``peer-*``);
  each sends ``handshake`` to b and, once trusted, opens a stream to b's port
  7 and holds it.  It prints b's RSS before, after, and per idle peer.

    python3 benchmarks/many_streams.py
    python3 benchmarks/many_streams.py --streams 1000 --peers 100 --idle 5

Only 127.0.0.1 is used; every loop is bounded in count and time; every
process started is stopped at the end (SIGTERM, then SIGKILL), on error too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from procstat import pct, rss_mb, run_stoppable  # noqa: E402
from tunnel import (  # noqa: E402
    HOST, ROOT, START_TIMEOUT, Daemon, Failed, Rendezvous, child_env, establish_trust, loadavg, machine,
    stop_pid, wait_for,
)

from pilot.control_client import ControlClient  # noqa: E402
from pilot.wire.registry import encode_frame  # noqa: E402

PEERS_PER_PROCESS = 25
ECHO = b"hello!"


# --- the daemons -----------------------------------------------------------------------------------

def configure(d: Daemon, rendezvous: Rendezvous, extra: dict[str, Any]) -> None:
    """``pilot init`` in d's home, then ``extra`` added to its config.json (before the daemon starts)."""
    d.pilot("init", "--hostname", d.name, "--registry", rendezvous.registry, "--beacon", rendezvous.beacon)
    path = os.path.join(d.home, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(extra)
    with open(path, "w") as f:
        json.dump(config, f)


def stack_counter(d: Daemon, name: str) -> int:
    return int(d.call("info")["counters"]["stack"].get(name, 0))


def connections(d: Daemon) -> int:
    return int(d.call("info").get("connections", 0))


# --- a burst of opens, and the idle streams ------------------------------------------------------------

async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    length = int.from_bytes(await reader.readexactly(4), "big")
    result: dict[str, Any] = json.loads(await reader.readexactly(length))
    return result


async def unix_connect(path: str, limit: float = 10.0) -> socket.socket:
    """
    A connected Unix socket, retried while the daemon's accept backlog is full (a Unix connect then
    fails with EAGAIN, which asyncio's own connect reports later as EINVAL on the first read).
    """
    deadline = time.monotonic() + limit
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise Failed(f"the daemon's control socket accepted nothing for {limit:g} s") from None
            await asyncio.sleep(0.005)


async def burst(a: Daemon, b: Daemon, count: int, idle: float, limit: float) -> dict[str, Any]:
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(count):  # the control connections, before the clock starts
            conns.append(await asyncio.open_unix_connection(sock=await unix_connect(a.socket_path)))
        request = encode_frame({"id": 1, "cmd": "connect", "target": b.address, "port": 7})

        async def open_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
            t0 = time.perf_counter()
            writer.write(request)
            reply = await read_frame(reader)
            if not reply.get("ok"):
                raise Failed(f"connect failed: {reply.get('error')}")
            return time.perf_counter() - t0

        t0 = time.perf_counter()
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(open_one(r, w) for r, w in conns), return_exceptions=True), limit)
        total = time.perf_counter() - t0
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            raise Failed(f"{len(failed)} of {count} opens failed, the first with {failed[0]!r}")
        times = [o for o in outcomes if isinstance(o, float)]

        async def echo_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(ECHO)
            if await reader.readexactly(len(ECHO)) != ECHO:
                raise Failed("port 7 echoed something else")

        t1 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(echo_one(r, w) for r, w in conns)), limit)
        echoed = time.perf_counter() - t1
        await asyncio.sleep(idle)
        assert a.pid is not None and b.pid is not None
        held = {"a": rss_mb(a.pid), "b": rss_mb(b.pid)}
        open_a, open_b = connections(a), connections(b)
    finally:
        for _, writer in conns:
            writer.close()
    return {"times": [t * 1000 for t in times], "total": total, "echoed": echoed, "held": held,
            "open_a": open_a, "open_b": open_b}


# --- 100 peers, 25 to a process ----------------------------------------------------------------------

def host_peers(folder: str, first: int, count: int, registry: str, beacon: str) -> None:
    """``--host-peers`` mode: ``count`` nodes in this process, one reactor (bounded by its parent's SIGTERM)."""
    from twisted.application.service import MultiService
    from twisted.internet import reactor as installed

    from pilot.identity import Identity
    from pilot.nodeconfig import load_settings
    from pilot.services.node import NodeService

    reactor: Any = installed
    top = MultiService()
    for i in range(first, first + count):
        home = os.path.join(folder, f"p{i}")
        os.makedirs(home, mode=0o700, exist_ok=True)
        Identity.generate().save(os.path.join(home, "identity.json"))
        settings = load_settings({"hostname": f"peer-{i}", "registry": registry, "beacon": beacon,
                                  "listen": f"{HOST}:0", "heartbeat": "25"}, environ={}, home=home)
        NodeService(settings, reactor).setServiceParent(top)
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()


class PeerHosts:
    """The ``--host-peers`` processes and a control client per peer."""

    def __init__(self, folder: str, count: int, rendezvous: Rendezvous) -> None:
        self.folder = folder
        self.count = count
        self.rendezvous = rendezvous
        self.procs: list[subprocess.Popen[bytes]] = []
        self.clients: list[ControlClient] = []

    def start(self) -> None:
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        for first in range(0, self.count, PEERS_PER_PROCESS):
            n = min(PEERS_PER_PROCESS, self.count - first)
            cmd = [sys.executable, os.path.abspath(__file__), "--host-peers", self.folder, "--first", str(first),
                   "--count", str(n), "--registry", self.rendezvous.registry, "--beacon", self.rendezvous.beacon]
            with open(os.path.join(self.folder, f"host{first}.log"), "wb") as err:
                self.procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                                   env=child_env(), cwd=ROOT))
        for i in range(self.count):
            path = os.path.join(self.folder, f"p{i}", "pilot.sock")
            wait_for(lambda: os.path.exists(path), START_TIMEOUT * 2, f"peer {i}'s control socket")
            client = ControlClient(path, 30.0)
            self.clients.append(client)
            wait_for(lambda: client.call("info").get("registry", {}).get("state") == "registered",
                     START_TIMEOUT, f"peer {i} to register")

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.clients = []
        for proc in self.procs:
            stop_pid(proc.pid, proc)
        self.procs = []


def many_peers(b: Daemon, hosts: PeerHosts, idle: float) -> dict[str, Any]:
    assert b.pid is not None
    before = rss_mb(b.pid)
    t0 = time.monotonic()
    for client in hosts.clients:
        client.call("handshake", target=b.name, justification="benchmark")
    for i, client in enumerate(hosts.clients):
        wait_for(lambda: any(p.get("node_id") for p in client.call("trust")), 60, f"b to approve peer {i}")
    trusted = time.monotonic() - t0
    socks = []
    try:
        for client in hosts.clients:
            sock = client.open_stream(b.name, 7, timeout=30.0)
            socks.append(sock)
            sock.settimeout(10.0)
            sock.sendall(ECHO)
            got = b""
            while len(got) < len(ECHO):
                data = sock.recv(len(ECHO) - len(got))
                if not data:
                    raise Failed("a peer's echo stream closed")
                got += data
        opened = time.monotonic() - t0 - trusted
        time.sleep(idle)
        after = rss_mb(b.pid)
        info = b.call("info")
    finally:
        for sock in socks:
            sock.close()
    return {"before": before, "after": after, "trusted": trusted, "opened": opened,
            "peers": int(info.get("peers", 0)), "connections": int(info.get("connections", 0))}


# --- report -----------------------------------------------------------------------------------------

def row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<44} {value:>16}   {note}".rstrip())


def run(args: argparse.Namespace) -> int:
    tmp = tempfile.mkdtemp(prefix="pilot-ms-")
    # 102 nodes register from 127.0.0.1: lift the registry's 10 registrations per source IP a minute
    rendezvous = Rendezvous(tmp, ("--registrations-per-minute", "0"))
    a = Daemon("bench-a", os.path.join(tmp, "a"))
    b = Daemon("bench-b", os.path.join(tmp, "b"))
    hosts = PeerHosts(os.path.join(tmp, "peers"), args.peers, rendezvous)
    m = machine()
    print(f"pilot many-streams benchmark: {' '.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}")
    print(f"  machine: {m['cores']} cores, {m['cpu']}, Linux {m['kernel']}, "
          f"Python {m['python']}, Twisted {m['twisted']}; load average {loadavg()}")
    try:
        rendezvous.start()
        configure(b, rendezvous, {"auto_approve": {"hostnames": ["peer-*"]}})
        a.start(rendezvous)
        b.start(rendezvous)
        assert a.pid is not None and b.pid is not None
        establish_trust(a, b)
        a.call("ping", target=b.name, count=1, timeout=5.0, interval=0)  # the tunnel is up
        p: dict[str, Any] | None = None
        if args.peers:  # first, while b's heap has no room freed by the streams below
            hosts.start()
            p = many_peers(b, hosts, args.idle)
            hosts.stop()
        syn0 = stack_counter(b, "dropped.syn_rate")
        assert a.client is not None
        pings = a.client.request("ping", {"target": b.name, "count": 200, "timeout": 5.0, "interval": 0},
                                 timeout=200 * 5.0 + 30)
        rtts = [float(x["rtt_ms"]) for x in pings["results"] if "rtt_ms" in x]
        ping_dropped = stack_counter(b, "dropped.syn_rate") - syn0
        # the pings' connections linger in TIME_WAIT and count against b's 1024 per port
        wait_for(lambda: connections(b) == 0, 90, "the pings' connections to leave TIME_WAIT")
        time.sleep(1.0)
        idle = {"a": rss_mb(a.pid), "b": rss_mb(b.pid)}
        syn0 = stack_counter(b, "dropped.syn_rate")
        r = asyncio.run(burst(a, b, args.streams, args.idle, args.time_limit))
        dropped = stack_counter(b, "dropped.syn_rate") - syn0
        wait_for(lambda: connections(b) == 0 and connections(a) == 0, 30, "the streams to close")
        t = r["times"]
        print()
        print(f"  {'measure':<44} {'value':>16}   notes")
        print(f"  {'-' * 44} {'-' * 16}   {'-' * 40}")
        row(f"ping p50 / p99, 200 pings, interval 0 ({len(rtts)} answered)",
            f"{pct(rtts, 50):.2f} / {pct(rtts, 99):.2f} ms",
            f"max {max(rtts, default=float('nan')):.2f} ms; a new stream per ping; "
            f"{ping_dropped} SYNs dropped by b's rate limits")
        row(f"burst of {args.streams} opens, all established", f"{r['total'] * 1000:.0f} ms",
            f"{args.streams / r['total']:.0f} opens/s; control socket `connect` to b:7, all sent at once")
        row("time per open p50 / p99", f"{pct(t, 50):.1f} / {pct(t, 99):.1f} ms",
            f"min {min(t):.1f}, max {max(t):.1f} ms (all were sent at once); "
            f"{dropped} SYNs dropped by b's rate limits")
        row(f"echo of {len(ECHO)} B on every stream", f"{r['echoed'] * 1000:.0f} ms",
            f"all {args.streams}, at once")
        for side in ("a", "b"):
            grown = r["held"][side] - idle[side]
            row(f"{side}: RSS before / with {args.streams} idle streams",
                f"{idle[side]:.1f} / {r['held'][side]:.1f} MB",
                f"{grown * 1024 / args.streams:.1f} KB per idle stream"
                + (" (stack + echo protocol)" if side == "b" else " (stack + control-socket bridge)")
                + f"; {r['open_' + side]} connections listed after {args.idle:g} s idle")
        if p is not None:
            row(f"b: RSS before / with {args.peers} idle peers", f"{p['before']:.1f} / {p['after']:.1f} MB",
                f"{(p['after'] - p['before']) * 1024 / args.peers:.1f} KB per idle peer (tunnel, trust, one "
                f"stream); b lists {p['peers']} peers, {p['connections']} connections")
            row("peers: handshake -> all trusted; then opened", f"{p['trusted']:.1f} / {p['opened']:.1f} s",
                f"auto-approved by b; {PEERS_PER_PROCESS} peers per --host-peers process")
        row("other load", loadavg(), "load average at the end")
        return 0
    except (Failed, OSError, asyncio.TimeoutError) as e:
        print(f"benchmark failed: {e!r}", file=sys.stderr)
        for d in (a, b):
            tail = d.log_tail()
            if tail:
                print(f"--- {d.name} log (tail):\n{tail}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        hosts.stop()
        for d in (a, b):
            try:
                d.stop()
            except Exception as e:  # keep stopping the others
                print(f"stopping {d.name}: {e}", file=sys.stderr)
        rendezvous.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=1000, help="streams opened in one burst and held idle")
    p.add_argument("--peers", type=int, default=100, help="peers with one stream each on b (0: skip)")
    p.add_argument("--idle", type=float, default=5.0, help="seconds the streams stay idle before RSS is read")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds the burst may take at most")
    p.add_argument("--host-peers", metavar="FOLDER", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--registry", help=argparse.SUPPRESS)
    p.add_argument("--beacon", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.host_peers:
        host_peers(args.host_peers, args.first, args.count, args.registry, args.beacon)
        return
    if not (1 <= args.streams <= 1024 and 0 <= args.peers <= 200 and 0 <= args.idle <= 60
            and 1 <= args.time_limit <= 600):
        raise SystemExit("--streams 1..1024, --peers 0..200, --idle 0..60, --time-limit 1..600")

    run_stoppable(run, args)


if __name__ == "__main__":
    main()
