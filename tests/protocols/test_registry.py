"""
Tests for pilot.protocols.registry (server) and pilot.protocols.registry_client.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import ErrorCode, Internal, InvalidArgument, NotFound, PilotError, RateLimited, \
    RegistryUnavailable
from pilot.protocols.registry import (
    BATCH_BYTES, FRAME_DEADLINE, MAX_REQUEST, RefusedConnection, RegistryServerFactory,
    RegistryServerProtocol,
)
from pilot.protocols.registry_client import RegistryClientFactory, RegistryClientProtocol, reply_error
from pilot.server.registry import Peer, Registry
from pilot.wire.registry import MAX_FRAME, FrameDecoder, encode_frame


class RecordingRegistry:
    """Answers ``<type>_ok`` echoing the request; records calls."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, Any], Peer, object]] = []
        self.closed: list[object] = []

    def handle(self, msg: dict[str, Any], peer: Peer, session: object = None) -> dict[str, Any]:
        self.requests.append((msg, peer, session))
        if msg["type"] == "explode":
            raise ZeroDivisionError("boom")
        return {"type": msg["type"] + "_ok", "n": msg.get("n")}

    def answer(self, msg: dict[str, Any], peer: Peer, session: object = None) -> bytes:
        """``Registry.answer``: the reply of :meth:`handle` (as the test set it) as a frame."""
        return encode_frame(self.handle(msg, peer, session))

    def session_closed(self, session: object) -> None:
        self.closed.append(session)


class FakeDurability:
    """A store writer stand-in: requests of type ``change`` bump the generation; saves are manual."""

    def __init__(self) -> None:
        self.generation = 0
        self.saved = 0
        self.waiting: dict[int, list[Deferred[None]]] = {}

    def handle(self, inner: Any) -> Any:
        def handle(msg: dict[str, Any], peer: Peer, session: object = None) -> dict[str, Any]:
            if msg["type"] == "change":
                self.generation += 1
            return inner(msg, peer, session)  # type: ignore[no-any-return]
        return handle

    def when_saved(self, generation: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waiting.setdefault(generation, []).append(d)
        return d

    def save(self, generation: int) -> None:
        self.saved = generation
        for g in sorted(g for g in self.waiting if g <= generation):
            for d in self.waiting.pop(g):
                d.callback(None)

    def fail(self) -> None:
        for ds in self.waiting.values():
            for d in ds:
                d.errback(RuntimeError("cannot save"))
        self.waiting = {}


def frames(data: bytes) -> list[dict[str, Any]]:
    out = FrameDecoder().feed(data)
    assert all(isinstance(m, dict) for m in out)
    return out  # type: ignore[return-value]


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class ServerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = RecordingRegistry()
        self.factory = RegistryServerFactory(self.registry, self.clock)  # type: ignore[arg-type]
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "203.0.113.7", 40000))
        protocol = self.factory.buildProtocol(self.transport.getPeer())
        assert isinstance(protocol, RegistryServerProtocol)
        self.protocol = protocol
        self.protocol.makeConnection(self.transport)

    def replies(self) -> list[dict[str, Any]]:
        out = frames(self.transport.value())
        self.transport.clear()
        return out

    def test_split_frame(self) -> None:
        """A frame arriving a byte at a time is answered once, when complete."""
        data = encode_frame({"type": "lookup", "n": 1})
        for i in range(len(data) - 1):
            self.protocol.dataReceived(data[i:i + 1])
        self.assertEqual(self.transport.value(), b"")
        self.protocol.dataReceived(data[-1:])
        self.assertEqual(self.replies(), [{"type": "lookup_ok", "n": 1}])

    def test_several_in_one_write(self) -> None:
        """Several frames in one read are answered in order; the peer comes from the transport."""
        self.protocol.dataReceived(b"".join(encode_frame({"type": "t", "n": i}) for i in range(3)))
        self.assertEqual([r["n"] for r in self.replies()], [0, 1, 2])
        self.assertEqual({p for _, p, _ in self.registry.requests}, {Peer("203.0.113.7", 40000)})
        self.assertTrue(all(s is self.protocol for _, _, s in self.registry.requests))

    def test_replies_to_one_read_in_one_write(self) -> None:
        """The replies to what one read brought go to the transport in one write, in order."""
        writes: list[bytes] = []
        self.patch(self.transport, "write", writes.append)
        self.protocol.dataReceived(b"".join(encode_frame({"type": "t", "n": i}) for i in range(5)))
        self.assertEqual(len(writes), 1)
        self.assertEqual([r["n"] for r in frames(writes[0])], [0, 1, 2, 3, 4])
        self.protocol.dataReceived(encode_frame({"type": "t", "n": 5}))
        self.assertEqual(len(writes), 2)

    def test_batch_is_bounded_and_pauses(self) -> None:
        """A read of many requests is written in parts of about ``BATCH_BYTES``; a full transport stops it."""
        writes: list[bytes] = []

        def write(data: bytes) -> None:
            writes.append(data)
            self.protocol.pauseProducing()  # as Twisted's transport does when its buffer is full
        self.patch(self.transport, "write", write)
        pad = "p" * 1000

        def handle(msg: dict[str, Any], peer: Peer, session: object = None) -> dict[str, Any]:
            return dict(RecordingRegistry.handle(self.registry, msg, peer, session), pad=pad)
        self.patch(self.registry, "handle", handle)
        count = 3 * BATCH_BYTES // 1000
        self.protocol.dataReceived(b"".join(encode_frame({"type": "t", "n": i, "pad": pad})
                                            for i in range(count)))
        self.assertEqual(len(writes), 1)
        answered = frames(writes[0])
        self.assertGreaterEqual(len(writes[0]), BATCH_BYTES)
        self.assertLess(len(writes[0]), BATCH_BYTES + 1100)
        self.assertEqual(len(self.registry.requests), len(answered))
        self.patch(self.transport, "write", writes.append)
        self.protocol.resumeProducing()
        self.assertEqual(len(self.registry.requests), count)
        self.assertEqual([r["n"] for w in writes for r in frames(w)], list(range(count)))

    def test_event_pushed_while_answering_keeps_its_place(self) -> None:
        """An event a request causes on its own connection is written after that request's reply."""
        def handle(msg: dict[str, Any], peer: Peer, session: object = None) -> dict[str, Any]:
            reply = RecordingRegistry.handle(self.registry, msg, peer, session)
            self.protocol.push({"type": "event", "after": msg["n"]})
            return reply
        self.patch(self.registry, "handle", handle)
        self.protocol.dataReceived(encode_frame({"type": "t", "n": 1}) + encode_frame({"type": "t", "n": 2}))
        self.assertEqual(self.replies(), [{"type": "event", "after": 1}, {"type": "t_ok", "n": 1},
                                          {"type": "event", "after": 2}, {"type": "t_ok", "n": 2}])

    def test_ipv6_peer(self) -> None:
        transport = StringTransport(peerAddress=IPv6Address("TCP", "2001:db8::1", 5))
        protocol = RegistryServerProtocol(self.registry, self.clock)  # type: ignore[arg-type]
        protocol.makeConnection(transport)
        protocol.dataReceived(encode_frame({"type": "t"}))
        self.assertEqual(self.registry.requests[-1][1], Peer("2001:db8::1", 5))

    def test_malformed_body_continues(self) -> None:
        """A body that is not a JSON object gets a malformed error; the next request is answered."""
        self.protocol.dataReceived(raw_frame(b"[1, 2]") + raw_frame(b"{not json") + raw_frame(b'{"x": 1}')
                                   + encode_frame({"type": "t", "n": 9}))
        replies = self.replies()
        self.assertEqual([r["type"] for r in replies], ["error", "error", "error", "t_ok"])
        self.assertEqual({r.get("code") for r in replies[:3]}, {"malformed"})
        self.assertTrue(all(isinstance(r["error"], str) and r["error"] for r in replies[:3]))
        self.assertFalse(self.transport.disconnecting)

    def test_oversized_closes(self) -> None:
        """An oversized length prefix gets an error reply, then the connection is closed."""
        self.protocol.dataReceived(struct.pack(">I", MAX_FRAME + 1) + b"{}")
        [reply] = self.replies()
        self.assertEqual((reply["type"], reply["code"]), ("error", "malformed"))
        self.assertTrue(self.transport.disconnecting)
        self.protocol.dataReceived(encode_frame({"type": "t"}))
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.registry.requests, [])

    def test_no_logging_per_connection_or_request(self) -> None:
        """A connection, its requests (a refused one too) and its close log nothing: a fleet does this."""
        registry = Registry(Clock())
        with capturedLogs() as events:
            protocol = RegistryServerProtocol(registry, self.clock)
            transport = StringTransport(peerAddress=IPv4Address("TCP", "203.0.113.8", 40001))
            protocol.makeConnection(transport)
            protocol.dataReceived(encode_frame({"type": "lookup", "node_id": 7}) +
                                  encode_frame({"type": "no_such_request"}))
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([r["type"] for r in frames(transport.value())], ["error", "error"])
        self.assertEqual(events, [])

    def test_handler_exception(self) -> None:
        """An exception in the registry is logged and answered ``internal``; the connection goes on."""
        with capturedLogs() as events:
            self.protocol.dataReceived(encode_frame({"type": "explode"}) + encode_frame({"type": "t", "n": 2}))
        replies = self.replies()
        self.assertEqual(replies[0], {"type": "error", "error": "internal error", "code": "internal"})
        self.assertEqual(replies[1]["type"], "t_ok")
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertTrue(any(e.get("log_level") == LogLevel.critical and e.get("kind") == "explode" for e in events))

    def test_unencodable_reply(self) -> None:
        """A reply too big for a frame is an internal error, not a crash."""
        self.registry.handle = lambda msg, peer, session=None: {"type": "x", "blob": "a" * (MAX_FRAME + 1)}
        self.protocol.dataReceived(encode_frame({"type": "t"}))
        self.assertEqual(self.replies()[0]["code"], "internal")
        self.flushLoggedErrors(ValueError)

    def test_idle_timeout(self) -> None:
        """The connection is aborted after the idle timeout; each message restarts it."""
        self.clock.advance(200)
        self.protocol.dataReceived(encode_frame({"type": "t"}))
        self.clock.advance(299)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.transport.disconnected)  # aborted, not a graceful close

    def test_partial_frame_does_not_restart_idle_timer(self) -> None:
        data = encode_frame({"type": "t"})
        self.clock.advance(250)
        self.protocol.dataReceived(data[:3])
        self.clock.advance(50)
        self.assertTrue(self.transport.disconnecting)

    def test_idle_timeout_configurable(self) -> None:
        factory = RegistryServerFactory(self.registry, self.clock, idle_timeout=10)  # type: ignore[arg-type]
        protocol = factory.buildProtocol(IPv4Address("TCP", "203.0.113.4", 5))
        assert isinstance(protocol, RegistryServerProtocol)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting)

    def test_connection_lost(self) -> None:
        """Losing the connection tells the registry and cancels the idle timer."""
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.registry.closed, [self.protocol])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.factory.connections, set())

    def test_push(self) -> None:
        """An event is written as a frame; after the connection is lost it is dropped."""
        self.protocol.push({"type": "event", "event": "trust_granted", "node_id": 3})
        self.assertEqual(self.replies(), [{"type": "event", "event": "trust_granted", "node_id": 3}])
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.protocol.push({"type": "event", "event": "x"})
        self.assertEqual(self.transport.value(), b"")

    def test_registers_as_streaming_producer(self) -> None:
        self.assertIs(self.transport.producer, self.protocol)
        self.assertTrue(self.transport.streaming)

    def test_paused_stops_reading_and_answering(self) -> None:
        """While the send buffer is full, requests wait; they are answered on resume."""
        self.protocol.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        self.protocol.dataReceived(encode_frame({"type": "t", "n": 1}) + encode_frame({"type": "t", "n": 2}))
        self.assertEqual(self.transport.value(), b"")
        self.protocol.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual([r["n"] for r in self.replies()], [1, 2])

    def test_client_that_never_reads(self) -> None:
        """Events queued while paused past ``max_unsent`` abort the connection."""
        self.protocol.max_unsent = 1000
        self.protocol.pauseProducing()
        event = {"type": "event", "event": "x", "pad": "p" * 200}
        for _ in range(4):
            self.protocol.push(event)
        self.assertFalse(self.transport.disconnecting)
        self.protocol.push(event)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(len(self.replies()), 4)

    def test_connection_limit(self) -> None:
        """Over ``max_connections``, a new connection is aborted at once and not counted."""
        factory = RegistryServerFactory(self.registry, self.clock, max_connections=2)  # type: ignore[arg-type]
        addr = IPv4Address("TCP", "203.0.113.4", 5)
        protocols = []
        for _ in range(2):
            p = factory.buildProtocol(addr)
            assert isinstance(p, RegistryServerProtocol)
            p.makeConnection(StringTransport())
            protocols.append(p)
        with capturedLogs() as events:
            refused = factory.buildProtocol(addr)
        self.assertIsInstance(refused, RefusedConnection)
        transport = StringTransport()
        refused.makeConnection(transport)
        refused.dataReceived(encode_frame({"type": "t"}))
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")
        self.assertEqual((factory.refused, len(factory.connections), len(events)), (1, 2, 1))
        protocols[0].connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(factory.buildProtocol(addr), RegistryServerProtocol)

    # --- slow clients (docs/security.md) ---------------------------------------------------

    def connect(self, factory: RegistryServerFactory, host: str = "203.0.113.4") -> tuple[Any, StringTransport]:
        protocol = factory.buildProtocol(IPv4Address("TCP", host, 5))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 5))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_frame_deadline_not_extended_by_trickle(self) -> None:
        """A frame must arrive whole within FRAME_DEADLINE of its first byte; trickling does not help."""
        data = encode_frame({"type": "t", "pad": "x" * 100})
        for i in range(int(FRAME_DEADLINE) - 1):
            self.protocol.dataReceived(data[i:i + 1])
            self.clock.advance(1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnected)  # aborted, long before the idle timeout
        self.assertEqual(self.registry.requests, [])

    def test_frame_deadline_per_frame(self) -> None:
        """A complete frame stops the clock; the next frame gets its own deadline."""
        data = encode_frame({"type": "t"})
        self.protocol.dataReceived(data[:5])
        self.clock.advance(FRAME_DEADLINE - 1)
        self.protocol.dataReceived(data[5:] + data[:5])
        self.clock.advance(FRAME_DEADLINE - 1)
        self.assertFalse(self.transport.disconnecting)
        self.protocol.dataReceived(data[5:])
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), self.clock.seconds() + 300)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # only the idle timer is left
        self.clock.advance(FRAME_DEADLINE * 2)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(len(self.registry.requests), 2)

    def test_frame_deadline_waits_while_we_do_not_read(self) -> None:
        """While paused (the client does not read its replies) a partial frame is not its fault yet."""
        self.protocol.dataReceived(encode_frame({"type": "t"})[:5])
        self.protocol.pauseProducing()
        self.clock.advance(FRAME_DEADLINE * 2)
        self.assertFalse(self.transport.disconnecting)
        self.protocol.resumeProducing()
        self.clock.advance(FRAME_DEADLINE)
        self.assertTrue(self.transport.disconnecting)

    def test_request_over_max_request_closes(self) -> None:
        """A request frame longer than MAX_REQUEST (far below the wire's 1 MiB) is refused at its prefix."""
        self.protocol.dataReceived(struct.pack(">I", MAX_REQUEST + 1) + b"{")
        [reply] = self.replies()
        self.assertEqual((reply["type"], reply["code"]), ("error", "malformed"))
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.budget.held, 0)

    def test_buffer_budget(self) -> None:
        """Partial frames of all connections share a budget; the connection going over it is aborted."""
        factory = RegistryServerFactory(self.registry, self.clock, buffer_budget=1000)  # type: ignore[arg-type]
        first, t1 = self.connect(factory, "203.0.113.4")
        second, t2 = self.connect(factory, "203.0.113.5")
        partial = struct.pack(">I", 5000) + b"x" * 596
        first.dataReceived(partial)
        self.assertEqual(factory.budget.held, 600)
        with capturedLogs() as events:
            second.dataReceived(partial)
        self.assertTrue(t2.disconnected)
        self.assertFalse(t1.disconnecting)
        self.assertTrue(any("partial frames" in e.get("log_format", "") for e in events))
        second.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.budget.held, 600)
        first.dataReceived(b"x" * 300)  # still within the budget
        self.assertFalse(t1.disconnecting)
        first.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.budget.held, 0)

    def test_per_address_limit(self) -> None:
        """At most ``max_per_address`` connections from one source address; others are not affected."""
        factory = RegistryServerFactory(self.registry, self.clock, max_per_address=2)  # type: ignore[arg-type]
        held = [self.connect(factory)[0] for _ in range(2)]
        with capturedLogs() as events:
            refused = factory.buildProtocol(IPv4Address("TCP", "203.0.113.4", 6))
        self.assertIsInstance(refused, RefusedConnection)
        self.assertEqual((factory.refused_per_address, len(events)), (1, 1))
        self.assertIsInstance(factory.buildProtocol(IPv4Address("TCP", "198.51.100.9", 6)), RegistryServerProtocol)
        held[0].connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(factory.buildProtocol(IPv4Address("TCP", "203.0.113.4", 6)), RegistryServerProtocol)
        for p in held[1:]:
            p.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.per_address, {"203.0.113.4": 1, "198.51.100.9": 1})

    # --- durable acknowledgements ------------------------------------------------------------

    def durable(self) -> tuple["FakeDurability", StringTransport]:
        durability = FakeDurability()
        self.registry.handle = durability.handle(self.registry.handle)  # type: ignore[method-assign]
        factory = RegistryServerFactory(self.registry, self.clock, durability=durability)  # type: ignore[arg-type]
        protocol, transport = self.connect(factory)
        protocol.dataReceived(encode_frame({"type": "change", "n": 1}) + encode_frame({"type": "t", "n": 2})
                              + encode_frame({"type": "change", "n": 3}))
        return durability, transport

    def test_durable_reply_waits_for_the_write(self) -> None:
        """A reply to a change waits until it is on disk; later replies wait behind it, in order."""
        durability, transport = self.durable()
        self.assertEqual(transport.value(), b"")
        self.assertEqual(sorted(durability.waiting), [1, 2])
        durability.save(1)
        self.assertEqual([r["n"] for r in frames(transport.value())], [1, 2])
        durability.save(2)
        self.assertEqual([r["n"] for r in frames(transport.value())], [1, 2, 3])

    def test_durable_unsaved_closes(self) -> None:
        """If the change can never be saved, the connection is closed without acknowledging it."""
        durability, transport = self.durable()
        with capturedLogs():
            durability.fail()
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnected)

    def test_disconnect_all(self) -> None:
        self.factory.disconnect_all()
        self.assertTrue(self.transport.disconnecting)


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.protocol = RegistryClientFactory(self.events.append).buildProtocol(IPv4Address("TCP", "203.0.113.4", 9000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def reply(self, *messages: dict[str, Any]) -> None:
        self.protocol.dataReceived(b"".join(encode_frame(m) for m in messages))

    def test_pipelined_in_order(self) -> None:
        """Requests are written at once; replies are matched first-in, first-out."""
        d1 = self.protocol.request({"type": "lookup", "node_id": 1})
        d2 = self.protocol.request({"type": "lookup", "node_id": 2})
        self.assertEqual([m["node_id"] for m in frames(self.transport.value())], [1, 2])
        self.assertEqual(self.protocol.outstanding, 2)
        data = encode_frame({"type": "lookup_ok", "node_id": 1}) + encode_frame({"type": "lookup_ok", "node_id": 2})
        self.protocol.dataReceived(data[:7])
        self.assertNoResult(d1)
        self.protocol.dataReceived(data[7:])
        self.assertEqual(self.successResultOf(d1)["node_id"], 1)
        self.assertEqual(self.successResultOf(d2)["node_id"], 2)
        self.assertEqual(self.protocol.outstanding, 0)

    def test_events_are_not_replies(self) -> None:
        d = self.protocol.request({"type": "heartbeat", "node_id": 1})
        self.reply({"type": "event", "event": "trust_granted", "node_id": 4}, {"type": "heartbeat_ok", "time": 5})
        self.assertEqual(self.successResultOf(d), {"type": "heartbeat_ok", "time": 5})
        self.assertEqual(self.events, [{"type": "event", "event": "trust_granted", "node_id": 4}])

    def test_event_callback_failure_is_contained(self) -> None:
        def broken(event: dict[str, Any]) -> None:
            raise KeyError("oops")

        self.protocol.on_event = broken
        d = self.protocol.request({"type": "t"})
        self.reply({"type": "event", "event": "x"}, {"type": "t_ok"})
        self.successResultOf(d)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_error_replies(self) -> None:
        """Error replies fail with the PilotError for their code."""
        cases: list[tuple[dict[str, Any], type[PilotError], ErrorCode]] = [
            ({"type": "error", "error": "node 3 is not registered", "code": "not_found"}, NotFound,
             ErrorCode.not_found),
            ({"type": "error", "error": "slow down", "code": "rate_limited"}, RateLimited, ErrorCode.rate_limited),
            ({"type": "error", "error": "bad", "code": "invalid_argument"}, InvalidArgument,
             ErrorCode.invalid_argument),
            ({"type": "error", "error": "request failed"}, Internal, ErrorCode.internal),
            ({"type": "error", "error": "x", "code": "no_such_code"}, Internal, ErrorCode.internal),
            ({"type": "error", "error": "y", "code": "malformed"}, PilotError, ErrorCode.malformed),
            ({"type": "lookup_ok", "error": "reference style"}, Internal, ErrorCode.internal),
        ]
        for message, cls, code in cases:
            d = self.protocol.request({"type": "t"})
            self.reply(message)
            error = self.failureResultOf(d, cls).value
            self.assertEqual(error.code, code)
            self.assertIn(message["error"], error.message)
        self.assertIsNone(reply_error({"type": "register_ok", "hostname_error": "taken"}))

    def test_connection_lost(self) -> None:
        """Every outstanding request fails with RegistryUnavailable; later ones fail at once."""
        ds = [self.protocol.request({"type": "t", "n": i}) for i in range(3)]
        self.reply({"type": "t_ok", "n": 0})
        self.protocol.connectionLost(Failure(ConnectionLost("reset by peer")))
        self.successResultOf(ds[0])
        for d in ds[1:]:
            self.assertIn("lost the connection", self.failureResultOf(d, RegistryUnavailable).value.message)
        self.failureResultOf(self.protocol.request({"type": "t"}), RegistryUnavailable)

    def test_request_before_connection(self) -> None:
        self.failureResultOf(RegistryClientProtocol().request({"type": "t"}), RegistryUnavailable)

    def test_unencodable_request(self) -> None:
        self.failureResultOf(self.protocol.request({"type": "t", "x": object()}), InvalidArgument)
        self.failureResultOf(self.protocol.request({"type": "t", "x": "a" * MAX_FRAME}), InvalidArgument)
        self.assertEqual(self.protocol.outstanding, 0)

    def test_malformed_frame_from_server(self) -> None:
        """A reply that does not decode breaks the stream: abort, fail what is outstanding."""
        d = self.protocol.request({"type": "t"})
        with capturedLogs():
            self.protocol.dataReceived(raw_frame(b"[]"))
        self.assertTrue(self.transport.disconnected)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIn("malformed", self.failureResultOf(d, RegistryUnavailable).value.message)

    def test_cancelled_request_keeps_its_place(self) -> None:
        d1 = self.protocol.request({"type": "a"})
        d2 = self.protocol.request({"type": "b"})
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.reply({"type": "a_ok"}, {"type": "b_ok"})
        self.assertEqual(self.successResultOf(d2), {"type": "b_ok"})

    def test_unsolicited_reply_dropped(self) -> None:
        with capturedLogs() as events:
            self.reply({"type": "lookup_ok"})
        self.assertEqual(len(events), 1)
        d = self.protocol.request({"type": "t"})
        self.reply({"type": "t_ok"})
        self.successResultOf(d)


class LoopbackTests(SynchronousTestCase):
    """Client and server over an in-memory connection, with the real registry."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.registry = Registry(self.clock)
        server = RegistryServerFactory(self.registry, self.clock).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert isinstance(server, RegistryServerProtocol)
        self.server = server
        self.events: list[dict[str, Any]] = []
        self.client = RegistryClientProtocol(self.events.append)
        self.pump = connect(server, FakeTransport(server, isServer=True),
                            self.client, FakeTransport(self.client, isServer=False))

    def test_requests(self) -> None:
        d1 = self.client.request({"type": "list_networks"})
        d2 = self.client.request({"type": "lookup", "node_id": 77})
        d3 = self.client.request({"type": "beacon_list"})
        self.pump.flush()
        self.assertEqual(self.successResultOf(d1)["type"], "list_networks_ok")
        self.assertIsInstance(self.failureResultOf(d2, NotFound).value, NotFound)
        self.assertEqual(self.successResultOf(d3), {"type": "beacon_list_ok", "beacons": []})

    def test_event_pushed_between_replies(self) -> None:
        d = self.client.request({"type": "list_networks"})
        self.server.push({"type": "event", "event": "trust_revoked", "node_id": 8})
        self.pump.flush()
        self.successResultOf(d)
        self.assertEqual(self.events, [{"type": "event", "event": "trust_revoked", "node_id": 8}])

    def test_server_closes(self) -> None:
        d = self.client.request({"type": "list_networks"})
        self.server.transport.loseConnection()
        self.pump.flush()
        self.failureResultOf(d, RegistryUnavailable)

    def test_garbage_from_client_closes(self) -> None:
        """A client sending an oversized length is told why, then disconnected."""
        d = self.client.request({"type": "list_networks"})
        self.pump.flush()
        self.client.transport.write(struct.pack(">I", MAX_FRAME + 10))
        with capturedLogs():
            self.pump.flush()
        self.successResultOf(d)
        self.assertTrue(self.server.transport.disconnecting)

