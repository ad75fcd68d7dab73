"""
BBR's ACK-aggregation estimate (``extra_acked``) and the send quantum, fed
synthetic ACKs at injected times: ACKs arriving in clumps raise the window
by about a clump, ACKs that arrive as the bandwidth predicts change nothing,
the estimate is capped and forgotten after ten rounds.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pilot.machines.connection.congestion import (
    ACK_EPOCH_RESET_BYTES, BW_WINDOW_ROUNDS, EXTRA_ACKED_MAX_TIME, MAX_SEND_QUANTUM, MSS, BbrCongestion,
)
from pilot.machines.connection.pacing import RateSample
from tests.machines.test_congestion import Feeder

MB = 1e6
RATE, RTT, ACKS = 4 * MB, 0.1, 10
PER_ACK = int(RATE * RTT / ACKS)  # 40,000 bytes an ACK when they are evenly spaced


def clumped_round(f: Feeder, clumps: int) -> None:
    """One round's bytes (RATE x RTT) ACKed in ``clumps`` groups of ACKs, each group at one instant."""
    prior = f.delivered
    for _ in range(clumps):
        f.now += RTT / clumps
        for _ in range(ACKS // clumps):
            f.delivered += PER_ACK
            f.cc.on_rtt_sample(RTT, f.now)
            f.cc.on_delivery(RateSample(
                delivered=f.delivered - prior, interval=RTT, rtt=RTT, newly_delivered=PER_ACK,
                prior_delivered=prior, total_delivered=f.delivered, in_flight=int(RATE * RTT)), f.now)


class AggregationTests(SynchronousTestCase):
    def assertNear(self, value: float, expected: float, tolerance: float) -> None:
        self.assertLessEqual(abs(value - expected), tolerance, f"{value} is not {expected}")

    def steady(self) -> tuple[BbrCongestion, Feeder]:
        """In ProbeBW at 4 MB/s, 100 ms, with startup's samples out of the filter."""
        cc = BbrCongestion()
        f = Feeder(cc, RTT)
        for _ in range(8 + BW_WINDOW_ROUNDS + 2):
            f.round(RATE, acks=ACKS, in_flight=300_000)
        self.assertEqual(cc.state, "probe_bw")
        return cc, f

    def expected_window(self, cc: BbrCongestion, extra: int) -> int:
        return int(2 * RATE * RTT) + extra + 3 * cc.send_quantum

    def test_evenly_spaced_acks_add_nothing(self) -> None:
        """ACKs as the bandwidth predicts: the allowance is one ACK's bytes, whatever the time."""
        cc, f = self.steady()
        self.assertNear(cc.extra_acked.best, PER_ACK, 1)
        self.assertNear(cc.cwnd, self.expected_window(cc, PER_ACK), 1)
        for _ in range(5):
            f.round(RATE, acks=ACKS, in_flight=300_000)
            self.assertNear(cc.extra_acked.best, PER_ACK, 1)

    def test_clumped_acks_raise_the_window_by_a_clump(self) -> None:
        cc, f = self.steady()
        before = cc.cwnd
        for _ in range(3):
            clumped_round(f, clumps=2)  # half a round's bytes at once, every half round
        self.assertNear(cc.extra_acked.best, 5 * PER_ACK, 1)
        self.assertNear(cc.cwnd, self.expected_window(cc, 5 * PER_ACK), 1)
        self.assertNear(cc.cwnd - before, 4 * PER_ACK, 2)
        self.assertEqual(cc.btlbw, RATE)  # the bandwidth model is not fooled by the clumps

    def test_estimate_expires_after_ten_rounds(self) -> None:
        cc, f = self.steady()
        clumped_round(f, clumps=1)  # a whole round's ACKs at once: 400,000 bytes ahead of the model
        self.assertNear(cc.extra_acked.best, 400_000, 1)
        f.now += RTT  # a pause: the ACKs fall behind the model, the epoch starts again
        for _ in range(BW_WINDOW_ROUNDS - 1):
            f.round(RATE, acks=ACKS, in_flight=300_000)
        self.assertNear(cc.extra_acked.best, 400_000, 1)  # still inside the window
        for _ in range(2):
            f.round(RATE, acks=ACKS, in_flight=300_000)
        self.assertNear(cc.extra_acked.best, PER_ACK, 1)
        self.assertNear(cc.cwnd, self.expected_window(cc, PER_ACK), 1)

    def test_epoch_restarts_past_1mib(self) -> None:
        """
        An epoch ends when the ACKs fall behind the model, or once it has
        counted 1 MiB: a clump followed by ACKs at exactly the bandwidth does
        not keep the estimate up for good.
        """
        cc, f = self.steady()
        clumped_round(f, clumps=1)
        self.assertNear(cc.extra_acked.best, 400_000, 1)
        for _ in range(3 * BW_WINDOW_ROUNDS):
            f.round(RATE, acks=ACKS, in_flight=300_000)
        self.assertNear(cc.extra_acked.best, PER_ACK, 1)

    def test_long_epoch_restarts(self) -> None:
        """1.6 MB ACKed at one instant: the epoch starts again at 1 MiB."""
        cc, f = self.steady()
        cc.cwnd = cc.max_window
        prior = f.delivered
        f.now += 0.001
        for _ in range(40):
            f.delivered += PER_ACK
            cc.on_delivery(RateSample(delivered=f.delivered - prior, interval=RTT, rtt=RTT,
                                      newly_delivered=PER_ACK, prior_delivered=prior,
                                      total_delivered=f.delivered, in_flight=0), f.now)
        self.assertLess(cc.extra_acked.best, ACK_EPOCH_RESET_BYTES)
        self.assertLess(cc.ack_epoch_bytes, ACK_EPOCH_RESET_BYTES)

    def test_send_quantum(self) -> None:
        cc = BbrCongestion()
        self.assertEqual(cc.send_quantum, 2 * MSS)  # not paced yet
        cc.pacing_rate = 20 * MB
        self.assertEqual(cc.send_quantum, 20_000)  # 1 ms
        cc.pacing_rate = 1000 * MB
        self.assertEqual(cc.send_quantum, MAX_SEND_QUANTUM)

    def test_capped_by_the_window(self) -> None:
        """No more aggregation than the window could have had in flight."""
        cc, f = self.steady()
        cc.cwnd = 100_000
        prior = f.delivered
        f.now += 0.001
        f.delivered += 400_000  # one stretch ACK for 400,000 bytes, far ahead of 4 MB/s
        cc.on_delivery(RateSample(delivered=f.delivered - prior, interval=RTT, rtt=RTT, newly_delivered=400_000,
                                  prior_delivered=prior, total_delivered=f.delivered, in_flight=0), f.now)
        self.assertEqual(cc.extra_acked.best, 100_000)

    def test_capped_at_100ms_of_bandwidth(self) -> None:
        cc, f = self.steady()
        cc.extra_acked.update(10 * MB, cc.round_count)
        self.assertEqual(cc.aggregation_allowance(), int(RATE * EXTRA_ACKED_MAX_TIME))

    def test_diagnostics(self) -> None:
        cc, f = self.steady()
        d = cc.diagnostics()
        self.assertEqual((d["cc_mode"], d["btlbw"], d["min_rtt_ms"], d["extra_acked"]),
                         ("probe_bw", RATE, 100.0, PER_ACK))
        self.assertEqual(d["pacing_rate"], round(cc.pacing_rate))
