"""
pilot.endpoints (docs/api.md): the daemon endpoints against the real control
server (pilot.protocols.control_server) over a fake NodeAPI, joined with
iosim's in-memory transports; the Unix connections are caught by a
MemoryReactor.  The endpoint strings through Twisted's plugin lookup.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from pilot.address import Address
from pilot.endpoints import (ControlStreamTransport, DaemonClientEndpoint, DaemonServerEndpoint,
                             pilot_address)
from pilot.errors import ConnectionFailed, InvalidArgument, NotRunning, NotTrusted
from pilot.protocols.control_server import ControlServerFactory
from pilot.stack.transport import PilotAddress

from tests.protocols.test_control_server import FakeAPI

UID = 1000
SOCKET = "/tmp/pilot-test/pilot.sock"
PEER = "0:0000.0000.0005"


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.made = False
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.lost = reason


class FakeDaemon:
    """A control server on a fake API; :meth:`accept` joins the next Unix connection the reactor was asked for."""

    def __init__(self) -> None:
        self.api = FakeAPI()
        self.reactor = MemoryReactorClock()
        self.clock = Clock()
        self.server = ControlServerFactory(self.api, self.clock, UID, credentials=lambda t: UID)
        self.pumps: list[iosim.IOPump] = []

    def accept(self) -> iosim.IOPump:
        path, factory, timeout, _ = self.reactor.unixClients.pop(0)
        assert path == SOCKET, path
        client = factory.buildProtocol(None)
        server = self.server.buildProtocol(None)
        pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client),
                             greet=False)
        self.pumps.append(pump)
        return pump

    def flush(self) -> None:
        for _ in range(3):
            for pump in list(self.pumps):
                pump.flush()
            self.clock.advance(0)  # the end of a reactor pass: the bridge's writes leave

    def pilot_peer(self, bridge: Any) -> tuple[Recorder, iosim.IOPump]:
        """The far end of a Pilot stream the daemon's bridge drives."""
        peer = Recorder()
        pump = iosim.connect(peer, iosim.makeFakeServer(peer), bridge, iosim.makeFakeClient(bridge), greet=False)
        self.pumps.append(pump)
        return peer, pump


class ClientEndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.daemon = FakeDaemon()
        self.endpoint = DaemonClientEndpoint(self.daemon.reactor, "agent-b", 1000, SOCKET)

    def connect(self) -> tuple[Deferred[Any], Deferred[Any]]:
        answer: Deferred[Any] = Deferred()
        self.daemon.api.answers["connect"] = answer
        d = self.endpoint.connect(Factory.forProtocol(Recorder))
        self.daemon.accept()
        self.daemon.flush()
        return d, answer

    def test_stream_both_ways(self) -> None:
        d, answer = self.connect()
        self.assertEqual(self.daemon.api.calls, [("connect", ("agent-b", 1000))])
        (bridge,) = self.daemon.api.protocols
        peer, _ = self.daemon.pilot_peer(bridge)
        self.assertNoResult(d)
        peer.transport.write(b"early bytes ")  # before the reply: buffered by the daemon
        answer.callback({"target": PEER, "port": 1000, "local_port": 49152})
        self.daemon.flush()
        proto = self.successResultOf(d)
        self.assertIsInstance(proto, Recorder)
        self.assertTrue(proto.made)
        self.assertEqual(proto.transport.getPeer(), PilotAddress(Address.parse(PEER), 1000))
        self.assertEqual(proto.transport.getHost().port, 49152)
        proto.transport.write(b"hello")
        peer.transport.write(b"world")
        self.daemon.flush()
        self.assertEqual(peer.received, b"hello")
        self.assertEqual(proto.received, b"early bytes world")
        peer.transport.loseConnection()
        self.daemon.flush()
        self.assertIsNotNone(proto.lost)

    def test_first_bytes_ride_on_the_connect(self) -> None:
        """``first``: sent behind the request, written to the stream the moment it opens."""
        self.endpoint = DaemonClientEndpoint(self.daemon.reactor, "agent-b", 1000, SOCKET, first=b"hello ")
        d, answer = self.connect()
        (bridge,) = self.daemon.api.protocols
        peer, _ = self.daemon.pilot_peer(bridge)
        answer.callback({"target": PEER, "port": 1000, "local_port": 49152})
        self.daemon.flush()
        proto = self.successResultOf(d)
        proto.transport.write(b"world")
        self.daemon.flush()
        self.assertEqual(peer.received, b"hello world")
        self.assertRaises(InvalidArgument, DaemonClientEndpoint, self.daemon.reactor, "agent-b", 1000, SOCKET,
                          first="text")

    def test_error_reply_is_the_pilot_error(self) -> None:
        d, answer = self.connect()
        answer.errback(NotTrusted("no trust", "ask for it"))
        self.daemon.flush()
        error = self.failureResultOf(d, NotTrusted).value
        self.assertEqual((error.message, error.hint), ("no trust", "ask for it"))

    def test_no_daemon_is_not_running(self) -> None:
        d = self.endpoint.connect(Factory.forProtocol(Recorder))
        _, factory, _, _ = self.daemon.reactor.unixClients.pop(0)
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("nobody")))
        error = self.failureResultOf(d, NotRunning).value
        self.assertIn(SOCKET, error.message)

    def test_cancel_while_connecting(self) -> None:
        d = self.endpoint.connect(Factory.forProtocol(Recorder))
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_cancel_while_the_daemon_dials(self) -> None:
        d, answer = self.connect()
        d.cancel()
        self.daemon.flush()
        self.failureResultOf(d, CancelledError)
        # the daemon cannot tell a client that left from one that half-closed (docs/api.md): it dials on,
        # and closes the Pilot side as soon as it is connected
        (bridge,) = self.daemon.api.protocols
        peer, _ = self.daemon.pilot_peer(bridge)
        answer.callback({"target": PEER, "port": 1000, "local_port": 1})
        self.daemon.flush()
        self.assertIsNotNone(peer.lost)

    def test_daemon_hangs_up_before_answering(self) -> None:
        d, answer = self.connect()
        self.daemon.pumps[0].serverIO.loseConnection()
        self.daemon.flush()
        self.failureResultOf(d, ConnectionFailed)

    def test_pause_reaches_the_unix_connection(self) -> None:
        d, answer = self.connect()
        (bridge,) = self.daemon.api.protocols
        self.daemon.pilot_peer(bridge)
        answer.callback({"target": PEER, "port": 1000, "local_port": 1})
        self.daemon.flush()
        proto = self.successResultOf(d)
        unix = self.daemon.pumps[0].clientIO
        self.assertIsInstance(proto.transport, ControlStreamTransport)
        calls: list[str] = []
        unix.pauseProducing = lambda: calls.append("pause")
        unix.resumeProducing = lambda: calls.append("resume")
        proto.transport.pauseProducing()
        proto.transport.resumeProducing()
        self.assertEqual(calls, ["pause", "resume"])
        producer = Recorder()
        proto.transport.registerProducer(producer, True)
        self.assertIs(unix.producer, producer)
        proto.transport.unregisterProducer()
        self.assertIsNone(unix.producer)


class ServerEndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.daemon = FakeDaemon()
        self.endpoint = DaemonServerEndpoint(self.daemon.reactor, 1000, SOCKET)

    def test_accepted_streams_are_attached(self) -> None:
        factory = Factory.forProtocol(Recorder)
        d = self.endpoint.listen(factory)
        self.daemon.accept()
        self.daemon.flush()
        port = self.successResultOf(d)
        self.assertEqual(port.getHost().port, 1000)
        (accept_factory,) = self.daemon.api.factories
        bridge = accept_factory.buildProtocol(PilotAddress(Address.parse(PEER), 49999))
        peer, _ = self.daemon.pilot_peer(bridge)
        peer.transport.write(b"request")
        self.daemon.flush()
        self.daemon.accept()  # the attach connection
        self.daemon.flush()
        self.assertEqual(port.accepted, 1)
        app = self.daemon.pumps[-1].client._wrappedProtocol._app  # the attach connection's application protocol
        self.assertIsInstance(app, Recorder)
        self.assertEqual(app.received, b"request")
        self.assertEqual(app.transport.getPeer(), PilotAddress(Address.parse(PEER), 49999))
        app.transport.write(b"answer")
        self.daemon.flush()
        self.assertEqual(peer.received, b"answer")

    def test_stop_listening_closes_the_listen(self) -> None:
        d = self.endpoint.listen(Factory.forProtocol(Recorder))
        self.daemon.accept()
        self.daemon.flush()
        port = self.successResultOf(d)
        stopped = port.stopListening()
        self.daemon.flush()
        self.successResultOf(stopped)
        self.assertEqual(self.daemon.api.answers["listen"].closed, 1)

    def test_port_taken(self) -> None:
        from pilot.errors import AlreadyExists
        self.daemon.api.answers["listen"] = AlreadyExists("stream port 1000 is already bound")
        d = self.endpoint.listen(Factory.forProtocol(Recorder))
        self.daemon.accept()
        self.daemon.flush()
        self.failureResultOf(d, AlreadyExists)


class StringTests(SynchronousTestCase):
    def test_client_strings(self) -> None:
        reactor = MemoryReactorClock()
        endpoint = clientFromString(reactor, "pilot:agent-b:1000")
        self.assertIsInstance(endpoint, DaemonClientEndpoint)
        self.assertEqual((endpoint.target, endpoint.port), ("agent-b", 1000))
        endpoint = clientFromString(reactor, f"pilot:{PEER}:7:socket=/x/s.sock:timeout=3")
        self.assertEqual((endpoint.target, endpoint.port, endpoint.socket_path, endpoint.timeout),
                         (PEER, 7, "/x/s.sock", 3.0))
        endpoint = clientFromString(reactor, "pilot:a:7:home=/h")
        self.assertEqual(endpoint.socket_path, "/h/pilot.sock")

    def test_server_strings(self) -> None:
        reactor = MemoryReactorClock()
        endpoint = serverFromString(reactor, "pilot:1000:home=/h")
        self.assertIsInstance(endpoint, DaemonServerEndpoint)
        self.assertEqual((endpoint.port, endpoint.socket_path), (1000, "/h/pilot.sock"))

    def test_bad_strings(self) -> None:
        reactor = MemoryReactorClock()
        for text in ("pilot:agent-b", "pilot:a:70000", "pilot:a:x", "pilot:a:1:colour=red"):
            self.assertRaises(InvalidArgument, clientFromString, reactor, text)
        for text in ("pilot:a:1", "pilot:-1"):
            self.assertRaises(InvalidArgument, serverFromString, reactor, text)

    def test_addresses(self) -> None:
        self.assertEqual(pilot_address(PEER, 5), PilotAddress(Address.parse(PEER), 5))
        self.assertEqual(pilot_address("junk", None), PilotAddress(Address(0, 0), 0))

