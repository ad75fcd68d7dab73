"""
Tests for L{pilot.machines.connection}: the stream connection lifecycle and
data transfer, two connections joined by a deterministic fake link on a
L{task.Clock}.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Callable

from automat import NoTransition
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.address import Address
from pilot.machines.connection import (
    Connection, ConnectionConfig, ConnectionStats, transitions, unwrap, wire,
)
from pilot.machines.connection.machine import table
from pilot.machines.connection.transfer import ACK_STRETCH_BYTES
from pilot.wire.packet import (
    ACK, DATAGRAM, FIN, RST, STREAM, SYN, Packet, encode_sack, parse_sack,
)
from tests.machines.fakelink import (
    A_ADDR, A_PORT, B_ADDR, B_PORT, App, FakeLink, make_pair, pattern, run_until,
)

MB = 1 << 20

#: go-session-2, UDP entry 21 without the PILT magic: node 1 port 49152 -> node 2 port 7, SYN
#: (docs/reference-wire.md §4.5).
GO_SYN = bytes.fromhex("1101" "0000" "0000" "00000001" "0000" "00000002" "c000" "0007"
                       "00000000" "00000000" "0200" "65a71a43")


def flags_of(packets: list[Packet]) -> list[int]:
    return [p.flags for p in packets]


def data_packets(packets: list[Packet]) -> list[Packet]:
    return [p for p in packets if p.flags == ACK and p.payload and parse_sack(p.payload) is None]


class Recorder:
    """A single connection whose packets are collected instead of sent anywhere."""

    def __init__(self, passive: bool = True, **kw: Any) -> None:
        self.clock = Clock()
        self.out: list[Packet] = []
        self.app = App()
        local, lport, remote, rport = ((B_ADDR, B_PORT, A_ADDR, A_PORT) if passive
                                       else (A_ADDR, A_PORT, B_ADDR, B_PORT))
        self.conn = Connection(
            clock=self.clock, send=self.out.append, local=local, local_port=lport, remote=remote,
            remote_port=rport, data_received=self.app.data_received,
            connection_made=self.app.connection_made, connection_lost=self.app.connection_lost,
            released=self.app.release, **kw)
        self.local, self.lport, self.remote, self.rport = local, lport, remote, rport

    def packet(self, flags: int, seq: int = 0, ack: int = 0, window: int = 512,
               payload: bytes = b"", **kw: Any) -> Packet:
        fields: dict[str, Any] = dict(protocol=STREAM, src=self.remote, dst=self.local,
                                      src_port=self.rport, dst_port=self.lport, flags=flags,
                                      seq=wire(seq), ack=wire(ack), window=window, payload=payload)
        fields.update(kw)
        return Packet(**fields)

    def feed(self, flags: int, **kw: Any) -> None:
        self.conn.packet_received(self.packet(flags, **kw))

    def wait(self, seconds: float) -> None:
        """Let ``seconds`` pass, one scheduled call at a time (``Clock.advance`` would batch them)."""
        run_until(self.clock, lambda: False, seconds)

    def take(self) -> list[Packet]:
        out, self.out[:] = list(self.out), []
        return out

    def established_passive(self) -> None:
        """SYN, SYN+ACK, ACK: the peer's ISN is 0, ours 0, so data starts at 1 both ways."""
        self.feed(SYN)
        self.feed(ACK, seq=1, ack=1)
        self.take()


class HandshakeShapeTests(SynchronousTestCase):
    """The reference's packet shapes for the handshake (docs/reference-wire.md §4.5, §4.7)."""

    def test_syn(self) -> None:
        r = Recorder(passive=False)
        r.conn.open_active()
        [syn] = r.take()
        self.assertEqual((syn.flags, syn.protocol, syn.seq, syn.ack, syn.window, syn.payload),
                         (SYN, STREAM, 0, 0, 512, b""))
        self.assertEqual((syn.src, syn.src_port, syn.dst, syn.dst_port), (A_ADDR, A_PORT, B_ADDR, B_PORT))
        self.assertEqual(syn.version, 1)
        self.assertEqual(r.conn.state, "syn_sent")

    def test_syn_bytes_match_reference_capture(self) -> None:
        """Our SYN for the captured 4-tuple is byte for byte the reference's."""
        clock = Clock()
        out: list[Packet] = []
        conn = Connection(clock=clock, send=out.append, local=Address(0, 1), local_port=49152,
                          remote=Address(0, 2), remote_port=7)
        conn.open_active()
        self.assertEqual(out[0].encode(), GO_SYN)

    def test_syn_ack_for_reference_syn(self) -> None:
        r = Recorder()
        r.conn.packet_received(Packet.decode(GO_SYN))
        [synack] = r.take()
        self.assertEqual((synack.flags, synack.seq, synack.ack, synack.window, synack.payload),
                         (SYN | ACK, 0, 1, 512, b""))
        self.assertEqual((synack.src_port, synack.dst_port), (7, 49152))
        self.assertEqual(r.conn.state, "syn_received")
        self.assertEqual(r.app.made, 0)

    def test_active_side_acks_syn_ack(self) -> None:
        r = Recorder(passive=False)
        r.conn.open_active()
        r.take()
        r.feed(SYN | ACK, seq=0, ack=1)
        [ack] = r.take()
        self.assertEqual((ack.flags, ack.seq, ack.ack, ack.payload), (ACK, 1, 1, b""))
        self.assertEqual(r.conn.state, "established")
        self.assertEqual(r.app.made, 1)

    def test_third_ack_rides_on_first_data(self) -> None:
        """
        An opener that writes as it hears connection_made sends no pure ACK:
        its first data segment (flags ACK, ack = peer ISN + 1) completes the
        handshake, one datagram less per new stream (docs/connection.md).
        """
        r = Recorder(passive=False)
        r.app.on_made = lambda: r.conn.write(b"ping-1")
        r.conn.open_active()
        r.take()
        r.feed(SYN | ACK, seq=0, ack=1)
        [data] = r.take()
        self.assertEqual((data.flags, data.seq, data.ack, data.payload), (ACK, 1, 1, b"ping-1"))
        self.assertEqual(r.conn.state, "established")
        r.feed(ACK, seq=1, ack=7, payload=b"ping-1")  # the echo
        self.assertEqual(bytes(r.app.data), b"ping-1")

    def test_third_ack_rides_on_data_written_early(self) -> None:
        r = Recorder(passive=False)
        r.conn.open_active()
        r.conn.write(b"early")
        r.take()
        r.feed(SYN | ACK, seq=0, ack=1)
        self.assertEqual([(p.flags, p.seq, p.ack, p.payload) for p in r.take()], [(ACK, 1, 1, b"early")])

    def test_third_ack_before_fin_when_closed_at_once(self) -> None:
        r = Recorder(passive=False)
        r.app.on_made = r.conn.close
        r.conn.open_active()
        r.take()
        r.feed(SYN | ACK, seq=0, ack=1)
        self.assertEqual([(p.flags, p.seq, p.ack) for p in r.take()], [(ACK, 1, 1), (FIN, 1, 0)])
        self.assertEqual(r.conn.state, "fin_wait")

    def test_no_third_ack_when_aborted_at_once(self) -> None:
        r = Recorder(passive=False)
        r.app.on_made = r.conn.abort
        r.conn.open_active()
        r.take()
        r.feed(SYN | ACK, seq=0, ack=1)
        self.assertEqual(flags_of(r.take()), [RST])
        self.assertEqual(r.conn.state, "closed")

    def test_third_ack_on_data_establishes_passive_peer(self) -> None:
        """Our own acceptor takes the data segment as the end of the handshake."""
        clock = Clock()
        link = FakeLink(clock)
        a, b, app_a, app_b = make_pair(clock, link)
        app_a.on_made = lambda: a.write(b"ping-7")
        app_b.on_data = b.write  # an echo
        a.open_active()
        run_until(clock, lambda: bytes(app_a.data) == b"ping-7", 1.0)
        sent_by_a = [p for _, side, p, _ in link.log if side == "a"]
        self.assertEqual(flags_of(sent_by_a), [SYN, ACK])
        self.assertEqual(sent_by_a[1].payload, b"ping-7")
        self.assertEqual((a.state, b.state, app_b.made), ("established", "established", 1))

    def test_syn_ack_with_wrong_ack_ignored(self) -> None:
        r = Recorder(passive=False)
        r.conn.open_active()
        r.take()
        r.feed(SYN | ACK, seq=0, ack=7)
        self.assertEqual(r.take(), [])
        self.assertEqual(r.conn.state, "syn_sent")

    def test_passive_established_on_pure_ack(self) -> None:
        r = Recorder()
        r.feed(SYN)
        r.take()
        r.feed(ACK, seq=1, ack=1)
        self.assertEqual(r.conn.state, "established")
        self.assertEqual(r.app.made, 1)
        self.assertEqual(r.take(), [])

    def test_passive_established_on_data(self) -> None:
        """The final ACK was lost: the first data segment completes the handshake."""
        r = Recorder()
        r.feed(SYN)
        r.take()
        r.feed(ACK, seq=1, ack=1, payload=b"hello")
        self.assertEqual(r.conn.state, "established")
        self.assertEqual(bytes(r.app.data), b"hello")

    def test_passive_ignores_ack_not_for_our_syn(self) -> None:
        r = Recorder()
        r.feed(SYN)
        r.take()
        r.feed(ACK, seq=1, ack=5, payload=b"junk")
        self.assertEqual(r.conn.state, "syn_received")
        self.assertEqual(bytes(r.app.data), b"")

    def test_duplicate_syn_resends_syn_ack(self) -> None:
        r = Recorder()
        r.feed(SYN)
        r.feed(SYN)
        self.assertEqual([(p.flags, p.seq, p.ack) for p in r.take()], [(SYN | ACK, 0, 1)] * 2)
        r.feed(ACK, seq=1, ack=1, payload=b"x")
        r.take()
        r.feed(SYN)  # still answered once established (the reference does too), same as before
        self.assertEqual([(p.flags, p.seq, p.ack) for p in r.take()], [(SYN | ACK, 0, 1)])

    def test_active_repeats_ack_for_repeated_syn_ack(self) -> None:
        r = Recorder(passive=False)
        r.conn.open_active()
        r.feed(SYN | ACK, seq=0, ack=1)
        r.take()
        r.feed(SYN | ACK, seq=0, ack=1)
        self.assertEqual([(p.flags, p.seq, p.ack) for p in r.take()], [(ACK, 1, 1)])

    def test_syn_retransmission_schedule_and_give_up(self) -> None:
        """1 s doubling to 8 s, 6 retries, then TimeoutError (and an RST for a half-open peer)."""
        r = Recorder(passive=False)
        r.conn.open_active()
        r.take()
        times: list[Any] = [r.clock.seconds()]
        while r.conn.state == "syn_sent":
            r.clock.advance(0.5)
            for p in r.take():
                times.append((r.clock.seconds(), p.flags))
        syn_times = [t for t, f in times[1:] if f == SYN]
        self.assertEqual(syn_times, [1.0, 3.0, 7.0, 15.0, 23.0, 31.0])
        self.assertEqual(times[-1], (39.0, RST))
        self.assertEqual(r.conn.state, "closed")
        [reason] = r.app.lost
        reason.trap(error.TimeoutError)
        self.assertEqual(r.app.released, 1)

    def test_passive_waits_for_a_reference_keepalive(self) -> None:
        """
        A reference opener that lost its final ACK and has nothing to send
        ignores our SYN+ACKs; its first keepalive (30-45 s after dialling) still
        establishes us.  Without it we give up after 60 s.
        """
        r = Recorder()
        r.feed(SYN)
        r.wait(44)
        self.assertEqual(r.conn.state, "syn_received")
        synacks = [p for p in r.take() if p.flags == SYN | ACK]
        self.assertGreater(len(synacks), 6)
        r.feed(ACK, seq=1, ack=1)  # the keepalive: ACK-only, window 0 on the reference
        self.assertEqual(r.conn.state, "established")
        r2 = Recorder()
        r2.feed(SYN)
        r2.wait(59.9)
        self.assertEqual(r2.conn.state, "syn_received")
        r2.wait(0.2)
        self.assertEqual(r2.conn.state, "closed")
        r2.app.lost[0].trap(error.TimeoutError)
        self.assertEqual(r2.take()[-1].flags, RST)

    def test_refused(self) -> None:
        r = Recorder(passive=False)
        r.conn.open_active()
        r.feed(RST)
        self.assertEqual(r.conn.state, "closed")
        r.app.lost[0].trap(error.ConnectionRefusedError)
        self.assertEqual(r.app.released, 1)
        r.clock.advance(100)
        self.assertEqual(r.take()[1:], [])


class HandshakeLossTests(SynchronousTestCase):
    @staticmethod
    def bare(flags: int) -> Callable[[str, Packet], bool]:
        return lambda side, p: p.flags == flags and not p.payload

    def handshake(self, **drops: int) -> tuple[Clock, FakeLink, Connection, Connection, App, App]:
        clock = Clock()
        link = FakeLink(clock)
        for name, count in drops.items():
            link.drop_first(self.bare({"syn": SYN, "synack": SYN | ACK, "ack": ACK}[name]), count)
        a, b, app_a, app_b = make_pair(clock, link)
        a.open_active()
        a.write(b"request")
        b.write(b"response")
        self.assertTrue(run_until(clock, lambda: bytes(app_b.data) == b"request"
                                  and bytes(app_a.data) == b"response", 60))
        return clock, link, a, b, app_a, app_b

    def test_no_loss(self) -> None:
        clock, link, a, b, app_a, app_b = self.handshake()
        self.assertEqual((a.state, b.state), ("established", "established"))
        self.assertEqual((app_a.made, app_b.made), (1, 1))
        self.assertEqual(flags_of(link.sent()[:3]), [SYN, SYN | ACK, ACK])
        self.assertLess(clock.seconds(), 0.2)

    def test_syn_lost(self) -> None:
        clock, link, *_ = self.handshake(syn=1)
        self.assertEqual(flags_of(link.sent())[:3], [SYN, SYN, SYN | ACK])
        self.assertGreaterEqual(clock.seconds(), 1.0)

    def test_syn_ack_lost(self) -> None:
        clock, link, *_ = self.handshake(synack=1)
        # both the SYN+ACK timer and the repeated SYN bring another one
        self.assertIn(flags_of(link.sent()).count(SYN | ACK), (2, 3))

    def test_final_ack_lost(self) -> None:
        """The passive side learns of the handshake from the first data segment."""
        clock, link, a, b, app_a, app_b = self.handshake(ack=1)
        self.assertEqual(app_b.made, 1)
        self.assertLess(clock.seconds(), 0.5)

    def test_everything_lost_a_few_times(self) -> None:
        self.handshake(syn=2, synack=2, ack=1)


class TransferTests(SynchronousTestCase):
    """Byte-exact transfers through loss, duplication and reordering."""

    def transfer(self, size: int = MB, both: bool = False, limit: float = 900.0,
                 iss_a: int = 0, iss_b: int = 0,
                 **link_args: Any) -> tuple[Connection, Connection, FakeLink, Clock]:
        clock = Clock()
        link = FakeLink(clock, **link_args)
        a, b, app_a, app_b = make_pair(clock, link, iss_a=iss_a, iss_b=iss_b)
        up, down = pattern(size, 1), pattern(size if both else 0, 2)
        a.open_active()
        a.write(up)
        b.write(down)
        self.assertTrue(run_until(clock, lambda: len(app_b.data) >= len(up)
                                  and len(app_a.data) >= len(down), limit),
                        f"stalled: {len(app_b.data)}/{len(up)} {len(app_a.data)}/{len(down)}")
        self.assertEqual(bytes(app_b.data), up)
        self.assertEqual(bytes(app_a.data), down)
        self.assertEqual(a.stats.bytes_sent, len(up))
        # and everything gets acknowledged
        self.assertTrue(run_until(clock, lambda: a.stats.unacked == 0 and b.stats.unacked == 0, limit))
        self.assertEqual((a.state, b.state), ("established", "established"))
        return a, b, link, clock

    def test_clean(self) -> None:
        a, b, link, clock = self.transfer()
        self.assertEqual(a.stats.retransmits, 0)
        self.assertLess(clock.seconds(), 1.0)
        sizes = {len(p.payload) for p in data_packets(link.sent("a"))}
        self.assertEqual(max(sizes), 4096)

    def test_loss_5(self) -> None:
        a, *_ = self.transfer(loss=0.05, seed=5)
        self.assertGreater(a.stats.retransmits, 0)

    def test_loss_20(self) -> None:
        self.transfer(loss=0.20, seed=20)

    def test_duplication(self) -> None:
        a, b, link, clock = self.transfer(duplicate=0.3, seed=7)
        self.assertGreater(b.stats.segs_recv, len(data_packets(link.sent("a"))))

    def test_reordering(self) -> None:
        a, b, link, clock = self.transfer(reorder=0.3, seed=8)
        self.assertGreater(a.stats.sack_recv, 0)

    def test_everything_both_ways(self) -> None:
        self.transfer(both=True, loss=0.1, duplicate=0.1, reorder=0.2, seed=9)

    def test_sequence_wrap_around(self) -> None:
        """Both ISNs just below 2**32: the transfer crosses the wrap in both directions."""
        a, b, link, clock = self.transfer(both=True, size=256 * 1024, loss=0.05, reorder=0.1,
                                          seed=11, iss_a=2**32 - 5000, iss_b=2**32 - 70000)
        seqs = [p.seq for p in data_packets(link.sent("a"))]
        self.assertTrue(any(s > 2**31 for s in seqs) and any(s < 2**20 for s in seqs))
        [syn] = [p for p in link.sent("a") if p.flags == SYN][:1]
        self.assertEqual(syn.seq, 2**32 - 5000)

    def test_isn_2_32_minus_1(self) -> None:
        """The SYN takes the last sequence number; the first data byte is 0 on the wire."""
        a, b, link, clock = self.transfer(size=10000, iss_a=2**32 - 1)
        self.assertEqual(data_packets(link.sent("a"))[0].seq, 0)

    def test_many_small_writes(self) -> None:
        clock = Clock()
        link = FakeLink(clock, loss=0.05, seed=3)
        a, b, app_a, app_b = make_pair(clock, link)
        a.open_active()
        chunks = [pattern(random.Random(i).randrange(1, 3000), i) for i in range(400)]
        for chunk in chunks:
            a.write(chunk)
            clock.advance(0.001)
        self.assertTrue(run_until(clock, lambda: len(app_b.data) >= sum(map(len, chunks)), 300))
        self.assertEqual(bytes(app_b.data), b"".join(chunks))


class RecoveryTests(SynchronousTestCase):
    def test_fast_retransmit(self) -> None:
        """One lost data segment is resent after three duplicate ACKs, well before the RTO."""
        clock = Clock()
        link = FakeLink(clock)
        link.drop_first(lambda side, p: side == "a" and p.payload != b"" and p.seq == 1 + 2 * 4096)
        a, b, app_a, app_b = make_pair(clock, link)
        a.open_active()
        data = pattern(64 * 4096)
        a.write(data)
        self.assertTrue(run_until(clock, lambda: len(app_b.data) == len(data), 60))
        self.assertEqual(bytes(app_b.data), data)
        self.assertEqual(a.stats.fast_retx, 1)
        self.assertEqual(a.stats.retransmits, 1)
        self.assertGreaterEqual(a.stats.dup_acks, 3)
        self.assertGreater(b.stats.sack_sent, 0)
        self.assertLess(clock.seconds(), 0.5)

    def test_rto_backoff_and_give_up(self) -> None:
        """The peer vanishes mid-transfer: RTO doubles to 10 s, 8 retransmissions, then RST."""
        clock = Clock()
        link = FakeLink(clock)
        a, b, app_a, app_b = make_pair(clock, link)
        a.open_active()
        a.write(pattern(4096))
        run_until(clock, lambda: len(app_b.data) == 4096, 10)
        run_until(clock, lambda: a.stats.unacked == 0, 10)
        link.down = True
        start = clock.seconds()
        a.write(b"lost")
        self.assertTrue(run_until(clock, lambda: a.state == "closed", 300))
        sent = [(t - start, p) for t, s, p, _ in link.log if s == "a" and t >= start]
        retransmits = [t for t, p in sent if p.payload == b"lost"][1:]
        gaps = [round(b - a, 3) for a, b in zip(retransmits, retransmits[1:])]
        self.assertEqual(len(retransmits), 8)
        self.assertEqual(gaps[-2:], [10.0, 10.0])
        for earlier, later in zip(gaps, gaps[1:]):
            self.assertTrue(later == min(10.0, round(earlier * 2, 3)), gaps)
        self.assertEqual(sent[-1][1].flags, RST)
        app_a.lost[0].trap(error.TimeoutError)
        self.assertEqual(app_a.released, 1)

    def test_sack_blocks_sent_for_out_of_order(self) -> None:
        r = Recorder()
        r.established_passive()
        r.feed(ACK, seq=1 + 4096, ack=1, payload=b"b" * 4096)
        r.feed(ACK, seq=1 + 3 * 4096, ack=1, payload=b"d" * 4096)
        acks = r.take()
        self.assertEqual([p.ack for p in acks], [1, 1])
        self.assertEqual(parse_sack(acks[0].payload), [(1 + 4096, 1 + 2 * 4096)])
        self.assertEqual(parse_sack(acks[1].payload),
                         [(1 + 3 * 4096, 1 + 4 * 4096), (1 + 4096, 1 + 2 * 4096)])
        r.feed(ACK, seq=1, ack=1, payload=b"a" * 4096)  # fills the first gap: immediate ACK
        [ack] = r.take()
        self.assertEqual(ack.ack, 1 + 2 * 4096)
        self.assertEqual(parse_sack(ack.payload), [(1 + 3 * 4096, 1 + 4 * 4096)])
        self.assertEqual(bytes(r.app.data), b"a" * 4096 + b"b" * 4096)

    def test_sack_received_spares_segments(self) -> None:
        """SACKed segments are never resent: not on SACK loss detection, not after a timeout."""
        r = Recorder(passive=False, config=ConnectionConfig(nagle=False))
        r.conn.open_active()
        r.feed(SYN | ACK, seq=0, ack=1)
        r.conn.write(b"x" * (4 * 4096))
        r.take()
        sack = encode_sack([(1 + 4096, 1 + 4 * 4096)])
        r.feed(ACK, seq=1, ack=1, payload=sack)
        self.assertEqual([p.seq for p in data_packets(r.take())], [1])  # 3 later segments SACKed
        r.clock.advance(1.0)
        self.assertEqual([p.seq for p in data_packets(r.take())], [1])  # the timeout resends only the hole
        self.assertEqual(r.conn.stats.fast_retx, 1)

    def test_lost_retransmission_found_without_timeout(self) -> None:
        """The retransmitted hole is lost again; SACKs for later segments reveal it."""
        clock = Clock()
        link = FakeLink(clock)
        link.drop_first(lambda side, p: side == "a" and p.seq == 1 + 4096 and len(p.payload) == 4096, 2)
        a, b, app_a, app_b = make_pair(clock, link)
        a.open_active()
        data = pattern(40 * 4096)
        a.write(data)
        self.assertTrue(run_until(clock, lambda: len(app_b.data) == len(data), 60))
        self.assertEqual(a.stats.retransmits, 2)
        first, second = [t for t, s, p, _ in link.log if s == "a" and p.seq == 1 + 4096][1:]
        self.assertLess(second - first, 0.1)  # a round trip, not the 200 ms minimum RTO

    def test_duplicate_data_is_re_acked_not_delivered(self) -> None:
        r = Recorder()
        r.established_passive()
        r.feed(ACK, seq=1, ack=1, payload=b"abc")
        r.clock.advance(0.1)
        r.take()
        r.feed(ACK, seq=1, ack=1, payload=b"abc")
        [ack] = r.take()
        self.assertEqual((ack.flags, ack.ack), (ACK, 4))
        self.assertEqual(bytes(r.app.data), b"abc")

    def test_overlapping_segment_trimmed(self) -> None:
        r = Recorder()
        r.established_passive()
        r.feed(ACK, seq=1, ack=1, payload=b"abc")
        r.feed(ACK, seq=2, ack=1, payload=b"bcdef")
        r.clock.advance(0)  # the end of the reactor pass: the second segment's data and the ACK
        self.assertEqual(bytes(r.app.data), b"abcdef")


class DelayedAckTests(SynchronousTestCase):
    def test_one_segment_waits_40ms(self) -> None:
        r = Recorder()
        r.established_passive()
        r.feed(ACK, seq=1, ack=1, payload=b"a")
        self.assertEqual(r.take(), [])
        r.clock.advance(0.039)
        self.assertEqual(r.take(), [])
        r.clock.advance(0.001)
        [ack] = r.take()
        self.assertEqual((ack.flags, ack.seq, ack.ack, ack.payload), (ACK, 1, 2, b""))

    def test_every_second_segment(self) -> None:
        r = Recorder()
        r.established_passive()
        r.feed(ACK, seq=1, ack=1, payload=b"a")
        self.assertEqual(bytes(r.app.data), b"a")  # the first segment after an ACK: at once
        r.feed(ACK, seq=2, ack=1, payload=b"b")
        self.assertEqual(r.take(), [])
        r.clock.advance(0)  # the end of the reactor pass that read the second
        [ack] = r.take()
        self.assertEqual(ack.ack, 3)
        self.assertEqual(bytes(r.app.data), b"ab")
        r.clock.advance(1)
        self.assertEqual(r.take(), [])

    def test_one_stretch_ack_a_pass(self) -> None:
        """Segments read in one pass share an ACK, up to ACK_STRETCH_BYTES of them, and
        their data reaches the application in one call."""
        r = Recorder()
        r.established_passive()
        calls: list[bytes] = []
        r.app.on_data = calls.append
        size = 1024
        stretch = ACK_STRETCH_BYTES // size
        payloads = [bytes([65 + i % 26]) * size for i in range(stretch + 4)]
        for i, payload in enumerate(payloads):
            r.feed(ACK, seq=1 + i * size, ack=1, payload=payload)
        [ack] = r.take()
        self.assertEqual(ack.ack, 1 + ACK_STRETCH_BYTES)
        r.clock.advance(0)
        [ack] = r.take()
        self.assertEqual(ack.ack, 1 + (stretch + 4) * size)
        self.assertEqual(b"".join(calls), b"".join(payloads))
        # the first segment after an ACK goes at once, the next ones with the ACK
        self.assertEqual([len(c) // size for c in calls], [1, stretch - 1, 1, 3])

    def test_piggybacked_on_data(self) -> None:
        r = Recorder()
        r.established_passive()
        r.app.on_data = r.conn.write  # an echo server
        r.feed(ACK, seq=1, ack=1, payload=b"ping")
        [echo] = r.take()
        self.assertEqual((echo.flags, echo.seq, echo.ack, echo.payload), (ACK, 1, 5, b"ping"))
        r.wait(0.15)
        self.assertEqual(r.take(), [])  # no separate ACK: the echo carried it


class SackLookalikeTests(SynchronousTestCase):
    """Facts §9 item 19: data must never parse as a SACK option on the wire."""

    def test_split(self) -> None:
        clock = Clock()
        link = FakeLink(clock)
        a, b, app_a, app_b = make_pair(clock, link)
        a.open_active()
        evil = b"SACK\x02" + bytes(16) + b"tail" * 2000 + b"SACK\x01" + bytes(8) + b"x" * 5000
        a.write(evil)
        self.assertTrue(run_until(clock, lambda: len(app_b.data) == len(evil), 10))
        self.assertEqual(bytes(app_b.data), evil)
        self.assertEqual([p for p in link.sent("a") if p.payload and parse_sack(p.payload)], [])
        first, second = data_packets(link.sent("a"))[:2]
        self.assertEqual(first.payload, evil[:20])  # one byte short of the SACK option it spelled
        self.assertEqual(second.seq, 21)

    def test_ack_payload_that_parses_is_sack_not_data(self) -> None:
        """Like the reference, an ACK whose payload reads as SACK is not delivered."""
        r = Recorder()
        r.established_passive()
        r.feed(ACK, seq=1, ack=1, payload=encode_sack([(1, 2)]))
        r.clock.advance(1)
        self.assertEqual(bytes(r.app.data), b"")


class CloseTests(SynchronousTestCase):
    def pair(self, **link_args: Any) -> tuple[Clock, FakeLink, Connection, Connection, App, App]:
        clock = Clock()
        link = FakeLink(clock, **link_args)
        a, b, app_a, app_b = make_pair(clock, link)
        a.open_active()
        run_until(clock, lambda: a.state == "established" and b.state == "established", 30)
        return clock, link, a, b, app_a, app_b

    def test_close_after_data(self) -> None:
        """FIN only after everything written is acknowledged; both report a clean close."""
        clock, link, a, b, app_a, app_b = self.pair()
        data = pattern(300000)
        a.write(data)
        a.close()
        self.assertEqual(a.state, "draining")
        self.assertTrue(run_until(clock, lambda: bool(app_a.lost) and bool(app_b.lost), 60))
        self.assertEqual(bytes(app_b.data), data)
        app_a.lost[0].trap(error.ConnectionDone)
        app_b.lost[0].trap(error.ConnectionDone)
        [fin] = [p for p in link.sent("a") if p.flags & FIN]
        self.assertEqual((fin.flags, fin.seq, fin.ack), (FIN, 1 + len(data), 0))
        [finack] = [p for p in link.sent("b") if p.flags & FIN]
        self.assertEqual((finack.flags, finack.ack), (FIN | ACK, 2 + len(data)))
        self.assertEqual((a.state, b.state), ("time_wait", "time_wait"))
        self.assertTrue(run_until(clock, lambda: a.state == b.state == "closed", 11))
        self.assertEqual((app_a.released, app_b.released), (1, 1))
        self.assertEqual(flags_of(link.sent(since=fin_time(link))), [FIN, FIN | ACK])  # no ACK after

    def test_close_from_passive_side(self) -> None:
        clock, link, a, b, app_a, app_b = self.pair()
        b.write(b"bye")
        b.close()
        self.assertTrue(run_until(clock, lambda: a.state == b.state == "closed", 30))
        self.assertEqual(bytes(app_a.data), b"bye")
        app_a.lost[0].trap(error.ConnectionDone)
        app_b.lost[0].trap(error.ConnectionDone)

    def test_close_at_once_both_sides(self) -> None:
        clock, link, a, b, app_a, app_b = self.pair()
        a.write(b"from a")
        b.write(b"from b")
        a.close()
        b.close()
        self.assertTrue(run_until(clock, lambda: a.state == b.state == "closed", 30))
        self.assertEqual((bytes(app_a.data), bytes(app_b.data)), (b"from b", b"from a"))
        app_a.lost[0].trap(error.ConnectionDone)
        app_b.lost[0].trap(error.ConnectionDone)
        after = link.sent(since=fin_time(link))
        self.assertLessEqual(len(after), 6)
        self.assertEqual([p for p in after if p.flags == FIN | ACK and p.flags & SYN], [])

    def test_close_with_loss_and_before_handshake(self) -> None:
        """Write and close before the SYN is even answered, through a lossy link."""
        clock = Clock()
        link = FakeLink(clock, loss=0.2, seed=4)
        a, b, app_a, app_b = make_pair(clock, link)
        data = pattern(100000)
        a.open_active()
        a.write(data)
        a.close()
        self.assertTrue(run_until(clock, lambda: len(app_b.data) == len(data) and bool(app_a.lost), 300))
        self.assertEqual(bytes(app_b.data), data)
        app_a.lost[0].trap(error.ConnectionDone)
        self.assertTrue(run_until(clock, lambda: a.state == "closed" and b.state == "closed", 300))
        self.assertLess(len(link.sent(since=fin_time(link))), 40)

    def test_no_fin_ack_ping_pong(self) -> None:
        """
        A reference peer answers every FIN, FIN+ACK included, with FIN+ACK (docs/reference-wire.md §9
        item 18).  We answer a FIN+ACK with at most one pure ACK, ever.
        """
        r = Recorder()
        r.established_passive()
        r.feed(FIN, seq=1)  # the reference closes: FIN, no ACK flag
        [finack] = r.take()
        self.assertEqual((finack.flags, finack.seq, finack.ack), (FIN | ACK, 1, 2))
        self.assertEqual(r.conn.state, "time_wait")
        for _ in range(20):  # the reference echoes our FIN+ACK, again and again
            r.feed(FIN | ACK, seq=1, ack=2)
        answers = r.take()
        self.assertEqual([(p.flags, p.payload) for p in answers], [(ACK, b"")])
        r.app.lost[0].trap(error.ConnectionDone)

    def test_our_fin_answered_with_fin_ack(self) -> None:
        """
        The FIN+ACK that answers our FIN gets no ACK back, nor does a repeat of
        it: the peer lingers in TIME_WAIT already (docs/connection.md).
        """
        r = Recorder()
        r.established_passive()
        r.conn.close()
        [fin] = r.take()
        self.assertEqual((fin.flags, fin.seq), (FIN, 1))
        r.feed(FIN | ACK, seq=1, ack=2)
        r.feed(FIN | ACK, seq=1, ack=2)
        self.assertEqual(r.take(), [])
        self.assertEqual(r.conn.state, "time_wait")
        r.clock.advance(10)
        self.assertEqual(r.conn.state, "closed")
        self.assertEqual(r.app.released, 1)

    def test_fin_retransmitted(self) -> None:
        r = Recorder()
        r.established_passive()
        r.conn.close()
        r.wait(1.0)
        self.assertEqual(flags_of(r.take()), [FIN, FIN, FIN])  # RTO 200 ms doubling
        r.wait(600)
        self.assertEqual(r.conn.state, "closed")
        r.app.lost[0].trap(error.ConnectionDone)

    def test_fin_retries_within_peer_time_wait(self) -> None:
        """A lossy transfer backed the RTO off to 10 s; the FIN still comes again within 5 s."""
        r = Recorder()
        r.established_passive()
        for _ in range(6):
            r.conn.rtt.back_off()
        r.conn.close()
        r.wait(20)
        fins = [p for p in r.take() if p.flags == FIN]
        self.assertGreaterEqual(len(fins), 6)

    def test_rst_after_our_fin_is_a_clean_close(self) -> None:
        r = Recorder()
        r.established_passive()
        r.conn.close()
        r.feed(RST)
        r.app.lost[0].trap(error.ConnectionDone)
        self.assertEqual(r.app.released, 1)

    def test_repeated_fin_in_time_wait_answered(self) -> None:
        r = Recorder()
        r.established_passive()
        r.feed(FIN, seq=1)
        r.feed(FIN, seq=1)
        self.assertEqual(flags_of(r.take()), [FIN | ACK, FIN | ACK])

    def test_fin_with_data_missing(self) -> None:
        """The reference sends FIN at once on close, even with data unacknowledged."""
        r = Recorder()
        r.established_passive()
        r.feed(ACK, seq=1, ack=1, payload=b"abc")
        r.feed(FIN, seq=10)
        r.app.lost[0].trap(error.ConnectionLost)
        self.assertEqual(bytes(r.app.data), b"abc")

    def test_peer_closes_while_we_have_data(self) -> None:
        r = Recorder(config=ConnectionConfig(nagle=False))
        r.established_passive()
        r.conn.write(b"unacknowledged")
        r.feed(FIN, seq=1)
        r.app.lost[0].trap(error.ConnectionLost)

    def test_syn_in_time_wait_frees_the_ports(self) -> None:
        r = Recorder()
        r.established_passive()
        r.feed(FIN, seq=1)
        r.feed(SYN)
        self.assertEqual(r.conn.state, "closed")
        self.assertEqual(r.app.released, 1)

    def test_write_after_close_ignored(self) -> None:
        r = Recorder()
        r.established_passive()
        r.conn.close()
        r.conn.write(b"late")
        self.assertEqual([p.payload for p in r.take()], [b""])

    def test_close_before_open(self) -> None:
        r = Recorder(passive=False)
        r.conn.close()
        self.assertEqual(r.conn.state, "closed")
        self.assertEqual(r.take(), [])
        r.app.lost[0].trap(error.ConnectionDone)


def fin_time(link: FakeLink) -> float:
    return min(t for t, s, p, _ in link.log if p.flags & FIN)


class ResetTests(SynchronousTestCase):
    def test_rst_while_established(self) -> None:
        r = Recorder()
        r.established_passive()
        r.feed(RST)  # the reference's RST has seq 0, ack 0
        self.assertEqual(r.conn.state, "closed")
        r.app.lost[0].trap(error.ConnectionLost)
        self.assertEqual(r.app.released, 1)
        r.clock.advance(1000)
        self.assertEqual(r.take(), [])

    def test_abort(self) -> None:
        clock = Clock()
        link = FakeLink(clock)
        a, b, app_a, app_b = make_pair(clock, link)
        a.open_active()
        run_until(clock, lambda: b.state == "established", 5)
        a.write(b"x" * 100000)
        a.abort()
        self.assertEqual(link.sent("a")[-1].flags, RST)
        app_a.lost[0].trap(error.ConnectionAborted)
        self.assertTrue(run_until(clock, lambda: b.state == "closed", 5))
        app_b.lost[0].trap(error.ConnectionLost)
        self.assertEqual((app_a.released, app_b.released), (1, 1))

    def test_app_exception_aborts(self) -> None:
        r = Recorder()
        r.established_passive()

        def boom(data: bytes) -> None:
            raise ValueError("bad app")

        r.app.on_data = boom
        r.feed(ACK, seq=1, ack=1, payload=b"x")
        self.assertEqual(r.conn.state, "closed")
        r.app.lost[0].trap(ValueError)
        self.assertEqual(r.take()[-1].flags, RST)


class FlowControlTests(SynchronousTestCase):
    def test_stopped_reader(self) -> None:
        """A receiver that stops reading: the sender stops at the window, and resumes."""
        clock = Clock()
        link = FakeLink(clock)
        a, b, app_a, app_b = make_pair(clock, link)
        a.open_active()
        run_until(clock, lambda: b.state == "established", 5)
        b.pause_reading()
        data = pattern(4 * MB)
        a.write(data)
        clock.advance(0)
        run_until(clock, lambda: False, 5)
        limit = 512 * 4096
        self.assertEqual(len(app_b.data), 0)
        self.assertLessEqual(b.stats.recv_win, 4096)
        self.assertEqual(a.stats.peer_recv_win, 4096)
        self.assertLessEqual(a.stats.bytes_sent, limit + 3 * 4096)
        # a long pause: the sender probes but never gives up, the queue stays bounded
        run_until(clock, lambda: False, 300)
        self.assertEqual(a.state, "established")
        self.assertLessEqual(a.stats.bytes_sent, limit + 3 * 4096)
        probes = [t for t, s, p, _ in link.log if s == "a" and t > 100]
        self.assertLess(len(probes), 30)
        b.resume_reading()
        self.assertTrue(run_until(clock, lambda: len(app_b.data) == len(data), 60))
        self.assertEqual(bytes(app_b.data), data)

    def test_window_advertised(self) -> None:
        r = Recorder()
        r.established_passive()
        r.conn.pause_reading()
        for i in range(4):
            r.feed(ACK, seq=1 + i * 4096, ack=1, payload=b"z" * 4096)
        self.assertEqual(r.take(), [])  # the ACK waits for the end of the reactor pass
        r.clock.advance(0)
        windows = [p.window for p in r.take()]
        self.assertEqual(windows, [508])
        r.conn.resume_reading()
        [update] = r.take()
        self.assertEqual((update.flags, update.window), (ACK, 512))
        self.assertEqual(len(r.app.data), 4 * 4096)

    def test_never_advertises_zero(self) -> None:
        r = Recorder()
        r.established_passive()
        r.conn.pause_reading()
        seq = 1
        for i in range(520):
            r.feed(ACK, seq=seq, ack=1, payload=b"z" * 4096)
            seq += 4096
        out = r.take()
        self.assertEqual(min(p.window for p in out), 1)
        self.assertLessEqual(r.conn.stats.recv_ack, 1 + 513 * 4096)

    def test_peer_window_zero_means_one_segment(self) -> None:
        r = Recorder(passive=False, config=ConnectionConfig(nagle=False))
        r.conn.open_active()
        r.feed(SYN | ACK, seq=0, ack=1, window=0)
        r.take()
        r.conn.write(b"q" * 20000)
        self.assertEqual([len(p.payload) for p in data_packets(r.take())], [4096])
        r.feed(ACK, seq=1, ack=1 + 4096, window=3)
        self.assertEqual([len(p.payload) for p in data_packets(r.take())], [4096] * 3)

    def test_keepalive_window_zero_ignored(self) -> None:
        """The reference's keepalive and FIN+ACK carry window 0 without meaning it."""
        r = Recorder(passive=False, config=ConnectionConfig(nagle=False))
        r.conn.open_active()
        r.feed(SYN | ACK, seq=0, ack=1, window=512)
        r.feed(ACK, seq=1, ack=1, window=0)
        r.conn.write(b"q" * 20000)
        self.assertEqual(len(data_packets(r.take())), 5)


class NagleTests(SynchronousTestCase):
    def test_small_writes_coalesce_while_unacked(self) -> None:
        r = Recorder()
        r.established_passive()
        r.conn.write(b"a")
        r.conn.write(b"b")
        r.conn.write(b"c")
        self.assertEqual([p.payload for p in r.take()], [b"a"])
        r.clock.advance(0.04)
        self.assertEqual([p.payload for p in r.take()], [b"bc"])

    def test_ack_releases_held_data(self) -> None:
        r = Recorder()
        r.established_passive()
        r.conn.write(b"a")
        r.conn.write(b"b")
        r.take()
        r.feed(ACK, seq=1, ack=2)
        self.assertEqual([p.payload for p in r.take()], [b"b"])

    def test_nodelay(self) -> None:
        r = Recorder(config=ConnectionConfig(nagle=False))
        r.established_passive()
        r.conn.write(b"a")
        r.conn.write(b"b")
        self.assertEqual([p.payload for p in r.take()], [b"a", b"b"])


class KeepaliveTests(SynchronousTestCase):
    def test_probe_answered(self) -> None:
        clock = Clock()
        link = FakeLink(clock)
        a, b, app_a, app_b = make_pair(clock, link)
        a.open_active()
        a.write(b"hi")
        run_until(clock, lambda: a.stats.unacked == 0, 5)
        run_until(clock, lambda: False, 600)
        self.assertEqual((a.state, b.state), ("established", "established"))
        probes = [p for p in link.sent("a") if p.payload == b"\x00"]
        self.assertGreater(len(probes), 5)
        self.assertEqual(probes[0].seq, 2)  # the last byte already sent: answered, not delivered
        self.assertEqual(bytes(app_b.data), b"hi")

    def test_idle_timeout(self) -> None:
        r = Recorder()
        r.established_passive()
        r.wait(30)
        [probe] = r.take()
        self.assertEqual((probe.flags, probe.seq, probe.payload), (ACK, 0, b"\x00"))
        r.wait(89)
        self.assertEqual(len(r.take()), 2)
        r.wait(1)
        self.assertEqual(r.conn.state, "closed")
        self.assertEqual(r.take()[-1].flags, RST)
        r.app.lost[0].trap(error.TimeoutError)

    def test_probe_and_timeout_count_from_the_last_packet(self) -> None:
        """One timer serves both: probes 30 s after the last packet and every 30 s, idle after 120 s."""
        r = Recorder()
        r.established_passive()
        r.wait(20)
        r.feed(ACK, seq=1, ack=1)  # something from the peer at 20 s
        probes: list[float] = []
        while r.conn.state == "established":
            r.wait(1)
            probes += [r.clock.seconds() for p in r.take() if p.payload == b"\x00"]
        self.assertEqual(probes, [50.0, 80.0, 110.0])
        self.assertEqual(r.clock.seconds(), 140.0)
        r.app.lost[0].trap(error.TimeoutError)
        self.assertEqual(len(r.clock.getDelayedCalls()), 0)

    def test_configurable(self) -> None:
        r = Recorder(config=ConnectionConfig(keepalive_interval=5, idle_timeout=12))
        r.established_passive()
        r.wait(11.9)
        self.assertEqual(len(r.take()), 2)
        r.wait(0.1)
        self.assertEqual(r.conn.state, "closed")


class RobustnessTests(SynchronousTestCase):
    def test_bad_ends_refused_when_made(self) -> None:
        """Addresses and ports are checked once, when the connection is made (ValueError)."""
        clock = Clock()
        good: dict[str, Any] = dict(clock=clock, send=lambda p: None, local=A_ADDR, local_port=A_PORT,
                                    remote=B_ADDR, remote_port=B_PORT)
        Connection(**good)
        for bad in ({"local_port": 65536}, {"remote_port": -1}, {"remote_port": True},
                    {"local_port": 1.0}, {"local": "0:0000.0000.0001"}, {"remote": None}):
            self.assertRaises(ValueError, Connection, **{**good, **bad})

    def test_wrong_connection_dropped(self) -> None:
        r = Recorder()
        r.established_passive()
        other = [
            r.packet(ACK, seq=1, ack=1, payload=b"x", src_port=1234),
            r.packet(ACK, seq=1, ack=1, payload=b"x", dst_port=1234),
            r.packet(ACK, seq=1, ack=1, payload=b"x", src=Address(0, 99)),
            r.packet(ACK, seq=1, ack=1, payload=b"x", dst=Address(0, 99)),
            r.packet(ACK, seq=1, ack=1, payload=b"x", src=Address(5, 1)),
            r.packet(ACK, seq=1, ack=1, payload=b"x", protocol=DATAGRAM),
            r.packet(RST, src_port=1),
        ]
        for p in other:
            r.conn.packet_received(p)
        r.conn.packet_received(b"not a packet")  # type: ignore[arg-type]
        r.clock.advance(1)
        self.assertEqual((r.take(), bytes(r.app.data), r.conn.state), ([], b"", "established"))

    def test_garbage_values_in_every_state(self) -> None:
        rng = random.Random(99)
        for trial in range(40):
            clock = Clock()
            link = FakeLink(clock, loss=0.1, seed=trial)
            a, b, app_a, app_b = make_pair(clock, link)
            a.open_active()
            a.write(pattern(50000))
            if trial % 3 == 0:
                a.close()
            for step in range(200):
                conn, (local, lport, remote, rport) = rng.choice(
                    [(a, (A_ADDR, A_PORT, B_ADDR, B_PORT)), (b, (B_ADDR, B_PORT, A_ADDR, A_PORT))])
                flags = rng.choice([ACK, ACK, ACK, SYN, SYN | ACK, FIN, FIN | ACK, 0, rng.randrange(16)])
                if flags & RST and rng.random() < 0.8:
                    flags &= ~RST
                payload = rng.choice([b"", rng.randbytes(rng.randrange(1, 200)),
                                      b"SACK" + bytes([rng.randrange(6)]) + rng.randbytes(40)])
                conn.packet_received(Packet(
                    protocol=STREAM, flags=flags, src=remote, dst=local, src_port=rport,
                    dst_port=lport, seq=rng.getrandbits(32), ack=rng.getrandbits(32),
                    window=rng.choice([0, 1, 512, 65535]), payload=payload))
                clock.advance(rng.random() * 0.3)
            run_until(clock, lambda: False, 400)
            for app in (app_a, app_b):
                self.assertLessEqual(len(app.lost), 1)
                self.assertLessEqual(app.released, 1)

    def test_unwrap(self) -> None:
        self.assertEqual(unwrap(5, 2**32 - 3), 2**32 + 5)
        self.assertEqual(unwrap(2**32 - 3, 2**32 + 5), 2**32 - 3)
        self.assertEqual(unwrap(100, 50), 100)
        self.assertEqual(unwrap(0, 2**31 + 1), 2**32)
        self.assertEqual(wire(2**32 + 7), 7)


class StatsTests(SynchronousTestCase):
    def test_fields(self) -> None:
        clock = Clock()
        link = FakeLink(clock)
        a, b, app_a, app_b = make_pair(clock, link)
        self.assertEqual(a.stats.state, "CLOSED")
        a.open_active()
        self.assertEqual(a.stats.state, "SYN_SENT")
        a.write(pattern(100000))
        run_until(clock, lambda: a.stats.unacked == 0 and len(app_b.data) == 100000, 10)
        s = a.stats
        self.assertIsInstance(s, ConnectionStats)
        self.assertEqual(s.state, "ESTABLISHED")
        self.assertEqual((s.bytes_sent, b.stats.bytes_recv), (100000, 100000))
        self.assertEqual(s.segs_sent, 25)
        self.assertEqual(s.send_seq, 100001)
        self.assertEqual(b.stats.recv_ack, 100001)
        self.assertTrue(20.0 <= s.srtt_ms <= 70.0, s.srtt_ms)  # 20 ms path + delayed ACKs
        self.assertEqual(s.peer_recv_win, 512 * 4096)
        self.assertEqual(s.in_flight, 0)
        self.assertGreater(s.cong_win, 10 * 4096)
        self.assertEqual(set(s.as_dict()) >= {
            "state", "cong_win", "ssthresh", "in_flight", "srtt_ms", "rttvar_ms", "unacked",
            "ooo_buf", "peer_recv_win", "recv_win", "in_recovery", "bytes_sent", "bytes_recv",
            "segs_sent", "segs_recv", "retransmits", "fast_retx", "sack_recv", "sack_sent",
            "dup_acks"}, True)
        b.close()
        run_until(clock, lambda: a.state == "time_wait", 10)
        self.assertEqual(a.stats.state, "TIME_WAIT")

    def test_bytes_acknowledged_is_sent_minus_in_flight(self) -> None:
        """What the transport's back-pressure reads per write, checked against the snapshot."""
        clock = Clock()
        link = FakeLink(clock)
        a, b, app_a, app_b = make_pair(clock, link)
        a.open_active()
        a.write(pattern(300000))
        seen = set()
        for _ in range(400):
            if not clock.getDelayedCalls():
                break
            clock.advance(0.002)
            s = a.stats
            self.assertEqual(a.bytes_acknowledged, s.bytes_sent - s.in_flight)
            seen.add(a.bytes_acknowledged)
        self.assertEqual(a.bytes_acknowledged, 300000)
        self.assertGreater(len(seen), 5)  # measured along the way, not only at the ends


class TraceTests(SynchronousTestCase):
    def test_trace(self) -> None:
        r = Recorder()
        seen: list[tuple[str, str, str]] = []
        r.conn.set_trace(lambda *t: seen.append(t))
        r.feed(SYN)
        r.feed(ACK, seq=1, ack=1)
        r.conn.set_trace(None)
        r.feed(RST)
        # changes of state only: the segment that loops in syn_received is not traced
        self.assertEqual(seen, [("idle", "syn_received", "syn_received"),
                                ("syn_received", "handshake_acked", "established")])


class DocsTests(SynchronousTestCase):
    """docs/connection.md draws the machine as it is."""

    def test_diagram_matches_machine(self) -> None:
        doc = (Path(__file__).parents[2] / "docs" / "connection.md").read_text()
        dot = doc.split("```dot", 1)[1].split("```", 1)[0]
        drawn = set(re.findall(r'(\w+) -> (\w+) \[label="(\w+)"\]', dot))
        changes = {(old, new, event) for old, event, new, _ in transitions() if old != new}
        self.assertEqual(drawn, changes)
        listed = {(state, event)
                  for state, events in re.findall(r"^- `(\w+)`: (.*)$", doc, re.MULTILINE)
                  for event in re.findall(r"`(\w+)`", events)}
        loops = {(old, event) for old, event, new, _ in transitions() if old == new}
        self.assertEqual(listed, loops)


class TableTests(SynchronousTestCase):
    """Every (state, input) pair is a transition, an explicitly harmless input, or a NoTransition."""

    PACKETS = ("syn_received", "syn_ack_received", "segment_received", "fin_received",
               "fin_ack_received", "rst_received")

    def test_opening_twice_raises(self) -> None:
        r = Recorder(passive=False)
        r.conn.open_active()
        self.assertRaises(NoTransition, r.conn.open_active)
        self.assertEqual(r.conn.state, "syn_sent")

    def test_packets_never_raise(self) -> None:
        """Remote input is never a NoTransition: each packet is declared or ignored in every state."""
        undeclared = table.undeclared(self.PACKETS)
        self.assertEqual(undeclared, [])
        self.assertIn(("closed", "fin_received"), table.reasons)

    def test_impossible_inputs_undeclared(self) -> None:
        undeclared = set(table.undeclared(["open_requested", "handshake_acked", "time_wait_elapsed"]))
        self.assertIn(("established", "open_requested"), undeclared)
        self.assertIn(("idle", "handshake_acked"), undeclared)
        self.assertIn(("established", "time_wait_elapsed"), undeclared)
        self.assertNotIn(("time_wait", "time_wait_elapsed"), undeclared)

    def test_lingering(self) -> None:
        r = Recorder()
        r.established_passive()
        self.assertFalse(r.conn.lingering)
        r.feed(FIN, seq=1)
        self.assertEqual(r.conn.state, "time_wait")
        self.assertTrue(r.conn.lingering)
        r.clock.advance(10)
        self.assertFalse(r.conn.lingering)


class PipeCountTests(SynchronousTestCase):
    """Sender.pipe() and the lost count are running counts: they must always equal the sums they replaced."""

    def test_pipe_matches_the_scoreboard_under_loss(self) -> None:
        clock = Clock()
        link = FakeLink(clock, loss=0.1, duplicate=0.05, reorder=0.2, seed=11)
        a, b, app_a, app_b = make_pair(clock, link)
        checked = [0]

        def check(side: str, packet: Packet) -> bool:
            for conn in (a, b):
                s = conn._core.sender
                expected = sum(len(g.payload) for g in s.segments if not g.sacked and not g.lost)
                self.assertEqual(s.pipe(), expected)
                self.assertEqual(s._lost, sum(1 for g in s.segments if g.lost))
            checked[0] += 1
            return False

        link.rules.append(check)
        up, down = pattern(300_000, 1), pattern(100_000, 2)
        a.open_active()
        a.write(up)
        b.write(down)
        self.assertTrue(run_until(clock, lambda: app_b.data == up and app_a.data == down, 600))
        self.assertGreater(a.stats.retransmits, 0)
        self.assertGreater(checked[0], 200)


class PathTroubleTests(SynchronousTestCase):
    """Two retransmission timeouts in a row tell the stack the path may have shrunk (once)."""

    def test_second_timeout_in_a_row(self) -> None:
        clock = Clock()
        link = FakeLink(clock)
        a, b, app_a, app_b = make_pair(clock, link)
        calls: list[float] = []
        a._core.path_trouble = lambda: calls.append(clock.seconds())
        a.open_active()
        run_until(clock, lambda: a.state == "established" and b.state == "established", 5)
        link.down = True
        a.write(b"x" * 10_000)
        clock.advance(1.0)  # first RTO (1 s): not yet
        self.assertEqual(calls, [])
        run_until(clock, lambda: bool(calls), 10)
        self.assertEqual(len(calls), 1)
        clock.advance(8.0)  # later timeouts of the same episode do not repeat it
        self.assertEqual(len(calls), 1)
        link.down = False
        self.assertTrue(run_until(clock, lambda: len(app_b.data) == 10_000, 60))

    def test_segment_size_applies_to_new_segments(self) -> None:
        clock = Clock()
        link = FakeLink(clock)
        a, b, app_a, app_b = make_pair(clock, link)
        a.set_segment_size(1000)
        self.assertEqual(a.segment_size, 1000)
        a.set_segment_size(10_000)
        self.assertEqual(a.segment_size, 4096)  # never above config.mss
        a.set_segment_size(1000)
        a.open_active()
        a.write(pattern(5000))
        self.assertTrue(run_until(clock, lambda: len(app_b.data) == 5000, 10))
        sizes = [len(p.payload) for p in data_packets(link.sent("a"))]
        self.assertEqual(max(sizes), 1000)


class CoalescedTimerTests(SynchronousTestCase):
    """The per-packet timers move a deadline and keep one delayed call (docs/performance.md)."""

    def setUp(self) -> None:
        from pilot.machines.connection.transfer import CoalescedTimer
        self.clock = Clock()
        self.fired: list[float] = []
        self.timer = CoalescedTimer(self.clock, lambda: self.fired.append(self.clock.seconds()))

    def test_restarts_keep_one_call_and_fire_at_the_last_deadline(self) -> None:
        for _ in range(100):
            self.timer.start(0.2)
            self.clock.advance(0.01)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0.18)  # the last start was at 0.99
        self.assertEqual(self.fired, [])
        self.clock.advance(0.01)
        self.assertEqual(len(self.fired), 1)
        self.assertAlmostEqual(self.fired[0], 1.19)
        self.assertFalse(self.timer.active)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_earlier_deadline_moves_the_call(self) -> None:
        self.timer.start(1.0)
        self.timer.start(0.1)
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [0.1])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelled_never_fires_and_is_reused(self) -> None:
        self.timer.start(0.04)
        self.timer.cancel()
        self.assertFalse(self.timer.active)
        self.timer.ensure(0.04)
        self.timer.cancel()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1)
        self.assertEqual(self.fired, [])
        self.timer.ensure(0.04)
        self.assertTrue(self.timer.active)
        self.clock.advance(0.04)
        self.assertEqual(self.fired, [1.04])

    def test_stop_cancels_the_call(self) -> None:
        self.timer.start(0.2)
        self.timer.cancel()
        self.timer.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LazyTimerTests(SynchronousTestCase):
    """A connection makes a timer when it first starts it (docs/connection.md, ``transfer.py``)."""

    def test_made_when_started_and_stopped_at_the_end(self) -> None:
        from pilot.machines.connection.transfer import NAGLE_TIMER
        clock = Clock()
        sent: list[Packet] = []
        conn = Connection(clock=clock, send=sent.append, local=Address(0, 1), local_port=1000,
                          remote=Address(0, 2), remote_port=7)
        core = conn._core
        self.assertEqual(core.timers, [])
        NAGLE_TIMER.cancel_in(core)  # cancelling one never made makes nothing
        self.assertNotIn("nagle_timer", vars(core))
        conn.open_active()
        self.assertEqual(core.timers, [core.handshake_timer])
        self.assertTrue(core.handshake_timer.active)
        clock.advance(1.0)  # the SYN is repeated by the same timer
        self.assertEqual([p.flags for p in sent], [SYN, SYN])
        self.assertEqual(len(core.timers), 1)
        conn.abort()
        self.assertEqual(clock.getDelayedCalls(), [])
