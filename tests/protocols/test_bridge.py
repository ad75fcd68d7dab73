"""
The raw-stream bridge (pilot.protocols.bridge, docs/control.md) on its own: a
StreamBridge on a StringTransport relaying to a Dummy IStreamRelay that
records its calls, and HeldStreams on a Clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from pilot.protocols.bridge import MAX_UNATTACHED_BUFFER, HeldStreams, IStreamRelay, StreamBridge
from pilot.protocols.control_server import ControlProtocol, ControlServerFactory

from tests.protocols.test_control_server import FakeAPI


@implementer(IStreamRelay)
class DummyRelay:
    """Records ``(method, args)`` for every call."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def stream_data(self, data: bytes) -> None:
        self.events.append(("stream_data", data))

    def stream_lost(self) -> None:
        self.events.append(("stream_lost", None))

    def pause_reading(self, reason: str) -> None:
        self.events.append(("pause_reading", reason))

    def resume_reading(self, reason: str) -> None:
        self.events.append(("resume_reading", reason))


def connected() -> tuple[StreamBridge, StringTransport]:
    bridge = StreamBridge()
    transport = StringTransport()
    bridge.makeConnection(transport)
    return bridge, transport


class StreamBridgeTests(SynchronousTestCase):
    def test_control_protocol_is_a_relay(self) -> None:
        """The control connection is what the bridge relays to, by interface, not by import."""
        factory = ControlServerFactory(FakeAPI(), Clock())
        self.assertTrue(verifyObject(IStreamRelay, ControlProtocol(factory)))

    def test_buffered_until_attached(self) -> None:
        bridge, _ = connected()
        bridge.dataReceived(b"early ")
        bridge.dataReceived(b"bytes")
        relay = DummyRelay()
        bridge.attach(relay)
        bridge.dataReceived(b"!")
        self.assertEqual(relay.events[:2], [("stream_data", b"early "), ("stream_data", b"bytes")])
        self.assertEqual(relay.events[-1], ("stream_data", b"!"))

    def test_pilot_side_paused_past_the_buffer(self) -> None:
        bridge, transport = connected()
        bridge.dataReceived(b"x" * (MAX_UNATTACHED_BUFFER + 1))
        self.assertEqual(transport.producerState, "paused")
        bridge.attach(DummyRelay())
        self.assertEqual(transport.producerState, "producing")

    def test_close_seen_before_attach_is_passed_on(self) -> None:
        bridge, _ = connected()
        bridge.connectionLost()
        relay = DummyRelay()
        bridge.attach(relay)
        self.assertEqual(relay.events, [("stream_lost", None)])

    def test_writes_before_connected_go_out_on_connect(self) -> None:
        bridge = StreamBridge()
        bridge.write(b"hello")
        transport = StringTransport()
        bridge.makeConnection(transport)
        self.assertEqual(transport.value(), b"hello")

    def test_close(self) -> None:
        bridge, transport = connected()
        bridge.close()
        bridge.write(b"late")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")


class HeldStreamsTests(SynchronousTestCase):
    def test_take_once(self) -> None:
        held = HeldStreams(Clock(), 10.0)
        bridge, _ = connected()
        conn_id = held.hold(bridge)
        self.assertEqual(held.ids, [conn_id])
        self.assertIs(held.take(conn_id), bridge)
        self.assertIsNone(held.take(conn_id))
        self.assertEqual(held.ids, [])

    def test_expires(self) -> None:
        clock = Clock()
        held = HeldStreams(clock, 10.0)
        bridge, transport = connected()
        conn_id = held.hold(bridge)
        clock.advance(9.9)
        self.assertEqual(held.ids, [conn_id])
        clock.advance(0.1)
        self.assertEqual(held.ids, [])
        self.assertTrue(transport.disconnecting)

    def test_ids_differ_and_close_all(self) -> None:
        clock = Clock()
        held = HeldStreams(clock, 10.0)
        pairs = [connected() for _ in range(3)]
        ids = [held.hold(bridge) for bridge, _ in pairs]
        self.assertEqual(len(set(ids)), 3)
        held.close_all()
        self.assertEqual((held.ids, clock.getDelayedCalls()), ([], []))
        self.assertTrue(all(transport.disconnecting for _, transport in pairs))
