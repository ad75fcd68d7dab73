"""
Tests for L{pilot.stack} and L{pilot.transport}: stacks joined back to back
by a fake tunnel on a L{task.Clock}, driven through Twisted protocols, and
single stacks fed packets by hand.
"""

from __future__ import annotations

import collections
import inspect
import io
import random
from pathlib import Path
from typing import Any, Callable

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IListeningPort, IPushProducer, ITransport
from twisted.internet.task import Clock
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

import pilot
from pilot.stack import ports as limits
from pilot.address import Address
from pilot.errors import (
    AlreadyExists, ConnectionFailed, InvalidArgument, NotFound, NotRunning, NotTrusted, PilotError, Timeout,
)
from pilot.machines.connection import ConnectionConfig
from pilot.stack import CONN_LIST_FIELDS, MAX_DATAGRAM, EphemeralPorts, PilotAddress, Stack, StreamTransport
from pilot.wire.packet import (
    ACK, CONTROL, DATAGRAM, FIN, RST, STREAM, SYN, Packet,
)
from tests.machines.fakelink import pattern, run_until
from tests.stackfakes import A, B, C, FakeTunnel, Recorder, RecordingFactory

MB = 1 << 20


def outcome(d: Deferred[Any]) -> list[Any]:
    """The Deferred's result or Failure, once it has one, in a list that fills in later."""
    box: list[Any] = []
    d.addBoth(box.append)
    return box


def upper_echo(protocol: Recorder, data: bytes) -> None:
    protocol.transport.write(data.upper())


def explode(*args: object) -> None:
    raise ZeroDivisionError()


class StackTestCase(SynchronousTestCase):
    """Stacks ``a`` (at A) and ``b`` (at B) joined by a fake tunnel; both trust everyone."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.tunnel = FakeTunnel(self.clock)
        self.a = self.tunnel.add(A)
        self.b = self.tunnel.add(B)

    def settle(self, done: Callable[[], bool] = lambda: False, limit: float = 600.0) -> bool:
        return run_until(self.clock, done, limit)

    def dial(self, stack: Stack, address: Address, port: int, protocol: Recorder | None = None,
             **kw: Any) -> tuple[Recorder, list[Any]]:
        protocol = protocol if protocol is not None else Recorder()
        return protocol, outcome(stack.connect(address, port, protocol, **kw))

    def established(self, port: int = 1000, factory: RecordingFactory | None = None,
                    client: Recorder | None = None) -> tuple[Recorder, Recorder, StreamTransport]:
        """A client on ``a`` connected to a listener on ``b``; returns (client, server, client transport)."""
        if port in self.b.ports():
            factory = self.b._listeners[port][1]  # type: ignore[assignment]
        else:
            factory = factory or RecordingFactory()
            self.b.listen(port, factory)
        assert factory is not None
        before = len(factory.built)
        client, result = self.dial(self.a, B, port, client)
        self.assertTrue(self.settle(lambda: bool(result) and len(factory.built) > before, 5))
        transport = result[0]
        self.assertIsInstance(transport, StreamTransport)
        return client, factory.built[-1], transport

    def assertLostOnce(self, protocol: Recorder, kind: type[BaseException]) -> Failure:
        self.assertEqual(len(protocol.lost), 1, protocol.lost)
        self.assertTrue(protocol.lost[0].check(kind), protocol.lost[0])
        return protocol.lost[0]


class RoundTripTests(StackTestCase):

    def test_connect_listen_round_trip(self) -> None:
        factory = RecordingFactory(lambda: Recorder(on_data=upper_echo))
        listening = self.b.listen(1000, factory)
        client, result = self.dial(self.a, B, 1000)
        self.assertTrue(self.settle(lambda: bool(result), 5))
        [transport] = result
        stream = self.a.streams.get((B, 1000, 49152))  # the table's key: remote, remote port, local port
        assert stream is not None
        self.assertIs(stream.transport, transport)
        self.assertEqual(factory.built, [])  # b is established by a's ACK, one trip later
        self.assertTrue(self.settle(lambda: bool(factory.built), 5))
        [server] = factory.built
        self.assertIs(client.transport, transport)
        self.assertEqual(client.made, 1)
        self.assertEqual(server.made, 1)
        for iface in (ITransport, IConsumer, IPushProducer):
            self.assertTrue(verifyObject(iface, transport))
        self.assertEqual(transport.getPeer(), PilotAddress(B, 1000))
        self.assertEqual(transport.getHost(), PilotAddress(A, 49152))
        self.assertEqual(factory.addresses, [PilotAddress(A, 49152)])
        self.assertEqual(server.transport.getPeer(), PilotAddress(A, 49152))
        self.assertEqual(server.transport.getHost(), PilotAddress(B, 1000))
        self.assertEqual(str(transport.getPeer()), "0:0000.0000.2222:1000")
        self.assertEqual(listening.getHost(), PilotAddress(B, 1000))
        self.assertTrue(verifyObject(IListeningPort, listening))

        transport.write(b"hello")
        transport.writeSequence([b" ", b"world"])
        self.assertTrue(self.settle(lambda: client.data == b"HELLO WORLD", 5))
        self.assertEqual(bytes(server.data), b"hello world")

        self.settle(limit=0.1)  # our delayed ACK of the echo goes out (see docs/stack.md, "Closing")
        transport.loseConnection()
        self.assertTrue(self.settle(lambda: bool(client.lost and server.lost), 5))
        self.assertLostOnce(client, error.ConnectionDone)
        self.assertLostOnce(server, error.ConnectionDone)
        transport.write(b"ignored after close")
        self.settle(limit=30)  # TIME_WAIT runs out
        self.assertEqual((self.a.connections(), self.b.connections()), ([], []))
        self.assertIsNone(self.a.streams.get((B, 1000, 49152)))
        self.assertEqual((len(client.lost), len(server.lost)), (1, 1))
        self.assertEqual(self.a.counters["errors"] + self.b.counters["errors"], 0)

    def test_echo_service(self) -> None:
        data = pattern(100_000)
        client, result = self.dial(self.a, B, 7, Recorder(on_made=lambda p: p.transport.write(data)))
        self.assertTrue(self.settle(lambda: len(client.data) >= len(data), 10))
        self.assertEqual(bytes(client.data), data)
        result[0].loseConnection()
        self.assertTrue(self.settle(lambda: bool(client.lost), 5))
        self.assertLostOnce(client, error.ConnectionDone)

    def test_megabyte_with_loss(self) -> None:
        """1 MB through the adapters at 5 % loss, checked through encode/decode, byte for byte."""
        self.tunnel.loss = 0.05
        data = pattern(MB, seed=7)
        factory = RecordingFactory()
        self.b.listen(1000, factory)

        def send(protocol: Recorder) -> None:
            protocol.transport.write(data)
            protocol.transport.loseConnection()

        client, result = self.dial(self.a, B, 1000, Recorder(on_made=send))
        self.assertTrue(self.settle(lambda: bool(factory.built and factory.built[0].lost), 600))
        [server] = factory.built
        self.assertEqual(len(server.data), len(data))
        self.assertEqual(bytes(server.data), data)
        self.assertLostOnce(server, error.ConnectionDone)
        self.assertTrue(self.settle(lambda: bool(client.lost), 60))
        self.assertLostOnce(client, error.ConnectionDone)
        dropped = sum(1 for _, _, delivered in self.tunnel.log if not delivered)
        self.assertGreater(dropped, 10)

    def test_fires_after_make_connection(self) -> None:
        seen: list[int] = []
        client = Recorder()
        self.a.connect(B, 7, client).addCallback(lambda t: seen.append(client.made))
        self.settle(lambda: bool(seen), 5)
        self.assertEqual(seen, [1])

    def test_close_in_connection_made(self) -> None:
        factory = RecordingFactory(lambda: Recorder(on_made=lambda p: p.transport.loseConnection()))
        self.b.listen(1000, factory)
        client, result = self.dial(self.a, B, 1000)
        self.assertTrue(self.settle(lambda: bool(client.lost and factory.built and factory.built[0].lost), 5))
        self.assertLostOnce(client, error.ConnectionDone)
        self.assertLostOnce(factory.built[0], error.ConnectionDone)

    def test_write_takes_bytes(self) -> None:
        client, result = self.dial(self.a, B, 7)
        self.settle(lambda: bool(result), 5)
        self.assertRaises(TypeError, result[0].write, "text")

    def test_loopback(self) -> None:
        """A connection to our own address goes through the stack twice, never the tunnel."""
        client, result = self.dial(self.a, A, 7, Recorder(on_made=lambda p: p.transport.write(b"self")))
        self.assertTrue(self.settle(lambda: client.data == b"self", 5))
        self.assertEqual(self.tunnel.log, [])
        self.assertEqual(len(self.a.connections()), 2)

    def test_cancel_dial(self) -> None:
        self.tunnel.down = True
        other, result = self.dial(self.a, B, 1000)
        client = Recorder()
        d = self.a.connect(B, 1000, client)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual((client.made, client.lost), (0, []))
        self.assertEqual([row["local_port"] for row in self.a.connections()], [49152])  # the other dial
        self.assertEqual((self.tunnel.log[-1][1].flags, self.tunnel.log[-1][1].src_port), (RST, 49153))


class RefusalTests(StackTestCase):

    def test_unbound_port_refused(self) -> None:
        client, result = self.dial(self.a, B, 1000)
        self.assertTrue(self.settle(lambda: bool(result), 5))
        failure = result[0]
        failure.trap(ConnectionFailed)
        self.assertIn("refused", failure.value.message)
        self.assertIn("port 1000", failure.value.hint)
        self.assertEqual((client.made, client.lost), (0, []))
        self.assertEqual(self.b.counters["refused.unbound"], 1)
        rst = self.tunnel.sent(B)[-1]
        self.assertEqual((rst.flags, rst.src_port, rst.dst_port, rst.ack), (RST, 1000, 49152, 1))
        self.assertEqual(self.a.connections(), [])

    def test_connect_timeout(self) -> None:
        self.tunnel.down = True
        client, result = self.dial(self.a, B, 1000, timeout=5)
        self.settle(lambda: bool(result), 4.9)
        self.assertEqual(result, [])
        self.settle(lambda: bool(result), 1)
        result[0].trap(Timeout)
        self.assertEqual(result[0].value.message, f"connecting to {B}:1000 timed out after 5 s")
        self.assertEqual(self.clock.seconds(), 5)
        self.assertEqual((client.made, client.lost), (0, []))
        self.assertEqual(self.a.connections(), [])

    def test_handshake_gives_up(self) -> None:
        """Without a timeout, the connection's own SYN schedule decides: 39 s."""
        self.tunnel.down = True
        client, result = self.dial(self.a, B, 1000)
        self.settle(lambda: bool(result))
        result[0].trap(Timeout)
        self.assertEqual(self.clock.seconds(), 39)
        self.assertEqual(self.a.connections(), [])

    def test_factory_declines(self) -> None:
        factory = RecordingFactory(lambda: None)
        self.b.listen(1000, factory)
        client, result = self.dial(self.a, B, 1000)
        self.assertTrue(self.settle(lambda: bool(client.lost), 5))
        self.assertLostOnce(client, error.ConnectionLost)
        self.assertEqual(len(factory.addresses), 1)

    def test_bad_arguments(self) -> None:
        cases: list[tuple[Any, Any, dict[str, Any]]] = [
            (B, 0, {}), (B, 65536, {}), (B, True, {}), ("B", 7, {}), (B, 7, {"timeout": 0})]
        for address, port, kw in cases:
            self.failureResultOf(self.a.connect(address, port, Recorder(), **kw), InvalidArgument)


class TrustGateTests(StackTestCase):
    """``b`` trusts nobody; ``a`` trusts everyone."""

    def setUp(self) -> None:
        super().setUp()
        self.trusted_by_b: set[int] = set()
        self.b = self.tunnel.add(B, trusted=self.trusted_by_b)

    def test_untrusted_refused_on_1000(self) -> None:
        factory = RecordingFactory()
        self.b.listen(1000, factory)
        client, result = self.dial(self.a, B, 1000)
        self.assertTrue(self.settle(lambda: bool(result), 5))
        result[0].trap(ConnectionFailed)
        self.assertEqual(self.b.counters["refused.untrusted"], 1)
        self.assertEqual((factory.built, factory.addresses), ([], []))
        self.assertEqual(self.b.connections(), [])

    def test_untrusted_reaches_444(self) -> None:
        factory = RecordingFactory(lambda: Recorder(on_data=upper_echo))
        client, server, transport = self.established(444, factory)
        transport.write(b"handshake")
        self.assertTrue(self.settle(lambda: client.data == b"HANDSHAKE", 5))
        self.assertEqual(self.b.counters["refused.untrusted"], 0)

    def test_echo_and_ping_refused(self) -> None:
        client, result = self.dial(self.a, B, 7)
        self.assertTrue(self.settle(lambda: bool(result), 5))
        result[0].trap(ConnectionFailed)
        ping = outcome(self.a.ping(B, 1))
        self.assertTrue(self.settle(lambda: bool(ping), 5))
        # the echo port is always open: a refusal there is the peer's distrust (issue 9)
        ping[0].trap(NotTrusted)
        self.assertIn("does not trust", ping[0].value.message)
        self.assertEqual(self.b.counters["refused.untrusted"], 2)

    def test_becomes_trusted(self) -> None:
        self.trusted_by_b.add(A.node)
        client, server, transport = self.established(1000)
        self.assertEqual(self.b.counters["refused.untrusted"], 0)

    def test_outgoing_to_untrusted_peer(self) -> None:
        """``b`` may dial ``a`` although it does not trust it: ``a`` decides, and trusts b."""
        factory = RecordingFactory(lambda: Recorder(on_data=upper_echo))
        self.a.listen(1000, factory)
        client, result = self.dial(self.b, A, 1000, Recorder(on_made=lambda p: p.transport.write(b"out")))
        self.assertTrue(self.settle(lambda: client.data == b"OUT", 5))
        self.assertEqual(self.b.counters["refused.untrusted"], 0)

    def test_datagrams_and_control_dropped(self) -> None:
        got: list[Any] = []
        self.b.bind_datagrams(5000, lambda *args: got.append(args))
        self.a.send_datagram(B, 5000, b"hello")
        self.a.send_datagram(B, 444, b"to 444 but unbound")
        self.tunnel.transmit(Packet(protocol=CONTROL, src=A, dst=B, src_port=49999, dst_port=0))
        self.settle(limit=1)
        self.assertEqual(got, [])
        self.assertEqual(self.b.counters["refused.untrusted"], 2)
        self.assertEqual(self.b.counters["dropped.datagram_unbound"], 1)
        self.assertEqual(self.tunnel.sent(B), [])

    def test_trust_ends_mid_connection(self) -> None:
        self.trusted_by_b.add(A.node)
        client, server, transport = self.established(1000)
        self.trusted_by_b.clear()
        transport.write(b"after revocation")
        self.assertTrue(self.settle(lambda: bool(client.lost and server.lost), 5))
        self.assertLostOnce(client, error.ConnectionLost)
        self.assertLostOnce(server, error.ConnectionAborted)
        self.assertEqual(bytes(server.data), b"")
        self.assertEqual(self.b.counters["refused.untrusted"], 1)

    def test_is_trusted_raising_means_untrusted(self) -> None:
        def broken(node: int) -> bool:
            raise RuntimeError("trust store unavailable")

        b = Stack(self.clock, lambda: B, self.tunnel.sender(B), broken)
        self.tunnel.stacks[B.node] = b
        client, result = self.dial(self.a, B, 7)
        self.assertTrue(self.settle(lambda: bool(result), 5))
        result[0].trap(ConnectionFailed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class HandFedTestCase(SynchronousTestCase):
    """One stack at B whose packets are collected; packets are fed by hand."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.out: list[Packet] = []
        self.trusted = True
        self.untrusted: set[int] = set()
        self.stack = Stack(self.clock, lambda: B, self.out.append,
                           lambda node: self.trusted and node not in self.untrusted)
        self.factory = RecordingFactory()

    def take(self) -> list[Packet]:
        out, self.out[:] = list(self.out), []
        return out

    def feed(self, flags: int, node: int = 0x5000, src_port: int = 50000, dst_port: int = 1000,
             **kw: Any) -> None:
        fields: dict[str, Any] = dict(protocol=STREAM, flags=flags, src=Address(0, node), dst=B,
                                      src_port=src_port, dst_port=dst_port, window=512)
        fields.update(kw)
        self.stack.packet_received(Packet(**fields))

    def answers(self) -> list[int]:
        return [p.flags for p in self.take()]


class LimitTests(HandFedTestCase):

    def test_untrusted_half_open_cap(self) -> None:
        """
        At most 64 handshakes in progress from untrusted nodes: past it the
        oldest handshake of the node holding the most is reset, and the new
        SYN is answered (an attacker cannot keep port 444 full).
        """
        self.trusted = False
        self.stack.listen(444, self.factory)
        for i in range(64):
            self.feed(SYN, node=0x5000 + i // 4, src_port=50000 + i % 4, dst_port=444)
        self.assertEqual(self.answers(), [SYN | ACK] * 64)
        self.feed(SYN, node=0x6000, dst_port=444)
        rst, synack = self.take()
        self.assertEqual((rst.flags, rst.dst, rst.dst_port), (RST, Address(0, 0x5000), 50000))
        self.assertEqual((synack.flags, synack.dst), (SYN | ACK, Address(0, 0x6000)))
        self.assertEqual(self.stack.counters["reset.half_open"], 1)
        self.assertEqual(len(self.stack.connections()), 64)
        self.feed(ACK, node=0x5001, seq=1, ack=1, dst_port=444)  # one handshake completes: room for one
        self.assertEqual(len(self.factory.built), 1)
        self.feed(SYN, node=0x6001, dst_port=444)
        self.assertEqual(self.answers(), [SYN | ACK])
        self.assertEqual(self.stack.counters["reset.half_open"], 1)
        self.trusted = True  # the untrusted nodes' cap is theirs alone
        self.feed(SYN, node=0x7000, dst_port=444)
        self.assertEqual(self.answers(), [SYN | ACK])
        self.assertEqual(self.stack.counters["reset.half_open"], 1)

    def test_half_open_cap_sheds_the_heaviest_node(self) -> None:
        self.patch(limits, "HALF_OPEN", 10)
        self.stack.listen(1000, self.factory)
        for port in range(50000, 50008):
            self.feed(SYN, node=0x5000, src_port=port)
        self.feed(SYN, node=0x5001, src_port=50000)
        self.feed(SYN, node=0x5001, src_port=50001)
        self.assertEqual(self.answers(), [SYN | ACK] * 10)
        self.feed(SYN, node=0x5002)  # a light node gets in; the heavy one's oldest goes
        rst, synack = self.take()
        self.assertEqual((rst.flags, rst.dst, rst.dst_port), (RST, Address(0, 0x5000), 50000))
        self.assertEqual((synack.flags, synack.dst), (SYN | ACK, Address(0, 0x5002)))
        self.feed(SYN, node=0x5000, src_port=50100)  # the heavy node only displaces itself
        rst, synack = self.take()
        self.assertEqual((rst.dst, rst.dst_port, synack.dst), (Address(0, 0x5000), 50001, Address(0, 0x5000)))
        nodes = collections.Counter(c["remote_addr"] for c in self.stack.connections())
        self.assertEqual(sorted(nodes.values()), [1, 2, 7])
        self.assertEqual(self.stack.counters["reset.half_open"], 2)

    def test_half_open_frees_on_handshake_timeout(self) -> None:
        self.patch(limits, "HALF_OPEN", 64)
        self.stack.listen(1000, self.factory)
        for i in range(64):
            self.feed(SYN, node=0x5000 + i)
        self.clock.advance(61)
        run_until(self.clock, lambda: not self.stack.connections(), 60)
        self.assertEqual(self.stack.connections(), [])
        self.assertEqual(self.stack.streams.half_open_count, {True: 0, False: 0})
        self.take()
        self.feed(SYN, node=0x6000)
        self.assertEqual(self.answers(), [SYN | ACK])
        self.assertEqual(self.stack.counters["reset.half_open"], 0)

    def test_per_port_limit(self) -> None:
        self.patch(limits, "MAX_PER_PORT", 5)
        self.stack.listen(1000, self.factory)
        self.stack.listen(1001, self.factory)
        for i in range(5):
            self.feed(SYN, node=0x5000 + i)
        self.feed(SYN, node=0x6000)
        self.feed(SYN, node=0x6000, dst_port=1001)
        self.assertEqual(self.answers(), [SYN | ACK] * 5 + [RST, SYN | ACK])
        self.assertEqual(self.stack.counters["refused.limit"], 1)

    def test_total_limit(self) -> None:
        self.patch(limits, "MAX_CONNECTIONS", 3)
        self.stack.listen(1000, self.factory)
        for i in range(3):
            self.feed(SYN, node=0x5000 + i)
        self.feed(SYN, node=0x6000, dst_port=7)
        self.assertEqual(self.answers(), [SYN | ACK] * 3 + [RST])
        self.assertEqual(self.stack.counters["refused.limit"], 1)
        failure = self.failureResultOf(self.stack.connect(C, 1000, Recorder()), ConnectionFailed)
        self.assertIn("3 connections", failure.value.message)

    def test_syn_rate_per_trusted_node(self) -> None:
        """A trusted node: a burst of 1024 new streams (one port's worth), then 1000 a second."""
        self.stack.listen(1000, self.factory)
        self.stack.listen(1001, self.factory)
        for i in range(1025):
            self.feed(SYN, src_port=10000 + i, dst_port=1000 + i // 1024)
        self.assertEqual(self.answers(), [SYN | ACK] * 1024)  # the 1025th is dropped without an RST
        self.assertEqual(self.stack.counters["dropped.syn_rate"], 1)
        self.feed(SYN, node=0x5001, dst_port=1001)  # another node is not affected
        self.assertEqual(self.answers(), [RST, SYN | ACK])  # (the half-open cap sheds the heavy node)
        self.clock.advance(0.001)  # one token back
        self.feed(SYN, src_port=20000, dst_port=1001)
        self.feed(SYN, src_port=20001, dst_port=1001)
        self.assertEqual(self.answers(), [RST, SYN | ACK])
        self.assertEqual(self.stack.counters["dropped.syn_rate"], 2)

    def test_syn_rate_per_untrusted_node(self) -> None:
        """An untrusted node: the reference's 10 a second, burst 10."""
        self.trusted = False
        self.stack.listen(444, self.factory)
        for port in range(50000, 50011):
            self.feed(SYN, src_port=port)
        self.assertEqual(self.answers(), [RST] * 10)  # refused.untrusted; the 11th dropped silently
        self.assertEqual(self.stack.counters["dropped.syn_rate"], 1)
        self.clock.advance(0.1)  # one token back
        self.feed(SYN, src_port=50011)
        self.feed(SYN, src_port=50012)
        self.assertEqual(self.answers(), [RST])
        self.assertEqual(self.stack.counters["dropped.syn_rate"], 2)

    def test_syn_rate_untrusted_nodes_together(self) -> None:
        """All untrusted nodes share the reference's 100 a second; trusted nodes are not held to it."""
        self.untrusted.update(range(0x5000, 0x5000 + 101))
        for i in range(101):
            self.feed(SYN, node=0x5000 + i, dst_port=1000)
        self.assertEqual(self.answers(), [RST] * 100)
        self.assertEqual(self.stack.counters["dropped.syn_rate"], 1)
        self.stack.listen(1000, self.factory)
        self.feed(SYN, node=0x6000)
        self.assertEqual(self.answers(), [SYN | ACK])

    def test_repeated_syn_not_rate_limited(self) -> None:
        """A SYN for a connection we have is the connection's business (SYN+ACK again), not a new one."""
        self.stack.listen(1000, self.factory)
        for port in range(50000, 50010):
            self.feed(SYN, src_port=port)
        self.take()
        self.feed(SYN, src_port=50000)
        self.assertEqual(self.answers(), [SYN | ACK])
        self.assertEqual(self.stack.counters["dropped.syn_rate"], 0)

    def test_untrusted_syn_counts_against_the_node(self) -> None:
        self.trusted = False
        for port in range(50000, 50011):
            self.feed(SYN, src_port=port)
        self.assertEqual(self.answers(), [RST] * 10)
        self.assertEqual(self.stack.counters["refused.untrusted"], 10)
        self.assertEqual(self.stack.counters["dropped.syn_rate"], 1)

    def test_untrusted_node_holds_few_connections(self) -> None:
        """Port 444 is open to untrusted nodes, but one of them holds at most 4 connections there."""
        self.trusted = False
        self.stack.listen(444, self.factory)
        for port in range(50000, 50005):
            self.feed(SYN, src_port=port, dst_port=444)
        self.assertEqual(self.answers(), [SYN | ACK] * 4 + [RST])
        self.assertEqual(self.stack.counters["refused.limit"], 1)
        self.feed(SYN, node=0x5001, dst_port=444)  # another node has its own allowance
        self.feed(RST, src_port=50000, dst_port=444)  # one of the four goes away
        self.feed(SYN, src_port=50005, dst_port=444)
        self.assertEqual(self.answers(), [SYN | ACK] * 2)
        self.trusted = True
        for port in range(50010, 50015):
            self.feed(SYN, src_port=port, dst_port=444, node=0x5002)
        self.assertEqual(self.answers(), [SYN | ACK] * 5)

    def test_listener_closed_during_handshake(self) -> None:
        listening = self.stack.listen(1000, self.factory)
        self.feed(SYN)
        listening.close()
        self.take()
        self.feed(ACK, seq=1, ack=1)
        self.assertEqual(self.answers(), [RST])
        self.assertEqual((self.factory.built, self.stack.connections()), ([], []))

    def test_build_protocol_raising(self) -> None:
        def broken() -> Recorder:
            raise ZeroDivisionError()

        self.stack.listen(1000, RecordingFactory(broken))
        self.feed(SYN)
        self.take()
        self.feed(ACK, seq=1, ack=1)
        self.assertEqual(self.answers(), [RST])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.stack.connections(), [])

    def test_stray_packets(self) -> None:
        """A packet for no connection gets an RST, unless it is an RST itself."""
        self.feed(ACK, seq=100, ack=200, payload=b"data")
        [rst] = self.take()
        self.assertEqual((rst.flags, rst.seq, rst.ack, rst.src_port, rst.dst_port),
                         (RST, 200, 104, 1000, 50000))
        self.feed(FIN, seq=5)
        self.assertEqual([(p.flags, p.ack) for p in self.take()], [(RST, 6)])
        self.feed(RST)
        self.feed(SYN | ACK)
        self.assertEqual(self.answers(), [RST])
        self.assertEqual(self.stack.counters["reset.no_connection"], 3)
        self.assertEqual(self.stack.counters["dropped.no_connection"], 1)

    def test_not_for_us(self) -> None:
        self.stack.listen(1000, self.factory)
        self.feed(SYN, dst=C)
        self.stack.packet_received(Packet(protocol=CONTROL, src=A, dst=C))
        self.assertEqual(self.take(), [])
        self.assertEqual(self.stack.counters["dropped.not_for_us"], 2)

    def test_only_the_node_id_must_match(self) -> None:
        self.stack.listen(1000, self.factory)
        self.feed(SYN, dst=Address(7, B.node))
        self.assertEqual(self.answers(), [SYN | ACK])

    def test_syn_in_time_wait_opens_a_new_connection(self) -> None:
        self.stack.listen(1000, self.factory)
        self.feed(SYN)
        self.feed(ACK, seq=1, ack=1, payload=b"one")
        self.feed(FIN | ACK, seq=4, ack=1)
        self.assertEqual(self.stack.connections(), [])  # TIME_WAIT is kept apart (docs/stack.md)
        self.assertIn((Address(0, 0x5000), 50000, 1000), self.stack.time_waits)
        self.take()
        self.feed(SYN)
        self.assertEqual(self.answers(), [SYN | ACK])
        self.feed(ACK, seq=1, ack=1, payload=b"two")
        self.assertEqual([bytes(p.data) for p in self.factory.built], [b"one", b"two"])
        self.assertEqual([len(p.lost) for p in self.factory.built], [1, 0])
        self.assertEqual(len(self.stack.connections()), 1)


class EphemeralPortTests(SynchronousTestCase):

    def test_sequential_wrap_skip(self) -> None:
        taken = {49153, 65535}
        ports = EphemeralPorts(taken.__contains__)
        self.assertEqual([ports.allocate() for _ in range(3)], [49152, 49154, 49155])
        ports.next = 65534
        self.assertEqual([ports.allocate() for _ in range(3)], [65534, 49152, 49154])

    def test_exhausted(self) -> None:
        ports = EphemeralPorts(lambda port: port != 60000)
        ports.next = 60001
        self.assertEqual(ports.allocate(), 60000)
        ports = EphemeralPorts(lambda port: True, first=50000, last=50009)
        failure = self.assertRaises(ConnectionFailed, ports.allocate)
        self.assertIn("10 ephemeral ports", failure.message)

    def test_stack_allocation(self) -> None:
        clock = Clock()
        out: list[Packet] = []
        stack = Stack(clock, lambda: A, out.append, lambda node: True)
        stack.connect(B, 1000, Recorder())
        stack.listen(49153, RecordingFactory())
        stack.bind_datagrams(49154, lambda *a: None)
        stack.connect(B, 1000, Recorder())
        self.assertEqual(stack.send_datagram(B, 5000, b"x"), 49156)
        stack.ephemeral.next = 65535
        stack.connect(B, 1000, Recorder())
        stack.connect(B, 1000, Recorder())  # wraps; skips the held 49152-49155, 49156 was only lent
        syns = [p for p in out if p.flags == SYN]
        self.assertEqual([p.src_port for p in syns], [49152, 49155, 65535, 49156])
        self.assertEqual([p.src_port for p in out if p.protocol == DATAGRAM], [49156])

    def test_port_freed_when_released(self) -> None:
        clock = Clock()
        out: list[Packet] = []
        stack = Stack(clock, lambda: A, out.append, lambda node: True)
        d = stack.connect(B, 1000, Recorder())
        d.cancel()
        self.failureResultOf(d, CancelledError)
        stack.ephemeral.next = 49152
        stack.connect(B, 1000, Recorder())
        self.assertEqual([p.src_port for p in out if p.flags == SYN], [49152, 49152])


class DatagramTests(StackTestCase):

    def setUp(self) -> None:
        super().setUp()
        self.got: list[tuple[Address, int, bytes]] = []
        self.binding = self.b.bind_datagrams(5000, lambda *args: self.got.append(args))

    def test_send_receive(self) -> None:
        self.assertEqual(self.a.send_datagram(B, 5000, b"hello"), 49152)
        self.assertEqual(self.a.send_datagram(B, 5000, bytearray(b"again"), src_port=1234), 1234)
        self.settle(limit=1)
        self.assertEqual(self.got, [(A, 49152, b"hello"), (A, 1234, b"again")])
        packet = self.tunnel.sent(A)[0]
        self.assertEqual((packet.protocol, packet.flags, packet.seq, packet.ack, packet.dst_port),
                         (DATAGRAM, 0, 0, 0, 5000))
        self.assertEqual((self.a.counters["datagrams.sent"], self.b.counters["datagrams.received"]), (2, 2))

    def test_unbound_port_dropped(self) -> None:
        self.a.send_datagram(B, 5001, b"nobody")
        self.binding.close()
        self.binding.close()
        self.a.send_datagram(B, 5000, b"closed")
        self.settle(limit=1)
        self.assertEqual(self.got, [])
        self.assertEqual(self.b.counters["dropped.datagram_unbound"], 2)
        self.assertEqual(self.tunnel.sent(B), [])

    def test_size_limit(self) -> None:
        biggest = b"x" * MAX_DATAGRAM
        self.assertEqual(MAX_DATAGRAM, 65535 - 34)
        self.a.send_datagram(B, 5000, biggest)
        self.settle(limit=1)
        self.assertEqual(self.got, [(A, 49152, biggest)])
        failure = self.assertRaises(InvalidArgument, self.a.send_datagram, B, 5000, biggest + b"x")
        self.assertIn("65502 bytes", failure.message)

    def test_bad_arguments(self) -> None:
        for args in [(B, 0, b"x"), (B, 65536, b"x"), (B, 5000, "text"), (Address(0, 0xFFFFFFFF), 5000, b"x"),
                     ("0:0000.0000.2222", 5000, b"x"), (B, 5000, b"x", 0)]:
            self.assertRaises(InvalidArgument, self.a.send_datagram, *args)

    def test_bind_twice(self) -> None:
        self.assertRaises(AlreadyExists, self.b.bind_datagrams, 5000, lambda *a: None)
        self.binding.close()
        self.b.bind_datagrams(5000, lambda *a: None)
        self.assertRaises(InvalidArgument, self.b.bind_datagrams, 0, lambda *a: None)

    def test_receiver_raising_is_logged(self) -> None:
        self.b.bind_datagrams(5001, explode)
        self.a.send_datagram(B, 5001, b"boom")
        self.settle(limit=1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.b.counters["errors"], 0)


class ControlPingTests(HandFedTestCase):

    def request(self, **kw: Any) -> Packet:
        fields: dict[str, Any] = dict(protocol=CONTROL, src=A, dst=B, src_port=49999, dst_port=0,
                                      seq=0xFFFFFFFF, payload=b"probe")
        fields.update(kw)
        return Packet(**fields)

    def test_answer_shape(self) -> None:
        self.stack.packet_received(Packet.decode(self.request().encode()))
        [reply] = self.take()
        self.assertEqual(
            (reply.protocol, reply.flags, reply.src, reply.src_port, reply.dst, reply.dst_port,
             reply.seq, reply.ack, reply.payload),
            (CONTROL, ACK, B, 0, A, 49999, 0xFFFFFFFF, 0, b"probe"))
        self.assertEqual(Packet.decode(reply.encode()), reply)
        self.stack.packet_received(self.request(seq=41, payload=b""))
        [reply] = self.take()
        self.assertEqual((reply.seq, reply.ack), (41, 42))
        self.assertEqual(self.stack.counters["ping.answered"], 2)

    def test_not_answered(self) -> None:
        self.stack.packet_received(self.request(flags=ACK))  # an answer: never answered (no ping-pong)
        self.stack.packet_received(self.request(dst_port=9))
        self.assertEqual(self.take(), [])
        self.assertEqual(self.stack.counters["dropped.control"], 2)
        self.trusted = False
        self.stack.packet_received(self.request())
        self.assertEqual(self.take(), [])
        self.assertEqual(self.stack.counters["refused.untrusted"], 1)


class PingTests(StackTestCase):

    def test_rtt(self) -> None:
        """
        Round trip from the dial to the whole echo, as the reference times it:
        the handshake (2 x 5 ms) and the echo (2 x 5 ms) here.
        """
        result = outcome(self.a.ping(B, 7, timeout=5))
        self.assertTrue(self.settle(lambda: bool(result), 5))
        self.assertAlmostEqual(result[0], 20.0)
        payloads = [p.payload for p in self.tunnel.sent() if p.payload]
        self.assertEqual(payloads, [b"ping-7", b"ping-7"])
        self.settle(limit=30)
        self.assertEqual((self.a.connections(), self.b.connections()), ([], []))
        self.assertEqual(self.a._calls, set())

    def test_seven_datagrams_four_in_sequence(self) -> None:
        """
        The third ACK rides on ``ping-N``, and the FIN+ACK that answers our
        FIN gets no ACK (docs/stack.md, "ping"): 7 datagrams, 4 of them one
        after the other (20 ms: four of the fake tunnel's 5 ms trips).
        """
        result = outcome(self.a.ping(B, 3, timeout=5))
        self.settle(limit=30)
        self.assertAlmostEqual(result[0], 20.0)
        shape = [("a" if p.src == A else "b", p.flags, p.payload) for p in self.tunnel.sent()]
        self.assertEqual(shape, [("a", SYN, b""), ("b", SYN | ACK, b""), ("a", ACK, b"ping-3"),
                                 ("b", ACK, b"ping-3"), ("a", ACK, b""), ("a", FIN, b""),
                                 ("b", FIN | ACK, b"")])

    def test_timeout(self) -> None:
        self.tunnel.down = True
        result = outcome(self.a.ping(B, 1, timeout=3))
        self.settle(lambda: bool(result), 10)
        result[0].trap(Timeout)
        self.assertEqual(self.clock.seconds(), 3)
        self.assertIn("within 3 s", result[0].value.message)
        self.assertEqual(self.a.connections(), [])

    def test_no_echo_after_connect(self) -> None:
        self.tunnel.rules.append(lambda p: p.src == B and bool(p.payload))
        result = outcome(self.a.ping(B, 1, timeout=3))
        self.settle(lambda: bool(result), 10)
        result[0].trap(Timeout)
        self.settle(limit=1)
        self.assertEqual(self.a.connections(), [])

    def test_bad_arguments(self) -> None:
        cases: list[dict[str, Any]] = [{"seq": -1}, {"seq": "1"}, {"timeout": 0}, {"timeout": None}]
        for kw in cases:
            self.failureResultOf(self.a.ping(B, **kw), InvalidArgument)

    def test_no_echo_service(self) -> None:
        b = self.tunnel.add(B, echo=False)
        self.assertEqual(b.ports(), [])
        result = outcome(self.a.ping(B, 1))
        self.settle(lambda: bool(result), 10)
        # an RST on port 7 reads as distrust: every node (ours, the reference's) keeps echo open
        result[0].trap(NotTrusted)
        self.assertIn("refused our ping", result[0].value.message)

    def test_wrong_echo(self) -> None:
        b = self.tunnel.add(B, echo=False)
        b.listen(7, RecordingFactory(lambda: Recorder(on_data=upper_echo)))
        result = outcome(self.a.ping(B, 1))
        self.settle(lambda: bool(result), 10)
        result[0].trap(ConnectionFailed)
        self.assertIn("PING-1", result[0].value.message)


@implementer(IPushProducer)
class Source:
    """A streaming producer writing ``total`` bytes in ``chunk``-sized writes whenever it is not paused."""

    def __init__(self, transport: StreamTransport, total: int, chunk: int = 8192) -> None:
        self.transport = transport
        self.data = pattern(total, seed=3)
        self.chunk = chunk
        self.sent = 0
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1
        self.produce()

    def stopProducing(self) -> None:
        self.stopped = True

    def produce(self) -> None:
        while not self.paused and self.sent < len(self.data):
            self.transport.write(self.data[self.sent:self.sent + self.chunk])
            self.sent += self.chunk
        if self.sent >= len(self.data):
            self.transport.unregisterProducer()
            self.transport.loseConnection()


class BackpressureTests(StackTestCase):

    def setUp(self) -> None:
        super().setUp()
        config = ConnectionConfig(recv_queue_segments=8)
        kw: dict[str, Any] = dict(config=config, send_buffer_high=64 * 1024, send_buffer_low=16 * 1024)
        self.a = self.tunnel.add(A, **kw)
        self.b = self.tunnel.add(B, **kw)

    def test_streaming_producer_paused_and_resumed(self) -> None:
        factory = RecordingFactory(lambda: Recorder(on_made=lambda p: p.transport.pauseProducing()))
        client, server, transport = self.established(1000, factory)
        source = Source(transport, 512 * 1024)
        transport.registerProducer(source, True)
        source.produce()
        self.assertTrue(source.paused)
        self.settle(limit=20)  # the reader is stopped: the window closes, the buffer stays full
        self.assertTrue(source.paused)
        self.assertEqual(source.pauses, 1)
        self.assertLessEqual(source.sent, 64 * 1024 + 8192)
        self.assertEqual(bytes(server.data), b"")
        self.assertGreater(transport.buffered, 16 * 1024)
        self.assertEqual(client.lost, [])

        server.transport.resumeProducing()
        self.assertTrue(self.settle(lambda: bool(server.lost), 60))
        self.assertEqual(bytes(server.data), source.data)
        self.assertGreater(source.resumes, 3)
        self.assertFalse(source.stopped)
        self.assertLostOnce(server, error.ConnectionDone)

    def test_pull_producer(self) -> None:
        factory = RecordingFactory()
        client, server, transport = self.established(1000, factory)
        data = pattern(300 * 1024, seed=5)
        done = outcome(FileSender().beginFileTransfer(io.BytesIO(data), transport))
        self.assertTrue(self.settle(lambda: bool(done), 60))
        transport.loseConnection()
        self.assertTrue(self.settle(lambda: bool(server.lost), 60))
        self.assertEqual(bytes(server.data), data)

    def test_echo_stops_reading_when_its_peer_does_not(self) -> None:
        """The echo service's buffer is bounded: it stops reading while its writes are not acknowledged."""
        data = pattern(600 * 1024, seed=9)
        client, result = self.dial(self.a, B, 7)
        self.assertTrue(self.settle(lambda: bool(result), 5))
        transport = result[0]
        transport.pauseProducing()
        transport.write(data)
        self.settle(limit=20)
        [echo_side] = [c for c in self.b.connections() if c["local_port"] == 7]
        self.assertLess(echo_side["bytes_sent"], 200 * 1024)
        transport.resumeProducing()
        self.assertTrue(self.settle(lambda: len(client.data) >= len(data), 120))
        self.assertEqual(bytes(client.data), data)

    def test_register_twice_and_after_close(self) -> None:
        client, server, transport = self.established(1000)
        source = Source(transport, 10)
        transport.registerProducer(source, True)
        self.assertRaises(RuntimeError, transport.registerProducer, Source(transport, 10), True)
        transport.unregisterProducer()
        transport.loseConnection()
        late = Source(transport, 10)
        transport.registerProducer(late, True)
        self.assertTrue(late.stopped)

    def test_producer_stopped_when_connection_lost(self) -> None:
        client, server, transport = self.established(1000)
        source = Source(transport, 10)
        transport.registerProducer(source, True)
        server.transport.abortConnection()
        self.assertTrue(self.settle(lambda: bool(client.lost), 5))
        self.assertTrue(source.stopped)


class LifecycleTests(StackTestCase):
    """``connectionLost`` exactly once, whichever way a connection ends."""

    def later(self) -> None:
        self.settle(limit=300)

    def test_client_closes(self) -> None:
        client, server, transport = self.established()
        transport.loseConnection()
        transport.loseConnection()
        self.later()
        self.assertLostOnce(client, error.ConnectionDone)
        self.assertLostOnce(server, error.ConnectionDone)

    def test_server_closes(self) -> None:
        client, server, transport = self.established()
        server.transport.loseConnection()
        self.later()
        self.assertLostOnce(client, error.ConnectionDone)
        self.assertLostOnce(server, error.ConnectionDone)

    def test_abort(self) -> None:
        client, server, transport = self.established()
        transport.abortConnection()
        transport.abortConnection()
        transport.loseConnection()
        self.later()
        self.assertLostOnce(client, error.ConnectionAborted)
        self.assertLostOnce(server, error.ConnectionLost)

    def test_reset_by_restarted_peer(self) -> None:
        client, server, transport = self.established()
        self.tunnel.add(B)  # b restarts and forgets the connection
        transport.write(b"anyone there?")
        self.later()
        self.assertLostOnce(client, error.ConnectionLost)

    def test_peer_vanishes(self) -> None:
        client, server, transport = self.established()
        self.tunnel.down = True
        transport.write(b"into the void")
        self.later()
        self.assertLostOnce(client, error.TimeoutError)  # retransmissions exhausted
        self.assertLostOnce(server, error.TimeoutError)  # idle timeout
        self.assertEqual((self.a.connections(), self.b.connections()), ([], []))

    def test_protocol_raises(self) -> None:
        factory = RecordingFactory(lambda: Recorder(on_data=explode))
        client, server, transport = self.established(1000, factory)
        transport.write(b"boom")
        self.later()
        self.assertLostOnce(server, ZeroDivisionError)
        self.assertLostOnce(client, error.ConnectionLost)

    def test_connection_lost_raising_is_logged(self) -> None:
        client, server, transport = self.established()

        def bad(reason: Failure) -> None:
            raise ZeroDivisionError()

        client.connectionLost = bad  # type: ignore[method-assign]
        transport.abortConnection()
        self.later()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.a.connections(), [])

    def test_stop(self) -> None:
        factory = RecordingFactory()
        self.a.listen(2000, factory)
        client, server, transport = self.established()  # a -> b
        inbound, result = self.dial(self.b, A, 2000)  # b -> a
        self.assertTrue(self.settle(lambda: bool(result and factory.built), 5))
        pending, dial = self.dial(self.a, C, 1000)  # nobody at C
        timed, timed_dial = self.dial(self.a, C, 1000, timeout=30)
        ping = outcome(self.a.ping(C, 1, timeout=30))
        self.a.bind_datagrams(5000, lambda *args: None)

        self.a.stop()
        self.a.stop()
        self.assertLostOnce(client, error.ConnectionAborted)
        self.assertLostOnce(factory.built[0], error.ConnectionAborted)
        for box in (dial, timed_dial, ping):
            box[0].trap(ConnectionFailed)
        self.assertIn("stopping", dial[0].value.message)
        self.assertEqual((pending.made, pending.lost), (0, []))
        self.assertEqual(factory.stopped, 1)
        self.assertEqual(self.a.connections(), [])
        self.assertEqual(self.a.ports(), [])
        self.assertEqual(self.a._calls, set())

        self.later()
        self.assertLostOnce(server, error.ConnectionLost)
        self.assertLostOnce(inbound, error.ConnectionLost)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.a.counters["errors"], 0)
        self.a.packet_received(Packet(protocol=STREAM, flags=SYN, src=B, dst=A, dst_port=7))
        self.assertEqual(self.a.counters["dropped.stopped"], 1)
        self.failureResultOf(self.a.connect(B, 7, Recorder()), NotRunning)
        self.assertRaises(NotRunning, self.a.listen, 3000, factory)
        self.assertRaises(NotRunning, self.a.send_datagram, B, 5000, b"x")


class ListenTests(StackTestCase):

    def test_already_bound(self) -> None:
        factory = RecordingFactory()
        listening = self.b.listen(1000, factory)
        self.assertEqual(factory.started, 1)
        self.assertRaises(AlreadyExists, self.b.listen, 1000, RecordingFactory())
        self.assertRaises(AlreadyExists, self.b.listen, 7, RecordingFactory())  # the echo service
        self.assertEqual(self.b.ports(), [7, 1000])
        listening.close()
        listening.close()
        self.assertEqual(factory.stopped, 1)
        self.assertEqual(self.b.ports(), [7])
        self.successResultOf(listening.stopListening())
        self.b.listen(1000, factory)
        for port in (0, -1, 65536, "1000", None):
            self.assertRaises(InvalidArgument, self.b.listen, port, factory)

    def test_close_keeps_accepted_connections(self) -> None:
        factory = RecordingFactory(lambda: Recorder(on_data=upper_echo))
        listening = self.b.listen(1000, factory)
        client, server, transport = self.established(1000)
        listening.close()
        transport.write(b"still here")
        self.assertTrue(self.settle(lambda: client.data == b"STILL HERE", 5))
        refused, result = self.dial(self.a, B, 1000)
        self.assertTrue(self.settle(lambda: bool(result), 5))
        result[0].trap(ConnectionFailed)


class InspectionTests(StackTestCase):

    def test_connections(self) -> None:
        client, server, transport = self.established()
        transport.write(b"x" * 5000)
        self.settle(limit=1)
        [row] = self.a.connections()
        self.assertEqual(tuple(row), CONN_LIST_FIELDS)
        self.assertEqual((row["id"], row["local_port"], row["remote_addr"], row["remote_port"], row["state"]),
                         (1, 49152, str(B), 1000, "ESTABLISHED"))
        self.assertEqual(row["bytes_sent"], 5000)
        [other] = self.b.connections()
        self.assertEqual((other["local_port"], other["remote_addr"], other["bytes_recv"]),
                         (1000, str(A), 5000))

    def test_disconnect(self) -> None:
        client, server, transport = self.established()
        [row] = self.a.connections()
        self.assertRaises(NotFound, self.a.disconnect, row["id"] + 1)
        self.a.disconnect(row["id"])
        self.assertLostOnce(client, error.ConnectionAborted)

    def test_abort_peer(self) -> None:
        client1, server1, _ = self.established()
        client2, server2, _ = self.established()
        self.assertEqual(self.b.abort_peer(A.node), 2)
        self.assertEqual(self.b.abort_peer(C.node), 0)
        self.settle(limit=1)
        for protocol in (client1, client2):
            self.assertLostOnce(protocol, error.ConnectionLost)

    def test_abort_peer_spares_a_port(self) -> None:
        client, server, _ = self.established()
        self.assertEqual(self.b.abort_peer(A.node, spare_port=1000), 0)  # established() dials port 1000
        self.settle(limit=1)
        self.assertEqual(client.lost, [])
        self.assertEqual(self.b.abort_peer(A.node), 1)

    def test_errors_have_hints(self) -> None:
        failure = self.failureResultOf(self.a.connect(B, 0, Recorder()), PilotError)
        self.assertTrue(failure.value.hint)


class GarbageTests(SynchronousTestCase):
    """Nothing a peer sends makes the stack raise."""

    def test_random_packets_in_every_state(self) -> None:
        clock = Clock()
        tunnel = FakeTunnel(clock)
        a = tunnel.add(A)
        b = tunnel.add(B, trusted={C.node})
        factory = RecordingFactory(lambda: Recorder(on_data=upper_echo))
        b.listen(1000, factory)
        b.listen(444, factory)
        b.bind_datagrams(5000, lambda *args: None)
        clients = [Recorder() for _ in range(4)]
        for client in clients:
            a.connect(B, 444, client)
        rng = random.Random(11)
        sources = [A, B, C, Address(1, A.node)]
        ports = [0, 7, 444, 1000, 5000, 49152, 49153, 49154, 65535]
        for step in range(3000):
            packet = Packet(
                flags=rng.randrange(16), protocol=rng.choice([0, 1, 2, 3, 4, 255]),
                src=rng.choice(sources), dst=rng.choice([A, B, C]),
                src_port=rng.choice(ports), dst_port=rng.choice(ports),
                seq=rng.choice([0, 1, 2, 0xFFFFFFFF, rng.randrange(1 << 32)]),
                ack=rng.choice([0, 1, 2, 0xFFFFFFFF, rng.randrange(1 << 32)]),
                window=rng.choice([0, 1, 512, 0xFFFF]),
                payload=rng.choice([b"", b"data", b"SACK\x01\x00\x00\x00\x01\x00\x00\x00\x05",
                                    b"\x00" * rng.randrange(5000)]))
            rng.choice([a, b]).packet_received(packet)
            if step % 50 == 0:
                clock.advance(rng.choice([0.0, 0.01, 0.5, 3.0]))
        for thing in [None, b"\x00" * 40, "packet", 42]:
            a.packet_received(thing)  # type: ignore[arg-type]
        run_until(clock, lambda: False, 300)
        self.assertEqual(a.counters["errors"] + b.counters["errors"], 0)
        self.assertEqual(a.counters["dropped.malformed"], 4)
        self.assertEqual(self.flushLoggedErrors(), [])
        for protocol in clients + factory.built:
            self.assertLessEqual(len(protocol.lost), 1)
        a.stop()
        b.stop()
        run_until(clock, lambda: False, 300)
        for protocol in clients + factory.built:
            self.assertEqual(len(protocol.lost), protocol.made)


class WayUpTests(StackTestCase):
    """A received data packet goes up once: each file on its way is entered once, in layer order."""

    def test_data_packet_walk(self) -> None:
        walks: list[list[str]] = []

        def record(protocol: Recorder, data: bytes) -> None:
            files = [frame.filename for frame in reversed(inspect.stack())]
            root = str(Path(pilot.__file__).parent.parent) + "/"
            # the machines' input dispatch (Automat's, or indexed()'s in table.py) is no layer
            ours = [f[len(root):] for f in files
                    if f.startswith(root + "pilot/") and f != root + "pilot/machines/table.py"]
            walks.append([f for i, f in enumerate(ours) if i == 0 or ours[i - 1] != f])

        factory = RecordingFactory(lambda: Recorder(on_data=record))
        self.b.listen(1000, factory)
        client, result = self.dial(self.a, B, 1000)
        self.assertTrue(self.settle(lambda: bool(result) and bool(factory.built), 5))
        result[0].write(b"up once")
        self.assertTrue(self.settle(lambda: bool(walks), 5))
        self.assertEqual(walks[0], [
            "pilot/stack/demux.py",                    # Stack.packet_received: which connection
            "pilot/machines/connection/stream.py",     # Connection.packet_received: which input
            "pilot/machines/connection/machine.py",    # the behaviour for (established, segment)
            "pilot/machines/connection/transfer.py",   # the segment's data, in order
            "pilot/stack/transport.py",                # StreamTransport.data_received -> dataReceived
        ])
