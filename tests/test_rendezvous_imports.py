"""
What a restarted rendezvous imports before it answers (issue 16: a restart at
10,000 nodes under 0.3 s, ``docs/performance.md``).

At 10,000 nodes most of a restart is the interpreter and the imports.  These
tests run ``python -m pilot rendezvous start`` in a fresh interpreter up to
the built service (the store loaded from its sidecar, nothing listening
yet: a hook on ``pilot.tap.build_service`` reports and ends the process) and
fail if a module the first answer does not need comes back on that path:
TLS, the dashboard's web stack, the replication code, the other commands,
the node, the twistd machinery, and the standard library that Twisted
imports only for names it never uses (``pilot.entry.LOADED_ON_FIRST_USE``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

import pilot
from pilot import entry
from pilot.server import sidecar
from pilot.server.state import Node, RegistryState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pilot.__file__)))

#: ``python -m pilot ARGS`` up to the built service; prints what is imported and ends the process.
SCRIPT = """
import importlib.machinery, json, os, runpy, sys

class Hook:
    def find_spec(self, name, path=None, target=None):
        if name != "pilot.tap":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            build = module.build_service
            def report(settings, reactor):
                service = build(settings, reactor)
                import gc
                modules = {name: type(m).__name__ for name, m in sys.modules.items() if m is not None}
                print(json.dumps({"modules": modules, "nodes": len(service.registry.state.nodes),
                                  "collector_paused": not gc.isenabled(), "frozen": gc.get_freeze_count()}))
                sys.stdout.flush()
                os._exit(0)
            module.build_service = report
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Hook())
sys.argv = ["pilot"] + sys.argv[1:]
runpy.run_module("pilot", run_name="__main__", alter_sys=True)
"""

#: Module names (and their submodules) a rendezvous without TLS, a pair or a dashboard must not import
#: before its first answer.
UNWANTED = (
    # TLS (pyOpenSSL loads cryptography's X.509 modules), only with --tls or a pinned primary
    "OpenSSL", "cryptography", "service_identity", "pilot.tls", "twisted.internet.ssl", "twisted.protocols.tls",
    # the dashboard, only with --http
    "twisted.web", "prometheus_client", "pilot.services.web", "pilot.web",
    # a pair, only with a replication token
    "pilot.services.replication", "pilot.server.replication", "pilot.server.replication_role",
    "pilot.wire.replication",
    # the other commands and the node
    "pilot.cli_daemon", "pilot.cli_node", "pilot.cli_traffic", "pilot.cli_apps", "pilot.cli_forward",
    "pilot.cli_stats", "pilot.node", "pilot.machines", "pilot.stack", "pilot.services.node",
    # twistd's machinery and package metadata: `python -m pilot` scans no plugins
    "twisted.scripts", "twisted.application.app", "twisted.application.internet", "twisted.plugins",
    "pkg_resources", "importlib.metadata",
    # imported for twisted.python.compat's http.cookiejar, which is loaded on first use
    "urllib.request", "http.client", "email",
    # the standard library's TLS, declared absent (asyncio goes without it)
    "ssl", "_ssl",
    # Ed25519 (libsodium): loaded with the first signed request (pilot.identity.verify)
    "nacl", "_sodium",
    # the node's packet codec (the beacon's codec takes as_bytes from pilot.wire.value)
    "pilot.wire.packet",
)


def write_store(folder: str, count: int) -> str:
    """A store of ``count`` nodes and its sidecar, as a clean stop leaves them."""
    state = RegistryState(created=time.time())
    for i in range(count):
        key = i.to_bytes(4, "big") * 8
        node_id = 1000 + i
        state.nodes[node_id] = Node(id=node_id, public_key=key, real_addr=f"127.0.0.1:{4000 + i}",
                                    last_seen=time.time(), hostname=f"host-{i}")
        state.index_key(key, node_id)
    state.rebuild_indexes()
    path = os.path.join(folder, "registry.json")
    data = state.to_bytes()
    with open(path, "wb") as f:
        f.write(data)
    with open(sidecar.path_of(path), "wb") as f:
        f.write(sidecar.encode(state, data))
    return path


def start_modules(*args: str) -> dict[str, object]:
    """Run ``python -m pilot ARGS`` up to the built service; what it reported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PILOT_")}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    value: dict[str, object] = json.loads(out.splitlines()[-1])
    return value


def matching(modules: dict[str, str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(name for name, kind in modules.items()
                  if kind != "_LazyModule" and any(name == p or name.startswith(p + ".") for p in prefixes))


class RendezvousImportTests(SynchronousTestCase):
    def start(self, *flags: str) -> dict[str, object]:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        store = write_store(folder, 20)
        return start_modules("--json", "rendezvous", "start", "--listen", "127.0.0.1:0", "--beacon",
                             "127.0.0.1:0", "--store", store, *flags)

    def test_start_imports(self) -> None:
        """No TLS, web, replication, other commands, node or twistd machinery before the first answer."""
        report = self.start()
        modules = report["modules"]
        assert isinstance(modules, dict)
        self.assertEqual(report["nodes"], 20)
        self.assertEqual(matching(modules, UNWANTED), [])
        # and what it does need is there: the service, the store, the reactor
        for name in ("pilot.services.rendezvous", "pilot.server.sidecar", "pilot.services.durable",
                     "twisted.internet.reactor", "pilot.cli_server"):
            self.assertIn(name, modules)

    def test_loaded_on_first_use(self) -> None:
        """Twisted's unused imports are there, as modules not yet loaded."""
        modules = self.start()["modules"]
        assert isinstance(modules, dict)
        for name in entry.LOADED_ON_FIRST_USE:
            self.assertEqual(modules.get(name), "_LazyModule", name)

    def test_collector_paused_until_frozen(self) -> None:
        """The service is built with the collector paused, and what it loaded is frozen."""
        report = self.start()
        self.assertTrue(report["collector_paused"])  # build_service returns; rendezvous_start resumes it
        frozen = report["frozen"]
        assert isinstance(frozen, int)
        self.assertGreater(frozen, 20000)

    def test_tls_without_ssl(self) -> None:
        """--tls is pyOpenSSL's: the service is built with the standard library's ssl absent."""
        report = self.start("--tls")
        modules = report["modules"]
        assert isinstance(modules, dict)
        self.assertEqual(report["nodes"], 20)
        self.assertIn("OpenSSL", modules)
        self.assertNotIn("ssl", modules)

    def test_dashboard_keeps_ssl(self) -> None:
        """With --http (prometheus_client needs the standard library's ssl) ssl is not declared absent."""
        report = start_modules("--json", "rendezvous", "start", "--no-store", "--listen", "127.0.0.1:0",
                               "--beacon", "127.0.0.1:0", "--http", "127.0.0.1:0")
        modules = report["modules"]
        assert isinstance(modules, dict)
        self.assertIn("ssl", modules)
        self.assertIn("prometheus_client", modules)

    def test_pair_imports_replication(self) -> None:
        """With a replication token the pair's code is imported (the list above is not vacuous)."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        token = os.path.join(folder, "token")
        with open(token, "w") as f:
            f.write("t" * 32)
        modules = self.start("--replication-token-file", token)["modules"]
        assert isinstance(modules, dict)
        self.assertIn("pilot.services.replication", modules)
