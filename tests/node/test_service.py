"""
Tests for L{pilot.services.node} (and ``pilot.nodetap``): the node daemon's
``MultiService`` on a ``MemoryReactorClock``: its ports open on start and
close on stop; startup problems are ``NodeStartupError`` with their messages.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import ErrorCode
from pilot.identity import Identity
from pilot.nodeconfig import NodeSettings
from pilot.protocols.registry_client import RegistryClientProtocol
from pilot.services.node import NodeRunner, NodeService, NodeStartupError, RegistryConnector, TunnelPort


class UDPReactor(MemoryReactorClock):
    """``MemoryReactorClock`` with ``listenUDP`` (recorded as ``udpServers``)."""

    def __init__(self) -> None:
        super().__init__()
        self.udpServers: list[tuple[int, Any, str, int]] = []
        self.udpPorts: list[UDPPort] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> "UDPPort":
        self.udpServers.append((port, protocol, interface, maxPacketSize))
        udp = UDPPort(IPv4Address("UDP", interface or "0.0.0.0", port or 40000 + len(self.udpPorts)))
        self.udpPorts.append(udp)
        return udp


class RecordingSocket:
    def __init__(self) -> None:
        self.options: dict[tuple[int, int], int] = {}

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options[level, option] = value


class UDPPort:
    def __init__(self, address: IPv4Address) -> None:
        self.address = address
        self.stopped = False
        self.socket = RecordingSocket()

    def getHost(self) -> IPv4Address:
        return self.address

    def stopListening(self) -> None:
        self.stopped = True


class NodeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = self.mktemp()
        os.makedirs(self.home)
        self.settings = NodeSettings(home=self.home, identity=os.path.join(self.home, "identity.json"),
                                     socket=os.path.join(self.home, "pilot.sock"), registry="127.0.0.1:9000",
                                     beacon="127.0.0.1:9001", listen="127.0.0.1:0")
        self.reactor = UDPReactor()

    def test_no_identity(self) -> None:
        with self.assertRaises(NodeStartupError) as caught:
            NodeService(self.settings, self.reactor)
        self.assertEqual(caught.exception.message, f"no identity at {self.settings.identity}")
        self.assertEqual(caught.exception.code, ErrorCode.not_found)

    def test_trust_restored_only_without_a_trust_file(self) -> None:
        """No trust.json: restore from the registry; an existing one is the truth; a damaged one refuses."""
        Identity.generate().save(self.settings.identity)
        self.assertTrue(NodeService(self.settings, self.reactor).node.carried.restore)
        with open(self.settings.trust_path, "w") as f:
            f.write('{"trusted": []}')
        self.assertFalse(NodeService(self.settings, self.reactor).node.carried.restore)
        with open(self.settings.trust_path, "w") as f:
            f.write("{not json")
        with self.assertRaises(NodeStartupError) as caught:
            NodeService(self.settings, self.reactor)
        self.assertEqual(caught.exception.code, ErrorCode.malformed)

    def test_ports_open_and_close(self) -> None:
        Identity.generate().save(self.settings.identity)
        service = NodeService(self.settings, self.reactor)
        self.assertEqual([type(s) for s in service][:2], [TunnelPort, NodeRunner])
        service.startService()
        [(port, protocol, interface, _)] = self.reactor.udpServers
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        self.assertIs(protocol, service.udp)
        if sys.platform.startswith("linux"):
            # don't fragment: IP_MTU_DISCOVER = IP_PMTUDISC_DO (docs/tunnel.md)
            self.assertEqual(self.reactor.udpPorts[0].socket.options[socket.IPPROTO_IP, 10], 2)
        [(path, factory, _, mode)] = [s[:4] for s in self.reactor.unixServers]
        self.assertEqual((path, mode), (self.settings.socket, 0o600))
        self.assertTrue(os.path.exists(self.settings.pid_path))
        self.assertEqual(service.node.beacon_addr, ("127.0.0.1", 9001))
        self.assertIn(444, service.node.stack.ports())
        self.successResultOf(service.stopService())
        self.assertFalse(os.path.exists(self.settings.pid_path))
        self.assertTrue(self.reactor.udpPorts[0].stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_the_last_runs_port_is_taken_again(self) -> None:
        Identity.generate().save(self.settings.identity)
        service = NodeService(self.settings, self.reactor)
        service.startService()
        self.successResultOf(service.stopService())
        with open(os.path.join(self.home, "tunnel.port")) as f:
            self.assertEqual(f.read(), "40000\n")
        NodeService(self.settings, self.reactor).startService()
        self.assertEqual([port for port, _, _, _ in self.reactor.udpServers], [0, 40000])



class BeaconAddressTests(SynchronousTestCase):
    """The beacon's address: an address as it is (no getaddrinfo, no idna codec), a name resolved."""

    def runner(self) -> NodeRunner:
        return NodeRunner.__new__(NodeRunner)  # _resolve uses nothing of the instance but its log

    def test_addresses(self) -> None:
        self.assertEqual(self.runner()._resolve("127.0.0.1", 9001), ("127.0.0.1", 9001))
        self.assertEqual(self.runner()._resolve("FE80::1", 9001), ("fe80::1", 9001))  # as getaddrinfo writes it
        self.assertEqual(self.runner()._resolve("", 9001), ("127.0.0.1", 9001))

    def test_name_resolved(self) -> None:
        host, port = self.runner()._resolve("localhost", 9001)
        self.assertIn(host, ("127.0.0.1", "::1"))
        self.assertEqual(port, 9001)


class RecordingLink:
    """An ``IRegistryLink`` that records what the connector tells it."""

    def __init__(self) -> None:
        self.lan: list[str] = []

    def event_received(self, event: Any) -> None:
        pass

    def connection_lost(self, protocol: Any, reason: str) -> None:
        pass

    def lan_address_learned(self, host: str) -> None:
        self.lan.append(host)


class RegistryConnectorTests(SynchronousTestCase):
    """An address is connected to as it is: no resolver, no thread, no ``twisted.internet.endpoints``."""

    def test_address_connects_directly(self) -> None:
        reactor = MemoryReactorClock()
        link = RecordingLink()
        d = RegistryConnector(reactor, "127.0.0.1:9000").connect(link)  # type: ignore[arg-type]
        [(host, port, factory, timeout, _)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9000, 5))
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert isinstance(protocol, RegistryClientProtocol)
        protocol.makeConnection(StringTransport(hostAddress=IPv4Address("TCP", "10.0.0.7", 40000)))
        reactor.advance(0)
        self.assertIs(self.successResultOf(d), protocol)
        self.assertEqual(link.lan, ["10.0.0.7"])

    def test_cancel_stops_connecting(self) -> None:
        reactor = MemoryReactorClock()
        d = RegistryConnector(reactor, "[::1]:9000").connect(RecordingLink())  # type: ignore[arg-type]
        self.assertEqual(reactor.tcpClients[0][:2], ("::1", 9000))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        [connector] = reactor.connectors
        self.assertTrue(connector._disconnected)  # the memory reactor's record of disconnect()
