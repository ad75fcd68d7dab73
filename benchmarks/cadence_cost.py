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

* ``ours``: a heartbeat every 50 s and an unsigned Discover 25 s after
  the last Discover; a signed Discover only on registration, an endpoint
  change or a rendezvous restart (none at steady state); and the same with
  every node behind a NAT that made it shorten its probe to 15 s, or to the
  10 s floor (``pilot.node.probe``);
* ``old``: as before, plus a signed Discover after every heartbeat, and the
  probe's 15 s not restarted by it.

    python3 benchmarks/cadence_cost.py --nodes 10000

Then the unsigned Discover's whole datagram path, ``--socket-datagrams`` of
them: a real UDP port on 127.0.0.1 in this process's epoll reactor, the
beacon's ``BeaconProtocol`` on it, and 64 client sockets sending
``--batch`` Discovers at a time; only the server's reactor passes are timed
(``reactor.iterate``: ``epoll_wait``, ``recvfrom``, the beacon, the reply's
``sendto``, the kernel's share of each), not the clients.  Each of:
replies through Twisted's ``Port.write`` or the socket's ``sendto``
(``pilot.protocols.beacon``), and the read budget of ``BEACON_READ_BUDGET``
bytes a pass (``pilot.services.rendezvous``) or 2048.

Bounded: at most 100,000 nodes, at most 20 rounds, at most 200,000
datagrams; nothing is sent but to 127.0.0.1.
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
CADENCES = {"ours": (1 / 50, 0.0, 1 / 25), "ours, every probe at 15 s": (1 / 50, 0.0, 1 / 15),
            "ours, every probe at 10 s": (1 / 50, 0.0, 1 / 10), "old": (1 / 25, 1 / 25, 1 / 15)}
FLEET = 100_000


class Recorder:
    """A datagram transport that keeps nothing: what ``Port.write`` costs is left out."""

    def write(self, data: bytes, addr: Any) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=10000)
    p.add_argument("--repeat", type=int, default=3, help="rounds; the least CPU of each is shown")
    p.add_argument("--socket-datagrams", type=int, default=50_000,
                   help="unsigned Discovers through a real socket, per variant and round (0: skip)")
    p.add_argument("--batch", type=int, default=256, help="Discovers in flight at once on the socket path")
    args = p.parse_args()
    if not 1 <= args.nodes <= 100_000 or not 1 <= args.repeat <= 20:
        raise SystemExit("--nodes 1..100000, --repeat 1..20")
    if not 0 <= args.socket_datagrams <= 200_000 or not 1 <= args.batch <= 4096:
        raise SystemExit("--socket-datagrams 0..200000, --batch 1..4096")
    if args.socket_datagrams:
        socket_path(args.socket_datagrams, args.batch, args.repeat)
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


def socket_path(datagrams: int, batch: int, repeat: int) -> None:
    """The unsigned Discover through a real socket and reactor, per variant (see the docstring)."""
    import socket

    from twisted.internet import reactor

    import pilot.protocols.beacon as beacon_protocol
    from pilot.services.rendezvous import BEACON_READ_BUDGET

    clock = task.Clock()
    registry = Registry(clock, RegistryConfig(registrations_per_minute=0, requests_per_second=0))
    beacon = Beacon(registry, clock, BeaconConfig(datagrams_per_second=0))
    proto = BeaconProtocol(beacon, clock)
    port = reactor.listenUDP(0, proto, interface="127.0.0.1")  # type: ignore[attr-defined]
    port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    server = ("127.0.0.1", port.getHost().port)
    clients = []
    for _ in range(64):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.bind(("127.0.0.1", 0))
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        c.setblocking(False)
        clients.append(c)
    probe = Discover(0).base
    direct = getattr(beacon_protocol, "_direct_sendto", None)  # None: a tree from before it (--root)
    variants = {f"Port.write, {BEACON_READ_BUDGET} B a pass": (False, BEACON_READ_BUDGET)}
    if direct is not None:
        for budget in sorted({BEACON_READ_BUDGET, 2048}):
            variants[f"sendto, {budget} B a pass"] = (True, budget)
    best: dict[str, float] = {}
    try:
        for _ in range(repeat):
            for label, (use_sendto, budget) in variants.items():
                if direct is not None:
                    beacon_protocol._direct_sendto = direct if use_sendto else (lambda transport: None)
                    proto._direct_for = None  # look again at the next reply
                port.maxThroughput = budget
                cpu = 0.0
                sent = 0
                while sent < datagrams:
                    k = min(batch, datagrams - sent)
                    target = beacon.counters.get("discover", 0) + k
                    for i in range(k):
                        clients[i % len(clients)].sendto(probe, server)
                    sent += k
                    t0 = time.process_time()
                    while beacon.counters.get("discover", 0) < target:
                        reactor.iterate(0)  # type: ignore[attr-defined]
                    cpu += time.process_time() - t0
                    for c in clients:
                        try:
                            while c.recv(64):
                                pass
                        except BlockingIOError:
                            pass
                best[label] = min(best.get(label, cpu), cpu / datagrams)
    finally:
        if direct is not None:
            beacon_protocol._direct_sendto = direct
        port.stopListening()
        for c in clients:
            c.close()
    print(f"the unsigned Discover's whole datagram path on 127.0.0.1 (server reactor passes only), "
          f"{datagrams} datagrams in batches of {batch}; the least of {repeat} rounds")
    for label, cpu in best.items():
        print(f"  {label:<34} {cpu * 1e6:7.1f} us CPU each  ({1 / cpu:8.0f}/CPU-s)")


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
