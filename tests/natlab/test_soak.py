"""
The soak of issue 10: fresh pairings of two hosts, each behind its own
``port_restricted`` router (MASQUERADE, endpoint-independent mapping), in
both router styles: WAN input dropped (home routers) and INPUT open (Docker,
Podman and libvirt hosts, cloud NAT instances), where the conntrack
collision can happen (``docs/nat.md``).  In both, A's router sits behind a
transit router (one hop between the NATs, as on internet paths).  A third
style, ``open_one_segment``, has both open routers on the public segment
itself (two hosts of one cloud subnet): there the first punch always
collides (the first side's opener reaches the other router first) and the
recovery's first round brings the pair direct about 35 s later
(``docs/nat.md``, "Recovery").

Each pairing: two fresh nodes (new identities), trust, then A pings B until
an answer (the *first ping*), then the paths on both sides are polled until
both are ``direct`` or ``punched`` (the *time to direct*, from A's first
ping) or ``NATLAB_SOAK_DEADLINE`` seconds pass (default 45: a collision is
recovered after ``COLLISION_QUIET``, 33 s, and a punch timeout).  Each pairing prints one line; the
test prints the distribution and asserts the issue's bar: at least 19 of 20
(95 %) end direct or punched, with the first ping within 3 s in those.

Opt-in (it takes 2 to 20 minutes): ``NATLAB_SOAK=1``; ``NATLAB_SOAK_PAIRINGS``
(default 20) per style.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.natlab.nodes import Node, Rendezvous, first_ping, module_lab, start_nodes, stop_nodes, trust_pair
from tests.natlab.topology import Host, Lab

PAIRINGS = int(os.environ.get("NATLAB_SOAK_PAIRINGS", "20"))
DEADLINE = float(os.environ.get("NATLAB_SOAK_DEADLINE", "45"))
FIRST_PING_BAR = 3.0
DIRECT_PATHS = ("direct", "punched")
#: style -> (drop_wan_input, A's router behind the transit router)
STYLES = {"drop": (True, True), "open_input": (False, True), "open_one_segment": (False, False)}


class SoakLab:
    def __init__(self) -> None:
        self.lab = Lab()
        try:
            self.rv_host = self.lab.add_rendezvous_host()
            self.hosts: dict[tuple[str, str], Host] = {}
            transit = self.lab.add_transit("far")
            for i, (style, (drop, far)) in enumerate(STYLES.items()):
                for side in "ab":
                    name = f"s{i}{side}"
                    router = self.lab.add_router(name, "port_restricted", drop_wan_input=drop,
                                                 transit=transit if far and side == "a" else None)
                    self.hosts[(style, side)] = self.lab.add_host(router, f"{name}-h")
            self.rendezvous = Rendezvous(self.lab, self.rv_host).start()
        except BaseException:
            self.lab.close()
            raise


_lab: list[SoakLab] = []


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class SoakTests(SynchronousTestCase):
    def setUp(self) -> None:
        if os.environ.get("NATLAB_SOAK", "").strip() in ("", "0"):
            raise SkipTest("the soak is opt-in: NATLAB_SOAK=1")

    def pairing(self, env: SoakLab, style: str, n: int) -> dict[str, Any]:
        tag = f"s{list(STYLES).index(style)}{n:02d}"
        na = Node(env.lab, env.hosts[(style, "a")], f"{tag}-a", env.rendezvous)
        nb = Node(env.lab, env.hosts[(style, "b")], f"{tag}-b", env.rendezvous)
        try:
            start_nodes([na, nb])
            trust_pair(na, nb)
            t0 = time.monotonic()
            ping = first_ping(na, nb.name, deadline=10.0)
            result: dict[str, Any] = {"style": style, "n": n, "first_ping_s": ping.seconds}
            row_a: dict[str, Any] = {}
            row_b: dict[str, Any] = {}
            reasons: set[str] = set()
            while time.monotonic() - t0 < DEADLINE:
                row_a, row_b = na.peer_row(nb) or {}, nb.peer_row(na) or {}
                reasons.update(r for r in (row_a.get("path_reason"), row_b.get("path_reason")) if r)
                if row_a.get("path") in DIRECT_PATHS and row_b.get("path") in DIRECT_PATHS:
                    result["direct_s"] = round(time.monotonic() - t0, 2)
                    break
                time.sleep(0.2)
            result.update(path_a=row_a.get("path"), path_b=row_b.get("path"), reasons=sorted(reasons))
            return result
        finally:
            stop_nodes([na, nb])

    def soak(self, style: str) -> None:
        env: SoakLab = module_lab(_lab, SoakLab)
        results = []
        for n in range(PAIRINGS):
            r = self.pairing(env, style, n)
            results.append(r)
            print(f"\n[natlab] soak {style} #{n}: " + json.dumps(r, sort_keys=True), flush=True)
        good = [r for r in results if r.get("direct_s") is not None
                and r["first_ping_s"] is not None and r["first_ping_s"] <= FIRST_PING_BAR]
        times = [r["direct_s"] for r in results if r.get("direct_s") is not None]
        summary = {"style": style, "pairings": len(results), "direct_with_fast_ping": len(good),
                   "direct": len(times)}
        if times:
            summary.update(min=min(times), median=percentile(times, 0.5), p90=percentile(times, 0.9),
                           max=max(times), under_1s=sum(t < 1 for t in times),
                           over_30s=sum(t > 30 for t in times))
        print(f"\n[natlab] soak {style} summary: " + json.dumps(summary, sort_keys=True), flush=True)
        self.assertGreaterEqual(len(good) * 20, len(results) * 19, json.dumps(results))

    def test_drop(self) -> None:
        self.soak("drop")

    def test_open_input(self) -> None:
        self.soak("open_input")

    def test_open_one_segment(self) -> None:
        self.soak("open_one_segment")
