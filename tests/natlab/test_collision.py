"""
A pair put on the relay by a conntrack collision recovers by itself
(issue 10): two hosts behind ``port_restricted`` routers with open INPUT
chains, A's behind a transit router.  Before A's node starts, a datagram
from A's future tunnel port reaches B's router before B's host ever sent to
A: what a node that sends first leaves (a reference node's first PILA, or a
lost race).  B's router keeps the UNREPLIED entry, so B's flow to A leaves
from another port and the first punch fails: the pair relays.  Within 40 s
(the quiet period outlives the entry, then a coordinated punch) both sides
say ``direct`` or ``punched``, and a 10 MiB echo that runs across the
switches comes back byte-exact.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

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
            self.router_a = self.lab.add_router("coll-a", "port_restricted", drop_wan_input=False, transit=far)
            self.router_b = self.lab.add_router("coll-b", "port_restricted", drop_wan_input=False)
            self.host_a: Host = self.lab.add_host(self.router_a, "coll-a-h")
            self.host_b: Host = self.lab.add_host(self.router_b, "coll-b-h")
        except BaseException:
            self.lab.close()
            raise


_lab: list[CollisionLab] = []


def poisoned(lab: Lab, router: Router, src: str, sport: int, dport: int) -> list[dict[str, Any]]:
    return [m for m in lab.udp_mappings(router)
            if m["src"] == src and m["sport"] == str(sport) and m["dport"] == str(dport) and m["unreplied"]]


class CollisionRecoveryTests(SynchronousTestCase):
    def test_relayed_by_a_collision_then_direct(self) -> None:
        env: CollisionLab = module_lab(_lab, CollisionLab)
        lab = env.lab
        nb = Node(lab, env.host_b, "coll-b", env.rendezvous, extra=["--listen", f":{PORT_B}"])
        na = Node(lab, env.host_a, "coll-a", env.rendezvous, extra=["--listen", f":{PORT_A}"])
        self.addCleanup(stop_nodes, [na, nb])
        nb.start()
        # the unsolicited datagram, from the port A's node will use, before B ever sent to A
        poke = lab.udp_poke(env.host_a, PORT_A, (env.router_b.wan_ip, PORT_B), wait=0.3)
        self.assertEqual(probe_results(poke), [])  # B's router took it itself
        if has_conntrack_tool():
            self.assertTrue(poisoned(lab, env.router_b, env.router_a.wan_ip, PORT_A, PORT_B),
                            lab.conntrack(env.router_b))
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
                    f"B's router:\n{lab.conntrack(env.router_b)}\nA's router:\n{lab.conntrack(env.router_a)}")
        self.assertIsNotNone(relayed_at, "never relayed: the collision did not happen\n" + evidence)
        assert relayed_at is not None
        self.assertIsNotNone(direct_at, "never left the relay\n" + evidence)
        assert direct_at is not None
        recovery = direct_at - relayed_at
        transfer = outcome[0] if outcome else None
        print(f"\n[natlab] collision: relayed {relayed_at - t0:.1f} s after the first send, direct "
              f"{recovery:.1f} s later; timeline {timeline}; echo {transfer!r}", flush=True)
        self.assertLessEqual(recovery, RECOVERY_BAR, evidence)
        self.assertIsNotNone(transfer, "the echo did not finish\n" + evidence)
        self.assertTrue(transfer.exact, f"{transfer!r}\n{evidence}")
        self.assertGreater(transfer.seconds, direct_at - t0, "the echo ended before the switch")
