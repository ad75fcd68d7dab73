# -*- test-case-name: tests.test_endpoints -*-
"""
Twisted endpoints over a running daemon's control socket (``docs/api.md``).

:class:`DaemonClientEndpoint` opens a Pilot stream to ``target:port`` with the
control socket's ``connect``; :class:`DaemonServerEndpoint` binds a Pilot port
with ``listen`` and takes each accepted stream with ``attach``
(``docs/control.md``).  Both speak the control protocol as a Twisted protocol
(:class:`ControlChannel`) on a Unix connection: nothing blocks the reactor.

Once the daemon has answered, the Unix connection carries the stream's bytes
both ways, so the application's protocol is given that connection's own
transport (wrapped by :class:`ControlStreamTransport` only to answer
``getPeer``/``getHost`` with :class:`~pilot.stack.transport.PilotAddress`).
Back-pressure is therefore end to end: pausing the transport stops reading the
Unix socket, the daemon's bridge then pauses the Pilot connection (its window
closes), and a full Unix send buffer pauses a registered producer.

The string parsers (:class:`ClientParser`, :class:`ServerParser`) are what
``twisted/plugins/pilot_endpoints.py`` instantiates::

    clientFromString(reactor, "pilot:agent-b:1000")
    clientFromString(reactor, "pilot:0:0000.0000.0005:1000:socket=/tmp/a/pilot.sock")
    serverFromString(reactor, "pilot:1000")
    serverFromString(reactor, "pilot:1000:home=/tmp/b")

Errors are :class:`~pilot.errors.PilotError` subclasses with the CLI's codes.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.interfaces import (IConsumer, IHalfCloseableProtocol, IListeningPort, IPushProducer,
                                         IProtocol, IProtocolFactory, IStreamClientEndpoint,
                                         IStreamClientEndpointStringParserWithReactor, IStreamServerEndpoint,
                                         IStreamServerEndpointStringParser, ITransport)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from pilot.address import Address
from pilot.control_client import SOCKET_NAME, START_HINT, connect_request, default_socket_path
from pilot.errors import ConnectionFailed, InvalidArgument, MalformedFrame, NotRunning, PilotError, error_for
from pilot.stack.transport import PilotAddress
from pilot.wire.control import frame_decoder
from pilot.wire.registry import encode_frame

#: Seconds to wait for the control socket to accept a connection.
CONNECT_TIMEOUT = 10.0
#: The address :meth:`ControlStreamTransport.getHost` gives: the daemon does not tell its own.
UNKNOWN = Address(0, 0)

_WAITING, _RAW, _EVENTS, _CLOSED = "waiting", "raw", "events", "closed"


def pilot_address(text: Any, port: Any) -> PilotAddress:
    """A :class:`PilotAddress` from the daemon's text address and port (unknown parts: 0)."""
    try:
        address = Address.parse(str(text))
    except (ValueError, MalformedFrame):
        address = UNKNOWN
    return PilotAddress(address, port if isinstance(port, int) and not isinstance(port, bool) else 0)


@implementer(ITransport, IConsumer, IPushProducer)
class ControlStreamTransport:
    """The Unix connection's transport, answering with Pilot addresses; everything else is the Unix one's."""

    def __init__(self, unix: Any, peer: PilotAddress, host: PilotAddress) -> None:
        self.unix = unix
        self._peer = peer
        self._host = host

    def getPeer(self) -> PilotAddress:
        return self._peer

    def getHost(self) -> PilotAddress:
        return self._host

    def write(self, data: bytes) -> None:
        self.unix.write(data)

    def writeSequence(self, data: Any) -> None:
        self.unix.writeSequence(data)

    def loseConnection(self) -> None:
        self.unix.loseConnection()

    def abortConnection(self) -> None:
        self.unix.abortConnection()

    def loseWriteConnection(self) -> None:
        """Half-close: the daemon sends the Pilot FIN and keeps the stream open for the answer."""
        self.unix.loseWriteConnection()

    def pauseProducing(self) -> None:
        self.unix.pauseProducing()

    def resumeProducing(self) -> None:
        self.unix.resumeProducing()

    def stopProducing(self) -> None:
        self.unix.stopProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.unix.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.unix.unregisterProducer()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unix, name)


@implementer(IHalfCloseableProtocol)
class ControlChannel(Protocol):
    """
    One control connection: sends one request, then waits for its reply
    (:attr:`replied`, a Deferred of the result or of the PilotError).

    After the reply the connection is either a raw stream
    (:meth:`become_raw`, for ``connect`` and ``attach``) or a stream of event
    frames (:meth:`receive_events`, for ``listen``).
    """

    log = Logger()
    transport: Any = None

    def __init__(self, cmd: str, args: dict[str, Any], after: bytes = b"") -> None:
        self.cmd = cmd
        self.args = args
        #: Sent right behind the request (a stream's first bytes).
        self.after = after
        self.replied: Deferred[Any] = Deferred(lambda d: self.abort())
        self.lost: Deferred[None] = Deferred()
        self._decoder = frame_decoder()
        self._state = _WAITING
        self._app: IProtocol | None = None
        self._on_event: Callable[[dict[str, Any]], None] | None = None
        self._events: list[dict[str, Any]] = []

    def connectionMade(self) -> None:
        self.transport.write(encode_frame({**self.args, "id": 1, "cmd": self.cmd}) + self.after)

    def abort(self) -> None:
        if self.transport is not None and self._state != _CLOSED:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._app is not None:
            self._app.dataReceived(data)
            return
        self._decoder.receive(data)
        while self._state in (_WAITING, _EVENTS):
            try:
                frame = self._decoder.next_frame()
            except MalformedFrame as e:
                self._broken(e.reason)
                return
            if frame is None:
                return
            if isinstance(frame, MalformedFrame):
                self._broken(frame.reason)
                return
            if self._state == _WAITING:
                if "event" not in frame:
                    self._reply(frame)
            elif self._on_event is not None:
                self._deliver(frame)
            else:
                self._events.append(frame)

    def _reply(self, frame: dict[str, Any]) -> None:
        self._state = _EVENTS
        if frame.get("ok") is True:
            self.replied.callback(frame.get("result"))
            return
        error = frame.get("error")
        error = error if isinstance(error, dict) else {}
        self.replied.errback(error_for(error.get("code", "internal"), str(error.get("message", "failed")),
                                       error.get("hint") if isinstance(error.get("hint"), str) else None))
        self.transport.loseConnection()

    def _broken(self, reason: str) -> None:
        self.log.warn("the daemon sent a bad control frame: {reason}", reason=reason)
        if self._state == _WAITING:
            self._state = _EVENTS
            self.replied.errback(PilotError(f"the daemon sent a bad control frame: {reason}", code=None))
        self.transport.loseConnection()

    def _deliver(self, frame: dict[str, Any]) -> None:
        assert self._on_event is not None
        try:
            self._on_event(frame)
        except Exception:
            self.log.failure("handling a control event failed")

    # --- after the reply ---------------------------------------------------------------

    def become_raw(self, protocol: IProtocol, peer: PilotAddress, host: PilotAddress) -> None:
        """Hand the connection to ``protocol``: from now on it carries the Pilot stream."""
        self._state = _RAW
        self._app = protocol
        protocol.makeConnection(ControlStreamTransport(self.transport, peer, host))
        rest = self._decoder.take_rest()
        if rest:
            protocol.dataReceived(rest)

    def receive_events(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        """Deliver the event frames (those already read first)."""
        self._on_event = on_event
        events, self._events = self._events, []
        for frame in events:
            self._deliver(frame)

    def readConnectionLost(self) -> None:
        if self._app is not None and IHalfCloseableProtocol.providedBy(self._app):
            self._app.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self._app is not None and IHalfCloseableProtocol.providedBy(self._app):
            self._app.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        was, self._state = self._state, _CLOSED
        if was == _WAITING and not self.replied.called:
            self.replied.errback(ConnectionFailed(
                f"the daemon closed the control connection before answering {self.cmd!r}",
                "the daemon may be stopping; `pilotctl daemon status` tells"))
        if self._app is not None:
            app, self._app = self._app, None
            app.connectionLost(reason)
        self.lost.callback(None)


def open_channel(reactor: Any, socket_path: str, cmd: str, args: dict[str, Any],
                 timeout: float = CONNECT_TIMEOUT,
                 after: bytes = b"") -> Deferred[tuple[ControlChannel, Any]]:
    """
    Connect to the control socket and send one request; fires with
    ``(channel, result)`` once answered.  Cancelling it (while connecting or
    waiting for the reply) closes the Unix connection.
    """
    channel = ControlChannel(cmd, args, after)
    d: Deferred[Any] = UNIXClientEndpoint(reactor, socket_path, timeout=timeout).connect(
        Factory.forProtocol(lambda: channel))

    def connect_failed(failure: Failure) -> Failure:
        if failure.check(ConnectingCancelledError):
            raise CancelledError(f"connecting to {socket_path} was cancelled")
        if failure.check(ConnectError):
            raise NotRunning(f"the daemon is not running (cannot connect to its control socket {socket_path}: "
                             f"{failure.getErrorMessage()})", START_HINT)
        return failure

    d.addErrback(connect_failed)
    d.addCallback(lambda _: channel.replied)
    d.addCallback(lambda result: (channel, result))
    return d


def socket_for(socket: str | None = None, home: str | None = None) -> str:
    """The control socket: ``socket``, else ``home/pilot.sock``, else :func:`default_socket_path`."""
    if socket:
        return socket
    if home:
        return os.path.join(os.path.expanduser(home), SOCKET_NAME)
    return default_socket_path()


# --- client ------------------------------------------------------------------------------------------

@implementer(IStreamClientEndpoint)
class DaemonClientEndpoint:
    """A Pilot stream to ``target:port`` through the daemon on ``socket_path`` (default: :func:`socket_for`)."""

    def __init__(self, reactor: Any, target: str, port: int, socket_path: str | None = None,
                 timeout: float = CONNECT_TIMEOUT, first: bytes = b"") -> None:
        self.reactor = reactor
        self.target = target
        self.port = port
        self.socket_path = socket_for(socket_path)
        self.timeout = timeout
        #: The connect request, and ``first``: written as the stream opens, before the protocol writes.
        self.args, self.first = connect_request(target, port, first)

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """Fires with the protocol once the stream is open; cancel it to give up."""
        d = open_channel(self.reactor, self.socket_path, "connect", self.args, self.timeout, self.first)
        return d.addCallback(self._connected, factory)

    def _connected(self, opened: tuple[ControlChannel, Any], factory: IProtocolFactory) -> IProtocol:
        channel, result = opened
        result = result if isinstance(result, dict) else {}
        peer = pilot_address(result.get("target"), self.port)
        protocol = factory.buildProtocol(peer)
        if protocol is None:
            channel.transport.loseConnection()
            raise ConnectionFailed(f"the factory {factory!r} built no protocol for {peer}")
        channel.become_raw(protocol, peer, PilotAddress(UNKNOWN, result.get("local_port", 0)))
        return protocol

    def __repr__(self) -> str:
        return f"DaemonClientEndpoint({self.target!r}, {self.port}, {self.socket_path!r})"


# --- server ------------------------------------------------------------------------------------------

@implementer(IListeningPort)
class DaemonListeningPort:
    """A ``listen`` on the daemon; each ``accepted`` event is attached on a connection of its own."""

    log = Logger()

    def __init__(self, reactor: Any, socket_path: str, port: int, channel: ControlChannel,
                 factory: IProtocolFactory, timeout: float) -> None:
        self.reactor = reactor
        self.socket_path = socket_path
        self.port = port
        self.channel = channel
        self.factory = factory
        self.timeout = timeout
        self.listening = True
        self.accepted = 0
        factory.doStart()
        channel.lost.addCallback(self._unbound)
        channel.receive_events(self._event)

    def _event(self, event: dict[str, Any]) -> None:
        conn_id = event.get("conn_id")
        if event.get("event") != "accepted" or not isinstance(conn_id, int) or not self.listening:
            return
        d = open_channel(self.reactor, self.socket_path, "attach", {"conn_id": conn_id}, self.timeout)
        d.addCallback(self._attached)
        d.addErrback(lambda f: self.log.failure("attaching accepted stream {conn_id} failed", f,
                                                conn_id=conn_id))

    def _attached(self, opened: tuple[ControlChannel, Any]) -> None:
        channel, result = opened
        result = result if isinstance(result, dict) else {}
        peer = pilot_address(result.get("from"), result.get("port"))
        protocol = self.factory.buildProtocol(peer) if self.listening else None
        if protocol is None:
            channel.transport.loseConnection()
            return
        self.accepted += 1
        channel.become_raw(protocol, peer, self.getHost())

    def _unbound(self, _: None) -> None:
        if self.listening:
            self.log.warn("the daemon closed the listen on Pilot port {port}", port=self.port)
            self.listening = False
            self.factory.doStop()

    def startListening(self) -> None:
        """Already listening: the daemon bound the port before this was made."""

    def stopListening(self) -> Deferred[None]:
        if not self.listening:
            return succeed(None)
        self.listening = False
        self.factory.doStop()
        self.channel.transport.loseConnection()
        lost: Deferred[None] = Deferred()
        self.channel.lost.addCallback(lambda _: lost.callback(None))
        return lost

    def getHost(self) -> PilotAddress:
        return PilotAddress(UNKNOWN, self.port)


@implementer(IStreamServerEndpoint)
class DaemonServerEndpoint:
    """Pilot port ``port`` bound through the daemon on ``socket_path`` (default: :func:`socket_for`)."""

    def __init__(self, reactor: Any, port: int, socket_path: str | None = None,
                 timeout: float = CONNECT_TIMEOUT) -> None:
        self.reactor = reactor
        self.port = port
        self.socket_path = socket_for(socket_path)
        self.timeout = timeout

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        d = open_channel(self.reactor, self.socket_path, "listen", {"port": self.port}, self.timeout)
        return d.addCallback(lambda opened: DaemonListeningPort(self.reactor, self.socket_path, self.port,
                                                                opened[0], factory, self.timeout))

    def __repr__(self) -> str:
        return f"DaemonServerEndpoint({self.port}, {self.socket_path!r})"


# --- endpoint strings ----------------------------------------------------------------------------------

def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise InvalidArgument(f"{text!r} is not a port number", "a Pilot port is 0 to 65535") from None
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"port {port} is out of range", "a Pilot port is 0 to 65535")
    return port


def _timeout(kwargs: dict[str, str]) -> float:
    try:
        return float(kwargs.get("timeout", CONNECT_TIMEOUT))
    except ValueError:
        raise InvalidArgument(f"timeout={kwargs['timeout']!r} is not a number of seconds") from None


_OPTIONS = {"socket", "home", "timeout"}


def _check_options(kwargs: dict[str, str]) -> None:
    unknown = set(kwargs) - _OPTIONS
    if unknown:
        raise InvalidArgument(f"unknown pilot endpoint option(s): {', '.join(sorted(unknown))}",
                              f"the options are {', '.join(sorted(_OPTIONS))}")


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class ClientParser:
    """
    ``pilot:TARGET:PORT[:socket=PATH][:home=DIR][:timeout=S]``.  ``TARGET`` is
    a hostname, a node id or a text address (its colons need no escaping: the
    last field is the port).
    """

    prefix = "pilot"

    def parseStreamClient(self, reactor: Any, *fields: object, **options: object) -> IStreamClientEndpoint:
        args = [str(f) for f in fields]
        kwargs = {k: str(v) for k, v in options.items()}
        _check_options(kwargs)
        if len(args) < 2:
            raise InvalidArgument("a pilot client endpoint is pilot:TARGET:PORT", "e.g. pilot:agent-b:1000")
        target, port = ":".join(args[:-1]), _port(args[-1])
        return DaemonClientEndpoint(reactor, target, port, socket_for(kwargs.get("socket"), kwargs.get("home")),
                                    _timeout(kwargs))


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ServerParser:
    """``pilot:PORT[:socket=PATH][:home=DIR][:timeout=S]``."""

    prefix = "pilot"

    def parseStreamServer(self, reactor: Any, *fields: object, **options: object) -> IStreamServerEndpoint:
        args = [str(f) for f in fields]
        kwargs = {k: str(v) for k, v in options.items()}
        _check_options(kwargs)
        if len(args) != 1:
            raise InvalidArgument("a pilot server endpoint is pilot:PORT", "e.g. pilot:1000")
        return DaemonServerEndpoint(reactor, _port(args[0]), socket_for(kwargs.get("socket"), kwargs.get("home")),
                                    _timeout(kwargs))
