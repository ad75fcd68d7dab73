# -*- test-case-name: tests.machines.test_connection -*-
"""
The data path every state of a stream connection shares.

:class:`Transfer` is the core the lifecycle machine
(:mod:`~pilot.machines.connection.machine`) runs on: the injected
collaborators (clock, ``send``, the application's callbacks), the
data-transfer arithmetic (:mod:`~pilot.machines.connection.sendbuffer`,
:mod:`~pilot.machines.connection.recvbuffer`,
:mod:`~pilot.machines.connection.rtt`), the timers, and the few operations
more than one state performs: put packets on the wire (:meth:`Transfer.emit`,
:meth:`Transfer.pump`), take in a segment (:meth:`Transfer.process_segment`),
hand data to the application (:meth:`Transfer.deliver`).  What happens on a
state change (handshake, close, TIME_WAIT, the end) is in the machine's
behaviours, not here.

It feeds the machine through :class:`ConnectionInputs`, declared here so that
this module imports nothing above it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from pilot.address import Address
from pilot.machines.connection.config import ConnectionConfig
from pilot.machines.connection.pacing import Pacer
from pilot.machines.connection.recvbuffer import Receipt, RecvBuffer
from pilot.machines.connection.rtt import RttEstimator
from pilot.machines.connection.sendbuffer import CongestionControl, Sender
from pilot.machines.connection.sequence import SEQ_MASK, unwrap, wire
from pilot.machines.connection.timers import (  # noqa: F401 (re-exported)
    DEADLINE_SLACK, CoalescedTimer, Timer, TimerSlot,
)
from pilot.wire.packet import ACK, SACK_MAGIC, STREAM, VERSION, Packet, encode_sack, parse_sack

_unchecked = Packet.unchecked

#: ``tracer(state, input, next_state)``
Tracer = Callable[[str, str, str], None]


class ConnectionInputs(Protocol):
    """The machine's inputs: events, past tense.  :class:`Connection` and the timers feed them."""

    def open_requested(self) -> None: ...
    def write_requested(self, data: bytes) -> None: ...
    def close_requested(self) -> None: ...
    def abort_requested(self, reason: Failure) -> None: ...
    def reading_resumed(self) -> None: ...
    def syn_received(self, packet: Packet) -> None: ...
    def syn_ack_received(self, packet: Packet) -> None: ...
    def segment_received(self, packet: Packet) -> None: ...
    def fin_received(self, packet: Packet) -> None: ...
    def fin_ack_received(self, packet: Packet) -> None: ...
    def rst_received(self, packet: Packet) -> None: ...
    def handshake_acked(self, packet: Packet) -> None: ...
    def send_drained(self) -> None: ...
    def application_told(self) -> None: ...
    def handshake_timer_fired(self) -> None: ...
    def retransmit_timer_fired(self) -> None: ...
    def fin_timer_fired(self) -> None: ...
    def retries_exhausted(self) -> None: ...
    def ack_timer_fired(self) -> None: ...
    def nagle_timer_fired(self) -> None: ...
    def pacing_timer_fired(self) -> None: ...
    def keepalive_due(self) -> None: ...
    def idle_timed_out(self) -> None: ...
    def time_wait_elapsed(self) -> None: ...


#: In-order data acknowledged by one ACK at most: past ``delayed_ack_segments`` the ACK
#: waits for the end of the reactor pass that read them, until this many bytes are owed
#: (what Linux's GRO hands its TCP at once: 16 segments of 4,096 bytes, 48 of 1,402).
ACK_STRETCH_BYTES = 65536

_NO_BLOCKS: list[tuple[int, int]] = []  # never changed: the SACK blocks of an ACK without them


def _check_ends(local: Address, local_port: int, remote: Address, remote_port: int) -> None:
    """What ``Packet`` checks of these fields (``ValueError``), without building one."""
    for name, value in (("src", local), ("dst", remote)):
        if not isinstance(value, Address):
            raise ValueError(f"{name} must be an Address, not {type(value).__name__}")
    for name, port in (("src_port", local_port), ("dst_port", remote_port)):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise ValueError(f"{name} must be an integer in [0, 65536), not {port!r}")


@attr.s(auto_attribs=True, eq=False)
class Handshake:
    """What the two handshake states (``syn_sent``, ``syn_received``) keep."""

    #: Repetitions of our SYN (or SYN+ACK) so far.
    attempts: int = 0
    #: When our handshake packet went out, for the RTT sample; None once repeated (Karn).
    sent_at: Optional[float] = None
    #: When the passive side answered the first SYN (the accept timeout runs from there).
    started: float = 0.0
    #: ``close()`` came during the handshake: close as soon as it is established.
    close_when_established: bool = False


@attr.s(auto_attribs=True, eq=False)
class Transfer:
    """Collaborators, the data-transfer arithmetic and timers, and the shared data path."""

    clock: IReactorTime
    send: Callable[[Packet], None]
    local: Address
    local_port: int
    remote: Address
    remote_port: int
    config: ConnectionConfig
    iss: int
    data_received: Callable[[bytes], None]
    connection_made: Callable[[], None]
    connection_lost: Callable[[Failure], None]
    released: Callable[[], None]
    cc: CongestionControl
    machine: ConnectionInputs = attr.ib(default=None)
    #: The machine's state name (the table's ``before`` hook keeps it).
    state: str = "idle"
    tracer: Optional[Tracer] = None
    #: Told when the retransmission timer fired BLACK_HOLE_TIMEOUTS times in a row.
    path_trouble: Callable[[], None] = lambda: None
    #: The segment size to start with (None: ``config.mss``).
    segment_size: Optional[int] = None
    #: ``linger(seq, window, ack_owed)``: the stack keeps TIME_WAIT for us (None: we linger ourselves).
    linger: Optional[Callable[[int, int, bool], None]] = None
    handshake: Handshake = attr.ib(factory=Handshake)
    #: We answered a SYN (rather than sent one).
    passive: bool = False
    peer_iss: int = 0
    receiver: Optional[RecvBuffer] = None
    fin_seq: Optional[int] = None
    fin_attempts: int = 0
    final_acks: int = 0
    reading: bool = True
    ack_owed: bool = False
    pending_acks: int = 0
    last_window: int = 0
    last_received: float = 0.0
    #: When the last keepalive probe went out (or the connection was established).
    probed_at: float = 0.0
    sack_sent: int = 0
    bytes_recv: int = 0
    segs_recv: int = 0
    rtt: RttEstimator = attr.ib(init=False)
    sender: Sender = attr.ib(init=False)
    pacer: Pacer = attr.ib(factory=Pacer)
    #: The timers made so far (the ones to stop at the end).
    timers: list[Timer] = attr.ib(factory=list)

    def __attrs_post_init__(self) -> None:
        # addresses and ports checked once here (ValueError), so that emit() need not
        _check_ends(self.local, self.local_port, self.remote, self.remote_port)
        c = self.config
        self.rtt = RttEstimator(c.initial_rto, c.min_rto, c.max_rto)
        self.sender = Sender(self.iss + 1, self.rtt, self.cc, mss=min(c.mss, self.segment_size or c.mss),
                             max_retransmits=c.max_retransmits, nagle=c.nagle,
                             probe_initial=c.probe_initial, probe_max=c.probe_max)

    # the timers, each made when first read (TimerSlot)
    handshake_timer = TimerSlot(Timer, "handshake_timer_fired")
    rexmit_timer = TimerSlot(CoalescedTimer, "retransmit_timer_fired")
    fin_timer = TimerSlot(Timer, "fin_timer_fired")
    ack_timer = TimerSlot(CoalescedTimer, "ack_timer_fired")
    nagle_timer = TimerSlot(Timer, "nagle_timer_fired")
    pacing_timer = TimerSlot(Timer, "pacing_timer_fired")
    time_wait_timer = TimerSlot(Timer, "time_wait_elapsed")
    liveness_timer = TimerSlot(Timer, None)

    def now(self) -> float:
        return self.clock.seconds()

    # -- packets out ----------------------------------------------------------------

    def window(self) -> int:
        if self.receiver is None:
            return min(self.config.recv_queue_segments, 0xFFFF)
        return self.receiver.window()

    def emit(self, flags: int, seq: int, payload: bytes = b"", ack: int | None = None) -> None:
        receiver = self.receiver
        if ack is None:
            ack = receiver.rcv_nxt if (flags & ACK and receiver is not None) else 0
        window = receiver.window() if receiver is not None else self.window()
        if flags & ACK:
            self.ack_owed = False
            self.pending_acks = 0
            ack_timer = self.__dict__.get("ack_timer")  # _ACK_TIMER.cancel_in(self), once per packet
            if ack_timer is not None:
                ack_timer.cancel()
            self.last_window = window
        # the ports and addresses were checked when the connection was made, seq and ack
        # are wrapped to 32 bits, the window is at most 0xFFFF, flags are ours
        self.send(_unchecked(VERSION, flags, STREAM, self.local, self.remote, self.local_port,
                             self.remote_port, seq & SEQ_MASK, ack & SEQ_MASK, window, payload))

    def send_ack(self) -> None:
        """A pure ACK, with SACK blocks while out-of-order data is held."""
        payload = b""
        assert self.receiver is not None
        blocks = self.receiver.sack_blocks()
        if blocks:
            payload = encode_sack([(wire(left), wire(right)) for left, right in blocks])
            self.sack_sent += len(blocks)
        self.emit(ACK, self.sender.snd_nxt, payload)

    def delayed_ack(self) -> None:
        """The data held for the end of the pass, then the ACK still owed, if any."""
        self.deliver()
        if self.ack_owed and self.receiver is not None:
            self.send_ack()

    def pump(self, flush: bool = False) -> None:
        """
        Put on the wire whatever the windows and the pacing rate allow, and
        keep the timers right.  While the controller paces, a segment goes
        only when the pacer has tokens; otherwise the pacing timer is armed
        (once: a tick sends a few segments) and calls here again.
        """
        sender = self.sender
        if sender.quiet():  # a receiving end, every segment: next_transmission's bookkeeping done
            made = self.__dict__  # NAGLE_TIMER.cancel_in(self), REXMIT_TIMER.cancel_in(self) without the calls
            for timer in (made.get("nagle_timer"), made.get("rexmit_timer")):
                if timer is not None:
                    timer.cancel()
            return
        now = self.clock.seconds()
        pacer, cc, next_transmission, emit = self.pacer, self.cc, sender.next_transmission, self.emit
        while True:
            rate = cc.pacing_rate
            if rate:
                wait = pacer.delay(rate, now)
                if wait:
                    if sender.unsent or sender.has_lost:
                        self.pacing_timer.ensure(wait)
                    break
            chosen = next_transmission(now, flush)
            if chosen is None:
                break
            segment = chosen[0]
            payload = segment.payload
            if rate:
                pacer.tokens -= len(payload)  # pacer.spend()
            emit(ACK, segment.start, payload)
        if self.sender.nagle_holding:
            self.nagle_timer.ensure(self.config.nagle_delay)
        else:
            NAGLE_TIMER.cancel_in(self)
        if self.sender.outstanding:
            self.rexmit_timer.ensure(self.sender.timer_interval())
        else:
            REXMIT_TIMER.cancel_in(self)

    # -- packets in -----------------------------------------------------------------

    def new_receiver(self, peer_iss: int) -> None:
        self.peer_iss = peer_iss
        self.receiver = RecvBuffer(peer_iss + 1, self.config.mss, self.config.recv_queue_segments,
                                   self.config.max_ooo_segments)

    def process_segment(self, packet: Packet, flush: bool = False) -> None:
        """An ACK-flagged packet in a data state: acknowledgement, SACK, data."""
        assert self.receiver is not None
        now = self.clock.seconds()
        sender = self.sender
        payload = packet.payload
        sack = parse_sack(payload) if payload[:4] == SACK_MAGIC else None  # data: no call
        if sack is None:
            data, blocks = payload, _NO_BLOCKS
        else:
            data = b""
            blocks = [(unwrap(left, sender.snd_una), unwrap(right, sender.snd_una)) for left, right in sack]
        if sack is None and not sender.segments and packet.ack == sender.snd_una & SEQ_MASK:
            # a receiving end, every segment: what on_ack does when nothing is in flight (no sample,
            # nothing to advance or mark lost), without the calls
            sender.last_ack_at = now
            if packet.window > 0 or data:
                sender.peer_window = packet.window
        elif sender.on_ack(unwrap(packet.ack, sender.snd_una), packet.window, blocks, bool(data), now).acked:
            REXMIT_TIMER.cancel_in(self)  # restarted by pump() with the current RTO
        ack_now = False
        deliver = True
        if data:
            self.segs_recv += 1
            self.bytes_recv += len(data)
            self.ack_owed = True
            receiver = self.receiver
            seq, rcv_nxt = packet.seq, receiver.rcv_nxt
            receipt = receiver.receive(rcv_nxt if seq == rcv_nxt & SEQ_MASK else unwrap(seq, rcv_nxt), data)
            if receipt is Receipt.IN_ORDER and not receiver.filled_gap and not receiver.ooo_count:
                pending = self.pending_acks = self.pending_acks + 1
                if pending * len(data) >= ACK_STRETCH_BYTES:
                    ack_now = True
                elif pending >= self.config.delayed_ack_segments:
                    # the ACK (and the data) at the end of this reactor pass: one for every
                    # segment read in the pass, a stretch ACK (docs/connection.md); past the
                    # first, the timer is armed for this pass already (only an ACK sent disarms it,
                    # and that resets the count)
                    if pending == self.config.delayed_ack_segments:
                        self.ack_timer.start(0.0)
                    deliver = pending == 1
                else:
                    self.ack_timer.ensure(self.config.delayed_ack)
            else:
                ack_now = True  # out of order, duplicate, gap filled, or dropped
            if deliver:
                self.deliver()
        self.pump(flush)
        if ack_now and (self.ack_owed or self.receiver.ooo_count):
            self.send_ack()

    # -- the application --------------------------------------------------------------

    def call_app(self, callback: Callable[..., None], *args: Any) -> None:
        """An application callback; if it raises, the connection is aborted with that failure."""
        try:
            callback(*args)
        except Exception:
            self.machine.abort_requested(Failure())

    def deliver(self, force: bool = False) -> None:
        if self.receiver is not None and (self.reading or force):
            data = self.receiver.take()
            if data:
                self.call_app(self.data_received, data)

    # -- timers -----------------------------------------------------------------------

    def start_liveness(self) -> None:
        """
        One timer for the keepalive probe and the idle timeout: it fires at
        whichever is due first (a delayed call per connection, not two).
        """
        self.last_received = self.probed_at = self.clock.seconds()
        c = self.config
        self.liveness_timer.start(min(c.keepalive_interval, c.idle_timeout))

    def _liveness_check(self) -> None:
        now, c = self.now(), self.config
        idle_at = self.last_received + c.idle_timeout
        if now >= idle_at:
            self.machine.idle_timed_out()
            return
        # a probe once keepalive_interval passed with nothing received and no probe sent
        probe_at = max(self.last_received, self.probed_at) + c.keepalive_interval
        if now >= probe_at:
            self.probed_at = now
            self.machine.keepalive_due()
            probe_at = now + c.keepalive_interval
        self.liveness_timer.start(min(probe_at, idle_at) - now)

    def cancel_timers(self) -> None:
        for timer in self.timers:
            if timer._call is not None:  # only a pending one has anything to stop (a call less each)
                timer.stop()


#: The slots whose ``cancel_in`` the data path calls, read once (``Transfer.x`` is a call to ``__get__``).
_ACK_TIMER, NAGLE_TIMER, REXMIT_TIMER = Transfer.ack_timer, Transfer.nagle_timer, Transfer.rexmit_timer
