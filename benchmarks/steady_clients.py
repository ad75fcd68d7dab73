#!/usr/bin/env python3
"""
The steady state of ``registry_load.py --clients N``: our node's cadence
driven from N load-client processes, with every steady-state request signed
before the clock starts.

At 100,000 nodes our node's cadence is 2,000 signed heartbeats and 6,667
unsigned Discovers a second (before 2026-12-07, and with
``--discover-after-heartbeat``: 4,000 signed heartbeats, 4,000 signed
Discovers and the same unsigned ones a second); one
asyncio process cannot sign and send that while the rendezvous runs on the
same 2 cores (it reached 2,453 heartbeats a second, heartbeat p50 11.6 s).
So:

* each client process owns the nodes ``k`` with ``k % N == j`` and its share
  of the persistent connections (``--connections / N``, nodes sharing them
  past that, as in one process) and of ``--udp-sockets`` UDP sockets;
* every heartbeat and signed Discover of the run is made before it starts,
  with the timestamp of the moment it is due (node ``k``'s ``m``-th
  heartbeat at ``start + k * interval / n + m * interval``, as one process
  spreads them), and sent at that moment, as the node would have signed it
  then: the registry's ``auth.ts`` and the beacon's proof timestamp are
  checked against its clock (within 120 s) and the nonces are fresh, so the
  server does exactly the work it would do for live nodes;
* before the cadence, each node's signed Discover (closed loop), as our node
  sends it on registration, so the beacon holds every node's endpoint;
* the signed Discover goes after the heartbeat's answer when that answer's
  ``endpoint`` (what the beacon holds for the node) is missing or not the
  node's UDP socket, as our node sends it (``pilot/node/core.py``:
  ``_heartbeat_ok``): in the first interval, as on registration, and not
  after; with ``--discover-after-heartbeat`` after every answer (the node
  before 2026-12-07); and each node's unsigned Discover every ``--probe``
  seconds;
* each client reports what it was asked to send in the measured window and
  what it sent, how late (the send against its due time), its own CPU, and
  the heartbeats' latencies; ``registry_load.py`` merges them and prints the
  server's CPU and RSS beside whether the clients kept the cadence.

A client is started as ``python3 benchmarks/steady_clients.py SPEC.json``;
it reads its start time from stdin and prints JSON lines.  Only 127.0.0.1 is
a target; every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Callable

from nacl.bindings import crypto_sign

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from registry_load import DEADLINE, HOST, Beacon, Conn, Fleet, our_interval  # noqa: E402
from procstat import pct, rss_mb  # noqa: E402

from pilot.wire.beacon import Discover, with_proof  # noqa: E402
from pilot.wire.registry import encode_frame, sign_request  # noqa: E402

#: Signed Discovers on registration (:func:`prove`): at most this many unanswered, for at most this long (s).
PROVE_WINDOW = 64
PROVE_DEADLINE = 180.0
#: The send loop's period: a request goes at most this late on an idle client.
TICK = 0.02
#: A client kept the cadence if it sent this share of what was due in the window...
KEPT_SHARE = 0.99
#: ... and 99 % of its sends went at most this late (s).
KEPT_LAG = 0.5
#: The server kept up if half its heartbeats were answered within this (s) and its beacon's
#: socket dropped at most 1 % of the datagrams.
SERVED_P50 = 0.1


def plan(spec: dict[str, Any], start: float) -> tuple[list[tuple[float, int, bytes, bytes]], list[float]]:
    """
    This client's heartbeats (due time, node, frame, the signed Discover sent after its answer), every
    one signed now with its due time, in due order; and its unsigned Discovers' due times.
    """
    n, j, clients = spec["nodes"], spec["client"], spec["clients"]
    interval, probe, end = spec["interval"], spec["probe"], start + spec["warmup"] + spec["steady"]
    fleet = Fleet(n, "ours")
    ids = spec["ids"]
    beats: list[tuple[float, int, bytes, bytes]] = []
    probes: list[float] = []
    for k in range(j, n, clients):
        sign = signer(fleet, k)
        due = start + k * interval / n
        while due < end:
            ts = int(due * 1000)
            msg = sign_request({"type": "heartbeat", "node_id": ids[k]}, sign, ts, os.urandom(16),
                               legacy=False)
            discover = with_proof(Discover(ids[k]).base, sign, ts, os.urandom(8))
            beats.append((due, k, encode_frame(msg), discover))
            due += interval
        if probe > 0:
            due = start + k * probe / n
            while due < end:
                probes.append(due)
                due += probe
    beats.sort(key=lambda b: b[0])
    probes.sort()
    return beats, probes


async def prove(spec: dict[str, Any], socks: list[tuple[Any, Beacon]]) -> int:
    """
    Each node's signed Discover on registration, as our node sends it, from its UDP socket: the
    beacon then holds every node's endpoint when the cadence starts.  A closed loop (at most
    ``PROVE_WINDOW`` unanswered), so that a beacon buffer is never what decides; bounded by
    ``PROVE_DEADLINE``.  Returns how many the beacon answered.
    """
    n, j, clients = spec["nodes"], spec["client"], spec["clients"]
    fleet = Fleet(n, "ours")
    ids = spec["ids"]
    mine = list(range(j, n, clients))
    replies = lambda: sum(p.replies for _, p in socks)  # noqa: E731
    base = replies()
    deadline = time.time() + PROVE_DEADLINE
    sent = 0
    while sent < len(mine) and time.time() < deadline:
        while sent < len(mine) and sent - (replies() - base) < PROVE_WINDOW:
            k = mine[sent]
            socks[k % len(socks)][0].sendto(with_proof(Discover(ids[k]).base, signer(fleet, k),
                                                       int(time.time() * 1000), os.urandom(8)))
            sent += 1
        await asyncio.sleep(0.001)
    while replies() - base < sent and time.time() < deadline:
        await asyncio.sleep(0.01)
    return replies() - base


def signer(fleet: Fleet, k: int) -> Callable[[bytes], bytes]:
    """Node ``k``'s signing function (its key derived once)."""
    secret = fleet.secret(k)

    def sign(message: bytes) -> bytes:
        return crypto_sign(message, secret)[:64]
    return sign


async def client(spec: dict[str, Any]) -> None:
    """One load client: connect, report ready, sign the run once told its start, run it, report."""
    loop = asyncio.get_running_loop()
    conns = [await Conn.open(spec["port"]) for _ in range(spec["connections"])]
    socks = [await loop.create_datagram_endpoint(Beacon, remote_addr=(HOST, spec["beacon_port"]))
             for _ in range(spec["udp_sockets"])]
    proved = 0 if spec["discover_after_heartbeat"] else await prove(spec, socks)
    print(json.dumps({"ready": len(conns), "udp": len(socks), "proved": proved}), flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    start = float(json.loads(line)["start"])
    t_sign = time.perf_counter()
    beats, probes = plan(spec, start)
    print(json.dumps({"signed": len(beats), "sign_s": time.perf_counter() - t_sign,
                      "spare_s": start - time.time()}), flush=True)
    window, end = start + spec["warmup"], start + spec["warmup"] + spec["steady"]
    nconn, nsock = len(conns), len(socks)
    probe = Discover(0).base
    hb_lat: list[float] = []
    lags: list[float] = []
    counts = {"asked": 0, "sent": 0, "probes_asked": 0, "probes_sent": 0, "answered": 0, "errors": 0,
              "datagrams": 0, "signed": 0}
    always = bool(spec["discover_after_heartbeat"])
    # what the beacon records for a node whose Discovers come from socket i: its address
    seen = ["%s:%d" % transport.get_extra_info("sockname")[:2] for transport, _ in socks]
    pending: set[asyncio.Future[Any]] = set()

    def answered(sent_at: float, in_window: bool, k: int, disc: bytes, fut: asyncio.Future[Any]) -> None:
        pending.discard(fut)
        if fut.cancelled() or fut.exception() is not None or fut.result().get("type") == "error":
            counts["errors"] += 1
            return
        counts["answered"] += 1
        if in_window:
            hb_lat.append(round((time.time() - sent_at) * 1000.0, 2))
        if always or fut.result().get("endpoint") != seen[k % nsock]:
            # the node's signed Discover after its heartbeat's answer: the beacon holds none or another
            socks[k % nsock][0].sendto(disc)
            counts["datagrams"] += 1
            counts["signed"] += in_window

    for due, *_ in beats:
        counts["asked"] += window <= due < end
    counts["probes_asked"] = sum(1 for due in probes if window <= due < end)
    # the client's own stalls, which a heartbeat's latency measured here would include: its garbage
    # collections and how late its send loop woke, in the window
    pauses: list[float] = []
    wakes: list[float] = []
    gc_began = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_began[0] = time.perf_counter()
        elif window <= time.time() < end:
            pauses.append((time.perf_counter() - gc_began[0]) * 1000.0)
    gc.callbacks.append(on_gc)
    while time.time() < start:
        await asyncio.sleep(min(0.05, start - time.time()))
    cpu0 = cpu_at_window = time.process_time()
    hb = pr = 0
    slept = 0.0
    while True:
        now = time.time()
        if now >= end:
            break
        if slept and now >= window:
            wakes.append((time.perf_counter() - slept - TICK) * 1000.0)
        if cpu_at_window == cpu0 and now >= window:
            cpu_at_window = time.process_time()
        while hb < len(beats) and beats[hb][0] <= now:
            due, k, frame, disc = beats[hb]
            hb += 1
            in_window = window <= due < end
            if in_window:
                counts["sent"] += 1
                lags.append(now - due)
            fut = conns[k % nconn].request_frame(frame)
            pending.add(fut)
            fut.add_done_callback(functools.partial(answered, now, in_window, k, disc))
        while pr < len(probes) and probes[pr] <= now:
            due = probes[pr]
            socks[pr % nsock][0].sendto(probe)
            counts["datagrams"] += 1
            if window <= due < end:
                counts["probes_sent"] += 1
                lags.append(now - due)
            pr += 1
        slept = time.perf_counter()
        await asyncio.sleep(TICK)
    gc.callbacks.remove(on_gc)
    cpu = (time.process_time() - cpu_at_window) / max(1e-9, end - window)
    if pending:
        await asyncio.wait(pending, timeout=min(DEADLINE, 30))
    await asyncio.sleep(0.5)
    print(json.dumps(dict(counts, cpu=cpu, lag_p99=pct(lags, 99), lag_max=max(lags, default=float("nan")),
                          replies=sum(p.replies for _, p in socks) - proved, rss=rss_mb(os.getpid()),
                          gc_ms=sum(pauses), gc_max=max(pauses, default=0.0), wake_p99=pct(wakes, 99),
                          wake_max=max(wakes, default=0.0), lat=hb_lat)), flush=True)
    for c in conns:
        c.close()
    for transport, _ in socks:
        transport.close()


# --- the parent's side (registry_load.py) ----------------------------------------------------------------

def run_clients(args: Any, server: Any, fleet: Fleet, figures: dict[str, float]) -> None:
    """
    The steady state from ``args.clients`` processes; prints the server's CPU and RSS over the window
    beside the clients' cadence (asked against sent, how late) and their CPU.
    """
    n, clients = fleet.n, args.clients
    interval = args.interval or our_interval(args)
    warmup = interval if args.warmup < 0 else args.warmup
    conns = min(n, args.connections)
    tmp = os.path.dirname(server.store)
    procs: list[subprocess.Popen[str]] = []
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    per_client = -(-conns // clients)
    if per_client + args.udp_sockets + 64 > nofile:
        raise SystemExit(f"{per_client} connections per client need more than ulimit -n {nofile}: "
                         "more --clients, or fewer --connections")
    try:
        for j in range(clients):
            spec = {"nodes": n, "client": j, "clients": clients, "ids": fleet.ids, "interval": interval,
                    "probe": args.probe, "warmup": warmup, "steady": args.steady,
                    "discover_after_heartbeat": args.discover_after_heartbeat,
                    "port": server.registry_port,
                    "beacon_port": server.beacon_port, "udp_sockets": max(1, args.udp_sockets // clients),
                    "connections": len(range(j, conns, clients))}
            path = os.path.join(tmp, f"client-{j}.json")
            with open(path, "w") as f:
                json.dump(spec, f)
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), path],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        ready = [_line(p) for p in procs]
        if not args.discover_after_heartbeat:
            print(f"  (each node's signed Discover, as on registration: the beacon answered "
                  f"{sum(r['proved'] for r in ready)} of {n})", flush=True)
        time.sleep(1)
        rss_idle = server.rss_mb()
        # a heartbeat and its Discover take ~85 µs to sign and encode on one core of this machine (the
        # key ~30 µs more, once a node); the clients share the 2 cores with others (a run at load 4
        # needed more than twice that): leave three times that (up to 4 times on a busier machine:
        # no more, or the persistent connections idle past the registry's 300 s before the cadence), +3 s
        pairs = n * (warmup + args.steady) / interval + n
        slack = min(4.0, max(3.0, os.getloadavg()[0]))
        start = time.time() + 3.0 + slack * pairs * 100e-6 / min(clients, os.cpu_count() or 1)
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(json.dumps({"start": start}) + "\n")
            p.stdin.flush()
        print(f"  ({len(procs)} clients connected; signing; the cadence starts at "
              f"{time.strftime('%H:%M:%S', time.gmtime(start))} UTC, measured from "
              f"{time.strftime('%H:%M:%S', time.gmtime(start + warmup))} for {args.steady:g} s)", flush=True)
        signed = [_line(p) for p in procs]
        late = [s for s in signed if s["spare_s"] < 0]
        if late:
            raise SystemExit(f"a client finished signing {-late[0]['spare_s']:.1f} s after the start: "
                             "run again on a quieter machine")
        window, end = start + warmup, start + warmup + args.steady
        time.sleep(max(0.0, start - time.time()))
        drops0 = udp_drops(server.beacon_port)
        cpu_start = server.cpu_seconds()
        time.sleep(max(0.0, window - time.time()))
        cpu0, load0 = server.cpu_seconds(), os.getloadavg()[0]
        us0 = user_system(server.proc.pid)
        first_cpu = (cpu0 - cpu_start) / warmup * 100.0
        time.sleep(max(0.0, end - time.time()))
        cpu = (server.cpu_seconds() - cpu0) / args.steady * 100.0
        system = (user_system(server.proc.pid)[1] - us0[1]) / args.steady * 100.0
        rss, load1 = server.rss_mb(), os.getloadavg()[0]
        results = [_line(p, timeout=DEADLINE) for p in procs]
        drops = [b - a for a, b in zip(drops0, udp_drops(server.beacon_port))]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            p.wait(30)
    total = {key: sum(r[key] for r in results) for key in
             ("asked", "sent", "probes_asked", "probes_sent", "answered", "errors", "datagrams", "replies",
              "signed")}
    lat = [x for r in results for x in r["lat"]]
    lag_p99 = max(r["lag_p99"] for r in results)
    client_cpu = sum(r["cpu"] for r in results) * 100.0
    kept = (total["sent"] >= KEPT_SHARE * total["asked"]
            and total["probes_sent"] >= KEPT_SHARE * total["probes_asked"] and lag_p99 <= KEPT_LAG)
    asked_rate, sent_rate = total["asked"] / args.steady, total["sent"] / args.steady
    # the server kept up if it answered the heartbeats promptly and its beacon read every datagram
    # (a starved reactor leaves the beacon's socket buffer full: the kernel drops, the server's CPU
    # then omits the work it never saw)
    served = pct(lat, 50) <= SERVED_P50 * 1000 and drops[0] <= (1 - KEPT_SHARE) * total["datagrams"]
    print(f"  steady state, {n} nodes on {conns} connections from {clients} client processes (signed "
          f"before the start: {sum(s['sign_s'] for s in signed):.0f} s of signing), heartbeat "
          + ("+ signed discover " if args.discover_after_heartbeat else "")
          + f"every {interval:g} s, unsigned discover every {args.probe:g} s, for {args.steady:g} s "
          f"after {warmup:g} s of it (server CPU over those: {first_cpu:.1f}% of one core):")
    print(f"    clients: heartbeats {sent_rate:.0f}/s of {asked_rate:.0f}/s asked, unsigned discovers "
          f"{total['probes_sent'] / args.steady:.0f}/s of {total['probes_asked'] / args.steady:.0f}/s, "
          f"signed discovers {total['signed'] / args.steady:.0f}/s, "
          f"sends late by p99 {lag_p99 * 1000:.0f} ms "
          f"max {max(r['lag_max'] for r in results) * 1000:.0f} ms; "
          f"client CPU {client_cpu:.0f}% of one core (all {clients}), RSS "
          f"{sum(r['rss'] for r in results):.0f} MB: " + ("KEPT the cadence" if kept else
                                                         "FELL BEHIND: the server's figures are not its cost "
                                                         "at this cadence"))
    print(f"    server RSS {rss:.1f} MB (idle with connections: {rss_idle:.1f} MB), "
          f"CPU {cpu:.1f}% of one core "
          f"({system:.1f}% in the kernel; load average {load0:.2f} -> {load1:.2f}); "
          f"heartbeats answered {total['answered']}, "
          f"errors {total['errors']}, beacon replies {total['replies']} of {total['datagrams']} datagrams "
          f"(dropped for a full buffer: {drops[0]} at the beacon, {drops[1]} at the clients)")
    print(f"    the clients' own stalls in the window: garbage collection "
          f"{sum(r['gc_ms'] for r in results):.0f} ms in all, "
          f"longest {max(r['gc_max'] for r in results):.1f} ms; "
          f"send loop woke late by p99 {max(r['wake_p99'] for r in results):.1f} ms, "
          f"max {max(r['wake_max'] for r in results):.1f} ms", flush=True)
    print(f"    heartbeat p50 {pct(lat, 50):.2f} ms p99 {pct(lat, 99):.2f} ms "
          f"max {max(lat, default=0):.1f} ms: "
          + ("the server KEPT UP" if served else "the server FELL BEHIND (its CPU is what it got, not what "
                                                 "the cadence costs)"), flush=True)
    figures.update({"window start": window, "window end": end})
    figures.update({"steady CPU %": cpu, "steady RSS MB": rss, "heartbeat p99 ms (steady)": pct(lat, 99),
                    "steady heartbeats asked /s": asked_rate, "steady heartbeats sent /s": sent_rate,
                    "steady client kept cadence": float(kept), "steady server kept up": float(served)})


def user_system(pid: int) -> tuple[float, float]:
    """The process's user and system (kernel: its socket calls, loopback delivery) CPU seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def udp_drops(port: int) -> tuple[int, int]:
    """Datagrams the kernel dropped (a full receive buffer) so far: at the UDP socket bound to ``port``
    on 127.0.0.1 (the beacon's), and at the sockets connected to it (the clients')."""
    mine = theirs = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, drops = fields[1], fields[2], int(fields[-1])
            if local == f"0100007F:{port:04X}":
                mine += drops
            elif remote == f"0100007F:{port:04X}":
                theirs += drops
    return mine, theirs


def _line(proc: subprocess.Popen[str], timeout: float = 300.0) -> dict[str, Any]:
    """The next JSON line a client prints (it prints nothing else; each bounds its own run: ``timeout``
    is for its exit status, if it exited)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a load client exited ({proc.wait(timeout)}) before it reported")
    out: dict[str, Any] = json.loads(line)
    return out


def main() -> None:
    if len(sys.argv) != 2 or not os.path.isfile(sys.argv[1]):
        raise SystemExit("usage: steady_clients.py SPEC.json (a load client: registry_load.py --clients N "
                         "starts it with the spec it writes)")
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    asyncio.run(asyncio.wait_for(client(spec), DEADLINE + spec["warmup"] + spec["steady"]))


if __name__ == "__main__":
    main()
