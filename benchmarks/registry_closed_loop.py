#!/usr/bin/env python3
"""
Closed-loop requests on one connection (a node waiting for each answer),
our rendezvous against the reference's, interleaved so that a busy machine
weighs on both alike.

Every server is started at once (ours from each ``--tree``, and with
``PILOT_REFERENCE_BIN`` set the reference's ``rendezvous``), gets 10
unsigned registrations with hostnames on one connection, and then, round
after round, each server in turn answers a burst of ``lookup``s and a burst
of ``resolve_hostname``s, one request at a time on that connection.  The
client is a blocking socket (TCP_NODELAY), the cheapest client Python has,
so the figure is as much the server's as a Python client can make it.  It
prints, per server and request type, the median rate over the rounds, the
ratio to the reference's median, and the server's CPU per request (user and
system time from ``/proc``, so the kernel's loopback delivery counts too),
and how often the server went to sleep a request (its voluntary context
switches, every thread: a server that waits in ``epoll_wait`` between
requests sleeps once a request, and must be woken for the next).

    PILOT_REFERENCE_BIN=DIR python3 benchmarks/registry_closed_loop.py
    PILOT_REFERENCE_BIN=DIR python3 benchmarks/registry_closed_loop.py --tree ../main --tree .

Each round also starts with a burst of ``--register-burst`` new nodes a
server, registered unsigned (as reference daemons do) one at a time, each
group of 10 on its own connection from its own loopback address (the
reference takes 10 registrations a minute from one address).

Bounded: at most 50 rounds of at most 20,000 requests and 2,000
registrations; every connection goes to 127.0.0.1 (from 127.0.0.0/8).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from nacl.bindings import crypto_sign_seed_keypair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pilot.wire.registry import FrameDecoder, encode_frame  # noqa: E402

HOST = "127.0.0.1"
NODES = 10  # the reference takes 10 registrations a minute from one address


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sleeps(pid: int) -> int:
    """How often the process (all its threads) gave up its CPU to wait: voluntary context switches."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            pass  # a thread that ended meanwhile
    return total


def start_ours(tree: str, store: str) -> tuple[subprocess.Popen[bytes], int]:
    cmd = [sys.executable, "-m", "pilot", "--json", "rendezvous", "start", "--listen", f"{HOST}:0",
           "--beacon", f"{HOST}:0", "--store", store, "--registrations-per-minute", "0",
           "--requests-per-second", "0", "--beacon-datagrams-per-second", "0", "--log-level", "warn"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tree,
                            env=dict(os.environ, PYTHONPATH=tree))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"our rendezvous from {tree} did not start")
    return proc, int(str(json.loads(line)["registry"]).rsplit(":", 1)[1])


def start_reference(binary: str, store: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port(socket.SOCK_STREAM)
    proc = subprocess.Popen([binary, "-registry-addr", f"{HOST}:{port}", "-beacon-addr",
                             f"{HOST}:{free_port(socket.SOCK_DGRAM)}", "-store", store, "-log-level", "warn"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=os.path.dirname(store))
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            socket.create_connection((HOST, port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the reference rendezvous did not listen")


class Connection:
    """One registry connection, one request at a time (from the loopback address ``source``, if given)."""

    def __init__(self, port: int, source: str | None = None) -> None:
        self.sock = socket.create_connection((HOST, port), source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder()

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(encode_frame(msg))
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the rendezvous closed the connection")
            out = self.decoder.feed(data)
            if out:
                reply = out[0]
                return reply if isinstance(reply, dict) else {"type": "error"}


class Side:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int) -> None:
        self.name, self.proc = name, proc
        try:
            self.conn = Connection(port)
            self.register()
        except BaseException:
            proc.kill()
            proc.wait()
            raise

        self.port = port

    def register(self) -> None:
        self.ids: list[int] = []
        for i in range(NODES):
            _, secret = crypto_sign_seed_keypair(hashlib.sha256(b"closed-loop" + bytes([i])).digest())
            key = base64.b64encode(secret[32:]).decode()
            reply = self.conn.request({"type": "register", "public_key": key,
                                       "listen_addr": f"{HOST}:{20000 + i}", "hostname": f"closed-{i}"})
            if "node_id" not in reply:
                raise SystemExit(f"{self.name}: register refused: {reply}")
            self.ids.append(int(reply["node_id"]))


def new_key(serial: int) -> str:
    _, secret = crypto_sign_seed_keypair(hashlib.sha256(b"closed-loop-new" + serial.to_bytes(4, "big")).digest())
    return base64.b64encode(secret[32:]).decode()


def registrations(sides: list[Side], burst: int, round_: int) -> dict[str, tuple[float, float]]:
    """Each side registers ``burst`` new nodes, unsigned, one at a time; each node waits for its answer.

    The reference takes 10 registrations a minute from one source address, so every
    :data:`NODES` registrations come from a connection of their own, opened beforehand from a
    loopback address of its own (127.1.0.0/16; the same addresses for every side, new each round).
    Returns, per side, the rate and the server's CPU per registration (µs)."""
    keys = [new_key(round_ * burst + i) for i in range(burst)]
    count = (burst + NODES - 1) // NODES
    out: dict[str, tuple[float, float]] = {}
    for side in sides:
        conns = []
        for c in range(count):
            n = round_ * count + c + 1
            conns.append(Connection(side.port, f"127.1.{n >> 8 & 255}.{n & 255}"))
        msgs = [{"type": "register", "public_key": key, "listen_addr": f"{HOST}:{20000 + i}"}
                for i, key in enumerate(keys)]
        time.sleep(0.1)  # the server accepts them before the clock starts (a daemon's connection is persistent)
        cpu0, t0 = cpu_seconds(side.proc.pid), time.perf_counter()
        for i, msg in enumerate(msgs):
            reply = conns[i // NODES].request(msg)
            if "node_id" not in reply:
                raise SystemExit(f"{side.name}: register refused: {reply}")
        seconds = time.perf_counter() - t0
        out[side.name] = (burst / seconds, (cpu_seconds(side.proc.pid) - cpu0) / burst * 1e6)
        for conn in conns:
            conn.sock.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", default=[],
                   help="a source tree whose rendezvous to run (repeatable; default: this one)")
    p.add_argument("--burst", type=int, default=2000, help="requests per burst")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--register-burst", type=int, default=500,
                   help="new nodes each server registers a round (0: no registrations)")
    args = p.parse_args()
    if not 1 <= args.burst <= 20_000 or not 1 <= args.rounds <= 50 or not 0 <= args.register_burst <= 2000:
        raise SystemExit("--burst 1..20000, --rounds 1..50, --register-burst 0..2000")
    trees = [os.path.abspath(t) for t in args.tree] or [ROOT]
    reference = os.environ.get("PILOT_REFERENCE_BIN")
    tmp = tempfile.mkdtemp(prefix="pilot-closed-")
    sides: list[Side] = []
    load = os.getloadavg()[0]
    try:
        for i, tree in enumerate(trees):
            proc, port = start_ours(tree, os.path.join(tmp, f"ours{i}.json"))
            sides.append(Side(f"ours ({os.path.basename(tree)})" if len(trees) > 1 else "ours", proc, port))
        if reference:
            proc, port = start_reference(os.path.join(reference, "rendezvous"), os.path.join(tmp, "ref.json"))
            sides.append(Side("reference", proc, port))
        kinds: dict[str, Callable[[Side, int], dict[str, Any]]] = {
            "lookup": lambda side, i: {"type": "lookup", "node_id": side.ids[i % NODES]},
            "resolve_hostname": lambda side, i: {"type": "resolve_hostname",
                                                 "hostname": f"closed-{i % NODES}"},
        }
        rates: dict[tuple[str, str], list[float]] = {}
        cpus: dict[tuple[str, str], list[float]] = {}
        #: the server's sleeps (voluntary context switches, all threads) a request
        slept: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.rounds):
            if args.register_burst:
                for name, (rate, cpu) in registrations(sides, args.register_burst, round_).items():
                    rates.setdefault((name, "register"), []).append(rate)
                    cpus.setdefault((name, "register"), []).append(cpu)
            for kind, make in kinds.items():
                for side in sides:
                    msgs = [make(side, i) for i in range(args.burst)]
                    slept0 = sleeps(side.proc.pid)
                    cpu0, t0 = cpu_seconds(side.proc.pid), time.perf_counter()
                    for msg in msgs:
                        if side.conn.request(msg)["type"] == "error":
                            raise SystemExit(f"{side.name}: {kind} refused")
                    seconds = time.perf_counter() - t0
                    rates.setdefault((side.name, kind), []).append(args.burst / seconds)
                    cpus.setdefault((side.name, kind), []).append(
                        (cpu_seconds(side.proc.pid) - cpu0) / args.burst * 1e6)
                    slept.setdefault((side.name, kind), []).append(
                        (sleeps(side.proc.pid) - slept0) / args.burst)
        print(f"closed loop on one connection, {args.rounds} rounds of {args.burst} a server and type, "
              f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {load:.2f} -> "
              f"{os.getloadavg()[0]:.2f}")
        for kind in (["register"] if args.register_burst else []) + list(kinds):
            ref = statistics.median(rates[("reference", kind)]) if reference else None
            for side in sides:
                got = rates[(side.name, kind)]
                rate = statistics.median(got)
                ratio = f"   {rate / ref:4.2f}x the reference" if ref else ""
                nap = slept.get((side.name, kind))
                naps = f"   sleeps {statistics.median(nap):4.2f} each" if nap else ""
                print(f"  {kind:<17} {side.name:<22} {rate:7.0f}/s (median; {min(got):6.0f}-{max(got):6.0f})"
                      f"   server CPU {statistics.median(cpus[(side.name, kind)]):4.0f} us each{naps}{ratio}")
    finally:
        for side in sides:
            side.proc.terminate()
            side.proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
