# -*- test-case-name: tests.test_stack -*-
"""
:class:`Stack`: the node's transport layer, between the tunnel layer
(authenticated packets per peer) and the node service.  ``docs/stack.md``
has the ports, limits and the trust gate.

It demultiplexes stream packets to one
:class:`~pilot.machines.connection.Connection` per (peer address, peer port,
local port) (the table is :class:`~pilot.stack.streams.StreamTable`; TIME_WAIT
is :class:`~pilot.stack.timewait.TimeWaits`), answers SYNs on listening ports
(and RSTs the rest), delivers datagrams to bound ports, answers the control
ping, runs the echo service on port 7, and offers Twisted's shapes: ``connect`` fires with
a :class:`~pilot.stack.transport.StreamTransport`, ``listen`` takes an
``IProtocolFactory``.  It never touches a socket: packets leave through the
injected ``send_packet`` and arrive through :meth:`Stack.packet_received`;
time comes from the injected clock.

A stream packet goes up once: here to its connection, which hands data to
its :class:`~pilot.stack.transport.StreamTransport`, which hands it to the
protocol; the connection and the transport report to their
:class:`~pilot.stack.streams.Stream`, never back here.

The trust gate (``docs/reference-wire.md`` §9 item 23, which the reference lacks): a packet from a
node for which ``is_trusted(node)`` is false reaches only port 444 (the trust handshake).  Anything
else it sends is refused (RST for a stream, dropped otherwise), counted as ``refused.untrusted``.
Connections we open to an untrusted node work: the peer decides whether to accept them.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IProtocol, IProtocolFactory, IReactorTime
from twisted.logger import Logger

from pilot.address import Address
from pilot.errors import (
    AlreadyExists, ConnectionFailed, InvalidArgument, NotFound, NotRunning, PilotError,
)
from pilot.machines.connection import SEQ_MASK, ConnectionConfig
from pilot.ratelimit import KeyedLimiter
from pilot.stack import ports as limits
from pilot.stack.ports import MAX_DATAGRAM, EphemeralPorts, Listening, check_port
from pilot.stack.services import Ping, echo_factory, ping_refusal
from pilot.stack.streams import Key, Stream, StreamTable
from pilot.stack.timewait import TimeWaits
from pilot.stack.transport import SEND_BUFFER_HIGH, SEND_BUFFER_LOW, PilotAddress, StreamTransport
from pilot.wire.packet import (
    ACK, CONTROL, DATAGRAM, ECHO, FIN, HANDSHAKE, PING, RST, STREAM, SYN, Packet,
)


#: ``conn_list`` fields of the reference's ``info`` (docs/reference-wire.md §7), in its order.
CONN_LIST_FIELDS = (
    "id", "local_port", "remote_addr", "remote_port", "state", "cong_win", "ssthresh", "in_flight",
    "srtt_ms", "rttvar_ms", "unacked", "ooo_buf", "peer_recv_win", "recv_win", "in_recovery",
    "bytes_sent", "bytes_recv", "segs_sent", "segs_recv", "retransmits", "fast_retx", "sack_recv",
    "sack_sent", "dup_acks",
)

DatagramReceiver = Callable[[Address, int, bytes], None]


class Stack:
    """See the module docstring; the public methods are the API."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        local_address: Callable[[], Address],
        send_packet: Callable[[Packet], None],
        is_trusted: Callable[[int], bool],
        log: Logger | None = None,
        *,
        config: ConnectionConfig | None = None,
        echo: bool = True,
        send_buffer_high: int = SEND_BUFFER_HIGH,
        send_buffer_low: int = SEND_BUFFER_LOW,
        segment_size: int | None = None,
    ) -> None:
        self.clock = clock
        self.local_address = local_address
        self._send_packet = send_packet
        self._is_trusted = is_trusted
        if log is not None:
            self.log = log
        #: Every connection's constants (defaults: the reference's).
        self.config = config or ConnectionConfig()
        self.send_buffer_high = send_buffer_high
        self.send_buffer_low = send_buffer_low
        #: What happened to packets, by name (``docs/stack.md`` lists them).
        self.counters: collections.Counter[str] = collections.Counter()
        self.ephemeral = EphemeralPorts(self._port_taken)
        self.stopped = False
        #: TIME_WAIT, outside the connection table and its limits (docs/stack.md).
        self.time_waits = TimeWaits(clock, self._send, local_address, self.counters, self.config.time_wait)
        #: The connection table.
        self.streams = StreamTable(clock=clock, send=self._send, config=self.config,
                                   high_water=send_buffer_high, low_water=send_buffer_low,
                                   cancel=self._cancel, log=log, time_waits=self.time_waits)
        if segment_size is not None:
            self.streams.default_segment_size = min(segment_size, self.config.mss)
        self._listeners: dict[int, tuple[Listening, IProtocolFactory]] = {}
        self._datagram_ports: dict[int, tuple[Listening, DatagramReceiver]] = {}
        self._calls: set[IDelayedCall] = set()
        # untrusted nodes: the reference's limits; trusted ones: a burst as large as a port's limit
        self._syn_global = KeyedLimiter(limits.SYN_RATE, limits.SYN_RATE)
        self._syn_per_node = KeyedLimiter(limits.SYN_RATE_PER_NODE, limits.SYN_RATE_PER_NODE,
                                          max_keys=10_000)
        self._syn_trusted = KeyedLimiter(limits.SYN_RATE_TRUSTED, limits.SYN_BURST_TRUSTED,
                                         max_keys=10_000)
        if echo:
            self.listen(ECHO, echo_factory())

    # -- inbound packets ----------------------------------------------------------------

    def packet_received(self, packet: Packet, from_node: int | None = None) -> None:
        """
        An authenticated packet from the tunnel layer (``packet.src.node`` is the peer, which the
        tunnel checked against its sender ``from_node``).  Never raises.
        """
        self.counters["packets.received"] += 1
        try:
            # a stream packet for us: what _receive() decides first, without the call
            if (type(packet) is Packet and packet.protocol == STREAM and not self.stopped
                    and packet.dst.node == (own := self.local_address().node)):
                stream = self.streams.get(key := (packet.src, packet.src_port, packet.dst_port))
                if stream is None:  # _stream_packet() without its call, for every data packet
                    self._no_stream(packet, key, own)
                elif (stream.listening is None or packet.dst_port == HANDSHAKE
                      or self._trusted(packet.src.node, own)):
                    stream.connection.packet_received(packet)
                else:
                    self._untrusted_now(stream, packet)
            else:
                self._receive(packet)
        except Exception:
            self.counters["errors"] += 1
            self.log.failure("error handling {packet!r}", packet=packet)

    def _receive(self, packet: Packet) -> None:
        if self.stopped:
            self._drop("dropped.stopped", packet)
        elif not isinstance(packet, Packet):
            self._drop("dropped.malformed", packet)
        elif packet.dst.node != self.local_address().node:
            self._drop("dropped.not_for_us", packet)
        elif packet.protocol == STREAM:
            self._stream_packet(packet, packet.dst.node)
        elif packet.protocol == DATAGRAM:
            self._datagram_packet(packet)
        elif packet.protocol == CONTROL:
            self._control_packet(packet)
        else:
            self._drop("dropped.protocol", packet)

    def _drop(self, counter: str, packet: object) -> None:
        self.counters[counter] += 1
        self.log.debug("{counter}: {packet!r}", counter=counter, packet=packet)

    def _trusted(self, node: int, own: int | None = None) -> bool:
        if node == (self.local_address().node if own is None else own):
            return True
        try:
            return bool(self._is_trusted(node))
        except Exception:
            self.log.failure("is_trusted({node}) raised; treating the node as untrusted", node=node)
            return False

    def _allowed(self, packet: Packet, own: int | None = None) -> bool:
        """The trust gate: port 444 is open to every node, every other port only to trusted ones."""
        return packet.dst_port == HANDSHAKE or self._trusted(packet.src.node, own)

    def _stream_packet(self, packet: Packet, own: int) -> None:
        """A stream packet for ``own``, our node id (read once per packet)."""
        stream = self.streams.get(key := (packet.src, packet.src_port, packet.dst_port))
        if stream is None:
            self._no_stream(packet, key, own)
        elif (stream.listening is None or packet.dst_port == HANDSHAKE  # outbound, or inbound and
              or self._trusted(packet.src.node, own)):                 # allowed (_allowed())
            stream.connection.packet_received(packet)
        else:
            self._untrusted_now(stream, packet)

    def _untrusted_now(self, stream: Stream, packet: Packet) -> None:
        self.counters["refused.untrusted"] += 1
        self.log.info("resetting {target}: node {node} is not trusted any more",
                      target=stream.target, node=packet.src.node)
        stream.connection.abort()

    def _no_stream(self, packet: Packet, key: Key, own: int) -> None:  # TIME_WAIT's, a reset, or a SYN
        if self.time_waits.packet_received(packet, key, lambda: self._allowed(packet, own)):
            pass  # TIME_WAIT took it (a SYN ends the entry and goes on below as a new SYN)
        elif packet.flags & RST:
            self._drop("dropped.no_connection", packet)
        elif packet.flags & (SYN | ACK) != SYN:
            self._refuse("reset.no_connection", packet)
        else:
            self._syn(packet, key)

    def _syn(self, packet: Packet, key: Key) -> None:
        """A new SYN: its class's rate limit, the trust gate, the port's limits, half-open room (docs/stack.md)."""
        node = packet.src.node
        now = self.clock.seconds()
        untrusted = not self._trusted(node)
        if untrusted:
            allowed = self._syn_per_node.allow(node, now) and self._syn_global.allow(None, now)
        else:
            allowed = self._syn_trusted.allow(node, now)
        if not allowed:
            self._drop("dropped.syn_rate", packet)
            return
        if untrusted and packet.dst_port != HANDSHAKE:
            self._refuse("refused.untrusted", packet)  # before the port lookup: nothing leaks
            return
        port = packet.dst_port
        bound = self._listeners.get(port)
        if bound is None:
            self._refuse("refused.unbound", packet)
            return
        table = self.streams
        if (table.port_use[port] >= limits.MAX_PER_PORT or len(table) >= limits.MAX_CONNECTIONS
                or (untrusted and table.untrusted_by_node[node] >= limits.UNTRUSTED_PER_NODE)):
            self._refuse("refused.limit", packet)
            return
        shed = table.make_room(untrusted)
        if shed:
            self.counters["reset.half_open"] += shed
        stream = table.add(key, self.local_address(), listening=bound[0], factory=bound[1],
                           untrusted=untrusted)
        stream.connection.packet_received(packet)

    def _refuse(self, counter: str, packet: Packet) -> None:
        """Answer a stream packet with an RST (flags 0x8 only, the reference's shape)."""
        self._drop(counter, packet)
        seq = packet.ack if packet.flags & ACK else 0
        ack = packet.seq + len(packet.payload) + (1 if packet.flags & (SYN | FIN) else 0)
        self._send(Packet(protocol=STREAM, flags=RST, src=self.local_address(), dst=packet.src,
                          src_port=packet.dst_port, dst_port=packet.src_port, seq=seq,
                          ack=ack & SEQ_MASK))

    def _datagram_packet(self, packet: Packet) -> None:
        if not self._allowed(packet):
            self._drop("refused.untrusted", packet)
            return
        bound = self._datagram_ports.get(packet.dst_port)
        if bound is None:
            self._drop("dropped.datagram_unbound", packet)
            return
        self.counters["datagrams.received"] += 1
        with self.log.failuresHandled("datagram receiver for port {port} raised", port=packet.dst_port):
            bound[1](packet.src, packet.src_port, packet.payload)

    def _control_packet(self, packet: Packet) -> None:
        """Port 0: answer a ping (docs/reference-wire.md §4.6).  Answers (ACK set) are never answered."""
        if packet.dst_port != PING or packet.flags & ACK:
            self._drop("dropped.control", packet)
            return
        if not self._allowed(packet):
            self._drop("refused.untrusted", packet)
            return
        self.counters["ping.answered"] += 1
        self._send(Packet(protocol=CONTROL, flags=ACK, src=self.local_address(), dst=packet.src,
                          src_port=PING, dst_port=packet.src_port, seq=packet.seq,
                          ack=(packet.seq + 1) & SEQ_MASK, payload=packet.payload))

    # -- outbound packets and timers -------------------------------------------------------

    def _send(self, packet: Packet) -> None:
        self.counters["packets.sent"] += 1
        if packet.dst.node == self.local_address().node:
            self._call_later(0, self.packet_received, packet)  # loopback, never through the tunnel
            return
        try:
            self._send_packet(packet)
        except Exception:
            self.counters["errors.send"] += 1
            self.log.failure("the tunnel layer raised sending {packet!r}", packet=packet)

    def _call_later(self, delay: float, f: Callable[..., None], *args: Any) -> IDelayedCall:
        def run() -> None:
            self._calls.discard(call)
            f(*args)

        call = self.clock.callLater(delay, run)
        self._calls.add(call)
        return call

    def _cancel(self, call: IDelayedCall | None) -> None:
        if call is not None:
            self._calls.discard(call)
            if call.active():
                call.cancel()

    # -- the connection table ------------------------------------------------------------------

    def _port_taken(self, port: int) -> bool:
        return (port in self._listeners or port in self._datagram_ports or self.streams.port_use[port] > 0
                or self.time_waits.ports[port] > 0)

    # -- streams -------------------------------------------------------------------------------

    def connect(self, address: Address, port: int, protocol: IProtocol,
                timeout: float | None = None) -> Deferred[StreamTransport]:
        """
        Open a stream to ``address:port`` driving ``protocol``.  Fires with the
        transport once established (after ``protocol.makeConnection``); fails
        with ``ConnectionFailed`` (refused, reset, stopping) or ``Timeout`` (no
        answer within ``timeout`` seconds, or the handshake's own give-up after
        39 s), and then ``protocol`` is never called.  Cancelling the Deferred
        abandons the dial.
        """
        try:
            self._check_running()
            _check_address(address)
            check_port(port)
            if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
                raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout!r}")
            if len(self.streams) >= limits.MAX_CONNECTIONS:
                raise ConnectionFailed(f"this node already has {limits.MAX_CONNECTIONS} connections",
                                       hint="close some connections and retry")
            local_port = self.ephemeral.allocate()
        except PilotError as e:
            return fail(e)

        def cancel(d: Deferred[StreamTransport]) -> None:
            stream.dialled = None  # the Deferred then fails with CancelledError
            stream.connection.abort()

        d: Deferred[StreamTransport] = Deferred(cancel)
        stream = self.streams.add((address, port, local_port), self.local_address(), protocol=protocol)
        stream.dialled = d
        stream.timeout = timeout
        if timeout is not None:
            stream.timeout_call = self._call_later(timeout, self._dial_timed_out, stream)
        stream.connection.open_active()
        return d

    def _dial_timed_out(self, stream: Stream) -> None:
        stream.timeout_call = None
        if stream.pending:
            stream.timed_out = True
            stream.connection.abort()

    def listen(self, port: int, factory: IProtocolFactory) -> Listening:
        """Accept streams on ``port``: each gets ``factory.buildProtocol(PilotAddress of the peer)``."""
        self._check_running()
        check_port(port)
        if port in self._listeners:
            raise AlreadyExists(f"stream port {port} is already bound",
                                hint="close the other listener or choose another port")
        listening = Listening(port, "stream", self._unlisten, PilotAddress(self.local_address(), port))
        factory.doStart()
        self._listeners[port] = (listening, factory)
        return listening

    def _unlisten(self, listening: Listening) -> None:
        bound = self._listeners.get(listening.port)
        if bound is not None and bound[0] is listening:
            del self._listeners[listening.port]
            bound[1].doStop()

    def ping(self, address: Address, seq: int = 1, timeout: float = 10.0) -> Deferred[float]:
        """
        The reference pilotctl's ping: a stream to port 7, ``ping-<seq>``
        written, the echo read, closed.  Fires with the round trip in
        milliseconds (from the dial to the whole echo, as the reference
        times it); ``Timeout`` if the
        whole exchange, dial included, takes more than ``timeout`` seconds.
        """
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            return fail(InvalidArgument(f"seq must be a non-negative integer, not {seq!r}"))
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            return fail(InvalidArgument(f"timeout must be a positive number of seconds, not {timeout!r}"))
        done: Deferred[float] = Deferred()
        ping = Ping(self.clock, seq, done)
        ping.connecting = self.connect(address, ECHO, ping)
        ping.connecting.addErrback(lambda f: None if done.called else done.errback(ping_refusal(address, f)))
        if not done.called:
            ping.expiry = self._call_later(timeout, ping.expire, address, timeout)
            done.addBoth(ping.finished, self._cancel)
        return done

    # -- datagrams ------------------------------------------------------------------------------

    def send_datagram(self, address: Address, port: int, data: bytes | bytearray | memoryview,
                      src_port: int | None = None) -> int:
        """
        Send one datagram (``docs/reference-wire.md`` §4.8); returns the source
        port (a fresh ephemeral one unless given).
        """
        self._check_running()
        _check_address(address)
        check_port(port)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"datagram data must be bytes, not {type(data).__name__}")
        if len(data) > MAX_DATAGRAM:
            raise InvalidArgument(f"datagram of {len(data)} bytes exceeds the {MAX_DATAGRAM}-byte limit",
                                  hint="split the data or send it over a stream")
        if address.is_broadcast:
            raise InvalidArgument("broadcast datagrams are not supported", hint="send to each node")
        src_port = self.ephemeral.allocate() if src_port is None else check_port(src_port, "src_port")
        self.counters["datagrams.sent"] += 1
        self._send(Packet(protocol=DATAGRAM, src=self.local_address(), dst=address, src_port=src_port,
                          dst_port=port, payload=bytes(data)))
        return src_port

    def bind_datagrams(self, port: int, received: DatagramReceiver) -> Listening:
        """Deliver datagrams for ``port`` as ``received(from_address, src_port, data)``."""
        self._check_running()
        check_port(port)
        if port in self._datagram_ports:
            raise AlreadyExists(f"datagram port {port} is already bound",
                                hint="close the other binding or choose another port")
        listening = Listening(port, "datagram", self._unbind, PilotAddress(self.local_address(), port))
        self._datagram_ports[port] = (listening, received)
        return listening

    def _unbind(self, listening: Listening) -> None:
        bound = self._datagram_ports.get(listening.port)
        if bound is not None and bound[0] is listening:
            del self._datagram_ports[listening.port]

    # -- inspection and control -------------------------------------------------------------------

    def set_segment_size(self, node: int, mss: int) -> None:
        """The segment size that fits the path to ``node`` now (the tunnel layer's path MTU)."""
        self.streams.set_segment_size(node, mss)

    def watch_paths(self, path_trouble: Callable[[int], None]) -> None:
        """Call ``path_trouble(node)`` when a stream to ``node`` times out repeatedly (a black hole?)."""
        self.streams.path_trouble = path_trouble

    def connections(self) -> list[dict[str, Any]]:
        """One dict per connection, oldest first, with the reference's ``conn_list`` fields."""
        rows = []
        for stream in self.streams:
            remote, remote_port, local_port = stream.key
            values = stream.connection.stats.as_dict()
            values.update(id=stream.id, local_port=local_port, remote_addr=str(remote),
                          remote_port=remote_port)
            rows.append({name: values[name] for name in CONN_LIST_FIELDS})
        return rows

    def ports(self) -> list[int]:
        """Bound stream ports, sorted."""
        return sorted(self._listeners)

    def datagram_ports(self) -> list[int]:
        """Bound datagram ports, sorted."""
        return sorted(self._datagram_ports)

    def disconnect(self, conn_id: int) -> None:
        """Reset connection ``conn_id`` (an ``id`` from :meth:`connections`)."""
        stream = self.streams.by_id(conn_id)
        if stream is None:
            raise NotFound(f"no connection with id {conn_id}", hint="`pilotctl connections` lists them")
        stream.connection.abort()

    def abort_peer(self, node: int, spare_port: int | None = None) -> int:
        """
        Reset every connection with ``node`` (for when trust in it ends);
        returns how many.  A connection to or from ``spare_port`` on either
        side is left to finish (the handshake port: the revoke that tells the
        peer trust ended is on its way there).
        """
        streams = [s for s in self.streams.with_node(node)
                   if spare_port is None or spare_port not in (s.key[1], s.key[2])]
        for stream in streams:
            stream.connection.abort()
        return len(streams)

    def stop(self) -> None:
        """Reset every connection, unbind every port, cancel every timer.  Idempotent."""
        if self.stopped:
            return
        self.stopped = self.streams.stopped = True
        for stream in list(self.streams):
            stream.connection.abort()
        for listening, _ in list(self._listeners.values()):
            listening.close()
        for listening, _ in list(self._datagram_ports.values()):
            listening.close()
        for call in list(self._calls):
            self._cancel(call)
        self.time_waits.clear()

    def _check_running(self) -> None:
        if self.stopped:
            raise NotRunning("the node's stack is stopped", hint="start the node again")


def _check_address(address: object) -> None:
    if not isinstance(address, Address):
        raise InvalidArgument(f"expected an Address, not {type(address).__name__}",
                              hint="parse text with pilot.address.Address.parse")
