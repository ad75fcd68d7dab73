"""
Paths people have (issue 11): two nodes, A behind a ``port_restricted``
router in a transit router's region, B on the public segment, across

* ``plain``: the transit router as it is (1,500-byte links);
* ``fragments``: a transit router that drops IP fragments (as many
  firewalls and cloud NATs do);
* ``mtu1280``: a region whose links carry 1,280 bytes (a tunnelled or PPPoE
  uplink), and nobody on the way sends ICMP "fragmentation needed" (a path
  MTU black hole): only packetization-layer probing finds the size.

Each test trusts the pair, pings, sends ``NATLAB_PATHS_MIB`` MiB (default
100) one way from A into a sink on B (SHA-256 checked: the path's figure,
measured as ``benchmarks/tunnel.py`` measures loopback), echoes as much
through B's port 7 and compares, and checks the datagram size both sides
discovered (``pilotctl peers``: ``mtu``): 1,472 bytes of UDP payload on
the 1,500-byte paths, at most 1,252 on the 1,280-byte one.  No datagram we
send is fragmented, so the fragment-dropping path carries everything.  The
speeds, both daemons' CPU per MiB and the load average are printed
(figures, not assertions: ``docs/performance.md`` has them beside the plain
path's).  The echo carries every byte both ways through both daemons, about
three times the CPU per MiB of the one-way stream: its speed is not the
path's to compare with loopback's stream.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.natlab.nodes import (
    Node, Rendezvous, daemon_cpu_seconds, echo_transfer, first_ping, module_lab, start_nodes, stop_nodes,
    stream_transfer, trust_pair,
)
from tests.natlab.topology import Host, Lab

SIZE = int(float(os.environ.get("NATLAB_PATHS_MIB", "100")) * (1 << 20))
TIMEOUT = float(os.environ.get("NATLAB_TRANSFER_TIMEOUT", "300"))
#: UDP payload of an IPv4 datagram on a 1,500-byte link, and on a 1,280-byte one.
FULL, SMALL = 1472, 1252
PATHS: dict[str, dict[str, Any]] = {
    "plain": {},
    "fragments": {"drop_fragments": True},
    "mtu1280": {"mtu": 1280, "drop_too_big": True},
}


class PathsLab:
    def __init__(self) -> None:
        self.lab = Lab()
        try:
            self.rendezvous = Rendezvous(self.lab, self.lab.add_rendezvous_host()).start()
            self.public: Host = self.lab.add_public_host("paths-pub")
            self.hosts: dict[str, Host] = {}
            for name, options in PATHS.items():
                transit = self.lab.add_transit(f"t-{name}", **options)
                router = self.lab.add_router(f"r-{name}", "port_restricted", transit=transit)
                self.hosts[name] = self.lab.add_host(router, f"h-{name}")
        except BaseException:
            self.lab.close()
            raise


_lab: list[PathsLab] = []
_figures: dict[str, dict[str, float]] = {}


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


class PathTests(SynchronousTestCase):
    def across(self, path: str) -> dict[str, Any]:
        env: PathsLab = module_lab(_lab, PathsLab)
        na = Node(env.lab, env.hosts[path], f"p-{path}-a", env.rendezvous)
        nb = Node(env.lab, env.public, f"p-{path}-b", env.rendezvous)
        self.addCleanup(stop_nodes, [na, nb])
        start_nodes([na, nb])
        trust_pair(na, nb)
        ping = first_ping(na, nb.name, deadline=20.0)
        self.assertTrue(ping.ok, f"no ping across {path}\n{na.evidence(nb)}\n{nb.evidence(na)}")
        # let the search finish (three probes of 0.5 s for each size that does not fit)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            row_a, row_b = na.peer_row(nb) or {}, nb.peer_row(na) or {}
            if row_a.get("mtu_state") == "complete" and row_b.get("mtu_state") == "complete":
                break
            time.sleep(0.25)
        load = _load()
        stream = stream_transfer(na, nb, SIZE, TIMEOUT)
        cpu0 = daemon_cpu_seconds(na.pid) + daemon_cpu_seconds(nb.pid)
        transfer = echo_transfer(na, nb.name, SIZE, TIMEOUT)
        echo_cpu = daemon_cpu_seconds(na.pid) + daemon_cpu_seconds(nb.pid) - cpu0
        row_a, row_b = na.peer_row(nb) or {}, nb.peer_row(na) or {}
        result = {"path": path, "first_ping_s": ping.seconds, "mib": SIZE >> 20, "load": load,
                  "stream_s": _round(stream.seconds), "stream_mib_per_s": _round(stream.mib_per_s),
                  "stream_cpu_ms_per_mib": _round(stream.cpu_ms_per_mib, 1),
                  "echo_s": _round(transfer.seconds), "mib_per_s": _round(transfer.mib_per_s),
                  "echo_cpu_ms_per_mib": round(echo_cpu * 1000.0 / max(1.0, SIZE / (1 << 20)), 1),
                  "mtu_a": row_a.get("mtu"), "mtu_b": row_b.get("mtu"),
                  "mtu_state_a": row_a.get("mtu_state"), "mtu_state_b": row_b.get("mtu_state"),
                  "path_a": row_a.get("path"),
                  # the tunnel socket's counters (too_big, gso_sends, gro_reads, gso_off: docs/tunnel.md)
                  "udp_a": (na.counters() or {}).get("udp"), "udp_b": (nb.counters() or {}).get("udp")}
        figures = {"stream": stream.mib_per_s or 0.0, "echo": transfer.mib_per_s or 0.0}
        if path == "plain":
            _figures[path] = figures
        elif "plain" in _figures:
            result["of_plain"] = {k: round(v / _figures["plain"][k], 2) for k, v in figures.items()
                                  if v and _figures["plain"].get(k)}
        print(f"\n[natlab] path {path}: {result}", flush=True)
        evidence = f"{result}\n{na.evidence(nb)}\n{nb.evidence(na)}"
        self.assertTrue(stream.exact, f"{stream!r}\n{evidence}")
        self.assertTrue(transfer.exact, f"{transfer!r}\n{evidence}")
        self.assertIn(row_a.get("path"), ("direct", "punched"), evidence)
        return result

    def test_1_plain(self) -> None:
        r = self.across("plain")
        self.assertEqual((r["mtu_a"], r["mtu_b"]), (FULL, FULL), r)

    def test_2_drops_fragments(self) -> None:
        r = self.across("fragments")
        self.assertEqual((r["mtu_a"], r["mtu_b"]), (FULL, FULL), r)

    def test_3_mtu_1280_black_hole(self) -> None:
        r = self.across("mtu1280")
        self.assertLessEqual(r["mtu_a"], SMALL, r)
        self.assertLessEqual(r["mtu_b"], SMALL, r)
        self.assertGreaterEqual(min(r["mtu_a"], r["mtu_b"]), 1200, r)
