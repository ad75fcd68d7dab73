# -*- test-case-name: tests.machines.test_datatransfer -*-
"""
The sending half of a stream: segmentation (of what
:mod:`~pilot.machines.connection.sendqueue` holds), retransmission queue with
a SACK scoreboard, loss recovery, flow control, and the congestion-control hook.

Like :mod:`pilot.machines.connection.recvbuffer` this is arithmetic on *absolute*
sequence numbers with ``now`` passed in: no clock, no packets.  The
connection asks :meth:`Sender.next_transmission` for segments to put on the
wire, feeds ACKs to :meth:`Sender.on_ack` and retransmission-timer expiries
to :meth:`Sender.on_timeout`.

Rules (docs/reference-wire.md §4.7 unless stated):

* Segments are at most ``mss`` bytes: 4096 (the reference's) or what the
  path carries (``docs/tunnel.md``); ``mss`` may change at any time.  They keep
  their boundaries when retransmitted (the reference's receiver only accepts a
  segment whose sequence number is exactly the next expected one, or buffers
  it by exact start, so re-cut retransmissions could stall it), except when
  the path shrank below a segment: then the retransmission is cut to the new
  size at the segment's start, and the rest follows as its own segment.
* A segment must never read as a SACK option (docs/reference-wire.md §9 item 19: any ACK
  packet whose payload parses as ``SACK`` + count 1-4 + blocks is taken as
  SACK, never delivered).  Such a cut is shortened to one byte less than the
  option it would spell, which no longer parses; the rest follows in the
  next segment.
* Flow control: new data may extend at most ``peer window x 4096`` bytes past
  the oldest unacknowledged byte, and while the receiver holds SACKed data at
  most :data:`OOO_LIMIT` (it holds less out of order than its window).  A
  window of 0 is read as *one* segment (a probe), not as "no limit" like the
  reference does: it advertises 0 only when full, and then blocks.
* Congestion control sits behind :class:`CongestionControl`; every ACK that
  delivers or shows lost some bytes gives it a delivery-rate sample
  (:mod:`~pilot.machines.connection.pacing`).
* Loss recovery: fast retransmit on the 3rd duplicate ACK, NewReno partial
  ACKs, and SACK: an un-SACKed segment is lost once three segments sent
  after it were SACKed (RFC 6675's DupThresh, counted in transmission order
  as RACK does, which also finds lost retransmissions without a timeout).  A retransmission
  timeout backs the RTO off, marks every un-SACKed segment lost and resends
  them as the window allows.  SACK marks are kept until the data is
  acknowledged (no receiver of ours or the reference's reneges).
* Persist: when the only thing stopping us is the peer's window and the peer
  answered since our last transmission, a timer expiry is a window probe, not
  a failure: no give-up count, interval 0.5 s doubling to 30 s.
"""

from __future__ import annotations

import bisect
import collections
import enum
from typing import Iterable

import attr

from pilot.machines.connection.congestion import (  # noqa: F401 (re-exported)
    INITIAL_SSTHRESH, INITIAL_WINDOW, MAX_WINDOW, MSS, CongestionControl, RenoCongestion,
)
from pilot.machines.connection.pacing import DeliveryRate
from pilot.machines.connection.recvbuffer import MAX_OOO_SEGMENTS
from pilot.machines.connection.rtt import RttEstimator
from pilot.machines.connection.sendqueue import SendQueue, sack_safe  # noqa: F401 (re-exported)

#: The header's window counts slots of this many bytes, whatever the segment size (docs/reference-wire.md §4.7).
WINDOW_UNIT = 4096
#: Consecutive retransmission timeouts after which the path's datagram size is suspect.
BLACK_HOLE_TIMEOUTS = 2
DUP_THRESH = 3
MAX_RETRANSMITS = 8
PROBE_INITIAL = 0.5
PROBE_MAX = 30.0
#: What a receiver holds out of order: the reference's 128 segments, our 128 slots' bytes.
OOO_LIMIT = MAX_OOO_SEGMENTS * WINDOW_UNIT


@attr.s(auto_attribs=True, eq=False, slots=True)
class Segment:
    start: int
    payload: bytes
    sent_at: float
    transmissions: int = 1
    sacked: bool = False
    #: Deemed lost and waiting to be retransmitted.
    lost: bool = False
    #: The recovery episode in which it was last retransmitted (0 = never).
    episode: int = 0
    #: Order of its latest transmission among all of this sender's transmissions.
    tx: int = 0
    # delivery-rate state at its latest transmission (pilot.machines.connection.pacing)
    delivered: int = 0
    delivered_at: float = 0.0
    first_sent_at: float = 0.0
    app_limited: bool = False

    @property
    def end(self) -> int:
        return self.start + len(self.payload)


class TimerOutcome(enum.Enum):
    NOTHING = "nothing"
    RETRANSMIT = "retransmit"
    PROBE = "probe"
    GIVE_UP = "give_up"


@attr.s(auto_attribs=True, eq=False, frozen=True)
class AckResult:
    #: New bytes cumulatively acknowledged.
    acked: int = 0
    #: The ACK was ignored (acknowledges data never sent, or older than what we have).
    ignored: bool = False


_NOTHING_ACKED, _IGNORED = AckResult(), AckResult(ignored=True)


@attr.s(auto_attribs=True, eq=False)
class Sender:
    #: Oldest unacknowledged byte, and the next new byte to send.
    snd_una: int
    rtt: RttEstimator
    cc: CongestionControl
    mss: int = MSS
    max_retransmits: int = MAX_RETRANSMITS
    nagle: bool = True
    probe_initial: float = PROBE_INITIAL
    probe_max: float = PROBE_MAX
    snd_nxt: int = attr.ib(default=None)
    #: The peer's last accepted window field (segments).
    peer_window: int = 512
    dup_acks: int = 0
    in_recovery: bool = False
    recovery_point: int = 0
    episode: int = 0
    #: Timer expiries since the last new ACK.
    timeouts: int = 0
    persisting: bool = False
    probe_interval: float = 0.0
    last_ack_at: float = float("-inf")
    #: Set when Nagle held back a partial segment; the connection arms a timer.
    nagle_holding: bool = False
    # counters (the reference's conn_list names)
    bytes_sent: int = 0
    segs_sent: int = 0
    retransmits: int = 0
    fast_retx: int = 0
    dup_acks_total: int = 0
    sack_recv: int = 0
    segments: collections.deque[Segment] = attr.ib(factory=collections.deque)
    rate: DeliveryRate = attr.ib(factory=DeliveryRate)
    #: Written, not yet cut into segments.
    _queue: SendQueue = attr.ib(factory=SendQueue)
    _transmissions: int = 0
    #: Bytes of the segments neither SACKed nor deemed lost, kept as they change (:meth:`pipe`).
    _pipe: int = 0
    #: How many segments are deemed lost (waiting to be resent): none, and no scan is needed.
    _lost: int = 0
    #: How many segments are SACKed: the receiver holds them out of order.
    _sacked: int = 0

    def __attrs_post_init__(self) -> None:
        if self.snd_nxt is None:
            self.snd_nxt = self.snd_una

    # -- what the connection reads ------------------------------------------------

    @property
    def unsent(self) -> int:
        return self._queue.queued

    @property
    def outstanding(self) -> bool:
        return bool(self.segments)

    @property
    def has_lost(self) -> bool:
        """Some segments wait to be retransmitted."""
        return bool(self._lost)

    @property
    def idle(self) -> bool:
        """Nothing queued and everything sent was acknowledged."""
        return not self._queue.queued and not self.segments

    def pipe(self) -> int:
        """Bytes believed to be in the network (RFC 6675): not SACKed, not deemed lost."""
        return self._pipe

    def in_flight(self) -> int:
        return self.snd_nxt - self.snd_una

    def send_window(self) -> int:
        """How far past ``snd_una`` the peer lets us send, in bytes."""
        return max(1, self.peer_window) * WINDOW_UNIT

    # -- application data ----------------------------------------------------------

    def write(self, data: bytes) -> None:
        self._queue.write(data)

    # -- transmission --------------------------------------------------------------

    def quiet(self) -> bool:
        """
        Whether nothing is queued and nothing is in flight (a receiving end, every segment);
        if so, what ``next_transmission`` does then (no segment; the flight marked
        app-limited) is done, in one call instead of a property and that method.
        """
        if self._queue.queued or self.segments:
            return False
        self.nagle_holding = False
        if self._pipe < self.cc.cwnd:
            self.rate.mark_app_limited(self._pipe)
        return True

    def next_transmission(self, now: float, flush: bool = False) -> tuple[Segment, bool] | None:
        """
        The next segment to put on the wire and whether it is a retransmission,
        or ``None`` if the windows (or Nagle, unless ``flush``) say wait.
        """
        self.nagle_holding = False
        first_hole = True
        for seg in (self.segments if self._lost else ()):
            if seg.sacked:
                continue
            if seg.lost:
                # The lowest hole always goes (fast retransmit, timeout, probe);
                # later ones wait for room in the congestion window.
                if not first_hole and self.pipe() + len(seg.payload) > self.cc.cwnd:
                    return None
                if len(seg.payload) > self.mss:
                    self._split(seg)
                seg.lost = False
                self._lost -= 1
                self.rate.on_send(seg, now, not self._pipe)
                self._pipe += len(seg.payload)
                seg.transmissions += 1
                seg.sent_at = now
                seg.episode = self.episode
                seg.tx = self._stamp()
                self.retransmits += 1
                return seg, True
            first_hole = False
        queued = self._queue.queued
        if not queued:
            if self._pipe < self.cc.cwnd:
                self.rate.mark_app_limited(self._pipe)
            return None
        snd_nxt, mss = self.snd_nxt, self.mss
        # the room the peer's window leaves (send_window()), and the congestion window's (pipe())
        flow_room = self.snd_una + (self.peer_window if self.peer_window > 1 else 1) * WINDOW_UNIT - snd_nxt
        if self._sacked:
            # everything past the hole waits at the receiver, whose room for it is smaller
            # than its window: what does not fit would be dropped there
            flow_room = min(flow_room, self.snd_una + OOO_LIMIT - snd_nxt)
        want = mss if mss < queued else queued
        n = min(want, flow_room, self.cc.cwnd - self._pipe)
        if n <= 0:
            return None
        if n < want and self.segments:
            return None  # wait for a full segment's room (silly-window avoidance)
        if n < mss and self.segments and self.nagle and not flush:
            self.nagle_holding = True
            return None
        payload = self._queue.take(n)
        size = len(payload)
        self._transmissions = tx = self._transmissions + 1  # _stamp()
        seg = Segment(snd_nxt, payload, now, 1, False, False, 0, tx)
        self.rate.on_send(seg, now, not self._pipe)
        self.segments.append(seg)
        self._pipe += size
        self.snd_nxt = snd_nxt + size
        self.bytes_sent += size
        self.segs_sent += 1
        return seg, False

    def _split(self, seg: Segment) -> None:
        """Cut a lost segment that no longer fits the path; the rest is lost too, right after it."""
        index = self.segments.index(seg)
        pieces = [seg.payload[i:i + self.mss] for i in range(0, len(seg.payload), self.mss)]
        start = seg.start + len(pieces[0])
        for offset, piece in enumerate(pieces[1:], 1):
            self.segments.insert(index + offset, Segment(start, piece, seg.sent_at, seg.transmissions,
                                                         lost=True, episode=seg.episode, tx=seg.tx))
            start += len(piece)
        self._lost += len(pieces) - 1
        seg.payload = pieces[0]

    def _stamp(self) -> int:
        self._transmissions += 1
        return self._transmissions

    # -- acknowledgements ----------------------------------------------------------

    def on_ack(self, ack: int, window: int, sack: Iterable[tuple[int, int]], carries_data: bool,
               now: float) -> AckResult:
        """Process the acknowledgement fields of one ACK packet (absolute numbers)."""
        if ack == self.snd_una and not self.segments and not sack:  # a receiving end, every segment
            self.last_ack_at = now  # (nothing in flight: nothing to sample, advance or mark lost)
            if window > 0 or carries_data:
                self.peer_window = window
            return _NOTHING_ACKED
        if ack > self.snd_nxt or ack < self.snd_una:
            return _IGNORED
        self.last_ack_at = now
        advanced = ack > self.snd_una
        believe_window = window > 0 or advanced or carries_data
        window_grew = believe_window and window > self.peer_window
        was_blocked = self.in_flight() >= self.send_window()
        if believe_window:
            self.peer_window = window
        blocks = list(sack)
        if blocks:
            self.sack_recv += len(blocks)
            self._apply_sack(blocks, now)
        if advanced:
            acked = self._advance(ack, now)
        else:
            acked = 0
            if self.segments and not carries_data and believe_window and not window_grew:
                self._duplicate(now)
            elif window_grew and was_blocked and self.segments:
                # A window update after we stalled on the window: the head may have
                # been dropped by a full receiver, send it again now.
                self._set_lost(self.segments[0], path_loss=False)
                self.persisting = False
        if blocks and self.segments:
            self._detect_losses(now)
        sample = self.rate.sample(self._pipe)
        if sample is not None:
            self.cc.on_delivery(sample, now)
        return AckResult(acked=acked)

    def _advance(self, ack: int, now: float) -> int:
        acked = ack - self.snd_una
        self.snd_una = ack
        sample: Segment | None = None
        while self.segments and self.segments[0].end <= ack:
            seg = self.segments.popleft()
            if seg.lost:
                self._lost -= 1
            elif not seg.sacked:
                self._pipe -= len(seg.payload)
            if not seg.sacked:
                self.rate.on_delivered(seg, len(seg.payload), now)
            else:
                self._sacked -= 1
            if seg.transmissions == 1 and not seg.sacked:
                sample = seg
        if self.segments and self.segments[0].start < ack:
            head = self.segments[0]  # partly acknowledged: keep the rest as its own segment
            if not head.sacked and not head.lost:
                self._pipe -= ack - head.start
            if not head.sacked:
                self.rate.on_delivered(head, ack - head.start, now)
            head.payload = head.payload[ack - head.start:]
            head.start = ack
        if sample is not None:
            self.rtt.sample(now - sample.sent_at)
            self.cc.on_rtt_sample(now - sample.sent_at, now)
        self.dup_acks = 0
        self.timeouts = 0
        self.persisting = False
        if self.in_recovery:
            if ack >= self.recovery_point:
                self.in_recovery = False
            elif self.segments:
                self._mark_lost(self._first_hole())  # NewReno partial ACK
        else:
            self.cc.on_ack(acked, self.pipe(), now)
        return acked

    def _duplicate(self, now: float) -> None:
        self.dup_acks += 1
        self.dup_acks_total += 1
        if self.dup_acks == DUP_THRESH and not self.in_recovery:
            self._enter_recovery(now)
            self._mark_lost(self._first_hole())
            self.fast_retx += 1

    def _apply_sack(self, blocks: list[tuple[int, int]], now: float) -> None:
        for left, right in blocks:
            if not self.snd_una <= left < right <= self.snd_nxt:
                continue
            for seg in self.segments:
                if seg.start >= right:
                    break
                if seg.start >= left and seg.end <= right and not seg.sacked:
                    if seg.lost:
                        self._lost -= 1
                    else:
                        self._pipe -= len(seg.payload)
                    seg.sacked = True
                    self._sacked += 1
                    seg.lost = False
                    self.rate.on_delivered(seg, len(seg.payload), now)

    def _detect_losses(self, now: float) -> None:
        """
        A segment is lost once DupThresh segments *transmitted after it* have
        been SACKed (RFC 6675's rule, counted in transmission order as RACK
        does, so that a lost retransmission is found without a timeout).
        """
        later_sacked = sorted(seg.tx for seg in self.segments if seg.sacked)
        if len(later_sacked) < DUP_THRESH:
            return
        lost = [seg for seg in self.segments
                if not seg.sacked and not seg.lost
                and len(later_sacked) - bisect.bisect_right(later_sacked, seg.tx) >= DUP_THRESH]
        if not lost:
            return
        if not self.in_recovery:
            self._enter_recovery(now)
            self.fast_retx += 1
        for seg in lost:
            self._set_lost(seg)

    def _first_hole(self) -> Segment | None:
        for seg in self.segments:
            if not seg.sacked:
                return seg
        return None

    def _mark_lost(self, seg: Segment | None) -> None:
        if seg is not None and seg.episode != self.episode:
            self._set_lost(seg)

    def _set_lost(self, seg: Segment, path_loss: bool = True) -> None:
        """Deem ``seg`` lost: it leaves the pipe until it is sent again."""
        if not seg.lost:
            if not seg.sacked:
                self._pipe -= len(seg.payload)
                if path_loss:
                    self.rate.on_lost(len(seg.payload))
            seg.lost = True
            self._lost += 1

    def _enter_recovery(self, now: float) -> None:
        self.cc.on_congestion(self.pipe(), now)
        self.in_recovery = True
        self.recovery_point = self.snd_nxt
        self.episode += 1

    # -- timers --------------------------------------------------------------------

    def timer_interval(self) -> float:
        return self.probe_interval if self.persisting else self.rtt.rto

    def on_timeout(self, now: float) -> TimerOutcome:
        """The retransmission timer expired: decide what it means."""
        if not self.segments:
            return TimerOutcome.NOTHING
        head = self.segments[0]
        if self.in_flight() >= self.send_window() and self.last_ack_at > head.sent_at:
            # The peer is alive and its window is what holds us: probe, never give up.
            self.probe_interval = (min(self.probe_max, self.probe_interval * 2)
                                   if self.persisting else self.probe_initial)
            self.persisting = True
            self._set_lost(head, path_loss=False)
            return TimerOutcome.PROBE
        self.persisting = False
        self.timeouts += 1
        if self.timeouts > self.max_retransmits:
            return TimerOutcome.GIVE_UP
        self.rtt.back_off()
        self.cc.on_timeout(self.pipe(), now)
        self.in_recovery = True
        self.recovery_point = self.snd_nxt
        self.episode += 1
        self.dup_acks = 0
        for seg in self.segments:
            if not seg.sacked:
                self._set_lost(seg, path_loss=False)
        return TimerOutcome.RETRANSMIT
