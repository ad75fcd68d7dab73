#!/usr/bin/env python3
"""
What the store's journal costs per heartbeat, in process (no sockets), at N
nodes: the CPU the reactor spends taking a record (``Feed.take``), the CPU
the writer thread spends applying it to the store mirror and the record's
size, for the heartbeats of ``--every`` seconds at our node's cadence (a
heartbeat every ``--interval`` s: ``Registry.touch`` and the ``auth_ts`` it
sets), and from the bytes a second how often the journal reaches
``JOURNAL_LIMIT`` (a compaction: the whole store rendered in the writer
thread, whose CPU is printed too).

    python3 benchmarks/heartbeat_journal.py --nodes 100000

CPU time (``time.process_time``), the least of ``--rounds``: load-insensitive
enough to compare two trees on a busy machine (run it from each tree's root).

``--convoy``: what a compaction in the writer thread does to the reactor's
thread.  A stand-in for a reactor pass (``--syscalls`` small sends and reads
on a socket pair, each a system call that lets go of the interpreter) is
timed in the main thread while a thread renders the store mirror (as the
store's writer thread does at a compaction), and with no render, in turn,
``--rounds`` times each; and (``--fork``) while a thread waits for a forked
child that renders and writes the store file (``pilot.services.forked``, as
the rendezvous compacts), with the fork's own duration (the interpreter held
while the page tables are copied), the child's CPU, its peak RSS and the
memory it copied (``Private_Dirty``, copy-on-write).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.getcwd() if os.path.isdir(os.path.join(os.getcwd(), "pilot")) else ROOT)

from twisted.internet.task import Clock  # noqa: E402

from pilot.server.compaction import StateView, StoreMirror  # noqa: E402
from pilot.server.journal import Feed, Tracker  # noqa: E402
from pilot.server.registry import Registry  # noqa: E402
from pilot.server.state import Node, RegistryState  # noqa: E402
from pilot.services.durable import JOURNAL_LIMIT  # noqa: E402
from pilot.services.forked import ForkedStoreWriter, write_in_thread  # noqa: E402

T0 = 1.78e9


def cpu_ms(f: Callable[[], Any]) -> tuple[Any, float]:
    c = time.process_time()
    out = f()
    return out, (time.process_time() - c) * 1000.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=100000)
    p.add_argument("--interval", type=float, default=50.0, help="a node's heartbeat interval (s)")
    p.add_argument("--every", type=float, default=5.0, help="seconds of heartbeats a record holds (touch_delay)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--convoy", action="store_true", help="the reactor's passes during a compaction (above)")
    p.add_argument("--fork", action="store_true", help="with --convoy: a forked child's compaction too")
    p.add_argument("--syscalls", type=int, default=100, help="with --convoy: send/recv pairs in a pass")
    p.add_argument("--switch", type=float, default=0.0,
                   help="with --convoy: the switch interval (s; default the store writer's SWITCH_INTERVAL)")
    args = p.parse_args()
    if not 1 <= args.nodes <= 200000 or not 1 <= args.rounds <= 10:
        raise SystemExit("--nodes 1..200000, --rounds 1..10")
    n = args.nodes
    state = RegistryState(created=T0)
    for i in range(1, n + 1):
        key = i.to_bytes(4, "big") * 8
        state.nodes[i] = Node(i, key, real_addr=f"127.0.0.1:{20000 + i % 40000}", last_seen=T0,
                              hostname=f"bench-{i}")
        state.index_key(key, i)
        state.auth_ts[i] = int(T0 * 1000)
    clock = Clock()
    clock.advance(T0)
    registry = Registry(clock, state=state)
    feed = Feed(Tracker(state))
    reader = object()
    feed.join(reader)
    mirror = StoreMirror(StateView.of(state))
    mirror.build()
    per_record = int(n * args.every / args.interval)
    takes, applies, sizes = [], [], []
    node = 1
    for r in range(args.rounds):
        clock.advance(args.every)
        for _ in range(per_record):
            registry.touch(state.nodes[node])
            state.auth_ts[node] = int(clock.seconds() * 1000)
            node = node % n + 1
        delta, took = cpu_ms(lambda: feed.take(reader))
        body, applied = cpu_ms(lambda: mirror.apply({"seq": r + 1, **(delta or {})}))
        takes.append(took)
        applies.append(applied)
        sizes.append(len(body))
    renders = [cpu_ms(mirror.render)[1] for _ in range(min(args.rounds, 2))]
    rate = min(sizes) / args.every
    print(f"{n} nodes, a heartbeat every {args.interval:g} s, a record every {args.every:g} s "
          f"({per_record} heartbeats), python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}, "
          f"pilot from {os.path.dirname(os.path.dirname(os.path.abspath(sys.modules['pilot'].__file__ or '')))}")
    print(f"  the reactor's Feed.take: {min(takes):.1f} ms CPU a record (least of {args.rounds})")
    print(f"  the writer's mirror.apply: {min(applies):.1f} ms CPU a record; record {min(sizes) / 1e6:.3f} MB")
    print(f"  the journal grows {rate / 1e3:.1f} kB/s: a compaction every {JOURNAL_LIMIT / max(rate, 1):.0f} s "
          f"({JOURNAL_LIMIT / 2**20:.0f} MB), each rendering the store: {min(renders):.0f} ms CPU in the writer")
    if args.convoy:
        convoy(mirror, args)


def convoy(mirror: StoreMirror, args: argparse.Namespace) -> None:
    """The reactor stand-in's passes while the mirror renders in a thread, and with no render."""
    from pilot.services.durable import SWITCH_INTERVAL
    switch = args.switch or SWITCH_INTERVAL
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)

    def one_pass() -> float:
        t0 = time.perf_counter()
        for _ in range(args.syscalls):
            a.send(b"x")
            b.recv(16)
        return (time.perf_counter() - t0) * 1000.0

    folder = tempfile.mkdtemp(prefix="heartbeat-journal-")
    store = os.path.join(folder, "registry.json")
    dirty = os.path.join(folder, "private-dirty")

    def render_and_measure(m: StoreMirror, path: str) -> None:
        """The child's work (the rendezvous' own), then the memory it copied, for the parent to read."""
        write_in_thread(m, path)
        with open("/proc/self/smaps_rollup") as f, open(dirty, "w") as out:
            out.write(f.read())
    forked = ForkedStoreWriter(write=render_and_measure)
    children: list[tuple[float, float, int, int]] = []

    def in_child() -> None:
        forked(mirror, store)
        with open(dirty) as f:
            private = sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty"))
        children.append((forked.fork_seconds, forked.child_cpu, forked.child_maxrss, private))

    def passes(work: Callable[[], Any] | None) -> list[float]:
        out: list[float] = []
        if work is None:
            deadline = time.perf_counter() + 0.5
            while time.perf_counter() < deadline:
                out.append(one_pass())
            return out
        thread = threading.Thread(target=work, name="render")
        thread.start()
        out.append(one_pass())  # at least one (a small store is rendered sooner)
        while thread.is_alive():
            out.append(one_pass())
        thread.join()
        return out
    print(f"  --convoy: a pass of {args.syscalls} send+recv pairs on a socket pair, switch interval "
          f"{switch * 1000:g} ms; the passes' p50 / p99 / max (ms)")
    sys.setswitchinterval(switch)
    works: list[tuple[str, Callable[[], Any] | None]] = [("no render", None), ("a render in a thread", mirror.render)]
    if args.fork:
        works.append(("a forked child's render+write", in_child))
    for r in range(args.rounds):
        for label, work in works:
            got = sorted(passes(work))
            pick = lambda q: got[min(len(got) - 1, int(q * len(got)))]  # noqa: E731
            print(f"    round {r + 1}, {label}: {pick(0.5):.2f} / {pick(0.99):.2f} / {got[-1]:.2f} ms, "
                  f"{len(got)} passes")
    if children:
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        print(f"  --fork: this process's RSS {rss / 1024:.0f} MB; store file {os.path.getsize(store) / 1e6:.1f} MB")
        for took, cpu, peak, private in children:
            print(f"    os.fork {took * 1000:.1f} ms (interpreter held); the child: {cpu * 1000:.0f} ms CPU, "
                  f"peak RSS {peak / 1024:.0f} MB, copied (Private_Dirty) {private / 1024:.0f} MB")
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
