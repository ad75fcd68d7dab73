# -*- test-case-name: tests.services.test_forward -*-
"""
Port forwarding in the daemon, for programs that know only TCP (``docs/cli.md``,
``pilotctl forward`` and ``expose``).

* :meth:`Forwards.forward`: a TCP listener on ``127.0.0.1:LOCAL_PORT`` whose
  connections become Pilot streams to ``target:port`` (as ``ssh -L``);
* :meth:`Forwards.expose`: Pilot streams arriving on ``port`` (from trusted
  peers only: the stack's trust gate, as on every port) are connected to the
  TCP service ``host:host_port``.

Each connection is a :class:`Splice` of two :class:`Half` protocols, one on
TCP and one on the Pilot stream.  The accepting side is paused until the
other side is connected; then each transport is the other's streaming
producer, so a full send buffer on one side stops reading on the other
(nothing grows without bound), and a close on one side closes the other
once what it was given is sent.  Forwards live as long as the daemon (they
are not kept across restarts).
"""

from __future__ import annotations

from typing import Any, Callable

import attr
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocol, IProtocolFactory
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.errors import AlreadyExists, InvalidArgument, NotFound, PilotError

#: The only address a forward listens on: the forwarded stream is open to whoever reaches the listener.
LOOPBACK = "127.0.0.1"
#: Seconds to connect to an exposed TCP service.
TCP_CONNECT_TIMEOUT = 10.0


@attr.s(auto_attribs=True, eq=False)
class Counters:
    active: int = 0
    total: int = 0
    failed: int = 0
    bytes_to_peer: int = 0
    bytes_from_peer: int = 0

    def as_dict(self) -> dict[str, int]:
        return attr.asdict(self)


class Half(Protocol):
    """One side of a :class:`Splice`."""

    transport: Any = None

    def __init__(self, splice: Splice, accepting: bool) -> None:
        self.splice = splice
        self.accepting = accepting

    def connectionMade(self) -> None:
        self.splice.made(self)

    def dataReceived(self, data: bytes) -> None:
        self.splice.data(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.splice.lost(self)


class Splice:
    """
    Two connections joined: ``accepted`` (the side that came to us) and
    ``dialled`` (the side we open for it).  ``to_peer`` says which side is the
    local TCP one, for the byte counters.
    """

    log = Logger()

    def __init__(self, counters: Counters, tcp_accepted: bool) -> None:
        self.counters = counters
        self.tcp_accepted = tcp_accepted
        self.accepted = Half(self, accepting=True)
        self.dialled = Half(self, accepting=False)
        self.joined = False
        self.closed = False
        counters.active += 1
        counters.total += 1

    def made(self, half: Half) -> None:
        if half is self.accepted:
            half.transport.pauseProducing()  # until the other side is there
            return
        if self.closed:
            half.transport.loseConnection()
            return
        a, b = self.accepted.transport, self.dialled.transport
        a.registerProducer(b, True)
        b.registerProducer(a, True)
        self.joined = True
        a.resumeProducing()

    def data(self, half: Half, data: bytes) -> None:
        other = self.dialled if half is self.accepted else self.accepted
        if (half is self.accepted) == self.tcp_accepted:
            self.counters.bytes_to_peer += len(data)
        else:
            self.counters.bytes_from_peer += len(data)
        if other.transport is not None:
            other.transport.write(data)

    def dial_failed(self, failure: Failure) -> None:
        self.counters.failed += 1
        self.log.info("forwarded connection not made: {why}", why=failure.getErrorMessage())
        self.close()

    def lost(self, half: Half) -> None:
        other = self.dialled if half is self.accepted else self.accepted
        if other.transport is not None and not self.closed:
            if self.joined:
                # the lost side was the other's producer: left registered (and paused), a TCP
                # transport would resume it instead of closing once its buffer is written
                other.transport.unregisterProducer()
            other.transport.loseConnection()
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.counters.active -= 1
        if self.accepted.transport is not None:
            self.accepted.transport.loseConnection()


@attr.s(auto_attribs=True, eq=False)
class Forward:
    """``LOCAL_PORT`` on TCP to ``target:port`` on Pilot."""

    local_port: int
    bind: str
    target: str
    port: int
    listening: IListeningPort
    counters: Counters = attr.Factory(Counters)

    def as_dict(self) -> dict[str, Any]:
        return {"local": f"{self.bind}:{self.local_port}", "local_port": self.local_port, "target": self.target,
                "port": self.port, **self.counters.as_dict()}


@attr.s(auto_attribs=True, eq=False)
class Exposed:
    """Pilot ``port`` to TCP ``host:host_port``."""

    port: int
    host: str
    host_port: int
    listening: Any = None
    counters: Counters = attr.Factory(Counters)

    def as_dict(self) -> dict[str, Any]:
        return {"port": self.port, "service": f"{self.host}:{self.host_port}", "host": self.host,
                "host_port": self.host_port, **self.counters.as_dict()}


class _ForwardFactory(Factory):
    """TCP connections to a forward's local port: each dials the Pilot side."""

    def __init__(self, owner: Forwards) -> None:
        self.owner = owner
        self.forward: Forward | None = None  # set once listening

    def buildProtocol(self, addr: Any) -> Protocol | None:
        forward = self.forward
        if forward is None:
            return None
        splice = Splice(forward.counters, tcp_accepted=True)
        d = self.owner.connect(forward.target, forward.port, splice.dialled)
        d.addErrback(splice.dial_failed)
        return splice.accepted


class _DialledFactory(ClientFactory):
    def __init__(self, splice: Splice) -> None:
        self.splice = splice

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.splice.dialled

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.splice.dial_failed(reason)


class _ExposeFactory(Factory):
    """Pilot streams to an exposed port: each dials the TCP service."""

    def __init__(self, owner: Forwards, exposed: Exposed) -> None:
        self.owner = owner
        self.exposed = exposed

    def buildProtocol(self, addr: Any) -> Protocol:
        splice = Splice(self.exposed.counters, tcp_accepted=False)
        self.owner.reactor.connectTCP(self.exposed.host, self.exposed.host_port, _DialledFactory(splice),
                                      timeout=TCP_CONNECT_TIMEOUT)
        return splice.accepted


class Forwards:
    """
    The daemon's forwards and exposed ports.  ``reactor`` gives TCP
    (``listenTCP``, ``connectTCP``); ``connect(target, port, protocol)`` opens
    a Pilot stream (a Deferred; :meth:`pilot.services.api.NodeAPIImpl.connect`);
    ``listen(port, factory)`` binds a Pilot port (``Stack.listen``).
    """

    log = Logger()

    def __init__(self, reactor: Any, connect: Callable[[str, int, IProtocol], Deferred[Any]],
                 listen: Callable[[int, IProtocolFactory], Any]) -> None:
        self.reactor = reactor
        self.connect = connect
        self.listen = listen
        self.forwards: dict[int, Forward] = {}
        self.exposed: dict[int, Exposed] = {}

    def forward(self, local_port: int, target: str, port: int) -> dict[str, Any]:
        """Listen on ``127.0.0.1:local_port`` (0: any free port; the result says which)."""
        bind = LOOPBACK
        if local_port in self.forwards:
            raise AlreadyExists(f"local port {local_port} is already forwarded to "
                                f"{self.forwards[local_port].target}:{self.forwards[local_port].port}",
                                f"`pilotctl unforward {local_port}` first")
        factory = _ForwardFactory(self)
        try:
            listening = self.reactor.listenTCP(local_port, factory, interface=bind)
        except CannotListenError as e:
            raise AlreadyExists(f"cannot listen on {bind}:{local_port}: {e.socketError}",
                                "choose another local port (0: any free one)") from None
        bound = listening.getHost().port
        forward = Forward(bound, bind, target, port, listening)
        factory.forward = forward
        self.forwards[bound] = forward
        self.log.info("forwarding {bind}:{local} to {target}:{port}", bind=bind, local=bound, target=target,
                      port=port)
        return forward.as_dict()

    def unforward(self, local_port: int) -> dict[str, Any]:
        forward = self.forwards.pop(local_port, None)
        if forward is None:
            raise NotFound(f"local port {local_port} is not forwarded", "`pilotctl forward --list` lists them")
        forward.listening.stopListening()
        return {**forward.as_dict(), "status": "removed"}

    def expose(self, port: int, host: str, host_port: int) -> dict[str, Any]:
        if not 1 <= host_port <= 0xFFFF:
            raise InvalidArgument(f"TCP port {host_port} is out of range", "a TCP port is 1 to 65535")
        if port in self.exposed:
            raise AlreadyExists(f"Pilot port {port} is already exposed", f"`pilotctl unexpose {port}` first")
        exposed = Exposed(port, host, host_port)
        exposed.listening = self.listen(port, _ExposeFactory(self, exposed))  # PilotError when taken
        self.exposed[port] = exposed
        self.log.info("exposing Pilot port {port} as {host}:{host_port}", port=port, host=host,
                      host_port=host_port)
        return exposed.as_dict()

    def unexpose(self, port: int) -> dict[str, Any]:
        exposed = self.exposed.pop(port, None)
        if exposed is None:
            raise NotFound(f"Pilot port {port} is not exposed", "`pilotctl forward --list` lists them")
        exposed.listening.close()
        return {**exposed.as_dict(), "status": "removed"}

    def list(self) -> dict[str, Any]:
        return {"forwards": [f.as_dict() for _, f in sorted(self.forwards.items())],
                "exposed": [e.as_dict() for _, e in sorted(self.exposed.items())]}

    def close_all(self) -> None:
        for local_port in list(self.forwards):
            self.unforward(local_port)
        for port in list(self.exposed):
            try:
                self.unexpose(port)
            except PilotError:
                pass
