"""
Tests for pilot.machines.tunnel: two (or three) Tunnels objects wired through
a fake network on a task.Clock; no sockets.
"""

from __future__ import annotations

from tests import capture

import json
import os
from typing import Any, Callable, Optional

from automat import NoTransition
from nacl.public import PrivateKey
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.address import Address
from pilot.identity import Identity
from pilot.machines.table import running
from pilot.machines.tunnel import (
    ANSWER_BURST, GIVE_UP, LOOKUP_BACKLOG, QUEUE_PER_PEER, QUEUED_PEERS, Endpoint, Peer, Session,
    Tunnels, transitions,
)
from pilot.wire.beacon import Relay, RelayDeliver
from pilot.wire.packet import ACK, STREAM, SYN, Packet
from pilot.wire.tunnel import (
    PILA, PILK, PILS, PILT, AuthKeyExchange, KeyExchange, PlainFrame, PunchProbe, SealedFrame,
)
from pilot.wire.tunnel_crypto import NonceSequence, ReplayWindow, TunnelSession, derive_key

A_ADDR: Endpoint = ("198.51.100.1", 4001)
B_ADDR: Endpoint = ("198.51.100.2", 4002)
C_ADDR: Endpoint = ("198.51.100.3", 4003)
BEACON: Endpoint = ("198.51.100.9", 9001)
ATTACKER: Endpoint = ("203.0.113.66", 666)


def identity(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


def x25519(n: int) -> PrivateKey:
    return PrivateKey(bytes([100 + n]) * 32)


def packet(src: int, dst: int, seq: int = 0, payload: bytes = b"", flags: int = ACK) -> Packet:
    return Packet(protocol=STREAM, flags=flags, src=Address(0, src), dst=Address(0, dst),
                  src_port=49152, dst_port=7, seq=seq, window=512, payload=payload)


Datagram = tuple[Endpoint, Endpoint, bytes]


class FakeNetwork:
    """
    Datagrams are held until :meth:`run`; ``impair(src, dst, data)`` returns
    the copies that travel (``[]`` drops, two copies duplicate).  The fake
    beacon turns Relay into RelayDeliver; nodes unwrap RelayDeliver.
    """

    def __init__(self) -> None:
        self.nodes: dict[Endpoint, "Node"] = {}
        self.where: dict[int, Endpoint] = {}  # node id -> endpoint, for the beacon
        self.sent: list[Datagram] = []
        self.in_flight: list[Datagram] = []
        self.impair: Callable[[Endpoint, Endpoint, bytes], list[bytes]] = lambda s, d, data: [data]

    def sender(self, src: Endpoint) -> Callable[[bytes, Endpoint], None]:
        def send(data: bytes, dst: Endpoint) -> None:
            assert isinstance(data, bytes)
            self.sent.append((src, dst, data))
            self.in_flight.extend((src, dst, copy) for copy in self.impair(src, dst, data))
        return send

    def run(self, reorder: bool = False) -> None:
        for _ in range(1000):
            if not self.in_flight:
                return
            batch, self.in_flight = self.in_flight, []
            for src, dst, data in (reversed(batch) if reorder else batch):
                self.arrive(src, dst, data)
        raise AssertionError("the network never went quiet")

    def arrive(self, src: Endpoint, dst: Endpoint, data: bytes) -> None:
        if dst == BEACON:
            relay = Relay.decode(data)
            if relay.destination in self.where:
                self.in_flight.append((BEACON, self.where[relay.destination],
                                       RelayDeliver(relay.sender, relay.frame).encode()))
            return
        node = self.nodes.get(dst)
        if node is None:
            return
        if data[0] < 0x10:
            deliver = RelayDeliver.decode(data)
            node.tunnels.frame_received(deliver.frame, src, via_relay=True, relay_sender=deliver.sender)
        else:
            node.tunnels.frame_received(data, src)

    def frames(self, magic: bytes, src: Optional[Endpoint] = None) -> list[bytes]:
        """Frames with ``magic`` sent (by ``src``), relayed ones unwrapped."""
        out = []
        for s, _, data in self.sent:
            frame = Relay.decode(data).frame if data[0] == 0x05 else data
            if frame[:4] == magic and (src is None or s == src):
                out.append(frame)
        return out


class Node:
    def __init__(self, net: FakeNetwork, clock: Clock, node_id: int, addr: Endpoint,
                 keys: dict[int, bytes], ident: Optional[Identity] = None,
                 secret: Optional[PrivateKey] = None,
                 lookup: Optional[Callable[[int], Any]] = None) -> None:
        self.node_id = node_id
        self.identity = ident or identity(node_id)
        keys.setdefault(node_id, self.identity.public_key)
        self.delivered: list[tuple[Packet, int]] = []
        self.unreachable: list[int] = []
        self.endpoints: list[tuple[int, Endpoint]] = []
        self.lookups: list[int] = []
        self.beacon: Optional[Endpoint] = BEACON
        self.on_unreachable: Callable[[int], None] = self.unreachable.append

        def expected_key(peer: int) -> Any:
            self.lookups.append(peer)
            return lookup(peer) if lookup else succeed(keys.get(peer))

        self.tunnels = Tunnels(
            node_id=lambda: self.node_id, identity=self.identity, send_datagram=net.sender(addr),
            deliver=lambda p, n: self.delivered.append((p, n)), expected_key=expected_key,
            clock=clock, x25519=secret or x25519(node_id), beacon=lambda: self.beacon,
            peer_unreachable=lambda n: self.on_unreachable(n),
            endpoint_changed=lambda n, e: self.endpoints.append((n, e)))
        net.nodes[addr] = self
        net.where[node_id] = addr


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.net = FakeNetwork()
        self.keys: dict[int, bytes] = {}
        self.a = Node(self.net, self.clock, 1, A_ADDR, self.keys)
        self.b = Node(self.net, self.clock, 2, B_ADDR, self.keys)

    def establish(self) -> None:
        self.a.tunnels.send(packet(1, 2, seq=1), 2, B_ADDR)
        self.net.run()
        self.assertEqual(self.a.tunnels.state(2), "established")
        self.assertEqual(self.b.tunnels.state(1), "established")

    def assertNoCleartext(self) -> None:
        for _, _, data in self.net.sent:
            frame = Relay.decode(data).frame if data[0] == 0x05 else data
            self.assertNotIn(frame[:4], (PILT, PILK))


class EstablishTests(Base):
    def test_first_packet_queued_then_delivered_encrypted(self) -> None:
        first = packet(1, 2, seq=1, flags=SYN)
        self.a.tunnels.send(first, 2, B_ADDR)
        self.assertEqual(self.a.tunnels.state(2), "exchanging")
        self.assertEqual([d[2][:4] for d in self.net.sent], [PILA])  # nothing else leaves yet
        self.net.run()
        self.assertEqual(self.b.delivered, [(first, 1)])
        self.assertNoCleartext()
        pils = self.net.frames(PILS, A_ADDR)
        self.assertEqual(len(pils), 1)
        self.assertNotIn(first.encode(), pils[0])
        self.assertEqual(SealedFrame.decode(pils[0]).counter, 1)
        # B answered once, A answered B's PILA once (it is a new session); no loop.
        self.assertEqual(len(self.net.frames(PILA, B_ADDR)), 1)
        self.assertEqual(len(self.net.frames(PILA, A_ADDR)), 2)
        stats = self.a.tunnels.stats(2)
        assert stats is not None
        self.assertEqual((stats["state"], stats["endpoint"], stats["path"], stats["queued"]),
                         ("established", B_ADDR, "direct", 0))
        self.assertEqual(stats["established_at"], 0)
        self.assertEqual(self.b.tunnels.stats(1)["bytes_rx"], 70 + 0)  # type: ignore[index]

    def test_both_directions(self) -> None:
        self.establish()
        self.b.tunnels.send(packet(2, 1, seq=5, payload=b"pong"), 1)
        self.net.run()
        self.assertEqual(self.a.delivered, [(packet(2, 1, seq=5, payload=b"pong"), 2)])
        self.assertNoCleartext()

    def test_quiet_after_establishment(self) -> None:
        self.establish()
        before = len(self.net.sent)
        for _ in range(40):
            self.clock.advance(1)
            self.net.run()
        self.assertEqual(len(self.net.sent), before)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_simultaneous_start(self) -> None:
        self.a.tunnels.send(packet(1, 2, seq=1), 2, B_ADDR)
        self.b.tunnels.send(packet(2, 1, seq=1), 1, A_ADDR)
        self.net.run()
        self.assertEqual(len(self.a.delivered), 1)
        self.assertEqual(len(self.b.delivered), 1)
        # Each side sent its PILA and answered the other's once (a new session is always answered).
        self.assertEqual(len(self.net.frames(PILA)), 4)

    def test_lossy_duplicating_reordering_network(self) -> None:
        count = [0]

        def impair(src: Endpoint, dst: Endpoint, data: bytes) -> list[bytes]:
            count[0] += 1
            if count[0] % 5 == 1:
                return []           # drop, including the very first PILA
            if count[0] % 3 == 0:
                return [data, data]  # duplicate
            return [data]

        self.net.impair = impair
        sent_ab = [packet(1, 2, seq=i) for i in range(30)]
        sent_ba = [packet(2, 1, seq=i) for i in range(30)]
        for i in range(30):
            self.a.tunnels.send(sent_ab[i], 2, B_ADDR)
            self.b.tunnels.send(sent_ba[i], 1, A_ADDR)
            self.clock.advance(0.1)
            self.net.run(reorder=bool(i % 2))
        for _ in range(20):
            self.clock.advance(0.5)
            self.net.run(reorder=True)
        self.assertEqual(self.a.tunnels.state(2), "established")
        self.assertEqual(self.b.tunnels.state(1), "established")
        got_b = [p for p, _ in self.b.delivered]
        got_a = [p for p, _ in self.a.delivered]
        for got, sent in ((got_b, sent_ab), (got_a, sent_ba)):
            self.assertEqual(len(set(p.seq for p in got)), len(got))  # duplicates never delivered
            self.assertTrue(set(got) <= set(sent))
            self.assertGreater(len(got), 10)
        replayed = self.a.tunnels.counters["pils_replayed"] + self.b.tunnels.counters["pils_replayed"]
        self.assertGreater(replayed, 0)
        self.assertNoCleartext()
        # Once established, traffic keeps flowing both ways through the bad network.
        self.a.delivered.clear()
        self.b.delivered.clear()
        for i in range(10):
            self.a.tunnels.send(packet(1, 2, seq=100 + i), 2)
            self.b.tunnels.send(packet(2, 1, seq=100 + i), 1)
        self.net.run(reorder=True)
        self.assertGreaterEqual(len(self.b.delivered), 5)
        self.assertGreaterEqual(len(self.a.delivered), 5)

    def test_retransmitted_key_exchange_on_loss(self) -> None:
        lost = [0]

        def impair(src: Endpoint, dst: Endpoint, data: bytes) -> list[bytes]:
            if data[:4] == PILA and src == A_ADDR and lost[0] < 2:
                lost[0] += 1
                return []
            return [data]

        self.net.impair = impair
        self.a.tunnels.send(packet(1, 2, seq=1), 2, B_ADDR)
        self.net.run()
        self.assertEqual(self.a.tunnels.state(2), "exchanging")
        self.clock.advance(0.25)
        self.net.run()
        self.assertEqual(self.a.tunnels.state(2), "exchanging")
        self.clock.advance(0.5)
        self.net.run()
        self.assertEqual(self.a.tunnels.state(2), "established")
        self.assertEqual(len(self.b.delivered), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lost_answer_is_resent_when_the_peer_repeats(self) -> None:
        def impair(src: Endpoint, dst: Endpoint, data: bytes) -> list[bytes]:
            return [] if src == B_ADDR and data[:4] == PILA and self.clock.seconds() < 0.1 else [data]

        self.net.impair = impair
        self.a.tunnels.send(packet(1, 2, seq=1), 2, B_ADDR)
        self.net.run()
        self.assertEqual(self.b.tunnels.state(1), "established")
        self.assertEqual(self.a.tunnels.state(2), "exchanging")
        self.clock.advance(0.25)  # A repeats; B answered 0.25 s ago: too soon
        self.net.run()
        self.assertEqual(self.a.tunnels.state(2), "exchanging")
        self.assertEqual(self.b.tunnels.counters["answer_rate_limited"], 1)
        self.clock.advance(0.5)   # A repeats again; B answers now
        self.net.run()
        self.assertEqual(self.a.tunnels.state(2), "established")
        self.assertEqual(len(self.b.delivered), 1)

    def test_give_up_and_peer_unreachable(self) -> None:
        self.net.impair = lambda s, d, data: []
        for i in range(3):
            self.a.tunnels.send(packet(1, 2, seq=i), 2, B_ADDR)
        times = []
        while self.clock.seconds() < GIVE_UP + 1:
            before = len(self.net.sent)
            self.clock.advance(0.25)
            if len(self.net.sent) > before:
                times.append(self.clock.seconds())
        self.assertEqual(times, [0.25, 0.75, 1.75, 3.75, 5.75, 7.75, 9.75])
        self.assertEqual(self.a.unreachable, [2])
        self.assertEqual(self.a.tunnels.state(2), "idle")
        self.assertEqual(self.a.tunnels.counters["unreachable_dropped"], 3)
        self.assertEqual(self.a.tunnels.stats(2)["queued"], 0)  # type: ignore[index]
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # A later send starts over and, with the network back, gets through.
        self.net.impair = lambda s, d, data: [data]
        self.net.in_flight.clear()
        self.a.tunnels.send(packet(1, 2, seq=9), 2)
        self.net.run()
        self.assertEqual([p.seq for p, _ in self.b.delivered], [9])

    def test_send_again_from_unreachable_callback(self) -> None:
        self.net.impair = lambda s, d, data: []
        self.a.unreachable = []

        def again(node_id: int) -> None:
            self.a.unreachable.append(node_id)
            if len(self.a.unreachable) == 1:
                self.a.tunnels.send(packet(1, 2, seq=2), node_id)

        self.a.on_unreachable = again
        self.a.tunnels.send(packet(1, 2, seq=1), 2, B_ADDR)
        self.clock.advance(GIVE_UP)
        self.assertEqual(self.a.tunnels.state(2), "exchanging")
        self.assertEqual(self.a.tunnels.stats(2)["queued"], 1)  # type: ignore[index]
        self.clock.pump([1] * 11)
        self.assertEqual(self.a.unreachable, [2, 2])

    def test_no_route(self) -> None:
        self.a.tunnels.send(packet(1, 2), 2)
        self.assertEqual(self.a.tunnels.counters["no_route"], 1)
        self.assertEqual(self.net.sent, [])


class QueueTests(Base):
    def test_per_peer_bound_drops_oldest(self) -> None:
        for i in range(QUEUE_PER_PEER + 6):
            self.a.tunnels.send(packet(1, 2, seq=i), 2, B_ADDR)
        self.assertEqual(self.a.tunnels.counters["queue_overflow"], 6)
        self.net.run()
        self.assertEqual([p.seq for p, _ in self.b.delivered], list(range(6, QUEUE_PER_PEER + 6)))

    def test_peer_bound_drops_the_oldest_queue(self) -> None:
        self.net.impair = lambda s, d, data: []
        for peer in range(100, 100 + QUEUED_PEERS):
            self.a.tunnels.send(packet(1, peer), peer, ("198.51.100.101", peer))
            self.a.tunnels.send(packet(1, peer), peer)
        self.assertEqual(self.a.tunnels.counters["queue_overflow"], 0)
        self.a.tunnels.send(packet(1, 99), 99, ("198.51.100.101", 99))
        self.assertEqual(self.a.tunnels.counters["queue_overflow"], 2)
        self.assertEqual(self.a.tunnels.stats(100)["queued"], 0)  # type: ignore[index]
        self.assertEqual(self.a.tunnels.stats(101)["queued"], 2)  # type: ignore[index]
        self.assertEqual(self.a.tunnels.stats(99)["queued"], 1)  # type: ignore[index]
        self.a.tunnels.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RefusalTests(Base):
    def test_wrong_ed25519_key_refused(self) -> None:
        self.keys[1] = identity(9).public_key  # the registry pins another key for node 1
        self.a.tunnels.send(packet(1, 2), 2, B_ADDR)
        self.net.run()
        self.assertEqual(self.b.tunnels.counters["pila_wrong_key"], 1)
        self.assertEqual(self.b.tunnels.state(1), "idle")
        self.assertEqual(self.net.frames(PILA, B_ADDR), [])

    def test_impostor_signing_with_its_own_key_refused(self) -> None:
        impostor = AuthKeyExchange.build(1, bytes(x25519(9).public_key), identity(9).public_key,
                                         identity(9).sign)
        self.b.tunnels.frame_received(impostor.encode(), ATTACKER)
        self.assertEqual(self.b.tunnels.counters["pila_wrong_key"], 1)
        self.assertEqual(self.b.tunnels.peers(), [])

    def test_forged_signature_refused_without_lookup(self) -> None:
        frame = bytearray(self.a.tunnels.key_exchange_frame())
        frame[-1] ^= 1
        self.b.tunnels.frame_received(bytes(frame), A_ADDR)
        frame = bytearray(self.a.tunnels.key_exchange_frame())
        frame[10] ^= 1  # another X25519 key under A's signature
        self.b.tunnels.frame_received(bytes(frame), A_ADDR)
        self.assertEqual(self.b.tunnels.counters["pila_bad_signature"], 2)
        self.assertEqual(self.b.lookups, [])
        self.assertEqual(self.net.sent, [])

    def test_unknown_key_refused(self) -> None:
        del self.keys[1]
        self.b.tunnels.frame_received(self.a.tunnels.key_exchange_frame(), A_ADDR)
        self.assertEqual(self.b.tunnels.counters["pila_unknown_key"], 1)
        self.assertEqual(self.b.tunnels.state(1), "idle")

    def test_lookup_failure_counted(self) -> None:
        c = Node(self.net, self.clock, 3, C_ADDR, self.keys, lookup=lambda n: fail(RuntimeError("down")))
        c.tunnels.frame_received(self.a.tunnels.key_exchange_frame(), A_ADDR)
        self.assertEqual(c.tunnels.counters["pila_lookup_failed"], 1)

    def test_lookup_raising_counted(self) -> None:
        def broken(n: int) -> Any:
            raise RuntimeError("bug")
        c = Node(self.net, self.clock, 3, C_ADDR, self.keys, lookup=broken)
        c.tunnels.frame_received(self.a.tunnels.key_exchange_frame(), A_ADDR)
        self.assertEqual(c.tunnels.counters["pila_lookup_failed"], 1)

    def test_slow_lookup_backlog(self) -> None:
        pending: list[Deferred[Optional[bytes]]] = []

        def slow(n: int) -> Deferred[Optional[bytes]]:
            pending.append(Deferred())
            return pending[-1]

        c = Node(self.net, self.clock, 3, C_ADDR, self.keys, lookup=slow)
        for _ in range(LOOKUP_BACKLOG + 2):
            c.tunnels.frame_received(self.a.tunnels.key_exchange_frame(), A_ADDR)
        self.assertEqual(len(pending), 1)
        self.assertEqual(c.tunnels.counters["pila_lookup_busy"], 2)
        pending[0].callback(self.keys[1])
        self.assertEqual(c.tunnels.state(1), "established")
        self.assertEqual(len(self.net.frames(PILA, C_ADDR)), 1)  # one answer, the rest rate-limited

    def test_pila_from_self_dropped(self) -> None:
        self.b.tunnels.frame_received(self.b.tunnels.key_exchange_frame(), ATTACKER)
        self.assertEqual(self.b.tunnels.counters["from_self"], 1)
        self.assertEqual(self.b.lookups, [])

    def test_pilk_refused_and_answered(self) -> None:
        self.b.tunnels.frame_received(KeyExchange(1, bytes(x25519(1).public_key)).encode(), A_ADDR)
        self.assertEqual(self.b.tunnels.counters["pilk_refused"], 1)
        self.assertEqual(self.b.tunnels.state(1), "idle")
        self.assertEqual(self.net.sent, [(B_ADDR, A_ADDR, self.b.tunnels.key_exchange_frame())])
        # The answer lets the peer switch to the authenticated exchange.
        self.net.run()
        self.assertEqual(self.a.tunnels.state(2), "established")
        self.assertNoCleartext()

    def test_we_restarted_peer_gets_our_new_key(self) -> None:
        """
        A peer still sealing with a session we lost (we restarted, with a new
        X25519 key) is answered with our PILA, so its next packets reach us
        without anyone waiting for a timeout.
        """
        self.establish()
        self.clock.advance(5)
        Node(self.net, self.clock, 2, B_ADDR, self.keys, secret=x25519(22))  # b restarts
        self.net.sent.clear()
        self.a.tunnels.send(packet(1, 2, seq=2), 2)
        self.net.run()
        restarted = self.net.nodes[B_ADDR]
        self.assertEqual(restarted.tunnels.counters["pils_no_session"], 1)
        self.assertEqual(self.a.tunnels.state(2), "established")
        self.assertEqual(restarted.tunnels.state(1), "established")
        self.a.tunnels.send(packet(1, 2, seq=3), 2)
        self.net.run()
        self.assertIn(3, [p.seq for p, _ in restarted.delivered])
        self.assertNoCleartext()

    def test_pilk_answers_are_budgeted(self) -> None:
        for sender in range(100, 200):
            self.b.tunnels.frame_received(KeyExchange(sender, bytes(32 * [9])).encode(), ATTACKER)
        self.assertEqual(self.b.tunnels.counters["pilk_refused"], 100)
        self.assertEqual(len(self.net.sent), 20)
        self.assertEqual(self.b.tunnels.peers(), [])

    def test_plaintext_dropped(self) -> None:
        self.establish()
        self.b.tunnels.frame_received(PlainFrame(packet(1, 2, seq=77)).encode(), A_ADDR)
        self.assertEqual(self.b.tunnels.counters["plaintext_dropped"], 1)
        self.assertNotIn(77, [p.seq for p, _ in self.b.delivered])

    def test_punch_ignored(self) -> None:
        self.b.tunnels.frame_received(PunchProbe().encode(), A_ADDR)
        self.assertEqual(self.b.tunnels.counters["punch_ignored"], 1)
        self.assertEqual(self.net.sent, [])

    def test_hostile_input_never_raises(self) -> None:
        self.establish()
        good = self.net.frames(PILS, A_ADDR)[0]
        pila = self.a.tunnels.key_exchange_frame()
        samples: list[Any] = [b"", b"\x00", b"\x05abc", b"XXXX", None, 42, "PILS", bytearray(b"PILP"),
                              PILS, PILA + b"\x00" * 10, good[:30], good[:-1], good + b"x", pila[:100]]
        samples += [bytes([i]) * n for i in (0x50, 0xff) for n in (1, 4, 40, 136)]
        for sample in samples:
            self.b.tunnels.frame_received(sample, ATTACKER)
            self.b.tunnels.frame_received(sample, BEACON, via_relay=True)
        self.assertGreater(self.b.tunnels.counters["malformed"], 10)
        self.assertEqual(len(self.b.delivered), 1)
        self.assertEqual(self.b.endpoints, [(1, A_ADDR)])

    def test_low_order_x25519_key_refused(self) -> None:
        ident = identity(1)
        frame = AuthKeyExchange.build(1, bytes(32), ident.public_key, ident.sign)
        self.b.tunnels.frame_received(frame.encode(), A_ADDR)
        self.assertEqual(self.b.tunnels.counters["pila_bad_x25519"], 1)
        self.assertEqual(self.b.tunnels.state(1), "idle")


class SealedTests(Base):
    def test_replayed_pils_dropped(self) -> None:
        self.establish()
        frame = self.net.frames(PILS, A_ADDR)[0]
        self.b.tunnels.frame_received(frame, A_ADDR)
        self.assertEqual(self.b.tunnels.counters["pils_replayed"], 1)
        self.assertEqual(len(self.b.delivered), 1)

    def test_repeated_pila_does_not_reopen_the_window(self) -> None:
        self.establish()
        old = self.net.frames(PILS, A_ADDR)[0]
        pila = self.net.frames(PILA, A_ADDR)[0]
        for _ in range(3):
            self.clock.advance(5)
            self.b.tunnels.frame_received(pila, ATTACKER)  # a replayed PILA
            self.net.run()
        self.assertEqual(self.b.tunnels.state(1), "established")
        self.b.tunnels.frame_received(old, A_ADDR)
        self.assertEqual(self.b.tunnels.counters["pils_replayed"], 1)
        self.assertEqual(len(self.b.delivered), 1)
        self.assertEqual(self.b.endpoints, [(1, A_ADDR)])  # a replayed PILA does not move the peer
        self.assertEqual(self.b.lookups, [1])  # and needs no second lookup
        # Our send counter is not reset either.
        self.b.tunnels.send(packet(2, 1), 1)
        self.a.tunnels.send(packet(1, 2), 2)
        self.assertEqual(SealedFrame.decode(self.net.frames(PILS, A_ADDR)[-1]).counter, 2)
        self.assertEqual(SealedFrame.decode(self.net.frames(PILS, B_ADDR)[-1]).counter, 1)

    def test_peer_rekey_under_the_same_key_is_heard(self) -> None:
        # What a reference peer does when it gets our PILA: fresh prefix, counter from 1.
        self.establish()
        self.a.tunnels.send(packet(1, 2, seq=2), 2)
        self.net.run()
        old = self.net.frames(PILS, A_ADDR)
        # Node 1's key, sealed under a fresh prefix as the reference's re-keyed sender does.
        key = derive_key(bytes(x25519(1)), bytes(x25519(2).public_key))
        rekeyed = SealedFrame.seal(TunnelSession(key, NonceSequence(b"\x01\x02\x03\x04")), 1,
                                   packet(1, 2, seq=3))
        self.assertEqual(rekeyed.counter, 1)
        self.b.tunnels.frame_received(rekeyed.encode(), A_ADDR)
        self.assertEqual([p.seq for p, _ in self.b.delivered], [1, 2, 3])
        for frame in old:  # frames under the first prefix are still replays
            self.b.tunnels.frame_received(frame, A_ADDR)
        self.assertEqual(self.b.tunnels.counters["pils_replayed"], 2)

    def test_repeated_pila_answers_are_bounded(self) -> None:
        self.establish()
        pila = self.net.frames(PILA, A_ADDR)[0]
        before = len(self.net.frames(PILA, B_ADDR))
        for _ in range(40):
            self.clock.advance(0.6)
            self.b.tunnels.frame_received(pila, ATTACKER)
        answers = self.net.frames(PILA, B_ADDR)[before:]
        self.assertEqual(len(answers), ANSWER_BURST)
        self.assertEqual([d for s, d, data in self.net.sent if s == B_ADDR][-1], ATTACKER)

    def test_inner_source_must_be_the_sender(self) -> None:
        self.establish()
        self.b.tunnels.send(packet(3, 1, seq=66), 1)  # node 2 seals a packet claiming node 3
        self.net.run()
        self.assertEqual(self.a.tunnels.counters["pils_wrong_source"], 1)
        self.assertEqual(self.a.delivered, [])

    def test_pils_from_unknown_or_unestablished_peer(self) -> None:
        self.establish()
        frame = self.net.frames(PILS, A_ADDR)[0]
        c = Node(self.net, self.clock, 3, C_ADDR, self.keys)
        c.tunnels.frame_received(frame, A_ADDR)
        self.net.impair = lambda s, d, data: []
        c.tunnels.send(packet(3, 1), 1, A_ADDR)
        c.tunnels.frame_received(frame, A_ADDR)
        self.assertEqual(c.tunnels.counters["pils_no_session"], 2)

    def test_tampered_pils_dropped(self) -> None:
        self.establish()
        self.a.tunnels.send(packet(1, 2, seq=2), 2)
        frame = bytearray(self.net.frames(PILS, A_ADDR)[-1])
        self.net.in_flight.clear()
        frame[-1] ^= 1
        self.b.tunnels.frame_received(bytes(frame), ATTACKER)
        self.assertEqual(self.b.tunnels.counters["pils_undecryptable"], 1)
        frame[-1] ^= 1
        self.b.tunnels.frame_received(bytes(frame), A_ADDR)  # the genuine one still gets in
        self.assertEqual([p.seq for p, _ in self.b.delivered], [1, 2])
        self.assertEqual(self.b.endpoints, [(1, A_ADDR)])

    def test_endpoint_follows_authenticated_frames(self) -> None:
        self.establish()
        moved = ("192.0.2.7", 5555)
        self.a.tunnels.send(packet(1, 2, seq=2), 2)
        frame = self.net.in_flight.pop()[2]
        self.b.tunnels.frame_received(frame, moved)  # A's NAT mapping changed
        self.assertEqual(self.b.endpoints, [(1, A_ADDR), (1, moved)])
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], moved)  # type: ignore[index]
        self.b.tunnels.send(packet(2, 1, seq=3), 1)
        self.assertEqual(self.net.sent[-1][1], moved)
        # A replay from yet another address is dropped and moves nothing.
        self.b.tunnels.frame_received(frame, ATTACKER)
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], moved)  # type: ignore[index]

    def test_peer_restart_makes_a_new_session(self) -> None:
        self.establish()
        old_pila = self.net.frames(PILA, A_ADDR)[0]
        old_pils = self.net.frames(PILS, A_ADDR)[0]
        del self.net.nodes[A_ADDR]
        restarted = Node(self.net, self.clock, 1, A_ADDR, self.keys, secret=x25519(11))
        self.clock.advance(3)
        restarted.tunnels.send(packet(1, 2, seq=1, payload=b"again"), 2, B_ADDR)
        self.net.run()
        self.assertEqual(self.b.tunnels.counters["peer_rekeyed"], 1)
        self.assertEqual([p.payload for p, _ in self.b.delivered], [b"", b"again"])
        self.assertEqual(self.b.tunnels.stats(1)["established_at"], 3)  # type: ignore[index]
        self.b.tunnels.send(packet(2, 1, seq=4), 1)
        self.net.run()
        self.assertEqual([p.seq for p, _ in restarted.delivered], [4])
        # The old process's frames are refused: its PILA is stale, its PILS do not decrypt.
        self.b.tunnels.frame_received(old_pila, ATTACKER)
        self.b.tunnels.frame_received(old_pils, A_ADDR)
        self.assertEqual(self.b.tunnels.counters["pila_stale_key"], 1)
        self.assertEqual(self.b.tunnels.counters["pils_undecryptable"], 1)
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], A_ADDR)  # type: ignore[index]

    def test_replayed_old_pila_from_another_socket_leaves_the_session(self) -> None:
        """
        issue 12: a PILA from an earlier run of A (an old X25519 key, A's real signature), replayed
        from another socket while the session works, must not retire A's key nor move A's endpoint.
        """
        self.establish()
        old_run = AuthKeyExchange.build(1, bytes(x25519(9).public_key), identity(1).public_key,
                                        identity(1).sign).encode()
        self.clock.advance(1)
        self.b.tunnels.frame_received(old_run, ATTACKER)
        self.net.run()
        self.assertEqual(self.b.tunnels.counters["pila_candidate"], 1)
        self.assertNotIn("peer_rekeyed", self.b.tunnels.counters)
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], A_ADDR)  # type: ignore[index]
        self.assertEqual(self.b.endpoints, [(1, A_ADDR)])
        # pings keep working both ways, and A's own PILA is not refused as stale
        self.a.tunnels.send(packet(1, 2, seq=2), 2)
        self.b.tunnels.send(packet(2, 1, seq=5), 1)
        self.net.run()
        self.assertEqual([p.seq for p, _ in self.b.delivered], [1, 2])
        self.assertEqual([p.seq for p, _ in self.a.delivered], [5])
        self.b.tunnels.frame_received(self.a.tunnels.key_exchange_frame(), A_ADDR)
        self.assertNotIn("pila_stale_key", self.b.tunnels.counters)
        self.assertEqual(self.b.tunnels.state(1), "established")

    def test_restart_on_a_new_socket_rekeys_once_proven(self) -> None:
        """A real restart of a busy peer, on another port: its PILA is a candidate, its first PILS proves it."""
        self.establish()
        del self.net.nodes[A_ADDR]
        moved: Endpoint = ("198.51.100.1", 4111)
        restarted = Node(self.net, self.clock, 1, moved, self.keys, secret=x25519(11))
        self.clock.advance(1)
        restarted.tunnels.send(packet(1, 2, seq=1, payload=b"again"), 2, B_ADDR)
        self.net.run()
        self.assertGreaterEqual(self.b.tunnels.counters["pila_candidate"], 1)  # A' answers ours too
        self.assertEqual(self.b.tunnels.counters["candidate_promoted"], 1)
        self.assertEqual(self.b.tunnels.counters["peer_rekeyed"], 1)
        self.assertEqual([p.payload for p, _ in self.b.delivered], [b"", b"again"])
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], moved)  # type: ignore[index]
        self.b.tunnels.send(packet(2, 1, seq=4), 1)
        self.net.run()
        self.assertEqual([p.seq for p, _ in restarted.delivered], [4])

    def test_new_key_on_an_idle_session_waits_for_proof(self) -> None:
        """
        Idle or not, a new key only offers a candidate (issue 12): the session and the endpoint
        stay until a frame sealed under the new key arrives, which re-keys at once.
        """
        self.establish()
        del self.net.nodes[A_ADDR]
        moved: Endpoint = ("198.51.100.1", 4111)
        restarted = Node(self.net, self.clock, 1, moved, self.keys, secret=x25519(11))
        self.clock.advance(5)
        self.b.tunnels.frame_received(restarted.tunnels.key_exchange_frame(), moved)
        self.assertEqual(self.b.tunnels.counters["pila_candidate"], 1)
        self.assertNotIn("peer_rekeyed", self.b.tunnels.counters)
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], A_ADDR)  # type: ignore[index]
        self.net.run()  # our answer reaches the restarted peer, which now has a session
        self.assertEqual(restarted.tunnels.state(2), "established")
        restarted.tunnels.send(packet(1, 2, seq=9), 2)
        self.net.run()
        self.assertEqual(self.b.tunnels.counters["candidate_promoted"], 1)
        self.assertEqual(self.b.tunnels.counters["peer_rekeyed"], 1)
        self.assertEqual([p.seq for p, _ in self.b.delivered], [1, 9])
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], moved)  # type: ignore[index]

    def test_own_node_id_change(self) -> None:
        self.a.node_id = 0
        first = self.a.tunnels.key_exchange_frame()
        self.a.node_id = 1
        self.assertNotEqual(first, self.a.tunnels.key_exchange_frame())
        self.assertEqual(AuthKeyExchange.decode(self.a.tunnels.key_exchange_frame()).sender, 1)
        self.a.node_id = None  # type: ignore[assignment]
        self.a.tunnels.send(packet(1, 2), 2, B_ADDR)
        self.assertEqual(self.a.tunnels.counters["no_node_id"], 1)
        self.assertEqual(self.net.sent, [])


class RelayTests(Base):
    def test_relayed_exchange_and_traffic(self) -> None:
        self.a.tunnels.set_path(2, None, relay=True)
        self.a.tunnels.send(packet(1, 2, seq=1), 2)
        self.assertEqual(self.net.sent[0][1], BEACON)
        relay = Relay.decode(self.net.sent[0][2])
        self.assertEqual((relay.sender, relay.destination, relay.frame[:4]), (1, 2, PILA))
        self.net.run()
        self.assertEqual([p.seq for p, _ in self.b.delivered], [1])
        # B had no address for A, so it answers through the beacon too.
        self.assertEqual(self.b.tunnels.stats(1)["path"], "relay")  # type: ignore[index]
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], None)  # type: ignore[index]
        self.assertTrue(all(dst == BEACON for src, dst, _ in self.net.sent if src in (A_ADDR, B_ADDR)))
        self.assertEqual(self.b.endpoints, [])  # relayed frames never set an endpoint
        self.assertNoCleartext()

    def test_switch_between_direct_and_relay_keeps_the_session(self) -> None:
        self.establish()
        pilas = len(self.net.frames(PILA))
        self.a.tunnels.set_path(2, None, relay=True)
        self.a.tunnels.send(packet(1, 2, seq=2), 2)
        self.assertEqual(self.net.sent[-1][1], BEACON)
        self.net.run()
        self.a.tunnels.set_path(2, B_ADDR, relay=False)
        self.a.tunnels.send(packet(1, 2, seq=3), 2)
        self.assertEqual(self.net.sent[-1][1], B_ADDR)
        self.net.run()
        self.assertEqual([p.seq for p, _ in self.b.delivered], [1, 2, 3])
        self.assertEqual(len(self.net.frames(PILA)), pilas)
        self.assertEqual([SealedFrame.decode(f).counter for f in self.net.frames(PILS, A_ADDR)], [1, 2, 3])
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], A_ADDR)  # type: ignore[index]

    def test_held_key_exchange_waits_for_the_path_layer(self) -> None:
        """A punch under way (docs/nat.md): nothing to the peer's endpoint until the path says where."""
        self.a.tunnels.set_path(2, B_ADDR, relay=False, hold=True)
        self.a.tunnels.send(packet(1, 2, seq=1), 2, B_ADDR)
        self.clock.advance(2)  # the tunnel's own retries are held too
        self.assertEqual(self.net.sent, [])
        self.assertGreater(self.a.tunnels.counters["pila_held"], 1)
        self.a.tunnels.set_path(2, B_ADDR, relay=False)
        self.a.tunnels.send_key_exchange(2, B_ADDR)
        self.net.run()
        self.assertEqual([p.seq for p, _ in self.b.delivered], [1])

    def test_relayed_frame_naming_another_sender_dropped(self) -> None:
        """
        The beacon names the relaying node (docs/reference-wire.md §3): node 3 relaying A's PILA or
        A's sealed frames (collected earlier) is not A, so B drops them and counts them.
        """
        self.b.tunnels.frame_received(self.a.tunnels.key_exchange_frame(), BEACON, via_relay=True,
                                      relay_sender=3)
        self.assertEqual(self.b.tunnels.counters["relay_sender_mismatch"], 1)
        self.assertEqual(self.b.lookups, [])
        self.assertEqual(self.b.tunnels.state(1), "idle")
        self.establish()
        pils = self.net.frames(PILS, A_ADDR)[-1]
        self.b.delivered.clear()
        self.b.tunnels.frame_received(pils, BEACON, via_relay=True, relay_sender=3)
        self.assertEqual(self.b.tunnels.counters["relay_sender_mismatch"], 2)
        self.assertEqual(self.b.delivered, [])
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], A_ADDR)  # type: ignore[index]

    def test_relayed_frame_from_its_sender_taken(self) -> None:
        self.b.tunnels.frame_received(self.a.tunnels.key_exchange_frame(), BEACON, via_relay=True,
                                      relay_sender=1)
        self.assertNotIn("relay_sender_mismatch", self.b.tunnels.counters)
        self.assertEqual(self.b.tunnels.state(1), "established")

    def test_relay_without_beacon(self) -> None:
        self.a.beacon = None
        self.a.tunnels.set_path(2, None, relay=True)
        self.a.tunnels.send(packet(1, 2), 2)
        self.assertEqual(self.a.tunnels.counters["no_beacon"], 1)
        self.assertEqual(self.net.sent, [])


# --- interop shape checks with the Go capture ---------------------------------------

def vectors() -> str:
    return os.path.join(capture.vectors_dir(), "go-session-2")


def load(name: str) -> Any:
    with open(os.path.join(vectors(), name), "rb") as f:
        return json.load(f)


class MachineTests(Base):
    """The per-peer machine's table and the queries the path layer uses."""

    def test_transitions(self) -> None:
        rows = {(row.state, row.input, row.next) for row in transitions()}
        self.assertIn(("idle", "packet_queued", "exchanging"), rows)
        self.assertIn(("exchanging", "exchange_timed_out", "idle"), rows)
        self.assertIn(("exchanging", "key_exchange_received", "established"), rows)
        self.assertEqual(len(rows), 11)

    def test_timers_outside_exchanging_raise(self) -> None:
        # Both timers are cancelled on leaving exchanging; one arriving elsewhere is a bug.
        peer = Peer(2, self.a.tunnels, self.clock, os.urandom)
        self.assertRaises(NoTransition, peer.machine.retry_timer_fired)
        self.assertRaises(NoTransition, peer.machine.exchange_timed_out)
        self.establish()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_established_and_last_sent(self) -> None:
        self.assertEqual((self.a.tunnels.is_established(2), self.a.tunnels.last_sent(2)), (False, None))
        self.clock.advance(5)
        self.a.tunnels.send(packet(1, 2, seq=1), 2, B_ADDR)
        self.assertEqual((self.a.tunnels.is_established(2), self.a.tunnels.last_sent(2)), (False, 5))
        self.net.run()
        self.assertTrue(self.a.tunnels.is_established(2))
        self.assertTrue(self.b.tunnels.is_established(1))


class InteropTests(SynchronousTestCase):
    """go-session-2: node 1 (agent-a) on UDP 24101, node 2 (agent-b) on 24102."""

    def setUp(self) -> None:
        self.udp = [(int(e["from"]), int(e["to"]), bytes.fromhex(e["hex"]))
                    for e in load("transcript.json")["udp"]]
        self.ids = {1: Identity.from_json(load("identity-agent-a.json")),
                    2: Identity.from_json(load("identity-agent-b.json"))}
        self.clock = Clock()
        self.net = FakeNetwork()
        self.keys = {n: i.public_key for n, i in self.ids.items()}
        self.node = Node(self.net, self.clock, 1, A_ADDR, self.keys, ident=self.ids[1])

    def captured(self, magic: bytes, port: int) -> list[bytes]:
        return [data for src, _, data in self.udp if data[:4] == magic and src == port]

    def test_our_pila_has_the_reference_layout(self) -> None:
        ours = self.node.tunnels.key_exchange_frame()
        theirs = self.captured(PILA, 24101)[0]
        self.assertEqual(len(ours), len(theirs))
        self.assertEqual(len(ours), 136)
        self.assertEqual(ours[:8], theirs[:8])      # PILA, node id 1
        self.assertEqual(ours[40:72], theirs[40:72])  # agent-a's Ed25519 key
        self.assertEqual(ours[8:40], self.node.tunnels.x25519_public)
        self.assertTrue(AuthKeyExchange.decode(ours).verify(self.ids[1].public_key))
        # With the reference's X25519 key the same identity signs the captured frame exactly.
        frame = AuthKeyExchange.decode(theirs)
        rebuilt = AuthKeyExchange.build(1, frame.x25519_public, self.ids[1].public_key, self.ids[1].sign)
        self.assertEqual(rebuilt.encode(), theirs)

    def test_reference_pila_accepted(self) -> None:
        theirs = self.captured(PILA, 24102)[0]
        self.node.tunnels.frame_received(theirs, B_ADDR)
        self.assertEqual(self.node.tunnels.state(2), "established")
        self.assertEqual(self.net.sent, [(A_ADDR, B_ADDR, self.node.tunnels.key_exchange_frame())])
        # The reference's PILS are under a key we cannot derive (its X25519 private key is gone).
        self.node.tunnels.frame_received(self.captured(PILS, 24102)[0], B_ADDR)
        self.assertEqual(self.node.tunnels.counters["pils_undecryptable"], 1)

    def test_our_pils_have_the_reference_sizes(self) -> None:
        self.node.tunnels.frame_received(self.captured(PILA, 24102)[0], B_ADDR)
        header_only = Packet(protocol=STREAM, flags=ACK, src=Address(0, 1), dst=Address(0, 2),
                             src_port=49152, dst_port=7, seq=1, ack=1, window=512)
        self.node.tunnels.send(header_only, 2)
        self.node.tunnels.send(Packet(protocol=STREAM, flags=ACK, src=Address(0, 1), dst=Address(0, 2),
                                      payload=b"hello\n"), 2)
        ours = [SealedFrame.decode(f) for f in self.net.frames(PILS)]
        theirs = [SealedFrame.decode(f) for f in self.captured(PILS, 24101)]
        self.assertEqual(len(ours[0].encode()), 70)
        self.assertIn(70, {len(f.encode()) for f in theirs})
        self.assertIn(76, {len(f.encode()) for f in theirs})
        self.assertEqual(len(ours[1].encode()), 76)
        self.assertEqual([f.sender for f in ours], [1, 1])
        self.assertEqual(ours[0].encode()[:8], theirs[0].encode()[:8])  # PILS, sender 1
        self.assertEqual([f.counter for f in ours], [f.counter for f in theirs[:2]])  # 1, 2
        self.assertEqual(ours[0].nonce_prefix, ours[1].nonce_prefix)

    def test_reference_rekey_is_heard(self) -> None:
        # Node 2 re-keyed (new prefix, counter 1) after node 1's repeated PILA.  The
        # reference's single window drops that frame (UDP entry 33; docs/reference-wire.md §9, #10); ours
        # keeps a window per prefix and accepts the whole sequence, but no replay.
        nonces = [SealedFrame.decode(f) for f in self.captured(PILS, 24102)]
        self.assertEqual(len({f.nonce_prefix for f in nonces}), 2)
        session = Session(bytes(32), bytes(32), os.urandom)
        reference = ReplayWindow()
        refused_by_reference = 0
        for f in nonces:
            self.assertTrue(session.acceptable(f.nonce_prefix, f.counter))
            window = session.windows.setdefault(f.nonce_prefix, ReplayWindow())
            window.mark(f.counter)
            self.assertFalse(session.acceptable(f.nonce_prefix, f.counter))
            refused_by_reference += not reference.accept(f.counter)
        self.assertEqual(refused_by_reference, 1)


class EstablishedLoopTests(Base):
    """An established peer's per-packet inputs run without the dispatch, unless a behaviour is under way."""

    def test_packets_both_ways_without_the_dispatch(self) -> None:
        self.establish()
        fed: list[str] = []
        peer_a, peer_b = self.a.tunnels._peers[2], self.b.tunnels._peers[1]
        for peer in (peer_a, peer_b):
            for name in ("packet_queued", "sealed_frame_received"):
                original = getattr(peer.machine, name)
                self.patch(peer.machine, name, lambda *a, _o=original, _n=name: (fed.append(_n), _o(*a))[1])
        sent = [packet(1, 2, seq=n, payload=b"x" * n) for n in range(2, 6)]
        for p in sent:
            self.a.tunnels.send(p, 2, B_ADDR)
        self.net.run()
        self.assertEqual([p for p, _ in self.b.delivered[-4:]], sent)
        self.assertEqual(fed, [])

    def test_an_input_while_a_behaviour_runs_goes_through_the_machine(self) -> None:
        self.establish()
        peer = self.a.tunnels._peers[2]
        seen_running: list[bool] = []
        original = peer.send_sealed
        later = packet(1, 2, seq=9)

        def send_sealed(p: Packet) -> None:
            seen_running.append(running(peer.machine))
            if p.seq == 7:  # from inside the machine's own behaviour: must wait for it
                self.a.tunnels.send(later, 2, B_ADDR)
            original(p)

        self.patch(peer, "send_sealed", send_sealed)
        peer.machine.packet_queued(packet(1, 2, seq=7))  # through the machine: its behaviour runs
        self.net.run()
        self.assertEqual(seen_running, [True, True])
        self.assertEqual([p.seq for p, _ in self.b.delivered[-2:]], [7, 9])
