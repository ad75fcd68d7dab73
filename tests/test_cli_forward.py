"""
pilotctl forward / unforward / expose / unexpose (pilot.cli_forward) in-process
against the fake control client of tests.test_cli_node: the requests, the
text and --json output, usage errors and the daemon's errors with their codes.
"""

from __future__ import annotations

from pilot.errors import AlreadyExists, ErrorCode, NotFound, NotTrusted

from tests.test_cli_node import CLITestCase

FORWARD = {"local": "127.0.0.1:8080", "local_port": 8080, "target": "agent-b", "port": 80, "active": 0,
           "total": 0, "failed": 0, "bytes_to_peer": 0, "bytes_from_peer": 0}
EXPOSED = {"port": 80, "service": "127.0.0.1:8000", "host": "127.0.0.1", "host_port": 8000, "active": 1,
           "total": 2, "failed": 0, "bytes_to_peer": 10, "bytes_from_peer": 5}


class ForwardCommandTests(CLITestCase):
    def test_forward(self) -> None:
        self.fake.answers["forward"] = FORWARD
        ran = self.run_ok(["forward", "8080", "agent-b:80"])
        self.assertEqual(ran.stdout, "forwarding 127.0.0.1:8080 -> agent-b:80\n")
        self.assertEqual(self.fake.calls, [("forward", {"local_port": 8080, "target": "agent-b", "port": 80})])

    def test_forward_to_an_address(self) -> None:
        self.fake.answers["forward"] = FORWARD
        self.assertEqual(self.run_json(["forward", "0", "0:0000.0000.0005:1000"]), FORWARD)
        self.assertEqual(self.fake.calls[0][1], {"local_port": 0, "target": "0:0000.0000.0005", "port": 1000})

    def test_list(self) -> None:
        self.fake.answers["forwards"] = {"forwards": [FORWARD], "exposed": [EXPOSED]}
        ran = self.run_ok(["forward", "--list"])
        self.assertEqual(ran.stdout.splitlines(), [
            "forward 127.0.0.1:8080 -> agent-b:80  (0 open, 0 total, 0 failed)",
            "expose  pilot port 80 -> 127.0.0.1:8000  (1 open, 2 total, 0 failed)"])
        self.assertEqual(self.run_json(["expose", "--list"]), {"forwards": [FORWARD], "exposed": [EXPOSED]})
        self.fake.answers["forwards"] = {"forwards": [], "exposed": []}
        self.assertEqual(self.run_ok(["forward", "--list"]).stdout, "no forwards and no exposed ports\n")

    def test_usage_errors(self) -> None:
        for argv in (["forward"], ["forward", "8080"], ["forward", "8080", "agent-b"],
                     ["forward", "8080", "agent-b:port"], ["forward", "70000", "agent-b:80"],
                     ["forward", "8080", "agent-b:0"], ["expose", "80"], ["expose", "80", "localhost"],
                     ["expose", "0", "127.0.0.1:80"], ["unforward"], ["unexpose", "x"]):
            self.run_error(argv, ErrorCode.invalid_argument)
        self.assertEqual(self.fake.calls, [])

    def test_daemon_errors_keep_their_codes(self) -> None:
        self.fake.answers["forward"] = NotTrusted("agent-b does not trust this node")
        self.run_error(["forward", "8080", "agent-b:80"], ErrorCode.not_trusted)
        self.fake.answers["unforward"] = NotFound("local port 8080 is not forwarded")
        self.run_error(["unforward", "8080"], ErrorCode.not_found)
        self.fake.answers["expose"] = AlreadyExists("Pilot port 80 is already exposed")
        self.run_error(["expose", "80", "127.0.0.1:8000"], ErrorCode.already_exists)

    def test_expose_and_removal(self) -> None:
        self.fake.answers["expose"] = EXPOSED
        self.assertEqual(self.run_ok(["expose", "80", "127.0.0.1:8000"]).stdout,
                         "exposing pilot port 80 -> 127.0.0.1:8000\n")
        self.fake.answers["unexpose"] = {**EXPOSED, "status": "removed"}
        self.assertEqual(self.run_ok(["unexpose", "80"]).stdout, "removed pilot port 80 -> 127.0.0.1:8000\n")
        self.fake.answers["unforward"] = {**FORWARD, "status": "removed"}
        self.assertEqual(self.run_ok(["unforward", "8080"]).stdout, "removed forward 127.0.0.1:8080 -> agent-b:80\n")
        self.assertEqual(self.fake.calls, [("expose", {"port": 80, "host": "127.0.0.1", "host_port": 8000}),
                                           ("unexpose", {"port": 80}), ("unforward", {"local_port": 8080})])
        self.run_ok(["expose", "81", "[::1]:8000"])
        self.assertEqual(self.fake.calls[-1][1], {"port": 81, "host": "::1", "host_port": 8000})
