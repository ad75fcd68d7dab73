#!/usr/bin/env python3
"""
The chain of one ping, hop by hop: where a ``pilotctl ping`` (the control
socket's ``ping``: a new stream to port 7 per ping, ``ping-N`` written, the
echo read) spends its time.  A ping is four datagrams in sequence (SYN,
SYN+ACK, ``ping-N`` carrying the third ACK, the echo); the ACK of the echo,
our FIN and the FIN+ACK follow.  Two views:

* ``--daemons`` (needs root: it reads ``lo`` with an ``AF_PACKET`` socket,
  nothing is sent besides the benchmark's own pings on 127.0.0.1): two real
  daemons, and the kernel's timestamp of each tunnel datagram as it crosses
  ``lo``.  The gap between a datagram and the answer to it is the answering
  daemon's hop: its wake-up, its ``recvfrom``, its work, its ``sendto``.
* in process (the default): the two ``Stack`` + ``Tunnels`` pairs of
  ``stream_cpu.py`` on an injected clock, and the wall time each hop's
  handler takes until its datagram is sent (CPU only: no kernel, no
  wake-ups), and the whole of each handler.

    python3 benchmarks/ping_chain.py [--pings 500]
    python3 benchmarks/ping_chain.py --daemons [--pings 200 --rounds 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from twisted.internet.defer import Deferred  # noqa: E402

import stream_cpu  # noqa: E402
from pilot.address import Address  # noqa: E402
from pilot.stack.services import Ping  # noqa: E402
from procstat import pct  # noqa: E402

SO_TIMESTAMPNS = 35
ETH_P_IP = 0x0800
MAGIC = b"PILS"  # a sealed tunnel frame (docs/reference-wire.md)


def show(name: str, values: list[float]) -> None:
    print(f"  {name:34} p50 {pct(values, 50):7.1f} us   p10 {pct(values, 10):7.1f}   p90 {pct(values, 90):7.1f}")


# --- two daemons, the datagrams' kernel timestamps on lo -----------------------------------------

class Capture(threading.Thread):
    """(kernel ns, source port, destination port, payload length) of every sealed frame on lo."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.frames: list[tuple[int, int, int, int]] = []
        self.stopping = False
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.ntohs(ETH_P_IP))
        self.sock.bind(("lo", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.2)

    def run(self) -> None:
        while not self.stopping:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(2048, 256)
            except socket.timeout:
                continue
            if len(data) < 28 or data[9] != 17:  # UDP only
                continue
            ihl = (data[0] & 15) * 4
            sport, dport = struct.unpack("!HH", data[ihl:ihl + 4])
            payload = data[ihl + 8:]
            if not payload.startswith(MAGIC):
                continue
            for _, kind, value in ancillary:
                if kind == SO_TIMESTAMPNS:
                    sec, ns = struct.unpack("qq", value[:16])
                    self.frames.append((sec * 10**9 + ns, sport, dport, len(payload)))

    def stop(self) -> None:
        self.stopping = True
        self.join()
        self.sock.close()


def chains(frames: list[tuple[int, int, int, int]], a_port: int) -> list[tuple[int, int, int, int]]:
    """(SYN, SYN+ACK, ping-N, echo) times: a's first empty frame after an echo, b's next empty one, ..."""
    empty = min(n for _, _, _, n in frames)  # a sealed packet without payload (SYN, ACK, FIN)
    rows, state, t = [], 0, [0, 0, 0]
    for when, sport, _, n in frames:
        from_a = sport == a_port
        if state == 0 and from_a and n == empty:
            t[0], state = when, 1
        elif state == 1 and not from_a and n == empty:
            t[1], state = when, 2
        elif state == 2 and from_a and n > empty:
            t[2], state = when, 3
        elif state == 3 and not from_a and n > empty:
            rows.append((t[0], t[1], t[2], when))
            state = 0
    return rows


def daemons(count: int, rounds: int) -> int:
    from compare import Ours
    from tunnel import loadavg

    folder = tempfile.mkdtemp(prefix="pilot-chain-")
    ours = Ours(folder)
    try:
        ours.start()
        a, b = ours.a, ours.b
        assert a.client is not None
        a.client.request("ping", {"target": b.address, "count": 20, "timeout": 5.0, "interval": 0}, timeout=60.0)
        for round_ in range(1, rounds + 1):
            capture = Capture()
            capture.start()
            time.sleep(0.2)
            result = a.client.request("ping", {"target": b.address, "count": count, "timeout": 5.0,
                                               "interval": 0}, timeout=120.0)
            time.sleep(0.2)
            capture.stop()
            rtts = [r["rtt_ms"] * 1000 for r in result["results"] if "rtt_ms" in r]
            # daemon a sends 4 of a ping's 7 datagrams, b 3: a's port is the busier source
            sources = collections.Counter(sport for _, sport, _, _ in capture.frames)
            rows = chains(capture.frames, sources.most_common(1)[0][0]) if sources else []
            print(f"round {round_}: {len(rtts)}/{count} answered, {len(capture.frames)} datagrams, "
                  f"{len(rows)} chains; load average {loadavg()}")
            show("ping as daemon a times it", rtts)
            show("SYN .. echo on lo", [(r[3] - r[0]) / 1e3 for r in rows])
            show("b: SYN -> SYN+ACK", [(r[1] - r[0]) / 1e3 for r in rows])
            show("a: SYN+ACK -> ping-N", [(r[2] - r[1]) / 1e3 for r in rows])
            show("b: ping-N -> echo", [(r[3] - r[2]) / 1e3 for r in rows])
            show("a: echo -> next SYN (not timed)",
                 [(rows[i + 1][0] - rows[i][3]) / 1e3 for i in range(len(rows) - 1)])
    finally:
        ours.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


# --- in process: each hop's handler -----------------------------------------------------------------

class _Datagram:
    """A delivery the in-memory UDP scheduled (to tell it from a timer)."""

    def __init__(self, f: Callable[..., Any]) -> None:
        self.f = f

    def __call__(self, *args: Any) -> Any:
        return self.f(*args)


class _TracingClock(stream_cpu.HeapClock):
    """Notes when each datagram leaves (the in-memory UDP schedules its delivery DELAY later)."""

    def __init__(self) -> None:
        super().__init__()
        self.sends: list[int] = []

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any) -> stream_cpu.Call:
        if delay == stream_cpu.DELAY:
            self.sends.append(time.perf_counter_ns())
            f = _Datagram(f)
        return super().callLater(delay, f, *args)


def in_process(count: int) -> int:
    clock = _TracingClock()
    sends = clock.sends
    nodes = stream_cpu.build(clock, None)
    names = ("a: dial -> SYN", "b: SYN -> SYN+ACK", "a: SYN+ACK -> ping-N", "b: ping-N -> echo",
             "a: echo -> Ping.dataReceived")
    to_send: dict[str, list[float]] = {n: [] for n in names}
    whole: dict[str, list[float]] = {n: [] for n in names}
    for seq in range(count + 20):
        done: Deferred[float] = Deferred()
        answered: list[int] = []
        done.addCallback(lambda _: answered.append(time.perf_counter_ns()))
        hops: list[tuple[float, float]] = []
        del sends[:]
        start = time.perf_counter_ns()
        nodes[1][0].connect(Address(0, 2), 7, Ping(clock, seq, done))
        hops.append(((sends[0] - start) / 1e3, (time.perf_counter_ns() - start) / 1e3))
        while clock.heap and not answered:
            if not isinstance(clock.heap[0][2].f, _Datagram):
                clock.step()
                continue
            del sends[:]
            start = time.perf_counter_ns()
            clock.step()
            end = time.perf_counter_ns()
            first = answered[0] if answered else (sends[0] if sends else end)
            hops.append(((first - start) / 1e3, (end - start) / 1e3))
        until = clock.seconds() + 0.01  # the close, as pilotctl's ping lets it finish
        while clock.heap and clock.heap[0][0] <= until and clock.step():
            pass
        if seq >= 20 and len(hops) == len(names):
            for name, (first_us, whole_us) in zip(names, hops):
                to_send[name].append(first_us)
                whole[name].append(whole_us)
    print(f"{len(to_send[names[0]])} of {count} pings in the usual shape; until the hop's datagram "
          "is sent (the last: until the echo reaches Ping)")
    for name in names:
        show(name, to_send[name])
    print(f"  critical path, sum of the p50s: {sum(pct(v, 50) for v in to_send.values()):.1f} us")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pings", type=int, default=None, help="pings (default 500; with --daemons 200 a round)")
    p.add_argument("--daemons", action="store_true", help="two real daemons and a capture on lo (root)")
    p.add_argument("--rounds", type=int, default=2, help="with --daemons")
    args = p.parse_args()
    count = args.pings or (200 if args.daemons else 500)
    if not (1 <= count <= 2000 and 1 <= args.rounds <= 10):
        raise SystemExit("--pings 1..2000, --rounds 1..10")
    return daemons(count, args.rounds) if args.daemons else in_process(count)


if __name__ == "__main__":
    sys.exit(main())
