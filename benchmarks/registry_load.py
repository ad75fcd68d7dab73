#!/usr/bin/env python3
"""
Load benchmark of the rendezvous (registry TCP + beacon UDP) on 127.0.0.1.

Starts a real rendezvous process (``python -m pilot rendezvous start``) with
rate limits off, drives N simulated nodes against it over real sockets, and
prints figures: registrations/s, hostname sets/s, lookups/s and
resolve_hostname/s from 1 and from 16 connections with p50/p99 latency,
heartbeats/s, beacon discoveries/s, the server's RSS and CPU at steady state
(every node heartbeating and discovering at our node's intervals, each over its own
connection), and the time from a restart to the first answered lookup with
the N-node store.

    python3 benchmarks/registry_load.py --nodes 1000
    python3 benchmarks/registry_load.py --nodes 10000 --steady 30
    python3 benchmarks/registry_load.py --nodes 10000 --durable --writes-only

Every loop is bounded in count and in time; only 127.0.0.1 is ever a target.
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

from nacl.signing import SigningKey

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pilot.wire.beacon import Discover, with_proof  # noqa: E402
from pilot.wire.registry import FrameDecoder, encode_frame, sign_request  # noqa: E402
from procstat import cpu_seconds, pct, rss_mb  # noqa: E402

HOST = "127.0.0.1"
DEADLINE = 600.0  # no phase may run longer than this


class Node:
    __slots__ = ("key", "pub", "node_id", "name")

    def __init__(self, i: int) -> None:
        self.key = SigningKey(i.to_bytes(4, "big") * 8)
        self.pub = bytes(self.key.verify_key)
        self.node_id = 0
        self.name = f"bench-{i}"

    def signed(self, msg: dict[str, Any]) -> dict[str, Any]:
        return sign_request(msg, lambda m: self.key.sign(m).signature, int(time.time() * 1000),
                            os.urandom(16), legacy=False)


class Conn:
    """One registry connection with pipelined requests; replies in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.waiting: asyncio.Queue[asyncio.Future[dict[str, Any]]] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, port: int) -> "Conn":
        r, w = await asyncio.open_connection(HOST, port)
        return cls(r, w)

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for msg in self.decoder.feed(data):
                    if isinstance(msg, dict) and msg.get("type") == "event":
                        continue
                    fut = self.waiting.get_nowait()
                    if not fut.done():
                        fut.set_result(msg if isinstance(msg, dict) else {"type": "error"})
        finally:
            while not self.waiting.empty():
                fut = self.waiting.get_nowait()
                if not fut.done():
                    fut.set_exception(ConnectionError("registry connection closed"))

    def request(self, msg: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting.put_nowait(fut)
        self.writer.write(encode_frame(msg))
        return fut

    def close(self) -> None:
        self.writer.close()
        self.task.cancel()


async def drive(conns: list[Conn], make: Any, count: int, window: int) -> tuple[float, list[float], int]:
    """Send ``count`` requests made by ``make(i)`` over ``conns``, ``window`` in flight per
    connection; return (seconds, latencies in ms, errors)."""
    latencies: list[float] = []
    errors = 0
    next_i = 0

    async def worker(conn: Conn) -> None:
        nonlocal next_i, errors
        inflight: list[tuple[float, asyncio.Future[dict[str, Any]]]] = []
        while True:
            while next_i < count and len(inflight) < window:
                i = next_i
                next_i += 1
                inflight.append((time.perf_counter(), conn.request(make(i))))
            if not inflight:
                return
            t0, fut = inflight.pop(0)
            reply = await asyncio.wait_for(fut, DEADLINE)
            latencies.append((time.perf_counter() - t0) * 1000.0)
            if reply.get("type") == "error":
                errors += 1

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker(c) for c in conns)), DEADLINE)
    return time.perf_counter() - start, latencies, errors


def presigned(make: Any, count: int) -> Any:
    """``make`` run for every request before the clock starts (``--presign``): the load generator,
    on the same 2 cores, then spends no CPU on signatures while the server is measured."""
    made = [make(i) for i in range(count)]
    return made.__getitem__


def report(label: str, count: int, seconds: float, lat: list[float], errors: int,
           cpu: float | None = None) -> None:
    """``cpu``: the server's CPU seconds over the run; its rate per CPU second is what one free
    core would reach, a fairer figure than the wall-clock rate on a machine others use."""
    per_cpu = f"   server CPU {cpu / seconds * 100:4.0f}%: {count / cpu:6.0f}/CPU-s" if cpu else ""
    print(f"  {label:<34} {count / seconds:>9.0f}/s   p50 {pct(lat, 50):6.2f} ms   "
          f"p99 {pct(lat, 99):6.2f} ms   errors {errors}{per_cpu}")


class Server:
    def __init__(self, store: str, durable: bool = False) -> None:
        self.store = store
        self.durable = durable
        self.proc: subprocess.Popen[bytes] | None = None
        self.registry_port = 0
        self.beacon_port = 0

    def start(self) -> float:
        """Start the rendezvous; return the seconds from spawn to the ports being known."""
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "pilot", "--json", "rendezvous", "start",
               "--listen", f"{HOST}:{self.registry_port}", "--beacon", f"{HOST}:{self.beacon_port}",
               "--store", self.store, "--registrations-per-minute", "0", "--requests-per-second", "0",
               "--beacon-datagrams-per-second", "0", "--log-level", "warn",
               # every simulated node has its own connection, all from 127.0.0.1
               "--connections-per-address", "0"] + (["--durable"] if self.durable else [])
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the rendezvous did not start: " + " ".join(cmd))
        info = json.loads(line)
        self.registry_port = int(str(info["registry"]).rsplit(":", 1)[1])
        self.beacon_port = int(str(info["beacon"]).rsplit(":", 1)[1])
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def rss_mb(self) -> float:
        assert self.proc is not None
        return rss_mb(self.proc.pid)

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)


class Beacon(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:1] == b"\x02":
            self.replies += 1


def discover(node: Node) -> bytes:
    """A Discover with our nodes' signed proof (what the node daemon sends)."""
    return with_proof(Discover(node.node_id).base, lambda m: node.key.sign(m).signature,
                      int(time.time() * 1000), os.urandom(8))


async def stall(port: int, nodes: list[Node], ids: list[int], seconds: float) -> None:
    """
    ``--stall``: the longest wait behind a store write.  One connection sends a
    signed ``set_hostname`` every 0.1 s (each change makes the store write
    again); another sends ``lookup``s one at a time, each after the answer to
    the one before, and the figures are their latencies.
    """
    probe, changer = await Conn.open(port), await Conn.open(port)
    lat: list[float] = []
    end = time.perf_counter() + seconds

    async def change() -> None:
        i = 0
        while time.perf_counter() < end:
            nd = nodes[i % len(nodes)]
            msg = {"type": "set_hostname", "node_id": ids[i % len(nodes)], "hostname": f"{nd.name}-s{i}"}
            await asyncio.wait_for(changer.request(nd.signed(msg)), DEADLINE)
            i += 1
            await asyncio.sleep(0.1)

    changing = asyncio.get_running_loop().create_task(change())
    i = 0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        await asyncio.wait_for(probe.request({"type": "lookup", "node_id": ids[i % len(ids)]}), DEADLINE)
        lat.append((time.perf_counter() - t0) * 1000.0)
        i += 1
    await asyncio.wait_for(changing, DEADLINE)
    probe.close()
    changer.close()
    print(f"  {'lookup behind store writes':<34} {len(lat) / seconds:>9.0f}/s   p50 {pct(lat, 50):6.2f} ms   "
          f"p99 {pct(lat, 99):6.2f} ms   max {max(lat):7.2f} ms   (one at a time, a change every 0.1 s)")


async def run(args: argparse.Namespace) -> None:
    n = args.nodes
    tmp = tempfile.mkdtemp(prefix="pilot-bench-")
    server = Server(os.path.join(tmp, "registry.json"), args.durable)
    try:
        print(f"pilot rendezvous load benchmark: {n} nodes{', durable' if args.durable else ''}, python {sys.version.split()[0]}, "
              f"{os.cpu_count()} cores")
        t_keys = time.perf_counter()
        nodes = [Node(i) for i in range(n)]
        print(f"  (made {n} keys in {time.perf_counter() - t_keys:.2f} s)")
        server.start()
        port = server.registry_port
        conns16 = [await Conn.open(port) for _ in range(16)]

        def register(i: int) -> dict[str, Any]:
            nd = nodes[i]
            return nd.signed({"type": "register", "public_key": __import__("base64").b64encode(nd.pub).decode(),
                              "listen_addr": f"{HOST}:{20000 + i % 40000}"})
        make = presigned(register, n) if args.presign else register
        cpu0 = server.cpu_seconds()
        secs, lat, err = await drive(conns16, make, n, args.window)
        report(f"register (16 conns, signed, {args.window} in flight each)", n, secs, lat, err,
               server.cpu_seconds() - cpu0)
        # learn the ids (one more pass, cheap: same key, same id)
        for nd in nodes:
            nd.node_id = int.from_bytes(__import__("hashlib").sha256(nd.pub).digest()[:4], "big")
        ids = [nd.node_id for nd in nodes]

        def set_hostname(i: int) -> dict[str, Any]:
            return nodes[i].signed({"type": "set_hostname", "node_id": ids[i], "hostname": nodes[i].name})
        make = presigned(set_hostname, n) if args.presign else set_hostname
        cpu0 = server.cpu_seconds()
        secs, lat, err = await drive(conns16, make, n, args.window)
        report("set_hostname (16 conns, signed)", n, secs, lat, err, server.cpu_seconds() - cpu0)
        if args.stall > 0:
            await stall(port, nodes, ids, args.stall)
        if args.writes_only:
            for c in conns16:
                c.close()
            return

        count = max(n, 20000)
        for label, conns in (("1 conn", conns16[:1]), ("16 conns", conns16)):
            secs, lat, err = await drive(conns, lambda i: {"type": "lookup", "node_id": ids[i % n]}, count, 32)
            report(f"lookup ({label})", count, secs, lat, err)
            secs, lat, err = await drive(conns, lambda i: {"type": "resolve_hostname",
                                                           "hostname": nodes[i % n].name}, count, 32)
            report(f"resolve_hostname ({label})", count, secs, lat, err)
        secs, lat, err = await drive(conns16, lambda i: nodes[i % n].signed(
            {"type": "heartbeat", "node_id": ids[i % n]}), n, 32)
        report("heartbeat (16 conns, signed)", n, secs, lat, err)

        loop = asyncio.get_running_loop()
        transport, beacon = await loop.create_datagram_endpoint(Beacon, remote_addr=(HOST, server.beacon_port))
        t0 = time.perf_counter()
        sent = 0
        deadline = t0 + 60
        while sent < n and time.perf_counter() < deadline:
            # closed loop: at most 128 unanswered, so the measure is the beacon's, not a buffer's
            while sent < n and sent - beacon.replies < 128:
                transport.sendto(discover(nodes[sent]))
                sent += 1
            await asyncio.sleep(0.0005)
        while beacon.replies < sent and time.perf_counter() < deadline:
            await asyncio.sleep(0.001)
        secs = time.perf_counter() - t0
        print(f"  {'beacon discover (signed)':<34} {beacon.replies / secs:>9.0f}/s   "
              f"({beacon.replies}/{sent} answered)")
        for c in conns16:
            c.close()

        # steady state: every node on its own connection, heartbeat + discover every interval
        interval = args.interval
        conns = []
        for i in range(n):
            conns.append(await Conn.open(port))
        await asyncio.sleep(1)
        rss_before = server.rss_mb()
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        end = t0 + args.steady
        i = 0
        probes = 0
        per_tick = max(1, int(n * 0.1 / interval))  # spread each interval over 10 ticks a second
        # our node also asks the beacon its endpoint (unsigned) every --probe seconds
        probes_per_tick = int(n * 0.1 / args.probe) if args.probe > 0 else 0
        probe = Discover(0).base
        pending: list[asyncio.Future[dict[str, Any]]] = []
        while time.perf_counter() < end:
            for _ in range(per_tick):
                nd = nodes[i % n]
                pending.append(conns[i % n].request(nd.signed({"type": "heartbeat", "node_id": nd.node_id})))
                transport.sendto(discover(nd))
                i += 1
            for _ in range(probes_per_tick):
                transport.sendto(probe)
                probes += 1
            await asyncio.sleep(0.1)
            pending = [p for p in pending if not p.done()]
        await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 60)
        cpu = (server.cpu_seconds() - cpu0) / (time.perf_counter() - t0) * 100.0
        print(f"  steady state, {n} connections, heartbeat + signed discover every {interval:g} s, "
              f"unsigned discover every {args.probe:g} s, for {args.steady:.0f} s:")
        print(f"    server RSS {server.rss_mb():.1f} MB (idle with connections: {rss_before:.1f} MB), "
              f"CPU {cpu:.1f}% of one core, {i / args.steady:.0f} heartbeats/s, "
              f"{probes / args.steady:.0f} probes/s")
        for c in conns:
            c.close()
        transport.close()

        # restart to first answered lookup
        server.stop()
        size = os.path.getsize(server.store)
        t0 = time.perf_counter()
        server.start()
        target = ids[n // 2]
        first = None
        while first is None and time.perf_counter() - t0 < 60:
            try:
                with socket.create_connection((HOST, server.registry_port), timeout=5) as s:
                    s.sendall(encode_frame({"type": "lookup", "node_id": target}))
                    dec = FrameDecoder()
                    while True:
                        data = s.recv(65536)
                        if not data:
                            break
                        msgs = dec.feed(data)
                        if msgs:
                            if isinstance(msgs[0], dict) and msgs[0].get("type") == "lookup_ok":
                                first = time.perf_counter() - t0
                            break
            except OSError:
                time.sleep(0.005)
        print(f"  restart to first answered lookup ({n}-node store, {size / 1e6:.1f} MB): "
              f"{first if first is not None else float('nan'):.3f} s (process spawn included)")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--window", type=int, default=32,
                   help="registrations and hostname sets in flight per connection (a burst of many nodes: more)")
    p.add_argument("--durable", action="store_true",
                   help="start the rendezvous with --durable (replies wait for the store's write)")
    p.add_argument("--presign", action="store_true",
                   help="sign the registrations and hostname sets before timing them (seconds before: "
                        "well within the registry's 120 s skew)")
    p.add_argument("--writes-only", action="store_true",
                   help="stop after the registrations and hostname sets (the figures --durable changes)")
    p.add_argument("--stall", type=float, default=0.0,
                   help="after the hostname sets, this many seconds of lookups one at a time while a "
                        "hostname changes every 0.1 s: the longest wait behind a store write (0: skip)")
    p.add_argument("--steady", type=float, default=20.0, help="seconds of steady state to measure")
    p.add_argument("--interval", type=float, default=25.0,
                   help="each node's heartbeat interval (our node: 25 s; the reference: 30 s)")
    p.add_argument("--probe", type=float, default=15.0,
                   help="each node's unsigned Discover interval (our node: 15 s; 0: none, as the reference)")
    args = p.parse_args()
    if not 1 <= args.nodes <= 10000 or not 1 <= args.steady <= 300 or not 0 <= args.stall <= 120:
        raise SystemExit("--nodes 1..10000, --steady 1..300, --stall 0..120")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
