"""
The node daemon's own process (``pilot.entry``), as real processes on
127.0.0.1: started by ``pilotctl daemon start``, it declares ``ssl`` and
``_hashlib`` absent (and pyOpenSSL, without a pinned registry fingerprint),
and still registers, trusts, pings and, with a pinned fingerprint,
registers over TLS.  The libraries it never loads are checked in its
``/proc/PID/maps``.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.nodes import Node, NodeTestMixin
from tests.integration.procs import LOOPBACK

#: Shared objects the daemon's process never maps: the ssl module's, hashlib's OpenSSL glue, and
#: the system's OpenSSL (pyOpenSSL's ``cryptography`` carries its own).
NEVER_MAPPED = ("/_ssl.", "/_hashlib.", "/libssl.so", "/libcrypto.so")


def mapped(pid: int) -> set[str]:
    """The files mapped into ``pid``."""
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1] for line in f if len(line.split()) >= 6}


class DaemonProcessTests(NodeTestMixin, SynchronousTestCase):
    def assert_lean(self, node: Node, *unwanted: str) -> None:
        pid = node.read_pid()
        assert pid is not None, node.describe()
        files = mapped(pid)
        self.assertEqual(sorted(f for f in files if any(u in f for u in unwanted)), [])

    def test_plain_daemon_serves(self) -> None:
        """Two daemons register, trust each other and ping, without ssl or OpenSSL's digests."""
        rendezvous = self.start_rendezvous()
        a, b = self.start_nodes(rendezvous, "lean-a", "lean-b")
        self.trust_each_other(a, b)
        result = a.run("ping", b.hostname, "--count", "2", "--timeout", "5", timeout=30)
        self.assertEqual(result.status, 0, result.describe() + a.describe())
        for node in (a, b):
            # (cryptography's library is there: the tunnel session's AES-GCM, loaded with the first peer)
            self.assert_lean(node, *NEVER_MAPPED)

    def test_pinned_fingerprint_registers_over_tls(self) -> None:
        """A daemon given the registry's TLS fingerprint registers over TLS (pyOpenSSL), still without ssl."""
        rendezvous = self.start_rendezvous(extra=["--tls"])
        fingerprint = rendezvous.proc.wait_for_output(r"TLS fingerprint: ([0-9a-fA-F:]+)").group(1)
        node = self.make_node("tls-a", rendezvous)
        out = node.started("--registry", f"{LOOPBACK}:{node.registry_port}", "--registry-fingerprint", fingerprint)
        self.assertEqual(out, f"Registered as {node.hostname} ({node.address})\n")
        self.assertEqual(node.info()["registry"]["state"], "registered")
        self.assert_lean(node, *NEVER_MAPPED)
