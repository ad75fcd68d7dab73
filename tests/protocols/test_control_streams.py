"""
The control socket's raw mode writes what a reactor pass delivered from the
Pilot stream in one write at the end of the pass (``Clock.advance(0)``):
order kept, the connect reply still at once, flow control unchanged.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pilot.protocols.bridge import StreamBridge
from pilot.protocols.control_server import ControlProtocol
from tests.protocols.test_control_server import Harness, PilotTransport, frames, request


class CountingTransport(StringTransport):
    """A Unix transport that records each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class CoalescingTests(SynchronousTestCase):
    def open(self) -> tuple[Harness, ControlProtocol, CountingTransport, StreamBridge, PilotTransport]:
        h = Harness()
        proto = h.factory.buildProtocol(None)
        unix = CountingTransport()
        proto.makeConnection(unix)
        d: Deferred[Any] = Deferred()
        h.api.answers["connect"] = d
        h.send(request(1, "connect", target="sensor-1", port=1000), proto)
        (bridge,) = h.api.protocols
        pilot = PilotTransport()
        bridge.makeConnection(pilot)
        d.callback({"conn_id": 3})
        # the reply leaves in the pass that made it, before any end of pass
        self.assertEqual(frames(unix.value())[0], [{"id": 1, "ok": True, "result": {"conn_id": 3}}])
        unix.clear()
        unix.writes.clear()
        return h, proto, unix, bridge, pilot

    def test_one_write_per_pass_in_order(self) -> None:
        h, proto, unix, bridge, pilot = self.open()
        for chunk in (b"one ", b"two ", b"three"):
            bridge.dataReceived(chunk)
        self.assertEqual(unix.writes, [])
        h.clock.advance(0)
        self.assertEqual(unix.writes, [b"one two three"])
        bridge.dataReceived(b" four")
        h.clock.advance(0)
        self.assertEqual(unix.writes, [b"one two three", b" four"])
        h.clock.advance(0)
        self.assertEqual(len(unix.writes), 2)  # nothing delivered, nothing written
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_pause_and_resume_between_deliveries(self) -> None:
        h, proto, unix, bridge, pilot = self.open()
        throttle: Any = unix.producer  # the bridge's Throttle
        self.assertIsNotNone(throttle)
        bridge.dataReceived(b"a")
        throttle.pauseProducing()  # the Unix socket is full: the Pilot side stops, as before
        self.assertEqual(pilot.producerState, "paused")
        bridge.dataReceived(b"b")  # already in the pass
        throttle.resumeProducing()
        self.assertEqual(pilot.producerState, "producing")
        bridge.dataReceived(b"c")
        h.clock.advance(0)
        self.assertEqual(unix.writes, [b"abc"])

    def test_close_sends_the_pass_first(self) -> None:
        h, proto, unix, bridge, pilot = self.open()
        bridge.dataReceived(b"last ")
        bridge.dataReceived(b"bytes")
        bridge.connectionLost()
        self.assertEqual(unix.writes, [b"last bytes"])
        self.assertTrue(unix.disconnecting)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_lost_connection_drops_the_pass(self) -> None:
        h, proto, unix, bridge, pilot = self.open()
        bridge.dataReceived(b"nobody to read")
        proto.connectionLost()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.clock.advance(0)
        self.assertEqual(unix.writes, [])
        self.assertTrue(pilot.disconnecting)

    def test_echo_in_one_pass(self) -> None:
        """Bytes from the client and the peer's reply in the same pass: the reply leaves at its end."""
        h, proto, unix, bridge, pilot = self.open()
        proto.dataReceived(b"ping")
        self.assertEqual(pilot.value(), b"ping")
        bridge.dataReceived(b"pong")
        h.clock.advance(0)
        self.assertEqual(unix.value(), b"pong")
