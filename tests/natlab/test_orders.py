"""
Who speaks first (issue 10): the EIM pair in the hard style (both routers'
INPUT open, so a datagram that arrives first poisons the other router), A's
router behind a transit router.  Trust is made once; then, for each order,
both daemons restart (same identity and trust file, fresh tunnels) and the
first contact comes from A while B is idle, from B while A is idle, or from
both at once.  Each ends ``direct`` or ``punched`` on both sides with the
first ping answered within 3 s, and neither router holds a collided flow.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.natlab.nodes import Node, Rendezvous, first_ping, module_lab, start_nodes, stop_nodes, trust_pair
from tests.natlab.topology import Lab

DIRECT_PATHS = ("direct", "punched")
FIRST_PING_BAR = 3.0


class OrdersLab:
    def __init__(self) -> None:
        self.lab = Lab()
        try:
            self.rendezvous = Rendezvous(self.lab, self.lab.add_rendezvous_host()).start()
            far = self.lab.add_transit("far")
            ra = self.lab.add_router("ord-a", "port_restricted", drop_wan_input=False, transit=far)
            rb = self.lab.add_router("ord-b", "port_restricted", drop_wan_input=False)
            self.a = Node(self.lab, self.lab.add_host(ra, "ord-a-h"), "ord-a", self.rendezvous)
            self.b = Node(self.lab, self.lab.add_host(rb, "ord-b-h"), "ord-b", self.rendezvous)
            start_nodes([self.a, self.b])
            trust_pair(self.a, self.b)
            stop_nodes([self.a, self.b])
        except BaseException:
            self.lab.close()
            raise


_lab: list[OrdersLab] = []


class FirstContactOrderTests(SynchronousTestCase):
    def first_contact(self, who: str) -> dict[str, Any]:
        env: OrdersLab = module_lab(_lab, OrdersLab)
        a, b = env.a, env.b
        self.addCleanup(stop_nodes, [a, b])
        start_nodes([a, b])
        pings: dict[str, Any] = {}

        def ping(src: Node, dst: Node) -> None:
            pings[src.name] = first_ping(src, dst.name, deadline=10.0)

        pairs = {"a": [(a, b)], "b": [(b, a)], "both": [(a, b), (b, a)]}[who]
        threads = [threading.Thread(target=ping, args=pair, daemon=True) for pair in pairs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        end = time.monotonic() + 5
        while True:
            row_a, row_b = a.peer_row(b) or {}, b.peer_row(a) or {}
            if (row_a.get("path") in DIRECT_PATHS and row_b.get("path") in DIRECT_PATHS) \
                    or time.monotonic() > end:
                break
            time.sleep(0.2)
        collided = [m["line"] for r in (a.host.router, b.host.router) if r is not None
                    for m in env.lab.udp_mappings(r) if m["unreplied"] and m["src"] != r.lab.rendezvous_ip()]
        result = {"who": who, "first_ping_s": {k: v.seconds for k, v in pings.items()},
                  "path_a": row_a.get("path"), "path_b": row_b.get("path"),
                  "reasons": (row_a.get("path_reason"), row_b.get("path_reason"))}
        print(f"\n[natlab] first contact from {who}: {result}", flush=True)
        evidence = f"{result}\n{a.evidence(b)}\n{b.evidence(a)}\n" + "\n".join(collided)
        for name, outcome in pings.items():
            self.assertTrue(outcome.ok and outcome.seconds <= FIRST_PING_BAR, f"{name}: {evidence}")
        self.assertIn(row_a.get("path"), DIRECT_PATHS, evidence)
        self.assertIn(row_b.get("path"), DIRECT_PATHS, evidence)
        return result

    def test_a_first(self) -> None:
        self.first_contact("a")

    def test_b_first(self) -> None:
        self.first_contact("b")

    def test_both_at_once(self) -> None:
        self.first_contact("both")
