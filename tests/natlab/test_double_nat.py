"""
Double NAT in the lab (issue 10): a home router (``port_restricted``,
MASQUERADE) whose WAN is a host on a carrier-grade NAT's LAN (also
``port_restricted``), both Linux, both endpoint-independent.  Each test
starts two fresh nodes, trusts them, pings, echoes 1 MiB through B's port 7
and asserts the path both sides report: ``direct`` or ``punched``.

* both sides behind double NAT, every router dropping unsolicited WAN input;
* one side behind double NAT, the other behind one NAT;
* both sides behind double NAT with every router's INPUT open, A's
  carrier-grade NAT behind a transit router (a hop between the two NATs, as
  on internet paths): each side's hop-limited openers (TTL 3 passes both of
  its NATs) open its routers before the other side's datagrams can reach
  them (``docs/nat.md``, "Openers").
"""

from __future__ import annotations

import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.natlab.nodes import (
    Node, Rendezvous, echo_transfer, first_ping, module_lab, start_nodes, stop_nodes, trust_pair,
)
from tests.natlab.topology import Host, Lab

DIRECT_PATHS = ("direct", "punched")
SETTLE = 10.0


class DoubleNatLab:
    def __init__(self) -> None:
        self.lab = Lab()
        try:
            self.rendezvous = Rendezvous(self.lab, self.lab.add_rendezvous_host()).start()
            self.hosts: dict[str, Host] = {}
            transit = self.lab.add_transit("far")
            for style, drop in (("d", True), ("o", False)):
                for side in "ab":
                    cgn = self.lab.add_router(f"cg{style}{side}", "port_restricted", drop_wan_input=drop,
                                              transit=transit if (style, side) == ("o", "a") else None)
                    home = self.lab.add_router(f"hm{style}{side}", "port_restricted", drop_wan_input=drop,
                                               upstream=cgn)
                    self.hosts[f"double-{style}{side}"] = self.lab.add_host(home, f"dn{style}{side}-h")
            single = self.lab.add_router("single", "port_restricted")
            self.hosts["single"] = self.lab.add_host(single, "sg-h")
        except BaseException:
            self.lab.close()
            raise


_lab: list[DoubleNatLab] = []


class DoubleNatTests(SynchronousTestCase):
    def pair(self, a: str, b: str, tag: str) -> dict[str, Any]:
        env: DoubleNatLab = module_lab(_lab, DoubleNatLab)
        na = Node(env.lab, env.hosts[a], f"{tag}-a", env.rendezvous)
        nb = Node(env.lab, env.hosts[b], f"{tag}-b", env.rendezvous)
        self.addCleanup(stop_nodes, [na, nb])
        start_nodes([na, nb])
        trust_pair(na, nb)
        ping = first_ping(na, nb.name, deadline=20.0)
        self.assertTrue(ping.ok, f"no ping answered\n{na.evidence(nb)}\n{nb.evidence(na)}")
        transfer = echo_transfer(na, nb.name, 1 << 20, 60.0)
        self.assertTrue(transfer.exact, repr(transfer))
        end = time.monotonic() + SETTLE
        while True:
            row_a, row_b = na.peer_row(nb) or {}, nb.peer_row(na) or {}
            if (row_a.get("path") in DIRECT_PATHS and row_b.get("path") in DIRECT_PATHS) \
                    or time.monotonic() > end:
                break
            time.sleep(0.2)
        result = {"first_ping_s": ping.seconds, "path_a": row_a.get("path"), "path_b": row_b.get("path"),
                  "reason_a": row_a.get("path_reason"), "reason_b": row_b.get("path_reason")}
        print(f"\n[natlab] double NAT {a} x {b}: {result}", flush=True)
        self.assertIn(row_a.get("path"), DIRECT_PATHS, f"{result}\n{na.evidence(nb)}\n{nb.evidence(na)}")
        self.assertIn(row_b.get("path"), DIRECT_PATHS, f"{result}\n{na.evidence(nb)}\n{nb.evidence(na)}")
        return result

    def test_both_double_nat(self) -> None:
        self.pair("double-da", "double-db", "dd")

    def test_double_nat_to_single_nat(self) -> None:
        self.pair("double-da", "single", "ds")

    def test_both_double_nat_open_input(self) -> None:
        self.pair("double-oa", "double-ob", "do")
