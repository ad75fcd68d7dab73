# -*- test-case-name: tests.machines.test_datatransfer -*-
"""
Congestion control for a stream's sender: the :class:`CongestionControl`
hook the sender drives and :class:`RenoCongestion`, the first
implementation (windows in bytes; defaults are the reference's,
docs/reference-wire.md §4.7).
"""

from __future__ import annotations

from typing import Protocol

import attr

MSS = 4096
INITIAL_WINDOW = 10 * MSS
MAX_WINDOW = 1 << 20
INITIAL_SSTHRESH = 512 * 1024


class CongestionControl(Protocol):
    """
    What the sender asks of a congestion controller.  Sizes are bytes.

    A later implementation (pacing, delay-based, SACK-aware) plugs in here;
    the sender only reads :attr:`cwnd` and reports events.
    """

    @property
    def cwnd(self) -> int: ...

    @property
    def ssthresh(self) -> int: ...

    def on_ack(self, acked: int, in_flight: int, now: float) -> None:
        """``acked`` new bytes were cumulatively acknowledged outside recovery."""

    def on_congestion(self, in_flight: int, now: float) -> None:
        """Loss was detected from duplicate ACKs or SACK: once per recovery episode."""

    def on_timeout(self, in_flight: int, now: float) -> None:
        """The retransmission timer expired."""

    def on_rtt_sample(self, rtt: float, now: float) -> None:
        """A valid round-trip measurement (for delay-based controllers)."""


@attr.s(auto_attribs=True, eq=False)
class RenoCongestion:
    """Slow start and congestion avoidance with byte counting; halve on loss."""

    mss: int = MSS
    initial_window: int = INITIAL_WINDOW
    max_window: int = MAX_WINDOW
    cwnd: int = attr.ib(default=None)
    ssthresh: int = INITIAL_SSTHRESH

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
