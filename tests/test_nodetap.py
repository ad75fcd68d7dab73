"""
Tests for L{pilot.nodetap}: ``twistd pilot-node``'s options and makeService,
which guards the node so that a second daemon on the same home is one line.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from pilot import nodetap
from pilot.identity import Identity
from pilot.startup import StartupGuard


class NodeTapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = tempfile.mkdtemp(prefix="pilot-nodetap-")
        self.addCleanup(shutil.rmtree, self.home, True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PILOT_")}
        self.patch(os, "environ", {**env, "PILOT_HOME": self.home})

    def parse(self, *argv: str) -> nodetap.NodeOptions:
        options = nodetap.NodeOptions()
        options.parseOptions(list(argv))
        return options

    def test_options_are_the_node_settings(self) -> None:
        options = self.parse("--registry", "127.0.0.1:9000", "--hostname", "agent-a", "--public")
        self.assertEqual((options.settings.registry, options.settings.hostname, options.settings.public),
                         ("127.0.0.1:9000", "agent-a", True))
        self.assertEqual(options.settings.home, self.home)

    def test_lists_of_servers(self) -> None:
        options = self.parse("--registry", "127.0.0.1:9000,127.0.0.1:9100",
                             "--beacon", "127.0.0.1:9001,127.0.0.1:9101")
        self.assertEqual(options.settings.registries, ("127.0.0.1:9000", "127.0.0.1:9100"))
        self.assertEqual(options.settings.beacons, ("127.0.0.1:9001", "127.0.0.1:9101"))
        self.assertRaises(usage.UsageError, self.parse, "--registry", "127.0.0.1:9000,127.0.0.1:9100",
                          "--beacon", "127.0.0.1:9001")

    def test_service_has_one_connector_per_entry(self) -> None:
        Identity.generate().save(os.path.join(self.home, "identity.json"))
        guard = nodetap.makeService(self.parse("--registry", "127.0.0.1:9000,127.0.0.2:9100",
                                               "--listen", "127.0.0.1:0"))
        node = guard.inner.node
        self.assertEqual([(c.host, c.port) for c in node._connectors],
                         [("127.0.0.1", 9000), ("127.0.0.2", 9100)])
        self.assertEqual(node.registration.status()["servers"], ["127.0.0.1:9000", "127.0.0.2:9100"])

    def test_bad_value_is_a_usage_error(self) -> None:
        self.assertRaises(usage.UsageError, self.parse, "--hostname", "Not A Name")

    def test_service_is_guarded(self) -> None:
        Identity.generate().save(os.path.join(self.home, "identity.json"))
        guard = nodetap.makeService(self.parse("--registry", "127.0.0.1:9000", "--listen", "127.0.0.1:0"))
        self.assertIsInstance(guard, StartupGuard)
        self.assertEqual(guard.prog, "pilot-node")
        self.assertFalse(guard.inner.running)

    def test_no_identity_is_one_line(self) -> None:
        e = self.assertRaises(SystemExit, nodetap.makeService, self.parse())
        self.assertEqual(str(e.code).splitlines(), [str(e.code)])
        self.assertTrue(str(e.code).startswith("pilot-node: error: no identity at "), e.code)
