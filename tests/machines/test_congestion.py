"""
Tests for L{pilot.machines.connection.congestion}: the BBR-like controller fed
synthetic delivery samples, and whole transfers between two connections over
L{tests.machines.simlink.SimLink} (a bottleneck with a queue, delay, random
loss and reordering on C{task.Clock}).  Throughput here is bytes over
*simulated* seconds, so asserting it says something about the controller and
nothing about the machine running the test.
"""

from __future__ import annotations

import collections
import math

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.machines.connection import ConnectionConfig
from pilot.machines.connection.congestion import (
    DELAY_SAMPLES, FULL_BW_ROUNDS, INITIAL_WINDOW, MIN_RTT_WINDOW, MSS, PROBE_BW_GAINS, STARTUP_GAIN,
    BbrCongestion, RenoCongestion, WindowedMax,
)
from pilot.machines.connection.pacing import RateSample
from pilot.machines.connection.stream import new_congestion
from tests.machines.fakelink import make_pair, pattern
from tests.machines.simlink import SimLink, run

MB = 1e6


class Feeder:
    """Drives a controller with one ACK per call: ``rate`` bytes/s over rounds of ``rtt`` seconds."""

    def __init__(self, cc: BbrCongestion, rtt: float = 0.1) -> None:
        self.cc, self.rtt = cc, rtt
        self.now = 0.0
        self.delivered = 0
        self.gains: set[float] = set()

    def round(self, rate: float, acks: int = 10, lost: int = 0, in_flight: int | None = None,
              rtt: float | None = None, app_limited: bool = False) -> None:
        """One round trip's worth of ACKs, each delivering rate x rtt / acks bytes."""
        rtt = self.rtt if rtt is None else rtt
        per_ack = int(rate * self.rtt / acks)
        prior = self.delivered
        for i in range(acks):
            self.now += self.rtt / acks
            self.delivered += per_ack
            self.cc.on_rtt_sample(rtt, self.now)
            # by default what pacing at the current gain keeps in flight
            flight = int(rate * self.rtt * self.cc.pacing_gain) if in_flight is None else in_flight
            self.cc.on_delivery(RateSample(
                delivered=self.delivered - prior, interval=self.rtt, rtt=rtt, app_limited=app_limited,
                newly_delivered=per_ack, newly_lost=lost if i == 0 else 0, prior_delivered=prior,
                total_delivered=self.delivered, in_flight=flight), self.now)
            self.gains.add(self.cc.pacing_gain)


class WindowedMaxTests(SynchronousTestCase):
    def test_max_over_window(self) -> None:
        w = WindowedMax(3)
        w.update(5.0, 0)
        w.update(3.0, 1)
        self.assertEqual(w.best, 5.0)
        w.update(4.0, 3)  # round 0 is out of the window
        self.assertEqual(w.best, 4.0)
        w.expire(10)
        self.assertEqual(w.best, 4.0)  # the newest stays until replaced

    def test_window_spans_time_too(self) -> None:
        """Many short rounds (a recovery's retransmissions) do not flush it within 3 RTTs."""
        w = WindowedMax(3)
        w.update(5.0, 0, now=0.0, rtt=0.1)
        w.update(1.0, 10, now=0.2, rtt=0.1)
        self.assertEqual(w.best, 5.0)
        w.update(1.0, 11, now=0.31, rtt=0.1)
        self.assertEqual(w.best, 1.0)


class BbrModelTests(SynchronousTestCase):
    def test_startup_drain_probe_bw(self) -> None:
        """Rounds that stop growing the bandwidth end startup; drain, then the gain cycle."""
        cc = BbrCongestion()
        f = Feeder(cc)
        self.assertEqual((cc.state, cc.cwnd, cc.pacing_rate), ("startup", INITIAL_WINDOW, 0.0))
        for rate in (1 * MB, 2 * MB, 4 * MB):
            f.round(rate)
            self.assertEqual(cc.state, "startup")
        self.assertLess(abs(cc.pacing_rate - STARTUP_GAIN * 4 * MB), 1)
        for _ in range(FULL_BW_ROUNDS + 1):
            f.round(4 * MB, in_flight=2 * 400_000)
        self.assertEqual((cc.state, cc.startup_exit), ("drain", "bandwidth"))
        self.assertLess(cc.pacing_rate, 4 * MB)
        f.round(4 * MB, in_flight=300_000)  # below the BDP (4 MB/s x 0.1 s)
        self.assertEqual(cc.state, "probe_bw")
        self.assertLess(abs(cc.btlbw - 4 * MB), 1)
        self.assertAlmostEqual(cc.min_rtt, 0.1)
        f.gains.clear()
        for _ in range(len(PROBE_BW_GAINS)):
            f.round(4 * MB)
        self.assertEqual(f.gains, set(PROBE_BW_GAINS))
        # cwnd = 2 x BDP plus room for ACK aggregation and quantisation, within the ceiling
        self.assertGreaterEqual(cc.cwnd, 2 * 400_000)
        self.assertLessEqual(cc.cwnd, cc.max_window)

    def probing(self) -> tuple[BbrCongestion, Feeder]:
        cc = BbrCongestion()
        f = Feeder(cc)
        for _ in range(8):
            f.round(4 * MB, in_flight=300_000)
        self.assertEqual(cc.state, "probe_bw")
        return cc, f

    def test_random_loss_changes_nothing(self) -> None:
        """5 % of every round lost: model, pacing rate and window as without the loss."""
        (cc, f), (twin, g) = self.probing(), self.probing()
        for _ in range(20):
            cc.on_congestion(400_000, f.now)
            f.round(4 * MB, lost=20_000)
            g.round(4 * MB)
            # (a loss ends a probe at 1.25 early, as in BBR; the model and the window stay)
            self.assertEqual((cc.btlbw, cc.cwnd), (twin.btlbw, twin.cwnd))
            self.assertGreaterEqual(cc.pacing_rate, 0.75 * cc.btlbw)
        self.assertEqual(cc.heavy_loss_rounds, 0)

    def test_heavy_loss_caps_the_window(self) -> None:
        (cc, f), (twin, g) = self.probing(), self.probing()
        f.round(4 * MB, lost=200_000)  # a third of the round
        f.round(4 * MB)  # the round ends: judged
        g.round(4 * MB)
        g.round(4 * MB)
        self.assertEqual(cc.heavy_loss_rounds, 1)
        self.assertLess(cc.cwnd, twin.cwnd)
        self.assertGreaterEqual(cc.cwnd, 400_000)  # never below the BDP
        for _ in range(30):
            f.round(4 * MB)
            g.round(4 * MB)
        self.assertEqual(cc.cwnd, twin.cwnd)  # grows back

    def test_heavy_loss_ends_startup(self) -> None:
        cc = BbrCongestion()
        f = Feeder(cc)
        f.round(1 * MB)
        f.round(2 * MB, lost=100_000)
        f.round(4 * MB)
        self.assertEqual(cc.startup_exit, "loss")

    def test_delay_ends_startup(self) -> None:
        """A queue building (RTTs 20 % above the minimum, eight in a row) ends startup at once."""
        cc = BbrCongestion()
        f = Feeder(cc)
        f.round(1 * MB)
        f.round(2 * MB, rtt=0.12)
        self.assertEqual((cc.filled_pipe, cc.startup_exit), (True, "delay"))

    def test_jitter_does_not_end_startup(self) -> None:
        """Late RTTs between ones at the minimum (reordering, jitter) are no queue."""
        cc = BbrCongestion()
        f = Feeder(cc)
        f.round(1 * MB)
        for i in range(40):
            cc.on_rtt_sample(0.13 if i % 4 else 0.1, f.now)
        self.assertLess(cc.delayed_samples, DELAY_SAMPLES)
        f.round(2 * MB)
        self.assertFalse(cc.filled_pipe)

    def test_timeout_restarts_the_window(self) -> None:
        (cc, f), (twin, g) = self.probing(), self.probing()
        cc.on_timeout(cc.cwnd, f.now)
        self.assertEqual(cc.cwnd, INITIAL_WINDOW)
        self.assertGreater(cc.btlbw, 0)  # the model survives
        for _ in range(6):
            f.round(4 * MB)
            g.round(4 * MB)
        self.assertEqual(cc.cwnd, twin.cwnd)

    def test_probe_rtt(self) -> None:
        """After 10 s without a lower RTT: four segments for 200 ms, then the window comes back."""
        cc, f = self.probing()
        cwnd = cc.cwnd
        while f.now < 2 * MIN_RTT_WINDOW:
            f.round(4 * MB, rtt=0.11)
            if cc.state == "probe_rtt":
                break
        self.assertEqual(cc.state, "probe_rtt")
        f.round(4 * MB, rtt=0.11, in_flight=2 * MSS)
        self.assertEqual(cc.cwnd, 4 * MSS)
        for _ in range(4):
            f.round(4 * MB, rtt=0.11, in_flight=2 * MSS)
        self.assertEqual(cc.state, "probe_bw")
        self.assertAlmostEqual(cc.min_rtt, 0.11)
        self.assertGreaterEqual(cc.cwnd, cwnd)

    def test_app_limited_samples_do_not_lower_the_estimate(self) -> None:
        cc, f = self.probing()
        for _ in range(12):
            f.round(1 * MB, app_limited=True)
        self.assertLess(abs(cc.btlbw - 4 * MB), 1)

    def test_reno_is_unpaced_and_selectable(self) -> None:
        self.assertIsInstance(new_congestion(ConnectionConfig()), BbrCongestion)
        reno = new_congestion(ConnectionConfig(congestion="reno", initial_ssthresh=99 * MSS))
        self.assertIsInstance(reno, RenoCongestion)
        self.assertEqual((reno.pacing_rate, reno.ssthresh), (0.0, 99 * MSS))
        self.assertRaises(ValueError, ConnectionConfig, congestion="cubic")
        self.assertEqual(BbrCongestion().ssthresh, INITIAL_WINDOW)  # the BDP before any sample
        self.assertEqual(BbrCongestion().min_rtt, math.inf)


def transfer(congestion: str, size: int, loss: float = 0.0, rtt: float = 0.050, reorder: float = 0.0,
             seed: int = 1, record: bool = False) -> tuple[float, SimLink]:
    """``size`` bytes a -> b over a 10 MB/s bottleneck; byte-exact or the test fails; simulated MB/s."""
    clock = Clock()
    link = SimLink(clock, rate=10 * MB, delay=rtt / 2, loss=loss, reorder=reorder, seed=seed,
                   record=record)
    a, b, app_a, app_b = make_pair(clock, link, ConnectionConfig(congestion=congestion))
    a.open_active()
    assert run(clock, lambda: app_b.made == 1)
    data = pattern(size, seed)
    start = clock.seconds()
    a.write(data)
    assert run(clock, lambda: len(app_b.data) >= size, limit=120), (congestion, loss, len(app_b.data))
    elapsed = clock.seconds() - start
    assert bytes(app_b.data) == data, "corrupt, duplicated or reordered bytes"
    a.close()
    assert run(clock, lambda: app_a.released == 1 and app_b.released == 1, limit=60)
    return size / elapsed / MB, link


class SimulatedTransferTests(SynchronousTestCase):
    """Byte-exact transfers and throughput on the simulated path (10 MB/s, 50 ms RTT)."""

    def test_byte_exact_under_loss_delay_and_reordering(self) -> None:
        for loss in (0.0, 0.01, 0.05):
            for congestion in ("bbr", "reno"):
                with self.subTest(loss=loss, congestion=congestion):
                    rate, link = transfer(congestion, 3 << 20, loss=loss, reorder=0.02, seed=7)
                    self.assertGreater(rate, 0.1)
                    self.assertEqual(link.directions["a"].lost > 0, loss > 0)

    def test_one_percent_loss_at_50ms(self) -> None:
        """The issue's target: at least 2 MB/s where loss-driven Reno is held far lower."""
        bbr = [transfer("bbr", 4 << 20, loss=0.01, seed=seed)[0] for seed in (1, 2, 3)]
        reno = [transfer("reno", 4 << 20, loss=0.01, seed=seed)[0] for seed in (1, 2, 3)]
        self.assertGreaterEqual(min(bbr), 2.0, bbr)
        self.assertLess(max(reno), min(bbr), (reno, bbr))
        self.assertLess(max(reno), 2.0, reno)

    def test_five_percent_loss(self) -> None:
        bbr, _ = transfer("bbr", 2 << 20, loss=0.05)
        reno, _ = transfer("reno", 2 << 20, loss=0.05)
        self.assertGreater(bbr, 2 * reno)

    def test_clean_link(self) -> None:
        """Without loss both fill most of the bottleneck; short RTT, the whole of it."""
        for rtt in (0.001, 0.050):
            with self.subTest(rtt=rtt):
                bbr, _ = transfer("bbr", 4 << 20, rtt=rtt)
                reno, _ = transfer("reno", 4 << 20, rtt=rtt)
                self.assertGreater(bbr, 5.5)
                self.assertGreater(bbr, 0.85 * reno)

    def test_paced_bursts(self) -> None:
        """
        After a pause, BBR's segments leave a few at a time at the pacing rate;
        Reno's whole window leaves at once.
        """
        bursts = {}
        for congestion in ("bbr", "reno"):
            clock = Clock()
            link = SimLink(clock, rate=10 * MB, delay=0.025, record=True)
            a, b, app_a, app_b = make_pair(clock, link, ConnectionConfig(congestion=congestion))
            a.open_active()
            run(clock, lambda: app_b.made == 1)
            a.write(pattern(2 << 20))
            run(clock, lambda: len(app_b.data) == 2 << 20)
            run(clock, lambda: False, limit=0.5)
            resumed = clock.seconds()
            a.write(pattern(1 << 20, 2))
            run(clock, lambda: len(app_b.data) == 3 << 20)
            data = [(t, size) for t, side, size in link.offered if side == "a" and size and t >= resumed]
            bursts[congestion] = max(collections.Counter(t for t, _ in data).values())
            if congestion == "bbr":
                per_10ms: collections.Counter[int] = collections.Counter()
                for t, size in data:
                    per_10ms[int(t * 100)] += size
                self.assertLessEqual(max(per_10ms.values()), 1.25 * 10 * MB * 0.010 + 5 * MSS)
        # a burst is 2 ms at the pacing rate (at most 1.25 x 10 MB/s): 25 kB, six segments and one on credit
        self.assertLessEqual(bursts["bbr"], 7)
        self.assertGreater(bursts["reno"], 50, bursts)


class ZeroWindowTests(SynchronousTestCase):
    def test_stopped_reader_never_deadlocks(self) -> None:
        """The reader stops until the window is full, for a minute; then everything arrives."""
        for congestion in ("bbr", "reno"):
            with self.subTest(congestion=congestion):
                clock = Clock()
                link = SimLink(clock, rate=10 * MB, delay=0.025, loss=0.01, seed=3)
                a, b, app_a, app_b = make_pair(clock, link, ConnectionConfig(congestion=congestion))
                a.open_active()
                run(clock, lambda: app_b.made == 1)
                b.pause_reading()
                data = pattern(5 << 20)
                a.write(data)
                run(clock, lambda: False, limit=60.0)
                self.assertEqual(app_b.data, b"")
                self.assertEqual(app_a.lost, [])  # persist: the sender probes, never gives up
                sent = sum(link.directions[side].delivered for side in "ab")
                run(clock, lambda: False, limit=60.0)
                # a minute of a full window: probes, a few dozen packets, not a storm
                self.assertLess(sum(link.directions[side].delivered for side in "ab") - sent, 100)
                b.resume_reading()
                self.assertTrue(run(clock, lambda: len(app_b.data) >= len(data), limit=120))
                self.assertEqual(bytes(app_b.data), data)
