"""
Two real daemons on 127.0.0.1 with the path search held at 1,400 bytes
(``PILOT_MAX_DATAGRAM``): a message larger than any datagram crosses the
echo service intact, and ``peers`` / ``info`` show the path's size
(docs/tunnel.md, "Datagrams that fit the path").  Loopback carries any size,
so what drops fragments is left to the unit tier's fake paths and the lab.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.nodes import Node, NodeTestMixin
from tests.integration.procs import wait_until


def peer_row(node: Node, other: Node) -> dict[str, Any]:
    rows = [p for p in node.ok("peers") if p.get("node_id") == other.node_id]
    return rows[0] if rows else {}


class PathMtuTests(NodeTestMixin, SynchronousTestCase):
    def test_3000_byte_message_over_1400_byte_datagrams(self) -> None:
        rendezvous = self.start_rendezvous()
        a = self.make_node("mtu-a", rendezvous)
        b = self.make_node("mtu-b", rendezvous)
        for node in (a, b):
            node.env["PILOT_MAX_DATAGRAM"] = "1400"
            node.started()
        self.trust_each_other(a, b)
        message = "".join(chr(ord("a") + i % 26) for i in range(3000))
        self.assertEqual(a.ok("connect", "mtu-b", "7", "--message", message, "--timeout", "10"),
                         {"sent": 3000, "received": message})
        wait_until(lambda: peer_row(a, b).get("mtu_state") == "complete", 10.0,
                   "a's search of the path to b", a.describe)
        row = peer_row(a, b)
        self.assertEqual((row["mtu"], row["mss"]), (1400, 1330))
        [listed] = [p for p in a.info()["peer_list"] if p["node_id"] == b.node_id]
        self.assertEqual((listed["mtu"], listed["mss"], listed["mtu_state"]), (1400, 1330, "complete"))
        self.assertIn("1400", a.text("peers"))
        # 1,232, 1,252, then 1,400 (the bound); every probe answered
        self.assertEqual(b.info()["counters"]["tunnel"]["mtu_probe_answered"], 3)
        # and again, now in segments cut to the discovered size
        self.assertEqual(a.ok("connect", "mtu-b", "7", "--message", message, "--timeout", "10"),
                         {"sent": 3000, "received": message})
