"""
Tests for L{pilot.node.openers}: the hop-limited openers before a punch, on a
``task.Clock`` with a recording sender, and the tunnel socket's
``send_limited`` (``pilot.protocols.tunnel``).
"""

from __future__ import annotations

import socket

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.endpoint import Endpoint
from pilot.node.openers import PUNCH_PROBES, Openers
from pilot.protocols.tunnel import NodeDatagramProtocol
from pilot.wire.tunnel import PILP
from tests.node.fakes import DEFAULT_TTL, HopLimitSocket

PEER: Endpoint = ("203.0.113.7", 5555)
OTHER: Endpoint = ("198.51.100.8", 6666)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Endpoint, int]] = []

    def send(self, data: bytes, endpoint: Endpoint) -> None:
        self.sent.append((data, endpoint, DEFAULT_TTL))

    def send_limited(self, data: bytes, endpoint: Endpoint, ttl: int) -> None:
        self.sent.append((data, endpoint, ttl))

    def local_port(self) -> int:
        return 4000


class OpenersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sender = Recorder()
        self.punched: list[Endpoint] = []
        self.openers = Openers(self.clock, self.sender, self.punched.append, ttls=(2, 3, 4), step=0.02,
                               skew=0.01)

    def run_ramp(self) -> None:
        for _ in range(4):
            self.clock.advance(0.02)

    def test_ramp_then_punch(self) -> None:
        self.openers.punch(PEER)
        self.assertEqual(self.sender.sent, [(PILP, PEER, 2)])  # the first at once
        self.assertEqual(self.punched, [])
        self.clock.advance(0.02)
        self.assertEqual(self.sender.sent[-1], (PILP, PEER, 3))
        self.clock.advance(0.02)
        self.assertEqual(self.sender.sent[-1], (PILP, PEER, 4))
        self.assertEqual(self.punched, [])
        self.clock.advance(0.02)
        self.assertEqual(self.sender.sent[3:], [(PILP, PEER, DEFAULT_TTL)] * PUNCH_PROBES)
        self.assertEqual(self.punched, [PEER])
        self.assertEqual(self.openers.running(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_second_command_joins_the_running_ramp(self) -> None:
        self.openers.punch(PEER)
        self.clock.advance(0.01)
        self.openers.punch(PEER)
        self.openers.punch(OTHER)
        self.run_ramp()
        self.assertEqual(self.punched, [PEER, OTHER])
        self.assertEqual(len([s for s in self.sender.sent if s[1] == PEER]), 3 + PUNCH_PROBES)
        self.assertEqual(self.openers.counters, {"ramps": 2, "merged": 1, "openers": 6})

    def test_after_a_ramp_a_new_command_ramps_again(self) -> None:
        self.openers.punch(PEER)
        self.run_ramp()
        self.openers.punch(PEER)
        self.run_ramp()
        self.assertEqual(self.punched, [PEER, PEER])

    def test_second_side_skewed(self) -> None:
        """The side that punches second sends each opener ``skew`` after the first side's, and
        punches at the same instant as the first side."""
        self.openers.punch(PEER, first=False)
        self.assertEqual(self.sender.sent, [])
        times = []
        for _ in range(8):
            self.clock.advance(0.01)
            if len(self.sender.sent) > len(times):
                times.extend([round(self.clock.seconds(), 3)] * (len(self.sender.sent) - len(times)))
        self.assertEqual(times, [0.01, 0.03, 0.05] + [0.06] * PUNCH_PROBES)
        self.assertEqual([ttl for _, _, ttl in self.sender.sent[:3]], [2, 3, 4])
        self.assertEqual(self.punched, [PEER])

    def test_skew_must_be_under_the_step(self) -> None:
        self.assertRaises(ValueError, Openers, self.clock, self.sender, self.punched.append,
                          ttls=(2, 3), step=0.02, skew=0.02)
        Openers(self.clock, self.sender, self.punched.append, ttls=(), step=0.02, skew=0.05)

    def test_no_openers_punches_at_once(self) -> None:
        openers = Openers(self.clock, self.sender, self.punched.append, ttls=())
        openers.punch(PEER, first=False)
        self.assertEqual(self.sender.sent, [(PILP, PEER, DEFAULT_TTL)] * PUNCH_PROBES)
        self.assertEqual(self.punched, [PEER])

    def test_stop_cancels_the_ramps(self) -> None:
        self.openers.punch(PEER)
        self.openers.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.run_ramp()
        self.assertEqual(self.punched, [])


class FailingSocket(HopLimitSocket):
    def __init__(self, refuse: bool) -> None:
        super().__init__()
        self.refuse = refuse

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if self.refuse:
            raise OSError(22, "Invalid argument")
        super().setsockopt(level, option, value)


class Transport:
    def __init__(self, sock: object = None, fail: bool = False) -> None:
        if sock is not None:
            self.socket = sock
        self.fail = fail
        self.written: list[tuple[bytes, Endpoint, int]] = []

    def write(self, data: bytes, addr: Endpoint) -> None:
        if self.fail:
            raise OSError(101, "Network is unreachable")
        ttl = getattr(self, "socket").ttl if hasattr(self, "socket") else DEFAULT_TTL
        self.written.append((data, addr, ttl))


class SendLimitedTests(SynchronousTestCase):
    def protocol(self, transport: Transport) -> NodeDatagramProtocol:
        p = NodeDatagramProtocol()
        p.makeConnection(transport)  # type: ignore[arg-type]
        return p

    def test_sets_and_restores_the_ttl(self) -> None:
        sock = HopLimitSocket()
        t = Transport(sock)
        p = self.protocol(t)
        p.send_limited(PILP, PEER, 2)
        p.send(PILP, PEER)
        self.assertEqual(t.written, [(PILP, PEER, 2), (PILP, PEER, DEFAULT_TTL)])
        self.assertEqual(sock.set, [2, DEFAULT_TTL])

    def test_restored_when_the_send_fails(self) -> None:
        sock = HopLimitSocket()
        p = self.protocol(Transport(sock, fail=True))
        p.send_limited(PILP, PEER, 3)  # counted, not raised
        self.assertEqual(sock.ttl, DEFAULT_TTL)
        self.assertEqual(p.counters.get("send_error"), 1)

    def test_a_socket_refusing_the_option_sends_nothing(self) -> None:
        t = Transport(FailingSocket(refuse=True))
        p = self.protocol(t)
        p.send_limited(PILP, PEER, 2)
        self.assertEqual(t.written, [])
        self.assertEqual(p.counters.get("ttl_error"), 1)

    def test_no_socket_sends_nothing(self) -> None:
        t = Transport()
        p = self.protocol(t)
        p.send_limited(PILP, PEER, 2)
        self.assertEqual(t.written, [])
        self.assertEqual(p.counters.get("no_ttl"), 1)

    def test_a_real_socket(self) -> None:
        """The options exist on this platform's sockets (nothing is sent)."""
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        default = s.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 2)
        self.assertEqual(s.getsockopt(socket.IPPROTO_IP, socket.IP_TTL), 2)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, default)
