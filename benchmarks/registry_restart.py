#!/usr/bin/env python3
"""
Restart benchmark of the rendezvous with a large store (issue 16), on 127.0.0.1.

Builds a store of N nodes directly (no registration over the wire: the
store's own writer formats it, and writes its sidecar as a clean stop does;
``--no-sidecar`` removes it before each start), then

* **in process**, times the parts of a start: reading and parsing the JSON,
  checking and building every node (the start without a sidecar), loading
  the same store from its sidecar, the registry's start, the store writer's
  set-up (tracker and the compaction's view), each the least of ``--rounds``;
* starts ``python -m pilot rendezvous start --store STORE`` ``--runs`` times
  and measures the time from spawn to the first answered ``lookup`` and the
  RSS then;
* with ``--stall S``, for S seconds sends ``lookup``s one at a time on one
  connection while signed ``set_hostname``s change the state every
  ``--change-interval`` seconds on another (every change is a store write:
  a journal record, and compactions), and prints the longest wait; then the
  server's CPU over ``--idle`` seconds with nothing asked (what the store
  and the timers cost on their own) and its RSS.

    python3 benchmarks/registry_restart.py --nodes 10000
    python3 benchmarks/registry_restart.py --nodes 100000 --stall 10
    python3 benchmarks/registry_restart.py --nodes 10000 --rounds 0 --tree /other/checkout   # before/after

The rendezvous runs with its bytecode compiled once and kept, as an
installed package has it (``--no-bytecode-cache``: compiled at every start
when the environment sets PYTHONDONTWRITEBYTECODE, as this machine does).

On a busy machine the wall-clock figures grow with the others' load; the
CPU figures (the parts' ``process_time``, the server's CPU at its first
answer) much less.

Every loop is bounded in count and in time; only 127.0.0.1 is ever a target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import registry_load  # noqa: E402
from procstat import cpu_seconds, pct, rss_mb  # noqa: E402
from registry_load import DEADLINE, Conn, Fleet, Server, first_lookup  # noqa: E402

from pilot.address import node_id_for_key  # noqa: E402

#: nodes whose keys the benchmark holds (they sign the changes); the others' keys are made up
SIGNERS = 16


def build_store(path: str, n: int) -> tuple[Fleet, list[int], int]:
    """Write a store of ``n`` nodes to ``path``; the signing nodes, their ids, and one id to look up."""
    from pilot.server.state import Node as StoreNode, RegistryState
    state = RegistryState(created=time.time())
    now = time.time()
    signers = Fleet(min(SIGNERS, n), "ours")
    ids: list[int] = []
    for i in range(n):
        key = signers.pub(i) if i < signers.n else \
            hashlib.blake2b(i.to_bytes(4, "big"), digest_size=32).digest()
        node_id = node_id_for_key(key, lambda x: x in state.nodes)
        state.nodes[node_id] = StoreNode(
            id=node_id, public_key=key, real_addr=f"127.0.0.1:{10000 + i % 50000}", last_seen=now - i % 25,
            hostname=f"host-{i}" if i % 2 else "", tags=["bench"] if i % 4 == 0 else [],
            local_addr=f"10.0.{i // 250 % 250}.{i % 250}:4000")
        state.index_key(key, node_id)
        if i < signers.n:
            signers.ids[i] = node_id
            ids.append(node_id)
    state.rebuild_indexes()
    data = state.to_bytes()
    with open(path, "wb") as f:
        f.write(data)
    try:  # as a clean stop leaves it: the store and its sidecar (a tree without sidecars ignores it)
        from pilot.server import sidecar
    except ImportError:
        pass
    else:
        with open(sidecar.path_of(path), "wb") as f:
            f.write(sidecar.encode(state, data))
    return signers, ids, next(iter(state.nodes))


def in_process(path: str, rounds: int) -> None:
    """The parts of a start, in this process (least of ``rounds``)."""
    from twisted.internet.task import Clock
    from twisted.internet.defer import succeed

    from pilot.persist import read_json_object
    from pilot.server.registry import Registry
    from pilot.server.state import RegistryState
    from pilot.services.durable import DurableWriter
    from pilot.services.store import collector_paused, load
    best: dict[str, tuple[float, float]] = {}

    def timed(name: str, f: Any) -> Any:
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        with collector_paused():  # as in a start (pilot.tap.build_service)
            out = f()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        best[name] = min(best.get(name, (1e9, 1e9)), (cpu, wall))
        return out

    for _ in range(rounds):
        value = timed("read and parse the JSON", lambda: read_json_object(path))
        state = timed("check and build the nodes (from_json)", lambda: RegistryState.from_json(value))
        del value, state
        state = timed("load from the sidecar (all of it)", lambda: load(path).state)
        clock = Clock()
        clock.advance(time.time())
        timed("the registry's start (last_seen floors)", lambda: Registry(clock, state=state))
        writer = timed("the store writer's set-up", lambda: DurableWriter(
            os.path.join(os.path.dirname(path), "scratch.json"), state, Clock(), lambda f: succeed(f())))
        writer.close()
        del writer, state
    for name, (cpu, wall) in best.items():
        print(f"  in process: {name:<40} {cpu * 1000:7.0f} ms CPU ({wall * 1000:.0f} ms wall)")


def compaction_stall(path: str, seconds: float) -> None:
    """
    In process, on a real reactor: the store writer (its own thread, as in the
    rendezvous) compacting the whole store after every change (a journal limit
    of 0), a change every 0.1 s, and a 5 ms timer on the reactor: how late it
    fires is how long the reactor waited behind the writer thread.
    """
    from twisted.internet import reactor, task

    from pilot.services.durable import DurableWriter, WriterThread
    from pilot.services.store import load_store
    state = load_store(path)
    assert state is not None
    writer_thread = WriterThread(reactor)
    writer = DurableWriter(os.path.join(os.path.dirname(path), "compacted.json"), state, reactor,
                           writer_thread.run, journal_limit=0)
    nodes = list(state.nodes.values())[:1000]
    late: list[float] = []
    last = [time.perf_counter()]
    changes = [0]

    def tick() -> None:
        now = time.perf_counter()
        late.append((now - last[0] - 0.005) * 1000.0)
        last[0] = now

    def change() -> None:
        node = nodes[changes[0] % len(nodes)]
        node.hostname = f"compacted-{changes[0]}"
        changes[0] += 1
        writer.changed()

    ticker, changer = task.LoopingCall(tick), task.LoopingCall(change)

    def begin() -> None:
        writer_thread.start()
        ticker.start(0.005)
        changer.start(0.1)
        reactor.callLater(seconds, end)

    def end() -> None:
        ticker.stop()
        changer.stop()
        writer.idle().addCallback(lambda _: reactor.stop())

    reactor.callWhenRunning(begin)
    reactor.run()
    writer.close()
    print(f"  in process: a compaction after each of {changes[0]} changes ({writer.snapshots} done): "
          f"the reactor's 5 ms timer late by p50 {pct(late, 50):.2f} ms, p99 {pct(late, 99):.2f} ms, "
          f"max {max(late):.2f} ms")


async def stall(port: int, signers: Fleet, ids: list[int], seconds: float, every: float) -> int:
    probe, changer = await Conn.open(port), await Conn.open(port)
    lat: list[float] = []
    began = time.perf_counter()
    end = began + seconds
    worst_at = 0.0
    changes = 0

    async def change() -> None:
        nonlocal changes
        while time.perf_counter() < end:
            k = changes % signers.n
            msg = {"type": "set_hostname", "node_id": signers.ids[k], "hostname": f"{signers.name(k)}-s{changes}"}
            reply = await asyncio.wait_for(changer.request(signers.signed(k, msg)), DEADLINE)
            if reply.get("type") == "error":
                raise SystemExit(f"set_hostname refused: {reply}")
            changes += 1
            await asyncio.sleep(every)

    changing = asyncio.get_running_loop().create_task(change())
    i = 0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        await asyncio.wait_for(probe.request({"type": "lookup", "node_id": ids[i % len(ids)]}), DEADLINE)
        lat.append((time.perf_counter() - t0) * 1000.0)
        if lat[-1] >= max(lat):
            worst_at = t0 - began
        i += 1
    await asyncio.wait_for(changing, DEADLINE)
    probe.close()
    changer.close()
    print(f"  lookup behind store writes: {len(lat) / seconds:7.0f}/s   p50 {pct(lat, 50):6.2f} ms   "
          f"p99 {pct(lat, 99):6.2f} ms   max {max(lat):7.2f} ms (sent {worst_at:.2f} s in)   ({changes} changes)")
    return changes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=10000)
    p.add_argument("--runs", type=int, default=3, help="restarts to time")
    p.add_argument("--rounds", type=int, default=3, help="in-process rounds of each part (0: skip)")
    p.add_argument("--stall", type=float, default=0.0, help="seconds of lookups behind changes (0: skip)")
    p.add_argument("--change-interval", type=float, default=0.1, help="seconds between changes in --stall")
    p.add_argument("--compaction", type=float, default=0.0,
                   help="seconds of compactions after every change, in process: the reactor's longest wait")
    p.add_argument("--idle", type=float, default=0.0, help="seconds of idle CPU to measure (0: skip)")
    p.add_argument("--no-bytecode-cache", action="store_true",
                   help="start the rendezvous with this environment's bytecode settings (with "
                        "PYTHONDONTWRITEBYTECODE set, every start compiles every module: not as installed)")
    p.add_argument("--no-sidecar", action="store_true",
                   help="restart without the store's sidecar (removed before each start): the full check")
    p.add_argument("--tree", default=ROOT, help="the source tree whose rendezvous is started (before/after)")
    args = p.parse_args()
    registry_load.ROOT = os.path.abspath(args.tree)
    if not (1 <= args.nodes <= 100000 and 1 <= args.runs <= 10 and 0 <= args.rounds <= 5
            and 0 <= args.stall <= 120 and 0.01 <= args.change_interval <= 10 and 0 <= args.idle <= 120
            and 0 <= args.compaction <= 60):
        raise SystemExit("--nodes 1..100000, --runs 1..10, --rounds 0..5, --stall 0..120, --idle 0..120")
    tmp = tempfile.mkdtemp(prefix="pilot-restart-")
    server = Server(os.path.join(tmp, "registry.json"))
    try:
        print(f"pilot rendezvous restart benchmark: {args.nodes} nodes, python {sys.version.split()[0]}, "
              f"{os.cpu_count()} cores")
        t0 = time.perf_counter()
        signers, ids, target = build_store(server.store, args.nodes)
        print(f"  (built the store in {time.perf_counter() - t0:.1f} s: "
              f"{os.path.getsize(server.store) / 1e6:.1f} MB)")
        if args.rounds:
            in_process(server.store, args.rounds)
        if args.compaction:
            compaction_stall(server.store, args.compaction)
        if not args.no_bytecode_cache:
            # as installed: bytecode compiled once and kept (here in the run's folder), whatever
            # PYTHONDONTWRITEBYTECODE says; one start untimed, to compile it
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
            os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(tmp, "pycache")
            server.start()
            server.stop()
        times: list[float] = []
        cpus: list[float] = []
        for run in range(args.runs):
            if args.no_sidecar:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(server.store + ".sidecar")
            server.registry_port = server.beacon_port = 0
            t0 = time.perf_counter()
            server.start()
            listening = time.perf_counter() - t0
            first = first_lookup(server.registry_port, target, t0)
            if first is None:
                raise SystemExit("no lookup was answered within 60 s")
            times.append(first)
            assert server.proc is not None
            cpus.append(cpu_seconds(server.proc.pid))
            print(f"  restart {run + 1}: ports known {listening:.3f} s, first answered lookup {first:.3f} s, "
                  f"its CPU by then {cpus[-1]:.2f} s, RSS {server.rss_mb():.1f} MB")
            if run < args.runs - 1 or not (args.stall or args.idle):
                server.stop()
        print(f"  restart to first answered lookup: best {min(times):.3f} s, median "
              f"{sorted(times)[len(times) // 2]:.3f} s ({len(times)} runs); the server's CPU by then: "
              f"least {min(cpus):.2f} s, median {sorted(cpus)[len(cpus) // 2]:.2f} s")
        if args.stall or args.idle:
            if args.stall:
                asyncio.run(stall(server.registry_port, signers, ids, args.stall, args.change_interval))
            if args.idle:
                assert server.proc is not None
                cpu0 = cpu_seconds(server.proc.pid)
                time.sleep(args.idle)
                cpu = cpu_seconds(server.proc.pid) - cpu0
                print(f"  idle: {cpu / args.idle * 100:.1f}% of a core over {args.idle:.0f} s")
            assert server.proc is not None
            print(f"  RSS now: {rss_mb(server.proc.pid):.1f} MB")
            t0 = time.perf_counter()
            server.stop()
            print(f"  clean stop: {time.perf_counter() - t0:.2f} s; store "
                  f"{os.path.getsize(server.store) / 1e6:.1f} MB")
            with open(server.store, "rb") as f:
                stored = json.loads(f.read())
            print(f"  the store holds {len(stored['nodes'])} nodes after the stop")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
