# -*- test-case-name: tests.machines.test_connection -*-
"""
The packet handling of a stream connection: :class:`_Core` holds the
collaborators, the data-transfer helpers (:mod:`~pilot.machines.sendbuffer`,
:mod:`~pilot.machines.recvbuffer`, :mod:`~pilot.machines.rtt`) and its
timers, and implements the outputs the lifecycle machine in
:mod:`~pilot.machines.connection_machine` calls.  It feeds that machine
through :class:`ConnectionInputs`, declared here so that this module imports
nothing above it.

Sequence numbers are absolute Python ints inside; :func:`wire` gives the
32-bit header field and :func:`unwrap` recovers the absolute number nearest
to what we expect (signed 32-bit difference).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import attr
from twisted.internet import error
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from pilot.address import Address
from pilot.machines.connection_config import ConnectionConfig
from pilot.machines.recvbuffer import Receipt, RecvBuffer
from pilot.machines.rtt import RttEstimator
from pilot.machines.sendbuffer import CongestionControl, Sender, TimerOutcome
from pilot.wire.packet import ACK, FIN, RST, STREAM, SYN, Packet, encode_sack, parse_sack

SEQ_MASK = 0xFFFFFFFF

def wire(n: int) -> int:
    """An absolute sequence number as the 32-bit header field."""
    return n & SEQ_MASK


def unwrap(value: int, near: int) -> int:
    """The absolute number with low 32 bits ``value`` nearest ``near`` (signed 32-bit difference)."""
    diff = (value - near) & SEQ_MASK
    if diff >= 1 << 31:
        diff -= 1 << 32
    return near + diff


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
