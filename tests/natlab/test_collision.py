"""
A pair put on the relay by a conntrack collision recovers by itself
(issue 10), on two topologies of ``port_restricted`` routers with open INPUT
chains:

* A's router behind a transit router.  Before A's node starts, a datagram
  from the tunnel port of the side that punches first reaches the other
  side's router before that router's host ever sent to it: what a lost race
  leaves (or a reference node's first PILA).  That router keeps the
  UNREPLIED entry, its host's flow leaves from another port and the first
  punch fails: the pair relays.
* Both routers on the public segment (two hosts of one cloud subnet, no hop
  between the NATs).  Nothing is prepared: the side that punches first
  (``punches_first``) sends each opener 40 ms before the other, its first
  opener reaches the other router before that router's host sent, and the
  first punch collides, always that way round.

Either way, within 40 s of going relayed (the loser waits out the entry's
30 s while the winner keeps its own router's entry with TTL-1 keepers, then
the loser sends first: ``docs/nat.md``, "Recovery") both sides say
``direct`` or ``punched``, and a 10 MiB echo that runs across the switch
comes back byte-exact.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.machines.path import punches_first
from tests.natlab.nodes import Node, Rendezvous, echo_transfer, module_lab, stop_nodes, trust_pair
from tests.natlab.topology import Host, Lab, Router, has_conntrack_tool, probe_results

PORT_A, PORT_B = 47002, 47001
SIZE = 10 << 20
#: Slow enough that the echo is still running when the path switches (about 37 s in).
RATE = SIZE / 50.0
RECOVERY_BAR = 40.0
DIRECT_PATHS = ("direct", "punched")


class CollisionLab:
    def __init__(self) -> None:
        self.lab = Lab()
        try:
            self.rendezvous = Rendezvous(self.lab, self.lab.add_rendezvous_host()).start()
            far = self.lab.add_transit("far")
            self.routers: dict[str, tuple[Router, Router]] = {
                "transit": (self.lab.add_router("coll-a", "port_restricted", drop_wan_input=False, transit=far),
                            self.lab.add_router("coll-b", "port_restricted", drop_wan_input=False)),
                "segment": (self.lab.add_router("seg-a", "port_restricted", drop_wan_input=False),
                            self.lab.add_router("seg-b", "port_restricted", drop_wan_input=False)),
            }
            self.hosts: dict[str, tuple[Host, Host]] = {
                name: (self.lab.add_host(ra, f"{ra.name}-h"), self.lab.add_host(rb, f"{rb.name}-h"))
                for name, (ra, rb) in self.routers.items()}
        except BaseException:
            self.lab.close()
            raise


_lab: list[CollisionLab] = []


def poisoned(lab: Lab, router: Router, src: str, sport: int, dport: int) -> list[dict[str, Any]]:
    return [m for m in lab.udp_mappings(router)
            if m["src"] == src and m["sport"] == str(sport) and m["dport"] == str(dport) and m["unreplied"]]


class CollisionRecoveryTests(SynchronousTestCase):
    def test_relayed_by_a_collision_then_direct(self) -> None:
        """Across a transit router, a router poisoned before the nodes start."""
        self.recover("transit", poke=True)

    def test_one_segment_collides_then_direct(self) -> None:
        """Two open-INPUT routers on one segment: the first punch collides by itself."""
        self.recover("segment", poke=False)

    def recover(self, topology: str, poke: bool) -> None:
        env: CollisionLab = module_lab(_lab, CollisionLab)
        lab = env.lab
        (router_a, router_b), (host_a, host_b) = env.routers[topology], env.hosts[topology]
        nb = Node(lab, host_b, f"{topology[:3]}-b", env.rendezvous, extra=["--listen", f":{PORT_B}"])
        na = Node(lab, host_a, f"{topology[:3]}-a", env.rendezvous, extra=["--listen", f":{PORT_A}"])
        self.addCleanup(stop_nodes, [na, nb])
        a_first = punches_first((router_a.wan_ip, PORT_A), (router_b.wan_ip, PORT_B))
        winner, loser = ((host_a, PORT_A, router_a), (router_b, PORT_B)) if a_first else \
            ((host_b, PORT_B, router_b), (router_a, PORT_A))
        if poke:
            # the unsolicited datagram, from the first side's future tunnel port, before any node
            # runs (so before the second side's host ever sent to it)
            first_host, first_port, first_router = winner
            second_router, second_port = loser
            probe = lab.udp_poke(first_host, first_port, (second_router.wan_ip, second_port), wait=0.3)
            self.assertEqual(probe_results(probe), [])  # the second side's router took it itself
            if has_conntrack_tool():
                self.assertTrue(poisoned(lab, second_router, first_router.wan_ip, first_port, second_port),
                                lab.conntrack(second_router))
        nb.start()
        na.start()
        trust_pair(na, nb)

        outcome: list[Any] = []
        worker = threading.Thread(
            target=lambda: outcome.append(echo_transfer(na, nb.name, SIZE, timeout=120.0, rate=RATE)),
            name="collision-echo", daemon=True)
        t0 = time.monotonic()
        worker.start()
        timeline: list[tuple[float, Any, Any, Any]] = []
        relayed_at = direct_at = None
        while time.monotonic() - t0 < 90 and direct_at is None:
            row_a, row_b = na.peer_row(nb) or {}, nb.peer_row(na) or {}
            state = (row_a.get("path"), row_b.get("path"), row_a.get("path_reason"))
            if not timeline or timeline[-1][1:] != state:
                timeline.append((round(time.monotonic() - t0, 2), *state))
            if relayed_at is None and "relay" in state[:2]:
                relayed_at = time.monotonic()
            if relayed_at is not None and state[0] in DIRECT_PATHS and state[1] in DIRECT_PATHS:
                direct_at = time.monotonic()
            time.sleep(0.25)
        worker.join(150)
        evidence = (f"timeline {json.dumps(timeline)}\n{na.evidence(nb)}\n{nb.evidence(na)}\n"
                    f"B's router:\n{lab.conntrack(router_b)}\nA's router:\n{lab.conntrack(router_a)}")
        self.assertIsNotNone(relayed_at, "never relayed: the collision did not happen\n" + evidence)
        assert relayed_at is not None
        self.assertIsNotNone(direct_at, "never left the relay\n" + evidence)
        assert direct_at is not None
        recovery = direct_at - relayed_at
        transfer = outcome[0] if outcome else None
        print(f"\n[natlab] collision ({topology}): relayed {relayed_at - t0:.1f} s after the echo began, "
              f"direct {recovery:.1f} s later; first side {'A' if a_first else 'B'}; timeline {timeline}; "
              f"echo {transfer!r}", flush=True)
        self.assertLessEqual(recovery, RECOVERY_BAR, evidence)
        self.assertIsNotNone(transfer, "the echo did not finish\n" + evidence)
        self.assertTrue(transfer.exact, f"{transfer!r}\n{evidence}")
        self.assertGreater(transfer.seconds, direct_at - t0, "the echo ended before the switch")
