"""
The two facts of Linux conntrack the collision recovery rests on
(``docs/nat.md``, "Recovery"), checked on a lab router (MASQUERADE, INPUT
open) with ``conntrack -L``:

* a datagram with TTL 1 that the host sends through its router renews the
  conntrack entry of its flow there (conntrack runs in PREROUTING, before
  the forward path drops the datagram for its TTL), and is not forwarded;
* it makes no entry for a new flow (a new entry is confirmed only on the way
  out, which the datagram never reaches): TTL 1 keeps alive, never creates.

An UNREPLIED UDP entry lives ``nf_conntrack_udp_timeout`` (30 s) after the
last datagram of its flow; the renewed entry shows the full timeout again
while a twin flow that got nothing shows less.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.natlab.nodes import Rendezvous, module_lab
from tests.natlab.topology import Host, Lab, Router, has_conntrack_tool

SEND = r"""
import socket, sys
port, ip, dport, ttl = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", port))
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
s.sendto(b"PILP", (ip, dport))
"""
DPORT = 47999
#: How long the twin entries age before one of them gets a TTL-1 datagram (s).
AGE = 6.0


class ConntrackLab:
    def __init__(self) -> None:
        self.lab = Lab()
        try:
            self.rendezvous = Rendezvous(self.lab, self.lab.add_rendezvous_host()).start()
            self.router: Router = self.lab.add_router("ct-r", "port_restricted", drop_wan_input=False)
            self.host: Host = self.lab.add_host(self.router, "ct-h")
            self.target: Host = self.lab.add_public_host("ct-t")
        except BaseException:
            self.lab.close()
            raise


_lab: list[ConntrackLab] = []


class ConntrackFactsTests(SynchronousTestCase):
    def send(self, env: ConntrackLab, port: int, ttl: int) -> None:
        env.lab.exec(env.host.ns, sys.executable, "-c", SEND, str(port), env.target.ip, str(DPORT), str(ttl))

    def entry(self, env: ConntrackLab, port: int) -> Optional[dict[str, Any]]:
        found = [m for m in env.lab.udp_mappings(env.router)
                 if m["src"] == env.host.ip and m["sport"] == str(port) and m["dport"] == str(DPORT)]
        return found[0] if found else None

    def test_ttl_one_refreshes_but_never_creates(self) -> None:
        if not has_conntrack_tool():
            raise SkipTest("no conntrack tool")
        env: ConntrackLab = module_lab(_lab, ConntrackLab)
        fresh, kept, twin = 46001, 46002, 46003
        self.send(env, fresh, ttl=1)
        time.sleep(0.2)
        self.assertIsNone(self.entry(env, fresh), env.lab.conntrack(env.router))  # never created
        self.send(env, kept, ttl=64)
        self.send(env, twin, ttl=64)
        time.sleep(0.2)
        first_kept, first_twin = self.entry(env, kept), self.entry(env, twin)
        self.assertIsNotNone(first_kept, env.lab.conntrack(env.router))
        self.assertIsNotNone(first_twin, env.lab.conntrack(env.router))
        assert first_kept is not None and first_twin is not None
        full = int(first_kept["timeout"])
        forwarded = env.lab.forward_counters(env.router)
        time.sleep(AGE)
        self.send(env, kept, ttl=1)
        time.sleep(0.2)
        kept_now, twin_now = self.entry(env, kept), self.entry(env, twin)
        assert kept_now is not None and twin_now is not None
        evidence = f"{env.lab.conntrack(env.router)}\n{forwarded}\n{env.lab.forward_counters(env.router)}"
        print(f"\n[natlab] conntrack: full timeout {full} s; after {AGE:g} s the TTL-1 flow shows "
              f"{kept_now['timeout']} s, its twin {twin_now['timeout']} s; a TTL-1 datagram on a new "
              "flow made no entry", flush=True)
        self.assertGreaterEqual(int(kept_now["timeout"]), full - 1, evidence)       # renewed
        self.assertLessEqual(int(twin_now["timeout"]), full - AGE + 1, evidence)    # aged
        self.assertTrue(kept_now["unreplied"], evidence)
