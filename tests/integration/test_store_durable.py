"""
What "acknowledged" means for the registry's store, with real processes on 127.0.0.1:

* with ``--durable``, ``kill -9`` during a burst of 1,000 registrations loses
  no registration that was acknowledged (5 rounds, killed at a different reply
  each time): a reply is only sent once the journal record holding it is on
  disk, and a restart replays the journal into the store;
* with ``--durable``, SIGTERM writes the journal into the store file;
* SIGTERM while the store cannot be written exits non-zero, with a loud log
  line, instead of 0 (changes acknowledged during the outage would be lost).
"""

from __future__ import annotations

import os
import signal
import socket
import threading

from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import Identity
from pilot.persist import read_json_object
from pilot.server.state import RegistryState
from pilot.services.store import journal_path, load_store
from tests.integration.peers import RegistryClient, register_message, signed
from tests.integration.procs import RendezvousTestMixin

BURST = 1000
#: replies read before each round's SIGKILL
KILL_AFTER = [50, 230, 480, 700, 910]
OPTIONS = ["--registrations-per-minute", "0", "--requests-per-second", "0"]


class DurableTests(RendezvousTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.store = os.path.join(self.folder, "registry.json")

    def burst(self, round_: int, kill_after: int) -> set[int]:
        """Send BURST registrations, read ``kill_after`` replies, SIGKILL; the node ids acknowledged."""
        rendezvous = self.start_rendezvous(self.store, [*OPTIONS, "--durable"], name=f"rendezvous-{round_}")
        identities = [Identity.generate() for _ in range(BURST)]
        messages = [signed(i, register_message(i, f"127.0.0.1:{4000 + round_}")) for i in identities]
        acknowledged: set[int] = set()
        with RegistryClient(rendezvous.registry_port) as client:
            sender = threading.Thread(target=lambda: [client.send(m) for m in messages], daemon=True)
            sender.start()
            for _ in range(kill_after):
                reply = client.receive()
                self.assertEqual(reply["type"], "register_ok", reply)
                acknowledged.add(reply["node_id"])
            os.kill(rendezvous.proc.pid, signal.SIGKILL)
            self.assertEqual(rendezvous.proc.wait(), -signal.SIGKILL)
            sender.join(10)
        return acknowledged

    def test_kill_during_burst_loses_no_acknowledged_registration(self) -> None:
        every: set[int] = set()
        journaled = 0
        for round_, kill_after in enumerate(KILL_AFTER):
            every |= self.burst(round_, kill_after)
            if os.path.exists(journal_path(self.store)):
                with open(journal_path(self.store), "rb") as f:
                    journaled += f.read().count(b"\n")
            # what a restarted registry has: the store and the journal replayed into it
            state = load_store(self.store)
            saved = set(state.nodes) if state is not None else set()
            lost = every - saved
            self.assertEqual(lost, set(), f"round {round_}: {len(lost)} acknowledged registrations lost")
        self.assertGreater(journaled, 0, "no round left journal records to replay: the test tests nothing")

    def test_sigterm_folds_the_journal_into_the_store(self) -> None:
        """A clean stop leaves everything in the store file itself: the next start replays nothing."""
        rendezvous = self.start_rendezvous(self.store, [*OPTIONS, "--durable"])
        identities = [Identity.generate() for _ in range(20)]
        with RegistryClient(rendezvous.registry_port) as client:
            ids = {client.request(signed(i, register_message(i)))["node_id"] for i in identities}
        with open(journal_path(self.store), "rb") as f:
            self.assertGreater(f.read().count(b"\n"), 0)  # acknowledged from the journal
        self.assertEqual(rendezvous.proc.stop(signal.SIGTERM), 0, rendezvous.proc.describe())
        self.assertEqual(os.path.getsize(journal_path(self.store)), 0)
        self.assertEqual(set(RegistryState.from_json(read_json_object(self.store)).nodes), ids)

    def test_durable_reply_waits_for_a_store_that_cannot_be_written(self) -> None:
        """
        With ``--durable`` and the store's folder gone, a registration is not
        acknowledged (the journal at the store's path cannot be written), and
        SIGTERM exits non-zero with the loud line; the client sees its
        connection close, never a ``register_ok``.
        """
        rendezvous = self.start_rendezvous(self.store, [*OPTIONS, "--durable"])
        identity = Identity.generate()
        with RegistryClient(rendezvous.registry_port) as client:
            self.assertEqual(client.request(signed(identity, register_message(identity)))["type"], "register_ok")
        os.rename(self.folder, self.folder + ".moved")
        with open(self.folder, "w") as f:
            f.write("not a folder")
        self.addCleanup(os.remove, self.folder)
        other = Identity.generate()
        with RegistryClient(rendezvous.registry_port) as client:
            client.send(signed(other, register_message(other)))
            with self.assertRaises(socket.timeout):
                client.sock.settimeout(1.0)
                client.receive()
            status = rendezvous.proc.stop(signal.SIGTERM)
            client.sock.settimeout(10.0)
            with self.assertRaises(ConnectionError):
                client.receive()
        self.assertEqual(status, 10, rendezvous.proc.describe())  # ErrorCode.internal
        self.assertIn("COULD NOT SAVE THE REGISTRY STORE", rendezvous.proc.stderr())
        self.assertIn("THE REGISTRY STORE COULD NOT BE SAVED", rendezvous.proc.stderr())

    def test_sigterm_with_unwritable_store_exits_non_zero(self) -> None:
        rendezvous = self.start_rendezvous(self.store, OPTIONS)
        identity = Identity.generate()
        with RegistryClient(rendezvous.registry_port) as client:
            self.assertEqual(client.request(signed(identity, register_message(identity)))["type"], "register_ok")
        # the store's folder goes away (a full or failed disk, an unmounted volume): a file takes its place
        os.rename(self.folder, self.folder + ".moved")
        with open(self.folder, "w") as f:
            f.write("not a folder")
        self.addCleanup(os.remove, self.folder)
        other = Identity.generate()
        with RegistryClient(rendezvous.registry_port) as client:
            self.assertEqual(client.request(signed(other, register_message(other)))["type"], "register_ok")
        status = rendezvous.proc.stop(signal.SIGTERM)
        self.assertEqual(status, 10, rendezvous.proc.describe())  # ErrorCode.internal
        self.assertIn("THE REGISTRY STORE COULD NOT BE SAVED", rendezvous.proc.stderr())
