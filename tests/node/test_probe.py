"""
Tests for L{pilot.node.probe}: the unsigned probe's interval, alone and in
the real node: behind NATs of the model (``tests.natmodel``) with timeouts
shorter and longer than the default, and on the fake network of
``tests.node.fakes`` for a change of route or of beacon.
"""

from __future__ import annotations

from typing import Optional

from twisted.trial.unittest import SynchronousTestCase

from pilot.endpoint import Endpoint
from pilot.node.core import OUTAGE_PROBE, ROUTE_CHECK
from pilot.node.probe import DISCOVER_PROBE, PROBE_STEPS, ProbeInterval
from pilot.wire import beacon as bw
from tests.natmodel import BEACON as MODEL_BEACON, PORT_RESTRICTED, PUBLIC, SYMMETRIC, ModelNode, World
from tests.node.fakes import lone_host

BEACON = ("198.51.100.1", 9001)
OTHER_BEACON = ("198.51.100.2", 9001)


class ProbeIntervalTests(SynchronousTestCase):
    def test_default(self) -> None:
        self.assertEqual(ProbeInterval().interval, DISCOVER_PROBE)
        self.assertEqual(DISCOVER_PROBE, 25.0)
        self.assertEqual(PROBE_STEPS[0], DISCOVER_PROBE)

    def test_steps_down_to_the_floor(self) -> None:
        probe = ProbeInterval()
        self.assertTrue(probe.mapping_lost(25.0))
        self.assertEqual(probe.interval, 15.0)
        self.assertTrue(probe.mapping_lost(15.0))
        self.assertEqual(probe.interval, 10.0)
        self.assertFalse(probe.mapping_lost(10.0))  # the floor
        self.assertEqual(probe.interval, 10.0)

    def test_the_step_under_the_gap(self) -> None:
        """A mapping lost within 12 s: 15 s would lose it too, so straight to 10 s."""
        probe = ProbeInterval()
        self.assertTrue(probe.mapping_lost(12.0))
        self.assertEqual(probe.interval, 10.0)

    def test_a_short_gap_changes_nothing(self) -> None:
        """A move after a few seconds' quiet is no timeout a shorter probe would prevent."""
        probe = ProbeInterval()
        self.assertFalse(probe.mapping_lost(5.0))
        self.assertEqual(probe.interval, DISCOVER_PROBE)

    def test_reset(self) -> None:
        probe = ProbeInterval()
        probe.mapping_lost(25.0)
        probe.reset("another network")
        self.assertEqual(probe.interval, DISCOVER_PROBE)


class ModelNatTests(SynchronousTestCase):
    """The real node behind a NAT of the model, 300 s at steady state."""

    def watch(self, w: World, node: ModelNode, seconds: float) -> list[Endpoint]:
        """Run ``seconds`` in route-check steps; return each new public endpoint seen."""
        moves: list[Endpoint] = []
        last: Optional[Endpoint] = node.public_endpoint
        for _ in range(round(seconds / ROUTE_CHECK)):
            w.run(ROUTE_CHECK)
            if node.public_endpoint != last:
                last = node.public_endpoint
                assert last is not None
                moves.append(last)
        return moves

    def unsigned_probes(self, w: World, node: ModelNode, since: float) -> int:
        return len([1 for t, s, dst, d in w.internet.sent
                    if t >= since and dst == MODEL_BEACON and s[0] == node.box.public_ip and d == b"\x01" + bytes(4)])

    def test_20s_nat_churns_once_then_holds(self) -> None:
        w = World()
        a = w.node(PORT_RESTRICTED, timeout=20.0)
        w.start()
        self.assertEqual(a.node.probe.interval, DISCOVER_PROBE)
        self.assertLessEqual(len(self.watch(w, a, DISCOVER_PROBE + 2 * ROUTE_CHECK)), 1)  # the first probe
        self.assertEqual(a.node.probe.interval, 15.0)
        self.assertEqual(self.watch(w, a, 300.0), [])
        self.assertTrue(a.node.registration.is_registered())
        self.assertEqual(w.beacon.endpoint_of(a.node_id), a.public_endpoint)

    def test_12s_nat_steps_twice_then_holds(self) -> None:
        w = World()
        a = w.node(SYMMETRIC, timeout=12.0)
        w.start()
        self.assertLessEqual(len(self.watch(w, a, 60.0)), 2)
        self.assertEqual(a.node.probe.interval, 10.0)
        self.assertEqual(self.watch(w, a, 300.0), [])
        self.assertTrue(a.node.registration.is_registered())

    def test_60s_nat_never_churns(self) -> None:
        w = World()
        a = w.node(PORT_RESTRICTED, timeout=60.0)
        w.start()
        start = w.clock.seconds()
        self.assertEqual(self.watch(w, a, 300.0), [])
        self.assertEqual(a.node.probe.interval, DISCOVER_PROBE)
        self.assertEqual(a.box.counters["expired"], 0)
        # one unsigned probe per interval; the model's heartbeat answers hold the beacon's endpoint
        self.assertEqual(self.unsigned_probes(w, a, start), int(300 // DISCOVER_PROBE))

    def test_no_nat_keeps_the_default(self) -> None:
        """Behind no NAT the endpoint never moves: the default interval, never shorter."""
        w = World()
        a = w.node(PUBLIC)
        w.start()
        self.assertEqual(self.watch(w, a, 300.0), [])
        self.assertTrue(a.node.behind_no_nat())
        self.assertEqual(a.node.probe.interval, DISCOVER_PROBE)

    def test_a_nat_reboot_after_a_short_quiet_changes_nothing(self) -> None:
        """Rebound a few seconds after a probe: no timeout a shorter probe would have prevented."""
        w = World()
        a = w.node(PORT_RESTRICTED, timeout=60.0)
        w.start()
        self.watch(w, a, 2.0)
        a.box.rebind()
        a.discover()  # asked soon after the last Discover: the answer moves
        self.assertEqual(len(self.watch(w, a, 2.0)), 1)
        self.assertEqual(a.node.probe.interval, DISCOVER_PROBE)


class NetworkChangeTests(SynchronousTestCase):
    """The shorter interval holds for this network: a new route source or beacon resets it."""

    def setUp(self) -> None:
        self.clock, self.network, self.host = lone_host()
        self.node = self.host.node
        self.node.registration.is_lost = lambda: False  # type: ignore[method-assign]
        self.node.start(BEACON, OTHER_BEACON)
        self.reply(("203.0.113.9", 4444))
        self.advance(ROUTE_CHECK * 2)  # the route watch has seen our source

    def reply(self, endpoint: Endpoint, beacon: Endpoint = BEACON) -> None:
        self.host.udp.datagramReceived(bw.DiscoverReply(*endpoint).encode(), beacon)

    def advance(self, seconds: float) -> None:
        for _ in range(round(seconds / ROUTE_CHECK)):
            self.clock.advance(ROUTE_CHECK)

    def to_beacon(self) -> int:
        return len([dst for _, dst, _ in self.network.sent if dst == BEACON])

    def shorten(self) -> None:
        """The probe after a whole interval's quiet finds another endpoint: the NAT forgot us."""
        self.reply(("203.0.113.9", 4444))  # the answer to the last retry
        sent = self.to_beacon()
        self.advance(DISCOVER_PROBE)
        self.assertEqual(self.to_beacon(), sent + 1)
        self.reply(("203.0.113.9", 5555))
        self.assertEqual(self.node.probe.interval, 15.0)

    def test_shorter_interval_is_used(self) -> None:
        self.shorten()
        sent = self.to_beacon()
        self.advance(15.0 * 4)
        self.assertEqual(self.to_beacon(), sent + 4)

    def test_route_change_resets(self) -> None:
        self.shorten()
        self.host.route.source = "192.0.2.99"
        self.advance(ROUTE_CHECK)
        self.assertEqual(self.node.probe.interval, DISCOVER_PROBE)
        self.reply(("198.51.100.50", 6000))  # another network, another endpoint: not the NAT forgetting us
        self.assertEqual(self.node.probe.interval, DISCOVER_PROBE)

    def test_beacon_change_resets(self) -> None:
        self.shorten()
        self.node._server_changed(1)
        self.assertEqual(self.node.beacon_addr, OTHER_BEACON)
        self.assertEqual(self.node.probe.interval, DISCOVER_PROBE)
        self.advance(DISCOVER_PROBE)
        self.reply(("203.0.113.9", 7777), OTHER_BEACON)  # another beacon sees another mapping
        self.assertEqual(self.node.probe.interval, DISCOVER_PROBE)

    def test_outage_probe_as_before(self) -> None:
        """While the registry is lost the beacon is asked every ``OUTAGE_PROBE``, whatever the interval."""
        self.shorten()
        self.node.registration.is_lost = lambda: True  # type: ignore[method-assign]
        sent = self.to_beacon()
        self.advance(OUTAGE_PROBE * 5)
        self.assertEqual(self.to_beacon(), sent + 5)
