"""
Tests for L{pilot.node.core}: the real Node on a ``task.Clock`` with fake
datagram transports (``tests.node.fakes``): the beacon's discovery, the
route watch, punch commands, registration's start, stopping.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pilot.interfaces import IBeaconListener, IFrameReceiver, IPathEvents, IRegistryLink
from pilot.machines.registration import CONNECT_TIMEOUT
from pilot.node.core import (
    DISCOVER_PROBE, DISCOVER_RETRY, OUTAGE_PROBE, REGISTER_WAIT, ROUTE_CHECK,
)
from pilot.machines.path.config import OPENER_SKEW, OPENER_STEP, OPENER_TTLS
from pilot.node.openers import PUNCH_PROBES
from pilot.wire import beacon as bw
from pilot.wire.tunnel import PILP
from tests.node.fakes import DEFAULT_TTL, Host, Network, pair

BEACON = ("198.51.100.1", 9001)


class NodeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.network = Network(self.clock)
        self.host = Host(self.network, 1, ("192.0.2.1", 4001))
        self.node = self.host.node

    def to_beacon(self) -> list[bytes]:
        return [data for _, dst, data in self.network.sent if dst == BEACON]

    def reply(self, endpoint: tuple[str, int]) -> None:
        self.host.udp.datagramReceived(bw.DiscoverReply(*endpoint).encode(), BEACON)

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IBeaconListener, self.node))
        self.assertTrue(verifyObject(IRegistryLink, self.node))
        self.assertTrue(verifyObject(IFrameReceiver, self.node.tunnels))
        self.assertTrue(verifyObject(IPathEvents, self.node.paths))

    def test_discover_repeats_until_answered(self) -> None:
        self.node.start(BEACON)
        self.assertEqual(self.to_beacon(), [bw.Discover(0).base])
        self.clock.advance(DISCOVER_RETRY)
        self.assertEqual(len(self.to_beacon()), 2)
        self.reply(("203.0.113.9", 4444))
        self.assertEqual(self.node.public_endpoint, ("203.0.113.9", 4444))
        self.assertEqual(self.node.endpoint_text(), "203.0.113.9:4444")
        self.clock.advance(DISCOVER_RETRY)
        self.assertEqual(len(self.to_beacon()), 3)  # the last retry; then only the route watch
        self.clock.advance(DISCOVER_RETRY)
        self.assertEqual(len(self.to_beacon()), 3)

    def test_registration_starts_on_the_reply(self) -> None:
        self.node.start(BEACON)
        self.assertTrue(self.node.registration.is_idle())
        self.reply(("203.0.113.9", 4444))
        self.assertFalse(self.node.registration.is_idle())
        self.assertEqual(len(self.host.connector.links), 1)
        self.assertIs(self.host.connector.links[0], self.node)

    def test_registration_starts_without_a_reply(self) -> None:
        self.node.start(BEACON)
        self.clock.advance(REGISTER_WAIT)
        self.assertFalse(self.node.registration.is_idle())
        self.assertEqual(self.node.endpoint_text(), "0.0.0.0:4001")  # the local port until the beacon answers

    def test_registry_lost_beacon_asked_often_and_its_answer_cuts_the_wait(self) -> None:
        self.node.start(BEACON)
        self.reply(("203.0.113.9", 4444))
        self.clock.advance(CONNECT_TIMEOUT)  # the connect timed out: waiting out a backoff
        self.assertTrue(self.node.registration.is_waiting())
        self.assertTrue(self.node.registration.is_lost())
        sent = len(self.to_beacon())
        for _ in range(int(DISCOVER_PROBE / ROUTE_CHECK)):
            self.clock.advance(ROUTE_CHECK)  # the registry never answers
        self.assertGreaterEqual(len(self.to_beacon()) - sent, int(DISCOVER_PROBE / OUTAGE_PROBE) - 1)
        self.clock.advance(CONNECT_TIMEOUT)
        self.assertTrue(self.node.registration.is_waiting())
        seen: list[bool] = []
        self.node.registration.server_seen = lambda: seen.append(True)  # type: ignore[method-assign]
        self.reply(("203.0.113.9", 4444))  # the same endpoint: the rendezvous answers again
        self.assertEqual(seen, [True])

    def test_route_watch(self) -> None:
        # the fake registry never answers; here it counts as slow, not lost (an outage probes
        # more often: test_registry_lost_beacon_asked_often_and_its_answer_cuts_the_wait)
        self.node.registration.is_lost = lambda: False  # type: ignore[method-assign]
        self.node.start(BEACON)
        self.reply(("203.0.113.9", 4444))
        self.clock.advance(DISCOVER_RETRY)
        sent = len(self.to_beacon())
        self.clock.advance(ROUTE_CHECK)
        self.assertEqual(self.host.route.asked, [BEACON])
        self.assertEqual(len(self.to_beacon()), sent)  # same route: nothing sent
        self.host.route.source = "192.0.2.99"
        self.clock.advance(ROUTE_CHECK)
        self.assertEqual(self.to_beacon()[-1], bw.Discover(0).base)  # moved: asked at once
        self.assertEqual(len(self.to_beacon()), sent + 1)
        for _ in range(int(DISCOVER_PROBE / ROUTE_CHECK)):
            self.clock.advance(ROUTE_CHECK)
        self.assertEqual(len(self.to_beacon()), sent + 2)  # and every DISCOVER_PROBE anyway

    def test_punch_command(self) -> None:
        """Our public endpoint is the lower one: we punch first, the first opener at once."""
        peer = ("203.0.113.7", 5555)
        self.node.start(BEACON)
        self.reply(("198.51.100.2", 4444))
        self.host.udp.datagramReceived(bw.PunchCommand(*peer).encode(), BEACON)
        sent = [data for _, dst, data in self.network.sent if dst == peer]
        self.assertEqual(sent, [PILP])  # the first opener, at once
        self.assertEqual(self.network.limited, [(peer, PILP, OPENER_TTLS[0])])
        for _ in OPENER_TTLS:
            self.clock.advance(OPENER_STEP)
        self.assertEqual(self.network.limited, [(peer, PILP, ttl) for ttl in OPENER_TTLS])
        sent = [data for _, dst, data in self.network.sent if dst == peer]
        self.assertEqual(sent[len(OPENER_TTLS):len(OPENER_TTLS) + PUNCH_PROBES], [PILP] * PUNCH_PROBES)
        self.assertEqual(self.node.paths.counters["punch_commands_unmatched"], 1)  # a stranger: our PILA
        self.assertEqual(self.host.udp.transport.socket.ttl, DEFAULT_TTL)  # the socket's TTL restored

    def test_punch_command_second(self) -> None:
        """Our public endpoint is the higher one: each opener ``OPENER_SKEW`` after the peer's,
        the punch itself at the same instant as the peer's."""
        peer = ("198.51.100.7", 5555)
        self.node.start(BEACON)
        self.reply(("203.0.113.2", 4444))
        self.host.udp.datagramReceived(bw.PunchCommand(*peer).encode(), BEACON)
        self.assertEqual([d for _, dst, d in self.network.sent if dst == peer], [])
        self.clock.advance(OPENER_SKEW)
        self.assertEqual(self.network.limited, [(peer, PILP, OPENER_TTLS[0])])
        for _ in OPENER_TTLS[1:]:
            self.clock.advance(OPENER_STEP)
        self.assertEqual(len(self.network.limited), len(OPENER_TTLS))
        self.clock.advance(OPENER_STEP - OPENER_SKEW - 0.001)
        self.assertEqual(len([d for _, dst, d in self.network.sent if dst == peer]), len(OPENER_TTLS))
        self.clock.advance(0.001)
        sent = [data for _, dst, data in self.network.sent if dst == peer]
        self.assertEqual(sent[len(OPENER_TTLS):len(OPENER_TTLS) + PUNCH_PROBES], [PILP] * PUNCH_PROBES)

    def test_local_endpoint(self) -> None:
        self.assertIsNone(self.node.local_endpoint())
        self.assertEqual(self.node.register_extra(), {})
        self.node.lan_address_learned("192.0.2.20")
        self.assertEqual(self.node.local_endpoint(), "192.0.2.20:4001")
        self.assertEqual(self.node.register_extra(), {"local_addr": "192.0.2.20:4001"})

    def test_stop_cancels_every_timer(self) -> None:
        self.node.start(BEACON)
        self.reply(("203.0.113.9", 4444))
        self.clock.advance(DISCOVER_RETRY)
        d = self.node.stop()
        self.clock.advance(60)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_registry_event_moves_a_peer(self) -> None:
        self.node.event_received({"type": "event", "event": "endpoint_changed", "node_id": 77,
                                  "real_addr": "203.0.113.77:7777"})
        self.assertEqual(self.node.peers.peer(77).endpoint, ("203.0.113.77", 7777))
        self.node.event_received({"type": "event", "event": "endpoint_changed", "node_id": "x"})
        self.assertEqual(self.node.peers.peer(77).endpoint, ("203.0.113.77", 7777))  # logged, dropped

    def test_trust_gate(self) -> None:
        network, a, b = pair(self.clock)
        self.assertTrue(a.node.is_trusted(b.node.own_id))
        self.assertEqual(a.node.pinned_key(b.node.own_id), b.identity.public_key)
        self.assertFalse(a.node.is_trusted(12345))
        self.assertEqual(a.node.pinned_key(12345), b"")
