"""
Tests for L{pilot.startup}: a twistd service that cannot start for a reason
the user can fix ends twistd with one logged line and the error's exit status.
"""

from __future__ import annotations

import errno
import socket

from twisted.application.service import Service
from twisted.internet.error import CannotListenError
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import AlreadyExists, ErrorCode
from pilot.startup import StartupGuard


class Failing(Service):
    def __init__(self, privileged: Exception | None = None, start: Exception | None = None) -> None:
        self.privileged, self.start = privileged, start

    def privilegedStartService(self) -> None:
        if self.privileged is not None:
            raise self.privileged

    def startService(self) -> None:
        super().startService()
        if self.start is not None:
            raise self.start


class CodedError(Exception):
    """Like the node's NodeStartupError: a message, a hint and a code, not a PilotError."""

    def __init__(self) -> None:
        super().__init__("x")
        self.message, self.hint, self.code = "another daemon answers on /h/pilot.sock", "stop it", \
            ErrorCode.already_exists


BUSY = CannotListenError("127.0.0.1", 9000, socket.error(errno.EADDRINUSE, "Address already in use"))


class StartupGuardTests(SynchronousTestCase):
    def exits(self, guard: StartupGuard, start: str) -> tuple[int, str]:
        with capturedLogs() as events:
            e = self.assertRaises(SystemExit, getattr(guard, start))
        (event,) = [ev for ev in events if ev.get("log_namespace", "").startswith("pilot.startup")]
        line: str = event["line"]
        self.assertNotIn("\n", line)
        assert isinstance(e.code, int), e.code
        return e.code, line

    def test_busy_port_when_privileged(self) -> None:
        code, line = self.exits(StartupGuard(Failing(privileged=BUSY), "pilot-rendezvous"),
                                "privilegedStartService")
        self.assertEqual(code, int(ErrorCode.invalid_argument))
        self.assertTrue(line.startswith("pilot-rendezvous: error: cannot listen on 127.0.0.1:9000: "
                                        "Address already in use ("), line)
        self.assertTrue(line.endswith("[invalid_argument]"), line)

    def test_second_daemon_when_started(self) -> None:
        code, line = self.exits(StartupGuard(Failing(start=CodedError()), "node.tac"), "startService")
        self.assertEqual(code, int(ErrorCode.already_exists))
        self.assertEqual(line, "node.tac: error: another daemon answers on /h/pilot.sock (stop it) "
                               "[already_exists]")

    def test_pilot_error(self) -> None:
        code, line = self.exits(StartupGuard(Failing(start=AlreadyExists("taken", "")), "pilot-node"),
                                "startService")
        self.assertEqual((code, line), (int(ErrorCode.already_exists), "pilot-node: error: taken [already_exists]"))

    def test_a_bug_keeps_its_traceback(self) -> None:
        guard = StartupGuard(Failing(start=KeyError("surprise")), "pilot-node")
        self.assertRaises(KeyError, guard.startService)

    def test_starts_and_stops_the_inner_service(self) -> None:
        inner = Failing()
        guard = StartupGuard(inner, "pilot-node")
        guard.privilegedStartService()
        guard.startService()
        self.assertTrue(inner.running)
        guard.stopService()
        self.assertFalse(inner.running)
