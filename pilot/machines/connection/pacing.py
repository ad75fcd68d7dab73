# -*- test-case-name: tests.machines.test_pacing -*-
"""
What a model-based congestion controller needs from the sender: delivery-rate
samples (:class:`DeliveryRate`, :class:`RateSample`) and pacing
(:class:`Pacer`).  Plain arithmetic with ``now`` passed in, like
:mod:`~pilot.machines.connection.sendbuffer`.

Delivery rate follows draft-cheng-iccrg-delivery-rate-estimation: every
segment remembers, when it is sent, how many bytes the connection had
delivered (acknowledged or SACKed) and when; when it is delivered, the bytes
delivered since, over the longer of the send and the ACK intervals, is one
sample of the path's delivery rate.  A sample taken while the application
had nothing to send (*app-limited*) says only that the path is at least
that fast.

Pacing is a token bucket: the sender may send while it holds tokens, spends
a segment's bytes per segment, and when it runs dry waits until half a burst
has accrued, so that a pacing tick sends a few segments rather than arming a
timer per segment.  A burst is ``tick`` seconds at the pacing rate, at least
two segments.
"""

from __future__ import annotations

from typing import Protocol

import attr


class Sent(Protocol):
    """The delivery state a segment carries (see :class:`~pilot.machines.connection.sendbuffer.Segment`)."""

    sent_at: float
    delivered: int
    delivered_at: float
    first_sent_at: float
    app_limited: bool


@attr.s(auto_attribs=True, eq=False, frozen=True, slots=True)
class RateSample:
    """What one ACK told the sender, for the congestion controller."""

    #: Bytes delivered over :attr:`interval` (0: no valid sample).
    delivered: int = 0
    interval: float = 0.0
    #: Round trip of the most recently sent segment this ACK delivered (-1: none).
    rtt: float = -1.0
    #: Taken while the sender had nothing to send: a lower bound of the path's rate.
    app_limited: bool = False
    #: Bytes this ACK acknowledged or SACKed for the first time.
    newly_delivered: int = 0
    #: Bytes this ACK's SACK or duplicate ACKs showed lost (timeouts are not counted).
    newly_lost: int = 0
    #: The connection's delivered count when that segment was sent (round counting).
    prior_delivered: int = 0
    #: The connection's delivered count after this ACK.
    total_delivered: int = 0
    #: Bytes in the network after this ACK (RFC 6675's pipe).
    in_flight: int = 0

    @property
    def rate(self) -> float:
        """Bytes per second, 0.0 without a valid sample."""
        return self.delivered / self.interval if self.interval > 0 else 0.0


@attr.s(auto_attribs=True, eq=False, slots=True)
class DeliveryRate:
    """The connection-wide half of delivery-rate estimation."""

    delivered: int = 0
    delivered_at: float = 0.0
    first_sent_at: float = 0.0
    #: While positive, samples are app-limited until ``delivered`` passes it.
    app_limited_until: int = 0
    # this ACK's sample, in progress
    _newly: int = 0
    _lost: int = 0
    _prior_delivered: int = -1
    _prior_at: float = 0.0
    _send_elapsed: float = 0.0
    _ack_elapsed: float = 0.0
    _sample_app_limited: bool = False
    _rtt: float = -1.0

    def on_send(self, seg: Sent, now: float, nothing_in_flight: bool) -> None:
        if nothing_in_flight:
            self.first_sent_at = self.delivered_at = now
        seg.delivered = self.delivered
        seg.delivered_at = self.delivered_at
        seg.first_sent_at = self.first_sent_at
        seg.app_limited = self.app_limited_until > 0

    def on_delivered(self, seg: Sent, nbytes: int, now: float) -> None:
        """``nbytes`` of ``seg`` were acknowledged or SACKed for the first time."""
        self.delivered += nbytes
        self.delivered_at = now
        self._newly += nbytes
        if seg.delivered >= self._prior_delivered:
            self._prior_delivered = seg.delivered
            self._prior_at = seg.delivered_at
            self._sample_app_limited = seg.app_limited
            self._send_elapsed = seg.sent_at - seg.first_sent_at
            self._ack_elapsed = now - seg.delivered_at
            self.first_sent_at = seg.sent_at
            self._rtt = now - seg.sent_at

    def on_lost(self, nbytes: int) -> None:
        self._lost += nbytes

    def forget_losses(self) -> None:
        """Losses a timeout declared are not the path's loss rate: leave them out of the sample."""
        self._lost = 0

    def mark_app_limited(self, in_flight: int) -> None:
        """The sender has nothing more to send: samples until this flight is delivered are app-limited."""
        self.app_limited_until = max(self.delivered + in_flight, 1)

    def sample(self, in_flight: int) -> RateSample | None:
        """The sample of the ACK just processed (None if it delivered nothing and lost nothing)."""
        newly, lost = self._newly, self._lost
        if not newly and not lost:
            return None
        self._newly = self._lost = 0
        if self.app_limited_until and self.delivered > self.app_limited_until:
            self.app_limited_until = 0
        prior = self._prior_delivered
        if prior < 0:
            return RateSample(newly_lost=lost, total_delivered=self.delivered, in_flight=in_flight)
        self._prior_delivered = -1
        interval = max(self._send_elapsed, self._ack_elapsed)
        return RateSample(self.delivered - prior, interval, self._rtt, self._sample_app_limited,
                          newly, lost, prior, self.delivered, in_flight)


@attr.s(auto_attribs=True, eq=False, slots=True)
class Pacer:
    """A token bucket in bytes; see the module docstring."""

    #: Seconds of sending one burst may hold.
    tick: float = 0.002
    min_burst: int = 2 * 4096
    tokens: float = 0.0
    last: float = float("-inf")

    def delay(self, rate: float, now: float) -> float:
        """0.0 if a segment may go now at ``rate`` bytes/s (0: unpaced), else the seconds to wait."""
        if rate <= 0:
            return 0.0
        burst = max(self.min_burst, rate * self.tick)
        self.tokens = min(burst, self.tokens + (now - self.last) * rate)
        self.last = now
        if self.tokens > 0:
            return 0.0
        return (burst / 2 - self.tokens) / rate

    def spend(self, nbytes: int) -> None:
        self.tokens -= nbytes
