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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pings", type=int, default=2000, help="pings, one after the other")
    p.add_argument("--profile", action="store_true", help="print cProfile's 25 largest own times")
    args = p.parse_args()
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
