#!/usr/bin/env python3
"""
Benchmark of the built-in services (docs/apps.md) between two real node
daemons on 127.0.0.1 (started as ``benchmarks/tunnel.py`` starts them):

* data exchange (port 1001), a file: one file of ``--file-mb`` MiB (at most
  16, the frame limit) from a to b on one stream; MB/s = file bytes / (first
  byte written -> the ACK read); the file in b's ``received/`` is checked
  (SHA-256);
* data exchange, messages: ``--messages`` text frames of 100 bytes written
  back to back on one stream; messages/s = count / (first write -> last ACK);
* event stream (port 1002): 3 subscribers on b's broker (streams from a),
  one publisher from a sending ``--events`` events of 100 bytes; events/s =
  events delivered to all 3 / (first publish -> last event read).

    python3 benchmarks/apps.py
    python3 benchmarks/apps.py --file-mb 16 --messages 2000 --events 5000

Only 127.0.0.1; every loop bounded in count and time (``--time-limit`` per
measure); the processes started are stopped at the end, on error too.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from procstat import run_stoppable  # noqa: E402
from tunnel import ROOT, Daemon, Failed, Rendezvous, establish_trust, loadavg, machine  # noqa: E402

sys.path.insert(0, ROOT)

from pilot.control_client import ControlClient  # noqa: E402
from pilot.wire.dataexchange import TEXT, FrameDecoder, encode_frame, file_prefix  # noqa: E402
from pilot.wire.events import Event, EventDecoder, encode_event  # noqa: E402

CHUNK = 64 * 1024


def stream(a: Daemon, target: str, port: int) -> socket.socket:
    with ControlClient(a.socket_path, 30.0) as c:
        return c.open_stream(target, port, timeout=30.0)


def read_frames(sock: socket.socket, decoder: Any, want: int, deadline: float) -> list[Any]:
    got: list[Any] = []
    while len(got) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failed(f"{len(got)} of {want} replies before the time limit")
        sock.settimeout(left)
        data = sock.recv(CHUNK)
        if not data:
            raise Failed(f"the stream closed after {len(got)} of {want} replies")
        got += [item for item in decoder.feed(data) if not isinstance(item, Exception)]
    return got


def send_file(a: Daemon, b: Daemon, mib: int, limit: float) -> dict[str, Any]:
    content = os.urandom(mib * 1024 * 1024 - 64)
    with stream(a, b.name, 1001) as s:
        t0 = time.monotonic()
        s.sendall(file_prefix("bench.bin", len(content)))
        view = memoryview(content)
        for i in range(0, len(content), CHUNK):
            s.sendall(view[i:i + CHUNK])
        [reply] = read_frames(s, FrameDecoder(1 << 16), 1, t0 + limit)
        took = time.monotonic() - t0
    if not reply.payload.startswith(b"ACK FILE"):
        raise Failed(f"file refused: {reply.payload!r}")
    [entry] = _received(b)
    with open(entry, "rb") as f:
        if hashlib.sha256(f.read()).digest() != hashlib.sha256(content).digest():
            raise Failed("the received file differs")
    return {"bytes": len(content), "seconds": took}


def _received(b: Daemon) -> list[str]:
    folder = os.path.join(b.home, "received")
    return [os.path.join(folder, n) for n in os.listdir(folder)]


def messages(a: Daemon, b: Daemon, count: int, limit: float) -> dict[str, Any]:
    frame = encode_frame(TEXT, b"m" * 100)
    with stream(a, b.name, 1001) as s:
        t0 = time.monotonic()
        s.sendall(frame * count)
        replies = read_frames(s, FrameDecoder(1 << 16), count, t0 + limit)
        took = time.monotonic() - t0
    if any(not r.payload.startswith(b"ACK TEXT") for r in replies):
        raise Failed("a message was refused")
    return {"count": count, "seconds": took}


def events(a: Daemon, b: Daemon, count: int, limit: float) -> dict[str, Any]:
    subs = [stream(a, b.name, 1002) for _ in range(3)]
    try:
        for s in subs:
            s.sendall(encode_event("bench"))
        deadline = time.monotonic() + 30
        while b.call("info")["counters"]["apps"]["eventstream"].get("subscribers", 0) < 3:
            if time.monotonic() > deadline:
                raise Failed("the 3 subscriptions did not arrive")
            time.sleep(0.01)
        with stream(a, b.name, 1002) as pub:
            t0 = time.monotonic()
            pub.sendall(encode_event("bench-publisher") + encode_event("bench", b"e" * 100) * count)
            for s in subs:
                got = read_frames(s, EventDecoder(), count, t0 + limit)
                if got[-1] != Event("bench", b"e" * 100):
                    raise Failed("an event differs")
            took = time.monotonic() - t0
    finally:
        for s in subs:
            s.close()
    return {"count": count, "seconds": took}


def run(args: argparse.Namespace) -> int:
    tmp = tempfile.mkdtemp(prefix="pilot-ab-")
    rendezvous = Rendezvous(tmp)
    a, b = Daemon("bench-a", os.path.join(tmp, "a")), Daemon("bench-b", os.path.join(tmp, "b"))
    m = machine()
    print(f"pilot apps benchmark: {' '.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}")
    print(f"  machine: {m['cores']} cores, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}, "
          f"Twisted {m['twisted']}; load average {loadavg()}")
    try:
        rendezvous.start()
        a.start(rendezvous)
        b.start(rendezvous)
        establish_trust(a, b)
        f = send_file(a, b, args.file_mb, args.time_limit)
        msg = messages(a, b, args.messages, args.time_limit)
        ev = events(a, b, args.events, args.time_limit)
        print(f"  send-file {f['bytes'] / 1e6:.1f} MB: {f['seconds']:.2f} s, "
              f"{f['bytes'] / 1e6 / f['seconds']:.2f} MB/s (byte-exact)")
        print(f"  messages: {msg['count']} x 100 B on one stream: {msg['seconds']:.2f} s, "
              f"{msg['count'] / msg['seconds']:.0f} messages/s (each saved and ACKed)")
        print(f"  events: {ev['count']} x 100 B to 3 subscribers: {ev['seconds']:.2f} s, "
              f"{ev['count'] / ev['seconds']:.0f} events/s published, "
              f"{3 * ev['count'] / ev['seconds']:.0f}/s delivered")
        print(f"  load average after: {loadavg()}")
        return 0
    except Failed as e:
        print(f"failed: {e}\n--- a:\n{a.log_tail()}\n--- b:\n{b.log_tail()}", file=sys.stderr)
        return 1
    finally:
        a.stop()
        b.stop()
        rendezvous.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file-mb", type=int, default=16, help="MiB in the file (1..16)")
    p.add_argument("--messages", type=int, default=1000, help="100-byte messages (1..20000)")
    p.add_argument("--events", type=int, default=2000, help="100-byte events (1..50000)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds each measure may take (1..600)")
    args = p.parse_args()
    if not (1 <= args.file_mb <= 16 and 1 <= args.messages <= 20_000 and 1 <= args.events <= 50_000
            and 1 <= args.time_limit <= 600):
        raise SystemExit("--file-mb 1..16, --messages 1..20000, --events 1..50000, --time-limit 1..600")

    run_stoppable(run, args)


if __name__ == "__main__":
    main()
