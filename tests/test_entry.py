"""
``pilot.entry``: the daemon's process declares a few optional modules
absent, and no other process does.  Run on a copy of ``sys.modules``: this
test process keeps what it has.
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
        for argv in (["daemon", "start"], ["rendezvous", "start"], ["ping", "agent-b"]):
            self.assertEqual(entry.enter(argv), [])
        self.assertFalse(entry.in_daemon_process())
        self.assertNotIn("ssl", sys.modules)
        self.assertEqual(entry.declared, {})

    def test_an_imported_module_is_kept(self) -> None:
        sentinel: Any = object()
        sys.modules["ssl"] = sentinel
        self.assertEqual(entry.declare_absent(entry.DAEMON_ABSENT), ["_hashlib"])
        self.assertIs(sys.modules["ssl"], sentinel)

    def test_every_declaration_says_why(self) -> None:
        for table in (entry.DAEMON_ABSENT, entry.ABSENT_WITHOUT_TLS):
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
