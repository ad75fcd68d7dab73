# -*- test-case-name: tests.integration.test_node_process -*-
"""
The node daemon: one ``MultiService`` wiring the pieces together.

* one UDP socket (``protocols.tunnel``) for the tunnel and the beacon;
* ``machines.registration``: the registry session (register, heartbeat,
  events, reconnect with jittered backoff);
* ``machines.tunnel``: authenticated, encrypted tunnels per peer;
* ``stack``: connections and datagrams on virtual ports, gated by trust;
* ``machines.trust``: handshakes, approvals, the trust store;
* ``services.peers``: names, endpoints and keys of other nodes;
* the control socket (``protocols.control_server``) serving ``services.api``.

The beacon tells us our public endpoint (Discover); we register that, keep
the NAT mapping alive with a signed Discover after every heartbeat, and
re-register at once when it changes (an IP change).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.address import Address
from pilot.endpoint import Endpoint, format_endpoint, parse_endpoint, parse_host_port, parse_listen
from pilot.errors import ErrorCode, MalformedFrame, NotFound
from pilot.identity import Identity
from pilot.machines.path import Paths
from pilot.machines.registration import Registration
from pilot.machines.trust import TrustMachine
from pilot.machines.tunnel import Tunnels
from pilot.nodeconfig import NodeSettings
from pilot.persist import StateFileError, atomic_write_bytes
from pilot.protocols.control_server import ControlServerFactory
from pilot.protocols.registry_client import RegistryClientFactory
from pilot.protocols.tunnel import NodeDatagramProtocol
from pilot.services.peers import PeerDirectory
from pilot.stack import Stack
from pilot.trust import TrustStore
from pilot.wire import beacon as bw
from pilot.wire.handshake import HANDSHAKE_PORT, MAX_MESSAGE, decode as decode_handshake
from pilot.wire.packet import Packet
from pilot.wire.registry import SIGNER_FIELD

#: Startup Discovers are repeated this often until the beacon answers.
DISCOVER_RETRY = 1.0
#: How often the node checks which local address routes to the beacon (no
#: packet is sent): a change of network shows within this long.
ROUTE_CHECK = 1.0
#: How often the node asks the beacon (unsigned) what its public endpoint is,
#: for changes only the NAT knows of (the reference: only every 30 s).
DISCOVER_PROBE = 15.0
#: The first registration waits at most this long for the beacon's answer.
REGISTER_WAIT = 0.5
UDP_BUFFER = 4 * 1024 * 1024


class NodeStartupError(Exception):
    def __init__(self, message: str, hint: str, code: ErrorCode = ErrorCode.invalid_argument) -> None:
        super().__init__(message)
        self.message, self.hint, self.code = message, hint, code


class NodeService(MultiService):
    log = Logger()

    def __init__(self, settings: NodeSettings, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor
            reactor = global_reactor
        self.settings = settings
        self.reactor = reactor
        try:
            self.identity = Identity.load(settings.identity)
        except FileNotFoundError:
            raise NodeStartupError(f"no identity at {settings.identity}",
                                   "run `pilotctl init` first", ErrorCode.not_found) from None
        except StateFileError as e:
            raise NodeStartupError(f"cannot use the identity {e}", "restore it from a backup",
                                   ErrorCode.malformed) from None
        try:
            self.trust_store = TrustStore.load(settings.trust_path)
        except StateFileError as e:
            raise NodeStartupError(f"cannot use the trust store {e}", "restore it or move it aside",
                                   ErrorCode.malformed) from None
        self.own_id: int = self.identity.address.node
        self.registry_host, self.registry_port = parse_host_port(settings.registry)
        self.beacon_host, self.beacon_port = parse_host_port(settings.beacon)
        self.beacon_addr: Optional[Endpoint] = None
        self.public_endpoint: Optional[Endpoint] = None
        self.lan_host: Optional[str] = None
        self.started_at: Optional[float] = None
        self._discover_call: Any = None
        self._register_call: Any = None
        self._probe_call: Any = None
        self._route_source: Optional[str] = None
        self._last_probe = 0.0
        self._ports: list[Any] = []

        self.udp = NodeDatagramProtocol(self, self._is_beacon)
        self.peers = PeerDirectory(reactor, self._registry_request, lambda: self.own_id, self._pinned_key,
                                   lambda node, endpoint: self.paths.endpoint_learned(node, endpoint))
        self.tunnels = Tunnels(
            node_id=lambda: self.own_id, identity=self.identity, send_datagram=self.udp.send,
            deliver=self._deliver, expected_key=self.peers.key, clock=reactor,
            beacon=lambda: self.beacon_addr, peer_unreachable=self._peer_unreachable,
            endpoint_changed=self.peers.seen_at,
            direct_frame=lambda node, endpoint: self.paths.direct_frame(node, endpoint),
            relayed_frame=lambda node: self.paths.relayed_frame(node))
        self.paths = Paths(
            tunnels=self.tunnels, send_datagram=self.udp.send, beacon=lambda: self.beacon_addr,
            node_id=lambda: self.own_id, sign=self.identity.sign, clock=reactor,
            path_changed=lambda node, state, endpoint: self.log.info(
                "path to node {node}: {state} {endpoint}", node=node, state=state, endpoint=endpoint))
        self.stack = Stack(reactor, lambda: Address(0, self.own_id), self._send_packet, self._is_trusted)
        self.trust = TrustMachine(
            node_id=self.own_id, public_key=self.identity.public_key, sign=self.identity.sign,
            store=self.trust_store, save=self._save_trust, send_direct=self._send_direct,
            registry_request=self._trust_request, lookup_key=self._lookup_key, clock=reactor,
            rules=settings.auto_approve, peer_info=self.peers.lookup, trust_ended=self._trust_ended)
        self.registration = Registration(
            connect=self._connect_registry, identity=self.identity, clock=reactor,
            endpoint=self._endpoint_text, register_extra=self._register_extra, registered=self._registered, unregistered=self._unregistered,
            event=self._registry_event, heartbeat_ok=self._heartbeat_ok, hostname=settings.hostname,
            public=settings.public, tags=list(settings.tags), heartbeat_interval=settings.heartbeat)
        from pilot.services.api import NodeAPIImpl
        self.api = NodeAPIImpl(self)

    # --- lifecycle -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.started_at = self.reactor.seconds()
        os.makedirs(self.settings.home, mode=0o700, exist_ok=True)
        self.beacon_addr = self._resolve(self.beacon_host, self.beacon_port)
        udp = self._listen_udp()
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                udp.socket.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER)
            except (AttributeError, OSError):
                pass
        self._ports.append(udp)
        self._remove_stale_socket(self.settings.socket)
        control = self.reactor.listenUNIX(self.settings.socket, ControlServerFactory(self.api, self.reactor),
                                          mode=0o600)
        self._ports.append(control)
        self._write_pid()
        self.stack.listen(HANDSHAKE_PORT, Factory.forProtocol(lambda: _HandshakeReceiver(self)))
        self.log.info("Node {address} starting: tunnel on UDP {udp}, control socket {sock}, "
                      "registry {registry}, beacon {beacon}", address=str(self.identity.address),
                      udp=udp.getHost().port, sock=self.settings.socket, registry=self.settings.registry,
                      beacon=self.settings.beacon)
        self._discover()
        # register once the beacon told us our public endpoint (or after a
        # short wait without it), so the first registration is the right one
        self._register_call = self.reactor.callLater(REGISTER_WAIT, self._start_registration)

    def _start_registration(self) -> None:
        if self._register_call is not None and self._register_call.active():
            self._register_call.cancel()
        self._register_call = None
        if self.running and self.registration.state == "idle":
            self.registration.start()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for call in (self._discover_call, self._register_call, self._probe_call):
            if call is not None and call.active():
                call.cancel()
        stopped = self.registration.stop()

        def close(_: object) -> Any:
            self.stack.stop()
            self.tunnels.stop()
            self.paths.stop()
            waits = [maybeDeferred(p.stopListening) for p in self._ports]
            self._ports = []
            for path in (self.settings.pid_path,):
                try:
                    os.unlink(path)
                except OSError:
                    pass
            return DeferredList(waits, consumeErrors=True)

        return stopped.addBoth(close)

    def _listen_udp(self) -> Any:
        """
        Bind the tunnel socket.  With no fixed port (``:0``) the port of the
        last run is taken again when it is free: peers and NAT mappings that
        still point at it keep working across a restart (a reference peer
        cannot follow a move until it sends to us again).
        """
        host, port = parse_listen(self.settings.listen)
        remembered = os.path.join(self.settings.home, "tunnel.port")
        if port == 0:
            try:
                with open(remembered) as f:
                    previous = int(f.read().strip())
                if 0 < previous < 65536:
                    try:
                        udp = self.reactor.listenUDP(previous, self.udp, interface=host, maxPacketSize=65535)
                    except CannotListenError:
                        pass
                    else:
                        return udp
            except (OSError, ValueError):
                pass
        udp = self.reactor.listenUDP(port, self.udp, interface=host, maxPacketSize=65535)
        if port == 0:
            try:
                atomic_write_bytes(remembered, f"{udp.getHost().port}\n".encode(), mode=0o600)
            except OSError:
                pass
        return udp

    def _resolve(self, host: str, port: int) -> Endpoint:
        try:
            info = socket.getaddrinfo(host or "127.0.0.1", port, type=socket.SOCK_DGRAM)
        except OSError:
            self.log.warn("cannot resolve the beacon host {host}; beacon features are off", host=host)
            return (host, port)
        family, _, _, _, sockaddr = info[0]
        return (sockaddr[0], sockaddr[1])

    def _remove_stale_socket(self, path: str) -> None:
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

    def _write_pid(self) -> None:
        atomic_write_bytes(self.settings.pid_path, f"{os.getpid()}\n".encode(), mode=0o644)

    # --- the beacon ------------------------------------------------------------------------

    def _is_beacon(self, source: Endpoint) -> bool:
        return self.beacon_addr is not None and (source[0], source[1]) == self.beacon_addr

    def _discover(self) -> None:
        """Ask the beacon for our public endpoint; signed once we know our id (records it there)."""
        self._discover_call = None
        if self.beacon_addr is None or not self.running:
            return
        base = bw.Discover(self.own_id if self.registration.node_id is not None else 0).base
        if self.registration.node_id is not None:
            data = bw.with_proof(base, self.identity.sign, int(self.reactor.seconds() * 1000), os.urandom(8))
        else:
            data = base
        self.udp.send(data, self.beacon_addr)
        if self.public_endpoint is None:
            self._discover_call = self.reactor.callLater(DISCOVER_RETRY, self._discover)
        elif self._probe_call is None:
            self._last_probe = self.reactor.seconds()
            self._probe_call = self.reactor.callLater(ROUTE_CHECK, self._probe)

    def _probe(self) -> None:
        """
        Watch for our own IP changing, cheaply.  Every ``ROUTE_CHECK`` seconds
        ask the kernel which local address reaches the beacon (a UDP
        ``connect`` only looks up the route: nothing is sent); when it changed
        (another network, a new lease), ask the beacon at once.  Every
        ``DISCOVER_PROBE`` seconds ask the beacon anyway (unsigned: it only
        answers), which catches a NAT that changed our public address alone and
        keeps our mapping to the beacon open for relays.
        """
        self._probe_call = None
        if self.beacon_addr is None or not self.running:
            return
        now = self.reactor.seconds()
        local = _route_source(self.beacon_addr)
        moved = local is not None and self._route_source is not None and local != self._route_source
        if local is not None:
            self._route_source = local
        if moved or now - self._last_probe >= DISCOVER_PROBE:
            if moved:
                self.log.info("our local address is now {address}: asking the beacon", address=local)
            self._last_probe = now
            self.udp.send(bw.Discover(0).base, self.beacon_addr)
        self._probe_call = self.reactor.callLater(ROUTE_CHECK, self._probe)

    def discovered(self, observed: Endpoint, source: Endpoint) -> None:
        if observed == self.public_endpoint:
            return
        old, self.public_endpoint = self.public_endpoint, observed
        self.log.info("public endpoint {endpoint} (seen by the beacon)", endpoint=f"{observed[0]}:{observed[1]}")
        if self.registration.state == "idle":
            self._start_registration()
        elif old is not None or self.registration.state == "registered":
            self.registration.endpoint_changed()

    def punch_commanded(self, peer: Endpoint) -> None:
        self.udp.punch(peer)
        self.paths.punch_commanded(peer)

    def frame_received(self, data: bytes, source: Endpoint, via_relay: bool) -> None:
        self.tunnels.frame_received(data, source, via_relay)

    def _endpoint_text(self) -> str:
        if self.public_endpoint is not None:
            host, port = self.public_endpoint
        else:
            host, port = "0.0.0.0", self._udp_port()
        return format_endpoint(host, port)

    def _register_extra(self) -> dict[str, Any]:
        """Our tunnel socket on our own LAN, for peers behind the same NAT (no hairpin needed)."""
        if self.lan_host is None or not self._udp_port():
            return {}
        return {"local_addr": format_endpoint(self.lan_host, self._udp_port())}

    def _udp_port(self) -> int:
        transport = self.udp.transport
        return transport.getHost().port if transport is not None else 0

    # --- the registry ---------------------------------------------------------------------

    def _connect_registry(self) -> Deferred[Any]:
        endpoint: Any = HostnameEndpoint(self.reactor, self.registry_host, self.registry_port, timeout=5)
        if self.settings.registry_fingerprint:
            from pilot.tls import client_options
            endpoint = wrapClientTLS(client_options(fingerprint=self.settings.registry_fingerprint), endpoint)
        factory = RegistryClientFactory(
            on_event=lambda event: self.registration.event_received(event),
            on_lost=lambda client, reason: self.registration.connection_lost(reason, client))
        d = endpoint.connect(factory)

        def learn_lan_address(client: Any) -> Any:
            # the address our LAN gave us: the source of our connection to the registry
            host = getattr(getattr(client, "transport", None), "getHost", lambda: None)()
            if host is not None and getattr(host, "host", None):
                self.lan_host = host.host
            return client
        return d.addCallback(learn_lan_address)  # type: ignore[no-any-return]

    def _registry_request(self, msg: dict[str, Any], signed_field: Optional[str] = None) -> Deferred[Any]:
        return self.registration.request(msg, signed_field)

    def _trust_request(self, msg: dict[str, Any]) -> Deferred[Any]:
        return self.registration.request(msg, SIGNER_FIELD.get(msg.get("type", "")))

    def _registered(self, node_id: int, address: Address) -> None:
        if node_id != self.own_id:
            self.log.info("the registry assigned node id {given}, not our key's {ours} (a reference registry "
                          "numbers nodes in order; ours only moves an id on a collision): using its answer",
                          given=node_id, ours=self.own_id)
            self.own_id = node_id
            self.trust.node_id = node_id
        self.log.info("Registered as {name} ({address})", name=self.registration.status().get("hostname")
                      or str(address), address=str(address))
        self._discover()

    def _unregistered(self, reason: str) -> None:
        if not self.running:
            return  # we are stopping: we deregistered on purpose
        self.log.info("registry unavailable: {reason}; tunnels keep working, re-registering by itself",
                      reason=reason)

    def _heartbeat_ok(self, when: float) -> None:
        self._discover()  # keeps the NAT mapping to the beacon alive, and spots an IP change

    def _registry_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        try:
            if kind == "handshake_request":
                self.trust.relayed_request(int(event["from_node_id"]), str(event.get("justification", "")),
                                           float(event.get("timestamp", 0)))
            elif kind == "handshake_response":
                self.trust.relayed_response(int(event["from_node_id"]), bool(event.get("accept")),
                                            float(event.get("timestamp", 0)))
            elif kind == "trust_revoked":
                self.trust.trust_revoked_event(int(event["node_id"]))
            elif kind == "endpoint_changed":
                endpoint = parse_endpoint(event.get("real_addr"))
                if endpoint is not None:
                    self.peers.update(int(event["node_id"]), endpoint)
        except (KeyError, TypeError, ValueError) as e:
            self.log.warn("malformed registry event {kind!r}: {error}", kind=kind, error=e)

    # --- trust ------------------------------------------------------------------------------

    def _pinned_key(self, node_id: int) -> bytes:
        entry = self.trust_store.trusted.get(node_id)
        return entry.public_key if entry is not None else b""

    def _is_trusted(self, node_id: int) -> bool:
        return node_id in self.trust_store.trusted

    def _save_trust(self) -> None:
        self.trust_store.save(self.settings.trust_path)

    def _lookup_key(self, node_id: int) -> Deferred[bytes]:
        d = self.peers.lookup(node_id)

        def key(_: object) -> bytes:
            peer = self.peers.peer(node_id)
            if not peer.public_key:
                raise NotFound(f"the registry has no key for node {node_id}")
            return peer.public_key
        return d.addCallback(key)

    def _send_direct(self, node_id: int, message: bytes) -> Deferred[Any]:
        """One port-444 message over a stream; fails when the peer cannot be reached directly."""
        d = self.peers.endpoint(node_id)
        d.addCallback(lambda _: self.stack.connect(Address(0, node_id), HANDSHAKE_PORT,
                                                   _OneMessage(message), timeout=5.0))
        return d

    def _trust_ended(self, node_id: int) -> None:
        self.stack.abort_peer(node_id)

    # --- packets -------------------------------------------------------------------------------

    def _send_packet(self, packet: Packet) -> None:
        node_id = packet.dst.node
        self.paths.sending(node_id, self.peers.peer(node_id).endpoint)
        self.tunnels.send(packet, node_id, self.peers.peer(node_id).endpoint)

    def _deliver(self, packet: Packet, from_node: int) -> None:
        self.stack.packet_received(packet)

    def _peer_unreachable(self, node_id: int) -> None:
        self.log.info("node {node} did not answer our key exchange", node=node_id)
        peer = self.peers.peer(node_id)
        peer.resolved_at = 0.0  # ask the registry again next time
        self.paths.unreachable(node_id)


def _route_source(destination: Endpoint) -> Optional[str]:
    """The local address the kernel would send from to reach ``destination`` (nothing is sent)."""
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


class _OneMessage(Protocol):
    """Writes one message and closes (the direct handshake path)."""

    def __init__(self, message: bytes) -> None:
        self.message = message

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.message)
        self.transport.loseConnection()


class _HandshakeReceiver(Protocol):
    """Port 444: one JSON message per stream (the reference closes after writing it)."""

    def __init__(self, node: NodeService) -> None:
        self.node = node
        self.buffer = b""
        self.done = False

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        self.buffer += data
        try:
            message = decode_handshake(self.buffer)
        except MalformedFrame:
            if len(self.buffer) > MAX_MESSAGE:
                self.done = True
                self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.done = True
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.node.trust.direct_message_received(peer.address.node, message)
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done = True

