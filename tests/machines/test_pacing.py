"""
Tests for L{pilot.machines.connection.pacing}: the token-bucket pacer and
delivery-rate sampling, alone and as the sender drives them.
"""

from __future__ import annotations

import attr
from twisted.trial.unittest import SynchronousTestCase

from pilot.machines.connection.pacing import DeliveryRate, Pacer, RateSample
from pilot.machines.connection.rtt import RttEstimator
from pilot.machines.connection.sendbuffer import MSS, RenoCongestion, Sender


@attr.s(auto_attribs=True, eq=False)
class Seg:
    sent_at: float
    delivered: int = 0
    delivered_at: float = 0.0
    first_sent_at: float = 0.0
    app_limited: bool = False


class PacerTests(SynchronousTestCase):
    def test_unpaced(self) -> None:
        pacer = Pacer()
        for _ in range(100):
            self.assertEqual(pacer.delay(0.0, 0.0), 0.0)
            pacer.spend(MSS)

    def test_bursts_then_waits_for_half_a_burst(self) -> None:
        """At 10 MB/s a burst is 2 ms (20 kB): it goes at once, then 1 ms ticks of 10 kB."""
        pacer = Pacer()
        rate = 10e6
        sent = 0
        while pacer.delay(rate, 1.0) == 0.0:
            pacer.spend(MSS)
            sent += MSS
        self.assertEqual(sent, 5 * MSS)  # 20 kB of tokens: five segments, the last one on credit
        wait = pacer.delay(rate, 1.0)
        self.assertAlmostEqual(wait, (10_000 + 5 * MSS - 20_000) / rate)
        sent = 0
        while pacer.delay(rate, 1.0 + wait) == 0.0:
            pacer.spend(MSS)
            sent += MSS
        self.assertEqual(sent, 3 * MSS)

    def test_long_run_rate(self) -> None:
        pacer, rate, now, sent = Pacer(), 5e6, 0.0, 0
        while now < 1.0:
            wait = pacer.delay(rate, now)
            if wait:
                now += wait
            else:
                pacer.spend(MSS)
                sent += MSS
        self.assertLess(abs(sent / now - rate), 0.03 * rate)

    def test_small_rates_still_send_two_segments(self) -> None:
        pacer = Pacer()
        self.assertEqual(pacer.delay(1000.0, 5.0), 0.0)
        pacer.spend(MSS)
        self.assertEqual(pacer.delay(1000.0, 5.0), 0.0)
        pacer.spend(MSS)
        self.assertGreater(pacer.delay(1000.0, 5.0), 0.0)


class DeliveryRateTests(SynchronousTestCase):
    def test_rate_from_send_and_ack_intervals(self) -> None:
        d = DeliveryRate()
        segs = []
        for i in range(10):  # one segment every 10 ms
            seg = Seg(sent_at=i * 0.01)
            d.on_send(seg, i * 0.01, nothing_in_flight=(i == 0))
            segs.append(seg)
        self.assertIsNone(d.sample(0))
        for i, seg in enumerate(segs):  # each ACKed 100 ms after it left
            d.on_delivered(seg, 1000, 0.1 + i * 0.01)
            sample = d.sample(9000 - 1000 * i)
            assert sample is not None
        self.assertEqual((sample.delivered, sample.newly_delivered, sample.total_delivered), (10_000, 1000, 10_000))
        self.assertAlmostEqual(sample.interval, 0.19)  # ACKs of 10 segments: from the first send
        self.assertAlmostEqual(sample.rtt, 0.1)
        self.assertAlmostEqual(sample.rate, 10_000 / 0.19)

    def test_app_limited_until_the_flight_is_delivered(self) -> None:
        d = DeliveryRate()
        first = Seg(sent_at=0.0)
        d.on_send(first, 0.0, True)
        d.mark_app_limited(1000)
        second = Seg(sent_at=0.0)
        d.on_send(second, 0.0, False)
        self.assertEqual((first.app_limited, second.app_limited), (False, True))
        d.on_delivered(first, 1000, 0.1)
        sample = d.sample(1000)
        assert sample is not None
        self.assertFalse(sample.app_limited)
        d.on_delivered(second, 1000, 0.1)
        sample = d.sample(0)
        assert sample is not None
        self.assertTrue(sample.app_limited)
        self.assertEqual(d.app_limited_until, 0)  # delivered past the mark: cleared

    def test_losses(self) -> None:
        d = DeliveryRate()
        d.on_lost(500)
        sample = d.sample(0)
        assert sample is not None
        self.assertEqual((sample.newly_lost, sample.delivered, sample.rate), (500, 0, 0.0))
        d.on_lost(500)
        d.forget_losses()
        self.assertIsNone(d.sample(0))


class SenderSamplesTests(SynchronousTestCase):
    """The sender reports every ACK's delivery to the controller, SACKed bytes included."""

    def test_ack_and_sack_reported(self) -> None:
        samples: list[RateSample] = []
        cc = RenoCongestion()
        cc.on_delivery = lambda sample, now: samples.append(sample)  # type: ignore[method-assign]
        s = Sender(1, RttEstimator(), cc)
        s.write(b"x" * (8 * MSS))
        while s.next_transmission(0.0) is not None:
            pass
        s.on_ack(1 + MSS, 512, [], False, 0.1)
        s.on_ack(1 + MSS, 512, [(1 + 2 * MSS, 1 + 5 * MSS)], False, 0.11)  # 3 SACKed: 1 lost
        self.assertEqual([(x.newly_delivered, x.newly_lost) for x in samples],
                         [(MSS, 0), (3 * MSS, MSS)])
        self.assertEqual(samples[1].total_delivered, 4 * MSS)
        self.assertAlmostEqual(samples[0].rate, MSS / 0.1)
        s.on_ack(1 + MSS, 512, [(1 + 2 * MSS, 1 + 5 * MSS)], False, 0.12)  # nothing new
        self.assertEqual(len(samples), 2)
