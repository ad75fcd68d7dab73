# -*- test-case-name: tests.protocols.test_apps -*-
"""
The Twisted protocols of the node's built-in services (``docs/apps.md``):
data exchange on port 1001 and the event broker on port 1002.  Each decodes
with its codec (``pilot.wire.dataexchange``, ``pilot.wire.events``), hands
the values to its core (``pilot.apps.exchange.Receiver``,
``pilot.apps.broker.Broker``) and writes what the core answers.  The trust
gate is the stack's, as for every port: only trusted peers reach them.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.apps.broker import Broker, SubscriberQueue
from pilot.apps.exchange import Budget, Receiver
from pilot.apps.storage import Storage
from pilot.errors import MalformedFrame
from pilot.wire.dataexchange import TEXT, FrameReader, encode_frame
from pilot.wire.events import Event, EventDecoder

#: Bytes of incomplete events all connections on port 1002 may buffer together.
EVENT_BUDGET = 64 * 1024 * 1024


def _peer(transport: Any) -> tuple[str, int]:
    """The peer's address as text and its node id (a transport without one: ``"unknown"``, 0)."""
    try:
        peer = transport.getPeer()
        return str(peer.address), int(peer.address.node)
    except Exception:
        return "unknown", 0


class DataExchangeProtocol(Protocol):
    """Port 1001: frames in, each answered with the reference's ACK or ERR text frame."""

    log = Logger()

    def __init__(self, factory: DataExchangeFactory) -> None:
        self.factory = factory
        self.reader = FrameReader()
        self.receiver: Receiver | None = None

    def connectionMade(self) -> None:
        sender, _ = _peer(self.transport)
        f = self.factory
        self.receiver = Receiver(f.storage, sender, f.clock, f.budget, f.counters)
        # replies the peer does not read stop our reading, as the echo service does
        self.transport.registerProducer(self.transport, True)  # type: ignore[union-attr]
        f.counters["connections"] += 1

    def dataReceived(self, data: bytes) -> None:
        assert self.receiver is not None
        if self.reader.broken is not None:
            return  # closing: what still arrives is dropped
        try:
            events = self.reader.feed(data)
        except MalformedFrame as e:
            self.factory.counters["frames.malformed"] += 1
            self.log.info("data exchange from {peer}: {reason}; closing", peer=self.receiver.sender, reason=str(e))
            self.receiver.lost()
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        for reply in self.receiver.events(events):
            self.transport.write(encode_frame(TEXT, reply.encode("utf-8")))  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.receiver is not None:
            self.receiver.lost()


class DataExchangeFactory(Factory):
    """Shared by every connection on port 1001: the storage, the memory budget, the counters."""

    noisy = False

    def __init__(self, storage: Storage, clock: Callable[[], float], budget: Budget | None = None) -> None:
        self.storage = storage
        self.clock = clock
        self.budget = budget or Budget()
        self.counters: collections.Counter[str] = collections.Counter()

    def startFactory(self) -> None:
        removed = self.storage.clean_incoming()
        if removed:
            self.counters["incoming.removed"] += removed

    def buildProtocol(self, addr: IAddress | None) -> DataExchangeProtocol:
        return DataExchangeProtocol(self)


class EventStreamProtocol(Protocol):
    """Port 1002: the first event subscribes, every later one publishes."""

    log = Logger()

    def __init__(self, broker: Broker, budget: Budget) -> None:
        self.broker = broker
        self.budget = budget
        self.held = 0
        self.decoder = EventDecoder()
        self.queue: SubscriberQueue | None = None
        self.subscribed = False
        self.peer = "unknown"

    def connectionMade(self) -> None:
        self.peer, node = _peer(self.transport)
        t: Any = self.transport
        # a subscriber dropped for not reading is aborted: its unread bytes would never drain
        self.queue = SubscriberQueue(node, t.write, t.abortConnection)
        t.registerProducer(self.queue, True)

    def dataReceived(self, data: bytes) -> None:
        assert self.queue is not None
        if self.decoder.broken is not None or self.queue.closed:
            return  # closing: what still arrives is dropped
        try:
            items = self.decoder.feed(data)
        except MalformedFrame as e:
            self.broker.counters["malformed"] += 1
            self.log.info("event stream from {peer}: {reason}; closing", peer=self.peer, reason=str(e))
            self._end()
            return
        if not self._hold(self.decoder.buffered):
            self.broker.counters["dropped.buffer"] += 1
            self.log.info("event stream from {peer}: partial events of all peers over {limit} bytes; closing",
                          peer=self.peer, limit=self.budget.limit)
            self._end()
            return
        for item in items:
            if isinstance(item, MalformedFrame):
                self.broker.counters["malformed"] += 1
            elif not self.subscribed:
                self.subscribed = True
                if not self.broker.subscribe(self.queue, item.topic):
                    self.log.info("event stream from {peer}: subscription refused (limit)", peer=self.peer)
                    self._end()
                    return
            else:
                self._publish(item)

    def _publish(self, event: Event) -> None:
        self.broker.publish(self.queue, event.topic, event.payload)

    def _hold(self, buffered: int) -> bool:
        """Account this connection's partial event in the budget shared by all; False when it does not fit."""
        self.budget.give(self.held)
        self.held = 0
        if not self.budget.take(buffered):
            return False
        self.held = buffered
        return True

    def _end(self) -> None:
        assert self.queue is not None
        self.budget.give(self.held)
        self.held = 0
        self.broker.unsubscribe(self.queue)
        self.queue.close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.budget.give(self.held)
        self.held = 0
        if self.queue is not None:
            self.broker.unsubscribe(self.queue)
            self.queue.stopProducing()


class EventStreamFactory(Factory):
    """Shared by every connection on port 1002: the broker, and the budget of partial events."""

    noisy = False

    def __init__(self, broker: Broker | None = None, budget: Budget | None = None) -> None:
        self.broker = broker or Broker()
        #: Bytes of incomplete events all connections together may buffer.
        self.budget = budget or Budget(EVENT_BUDGET)

    def buildProtocol(self, addr: IAddress | None) -> EventStreamProtocol:
        return EventStreamProtocol(self.broker, self.budget)
