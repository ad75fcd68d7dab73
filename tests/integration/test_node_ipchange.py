"""
An "IP change" on loopback, with real processes: node b is restarted with
the same ``PILOT_HOME`` on a new UDP port (``daemon start --listen
127.0.0.1:NEWPORT``).  Its address does not change, and node a, which trusts
b and had a tunnel up, reaches it again by itself within 5 s of b's restart,
with nothing run on a but the pings that probe it (``ping --count 1
--timeout 1``, polled).

Two ways for b to go away: ``daemon stop``, which deregisters it; and
SIGKILL, which leaves its old endpoint in the registry, so that its new
registration is an endpoint change the registry pushes to a.
"""

from __future__ import annotations

import os
import signal
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.nodes import NodeTestMixin
from tests.integration.procs import LOOPBACK, free_udp_port, wait_until
from tests.integration.test_node_process import ping_ok


class IPChangeTests(NodeTestMixin, SynchronousTestCase):
    """
    b comes back with the same PILOT_HOME on a new UDP port (its "IP change" on
    loopback); a reaches it again by itself within 5 s of b's restart, with
    nothing run on a but the pings that probe it.
    """

    def move(self, stop: bool) -> None:
        rendezvous = self.start_rendezvous()
        a, b = self.start_nodes(rendezvous, "agent-a", "agent-b")
        self.trust_each_other(a, b)
        self.assertTrue(ping_ok(a, "agent-b"))
        old_port = b.info()["local_port"]

        if stop:
            b.stop(strict=False)  # (the daemon stop race is test_node_errors')
        else:
            pid = b.read_pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: b.run("daemon", "status").status == 4, 10.0, "b's daemon to be gone")
        new_port = free_udp_port()
        self.assertNotEqual(new_port, old_port)
        out = b.started("--listen", f"{LOOPBACK}:{new_port}")
        restarted = time.monotonic()
        self.assertEqual(out, f"Registered as agent-b ({b.address})\n")  # the same address
        info = b.info()
        self.assertEqual((info["address"], info["local_port"]), (b.address, new_port))

        wait_until(lambda: ping_ok(a, "agent-b"), 15.0, "a's ping to b after b moved",
                   lambda: a.describe() + "\n" + b.describe())
        took = time.monotonic() - restarted
        self.assertLessEqual(took, 5.0, f"a reached b again only {took:.2f} s after b's restart\n"
                                        f"{a.describe()}\n{b.describe()}")
        [row] = [p for p in a.ok("peers") if p["node_id"] == b.node_id]
        self.assertEqual(row["endpoint"], f"{LOOPBACK}:{new_port}", row)
        self.assertEqual(a.ok("find", "agent-b")["address"], b.address)
        self.assertTrue(ping_ok(b, "agent-a"))

    def test_stopped_and_started_on_a_new_port(self) -> None:
        """``daemon stop`` (which deregisters b), then ``daemon start --listen 127.0.0.1:NEWPORT``."""
        self.move(stop=True)

    def test_killed_and_started_on_a_new_port(self) -> None:
        """SIGKILL (b stays registered at its old endpoint), then ``daemon start`` on a new port."""
        self.move(stop=False)
