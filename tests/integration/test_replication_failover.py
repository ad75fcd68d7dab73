"""
A primary and a standby rendezvous (real processes on 127.0.0.1): SIGKILL the
primary during a burst of registrations with hostnames from simulated nodes
that fail over as ``docs/deploy.md`` says (the next address on a failed
session, the named primary on ``not_primary``, never a lower term).

* the standby is primary within ``--takeover-after`` plus a few seconds;
* every write acknowledged before the last push (more than a push interval
  before the kill) is on it; with ``--sync-replication`` every acknowledged
  write;
* every node is registered there within 5 s of the promotion;
* the old primary, restarted on its store, steps down: one primary, and its
  store converges to the new primary's.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import Identity
from tests.integration.peers import RegistryClient, register_message
from tests.integration.procs import (
    Rendezvous, RendezvousTestMixin, rendezvous_args, wait_for_rendezvous, wait_until,
)

TOKEN = "integration-token-0123456789"
TAKEOVER = 2.0
NODES = 60
KILL_AFTER = 30
#: A write acknowledged this long before the kill must have been pushed (flush delay 0.02 s, a busy machine).
PUSH_WINDOW = 1.0
OPTIONS = ["--flush-delay", "0.02", "--registrations-per-minute", "0", "--requests-per-second", "0",
           "--takeover-after", str(TAKEOVER)]


class FailoverClient:
    """A simulated node's registry session, failing over per the contract (docs/deploy.md)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.index = 0
        self.term = 0
        self.conn: RegistryClient | None = None

    def _move(self, primary: Any) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        named = [i for i, p in enumerate(self.ports) if primary == f"127.0.0.1:{p}"]
        self.index = named[0] if named else (self.index + 1) % len(self.ports)

    def request(self, make: Callable[[], dict[str, Any]], timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.conn is None:
                    self.conn = RegistryClient(self.ports[self.index], timeout=3.0)
                reply = self.conn.request(make())
            except (OSError, ConnectionError):
                self._move(None)
                time.sleep(0.05)
                continue
            term = reply.get("term", 0)
            if term < self.term:
                self._move(None)  # a stale server: never apply its answer
                continue
            self.term = term
            if reply.get("code") == "not_primary":
                self._move(reply.get("primary"))
                time.sleep(0.05)
                continue
            return reply
        raise AssertionError("no primary answered within the timeout")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def hostname(i: int) -> str:
    return f"node-{i}"


class FailoverTests(RendezvousTestMixin, SynchronousTestCase):
    def start_pair(self, primary_extra: list[str] | None = None) -> tuple[Rendezvous, Rendezvous]:
        env = {"PILOT_REPLICATION_TOKEN": TOKEN}
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        self.primary_store = os.path.join(folder, "primary.json")
        primary = self.start_pair_member(self.primary_store, [*OPTIONS, *(primary_extra or [])], "primary", env)
        standby = self.start_pair_member(os.path.join(folder, "standby.json"),
                                         [*OPTIONS, "--standby", f"127.0.0.1:{primary.registry_port}"],
                                         "standby", env)
        standby.proc.wait_for_output(r"holding the store of", stream="stderr")
        primary.proc.wait_for_output(r"Replication: primary \(term 1\)")
        standby.proc.wait_for_output(rf"Replication: standby of 127\.0\.0\.1:{primary.registry_port} \(term 1\)")
        return primary, standby

    def start_pair_member(self, store: str, extra: list[str], name: str, env: dict[str, str]) -> Rendezvous:
        proc = self.spawn_python(["-m", "pilot", "rendezvous", "start", *rendezvous_args(store, extra)], name,
                                 env=env)
        return wait_for_rendezvous(proc, store)

    def burst_and_kill(self, primary: Rendezvous, standby: Rendezvous
                       ) -> tuple[FailoverClient, list[Identity], dict[int, tuple[int, float]], float]:
        client = FailoverClient([primary.registry_port, standby.registry_port])
        self.addCleanup(client.close)
        identities = [Identity.generate() for _ in range(NODES)]
        acked: dict[int, tuple[int, float]] = {}  # index -> (node id, when acknowledged)
        kill_time = 0.0
        for i, identity in enumerate(identities):
            if i == KILL_AFTER:
                primary.proc.send_signal(signal.SIGKILL)
                kill_time = time.monotonic()
            reply = client.request(lambda: register_message(identity, hostname=hostname(i)))
            self.assertEqual(reply["type"], "register_ok", reply)
            acked[i] = (reply["node_id"], time.monotonic())
        return client, identities, acked, kill_time

    def present(self, port: int, i: int) -> bool:
        with RegistryClient(port) as c:
            reply = c.request({"type": "resolve_hostname", "hostname": hostname(i)})
        return reply["type"] == "resolve_hostname_ok"

    def test_takeover_keeps_what_was_pushed_and_the_old_primary_steps_down(self) -> None:
        primary, standby = self.start_pair()
        client, identities, acked, kill_time = self.burst_and_kill(primary, standby)
        promoted = standby.proc.wait_for_output(r"PROMOTED TO PRIMARY, term 2", timeout=TAKEOVER + 10,
                                                stream="stderr")
        self.assertTrue(promoted)
        first_after = min(t for i, (_, t) in acked.items() if i >= KILL_AFTER)
        self.assertLess(first_after - kill_time, TAKEOVER + 5)
        lost = [i for i in range(KILL_AFTER) if not self.present(standby.registry_port, i)]
        late = [i for i in lost if acked[i][1] < kill_time - PUSH_WINDOW]
        self.assertEqual(late, [], f"acknowledged long before the kill, yet lost: {late}")
        # every node registers again with the new primary (a node's session failed over)
        start = time.monotonic()
        for i, identity in enumerate(identities):
            self.assertEqual(client.request(lambda: register_message(identity, hostname=hostname(i)))["type"],
                             "register_ok")
        self.assertLess(time.monotonic() - start, 5.0)
        self.assertTrue(all(self.present(standby.registry_port, i) for i in range(NODES)))
        # the old primary comes back on its store and port: it steps down and takes the new store
        same_port = ["--listen", f"127.0.0.1:{primary.registry_port}"]
        again = self.start_pair_member(self.primary_store, [*OPTIONS, *same_port], "primary-again",
                                       {"PILOT_REPLICATION_TOKEN": TOKEN})
        again.proc.wait_for_output(r"STEPPING DOWN TO STANDBY", timeout=15, stream="stderr")
        with RegistryClient(again.registry_port) as c:
            reply = c.request(register_message(Identity.generate()))
        self.assertEqual((reply["code"], reply["term"], reply["primary"]),
                         ("not_primary", 2, f"127.0.0.1:{standby.registry_port}"))
        wait_until(lambda: all(self.present(again.registry_port, i) for i in range(NODES)) or None, 10,
                   "the old primary's store to converge")
        with RegistryClient(standby.registry_port) as c:
            self.assertEqual(c.request(register_message(Identity.generate()))["type"], "register_ok")

    def test_sync_replication_keeps_every_acknowledged_write(self) -> None:
        primary, standby = self.start_pair(["--sync-replication", "--sync-timeout", "5"])
        client, identities, acked, kill_time = self.burst_and_kill(primary, standby)
        standby.proc.wait_for_output(r"PROMOTED TO PRIMARY", timeout=TAKEOVER + 10, stream="stderr")
        lost = [i for i in range(KILL_AFTER) if not self.present(standby.registry_port, i)]
        self.assertEqual(lost, [])
