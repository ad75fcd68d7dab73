#!/usr/bin/env python3
"""
CPU cost of one stream through the node's layers, in one process, without
sockets: two ``Stack`` + ``Tunnels`` pairs (real AES-GCM sealing, real
packet codecs, the path search) joined by an in-memory UDP that delivers
each datagram 0.2 ms later on an injected clock.  Nothing waits on real
time, so the figure is CPU seconds per MB of one core for both ends
together: what the per-packet costs are, largely independent of what else
the machine runs (``benchmarks/tunnel.py`` measures the wall clock between
real daemons, which a busy shared machine halves).

    python3 benchmarks/stream_cpu.py --megabytes 20                    # loopback's size: 4,096-byte segments
    python3 benchmarks/stream_cpu.py --megabytes 20 --max-datagram 1400
    python3 benchmarks/stream_cpu.py --megabytes 5 --profile           # cProfile, by own time
    python3 benchmarks/stream_cpu.py --max-datagram 1400 --paths       # with the path layer's hooks, as in the node
    python3 benchmarks/stream_cpu.py --max-datagram 1400 --ends        # and each end's CPU per data packet

The clock is a heap (``twisted.internet.task.Clock`` sorts all its calls on
every ``callLater``, which would dominate at a thousand packets in flight).
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import itertools
import os
import pstats
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet.defer import succeed  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402

from pilot.address import Address  # noqa: E402
from pilot.identity import Identity  # noqa: E402
from pilot.machines.tunnel import Tunnels  # noqa: E402
try:
    from pilot.machines.tunnel.pmtu import SAFE_SEGMENT
except ImportError:  # before the path search
    SAFE_SEGMENT = 0
from pilot.stack import Stack  # noqa: E402

CHUNK = 65536
DELAY = 0.0002


class Call:
    __slots__ = ("time", "f", "args", "live", "end")

    def __init__(self, when: float, f: Callable[..., Any], args: tuple[Any, ...], end: int = 0) -> None:
        self.time, self.f, self.args, self.live, self.end = when, f, args, True, end

    def active(self) -> bool:
        return self.live

    def cancel(self) -> None:
        self.live = False

    def getTime(self) -> float:
        return self.time


class HeapClock:
    """Enough of ``IReactorTime`` for the stack and the tunnels, on a heap."""

    def __init__(self, ends: bool = False) -> None:
        self.now = 0.0
        self.heap: list[tuple[float, int, Call]] = []
        self.order = itertools.count()
        #: with ``ends``: the thread CPU seconds of the calls run for each node (the end whose
        #: call scheduled them; a datagram counts for the node it is delivered to)
        self.ends = ends
        self.end = 0
        self.cpu = {0: 0.0, 1: 0.0, 2: 0.0}

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any) -> Call:
        return self.call_for(self.end, delay, f, *args)

    def call_for(self, end: int, delay: float, f: Callable[..., Any], *args: Any) -> Call:
        call = Call(self.now + delay, f, args, end)
        heapq.heappush(self.heap, (call.time, next(self.order), call))
        return call

    def getDelayedCalls(self) -> list[Call]:
        return [c for _, _, c in self.heap if c.live]

    def step(self) -> bool:
        """Run the next live call; False when there is none."""
        while self.heap:
            when, _, call = heapq.heappop(self.heap)
            if call.live:
                self.now = when
                call.live = False
                if self.ends:
                    self.end = call.end
                    started = time.thread_time()
                    call.f(*call.args)
                    self.cpu[call.end] += time.thread_time() - started
                else:
                    call.f(*call.args)
                return True
        return False


def build(clock: HeapClock, max_datagram: int | None, with_paths: bool = False) -> dict[int, tuple[Stack, Tunnels]]:
    identities = {n: Identity.generate() for n in (1, 2)}
    endpoints = {n: ("127.0.0.1", 1000 + n) for n in (1, 2)}
    nodes: dict[int, tuple[Stack, Tunnels]] = {}
    paths: dict[int, Any] = {}
    for n in (1, 2):
        def send_datagram(data: bytes, dst: Any, n: int = n) -> None:
            clock.call_for(3 - n, DELAY, lambda: nodes[3 - n][1].frame_received(data, endpoints[n]))

        def send_packet(packet: Any, n: int = n) -> None:
            node = packet.dst.node
            if with_paths:  # what the node does per packet (pilot/node/core.py, _send_packet)
                paths[n].sending(node, endpoints[node])
            nodes[n][1].send(packet, node, endpoints[node])

        # (a tree from before the path search runs too, at 4,096-byte segments: the "before" figures)
        stack = Stack(clock, lambda a=Address(0, n): a, send_packet, lambda node: True,
                      **({"segment_size": SAFE_SEGMENT} if SAFE_SEGMENT else {}))
        tunnels = Tunnels(node_id=lambda n=n: n, identity=identities[n], send_datagram=send_datagram,
                          deliver=stack.packet_received,
                          expected_key=lambda peer: succeed(identities[peer].public_key), clock=clock,
                          **({"segment_size_changed": stack.set_segment_size, "max_datagram": max_datagram}
                             if SAFE_SEGMENT else {}))
        nodes[n] = (stack, tunnels)
        if with_paths:  # the path layer, wired as the node wires it: a hook per packet each way
            from pilot.machines.path import Paths
            paths[n] = Paths(tunnels=tunnels, send_datagram=send_datagram, beacon=lambda: None,
                             node_id=lambda n=n: n, sign=identities[n].sign, clock=clock)
            tunnels.wire(paths[n])
    return nodes


def transfer(megabytes: float, max_datagram: int | None, with_paths: bool = False,
             clock: HeapClock | None = None) -> tuple[int, dict[str, Any]]:
    clock = clock or HeapClock()
    nodes = build(clock, max_datagram, with_paths)
    chunks = max(1, int(megabytes * 1e6) // CHUNK)
    got = [0]

    class Sink(Protocol):
        def dataReceived(self, data: bytes) -> None:
            got[0] += len(data)

    class Source(Protocol):
        def connectionMade(self) -> None:
            block = bytes(CHUNK)
            for _ in range(chunks):
                assert self.transport is not None
                self.transport.write(block)

    clock.end = 2
    nodes[2][0].listen(1000, Factory.forProtocol(Sink))
    clock.end = 1
    nodes[1][0].connect(Address(0, 2), 1000, Source())
    while got[0] < chunks * CHUNK and clock.step():
        pass
    return got[0], nodes[1][1].stats(2) or {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megabytes", type=float, default=20.0, help="MB (10^6 B) on one stream")
    p.add_argument("--max-datagram", type=int, default=None, help="bound on the path search (UDP payload)")
    p.add_argument("--paths", action="store_true",
                   help="wire the path layer as the node does (its hooks run for every packet each way)")
    p.add_argument("--ends", action="store_true",
                   help="also print each end's CPU per data packet (its calls timed one by one)")
    p.add_argument("--profile", action="store_true", help="print cProfile's 25 largest own times")
    args = p.parse_args()
    profile = cProfile.Profile() if args.profile else None
    started = time.process_time()
    if profile is not None:
        profile.enable()
    clock = HeapClock(ends=args.ends)
    received, stats = transfer(args.megabytes, args.max_datagram, args.paths, clock)
    if profile is not None:
        profile.disable()
    cpu = time.process_time() - started
    print(f"{received / 1e6:.1f} MB in {cpu:.2f} s of CPU: {received / 1e6 / cpu:.1f} MB/s for both ends on "
          f"one core; datagrams up to {stats.get('mtu')} B, segments {stats.get('mss')} B")
    if args.ends:
        packets = received / (stats.get("mss") or 4096)
        print(f"  per data packet ({packets:,.0f} of them, ACKs included): sender {clock.cpu[1] / packets * 1e6:.1f} us, "
              f"receiver {clock.cpu[2] / packets * 1e6:.1f} us of thread CPU")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
