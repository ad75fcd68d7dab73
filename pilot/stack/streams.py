# -*- test-case-name: tests.test_stack -*-
"""
The stack's connection table: :class:`StreamTable` holds one :class:`Stream`
per (peer address, peer port, local port), with the counts the limits need
(``docs/stack.md``), and builds each entry's
:class:`~pilot.machines.connection.Connection` and
:class:`~pilot.stack.transport.StreamTransport`.

A stream's transport reports to its :class:`Stream` (never back to the
demultiplexer): established (which protocol to connect: the dialler's, or one
the listening factory builds), connected (fire the dialler's Deferred), lost,
and released (forget the entry).
"""

from __future__ import annotations

import collections
import itertools
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import attr
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProtocol, IProtocolFactory, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.address import Address
from pilot.errors import ConnectionFailed, PilotError, Timeout
import pilot.machines.connection as connections  # its Connection loads with the first stream
from pilot.machines.connection import ConnectionConfig
from pilot.stack import ports as limits
from pilot.stack.ports import Listening
from pilot.stack.timewait import TimeWaits
from pilot.stack.transport import PilotAddress, StreamTransport
from pilot.wire.packet import Packet

if TYPE_CHECKING:
    from pilot.machines.connection import Connection

Key = tuple[Address, int, int]  # (peer address, peer port, local port)


class ConnectionRefused(ConnectionFailed):
    """The peer answered our SYN with an RST: nothing listens there, or it does not trust us."""


@attr.s(auto_attribs=True, eq=False)
class Stream:
    """One entry of the connection table, and what its transport tells the stack."""

    table: "StreamTable"
    id: int
    key: Key
    #: Inbound: the listening port that accepted it.  Outbound: None.
    listening: Optional[Listening]
    factory: Optional[IProtocolFactory] = None
    #: Outbound: the dialler's protocol, Deferred and timeout.
    protocol: Optional[IProtocol] = None
    dialled: Optional[Deferred[StreamTransport]] = None
    timeout: Optional[float] = None
    timeout_call: Optional[IDelayedCall] = None
    timed_out: bool = False
    #: Inbound from a node we do not trust (so on port 444).
    untrusted: bool = False
    #: Not yet established: counts towards the accept queue while inbound.
    pending: bool = True
    connection: Connection = attr.ib(default=None)
    transport: StreamTransport = attr.ib(default=None)

    @property
    def inbound(self) -> bool:
        return self.listening is not None

    @property
    def node(self) -> int:
        return self.key[0].node

    @property
    def target(self) -> str:
        return f"{self.key[0]}:{self.key[1]}"

    # -- what the transport reports ------------------------------------------------------

    def made(self, transport: StreamTransport) -> IProtocol | None:
        """Established: the protocol to connect (None refuses the connection)."""
        self.settle()
        if self.listening is None:
            return self.protocol
        if self.listening.closed:
            return None  # the port was unbound during the handshake
        assert self.factory is not None
        peer = transport.getPeer()
        # not failuresHandled (its context manager costs ~3 us), and the Logger read only when
        # it logs (reading it from the class makes a new one): this runs for every connection accepted
        try:
            protocol = self.factory.buildProtocol(peer)
        except Exception:
            self.table.log.failure("{factory!r}.buildProtocol({peer}) raised", factory=self.factory, peer=peer)
            return None
        if protocol is None:
            self.table.log.info("{factory!r} declined the connection from {peer}", factory=self.factory,
                                peer=peer)
        return protocol

    def connected(self, transport: StreamTransport) -> None:
        """After ``makeConnection``: fire the dialler's Deferred."""
        d, self.dialled = self.dialled, None
        if d is not None:
            d.callback(transport)

    def lost(self, transport: StreamTransport, reason: Failure) -> None:
        self.settle()
        d, self.dialled = self.dialled, None
        if d is not None:
            d.errback(self.dial_error(reason))

    def path_trouble(self) -> None:
        """Its retransmissions timed out repeatedly: tell the table's watcher (a method, not a closure each)."""
        self.table.path_trouble(self.node)

    def released(self) -> None:
        self.settle()
        self.table.forget(self)

    def lingered(self, seq: int, window: int, ack_owed: bool) -> None:
        """TIME_WAIT: the table keeps it in its compact form; the connection is released next."""
        if self.table.time_waits is not None:
            self.table.time_waits.add(self.key, seq, window, self.inbound, ack_owed)

    # -- the handshake is over --------------------------------------------------------------

    def settle(self) -> None:
        """The handshake is over, one way or the other."""
        if self.pending:
            self.pending = False
            if self.inbound:
                self.table.handshake_over(self)
        self.table.cancel(self.timeout_call)
        self.timeout_call = None

    def dial_error(self, reason: Failure) -> PilotError:
        target = self.target
        if self.timed_out:
            return Timeout(f"connecting to {target} timed out after {self.timeout:g} s",
                           hint="the peer did not answer; check that it is running (`pilotctl ping`) "
                                "or raise --timeout")
        if self.table.stopped:
            return ConnectionFailed(f"connection to {target} abandoned: the node is stopping",
                                    hint="start the node again and retry")
        if reason.check(error.ConnectionRefusedError):
            return ConnectionRefused(f"connection to {target} refused",
                                    hint=f"nothing listens on port {self.key[1]} there, or the peer "
                                         "does not trust this node (`pilotctl handshake PEER`)")
        if reason.check(error.TimeoutError):
            return Timeout(f"no answer from {target}: the handshake was retried for 39 s",
                           hint="check that the peer is running and reachable (`pilotctl peers`)")
        return ConnectionFailed(f"connection to {target} failed: {reason.getErrorMessage()}")


class StreamTable:
    """Every stream of one stack, by key and by id, and the counts its limits read."""

    log = Logger()

    def __init__(
        self,
        *,
        clock: IReactorTime,
        send: Callable[[Packet], None],
        config: ConnectionConfig,
        high_water: int,
        low_water: int,
        cancel: Callable[[Optional[IDelayedCall]], None],
        log: Logger | None = None,
        time_waits: TimeWaits | None = None,
    ) -> None:
        self.clock = clock
        #: TIME_WAIT entries (None: each connection lingers itself, and counts in the limits).
        self.time_waits = time_waits
        self._send = send
        self.config = config
        self.high_water = high_water
        self.low_water = low_water
        #: Cancels a call the stack scheduled (a dial timeout).
        self.cancel = cancel
        if log is not None:
            self.log = log
        #: Set when the stack stops: a dial that fails then says so.
        self.stopped = False
        self._by_key: dict[Key, Stream] = {}
        #: ``get(key)``: the stream for (remote address, remote port, local port), or None; the
        #: dict's own method (never rebound), not a method around it: looked up for every packet
        self.get: Callable[[Key], Stream | None] = self._by_key.get
        self._by_id: dict[int, Stream] = {}
        self._ids = itertools.count(1)
        #: Streams per local port, streams held by each untrusted node.
        self.port_use: collections.Counter[int] = collections.Counter()
        self.untrusted_by_node: collections.Counter[int] = collections.Counter()
        #: Inbound handshakes in progress (half-open), from untrusted nodes (True) and
        #: trusted ones (False): by node, each node's oldest first.
        self.half_open: dict[bool, dict[int, dict[int, Stream]]] = {True: {}, False: {}}
        self.half_open_count = {True: 0, False: 0}
        #: The segment size that fits each peer's path (``docs/tunnel.md``), and for peers not listed.
        self.segment_sizes: dict[int, int] = {}
        self.default_segment_size: int = config.mss
        #: ``path_trouble(node)``: a stream to ``node`` timed out repeatedly.
        self.path_trouble: Callable[[int], None] = lambda node: None

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Stream]:
        """Every stream, oldest first."""
        return iter(sorted(self._by_id.values(), key=lambda s: s.id))

    def by_id(self, conn_id: int) -> Stream | None:
        return self._by_id.get(conn_id)

    def with_node(self, node: int) -> list[Stream]:
        return [s for s in self._by_key.values() if s.node == node]

    def add(self, key: Key, local: Address, *, listening: Listening | None = None,
            factory: IProtocolFactory | None = None, protocol: IProtocol | None = None,
            untrusted: bool = False) -> Stream:
        """A new stream: its transport, its connection (not opened yet), and its place in the counts."""
        remote, remote_port, local_port = key
        stream = Stream(self, next(self._ids), key, listening, factory=factory, protocol=protocol,
                        untrusted=untrusted)
        transport = StreamTransport(
            clock=self.clock, host=PilotAddress(local, local_port), peer=PilotAddress(remote, remote_port),
            on_made=stream.made, on_connected=stream.connected, on_lost=stream.lost,
            high_water=self.high_water, low_water=self.low_water)
        stream.transport = transport
        stream.connection = connections.Connection(
            clock=self.clock, send=self._send, local=local, local_port=local_port, remote=remote,
            remote_port=remote_port, data_received=transport.data_received,
            connection_made=transport.connection_made, connection_lost=transport.connection_lost,
            released=stream.released, packet_handled=transport.check_send_buffer, config=self.config,
            segment_size=self.segment_sizes.get(remote.node, self.default_segment_size),
            path_trouble=stream.path_trouble,
            linger=None if self.time_waits is None else stream.lingered)
        transport.attach(stream.connection)
        self._by_key[key] = stream
        self._by_id[stream.id] = stream
        self.port_use[local_port] += 1
        if stream.inbound:
            self.half_open[untrusted].setdefault(stream.node, {})[stream.id] = stream
            self.half_open_count[untrusted] += 1
        if untrusted:
            self.untrusted_by_node[stream.node] += 1
        return stream

    def set_segment_size(self, node: int, mss: int) -> None:
        """From now on, cut segments to ``node`` to ``mss`` bytes (open streams too)."""
        self.segment_sizes[node] = mss
        for stream in self.with_node(node):
            if stream.connection is not None:
                stream.connection.set_segment_size(mss)

    def handshake_over(self, stream: Stream) -> None:
        """An inbound stream is established or gone: it no longer counts as half-open."""
        by_node = self.half_open[stream.untrusted]
        held = by_node.get(stream.node)
        if held is not None and held.pop(stream.id, None) is not None:
            self.half_open_count[stream.untrusted] -= 1
            if not held:
                del by_node[stream.node]

    def make_room(self, untrusted: bool) -> int:
        """
        Before a new inbound stream: past a half-open cap (``ACCEPT_QUEUE`` for
        untrusted nodes, ``HALF_OPEN`` for all), reset the oldest handshake of
        the node holding the most.  Returns how many were reset.
        """
        shed = 0
        for only_untrusted, full in ((True, untrusted and self.half_open_count[True] >= limits.ACCEPT_QUEUE),
                                     (False, sum(self.half_open_count.values()) >= limits.HALF_OPEN)):
            victim = self.heaviest_half_open(only_untrusted) if full else None
            if victim is not None:
                self.log.debug("half-open connections full: resetting {target}", target=victim.target)
                victim.connection.abort()
                shed += 1
        return shed

    def heaviest_half_open(self, untrusted_only: bool) -> Stream | None:
        """
        The oldest half-open stream of the node holding the most (ties: the
        node whose oldest is older), among untrusted nodes or among all.
        """
        best: Stream | None = None
        most = 0
        for untrusted in ((True,) if untrusted_only else (True, False)):
            for held in self.half_open[untrusted].values():
                oldest = next(iter(held.values()))
                if len(held) > most or (len(held) == most and best is not None and oldest.id < best.id):
                    best, most = oldest, len(held)
        return best

    def forget(self, stream: Stream) -> None:
        if self._by_key.get(stream.key) is stream:
            del self._by_key[stream.key]
            _decrement(self.port_use, stream.key[2])
            if stream.untrusted:
                _decrement(self.untrusted_by_node, stream.node)
        self._by_id.pop(stream.id, None)


def _decrement(counter: collections.Counter[Any], key: Any) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
