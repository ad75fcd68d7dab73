"""
``pilot.entry``: the daemon's process declares a few optional modules
absent, a rendezvous' start is prepared, and no other process is touched.
Run on a copy of ``sys.modules``: this test process keeps what it has.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

import pilot
from pilot import entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pilot.__file__)))


class EntryTests(SynchronousTestCase):
    def setUp(self) -> None:
        modules: dict[str, Any] = dict(sys.modules)
        for name in ("ssl", "_hashlib", "OpenSSL"):
            modules.pop(name, None)
        self.patch(sys, "modules", modules)
        self.patch(entry, "declared", {})
        self.patch(entry, "_daemon", [])

    def test_the_daemon_command(self) -> None:
        for argv in (["daemon", "start", "--foreground"], ["--json", "daemon", "start", "--foreground"],
                     ["daemon", "start", "--foreground", "--registry", "127.0.0.1:9000"]):
            self.assertTrue(entry.is_daemon_command(argv), argv)
        for argv in ([], ["daemon", "start"], ["daemon", "start", "--registry", "127.0.0.1:9000"],
                     ["rendezvous", "start", "--foreground"], ["ping", "daemon", "start", "--foreground"],
                     ["daemon", "status"]):
            self.assertFalse(entry.is_daemon_command(argv), argv)

    def test_the_daemon_declares_absent(self) -> None:
        self.assertEqual(sorted(entry.enter(["daemon", "start", "--foreground"])), ["_hashlib", "ssl"])
        self.assertTrue(entry.in_daemon_process())
        self.assertIsNone(sys.modules["ssl"])
        self.assertIsNone(sys.modules["_hashlib"])
        self.assertEqual(set(entry.declared), {"ssl", "_hashlib"})
        self.assertNotIn("OpenSSL", sys.modules)  # that one waits for the settings (cli_daemon.load_node)

    def test_import_fails_in_the_daemon_process(self) -> None:
        """In a fresh interpreter (the import system reads the process's own module table)."""
        script = ("from pilot import entry; entry.enter(['daemon', 'start', '--foreground'])\n"
                  "import hashlib; assert hashlib.sha256(b'').hexdigest().startswith('e3b0c442')\n"
                  "try:\n    import ssl\nexcept ImportError:\n    print('absent')\n")
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True,
                             text=True, timeout=60).stdout
        self.assertEqual(out, "absent\n")

    def test_other_commands_declare_nothing(self) -> None:
        for argv in (["daemon", "start"], ["rendezvous", "promote"], ["ping", "agent-b"]):
            self.assertEqual(entry.enter(argv), [])
        self.assertFalse(entry.in_daemon_process())
        self.assertNotIn("ssl", sys.modules)
        self.assertEqual(entry.declared, {})

    def test_an_imported_module_is_kept(self) -> None:
        sentinel: Any = object()
        sys.modules["ssl"] = sentinel
        self.assertEqual(entry.declare_absent(entry.DAEMON_ABSENT), ["_hashlib"])
        self.assertIs(sys.modules["ssl"], sentinel)

    def test_metrics_keep_ssl(self) -> None:
        """A daemon asked for --metrics (flag, environment or config.json) keeps ssl: prometheus_client."""
        home = self.mktemp()
        os.makedirs(home)
        env = {"PILOT_HOME": home}
        self.assertFalse(entry.asks_for_metrics(["daemon", "start", "--foreground"], env))
        self.assertTrue(entry.asks_for_metrics(["daemon", "start", "--foreground", "--metrics", ":9100"], env))
        self.assertTrue(entry.asks_for_metrics(["daemon", "start", "--foreground", "--metrics=:9100"], env))
        self.assertTrue(entry.asks_for_metrics([], {**env, "PILOT_METRICS": ":9100"}))
        config = os.path.join(home, "config.json")
        for text, asks in (('{"metrics": ":9100"}', True), ('{"metrics": null}', False), ("[1]", False),
                           ("{broken", False)):
            with open(config, "w") as f:
                f.write(text)
            self.assertEqual(entry.asks_for_metrics([], env), asks, text)
        self.patch(entry.os, "environ", {"PILOT_HOME": home, "PILOT_METRICS": ":9100"})
        self.assertEqual(entry.enter(["daemon", "start", "--foreground"]), ["_hashlib"])
        self.assertNotIn("ssl", sys.modules)

    def test_every_declaration_says_why(self) -> None:
        for table in (entry.DAEMON_ABSENT, entry.ABSENT_WITHOUT_TLS, entry.NEEDED_FOR_METRICS):
            for name, why in table.items():
                self.assertTrue(why.strip(), name)

    def test_main_runs_the_command(self) -> None:
        """``entry.main`` is pilotctl: the command runs with the same arguments, its status returned."""
        from pilot import cli
        ran: list[list[str]] = []
        self.patch(cli, "main", lambda argv: ran.append(list(argv)) or 3)
        self.assertEqual(entry.main(["daemon", "status"]), 3)
        self.assertEqual(ran, [["daemon", "status"]])
        self.assertFalse(entry.in_daemon_process())
        self.assertEqual(entry.main(["daemon", "start", "--foreground", "--registry", "127.0.0.1:9000"]), 3)
        self.assertEqual(ran[-1], ["daemon", "start", "--foreground", "--registry", "127.0.0.1:9000"])
        self.assertTrue(entry.in_daemon_process())
        self.assertEqual(set(entry.declared), {"ssl", "_hashlib"})


class ServerStartTests(SynchronousTestCase):
    """The preparation of a server's process (the collector and the modules loaded on first use)."""

    def setUp(self) -> None:
        import gc
        enabled = gc.isenabled()
        self.addCleanup(lambda: gc.enable() if enabled else gc.disable())
        self.addCleanup(entry._paused.clear)
        self.patch(entry, "declared", {})

    def test_starts_server(self) -> None:
        self.assertTrue(entry.starts_rendezvous(["--json", "rendezvous", "start", "--store", "x.json"]))
        self.assertTrue(entry.starts_rendezvous(["rendezvous", "start"]))
        self.assertFalse(entry.starts_rendezvous(["rendezvous", "promote"]))
        self.assertFalse(entry.starts_rendezvous(["daemon", "start", "--foreground"]))
        self.assertFalse(entry.starts_rendezvous([]))

    def test_pause_and_resume(self) -> None:
        """The collector is paused by begin and resumed by the first end; a second end changes nothing."""
        import gc
        gc.enable()
        self.patch(entry, "LOADED_ON_FIRST_USE", {})
        self.patch(entry, "RENDEZVOUS_ABSENT_UNLESS", {})
        entry.begin_server_start()
        self.assertFalse(gc.isenabled())
        entry.begin_server_start()  # once only: the state to restore is the first one
        entry.end_server_start()
        self.assertTrue(gc.isenabled())
        gc.disable()
        entry.end_server_start()
        self.assertFalse(gc.isenabled())

    def test_paused_collector_stays_paused(self) -> None:
        import gc
        gc.disable()
        self.patch(entry, "LOADED_ON_FIRST_USE", {})
        self.patch(entry, "RENDEZVOUS_ABSENT_UNLESS", {})
        entry.begin_server_start()
        entry.end_server_start()
        self.assertFalse(gc.isenabled())

    def test_main_ends_the_pause(self) -> None:
        """``main`` prepares a rendezvous' start and ends the pause even when the command fails."""
        import gc
        gc.enable()
        self.patch(entry, "LOADED_ON_FIRST_USE", {})
        self.patch(entry, "RENDEZVOUS_ABSENT_UNLESS", {})
        self.patch(entry, "declared", {})
        seen: list[bool] = []
        from pilot import cli

        def failing(argv: object) -> int:
            seen.append(gc.isenabled())
            raise SystemExit(2)
        self.patch(cli, "main", failing)
        with self.assertRaises(SystemExit):
            entry.main(["rendezvous", "start", "--store", "x.json"])
        self.assertEqual(seen, [False])  # the command ran with the collector paused
        self.assertTrue(gc.isenabled())
        self.assertEqual(entry._paused, [])

    def test_absent_unless(self) -> None:
        """A module is declared absent unless a flag that needs it is given (either spelling)."""
        import sys
        self.patch(entry, "LOADED_ON_FIRST_USE", {})
        self.patch(entry, "RENDEZVOUS_ABSENT_UNLESS", {"pilot_absent_probe": (("--needs",), "a test")})
        self.addCleanup(sys.modules.pop, "pilot_absent_probe", None)
        for argv in (["rendezvous", "start", "--needs", "x"], ["rendezvous", "start", "--needs=x"]):
            entry.begin_server_start(argv)
            entry.end_server_start()
            self.assertNotIn("pilot_absent_probe", sys.modules)
        entry.begin_server_start(["rendezvous", "start", "--store", "x"])
        entry.end_server_start()
        self.assertIn("pilot_absent_probe", sys.modules)
        self.assertIsNone(sys.modules["pilot_absent_probe"])
        with self.assertRaises(ImportError):
            __import__("pilot_absent_probe")

    def test_loaded_on_first_use(self) -> None:
        """A module declared so runs at its first attribute, once; one imported already is left as it is."""
        import sys
        folder = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(folder, "lazy_parent"))
        with open(os.path.join(folder, "lazy_parent", "__init__.py"), "w") as f:
            f.write("")
        with open(os.path.join(folder, "lazy_parent", "probe.py"), "w") as f:
            f.write("import lazy_parent\nlazy_parent.runs = getattr(lazy_parent, 'runs', 0) + 1\nVALUE = 7\n")
        sys.path.insert(0, folder)
        self.addCleanup(sys.path.remove, folder)
        for name in ("lazy_parent", "lazy_parent.probe"):
            self.addCleanup(sys.modules.pop, name, None)
        entry._load_on_first_use("lazy_parent.probe")
        module = sys.modules["lazy_parent.probe"]
        self.assertEqual(type(module).__name__, "_LazyModule")
        probe = __import__("lazy_parent", fromlist=["probe"]).probe  # as ``from lazy_parent import probe``
        self.assertIs(probe, module)  # taken from the package as it is: not run yet
        parent = sys.modules["lazy_parent"]
        self.assertFalse(hasattr(parent, "runs"))
        self.assertEqual(module.VALUE, 7)
        self.assertEqual(parent.runs, 1)
        entry._load_on_first_use("lazy_parent.probe")  # imported already: unchanged
        self.assertIs(sys.modules["lazy_parent.probe"], module)
        self.assertEqual(parent.runs, 1)
