#!/usr/bin/env python3
"""
Slow clients against a real rendezvous on loopback (issue 12, item 3).

Starts ``python -m pilot rendezvous start`` on 127.0.0.1, then opens N
connections ("slow clients") from loopback source addresses 127.0.1.1 ...
127.0.1.K (so that the per-address limit is not what stops them), each
sending the length prefix of a large frame, most of its body at once, and
then one byte every ``--trickle`` seconds, never finishing the frame.
Meanwhile one well-behaved client on 127.0.0.1 sends ``lookup`` requests at
a steady rate and records their latency.  Printed: the server's RSS and the
lookup p50/p99 before, during (while the slow clients are connected) and
after they go, the RSS a minute after, and how many slow connections the
server closed and when.

    python3 benchmarks/slow_clients.py                       # 2,000 clients, 64 KiB frames
    python3 benchmarks/slow_clients.py --frame 1048576 --root /path/to/older/tree

Every phase is bounded in time; only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pilot.wire.registry import FrameDecoder, encode_frame  # noqa: E402
from procstat import pct, rss_mb  # noqa: E402

HOST = "127.0.0.1"


class Server:
    def __init__(self, root: str, store: str, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "pilot", "--json", "rendezvous", "start", "--listen", f"{HOST}:0",
               "--beacon", f"{HOST}:0", "--store", store, "--log-level", "warn", *extra]
        env = dict(os.environ, PYTHONPATH=root)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=root)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the rendezvous did not start: " + " ".join(cmd))
        self.port = int(str(json.loads(line)["registry"]).rsplit(":", 1)[1])

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def prober(port: int, rate: float, stop: asyncio.Event, out: list[float]) -> None:
    """``lookup`` requests, one at a time, ``rate`` per second, latencies (ms) into ``out``."""
    reader, writer = await asyncio.open_connection(HOST, port)
    decoder = FrameDecoder()
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            writer.write(encode_frame({"type": "lookup", "node_id": 1}))
            got: list[Any] = []
            while not got:
                data = await asyncio.wait_for(reader.read(65536), 10)
                if not data:
                    raise ConnectionError("the registry closed the probe connection")
                got = decoder.feed(data)
            out.append((time.perf_counter() - t0) * 1000.0)
            await asyncio.sleep(max(0.0, 1.0 / rate - (time.perf_counter() - t0)))
    finally:
        writer.close()


class Slow:
    """One slow client: a frame's prefix and most of its body, then a byte now and then."""

    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self.closed_after: float | None = None
        self.refused = False


async def slow_client(slow: Slow, port: int, source: str, frame: int, fill: int, trickle: float,
                      stop: asyncio.Event) -> None:
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    except OSError:
        slow.refused = True
        return
    slow.writer = writer
    try:
        writer.write(struct.pack(">I", frame) + b"x" * fill)
        sent = fill
        while not stop.is_set() and sent < frame - 1:
            try:
                data = await asyncio.wait_for(reader.read(4096), trickle)
            except asyncio.TimeoutError:
                writer.write(b"x")
                sent += 1
                continue
            if not data:
                break  # the server closed us (an error reply may come first)
        if not stop.is_set():
            slow.closed_after = time.monotonic() - t0
    except (ConnectionError, OSError):
        slow.closed_after = time.monotonic() - t0
    finally:
        writer.close()


async def run(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = tempfile.mkdtemp(prefix="pilot-slow-")
    server = Server(args.root, os.path.join(tmp, "registry.json"),
                    ["--requests-per-second", "0", "--registrations-per-minute", "0"])
    started = time.monotonic()
    try:
        print(f"slow clients: {args.clients} from {args.sources} loopback addresses, frame {args.frame} B, "
              f"{args.fill} B at once then 1 B every {args.trickle:g} s; tree {args.root}")
        # one registered node for the probe to look up
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(encode_frame({"type": "register", "public_key": "A" * 43 + "=", "listen_addr": ":4000"}))
        await reader.read(65536)
        writer.close()
        stop_probe = asyncio.Event()
        before: list[float] = []
        probe = asyncio.create_task(prober(server.port, args.rate, stop_probe, before))
        await asyncio.sleep(args.phase)
        stop_probe.set()
        await probe
        rss0 = server.rss_mb()
        print(f"  before:  RSS {rss0:7.1f} MB   lookup p50 {pct(before, 50):6.2f} ms  p99 {pct(before, 99):6.2f} ms"
              f"  ({len(before)} lookups)")

        stop_slow = asyncio.Event()
        slows = [Slow() for _ in range(args.clients)]
        tasks = []
        for i, slow in enumerate(slows):
            source = f"127.0.1.{1 + i % args.sources}"
            tasks.append(asyncio.create_task(slow_client(slow, server.port, source, args.frame, args.fill,
                                                         args.trickle, stop_slow)))
            if i % 100 == 99:
                await asyncio.sleep(0.05)
        during: list[float] = []
        peak = 0.0
        stop_probe = asyncio.Event()
        probe = asyncio.create_task(prober(server.port, args.rate, stop_probe, during))
        t_during = time.monotonic()
        while time.monotonic() - t_during < args.hold:
            await asyncio.sleep(1.0)
            peak = max(peak, server.rss_mb())
        stop_probe.set()
        await probe
        open_now = sum(1 for s in slows if s.writer is not None and s.closed_after is None)
        closed = [s.closed_after for s in slows if s.closed_after is not None]
        refused = sum(1 for s in slows if s.refused)
        print(f"  during:  RSS peak {peak:7.1f} MB   lookup p50 {pct(during, 50):6.2f} ms  "
              f"p99 {pct(during, 99):6.2f} ms  ({len(during)} lookups over {args.hold:g} s)")
        print(f"           slow connections: {len(closed)} closed by the server "
              f"(median after {pct(closed, 50):.1f} s, last after {max(closed, default=0):.1f} s), "
              f"{open_now} still open, {refused} refused at connect")
        stop_slow.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)

        after: list[float] = []
        stop_probe = asyncio.Event()
        probe = asyncio.create_task(prober(server.port, args.rate, stop_probe, after))
        rss_after: list[tuple[float, float]] = []
        t_after = time.monotonic()
        while time.monotonic() - t_after < args.settle:
            await asyncio.sleep(5.0)
            rss_after.append((time.monotonic() - t_after, server.rss_mb()))
        stop_probe.set()
        await probe
        print(f"  after:   lookup p50 {pct(after, 50):6.2f} ms  p99 {pct(after, 99):6.2f} ms;  RSS "
              + ", ".join(f"{mb:.0f} MB at {t:.0f} s" for t, mb in rss_after[::2]))
        print(f"  (ran {time.monotonic() - started:.0f} s)")
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=2000)
    p.add_argument("--sources", type=int, default=100, help="loopback source addresses 127.0.1.1..N (max 250)")
    p.add_argument("--frame", type=int, default=64 * 1024, help="the frame length the slow clients announce")
    p.add_argument("--fill", type=int, default=60 * 1024, help="bytes of the body sent at once")
    p.add_argument("--trickle", type=float, default=1.0, help="seconds between the trickled bytes")
    p.add_argument("--hold", type=float, default=45.0, help="seconds the slow clients are measured")
    p.add_argument("--settle", type=float, default=60.0, help="seconds measured after they go")
    p.add_argument("--phase", type=float, default=5.0, help="seconds of the 'before' measurement")
    p.add_argument("--rate", type=float, default=200.0, help="probe lookups per second")
    p.add_argument("--root", default=ROOT, help="the pilot tree whose rendezvous is started")
    args = p.parse_args()
    if not 1 <= args.sources <= 250 or args.clients < 1 or args.fill >= args.frame:
        p.error("--sources must be 1..250, --clients at least 1, --fill below --frame")
    asyncio.run(asyncio.wait_for(run(args), args.phase + args.hold + args.settle + 180))


if __name__ == "__main__":
    main()
