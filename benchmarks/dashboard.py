#!/usr/bin/env python3
"""
What serving the dashboard costs the rendezvous (issue 15: under 2% of a
core for 20 polling browsers at 10,000 nodes).

Starts a real rendezvous (``python -m pilot rendezvous start --http``) on
127.0.0.1 with rate limits off, registers N nodes over TCP, then measures the
process's CPU over two windows of the same length: idle, and with C clients
each fetching ``/api/stats`` every P seconds (the page's own interval,
``pilot.web.page.POLL_SECONDS``), staggered as browsers opened at different
times would be.  One ``/metrics`` scrape is timed as well.  Prints the
figures; nothing is asserted.

    python3 benchmarks/dashboard.py                      # 10,000 nodes, 20 clients, 60 s
    python3 benchmarks/dashboard.py --nodes 1000 --seconds 20

Every loop is bounded in count and in time; only 127.0.0.1 is ever a target.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from nacl.signing import SigningKey

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pilot.web.page import POLL_SECONDS  # noqa: E402
from pilot.wire.registry import FrameDecoder, encode_frame  # noqa: E402
from procstat import cpu_seconds, pct, rss_mb, run_stoppable  # noqa: E402

HOST = "127.0.0.1"
#: Registrations in flight per connection (pipelined), and connections.
PIPELINE = 200
CONNECTIONS = 8
DEADLINE = 600.0


def start() -> tuple[subprocess.Popen[bytes], int, int]:
    cmd = [sys.executable, "-m", "pilot", "--json", "rendezvous", "start", "--listen", f"{HOST}:0",
           "--beacon", f"{HOST}:0", "--http", f"{HOST}:0", "--no-store", "--registrations-per-minute", "0",
           "--requests-per-second", "0", "--connections-per-address", "0", "--log-level", "warn"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("the rendezvous did not start: " + " ".join(cmd))
    info = json.loads(line)
    return proc, int(str(info["registry"]).rsplit(":", 1)[1]), int(str(info["http"]).rsplit(":", 1)[1])


def register(port: int, first: int, count: int) -> None:
    """Register nodes ``first .. first+count-1`` on one connection, ``PIPELINE`` at a time."""
    deadline = time.monotonic() + DEADLINE
    with socket.create_connection((HOST, port), timeout=60) as sock:
        decoder = FrameDecoder()
        done = 0
        while done < count:
            batch = min(PIPELINE, count - done)
            frames = []
            for i in range(first + done, first + done + batch):
                key = SigningKey(i.to_bytes(4, "big") * 8)
                frames.append(encode_frame({"type": "register", "public_key": _b64(bytes(key.verify_key)),
                                            "listen_addr": f"{HOST}:{20000 + i % 40000}"}))
            sock.sendall(b"".join(frames))
            got = 0
            while got < batch:
                if time.monotonic() > deadline:
                    raise SystemExit("registration took too long")
                for item in decoder.feed(sock.recv(1 << 20)):
                    if isinstance(item, Exception) or item.get("type") != "register_ok":
                        raise SystemExit(f"registration failed: {item}")
                    got += 1
            done += batch


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def poll(url: str, start_after: float, interval: float, until: float, latencies: list[float],
         errors: list[str]) -> None:
    time.sleep(start_after)
    while time.monotonic() < until:
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                reply.read()
            latencies.append((time.perf_counter() - t0) * 1000)
        except OSError as e:
            errors.append(str(e))
        left = until - time.monotonic()
        time.sleep(max(0.0, min(interval - (time.perf_counter() - t0), left)))


def window(pid: int, seconds: float) -> float:
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - before


def run(args: argparse.Namespace) -> int:
    proc, registry_port, http_port = start()
    try:
        t0 = time.perf_counter()
        per = -(-args.nodes // CONNECTIONS)
        threads = [threading.Thread(target=register, args=(registry_port, 1 + k * per,
                                                           max(0, min(per, args.nodes - k * per))))
                   for k in range(CONNECTIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
        base = f"http://{HOST}:{http_port}"
        registered = time.perf_counter() - t0
        time.sleep(2.0)  # the aftermath of the registrations settles; /api/stats' reading is renewed
        with urllib.request.urlopen(base + "/api/stats", timeout=10) as reply:
            total = json.loads(reply.read())["total_nodes"]
        print(f"rendezvous with {total} nodes (registered in {registered:.1f} s), "
              f"RSS {rss_mb(proc.pid):.0f} MiB")

        idle = window(proc.pid, args.seconds)
        latencies: list[float] = []
        errors: list[str] = []
        until = time.monotonic() + args.seconds
        pollers = [threading.Thread(target=poll, args=(base + "/api/stats", i * args.interval / args.clients,
                                                       args.interval, until, latencies, errors), daemon=True)
                   for i in range(args.clients)]
        before = cpu_seconds(proc.pid)
        for p in pollers:
            p.start()
        for p in pollers:
            p.join(args.seconds + 30)
        busy = cpu_seconds(proc.pid) - before
        extra = max(0.0, busy - idle)
        t1 = time.perf_counter()
        with urllib.request.urlopen(base + "/metrics", timeout=10) as reply:
            size = len(reply.read())
        scrape_ms = (time.perf_counter() - t1) * 1000
        print(f"idle:    {idle / args.seconds * 100:5.2f}% of a core over {args.seconds:g} s")
        print(f"polled:  {busy / args.seconds * 100:5.2f}% of a core with {args.clients} clients every "
              f"{args.interval:g} s ({len(latencies)} requests, {len(errors)} errors; "
              f"p50 {pct(latencies, 50):.1f} ms, p99 {pct(latencies, 99):.1f} ms)")
        print(f"dashboard cost: {extra / args.seconds * 100:5.2f}% of a core "
              f"({extra / max(len(latencies), 1) * 1000:.2f} ms CPU per request)")
        print(f"/metrics scrape: {scrape_ms:.1f} ms, {size} bytes")
        return 1 if errors else 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--interval", type=float, default=float(POLL_SECONDS), help="seconds between polls")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each measured window")
    args = parser.parse_args()
    if not (1 <= args.nodes <= 100_000 and 1 <= args.clients <= 200 and 1 <= args.seconds <= 600
            and args.interval >= 0.1):
        parser.error("--nodes 1..100000, --clients 1..200, --seconds 1..600, --interval >= 0.1")
    run_stoppable(run, args)


if __name__ == "__main__":
    main()
