"""
Data exchange (port 1001) and the event stream (port 1002) against the
reference implementation, as real processes on 127.0.0.1 (``docs/apps.md``).
Runs only when ``PILOT_REFERENCE_BIN`` names a folder of the reference's
binaries (see tests/integration/test_reference_interop.py; skipped with the
reason otherwise).  One reference daemon and one of our nodes trust each
other on our rendezvous, then, both ways: ``send-message``, ``send-file``
(byte-exact), and ``subscribe`` on one node's broker receiving what
``publish`` sent there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.procs import wait_until
from tests.integration.test_reference_interop import REFERENCE_BIN, InteropMixin, RefNode
from tests.integration.nodes import Node


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class ReferenceAppsTests(InteropMixin, SynchronousTestCase):
    def start_any_rendezvous(self) -> Any:
        return self.start_rendezvous()

    def test_apps_both_ways(self) -> None:
        rendezvous = self.start_any_rendezvous()
        ref = self.start_reference_node("ref-a", rendezvous)
        ours = self.start_our_node("our-b", rendezvous)
        self.check_reference_asks(ours, ref)
        self.check_messages(ours, ref)
        self.check_files(ours, ref)
        self.check_events(ours, ref)

    def check_messages(self, ours: Node, ref: RefNode) -> None:
        ref.ok("send-message", ours.hostname, "--data", "hello from the reference")
        [m] = ours.ok("inbox")["messages"]
        self.assertEqual((m["type"], m["from"], m["data"]), ("TEXT", ref.address, "hello from the reference"))

        sent = ours.ok("send-message", ref.hostname, "--data", '{"from": "ours"}', "--type", "json")
        self.assertEqual((sent["reply"], sent["acked"]), ("ACK JSON 16 bytes", True))
        [m] = ref.ok("inbox")["messages"]
        self.assertEqual((m["type"], m["from"], m["data"], m["bytes"]), ("JSON", ours.address, '{"from": "ours"}', 16))
        # the same layout on both sides: inbox/<TYPE>-<stamp>.json
        [name] = os.listdir(os.path.join(ref.home, ".pilot", "inbox"))
        [ours_name] = os.listdir(os.path.join(ours.home, "inbox"))
        self.assertEqual((name[:5], name[-5:]), ("JSON-", ".json"))
        # binary both ways: the reference files it as text, and so do we when it is UTF-8
        ours.ok("send-message", ref.hostname, "--data", "raw bytes", "--type", "binary")
        self.assertIn(("BINARY", "raw bytes"), [(m["type"], m["data"]) for m in ref.ok("inbox")["messages"]])
        ref.ok("send-message", ours.hostname, "--data", "raw from ref", "--type", "binary")
        self.assertEqual([(m["type"], m["data"]) for m in ours.ok("inbox")["messages"]][-1:],
                         [("BINARY", "raw from ref")])
        self.assertRegex(ours_name, r"^TEXT-\d{8}-\d{6}\.\d{3}\.json$")

    def check_files(self, ours: Node, ref: RefNode) -> None:
        # the reference's pilotctl hands the whole file to its daemon in one IPC message of at most 1 MiB
        small = os.urandom(700 * 1024 + 3)
        theirs = os.path.join(ref.home, "from-ref.bin")
        with open(theirs, "wb") as f:
            f.write(small)
        ref.ok("send-file", ours.hostname, theirs, timeout=120)
        [entry] = ours.ok("received")["files"]
        self.assertRegex(entry["name"], r"^from-ref-\d{8}-\d{6}\.\d{3}\.bin$")
        self.assertEqual(_sha(entry["path"]), hashlib.sha256(small).hexdigest())

        # ours streams through its daemon: a few MiB
        content = os.urandom(2 * 1024 * 1024 + 3)
        mine = os.path.join(ours.home, "from-ours.bin")
        with open(mine, "wb") as f:
            f.write(content[::-1])
        sent = ours.ok("send-file", ref.hostname, mine, timeout=120)
        self.assertEqual(sent["reply"], f"ACK FILE {len(content)} bytes")
        folder = os.path.join(ref.home, ".pilot", "received")
        [name] = os.listdir(folder)
        self.assertTrue(name.startswith("from-ours-") and name.endswith(".bin"), name)
        self.assertEqual(_sha(os.path.join(folder, name)), hashlib.sha256(content[::-1]).hexdigest())

    def check_events(self, ours: Node, ref: RefNode) -> None:
        assert REFERENCE_BIN is not None
        # our subscriber on the reference's broker; our publisher there
        sub = self.spawn_ctl(ours, "subscribe", ref.hostname, "interop", "--count", "1", "--timeout", "60")
        _publish_until_exit(sub, lambda: ours.ok("publish", ref.hostname, "interop", "--data", "to-ref-broker"))
        self.assertEqual(sub.wait(10), 0, sub.describe())
        self.assertEqual(json.loads(sub.stdout()), {"topic": "interop", "data": "to-ref-broker", "bytes": 13})

        # the reference's subscriber on our broker; the reference's publisher there
        rsub = self.spawn([os.path.join(REFERENCE_BIN, "pilotctl"), "--json", "subscribe", ours.hostname,
                           "interop", "--count", "1", "--timeout", "60s"], "ref-subscribe",
                          cwd=ref.home, env=ref.env)
        wait_until(lambda: _subscribers(ours) >= 1, 30.0, "the reference's subscription on our broker",
                   ours.describe)
        ref.ok("publish", ours.hostname, "interop", "--data", "to-our-broker")
        self.assertEqual(rsub.wait(30), 0, rsub.describe())
        self.assertIn("to-our-broker", rsub.stdout())


def _subscribers(node: Node) -> int:
    counters: dict[str, Any] = node.call("info")["counters"]
    return int(counters.get("apps", {}).get("eventstream", {}).get("subscribers", 0))


def _publish_until_exit(proc: Any, publish: Any, tries: int = 10) -> None:
    """Publish until the subscriber exits: its subscription may not be in place at the first publish."""
    for _ in range(tries):
        publish()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            if not proc.running:
                return
            time.sleep(0.1)
