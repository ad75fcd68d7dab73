# -*- test-case-name: tests.machines.test_connection -*-
"""
The lifecycle of a stream connection as an Automat machine: the states, the
transition table and the behaviour functions, each of which calls outputs on
the :class:`~pilot.machines.connection_core._Core`.  Every (state, input)
pair not listed is ignored.  :func:`transitions` lists the table for docs
and tests (``docs/connection.md`` draws it).
"""

from __future__ import annotations

from typing import Any, Callable

from automat import TypeMachineBuilder
from twisted.internet import error
from twisted.python.failure import Failure

from pilot.machines.table import transition_table
from pilot.machines.connection_core import ConnectionInputs, _Core
from pilot.wire.packet import ACK, FIN, Packet


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


def _enter(core: _Core, old: str, new: str, event: str) -> None:
    core.state = new


_on = transition_table(_defined, before=_enter)


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
