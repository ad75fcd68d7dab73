#!/usr/bin/env python3
"""
A beacon flood against a real rendezvous on loopback (issue 12, item 2).

Starts ``python -m pilot rendezvous start`` on 127.0.0.1 and, from a second
process, sends 5-byte Discovers to its beacon at ``--rate`` datagrams a second
from ``--sources`` loopback addresses (127.0.2.1 ... 127.0.2.N), while one
client on 127.0.0.1 sends ``lookup`` requests and records their latency.
Printed: lookup p50/p99 without and with the flood, the datagrams actually
sent, and the server's CPU during the flood (the flood's cost).

    python3 benchmarks/beacon_flood.py                     # 40,000/s from 100 addresses, 15 s
    python3 benchmarks/beacon_flood.py --root /path/to/other/tree

Bounded in time; only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pilot.wire.registry import FrameDecoder, encode_frame  # noqa: E402
from procstat import cpu_seconds, pct  # noqa: E402

HOST = "127.0.0.1"


def flood(port: int, rate: float, sources: int, seconds: float, sent: "multiprocessing.Value[int]") -> None:
    socks = []
    for i in range(sources):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.0.2.{1 + i}", 0))
        s.setblocking(False)
        socks.append(s)
    datagram = b"\x01" + struct.pack(">I", 0x01020304)  # a Discover for a node that is not there
    start = time.perf_counter()
    count = 0
    while True:
        now = time.perf_counter() - start
        if now >= seconds:
            break
        due = int(now * rate)
        while count < due:
            try:
                socks[count % sources].sendto(datagram, (HOST, port))
            except BlockingIOError:
                pass
            count += 1
        time.sleep(0.0005)
    sent.value = count


def lookups(port: int, seconds: float, rate: float) -> list[float]:
    out: list[float] = []
    sock = socket.create_connection((HOST, port), timeout=30)
    decoder = FrameDecoder()
    end = time.perf_counter() + seconds
    try:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            sock.sendall(encode_frame({"type": "lookup", "node_id": 1}))
            got: list[object] = []
            while not got:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed")
                got = decoder.feed(data)
            out.append((time.perf_counter() - t0) * 1000.0)
            time.sleep(max(0.0, 1.0 / rate - (time.perf_counter() - t0)))
    finally:
        sock.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=40000.0, help="flood datagrams per second")
    p.add_argument("--sources", type=int, default=100, help="loopback source addresses (max 250)")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    p.add_argument("--probe", type=float, default=100.0, help="lookups per second")
    p.add_argument("--root", default=ROOT, help="the pilot tree whose rendezvous is started")
    args = p.parse_args()
    if not 1 <= args.sources <= 250 or not 0 < args.seconds <= 120:
        p.error("--sources must be 1..250 and --seconds 0..120")
    tmp = tempfile.mkdtemp(prefix="pilot-flood-")
    cmd = [sys.executable, "-m", "pilot", "--json", "rendezvous", "start", "--listen", f"{HOST}:0",
           "--beacon", f"{HOST}:0", "--store", os.path.join(tmp, "registry.json"), "--log-level", "error"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=args.root), cwd=args.root)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        registry = int(str(info["registry"]).rsplit(":", 1)[1])
        beacon = int(str(info["beacon"]).rsplit(":", 1)[1])
        print(f"beacon flood: {args.rate:.0f} datagrams/s of 5-byte Discovers from {args.sources} loopback "
              f"addresses for {args.seconds:g} s; tree {args.root}")
        quiet = lookups(registry, args.seconds / 3, args.probe)
        print(f"  no flood:   lookup p50 {pct(quiet, 50):7.2f} ms  p99 {pct(quiet, 99):7.2f} ms  ({len(quiet)})")
        sent = multiprocessing.Value("q", 0)
        flooder = multiprocessing.Process(target=flood, args=(beacon, args.rate, args.sources, args.seconds, sent))
        cpu0 = cpu_seconds(proc.pid)
        flooder.start()
        time.sleep(1.0)
        loud = lookups(registry, args.seconds - 2.0, args.probe)
        flooder.join(args.seconds + 30)
        cpu = cpu_seconds(proc.pid) - cpu0
        print(f"  flood:      lookup p50 {pct(loud, 50):7.2f} ms  p99 {pct(loud, 99):7.2f} ms  "
              f"max {max(loud, default=float('nan')):7.2f} ms  ({len(loud)})")
        print(f"  flood sent {sent.value} datagrams ({sent.value / args.seconds:.0f}/s); server CPU "
              f"{100 * cpu / args.seconds:.0f}% of one core during it")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
