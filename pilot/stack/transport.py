# -*- test-case-name: tests.test_stack -*-
"""
The Twisted face of one stream connection: :class:`StreamTransport` adapts a
:class:`~pilot.machines.connection.Connection` to ``ITransport`` (plus the
consumer and push-producer halves), and :class:`PilotAddress` is what
``getPeer()`` and ``getHost()`` return.  ``docs/stack.md`` has the rules.

The stack's table (:mod:`~pilot.stack.streams`) builds a transport, passes
its ``connection_made``, ``data_received``, ``connection_lost`` and
``check_send_buffer`` methods to the ``Connection`` it creates, then
:meth:`~StreamTransport.attach`\\ es the connection.  When the connection is
established the transport asks ``on_made`` for the protocol (the dialler's,
or one built by a listening factory), calls ``makeConnection``, then
``on_connected``; ``on_lost`` tells the stack's entry when it is over.

Back-pressure: ``Connection`` keeps whatever is written (its queue has no
limit) until the peer acknowledges it.  The transport counts what it wrote and
reads ``Connection.bytes_acknowledged`` (``stats.bytes_sent``, the new bytes put
on the wire, minus ``stats.in_flight``, those not yet acknowledged), so
*buffered* = written - sent + in flight.  A registered producer is paused above ``high_water`` and resumed
at or below ``low_water``.  The buffer only shrinks when an acknowledgement
arrives, so the connection calls :meth:`StreamTransport.check_send_buffer`
(its ``packet_handled``) after every packet it takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

import attr
from twisted.internet.interfaces import (
    IAddress, IConsumer, IDelayedCall, IProducer, IProtocol, IPushProducer, IReactorTime, ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pilot.address import Address

if TYPE_CHECKING:
    from pilot.machines.connection import Connection  # loaded with the first stream (pilot.stack.streams)

#: Pause a registered producer above this many buffered bytes (unsent + unacknowledged).
SEND_BUFFER_HIGH = 2 * 1024 * 1024
#: ... and resume it at or below this many.
SEND_BUFFER_LOW = 1024 * 1024
#: At most this many ``resumeProducing`` calls to a pull producer per buffer check.
PULL_BURST = 64


@implementer(IAddress)
@attr.s(frozen=True, slots=True, auto_attribs=True, order=True)
class PilotAddress:
    """One end of a Pilot stream: a virtual address and a port."""

    address: Address
    port: int

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


@implementer(ITransport, IConsumer, IPushProducer)
class StreamTransport:
    """
    ``ITransport`` over one :class:`Connection`.

    * ``write``/``writeSequence`` queue bytes; after ``loseConnection`` (or
      once lost) writes are dropped, as the connection ignores them.
    * ``loseConnection`` is graceful: the FIN goes out once everything written
      is acknowledged.  ``abortConnection`` resets (RST) at once.
    * ``pauseProducing``/``resumeProducing`` stop and restart
      ``dataReceived`` (the advertised window closes meanwhile);
      ``stopProducing`` is ``loseConnection``.
    * ``registerProducer`` applies back-pressure from the send buffer (see the
      module docstring); a streaming producer is paused and resumed, a pull
      producer is asked for more whenever the buffer is at or below low water.
    * The protocol sees ``makeConnection`` once, then ``dataReceived``, then
      ``connectionLost`` exactly once.
    """

    log = Logger()

    def __init__(
        self,
        *,
        clock: IReactorTime,
        host: PilotAddress,
        peer: PilotAddress,
        on_made: Callable[["StreamTransport"], IProtocol | None],
        on_lost: Callable[["StreamTransport", Failure], None],
        on_connected: Callable[["StreamTransport"], None] = lambda transport: None,
        high_water: int = SEND_BUFFER_HIGH,
        low_water: int = SEND_BUFFER_LOW,
    ) -> None:
        if not 0 <= low_water <= high_water:
            raise ValueError(f"need 0 <= low_water <= high_water, got {low_water}, {high_water}")
        self._clock = clock
        self._host = host
        self._peer = peer
        self._on_made = on_made
        self._on_lost = on_lost
        self._on_connected = on_connected
        self.high_water = high_water
        self.low_water = low_water
        self.connection: Connection | None = None
        self.protocol: IProtocol | None = None
        #: True from ``makeConnection`` until ``connectionLost``.
        self.connected = False
        #: True once ``loseConnection`` (or ``abortConnection``) was called.
        self.disconnecting = False
        self.disconnected = False
        self._written = 0
        self._producer: IProducer | None = None
        self._streaming = False
        self._producer_paused = False
        self._pulling = False
        self._pull_call: IDelayedCall | None = None

    def attach(self, connection: Connection) -> None:
        self.connection = connection

    # -- ITransport ---------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"write() takes bytes, not {type(data).__name__}")
        if not data or not self.connected or self.disconnecting or self.connection is None:
            return
        self._written += len(data)
        self.connection.write(data)
        if self._producer is not None and self._streaming:
            self._pause_if_full()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnected or self.disconnecting or self.connection is None:
            return
        self.disconnecting = True
        self.connection.close()

    def abortConnection(self) -> None:
        if self.disconnected or self.connection is None:
            return
        self.disconnecting = True
        self.connection.abort()

    def getPeer(self) -> PilotAddress:
        return self._peer

    def getHost(self) -> PilotAddress:
        return self._host

    # -- IPushProducer: the data we receive ----------------------------------------

    def pauseProducing(self) -> None:
        if self.connection is not None and not self.disconnected:
            self.connection.pause_reading()

    def resumeProducing(self) -> None:
        if self.connection is not None and not self.disconnected:
            self.connection.resume_reading()

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- IConsumer: back-pressure on what we send ------------------------------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"cannot register producer {producer!r}: {self._producer!r} is registered")
        if self.disconnected or self.disconnecting:
            producer.stopProducing()
            return
        self._producer = producer
        self._streaming = bool(streaming)
        self._producer_paused = False
        if self._streaming:
            self._pause_if_full()
        else:
            self._pull_call = self._clock.callLater(0, self._first_pull)

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producer_paused = False
        self._cancel_pull()

    @property
    def buffered(self) -> int:
        """Bytes written and not yet acknowledged by the peer (unsent or in flight)."""
        if self.connection is None:
            return 0
        return self._written - self.connection.bytes_acknowledged

    def check_send_buffer(self) -> None:
        """Resume the producer if the buffer has drained; the connection calls this after each packet."""
        producer = self._producer
        if producer is None or self.disconnected:
            return
        if self._streaming:
            if self._producer_paused and self.buffered <= self.low_water:
                self._producer_paused = False
                self._call_producer("resumeProducing")
        else:
            self._pull()

    def _pause_if_full(self) -> None:
        if not self._producer_paused and self.buffered > self.high_water:
            self._producer_paused = True
            self._call_producer("pauseProducing")

    def _first_pull(self) -> None:
        self._pull_call = None
        self._pull()

    def _pull(self) -> None:
        if self._pulling:
            return
        self._pulling = True
        try:
            for _ in range(PULL_BURST):
                if self._producer is None or self._streaming or self.disconnected:
                    break
                if self.buffered > self.low_water:
                    break
                before = self._written
                self._call_producer("resumeProducing")
                if self._written == before:
                    break  # it has nothing right now; asked again after the next ACK
        finally:
            self._pulling = False

    def _call_producer(self, method: str) -> None:
        producer = self._producer
        if producer is None:
            return
        with self.log.failuresHandled("producer {producer!r} raised in {method}",
                                      producer=producer, method=method) as op:
            getattr(producer, method)()
        if op.failure is not None:
            self.abortConnection()

    def _cancel_pull(self) -> None:
        if self._pull_call is not None:
            if self._pull_call.active():
                self._pull_call.cancel()
            self._pull_call = None

    # -- what the Connection calls ---------------------------------------------------

    def connection_made(self) -> None:
        protocol = self._on_made(self)
        if protocol is None:
            self.abortConnection()  # the factory declined, as buildProtocol may
            return
        self.protocol = protocol
        self.connected = True
        protocol.makeConnection(self)
        self._on_connected(self)

    def data_received(self, data: bytes) -> None:
        if self.protocol is not None and self.connected:
            self.protocol.dataReceived(data)

    def connection_lost(self, reason: Failure) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        was_connected, self.connected = self.connected, False
        self.disconnecting = True
        self._cancel_pull()
        producer, self._producer = self._producer, None
        # try/except, not failuresHandled: its context manager costs ~3 us, twice per connection
        if producer is not None:
            try:
                producer.stopProducing()
            except Exception:
                self.log.failure("producer {producer!r} raised in stopProducing", producer=producer)
        protocol = self.protocol
        if was_connected and protocol is not None:
            try:
                protocol.connectionLost(reason)
            except Exception:
                self.log.failure("{protocol!r} raised in connectionLost", protocol=protocol)
        self._on_lost(self, reason)

    def __repr__(self) -> str:
        return f"<StreamTransport {self._host} -> {self._peer}>"
