"""
A primary and a standby rendezvous (real processes on 127.0.0.1): SIGKILL the
primary during a burst of registrations and hostname changes from 200
simulated nodes that fail over as ``docs/deploy.md`` says (the next address
on a failed session, the named primary on ``not_primary``, never a lower
term).

* the standby is primary within ``--takeover-after`` plus a few seconds;
* every write acknowledged before the last push (more than a push interval
  before the kill) is on it; with ``--sync-replication`` every acknowledged
  write;
* every node is registered there within 5 s of the promotion;
* a handshake asked on the old primary is polled, approved and answered on
  the new one, and the two nodes relay through its beacon;
* the old primary, restarted on its store, steps down: one primary, and its
  store converges to the new primary's.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import Identity
from pilot.wire.beacon import Discover, Relay, RelayDeliver, decode, with_proof
from tests.integration.pair import OPTIONS, TAKEOVER, TOKEN, PairMixin
from tests.integration.peers import RegistryClient, register_message, set_hostname_message, signed
from tests.integration.procs import Rendezvous, wait_until

NODES = 200
KILL_AFTER = 120
#: Before the kill, every other step renames the node registered this many steps earlier.
RENAME_LAG = 10
#: A write acknowledged this long before the kill must have been pushed (flush delay 0.02 s, a busy machine).
PUSH_WINDOW = 1.0


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


def renamed(i: int) -> str:
    return f"node-{i}-moved"


class Burst:
    """What the burst's simulated nodes were told: ids, and each node's acknowledged names in order."""

    def __init__(self) -> None:
        self.identities = [Identity.generate() for _ in range(NODES)]
        self.ids: dict[int, int] = {}
        #: node index -> [(hostname, when acknowledged)], oldest first
        self.names: dict[int, list[tuple[str, float]]] = {}
        self.kill_time = 0.0
        self.first_after = 0.0  # the first acknowledgement after the kill: the new primary answers

    def acked(self, i: int, reply: dict[str, Any], name: str) -> None:
        self.ids[i] = reply["node_id"]
        self.names.setdefault(i, []).append((name, time.monotonic()))

    def must_hold(self, i: int, window: float) -> set[str]:
        """The names node ``i`` may have on the standby: its last acknowledged more than ``window``
        before the kill, or a later one acknowledged before the kill."""
        names = [(n, t) for n, t in self.names[i] if t < self.kill_time]
        settled = [k for k, (_, t) in enumerate(names) if t < self.kill_time - window]
        if not settled:
            return set()
        return {n for n, _ in names[settled[-1]:]}


class FailoverTests(PairMixin, SynchronousTestCase):
    def burst_and_kill(self, primary: Rendezvous, standby: Rendezvous) -> tuple[FailoverClient, Burst]:
        """Registrations with hostnames, and renames of earlier nodes before the kill; node 0 asks node 1
        for a handshake on the primary."""
        client = FailoverClient([primary.registry_port, standby.registry_port])
        self.addCleanup(client.close)
        burst = Burst()
        for i, identity in enumerate(burst.identities):
            if i == KILL_AFTER:
                primary.proc.send_signal(signal.SIGKILL)
                burst.kill_time = time.monotonic()
            reply = client.request(lambda: signed(identity, register_message(identity, hostname=hostname(i))))
            self.assertEqual(reply["type"], "register_ok", reply)
            burst.acked(i, reply, hostname(i))
            if i == KILL_AFTER:
                burst.first_after = time.monotonic()
            if i == 1:
                self.ask_handshake(client, burst, 0, 1)
            j = i - RENAME_LAG
            if i < KILL_AFTER and j >= 0 and i % 2 == 0:
                who = burst.identities[j]
                reply = client.request(lambda: set_hostname_message(who, burst.ids[j], renamed(j)))
                self.assertEqual(reply["type"], "set_hostname_ok", reply)
                burst.acked(j, {"node_id": burst.ids[j]}, renamed(j))
        return client, burst

    def ask_handshake(self, client: FailoverClient, burst: Burst, asker: int, asked: int) -> None:
        who = burst.identities[asker]
        message = {"type": "request_handshake", "from_node_id": burst.ids[asker], "to_node_id": burst.ids[asked],
                   "justification": "failover drill"}
        self.assertEqual(client.request(lambda: signed(who, message))["type"], "request_handshake_ok")

    def name_on(self, port: int, node_id: int) -> str | None:
        with RegistryClient(port) as c:
            reply = c.request({"type": "lookup", "node_id": node_id})
        return reply.get("hostname") if reply["type"] == "lookup_ok" else None

    def present(self, port: int, name: str) -> bool:
        with RegistryClient(port) as c:
            reply = c.request({"type": "resolve_hostname", "hostname": name})
        return reply["type"] == "resolve_hostname_ok"

    def missing(self, port: int, burst: Burst, window: float) -> list[tuple[int, str | None, set[str]]]:
        """Nodes acknowledged before the kill whose name on ``port`` is none of those it must hold."""
        out = []
        for i in range(KILL_AFTER):
            expected = burst.must_hold(i, window)
            if expected:
                found = self.name_on(port, burst.ids[i])
                if found not in expected:
                    out.append((i, found, expected))
        return out

    def handshake_and_relay(self, client: FailoverClient, standby: Rendezvous, burst: Burst) -> None:
        """Node 1 polls node 0's request (asked on the old primary) and approves it on the new primary;
        node 0 hears the answer; then both discover at the new primary's beacon and relay a frame."""
        a, b = burst.identities[0], burst.identities[1]
        a_id, b_id = burst.ids[0], burst.ids[1]
        polled = client.request(lambda: signed(b, {"type": "poll_handshakes", "node_id": b_id}))
        self.assertEqual([r["from_node_id"] for r in polled["requests"]], [a_id], polled)
        answer = {"type": "respond_handshake", "node_id": b_id, "peer_id": a_id, "accept": True}
        self.assertEqual(client.request(lambda: signed(b, answer))["type"], "respond_handshake_ok")
        polled = client.request(lambda: signed(a, {"type": "poll_handshakes", "node_id": a_id}))
        self.assertEqual([(r["from_node_id"], r["accept"]) for r in polled["responses"]], [(b_id, True)], polled)
        sockets = []
        for identity, node_id in ((a, a_id), (b, b_id)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(s.close)
            s.bind(("127.0.0.1", 0))
            s.settimeout(5.0)
            s.sendto(with_proof(Discover(node_id).encode(), identity.sign, int(time.time() * 1000), os.urandom(8)),
                     ("127.0.0.1", standby.beacon_port))
            s.recvfrom(65535)  # the discover reply: the endpoint is recorded
            sockets.append(s)
        sockets[0].sendto(Relay(a_id, b_id, b"PILT relayed after the takeover").encode(),
                          ("127.0.0.1", standby.beacon_port))
        delivered = decode(sockets[1].recvfrom(65535)[0])
        self.assertEqual(delivered, RelayDeliver(a_id, b"PILT relayed after the takeover"))

    def test_takeover_keeps_what_was_pushed_and_the_old_primary_steps_down(self) -> None:
        primary, standby = self.start_pair()
        client, burst = self.burst_and_kill(primary, standby)
        promoted = standby.proc.wait_for_output(r"PROMOTED TO PRIMARY, term 2", timeout=TAKEOVER + 10,
                                                stream="stderr")
        self.assertTrue(promoted)
        self.assertLess(burst.first_after - burst.kill_time, TAKEOVER + 5)
        lost = self.missing(standby.registry_port, burst, PUSH_WINDOW)
        self.assertEqual(lost, [], "acknowledged long before the kill, yet not on the new primary")
        # every node registers again with the new primary (its session failed over; with its signed proof),
        # within 5 s of the first answer of the new primary (the burst's remaining registrations included)
        for i, identity in enumerate(burst.identities[:KILL_AFTER]):
            name = burst.names[i][-1][0]
            reply = client.request(lambda: signed(identity, register_message(identity, hostname=name)))
            self.assertEqual(reply["type"], "register_ok", reply)
            burst.acked(i, reply, name)
        self.assertLess(time.monotonic() - burst.first_after, 5.0)
        self.assertTrue(all(self.present(standby.registry_port, burst.names[i][-1][0]) for i in range(NODES)))
        self.handshake_and_relay(client, standby, burst)
        # the old primary comes back on its store and port: it steps down and takes the new store
        same_port = ["--listen", f"127.0.0.1:{primary.registry_port}"]
        again = self.start_pair_member(self.primary_store, [*OPTIONS, *same_port], "primary-again",
                                       {"PILOT_REPLICATION_TOKEN": TOKEN})
        again.proc.wait_for_output(r"STEPPING DOWN TO STANDBY", timeout=15, stream="stderr")
        with RegistryClient(again.registry_port) as c:
            reply = c.request(register_message(Identity.generate()))
        self.assertEqual((reply["code"], reply["term"], reply["primary"]),
                         ("not_primary", 2, f"127.0.0.1:{standby.registry_port}"))
        wait_until(lambda: all(self.present(again.registry_port, burst.names[i][-1][0]) for i in range(NODES))
                   or None, 10, "the old primary's store to converge")
        with RegistryClient(standby.registry_port) as c:
            self.assertEqual(c.request(register_message(Identity.generate()))["type"], "register_ok")

    def test_sync_replication_keeps_every_acknowledged_write(self) -> None:
        primary, standby = self.start_pair(["--sync-replication", "--sync-timeout", "5"])
        client, burst = self.burst_and_kill(primary, standby)
        standby.proc.wait_for_output(r"PROMOTED TO PRIMARY", timeout=TAKEOVER + 10, stream="stderr")
        self.assertEqual(self.missing(standby.registry_port, burst, 0.0), [])
