# -*- test-case-name: tests.machines.test_connection -*-
"""
The tunables of a stream connection: :class:`ConnectionConfig`, every
constant in bytes, segments and seconds, defaulting to the reference's
(docs/reference-wire.md §4.7).
"""

from __future__ import annotations

import attr

from pilot.machines.connection.recvbuffer import MAX_OOO_SEGMENTS, RECV_QUEUE_SEGMENTS
from pilot.machines.connection.rtt import INITIAL_RTO, MAX_RTO, MIN_RTO
from pilot.machines.connection.sendbuffer import (
    INITIAL_SSTHRESH, INITIAL_WINDOW, MAX_RETRANSMITS, MAX_WINDOW, MSS, PROBE_INITIAL, PROBE_MAX,
)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class ConnectionConfig:
    """
    Every constant, in bytes, segments and seconds; defaults are the
    reference's (``docs/reference-wire.md`` §4.7).
    """

    mss: int = MSS
    recv_queue_segments: int = RECV_QUEUE_SEGMENTS
    max_ooo_segments: int = MAX_OOO_SEGMENTS
    initial_rto: float = INITIAL_RTO
    min_rto: float = MIN_RTO
    max_rto: float = MAX_RTO
    max_retransmits: int = MAX_RETRANSMITS
    #: SYN (and SYN+ACK) retransmissions: 1 s doubling to 8 s, 6 of them (~29 s in all).
    syn_retries: int = 6
    syn_max_rto: float = 8.0
    #: The passive side waits this long (from the SYN) for the ACK of its SYN+ACK,
    #: repeating the SYN+ACK on the SYN schedule: longer than a reference opener
    #: that lost its final ACK takes to send its first keepalive (30-45 s).
    accept_timeout: float = 60.0
    delayed_ack: float = 0.040
    delayed_ack_segments: int = 2
    nagle: bool = True
    nagle_delay: float = 0.040
    keepalive_interval: float = 30.0
    idle_timeout: float = 120.0
    time_wait: float = 10.0
    probe_initial: float = PROBE_INITIAL
    probe_max: float = PROBE_MAX
    initial_window: int = INITIAL_WINDOW
    max_window: int = MAX_WINDOW
    initial_ssthresh: int = INITIAL_SSTHRESH
    #: The congestion controller: "bbr" (model-based, paced; docs/connection.md) or "reno"
    #: (loss-driven, unpaced: the reference's behaviour).
    congestion: str = attr.ib(default="bbr", validator=attr.validators.in_(("bbr", "reno")))
