"""
Tests for L{pilot.node.core} with a list of rendezvous servers: the
registration's connector is the entry in use, and discovery, punch and relay
follow it to the paired beacon; established tunnels are not touched.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pilot.address import Address
from pilot.errors import ConnectionFailed
from pilot.interfaces import IRegistryConnector, IRegistryLink
from pilot.machines.registration import BACKOFF_INITIAL
from pilot.node.core import REGISTER_WAIT, Node
from pilot.protocols.handshake import OneMessage
from pilot.wire import beacon as bw
from tests.node.fakes import FixedRoute, Host, Network

BEACON_A = ("198.51.100.1", 9001)
BEACON_B = ("198.51.100.2", 9001)
PORT = 1000


@implementer(IRegistryConnector)
class RefusingConnector:
    """A registry that is down: every connection is refused."""

    def __init__(self) -> None:
        self.tries = 0

    def connect(self, link: IRegistryLink) -> "Deferred[Any]":
        self.tries += 1
        return fail(ConnectionFailed("connection refused"))


@implementer(IRegistryConnector)
class HangingConnector:
    def __init__(self) -> None:
        self.tries = 0

    def connect(self, link: IRegistryLink) -> "Deferred[Any]":
        self.tries += 1
        return Deferred()


class BeaconFollowsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.network = Network(self.clock)
        self.peer = Host(self.network, 2, ("192.0.2.2", 4002))
        host = Host(self.network, 1, ("192.0.2.1", 4001))
        self.a, self.b = RefusingConnector(), HangingConnector()
        self.node = Node(identity=host.identity, trust_store=host.trust_store, save_trust=host.save_trust,
                         clock=self.clock, sender=host.udp, connector=[self.a, self.b], prober=FixedRoute(),
                         one_message=OneMessage, servers=("192.0.2.10:9000", "192.0.2.11:9000"))
        host.udp.wire(beacon=self.node, frames=self.node.tunnels)
        host.node = self.node
        self.host = host
        host.meet(self.peer)
        self.peer.meet(host)

    def sent_to(self, beacon: tuple[str, int]) -> list[bytes]:
        return [data for _, dst, data in self.network.sent if dst == beacon]

    def test_move_switches_the_beacon(self) -> None:
        self.node.start(BEACON_A, BEACON_B)
        self.assertEqual(self.node.beacon(), BEACON_A)
        self.assertEqual(self.sent_to(BEACON_A), [bw.Discover(0).base])
        self.clock.advance(REGISTER_WAIT)
        self.assertEqual(self.a.tries, 1)
        self.assertEqual(self.node.registration.server_index, 1)
        self.assertEqual(self.node.beacon(), BEACON_B)
        self.assertTrue(self.node.is_beacon(BEACON_B))
        self.assertFalse(self.node.is_beacon(BEACON_A))  # the old beacon no longer steers us
        self.assertIn(bw.Discover(0).base, self.sent_to(BEACON_B))
        self.clock.advance(BACKOFF_INITIAL)
        self.assertEqual(self.b.tries, 1)

    def test_established_tunnels_are_untouched(self) -> None:
        received: list[bytes] = []

        class Sink(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        self.peer.node.stack.listen(PORT, Factory.forProtocol(Sink))
        client = Protocol()
        d = self.node.stack.connect(Address(0, self.peer.node.own_id), PORT, client, timeout=5.0)
        for _ in range(100):
            self.clock.advance(0.01)
        self.successResultOf(d)
        assert client.transport is not None
        client.transport.write(b"before")
        self.node.start(BEACON_A, BEACON_B)  # the registry is down: the node moves to B
        self.clock.advance(REGISTER_WAIT + BACKOFF_INITIAL)
        self.assertEqual(self.node.beacon(), BEACON_B)
        client.transport.write(b"after")
        for _ in range(100):
            self.clock.advance(0.01)
        self.assertEqual(b"".join(received), b"beforeafter")
        self.assertEqual(self.node.tunnels.stats(self.peer.node.own_id)["state"], "established")

    def test_one_connector_one_beacon(self) -> None:
        host = Host(self.network, 3, ("192.0.2.3", 4003))
        host.node.start(BEACON_A)
        self.clock.advance(REGISTER_WAIT + 60)
        self.assertEqual(host.node.beacon(), BEACON_A)
        self.assertEqual(host.node.registration.server_index, 0)
        self.assertEqual(len(host.connector.links), 1)


class CarriedAcrossServersTests(SynchronousTestCase):
    """After a move, our trust statements are fetched and deposited at the new rendezvous."""

    def test_statements_deposited_at_the_new_server(self) -> None:
        from tests.node.test_carried import ALICE, BOB, T0, Rendezvous as StatementRegistry
        from pilot.node.carried import CarriedTrust
        from pilot.trust import TrustedPeer, TrustStore

        clock = Clock()
        clock.advance(T0)
        first, second = StatementRegistry(clock), StatementRegistry(clock)
        use = [first]
        store = TrustStore()
        store.trusted[BOB.address.node] = TrustedPeer(BOB.address.node, BOB.public_key, T0 - 60, mutual=True)
        carried = CarriedTrust(identity=ALICE, store=store, save=lambda: None,
                               request=lambda msg: use[0].requester(ALICE)(msg), clock=clock,
                               node_id=lambda: ALICE.address.node, restore=False)
        carried.registered()
        self.assertEqual(list(first.held(ALICE.address.node)), [BOB.address.node])
        use[0] = second
        carried.registered()  # the same server again: nothing is fetched or sent
        self.assertEqual(second.sent, [])
        carried.server_changed()
        carried.registered()
        self.assertEqual(list(second.held(ALICE.address.node)), [BOB.address.node])
