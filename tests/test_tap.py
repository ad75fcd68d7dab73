"""
pilot.tap: the rendezvous options (twistd and environment forms), the
settings they make, makeService, the twistd plugin and the .tac file.
"""

from __future__ import annotations

import base64
import json
import math
import os
from typing import Any

from twisted.application.service import IService, IServiceCollection, IServiceMaker, loadApplication
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from pilot import log, tap
from pilot.options import RENDEZVOUS_BUSY_POLL
from pilot.persist import atomic_write_json
from pilot.server.beacon import BeaconConfig
from pilot.server.registry import Peer, RegistryConfig
from pilot.services.rendezvous import RendezvousService
from pilot.startup import StartupGuard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*argv: str) -> tap.RendezvousOptions:
    options = tap.RendezvousOptions()
    options.parseOptions(list(argv))
    return options


class OptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.default_store = os.path.abspath(self.mktemp())
        self.patch(tap, "default_store_path", lambda: self.default_store)

    def test_defaults(self) -> None:
        settings = parse().settings
        self.assertEqual((settings.listen, settings.beacon_listen), (":9000", ":9001"))
        self.assertEqual(settings.store, self.default_store)
        self.assertFalse(settings.tls)
        self.assertEqual((settings.tls_cert, settings.tls_key), (None, None))
        self.assertEqual(settings.registry, RegistryConfig())
        self.assertEqual(settings.beacon, BeaconConfig())

    def test_addresses(self) -> None:
        settings = parse("--listen", "127.0.0.1:0", "--beacon", "[::1]:9101").settings
        self.assertEqual((settings.listen, settings.beacon_listen), ("127.0.0.1:0", "[::1]:9101"))
        self.assertEqual(parse("--listen", "9005").settings.listen, ":9005")

    def test_store(self) -> None:
        self.assertEqual(parse("--store", "/srv/r.json").settings.store, "/srv/r.json")
        self.assertIsNone(parse("--no-store").settings.store)

    def test_limits(self) -> None:
        settings = parse("--registrations-per-minute", "0", "--requests-per-second", "25.5",
                         "--request-burst", "50", "--stale-after", "600",
                         "--beacon-datagrams-per-second", "0", "--beacon-burst", "10",
                         "--relay-bytes-per-second", "1000", "--relay-burst-bytes", "3000",
                         "--flush-delay", "0.01", "--reap-interval", "5").settings
        self.assertEqual(settings.registry, RegistryConfig(stale_after=600.0, registrations_per_minute=0.0,
                                                           requests_per_second=25.5, request_burst=50.0))
        self.assertEqual((settings.beacon.datagrams_per_second, settings.beacon.burst,
                          settings.beacon.relay_bytes_per_second, settings.beacon.relay_burst_bytes),
                         (0.0, 10.0, 1000.0, 3000.0))
        self.assertEqual((settings.flush_delay, settings.reap_interval), (0.01, 5.0))

    def test_busy_poll(self) -> None:
        """--busy-poll is in microseconds, on by default (RENDEZVOUS_BUSY_POLL); the settings hold seconds."""
        self.assertAlmostEqual(parse().settings.busy_poll, RENDEZVOUS_BUSY_POLL / 1e6)
        self.assertGreater(RENDEZVOUS_BUSY_POLL, 0)
        self.assertAlmostEqual(parse("--busy-poll", "250").settings.busy_poll, 0.00025)
        self.assertEqual(parse("--busy-poll", "0").settings.busy_poll, 0.0)

    def test_no_expiry(self) -> None:
        self.assertEqual(parse("--stale-after", "0").settings.registry.stale_after, math.inf)

    def test_tls(self) -> None:
        self.assertTrue(parse("--tls").settings.tls)
        settings = parse("--tls-cert", "c.pem", "--tls-key", "k.pem").settings
        self.assertEqual((settings.tls, settings.tls_cert, settings.tls_key), (True, "c.pem", "k.pem"))

    def test_log_options(self) -> None:
        options = parse("--log-format", "JSON", "--log-level", "Warning")
        self.assertEqual((options.parsed["log_format"], options.parsed["log_level"]), ("json", "warn"))
        options = parse()
        self.assertEqual((options.parsed["log_format"], options.parsed["log_level"]), (None, None))

    def assertUsageError(self, argv: list[str], *needles: str) -> None:
        e = self.assertRaises(usage.UsageError, parse, *argv)
        for needle in needles:
            self.assertIn(needle, str(e))

    def test_bad_values(self) -> None:
        cases: list[tuple[list[str], str] | tuple[list[str], str, str]] = [
            (["--listen", "example.com:9000"], "--listen", "not an IP address"),
            (["--listen", ":65536"], "--listen", "0 to 65535"),
            (["--beacon", "::1:9001"], "--beacon", "brackets"),
            (["--beacon", ""], "--beacon"),
            (["--registrations-per-minute", "-1"], "--registrations-per-minute", "0 to disable"),
            (["--requests-per-second", "lots"], "--requests-per-second", "not a number"),
            (["--requests-per-second", "nan"], "--requests-per-second", "finite"),
            (["--request-burst", "0"], "--request-burst", "more than 0"),
            (["--stale-after", "-5"], "--stale-after", "never"),
            (["--flush-delay", "-0.1"], "--flush-delay", "negative"),
            (["--reap-interval", "0"], "--reap-interval", "more than 0"),
            (["--busy-poll", "-1"], "--busy-poll", "0 to 10,000 microseconds"),
            (["--busy-poll", "20000"], "--busy-poll", "0 to 10,000 microseconds"),
            (["--busy-poll", "inf"], "--busy-poll", "finite"),
            (["--log-format", "xml"], "--log-format", "text, json"),
            (["--log-level", "loud"], "--log-level", "debug"),
            (["--store", "x.json", "--no-store"], "--store and --no-store"),
            (["--tls-cert", "c.pem"], "--tls-key is missing"),
            (["--tls", "--tls-key", "k.pem"], "--tls-cert is missing"),
            (["--no-such-thing"], "no-such-thing"),
        ]
        for argv, *needles in cases:
            self.assertUsageError(argv, *needles)  # type: ignore[arg-type]

    def test_usage_mentions_every_option(self) -> None:
        text = str(tap.RendezvousOptions())
        for option in tap.RENDEZVOUS_OPTIONS:
            self.assertIn(f"--{option.name}", text)


class EnvironmentTests(SynchronousTestCase):
    def test_values(self) -> None:
        raw = tap.values_from_environment({"PILOT_LISTEN": "127.0.0.1:0", "PILOT_BEACON": "127.0.0.1:0",
                                           "PILOT_STORE": "/tmp/x.json", "PILOT_TLS": "yes",
                                           "PILOT_FLUSH_DELAY": "0.1", "HOME": "/root"})
        self.assertEqual(raw, {"listen": "127.0.0.1:0", "beacon": "127.0.0.1:0", "store": "/tmp/x.json",
                               "tls": True, "flush_delay": "0.1"})

    def test_no_store(self) -> None:
        self.assertEqual(tap.values_from_environment({"PILOT_STORE": "none"}), {"no_store": True})
        self.assertEqual(tap.values_from_environment({"PILOT_NO_STORE": "1"}), {"no_store": True})

    def test_bad_flag(self) -> None:
        e = self.assertRaises(ValueError, tap.values_from_environment, {"PILOT_TLS": "maybe"})
        self.assertIn("PILOT_TLS", str(e))

    def test_errors_name_the_variable(self) -> None:
        e = self.assertRaises(ValueError, tap.parse_values, {"listen": "nowhere"}, tap.environment_name)
        self.assertTrue(str(e).startswith("PILOT_LISTEN: "), str(e))


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.store = os.path.join(self.folder, "registry.json")

    def test_service(self) -> None:
        options = parse("--listen", "127.0.0.1:0", "--beacon", "127.0.0.1:0", "--store", self.store,
                        "--flush-delay", "0.5")
        guard = tap.makeService(options)
        self.assertIsInstance(guard, StartupGuard)  # a busy port at start is one line (tests.test_startup)
        service = guard.inner
        self.assertIsInstance(service, RendezvousService)
        self.assertTrue(IService.providedBy(service))
        self.assertEqual(service.settings, options.settings)
        self.assertEqual(service.registry.state.nodes, {})
        self.assertFalse(service.running)
        self.assertFalse(os.path.exists(self.store))  # nothing is written before it starts

    def test_loads_the_store(self) -> None:
        # a memory reactor: a change schedules a store write, which must not land on the real reactor
        first = tap.build_service(parse("--store", self.store).settings, MemoryReactorClock())
        key = base64.b64encode(b"\x07" * 32).decode()
        reply = first.registry.handle({"type": "register", "public_key": key, "listen_addr": ":4000",
                                       "hostname": "kept"}, Peer("192.0.2.1", 4000))
        atomic_write_json(self.store, first.registry.state.to_json())
        second = tap.makeService(parse("--store", self.store)).inner
        assert isinstance(second, RendezvousService)
        node = second.registry.node(reply["node_id"])
        self.assertIsNotNone(node)
        assert node is not None
        self.assertEqual(node.hostname, "kept")

    def test_corrupt_store(self) -> None:
        for content in (b'{"nodes": {"1": ', b"\x00\xff garbage", b"[1, 2]", b'{"nodes": {"1": {"id": "x"}}}'):
            with open(self.store, "wb") as f:
                f.write(content)
            e = self.assertRaises(SystemExit, tap.makeService, parse("--store", self.store))
            message = str(e.code)
            self.assertTrue(message.startswith("pilot-rendezvous: error: cannot load the registry store "),
                            message)
            self.assertIn(self.store, message)
            self.assertNotIn("\n", message)
            with open(self.store, "rb") as f:
                self.assertEqual(f.read(), content)

    def test_unreadable_certificate(self) -> None:
        cert = os.path.join(self.folder, "c.pem")
        with open(cert, "w") as f:
            f.write("no")
        e = self.assertRaises(tap.StartupError, tap.build_service,
                              parse("--no-store", "--tls-cert", cert, "--tls-key", cert).settings,
                              MemoryReactorClock())
        self.assertIn(cert, e.message)
        self.assertIn("--tls-cert", e.hint)


class RunnerLoggingTests(SynchronousTestCase):
    """``--log-format``/``--log-level`` given to the plugin choose twistd's (or twist's) observer."""

    def setUp(self) -> None:
        self.patch(log, "_twistd_choice", None)
        self.store = os.path.abspath(self.mktemp())

    def twistd(self, *argv: str) -> Any:
        from twisted.scripts._twistd_unix import ServerOptions
        config = ServerOptions()
        config.parseOptions(list(argv))
        return config

    def test_plugin_is_found(self) -> None:
        import twisted.plugins
        makers = {m.tapname: m for m in getPlugins(IServiceMaker, twisted.plugins)}
        maker = makers["pilot-rendezvous"]
        self.assertEqual(maker.description, "Pilot rendezvous: registry (TCP) and beacon (UDP)")
        self.assertIsInstance(maker.options(), tap.RendezvousOptions)

    def test_twistd_json(self) -> None:
        config = self.twistd("-n", "pilot-rendezvous", "--store", self.store, "--log-format", "json")
        self.assertIs(config["logger"], log.twistd_logger)
        self.assertEqual(log._twistd_choice, log._TwistdChoice("json", "info", None))

    def test_twistd_default_untouched(self) -> None:
        config = self.twistd("-n", "pilot-rendezvous", "--store", self.store)
        self.assertIsNone(config["logger"])

    def test_twistd_logger_wins(self) -> None:
        config = self.twistd("-n", "--logger", "pilot.log.text_logger", "pilot-rendezvous", "--store", self.store,
                             "--log-format", "json")
        self.assertIs(config["logger"], log.text_logger)

    def test_twistd_daemon_logfile(self) -> None:
        self.twistd("--logfile", "/var/log/pilot.log", "pilot-rendezvous", "--store", self.store,
                    "--log-level", "warn")
        self.assertEqual(log._twistd_choice, log._TwistdChoice("text", "warn", "/var/log/pilot.log"))

    def test_twist(self) -> None:
        from twisted.application.twist._options import TwistOptions
        from twisted.logger import LogLevel
        config = TwistOptions()
        config.parseOptions(["pilot-rendezvous", "--store", self.store, "--log-format", "text",
                             "--log-level", "error"])
        self.assertEqual((config["logFormat"], config["logLevel"]), ("text", LogLevel.error))


class TacTests(SynchronousTestCase):
    def load(self, **env: str) -> Any:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PILOT_")}
        self.patch(os, "environ", {**clean, **env})
        return loadApplication(os.path.join(REPO, "tac", "rendezvous.tac"), "python")

    def test_from_environment(self) -> None:
        store = os.path.abspath(self.mktemp())
        application = self.load(PILOT_LISTEN="127.0.0.1:0", PILOT_BEACON="127.0.0.1:0", PILOT_STORE=store)
        [guard] = list(IServiceCollection(application))
        self.assertIsInstance(guard, StartupGuard)
        service = guard.inner
        self.assertIsInstance(service, RendezvousService)
        self.assertEqual((service.settings.listen, service.settings.beacon_listen, service.settings.store),
                         ("127.0.0.1:0", "127.0.0.1:0", store))
        self.assertFalse(service.running)

    def test_bad_value(self) -> None:
        e = self.assertRaises(SystemExit, self.load, PILOT_LISTEN="nowhere", PILOT_STORE="none")
        self.assertIn("PILOT_LISTEN", str(e.code))

    def test_corrupt_store(self) -> None:
        store = os.path.abspath(self.mktemp())
        with open(store, "w") as f:
            json.dump([], f)
        e = self.assertRaises(SystemExit, self.load, PILOT_STORE=store)
        self.assertIn("cannot load the registry store", str(e.code))


class ReadmeTests(SynchronousTestCase):
    """The README's ``Persistence:`` line is what a run prints, as root and not (issue 9 item 7)."""

    def test_persistence_line(self) -> None:
        from pilot.services.store import STORE_NAME, SYSTEM_STORE_DIR, default_store_path
        with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        shown = [line for line in readme.splitlines() if line.startswith("Persistence: ")]
        self.assertEqual(shown, [f"Persistence: {os.path.join(SYSTEM_STORE_DIR, STORE_NAME)}"])
        # what a user who cannot write the system folder gets, which the README must say too
        home = os.path.abspath(self.mktemp())
        fallback = default_store_path(os.path.join(REPO, "README.md", "not-a-folder"), home)
        self.assertEqual(fallback, os.path.join(home, ".pilot", STORE_NAME))
        self.assertIn(f"`~/.pilot/{STORE_NAME}`", readme)


class ReplicationOptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(tap, "default_store_path", lambda: os.path.abspath(self.mktemp()))
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != tap.TOKEN_VARIABLE})
        self.token_file = self.mktemp()
        with open(self.token_file, "wb") as f:
            f.write(b"  0123456789abcdef-secret\n")

    def test_unpaired_by_default(self) -> None:
        replication = parse().settings.replication
        self.assertFalse(replication.paired)
        self.assertEqual(replication.takeover_after, 10.0)

    def test_token_file_and_standby(self) -> None:
        options = parse("--replication-token-file", self.token_file, "--standby", "10.0.0.1:9000",
                        "--takeover-after", "4", "--sync-replication", "--sync-timeout", "1.5")
        replication = options.settings.replication
        self.assertEqual((replication.token, replication.standby_of, replication.takeover_after),
                         (b"0123456789abcdef-secret", "10.0.0.1:9000", 4.0))
        self.assertEqual((replication.sync, replication.sync_timeout), (True, 1.5))

    def test_token_from_the_environment(self) -> None:
        values = tap.parse_values({})
        settings = tap.settings_from(values, {tap.TOKEN_VARIABLE: "0123456789abcdef"})
        self.assertEqual(settings.replication.token, b"0123456789abcdef")

    def test_the_token_is_never_a_flag(self) -> None:
        self.assertRaises(usage.UsageError, parse, "--replication-token", "x")

    def test_bad_combinations(self) -> None:
        for argv, needle in ((["--standby", "10.0.0.1:9000"], "--standby needs the replication token"),
                             (["--sync-replication"], "--sync-replication needs a pair"),
                             (["--standby", "nowhere"], "--standby"),
                             (["--replication-token-file", "/nonexistent/t"], "cannot read"),
                             (["--takeover-after", "0"], "--takeover-after")):
            e = self.assertRaises(usage.UsageError, parse, *argv)
            self.assertIn(needle, str(e))

    def test_short_token_refused(self) -> None:
        with open(self.token_file, "wb") as f:
            f.write(b"short")
        e = self.assertRaises(usage.UsageError, parse, "--replication-token-file", self.token_file)
        self.assertIn("at least 16", str(e))

    def test_service_is_paired(self) -> None:
        settings = parse("--replication-token-file", self.token_file, "--no-store").settings
        service = tap.build_service(settings, MemoryReactorClock())
        self.assertIsNotNone(service.registry.replica)


class ReactorWithoutTLSTests(SynchronousTestCase):
    """A rendezvous without TLS starts without loading pyOpenSSL (issue 16: restart time)."""

    def test_no_op_once_a_reactor_is_installed(self) -> None:
        import sys
        before = sys.modules.get("OpenSSL")
        tap.install_reactor_without_tls()
        self.assertIs(sys.modules.get("OpenSSL"), before)

    def test_fresh_process(self) -> None:
        import subprocess
        import sys
        code = ("import sys; from pilot import tap; tap.install_reactor_without_tls(); "
                "from twisted.internet import reactor; "
                "print('twisted.internet._sslverify' in sys.modules, 'OpenSSL' in sys.modules); "
                "import OpenSSL; print(OpenSSL.__name__)")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                             env=dict(os.environ, PYTHONPATH=root), timeout=120)
        self.assertEqual(out.stdout.split(), ["False", "False", "OpenSSL"], out.stderr)
