"""
Tests for L{pilot.protocols.tunnel}: the node's DatagramProtocol decodes
beacon messages for the node and hands tunnel frames to the tunnel layer.
"""

from __future__ import annotations

import errno
from typing import Any, Optional

from twisted.internet.error import MessageLengthError
from twisted.internet.testing import FakeDatagramTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pilot.interfaces import DatagramTooBig, IBeaconListener, IDatagramSender, IFrameReceiver
from pilot.protocols.tunnel import NodeDatagramProtocol
from pilot.wire import beacon as bw

BEACON = ("198.51.100.1", 9001)
PEER = ("203.0.113.5", 4000)


@implementer(IBeaconListener, IFrameReceiver)
class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def is_beacon(self, source: tuple[str, int]) -> bool:
        return source == BEACON

    def discovered(self, observed: tuple[str, int]) -> None:
        self.events.append(("discovered", observed))

    def punch_commanded(self, peer: tuple[str, int]) -> None:
        self.events.append(("punch_commanded", peer))

    def frame_received(self, data: Any, source: tuple[str, int], via_relay: bool = False,
                       relay_sender: Optional[int] = None) -> None:
        self.events.append(("frame_received", data, source, via_relay, relay_sender))


class Failing(FakeDatagramTransport):
    def write(self, packet: bytes, addr: Any = FakeDatagramTransport.noAddr) -> None:
        raise OSError("network unreachable")


class TooBig(FakeDatagramTransport):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def write(self, packet: bytes, addr: Any = FakeDatagramTransport.noAddr) -> None:
        raise self.error


class NodeDatagramProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.recorder = Recorder()
        self.protocol = NodeDatagramProtocol()
        self.transport = FakeDatagramTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.wire(beacon=self.recorder, frames=self.recorder)

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IDatagramSender, self.protocol))

    def test_tunnel_frame_goes_to_the_tunnels(self) -> None:
        self.protocol.datagramReceived(b"PILS...", PEER)
        self.assertEqual(self.recorder.events, [("frame_received", b"PILS...", PEER, False, None)])

    def test_discover_reply(self) -> None:
        self.protocol.datagramReceived(bw.DiscoverReply("203.0.113.9", 4444).encode(), BEACON)
        self.assertEqual(self.recorder.events, [("discovered", ("203.0.113.9", 4444))])

    def test_punch_command(self) -> None:
        self.protocol.datagramReceived(bw.PunchCommand("203.0.113.7", 5555).encode(), BEACON)
        self.assertEqual(self.recorder.events, [("punch_commanded", ("203.0.113.7", 5555))])

    def test_relay_deliver_unwrapped(self) -> None:
        self.protocol.datagramReceived(bw.RelayDeliver(7, b"PILS-frame").encode(), BEACON)
        self.assertEqual(self.recorder.events, [("frame_received", b"PILS-frame", BEACON, True, 7)])

    def test_only_the_beacon_steers(self) -> None:
        self.protocol.datagramReceived(bw.DiscoverReply("203.0.113.9", 4444).encode(), PEER)
        self.assertEqual(self.recorder.events, [])
        self.assertEqual(self.protocol.counters, {"beacon_not_from_beacon": 1})

    def test_malformed_beacon_message(self) -> None:
        self.protocol.datagramReceived(b"\x02", BEACON)
        self.assertEqual(self.recorder.events, [])
        self.assertEqual(self.protocol.counters, {"beacon_malformed": 1})

    def test_datagrams_of_one_buffer(self) -> None:
        """datagramsReceived (a GRO buffer's pieces): each as datagramReceived would take it, in order;
        one that raises is logged and the rest still go."""
        self.protocol.datagramsReceived([b"PILS1", bw.DiscoverReply("203.0.113.9", 4444).encode(), b"PILS2"],
                                        BEACON)
        self.assertEqual(self.recorder.events, [("frame_received", b"PILS1", BEACON, False, None),
                                                ("discovered", ("203.0.113.9", 4444)),
                                                ("frame_received", b"PILS2", BEACON, False, None)])
        self.recorder.events.clear()
        self.protocol.datagramsReceived([b"PILS3", b"\x02", b"PILS4"], ("203.0.113.5", 4000, 0, 0))
        self.assertEqual(self.recorder.events, [("frame_received", b"PILS3", PEER, False, None),
                                                ("frame_received", b"PILS4", PEER, False, None)])
        self.assertEqual(self.protocol.counters, {"beacon_not_from_beacon": 1})
        failing = self.recorder.frame_received

        def frame_received(data: Any, source: Any, via_relay: bool = False, relay_sender: Any = None) -> None:
            failing(data, source, via_relay, relay_sender)
            if data == b"PILS5":
                raise ValueError("boom")
        self.recorder.frame_received = frame_received  # type: ignore[method-assign]
        self.recorder.events.clear()
        self.protocol.datagramsReceived([b"PILS5", b"PILS6"], PEER)
        self.assertEqual([e[1] for e in self.recorder.events], [b"PILS5", b"PILS6"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_unwired_drops_a_buffer(self) -> None:
        protocol = NodeDatagramProtocol()
        protocol.datagramsReceived([b"PILS", b"PILS"], PEER)
        self.assertEqual(protocol.counters, {"not_wired": 2})

    def test_unwired_drops(self) -> None:
        protocol = NodeDatagramProtocol()
        protocol.datagramReceived(b"PILS", PEER)
        self.assertEqual(protocol.counters, {"not_wired": 1})

    def test_send_and_local_port(self) -> None:
        self.protocol.send(b"x", PEER)
        self.assertEqual(self.transport.written, [(b"x", PEER)])

    def test_send_errors_are_counted(self) -> None:
        protocol = NodeDatagramProtocol()
        protocol.makeConnection(Failing())
        protocol.send(b"x", PEER)
        self.assertEqual(protocol.counters, {"send_error": 1})

    def test_too_big_is_a_signal_not_a_crash(self) -> None:
        """EMSGSIZE (Twisted's MessageLengthError, or a bare OSError) becomes DatagramTooBig."""
        for error in (MessageLengthError("message too long"), OSError(errno.EMSGSIZE, "too long")):
            protocol = NodeDatagramProtocol()
            protocol.makeConnection(TooBig(error))
            self.assertRaises(DatagramTooBig, protocol.send, b"x" * 5000, PEER)
            self.assertEqual(protocol.counters, {"too_big": 1})

    def test_send_before_start_is_dropped(self) -> None:
        protocol = NodeDatagramProtocol()
        protocol.send(b"x", PEER)
        self.assertEqual(protocol.local_port(), 0)


class RecordingSocket:
    """What a udp.Port's ``socket`` does for ``sendto``: records, or raises ``error``."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []
        self.error: Optional[OSError] = None

    def sendto(self, data: bytes, addr: Any) -> int:
        if self.error is not None:
            raise self.error
        self.sent.append((data, addr))
        return len(data)


class WithSocket(FakeDatagramTransport):
    def __init__(self) -> None:
        super().__init__()
        self.socket = RecordingSocket()


class DirectSendTests(SynchronousTestCase):
    """An endpoint the port's write() accepted once goes straight to the socket after that."""

    def setUp(self) -> None:
        self.protocol = NodeDatagramProtocol()
        self.transport = WithSocket()
        self.protocol.makeConnection(self.transport)

    def test_first_through_write_then_the_socket(self) -> None:
        self.protocol.send(b"1", PEER)
        self.protocol.send(b"2", PEER)
        self.protocol.send(b"3", BEACON)
        self.assertEqual(self.transport.written, [(b"1", PEER), (b"3", BEACON)])
        self.assertEqual(self.transport.socket.sent, [(b"2", PEER)])

    def test_too_big_on_the_socket(self) -> None:
        self.protocol.send(b"1", PEER)
        self.transport.socket.error = OSError(errno.EMSGSIZE, "too long")
        self.assertRaises(DatagramTooBig, self.protocol.send, b"x" * 5000, PEER)
        self.assertEqual(self.protocol.counters, {"too_big": 1})

    def test_errors_on_the_socket(self) -> None:
        self.protocol.send(b"1", PEER)
        self.transport.socket.error = OSError(errno.ENETUNREACH, "unreachable")
        self.protocol.send(b"2", PEER)
        self.transport.socket.error = OSError(errno.ECONNREFUSED, "refused")
        self.protocol.send(b"3", PEER)  # ignored, as the port's write() ignores it
        self.assertEqual(self.protocol.counters, {"send_error": 1})

    def test_full_buffer_falls_back_to_write(self) -> None:
        self.protocol.send(b"1", PEER)
        self.transport.socket.error = OSError(errno.EAGAIN, "again")
        self.protocol.send(b"2", PEER)
        self.assertEqual(self.transport.written, [(b"1", PEER), (b"2", PEER)])

    def test_without_a_socket_always_write(self) -> None:
        protocol = NodeDatagramProtocol()
        transport = FakeDatagramTransport()
        protocol.makeConnection(transport)
        protocol.send(b"1", PEER)
        protocol.send(b"2", PEER)
        self.assertEqual(transport.written, [(b"1", PEER), (b"2", PEER)])
