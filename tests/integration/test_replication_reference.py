"""
A reference daemon (Go) and a primary/standby pair of ours, as real
processes on 127.0.0.1; runs only when ``PILOT_REFERENCE_BIN`` names the
reference's binaries (as ``test_reference_interop``).

A reference daemon knows one registry address: here a TCP forwarder in the
test stands for the service address that moves with the primary
(``docs/deploy.md``, "A reference fleet"): it leads to the primary, and to
the standby once the standby says it took over. The daemon's beacon is the
standby's throughout (the beacon holds no replicated state; only the
registry's failover is under test here).

* the daemon, registered with our primary, is on the standby before the
  takeover (replicated), and found there after it with the same node id;
* after the takeover it works against the new primary by itself: its
  heartbeats reach it through the moved address, its ``find`` is answered
  there, and a hostname it sets is held there.
"""

from __future__ import annotations

import re
import signal

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.pair import TAKEOVER, Forwarder, PairMixin
from tests.integration.peers import RegistryClient
from tests.integration.procs import Rendezvous, wait_until
from tests.integration.test_reference_interop import SKIP_REASON, RefNode, start_reference

#: The reference daemon's heartbeat (its -keepalive): short, so it meets the new primary soon.
KEEPALIVE = "1s"


class Pinned(Rendezvous):
    """The addresses a reference daemon is given: the moved registry address and a beacon."""

    def __init__(self, registry_port: int, beacon_port: int) -> None:
        self.registry_port = registry_port
        self.beacon_port = beacon_port


class ReferenceNode(RefNode):
    def argv(self) -> list[str]:
        return [*super().argv(), "-keepalive", KEEPALIVE]


class ReferenceFailoverTests(PairMixin, SynchronousTestCase):
    skip = SKIP_REASON or None

    def start_reference_node(self, name: str, registry_port: int, beacon_port: int) -> RefNode:
        return start_reference(self, name, Pinned(registry_port, beacon_port), ReferenceNode)

    def resolved(self, port: int, hostname: str) -> int | None:
        with RegistryClient(port) as c:
            reply = c.request({"type": "resolve_hostname", "hostname": hostname})
        return reply.get("node_id") if reply["type"] == "resolve_hostname_ok" else None

    def test_reference_daemon_follows_a_moved_address_to_the_new_primary(self) -> None:
        primary, standby = self.start_pair()
        address = Forwarder(primary.registry_port)
        self.addCleanup(address.close)
        ref = self.start_reference_node("ref-a", address.port, standby.beacon_port)
        self.assertEqual(self.resolved(primary.registry_port, "ref-a"), ref.node_id)
        wait_until(lambda: self.resolved(standby.registry_port, "ref-a") == ref.node_id or None, 10,
                   "the reference daemon's registration on the standby", ref.describe)

        primary.proc.send_signal(signal.SIGKILL)
        standby.proc.wait_for_output(r"PROMOTED TO PRIMARY, term 2", timeout=TAKEOVER + 10, stream="stderr")
        assert ref.proc is not None
        mark = len(ref.proc.stderr())
        address.move(standby.registry_port)  # what the operator's notify script does on PROMOTED
        self.assertEqual(self.resolved(standby.registry_port, "ref-a"), ref.node_id)

        # the daemon reconnects to its one address by itself and carries on with the new primary: its
        # heartbeats, failing since the kill, are answered again (or, after 3 failures, it registered again)
        proc = ref.proc
        wait_until(lambda: re.search(r"heartbeat recovered|msg=\"?re-registered", proc.stderr()[mark:]), 20,
                   "the reference daemon's heartbeat to reach the new primary", ref.describe)
        self.assertNotIn("re-registered with new node ID", proc.stderr())
        self.assertEqual(ref.ok("find", "ref-a")["node_id"], ref.node_id)
        self.assertEqual(ref.ok("set-hostname", "ref-moved")["hostname"], "ref-moved")
        self.assertEqual(self.resolved(standby.registry_port, "ref-moved"), ref.node_id)
        self.assertIsNone(self.resolved(standby.registry_port, "ref-a"))
