"""
Interop with the reference implementation (Go), as real processes on
127.0.0.1: runs only when ``PILOT_REFERENCE_BIN`` names a folder holding the
reference's ``daemon``, ``pilotctl`` and ``rendezvous`` executables, built
by whoever runs the test (nothing here builds or contains them).

Each test runs one rendezvous (ours, then the reference's), one reference
daemon and two of our nodes, and checks, both ways where the reference's
tools allow it:

* registration and ``find`` across implementations (a reference registry
  numbers nodes in order; our node takes the id it is given);
* trust: the reference asks and we approve, we ask and the reference
  approves (both sides list each other);
* ping, and echo on port 7 (``connect --message``);
* a datagram each way: our ``send`` reaches the reference's ``listen``; the
  reference's pilotctl has no datagram sender, so the other way goes
  through its daemon's IPC ``SendTo`` (docs/reference-wire.md section 6) and
  arrives in our ``recv``;
* the reference's ``connect --message`` reaching our ``listen``.

The reference daemon is always pinned to the rendezvous under test (its
compiled-in defaults point at a public host) and its ``HOME`` is a fresh
folder, so it never reads or writes the user's ``~/.pilot``. Every wait is
bounded; every process is killed at cleanup, pass or fail.

A reference registry hands out relayed handshakes only when a node polls it
(the reference daemon polls on its heartbeat, every 30 s; ours after each of
its heartbeats), so trust there takes up to a minute; the bounds allow it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.nodes import Node, NodeTestMixin, ids
from tests.integration.procs import (
    LOOPBACK, Process, Rendezvous, WaitTimeout, free_tcp_port, free_udp_port, wait_until,
)

#: The variable naming the folder of reference binaries.
VARIABLE = "PILOT_REFERENCE_BIN"
BINARIES = ("daemon", "pilotctl", "rendezvous")
#: Seconds for one reference pilotctl run, for the reference daemon to come up, and for trust to settle.
REF_CTL_TIMEOUT = 30.0
REF_START_TIMEOUT = 20.0
TRUST_TIMEOUT = 90.0


def reference_bin() -> tuple[str | None, str]:
    """The folder of reference binaries, or None and why the tests skip."""
    folder = os.environ.get(VARIABLE, "")
    if not folder:
        return None, (f"{VARIABLE} is not set: set it to a folder holding the reference implementation's "
                      f"{', '.join(BINARIES)} executables to run the interop tests")
    for name in BINARIES:
        path = os.path.join(folder, name)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return None, f"{VARIABLE}={folder} has no executable {name!r} (needs {', '.join(BINARIES)})"
    return os.path.abspath(folder), ""


REFERENCE_BIN, SKIP_REASON = reference_bin()

class RefResult:
    """One finished reference pilotctl run (``--json``: ``{"status": "ok", "data": ...}`` on success)."""

    def __init__(self, argv: list[str], status: int, stdout: str, stderr: str) -> None:
        self.argv = argv
        self.status = status
        self.stdout = stdout
        self.stderr = stderr

    @property
    def data(self) -> Any:
        try:
            value = json.loads(self.stdout)
        except ValueError:
            raise AssertionError(f"the reference pilotctl printed no JSON\n{self.describe()}") from None
        if not (isinstance(value, dict) and value.get("status") == "ok"):
            raise AssertionError(f"the reference pilotctl did not succeed\n{self.describe()}")
        return value.get("data")

    def describe(self) -> str:
        return (f"--- $ pilotctl {' '.join(self.argv[1:])}  (exit status {self.status})\n"
                f"--- stdout:\n{self.stdout[-3000:]}\n--- stderr:\n{self.stderr[-3000:]}")


class RefNode:
    """A reference daemon run as a process, and the reference pilotctl against it."""

    def __init__(self, name: str, home: str, rendezvous: Rendezvous) -> None:
        assert REFERENCE_BIN is not None
        self.name = name
        self.hostname = name
        self.home = home
        self.socket_path = os.path.join(home, "pilot.sock")
        self.registry = f"{LOOPBACK}:{rendezvous.registry_port}"
        self.beacon = f"{LOOPBACK}:{rendezvous.beacon_port}"
        self.env = {"HOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "PILOT_SOCKET": self.socket_path, "PILOT_REGISTRY": self.registry}
        self.proc: Process | None = None
        self.node_id = 0
        self.address = ""

    def argv(self) -> list[str]:
        """The daemon's command line: every address pinned to loopback."""
        assert REFERENCE_BIN is not None
        return [os.path.join(REFERENCE_BIN, "daemon"),
                "-registry", self.registry, "-beacon", self.beacon,
                "-listen", f"{LOOPBACK}:0", "-socket", self.socket_path,
                "-identity", os.path.join(self.home, "identity.key"),
                "-hostname", self.hostname, "-log-level", "debug"]

    def run(self, *args: str, timeout: float = REF_CTL_TIMEOUT) -> RefResult:
        """``pilotctl --json ARGS`` (the reference's); killed and failed past ``timeout``."""
        assert REFERENCE_BIN is not None
        argv = [os.path.join(REFERENCE_BIN, "pilotctl"), "--json", *args]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                                  env=self.env, cwd=self.home, start_new_session=True)
        except subprocess.TimeoutExpired as e:
            raise WaitTimeout(f"reference pilotctl {' '.join(args)} did not finish within {timeout:.1f} s\n"
                              f"{(e.stdout or b'').decode('utf-8', 'replace')}\n{self.describe()}") from None
        return RefResult(argv, done.returncode, done.stdout.decode("utf-8", "replace"),
                         done.stderr.decode("utf-8", "replace"))

    def ok(self, *args: str, timeout: float = REF_CTL_TIMEOUT) -> Any:
        """``pilotctl --json ARGS``, which must succeed; its ``data``."""
        result = self.run(*args, timeout=timeout)
        if result.status != 0:
            raise AssertionError(f"reference pilotctl {' '.join(args)} failed on {self.name}\n"
                                 f"{result.describe()}\n{self.describe()}")
        return result.data

    def send_datagram(self, node_id: int, port: int, data: bytes, network: int = 0) -> None:
        """
        One datagram through the daemon's IPC ``SendTo`` (docs/reference-wire.md
        section 6): a 4-byte big-endian length, then 0x0B, the 6-byte address
        (network, node), the 2-byte port and the data.
        """
        body = bytes([0x0B]) + struct.pack(">HIH", network, node_id, port) + data
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            s.connect(self.socket_path)
            s.sendall(struct.pack(">I", len(body)) + body)
            time.sleep(0.2)  # the daemon reads the frame before it sees the close

    def trusted(self) -> set[int]:
        rows = self.ok("trust").get("trusted") or []
        return {row.get("node_id") for row in rows}

    def pending(self) -> set[int]:
        rows = self.ok("pending").get("pending") or []
        return {row.get("node_id") for row in rows}

    def describe(self) -> str:
        return self.proc.describe() if self.proc is not None else f"--- {self.name}: not started"


def start_reference(test: Any, name: str, rendezvous: Rendezvous, kind: type[RefNode] = RefNode) -> RefNode:
    """A reference daemon of ``kind`` on ``rendezvous``, started by ``test`` (``spawn``); once it answers ``info``."""
    home = tempfile.mkdtemp(prefix=f"pr-{name}-")  # short: a Unix socket path is limited to 107 bytes
    os.chmod(home, 0o700)
    test.addCleanup(shutil.rmtree, home, True)
    ref = kind(name, home, rendezvous)
    ref.proc = test.spawn(ref.argv(), name, cwd=home, env=ref.env)

    def ready() -> dict[str, Any] | None:
        assert ref.proc is not None
        if not ref.proc.running:
            raise AssertionError(f"the reference daemon exited\n{ref.describe()}")
        if not os.path.exists(ref.socket_path):
            return None
        result = ref.run("info", timeout=5.0)
        info = result.data if result.status == 0 else None
        return info if info and info.get("node_id") else None

    info = wait_until(ready, REF_START_TIMEOUT, f"{name} to register and answer info", ref.describe)
    ref.node_id, ref.address = int(info["node_id"]), str(info["address"])
    return ref


class InteropMixin(NodeTestMixin):
    """The checks, against whichever rendezvous ``start_any_rendezvous`` starts."""

    skip = SKIP_REASON or None

    def start_any_rendezvous(self) -> Rendezvous:
        raise NotImplementedError

    def start_reference_node(self, name: str, rendezvous: Rendezvous) -> RefNode:
        return start_reference(self, name, rendezvous)

    def start_our_node(self, name: str, rendezvous: Rendezvous) -> Node:
        node = self.make_node(name, rendezvous)
        node.started()
        info = node.info()  # a reference registry assigns its own id: take the one registered
        node.node_id, node.address = int(info["node_id"]), str(info["address"])
        return node

    def both(self, ours: Node, ref: RefNode) -> Callable[[], str]:
        return lambda: ours.describe() + "\n" + ref.describe()

    def check_registration(self, ours: Node, ref: RefNode) -> None:
        t: Any = self
        found = ref.ok("find", ours.hostname)
        t.assertEqual((found["node_id"], found["address"]), (ours.node_id, ours.address))
        found = ours.ok("find", ref.hostname)
        t.assertEqual((found["node_id"], found["address"]), (ref.node_id, ref.address))

    def check_reference_asks(self, ours: Node, ref: RefNode) -> None:
        """The reference asks, we approve: both list each other."""
        t: Any = self
        t.assertEqual(ref.ok("handshake", ours.hostname, "interop: reference asks")["status"], "sent")
        wait_until(lambda: ref.node_id in ids(ours.call("pending")), TRUST_TIMEOUT,
                   f"{ref.name}'s request in {ours.name}'s pending", self.both(ours, ref))
        ours.ok("approve", str(ref.node_id))
        wait_until(lambda: ours.node_id in ref.trusted() and ref.node_id in ids(ours.call("trust")),
                   TRUST_TIMEOUT, f"{ours.name} and {ref.name} to trust each other", self.both(ours, ref))

    def check_we_ask(self, ours: Node, ref: RefNode) -> None:
        """We ask, the reference approves: both list each other."""
        t: Any = self
        t.assertEqual(ours.ok("handshake", ref.hostname, "interop: we ask")["status"], "sent")
        wait_until(lambda: ours.node_id in ref.pending(), TRUST_TIMEOUT,
                   f"{ours.name}'s request in {ref.name}'s pending", self.both(ours, ref))
        ref.ok("approve", str(ours.node_id))
        wait_until(lambda: ours.node_id in ref.trusted() and ref.node_id in ids(ours.call("trust")),
                   TRUST_TIMEOUT, f"{ours.name} and {ref.name} to trust each other", self.both(ours, ref))

    def check_ping_and_echo(self, ours: Node, ref: RefNode) -> None:
        t: Any = self
        pinged = ref.ok("ping", ours.hostname, "--count", "2", "--timeout", "5s")
        t.assertEqual(pinged["target"], ours.address)
        t.assertEqual([("error" in r, r.get("rtt_ms", 0) > 0) for r in pinged["results"]], [(False, True)] * 2,
                      pinged)
        pinged = ours.ok("ping", ref.hostname, "--count", "2", "--timeout", "5")
        t.assertEqual(pinged["target"], ref.address)
        t.assertEqual([("error" in r, r.get("rtt_ms", 0) > 0) for r in pinged["results"]], [(False, True)] * 2,
                      pinged)

        echoed = ref.ok("connect", ours.hostname, "7", "--message", "hello-from-reference", "--timeout", "10s")
        t.assertEqual(echoed["response"], "hello-from-reference")
        echoed = ours.ok("connect", ref.hostname, "7", "--message", "hello-from-ours", "--timeout", "10")
        t.assertEqual(echoed, {"sent": 15, "received": "hello-from-ours"})

    def check_datagrams(self, ours: Node, ref: RefNode) -> None:
        t: Any = self
        # ours -> reference: the reference's `listen` receives datagrams (as text: only then does it say on
        # stderr that it is connected to its daemon, and so ready)
        assert REFERENCE_BIN is not None
        listen = self.spawn([os.path.join(REFERENCE_BIN, "pilotctl"), "listen", "5000", "--count", "1",
                             "--timeout", "30s"], f"{ref.name}-listen", cwd=ref.home, env=ref.env)
        listen.wait_for_output(r"listening on port 5000", 10.0, stream="stderr")
        _until_exit(listen, lambda: ours.ok("send", ref.hostname, "5000", "--data", "dgram-from-ours"))
        t.assertEqual(listen.wait(10), 0, listen.describe())
        t.assertRegex(listen.stdout(), rf"^\[{re.escape(ours.address)}:\d+\] dgram-from-ours\n$")

        # reference -> ours: its daemon's IPC SendTo, our `recv`
        recv = self.spawn_ctl(ours, "recv", "5001", "--count", "1", "--timeout", "30", json_output=False)
        recv.wait_for_output(r"waiting for datagrams on port 5001", 10.0, stream="stderr")
        _until_exit(recv, lambda: ref.send_datagram(ours.node_id, 5001, b"dgram-from-reference"))
        t.assertEqual(recv.wait(10), 0, recv.describe())
        t.assertRegex(recv.stdout(), rf"^\[{re.escape(ref.address)}:\d+\] dgram-from-reference\n$")

    def check_reference_connects_to_our_listen(self, ours: Node, ref: RefNode) -> None:
        t: Any = self
        listen = self.spawn_ctl(ours, "listen", "6000", "--count", "1", "--timeout", "30")
        wait_until(lambda: 6000 in _bound_ports(ours), 10.0, f"{ours.name} to listen on port 6000", ours.describe)
        # the reference's connect --message waits for an answer, which `listen` never gives: it ends with
        # its own "no response" timeout after the message was delivered (and closes the stream)
        result = ref.run("connect", ours.hostname, "6000", "--message", "stream-from-reference", "--timeout", "3s")
        t.assertIn(result.status, (0, 1), result.describe())
        t.assertEqual(listen.wait(20), 0, listen.describe())
        [stream] = json.loads(listen.stdout())
        t.assertEqual((stream["from"], stream["data"]), (ref.address, "stream-from-reference"))

    def run_interop(self) -> None:
        rendezvous = self.start_any_rendezvous()
        ref = self.start_reference_node("ref-a", rendezvous)
        asked = self.start_our_node("our-b", rendezvous)
        asking = self.start_our_node("our-c", rendezvous)
        self.check_registration(asked, ref)
        self.check_registration(asking, ref)
        self.check_reference_asks(asked, ref)
        self.check_we_ask(asking, ref)
        for ours in (asked, asking):
            self.check_ping_and_echo(ours, ref)
        self.check_datagrams(asked, ref)
        self.check_reference_connects_to_our_listen(asked, ref)


class OurRendezvousTests(InteropMixin, SynchronousTestCase):
    """A reference daemon and our nodes on our rendezvous."""

    def start_any_rendezvous(self) -> Rendezvous:
        return self.start_rendezvous()

    def test_interop(self) -> None:
        self.run_interop()

    def test_our_untrust_reaches_the_reference(self) -> None:
        """
        Our ``untrust`` sends ``handshake_revoke`` to the peer's port 444, and
        the reference drops its trust when it gets one (docs/reference-wire.md
        section 5).
        """
        t: Any = self
        rendezvous = self.start_any_rendezvous()
        ref = self.start_reference_node("ref-a", rendezvous)
        ours = self.start_our_node("our-b", rendezvous)
        self.check_reference_asks(ours, ref)
        t.assertEqual(ours.ok("untrust", str(ref.node_id))["status"], "revoked")
        wait_until(lambda: ours.node_id not in ref.trusted(), 10.0,
                   f"{ref.name} to drop its trust in {ours.name}", self.both(ours, ref))


class ReferenceRendezvousTests(InteropMixin, SynchronousTestCase):
    """A reference daemon and our nodes on the reference's rendezvous."""

    def start_any_rendezvous(self) -> Rendezvous:
        assert REFERENCE_BIN is not None
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        registry, beacon = free_tcp_port(), free_udp_port()
        proc = self.spawn([os.path.join(REFERENCE_BIN, "rendezvous"),
                           "-registry-addr", f"{LOOPBACK}:{registry}", "-beacon-addr", f"{LOOPBACK}:{beacon}",
                           "-store", os.path.join(folder, "registry.json")],
                          "ref-rendezvous", cwd=folder,
                          env={"HOME": folder, "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        proc.wait_for_tcp(registry)
        return Rendezvous(proc, registry, beacon, None)

    def test_interop(self) -> None:
        self.run_interop()


def _until_exit(proc: Process, send: Callable[[], object], tries: int = 3, wait: float = 5.0) -> None:
    """``send`` (a datagram) until ``proc``, which receives it, exits: datagrams may be lost."""
    for _ in range(tries):
        send()
        try:
            wait_until(lambda: not proc.running, wait, f"{proc.name} to receive")
            return
        except WaitTimeout:
            continue


def _bound_ports(node: Node) -> set[int]:
    """The stream ports our daemon listens on (``info``'s ``ports``)."""
    ports = node.info().get("ports")
    found: set[int] = set()
    for entry in ports if isinstance(ports, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("port"), int):
            found.add(entry["port"])
        elif isinstance(entry, int):
            found.add(entry)
    return found
