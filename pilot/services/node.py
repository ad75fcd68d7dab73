# -*- test-case-name: tests.node.test_service -*-
"""
The node daemon: a ``MultiService`` of the ports around one sans-I/O
:class:`pilot.node.Node` (docs/architecture.md).

* :class:`TunnelPort`: the UDP socket (``protocols.tunnel``), tunnel and
  beacon traffic, on the port of the last run when it is free;
* :class:`NodeRunner`: starts the node (port 444 of its stack, the beacon's
  discovery, registration) and stops it (deregistration);
* :class:`ControlSocket`: the UNIX control socket (``protocols.control_server``)
  serving ``services.api``, and the pid file.

The I/O the node is given: :class:`RegistryConnector` (TCP or TLS to the
registry) and :class:`RouteProber` (which local address reaches the beacon).
The reactor is always passed in.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import sys
from typing import Any, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ClientCreator
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from pilot.endpoint import Endpoint, parse_host_port, parse_listen
from pilot.errors import ErrorCode
from pilot.identity import Identity
from pilot.interfaces import IRegistryConnector, IRegistryLink, IRouteProber
from pilot.memory import release_free_memory
from pilot.node import Node
from pilot.nodeconfig import NodeSettings
from pilot.persist import StateFileError, atomic_write_bytes
from pilot.protocols.control_server import ControlServerFactory
from pilot.protocols.handshake import HandshakeFactory, OneMessage
from pilot.protocols.registry_client import RegistryClientFactory
from pilot.protocols.tunnel import NodeDatagramProtocol
from pilot.services.api import NodeAPIImpl
from pilot.services.apps import Apps, make_apps
from pilot.services.busypoll import BusyPollService
from pilot.trust import TrustStore
from pilot.wire.handshake import HANDSHAKE_PORT

UDP_BUFFER = 4 * 1024 * 1024
#: Seconds between returns of freed heap memory to the system (the first: at start, when the
#: start-up's temporaries are gone; ``pilot.memory``).
TRIM_INTERVAL = 60.0


#: Linux's values (<linux/in.h>); the socket module does not name them.
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)


def dont_fragment(udp: Any) -> bool:
    """
    Set don't-fragment on the tunnel socket (Linux: ``IP_PMTUDISC_DO``): a
    datagram larger than the path is refused (EMSGSIZE, a "too big" signal for
    the path search in ``pilot.machines.tunnel.pmtu``) or dropped by a router
    with an ICMP message, never split into IP fragments that a middlebox may
    drop.  Elsewhere the kernel's default stays (``docs/tunnel.md``).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        udp.socket.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    except (AttributeError, OSError):
        return False
    return True


def max_datagram(environ: Any) -> Optional[int]:
    """``PILOT_MAX_DATAGRAM``: the largest tunnel datagram the path search may try (benchmarks, known links)."""
    try:
        value = int(environ.get("PILOT_MAX_DATAGRAM", ""))
    except ValueError:
        return None
    return value if value > 0 else None


def udp_batching(environ: Any) -> bool:
    """``PILOT_UDP_BATCH=0`` keeps the tunnel socket at one datagram a system call (``docs/tunnel.md``)."""
    return str(environ.get("PILOT_UDP_BATCH", "1")).strip() != "0"


class NodeStartupError(Exception):
    def __init__(self, message: str, hint: str, code: ErrorCode = ErrorCode.invalid_argument) -> None:
        super().__init__(message)
        self.message, self.hint, self.code = message, hint, code


@implementer(IRegistryConnector)
class RegistryConnector:
    """TCP (TLS when a fingerprint is pinned) to the registry, one session per ``connect``."""

    def __init__(self, reactor: Any, address: str, fingerprint: Optional[str] = None) -> None:
        self.reactor = reactor
        self.host, self.port = parse_host_port(address)
        self.fingerprint = fingerprint

    def connect(self, link: IRegistryLink) -> "Deferred[Any]":
        factory = RegistryClientFactory(on_event=link.event_received, on_lost=link.connection_lost)
        d: Deferred[Any]
        if not self.fingerprint and _is_address(self.host):
            # An address, plain TCP: nothing to resolve.  HostnameEndpoint would resolve it anyway in
            # the reactor's thread pool (a thread) and import twisted.internet.endpoints and idna: about
            # 1 MB of an idle node (docs/performance.md).  ClientCreator's Deferred fires once the
            # protocol has its transport and cancels the attempt when cancelled, as an endpoint's does.
            d = ClientCreator(self.reactor, factory.buildProtocol, None).connectTCP(self.host, self.port, timeout=5)
        else:
            from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
            endpoint: Any = HostnameEndpoint(self.reactor, self.host, self.port, timeout=5)
            if self.fingerprint:
                from pilot.tls import client_options
                endpoint = wrapClientTLS(client_options(fingerprint=self.fingerprint), endpoint)
            d = endpoint.connect(factory)
        return d.addCallback(self._learn_lan_address, link)

    @staticmethod
    def _learn_lan_address(client: Any, link: IRegistryLink) -> Any:
        # the address our LAN gave us: the source of our connection to the registry
        transport = getattr(client, "transport", None)
        host = transport.getHost() if transport is not None else None
        if host is not None and getattr(host, "host", None):
            link.lan_address_learned(host.host)
        return client


def _is_address(host: str) -> bool:
    """Is ``host`` an IPv4 or IPv6 address (not a name to resolve)?"""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IRouteProber)
class RouteProber:
    """A UDP ``connect`` only looks up the route: nothing is sent."""

    def source_for(self, destination: Endpoint) -> Optional[str]:
        family = socket.AF_INET6 if ":" in destination[0] else socket.AF_INET
        try:
            probe = socket.socket(family, socket.SOCK_DGRAM)
        except OSError:
            return None
        try:
            probe.connect(destination)
            return str(probe.getsockname()[0])
        except OSError:
            return None  # no route at all (the network is down): nothing to compare
        finally:
            probe.close()


class MemoryTrimmer(Service):
    """Returns freed heap memory to the system at start and every ``TRIM_INTERVAL`` (``pilot.memory``)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._loop: Optional[LoopingCall] = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(release_free_memory)
        self._loop.clock = self.reactor
        self._loop.start(TRIM_INTERVAL, now=True)

    def stopService(self) -> None:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()


class TunnelPort(Service):
    """
    The tunnel socket.  With no fixed port (``:0``) the port of the last run
    is taken again when it is free: peers and NAT mappings that still point
    at it keep working across a restart (a reference peer cannot follow a
    move until it sends to us again).
    """

    log = Logger()

    def __init__(self, reactor: Any, protocol: NodeDatagramProtocol, listen: str, home: str,
                 batching: bool = True) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.batching = batching
        self.host, self.port = parse_listen(listen)
        self.home = home
        self.remembered = os.path.join(home, "tunnel.port")
        self.listening: Any = None

    def startService(self) -> None:
        super().startService()
        os.makedirs(self.home, mode=0o700, exist_ok=True)
        self.listening = udp = self._listen()
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                udp.socket.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER)
            except (AttributeError, OSError):
                pass
        dont_fragment(udp)
        if self.batching:
            gso, gro = self.protocol.batch(self.reactor)
            self.log.debug("tunnel socket: GSO {gso}, GRO {gro}", gso=gso, gro=gro)

    def _listen(self) -> Any:
        if self.port == 0:
            try:
                with open(self.remembered) as f:
                    previous = int(f.read().strip())
                if 0 < previous < 65536:
                    try:
                        return self.reactor.listenUDP(previous, self.protocol, interface=self.host,
                                                      maxPacketSize=65535)
                    except CannotListenError:
                        pass
            except (OSError, ValueError):
                pass
        udp = self.reactor.listenUDP(self.port, self.protocol, interface=self.host, maxPacketSize=65535)
        if self.port == 0:
            try:
                atomic_write_bytes(self.remembered, f"{udp.getHost().port}\n".encode(), mode=0o600)
            except OSError:
                pass
        return udp

    def stopService(self) -> "Deferred[Any]":
        super().stopService()
        listening, self.listening = self.listening, None
        return maybeDeferred(listening.stopListening) if listening is not None else succeed(None)


class ControlSocket(Service):
    """The control socket (mode 0600) and the pid file; a live daemon on the socket is an error."""

    def __init__(self, reactor: Any, api: NodeAPIImpl, settings: NodeSettings) -> None:
        self.reactor = reactor
        self.api = api
        self.path = settings.socket
        self.pid_path = settings.pid_path
        self.listening: Any = None

    def startService(self) -> None:
        super().startService()
        _remove_stale_socket(self.path)
        self.listening = self.reactor.listenUNIX(self.path, ControlServerFactory(self.api, self.reactor),
                                                 mode=0o600)
        atomic_write_bytes(self.pid_path, f"{os.getpid()}\n".encode(), mode=0o644)

    def stopService(self) -> "Deferred[Any]":
        super().stopService()
        try:
            os.unlink(self.pid_path)
        except OSError:
            pass
        listening, self.listening = self.listening, None
        return maybeDeferred(listening.stopListening) if listening is not None else succeed(None)


def _remove_stale_socket(path: str) -> None:
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody answers: a crashed daemon's leftover
    else:
        raise NodeStartupError(f"another daemon answers on {path}", "`pilotctl daemon stop` stops it",
                               ErrorCode.already_exists)
    finally:
        probe.close()


class NodeRunner(Service):
    """Starts the node once its socket is bound; stopping it deregisters."""

    log = Logger()

    def __init__(self, node: Node, settings: NodeSettings, apps: Apps) -> None:
        self.node = node
        self.settings = settings
        self.apps = apps

    def startService(self) -> None:
        super().startService()
        beacons = [self._resolve(*parse_host_port(entry)) for entry in self.settings.beacons]
        self.node.stack.listen(HANDSHAKE_PORT, HandshakeFactory(self.node.trust))
        self.apps.listen(self.node.stack)
        self.log.info("Node {address} starting: tunnel on UDP {udp}, control socket {sock}, "
                      "registry {registry}, beacon {beacon}", address=str(self.node.identity.address),
                      udp=self.node.local_port(), sock=self.settings.socket, registry=self.settings.registry,
                      beacon=self.settings.beacon)
        self.node.start(*beacons)

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        return self.node.stop()

    def _resolve(self, host: str, port: int) -> Endpoint:
        host = host or "127.0.0.1"
        if _is_address(host):
            # as getaddrinfo would give it, without getaddrinfo's idna codec for a str (its import: 0.1 MB)
            return (str(ipaddress.ip_address(host)), port)
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError:
            self.log.warn("cannot resolve the beacon host {host}; beacon features are off", host=host)
            return (host, port)
        family, _, _, _, sockaddr = info[0]
        return (str(sockaddr[0]), int(sockaddr[1]))


class NodeService(MultiService):
    """The tunnel port, the node, the control socket: started in this order, stopped in reverse."""

    log = Logger()

    def __init__(self, settings: NodeSettings, reactor: Any) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        try:
            identity = Identity.load(settings.identity)
        except FileNotFoundError:
            raise NodeStartupError(f"no identity at {settings.identity}",
                                   "run `pilotctl init` first", ErrorCode.not_found) from None
        except StateFileError as e:
            raise NodeStartupError(f"cannot use the identity {e}", "restore it from a backup",
                                   ErrorCode.malformed) from None
        # no trust file at all (not a damaged one: that refuses to start): trust comes back
        # from our signed statements at the registry (docs/trust.md)
        restore_trust = not os.path.lexists(settings.trust_path)
        try:
            trust_store = TrustStore.load(settings.trust_path)
        except StateFileError as e:
            raise NodeStartupError(f"cannot use the trust store {e}", "restore it or move it aside",
                                   ErrorCode.malformed) from None
        self.udp = NodeDatagramProtocol()
        self.node = Node(
            identity=identity, trust_store=trust_store,
            save_trust=functools.partial(trust_store.save, settings.trust_path), clock=reactor,
            sender=self.udp, servers=settings.registries,
            connector=[RegistryConnector(reactor, registry, pin)
                       for registry, pin in zip(settings.registries, settings.fingerprints)],
            prober=RouteProber(), one_message=OneMessage, hostname=settings.hostname, public=settings.public,
            tags=settings.tags, heartbeat=settings.heartbeat, auto_approve=settings.auto_approve,
            restore_trust=restore_trust, max_datagram=max_datagram(os.environ))
        self.udp.wire(beacon=self.node, frames=self.node.tunnels)
        apps = make_apps(settings.home, reactor.seconds)
        self.api = NodeAPIImpl(self.node, reactor, settings, self.udp.counters, apps)
        TunnelPort(reactor, self.udp, settings.listen, settings.home,
                   udp_batching(os.environ)).setServiceParent(self)
        NodeRunner(self.node, settings, apps).setServiceParent(self)
        ControlSocket(reactor, self.api, settings).setServiceParent(self)
        MemoryTrimmer(reactor).setServiceParent(self)
        # the epoll reactor's lean pass, and its short poll unless --busy-poll 0 (pilot/services/busypoll.py)
        BusyPollService(reactor, window=settings.busy_poll).setServiceParent(self)
        if settings.metrics is not None:
            # imported here: twisted.web and prometheus_client only when asked for
            from pilot.services.web import NodeMetricsHTTP
            NodeMetricsHTTP(settings.metrics, self.api.info, reactor).setServiceParent(self)
