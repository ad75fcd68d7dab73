"""
Fakes for driving the real :class:`pilot.node.Node` on a ``task.Clock``:
an in-memory network of datagram transports, a registry connector that
never connects (or fails), a fixed route, and :func:`pair`, two nodes that
trust each other and know each other's endpoints.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from pilot.identity import Identity
from pilot.interfaces import IRegistryConnector, IRegistryLink, IRouteProber
from pilot.node import Node
from pilot.protocols.handshake import OneMessage
from pilot.protocols.tunnel import NodeDatagramProtocol
from pilot.trust import TrustedPeer, TrustStore

Endpoint = tuple[str, int]
#: One-way delay of the fake network (s).
LATENCY = 0.001


class Network:
    """Datagrams between fake transports, each delivered ``LATENCY`` later from the clock (a fresh stack)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.hosts: dict[Endpoint, NodeDatagramProtocol] = {}
        self.sent: list[tuple[Endpoint, Endpoint, bytes]] = []
        #: (destination, data, ttl) of every datagram sent with a hop limit (an opener)
        self.limited: list[tuple[Endpoint, bytes, int]] = []

    def attach(self, endpoint: Endpoint, protocol: NodeDatagramProtocol) -> None:
        self.hosts[endpoint] = protocol
        protocol.makeConnection(DatagramTransport(self, endpoint))  # type: ignore[arg-type]

    def send(self, src: Endpoint, dst: Endpoint, data: bytes) -> None:
        self.sent.append((src, dst, data))
        self.clock.callLater(LATENCY, self._arrive, src, dst, data)

    def _arrive(self, src: Endpoint, dst: Endpoint, data: bytes) -> None:
        protocol = self.hosts.get(dst)
        if protocol is not None:
            protocol.datagramReceived(data, src)


#: The TTL a fresh socket sends with (Linux's default).
DEFAULT_TTL = 64


class HopLimitSocket:
    """The part of a socket the node's sender touches for hop-limited openers: IP_TTL."""

    def __init__(self) -> None:
        self.ttl = DEFAULT_TTL
        self.set: list[int] = []

    def getsockopt(self, level: int, option: int) -> int:
        assert (level, option) == (socket.IPPROTO_IP, socket.IP_TTL), (level, option)
        return self.ttl

    def setsockopt(self, level: int, option: int, value: int) -> None:
        assert (level, option) == (socket.IPPROTO_IP, socket.IP_TTL), (level, option)
        assert isinstance(value, int) and 1 <= value <= 255, value
        self.ttl = value
        self.set.append(value)


class DatagramTransport:
    """What a ``DatagramProtocol`` writes to: records nothing itself, hands to the network."""

    def __init__(self, network: Network, endpoint: Endpoint) -> None:
        self.network = network
        self.endpoint = endpoint
        self.socket = HopLimitSocket()

    def write(self, data: bytes, addr: Endpoint) -> None:
        assert isinstance(data, bytes)
        if self.socket.ttl != DEFAULT_TTL:
            self.network.limited.append(((addr[0], addr[1]), data, self.socket.ttl))
        self.network.send(self.endpoint, (addr[0], addr[1]), data)

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", *self.endpoint)

    def loseConnection(self) -> None:
        self.network.hosts.pop(self.endpoint, None)


@implementer(IRegistryConnector)
class PendingConnector:
    """A registry that never answers the connection (the node keeps trying on its own)."""

    def __init__(self) -> None:
        self.links: list[IRegistryLink] = []

    def connect(self, link: IRegistryLink) -> "Deferred[Any]":
        self.links.append(link)
        return Deferred()


@implementer(IRouteProber)
class FixedRoute:
    def __init__(self, source: Optional[str] = "192.0.2.1") -> None:
        self.source = source
        self.asked: list[Endpoint] = []

    def source_for(self, destination: Endpoint) -> Optional[str]:
        self.asked.append(destination)
        return self.source


class Host:
    """One node on the fake network: the real protocol and the real node."""

    def __init__(self, network: Network, seed: int, endpoint: Endpoint, **node_args: Any) -> None:
        self.identity = Identity.from_seed(bytes([seed]) * 32)
        self.endpoint = endpoint
        self.trust_store = TrustStore()
        self.saved = 0
        self.udp = NodeDatagramProtocol()
        self.connector = PendingConnector()
        self.route = FixedRoute()
        self.node = Node(identity=self.identity, trust_store=self.trust_store, save_trust=self.save_trust,
                         clock=network.clock, sender=self.udp, connector=self.connector, prober=self.route,
                         one_message=OneMessage, **node_args)
        self.udp.wire(beacon=self.node, frames=self.node.tunnels)
        network.attach(endpoint, self.udp)

    def save_trust(self) -> None:
        self.saved += 1

    def meet(self, other: "Host") -> None:
        """Trust ``other`` and know where it is (as after a handshake and a resolve)."""
        self.trust_store.trusted[other.node.own_id] = TrustedPeer(
            other.node.own_id, other.identity.public_key, 0.0, mutual=True)
        self.node.peers.update(other.node.own_id, other.endpoint)


def lone_host() -> tuple[Clock, Network, Host]:
    """A clock at a realistic epoch, a network on it, and one host (id 1) at 192.0.2.1:4001."""
    clock = Clock()
    clock.advance(1_700_000_000)
    network = Network(clock)
    return clock, network, Host(network, 1, ("192.0.2.1", 4001))


def pair(clock: Clock) -> tuple[Network, Host, Host]:
    network = Network(clock)
    a = Host(network, 1, ("192.0.2.1", 4001))
    b = Host(network, 2, ("192.0.2.2", 4002))
    a.meet(b)
    b.meet(a)
    return network, a, b
