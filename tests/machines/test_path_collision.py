"""
The conntrack collision (``docs/nat.md``): a Linux router whose INPUT chain
accepts what reaches it keeps an UNREPLIED entry for an unsolicited datagram,
and its host's later flow to that sender leaves from another port.  The NAT
model of ``tests.natmodel`` has it (``local_delivery``); these tests show it
and what the path machine does about it, in model time.
"""

from __future__ import annotations

import itertools

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.machines.path import PathConfig
from pilot.services.api import _path_fields
from pilot.node import core
from tests.machines.test_path import TARGET, expected_back, expected_path
from tests.natmodel import (
    BEACON, FIREWALL, KINDS, LATENCY, PORT_RESTRICTED, Internet, ModelNode, NatBox, World,
)

PEER = ("203.0.113.9", 7000)


class NatBoxCollisionTests(SynchronousTestCase):
    """The model's router on its own."""

    def box(self, local_delivery: bool) -> tuple[NatBox, list[tuple[tuple[str, int], tuple[str, int]]]]:
        internet = Internet(Clock())
        seen: list[tuple[tuple[str, int], tuple[str, int]]] = []
        internet.attach(PEER[0], lambda data, src, dst, ttl: seen.append((src, dst)))
        internet.attach(BEACON[0], lambda data, src, dst, ttl: seen.append((src, dst)))
        return NatBox(internet, PORT_RESTRICTED, "203.0.113.1", local_delivery=local_delivery), seen

    def test_unsolicited_datagram_moves_the_next_flow(self) -> None:
        box, seen = self.box(local_delivery=True)
        box.outbound(b"discover", BEACON)
        port = box.public_endpoint()[1]  # type: ignore[index]
        box.inbound(b"punch", PEER, ("203.0.113.1", port))  # before our host sent to PEER
        self.assertEqual(box.counters["delivered_locally"], 1)
        box.outbound(b"answer", PEER)
        box.internet.clock.advance(LATENCY)
        self.assertEqual(box.counters["collision"], 1)
        [src] = [s for s, d in seen if d == PEER]
        self.assertNotEqual(src[1], port)  # no longer endpoint-independent for PEER
        # what PEER sends to the old port still ends at the router, refreshing the entry
        box.inbound(b"punch", PEER, ("203.0.113.1", port))
        self.assertEqual(box.counters["delivered_locally"], 2)
        # what PEER sends to the new port reaches the host
        got: list[bytes] = []
        box.host = lambda data, src: got.append(data)
        box.inbound(b"reply", PEER, ("203.0.113.1", src[1]))
        self.assertEqual(got, [b"reply"])

    def test_the_entry_expires(self) -> None:
        box, seen = self.box(local_delivery=True)
        box.outbound(b"discover", BEACON)
        port = box.public_endpoint()[1]  # type: ignore[index]
        box.inbound(b"punch", PEER, ("203.0.113.1", port))
        box.internet.clock.advance(box.timeout / 2)
        box.outbound(b"discover", BEACON)  # keeps the mapping
        box.internet.clock.advance(box.timeout / 2)
        box.outbound(b"answer", PEER)
        box.internet.clock.advance(LATENCY)
        self.assertEqual(box.counters["collision"], 0)
        self.assertEqual([s[1] for s, d in seen if d == PEER], [port])

    def test_an_input_filter_leaves_nothing(self) -> None:
        box, seen = self.box(local_delivery=False)
        box.outbound(b"discover", BEACON)
        port = box.public_endpoint()[1]  # type: ignore[index]
        box.inbound(b"punch", PEER, ("203.0.113.1", port))
        box.outbound(b"answer", PEER)
        box.internet.clock.advance(LATENCY)
        self.assertEqual((box.counters["delivered_locally"], box.counters["collision"]), (0, 0))
        self.assertEqual([s[1] for s, d in seen if d == PEER], [port])

    def test_our_flow_first_is_not_moved(self) -> None:
        box, seen = self.box(local_delivery=True)
        box.outbound(b"punch", PEER)
        port = box.public_endpoint()[1]  # type: ignore[index]
        got: list[bytes] = []
        box.host = lambda data, src: got.append(data)
        box.inbound(b"punch", PEER, ("203.0.113.1", port))
        box.outbound(b"more", PEER)
        self.assertEqual((got, box.counters["collision"]), ([b"punch"], 0))


def pinger(w: World, a: ModelNode, b: ModelNode, every: float = 1.0) -> None:
    """``a`` sends ``b`` a packet every ``every`` s; ``b`` echoes."""
    b.echo = True
    seq = itertools.count(1000)

    def tick() -> None:
        a.send(b, next(seq))
        w.clock.callLater(every, tick)

    tick()


def pair(local_delivery: bool = True,
         config: PathConfig = PathConfig()) -> tuple[World, ModelNode, ModelNode]:
    """Two hosts behind EIM routers (MASQUERADE) without an INPUT filter, as Docker hosts are, a
    router between them (every internet path has some).  ``a``'s public address is the lower one:
    it punches first."""
    w = World(hops=1)
    a = w.node(PORT_RESTRICTED, local_delivery=local_delivery, config=config)
    b = w.node(PORT_RESTRICTED, local_delivery=local_delivery, config=config)
    w.start()
    return w, a, b


def reason(node: ModelNode, peer: ModelNode) -> object:
    return (node.paths.status(peer.node_id) or {}).get("reason")


def in_order(node: ModelNode, peer: ModelNode) -> list[int]:
    """The sequence numbers ``node`` got from ``peer``, as delivered."""
    return [p.seq for _, p, src in node.delivered if src == peer.node_id and p.payload != b"echo"]


class CollisionScenarioTests(SynchronousTestCase):
    def test_direct_first_contact_poisons_the_peer_router(self) -> None:
        """Issue 10 as it was (and as a reference node still does): ``a``'s first PILAs reach
        ``b``'s router before ``b`` sends; ``b``'s mapping moves; relayed for good."""
        w, a, b = pair(config=PathConfig(punch_first=False, collision_quiet=8.0))
        pinger(w, a, b)
        w.run(120)
        self.assertGreater(b.box.counters["collision"], 0)
        self.assertEqual((a.state(b), b.state(a)), ("relayed", "relayed"))

    def check_punched(self, w: World, a: ModelNode, b: ModelNode, t0: float) -> None:
        self.assertTrue(w.run_until(t0 + 1, lambda: a.state(b) == b.state(a) == "punched"),
                        (a.state(b), b.state(a)))
        w.run(0.5)
        self.assertEqual(a.box.counters["collision"] + b.box.counters["collision"], 0)
        self.assertEqual(a.box.counters["delivered_locally"] + b.box.counters["delivered_locally"], 0)

    def test_a_first(self) -> None:
        w, a, b = pair()
        t0 = w.now()
        a.send(b, 1)
        self.check_punched(w, a, b, t0)
        # a beacon round trip, the openers' ramp and a peer round trip
        self.assertLess(b.received(1)[0] - t0, 0.5)

    def test_b_first(self) -> None:
        w, a, b = pair()
        t0 = w.now()
        b.send(a, 1)
        self.check_punched(w, a, b, t0)

    def test_both_at_once(self) -> None:
        w, a, b = pair()
        t0 = w.now()
        a.send(b, 1)
        b.send(a, 2)
        self.check_punched(w, a, b, t0)
        self.assertEqual((len(b.received(1)), len(a.received(2))), (1, 1))

    def test_commands_a_little_apart(self) -> None:
        """The race: ``b``'s command comes later, by less than a datagram takes from ``a`` to ``b``."""
        w, a, b = pair()
        w.internet.extra[(BEACON[0], b.box.public_ip)] = LATENCY * 0.9
        t0 = w.now()
        a.send(b, 1)
        self.check_punched(w, a, b, t0)

    def near_pair(self, hops: int, config: PathConfig = PathConfig()) -> tuple[World, ModelNode, ModelNode]:
        """
        Two open-INPUT EIM routers 0.1 ms apart (the lab's veths) with ``hops`` transit routers
        between them, and ``b``'s command 1 ms after ``a``'s (one node a little slower to act):
        longer than a datagram takes from router to router, so without openers ``a``'s first
        datagram reaches ``b``'s router before ``b`` sent anything.
        """
        w = World(latency=0.0001, hops=hops)
        a = w.node(PORT_RESTRICTED, local_delivery=True, config=config)
        b = w.node(PORT_RESTRICTED, local_delivery=True, config=config)
        w.start()
        w.internet.extra[(BEACON[0], b.box.public_ip)] = 0.001
        return w, a, b

    def test_without_openers_the_faster_side_poisons_the_other(self) -> None:
        """The control: no openers (the reference's punch): ``b``'s router collides."""
        w, a, b = self.near_pair(hops=1, config=PathConfig(opener_ttls=()))
        a.send(b, 1)
        w.run(3)
        self.assertEqual(b.box.counters["collision"], 1)
        self.assertEqual(a.state(b), "relayed")

    def test_openers_across_a_transit_hop(self) -> None:
        """With one router between the NATs, each side's TTL-2 opener opens its own router and
        dies at the transit hop; the first datagram to reach the other router comes 20 ms later."""
        w, a, b = self.near_pair(hops=1)
        t0 = w.now()
        a.send(b, 1)
        through = ("punched", "direct")  # b may hear a's PILA through the hole before its own punch ends
        self.assertTrue(w.run_until(t0 + 1, lambda: a.state(b) in through and b.state(a) in through))
        w.run(0.5)
        self.assertEqual(a.box.counters["collision"] + b.box.counters["collision"], 0)
        self.assertEqual(a.box.counters["delivered_locally"] + b.box.counters["delivered_locally"], 0)
        self.assertEqual(len(b.received(1)), 1)
        self.assertGreater(w.internet.expired, 0)   # the openers died in transit
        self.assertEqual(a.box.counters["ttl_expired"] + b.box.counters["ttl_expired"], 2)  # TTL 3 at the peer

    def test_one_segment_the_first_side_wins_then_recovers(self) -> None:
        """
        Two routers on one segment: the opener that passes our router reaches the peer's, so the
        first punch collides, but always the same way: ``a`` (the lower endpoint) sends each opener
        40 ms before ``b``, so ``b``'s router is the one poisoned and ``a``'s entry is the right
        one.  ``a`` keeps it alive with TTL-1 keepers, ``b`` waits out the quiet period and sends
        first: punched about 35 s after the first send, every packet delivered once, in order.
        """
        w, a, b = self.near_pair(hops=0)
        t0 = w.now()
        pinger(w, a, b, every=0.1)
        self.assertTrue(w.run_until(t0 + 5, lambda: a.state(b) == b.state(a) == "relayed"))
        self.assertEqual((a.box.counters["collision"], b.box.counters["collision"]), (0, 1))
        self.assertTrue(w.run_until(t0 + 10, lambda: reason(a, b) == reason(b, a) == "collision_recovering"))
        self.assertTrue(w.run_until(t0 + 40, lambda: a.state(b) == b.state(a) == "punched"),
                        (a.state(b), b.state(a), w.now() - t0))
        took = w.now() - t0
        self.assertGreater(took, 30)  # the entries had to expire first
        self.assertGreater(a.box.counters["ttl_refreshed"], 4)  # the keepers held a's entry
        self.assertEqual(b.box.counters["ttl_refreshed"], 0)
        self.assertEqual(a.paths.counters["recovery_attempts"] + b.paths.counters["counter_attempts"], 0)
        self.assertEqual(b.paths.counters["recovery_attempts"], 1)
        w.run(5)
        got = in_order(b, a)
        self.assertEqual(got, list(range(1000, 1000 + len(got))))  # none lost, none twice, in order
        self.assertGreater(len(got), took * 10 - 5)

    def test_one_segment_the_drift_beats_the_skew(self) -> None:
        """``b`` acts 50 ms before ``a`` (more than the skew): ``b`` wins, round 0's roles are wrong
        and fail; round 1 swaps them and gets through, about 70 s after the first send."""
        w, a, b = self.near_pair(hops=0)
        w.internet.extra[(BEACON[0], b.box.public_ip)] = 0.0
        w.internet.extra[(BEACON[0], a.box.public_ip)] = 0.05
        t0 = w.now()
        pinger(w, a, b)
        self.assertTrue(w.run_until(t0 + 5, lambda: a.state(b) == "relayed"))
        self.assertEqual((a.box.counters["collision"], b.box.counters["collision"]), (1, 0))
        self.assertTrue(w.run_until(t0 + 80, lambda: a.state(b) == b.state(a) == "punched"),
                        (a.state(b), b.state(a), w.now() - t0))
        self.assertGreater(w.now() - t0, 60)

    def test_without_the_keepers_one_segment_stays_relayed(self) -> None:
        """The control: keepers that never fire (``a``'s entry expires in the quiet period)."""
        w, a, b = self.near_pair(hops=0, config=PathConfig(keeper_interval=1e6))
        pinger(w, a, b)
        w.run(60)
        self.assertEqual((a.state(b), b.state(a)), ("relayed", "relayed"))

    def no_nat_pair(self) -> tuple[World, ModelNode, ModelNode]:
        """A stateful firewall (no NAT) and an EIM router without an INPUT filter whose command comes
        later by more than a datagram takes between them: the firewall's would arrive first."""
        w = World()
        a, b = w.node(FIREWALL), w.node(PORT_RESTRICTED, local_delivery=True)
        w.start()
        w.internet.extra[(BEACON[0], b.box.public_ip)] = LATENCY * 2
        return w, a, b

    def test_a_side_without_nat_lets_the_nat_side_go_first(self) -> None:
        w, a, b = self.no_nat_pair()
        self.assertTrue(a.node.behind_no_nat())
        self.assertFalse(b.node.behind_no_nat())
        t0 = w.now()
        a.send(b, 1)
        self.check_punched(w, a, b, t0)

    def test_without_waiting_the_firewall_side_would_collide(self) -> None:
        """The control: the same pair with the no-NAT side acting at once."""
        self.patch(core, "NO_NAT_PUNCH_DELAY", 0.0)
        w, a, b = self.no_nat_pair()
        a.send(b, 1)
        w.run(3)
        self.assertEqual(b.box.counters["collision"], 1)
        self.assertEqual(a.state(b), "relayed")

    def test_recovers_from_a_collision(self) -> None:
        """
        ``b``'s router was left an UNREPLIED entry for ``a`` (a lost race, or a reference
        node's first PILA): the punch fails, the pair relays, and after a quiet period
        longer than the entry's timeout ``b`` sends first and ``a``'s kept entry lets it
        in.  Nothing the application sent is lost, duplicated or reordered across the
        switches.
        """
        w, a, b = pair()
        a.box.outbound(b"PILP", b.box.public_endpoint())  # type: ignore[arg-type]
        t0 = w.now()
        pinger(w, a, b, every=0.1)
        self.assertTrue(w.run_until(t0 + 5, lambda: a.state(b) == "relayed"))
        self.assertEqual(b.box.counters["collision"], 1)
        self.assertTrue(w.run_until(t0 + 10, lambda: reason(a, b) == "collision_recovering"))
        self.assertTrue(w.run_until(t0 + 40, lambda: a.state(b) == b.state(a) == "punched"),
                        (a.state(b), b.state(a), w.now() - t0))
        took = w.now() - t0
        w.run(5)
        got = in_order(b, a)
        self.assertEqual(got, sorted(set(got)))  # in order, no duplicates
        self.assertEqual(got, list(range(1000, 1000 + len(got))))  # none lost
        self.assertGreater(len(got), took * 10 - 5)
        self.assertIsNone(reason(a, b))

    def test_recovers_when_the_first_sides_router_was_poisoned(self) -> None:
        """The entry is on ``a``'s router (the side that punches first): round 0's roles are
        wrong, round 1 gets through, within two rounds."""
        w, a, b = pair()
        b.box.outbound(b"PILP", a.box.public_endpoint())  # type: ignore[arg-type]
        t0 = w.now()
        pinger(w, a, b)
        self.assertTrue(w.run_until(t0 + 5, lambda: a.state(b) == "relayed"))
        self.assertEqual(a.box.counters["collision"], 1)
        self.assertTrue(w.run_until(t0 + 80, lambda: a.state(b) == b.state(a) == "punched"),
                        (a.state(b), b.state(a), w.now() - t0))

    def test_with_an_input_filter_the_same_pair_punches(self) -> None:
        """The control: the lab's old routers (WAN input dropped) leave nothing to collide with."""
        w, a, b = pair(local_delivery=False)
        pinger(w, a, b)
        w.run(20)
        self.assertEqual(b.box.counters["collision"] + a.box.counters["collision"], 0)
        self.assertEqual((a.state(b), b.state(a)), ("punched", "punched"))

    def test_peers_says_why(self) -> None:
        """What ``pilotctl peers`` gets from the node's API for a pair waiting out a collision."""
        w, a, b = pair()
        a.box.outbound(b"PILP", b.box.public_endpoint())  # type: ignore[arg-type]
        pinger(w, a, b)
        w.run(10)
        row = _path_fields(a.node, b.node_id, {}, None, {})
        self.assertEqual((row["path"], row["path_reason"]), ("relay", "collision_recovering"))
        w.run(40)
        row = _path_fields(a.node, b.node_id, {}, None, {})
        self.assertEqual((row["path"], row["path_reason"]), ("punched", None))


class OpenInputMatrixTests(SynchronousTestCase):
    """``tests.machines.test_path``'s matrix with every router's INPUT open: same paths, no collision."""

    def check(self, a_kind: str, b_kind: str) -> None:
        w = World(hops=1)
        a, b = w.node(a_kind, local_delivery=True), w.node(b_kind, local_delivery=True)
        w.start()
        t0 = w.now()
        a.send(b, 1)
        self.assertTrue(w.run_until(t0 + 10, lambda: bool(b.received(1))), "never delivered")
        w.run(1)
        expected = (expected_path(a_kind, b_kind), expected_back(a_kind, b_kind))
        self.assertEqual((a.state(b), b.state(a)), expected)
        self.assertLess(b.received(1)[0] - t0, TARGET[expected_path(a_kind, b_kind)])
        self.assertEqual(a.box.counters["collision"] + b.box.counters["collision"], 0)


for _a, _b in itertools.product(KINDS, KINDS):
    def _test(self: OpenInputMatrixTests, a_kind: str = _a, b_kind: str = _b) -> None:
        self.check(a_kind, b_kind)
    _test.__name__ = f"test_{_a}_to_{_b}".replace("-", "_")
    setattr(OpenInputMatrixTests, _test.__name__, _test)
del _a, _b, _test
