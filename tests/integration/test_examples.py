"""
The programs in ``examples/`` (docs/api.md), run as a user runs them: a
rendezvous and two trusted daemons on 127.0.0.1, the examples as processes
with ``PILOT_HOME`` naming their daemon.

* echo over ``pilot:`` endpoint strings (``echo_server.py``, ``echo_client.py``);
* an asyncio request/response pair (``aio_server.py``, ``aio_client.py``);
* a twisted.web page, and a 5 MiB body byte-exact, fetched over ``pilot:``
  (``web_server.py``, ``web_client.py``);
* a pub/sub fan-out to three subscribers (``pubsub_fanout.py``) through the
  daemon's event broker on port 1002;
* two embedded nodes in one process (``embedded_echo.py``): no daemon.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.nodes import Node, NodeTestMixin
from tests.integration.procs import LOOPBACK, REPO, Process, Rendezvous, python_env

EXAMPLES = os.path.join(REPO, "examples")
RUN_TIMEOUT = 60.0


def big_body(n: int) -> bytes:
    """What ``web_server.py`` serves at ``/big?n=N``."""
    return bytes(i % 251 for i in range(n))


class ExampleTestMixin(NodeTestMixin):
    def example(self, node: Node | None, name: str, *args: str) -> Process:
        """``examples/NAME ARGS`` in the background for ``node``'s daemon; killed at cleanup."""
        env = node.env if node is not None else python_env()
        return self.spawn([sys.executable, os.path.join(EXAMPLES, name), *args], name.split(".")[0],
                          env=env)  # type: ignore[attr-defined]

    def run_example(self, node: Node | None, name: str, *args: str, timeout: float = RUN_TIMEOUT) -> str:
        """``examples/NAME ARGS`` to its end, which must succeed; its stdout."""
        env = node.env if node is not None else python_env()
        done = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], env=env, cwd=REPO,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"{name} {' '.join(args)} exited {done.returncode}\n--- stdout:\n"
                                 f"{done.stdout.decode()[-3000:]}\n--- stderr:\n{done.stderr.decode()[-3000:]}")
        return done.stdout.decode()

    def trusted_pair(self) -> tuple[Rendezvous, Node, Node]:
        rendezvous = self.start_rendezvous()  # type: ignore[attr-defined]
        a, b = self.start_nodes(rendezvous, "agent-a", "agent-b")
        self.trust_each_other(a, b)
        return rendezvous, a, b


class DaemonExampleTests(ExampleTestMixin, SynchronousTestCase):
    def test_echo_and_web(self) -> None:
        _, a, b = self.trusted_pair()
        echo = self.example(b, "echo_server.py", "--port", "1000")
        echo.wait_for_output(r"echo listening on pilot:1000")
        self.assertEqual(self.run_example(a, "echo_client.py", "agent-b", "hello over pilot"),
                         "hello over pilot\n")

        web = self.example(b, "web_server.py", "--port", "80")
        web.wait_for_output(r"web site on pilot:80")
        page = self.run_example(a, "web_client.py", "http://agent-b:80/")
        self.assertIn("hello from Pilot", page)
        self.assertIn(a.address, page)  # the site sees the asking node's Pilot address
        n = 5 * 1024 * 1024
        digest = self.run_example(a, "web_client.py", f"http://agent-b:80/big?n={n}", "--sha256")
        self.assertEqual(digest.split(), ["200", str(n), hashlib.sha256(big_body(n)).hexdigest()])

    def test_asyncio_request_response(self) -> None:
        _, a, b = self.trusted_pair()
        server = self.example(b, "aio_server.py", "--port", "1000")
        server.wait_for_output(r"aio server on Pilot port 1000")
        out = self.run_example(a, "aio_client.py", "agent-b", "hello", "pilot")
        self.assertEqual(out, "olleh\ntolip\n")
        out = self.run_example(a, "aio_client.py", "agent-b", "again")  # a second stream on the same port
        self.assertEqual(out, "niaga\n")

    def test_pubsub_fan_out_to_three_subscribers(self) -> None:
        _, a, b = self.trusted_pair()
        self.assertIn(1002, b.call("info").get("ports", []))  # the event broker (docs/apps.md)
        out = self.run_example(a, "pubsub_fanout.py", "agent-b", "--topic", "alerts", "--count", "3")
        for sub in ("sub0", "sub1", "sub2"):
            self.assertEqual([line for line in out.splitlines() if line.startswith(sub + ":")],
                             [f"{sub}: alerts event {n}" for n in range(3)])

    def test_echo_client_errors_have_the_cli_codes(self) -> None:
        _, a, b = self.trusted_pair()
        # nobody listens on 999 at agent-b: the stream is refused
        done = subprocess.run([sys.executable, os.path.join(EXAMPLES, "echo_client.py"), "agent-b", "x",
                               "--port", "999"], env=a.env, cwd=REPO, capture_output=True, timeout=RUN_TIMEOUT)
        self.assertEqual(done.returncode, 6, done.stderr)  # connection_failed
        self.assertIn(b"connection_failed", done.stderr)
        # no daemon behind the socket
        env = dict(a.env, PILOT_HOME=tempfile.mkdtemp(prefix="pn-none-"))
        self.addCleanup(shutil.rmtree, env["PILOT_HOME"], True)
        done = subprocess.run([sys.executable, os.path.join(EXAMPLES, "echo_client.py"), "agent-b", "x"],
                              env=env, cwd=REPO, capture_output=True, timeout=RUN_TIMEOUT)
        self.assertEqual(done.returncode, 4, done.stderr)  # not_running


class EmbeddedExampleTests(ExampleTestMixin, SynchronousTestCase):
    def test_two_embedded_nodes(self) -> None:
        rendezvous = self.start_rendezvous()
        homes = [tempfile.mkdtemp(prefix=f"pn-emb{i}-") for i in (1, 2)]
        for home in homes:
            self.addCleanup(shutil.rmtree, home, True)
        out = self.run_example(None, "embedded_echo.py", "--registry", f"{LOOPBACK}:{rendezvous.registry_port}",
                               "--beacon", f"{LOOPBACK}:{rendezvous.beacon_port}", *homes)
        self.assertIn("echoed: b'hello from an embedded node'", out)
