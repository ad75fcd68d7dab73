"""
pilotctl in-process: the output contract (docs/cli.md), argument errors,
--json before and after the command, --help everywhere, and
``rendezvous start`` on a memory reactor.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
from typing import Any, Literal

from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from pilot import __version__, cli, log
from pilot.errors import ErrorCode, NotFound
from pilot.server.state import RegistryState


class Ran:
    """One ``main`` call's exit status and output."""

    def __init__(self, argv: list[str], reactor: Any = None) -> None:
        out, err = io.StringIO(), io.StringIO()
        self.status = cli.main(argv, stdout=out, stderr=err, reactor=reactor)
        self.stdout = out.getvalue()
        self.stderr = err.getvalue()

    def json_error(self) -> dict[str, Any]:
        lines = self.stderr.splitlines()
        assert len(lines) == 1, self.stderr
        value = json.loads(lines[0])
        assert set(value) == {"error"}, value
        assert set(value["error"]) == {"code", "message", "hint"}, value
        return value["error"]  # type: ignore[no-any-return]


class UsageErrorTests(SynchronousTestCase):
    def assertUsageError(self, argv: list[str], needle: str = "") -> dict[str, Any]:
        ran = Ran(argv)
        self.assertEqual(ran.status, 2)
        self.assertEqual(ran.status, int(ErrorCode.invalid_argument))
        self.assertEqual(ran.stdout, "")
        self.assertNotIn("Traceback", ran.stderr)
        error = ran.json_error()
        self.assertEqual(error["code"], "invalid_argument")
        self.assertIn(needle, error["message"])
        self.assertIn("--help", error["hint"])
        return error

    def test_bad_value_json_before(self) -> None:
        self.assertUsageError(["--json", "rendezvous", "start", "--listen", "nowhere:1"], "--listen")

    def test_bad_value_json_after(self) -> None:
        self.assertUsageError(["rendezvous", "start", "--listen", "nowhere:1", "--json"], "--listen")

    def test_json_between_group_and_command(self) -> None:
        self.assertUsageError(["rendezvous", "--json", "start", "--beacon", "99999"], "--beacon")

    def test_unknown_command(self) -> None:
        error = self.assertUsageError(["--json", "frobnicate"], "frobnicate")
        self.assertIn("pilotctl --help", error["hint"])

    def test_unknown_subcommand(self) -> None:
        error = self.assertUsageError(["rendezvous", "explode", "--json"], "explode")
        self.assertIn("pilotctl rendezvous --help", error["hint"])

    def test_no_command(self) -> None:
        self.assertUsageError(["--json"])

    def test_group_without_command(self) -> None:
        self.assertUsageError(["--json", "rendezvous"])

    def test_unknown_option(self) -> None:
        error = self.assertUsageError(["--json", "rendezvous", "start", "--bogus"], "--bogus")
        self.assertIn("pilotctl rendezvous start --help", error["hint"])

    def test_extra_argument(self) -> None:
        self.assertUsageError(["--json", "rendezvous", "start", "now"], "now")

    def test_missing_option_value(self) -> None:
        self.assertUsageError(["--json", "rendezvous", "start", "--store"], "--store")

    def test_no_abbreviations(self) -> None:
        self.assertUsageError(["--json", "rendezvous", "start", "--lis", ":9000"], "--lis")

    def test_negative_rate(self) -> None:
        self.assertUsageError(["--json", "rendezvous", "start", "--requests-per-second", "-1"],
                              "--requests-per-second")

    def test_store_and_no_store(self) -> None:
        self.assertUsageError(["--json", "rendezvous", "start", "--store", "x.json", "--no-store"],
                              "choose one")

    def test_certificate_without_key(self) -> None:
        self.assertUsageError(["--json", "rendezvous", "start", "--tls-cert", "c.pem"], "--tls-key")

    def test_bad_log_format(self) -> None:
        self.assertUsageError(["--json", "rendezvous", "start", "--log-format", "xml"], "--log-format")

    def test_human_error(self) -> None:
        ran = Ran(["rendezvous", "start", "--listen", "nowhere:1"])
        self.assertEqual(ran.status, 2)
        self.assertEqual(ran.stdout, "")
        lines = ran.stderr.splitlines()
        self.assertTrue(lines[0].startswith("error: --listen: "), lines)
        self.assertEqual(lines[1], "hint: see `pilotctl rendezvous start --help`")
        self.assertEqual(len(lines), 2)

    def test_json_after_double_dash_is_not_json(self) -> None:
        ran = Ran(["frobnicate", "--", "--json"])
        self.assertEqual(ran.status, 2)
        self.assertTrue(ran.stderr.startswith("error: "))


class HelpTests(SynchronousTestCase):
    def paths(self) -> list[tuple[str, ...]]:
        cli.load_commands()  # every command, the node's too
        return [(), *cli.COMMANDS.groups, *cli.COMMANDS.commands]

    def test_help_everywhere(self) -> None:
        """``--help`` and ``-h`` work on the program, every group and every command, with or without --json."""
        for path in self.paths():
            for flag in (["--help"], ["-h"], ["--json", "--help"]):
                ran = Ran([*path, *flag])
                self.assertEqual(ran.status, 0, (path, flag, ran.stderr))
                self.assertEqual(ran.stderr, "")
                self.assertIn(" ".join(["usage: pilotctl", *path]), ran.stdout)

    def test_command_modules(self) -> None:
        """
        ``COMMAND_MODULES`` names, for every command's first word, the modules
        defining it (``load_commands`` imports only those), and nothing else.
        """
        self.paths()
        for path, command in cli.COMMANDS.commands.items():
            if path[0].startswith("test-"):
                continue  # a test's own
            self.assertIn(command.function.__module__, cli.COMMAND_MODULES.get(path[0], ()), path)
        words = {path[0] for path in cli.COMMANDS.commands}
        self.assertEqual(sorted(set(cli.COMMAND_MODULES) - words), [])

    def test_command_help_lists_options(self) -> None:
        ran = Ran(["rendezvous", "start", "--help"])
        for flag in ("--listen", "--beacon", "--store", "--no-store", "--tls", "--tls-cert", "--tls-key",
                     "--log-format", "--json", "--registrations-per-minute", "--stale-after"):
            self.assertIn(flag, ran.stdout)
        self.assertIn("Registry listening on :9000 (TCP)", ran.stdout)

    def test_parser_for_the_command_given(self) -> None:
        """A command named in full gets its branch only; a group, or nothing, gets the whole tree."""
        cli.load_commands()

        def choices(parser: argparse.ArgumentParser, *path: str) -> list[str]:
            for word in path:
                parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                              ).choices[word]
            subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            return sorted(subs[0].choices) if subs else []

        branch = cli.COMMANDS.build_parser(io.StringIO(), ["--json", "rendezvous", "start", "--listen", ":0"])
        self.assertEqual(choices(branch), ["rendezvous"])
        self.assertEqual(choices(branch, "rendezvous"), ["start"])
        args, extra = branch.parse_known_args(["--json", "rendezvous", "start", "--listen", ":0"])
        self.assertEqual((args._handler.path, args.listen, extra), (("rendezvous", "start"), ":0", []))
        for argv in ([], ["rendezvous"], ["rendezvous", "--help"], ["rendezvous", "stat"]):
            whole = cli.COMMANDS.build_parser(io.StringIO(), argv)
            self.assertEqual(choices(whole), sorted({path[0] for path in cli.COMMANDS.commands}), argv)
            self.assertEqual(choices(whole, "rendezvous"), ["promote", "start"], argv)

    def test_top_level_lists_groups(self) -> None:
        ran = Ran(["--help"])
        self.assertIn("rendezvous", ran.stdout)

    def test_version(self) -> None:
        ran = Ran(["--version"])
        self.assertEqual((ran.status, ran.stdout, ran.stderr), (0, f"pilotctl {__version__}\n", ""))

    def test_version_json(self) -> None:
        for argv in (["--json", "--version"], ["--version", "--json"]):
            ran = Ran(argv)
            self.assertEqual(ran.status, 0)
            self.assertEqual(json.loads(ran.stdout), {"version": __version__})


class ContractTests(SynchronousTestCase):
    """Output of commands, through test-only commands added to the table."""

    def add(self, name: str, function: Any) -> None:
        path = tuple(name.split())
        cli.COMMANDS.command(name, "test command")(function)
        self.addCleanup(cli.COMMANDS.commands.pop, path)

    def test_success_json_is_bare_compact_value(self) -> None:
        self.add("test-ok", lambda ctx: cli.Result({"node_id": 5, "hostname": "é"}, "node 5"))
        ran = Ran(["--json", "test-ok"])
        self.assertEqual((ran.status, ran.stderr), (0, ""))
        self.assertEqual(ran.stdout, '{"node_id":5,"hostname":"é"}\n')

    def test_success_list(self) -> None:
        self.add("test-list", lambda ctx: cli.Result([1, 2], "1 2"))
        self.assertEqual(Ran(["test-list", "--json"]).stdout, "[1,2]\n")

    def test_success_human(self) -> None:
        self.add("test-ok", lambda ctx: cli.Result({"node_id": 5}, "node 5"))
        ran = Ran(["test-ok"])
        self.assertEqual((ran.status, ran.stdout, ran.stderr), (0, "node 5\n", ""))

    def test_success_human_default_is_indented_json(self) -> None:
        self.add("test-ok", lambda ctx: cli.Result({"node_id": 5}))
        self.assertEqual(json.loads(Ran(["test-ok"]).stdout), {"node_id": 5})

    def test_pilot_error(self) -> None:
        def lookup(ctx: cli.Context) -> cli.Result:
            raise NotFound("no node has the hostname 'x'", "try `pilotctl peers`")

        self.add("test-find", lookup)
        ran = Ran(["--json", "test-find"])
        self.assertEqual(ran.status, int(ErrorCode.not_found))
        self.assertEqual(ran.stdout, "")
        self.assertEqual(ran.json_error(), {"code": "not_found", "message": "no node has the hostname 'x'",
                                            "hint": "try `pilotctl peers`"})
        human = Ran(["test-find"])
        self.assertEqual(human.stderr, "error: no node has the hostname 'x'\nhint: try `pilotctl peers`\n")

    def test_unexpected_exception_is_internal(self) -> None:
        def boom(ctx: cli.Context) -> None:
            raise KeyError("surprise")

        self.add("test-boom", boom)
        ran = Ran(["test-boom", "--json"])
        self.assertEqual(ran.status, int(ErrorCode.internal))
        self.assertEqual(ran.stdout, "")
        error = ran.json_error()
        self.assertEqual(error["code"], "internal")
        self.assertIn("surprise", error["message"])
        human = Ran(["test-boom"])
        self.assertNotIn("Traceback", human.stderr)
        self.assertTrue(human.stderr.startswith("error: KeyError: 'surprise'\n"))

    def test_grouped_commands(self) -> None:
        """A name with spaces makes a group, as ``daemon start`` will."""
        self.add("test-group one", lambda ctx: cli.Result({"one": True}, "one"))
        self.add("test-group two", lambda ctx: cli.Result({"two": ctx.json}, "two"))
        self.addCleanup(cli.COMMANDS.groups.pop, ("test-group",))
        self.assertEqual(Ran(["test-group", "one"]).stdout, "one\n")
        self.assertEqual(Ran(["test-group", "two", "--json"]).stdout, '{"two":true}\n')
        self.assertEqual(Ran(["test-group", "--help"]).status, 0)

    def test_defined_twice(self) -> None:
        cli.load_commands(["rendezvous"])  # registered when a rendezvous command is run (pilot.cli_server)
        self.assertRaises(ValueError, cli.COMMANDS.command("rendezvous start", "again"), lambda ctx: None)


class FakePort:
    def __init__(self, address: IPv4Address) -> None:
        self.address = address
        self.closed = False

    def getHost(self) -> IPv4Address:
        return self.address

    def stopListening(self) -> None:
        self.closed = True


class FakeReactor(MemoryReactorClock):
    """
    A memory reactor with UDP ports, and a ``run`` that shuts down at once,
    as if SIGTERM came.
    """

    def __init__(self, refuse_udp: bool = False) -> None:
        super().__init__()
        self.ran = False
        self.refuse_udp = refuse_udp
        self.udpServers: list[tuple[int, str]] = []
        self.ports: list[FakePort] = []

    def _port(self, kind: Literal["TCP", "UDP"], port: int, interface: str) -> FakePort:
        fake = FakePort(IPv4Address(kind, interface or "0.0.0.0", port or 40000 + len(self.ports)))
        self.ports.append(fake)
        return fake

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> FakePort:  # type: ignore[override]
        self.tcpServers.append((port, factory, backlog, interface))
        return self._port("TCP", port, interface)

    def listenSSL(self, port: int, factory: Any, contextFactory: Any, backlog: int = 50,  # type: ignore[override]
                  interface: str = "") -> FakePort:
        self.sslServers.append((port, factory, contextFactory, backlog, interface))
        return self._port("TCP", port, interface)

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> FakePort:
        if self.refuse_udp:
            raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "Address already in use"))
        self.udpServers.append((port, interface))
        return self._port("UDP", port, interface)

    def run(self) -> None:
        self.ran = True
        self.running = True
        for call, args, kw in self.triggers.get("before", {}).get("shutdown", []):
            call(*args, **kw)
        self.running = False


class RendezvousStartTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logging: list[tuple[str, str]] = []
        self.patch(log, "start_logging",
                   lambda fmt, stream, level: self.logging.append((fmt, level)))
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.store = os.path.join(self.folder, "registry.json")

    def test_prints_the_product_lines(self) -> None:
        reactor = FakeReactor()
        ran = Ran(["rendezvous", "start", "--listen", ":9000", "--beacon", ":9001", "--store", self.store],
                  reactor=reactor)
        self.assertEqual(ran.status, 0, ran.stderr)
        self.assertEqual(ran.stdout, "Registry listening on :9000 (TCP)\n"
                                     "Beacon listening on :9001 (UDP)\n"
                                     f"Persistence: {self.store}\n")
        self.assertEqual(self.logging, [("text", "info")])
        self.assertTrue(reactor.ran)
        self.assertEqual([p[0] for p in reactor.tcpServers], [9000])
        self.assertEqual([p[0] for p in reactor.udpServers], [9001])
        # shutdown stopped the service, which wrote the store
        with open(self.store) as f:
            RegistryState.from_json(json.load(f))

    def test_json_banner(self) -> None:
        ran = Ran(["--json", "rendezvous", "start", "--listen", "127.0.0.1:9100", "--beacon", "127.0.0.1:9101",
                   "--no-store", "--log-format", "json", "--log-level", "debug"], reactor=FakeReactor())
        self.assertEqual(ran.status, 0, ran.stderr)
        self.assertEqual(json.loads(ran.stdout), {"registry": "127.0.0.1:9100", "beacon": "127.0.0.1:9101",
                                                  "store": None, "tls_fingerprint": None})
        self.assertEqual(len(ran.stdout.splitlines()), 1)
        self.assertEqual(self.logging, [("json", "debug")])

    def test_tls_fingerprint(self) -> None:
        ran = Ran(["--json", "rendezvous", "start", "--tls", "--store", self.store], reactor=FakeReactor())
        self.assertEqual(ran.status, 0, ran.stderr)
        fingerprint = json.loads(ran.stdout)["tls_fingerprint"]
        self.assertRegex(fingerprint, "^[0-9a-f]{64}$")
        human = Ran(["rendezvous", "start", "--tls", "--store", self.store], reactor=FakeReactor())
        self.assertIn("Registry listening on :9000 (TLS)\n", human.stdout)
        self.assertIn(f"TLS fingerprint: {fingerprint}\n", human.stdout)  # kept beside the store

    def test_corrupt_store(self) -> None:
        with open(self.store, "w") as f:
            f.write('{"nodes": {"1": "half a')
        reactor = FakeReactor()
        ran = Ran(["--json", "rendezvous", "start", "--store", self.store], reactor=reactor)
        self.assertEqual(ran.status, int(ErrorCode.malformed))
        self.assertEqual(ran.stdout, "")
        error = ran.json_error()
        self.assertEqual(error["code"], "malformed")
        self.assertIn(self.store, error["message"])
        self.assertIn("--no-store", error["hint"])
        self.assertEqual((reactor.ran, reactor.tcpServers, self.logging), (False, [], []))
        with open(self.store) as f:
            self.assertEqual(f.read(), '{"nodes": {"1": "half a')

    def test_bad_certificate(self) -> None:
        cert = os.path.join(self.folder, "c.pem")
        with open(cert, "w") as f:
            f.write("not a certificate")
        ran = Ran(["--json", "rendezvous", "start", "--no-store", "--tls-cert", cert, "--tls-key", cert],
                  reactor=FakeReactor())
        self.assertEqual(ran.status, 2)
        self.assertIn("c.pem", ran.json_error()["message"])

    def test_port_in_use(self) -> None:
        reactor = FakeReactor(refuse_udp=True)
        ran = Ran(["--json", "rendezvous", "start", "--no-store", "--beacon", "127.0.0.1:9001"], reactor=reactor)
        self.assertEqual(ran.status, 2)
        self.assertEqual(ran.stdout, "")
        error = ran.json_error()
        self.assertEqual(error["message"], "cannot listen on 127.0.0.1:9001: Address already in use")
        self.assertIn("--beacon", error["hint"])
        self.assertFalse(reactor.ran)
        self.assertTrue(all(p.closed for p in reactor.ports))
