"""
What the node daemon imports (issue 11: an idle daemon under 35 MB).

``pilotctl daemon start --foreground`` is the daemon's own process; every
module it imports stays in its memory for good.  These tests run its start
path in a fresh interpreter (``pilot.entry``, which declares the optional
modules the daemon does without absent, ``cli.load_commands``, the argument
parser, ``cli_daemon.load_node``, then the reactor, as ``cli.main`` does) and fail
if a module an idle node does not need creeps back: the rendezvous' server
modules, the other commands, the web and TLS stacks, ``cryptography``
(loaded with the first tunnel session, ``pilot.wire.tunnel_crypto``) and the
stream machine (with the first connection, ``pilot.machines.connection``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

import pilot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pilot.__file__)))

#: The daemon's start path, as ``entry.main`` and ``cli.main`` run it for ``daemon start
#: --foreground``, minus ``reactor.run()``; prints the imported modules' names.
SCRIPT = """
import io, json, sys
argv = ["daemon", "start", "--foreground"] + sys.argv[1:]
from pilot import entry
entry.enter(argv)
from pilot import cli
cli.load_commands(argv)
args, extra = cli.COMMANDS.build_parser(io.StringIO()).parse_known_args(argv)
assert not extra, extra
from pilot import cli_daemon
settings = cli_daemon.load_settings({o.key: getattr(args, o.key, None) for o in cli_daemon.NODE_OPTIONS})
cli_daemon.load_node(settings)
from twisted.internet import reactor
print(json.dumps({name: module is not None for name, module in sys.modules.items()}))
"""

#: Module names (and their submodules) an idle node daemon must not hold.
UNWANTED = (
    "pilot.server", "pilot.tap", "pilot.services.rendezvous", "pilot.services.store", "pilot.services.durable",
    "pilot.services.web", "pilot.tls", "pilot.cli_node", "pilot.cli_traffic", "pilot.cli_apps",
    "pilot.cli_forward", "pilot.cli_stats", "pilot.cli_rendezvous", "pilot.cli_server", "twisted.web",
    "prometheus_client", "cryptography",
    # the stream machine and its data path: with the first connection (pilot.machines.connection)
    "pilot.machines.connection.machine", "pilot.machines.connection.stream", "pilot.machines.connection.transfer",
)
# (``http.cookiejar``, ``email`` and ``urllib.request`` are imported by Twisted's own
# ``twisted.python.compat``, under ``twisted.internet.defer``: not ours to avoid.)


def daemon_modules(home: str, *flags: str) -> dict[str, bool]:
    """The daemon's ``sys.modules`` after its start path: name -> imported (False: a None entry)."""
    os.makedirs(home, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PILOT_")}
    env["PILOT_HOME"] = home
    out = subprocess.run([sys.executable, "-c", SCRIPT, *flags], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    value: dict[str, bool] = json.loads(out.splitlines()[-1])
    return value


def declared_absent(modules: dict[str, bool]) -> list[str]:
    """The modules the process declared absent (a None entry), sorted."""
    return sorted(name for name, loaded in modules.items() if not loaded and "." not in name)


def matching(modules: dict[str, bool], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(name for name, loaded in modules.items()
                  if loaded and any(name == p or name.startswith(p + ".") for p in prefixes))


class DaemonImportTests(SynchronousTestCase):
    def test_idle_daemon_imports(self) -> None:
        """No server, web, TLS, other commands or AES-GCM library on the daemon's start path."""
        modules = daemon_modules(self.mktemp(), "--registry", "127.0.0.1:9000", "--listen", "127.0.0.1:0")
        self.assertEqual(matching(modules, UNWANTED), [])
        self.assertEqual(matching(modules, ("OpenSSL",)), [])
        # the standard library's TLS and OpenSSL's digests: declared absent (pilot.entry)
        self.assertEqual(matching(modules, ("ssl", "_ssl", "_hashlib")), [])
        self.assertEqual(declared_absent(modules), ["OpenSSL", "_hashlib", "ssl"])
        # and what it does need is there: the node, its control socket, the reactor
        for name in ("pilot.services.node", "pilot.node.core", "pilot.protocols.control_server",
                     "twisted.internet.reactor", "pilot.cli_daemon"):
            self.assertTrue(modules.get(name), name)

    def test_pinned_fingerprint_keeps_tls_possible(self) -> None:
        """With the registry's fingerprint pinned, pyOpenSSL is not kept out (the daemon will need it)."""
        modules = daemon_modules(self.mktemp(), "--registry", "127.0.0.1:9000", "--listen", "127.0.0.1:0",
                                 "--registry-fingerprint", "ab" * 32)
        self.assertEqual(declared_absent(modules), ["_hashlib", "ssl"])
        self.assertEqual(matching(modules, ("ssl", "_ssl", "_hashlib")), [])

    def test_metrics_gives_ssl_back(self) -> None:
        """With --metrics, ssl is not kept out: prometheus_client, which serves it, imports ssl."""
        modules = daemon_modules(self.mktemp(), "--registry", "127.0.0.1:9000", "--listen", "127.0.0.1:0",
                                 "--metrics", "127.0.0.1:0")
        self.assertEqual(declared_absent(modules), ["OpenSSL", "_hashlib"])
