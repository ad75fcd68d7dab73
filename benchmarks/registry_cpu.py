#!/usr/bin/env python3
"""
CPU per request of the registry itself, in one process: no sockets, no load
generator competing for the cores, so the figure holds on a busy machine.

Feeds N presigned ``register`` frames (then N ``set_hostname`` and N
``lookup`` frames) to one :class:`RegistryServerProtocol` over a
``StringTransport``, in pipelined chunks as 16 connections with 32 requests
in flight would, and prints the process CPU time (``time.process_time``) per
request.  ``--durable`` puts a ``DurableWriter`` behind it whose writes run
inline (a temporary folder; the fsync is the kernel's time, not ours).
``--profile`` prints the top of a cProfile of the registrations.

    python3 benchmarks/registry_cpu.py --nodes 10000
    python3 benchmarks/registry_cpu.py --nodes 10000 --durable --profile
    python3 benchmarks/registry_cpu.py --nodes 10000 --cadence reference [--profile]

``--cadence reference`` feeds what reference daemons send instead
(``docs/reference-wire.md`` §2.4, §5.3): unsigned ``register``s, then two
rounds of ``heartbeat`` and ``poll_handshakes`` with the fixed-challenge
``signature`` (the same bytes every 30 s), one frame a time as separate
connections deliver them, pipelined ``lookup``s, then ``lookup``,
``set_hostname`` and ``resolve_hostname`` one frame a time (a closed loop:
each request alone in its ``dataReceived``, so every per-request cost of the
protocol shows), and signed Discovers to the beacon; the ``register``s come
one frame a time too (each daemon registers on its own connection and waits
for its answer).  ``--profile`` then profiles the heartbeat and poll rounds,
or the phases ``--profile-phase`` names.

Bounded: at most 100,000 nodes; nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
from typing import Any

from nacl.signing import SigningKey

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import task  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.defer import succeed  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from pilot.address import node_id_for_key  # noqa: E402
from pilot.identity import verify  # noqa: E402
from pilot.protocols.registry import RegistryServerProtocol  # noqa: E402
from pilot.server.registry import Registry, RegistryConfig  # noqa: E402
from pilot.server.beacon import Beacon, BeaconConfig  # noqa: E402
from pilot.wire.beacon import Discover, with_proof  # noqa: E402
from pilot.wire.registry import auth_message, encode_frame, legacy_challenge, sign_request  # noqa: E402

CHUNK = 16 * 32  # requests a reactor pass sees with 16 connections, 32 in flight each


def frames(msgs: list[dict[str, Any]]) -> list[bytes]:
    return [b"".join(encode_frame(m) for m in msgs[i:i + CHUNK]) for i in range(0, len(msgs), CHUNK)]


def run(proto: RegistryServerProtocol, transport: StringTransport, chunks: list[bytes],
        profile: cProfile.Profile | None = None, clock: task.Clock | None = None) -> float:
    t0 = time.process_time()
    if profile is not None:
        profile.enable()
    for data in chunks:
        proto.dataReceived(data)
        if clock is not None:
            clock.advance(0)  # the end of a reactor pass: the store's write of this group, inline
        transport.clear()
    if profile is not None:
        profile.disable()
    return time.process_time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=10000)
    p.add_argument("--durable", action="store_true", help="a DurableWriter behind the registry")
    p.add_argument("--profile", action="store_true",
                   help="print a cProfile of the first round's registrations")
    p.add_argument("--cadence", choices=("ours", "reference"), default="ours",
                   help="our node's signed requests, or a reference daemon's (see above)")
    p.add_argument("--profile-phase", default="heartbeat,poll",
                   help="with --cadence reference: the phases --profile covers (comma-separated parts of "
                        "their labels, e.g. 'register' or 'one a time')")
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds (a fresh registry each); the least CPU is shown")
    args = p.parse_args()
    if not 1 <= args.nodes <= 100_000 or not 1 <= args.repeat <= 20:
        raise SystemExit("--nodes 1..100000, --repeat 1..20")
    n = args.nodes
    keys = [SigningKey(i.to_bytes(4, "big") * 8) for i in range(n)]
    pubs = [bytes(k.verify_key) for k in keys]
    now_ms = int(time.time() * 1000)

    def signed(i: int, msg: dict[str, Any]) -> dict[str, Any]:
        return sign_request(msg, lambda m: keys[i].sign(m).signature, now_ms + i, os.urandom(16),
                            legacy=False)

    if args.cadence == "reference":
        reference(args, keys, pubs, now_ms, profile=cProfile.Profile() if args.profile else None)
        return
    registers = [signed(i, {"type": "register", "public_key": base64.b64encode(pubs[i]).decode(),
                            "listen_addr": f"127.0.0.1:{20000 + i % 40000}"}) for i in range(n)]
    one_registers = [encode_frame(m) for m in registers]
    ids = [node_id_for_key(pub) for pub in pubs]
    hostnames = [signed(i, {"type": "set_hostname", "node_id": ids[i], "hostname": f"bench-{i}"})
                 for i in range(n)]
    lookups = [{"type": "lookup", "node_id": ids[i]} for i in range(n)]

    tmp = tempfile.mkdtemp(prefix="pilot-cpu-")
    best: dict[str, float] = {}
    check = float("inf")
    profile = cProfile.Profile() if args.profile else None
    try:
        for round_ in range(args.repeat):
            # one Ed25519 check now (the machine's load moves it): the floor of a signed request
            sample = registers[0]
            sig = base64.b64decode(sample["auth"]["sig"])
            message = auth_message(sample, sample["auth"]["ts"], base64.b64decode(sample["auth"]["nonce"]))
            t0 = time.process_time()
            for _ in range(2000):
                verify(pubs[0], message, sig)
            check = min(check, (time.process_time() - t0) / 2000)
            for label, cpu in one_round(args, os.path.join(tmp, f"r{round_}"), now_ms, registers, hostnames,
                                        lookups, profile if round_ == 0 else None):
                best[label] = min(best.get(label, cpu), cpu)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"registry CPU per request, in one process: {n} nodes{', durable' if args.durable else ''}, "
          f"python {sys.version.split()[0]}; the least of {args.repeat} rounds; "
          f"one Ed25519 check: {check * 1e6:.1f} us")
    for label, cpu in best.items():
        note = " (less one signature check: {:5.1f} us)".format((cpu / n - check) * 1e6) \
            if "signed" in label else ""
        print(f"  {label:<24} {cpu / n * 1e6:7.1f} us CPU each  ({n / cpu:8.0f}/CPU-s){note}")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


def reference(args: argparse.Namespace, keys: list[SigningKey], pubs: list[bytes], now_ms: int,
              profile: cProfile.Profile | None) -> None:
    """The reference daemon's requests: CPU per request, the least of ``--repeat`` fresh registries."""
    n = len(keys)
    registers = [{"type": "register", "public_key": base64.b64encode(pubs[i]).decode(),
                  "listen_addr": f"127.0.0.1:{20000 + i % 40000}"} for i in range(n)]
    one_registers = [encode_frame(m) for m in registers]
    ids = [node_id_for_key(pub) for pub in pubs]

    def legacy(i: int, msg: dict[str, Any]) -> dict[str, Any]:
        challenge = legacy_challenge(msg)
        assert challenge is not None
        return dict(msg, signature=base64.b64encode(keys[i].sign(challenge).signature).decode())
    beats = [encode_frame(legacy(i, {"type": "heartbeat", "node_id": ids[i]})) for i in range(n)]
    polls = [encode_frame(legacy(i, {"type": "poll_handshakes", "node_id": ids[i]})) for i in range(n)]
    lookups = frames([{"type": "lookup", "node_id": ids[i]} for i in range(n)])
    # closed loop (a node waits for each answer): one frame a time, as a node's own connection brings them
    one_lookups = [encode_frame({"type": "lookup", "node_id": ids[i]}) for i in range(n)]
    names = [encode_frame(legacy(i, {"type": "set_hostname", "node_id": ids[i], "hostname": f"bench-{i}"}))
             for i in range(n)]
    one_resolves = [encode_frame({"type": "resolve_hostname", "hostname": f"bench-{i}"}) for i in range(n)]

    def signer(i: int) -> Any:
        return lambda m: keys[i].sign(m).signature
    discovers = [with_proof(Discover(ids[i]).base, signer(i), now_ms, os.urandom(8)) for i in range(n)]
    best: dict[str, float] = {}
    for round_ in range(args.repeat):
        clock = task.Clock()
        clock.advance(now_ms / 1000.0)
        registry = Registry(clock, RegistryConfig(registrations_per_minute=0, requests_per_second=0))
        beacon = Beacon(registry, clock, BeaconConfig(datagrams_per_second=0))
        proto = RegistryServerProtocol(registry, clock)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        proto.makeConnection(transport)
        # each reference daemon registers on its own connection and waits for the answer: one frame a time
        phases: list[tuple[str, Any]] = [("register (unsigned), one a time", one_registers)]
        for k in (1, 2):
            phases += [(f"heartbeat (legacy), round {k}", beats),
                       (f"poll_handshakes (legacy), round {k}", polls)]
        phases += [("lookup", lookups), ("lookup, one a time", one_lookups),
                   ("set_hostname (legacy), one a time", names),
                   ("resolve_hostname, one a time", one_resolves), ("beacon discover (signed)", None)]
        for label, chunks in phases:
            prof = profile if round_ == 0 and any(part in label for part in args.profile_phase.split(",")) \
                else None
            if chunks is None:
                t0 = time.process_time()
                for d in discovers:
                    beacon.datagram_received(d, ("127.0.0.1", 40000))
                cpu = time.process_time() - t0
            else:
                cpu = run(proto, transport, chunks, prof)
            best[label] = min(best.get(label, cpu), cpu)
            clock.advance(1)
        errors = {k: v for k, v in registry.counters.items() if k.startswith("error.")}
        if errors:
            print(f"  (round {round_ + 1}: requests refused: {errors})")
    print(f"registry CPU per request, in one process: {n} nodes, the reference daemon's requests, "
          f"python {sys.version.split()[0]}; the least of {args.repeat} rounds")
    for label, cpu in best.items():
        print(f"  {label:<36} {cpu / n * 1e6:7.1f} us CPU each  ({n / cpu:8.0f}/CPU-s)")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


def one_round(args: argparse.Namespace, folder: str, now_ms: int, registers: list[dict[str, Any]],
              hostnames: list[dict[str, Any]], lookups: list[dict[str, Any]],
              profile: cProfile.Profile | None) -> list[tuple[str, float]]:
    """One fresh registry fed every request; the CPU seconds of each phase."""
    clock = task.Clock()
    clock.advance(now_ms / 1000.0)
    os.makedirs(folder)
    writer: Any = None
    out = []
    try:
        registry = Registry(clock, RegistryConfig(registrations_per_minute=0, requests_per_second=0))
        if args.durable:
            from pilot.services.durable import DurableWriter

            def inline(write: Any) -> Any:
                return succeed(write())
            writer = DurableWriter(os.path.join(folder, "registry.json"), registry.state, clock, inline)
            registry.on_change = writer.changed
            registry.on_touch = writer.touched
        proto = RegistryServerProtocol(registry, clock, durability=writer)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        proto.makeConnection(transport)
        for label, msgs, prof in (("register (signed)", registers, profile),
                                  ("set_hostname (signed)", hostnames, None), ("lookup", lookups, None)):
            chunks = frames(msgs)
            out.append((label, run(proto, transport, chunks, prof, clock if writer is not None else None)))
            clock.advance(1)
        return out
    finally:
        if writer is not None:
            writer.close()


if __name__ == "__main__":
    main()
