"""
``pilotctl forward`` and ``expose`` with real processes on 127.0.0.1
(docs/cli.md): curl, through a forward on one node, fetches a 50 MiB file
served by ``python3 -m http.server`` behind an expose on the other node,
byte-exact; the listing, removal and errors with their codes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import unittest

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.nodes import NodeTestMixin
from tests.integration.procs import LOOPBACK, free_tcp_port, wait_until

BODY_SIZE = 50 * 1024 * 1024
CURL_TIMEOUT = 300.0


def write_body(path: str, size: int) -> str:
    """A file of ``size`` bytes that is not all the same (so misplaced bytes show); its SHA-256."""
    digest = hashlib.sha256()
    block = hashlib.sha256(b"pilot").digest() * 32768  # 1 MiB
    with open(path, "wb") as f:
        written = 0
        while written < size:
            chunk = block[: size - written]
            chunk = written.to_bytes(8, "big") + chunk[8:]
            f.write(chunk)
            digest.update(chunk)
            written += len(chunk)
    return digest.hexdigest()


class ForwardTests(NodeTestMixin, SynchronousTestCase):
    def test_curl_through_forward_and_expose(self) -> None:
        curl = shutil.which("curl")
        if curl is None:
            raise unittest.SkipTest("curl is not installed")
        rendezvous = self.start_rendezvous()
        a, b = self.start_nodes(rendezvous, "agent-a", "agent-b")
        self.trust_each_other(a, b)

        site = os.path.abspath(self.mktemp())
        os.makedirs(site)
        expected = write_body(os.path.join(site, "big.bin"), BODY_SIZE)
        web_port = free_tcp_port()
        web = self.spawn([sys.executable, "-m", "http.server", "--bind", LOOPBACK, "--directory", site,
                          str(web_port)], "http-server")
        web.wait_for_tcp(web_port)

        exposed = b.ok("expose", "80", f"{LOOPBACK}:{web_port}")
        self.assertEqual((exposed["port"], exposed["service"]), (80, f"{LOOPBACK}:{web_port}"))
        local_port = free_tcp_port()
        forwarded = a.ok("forward", str(local_port), "agent-b:80")
        self.assertEqual(forwarded["local"], f"{LOOPBACK}:{local_port}")

        out = os.path.abspath(self.mktemp())
        done = subprocess.run([curl, "-sS", "--fail", "-o", out, f"http://{LOOPBACK}:{local_port}/big.bin"],
                              capture_output=True, timeout=CURL_TIMEOUT)
        self.assertEqual(done.returncode, 0, done.stderr.decode())
        self.assertEqual(os.path.getsize(out), BODY_SIZE)
        with open(out, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), expected)

        listing = a.ok("forward", "--list")
        (entry,) = listing["forwards"]
        self.assertEqual((entry["target"], entry["port"], entry["total"], entry["failed"]), ("agent-b", 80, 1, 0))
        self.assertGreaterEqual(entry["bytes_from_peer"], BODY_SIZE)
        (served,) = b.ok("expose", "--list")["exposed"]
        self.assertEqual((served["port"], served["total"]), (80, 1))
        self.assertGreaterEqual(served["bytes_to_peer"], BODY_SIZE)

        # removal, and the errors with their codes
        self.assertEqual(a.ok("unforward", str(local_port))["status"], "removed")
        a.fails("not_found", "unforward", str(local_port))
        b.fails("already_exists", "expose", "80", f"{LOOPBACK}:{web_port}")
        self.assertEqual(b.ok("unexpose", "80")["status"], "removed")
        b.fails("not_found", "unexpose", "80")
        a.fails("invalid_argument", "forward", "8080")
        a.fails("invalid_argument", "forward", "8080", "agent-b")
        a.fails("not_found", "forward", "0", "no-such-node:80")

    def test_trust_gates_forwarded_streams(self) -> None:
        rendezvous = self.start_rendezvous()
        a, b = self.start_nodes(rendezvous, "agent-a", "agent-b")
        b.ok("expose", "80", f"{LOOPBACK}:{free_tcp_port()}")
        # agent-b is private and does not trust agent-a: the forward is refused when asked for
        a.fails("not_trusted", "forward", "0", "agent-b:80")
        self.trust_each_other(a, b)
        forwarded = a.ok("forward", "0", "agent-b:80")
        port = int(forwarded["local"].rpartition(":")[2])
        b.ok("untrust", str(a.node_id))  # trust revoked after the forward was set up
        with socket.create_connection((LOOPBACK, port), timeout=60) as s:
            s.settimeout(60)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            self.assertEqual(s.recv(100), b"")  # closed: the peer refused the stream
        wait_until(lambda: a.ok("forward", "--list")["forwards"][0]["active"] == 0, 10.0, "the splice closed")
        (entry,) = a.ok("forward", "--list")["forwards"]
        self.assertEqual((entry["total"], entry["failed"], entry["active"]), (1, 1, 0))
