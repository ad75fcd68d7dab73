"""
Tests for L{pilot.protocols.apps} and L{pilot.services.apps}: the port 1001
and 1002 protocols on StringTransport, hostile input, and the ports bound on
a node's stack.
"""

from __future__ import annotations

import os
import struct

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pilot.address import Address
from pilot.apps.exchange import Budget
from pilot.apps.storage import Storage
from pilot.protocols.apps import (
    DataExchangeFactory, DataExchangeProtocol, EventStreamFactory, EventStreamProtocol,
)
from pilot.services.apps import listen_apps
from pilot.stack.transport import PilotAddress
from pilot.wire.dataexchange import TEXT, Frame, FrameDecoder, encode_file, encode_frame
from pilot.wire.events import MAX_TOPIC, Event, EventDecoder, encode_event


def transport(node: int = 9) -> StringTransport:
    return StringTransport(peerAddress=PilotAddress(Address(0, node), 49152))


class DataExchangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_780_000_000)
        self.storage = Storage(self.mktemp(), reserve=0)
        self.factory = DataExchangeFactory(self.storage, self.clock.seconds)
        self.factory.doStart()

    def connect(self) -> tuple[DataExchangeProtocol, StringTransport]:
        proto = self.factory.buildProtocol(None)
        t = transport()
        proto.makeConnection(t)
        return proto, t

    def replies(self, t: StringTransport) -> list[Frame]:
        return FrameDecoder().feed(t.value())

    def test_message_and_file(self) -> None:
        proto, t = self.connect()
        proto.dataReceived(encode_frame(TEXT, b"hello") + encode_file("a.txt", b"abc"))
        self.assertEqual(self.replies(t), [Frame(TEXT, b"ACK TEXT 5 bytes"), Frame(TEXT, b"ACK FILE 3 bytes")])
        [m] = self.storage.messages()
        self.assertEqual((m["from"], m["data"]), ("0:0000.0000.0009", "hello"))
        self.assertEqual(len(self.storage.files()), 1)
        self.assertIs(t.producer, t)

    def test_oversized_closes(self) -> None:
        """A length over 16 MiB: counted, the connection closed, nothing saved."""
        proto, t = self.connect()
        proto.dataReceived(struct.pack(">II", TEXT, 0xFFFFFFFF))
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.factory.counters["frames.malformed"], 1)
        self.assertEqual(self.storage.messages(), [])

    def test_cut_file_leaves_nothing(self) -> None:
        proto, t = self.connect()
        proto.dataReceived(encode_file("x.bin", b"1" * 1000)[:500])
        proto.connectionLost()
        self.assertEqual(self.storage.files(), [])
        self.assertEqual(os.listdir(self.storage.incoming), [])

    def test_leftovers_removed_on_start(self) -> None:
        os.makedirs(self.storage.incoming, exist_ok=True)
        with open(os.path.join(self.storage.incoming, "old.part"), "wb") as f:
            f.write(b"half")
        factory = DataExchangeFactory(self.storage, self.clock.seconds)
        factory.doStart()
        self.assertEqual(os.listdir(self.storage.incoming), [])
        self.assertEqual(factory.counters["incoming.removed"], 1)

    def test_malformed_counted_once(self) -> None:
        proto, t = self.connect()
        proto.dataReceived(struct.pack(">II", TEXT, 0xFFFFFFFF))
        proto.dataReceived(b"more")
        self.assertEqual(self.factory.counters["frames.malformed"], 1)

    def test_serves_after_hostile_peer(self) -> None:
        bad, _ = self.connect()
        bad.dataReceived(struct.pack(">IIH", 4, 4, 900) + b"..")
        good, t = self.connect()
        good.dataReceived(encode_frame(TEXT, b"ok"))
        self.assertEqual(self.replies(t), [Frame(TEXT, b"ACK TEXT 2 bytes")])


class EventStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.factory = EventStreamFactory()
        self.broker = self.factory.broker

    def connect(self, node: int = 9) -> tuple[EventStreamProtocol, StringTransport]:
        proto = self.factory.buildProtocol(None)
        t = transport(node)
        proto.makeConnection(t)
        return proto, t

    def events(self, t: StringTransport) -> list[object]:
        return list(EventDecoder().feed(t.value()))

    def test_subscribe_then_publish(self) -> None:
        sub, sub_t = self.connect()
        sub.dataReceived(encode_event("alerts", b"ignored"))
        pub, pub_t = self.connect(10)
        pub.dataReceived(encode_event("alerts") + encode_event("alerts", b"fire") + encode_event("other", b"x"))
        self.assertEqual(self.events(sub_t), [Event("alerts", b"fire")])
        self.assertEqual(pub_t.value(), b"")

    def test_three_subscribers(self) -> None:
        sinks = []
        for node in (1, 2, 3):
            proto, t = self.connect(node)
            proto.dataReceived(encode_event("*" if node == 3 else "t"))
            sinks.append(t)
        pub, _ = self.connect(4)
        pub.dataReceived(encode_event("t") + encode_event("t", b"m"))
        self.assertEqual([self.events(t) for t in sinks], [[Event("t", b"m")]] * 3)

    def test_lost_unsubscribes(self) -> None:
        sub, _ = self.connect()
        sub.dataReceived(encode_event("t"))
        sub.connectionLost()
        self.assertEqual(self.broker.topics, {})

    def test_slow_subscriber_aborted(self) -> None:
        """The transport said full; the queue's bound passes; the subscriber is aborted and counted."""
        sub, t = self.connect()
        sub.dataReceived(encode_event("t"))
        self.assertIs(t.producer, sub.queue)
        assert sub.queue is not None
        sub.queue.pauseProducing()  # as the stream transport does when its buffer is full
        pub, _ = self.connect(10)
        pub.dataReceived(encode_event("t"))
        for _ in range(5):
            pub.dataReceived(encode_event("t", b"x" * (1024 * 1024)))
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.broker.counters["dropped.slow"], 1)
        self.assertEqual(self.broker.topics, {"t": {pub.queue}})  # the publisher's own subscription

    def test_hostile_topic_length(self) -> None:
        proto, t = self.connect()
        proto.dataReceived(struct.pack(">H", MAX_TOPIC + 1))
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.broker.counters["malformed"], 1)

    def test_ten_thousand_topics(self) -> None:
        """10,000 topics from one peer: one subscription, publishes that keep nothing; the rest served."""
        hostile, _ = self.connect(66)
        hostile.dataReceived(b"".join(encode_event(f"topic-{i}", b"p") for i in range(10_000)))
        self.assertEqual(list(self.broker.topics), ["topic-0"])
        victims = []
        for _ in range(70):
            proto, t = self.connect(66)
            proto.dataReceived(encode_event("x"))
            victims.append(t)
        self.assertEqual(sum(t.disconnecting for t in victims), 70 - 63)
        self.assertLessEqual(len(self.broker.topics), 2)
        sub, t = self.connect(5)
        sub.dataReceived(encode_event("news"))
        pub, _ = self.connect(6)
        pub.dataReceived(encode_event("news") + encode_event("news", b"still"))
        self.assertEqual(self.events(t), [Event("news", b"still")])

    def test_partial_events_bounded(self) -> None:
        """Partial events of all connections share a budget; the one that passes it is closed, counted."""
        factory = EventStreamFactory(budget=Budget(1000))
        a, b = factory.buildProtocol(None), factory.buildProtocol(None)
        ta, tb = transport(1), transport(2)
        a.makeConnection(ta)
        b.makeConnection(tb)
        a.dataReceived(encode_event("t") + struct.pack(">H", 1) + b"t" + struct.pack(">I", 5000) + b"x" * 600)
        self.assertEqual(factory.budget.held, 607)
        b.dataReceived(encode_event("t") + struct.pack(">H", 1) + b"t" + struct.pack(">I", 5000) + b"y" * 600)
        self.assertTrue(tb.disconnecting)
        self.assertFalse(ta.disconnecting)
        self.assertEqual(factory.broker.counters["dropped.buffer"], 1)
        b.dataReceived(b"more")  # closing: dropped, not counted again
        self.assertEqual(factory.broker.counters["dropped.buffer"], 1)
        a.connectionLost()
        self.assertEqual(factory.budget.held, 0)

    def test_malformed_counted_once(self) -> None:
        proto, t = self.connect()
        proto.dataReceived(struct.pack(">H", MAX_TOPIC + 1))
        proto.dataReceived(b"anything")
        self.assertEqual(self.broker.counters["malformed"], 1)

    def test_bad_topic_counted_and_skipped(self) -> None:
        sub, t = self.connect()
        sub.dataReceived(encode_event("t"))
        pub, _ = self.connect(10)
        pub.dataReceived(encode_event("t") + b"\x00\x01\xff\x00\x00\x00\x00" + encode_event("t", b"ok"))
        self.assertEqual(self.broker.counters["malformed"], 1)
        self.assertEqual(self.events(t), [Event("t", b"ok")])


class FakeStack:
    def __init__(self) -> None:
        self.bound: dict[int, object] = {}

    def listen(self, port: int, factory: object) -> None:
        self.bound[port] = factory


class ListenTests(SynchronousTestCase):
    def test_ports(self) -> None:
        stack = FakeStack()
        apps = listen_apps(stack, self.mktemp(), Clock().seconds)
        self.assertEqual(sorted(stack.bound), [1001, 1002])
        self.assertIs(stack.bound[1001], apps.exchange)
        self.assertEqual(apps.counters(), {"dataexchange": {}, "eventstream": {"subscribers": 0, "topics": 0}})
