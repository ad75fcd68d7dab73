"""
Trust carried by the key, as a user meets it (issue 9 item 1; ``docs/trust.md``):
two nodes trust each other; one stops, only its ``identity.json`` is copied
to a new ``PILOT_HOME``, and it starts there on a new port.  Nobody runs a
command on either side, and the peer's ``ping`` works within 5 s.

Then the same key starts a third time beside an *empty* ``trust.json``: the
local file is the truth, so the peer's pings are refused, and ``pilotctl
ping`` says so with ``not_trusted`` (exit 9), not a timeout.

Real processes on 127.0.0.1 (``pilotctl rendezvous start``, ``daemon
start``); every wait is bounded; every daemon is stopped at cleanup.
"""

from __future__ import annotations

import os
import shutil
import time

from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import ErrorCode

from tests.integration.nodes import Node, NodeTestMixin, ids
from tests.integration.procs import LOOPBACK, Rendezvous, free_udp_port, wait_until
from tests.integration.test_node_process import ping_ok

#: The seeds' promise: the moved node answers the peer's ping within this long.
PROMISE = 5.0


class MovedWithItsKeyTests(NodeTestMixin, SynchronousTestCase):
    def moved(self, old: Node, name: str, rendezvous: Rendezvous, trust_file: str | None = None) -> Node:
        """A new home holding only ``old``'s identity (and ``trust_file`` as trust.json, if given)."""
        new = self.make_node(name, rendezvous, init=False)
        shutil.copy(old.identity_path, new.identity_path)
        if trust_file is not None:
            with open(os.path.join(new.home, "trust.json"), "w") as f:
                f.write(trust_file)
        new.hostname, new.address, new.node_id = old.hostname, old.address, old.node_id
        return new

    def start_moved(self, node: Node) -> None:
        result = node.start("--registry", f"{LOOPBACK}:{node.registry_port}",
                            "--beacon", f"{LOOPBACK}:{node.beacon_port}",
                            "--listen", f"{LOOPBACK}:{free_udp_port()}")
        if result.status != 0 or not result.stdout.startswith("Registered as "):
            raise AssertionError(f"{node.name} did not start\n{result.describe()}\n{node.describe()}")

    def test_move_with_identity_only(self) -> None:
        rendezvous = self.start_rendezvous()
        a, b = self.start_nodes(rendezvous, "carry-a", "carry-b")
        self.trust_each_other(a, b)
        self.assertTrue(ping_ok(a, b.address, 2.0))
        b.stop()

        moved = self.moved(b, "carry-b2", rendezvous)
        self.assertEqual(sorted(os.listdir(moved.home)), ["identity.json"])
        started = time.monotonic()
        self.start_moved(moved)
        registered = time.monotonic()
        wait_until(lambda: ping_ok(a, b.address, 1.0), PROMISE, "the peer's ping to the moved node",
                   lambda: a.describe() + "\n" + moved.describe())
        answered = time.monotonic()
        self.assertLess(answered - registered, PROMISE)
        # the moved node trusts a again, with a's key pinned, and wrote its trust file
        trusted = [row for row in moved.call("trust") if row.get("node_id") == a.node_id]
        self.assertEqual(len(trusted), 1, moved.describe())
        self.assertEqual(trusted[0]["public_key"], a.public_key)
        self.assertTrue(os.path.exists(os.path.join(moved.home, "trust.json")))
        self.assertIn("restored trust in 1 node(s)", moved.log())
        # and it reaches a too
        self.assertTrue(ping_ok(moved, a.address, 2.0))
        self.assertLess(answered - started, PROMISE + 30.0)  # daemon start's own wait included
        moved.stop()

        # the same key beside an empty trust file: the file is the truth, nothing is restored
        again = self.moved(b, "carry-b3", rendezvous, trust_file='{"trusted": []}\n')
        self.start_moved(again)
        self.assertNotIn(a.node_id, ids(again.call("trust")))
        result = a.run("ping", b.address, "--count", "1", "--timeout", "2")
        self.assertEqual(result.status, ErrorCode.not_trusted.value,
                         result.describe() + "\n" + again.describe())
        self.assertEqual(result.error["code"], "not_trusted")
        self.assertIn("does not trust", result.error["message"])
