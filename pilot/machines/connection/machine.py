# -*- test-case-name: tests.machines.test_connection -*-
"""
The lifecycle of a stream connection as an Automat machine: its states, its
transition table, and the behaviours, which hold the logic of each change
(``docs/connection.md`` draws the machine; ``docs/reference-wire.md``
§4.5-§4.7 has the reference's packet shapes and constants).

States say what earlier versions kept in flags: the application hears
``connection_made`` on the way into ``established`` (or straight into
``time_wait`` when the peer closes during the handshake), ``connection_lost``
on the way into ``time_wait`` or ``closed``, and ``released`` on the way into
``closed``, which no input leaves; so each is called at most once.

Every (state, input) pair is either a transition below or listed in
:data:`table` as harmless (with the reason); any other pair raises Automat's
``NoTransition``: it would be a bug here or a misuse of
:class:`~pilot.machines.connection.Connection` (``open_active`` twice).
"""

from __future__ import annotations

from typing import Any

from automat import TypeMachineBuilder
from twisted.internet import error
from twisted.python.failure import Failure

from pilot.machines.connection.sendbuffer import BLACK_HOLE_TIMEOUTS, TimerOutcome
from pilot.machines.connection.sequence import wire
from pilot.machines.connection.teardown import answer_fin, end, enter_time_wait, final_ack
from pilot.machines.connection.transfer import NAGLE_TIMER, REXMIT_TIMER, ConnectionInputs, Transfer
from pilot.machines.table import Transition, TransitionTable, indexed
from pilot.wire.packet import ACK, FIN, SYN, Packet

_builder = TypeMachineBuilder(ConnectionInputs, Transfer)
idle = _builder.state("idle")
syn_sent = _builder.state("syn_sent")
syn_received = _builder.state("syn_received")
established = _builder.state("established")
draining = _builder.state("draining")  # close requested, data still going out
fin_wait = _builder.state("fin_wait")  # our FIN is out, all our data acknowledged
time_wait = _builder.state("time_wait")
closed = _builder.state("closed")
_STATES = (idle, syn_sent, syn_received, established, draining, fin_wait, time_wait, closed)

I = ConnectionInputs  # noqa: E741


def _enter(core: Transfer, old: str, new: str, event: str) -> None:
    core.state = new
    if core.tracer is not None:
        core.tracer(old, event, new)


table = TransitionTable(_STATES, before=_enter)
_on = table.on


# -- what several transitions do ------------------------------------------------------

def _made(core: Transfer) -> None:
    core.call_app(core.connection_made)


def _acks_our_syn(core: Transfer, packet: Packet) -> bool:
    return bool(packet.flags & ACK) and packet.ack == wire(core.iss + 1)


def _fin_interval(core: Transfer) -> float:
    """
    The estimate's RTO (not the data phase's backoff) doubling per retry, and
    at most half of TIME_WAIT, so that a lost FIN+ACK is asked for again
    while the peer still lingers to answer.
    """
    return min(core.rtt.base_rto * 2 ** core.fin_attempts, core.config.max_rto,
               core.config.time_wait / 2)


# -- idle: nothing sent yet ----------------------------------------------------------------

@_on(idle, I.open_requested, syn_sent)
def _dial(inputs: ConnectionInputs, core: Transfer) -> None:
    core.emit(SYN, core.iss)
    core.handshake.sent_at = core.now()
    core.handshake_timer.start(core.config.initial_rto)


@_on(idle, I.syn_received, syn_received)
@_on(syn_sent, I.syn_received, syn_received)  # simultaneous open
def _answer_syn(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    core.passive = True
    core.new_receiver(packet.seq)
    core.sender.peer_window = packet.window
    core.emit(SYN | ACK, core.iss, ack=core.peer_iss + 1)
    core.handshake.sent_at = core.handshake.started = core.now()
    core.handshake_timer.start(core.config.initial_rto)


@_on(idle, I.write_requested, idle)
@_on(syn_sent, I.write_requested, syn_sent)
@_on(syn_received, I.write_requested, syn_received)
def _queue_early(inputs: ConnectionInputs, core: Transfer, data: bytes) -> None:
    core.sender.write(data)


@_on(idle, I.close_requested, closed)
def _close_unopened(inputs: ConnectionInputs, core: Transfer) -> None:
    end(core, error.ConnectionDone())


@_on(idle, I.abort_requested, closed)
def _abort_unopened(inputs: ConnectionInputs, core: Transfer, reason: Failure) -> None:
    end(core, reason)


# -- the handshake -------------------------------------------------------------------------

@_on(syn_sent, I.syn_ack_received, syn_sent)
@_on(syn_received, I.syn_ack_received, syn_received)  # simultaneous open
@_on(syn_received, I.segment_received, syn_received)  # lenient: the pure ACK or the first data
def _check_syn_ack(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    if _acks_our_syn(core, packet):
        inputs.handshake_acked(packet)


@_on(syn_received, I.syn_received, syn_received)
@_on(established, I.syn_received, established)
def _repeat_syn_ack(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    """The peer repeated its SYN: repeat our SYN+ACK, unchanged."""
    if core.passive and packet.seq == core.peer_iss:
        core.emit(SYN | ACK, core.iss, ack=core.peer_iss + 1)


@_on(syn_sent, I.handshake_acked, established)
@_on(syn_received, I.handshake_acked, established)
def _establish(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    """The handshake completed with ``packet`` (SYN+ACK, or the passive side's first ACK)."""
    core.handshake_timer.cancel()
    if core.handshake.sent_at is not None:
        core.rtt.sample(core.now() - core.handshake.sent_at)
    if core.receiver is None:  # active open: the SYN+ACK names the peer's ISN
        core.new_receiver(packet.seq)
    core.start_liveness()
    if packet.flags & SYN:
        core.sender.peer_window = packet.window
        # The third leg is owed: it rides on the first data segment when there is one now
        # (written early, or by the application as it hears connection_made; its writes are
        # queued behind this behaviour), else it goes alone once those have run.
        core.ack_owed = True
        _made(core)
        core.pump()
        inputs.application_told()
    else:
        _made(core)
        core.process_segment(packet)
    if core.handshake.close_when_established:
        inputs.close_requested()


@_on(established, I.application_told, established)
@_on(draining, I.application_told, draining)
@_on(fin_wait, I.application_told, fin_wait)  # closed at once: _send_fin sent the owed ACK first
def _third_ack(inputs: ConnectionInputs, core: Transfer) -> None:
    """The dialler's handshake ACK, alone, if no data went out to carry it."""
    core.delayed_ack()


@_on(syn_sent, I.handshake_timer_fired, syn_sent)
def _resend_syn(inputs: ConnectionInputs, core: Transfer) -> None:
    shake = core.handshake
    shake.attempts += 1
    if shake.attempts > core.config.syn_retries:
        inputs.retries_exhausted()
        return
    core.emit(SYN, core.iss)
    shake.sent_at = None  # Karn: no RTT sample from a repeated handshake packet
    core.handshake_timer.start(min(core.config.initial_rto * 2 ** shake.attempts,
                                   core.config.syn_max_rto))


@_on(syn_received, I.handshake_timer_fired, syn_received)
def _resend_syn_ack(inputs: ConnectionInputs, core: Transfer) -> None:
    shake = core.handshake
    shake.attempts += 1
    left = shake.started + core.config.accept_timeout - core.now()
    if left <= 0:
        inputs.retries_exhausted()
        return
    core.emit(SYN | ACK, core.iss, ack=core.peer_iss + 1)
    shake.sent_at = None  # Karn
    core.handshake_timer.start(min(core.config.initial_rto * 2 ** shake.attempts,
                                   core.config.syn_max_rto, left))


@_on(syn_sent, I.close_requested, syn_sent)
@_on(syn_received, I.close_requested, syn_received)
def _close_after_handshake(inputs: ConnectionInputs, core: Transfer) -> None:
    core.handshake.close_when_established = True


@_on(syn_sent, I.rst_received, closed)
def _refused(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    end(core, error.ConnectionRefusedError())


@_on(syn_sent, I.retries_exhausted, closed)
@_on(syn_received, I.retries_exhausted, closed)
def _handshake_timed_out(inputs: ConnectionInputs, core: Transfer) -> None:
    end(core, error.TimeoutError("no answer to the handshake"), rst=True)


@_on(syn_received, I.fin_received, time_wait)
@_on(syn_received, I.fin_ack_received, time_wait)
def _closed_during_handshake(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    _made(core)
    answer_fin(core, packet)


# -- established and draining: data both ways ------------------------------------------------

@_on(established, I.segment_received, established)
@_on(fin_wait, I.segment_received, fin_wait)
def _segment(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    core.process_segment(packet)


@_on(draining, I.segment_received, draining)
def _segment_draining(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    core.process_segment(packet, flush=True)
    if core.sender.idle:
        inputs.send_drained()


@_on(established, I.write_requested, established)
def _write(inputs: ConnectionInputs, core: Transfer, data: bytes) -> None:
    core.sender.write(data)
    core.pump()


@_on(established, I.close_requested, draining)
def _close(inputs: ConnectionInputs, core: Transfer) -> None:
    core.pump(flush=True)
    if core.sender.idle:
        inputs.send_drained()


@_on(draining, I.send_drained, fin_wait)
def _send_fin(inputs: ConnectionInputs, core: Transfer) -> None:
    NAGLE_TIMER.cancel_in(core)
    REXMIT_TIMER.cancel_in(core)
    # an ACK still owed goes first: the FIN carries none (the reference's FIN has no ACK
    # flag), and a peer told of our close before our ACK would think its data was lost
    core.delayed_ack()
    core.fin_seq = core.sender.snd_nxt
    core.emit(FIN, core.fin_seq)
    core.fin_timer.start(_fin_interval(core))


@_on(established, I.retransmit_timer_fired, established)
@_on(draining, I.retransmit_timer_fired, draining)
def _retransmit(inputs: ConnectionInputs, core: Transfer) -> None:
    outcome = core.sender.on_timeout(core.now())
    if outcome is TimerOutcome.GIVE_UP:
        inputs.retries_exhausted()
    elif outcome is not TimerOutcome.NOTHING:
        if outcome is TimerOutcome.RETRANSMIT and core.sender.timeouts == BLACK_HOLE_TIMEOUTS:
            core.path_trouble()  # maybe our datagrams stopped fitting the path (RFC 8899 §4.3)
        core.pump(flush=True)
        core.rexmit_timer.start(core.sender.timer_interval())


@_on(established, I.ack_timer_fired, established)
@_on(draining, I.ack_timer_fired, draining)
@_on(fin_wait, I.ack_timer_fired, fin_wait)
def _delayed_ack(inputs: ConnectionInputs, core: Transfer) -> None:
    core.delayed_ack()


@_on(established, I.nagle_timer_fired, established)
@_on(draining, I.nagle_timer_fired, draining)
def _flush(inputs: ConnectionInputs, core: Transfer) -> None:
    core.pump(flush=True)


@_on(established, I.pacing_timer_fired, established)
def _paced(inputs: ConnectionInputs, core: Transfer) -> None:
    core.pump()


@_on(draining, I.pacing_timer_fired, draining)
def _paced_draining(inputs: ConnectionInputs, core: Transfer) -> None:
    core.pump(flush=True)


@_on(established, I.reading_resumed, established)
@_on(draining, I.reading_resumed, draining)
@_on(fin_wait, I.reading_resumed, fin_wait)
def _resume(inputs: ConnectionInputs, core: Transfer) -> None:
    core.reading = True
    core.deliver()
    if core.receiver is not None and core.receiver.window() > core.last_window:
        core.send_ack()  # window update


@_on(established, I.keepalive_due, established)
@_on(draining, I.keepalive_due, draining)
@_on(fin_wait, I.keepalive_due, fin_wait)
def _keepalive(inputs: ConnectionInputs, core: Transfer) -> None:
    """
    Probe an idle peer with one byte it already has (the TCP keepalive
    shape): both the reference and we answer that with an ACK, whereas the
    reference never answers a pure ACK.
    """
    if not core.sender.outstanding:
        core.emit(ACK, core.sender.snd_nxt - 1, b"\x00")


@_on(established, I.syn_ack_received, established)
def _duplicate_syn_ack(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    if not core.passive and packet.seq == core.peer_iss and _acks_our_syn(core, packet):
        core.emit(ACK, core.sender.snd_nxt)


@_on(established, I.fin_received, time_wait)
@_on(established, I.fin_ack_received, time_wait)
@_on(draining, I.fin_received, time_wait)
@_on(draining, I.fin_ack_received, time_wait)
@_on(fin_wait, I.fin_received, time_wait)  # both sides closed at once
def _peer_closed(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    answer_fin(core, packet)


# -- fin_wait: our FIN is out, all our data acknowledged ----------------------------------------

@_on(fin_wait, I.fin_ack_received, time_wait)
def _fin_answered(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    """Our FIN is answered: no ACK back (see :func:`~pilot.machines.connection.teardown.final_ack`), linger in TIME_WAIT."""
    core.deliver(force=True)
    enter_time_wait(core)


@_on(fin_wait, I.fin_timer_fired, fin_wait)
def _resend_fin(inputs: ConnectionInputs, core: Transfer) -> None:
    assert core.fin_seq is not None
    core.fin_attempts += 1
    if core.fin_attempts > core.config.max_retransmits:
        inputs.retries_exhausted()
        return
    core.emit(FIN, core.fin_seq)
    core.fin_timer.start(_fin_interval(core))


@_on(fin_wait, I.retries_exhausted, closed)
def _fin_unanswered(inputs: ConnectionInputs, core: Transfer) -> None:
    end(core, error.ConnectionDone("FIN never answered; all data was acknowledged"))


# -- failures from any open state ---------------------------------------------------------------

@_on(syn_received, I.rst_received, closed)
@_on(established, I.rst_received, closed)
@_on(draining, I.rst_received, closed)
def _reset_by_peer(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    end(core, error.ConnectionLost("connection reset by peer"))


@_on(fin_wait, I.rst_received, closed)
def _reset_after_fin(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    # Everything we sent was acknowledged; the peer has most likely forgotten
    # the connection already (its TIME_WAIT ended before our FIN got through).
    end(core, error.ConnectionDone("reset after our FIN; all data was acknowledged"))


@_on(syn_sent, I.abort_requested, closed)
@_on(syn_received, I.abort_requested, closed)
@_on(established, I.abort_requested, closed)
@_on(draining, I.abort_requested, closed)
@_on(fin_wait, I.abort_requested, closed)
def _abort(inputs: ConnectionInputs, core: Transfer, reason: Failure) -> None:
    end(core, reason, rst=True)


@_on(established, I.retries_exhausted, closed)
@_on(draining, I.retries_exhausted, closed)
def _give_up(inputs: ConnectionInputs, core: Transfer) -> None:
    end(core, error.TimeoutError("retransmissions exhausted"), rst=True)


@_on(established, I.idle_timed_out, closed)
@_on(draining, I.idle_timed_out, closed)
@_on(fin_wait, I.idle_timed_out, closed)
def _idle(inputs: ConnectionInputs, core: Transfer) -> None:
    end(core, error.TimeoutError("idle timeout"), rst=True)


# -- time_wait: loss already reported; answer stray FINs, never start a ping-pong -----------------

@_on(time_wait, I.fin_received, time_wait)
def _fin_again(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    core.emit(FIN | ACK, core.sender.snd_nxt, ack=packet.seq + 1)  # our FIN+ACK was lost


@_on(time_wait, I.fin_ack_received, time_wait)
def _fin_ack_again(inputs: ConnectionInputs, core: Transfer, packet: Packet) -> None:
    final_ack(core, packet)


@_on(time_wait, I.time_wait_elapsed, closed)
@_on(time_wait, I.rst_received, closed)
@_on(time_wait, I.syn_received, closed)  # the peer reuses the ports: make room for a new connection
@_on(time_wait, I.abort_requested, closed)
def _forget(inputs: ConnectionInputs, core: Transfer, *args: Any) -> None:
    end(core)


# -- harmless inputs, each with its reason; every other pair raises NoTransition ------------------

table.ignore(_STATES, I.syn_received, I.syn_ack_received, I.segment_received, I.fin_received,
             I.fin_ack_received, I.rst_received,
             why="a packet that makes no sense in this state is dropped (docs/connection.md)")
table.ignore((draining, fin_wait, time_wait, closed), I.write_requested,
             why="writes after close() are dropped")
table.ignore((draining, fin_wait, time_wait, closed), I.close_requested,
             why="closing again changes nothing")
table.ignore((closed,), I.abort_requested, why="the connection is over already")
table.ignore((idle, syn_sent, syn_received, time_wait, closed), I.reading_resumed,
             why="nothing is held back: no data before the handshake, all of it handed over in TIME_WAIT")
table.ignore((closed,), I.send_drained, I.retries_exhausted, I.close_requested,
             why="queued behind an abort that a failing application callback asked for")
table.ignore((closed,), I.time_wait_elapsed,
             why="TIME_WAIT handed to the stack; an abort from connection_lost got there first")
table.ignore((closed,), I.application_told,
             why="the application aborted as it heard connection_made: the RST went instead")
table.ignore((fin_wait,), I.retransmit_timer_fired, I.nagle_timer_fired, I.pacing_timer_fired,
             why="everything was acknowledged before our FIN; a late timer has nothing to send")

_machine = indexed(_builder.build())


def transitions() -> list[Transition]:
    """Every transition that does something: (state, input, next state, behaviour), for docs and tests."""
    return table.transitions()
