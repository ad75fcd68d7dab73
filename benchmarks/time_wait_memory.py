#!/usr/bin/env python3
"""
Memory of TIME_WAIT (issue 11; ``docs/stack.md``, "TIME_WAIT"), in one
process, no sockets: ``--pings`` pings in a row between two stacks on an
injected clock (the fake tunnel of the tests), each run until its close is
over, then what stays allocated (tracemalloc, after ``gc.collect()``) per
ping while both ends hold it in TIME_WAIT, and the objects the collector
tracks.  Then the size of one TIME_WAIT entry alone (10,000 of them with
distinct keys).

    python3 benchmarks/time_wait_memory.py --pings 1000
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet.task import Clock  # noqa: E402

from pilot.address import Address  # noqa: E402
from tests.stackfakes import A, B, FakeTunnel  # noqa: E402
from tests.test_stack_burst import HeapClock  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pings", type=int, default=1000, help="pings held in TIME_WAIT (1..4000)")
    args = p.parse_args()
    if not 1 <= args.pings <= 4000:
        raise SystemExit("--pings 1..4000")
    clock = HeapClock()
    tunnel = FakeTunnel(clock, delay=0.0002, encode=False)
    a, b = tunnel.add(A), tunnel.add(B)

    def ping(seq: int) -> None:
        results: list[object] = []
        a.ping(B, seq=seq).addBoth(results.append)
        for _ in range(100_000):
            if results:
                break
            clock.advance(0.0001)
        for _ in range(30):  # the close
            clock.advance(0.0001)

    for seq in range(20):
        ping(seq)
    for _ in range(200):  # their TIME_WAIT runs out
        clock.advance(0.1)
    tunnel.log.clear()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for seq in range(args.pings):
        ping(seq)
    tunnel.log.clear()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    waiting = len(getattr(b, "time_waits", ())) or len(b.streams)
    print(f"{args.pings} pings: {held / args.pings:.0f} bytes a ping held on both ends while b holds "
          f"{waiting} in TIME_WAIT; {len(gc.get_objects())} objects tracked by the collector")

    if hasattr(b, "time_waits"):
        from pilot.stack.timewait import TimeWaits
        table = TimeWaits(Clock(), lambda packet: None, lambda: B, collections.Counter(), 10.0)
        count = 10_000
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            table.add((Address(0, 0x10000 + i), 49152 + i % 16000, 7), 0x12345678 + i, 512, True, True)
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / count
        tracemalloc.stop()
        print(f"one TIME_WAIT entry: {per_entry:.0f} bytes ({count} entries, distinct keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
