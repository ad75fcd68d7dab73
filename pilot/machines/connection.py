# -*- test-case-name: tests.machines.test_connection -*-
"""
One reliable, ordered, flow-controlled stream connection over the v0.5
packet header (facts §4.5-§4.7; ``docs/connection.md`` has the diagram).

:class:`Connection` is what a demultiplexer creates per (peer address, local
port, remote port).  It is sans-I/O: packets go out through the injected
``send``, bytes to the application through ``data_received``, time comes
from the injected ``IReactorTime``.  Its public methods are the inputs:
:meth:`~Connection.open_active`, :meth:`~Connection.packet_received`,
:meth:`~Connection.write`, :meth:`~Connection.close`,
:meth:`~Connection.abort`, :meth:`~Connection.pause_reading` and
:meth:`~Connection.resume_reading`.  A passive open is just the first SYN
fed to :meth:`~Connection.packet_received` of a fresh connection.

The lifecycle is an Automat machine (``_builder`` below); the data transfer
is plain arithmetic in :mod:`~pilot.machines.sendbuffer`,
:mod:`~pilot.machines.recvbuffer` and :mod:`~pilot.machines.rtt`.  Inside,
sequence numbers are absolute Python ints; the wire carries their low 32
bits and incoming ones are unwrapped next to what we expect (signed 32-bit
difference), so wrap-around needs no special case.

Callbacks: ``connection_made()`` once when established;
``data_received(bytes)`` in order; ``connection_lost(Failure)`` exactly once
(also when the connection never got established: dial timeout, refused,
aborted); ``released()`` exactly once when the connection reaches
``closed`` and the demultiplexer may forget it (after TIME_WAIT, at once
after a reset).  An exception from ``connection_made`` or ``data_received``
aborts the connection with that failure.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import attr
from automat import TypeMachineBuilder
from twisted.internet import error
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from pilot.address import Address
from pilot.machines.recvbuffer import MAX_OOO_SEGMENTS, RECV_QUEUE_SEGMENTS, Receipt, RecvBuffer
from pilot.machines.rtt import INITIAL_RTO, MAX_RTO, MIN_RTO, RttEstimator
from pilot.machines.sendbuffer import (
    INITIAL_SSTHRESH, INITIAL_WINDOW, MAX_RETRANSMITS, MAX_WINDOW, MSS, PROBE_INITIAL, PROBE_MAX,
    CongestionControl, RenoCongestion, Sender, TimerOutcome,
)
from pilot.wire.packet import ACK, FIN, RST, STREAM, SYN, Packet, encode_sack, parse_sack

SEQ_MASK = 0xFFFFFFFF

#: Our state names -> the reference's ``conn_list`` spelling.
REFERENCE_STATE = {
    "idle": "CLOSED", "syn_sent": "SYN_SENT", "syn_received": "SYN_RECV",
    "established": "ESTABLISHED", "draining": "ESTABLISHED", "fin_wait": "FIN_WAIT",
    "time_wait": "TIME_WAIT", "closed": "CLOSED",
}


def wire(n: int) -> int:
    """An absolute sequence number as the 32-bit header field."""
    return n & SEQ_MASK


def unwrap(value: int, near: int) -> int:
    """The absolute number with low 32 bits ``value`` nearest ``near`` (signed 32-bit difference)."""
    diff = (value - near) & SEQ_MASK
    if diff >= 1 << 31:
        diff -= 1 << 32
    return near + diff


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class ConnectionConfig:
    """Every constant, in bytes, segments and seconds; defaults are the reference's (facts §4.7)."""

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


@attr.s(frozen=True, auto_attribs=True)
class ConnectionStats:
    """A snapshot with the reference's ``conn_list`` field names (sizes in bytes)."""

    state: str
    send_seq: int
    recv_ack: int
    cong_win: int
    ssthresh: int
    in_flight: int
    srtt_ms: float
    rttvar_ms: float
    unacked: int
    ooo_buf: int
    peer_recv_win: int
    recv_win: int
    in_recovery: bool
    bytes_sent: int
    bytes_recv: int
    segs_sent: int
    segs_recv: int
    retransmits: int
    fast_retx: int
    sack_recv: int
    sack_sent: int
    dup_acks: int

    def as_dict(self) -> dict[str, Any]:
        return attr.asdict(self)


class ConnectionInputs(Protocol):
    """The machine's inputs: events, past tense.  :class:`Connection` feeds them."""

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
    def handshake_timer_fired(self) -> None: ...
    def retransmit_timer_fired(self) -> None: ...
    def fin_timer_fired(self) -> None: ...
    def retries_exhausted(self) -> None: ...
    def ack_timer_fired(self) -> None: ...
    def nagle_timer_fired(self) -> None: ...
    def keepalive_due(self) -> None: ...
    def idle_timed_out(self) -> None: ...
    def time_wait_elapsed(self) -> None: ...


@attr.s(auto_attribs=True, eq=False)
class _Timer:
    clock: IReactorTime
    fire: Callable[[], None]
    _call: IDelayedCall | None = None

    @property
    def active(self) -> bool:
        return self._call is not None

    def start(self, delay: float) -> None:
        self.cancel()
        self._call = self.clock.callLater(max(0.0, delay), self._run)

    def ensure(self, delay: float) -> None:
        if self._call is None:
            self.start(delay)

    def cancel(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _run(self) -> None:
        self._call = None
        self.fire()


def _ignore(*args: object) -> None:
    pass


@attr.s(auto_attribs=True, eq=False)
class _Core:
    """Collaborators, the data-transfer helpers, and the outputs the machine calls."""

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
    state: str = "idle"
    passive: bool = False
    peer_iss: int = 0
    receiver: RecvBuffer | None = None
    handshake_sent_at: float | None = None
    handshake_started: float = 0.0
    handshake_attempts: int = 0
    close_pending: bool = False
    fin_seq: int | None = None
    fin_attempts: int = 0
    reading: bool = True
    ack_owed: bool = False
    pending_acks: int = 0
    last_window: int = 0
    last_received: float = 0.0
    final_acks: int = 0
    made: bool = False
    lost: bool = False
    done: bool = False
    sack_sent: int = 0
    bytes_recv: int = 0
    segs_recv: int = 0
    rtt: RttEstimator = attr.ib(init=False)
    sender: Sender = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        c = self.config
        self.rtt = RttEstimator(c.initial_rto, c.min_rto, c.max_rto)
        self.sender = Sender(self.iss + 1, self.rtt, self.cc, mss=c.mss,
                             max_retransmits=c.max_retransmits, nagle=c.nagle,
                             probe_initial=c.probe_initial, probe_max=c.probe_max)
        inputs = lambda name: lambda: getattr(self.machine, name)()  # noqa: E731
        self.handshake_timer = _Timer(self.clock, inputs("handshake_timer_fired"))
        self.rexmit_timer = _Timer(self.clock, inputs("retransmit_timer_fired"))
        self.fin_timer = _Timer(self.clock, inputs("fin_timer_fired"))
        self.ack_timer = _Timer(self.clock, inputs("ack_timer_fired"))
        self.nagle_timer = _Timer(self.clock, inputs("nagle_timer_fired"))
        self.time_wait_timer = _Timer(self.clock, inputs("time_wait_elapsed"))
        self.keepalive_timer = _Timer(self.clock, self._keepalive_check)
        self.idle_timer = _Timer(self.clock, self._idle_check)

    # -- packets out ----------------------------------------------------------------

    def now(self) -> float:
        return self.clock.seconds()

    def window(self) -> int:
        if self.receiver is None:
            return min(self.config.recv_queue_segments, 0xFFFF)
        return self.receiver.window()

    def emit(self, flags: int, seq: int, payload: bytes = b"", ack: int | None = None) -> None:
        if ack is None:
            ack = self.receiver.rcv_nxt if (flags & ACK and self.receiver is not None) else 0
        window = self.window()
        if flags & ACK:
            self.ack_owed = False
            self.pending_acks = 0
            self.ack_timer.cancel()
            self.last_window = window
        self.send(Packet(protocol=STREAM, flags=flags, src=self.local, dst=self.remote,
                         src_port=self.local_port, dst_port=self.remote_port,
                         seq=wire(seq), ack=wire(ack), window=window, payload=payload))

    def send_ack(self) -> None:
        """A pure ACK, with SACK blocks while out-of-order data is held."""
        payload = b""
        assert self.receiver is not None
        blocks = self.receiver.sack_blocks()
        if blocks:
            payload = encode_sack([(wire(left), wire(right)) for left, right in blocks])
            self.sack_sent += len(blocks)
        self.emit(ACK, self.sender.snd_nxt, payload)

    # -- application callbacks ------------------------------------------------------

    def call_app(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            self.machine.abort_requested(Failure())

    def make(self) -> None:
        if not self.made:
            self.made = True
            self.call_app(self.connection_made)

    def lose(self, reason: BaseException) -> None:
        if not self.lost:
            self.lost = True
            self.connection_lost(Failure(reason))

    def deliver(self, force: bool = False) -> None:
        if self.receiver is not None and (self.reading or force):
            data = self.receiver.take()
            if data:
                self.call_app(self.data_received, data)

    # -- handshake ------------------------------------------------------------------

    def send_syn(self) -> None:
        self.emit(SYN, self.iss)
        self.handshake_sent_at = self.now()
        self.handshake_timer.start(self.config.initial_rto)

    def accept_syn(self, packet: Packet) -> None:
        self.passive = True
        self.peer_iss = packet.seq
        self.receiver = RecvBuffer(packet.seq + 1, self.config.mss, self.config.recv_queue_segments,
                                   self.config.max_ooo_segments)
        self.sender.peer_window = packet.window
        self.emit(SYN | ACK, self.iss, ack=self.peer_iss + 1)
        self.handshake_sent_at = self.handshake_started = self.now()
        self.handshake_timer.start(self.config.initial_rto)

    def acks_our_syn(self, packet: Packet) -> bool:
        return bool(packet.flags & ACK) and packet.ack == wire(self.iss + 1)

    def check_syn_ack(self, inputs: ConnectionInputs, packet: Packet) -> None:
        if self.acks_our_syn(packet):
            inputs.handshake_acked(packet)

    def resend_handshake(self, inputs: ConnectionInputs) -> None:
        self.handshake_attempts += 1
        delay = min(self.config.initial_rto * 2 ** self.handshake_attempts, self.config.syn_max_rto)
        if self.state == "syn_sent":
            if self.handshake_attempts > self.config.syn_retries:
                inputs.retries_exhausted()
                return
            self.emit(SYN, self.iss)
        else:
            left = self.handshake_started + self.config.accept_timeout - self.now()
            if left <= 0:
                inputs.retries_exhausted()
                return
            self.emit(SYN | ACK, self.iss, ack=self.peer_iss + 1)
            delay = min(delay, left)
        self.handshake_sent_at = None  # Karn: no RTT sample from a repeated handshake packet
        self.handshake_timer.start(delay)

    def establish(self, inputs: ConnectionInputs, packet: Packet) -> None:
        """The handshake completed with ``packet`` (SYN+ACK, or the passive side's first ACK)."""
        self.handshake_timer.cancel()
        if self.handshake_sent_at is not None:
            self.rtt.sample(self.now() - self.handshake_sent_at)
        if self.receiver is None:  # active open: the SYN+ACK names the peer's ISN
            self.peer_iss = packet.seq
            self.receiver = RecvBuffer(packet.seq + 1, self.config.mss,
                                       self.config.recv_queue_segments, self.config.max_ooo_segments)
        self.last_received = self.now()
        self.keepalive_timer.start(self.config.keepalive_interval)
        self.idle_timer.start(self.config.idle_timeout)
        if packet.flags & SYN:
            self.sender.peer_window = packet.window
            self.emit(ACK, self.sender.snd_nxt)  # the third leg, as the reference sends it
            self.make()
            self.pump()
        else:
            self.make()
            self.process_segment(packet)
        if self.close_pending:
            inputs.close_requested()

    def repeat_syn_ack(self, packet: Packet) -> None:
        """The peer repeated its SYN: repeat our SYN+ACK, unchanged."""
        if self.passive and packet.seq == self.peer_iss:
            self.emit(SYN | ACK, self.iss, ack=self.peer_iss + 1)

    def answer_duplicate_syn_ack(self, packet: Packet) -> None:
        if not self.passive and packet.seq == self.peer_iss and self.acks_our_syn(packet):
            self.emit(ACK, self.sender.snd_nxt)

    # -- data -----------------------------------------------------------------------

    def queue(self, data: bytes) -> None:
        self.sender.write(data)

    def pump(self, flush: bool = False) -> None:
        """Put on the wire whatever the windows allow, and keep the timers right."""
        now = self.now()
        while True:
            chosen = self.sender.next_transmission(now, flush)
            if chosen is None:
                break
            segment, _ = chosen
            self.emit(ACK, segment.start, segment.payload)
        if self.sender.nagle_holding:
            self.nagle_timer.ensure(self.config.nagle_delay)
        else:
            self.nagle_timer.cancel()
        if self.sender.outstanding:
            self.rexmit_timer.ensure(self.sender.timer_interval())
        else:
            self.rexmit_timer.cancel()

    def process_segment(self, packet: Packet, flush: bool = False) -> None:
        """An ACK-flagged packet in a data state: acknowledgement, SACK, data."""
        assert self.receiver is not None
        now = self.now()
        sender = self.sender
        payload = packet.payload
        sack = parse_sack(payload) if payload else None
        data = payload if sack is None else b""
        blocks = [(unwrap(left, sender.snd_una), unwrap(right, sender.snd_una))
                  for left, right in sack or ()]
        result = sender.on_ack(unwrap(packet.ack, sender.snd_una), packet.window, blocks,
                               bool(data), now)
        if result.acked:
            self.rexmit_timer.cancel()  # restarted by pump() with the current RTO
        ack_now = False
        if data:
            self.segs_recv += 1
            self.bytes_recv += len(data)
            self.ack_owed = True
            receiver = self.receiver
            receipt = receiver.receive(unwrap(packet.seq, receiver.rcv_nxt), data)
            if receipt is Receipt.IN_ORDER and not receiver.filled_gap and not receiver.ooo_count:
                self.pending_acks += 1
                if self.pending_acks >= self.config.delayed_ack_segments:
                    ack_now = True
                else:
                    self.ack_timer.ensure(self.config.delayed_ack)
            else:
                ack_now = True  # out of order, duplicate, gap filled, or dropped
            self.deliver()
        self.pump(flush)
        if ack_now and (self.ack_owed or self.receiver.ooo_count):
            self.send_ack()

    def data_timeout(self, inputs: ConnectionInputs) -> None:
        outcome = self.sender.on_timeout(self.now())
        if outcome is TimerOutcome.GIVE_UP:
            inputs.retries_exhausted()
            return
        if outcome is TimerOutcome.NOTHING:
            return
        self.pump(flush=True)
        self.rexmit_timer.start(self.sender.timer_interval())

    def delayed_ack(self) -> None:
        if self.ack_owed and self.receiver is not None:
            self.send_ack()

    def resume(self) -> None:
        self.reading = True
        self.deliver()
        if self.receiver is not None and self.receiver.window() > self.last_window:
            self.send_ack()  # window update

    # -- liveness -------------------------------------------------------------------

    def _keepalive_check(self) -> None:
        due = self.last_received + self.config.keepalive_interval
        if self.now() >= due:
            self.machine.keepalive_due()
            self.keepalive_timer.start(self.config.keepalive_interval)
        else:
            self.keepalive_timer.start(due - self.now())

    def _idle_check(self) -> None:
        due = self.last_received + self.config.idle_timeout
        if self.now() >= due:
            self.machine.idle_timed_out()
        else:
            self.idle_timer.start(due - self.now())

    def keepalive(self) -> None:
        """
        Probe an idle peer with one byte it already has (the TCP keepalive
        shape): both the reference and we answer that with an ACK, whereas the
        reference never answers a pure ACK.
        """
        if not self.sender.outstanding:
            self.emit(ACK, self.sender.snd_nxt - 1, b"\x00")

    # -- closing --------------------------------------------------------------------

    def check_drained(self, inputs: ConnectionInputs) -> None:
        if self.sender.idle:
            inputs.send_drained()

    def send_fin(self) -> None:
        self.nagle_timer.cancel()
        self.rexmit_timer.cancel()
        # an ACK still owed goes first: the FIN carries none (the reference's FIN has no ACK
        # flag), and a peer told of our close before our ACK would think its data was lost
        self.delayed_ack()
        self.fin_seq = self.sender.snd_nxt
        self.emit(FIN, self.fin_seq)
        self.fin_timer.start(self.fin_interval())

    def fin_interval(self) -> float:
        """
        The estimate's RTO (not the data phase's backoff) doubling per retry, and
        at most half of TIME_WAIT, so that a lost FIN+ACK is asked for again
        while the peer still lingers to answer.
        """
        return min(self.rtt.base_rto * 2 ** self.fin_attempts, self.config.max_rto,
                   self.config.time_wait / 2)

    def resend_fin(self, inputs: ConnectionInputs) -> None:
        assert self.fin_seq is not None
        self.fin_attempts += 1
        if self.fin_attempts > self.config.max_retransmits:
            inputs.retries_exhausted()
            return
        self.emit(FIN, self.fin_seq)
        self.fin_timer.start(self.fin_interval())

    def answer_fin(self, packet: Packet) -> None:
        """The peer closed: hand over what we have, answer FIN+ACK, linger in TIME_WAIT."""
        assert self.receiver is not None
        self.deliver(force=True)
        missing = unwrap(packet.seq, self.receiver.rcv_nxt) - self.receiver.rcv_nxt
        unsent = self.sender.unsent + self.sender.in_flight()
        self.emit(FIN | ACK, self.sender.snd_nxt, ack=packet.seq + 1)
        self.enter_time_wait()
        if missing > 0:
            self.lose(error.ConnectionLost(f"peer closed with {missing} bytes not received"))
        elif unsent > 0:
            self.lose(error.ConnectionLost(f"peer closed before {unsent} bytes were delivered"))
        else:
            self.lose(error.ConnectionDone())

    def final_ack(self, packet: Packet) -> None:
        """At most one pure ACK for a FIN+ACK, ever: it never starts a FIN+ACK ping-pong."""
        if self.final_acks == 0:
            self.final_acks += 1
            seq = self.sender.snd_nxt if self.fin_seq is None else self.fin_seq + 1
            self.emit(ACK, seq, ack=packet.seq + 1)

    def finish_close(self, packet: Packet) -> None:
        self.deliver(force=True)
        self.final_ack(packet)
        self.enter_time_wait()
        self.lose(error.ConnectionDone())

    def cancel_timers(self) -> None:
        for timer in (self.handshake_timer, self.rexmit_timer, self.fin_timer, self.ack_timer,
                      self.nagle_timer, self.keepalive_timer, self.idle_timer, self.time_wait_timer):
            timer.cancel()

    def enter_time_wait(self) -> None:
        self.cancel_timers()
        self.time_wait_timer.start(self.config.time_wait)

    def end(self, reason: BaseException | Failure | None = None, rst: bool = False) -> None:
        """Reach ``closed``: optionally reset the peer, report, and release."""
        self.cancel_timers()
        if rst:
            self.emit(RST, self.sender.snd_nxt)
        try:
            if isinstance(reason, Failure):
                if not self.lost:
                    self.lost = True
                    self.connection_lost(reason)
            elif reason is not None:
                self.lose(reason)
        finally:
            if not self.done:
                self.done = True
                self.released()


# -- the lifecycle ------------------------------------------------------------------

_builder = TypeMachineBuilder(ConnectionInputs, _Core)
idle = _builder.state("idle")
syn_sent = _builder.state("syn_sent")
syn_received = _builder.state("syn_received")
established = _builder.state("established")
draining = _builder.state("draining")
fin_wait = _builder.state("fin_wait")
time_wait = _builder.state("time_wait")
closed = _builder.state("closed")
_STATES = (idle, syn_sent, syn_received, established, draining, fin_wait, time_wait, closed)
_defined: set[tuple[str, str]] = set()

I = ConnectionInputs  # noqa: E741


_Behaviour = Callable[..., None]


def _on(old: Any, event: Callable[..., None], new: Any) -> Callable[[_Behaviour], _Behaviour]:
    """Register a transition whose behaviour first records the new state's name."""

    def register(behaviour: _Behaviour) -> _Behaviour:
        def output(inputs: ConnectionInputs, core: _Core, *args: Any) -> None:
            core.state = new.name
            behaviour(inputs, core, *args)

        output.__name__ = behaviour.__name__
        old.upon(event).to(new)(output)
        _defined.add((old.name, event.__name__))
        return behaviour

    return register


# idle: nothing sent yet
@_on(idle, I.open_requested, syn_sent)
def _dial(inputs: ConnectionInputs, core: _Core) -> None:
    core.send_syn()


@_on(idle, I.syn_received, syn_received)
@_on(syn_sent, I.syn_received, syn_received)  # simultaneous open
def _answer_syn(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.accept_syn(packet)


@_on(idle, I.write_requested, idle)
@_on(syn_sent, I.write_requested, syn_sent)
@_on(syn_received, I.write_requested, syn_received)
def _queue_early(inputs: ConnectionInputs, core: _Core, data: bytes) -> None:
    core.queue(data)


@_on(idle, I.close_requested, closed)
def _close_unopened(inputs: ConnectionInputs, core: _Core) -> None:
    core.end(error.ConnectionDone())


@_on(idle, I.abort_requested, closed)
def _abort_unopened(inputs: ConnectionInputs, core: _Core, reason: Failure) -> None:
    core.end(reason)


# handshake
@_on(syn_sent, I.syn_ack_received, syn_sent)
@_on(syn_received, I.syn_ack_received, syn_received)  # simultaneous open
def _check_syn_ack(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.check_syn_ack(inputs, packet)


@_on(syn_received, I.segment_received, syn_received)
def _check_first_ack(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.check_syn_ack(inputs, packet)  # lenient: the pure ACK or the first data segment


@_on(syn_received, I.syn_received, syn_received)
def _repeat_syn_ack(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.repeat_syn_ack(packet)


@_on(syn_sent, I.handshake_acked, established)
@_on(syn_received, I.handshake_acked, established)
def _establish(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.establish(inputs, packet)


@_on(syn_sent, I.handshake_timer_fired, syn_sent)
@_on(syn_received, I.handshake_timer_fired, syn_received)
def _resend_handshake(inputs: ConnectionInputs, core: _Core) -> None:
    core.resend_handshake(inputs)


@_on(syn_sent, I.close_requested, syn_sent)
@_on(syn_received, I.close_requested, syn_received)
def _close_after_handshake(inputs: ConnectionInputs, core: _Core) -> None:
    core.close_pending = True


@_on(syn_sent, I.rst_received, closed)
def _refused(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.end(error.ConnectionRefusedError())


@_on(syn_sent, I.retries_exhausted, closed)
@_on(syn_received, I.retries_exhausted, closed)
def _handshake_timed_out(inputs: ConnectionInputs, core: _Core) -> None:
    core.end(error.TimeoutError("no answer to the handshake"), rst=True)


@_on(syn_received, I.fin_received, time_wait)
@_on(syn_received, I.fin_ack_received, time_wait)
def _closed_during_handshake(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.make()
    core.answer_fin(packet)


# established and draining (close requested, data still going out)
@_on(established, I.segment_received, established)
def _segment(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.process_segment(packet)


@_on(draining, I.segment_received, draining)
def _segment_draining(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.process_segment(packet, flush=True)
    core.check_drained(inputs)


@_on(fin_wait, I.segment_received, fin_wait)
def _segment_after_fin(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.process_segment(packet)


@_on(established, I.write_requested, established)
def _write(inputs: ConnectionInputs, core: _Core, data: bytes) -> None:
    core.queue(data)
    core.pump()


@_on(established, I.close_requested, draining)
def _close(inputs: ConnectionInputs, core: _Core) -> None:
    core.pump(flush=True)
    core.check_drained(inputs)


@_on(draining, I.send_drained, fin_wait)
def _send_fin(inputs: ConnectionInputs, core: _Core) -> None:
    core.send_fin()


@_on(established, I.retransmit_timer_fired, established)
@_on(draining, I.retransmit_timer_fired, draining)
def _retransmit(inputs: ConnectionInputs, core: _Core) -> None:
    core.data_timeout(inputs)


@_on(established, I.ack_timer_fired, established)
@_on(draining, I.ack_timer_fired, draining)
@_on(fin_wait, I.ack_timer_fired, fin_wait)
def _delayed_ack(inputs: ConnectionInputs, core: _Core) -> None:
    core.delayed_ack()


@_on(established, I.nagle_timer_fired, established)
@_on(draining, I.nagle_timer_fired, draining)
def _flush(inputs: ConnectionInputs, core: _Core) -> None:
    core.pump(flush=True)


@_on(established, I.reading_resumed, established)
@_on(draining, I.reading_resumed, draining)
@_on(fin_wait, I.reading_resumed, fin_wait)
def _resume(inputs: ConnectionInputs, core: _Core) -> None:
    core.resume()


@_on(established, I.keepalive_due, established)
@_on(draining, I.keepalive_due, draining)
@_on(fin_wait, I.keepalive_due, fin_wait)
def _keepalive(inputs: ConnectionInputs, core: _Core) -> None:
    core.keepalive()


@_on(established, I.syn_received, established)
def _duplicate_syn(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.repeat_syn_ack(packet)


@_on(established, I.syn_ack_received, established)
def _duplicate_syn_ack(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.answer_duplicate_syn_ack(packet)


@_on(established, I.fin_received, time_wait)
@_on(established, I.fin_ack_received, time_wait)
@_on(draining, I.fin_received, time_wait)
@_on(draining, I.fin_ack_received, time_wait)
@_on(fin_wait, I.fin_received, time_wait)  # both sides closed at once
def _peer_closed(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.answer_fin(packet)


# fin_wait: our FIN is out, all our data acknowledged
@_on(fin_wait, I.fin_ack_received, time_wait)
def _fin_answered(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.finish_close(packet)


@_on(fin_wait, I.fin_timer_fired, fin_wait)
def _resend_fin(inputs: ConnectionInputs, core: _Core) -> None:
    core.resend_fin(inputs)


@_on(fin_wait, I.retries_exhausted, closed)
def _fin_unanswered(inputs: ConnectionInputs, core: _Core) -> None:
    core.end(error.ConnectionDone("FIN never answered; all data was acknowledged"))


# failures from any open state
@_on(syn_received, I.rst_received, closed)
@_on(established, I.rst_received, closed)
@_on(draining, I.rst_received, closed)
def _reset_by_peer(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.end(error.ConnectionLost("connection reset by peer"))


@_on(fin_wait, I.rst_received, closed)
def _reset_after_fin(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    # Everything we sent was acknowledged; the peer has most likely forgotten
    # the connection already (its TIME_WAIT ended before our FIN got through).
    core.end(error.ConnectionDone("reset after our FIN; all data was acknowledged"))


@_on(syn_sent, I.abort_requested, closed)
@_on(syn_received, I.abort_requested, closed)
@_on(established, I.abort_requested, closed)
@_on(draining, I.abort_requested, closed)
@_on(fin_wait, I.abort_requested, closed)
def _abort(inputs: ConnectionInputs, core: _Core, reason: Failure) -> None:
    core.end(reason, rst=True)


@_on(established, I.retries_exhausted, closed)
@_on(draining, I.retries_exhausted, closed)
def _give_up(inputs: ConnectionInputs, core: _Core) -> None:
    core.end(error.TimeoutError("retransmissions exhausted"), rst=True)


@_on(established, I.idle_timed_out, closed)
@_on(draining, I.idle_timed_out, closed)
@_on(fin_wait, I.idle_timed_out, closed)
def _idle(inputs: ConnectionInputs, core: _Core) -> None:
    core.end(error.TimeoutError("idle timeout"), rst=True)


# time_wait: lost already reported; answer stray FINs, never start a ping-pong
@_on(time_wait, I.fin_received, time_wait)
def _fin_again(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.emit(FIN | ACK, core.sender.snd_nxt, ack=packet.seq + 1)  # our FIN+ACK was lost


@_on(time_wait, I.fin_ack_received, time_wait)
def _fin_ack_again(inputs: ConnectionInputs, core: _Core, packet: Packet) -> None:
    core.final_ack(packet)


@_on(time_wait, I.time_wait_elapsed, closed)
@_on(time_wait, I.rst_received, closed)
@_on(time_wait, I.syn_received, closed)  # the peer reuses the ports: make room for a new connection
@_on(time_wait, I.abort_requested, closed)
def _forget(inputs: ConnectionInputs, core: _Core, *args: Any) -> None:
    core.end()


# Everything not listed above is ignored (packets that make no sense in the
# state, timers that lost a race with a transition, writes after close).
for _state in _STATES:
    for _name in ("open_requested", "write_requested", "close_requested", "abort_requested",
                  "reading_resumed", "syn_received", "syn_ack_received", "segment_received",
                  "fin_received", "fin_ack_received", "rst_received", "handshake_acked",
                  "send_drained", "handshake_timer_fired", "retransmit_timer_fired",
                  "fin_timer_fired", "retries_exhausted", "ack_timer_fired", "nagle_timer_fired",
                  "keepalive_due", "idle_timed_out", "time_wait_elapsed"):
        if (_state.name, _name) not in _defined:
            _state.upon(getattr(I, _name)).to(_state).returns(None)

_machine = _builder.build()


def transitions() -> list[tuple[str, str, str, str]]:
    """Every transition that does something: (state, input, next state, behaviour), for docs and tests."""
    rows = [(old.name, event, new.name, outputs[-1].name)
            for old, event, new, outputs in _machine.__automat_automaton__._transitions
            if outputs[-1].name != "returns(None)"]
    order = [state.name for state in _STATES]
    return sorted(rows, key=lambda row: (order.index(row[0]), row[1]))


class Connection:
    """One stream connection; see the module docstring."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        send: Callable[[Packet], None],
        local: Address,
        local_port: int,
        remote: Address,
        remote_port: int,
        data_received: Callable[[bytes], None] = _ignore,
        connection_made: Callable[[], None] = _ignore,
        connection_lost: Callable[[Failure], None] = _ignore,
        released: Callable[[], None] = _ignore,
        config: ConnectionConfig | None = None,
        congestion: CongestionControl | None = None,
        initial_sequence: int = 0,
    ) -> None:
        config = config or ConnectionConfig()
        cc = congestion or RenoCongestion(config.mss, config.initial_window, config.max_window,
                                          ssthresh=config.initial_ssthresh)
        self._core = _Core(clock, send, local, local_port, remote, remote_port, config,
                           wire(initial_sequence), data_received, connection_made, connection_lost,
                           released, cc)
        self._machine = _machine(self._core)
        self._core.machine = self._machine

    # -- inputs ---------------------------------------------------------------------

    def open_active(self) -> None:
        """Dial: send the SYN."""
        self._machine.open_requested()

    def packet_received(self, packet: Packet) -> None:
        """A packet the demultiplexer routed here; anything not for us is dropped."""
        core = self._core
        if (not isinstance(packet, Packet) or packet.protocol != STREAM
                or packet.src != core.remote or packet.dst.node != core.local.node
                or packet.src_port != core.remote_port or packet.dst_port != core.local_port):
            return
        core.last_received = core.now()
        flags = packet.flags
        m = self._machine
        if flags & RST:
            m.rst_received(packet)
        elif flags & SYN:
            (m.syn_ack_received if flags & ACK else m.syn_received)(packet)
        elif flags & FIN:
            (m.fin_ack_received if flags & ACK else m.fin_received)(packet)
        elif flags & ACK:
            m.segment_received(packet)

    def write(self, data: bytes) -> None:
        """Queue bytes; they go out once established.  Ignored after close."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"write() takes bytes, not {type(data).__name__}")
        if data:
            self._machine.write_requested(bytes(data))

    def close(self) -> None:
        """Graceful: the FIN goes out once everything written is acknowledged."""
        self._machine.close_requested()

    def abort(self) -> None:
        """Reset the connection now (RST) and drop whatever is queued."""
        self._machine.abort_requested(Failure(error.ConnectionAborted()))

    def pause_reading(self) -> None:
        """Stop calling ``data_received``; received data stays queued and the window closes."""
        self._core.reading = False

    def resume_reading(self) -> None:
        self._machine.reading_resumed()

    def set_trace(self, tracer: Callable[[str, str, str], None] | None) -> None:
        """Call ``tracer(state, input, next_state)`` on every transition (for logging above)."""
        transitioner = self._machine.__automat_transitioner__  # type: ignore[attr-defined]
        if tracer is None:
            transitioner.setTrace(None)
        else:
            transitioner.setTrace(lambda old, event, new: tracer(old.name, event, new.name))

    # -- inspection -----------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._core.state

    @property
    def stats(self) -> ConnectionStats:
        core = self._core
        sender = core.sender
        receiver = core.receiver
        return ConnectionStats(
            state=REFERENCE_STATE[core.state], send_seq=wire(sender.snd_nxt),
            recv_ack=wire(receiver.rcv_nxt) if receiver else 0, cong_win=core.cc.cwnd,
            ssthresh=core.cc.ssthresh, in_flight=sender.in_flight(), srtt_ms=core.rtt.srtt_ms,
            rttvar_ms=core.rtt.rttvar_ms, unacked=len(sender.segments),
            ooo_buf=receiver.ooo_count if receiver else 0,
            peer_recv_win=sender.peer_window * core.config.mss,
            recv_win=core.window() * core.config.mss, in_recovery=sender.in_recovery,
            bytes_sent=sender.bytes_sent, bytes_recv=core.bytes_recv, segs_sent=sender.segs_sent,
            segs_recv=core.segs_recv, retransmits=sender.retransmits, fast_retx=sender.fast_retx,
            sack_recv=sender.sack_recv, sack_sent=core.sack_sent, dup_acks=sender.dup_acks_total)
