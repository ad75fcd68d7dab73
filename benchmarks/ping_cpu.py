#!/usr/bin/env python3
"""
CPU cost of the reference pilotctl's ping (dial port 7, write ``ping-N``,
read the echo, close) through the node's layers, in one process, without
sockets: the two ``Stack`` + ``Tunnels`` pairs of ``stream_cpu.py`` (real
AES-GCM, real codecs) on its in-memory UDP and injected clock.  Each ping
runs to its end (the FIN exchanged) before the next, as ``pilotctl ping``
does; the figure is CPU microseconds per ping for both ends together, what
the wall-clock p50 of ``benchmarks/tunnel.py`` is made of besides the
kernel and the wake-ups.

    python3 benchmarks/ping_cpu.py --pings 2000
    python3 benchmarks/ping_cpu.py --pings 500 --profile      # cProfile, by own time

With ``--daemons`` it measures the same ping between two real node daemons
on 127.0.0.1 (started as ``benchmarks/tunnel.py`` starts them), both ways
the benchmarks drive it, each ``--rounds`` times: ``compare.py``'s (this
process opens a control-socket stream to b:7, writes ``ping-N``, reads the
echo: timed from the connect request to the whole echo, split at the
connect's reply) and ``tunnel.py``'s (the control socket's ``ping``,
``count`` pings with no pause, timed by daemon a from the dial to the whole
echo), and compare.py's with ``ping-N`` sent behind the connect request
(``open_stream(first=)``, what compare.py does now).  Besides the latencies
it prints each daemon's CPU per ping (utime + stime from ``/proc``), the
figure a busy machine changes least.  TIME_WAIT no longer counts against
port 7's 1,024 connections, so rounds follow each other without a pause.

    python3 benchmarks/ping_cpu.py --daemons --pings 200 --rounds 3
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from twisted.internet.defer import Deferred  # noqa: E402

from pilot.address import Address  # noqa: E402
from pilot.stack.services import Ping  # noqa: E402
from stream_cpu import HeapClock, build  # noqa: E402


def pings(count: int) -> tuple[int, float]:
    """Run ``count`` pings one after the other; (answered, simulated seconds)."""
    clock = HeapClock()
    nodes = build(clock, None)
    answered = 0
    for seq in range(count):
        done: Deferred[float] = Deferred()
        results: list[float] = []
        done.addCallback(results.append)
        nodes[1][0].connect(Address(0, 2), 7, Ping(clock, seq, done))
        while not results and clock.step():
            pass
        answered += len(results)
        # let the close finish (FIN both ways) before the next dial, as pilotctl's ping does
        until = clock.seconds() + 0.01
        while clock.heap and clock.heap[0][0] <= until and clock.step():
            pass
    return answered, clock.seconds()


def daemons(count: int, rounds: int) -> int:
    """Both ways of pinging between two real daemons; see the module docstring."""
    import shutil
    import tempfile

    from compare import Ours
    from procstat import pct
    from tunnel import loadavg

    def cpu(pid: int | None) -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    folder = tempfile.mkdtemp(prefix="pilot-ping-")
    ours = Ours(folder)
    failed = 0
    try:
        ours.start()
        a, b = ours.a, ours.b
        assert a.client is not None
        for round_ in range(1, rounds + 1):
            print(f"round {round_}, load average {loadavg()}")
            for label, first in (("open_stream, write, read", False), ("open_stream(first=), read", True)):
                split: dict[str, list[float]] = {"connect reply": [], "echo after it": [], "total": []}
                before = cpu(a.pid), cpu(b.pid)
                for seq in range(1, count + 1):
                    message = b"ping-%d" % seq
                    t0 = time.perf_counter()
                    stream = ours.open(7, first=message if first else b"")
                    t1 = time.perf_counter()
                    if not first:
                        stream.send(message)
                    echoed = stream.recv_exact(len(message), 10.0)
                    t2 = time.perf_counter()
                    stream.close()
                    failed += echoed != message
                    for name, start, end in (("connect reply", t0, t1), ("echo after it", t1, t2),
                                             ("total", t0, t2)):
                        split[name].append((end - start) * 1000)
                time.sleep(0.3)  # the closes' last packets
                after = cpu(a.pid), cpu(b.pid)
                print(f"  compare.py's ping ({label}): " + ", ".join(
                    f"{name} p50 {pct(v, 50):.3f} / p99 {pct(v, 99):.3f} ms" for name, v in split.items()))
                print(f"    CPU per ping: a {(after[0] - before[0]) / count * 1e6:.0f} us, "
                      f"b {(after[1] - before[1]) / count * 1e6:.0f} us")
            result = a.client.request("ping", {"target": b.address, "count": count, "timeout": 5.0,
                                               "interval": 0}, timeout=60.0)
            time.sleep(0.3)
            later = cpu(a.pid), cpu(b.pid)
            rtts = [r["rtt_ms"] for r in result["results"] if "rtt_ms" in r]
            failed += count - len(rtts)
            print(f"  tunnel.py's ping (control `ping`, interval 0): p50 {pct(rtts, 50):.3f} / "
                  f"p99 {pct(rtts, 99):.3f} ms ({len(rtts)}/{count} answered)")
            print(f"    CPU per ping: a {(later[0] - after[0]) / count * 1e6:.0f} us, "
                  f"b {(later[1] - after[1]) / count * 1e6:.0f} us")
    finally:
        ours.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pings", type=int, default=None,
                   help="pings, one after the other (default 2000; with --daemons 200 a round)")
    p.add_argument("--profile", action="store_true", help="print cProfile's 25 largest own times")
    p.add_argument("--daemons", action="store_true", help="two real daemons on 127.0.0.1 instead")
    p.add_argument("--rounds", type=int, default=2, help="with --daemons: rounds of both ways")
    args = p.parse_args()
    if args.daemons:
        count = 200 if args.pings is None else args.pings
        if not (1 <= count <= 1000 and 1 <= args.rounds <= 10):
            raise SystemExit("with --daemons: --pings 1..1000, --rounds 1..10")
        return daemons(count, args.rounds)
    if args.pings is None:
        args.pings = 2000
    pings(20)  # warm: the first dial looks the peer up and exchanges keys
    profile = cProfile.Profile() if args.profile else None
    started = time.process_time()
    if profile is not None:
        profile.enable()
    answered, _ = pings(args.pings)
    if profile is not None:
        profile.disable()
    cpu = time.process_time() - started
    print(f"{answered} of {args.pings} pings answered; {cpu:.2f} s of CPU: "
          f"{cpu / max(answered, 1) * 1e6:.0f} us per ping for both ends on one core")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    return 0 if answered == args.pings else 1


if __name__ == "__main__":
    sys.exit(main())
