# -*- test-case-name: tests.machines.test_connection -*-
"""
:class:`Connection`: one reliable, ordered, flow-controlled stream connection
over the v0.5 packet header (``docs/reference-wire.md`` §4.5-§4.7;
``docs/connection.md`` has the diagram), and its :class:`ConnectionStats`.

The stack creates one per (peer address, local port, remote port).  It is
sans-I/O: packets go out through the injected ``send``, bytes to the
application through ``data_received``, time comes from the injected
``IReactorTime``.  Its public methods are the inputs:
:meth:`~Connection.open_active`, :meth:`~Connection.packet_received`,
:meth:`~Connection.write`, :meth:`~Connection.close`,
:meth:`~Connection.abort`, :meth:`~Connection.pause_reading` and
:meth:`~Connection.resume_reading`.  A passive open is just the first SYN
fed to :meth:`~Connection.packet_received` of a fresh connection.

The lifecycle is the Automat machine of
:mod:`~pilot.machines.connection.machine`, whose behaviours hold the logic;
the data path they share is :mod:`~pilot.machines.connection.transfer`, the
constants :mod:`~pilot.machines.connection.config`, and the data transfer is
plain arithmetic in :mod:`~pilot.machines.connection.sendbuffer`,
:mod:`~pilot.machines.connection.recvbuffer` and
:mod:`~pilot.machines.connection.rtt`, on the absolute sequence numbers of
:mod:`~pilot.machines.connection.sequence`.

Callbacks: ``connection_made()`` once when established;
``data_received(bytes)`` in order; ``connection_lost(Failure)`` exactly once
(also when the connection never got established: dial timeout, refused,
aborted); ``released()`` exactly once when the connection reaches
``closed`` and the stack may forget it (after TIME_WAIT, at once after a
reset); ``linger(seq, window, ack_owed)``, if given, on the way into
TIME_WAIT: the caller keeps TIME_WAIT (answers stray FINs, drops old
duplicates) and the connection is released at once; ``packet_handled()``
after every packet the connection took (an acknowledgement may have made
room in the send buffer).  An exception from
``connection_made`` or ``data_received`` aborts the connection with that
failure.
"""

from __future__ import annotations

from typing import Any, Callable

import attr
from twisted.internet import error
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from pilot.address import Address
from pilot.machines.connection.config import ConnectionConfig
from pilot.machines.connection.machine import _machine
from pilot.machines.connection.rtt import RttEstimator
from pilot.machines.connection.congestion import (
    BbrCongestion, CongestionControl, RenoCongestion,
)
from pilot.machines.connection.sequence import wire
from pilot.machines.connection.transfer import ConnectionInputs, Tracer, Transfer
from pilot.wire.packet import ACK, FIN, RST, STREAM, SYN, Packet

#: Our state names -> the reference's ``conn_list`` spelling.
REFERENCE_STATE = {
    "idle": "CLOSED", "syn_sent": "SYN_SENT", "syn_received": "SYN_RECV",
    "established": "ESTABLISHED", "draining": "ESTABLISHED", "fin_wait": "FIN_WAIT",
    "time_wait": "TIME_WAIT", "closed": "CLOSED",
}


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


def _ignore(*args: object) -> None:
    pass


def new_congestion(config: ConnectionConfig) -> CongestionControl:
    """The controller ``config.congestion`` names, with the configured windows."""
    if config.congestion == "reno":
        return RenoCongestion(config.mss, config.initial_window, config.max_window,
                              ssthresh=config.initial_ssthresh)
    return BbrCongestion(config.mss, config.initial_window, config.max_window)


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
        packet_handled: Callable[[], None] = _ignore,
        config: ConnectionConfig | None = None,
        congestion: CongestionControl | None = None,
        initial_sequence: int = 0,
        segment_size: int | None = None,
        path_trouble: Callable[[], None] = _ignore,
        linger: Callable[[int, int, bool], None] | None = None,
    ) -> None:
        config = config or ConnectionConfig()
        cc = congestion or new_congestion(config)
        self._core = Transfer(clock, send, local, local_port, remote, remote_port, config,
                              wire(initial_sequence), data_received, connection_made,
                              connection_lost, released, cc, path_trouble=path_trouble,
                              segment_size=segment_size, linger=linger)
        self._packet_handled = packet_handled
        self._machine: ConnectionInputs = _machine(self._core)
        self._core.machine = self._machine

    # -- inputs ---------------------------------------------------------------------

    def open_active(self) -> None:
        """Dial: send the SYN.  Only once, on a fresh connection (``NoTransition`` otherwise)."""
        self._machine.open_requested()

    def packet_received(self, packet: Packet) -> None:
        """A packet the stack routed here; anything not for us is dropped."""
        core = self._core
        # the codec interns addresses: ``is`` spares Address.__eq__ (two Python calls) per packet
        if (not isinstance(packet, Packet) or packet.protocol != STREAM
                or (packet.src is not core.remote and packet.src != core.remote)
                or packet.dst.node != core.local.node
                or packet.src_port != core.remote_port or packet.dst_port != core.local_port):
            return
        core.last_received = core.clock.seconds()
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
        self._packet_handled()

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

    def set_segment_size(self, mss: int) -> None:
        """Cut new segments (and retransmissions that no longer fit) to ``mss`` bytes, at most ``config.mss``."""
        self._core.sender.mss = max(1, min(mss, self._core.config.mss))

    @property
    def segment_size(self) -> int:
        return self._core.sender.mss

    def set_trace(self, tracer: Tracer | None) -> None:
        """Call ``tracer(state, input, next_state)`` on every change of state."""
        self._core.tracer = tracer

    # -- inspection -----------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._core.state

    @property
    def lingering(self) -> bool:
        """
        In TIME_WAIT: closed both ways and lost already reported, waiting out
        stray packets.  A new SYN for the same ports ends it at once (and the
        stack then opens a new connection for that SYN).
        """
        return self._core.state == "time_wait"

    @property
    def bytes_acknowledged(self) -> int:
        """
        ``stats.bytes_sent - stats.in_flight`` (what the peer acknowledged of
        the new bytes sent) without building the snapshot: the transport reads
        it on every write and every packet while a producer is registered.
        """
        sender = self._core.sender
        return sender.bytes_sent - (sender.snd_nxt - sender.snd_una)

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

    @property
    def rtt(self) -> RttEstimator:
        """The RTT estimate and RTO (for tests and diagnostics)."""
        return self._core.rtt
