# -*- test-case-name: tests.apps.test_broker -*-
"""
The event broker (port 1002), the reference's semantics
(``docs/reference-wire.md`` §8.2): a connection's first event subscribes it
to that event's topic; every later event is a publish, forwarded unchanged to
the subscribers of exactly that topic and, unless the topic is ``*``, to the
subscribers of ``*``, never back to the publisher.  Nothing is acknowledged.

Bounds the reference lacks (``docs/apps.md``):

* every subscriber has a :class:`SubscriberQueue`: while its connection
  cannot take more, events wait there up to ``max_bytes``; one more and the
  subscriber is dropped (closed) and counted ``dropped.slow``;
* subscriptions are bounded in all (:data:`MAX_SUBSCRIBERS`) and per node
  (:data:`MAX_PER_NODE`), so the topic table (only topics someone subscribed
  to are in it) is bounded too; a publish to a topic no one subscribed to
  keeps nothing.

Pure: the subscriber's connection is reached through ``write`` and ``close``.
"""

from __future__ import annotations

import collections
from typing import Callable

from pilot.wire.events import WILDCARD, encode_event

MAX_SUBSCRIBERS = 1024
MAX_PER_NODE = 64
#: Bytes of events one subscriber may have waiting before it is dropped.
QUEUE_BYTES = 4 * 1024 * 1024


class SubscriberQueue:
    """
    A subscriber's bounded queue, and the push producer of its connection:
    the transport calls :meth:`pauseProducing` when its buffer is full and
    :meth:`resumeProducing` when it drained.
    """

    def __init__(self, node: int, write: Callable[[bytes], None], close: Callable[[], None],
                 max_bytes: int = QUEUE_BYTES) -> None:
        self.node = node
        self._write = write
        self._close = close
        self.max_bytes = max_bytes
        self.paused = False
        self.closed = False
        self.queued: collections.deque[bytes] = collections.deque()
        self.queued_bytes = 0
        self.topic: str | None = None

    def offer(self, data: bytes) -> bool:
        """Write or queue ``data``; False (and nothing kept) when the queue would overflow."""
        if self.closed:
            return False
        if not self.paused and not self.queued:
            self._write(data)
            return True
        if self.queued_bytes + len(data) > self.max_bytes:
            return False
        self.queued.append(data)
        self.queued_bytes += len(data)
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queued.clear()
            self.queued_bytes = 0
            self._close()

    # IPushProducer
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while self.queued and not self.paused and not self.closed:
            data = self.queued.popleft()
            self.queued_bytes -= len(data)
            self._write(data)

    def stopProducing(self) -> None:
        self.closed = True
        self.queued.clear()
        self.queued_bytes = 0


class Broker:
    """Topics to subscribers; see the module docstring."""

    def __init__(self, max_subscribers: int = MAX_SUBSCRIBERS, max_per_node: int = MAX_PER_NODE) -> None:
        self.max_subscribers = max_subscribers
        self.max_per_node = max_per_node
        self.topics: dict[str, set[SubscriberQueue]] = {}
        self.per_node: collections.Counter[int] = collections.Counter()
        self.counters: collections.Counter[str] = collections.Counter()

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self.topics.values())

    def subscribe(self, sub: SubscriberQueue, topic: str) -> bool:
        """Add ``sub`` to ``topic``; False (counted) when a bound is reached."""
        if self.subscribers >= self.max_subscribers:
            self.counters["refused.subscribers"] += 1
            return False
        if self.per_node[sub.node] >= self.max_per_node:
            self.counters["refused.per_node"] += 1
            return False
        sub.topic = topic
        self.topics.setdefault(topic, set()).add(sub)
        self.per_node[sub.node] += 1
        self.counters["subscribed"] += 1
        return True

    def unsubscribe(self, sub: SubscriberQueue) -> None:
        topic, sub.topic = sub.topic, None
        if topic is None:
            return
        subs = self.topics.get(topic)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        if not subs:
            del self.topics[topic]
        self.per_node[sub.node] -= 1
        if self.per_node[sub.node] <= 0:
            del self.per_node[sub.node]

    def publish(self, sender: SubscriberQueue | None, topic: str, payload: bytes) -> int:
        """Forward one event; the number of subscribers it reached."""
        self.counters["published"] += 1
        targets = set(self.topics.get(topic, ()))
        if topic != WILDCARD:
            targets |= self.topics.get(WILDCARD, set())
        if sender is not None:
            targets.discard(sender)
        if not targets:
            self.counters["published.unheard"] += 1
            return 0
        frame = encode_event(topic, payload)
        reached = 0
        for sub in targets:
            if sub.offer(frame):
                reached += 1
            else:
                self.counters["dropped.slow"] += 1
                self.unsubscribe(sub)
                sub.close()
        self.counters["delivered"] += reached
        return reached
