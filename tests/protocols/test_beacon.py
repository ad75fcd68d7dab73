"""
Tests for L{pilot.protocols.beacon}: the beacon's DatagramProtocol over a
recording datagram transport.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import task
from twisted.internet.testing import FakeDatagramTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import Identity
from pilot.protocols.beacon import BeaconProtocol
from pilot.server.beacon import Beacon, BeaconConfig
from pilot.server.registry import Peer, Registry, RegistryConfig
from pilot.wire.beacon import Discover, DiscoverReply, PunchCommand, PunchRequest
from pilot.wire.registry import legacy_challenge

A_ADDR = ("127.0.0.1", 24101)
B_ADDR = ("127.0.0.1", 24102)


class RecordingTransport(FakeDatagramTransport):
    """Records writes; raises for destinations in ``failing``."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[Any] = set()

    def write(self, packet: bytes, addr: Any = FakeDatagramTransport.noAddr) -> None:
        if addr in self.failing:
            raise OSError("unreachable")
        super().write(packet, addr)


class BrokenBeacon(Beacon):
    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> list[tuple[bytes, tuple[str, int]]]:
        raise RuntimeError("bug")


class BeaconProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.registry = Registry(self.clock,
                                 RegistryConfig(registrations_per_minute=0, requests_per_second=0))
        self.beacon = Beacon(self.registry, self.clock, BeaconConfig())
        self.transport = RecordingTransport()
        self.protocol = BeaconProtocol(self.beacon, self.clock)
        self.protocol.makeConnection(self.transport)

    def register(self, seed: int, addr: tuple[str, int]) -> int:
        key = Identity.from_seed(bytes([seed]) * 32)
        reply = self.registry.handle({"type": "register", "public_key": key.public_key_b64,
                                      "listen_addr": f"{addr[0]}:{addr[1]}"}, Peer(addr[0], 50000))
        return int(reply["node_id"])

    def make_public(self, seed: int, node_id: int) -> None:
        key = Identity.from_seed(bytes([seed]) * 32)
        msg: dict[str, Any] = {"type": "set_visibility", "node_id": node_id, "public": True}
        challenge = legacy_challenge(msg)
        assert challenge is not None
        msg["signature"] = key.sign_b64(challenge)
        self.assertEqual(self.registry.handle(msg, Peer("127.0.0.1", 50000))["type"], "set_visibility_ok")

    def test_discover_reply(self) -> None:
        self.protocol.datagramReceived(Discover(0).encode(), A_ADDR)
        self.assertEqual(self.transport.written, [(bytes.fromhex("02047f0000015e25"), A_ADDR)])

    def test_ipv6_address_tuple(self) -> None:
        self.protocol.datagramReceived(Discover(0).encode(), ("2001:db8::1", 5, 0, 0))
        self.assertEqual(self.transport.written,
                         [(DiscoverReply("2001:db8::1", 5).encode(), ("2001:db8::1", 5))])

    def test_punch_writes_to_both(self) -> None:
        a = self.register(1, A_ADDR)
        b = self.register(2, B_ADDR)
        self.make_public(2, b)
        self.protocol.datagramReceived(Discover(a).encode(), A_ADDR)
        self.protocol.datagramReceived(Discover(b).encode(), B_ADDR)
        del self.transport.written[:]
        self.protocol.datagramReceived(PunchRequest(a, b).encode(), A_ADDR)
        self.assertEqual(self.transport.written, [(PunchCommand(*B_ADDR).encode(), A_ADDR),
                                                  (PunchCommand(*A_ADDR).encode(), B_ADDR)])

    def test_failed_write_does_not_stop_the_rest(self) -> None:
        a = self.register(1, A_ADDR)
        b = self.register(2, B_ADDR)
        self.make_public(2, b)
        self.protocol.datagramReceived(Discover(a).encode(), A_ADDR)
        self.protocol.datagramReceived(Discover(b).encode(), B_ADDR)
        del self.transport.written[:]
        self.transport.failing.add(A_ADDR)
        self.protocol.datagramReceived(PunchRequest(a, b).encode(), A_ADDR)
        self.assertEqual(self.transport.written, [(PunchCommand(*A_ADDR).encode(), B_ADDR)])

    def test_garbage_is_silent(self) -> None:
        rng = random.Random(5)
        with capturedLogs() as events:
            for _ in range(500):
                data = bytes([rng.randrange(0, 256)]) + rng.randbytes(rng.randrange(0, 40))
                self.protocol.datagramReceived(data, ("192.0.2.7", rng.randrange(1, 65536)))
            self.protocol.datagramReceived(b"", ("192.0.2.7", 1))
            self.protocol.datagramReceived(b"\x01", "not an address")
        self.assertEqual(self.transport.written, [])
        self.assertTrue(events)
        self.assertEqual({e["log_level"] for e in events}, {LogLevel.debug})
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_warning_at_most_once_per_interval(self) -> None:
        with capturedLogs() as events:
            for _ in range(100):
                self.protocol.datagramReceived(b"\xff", ("192.0.2.7", 1))
            self.clock.advance(30)
            self.protocol.datagramReceived(b"\xff", ("192.0.2.7", 1))
            self.clock.advance(31)
            for _ in range(10):
                self.protocol.datagramReceived(b"\xff", ("192.0.2.7", 1))
        warnings = [e for e in events if e["log_level"] >= LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["dropped"], 102)
        self.assertEqual(warnings[0]["refused"], {"dropped.malformed": 102})

    def test_unrecorded_discover_is_not_a_drop(self) -> None:
        with capturedLogs() as events:
            self.protocol.datagramReceived(Discover(4242).encode(), A_ADDR)
            self.clock.advance(61)
            self.protocol.datagramReceived(Discover(0).encode(), A_ADDR)
        self.assertEqual(len(self.transport.written), 2)
        self.assertEqual([e["outcome"] for e in events], ["discover.unrecorded.unknown_node"])

    def test_unexpected_exception_is_contained(self) -> None:
        protocol = BeaconProtocol(BrokenBeacon(self.registry, self.clock), self.clock)
        protocol.makeConnection(self.transport)
        with capturedLogs() as events:
            for _ in range(5):
                protocol.datagramReceived(Discover(0).encode(), A_ADDR)
        self.assertEqual(self.transport.written, [])
        self.assertEqual(len([e for e in events if "log_failure" in e]), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class DirectReplyTests(SynchronousTestCase):
    """
    A real ``twisted.internet.udp.Port`` on 127.0.0.1 (a ``MemoryReactorClock``:
    ``doRead`` is called by hand): a reply to the datagram's own source goes
    out with the socket's ``sendto``, anything else with ``Port.write``.
    """

    def setUp(self) -> None:
        import socket

        from twisted.internet import udp
        from twisted.internet.testing import MemoryReactorClock
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.registry = Registry(self.clock, RegistryConfig(registrations_per_minute=0, requests_per_second=0))
        self.beacon = Beacon(self.registry, self.clock, BeaconConfig())
        self.protocol = BeaconProtocol(self.beacon, self.clock)
        reactor = MemoryReactorClock()
        self.port = udp.Port(0, self.protocol, interface="127.0.0.1", reactor=reactor)
        self.port.startListening()
        self.addCleanup(reactor.advance, 0)  # connectionLost: the socket closed
        self.addCleanup(self.port.stopListening)
        self.written: list[tuple[bytes, Any]] = []
        write = self.port.write

        def recording_write(data: bytes, addr: Any = None) -> None:
            self.written.append((data, addr))
            write(data, addr)
        self.port.write = recording_write  # type: ignore[method-assign]
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.client.close)
        self.client.bind(("127.0.0.1", 0))
        self.client.settimeout(1.0)
        self.server = ("127.0.0.1", self.port.getHost().port)

    def ask(self, data: bytes) -> bytes:
        self.client.sendto(data, self.server)
        self.port.doRead()
        reply, source = self.client.recvfrom(2048)
        self.assertEqual(source, self.server)
        return reply

    def test_discover_reply_skips_port_write(self) -> None:
        host, port = self.client.getsockname()
        self.assertEqual(self.ask(Discover(0).encode()), DiscoverReply(host, port).encode())
        self.assertEqual(self.ask(Discover(77).encode()), DiscoverReply(host, port).encode())
        self.assertEqual(self.written, [])
        self.assertEqual(self.beacon.counters["discover"], 2)

    def test_failed_sendto_falls_back_to_port_write(self) -> None:
        host, port = self.client.getsockname()
        self.ask(Discover(0).encode())
        tried: list[Any] = []

        def failing(data: bytes, addr: Any) -> int:
            tried.append(addr)
            raise OSError("full")
        self.protocol._sendto = failing
        self.assertEqual(self.ask(Discover(0).encode()), DiscoverReply(host, port).encode())
        self.assertEqual(tried, [(host, port)])
        self.assertEqual(self.written, [(DiscoverReply(host, port).encode(), (host, port))])

    def test_other_destinations_use_port_write(self) -> None:
        """A punch command to the peer goes to an endpoint of the beacon's table: Twisted checks it."""
        import socket
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(peer.close)
        peer.bind(("127.0.0.1", 0))
        peer_addr = peer.getsockname()
        me = self.client.getsockname()
        ids = []
        for seed, addr in ((1, me), (2, peer_addr)):
            key = Identity.from_seed(bytes([seed]) * 32)
            reply = self.registry.handle({"type": "register", "public_key": key.public_key_b64,
                                          "listen_addr": f"{addr[0]}:{addr[1]}"}, Peer(addr[0], 50000))
            ids.append(int(reply["node_id"]))
        key = Identity.from_seed(bytes([2]) * 32)
        msg: dict[str, Any] = {"type": "set_visibility", "node_id": ids[1], "public": True}
        challenge = legacy_challenge(msg)
        assert challenge is not None
        msg["signature"] = key.sign_b64(challenge)
        self.registry.handle(msg, Peer("127.0.0.1", 50000))
        self.ask(Discover(ids[0]).encode())
        self.beacon.datagram_received(Discover(ids[1]).encode(), peer_addr)  # recorded as the peer's
        self.assertEqual(self.ask(PunchRequest(ids[0], ids[1]).encode()), PunchCommand(*peer_addr).encode())
        self.assertEqual(self.written, [(PunchCommand(*me).encode(), peer_addr)])

    def test_a_port_listening_again_is_looked_at_again(self) -> None:
        self.ask(Discover(0).encode())
        self.assertIs(self.protocol._direct_for, self.port)
        self.protocol.startProtocol()  # what the port calls when it listens
        self.assertIsNone(self.protocol._direct_for)
        self.ask(Discover(0).encode())
        self.assertIs(self.protocol._direct_for, self.port)
        self.assertEqual(self.written, [])

    def test_only_a_plain_udp_port_is_sent_to_directly(self) -> None:
        from pilot.protocols.beacon import _direct_sendto
        self.assertIsNotNone(_direct_sendto(self.port))
        self.assertIsNone(_direct_sendto(FakeDatagramTransport()))
        self.port._connectedAddr = ("127.0.0.1", 9)
        self.assertIsNone(_direct_sendto(self.port))
