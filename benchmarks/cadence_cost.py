#!/usr/bin/env python3
"""
The server's CPU for each request of our node's cadence, in one process: a
``heartbeat`` (signed, fresh nonce) through ``RegistryServerProtocol``, one
frame per read as a node's own connection delivers it; a signed and an
unsigned Discover through ``BeaconProtocol`` with a recording transport.
No sockets and no load generator competing for the cores, so the figures
hold on a busy machine; the kernel's share of a real socket (``recvfrom``,
``sendto``, TCP) and the reactor's loop are not in them.

Then the server's CPU at 100,000 nodes for each cadence is estimated from
them (the rates of ``benchmarks/steady_clients.py``'s cadences):

* ``ours``: a heartbeat every 50 s and an unsigned Discover 15 s after
  the last Discover; a signed Discover only on registration, an endpoint
  change or a rendezvous restart (none at steady state); and the same with
  25 s heartbeats, or with a 25 s probe;
* ``old``: as before, plus a signed Discover after every heartbeat, and the
  probe's 15 s not restarted by it.

    python3 benchmarks/cadence_cost.py --nodes 10000

Bounded: at most 100,000 nodes, at most 20 rounds; nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import base64
import functools
import os
import sys
import time
from typing import Any

from nacl.signing import SigningKey

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import task  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from pilot.protocols.beacon import BeaconProtocol  # noqa: E402
from pilot.protocols.registry import RegistryServerProtocol  # noqa: E402
from pilot.server.beacon import Beacon, BeaconConfig  # noqa: E402
from pilot.server.registry import Peer, Registry, RegistryConfig  # noqa: E402
from pilot.wire.beacon import Discover, with_proof  # noqa: E402
from pilot.wire.registry import encode_frame, sign_request  # noqa: E402

#: Requests a second per node for each cadence: (heartbeats, signed Discovers, unsigned Discovers).
CADENCES = {"ours": (1 / 50, 0.0, 1 / 15), "ours, 25 s heartbeats": (1 / 25, 0.0, 1 / 15),
            "ours, 25 s probe": (1 / 50, 0.0, 1 / 25), "old": (1 / 25, 1 / 25, 1 / 15)}
FLEET = 100_000


class Recorder:
    """A datagram transport that keeps nothing: what ``Port.write`` costs is left out."""

    def write(self, data: bytes, addr: Any) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=10000)
    p.add_argument("--repeat", type=int, default=3, help="rounds; the least CPU of each is shown")
    args = p.parse_args()
    if not 1 <= args.nodes <= 100_000 or not 1 <= args.repeat <= 20:
        raise SystemExit("--nodes 1..100000, --repeat 1..20")
    n = args.nodes
    keys = [SigningKey(i.to_bytes(4, "big") * 8) for i in range(n)]
    pubs = [bytes(k.verify_key) for k in keys]
    now_ms = int(time.time() * 1000)
    best: dict[str, float] = {}
    for round_ in range(args.repeat):
        for label, cpu in one_round(keys, pubs, now_ms + round_ * 10_000):
            best[label] = min(best.get(label, cpu), cpu / n)
    print(f"server CPU per request of our node's cadence, in one process: {n} nodes, "
          f"python {sys.version.split()[0]}; the least of {args.repeat} rounds")
    for label, cpu in best.items():
        print(f"  {label:<34} {cpu * 1e6:7.1f} us CPU each  ({1 / cpu:8.0f}/CPU-s)")
    costs = (best["heartbeat (signed, own read)"], best["Discover, signed"],
             best["Discover, unsigned, own source"])
    for name, rates in CADENCES.items():
        per_s = [FLEET * r for r in rates]
        total = sum(rate * cost for rate, cost in zip(per_s, costs))
        print(f"  {FLEET:,} nodes, cadence {name!r}: {per_s[0]:,.0f} heartbeats + {per_s[1]:,.0f} signed + "
              f"{per_s[2]:,.0f} unsigned Discovers a second = {total * 100:.1f} % of a core "
              f"(these figures alone; no kernel, no reactor loop)")


def _sign(key: SigningKey, message: bytes) -> bytes:
    return key.sign(message).signature


def one_round(keys: list[SigningKey], pubs: list[bytes], now_ms: int) -> list[tuple[str, float]]:
    n = len(keys)
    clock = task.Clock()
    clock.advance(now_ms / 1000.0)
    registry = Registry(clock, RegistryConfig(registrations_per_minute=0, requests_per_second=0))
    beacon = Beacon(registry, clock, BeaconConfig(datagrams_per_second=0))
    registry.beacon_endpoint = beacon.endpoint_text

    def signed(i: int, msg: dict[str, Any], ts: int) -> dict[str, Any]:
        return sign_request(msg, lambda m: keys[i].sign(m).signature, ts, os.urandom(16), legacy=False)

    hosts = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(n)]
    ids = []
    for i in range(n):
        register = {"type": "register", "public_key": base64.b64encode(pubs[i]).decode(),
                    "listen_addr": f"{hosts[i]}:4000"}
        ids.append(int(registry.handle(signed(i, register, now_ms), Peer(hosts[i], 50000))["node_id"]))
    sources = [(host, 4000) for host in hosts]
    signed_discovers = [with_proof(Discover(ids[i]).base, functools.partial(_sign, keys[i]), now_ms + 1,
                                   os.urandom(8)) for i in range(n)]
    heartbeats = [encode_frame(signed(i, {"type": "heartbeat", "node_id": ids[i]}, now_ms + 2))
                  for i in range(n)]
    unsigned = Discover(0).base
    beacon_proto = BeaconProtocol(beacon, clock)
    beacon_proto.transport = Recorder()  # type: ignore[assignment]
    out = []

    t0 = time.process_time()
    for i in range(n):
        beacon_proto.datagramReceived(signed_discovers[i], sources[i])
    out.append(("Discover, signed", time.process_time() - t0))

    proto = RegistryServerProtocol(registry, clock)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(transport)
    t0 = time.process_time()
    for frame in heartbeats:
        proto.dataReceived(frame)
        transport.clear()
    out.append(("heartbeat (signed, own read)", time.process_time() - t0))

    t0 = time.process_time()
    for i in range(n):
        beacon_proto.datagramReceived(unsigned, sources[i])
    out.append(("Discover, unsigned, own source", time.process_time() - t0))
    assert beacon.counters.get("discover.recorded") == n, beacon.counters
    return out


if __name__ == "__main__":
    main()
