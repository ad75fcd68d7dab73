"""
pilot.services.forward: forwards and exposed ports over a MemoryReactor and
fake Pilot connect/listen; each splice driven with StringTransports (pause
until joined, bytes both ways, producers, close, dial failures, counters).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import AlreadyExists, ConnectionFailed, InvalidArgument, NotFound
from pilot.services.forward import Forwards, Half


class FakeListening:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Harness:
    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.dials: list[tuple[str, int, Any, Deferred[Any]]] = []
        self.binds: list[tuple[int, Any, FakeListening]] = []
        self.forwards = Forwards(self.reactor, self.connect, self.listen)

    def connect(self, target: str, port: int, protocol: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.dials.append((target, port, protocol, d))
        return d

    def listen(self, port: int, factory: Any) -> FakeListening:
        if any(p == port for p, _, _ in self.binds):
            raise AlreadyExists(f"stream port {port} is already bound")
        listening = FakeListening()
        self.binds.append((port, factory, listening))
        return listening


def joined(h: Harness) -> tuple[Half, StringTransport, Half, StringTransport]:
    """A forward's TCP connection whose Pilot stream connected."""
    h.forwards.forward(8080, "agent-b", 80)
    factory = h.reactor.tcpServers[-1][1]
    accepted = factory.buildProtocol(None)
    tcp = StringTransport()
    accepted.makeConnection(tcp)
    target, port, dialled, d = h.dials[-1]
    pilot = StringTransport()
    dialled.makeConnection(pilot)
    d.callback({"target": target})
    return accepted, tcp, dialled, pilot


class ForwardTests(SynchronousTestCase):
    def test_listens_on_loopback_only(self) -> None:
        h = Harness()
        result = h.forwards.forward(8080, "agent-b", 80)
        port, factory, backlog, interface = h.reactor.tcpServers[0]
        self.assertEqual((port, interface), (8080, "127.0.0.1"))
        self.assertEqual((result["target"], result["port"], result["active"]), ("agent-b", 80, 0))

    def test_paused_until_the_stream_connects(self) -> None:
        h = Harness()
        h.forwards.forward(8080, "agent-b", 80)
        accepted = h.reactor.tcpServers[0][1].buildProtocol(None)
        tcp = StringTransport()
        accepted.makeConnection(tcp)
        self.assertEqual(tcp.producerState, "paused")
        self.assertEqual(h.dials[0][:2], ("agent-b", 80))
        _, _, dialled, d = h.dials[0]
        pilot = StringTransport()
        dialled.makeConnection(pilot)
        self.assertEqual(tcp.producerState, "producing")
        self.assertIs(tcp.producer, pilot)  # a full TCP buffer pauses the Pilot stream's reading
        self.assertIs(pilot.producer, tcp)  # and a full Pilot send buffer pauses TCP's

    def test_bytes_both_ways_and_counters(self) -> None:
        h = Harness()
        accepted, tcp, dialled, pilot = joined(h)
        accepted.dataReceived(b"GET /")
        dialled.dataReceived(b"200 OK body")
        self.assertEqual(pilot.value(), b"GET /")
        self.assertEqual(tcp.value(), b"200 OK body")
        (entry,) = h.forwards.list()["forwards"]
        self.assertEqual((entry["active"], entry["total"], entry["bytes_to_peer"], entry["bytes_from_peer"]),
                         (1, 1, 5, 11))

    def test_a_close_closes_the_other_side(self) -> None:
        for closing in ("tcp", "pilot"):
            h = Harness()
            accepted, tcp, dialled, pilot = joined(h)
            if closing == "tcp":
                accepted.connectionLost(Failure(ConnectionRefusedError()))
                self.assertTrue(pilot.disconnecting, closing)
                self.assertIsNone(pilot.producer, closing)
            else:
                dialled.connectionLost(Failure(ConnectionRefusedError()))
                self.assertTrue(tcp.disconnecting, closing)
                # unregistered: a paused producer left on a TCP transport keeps it from closing
                self.assertIsNone(tcp.producer, closing)
            self.assertEqual(h.forwards.list()["forwards"][0]["active"], 0)

    def test_refused_stream_closes_the_tcp_connection(self) -> None:
        h = Harness()
        h.forwards.forward(8080, "agent-b", 80)
        accepted = h.reactor.tcpServers[0][1].buildProtocol(None)
        tcp = StringTransport()
        accepted.makeConnection(tcp)
        h.dials[0][3].errback(ConnectionFailed("refused"))
        self.assertTrue(tcp.disconnecting)
        accepted.connectionLost(Failure(ConnectionRefusedError()))
        (entry,) = h.forwards.list()["forwards"]
        self.assertEqual((entry["active"], entry["total"], entry["failed"]), (0, 1, 1))

    def test_unforward_and_errors(self) -> None:
        h = Harness()
        h.forwards.forward(8080, "agent-b", 80)
        self.assertRaises(AlreadyExists, h.forwards.forward, 8080, "agent-c", 80)
        self.assertEqual(h.forwards.unforward(8080)["status"], "removed")
        self.assertRaises(NotFound, h.forwards.unforward, 8080)
        self.assertEqual(h.forwards.list(), {"forwards": [], "exposed": []})


class ExposeTests(SynchronousTestCase):
    def test_streams_connect_to_the_service(self) -> None:
        h = Harness()
        result = h.forwards.expose(80, "127.0.0.1", 8000)
        self.assertEqual(result["service"], "127.0.0.1:8000")
        port, factory, listening = h.binds[0]
        accepted = factory.buildProtocol(None)
        pilot = StringTransport()
        accepted.makeConnection(pilot)
        self.assertEqual(pilot.producerState, "paused")
        host, tcp_port, client_factory, timeout, _ = h.reactor.tcpClients[0]
        self.assertEqual((host, tcp_port), ("127.0.0.1", 8000))
        dialled = client_factory.buildProtocol(None)
        tcp = StringTransport()
        dialled.makeConnection(tcp)
        self.assertEqual(pilot.producerState, "producing")
        accepted.dataReceived(b"request")
        dialled.dataReceived(b"answer")
        self.assertEqual((tcp.value(), pilot.value()), (b"request", b"answer"))
        (entry,) = h.forwards.list()["exposed"]
        self.assertEqual((entry["bytes_from_peer"], entry["bytes_to_peer"]), (7, 6))

    def test_service_down_closes_the_stream(self) -> None:
        h = Harness()
        h.forwards.expose(80, "127.0.0.1", 8000)
        accepted = h.binds[0][1].buildProtocol(None)
        pilot = StringTransport()
        accepted.makeConnection(pilot)
        h.reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertTrue(pilot.disconnecting)
        self.assertEqual(h.forwards.list()["exposed"][0]["failed"], 1)

    def test_unexpose_and_errors(self) -> None:
        h = Harness()
        h.forwards.expose(80, "127.0.0.1", 8000)
        self.assertRaises(AlreadyExists, h.forwards.expose, 80, "127.0.0.1", 8001)
        self.assertRaises(InvalidArgument, h.forwards.expose, 81, "127.0.0.1", 0)
        self.assertEqual(h.forwards.unexpose(80)["status"], "removed")
        self.assertTrue(h.binds[0][2].closed)
        self.assertRaises(NotFound, h.forwards.unexpose, 80)


class ControlCommandTests(SynchronousTestCase):
    """The control socket's forward requests (pilot.protocols.control_commands) reach the API, checked."""

    def test_dispatch_and_checks(self) -> None:
        from tests.protocols.test_control_server import FakeAPI, Harness as ControlHarness

        class API(FakeAPI):
            def forward(self, local_port: int, target: str, port: int) -> Any:
                return self._answer("forward", local_port, target, port)

            def unforward(self, local_port: int) -> Any:
                return self._answer("unforward", local_port)

            def expose(self, port: int, host: str, host_port: int) -> Any:
                return self._answer("expose", port, host, host_port)

            def unexpose(self, port: int) -> Any:
                return self._answer("unexpose", port)

            def forwards_list(self) -> Any:
                return self._answer("forwards_list")

        h = ControlHarness(API())
        for cmd, args in (("forward", {"local_port": 8080, "target": "agent-b", "port": 80}),
                          ("unforward", {"local_port": 8080}),
                          ("expose", {"port": 80, "host": "127.0.0.1", "host_port": 8000}),
                          ("unexpose", {"port": 80}), ("forwards", {})):
            self.assertTrue(h.ask(cmd, **args)["ok"], cmd)
        self.assertEqual(h.api.calls, [("forward", (8080, "agent-b", 80)), ("unforward", (8080,)),
                                       ("expose", (80, "127.0.0.1", 8000)), ("unexpose", (80,)),
                                       ("forwards_list", ())])
        for cmd, args in (("forward", {"local_port": 8080, "target": "agent-b", "port": 0}),
                          ("forward", {"local_port": 70000, "target": "agent-b", "port": 80}),
                          ("expose", {"port": 80, "host": "", "host_port": 8000}),
                          ("unexpose", {})):
            self.assertEqual(h.ask(cmd, **args)["error"]["code"], "invalid_argument", (cmd, args))
