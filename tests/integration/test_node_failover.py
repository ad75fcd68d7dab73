"""
Node failover across a list of rendezvous servers (issue 14, point 4;
``docs/registration.md``), with real processes on 127.0.0.1: two independent
rendezvous processes (no replication: our nodes register by signed proof
wherever they go), two daemons given both (``--registry A,B --beacon A,B``)
and registered on the first.  SIGKILL the first: both register on the second
within a few seconds, ``find`` works there, a third daemon's handshake is
relayed and approved there (the events re-subscribed), and a ping running
over the established tunnel never misses a reply.
"""

from __future__ import annotations

import json
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.nodes import Node, NodeTestMixin
from tests.integration.procs import LOOPBACK, Rendezvous, wait_until

#: Seconds within which both daemons must be registered on the second rendezvous.
MOVE_WITHIN = 5.0
PINGS = 12


class FailoverTests(NodeTestMixin, SynchronousTestCase):
    def lists(self, first: Rendezvous, second: Rendezvous) -> tuple[str, ...]:
        return ("--registry", f"{LOOPBACK}:{first.registry_port},{LOOPBACK}:{second.registry_port}",
                "--beacon", f"{LOOPBACK}:{first.beacon_port},{LOOPBACK}:{second.beacon_port}")

    def on(self, node: Node, rendezvous: Rendezvous) -> bool:
        registry = node.info()["registry"]
        return bool(registry["state"] == "registered" and registry["server"] == f"{LOOPBACK}:{rendezvous.registry_port}")

    def test_primary_killed(self) -> None:
        first = self.start_rendezvous(name="rendezvous-a")
        second = self.start_rendezvous(name="rendezvous-b")
        a = self.make_node("fo-a", first)
        b = self.make_node("fo-b", first)
        c = self.make_node("fo-c", first)
        for node in (a, b, c):
            node.started(*self.lists(first, second))
            self.assertTrue(self.on(node, first), node.describe())
            info = node.info()
            self.assertEqual(info["registry"]["servers"], [f"{LOOPBACK}:{first.registry_port}",
                                                           f"{LOOPBACK}:{second.registry_port}"])
            self.assertEqual(info["beacon"], f"{LOOPBACK}:{first.beacon_port}")
        self.trust_each_other(a, b)
        self.assertEqual(a.ok("ping", b.address, "--count", "1")["results"][0]["seq"], 1)

        pinging = self.spawn_ctl(a, "ping", b.address, "--count", str(PINGS), "--timeout", "2")
        time.sleep(2.0)  # a few pings through the tunnel first
        first.proc.kill()
        killed = time.monotonic()
        for node in (a, b, c):
            wait_until(lambda: self.on(node, second), 3 * MOVE_WITHIN,
                       f"{node.name} registered on the second rendezvous", node.describe)
        moved = time.monotonic() - killed
        self.assertLess(moved, MOVE_WITHIN, f"the move took {moved:.1f} s")
        for node in (a, b, c):
            info = node.info()
            self.assertEqual(info["beacon"], f"{LOOPBACK}:{second.beacon_port}")
            self.assertEqual(info["registry"]["server_index"], 1)

        # the second rendezvous knows both: find works there
        found = a.ok("find", b.hostname)
        self.assertEqual((found["address"], found["node_id"]), (b.address, b.node_id))
        self.assertEqual(b.ok("find", a.hostname)["address"], a.address)
        # a handshake to a new peer goes through the second rendezvous, and its
        # approval comes back as an event there
        self.trust_each_other(c, a)

        # the ping that ran across the move never missed a reply
        status = pinging.wait(PINGS * 3 + 30)
        self.assertEqual(status, 0, pinging.describe())
        result = json.loads(pinging.stdout().splitlines()[-1])
        self.assertEqual([r["seq"] for r in result["results"]], list(range(1, PINGS + 1)), pinging.stdout())
        for r in result["results"]:
            self.assertNotIn("error", r, pinging.stdout())

        # the whole list down: the tunnel and trust keep working, a new lookup fails clearly
        second.proc.kill()
        wait_until(lambda: a.info()["registry"]["state"] != "registered", 10.0,
                   "a to notice the second rendezvous is gone", a.describe)
        self.assertEqual(len(a.ok("ping", b.address, "--count", "2")["results"]), 2)
        self.assertIn(b.node_id, {row["node_id"] for row in a.ok("trust")})
        error = a.fails("registry_unavailable", "find", "fo-nobody")
        self.assertIn("unreachable", error["message"])
