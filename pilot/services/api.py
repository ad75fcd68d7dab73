# -*- test-case-name: tests.integration.test_node_process -*-
"""
The node's answers to its local clients (``pilot.nodeapi.NodeAPI``), over
the parts of a :class:`pilot.node.Node`.  Each method returns a Deferred
of a JSON-ready value, or fails with a PilotError.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorCore
from twisted.internet.task import deferLater
from twisted.logger import Logger

from pilot.address import Address
from pilot.details import with_details
from pilot.endpoint import format_endpoint
from pilot.errors import InvalidArgument, NotTrusted, PilotError, RegistryUnavailable, Timeout
from pilot.names import hostname_problem, normalise_tags
from pilot.node import Node
from pilot.nodeapi import Listening
from pilot.nodeconfig import NodeSettings
from pilot.search import search_network
from pilot.services.forward import Forwards
from pilot.stack.streams import ConnectionRefused
from pilot.wire.handshake import HANDSHAKE_PORT

MAX_PING_COUNT = 1000


def _endpoint_text(endpoint: Any) -> str | None:
    return format_endpoint(*endpoint) if endpoint else None


def _rtts(node: Node) -> dict[str, float]:
    """The smallest smoothed RTT (ms) of the stack's connections to each remote address."""
    rtts: dict[str, float] = {}
    for conn in node.stack.connections():
        srtt, remote = conn.get("srtt_ms"), conn.get("remote_addr")
        if srtt and isinstance(remote, str):
            rtts[remote] = min(srtt, rtts.get(remote, srtt))
    return rtts


def _path_fields(node: Node, node_id: int, stats: dict[str, Any], fallback: Any,
                 rtts: dict[str, float]) -> dict[str, Any]:
    """``path`` (direct | punched | relay | trying), ``endpoint``, ``rtt_ms``, ``path_changed_at``,
    ``path_reason``: why a relayed pair is relayed (``pilot.machines.path.REASONS``), else None."""
    status = node.paths.status(node_id)
    rtt = rtts.get(str(Address(0, node_id)))
    return {"path": status["path"] if status else stats.get("path"),
            "endpoint": _endpoint_text((status or {}).get("endpoint") or stats.get("endpoint") or fallback),
            "rtt_ms": round(rtt, 3) if rtt is not None else None,
            "path_changed_at": status["path_changed_at"] if status else None,
            "path_reason": status.get("reason") if status else None}


def _nat_kind(n: Node) -> str:
    """
    What the beacon shows of our NAT: one observed endpoint is enough to tell
    whether we are behind NAT and whether it kept our port, not its filtering.
    """
    public = n.public_endpoint
    if public is None:
        return "unknown"
    local = n.local_endpoint()
    if local is None:
        return "unknown"
    host, _, port = local.rpartition(":")
    if (public[0], str(public[1])) == (host.strip("[]"), port):
        return "none"
    return "nat, port kept" if str(public[1]) == port else "nat, port changed"


class NodeAPIImpl:
    log = Logger()

    def __init__(self, node: Node, reactor: IReactorCore, settings: NodeSettings,
                 udp_counters: Mapping[str, int], apps: Any = None) -> None:
        self.node = node
        #: The built-in services (``pilot.services.apps.Apps``), for their counters.
        self.apps = apps
        self.reactor = reactor
        self.settings = settings
        self.udp_counters = udp_counters
        self.forwards = Forwards(reactor, self.connect, node.stack.listen)

    # --- this node -------------------------------------------------------------------------

    @inlineCallbacks
    def info(self) -> Any:
        n = self.node
        status = n.registration.status()
        # the rendezvous entry in use, of the list given (docs/registration.md)
        entry = min(n.registration.server_index, len(self.settings.registries) - 1)
        peer_list = []
        rtts = _rtts(n)
        for node_id in n.tunnels.peers():
            stats = n.tunnels.stats(node_id) or {}
            peer = n.peers.peer(node_id)
            peer_list.append({"node_id": node_id, "address": str(Address(0, node_id)),
                              "hostname": peer.hostname, **_path_fields(n, node_id, stats, None, rtts),
                              "state": stats.get("state"),
                              "encrypted": stats.get("state") == "established",
                              "authenticated": stats.get("state") == "established",
                              "trusted": node_id in n.trust_store.trusted,
                              "last_rx": stats.get("last_rx"), "bytes_rx": stats.get("bytes_rx"),
                              "bytes_tx": stats.get("bytes_tx"), **_mtu_fields(stats)})
        yield None
        return {
            "node_id": n.own_id,
            "address": str(Address(0, n.own_id)),
            "hostname": status.get("hostname") or "",
            "public": bool(status.get("public")),
            "tags": status.get("tags", []),
            "public_key": n.identity.public_key_b64,
            "identity": self.settings.identity,
            "endpoint": _endpoint_text(n.public_endpoint),
            "local_port": n.local_port(),
            "local_addr": n.local_endpoint(),
            "nat": _nat_kind(n),
            "registry": {**status, "server": self.settings.registries[entry],
                         "servers": list(self.settings.registries)},
            "beacon": self.settings.beacons[min(entry, len(self.settings.beacons) - 1)],
            "uptime_secs": round(n.clock.seconds() - (n.started_at or n.clock.seconds()), 3),
            "peers": len(peer_list),
            "encrypted_peers": sum(1 for p in peer_list if p["encrypted"]),
            "authenticated_peers": sum(1 for p in peer_list if p["authenticated"]),
            "encrypt": True,
            "peer_list": peer_list,
            "connections": len(n.stack.connections()),
            "conn_list": n.stack.connections(),
            "ports": n.stack.ports(),
            "counters": {"tunnel": dict(n.tunnels.counters), "stack": dict(n.stack.counters),
                         "path": dict(n.paths.counters),
                         "udp": dict(self.udp_counters),
                         "apps": self.apps.counters() if self.apps is not None else {}},
        }

    @inlineCallbacks
    def set_hostname(self, hostname: str) -> Any:
        if hostname and hostname_problem(hostname) is not None:
            raise InvalidArgument(hostname_problem(hostname) or "", "choose another hostname")
        yield self.node.registration.set_hostname(hostname)
        return {"hostname": hostname}

    @inlineCallbacks
    def set_public(self, public: bool) -> Any:
        yield self.node.registration.set_public(bool(public))
        return {"visibility": "public" if public else "private"}

    @inlineCallbacks
    def set_tags(self, tags: list[str]) -> Any:
        try:
            normal = normalise_tags(list(tags))
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        yield self.node.registration.set_tags(normal)
        return {"tags": normal}

    def shutdown(self) -> Deferred[dict[str, Any]]:
        self.node.clock.callLater(0.05, self.reactor.stop)
        d: Deferred[dict[str, Any]] = Deferred()
        d.callback({"status": "stopping"})
        return d

    # --- discovery ---------------------------------------------------------------------------

    @inlineCallbacks
    def find(self, hostname: str) -> Any:
        n = self.node
        found = yield n.peers.find(hostname)
        node_id = found["node_id"]
        endpoint = None
        try:
            info = yield n.peers.lookup(node_id)
            endpoint = info.get("real_addr")
            if endpoint is None and node_id != n.own_id:
                endpoint = _endpoint_text((yield n.peers.endpoint(node_id)))
        except (NotTrusted, RegistryUnavailable, PilotError):
            pass
        if node_id == n.own_id:
            endpoint = _endpoint_text(n.public_endpoint)
        return {**found, "endpoint": endpoint,
                "visibility": "public" if found.get("public") else "private"}

    @inlineCallbacks
    def peers(self, search: str | None) -> Any:
        n = self.node
        yield None
        known = set(n.tunnels.peers()) | set(n.trust_store.trusted) | set(n.trust_store.pending) \
            | {p for p, peer in n.peers.peers.items() if peer.hostname}
        known.discard(n.own_id)
        rows = []
        rtts = _rtts(n)
        for node_id in sorted(known):
            peer = n.peers.peer(node_id)
            stats = n.tunnels.stats(node_id) or {}
            row = {"node_id": node_id, "address": str(Address(0, node_id)), "hostname": peer.hostname,
                   "trusted": node_id in n.trust_store.trusted,
                   "pending": node_id in n.trust_store.pending,
                   **_path_fields(n, node_id, stats, peer.endpoint, rtts),
                   "tunnel": stats.get("state", "idle"), **_mtu_fields(stats),
                   "last_changed": peer.changed_at or None}
            if search and search.lower() not in f"{peer.hostname} {row['address']} {node_id}".lower():
                continue
            rows.append(row)
        return rows

    # --- trust ---------------------------------------------------------------------------------

    @inlineCallbacks
    def handshake(self, target: str, justification: str) -> Any:
        node_id = yield self.node.peers.node_id(target)
        if node_id == self.node.own_id:
            raise InvalidArgument("that is this node", "name another node")
        self.node.trust.handshake(node_id, justification)
        status = "approved" if self.node.trust.status(node_id) == "trusted" else "sent"
        return {"status": status, "node_id": node_id, "address": str(Address(0, node_id))}

    def search(self, query: str) -> Any:
        return search_network(self._search_request, query, self.peers)

    def _search_request(self, msg: dict[str, Any]) -> Any:
        return self.node.registration.request(msg, "requester_id")

    def _lookup(self, node_id: int) -> Any:
        return self.node.registration.request({"type": "lookup", "node_id": node_id})

    def pending(self) -> Any:
        """Pending requests, each with the asker's hostname and key from the registry when it knows them."""
        return with_details([e.as_ipc() for e in self.node.trust.pending()], self._lookup)

    def trusted(self) -> Any:
        return with_details([e.as_ipc() for e in self.node.trust.trusted()], self._lookup)

    @inlineCallbacks
    def approve(self, node_id: int) -> Any:
        yield None
        self.node.trust.approve(node_id)
        return {"status": "approved", "node_id": node_id}

    @inlineCallbacks
    def reject(self, node_id: int, reason: str) -> Any:
        yield None
        self.node.trust.reject(node_id, reason)
        return {"status": "rejected", "node_id": node_id}

    @inlineCallbacks
    def untrust(self, node_id: int) -> Any:
        yield None
        self.node.trust.untrust(node_id)
        return {"status": "revoked", "node_id": node_id}

    # --- traffic ---------------------------------------------------------------------------------

    @inlineCallbacks
    def _reach(self, target: str) -> Any:
        """The target's address, with its endpoint known (resolved through the registry if need be)."""
        n = self.node
        node_id = yield n.peers.node_id(target)
        if node_id == n.own_id:
            return Address(0, node_id)
        yield n.peers.endpoint(node_id)
        return Address(0, node_id)

    @inlineCallbacks
    def ping(self, target: str, count: int, timeout: float, interval: float) -> Any:
        if not 0 < count <= MAX_PING_COUNT:
            raise InvalidArgument(f"count must be 1 to {MAX_PING_COUNT}")
        address = yield self._reach(target)
        results = []
        for seq in range(1, count + 1):
            if seq > 1 and interval > 0:
                yield deferLater(self.node.clock, interval, lambda: None)
            try:
                rtt = yield self.node.stack.ping(address, seq, timeout)
                results.append({"seq": seq, "rtt_ms": round(rtt, 3)})
            except (Timeout, PilotError) as e:
                results.append({"seq": seq, "error": e.message, "code": e.code.name})
        answered = [r for r in results if "rtt_ms" in r]
        return {"target": str(address), "results": results, "timeout": not answered}

    @inlineCallbacks
    def connect(self, target: str, port: int, protocol: IProtocol) -> Any:
        address = yield self._reach(target)
        try:
            transport = yield self.node.stack.connect(address, port, protocol, timeout=30.0)
        except ConnectionRefused:
            if port == HANDSHAKE_PORT or self.node.is_trusted(address.node):
                raise
            # trust is mutual: a peer we do not trust refuses every port but 444
            raise NotTrusted(f"{address} refused the connection: this node does not trust it, nor it us",
                             hint=f"ask for trust with `pilotctl handshake {target}`") from None
        return {"target": str(address), "port": port, "local_port": transport.getHost().port}

    @inlineCallbacks
    def listen(self, port: int, factory: IProtocolFactory) -> Any:
        yield None
        listening: Listening = self.node.stack.listen(port, factory)
        return listening

    @inlineCallbacks
    def send_datagram(self, target: str, port: int, data: bytes) -> Any:
        address = yield self._reach(target)
        src = self.node.stack.send_datagram(address, port, data)
        return {"sent": len(data), "target": str(address), "port": port, "src_port": src}

    @inlineCallbacks
    def disconnect(self, conn_id: int) -> Any:
        yield None
        self.node.stack.disconnect(conn_id)
        return {"status": "reset", "id": conn_id}

    @inlineCallbacks
    def bind_datagrams(self, port: int, received: Callable[[dict[str, Any], bytes], None]) -> Any:
        yield None
        return self.node.stack.bind_datagrams(
            port, lambda address, src_port, data: received({"from": str(address), "src_port": src_port}, data))

    # --- port forwarding (pilot.services.forward) ----------------------------------------------

    @inlineCallbacks
    def forward(self, local_port: int, target: str, port: int) -> Any:
        yield self._reach(target)  # an unknown target fails now, not at the first connection
        return self.forwards.forward(local_port, target, port)

    @inlineCallbacks
    def unforward(self, local_port: int) -> Any:
        yield None
        return self.forwards.unforward(local_port)

    @inlineCallbacks
    def expose(self, port: int, host: str, host_port: int) -> Any:
        yield None
        return self.forwards.expose(port, host, host_port)

    @inlineCallbacks
    def unexpose(self, port: int) -> Any:
        yield None
        return self.forwards.unexpose(port)

    @inlineCallbacks
    def forwards_list(self) -> Any:
        yield None
        return self.forwards.list()


def _mtu_fields(stats: dict[str, Any]) -> dict[str, Any]:
    """The path's discovered datagram size (UDP payload), its stream segment and the search's state."""
    return {"mtu": stats.get("mtu"), "mss": stats.get("mss"), "mtu_state": stats.get("mtu_state")}
