"""
``kill -9`` during a write storm never leaves a store that cannot be loaded.

A real rendezvous (pilotctl) with a store and a 5 ms flush delay takes a
storm of signed ``register`` + ``set_hostname`` requests for 300 identities
over real TCP, each round moving every node's endpoint and hostname so every
request changes the state.  Part way through (a different moment each round:
a different request count, then a burst of requests still in flight and a
different short pause) it gets SIGKILL.  Each time the store file must parse
as a complete registry store and, with the journal beside it replayed (the
writer's records since its last compaction, ``pilot.services.durable``),
hold only our nodes and only names we gave them; nothing saved in an earlier
round may be lost, and a restart on the same file must load it (clearing any
temporary the killed writer left) and answer a lookup for a saved node.
"""

from __future__ import annotations

import os
import signal
import time

from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import Identity
from pilot.persist import read_json_object
from pilot.server.journal import read_records, replay
from pilot.server.state import STORE_FORMAT, RegistryState
from pilot.services.store import journal_path
from tests.integration.peers import RegistryClient, register_message, set_hostname_message, signed
from tests.integration.procs import Rendezvous, RendezvousTestMixin

IDENTITIES = 300
#: (requests answered before the kill begins, requests sent without waiting, pause before SIGKILL in s)
ROUNDS = [(40, 20, 0.0), (170, 60, 0.002), (310, 100, 0.005), (450, 40, 0.01), (580, 20, 0.02)]
STORM_OPTIONS = ["--flush-delay", "0.005", "--registrations-per-minute", "0", "--requests-per-second", "0"]


def hostname(index: int, round_: int) -> str:
    return f"n{index}-r{round_}"


class StoreCrashTests(RendezvousTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.store = os.path.join(self.folder, "registry.json")
        self.identities = [Identity.generate() for _ in range(IDENTITIES)]
        self.by_key = {ident.public_key: i for i, ident in enumerate(self.identities)}
        self.node_ids: dict[int, int] = {}  # identity index -> node id

    def storm(self, rendezvous: Rendezvous, round_: int, answered: int, in_flight: int, pause: float) -> None:
        """Requests for every identity in turn; SIGKILL once ``answered`` replies came and ``in_flight`` more went."""
        port = 5000 + round_
        with RegistryClient(rendezvous.registry_port) as client:
            sent = 0
            for i, ident in enumerate(self.identities):
                for message in self.requests(i, ident, port, round_):
                    if sent < answered:
                        reply = client.request(message)
                        self.assertTrue(reply["type"].endswith("_ok"), reply)
                        if reply["type"] == "register_ok":
                            self.node_ids[i] = reply["node_id"]
                    elif sent < answered + in_flight:
                        client.send(message)
                    else:
                        break
                    sent += 1
                if sent >= answered + in_flight:
                    break
            if pause:
                time.sleep(pause)
            os.kill(rendezvous.proc.pid, signal.SIGKILL)
            self.assertEqual(rendezvous.proc.wait(), -signal.SIGKILL)

    def requests(self, index: int, ident: Identity, port: int, round_: int) -> list[dict[str, object]]:
        out = [signed(ident, register_message(ident, f"127.0.0.1:{port}"))]
        node_id = self.node_ids.get(index)
        if node_id is not None:
            out.append(set_hostname_message(ident, node_id, hostname(index, round_)))
        else:
            # the first time round the id is not known yet: the registry sets the name at registration
            out[0] = signed(ident, register_message(ident, f"127.0.0.1:{port}", hostname(index, round_)))
        return out

    def check_store(self, round_: int, saved_before: set[int]) -> RegistryState:
        """The file is a whole store of our nodes, with everything saved before still there."""
        value = read_json_object(self.store)
        self.assertEqual(value.get("pilot_store_format"), STORE_FORMAT)
        if os.path.exists(journal_path(self.store)):  # what a restart loads (without touching the files)
            with open(journal_path(self.store), "rb") as f:
                records, _ = read_records(f.read())
            replay(value, records)
        state = RegistryState.from_json(value)
        for node_id, node in state.nodes.items():
            self.assertIn(node.public_key, self.by_key, f"node {node_id} is not one of ours")
            index = self.by_key[node.public_key]
            names = {hostname(index, r) for r in range(round_ + 1)}
            self.assertIn(node.hostname, names | {""}, f"node {node_id} has a name we never gave it")
        self.assertLessEqual(saved_before, set(state.nodes), "nodes saved in an earlier round were lost")
        return state

    def check_restart(self, state: RegistryState, round_: int) -> Rendezvous:
        killed = {n for n in os.listdir(self.folder) if n.endswith(".tmp")}
        rendezvous = self.start_rendezvous(self.store, STORM_OPTIONS, name=f"rendezvous-{round_}")
        # (the restarted writer may be compacting already, folding the journal it replayed: its own
        # temporary can be there; the killed writer's may not)
        leftovers = [n for n in os.listdir(self.folder) if n in killed]
        self.assertEqual(leftovers, [], "a restart must clear the killed writer's temporaries")
        if state.nodes:
            node = max(state.nodes.values(), key=lambda n: n.id)
            with RegistryClient(rendezvous.registry_port) as client:
                reply = client.request({"type": "lookup", "node_id": node.id})
            self.assertEqual(reply["type"], "lookup_ok", reply)
            self.assertEqual(reply.get("hostname", ""), node.hostname)
        return rendezvous

    def test_kill_during_write_storm(self) -> None:
        rendezvous = self.start_rendezvous(self.store, STORM_OPTIONS, name="rendezvous-start")
        saved: set[int] = set()
        counts = []
        for round_, (answered, in_flight, pause) in enumerate(ROUNDS):
            self.storm(rendezvous, round_, answered, in_flight, pause)
            state = self.check_store(round_, saved)
            saved = set(state.nodes)
            counts.append(len(saved))
            rendezvous = self.check_restart(state, round_)
        self.assertGreater(counts[-1], 0, counts)
        self.assertEqual(rendezvous.proc.stop(signal.SIGTERM), 0, rendezvous.proc.describe())
        final = self.check_store(len(ROUNDS), saved)
        self.assertLessEqual(saved, set(final.nodes))
