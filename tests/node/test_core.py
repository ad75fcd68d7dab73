"""
Tests for L{pilot.node.core}: the real Node on a ``task.Clock`` with fake
datagram transports (``tests.node.fakes``): the beacon's discovery, the
route watch, punch commands, registration's start, stopping.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from pilot.interfaces import IBeaconListener, IFrameReceiver, IPathEvents, IRegistryLink
from pilot.machines.registration import CONNECT_TIMEOUT
from pilot.node.core import DISCOVER_RETRY, OUTAGE_PROBE, REGISTER_WAIT, ROUTE_CHECK
from pilot.node.probe import DISCOVER_PROBE
from pilot.machines.path.config import OPENER_SKEW, OPENER_STEP, OPENER_TTLS
from pilot.node.openers import PUNCH_PROBES
from pilot.wire import beacon as bw
from pilot.wire.tunnel import PILP
from tests.natmodel import DISCOVER_INTERVAL
from tests.node.fakes import DEFAULT_TTL, lone_host, pair

BEACON = ("198.51.100.1", 9001)


class NodeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock, self.network, self.host = lone_host()
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


class ProbeTimerTests(SynchronousTestCase):
    """Any Discover, signed or not, restarts the unsigned probe's ``DISCOVER_PROBE`` wait."""

    def setUp(self) -> None:
        self.clock, self.network, self.host = lone_host()
        self.node = self.host.node
        self.node.registration.is_lost = lambda: False  # type: ignore[method-assign]
        self.node.start(BEACON)
        self.host.udp.datagramReceived(bw.DiscoverReply("203.0.113.9", 4444).encode(), BEACON)
        self.clock.advance(DISCOVER_RETRY)  # the last retry: from here only the probe

    def to_beacon(self) -> int:
        return len([dst for _, dst, _ in self.network.sent if dst == BEACON])

    def advance_to(self, seconds: float) -> int:
        """Advance in route-check steps for ``seconds``; return the Discovers sent meanwhile."""
        before = self.to_beacon()
        for _ in range(round(seconds / ROUTE_CHECK)):
            self.clock.advance(ROUTE_CHECK)
        return self.to_beacon() - before

    def test_steady_probe(self) -> None:
        self.assertEqual(self.advance_to(DISCOVER_PROBE * 4), 4)

    def test_any_discover_restarts_the_wait(self) -> None:
        self.advance_to(DISCOVER_PROBE - 2 * ROUTE_CHECK)
        self.node.discover()  # unsigned (not registered): the probe waits a whole period again
        self.assertEqual(self.advance_to(DISCOVER_PROBE - ROUTE_CHECK), 0)
        self.assertEqual(self.advance_to(ROUTE_CHECK), 1)


class HeartbeatDiscoverTests(SynchronousTestCase):
    """
    A real registry and beacon (``tests.natmodel``): the signed Discover goes
    only where the heartbeat's answer says the beacon holds no endpoint for
    the node, or another one (docs/registration.md).
    """

    def setUp(self) -> None:
        from tests.natmodel import FULL_CONE, World
        self.w = World()
        self.a = self.w.node(FULL_CONE)
        self.w.start()  # registered, its endpoint proved by a signed Discover

    def sent(self, since: float) -> list[tuple[float, int]]:
        """(time, size) of the Discovers the node sent to the beacon since ``since``: 85 bytes signed, 5 not."""
        from tests.natmodel import BEACON as MODEL_BEACON
        return [(t, len(d)) for t, s, dst, d in self.w.internet.sent
                if t >= since and dst == MODEL_BEACON and s[0] == self.a.box.public_ip and d[:1] == b"\x01"]

    def discovers(self, since: float) -> tuple[int, int]:
        """(signed, unsigned) Discovers the node sent to the beacon since ``since``."""
        sizes = [size for _, size in self.sent(since)]
        return sizes.count(85), sizes.count(5)

    def heartbeats(self, n: int) -> float:
        start = self.w.clock.seconds()
        self.w.run(DISCOVER_INTERVAL * n)  # the model's heartbeat
        return start

    def test_matching_endpoint_no_signed_discover(self) -> None:
        start = self.heartbeats(8)  # 200 s
        held = self.w.beacon.endpoint_of(self.a.node_id)
        self.assertEqual(held, self.a.public_endpoint)
        signed, unsigned = self.discovers(start)
        self.assertEqual(signed, 0)
        self.assertEqual(unsigned, int(DISCOVER_INTERVAL * 8 / DISCOVER_PROBE))  # the probe alone
        self.assertTrue(self.a.node.registration.is_registered())

    def test_missing_record_proved_within_one_heartbeat(self) -> None:
        """A restarted beacon holds nothing: the next heartbeat's answer says so, the node proves it."""
        from pilot.server.beacon import Beacon
        self.w.beacon = Beacon(self.w.registry, self.w.clock)
        self.w.registry.beacon_endpoint = self.w.beacon.endpoint_text
        start = self.heartbeats(1)
        self.assertEqual(self.discovers(start)[0], 1)
        self.assertEqual(self.w.beacon.endpoint_of(self.a.node_id), self.a.public_endpoint)
        later = self.heartbeats(2)
        self.assertEqual(self.discovers(later)[0], 0)

    def test_signed_discover_restarts_the_probe(self) -> None:
        """The signed Discover counts as the probe: the next unsigned one comes a whole period later."""
        self.w.registry.beacon_endpoint = lambda node_id: None  # every heartbeat sends a signed one
        start = self.heartbeats(4)
        sent = self.sent(start)
        signed = [t for t, size in sent if size == 85]
        self.assertEqual(len(signed), 4)
        for t in signed:
            after = [u for u, size in sent if size == 5 and u > t]
            if after:
                self.assertGreaterEqual(after[0] - t, DISCOVER_PROBE)
                self.assertLess(after[0] - t, DISCOVER_PROBE + ROUTE_CHECK)

    def test_other_endpoint_proved_again(self) -> None:
        """The beacon holds another endpoint (a proof from elsewhere): the next heartbeat corrects it."""
        from pilot.wire.beacon import Discover, with_proof
        elsewhere = ("192.0.2.200", 7000)
        proof = with_proof(Discover(self.a.node_id).encode(), self.a.identity.sign,
                           int(self.w.clock.seconds() * 1000), b"elsewher")
        self.w.beacon.datagram_received(proof, elsewhere)
        self.assertEqual(self.w.beacon.endpoint_of(self.a.node_id), elsewhere)
        start = self.heartbeats(1)
        self.assertEqual(self.discovers(start)[0], 1)
        self.assertEqual(self.w.beacon.endpoint_of(self.a.node_id), self.a.public_endpoint)

    def test_reference_registry_reply_sends_signed_discover(self) -> None:
        """A reply without the field (a reference registry never sends it): signed after each heartbeat."""
        self.w.registry.beacon_endpoint = lambda node_id: None
        start = self.heartbeats(3)
        self.assertEqual(self.discovers(start)[0], 3)


class SilentRendezvousTests(SynchronousTestCase):
    """
    The rendezvous dies without closing our connection (its host lost): the
    beacon stops answering, and the unanswered probe makes the node heartbeat
    at once, so the dead registry is found long before the next heartbeat.
    """

    def test_found_within_a_probe_and_a_request_timeout(self) -> None:
        from twisted.internet.defer import Deferred

        from pilot.machines.registration import HEARTBEAT_INTERVAL, REQUEST_TIMEOUT
        from pilot.node.core import PROBE_ANSWER_WAIT
        from tests.natmodel import BEACON as MODEL_BEACON, FULL_CONE, World
        w = World(discover_interval=HEARTBEAT_INTERVAL)
        a = w.node(FULL_CONE)
        w.start()
        w.run(HEARTBEAT_INTERVAL / 2)
        died = w.clock.seconds()
        del w.internet.hosts[MODEL_BEACON[0]]  # nothing answers at the rendezvous's address
        for connection in a.connector.connections:
            connection.request = lambda msg: Deferred()  # type: ignore[method-assign]
        bound = DISCOVER_PROBE + PROBE_ANSWER_WAIT + ROUTE_CHECK + REQUEST_TIMEOUT + 1
        self.assertTrue(w.run_until(died + bound, lambda: not a.node.registration.is_registered()))
        self.assertLess(w.clock.seconds() - died, HEARTBEAT_INTERVAL)

    def test_one_lost_probe_costs_one_heartbeat(self) -> None:
        """A probe lost on the way (the beacon alive): one early heartbeat, answered; nothing else."""
        from tests.natmodel import FULL_CONE, World
        w = World()
        a = w.node(FULL_CONE)
        w.start()
        beats = []
        a.node.registration.check_now = lambda: beats.append(w.clock.seconds())  # type: ignore[method-assign]
        a.box.blocked.add("198.51.100.1")  # the next probe is lost ...
        w.run(DISCOVER_PROBE + ROUTE_CHECK)
        a.box.blocked.discard("198.51.100.1")  # ... and the one after it answered
        w.run(DISCOVER_PROBE * 3)
        self.assertEqual(len(beats), 1)
        self.assertTrue(a.node.registration.is_registered())
