# -*- test-case-name: tests.machines.test_datatransfer -*-
"""
Round-trip time and the retransmission timeout, per RFC 6298, with the
reference's constants (docs/reference-wire.md §4.7): initial RTO 1 s, floor 200 ms, ceiling
10 s, alpha 1/8, beta 1/4, K 4, clock granularity 10 ms.

Plain arithmetic; the caller measures the samples (Karn's rule: never from a
segment that was retransmitted) and says when a timeout happened.
"""

from __future__ import annotations

import attr

INITIAL_RTO = 1.0
MIN_RTO = 0.2
MAX_RTO = 10.0
CLOCK_GRANULARITY = 0.010
ALPHA = 1 / 8
BETA = 1 / 4
K = 4


@attr.s(auto_attribs=True, eq=False)
class RttEstimator:
    """Smoothed RTT, its variation and the current (possibly backed-off) RTO, in seconds."""

    initial_rto: float = INITIAL_RTO
    min_rto: float = MIN_RTO
    max_rto: float = MAX_RTO
    granularity: float = CLOCK_GRANULARITY
    srtt: float | None = None
    rttvar: float = 0.0
    rto: float = attr.ib(default=None)
    #: Timeouts since the last valid sample (each one doubled :attr:`rto`).
    backoffs: int = 0

    def __attrs_post_init__(self) -> None:
        if self.rto is None:
            self.rto = self.initial_rto

    def sample(self, rtt: float) -> None:
        """Fold in one measured round trip (RFC 6298 §2.2, §2.3)."""
        rtt = max(0.0, rtt)
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - BETA) * self.rttvar + BETA * abs(self.srtt - rtt)
            self.srtt = (1 - ALPHA) * self.srtt + ALPHA * rtt
        self.rto = self._clamp(self.srtt + max(self.granularity, K * self.rttvar))
        self.backoffs = 0

    def back_off(self) -> None:
        """A retransmission timer expired: double the RTO, up to the ceiling (§5.5)."""
        self.rto = self._clamp(self.rto * 2)
        self.backoffs += 1

    @property
    def base_rto(self) -> float:
        """The RTO the estimate gives, without the timeouts' backoff."""
        if self.srtt is None:
            return self.initial_rto
        return self._clamp(self.srtt + max(self.granularity, K * self.rttvar))

    def _clamp(self, rto: float) -> float:
        return min(self.max_rto, max(self.min_rto, rto))

    @property
    def srtt_ms(self) -> float:
        return 0.0 if self.srtt is None else self.srtt * 1000

    @property
    def rttvar_ms(self) -> float:
        return self.rttvar * 1000
