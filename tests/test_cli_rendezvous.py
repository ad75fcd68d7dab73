"""pilot.cli_rendezvous: ``pilotctl rendezvous promote`` against a registry in memory."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot import cli_rendezvous
from pilot.server.journal import Feed, Tracker
from pilot.server.registry import Peer, Registry
from pilot.server.replication import Publisher
from pilot.server.replication_role import Replica
from pilot.wire.registry import FrameDecoder, encode_frame
from tests.server.test_replication_role import Links
from tests.test_cli import Ran

TOKEN = b"0123456789abcdef0123"


class FakeSocket:
    """Answers one request with the registry's reply, as the registry's connection would."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.out = b""

    def sendall(self, data: bytes) -> None:
        [msg] = FrameDecoder().feed(data)
        assert isinstance(msg, dict)
        self.out += encode_frame(self.registry.handle(msg, Peer("127.0.0.1", 40000)))

    def recv(self, n: int) -> bytes:
        data, self.out = self.out[:n], self.out[n:]
        return data

    def close(self) -> None:
        pass


class PromoteTests(SynchronousTestCase):
    def setUp(self) -> None:
        clock = Clock()
        self.registry = Registry(clock)
        self.registry.state.term = 4
        self.replica = Replica(self.registry.state, Publisher(clock, self.registry.state.to_bytes,
                                                         Feed(Tracker(self.registry.state))), TOKEN,
                               "10.0.0.1:9000", Links())
        self.registry.replica = self.replica
        self.opened: list[tuple[str, int]] = []

        def opener(host: str, port: int, fingerprint: str | None, timeout: float) -> Any:
            self.opened.append((host, port))
            return FakeSocket(self.registry)
        self.patch(cli_rendezvous, "opener", opener)
        self.token_file = self.mktemp()
        with open(self.token_file, "wb") as f:
            f.write(TOKEN + b"\n")

    def test_promotes_and_reports_the_term(self) -> None:
        ran = Ran(["--json", "rendezvous", "promote", "--registry", "127.0.0.1:9100",
                   "--replication-token-file", self.token_file])
        self.assertEqual(ran.status, 0, ran.stderr)
        self.assertEqual(json.loads(ran.stdout), {"registry": "127.0.0.1:9100", "promoted": True, "term": 5})
        self.assertEqual(self.opened, [("127.0.0.1", 9100)])
        self.assertFalse(self.replica.standby)

    def test_already_primary(self) -> None:
        Ran(["rendezvous", "promote", "--replication-token-file", self.token_file])
        ran = Ran(["rendezvous", "promote", "--replication-token-file", self.token_file])
        self.assertEqual(ran.stdout.strip(), "127.0.0.1:9000 was primary already (term 5)")

    def test_wrong_token_is_unauthorized(self) -> None:
        with open(self.token_file, "wb") as f:
            f.write(b"another-token-of-16+")
        ran = Ran(["--json", "rendezvous", "promote", "--replication-token-file", self.token_file])
        self.assertEqual(ran.status, 11)
        self.assertEqual(ran.json_error()["code"], "unauthorized")
        self.assertTrue(self.replica.standby)

    def test_token_from_the_environment(self) -> None:
        self.patch(os, "environ", {**os.environ, "PILOT_REPLICATION_TOKEN": TOKEN.decode()})
        ran = Ran(["--json", "rendezvous", "promote"])
        self.assertEqual(ran.status, 0, ran.stderr)

    def test_no_token(self) -> None:
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "PILOT_REPLICATION_TOKEN"})
        ran = Ran(["--json", "rendezvous", "promote"])
        self.assertEqual((ran.status, ran.json_error()["code"]), (2, "invalid_argument"))

    def test_unreachable(self) -> None:
        def refused(host: str, port: int, fingerprint: str | None, timeout: float) -> Any:
            raise ConnectionRefusedError(111, "Connection refused")
        self.patch(cli_rendezvous, "opener", refused)
        ran = Ran(["--json", "rendezvous", "promote", "--replication-token-file", self.token_file])
        self.assertEqual((ran.status, ran.json_error()["code"]), (8, "registry_unavailable"))

    def test_timeout(self) -> None:
        def slow(host: str, port: int, fingerprint: str | None, timeout: float) -> Any:
            raise socket.timeout()
        self.patch(cli_rendezvous, "opener", slow)
        ran = Ran(["--json", "rendezvous", "promote", "--replication-token-file", self.token_file])
        self.assertEqual((ran.status, ran.json_error()["code"]), (7, "timeout"))

    def test_unpaired_registry(self) -> None:
        self.registry.replica = None
        ran = Ran(["--json", "rendezvous", "promote", "--replication-token-file", self.token_file])
        self.assertEqual((ran.status, ran.json_error()["code"]), (2, "invalid_argument"))
