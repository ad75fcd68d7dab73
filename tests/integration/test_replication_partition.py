"""
A partition, as real processes on 127.0.0.1 (``docs/deploy.md``, "A
partition"): the standby follows the primary through a forwarder the test
cuts; the nodes still reach both servers.

* the standby takes over (it cannot tell a partition from a crash): two
  primaries, the old of term 1, the new of term 2; a node that saw term 2
  meets term 1 on the old one and so knows it for stale;
* when the partition heals, the new primary's probe reaches the old one,
  which steps down and takes the new store: the nodes registered before the
  partition and on the new side are on both; a write the old side took
  during the partition is dropped, and its node registers again.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import Identity
from tests.integration.pair import TAKEOVER, Forwarder, PairMixin
from tests.integration.peers import RegistryClient, register_message, signed
from tests.integration.procs import wait_until


def register(port: int, identity: Identity, hostname: str) -> dict[str, Any]:
    with RegistryClient(port) as c:
        return c.request(signed(identity, register_message(identity, hostname=hostname)))


def resolved(port: int, hostname: str) -> int | None:
    with RegistryClient(port) as c:
        reply = c.request({"type": "resolve_hostname", "hostname": hostname})
    return reply.get("node_id") if reply["type"] == "resolve_hostname_ok" else None


class PartitionTests(PairMixin, SynchronousTestCase):
    def test_two_primaries_until_it_heals_then_the_newer_term_wins(self) -> None:
        link = Forwarder(None)
        self.addCleanup(link.close)
        primary, standby = self.start_pair(via=link)
        before = [Identity.generate() for _ in range(10)]
        ids = {f"before-{i}": register(primary.registry_port, who, f"before-{i}")["node_id"]
               for i, who in enumerate(before)}
        wait_until(lambda: all(resolved(standby.registry_port, h) == n for h, n in ids.items()) or None, 10,
                   "the standby to hold the registrations")

        link.move(None)  # the partition: the standby loses the primary, the nodes do not
        standby.proc.wait_for_output(r"PROMOTED TO PRIMARY, term 2", timeout=TAKEOVER + 10, stream="stderr")
        late = Identity.generate()
        old_side = register(primary.registry_port, late, "old-side")
        new_side = register(standby.registry_port, Identity.generate(), "new-side")
        self.assertEqual((old_side["type"], old_side["term"]), ("register_ok", 1))
        self.assertEqual((new_side["type"], new_side["term"]), ("register_ok", 2))
        # a node of ours that saw term 2 never acts on the old primary's term-1 answers (the contract)
        self.assertLess(register(primary.registry_port, before[0], "before-0")["term"], new_side["term"])

        link.move(primary.registry_port)  # healed
        primary.proc.wait_for_output(r"STEPPING DOWN TO STANDBY", timeout=15, stream="stderr")
        with RegistryClient(primary.registry_port) as c:
            refused = c.request(register_message(Identity.generate()))
        self.assertEqual((refused["code"], refused["term"], refused["primary"]),
                         ("not_primary", 2, f"127.0.0.1:{standby.registry_port}"))
        ids["new-side"] = new_side["node_id"]
        wait_until(lambda: all(resolved(primary.registry_port, h) == n for h, n in ids.items()) or None, 10,
                   "the old primary's store to converge to the new one's")
        # what the old side took during the partition is gone from both; its node registers again
        self.assertEqual((resolved(primary.registry_port, "old-side"), resolved(standby.registry_port, "old-side")),
                         (None, None))
        self.assertEqual(register(standby.registry_port, late, "old-side")["type"], "register_ok")
