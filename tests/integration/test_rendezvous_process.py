"""
The rendezvous as a real process, started every supported way, on 127.0.0.1
with ports the system picks (``:0``, read back from the listening lines):

* ``twistd -n pilot-rendezvous ...`` (the plugin), and with ``--log-format json``;
* ``twist pilot-rendezvous ...`` (``python -m twisted``, Twisted's newer runner);
* ``twistd -ny tac/rendezvous.tac`` with ``PILOT_*`` variables;
* ``python -m pilot rendezvous start ...`` (pilotctl), text and ``--json``.

Each time a node registers over real TCP with pilot's framing, the beacon
answers a Discover over UDP, and after SIGTERM (or SIGINT) the process exits
cleanly with the node in its store.  twistd and twist end a process stopped
by a signal by re-raising that signal once the shutdown is done, so their
exit status is -SIGTERM; pilotctl exits 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import Identity
from pilot.persist import read_json_object
from pilot.server.state import RegistryState
from tests.integration.peers import RegistryClient, beacon_discover, register_message, signed
from tests.integration.procs import (
    LOOPBACK, TWIST, TWISTD, Process, Rendezvous, RendezvousTestMixin, rendezvous_args, wait_for_rendezvous,
)


class StartMethodTests(RendezvousTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.store = os.path.join(self.folder, "registry.json")

    def exercise(self, rendezvous: Rendezvous, hostname: str) -> int:
        """Register a node (signed), look it up, and discover our address at the beacon; the node id."""
        identity = Identity.generate()
        with RegistryClient(rendezvous.registry_port) as client:
            reply = client.request(signed(identity, register_message(identity, "127.0.0.1:4000", hostname)))
            self.assertEqual(reply["type"], "register_ok", reply)
            self.assertEqual(reply["hostname"], hostname)
            self.assertEqual(reply["address"], str(identity.address))
            node_id: int = reply["node_id"]
            found = client.request({"type": "lookup", "node_id": node_id})
            self.assertEqual((found["type"], found["hostname"]), ("lookup_ok", hostname), found)
        data, (host, port) = beacon_discover(rendezvous.beacon_port, 0)
        self.assertEqual(data[0], 0x02)
        self.assertEqual(data, b"\x02\x04" + socket.inet_aton(host) + struct.pack(">H", port))
        return node_id

    def assertStored(self, store: str, node_id: int, hostname: str) -> None:
        state = RegistryState.from_json(read_json_object(store))
        node = state.nodes.get(node_id)
        self.assertIsNotNone(node, f"node {node_id} is not in the store")
        assert node is not None
        self.assertEqual(node.hostname, hostname)
        self.assertEqual(node.real_addr, "127.0.0.1:4000")

    def assertRunnerStopped(self, proc: Process, status: int) -> None:
        self.assertEqual(status, -signal.SIGTERM, proc.describe())
        self.assertIn("Main loop terminated.", proc.stdout())
        self.assertNotIn("Traceback", proc.stdout() + proc.stderr())

    def test_child_sigint_not_inherited_ignored(self) -> None:
        # a suite started as a background job has SIGINT ignored; its children must not
        # (procs.default_signals), or test_pilotctl_json_and_sigint's SIGINT does nothing
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            proc = self.spawn_python(["-c", "import signal; print(signal.getsignal(signal.SIGINT) is "
                                            "signal.default_int_handler)"], "sigint")
        finally:
            signal.signal(signal.SIGINT, previous)
        self.assertEqual(proc.wait(), 0, proc.describe())
        self.assertEqual(proc.stdout(), "True\n", proc.describe())

    def test_twistd_plugin(self) -> None:
        proc = self.spawn(TWISTD + ["-n", "--pidfile=", "pilot-rendezvous", *rendezvous_args(self.store)],
                          "twistd")
        rendezvous = wait_for_rendezvous(proc, self.store)
        # logged right after the listening lines: wait for it (the reader may not have it yet)
        proc.wait_for_output(f"Persistence: {re.escape(self.store)}")
        node_id = self.exercise(rendezvous, "via-twistd")
        self.assertRunnerStopped(proc, proc.stop(signal.SIGTERM))
        self.assertIn("Server Shut Down.", proc.stdout())
        self.assertStored(self.store, node_id, "via-twistd")

    def test_twistd_plugin_json_log(self) -> None:
        proc = self.spawn(TWISTD + ["-n", "--pidfile=", "pilot-rendezvous",
                                    *rendezvous_args(self.store, ["--log-format", "json"])], "twistd-json")
        rendezvous = wait_for_rendezvous(proc, self.store, json_log=True)
        self.exercise(rendezvous, "via-twistd-json")
        self.assertRunnerStopped(proc, proc.stop(signal.SIGTERM))
        events = [json.loads(line) for line in proc.stdout().splitlines()]
        formats = [e.get("log_format") for e in events]
        self.assertIn("Registry listening on {endpoint} ({kind})", formats)
        [listening] = [e for e in events if e.get("log_format") == "Registry listening on {endpoint} ({kind})"]
        self.assertEqual(listening["endpoint"], f"{LOOPBACK}:{rendezvous.registry_port}")

    def test_twist_plugin(self) -> None:
        proc = self.spawn(TWIST + ["pilot-rendezvous", *rendezvous_args(self.store, ["--log-format", "text"])],
                          "twist")
        rendezvous = wait_for_rendezvous(proc, self.store)
        node_id = self.exercise(rendezvous, "via-twist")
        self.assertRunnerStopped(proc, proc.stop(signal.SIGTERM))
        self.assertStored(self.store, node_id, "via-twist")

    def test_tac(self) -> None:
        env = {"PILOT_LISTEN": f"{LOOPBACK}:0", "PILOT_BEACON": f"{LOOPBACK}:0", "PILOT_STORE": self.store}
        proc = self.spawn_python(TWISTD[1:] + ["-n", "--pidfile=", "-y", "tac/rendezvous.tac"], "tac", env=env)
        rendezvous = wait_for_rendezvous(proc, self.store)
        node_id = self.exercise(rendezvous, "via-tac")
        self.assertRunnerStopped(proc, proc.stop(signal.SIGTERM))
        self.assertStored(self.store, node_id, "via-tac")

    def test_pilotctl(self) -> None:
        proc = self.spawn_python(["-m", "pilot", "rendezvous", "start", *rendezvous_args(self.store)], "pilotctl")
        rendezvous = wait_for_rendezvous(proc, self.store)
        self.assertEqual(proc.stdout(), f"Registry listening on 127.0.0.1:{rendezvous.registry_port} (TCP)\n"
                                        f"Beacon listening on 127.0.0.1:{rendezvous.beacon_port} (UDP)\n"
                                        f"Persistence: {self.store}\n")
        node_id = self.exercise(rendezvous, "via-pilotctl")
        self.assertEqual(proc.stop(signal.SIGTERM), 0, proc.describe())
        self.assertIn("Registry listening on", proc.stderr())  # the log goes to stderr
        self.assertNotIn("Traceback", proc.stderr())
        self.assertStored(self.store, node_id, "via-pilotctl")

    def test_pilotctl_json_and_sigint(self) -> None:
        proc = self.spawn_python(["-m", "pilot", "--json", "rendezvous", "start",
                                  *rendezvous_args(self.store, ["--log-format", "json"])], "pilotctl-json")
        banner: dict[str, Any] = json.loads(proc.wait_for_output(r"^\{.*\}\n").group(0))
        self.assertEqual(set(banner), {"registry", "beacon", "store", "tls_fingerprint"})
        self.assertEqual((banner["store"], banner["tls_fingerprint"]), (self.store, None))
        registry_port = int(banner["registry"].rpartition(":")[2])
        beacon_port = int(banner["beacon"].rpartition(":")[2])
        self.assertEqual(banner["registry"], f"{LOOPBACK}:{registry_port}")
        proc.wait_for_tcp(registry_port)
        node_id = self.exercise(Rendezvous(proc, registry_port, beacon_port, self.store), "via-json")
        self.assertEqual(proc.stop(signal.SIGINT), 0, proc.describe())
        self.assertEqual(len(proc.stdout().splitlines()), 1)
        for line in proc.stderr().splitlines():
            json.loads(line)  # every log line is one JSON object
        self.assertStored(self.store, node_id, "via-json")

    def test_pilotctl_port_in_use(self) -> None:
        with socket.socket() as taken:
            taken.bind((LOOPBACK, 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            proc = self.spawn_python(["-m", "pilot", "rendezvous", "start", "--json", "--no-store",
                                      "--listen", f"{LOOPBACK}:{port}", "--beacon", f"{LOOPBACK}:0"], "in-use")
            self.assertEqual(proc.wait(), 2, proc.describe())
        self.assertEqual(proc.stdout(), "")
        [line] = [x for x in proc.stderr().splitlines() if x.startswith("{\"error\"")]
        error = json.loads(line)["error"]
        self.assertEqual(error["code"], "invalid_argument")
        self.assertIn(f"{LOOPBACK}:{port}", error["message"])
        self.assertNotIn("Traceback", proc.stderr())

    def test_corrupt_store_is_one_line(self) -> None:
        with open(self.store, "w") as f:
            f.write('{"nodes": {"1": {"id": 1, "public_key": "short"}}}')
        twistd = self.spawn(TWISTD + ["-n", "--pidfile=", "pilot-rendezvous", *rendezvous_args(self.store)],
                            "twistd-corrupt")
        pilotctl = self.spawn_python(["-m", "pilot", "rendezvous", "start", *rendezvous_args(self.store)],
                                     "pilotctl-corrupt")
        self.assertEqual(twistd.wait(), 1, twistd.describe())
        [line] = twistd.stderr().splitlines()
        self.assertTrue(line.startswith(f"pilot-rendezvous: error: cannot load the registry store {self.store}"),
                        line)
        self.assertEqual(pilotctl.wait(), 13, pilotctl.describe())
        self.assertEqual(pilotctl.stdout(), "")
        self.assertEqual(pilotctl.stderr().splitlines()[0][:7], "error: ")
        for proc in (twistd, pilotctl):
            self.assertNotIn("Traceback", proc.stdout() + proc.stderr())
        with open(self.store) as f:
            self.assertEqual(f.read(), '{"nodes": {"1": {"id": 1, "public_key": "short"}}}')
