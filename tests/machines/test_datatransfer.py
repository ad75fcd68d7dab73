"""
Tests for the data-transfer helpers of a stream connection:
L{pilot.machines.connection.rtt}, L{pilot.machines.connection.recvbuffer} and
L{pilot.machines.connection.sendbuffer}.  Plain arithmetic, no clock.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pilot.machines.connection.recvbuffer import Receipt, RecvBuffer
from pilot.machines.connection.rtt import RttEstimator
from pilot.machines.connection.sendbuffer import (
    MSS, OOO_LIMIT, RenoCongestion, Sender, TimerOutcome, sack_safe,
)
from pilot.wire.packet import encode_sack, parse_sack


class RttTests(SynchronousTestCase):
    def test_initial(self) -> None:
        rtt = RttEstimator()
        self.assertEqual((rtt.rto, rtt.srtt, rtt.srtt_ms), (1.0, None, 0.0))

    def test_first_and_later_samples(self) -> None:
        rtt = RttEstimator()
        rtt.sample(0.1)
        self.assertEqual((rtt.srtt, rtt.rttvar), (0.1, 0.05))
        self.assertAlmostEqual(rtt.rto, 0.1 + 4 * 0.05)
        rtt.sample(0.2)
        self.assertAlmostEqual(rtt.rttvar, 0.75 * 0.05 + 0.25 * 0.1)
        self.assertAlmostEqual(rtt.srtt, 0.875 * 0.1 + 0.125 * 0.2)

    def test_floor_and_granularity(self) -> None:
        rtt = RttEstimator()
        for _ in range(50):
            rtt.sample(0.001)
        self.assertEqual(rtt.rto, 0.2)
        rtt = RttEstimator(min_rto=0.0)
        for _ in range(100):
            rtt.sample(0.05)
        self.assertAlmostEqual(rtt.rto, 0.05 + 0.010, places=4)  # K*RTTVAR below the 10 ms granularity

    def test_back_off_doubles_to_ceiling_and_sample_resets(self) -> None:
        rtt = RttEstimator()
        seen = []
        for _ in range(6):
            rtt.back_off()
            seen.append(rtt.rto)
        self.assertEqual(seen, [2.0, 4.0, 8.0, 10.0, 10.0, 10.0])
        self.assertEqual((rtt.backoffs, rtt.base_rto), (6, 1.0))
        rtt.sample(0.02)
        self.assertEqual((rtt.rto, rtt.backoffs), (0.2, 0))
        rtt.back_off()
        self.assertEqual((rtt.rto, rtt.base_rto), (0.4, 0.2))


class RecvBufferTests(SynchronousTestCase):
    def test_in_order(self) -> None:
        r = RecvBuffer(100)
        self.assertIs(r.receive(100, b"abc"), Receipt.IN_ORDER)
        self.assertEqual((r.rcv_nxt, r.take(), r.take()), (103, b"abc", b""))

    def test_out_of_order_then_gap_filled(self) -> None:
        r = RecvBuffer(0)
        self.assertIs(r.receive(6, b"ghi"), Receipt.OUT_OF_ORDER)
        self.assertIs(r.receive(3, b"def"), Receipt.OUT_OF_ORDER)
        self.assertEqual(r.sack_blocks(), [(3, 9)])
        self.assertIs(r.receive(0, b"abc"), Receipt.IN_ORDER)
        self.assertTrue(r.filled_gap)
        self.assertEqual((r.rcv_nxt, r.take(), r.ooo_count, r.sack_blocks()), (9, b"abcdefghi", 0, []))

    def test_duplicates_and_overlaps(self) -> None:
        r = RecvBuffer(0)
        r.receive(0, b"abcd")
        self.assertIs(r.receive(0, b"ab"), Receipt.DUPLICATE)
        self.assertIs(r.receive(2, b"cdef"), Receipt.IN_ORDER)
        self.assertIs(r.receive(10, b"kl"), Receipt.OUT_OF_ORDER)
        self.assertIs(r.receive(10, b"k"), Receipt.DUPLICATE)
        self.assertIs(r.receive(9, b"jklm"), Receipt.OUT_OF_ORDER)  # overlaps the held one
        self.assertIs(r.receive(6, b"ghi"), Receipt.IN_ORDER)
        self.assertEqual(r.take(), b"abcdefghijklm")

    def test_sack_block_order(self) -> None:
        """The block with the latest arrival first, then the rest in order, four at most."""
        r = RecvBuffer(0)
        for start in (10, 30, 50, 70, 90):
            r.receive(start, b"x" * 5)
        r.receive(50, b"x" * 8)
        self.assertEqual(r.sack_blocks(), [(50, 58), (10, 15), (30, 35), (70, 75)])

    def test_window(self) -> None:
        r = RecvBuffer(0, mss=10, queue_segments=5)
        self.assertEqual(r.window(), 5)
        r.receive(0, b"x" * 11)
        self.assertEqual(r.window(), 3)
        r.receive(11, b"x" * 39)
        self.assertEqual(r.window(), 1)  # full, but never 0
        self.assertIs(r.receive(50, b"y" * 10), Receipt.IN_ORDER)  # one segment of slack
        self.assertIs(r.receive(60, b"z"), Receipt.NO_ROOM)
        self.assertEqual(r.rcv_nxt, 60)
        r.take()
        self.assertEqual(r.window(), 5)

    def test_out_of_window_and_ooo_limit(self) -> None:
        """Out-of-order data: at most max_ooo slots of bytes, in at most 4 pieces per slot."""
        r = RecvBuffer(0, mss=10, queue_segments=5, max_ooo=2)
        self.assertIs(r.receive(60, b"x"), Receipt.OUT_OF_WINDOW)
        self.assertIs(r.receive(20, b"x" * 10), Receipt.OUT_OF_ORDER)
        self.assertIs(r.receive(30, b"x" * 10), Receipt.OUT_OF_ORDER)
        self.assertIs(r.receive(40, b"x"), Receipt.NO_ROOM)  # 20 bytes held: the budget
        self.assertIs(r.receive(30, b"x" * 11), Receipt.NO_ROOM)  # growing a held piece counts too
        self.assertIs(r.receive(0, b"x" * 20), Receipt.IN_ORDER)  # the gap filled: all pulled in
        self.assertEqual((r.ooo_count, r.rcv_nxt), (0, 40))

    def test_ooo_limit_counts_bytes_not_segments(self) -> None:
        """Small segments (a small path) get the same out-of-order room as 4096-byte ones."""
        r = RecvBuffer(0, mss=10, queue_segments=5, max_ooo=2)
        for start in range(10, 30, 3):  # 7 pieces of 3 bytes: 21 > 20 bytes, the 7th is refused
            receipt = r.receive(start, b"x" * 3)
        self.assertIs(receipt, Receipt.NO_ROOM)
        self.assertEqual(r.ooo_count, 6)
        r = RecvBuffer(0, mss=10, queue_segments=5, max_ooo=2)
        receipts = [r.receive(start, b"x") for start in range(10, 20)]
        self.assertEqual(receipts.count(Receipt.NO_ROOM), 2)  # 8 pieces at most (4 per slot)


def sender(**kw: object) -> Sender:
    rtt = RttEstimator()
    s = Sender(1, rtt, RenoCongestion(), **kw)  # type: ignore[arg-type]
    return s


def drain(s: Sender, now: float = 0.0, flush: bool = False) -> list[tuple[int, int, bool]]:
    out = []
    while (t := s.next_transmission(now, flush)) is not None:
        out.append((t[0].start, len(t[0].payload), t[1]))
    return out


class SackSafeTests(SynchronousTestCase):
    def test_plain_data_untouched(self) -> None:
        for chunk in (b"", b"SACK", b"SACK\x00" + bytes(20), b"SACK\x05" + bytes(50), b"hello" * 9):
            self.assertEqual(sack_safe(chunk), chunk)

    def test_lookalike_cut(self) -> None:
        for count in range(1, 5):
            chunk = b"SACK" + bytes([count]) + bytes(8 * count) + b"more"
            cut = sack_safe(chunk)
            self.assertEqual(len(cut), 4 + 8 * count)
            self.assertIsNone(parse_sack(cut))

    def test_real_option_cut(self) -> None:
        option = encode_sack([(1, 2), (3, 4)])
        self.assertIsNone(parse_sack(sack_safe(option + b"tail")))


class SenderTests(SynchronousTestCase):
    def test_segmentation_and_initial_window(self) -> None:
        s = sender()
        s.write(b"x" * (20 * MSS))
        sent = drain(s)
        self.assertEqual(len(sent), 10)  # IW10
        self.assertEqual(sent[:2], [(1, MSS, False), (1 + MSS, MSS, False)])
        self.assertEqual((s.in_flight(), s.pipe(), s.unsent), (10 * MSS, 10 * MSS, 10 * MSS))

    def test_ack_advances_and_grows_window(self) -> None:
        s = sender()
        s.write(b"x" * (40 * MSS))
        drain(s)
        s.on_ack(1 + 2 * MSS, 512, [], False, 0.05)
        self.assertEqual(s.snd_una, 1 + 2 * MSS)
        self.assertEqual(s.cc.cwnd, 12 * MSS)
        self.assertEqual(s.rtt.srtt, 0.05)
        self.assertEqual(len(drain(s)), 4)

    def test_ack_outside_ignored(self) -> None:
        s = sender()
        s.write(b"x" * 100)
        drain(s)
        self.assertTrue(s.on_ack(1 + 101, 512, [], False, 0).ignored)
        self.assertTrue(s.on_ack(0, 512, [], False, 0).ignored)
        self.assertEqual(s.snd_una, 1)

    def test_partial_ack_trims_segment(self) -> None:
        s = sender()
        s.write(b"abcdef")
        drain(s)
        s.on_ack(4, 512, [], False, 0)
        self.assertEqual([(seg.start, seg.payload) for seg in s.segments], [(4, b"def")])

    def test_fast_retransmit_on_third_duplicate(self) -> None:
        s = sender(nagle=False)
        s.write(b"x" * (10 * MSS))
        drain(s)
        for i in range(2):
            s.on_ack(1, 512, [], False, 0.1)
            self.assertEqual(drain(s, 0.1), [])
        s.on_ack(1, 512, [], False, 0.1)
        self.assertEqual(drain(s, 0.1), [(1, MSS, True)])
        self.assertEqual((s.fast_retx, s.dup_acks_total, s.in_recovery), (1, 3, True))
        self.assertEqual(s.cc.cwnd, 5 * MSS)

    def test_window_update_is_not_a_duplicate(self) -> None:
        s = sender()
        s.write(b"x" * MSS)
        drain(s)
        s.peer_window = 2
        for w in (3, 4, 5):
            s.on_ack(1, w, [], False, 0)
        self.assertEqual(s.dup_acks, 0)

    def test_nothing_in_flight(self) -> None:
        """A receiving end's every segment: nothing acknowledged, nothing in flight (the short way)."""
        s = sender()
        s.peer_window = 10
        result = s.on_ack(1, 0, [], False, 0.5)  # a zero window, no data: not believed
        self.assertEqual((result.acked, result.ignored, s.peer_window, s.last_ack_at), (0, False, 10, 0.5))
        s.on_ack(1, 0, [], True, 0.6)  # on data, it is
        self.assertEqual(s.peer_window, 0)
        s.on_ack(1, 300, [], False, 0.7)
        self.assertEqual((s.peer_window, s.dup_acks, s.snd_una), (300, 0, 1))
        self.assertTrue(s.on_ack(2, 300, [], False, 0.8).ignored)  # acknowledges what was never sent

    def test_data_and_zero_window_keepalive_are_not_duplicates(self) -> None:
        s = sender()
        s.write(b"x" * MSS)
        drain(s)
        for _ in range(5):
            s.on_ack(1, 512, [], True, 0)
            s.on_ack(1, 0, [], False, 0)
        self.assertEqual((s.dup_acks, s.peer_window), (0, 512))

    def test_sack_loss_detection_and_scoreboard(self) -> None:
        s = sender()
        s.write(b"x" * (8 * MSS))
        drain(s)
        s.on_ack(1, 512, [(1 + MSS, 1 + 4 * MSS)], False, 0.1)  # 3 later segments SACKed
        self.assertEqual(drain(s, 0.1), [(1, MSS, True)])
        self.assertEqual([seg.sacked for seg in s.segments], [False, True, True, True] + [False] * 4)
        self.assertEqual(s.pipe(), 5 * MSS)

    def test_sack_out_of_range_ignored(self) -> None:
        s = sender()
        s.write(b"x" * (4 * MSS))
        drain(s)
        s.on_ack(1, 512, [(1 + MSS, 1 + 40 * MSS), (0, 5)], False, 0)
        self.assertFalse(any(seg.sacked for seg in s.segments))

    def test_flow_control(self) -> None:
        s = sender(nagle=False)
        s.peer_window = 2
        s.write(b"x" * (10 * MSS))
        self.assertEqual(len(drain(s)), 2)
        s.on_ack(1 + MSS, 2, [], False, 0)
        self.assertEqual(len(drain(s)), 1)
        s.on_ack(1 + 2 * MSS, 0, [], False, 0)  # 0 is one segment, not "no limit"
        self.assertEqual(s.in_flight(), MSS)
        self.assertEqual(len(drain(s)), 0)

    def test_nagle(self) -> None:
        s = sender()
        s.write(b"a")
        self.assertEqual(drain(s), [(1, 1, False)])
        s.write(b"b")
        self.assertEqual(drain(s), [])
        self.assertTrue(s.nagle_holding)
        self.assertEqual(drain(s, flush=True), [(2, 1, False)])

    def test_timeout_backs_off_and_gives_up(self) -> None:
        s = sender(max_retransmits=3)
        s.write(b"x" * (3 * MSS))
        drain(s)
        rtos = []
        for _ in range(3):
            self.assertIs(s.on_timeout(1.0), TimerOutcome.RETRANSMIT)
            rtos.append(s.timer_interval())
            self.assertEqual(drain(s, 1.0, flush=True)[0], (1, MSS, True))
        self.assertEqual(rtos, [2.0, 4.0, 8.0])
        self.assertIs(s.on_timeout(1.0), TimerOutcome.GIVE_UP)

    def test_persist_when_window_bound_and_peer_alive(self) -> None:
        s = sender()
        s.peer_window = 1
        s.write(b"x" * (3 * MSS))
        drain(s, 0.0)
        s.on_ack(1, 1, [], False, 0.5)  # the peer answers but takes nothing
        intervals = []
        for i in range(12):
            self.assertIs(s.on_timeout(1.0 + i), TimerOutcome.PROBE)
            intervals.append(s.timer_interval())
            drain(s, 1.0 + i)
            s.on_ack(1, 1, [], False, 1.5 + i)
        self.assertEqual(intervals[:4], [0.5, 1.0, 2.0, 4.0])
        self.assertEqual(intervals[-1], 30.0)
        self.assertEqual(s.timeouts, 0)
        s.on_ack(1, 5, [], False, 20.0)  # the window opens: the head goes again at once
        self.assertEqual(drain(s, 20.0)[0], (1, MSS, True))

    def test_quiet_is_next_transmission_with_nothing_to_send(self) -> None:
        """quiet(): True, and next_transmission's bookkeeping done, only with nothing queued or
        in flight; otherwise False and nothing touched."""
        a, b = sender(), sender()
        for s in (a, b):
            s.nagle_holding = True
        self.assertTrue(a.quiet())
        self.assertIsNone(b.next_transmission(0.0))
        self.assertEqual((a.nagle_holding, a.rate.app_limited_until), (b.nagle_holding, b.rate.app_limited_until))
        self.assertEqual(a.rate.app_limited_until, 1)
        queued = sender()
        queued.write(b"x" * 10)
        queued.nagle_holding = True
        self.assertFalse(queued.quiet())
        self.assertEqual((queued.nagle_holding, queued.rate.app_limited_until), (True, 0))
        flying = sender()
        flying.write(b"x" * 10)
        self.assertEqual(len(drain(flying)), 1)
        flying.nagle_holding, flying.rate.app_limited_until = True, 0
        self.assertFalse(flying.quiet())  # in flight, nothing queued
        self.assertEqual((flying.nagle_holding, flying.rate.app_limited_until), (True, 0))

    def test_timeout_with_nothing_outstanding(self) -> None:
        self.assertIs(sender().on_timeout(1.0), TimerOutcome.NOTHING)

    def test_out_of_order_room_bounds_new_data(self) -> None:
        """While the receiver holds SACKed data, new data stays within its out-of-order room."""
        s = sender(nagle=False)
        s.cc.cwnd = s.cc.max_window = 4 << 20
        s.write(b"x" * (300 * MSS))
        self.assertEqual(len(drain(s)), 300)  # nothing held out of order: the window rules
        s = sender(nagle=False)
        s.cc.cwnd = 4 << 20
        s.write(b"x" * (300 * MSS))
        for _ in range(20):
            s.next_transmission(0.0)
        s.on_ack(1, 512, [(1 + MSS, 1 + 2 * MSS)], False, 0.1)  # one SACKed: not yet a loss
        drain(s, 0.1)
        self.assertEqual(s.snd_nxt, 1 + OOO_LIMIT)
        s.on_ack(1 + 2 * MSS, 512, [], False, 0.2)  # nothing held: the window opens again
        self.assertGreater(len(drain(s, 0.2)), 0)
        self.assertGreater(s.snd_nxt, 1 + OOO_LIMIT)


class RenoTests(SynchronousTestCase):
    def test_slow_start_then_avoidance(self) -> None:
        cc = RenoCongestion(ssthresh=12 * MSS)
        cc.on_ack(MSS, 0, 0)
        self.assertEqual(cc.cwnd, 11 * MSS)
        cc.on_ack(10 * MSS, 0, 0)  # byte counting, at most 2 segments per ACK
        self.assertEqual(cc.cwnd, 13 * MSS)
        cc.on_ack(MSS, 0, 0)
        self.assertEqual(cc.cwnd, 13 * MSS + MSS // 13)

    def test_halve_on_loss_and_timeout(self) -> None:
        cc = RenoCongestion()
        cc.on_congestion(40 * MSS, 0)
        self.assertEqual((cc.cwnd, cc.ssthresh), (20 * MSS, 20 * MSS))
        cc.on_timeout(2 * MSS, 0)
        self.assertEqual((cc.cwnd, cc.ssthresh), (10 * MSS, 2 * MSS))

    def test_ceiling(self) -> None:
        cc = RenoCongestion(ssthresh=1 << 30)
        for _ in range(1000):
            cc.on_ack(2 * MSS, 0, 0)
        self.assertEqual(cc.cwnd, 1 << 20)
