#!/usr/bin/env python3
"""
The epoll reactor's pass for one ready descriptor: Twisted's ``doPoll``
against :class:`pilot.services.busypoll.ReactorPass` (its spins off, so only
the dispatch differs), in one process, on a pipe (no socket, no network).

Each pass writes a byte to the pipe, runs one reactor pass (``doIteration(0)``)
and the reader reads it.  Prints the CPU time a pass for each, interleaved over
``--rounds``, the least of the rounds.  Load-insensitive: run it under
callgrind with two ``--passes`` and take the difference, e.g.

    python3 benchmarks/reactor_pass.py
    valgrind --tool=callgrind $PY benchmarks/reactor_pass.py --only twisted --passes 2000 --rounds 1
    valgrind --tool=callgrind $PY benchmarks/reactor_pass.py --only twisted --passes 6000 --rounds 1

Bounded: at most 200,000 passes a round and 20 rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet.epollreactor import EPollReactor  # noqa: E402

from pilot.services.busypoll import install  # noqa: E402


class PipeReader:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        os.read(self.fd, 100)

    def connectionLost(self, reason: Any) -> None:
        pass

    def logPrefix(self) -> str:
        return "RegistryServerProtocol,12,127.0.0.1"


def reactor_with_pipe(lean: bool) -> tuple[EPollReactor, int]:
    reactor = EPollReactor()
    if lean:
        install(reactor, window=0.0)
    r, w = os.pipe()
    reactor.addReader(PipeReader(r))
    return reactor, w


def run(reactor: EPollReactor, w: int, passes: int) -> float:
    """CPU seconds a pass."""
    write, iterate = os.write, reactor.doIteration
    t0 = time.process_time()
    for _ in range(passes):
        write(w, b"x")
        iterate(0)
    return (time.process_time() - t0) / passes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", choices=("twisted", "lean"), help="run one side only (for callgrind)")
    args = p.parse_args()
    if not 1 <= args.passes <= 200_000 or not 1 <= args.rounds <= 20:
        raise SystemExit("--passes 1..200000, --rounds 1..20")
    sides = [args.only] if args.only else ["twisted", "lean"]
    reactors = {side: reactor_with_pipe(side == "lean") for side in sides}
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for side in sides:
            reactor, w = reactors[side]
            cost = run(reactor, w, args.passes)
            best[side] = min(best.get(side, cost), cost)
    print(f"epoll reactor pass, one ready pipe, {args.passes} passes x {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.2f}")
    for side in sides:
        what = "Twisted's doPoll" if side == "twisted" else "ReactorPass (spins off)"
        print(f"  {what:<26} {best[side] * 1e6:6.2f} us of CPU a pass (least of the rounds)")


if __name__ == "__main__":
    main()
