"""
Tests for L{pilot.apps.broker}: the reference's forwarding rules, the
bounded subscriber queue, the bounded subscription table.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pilot.apps.broker import Broker, SubscriberQueue
from pilot.wire.events import Event, EventDecoder, encode_event


class Sink:
    def __init__(self, node: int = 1, max_bytes: int = 1000) -> None:
        self.written: list[bytes] = []
        self.closed = 0
        self.queue = SubscriberQueue(node, self.written.append, self.close, max_bytes)

    def close(self) -> None:
        self.closed += 1

    def events(self) -> list[Event]:
        out = EventDecoder().feed(b"".join(self.written))
        return [e for e in out if isinstance(e, Event)]


class BrokerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = Broker()

    def sub(self, topic: str, node: int = 1) -> Sink:
        sink = Sink(node)
        self.assertTrue(self.broker.subscribe(sink.queue, topic))
        return sink

    def test_exact_topic_and_wildcard(self) -> None:
        """A publish reaches its topic's subscribers and those of `*`; no prefix matching."""
        a, b, star, other = self.sub("news"), self.sub("news"), self.sub("*"), self.sub("new")
        self.assertEqual(self.broker.publish(None, "news", b"hi"), 3)
        for sink in (a, b, star):
            self.assertEqual(sink.events(), [Event("news", b"hi")])
        self.assertEqual(other.events(), [])

    def test_forwarded_unchanged(self) -> None:
        a = self.sub("t")
        self.broker.publish(None, "t", b"\x00payload")
        self.assertEqual(a.written, [encode_event("t", b"\x00payload")])

    def test_star_publish_not_doubled(self) -> None:
        """A publish to `*` reaches `*` subscribers once."""
        star = self.sub("*")
        self.broker.publish(None, "*", b"x")
        self.assertEqual(star.events(), [Event("*", b"x")])

    def test_not_back_to_sender(self) -> None:
        a, b = self.sub("t"), self.sub("t")
        self.assertEqual(self.broker.publish(a.queue, "t", b"m"), 1)
        self.assertEqual(a.written, [])
        self.assertEqual(len(b.written), 1)

    def test_unheard(self) -> None:
        """10,000 topics nobody subscribed to keep nothing."""
        for i in range(10_000):
            self.broker.publish(None, f"topic-{i}", b"")
        self.assertEqual(self.broker.topics, {})
        self.assertEqual(self.broker.counters["published.unheard"], 10_000)

    def test_per_node_limit(self) -> None:
        broker = Broker(max_per_node=3)
        sinks = [Sink(7) for _ in range(4)]
        self.assertEqual([broker.subscribe(s.queue, f"t{i}") for i, s in enumerate(sinks)],
                         [True, True, True, False])
        self.assertTrue(broker.subscribe(Sink(8).queue, "t"))
        self.assertEqual(broker.counters["refused.per_node"], 1)
        broker.unsubscribe(sinks[0].queue)
        self.assertTrue(broker.subscribe(sinks[3].queue, "t3"))

    def test_total_limit(self) -> None:
        broker = Broker(max_subscribers=2)
        self.assertTrue(broker.subscribe(Sink(1).queue, "a"))
        self.assertTrue(broker.subscribe(Sink(2).queue, "b"))
        self.assertFalse(broker.subscribe(Sink(3).queue, "c"))
        self.assertEqual(len(broker.topics), 2)

    def test_unsubscribe_forgets_topic(self) -> None:
        a = self.sub("t")
        self.broker.unsubscribe(a.queue)
        self.broker.unsubscribe(a.queue)
        self.assertEqual((self.broker.topics, dict(self.broker.per_node)), ({}, {}))

    def test_slow_subscriber_dropped(self) -> None:
        """Paused, its queue fills to its bound; one more event drops it, counted; the others go on."""
        slow, fast = self.sub("t"), self.sub("t")
        slow.queue.pauseProducing()
        frame_len = len(encode_event("t", b"x" * 100))
        sent = 0
        while slow.queue.queued_bytes + frame_len <= 1000:
            self.broker.publish(None, "t", b"x" * 100)
            sent += 1
        self.assertEqual(slow.closed, 0)
        self.broker.publish(None, "t", b"x" * 100)
        self.assertEqual(slow.closed, 1)
        self.assertEqual(self.broker.counters["dropped.slow"], 1)
        self.assertEqual(slow.queue.queued_bytes, 0)
        self.assertEqual(len(fast.written), sent + 1)
        self.assertEqual(self.broker.publish(None, "t", b"y"), 1)

    def test_resume_flushes_in_order(self) -> None:
        a = self.sub("t")
        a.queue.pauseProducing()
        for i in range(3):
            self.broker.publish(None, "t", bytes([i]))
        self.assertEqual(a.written, [])
        a.queue.resumeProducing()
        self.assertEqual([e.payload for e in a.events()], [b"\x00", b"\x01", b"\x02"])
        self.assertEqual(a.queue.queued_bytes, 0)

    def test_pause_during_flush(self) -> None:
        """The transport pauses again while the queue drains: the rest waits."""
        written: list[bytes] = []
        queue: SubscriberQueue

        def write(data: bytes) -> None:
            written.append(data)
            queue.pauseProducing()

        queue = SubscriberQueue(1, write, lambda: None)
        queue.pauseProducing()
        queue.offer(b"a")
        queue.offer(b"b")
        queue.resumeProducing()
        self.assertEqual((written, list(queue.queued)), ([b"a"], [b"b"]))
