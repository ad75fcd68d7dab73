#!/usr/bin/env python3
"""
Benchmark of port forwarding on 127.0.0.1 (``pilotctl forward`` / ``expose``,
``docs/cli.md``): a TCP client on node a's forward reads a body from a TCP
server behind node b's expose.

Starts a rendezvous and two daemons as ``benchmarks/tunnel.py`` does (their
helpers are reused), makes them trust each other, then:

* ``expose 80 127.0.0.1:SRC`` on b, ``forward 0 bench-b:80`` on a, where SRC is
  a TCP server in this process (a thread) that writes N MB to each connection
  and closes;
* connection set-up: TCP connect to a's forward -> first byte back (a's dial
  of b:80, b's connect to SRC), p50/p99 of ``--connects`` connections, each
  served 1 byte;
* throughput: one connection reading ``--megabytes`` MB (SHA-256 checked),
  MB/s = bytes / (connect -> last byte); the same read straight from SRC
  (no Pilot) for comparison; the daemons' CPU and peak RSS meanwhile.

    python3 benchmarks/forward.py
    python3 benchmarks/forward.py --megabytes 50 --connects 20

Only 127.0.0.1 is used; every loop is bounded in count and time; the
processes started are stopped at the end, on error too.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from procstat import cpu_seconds, pct, rss_mb, run_stoppable  # noqa: E402
from tunnel import HOST, ROOT, Daemon, Failed, Rendezvous, establish_trust, loadavg, machine, row  # noqa: E402

CHUNK = 64 * 1024


def body(n: int) -> bytes:
    block = hashlib.sha256(b"forward").digest() * (CHUNK // 32)
    return (block * (n // CHUNK + 1))[:n]


class Source(threading.Thread):
    """A TCP server on 127.0.0.1 writing ``size`` bytes to each connection, then closing it."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.size = 1
        self.data = b"x"
        self.stopped = False

    def run(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(self.data)
            except OSError:
                pass

    def stop(self) -> None:
        self.stopped = True
        self.sock.close()


def fetch(port: int, limit: float) -> tuple[float, float, int, str]:
    """Connect, read to the end: (seconds to the first byte, seconds in all, bytes, SHA-256)."""
    digest = hashlib.sha256()
    t0 = time.monotonic()
    first = None
    n = 0
    with socket.create_connection((HOST, port), timeout=limit) as s:
        s.settimeout(limit)
        while True:
            try:
                data = s.recv(CHUNK)
            except socket.timeout:
                raise Failed(f"the read stalled after {n} bytes: nothing for {limit:g} s") from None
            if not data:
                break
            if first is None:
                first = time.monotonic()
            n += len(data)
            digest.update(data)
            if time.monotonic() - t0 > limit:
                raise Failed(f"the read took more than {limit:g} s")
    end = time.monotonic()
    return ((first or end) - t0, end - t0, n, digest.hexdigest())


def run(args: argparse.Namespace) -> int:
    tmp = tempfile.mkdtemp(prefix="pilot-fw-")
    rendezvous = Rendezvous(tmp)
    a = Daemon("bench-a", os.path.join(tmp, "a"))
    b = Daemon("bench-b", os.path.join(tmp, "b"))
    source = Source()
    source.start()
    m = machine()
    print(f"pilot forward benchmark: {' '.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}")
    print(f"  machine: {m['cores']} cores, {m['cpu']}, Linux {m['kernel']}, "
          f"Python {m['python']}, Twisted {m['twisted']}; load average {loadavg()}")
    try:
        rendezvous.start()
        a.start(rendezvous)
        b.start(rendezvous)
        assert a.pid is not None and b.pid is not None
        establish_trust(a, b)
        b.call("expose", port=80, host=HOST, host_port=source.port)
        local = int(a.call("forward", local_port=0, target=b.name, port=80)["local_port"])

        setups = []
        for _ in range(args.connects):
            first, _, n, _ = fetch(local, 30.0)
            if n != 1:
                raise Failed(f"a set-up fetch read {n} bytes, not 1")
            setups.append(first * 1000)
            time.sleep(0.12)  # under b's SYN limit (10 new streams/s per node)

        size = int(args.megabytes * 1e6)
        source.size, source.data = size, body(size)
        expected = hashlib.sha256(source.data).hexdigest()
        _, direct, n, digest = fetch(source.port, args.time_limit)
        if (n, digest) != (size, expected):
            raise Failed("the direct read came back wrong")
        cpu0 = {pid: cpu_seconds(pid) for pid in (a.pid, b.pid)}
        peak = {pid: rss_mb(pid) for pid in (a.pid, b.pid)}
        sampling = True

        def sample() -> None:
            while sampling:
                for pid in peak:
                    peak[pid] = max(peak[pid], rss_mb(pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, seconds, n, digest = fetch(local, args.time_limit)
        sampling = False
        sampler.join()
        cpu = {pid: (cpu_seconds(pid) - cpu0[pid]) / seconds * 100 for pid in cpu0}
        listing = a.call("forwards")["forwards"][0]

        print()
        print(f"  {'measure':<44} {'value':>16}   notes")
        print(f"  {'-' * 44} {'-' * 16}   {'-' * 40}")
        row(f"set-up p50 ({len(setups)} connections)", f"{pct(setups, 50):.2f} ms",
            "TCP connect to a's forward -> first byte from the service behind b's expose")
        row("set-up p99", f"{pct(setups, 99):.2f} ms", f"max {max(setups):.2f} ms")
        row("throughput through forward + expose", f"{n / 1e6 / seconds:.2f} MB/s",
            f"{n / 1e6:.1f} MB in {seconds:.2f} s; " + ("SHA-256 checked" if digest == expected else "WRONG BYTES")
            + "; MB = 10^6 B")
        row("the same read straight from the service", f"{size / 1e6 / direct:.0f} MB/s", "no Pilot (loopback TCP)")
        for name, pid in (("a (forward)", a.pid), ("b (expose)", b.pid)):
            row(f"daemon {name} CPU / peak RSS", f"{cpu[pid]:.0f} % / {peak[pid]:.0f} MB",
                "of one core during the transfer; VmRSS sampled every 100 ms")
        row("forward counters", f"{listing['total']} / {listing['failed']}",
            f"connections / failed; {listing['bytes_from_peer'] / 1e6:.1f} MB from the peer")
        return 0 if digest == expected else 1
    except Failed as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        for d in (a, b):
            try:
                for conn in d.call("info")["conn_list"]:
                    print(f"  {d.name} connection: {conn}", file=sys.stderr)
                print(f"  {d.name} forwards: {d.call('forwards')}", file=sys.stderr)
            except Exception as e2:
                print(f"  {d.name}: {e2}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        source.stop()
        for d in (a, b):
            try:
                d.stop()
            except Exception as e:
                print(f"stopping {d.name}: {e}", file=sys.stderr)
        rendezvous.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megabytes", type=float, default=50.0, help="MB (10^6 B) read through the forward")
    p.add_argument("--connects", type=int, default=20, help="connections timed for set-up")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds the transfer may take at most")
    args = p.parse_args()
    if not (0 < args.megabytes <= 500 and 1 <= args.connects <= 200 and 1 <= args.time_limit <= 600):
        raise SystemExit("--megabytes up to 500, --connects 1..200, --time-limit 1..600")

    run_stoppable(run, args)


if __name__ == "__main__":
    main()
