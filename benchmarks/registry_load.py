#!/usr/bin/env python3
"""
Load benchmark of the rendezvous (registry TCP + beacon UDP) on 127.0.0.1.

Starts a real rendezvous process (``python -m pilot rendezvous start``) with
rate limits off, drives N simulated nodes against it over real sockets, and
prints figures: registrations/s, hostname sets/s, lookups/s and
resolve_hostname/s from 1 and from 16 connections with p50/p99 latency,
heartbeats/s, beacon discoveries/s, the server's RSS and CPU at steady state
(every node on a persistent connection, at the cadence chosen), and the time
from a restart to the first answered lookup with the N-node store.

Two cadences (``--cadence``):

* ``ours`` (default): what our node daemon sends: signed (``auth``)
  registrations and heartbeats every 50 s, and an unsigned Discover every
  25 s (``pilot.node.probe``: 15 s or 10 s only behind a NAT seen dropping
  the mapping sooner; ``--probe 15`` for a fleet all behind such NATs); a signed Discover after a heartbeat only when its answer's
  ``endpoint`` (what the beacon holds) is missing or not the node's socket.
  ``--discover-after-heartbeat``: our node before 2026-12-07, a heartbeat
  every 25 s and a signed Discover after each.
* ``reference``: what a reference daemon sends (``docs/reference-wire.md``
  §2.4, §2.8, §3, §5.3): an unsigned legacy ``register``; every 30 s a
  ``heartbeat`` with the fixed-challenge ``signature``, and after its answer
  a Discover (signed with our proof unless ``--plain-discover``) and a
  ``poll_handshakes`` with its fixed-challenge ``signature``.  The legacy
  signatures are deterministic, so each node's are made once and reused.

``--closed-loop``: one request in flight per connection (a node waits for
each answer) instead of the pipelined window.  The steady state is measured
after ``--warmup`` seconds of the cadence (default one interval: every node
has sent each request once).  With ``PILOT_REFERENCE_BIN``
naming a folder that holds the reference's ``rendezvous``, the same client
then drives it (pinned to 127.0.0.1) and both columns are printed with the
ratios.

    python3 benchmarks/registry_load.py --nodes 1000
    python3 benchmarks/registry_load.py --nodes 10000 --steady 30
    python3 benchmarks/registry_load.py --nodes 10000 --cadence reference [--closed-loop]
    python3 benchmarks/registry_load.py --nodes 100000 --cadence reference --steady 30
    python3 benchmarks/registry_load.py --nodes 10000 --durable --writes-only

``--clients N`` drives our cadence's steady state from N processes
(``benchmarks/steady_clients.py``), each request signed beforehand with the
time it is due, and prints whether the clients kept the cadence and the
server kept up beside its CPU and RSS (one process cannot sign 4,000
heartbeats and Discovers a second for 100,000 nodes); ``--steady-only``
skips the bursts between the registrations and the steady state.

    python3 benchmarks/registry_load.py --nodes 100000 --clients 2 --steady 30 --presign [--steady-only]

``--stalls`` (with ``--clients``) runs our rendezvous under
``benchmarks/stall_probe.py`` and prints, for the measured window, its long
reactor passes, its garbage collections and its periodic and O(state) calls
(the store journal's records, a compaction's render, the reaper), with the
load clients' own collections and late wake-ups beside them.

Keys are derived from a seed when first needed (64 bytes kept a node);
past ``--connections`` (10,000) nodes share the persistent connections.
Every loop is bounded in count and in time; only 127.0.0.1 is ever a target.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from nacl.bindings import crypto_sign, crypto_sign_seed_keypair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pilot.wire.beacon import Discover, with_proof  # noqa: E402
from pilot.wire.registry import FrameDecoder, encode_frame, legacy_challenge, sign_request  # noqa: E402
from procstat import cpu_seconds, pct, rss_mb  # noqa: E402

HOST = "127.0.0.1"
DEADLINE = 600.0  # no phase may run longer than this
#: The reference takes 10 registrations a minute from one source IP (docs/reference-wire.md §2.6) and
#: has no setting for it: with the reference cadence each persistent connection comes from its own
#: loopback address (127.1.0.0/16, all on this machine) and carries at most this many registrations.
PER_SOURCE = 10


def source_address(c: int) -> str:
    """The loopback source of persistent connection ``c`` (the destination is always 127.0.0.1)."""
    return f"127.1.{c // 250}.{c % 250 + 1}"
REFERENCE = "PILOT_REFERENCE_BIN"
Figures = dict[str, float]


class Fleet:
    """
    N simulated nodes.  A node's key is derived from the seed and its index
    when first needed; only the 64-byte secret is kept (the public key is its
    second half).  The ids are the registry's (learned from ``register_ok``).
    """

    def __init__(self, n: int, cadence: str, seed: bytes = b"pilot-registry-load") -> None:
        self.n = n
        self.cadence = cadence
        self.seed = seed
        self._secrets: list[bytes | None] = [None] * n
        self.ids = [0] * n
        #: the reference's fixed-challenge signatures, made once per (node, request type)
        self._legacy: dict[tuple[int, str], str] = {}

    def secret(self, i: int) -> bytes:
        sk = self._secrets[i]
        if sk is None:
            _, sk = crypto_sign_seed_keypair(hashlib.sha256(self.seed + i.to_bytes(4, "big")).digest())
            self._secrets[i] = sk
        return sk

    def pub(self, i: int) -> bytes:
        return self.secret(i)[32:]

    def sign(self, i: int, message: bytes) -> bytes:
        return crypto_sign(message, self.secret(i))[:64]

    def name(self, i: int) -> str:
        return f"bench-{i}"

    def register(self, i: int) -> dict[str, Any]:
        msg = {"type": "register", "public_key": base64.b64encode(self.pub(i)).decode(),
               "listen_addr": f"{HOST}:{20000 + i % 40000}"}
        return msg if self.cadence == "reference" else self.signed(i, msg)

    def signed(self, i: int, msg: dict[str, Any]) -> dict[str, Any]:
        """``msg`` signed as this cadence's node signs it."""
        if self.cadence != "reference":
            return sign_request(msg, lambda m: self.sign(i, m), int(time.time() * 1000), os.urandom(16),
                                legacy=False)
        key = (i, msg["type"])
        sig = self._legacy.get(key)
        if sig is None:
            challenge = legacy_challenge(msg)
            assert challenge is not None
            sig = base64.b64encode(self.sign(i, challenge)).decode("ascii")
            if msg["type"] in ("heartbeat", "poll_handshakes"):
                self._legacy[key] = sig
        return dict(msg, signature=sig)

    def discover(self, i: int, proof: bool = True) -> bytes:
        """A Discover with our nodes' signed proof (or the reference's 5 bytes without)."""
        base = Discover(self.ids[i]).base
        if not proof:
            return base
        return with_proof(base, lambda m: self.sign(i, m), int(time.time() * 1000), os.urandom(8))


class Conn:
    """One registry connection with pipelined requests; replies in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.waiting: asyncio.Queue[asyncio.Future[dict[str, Any]]] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, port: int, source: str | None = None) -> "Conn":
        """A connection to 127.0.0.1 (from the loopback address ``source``, if given)."""
        r, w = await asyncio.open_connection(HOST, port, local_addr=(source, 0) if source else None)
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
        return self.request_frame(encode_frame(msg))

    def request_frame(self, frame: bytes) -> asyncio.Future[dict[str, Any]]:
        """Send an encoded request; its reply, when it comes."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting.put_nowait(fut)
        self.writer.write(frame)
        return fut

    def close(self) -> None:
        self.writer.close()
        self.task.cancel()


async def drive(conns: list[Conn], make: Any, count: int, window: int,
                on_reply: Callable[[int, dict[str, Any]], None] | None = None,
                ) -> tuple[float, list[float], int]:
    """Send ``count`` requests made by ``make(i)`` over ``conns``, ``window`` in flight per
    connection (1: closed loop); return (seconds, latencies in ms, errors)."""
    latencies: list[float] = []
    errors = 0
    next_i = 0

    async def worker(conn: Conn) -> None:
        nonlocal next_i, errors
        inflight: list[tuple[int, float, asyncio.Future[dict[str, Any]]]] = []
        while True:
            while next_i < count and len(inflight) < window:
                i = next_i
                next_i += 1
                inflight.append((i, time.perf_counter(), conn.request(make(i))))
            if not inflight:
                return
            i, t0, fut = inflight.pop(0)
            reply = await asyncio.wait_for(fut, DEADLINE)
            latencies.append((time.perf_counter() - t0) * 1000.0)
            if reply.get("type") == "error":
                errors += 1
            elif on_reply is not None:
                on_reply(i, reply)

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker(c) for c in conns)), DEADLINE)
    return time.perf_counter() - start, latencies, errors


async def drive_nodes(conns: list[Conn], make: Any, count: int, inflight: int,
                      on_reply: Callable[[int, dict[str, Any]], None]) -> tuple[float, list[float], int]:
    """Request ``make(i)`` for node ``i`` on its own connection (``conns[i % len(conns)]``), at most
    ``inflight`` nodes at a time, each waiting for its answer; return (seconds, latencies in ms, errors)."""
    latencies: list[float] = []
    errors = 0
    next_i = 0

    async def worker() -> None:
        nonlocal errors, next_i
        while next_i < count:
            i = next_i
            next_i += 1
            t0 = time.perf_counter()
            reply = await conns[i % len(conns)].request(make(i))
            latencies.append((time.perf_counter() - t0) * 1000.0)
            if reply.get("type") == "error":
                errors += 1
            else:
                on_reply(i, reply)

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(min(inflight, count)))), DEADLINE)
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
          f"p99 {pct(lat, 99):6.2f} ms   errors {errors}{per_cpu}", flush=True)


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    """Our rendezvous, a real process."""

    name = "ours"

    def __init__(self, store: str, durable: bool = False, stalls: bool = False) -> None:
        self.store = store
        self.durable = durable
        #: ``--stalls``: each start runs under ``stall_probe.py``, its record in the next of these files
        self.stalls = stalls
        self.stall_files: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.registry_port = 0
        self.beacon_port = 0

    def start(self) -> None:
        """Start the rendezvous; return once its ports are known (it may not answer yet)."""
        run = [sys.executable, "-m", "pilot"]
        if self.stalls:
            self.stall_files.append(f"{self.store}.stalls-{len(self.stall_files)}.json")
            probe = os.path.join(ROOT, "benchmarks", "stall_probe.py")
            run = [sys.executable, probe, self.stall_files[-1], "--"]
        cmd = run + ["--json", "rendezvous", "start",
               "--listen", f"{HOST}:{self.registry_port}", "--beacon", f"{HOST}:{self.beacon_port}",
               "--store", self.store, "--registrations-per-minute", "0", "--requests-per-second", "0",
               "--beacon-datagrams-per-second", "0", "--log-level", "warn",
               # every simulated node has its own connection, all from 127.0.0.1
               "--connections-per-address", "0"] + (["--durable"] if self.durable else [])
        env = dict(os.environ, PYTHONPATH=ROOT)
        # as installed: bytecode compiled at the first start and kept (in the run's folder), whatever
        # PYTHONDONTWRITEBYTECODE says, so that the restart's figure is not every module's compilation
        # (about 0.25 s at 10,000 nodes here); benchmarks/registry_restart.py does the same
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(os.path.dirname(os.path.abspath(self.store)), "pycache")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                     cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the rendezvous did not start: " + " ".join(cmd))
        info = json.loads(line)
        self.registry_port = int(str(info["registry"]).rsplit(":", 1)[1])
        self.beacon_port = int(str(info["beacon"]).rsplit(":", 1)[1])

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


class ReferenceServer(Server):
    """The reference's ``rendezvous`` binary, listening on 127.0.0.1 only (both its ports named)."""

    name = "reference"

    def __init__(self, store: str, binary: str) -> None:
        super().__init__(store)
        self.binary = binary
        self.registry_port = free_port(socket.SOCK_STREAM)
        self.beacon_port = free_port(socket.SOCK_DGRAM)
        self.log_path = store + ".log"

    def start(self) -> None:
        """Spawn it; return once the registry port accepts (the restart figure polls on its own)."""
        cmd = [self.binary, "-registry-addr", f"{HOST}:{self.registry_port}",
               "-beacon-addr", f"{HOST}:{self.beacon_port}", "-store", self.store, "-log-level", "warn"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=os.path.dirname(self.store), start_new_session=True)


def wait_listening(port: int, limit: float = 20.0) -> None:
    end = time.perf_counter() + limit
    while time.perf_counter() < end:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.01)
    raise SystemExit(f"nothing listens on {HOST}:{port} after {limit:.0f} s")


class Beacon(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data[:1] == b"\x02":
            self.replies += 1


async def stall(port: int, fleet: Fleet, seconds: float) -> None:
    """
    ``--stall``: the longest wait behind a store write.  One connection sends a
    signed ``set_hostname`` every 0.1 s (each change makes the store write
    again); another sends ``lookup``s one at a time, each after the answer to
    the one before, and the figures are their latencies.
    """
    probe, changer = await Conn.open(port), await Conn.open(port)
    lat: list[float] = []
    end = time.perf_counter() + seconds
    n = fleet.n

    async def change() -> None:
        i = 0
        while time.perf_counter() < end:
            k = i % n
            msg = {"type": "set_hostname", "node_id": fleet.ids[k], "hostname": f"{fleet.name(k)}-s{i}"}
            await asyncio.wait_for(changer.request(fleet.signed(k, msg)), DEADLINE)
            i += 1
            await asyncio.sleep(0.1)

    changing = asyncio.get_running_loop().create_task(change())
    i = 0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        await asyncio.wait_for(probe.request({"type": "lookup", "node_id": fleet.ids[i % n]}), DEADLINE)
        lat.append((time.perf_counter() - t0) * 1000.0)
        i += 1
    await asyncio.wait_for(changing, DEADLINE)
    probe.close()
    changer.close()
    print(f"  {'lookup behind store writes':<34} {len(lat) / seconds:>9.0f}/s   p50 {pct(lat, 50):6.2f} ms   "
          f"p99 {pct(lat, 99):6.2f} ms   max {max(lat):7.2f} ms   (one at a time, a change every 0.1 s)")


async def persistent(port: int, n: int, args: argparse.Namespace) -> list[Conn]:
    """The nodes' long-lived connections: one a node, shared past ``--connections``."""
    count = min(n, args.connections)
    if args.cadence == "reference":
        count = max(count, -(-n // PER_SOURCE))
    return [await Conn.open(port, source_address(c) if args.cadence == "reference" else None)
            for c in range(count)]


def our_interval(args: argparse.Namespace) -> float:
    """Our node's heartbeat interval: 50 s now (``HEARTBEAT_INTERVAL``), 25 s before 2026-12-07."""
    from pilot.machines.registration import HEARTBEAT_INTERVAL
    return 25.0 if args.discover_after_heartbeat else HEARTBEAT_INTERVAL


async def steady(args: argparse.Namespace, server: Server, fleet: Fleet, transport: Any,
                 figures: Figures, conns: list[Conn]) -> None:
    """Every node on its persistent connection (shared past ``--connections``), at its cadence."""
    n = fleet.n
    await asyncio.sleep(1)
    rss_before = server.rss_mb()
    reference = args.cadence == "reference"
    interval = args.interval if args.interval else (30.0 if reference else our_interval(args))
    probe_every = 0.0 if reference else args.probe
    hb_lat: list[float] = []
    poll_lat: list[float] = []
    errors = 0
    pending: set[asyncio.Future[Any]] = set()
    loop = asyncio.get_running_loop()
    lags: list[float] = []

    async def reference_tick(i: int) -> None:
        # the reference daemon: heartbeat; after its answer a Discover and a handshake poll
        nonlocal errors
        conn = conns[i % len(conns)]
        t0 = time.perf_counter()
        reply = await conn.request(fleet.signed(i, {"type": "heartbeat", "node_id": fleet.ids[i]}))
        hb_lat.append((time.perf_counter() - t0) * 1000.0)
        if reply.get("type") == "error":
            errors += 1
            return
        transport.sendto(fleet.discover(i, proof=not args.plain_discover))
        t0 = time.perf_counter()
        reply = await conn.request(fleet.signed(i, {"type": "poll_handshakes", "node_id": fleet.ids[i]}))
        poll_lat.append((time.perf_counter() - t0) * 1000.0)
        if reply.get("type") == "error":
            errors += 1

    seen = "%s:%d" % transport.get_extra_info("sockname")[:2]  # what the beacon records for our nodes
    signed_discovers = 0

    def our_done(t0: float, k: int, fut: asyncio.Future[dict[str, Any]]) -> None:
        nonlocal errors, signed_discovers
        hb_lat.append((time.perf_counter() - t0) * 1000.0)
        if fut.cancelled() or fut.exception() is not None or fut.result().get("type") == "error":
            errors += 1
        elif args.discover_after_heartbeat or fut.result().get("endpoint") != seen:
            transport.sendto(fleet.discover(k))  # the beacon holds no endpoint for the node, or another
            signed_discovers += 1

    warmup = interval if args.warmup < 0 else args.warmup
    cpu_start = cpu0 = server.cpu_seconds()
    t_start = t0 = time.perf_counter()
    measuring = warmup == 0
    end = t0 + warmup + args.steady
    i = probes = sent = 0
    first_cpu = float("nan")
    per_second = n / interval
    probes_per_second = n / probe_every if probe_every > 0 else 0.0
    probe = Discover(0).base
    tick = 0.1
    while time.perf_counter() < end:
        if not measuring and time.perf_counter() >= t_start + warmup:
            # one interval done: every node has sent each request once; the steady state starts
            measuring = True
            cpu0 = server.cpu_seconds()
            first_cpu = (cpu0 - cpu_start) / (time.perf_counter() - t_start) * 100.0
            t0 = time.perf_counter()
            sent = probes = errors = signed_discovers = 0
            hb_lat.clear()
            poll_lat.clear()
            lags.clear()
        # spread each interval evenly: as many as are due by now
        due = int((time.perf_counter() - t0 + tick) * per_second)
        while sent < due:
            k = i % n
            if reference:
                fut: asyncio.Future[Any] = loop.create_task(reference_tick(k))
            else:
                started = time.perf_counter()
                fut = conns[k % len(conns)].request(
                    fleet.signed(k, {"type": "heartbeat", "node_id": fleet.ids[k]}))
                fut.add_done_callback(functools.partial(our_done, started, k))
            pending.add(fut)
            fut.add_done_callback(pending.discard)
            i += 1
            sent += 1
        if measuring:
            # how late the last request of this pass went (0 if the pass was ahead)
            lags.append(max(0.0, time.perf_counter() - t0 - sent / per_second))
        due_probes = int((time.perf_counter() - t0 + tick) * probes_per_second)
        while probes < due_probes:
            transport.sendto(probe)
            probes += 1
        await asyncio.sleep(tick)
    elapsed = time.perf_counter() - t0
    cpu = (server.cpu_seconds() - cpu0) / elapsed * 100.0
    answered_late = len(pending)
    if pending:
        await asyncio.wait(pending, timeout=60)
    rss = server.rss_mb()
    from steady_clients import KEPT_LAG, KEPT_SHARE
    kept = sent >= KEPT_SHARE * per_second * elapsed and pct(lags, 99) <= KEPT_LAG
    what = (f"heartbeat, then {'an unsigned' if args.plain_discover else 'a signed'} discover and "
            f"poll_handshakes, every {interval:g} s" if reference else
            f"heartbeat {'+ signed discover ' if args.discover_after_heartbeat else ''}every {interval:g} s, "
            f"unsigned discover every {probe_every:g} s")
    print(f"  steady state, {n} nodes on {len(conns)} connections, {what}, for {elapsed:.0f} s "
          f"after {warmup:g} s of it (CPU over those: {first_cpu:.1f}% of one core):")
    print(f"    server RSS {rss:.1f} MB (idle with connections: {rss_before:.1f} MB), "
          f"CPU {cpu:.1f}% of one core, {sent / elapsed:.0f} heartbeats/s, {probes / elapsed:.0f} probes/s, "
          f"{signed_discovers / elapsed:.0f} signed discovers/s, "
          f"errors {errors}")
    print(f"    client: {sent / elapsed:.0f} of {per_second:.0f} "
          f"{'ticks' if reference else 'heartbeats'}/s asked, "
          f"late by p99 {pct(lags, 99) * 1000:.0f} ms, {answered_late} unanswered at the end: "
          + ("KEPT the cadence" if kept else
             "FELL BEHIND: the server figures are not its cost at this cadence"))
    print(f"    heartbeat p50 {pct(hb_lat, 50):.2f} ms p99 {pct(hb_lat, 99):.2f} ms" +
          (f"; poll_handshakes p50 {pct(poll_lat, 50):.2f} ms p99 {pct(poll_lat, 99):.2f} ms"
           if reference else ""), flush=True)
    figures.update({"steady CPU %": cpu, "steady RSS MB": rss, "heartbeat p99 ms (steady)": pct(hb_lat, 99),
                    "steady client kept cadence": float(kept)})
    if reference:
        figures["poll_handshakes p99 ms (steady)"] = pct(poll_lat, 99)
    for c in conns:
        c.close()


def first_lookup(port: int, target: int, t0: float) -> float | None:
    """Seconds from ``t0`` until a ``lookup`` of ``target`` on ``port`` is answered (None after 60 s)."""
    while time.perf_counter() - t0 < 60:
        try:
            with socket.create_connection((HOST, port), timeout=5) as s:
                s.sendall(encode_frame({"type": "lookup", "node_id": target}))
                dec = FrameDecoder()
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    msgs = dec.feed(data)
                    if msgs:
                        if isinstance(msgs[0], dict) and msgs[0].get("type") == "lookup_ok":
                            return time.perf_counter() - t0
                        break
        except OSError:
            time.sleep(0.005)
    return None


def restart(server: Server, fleet: Fleet) -> tuple[float, float]:
    """Stop, start again with the store; (seconds from spawn to the first answered lookup, store MB)."""
    server.stop()
    size = os.path.getsize(server.store) if os.path.exists(server.store) else 0
    target = fleet.ids[fleet.n // 2]
    t0 = time.perf_counter()
    server.start()
    first = first_lookup(server.registry_port, target, t0)
    return (first if first is not None else float("nan")), size / 1e6


async def bursts(args: argparse.Namespace, server: Server, fleet: Fleet, conns16: list[Conn],
                 figures: Figures) -> Any:
    """The bursts after the registrations: hostname sets, lookups, heartbeats, beacon Discovers; the
    beacon's UDP transport (None with ``--writes-only``, which stops after the hostname sets)."""
    n, port = fleet.n, server.registry_port
    window = 1 if args.closed_loop else args.window

    def set_hostname(i: int) -> dict[str, Any]:
        return fleet.signed(i, {"type": "set_hostname", "node_id": fleet.ids[i], "hostname": fleet.name(i)})
    make = presigned(set_hostname, n) if args.presign else set_hostname
    cpu0 = server.cpu_seconds()
    secs, lat, err = await drive(conns16, make, n, window)
    report("set_hostname (16 conns, signed)", n, secs, lat, err, server.cpu_seconds() - cpu0)
    figures.update({"set_hostname /s": n / secs, "set_hostname p99 ms": pct(lat, 99)})
    if args.stall > 0:
        await stall(port, fleet, args.stall)
    if args.writes_only:
        for c in conns16:
            c.close()
        return None

    count = min(max(n, 20000), 100000)
    lookup_window = 1 if args.closed_loop else 32
    for label, conns in (("1 conn", conns16[:1]), ("16 conns", conns16)):
        secs, lat, err = await drive(conns, lambda i: {"type": "lookup", "node_id": fleet.ids[i % n]}, count,
                                     lookup_window)
        report(f"lookup ({label})", count, secs, lat, err)
        figures.update({f"lookup {label} /s": count / secs, f"lookup {label} p99 ms": pct(lat, 99)})
        secs, lat, err = await drive(conns, lambda i: {"type": "resolve_hostname",
                                                       "hostname": fleet.name(i % n)},
                                     count, lookup_window)
        report(f"resolve_hostname ({label})", count, secs, lat, err)
        figures[f"resolve_hostname {label} p99 ms"] = pct(lat, 99)
    secs, lat, err = await drive(conns16, lambda i: fleet.signed(
        i % n, {"type": "heartbeat", "node_id": fleet.ids[i % n]}), n, lookup_window)
    report("heartbeat (16 conns, signed)", n, secs, lat, err)
    figures.update({"heartbeat /s": n / secs, "heartbeat p99 ms": pct(lat, 99)})

    loop = asyncio.get_running_loop()
    transport, beacon = await loop.create_datagram_endpoint(Beacon, remote_addr=(HOST, server.beacon_port))
    proof = not (args.cadence == "reference" and args.plain_discover)
    t0 = time.perf_counter()
    sent = 0
    deadline = t0 + 60
    while sent < n and time.perf_counter() < deadline:
        # closed loop: at most 128 unanswered, so the measure is the beacon's, not a buffer's
        while sent < n and sent - beacon.replies < 128:
            transport.sendto(fleet.discover(sent, proof))
            sent += 1
        await asyncio.sleep(0.0005)
    while beacon.replies < sent and time.perf_counter() < deadline:
        await asyncio.sleep(0.001)
    secs = time.perf_counter() - t0
    print(f"  {'beacon discover (' + ('signed' if proof else 'unsigned') + ')':<34} "
          f"{beacon.replies / secs:>9.0f}/s   ({beacon.replies}/{sent} answered)", flush=True)
    figures["beacon discover /s"] = beacon.replies / secs
    for c in conns16:
        c.close()

    return transport


async def run_side(args: argparse.Namespace, server: Server) -> Figures:
    """The whole workload against one server; the figures the comparison prints."""
    n = args.nodes
    figures: Figures = {}
    window = 1 if args.closed_loop else args.window
    fleet = Fleet(n, args.cadence)
    server.start()
    port = server.registry_port
    wait_listening(port)
    conns16 = [await Conn.open(port) for _ in range(16)]
    t_open = time.perf_counter()
    # with --clients the steady state's connections are the client processes' own
    own = [] if args.clients else await persistent(port, n, args)
    print(f"  (opened {len(own)} persistent connections in {time.perf_counter() - t_open:.1f} s)", flush=True)

    def learned(i: int, reply: dict[str, Any]) -> None:
        fleet.ids[i] = int(reply.get("node_id") or 0)
    make = presigned(fleet.register, n) if args.presign else fleet.register
    cpu0 = server.cpu_seconds()
    if args.cadence == "reference":
        # each node registers on its own connection (as a reference daemon does), at most
        # PER_SOURCE a source address; the node waits for its answer; as many nodes at once as
        # 16 connections with the window would have in flight
        secs, lat, err = await drive_nodes(own, make, n, 16 * window, learned)
        label = f"register (own conns, unsigned, {16 * window} at once)"
    else:
        secs, lat, err = await drive(conns16, make, n, window, learned)
        label = f"register (16 conns, signed, {window} in flight each)"
    report(label, n, secs, lat, err, server.cpu_seconds() - cpu0)
    figures.update({"register /s": n / secs, "register p99 ms": pct(lat, 99)})

    if args.steady_only:
        for c in conns16:
            c.close()
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            Beacon, remote_addr=(HOST, server.beacon_port))
    else:
        transport = await bursts(args, server, fleet, conns16, figures)
        if transport is None:  # --writes-only
            for c in own:
                c.close()
            return figures
    if args.clients:
        from steady_clients import run_clients
        run_clients(args, server, fleet, figures)
    else:
        await steady(args, server, fleet, transport, figures, own)
    transport.close()
    stalls = server.stall_files[:1]
    first, size = restart(server, fleet)
    if stalls and "window start" in figures:
        from stall_probe import summary
        kept = os.path.join(tempfile.gettempdir(), f"pilot-stalls-{os.getpid()}.json")
        shutil.copyfile(stalls[0], kept)
        print(f"  --stalls, the server in the measured window (the probe's record: {kept}):", flush=True)
        for line in summary(stalls[0], figures["window start"], figures["window end"]):
            print("    " + line, flush=True)
    print(f"  restart to first answered lookup ({n}-node store, {size:.1f} MB): "
          f"{first:.3f} s (process spawn included)", flush=True)
    figures["restart to first lookup s"] = first
    return figures


#: The figures compared, and whether more is better.
COMPARED = [
    ("steady CPU %", False), ("steady RSS MB", False), ("register /s", True), ("register p99 ms", False),
    ("set_hostname /s", True), ("set_hostname p99 ms", False),
    ("lookup 1 conn /s", True), ("lookup 1 conn p99 ms", False), ("lookup 16 conns /s", True),
    ("lookup 16 conns p99 ms", False), ("resolve_hostname 1 conn p99 ms", False),
    ("heartbeat /s", True), ("heartbeat p99 ms", False), ("heartbeat p99 ms (steady)", False),
    ("poll_handshakes p99 ms (steady)", False), ("beacon discover /s", True),
    ("restart to first lookup s", False),
]


def compare(ours: Figures, reference: Figures | None, why: str) -> None:
    print(f"\n  {'':<34} {'ours':>10} {'reference':>10} {'ours/ref':>9}")
    for key, more_better in COMPARED:
        if key not in ours:
            continue
        ref = reference.get(key) if reference else None
        ratio = f"{ours[key] / ref:8.2f}x" if ref else ""
        good = "" if ref is None else ("  (better)" if (ours[key] >= ref) == more_better else "  (worse)")
        theirs = ref if ref is not None else float("nan")
        print(f"  {key:<34} {ours[key]:>10.2f} {theirs:>10.2f} {ratio}{good}")
    if reference is None:
        print(f"  reference column empty: {why}")


async def run(args: argparse.Namespace) -> None:
    tmp = tempfile.mkdtemp(prefix="pilot-bench-")
    binary = os.path.join(os.environ.get(REFERENCE, ""), "rendezvous")
    why = ""
    if not os.environ.get(REFERENCE):
        why = f"{REFERENCE} is not set (a folder holding the reference's rendezvous binary)"
    elif not os.access(binary, os.X_OK):
        why = f"{binary} is not an executable"
    elif args.durable or args.stall:
        why = "--durable and --stall are ours only"
    servers: list[Server] = [Server(os.path.join(tmp, "registry.json"), args.durable, args.stalls)]
    if not why:
        os.makedirs(os.path.join(tmp, "ref"))
        servers.append(ReferenceServer(os.path.join(tmp, "ref", "registry.json"), binary))
    results: dict[str, Figures] = {}
    try:
        for server in servers:
            print(f"{server.name}: rendezvous load, {args.nodes} nodes, {args.cadence} cadence"
                  f"{', closed loop' if args.closed_loop else ''}{', durable' if args.durable else ''}, "
                  f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
            try:
                results[server.name] = await run_side(args, server)
            finally:
                server.stop()
            print(f"  (load client RSS so far {rss_mb(os.getpid()):.0f} MB)")
        compare(results["ours"], results.get("reference"), why)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--cadence", choices=("ours", "reference"), default="ours",
                   help="what each simulated node sends: our node daemon's, or a reference daemon's")
    p.add_argument("--closed-loop", action="store_true",
                   help="one request in flight per connection (a node waits for each answer)")
    p.add_argument("--plain-discover", action="store_true",
                   help="with --cadence reference: the reference's 5-byte Discover, without our proof")
    p.add_argument("--connections", type=int, default=10000,
                   help="persistent connections at steady state (past this, nodes share them)")
    p.add_argument("--window", type=int, default=32,
                   help="registrations and hostname sets in flight per connection "
                        "(a burst of many nodes: more)")
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
    p.add_argument("--warmup", type=float, default=-1.0,
                   help="seconds of the cadence before the steady state is measured (default: one "
                        "interval, so every node has sent each request once)")
    p.add_argument("--interval", type=float, default=0.0,
                   help="each node's heartbeat interval (default: our node's 50 s, 25 s with "
                        "--discover-after-heartbeat, the reference's 30 s)")
    p.add_argument("--discover-after-heartbeat", action="store_true",
                   help="our cadence before 2026-12-07: a signed Discover after every heartbeat's answer "
                        "(now: only when the answer shows the beacon holding no endpoint, or another)")
    p.add_argument("--probe", type=float, default=-1.0,
                   help="each node's unsigned Discover interval (default: our node's, 25 s; 0: none)")
    p.add_argument("--steady-only", action="store_true",
                   help="after the registrations, only the steady state and the restart (no bursts)")
    p.add_argument("--clients", type=int, default=0,
                   help="our cadence's steady state from this many load-client processes, every request "
                        "signed before it starts with the time it is due (benchmarks/steady_clients.py); "
                        "0: from this process, signing as it goes")
    p.add_argument("--stalls", action="store_true",
                   help="with --clients: run our rendezvous under benchmarks/stall_probe.py and print its long "
                        "reactor passes, garbage collections and what the reactor thread was doing in them")
    p.add_argument("--udp-sockets", type=int, default=256,
                   help="with --clients: the UDP sockets (source endpoints) the nodes' Discovers come from")
    args = p.parse_args()
    if args.probe < 0:
        from pilot.node.probe import DISCOVER_PROBE
        args.probe = DISCOVER_PROBE
    if args.clients and args.cadence != "ours":
        raise SystemExit("--clients drives our node's cadence only")
    if not 0 <= args.clients <= 8 or not 1 <= args.udp_sockets <= 4096:
        raise SystemExit("--clients 0..8, --udp-sockets 1..4096")
    if not 1 <= args.nodes <= 100000 or not 1 <= args.steady <= 300 or not 0 <= args.stall <= 120 \
            or not 1 <= args.connections <= 15000 or not 0 <= args.interval <= 300:
        raise SystemExit("--nodes 1..100000, --steady 1..300, --stall 0..120, --connections 1..15000, "
                         "--interval 0..300")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
