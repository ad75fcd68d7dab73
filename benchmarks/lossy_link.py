#!/usr/bin/env python3
"""
One stream over a simulated lossy path, per congestion controller: Reno
(loss-driven, the reference's) and BBR (model-based, paced, our default).

Two real ``Connection`` objects (the stream machine as the stack drives it)
are joined by ``tests/machines/simlink.py``: a bottleneck of ``--rate`` MB/s
each way with a tail-dropping queue of ``--queue`` KiB, a one-way delay of
half the RTT, seeded random loss, on ``task.Clock``.  Nothing touches a
socket and nothing waits on real time: the throughput is payload MB over
*simulated* seconds (first write, then close, to last byte delivered,
byte-exact or the run fails), and the CPU figure is process CPU seconds per simulated MB for
both ends together (packet codecs included, no encryption).

    python3 benchmarks/lossy_link.py                   # {reno, bbr} x {0, 1, 5} % x {1, 50} ms
    python3 benchmarks/lossy_link.py --megabytes 16 --seeds 5
    python3 benchmarks/lossy_link.py --rtt 100 --loss 2
    python3 benchmarks/lossy_link.py --segment 1330 --rtt 50     # a 1,500-byte path's segments

    python3 benchmarks/lossy_link.py --controller bbr --loss 5 --rtt 50 --megabytes 104.9 --seeds 1

Each cell is the median of ``--seeds`` runs (different loss patterns); every
run is bounded (``--time-limit``, 300 simulated seconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet.task import Clock  # noqa: E402

from pilot.machines.connection import ConnectionConfig  # noqa: E402
from tests.machines.fakelink import make_pair, pattern  # noqa: E402
from tests.machines.simlink import SimLink, run  # noqa: E402

MB = 1e6


def one(congestion: str, megabytes: float, loss: float, rtt: float, rate: float, queue: int,
        seed: int, limit: float, segment: int) -> tuple[float, float, int]:
    """(simulated MB/s, CPU seconds per MB, retransmissions) of one transfer."""
    clock = Clock()
    link = SimLink(clock, rate=rate, delay=rtt / 2, loss=loss, queue_limit=queue, seed=seed)
    a, b, app_a, app_b = make_pair(clock, link, ConnectionConfig(congestion=congestion))
    a.set_segment_size(segment)
    b.set_segment_size(segment)
    a.open_active()
    if not run(clock, lambda: app_b.made == 1, limit=60):
        raise SystemExit("the handshake did not complete")
    size = int(megabytes * MB)
    data = pattern(size, seed)
    cpu = time.process_time()
    start = clock.seconds()
    a.write(data)
    a.close()  # as a file transfer would: the tail goes without waiting for Nagle
    if not run(clock, lambda: len(app_b.data) >= size, limit=limit):
        raise SystemExit(f"{congestion} at {loss:.0%} loss: {len(app_b.data)} of {size} bytes "
                         f"in {limit:g} simulated seconds")
    elapsed = clock.seconds() - start
    cpu = time.process_time() - cpu
    if bytes(app_b.data) != data:
        raise SystemExit(f"{congestion} at {loss:.0%} loss: the bytes differ")
    return size / elapsed / MB, cpu / (size / MB), a.stats.retransmits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megabytes", type=float, default=8.0, help="MB (10^6 B) per transfer")
    p.add_argument("--seeds", type=int, default=3, help="runs per cell (median shown)")
    p.add_argument("--rate", type=float, default=10.0, help="bottleneck, MB/s")
    p.add_argument("--queue", type=int, default=256, help="bottleneck queue, KiB")
    p.add_argument("--loss", type=float, action="append", help="percent (repeatable; default 0, 1, 5)")
    p.add_argument("--rtt", type=float, action="append", help="ms (repeatable; default 1, 50)")
    p.add_argument("--controller", choices=("reno", "bbr"), action="append",
                   help="repeatable; default both")
    p.add_argument("--segment", type=int, default=4096,
                   help="segment size, bytes (1330: what a 1,500-byte path carries)")
    p.add_argument("--time-limit", type=float, default=300.0, help="simulated seconds per transfer")
    args = p.parse_args()
    losses = args.loss or [0.0, 1.0, 5.0]
    rtts = args.rtt or [1.0, 50.0]
    print(f"lossy link: {args.megabytes:g} MB per transfer in {args.segment}-byte segments, "
          f"bottleneck {args.rate:g} MB/s, "
          f"queue {args.queue} KiB, median of {args.seeds} seeds; simulated time, byte-exact")
    print(f"{'controller':<10} {'loss':>5} {'RTT':>7} {'MB/s (sim)':>11} {'range':>13} "
          f"{'CPU s/MB':>9} {'retransmits':>11}")
    for congestion in args.controller or ("reno", "bbr"):
        for rtt in rtts:
            for loss in losses:
                runs = [one(congestion, args.megabytes, loss / 100, rtt / 1000, args.rate * MB,
                            args.queue * 1024, seed, args.time_limit, args.segment)
                        for seed in range(1, args.seeds + 1)]
                rates = [r for r, _, _ in runs]
                print(f"{congestion:<10} {loss:>4g}% {rtt:>5g}ms {statistics.median(rates):>11.2f} "
                      f"{min(rates):>6.2f}-{max(rates):<6.2f} "
                      f"{statistics.median(c for _, c, _ in runs):>9.3f} "
                      f"{int(statistics.median(x for _, _, x in runs)):>11}", flush=True)


if __name__ == "__main__":
    main()
