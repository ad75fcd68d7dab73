# -*- test-case-name: tests.machines.test_connection -*-
"""
How a stream connection ends, shared by the transitions of
:mod:`~pilot.machines.connection.machine` that end it: reaching ``closed``,
answering the peer's FIN, entering TIME_WAIT (``docs/connection.md``,
``docs/stack.md`` "TIME_WAIT").
"""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from pilot.machines.connection.sequence import unwrap
from pilot.machines.connection.transfer import Transfer
from pilot.wire.packet import ACK, FIN, RST, Packet


def end(core: Transfer, reason: BaseException | Failure | None = None, rst: bool = False) -> None:
    """Reach ``closed``: optionally reset the peer, report (unless TIME_WAIT did), and release."""
    core.cancel_timers()
    if rst:
        core.emit(RST, core.sender.snd_nxt)
    try:
        if reason is not None:
            core.connection_lost(reason if isinstance(reason, Failure) else Failure(reason))
    finally:
        core.released()


def enter_time_wait(core: Transfer, reason: BaseException | Failure = connectionDone) -> None:
    """
    Linger, or hand TIME_WAIT to the stack (``core.linger``): it keeps what
    answering stray packets needs, and the connection is released at once
    (``docs/stack.md``, "TIME_WAIT").
    """
    core.cancel_timers()
    linger = core.linger
    if linger is None:
        core.time_wait_timer.start(core.config.time_wait)
    else:
        linger(core.sender.snd_nxt, core.window(), core.fin_seq is None and core.final_acks == 0)
    core.connection_lost(reason if isinstance(reason, Failure) else Failure(reason))
    if linger is not None:
        core.machine.time_wait_elapsed()  # queued behind this transition: closed, released


def answer_fin(core: Transfer, packet: Packet) -> None:
    """The peer closed: hand over what we have, answer FIN+ACK, linger in TIME_WAIT."""
    receiver = core.receiver
    assert receiver is not None
    core.deliver(force=True)
    missing = unwrap(packet.seq, receiver.rcv_nxt) - receiver.rcv_nxt
    unsent = core.sender.unsent + core.sender.in_flight()
    core.emit(FIN | ACK, core.sender.snd_nxt, ack=packet.seq + 1)
    if missing > 0:
        enter_time_wait(core, error.ConnectionLost(f"peer closed with {missing} bytes not received"))
    elif unsent > 0:
        enter_time_wait(core, error.ConnectionLost(f"peer closed before {unsent} bytes were delivered"))
    else:
        enter_time_wait(core)  # Twisted's shared clean-close Failure: none made per connection


def final_ack(core: Transfer, packet: Packet) -> None:
    """
    At most one pure ACK for a FIN+ACK, ever (it never starts a FIN+ACK
    ping-pong), and only for the reference's echo of the FIN+ACK we answered
    its FIN with.  A FIN+ACK answering our own FIN gets none: the peer is in
    TIME_WAIT from the moment it sent it (ours and the reference's alike) and
    nothing there waits for an ACK, so it would be one datagram per
    connection for nothing.
    """
    if core.final_acks == 0 and core.fin_seq is None:
        core.final_acks += 1
        core.emit(ACK, core.sender.snd_nxt, ack=packet.seq + 1)
