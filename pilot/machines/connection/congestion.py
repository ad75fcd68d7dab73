# -*- test-case-name: tests.machines.test_congestion -*-
"""
Congestion control for a stream's sender: the :class:`CongestionControl`
hook the sender drives, :class:`RenoCongestion` (loss-driven, the
reference's behaviour) and :class:`BbrCongestion` (model-based, the
default: random loss does not collapse it).  Windows in bytes; defaults are
the reference's (docs/reference-wire.md §4.7); ``docs/connection.md``
describes both controllers.
"""

from __future__ import annotations

import math
from typing import Protocol

import attr

from pilot.machines.connection.pacing import RateSample

MSS = 4096
INITIAL_WINDOW = 10 * MSS
MAX_WINDOW = 1 << 20
INITIAL_SSTHRESH = 512 * 1024


class CongestionControl(Protocol):
    """
    What the sender asks of a congestion controller.  Sizes are bytes.

    The sender reads :attr:`cwnd` (bytes it may have in the network) and
    :attr:`pacing_rate` (bytes per second, 0.0: send as the window allows),
    and reports events.
    """

    @property
    def cwnd(self) -> int: ...

    @property
    def ssthresh(self) -> int: ...

    @property
    def pacing_rate(self) -> float: ...

    def on_ack(self, acked: int, in_flight: int, now: float) -> None:
        """``acked`` new bytes were cumulatively acknowledged outside recovery."""

    def on_congestion(self, in_flight: int, now: float) -> None:
        """Loss was detected from duplicate ACKs or SACK: once per recovery episode."""

    def on_timeout(self, in_flight: int, now: float) -> None:
        """The retransmission timer expired."""

    def on_rtt_sample(self, rtt: float, now: float) -> None:
        """A valid round-trip measurement (for delay-based controllers)."""

    def on_delivery(self, sample: RateSample, now: float) -> None:
        """Every ACK that delivered or showed lost some bytes, in recovery or not."""


@attr.s(auto_attribs=True, eq=False)
class RenoCongestion:
    """Slow start and congestion avoidance with byte counting; halve on loss."""

    mss: int = MSS
    initial_window: int = INITIAL_WINDOW
    max_window: int = MAX_WINDOW
    cwnd: int = attr.ib(default=None)
    ssthresh: int = INITIAL_SSTHRESH
    #: Reno sends as its window allows: no pacing.
    pacing_rate: float = 0.0

    def __attrs_post_init__(self) -> None:
        if self.cwnd is None:
            self.cwnd = self.initial_window

    def on_ack(self, acked: int, in_flight: int, now: float) -> None:
        if self.cwnd < self.ssthresh:
            self.cwnd += min(acked, 2 * self.mss)  # RFC 3465, L = 2
        else:
            self.cwnd += max(1, self.mss * acked // self.cwnd)
        self.cwnd = min(self.cwnd, self.max_window)

    def on_congestion(self, in_flight: int, now: float) -> None:
        self.ssthresh = max(in_flight // 2, 2 * self.mss)
        self.cwnd = self.ssthresh

    def on_timeout(self, in_flight: int, now: float) -> None:
        # RFC 5681 restarts from one segment; the reference restarts from the
        # initial window, which we keep (a timeout here is usually a lost
        # tail, not a congested queue).
        self.ssthresh = max(in_flight // 2, 2 * self.mss)
        self.cwnd = self.initial_window

    def on_rtt_sample(self, rtt: float, now: float) -> None:
        pass

    def on_delivery(self, sample: RateSample, now: float) -> None:
        pass


# -- BBR -------------------------------------------------------------------------------

#: 2/ln 2: the smallest gain that doubles the sending rate every round (BBR's startup).
STARTUP_GAIN = 2 / math.log(2)
DRAIN_GAIN = 1 / STARTUP_GAIN
CWND_GAIN = 2.0
#: Probe up, drain what the probe queued, then cruise six rounds (ProbeBW's cycle).
PROBE_BW_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
#: ProbeBW starts cruising, the probe comes after six rounds (BBR picks at random; we stay deterministic).
PROBE_BW_FIRST = 2
BW_WINDOW_ROUNDS = 10
MIN_RTT_WINDOW = 10.0
PROBE_RTT_TIME = 0.2
#: Startup ends when three rounds in a row did not grow the bandwidth by a quarter.
FULL_BW_GROWTH = 1.25
FULL_BW_ROUNDS = 3
#: Startup also ends when this many RTT samples in a row exceed the minimum by an eighth
#: of it, clamped to 4-16 ms: a queue is building (the threshold of RFC 9406, HyStart++).
DELAY_SAMPLES = 8
DELAY_MIN, DELAY_MAX = 0.004, 0.016
#: A round that lost more than this share of what it sent is congestion, not random loss.
HEAVY_LOSS = 0.2
#: Loss is judged over rounds that sent at least this many segments (5 % random loss
#: makes a 20 % share in fewer than one such sample in 200).
LOSS_SAMPLE_SEGMENTS = 32
#: After a round of heavy loss, in-flight data is capped at this share of the window.
HEAVY_LOSS_BACKOFF = 0.7
#: ACK aggregation (``extra_acked``) counts toward the window up to this many seconds at the
#: estimated bandwidth, and an aggregation epoch restarts once it has counted this many bytes
#: (without it one burst keeps the estimate up for as long as ACKs then keep pace).
EXTRA_ACKED_MAX_TIME = 0.1
ACK_EPOCH_RESET_BYTES = 1 << 20
#: The sender's quantum: a pacing tick sends about 1 ms at the pacing rate (a segment or two at
#: least, 64 KiB at most: a receiver ACKs up to that at once); the window keeps room for three.
SEND_QUANTUM_TIME = 0.001
MAX_SEND_QUANTUM = 64 * 1024


@attr.s(auto_attribs=True, eq=False, slots=True)
class WindowedMax:
    """
    The largest value seen over the last ``window`` rounds and, if longer,
    the last ``window`` minimum RTTs (a monotone deque).  The time bound
    keeps a burst of short rounds (the retransmissions of a recovery) from
    flushing the estimate.
    """

    window: int
    #: (round, time, value), values decreasing; a few entries (a list: an empty deque is 600 bytes)
    _entries: list[tuple[int, float, float]] = attr.ib(factory=list)

    @property
    def best(self) -> float:
        return self._entries[0][2] if self._entries else 0.0

    def update(self, value: float, round_count: int, now: float = 0.0, rtt: float = 0.0) -> None:
        entries = self._entries
        while entries and entries[-1][2] <= value:
            entries.pop()
        entries.append((round_count, now, value))
        self.expire(round_count, now, rtt)

    def expire(self, round_count: int, now: float = 0.0, rtt: float = 0.0) -> None:
        entries = self._entries
        while (len(entries) > 1 and entries[0][0] <= round_count - self.window
               and entries[0][1] <= now - self.window * rtt):
            del entries[0]


@attr.s(auto_attribs=True, eq=False, slots=True)
class BbrCongestion:
    """
    A model-based controller after BBR
    (draft-cardwell-iccrg-bbr-congestion-control): the bottleneck bandwidth
    is the windowed maximum of the delivery rate (10 rounds, and at least 10
    minimum RTTs), the propagation delay the windowed minimum of the RTT
    (10 s); the sender paces at ``gain x bandwidth`` and keeps at most
    ``2 x bandwidth x min RTT`` in flight, plus the ACK aggregation seen
    over the last 10 rounds (bytes ACKed beyond what the bandwidth predicts:
    a receiver or event loop answering in batches) and three send quanta.

    Startup doubles the rate every round until three rounds bring less than
    25 % more, or eight RTTs in a row show a queue building (HyStart++'s
    threshold, RFC 9406), or a round loses heavily; drain empties the queue
    startup built; ProbeBW cycles the gain (1.25, 0.75, then 1 for six
    rounds); ProbeRTT drops to four segments for 200 ms when the minimum RTT
    is 10 s old.  Random loss does not change the model; a round that lost
    more than 20 % of its data caps the window at 70 % (never below the
    estimated bandwidth-delay product; growing back an eighth per round
    without such loss) and ends startup; a retransmission timeout restarts
    the window from the initial one.
    """

    mss: int = MSS
    initial_window: int = INITIAL_WINDOW
    max_window: int = MAX_WINDOW
    cwnd: int = attr.ib(default=None)
    pacing_rate: float = 0.0
    state: str = "startup"
    pacing_gain: float = STARTUP_GAIN
    cwnd_gain: float = STARTUP_GAIN
    min_rtt: float = math.inf
    min_rtt_at: float = 0.0
    min_rtt_expired: bool = False
    #: RTT samples in a row above the minimum by the delay threshold.
    delayed_samples: int = 0
    round_count: int = 0
    round_start: bool = False
    next_round_delivered: int = 0
    round_delivered: int = 0
    round_lost: int = 0
    filled_pipe: bool = False
    full_bw: float = 0.0
    full_bw_rounds: int = 0
    cycle_index: int = PROBE_BW_FIRST
    cycle_start: float = 0.0
    prior_cwnd: int = 0
    probe_rtt_done_at: float | None = None
    inflight_cap: int = attr.ib(default=None)
    ack_epoch_start: float = 0.0
    ack_epoch_bytes: int = 0
    heavy_loss_rounds: int = 0
    #: How startup ended: "bandwidth", "delay" or "loss" (None while it lasts).
    startup_exit: str | None = None
    bw: WindowedMax = attr.ib(factory=lambda: WindowedMax(BW_WINDOW_ROUNDS))
    extra_acked: WindowedMax = attr.ib(factory=lambda: WindowedMax(BW_WINDOW_ROUNDS))

    def __attrs_post_init__(self) -> None:
        if self.cwnd is None:
            self.cwnd = self.initial_window
        if self.inflight_cap is None:
            self.inflight_cap = self.max_window

    @property
    def btlbw(self) -> float:
        """The bottleneck bandwidth estimate, bytes per second (0.0 before the first sample)."""
        return self.bw.best

    def bdp(self, gain: float = 1.0) -> float:
        if not self.bw.best or self.min_rtt == math.inf:
            return float(self.initial_window)
        return gain * self.bw.best * self.min_rtt

    @property
    def send_quantum(self) -> int:
        """What one pacing tick sends: about 1 ms at the pacing rate, two segments to 64 KiB."""
        return max(2 * self.mss, min(MAX_SEND_QUANTUM, int(self.pacing_rate * SEND_QUANTUM_TIME)))

    def aggregation_allowance(self) -> int:
        """The window's room for ACK aggregation: ``extra_acked``, at most 100 ms at the bandwidth."""
        return int(min(self.extra_acked.best, self.bw.best * EXTRA_ACKED_MAX_TIME))

    def diagnostics(self) -> dict[str, float | int | str]:
        """The model's state, for ``pilotctl connections`` and traces."""
        return {"cc_mode": self.state, "pacing_rate": round(self.pacing_rate), "btlbw": round(self.btlbw),
                "min_rtt_ms": round(self._rtt_or_zero() * 1000, 3), "extra_acked": int(self.extra_acked.best)}

    @property
    def ssthresh(self) -> int:
        """BBR has no threshold; the statistics show the estimated bandwidth-delay product."""
        return int(self.bdp())

    # -- the hook's events ------------------------------------------------------------

    def on_ack(self, acked: int, in_flight: int, now: float) -> None:
        pass  # on_delivery sees every ACK

    def on_congestion(self, in_flight: int, now: float) -> None:
        pass  # loss alone is no signal to slow down; heavy loss is judged per round

    def on_timeout(self, in_flight: int, now: float) -> None:
        self.prior_cwnd = max(self.prior_cwnd, self.cwnd)
        self.cwnd = self.initial_window

    def on_rtt_sample(self, rtt: float, now: float) -> None:
        expired = now > self.min_rtt_at + MIN_RTT_WINDOW
        if self.min_rtt != math.inf and rtt >= self.min_rtt + self._delay_threshold():
            self.delayed_samples += 1
        else:
            self.delayed_samples = 0
        if rtt <= self.min_rtt or expired:
            self.min_rtt_expired = expired and self.min_rtt != math.inf
            self.min_rtt = rtt
            self.min_rtt_at = now

    def on_delivery(self, sample: RateSample, now: float) -> None:
        self._update_round(sample, now)
        self._update_bandwidth(sample, now)
        self._update_ack_aggregation(sample, now)
        self._update_cycle(sample, now)
        self._check_full_pipe(sample)
        self._check_drain(sample, now)
        self._check_probe_rtt(sample, now)
        self._set_pacing_rate()
        self._set_cwnd(sample)

    # -- the model ----------------------------------------------------------------------

    def _rtt_or_zero(self) -> float:
        return 0.0 if self.min_rtt == math.inf else self.min_rtt

    def _update_round(self, sample: RateSample, now: float) -> None:
        self.round_delivered += sample.newly_delivered
        self.round_lost += sample.newly_lost
        self.round_start = False
        if sample.delivered and sample.prior_delivered >= self.next_round_delivered:
            self.next_round_delivered = sample.total_delivered
            self.round_count += 1
            self.round_start = True
            self._judge_round_loss()
            self.bw.expire(self.round_count, now, self._rtt_or_zero())
            self.extra_acked.expire(self.round_count, now, self._rtt_or_zero())

    def _judge_round_loss(self) -> None:
        sent = self.round_delivered + self.round_lost
        if sent < LOSS_SAMPLE_SEGMENTS * self.mss:
            return  # too few to tell random loss from congestion: judge with the next round
        heavy = self.round_lost > HEAVY_LOSS * sent
        self.round_delivered = self.round_lost = 0
        if heavy:
            self.heavy_loss_rounds += 1
            self.inflight_cap = max(self.initial_window, int(self.bdp()),
                                    int(max(self.cwnd, self.prior_cwnd) * HEAVY_LOSS_BACKOFF))
            self._end_startup("loss")
        elif self.inflight_cap < self.max_window:
            self.inflight_cap = min(self.max_window, self.inflight_cap + self.inflight_cap // 8 + self.mss)

    def _update_bandwidth(self, sample: RateSample, now: float) -> None:
        if not sample.delivered or sample.interval <= 0:
            return
        if self.min_rtt != math.inf and sample.interval < self.min_rtt:
            return  # compressed ACKs: the interval says nothing of the path
        rate = sample.rate
        if not sample.app_limited or rate >= self.bw.best:
            self.bw.update(rate, self.round_count, now, self._rtt_or_zero())

    def _update_ack_aggregation(self, sample: RateSample, now: float) -> None:
        """How far ACKs run ahead of the bandwidth estimate (a batching receiver or event loop)."""
        bw = self.bw.best
        if not bw or not sample.newly_delivered:
            return
        expected = bw * (now - self.ack_epoch_start)
        if (self.ack_epoch_bytes <= expected
                or self.ack_epoch_bytes + sample.newly_delivered >= ACK_EPOCH_RESET_BYTES):
            self.ack_epoch_start, self.ack_epoch_bytes, expected = now, 0, 0.0
        self.ack_epoch_bytes += sample.newly_delivered
        self.extra_acked.update(min(self.ack_epoch_bytes - expected, float(self.cwnd)), self.round_count,
                                now, self._rtt_or_zero())

    def _update_cycle(self, sample: RateSample, now: float) -> None:
        if self.state != "probe_bw":
            return
        elapsed = now - self.cycle_start > self.min_rtt
        gain = self.pacing_gain
        if gain > 1:
            advance = elapsed and (sample.newly_lost > 0 or sample.in_flight >= self.bdp(gain))
        elif gain < 1:
            advance = elapsed or sample.in_flight <= self.bdp()
        else:
            advance = elapsed
        if advance:
            self.cycle_index = (self.cycle_index + 1) % len(PROBE_BW_GAINS)
            self.cycle_start = now
            self.pacing_gain = PROBE_BW_GAINS[self.cycle_index]

    def _check_full_pipe(self, sample: RateSample) -> None:
        if self.filled_pipe:
            return
        if self.delayed_samples >= DELAY_SAMPLES:
            self._end_startup("delay")
            return
        if not self.round_start or sample.app_limited:
            return
        if self.bw.best >= self.full_bw * FULL_BW_GROWTH:
            self.full_bw = self.bw.best
            self.full_bw_rounds = 0
            return
        self.full_bw_rounds += 1
        if self.full_bw_rounds >= FULL_BW_ROUNDS:
            self._end_startup("bandwidth")

    def _delay_threshold(self) -> float:
        return min(DELAY_MAX, max(DELAY_MIN, self.min_rtt / 8))

    def _end_startup(self, why: str) -> None:
        if not self.filled_pipe:
            self.filled_pipe = True
            self.startup_exit = why

    def _check_drain(self, sample: RateSample, now: float) -> None:
        if self.state == "startup" and self.filled_pipe:
            self.state, self.pacing_gain, self.cwnd_gain = "drain", DRAIN_GAIN, STARTUP_GAIN
        if self.state == "drain" and sample.in_flight <= self.bdp():
            self._enter_probe_bw(now)

    def _enter_probe_bw(self, now: float) -> None:
        self.state, self.cwnd_gain = "probe_bw", CWND_GAIN
        self.pacing_gain = PROBE_BW_GAINS[self.cycle_index]
        self.cycle_start = now

    def _check_probe_rtt(self, sample: RateSample, now: float) -> None:
        if self.min_rtt_expired and self.state != "probe_rtt":
            self.min_rtt_expired = False
            self.prior_cwnd = max(self.prior_cwnd, self.cwnd)
            self.state, self.pacing_gain, self.probe_rtt_done_at = "probe_rtt", 1.0, None
        if self.state != "probe_rtt":
            return
        if self.probe_rtt_done_at is None:
            if sample.in_flight <= 4 * self.mss:
                self.probe_rtt_done_at = now + PROBE_RTT_TIME
        elif now >= self.probe_rtt_done_at:
            self.min_rtt_at = now
            self.cwnd = max(self.cwnd, self.prior_cwnd)
            self.prior_cwnd = 0
            if self.filled_pipe:
                self._enter_probe_bw(now)
            else:
                self.state, self.pacing_gain, self.cwnd_gain = "startup", STARTUP_GAIN, STARTUP_GAIN

    def _set_pacing_rate(self) -> None:
        bw = self.bw.best
        if bw:
            rate = self.pacing_gain * bw
            if self.filled_pipe or rate > self.pacing_rate:
                self.pacing_rate = rate
        elif self.min_rtt != math.inf and self.min_rtt > 0:
            self.pacing_rate = STARTUP_GAIN * self.cwnd / self.min_rtt

    def _set_cwnd(self, sample: RateSample) -> None:
        if self.state == "probe_rtt":
            self.cwnd = min(self.cwnd, 4 * self.mss)
            return
        target = int(self.bdp(self.cwnd_gain)) + self.aggregation_allowance() + 3 * self.send_quantum
        target = max(self.initial_window, min(target, self.inflight_cap))
        if self.filled_pipe:
            self.cwnd = min(self.cwnd + sample.newly_delivered, target)
        elif self.cwnd < target or sample.total_delivered < self.initial_window:
            self.cwnd += sample.newly_delivered
        self.cwnd = max(4 * self.mss, min(self.cwnd, self.max_window))
