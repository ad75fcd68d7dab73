"""
The node daemon as real processes, run the way a user runs it: a rendezvous
(``pilotctl rendezvous start``), then per node ``PILOT_HOME=DIR pilotctl
init`` and ``pilotctl daemon start`` (which backgrounds the daemon), and
pilotctl commands against each node's control socket.  Everything is on
127.0.0.1; every wait is bounded; every daemon is stopped at cleanup (and
SIGKILLed if it does not stop), pass or fail.

* the walk-through of the README with two nodes: register, find, handshake,
  approve, ping, echo, datagrams, streams, peers, stop;
* three nodes: an untrusted node is refused, trusting it lets it in,
  untrusting shuts a node out again;
* the rendezvous going away and coming back on the same ports with the same
  store: tunnels and cached names keep working, unknown names fail fast, and
  the nodes register again by themselves.

The "IP change" on loopback is ``test_node_ipchange``; bad input, and
``daemon stop`` racing the daemon's shutdown, ``test_node_errors``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.address import Address, node_id_for_key
from pilot.identity import Identity

from tests.integration.nodes import Node, NodeTestMixin, ids
from tests.integration.procs import LOOPBACK, wait_for_rendezvous, wait_until


def ping_ok(node: Node, target: str, timeout: float = 1.0) -> bool:
    """One ping (``--count 1 --timeout T``) answered?"""
    result = node.run("ping", target, "--count", "1", "--timeout", f"{timeout:g}", timeout=timeout + 20)
    return result.status == 0


class WalkThroughTests(NodeTestMixin, SynchronousTestCase):
    def test_two_nodes(self) -> None:
        """The seed walk-through, checking each output and the latencies a user would notice."""
        rendezvous = self.start_rendezvous()
        a = self.make_node("agent-a", rendezvous)
        b = self.make_node("agent-b", rendezvous)

        # the address: the same from init, from the daemon, and from the key
        for node in (a, b):
            key = Identity.load(node.identity_path).public_key
            self.assertEqual(node.address, str(Address(0, node_id_for_key(key))))
            self.assertEqual(node.public_key, base64.b64encode(key).decode("ascii"))
            out = node.started()
            self.assertEqual(out, f"Registered as {node.hostname} ({node.address})\n")
            self.assertEqual(node.info()["address"], node.address)

        # find
        self.assertEqual(a.text("find", "agent-b"), f"agent-b {b.address} private -\n")
        found = a.ok("find", "agent-b")
        self.assertEqual((found["hostname"], found["address"], found["node_id"], found["public"]),
                         ("agent-b", b.address, b.node_id, False))

        # handshake: the request reaches b's pending within 1 s
        sent = a.ok("handshake", "agent-b", "why")
        self.assertEqual((sent["status"], sent["node_id"]), ("sent", b.node_id))
        took = self.measure(lambda: a.node_id in ids(b.call("pending")), 5.0,
                            "a's request in b's pending", b.describe)
        self.assertLess(took, 1.0, f"the handshake request took {took:.2f} s to show in pending")
        [request] = [p for p in b.ok("pending") if p["node_id"] == a.node_id]
        self.assertEqual(request["justification"], "why")
        self.assertIn(str(a.node_id), b.text("pending"))

        # approve: both sides trust each other within 2 s
        approved = b.ok("approve", str(a.node_id))
        self.assertEqual(approved, {"status": "approved", "node_id": a.node_id})
        took = self.measure(lambda: b.node_id in ids(a.call("trust")) and a.node_id in ids(b.call("trust")),
                            5.0, "mutual trust", lambda: a.describe() + "\n" + b.describe())
        self.assertLess(took, 2.0, f"trust took {took:.2f} s to show on both sides")
        self.assertEqual(b.ok("pending"), [])
        for node, other in ((a, b), (b, a)):
            [entry] = node.ok("trust")
            self.assertEqual((entry["node_id"], entry["public_key"]), (other.node_id, other.public_key))
            self.assertTrue(entry["mutual"], entry)

        # ping, three times, all answered
        result = a.ok("ping", "agent-b", "--count", "3")
        self.assertEqual(result["target"], b.address)
        self.assertEqual([r["seq"] for r in result["results"]], [1, 2, 3])
        for r in result["results"]:
            self.assertNotIn("error", r)
            self.assertGreater(r["rtt_ms"], 0)
        self.assertFalse(result["timeout"])
        text = a.text("ping", "agent-b", "--count", "1")
        self.assertIn("1 sent, 1 received, 0% loss", text)

        # echo on port 7
        self.assertEqual(a.text("connect", "agent-b", "7", "--message", "hello"), "hello\n")
        self.assertEqual(a.ok("connect", "agent-b", "7", "--message", "hello"), {"sent": 5, "received": "hello"})

        # a datagram: b receives on 5000 what a sends (recv as people see it)
        recv = self.spawn_ctl(b, "recv", "5000", "--count", "1", "--timeout", "20", json_output=False)
        recv.wait_for_output(r"waiting for datagrams on port 5000", 10.0, stream="stderr")
        self.assertEqual(a.ok("send", "agent-b", "5000", "--data", "dgram-1")["sent"], 7)
        self.assertEqual(recv.wait(20), 0, recv.describe())
        self.assertRegex(recv.stdout(), rf"^\[{re.escape(a.address)}:\d+\] dgram-1\n$")

        # a stream: b listens on 6000, a connects with a message
        listen = self.spawn_ctl(b, "listen", "6000", "--count", "1", "--timeout", "20")
        wait_until(lambda: 6000 in _bound_ports(b), 10.0, "b to listen on port 6000", b.describe)
        sent_stream = a.ok("connect", "agent-b", "6000", "--message", "stream-1", "--timeout", "5")
        self.assertEqual(sent_stream["sent"], 8)
        self.assertEqual(listen.wait(20), 0, listen.describe())
        [stream] = _json_line(listen.stdout())
        self.assertEqual((stream["from"], stream["data"], stream["bytes"]), (a.address, "stream-1", 8))

        # peers: the known ones (with their trust), and a search of the network (docs/cli.md)
        peers = a.ok("peers")
        self.assertIsInstance(peers, list)
        self.assertIn("agent-b", [p["hostname"] for p in peers])
        [row] = [p for p in peers if p["hostname"] == "agent-b"]
        self.assertEqual((row["address"], row["node_id"], row["trusted"]), (b.address, b.node_id, True))
        found = a.ok("peers", "--search", "agent")
        [row] = [p for p in found if p["hostname"] == "agent-b"]
        self.assertEqual((row["address"], row["node_id"]), (b.address, b.node_id))
        self.assertEqual(set(row), {"hostname", "address", "node_id", "public", "tags"})
        self.assertEqual(a.ok("peers", "--search", "no-such-thing"), [])

        # stop; status then says not running
        stops = []
        for node in (a, b):
            self.assertIsNotNone(node.read_pid())
            stops.append(node.stop(strict=False))  # the process must be gone; its output is checked below
            self.assertFalse(os.path.exists(node.pid_path))
            self.assertFalse(os.path.exists(node.socket_path))
            error = node.fails("not_running", "daemon", "status")
            self.assertIn("not running", error["message"])
            result = node.run("daemon", "status", json_output=False)
            self.assertEqual((result.status, result.stdout), (4, ""))
            self.assertTrue(result.stderr.startswith("error: the daemon is not running\nhint: "), result.stderr)
        # `daemon stop` itself must have succeeded (BUG: it fails with exit status 6 when its
        # status poll races the daemon's shutdown; see test_node_errors.StopTests)
        for stop in stops:
            self.assertEqual(stop.status, 0, stop.describe())
            self.assertEqual(stop.json["status"], "stopped")


class ThreeNodeTests(NodeTestMixin, SynchronousTestCase):
    def test_trust_gates_traffic(self) -> None:
        rendezvous = self.start_rendezvous()
        a, b, c = self.start_nodes(rendezvous, "node-a", "node-b", "node-c")
        self.trust_each_other(b, a)
        self.assertTrue(ping_ok(b, "node-a"))

        # c is not trusted by a (private): the registry will not tell c where a is
        error = c.fails("not_trusted", "ping", "node-a", "--count", "1", "--timeout", "2")
        self.assertIn("not approved", error["message"])
        self.assertIn("handshake", error["hint"])
        error = c.fails("not_trusted", "connect", "node-a", "7", "--message", "hi", "--timeout", "2")
        self.assertIn("handshake", error["hint"])
        c.fails("not_trusted", "send", "node-a", "5000", "--data", "x")
        # by address too, not only by name
        c.fails("not_trusted", "ping", a.address, "--count", "1", "--timeout", "2")

        # once a trusts c, c gets through
        self.trust_each_other(c, a)
        wait_until(lambda: ping_ok(c, "node-a"), 10.0, "c's ping to a after a approved c",
                   lambda: a.describe() + "\n" + c.describe())
        self.assertEqual(c.ok("connect", "node-a", "7", "--message", "hi", "--timeout", "5"),
                         {"sent": 2, "received": "hi"})

        # a untrusts b: b is shut out (its tunnel to a was up)
        self.assertEqual(a.ok("untrust", str(b.node_id)), {"status": "revoked", "node_id": b.node_id})
        wait_until(lambda: a.node_id not in ids(b.call("trust")), 5.0, "b to learn that a revoked it",
                   b.describe)
        self.assertNotIn(b.node_id, ids(a.ok("trust")))
        result = b.run("ping", "node-a", "--count", "1", "--timeout", "2")
        self.assertEqual(result.status, 9, result.describe())  # not_trusted, never a misleading timeout
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.error["code"], "not_trusted")
        result = b.run("connect", "node-a", "7", "--message", "hi", "--timeout", "3")
        self.assertEqual(result.status, 9, result.describe())  # not_trusted
        self.assertIn("trust", result.error["hint"])
        # c, still trusted, is not affected
        self.assertTrue(ping_ok(c, "node-a"))


class RendezvousRestartTests(NodeTestMixin, SynchronousTestCase):
    def test_rendezvous_goes_away_and_comes_back(self) -> None:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        store = os.path.join(folder, "registry.json")
        rendezvous = self.start_rendezvous(store)
        a, b = self.start_nodes(rendezvous, "agent-a", "agent-b")
        self.trust_each_other(a, b)
        self.assertTrue(ping_ok(a, "agent-b"))
        self.assertTrue(ping_ok(a, b.address))
        # b knows a's name: `peers` lists it (b looked a up when it approved it)
        [known] = [p for p in b.ok("peers") if p["node_id"] == a.node_id]
        self.assertEqual((known["hostname"], known["tunnel"]), ("agent-a", "established"))

        self.assertEqual(rendezvous.proc.stop(signal.SIGTERM), 0, rendezvous.proc.describe())
        down = time.monotonic()
        for node in (a, b):
            wait_until(lambda: node.info()["registry"]["state"] != "registered", 5.0,
                       f"{node.name} to notice the rendezvous is gone", node.describe)

        # while it is down (kept short: the nodes' reconnect backoff grows with the outage)
        with ThreadPoolExecutor(max_workers=2) as pool:
            a_by_address = pool.submit(ping_ok, a, b.address)
            a_by_name = pool.submit(ping_ok, a, "agent-b")
            b_by_address = pool.submit(ping_ok, b, a.address)
            b_by_name = pool.submit(b.run, "ping", "agent-a", "--count", "1", "--timeout", "1")
            status = pool.submit(a.run, "daemon", "status")
            started = time.monotonic()
            unknown = a.run("find", "unknown-name", timeout=10)
            took = time.monotonic() - started
        # the tunnel and the cached name keep working
        self.assertTrue(a_by_address.result(), a.describe())
        self.assertTrue(a_by_name.result(), a.describe())
        self.assertTrue(b_by_address.result(), b.describe())
        # a name never seen fails fast, with exit status 8 and a hint
        self.assertEqual((unknown.status, unknown.stdout), (8, ""), unknown.describe())
        self.assertEqual(unknown.error["code"], "registry_unavailable")
        self.assertIn("unknown-name", unknown.error["message"])
        self.assertTrue(unknown.error["hint"])
        self.assertLess(took, 2.0, f"find took {took:.2f} s with the rendezvous down")
        self.assertEqual(status.result().status, 0, status.result().describe())
        self.assertNotEqual(status.result().json["registry"]["state"], "registered")

        # the rendezvous again, on the same ports, with the same store
        proc = self.spawn_python(["-m", "pilot", "rendezvous", "start",
                                  "--listen", f"{LOOPBACK}:{rendezvous.registry_port}",
                                  "--beacon", f"{LOOPBACK}:{rendezvous.beacon_port}",
                                  "--store", store], "rendezvous-again")
        again = wait_for_rendezvous(proc, store)
        back = time.monotonic()
        self.assertEqual((again.registry_port, again.beacon_port),
                         (rendezvous.registry_port, rendezvous.beacon_port))
        for node in (a, b):
            wait_until(lambda: node.info()["registry"]["state"] == "registered",
                       35.0, f"{node.name} to register again", node.describe)
        took = time.monotonic() - back
        self.assertLessEqual(took, 10.0, f"the nodes registered again {took:.2f} s after the rendezvous came "
                                         f"back (it was down {back - down:.2f} s)")
        for node in (a, b):
            self.assertRegex(node.text("daemon", "status"), r"^Daemon running \(pid \d+\): .* registered\n$")
        found = a.ok("find", "agent-b")
        self.assertEqual((found["address"], found["node_id"]), (b.address, b.node_id))
        self.assertEqual(a.text("find", "agent-b"), f"agent-b {b.address} private -\n")
        self.assertTrue(ping_ok(a, "agent-b"))
        self.assertTrue(ping_ok(b, "agent-a"))

        # a trusted peer whose name this node knows (peers shows it), with its tunnel up, is
        # reachable by that name while the rendezvous is away.  BUG: registry_unavailable (b
        # never asked resolve_hostname for it: only such answers are cached)
        self.assertEqual(b_by_name.result().status, 0, b_by_name.result().describe())


def _bound_ports(node: Node) -> set[int]:
    """The stream ports the node's daemon listens on (``info``'s ``ports``)."""
    ports = node.info().get("ports")
    found: set[int] = set()
    for entry in ports if isinstance(ports, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("port"), int):
            found.add(entry["port"])
        elif isinstance(entry, int):
            found.add(entry)
    return found


def _json_line(stdout: str) -> list[dict[str, Any]]:
    """The one line of JSON (a list) that ``listen``/``recv --json`` print."""
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    value = json.loads(lines[0])
    assert isinstance(value, list), value
    return value
