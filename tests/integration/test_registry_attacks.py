"""
Attacks on a real rendezvous process over 127.0.0.1 (issue 12), each bounded
in count and time; ``docs/security.md`` lists them with their results.

* A signed ``register`` captured before a restart and replayed after it is
  refused: the nonce memory is gone, but the newest accepted ``auth.ts`` per
  node is saved in the store (``auth_ts``), and a request not newer is a replay.
* One address cannot take every connection: over ``--connections-per-address``
  a new connection is closed at once, and a freed slot can be used again; a
  request frame over 64 KiB is refused at its length prefix.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time

from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import Identity
from tests.integration.peers import RegistryClient, register_message, signed
from tests.integration.procs import LOOPBACK, RendezvousTestMixin, wait_until


class RestartReplayTests(RendezvousTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.store = os.path.join(self.folder, "registry.json")

    def lookup_endpoint(self, port: int, identity: Identity, node_id: int) -> str:
        with RegistryClient(port) as client:
            reply = client.request(signed(identity, {"type": "resolve", "requester_id": node_id,
                                                     "node_id": node_id}))
        self.assertEqual(reply["type"], "resolve_ok", reply)
        return str(reply["real_addr"])

    def test_register_replayed_after_restart(self) -> None:
        victim = Identity.generate()
        rendezvous = self.start_rendezvous(self.store, name="rendezvous-1")
        captured = signed(victim, register_message(victim, "127.0.0.1:4000"))
        with RegistryClient(rendezvous.registry_port) as client:
            reply = client.request(captured)
            self.assertEqual(reply["type"], "register_ok", reply)
            node_id = reply["node_id"]
            time.sleep(0.01)  # the victim moves on: a newer request, a new endpoint
            moved = client.request(signed(victim, register_message(victim, "127.0.0.1:4001")))
            self.assertEqual(moved["type"], "register_ok", moved)
        self.assertEqual(self.lookup_endpoint(rendezvous.registry_port, victim, node_id), "127.0.0.1:4001")
        rendezvous.proc.stop(signal.SIGTERM)

        again = self.start_rendezvous(self.store, name="rendezvous-2")
        with RegistryClient(again.registry_port) as attacker:  # another connection, another source port
            reply = attacker.request(captured)
        self.assertEqual((reply["type"], reply.get("code")), ("error", "unauthorized"), reply)
        self.assertIn("restarted", reply["error"])
        self.assertEqual(self.lookup_endpoint(again.registry_port, victim, node_id), "127.0.0.1:4001")


class ConnectionLimitTests(RendezvousTestMixin, SynchronousTestCase):
    def closed_by_server(self, sock: socket.socket) -> bool:
        sock.settimeout(5)
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def test_per_address_limit_and_large_frame(self) -> None:
        rendezvous = self.start_rendezvous(None, ["--connections-per-address", "4"])
        held = [socket.create_connection((LOOPBACK, rendezvous.registry_port), timeout=5) for _ in range(4)]
        self.addCleanup(lambda: [s.close() for s in held])
        with socket.create_connection((LOOPBACK, rendezvous.registry_port), timeout=5) as fifth:
            self.assertTrue(self.closed_by_server(fifth))
        held.pop().close()

        def usable() -> bool:
            try:
                with RegistryClient(rendezvous.registry_port) as client:
                    return client.request({"type": "lookup", "node_id": 1})["type"] == "error"
            except (ConnectionError, OSError, ValueError):
                return False
        wait_until(usable, 10, "a freed connection slot to be usable again")
        big = held.pop()
        big.sendall(struct.pack(">I", 64 * 1024 + 1) + b"{")
        big.settimeout(5)
        reply = big.recv(65536)
        self.assertIn(b'"code":"malformed"', reply)
        self.assertTrue(self.closed_by_server(big))
