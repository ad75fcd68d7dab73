# -*- test-case-name: tests.node.test_peers -*-
"""
What this node knows of other nodes: how a target a user typed becomes a
node id, where each peer is, and its key.

Targets are a hostname, a text address (``0:0000.1234.ABCD``) or a decimal
node id.  Hostnames and endpoints come from the registry and are cached, so
that with the rendezvous down a peer we already talked to stays reachable;
a name we never resolved fails fast with ``registry_unavailable``.
Endpoints also change under us: the registry pushes ``endpoint_changed`` for
peers that trust us, and an authenticated tunnel frame from a new address
moves the peer there (the tunnel layer tells us).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attr
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pilot.address import Address
from pilot.endpoint import Endpoint, format_endpoint, parse_endpoint
from pilot.errors import InvalidArgument, MalformedFrame, NotFound, NotTrusted, PilotError, RegistryUnavailable
from pilot.identity import b64decode
from pilot.interfaces import IPathEvents
from pilot.names import hostname_problem

#: A resolved endpoint is asked for again after this long (unless a tunnel is up).
ENDPOINT_TTL = 60.0
#: Hostname -> node id answers are kept this long for use while the registry is away.
NAME_TTL = 3600.0


@attr.s(auto_attribs=True, eq=False)
class Peer:
    node_id: int
    hostname: str = ""
    public_key: bytes = b""
    public: Optional[bool] = None
    tags: list[str] = attr.Factory(list)
    endpoint: Optional[Endpoint] = None
    resolved_at: float = 0.0
    changed_at: float = 0.0

    @property
    def address(self) -> Address:
        return Address(0, self.node_id)


class PeerDirectory:
    log = Logger()

    """
    :param request: ``registration.request(msg, signed_field=None)``.
    :param pinned_key: the trust store's key for a node, or ``b""``.

    :meth:`wire` it to the path layer, which hears where a peer is now.
    """

    def __init__(self, clock: IReactorTime, request: Callable[..., "Deferred[dict[str, Any]]"],
                 pinned_key: Callable[[int], bytes]) -> None:
        self.clock = clock
        self._request = request
        self._pinned_key = pinned_key
        self._paths: Optional[IPathEvents] = None
        self.peers: dict[int, Peer] = {}
        self._names: dict[str, tuple[int, float]] = {}

    def wire(self, paths: IPathEvents) -> None:
        """Tell ``paths`` (``pilot.machines.path.Paths``) every endpoint we learn of a peer."""
        self._paths = paths

    def peer(self, node_id: int) -> Peer:
        peer = self.peers.get(node_id)
        if peer is None:
            peer = self.peers[node_id] = Peer(node_id)
        return peer

    # --- targets --------------------------------------------------------------------

    @inlineCallbacks
    def node_id(self, target: str) -> Any:
        """The node id a target names (a Deferred)."""
        if not isinstance(target, str) or not target or len(target) > 128:
            raise InvalidArgument(f"not a node: {str(target)[:40]!r}", "give a hostname, an address or a node id")
        if target.isascii() and target.isdigit():
            node = int(target)
            if not 0 < node < 0xFFFFFFFF:
                raise InvalidArgument(f"node id {target} is out of range")
            return node
        if ":" in target:
            try:
                address = Address.parse(target)
            except MalformedFrame as e:
                raise InvalidArgument(e.reason, "an address looks like 0:0000.1234.ABCD") from None
            return address.node
        if hostname_problem(target) is not None:
            raise InvalidArgument(f"{target!r} is not a hostname, an address or a node id",
                                  "hostnames are lower-case letters, digits and '-'")
        found = yield self.find(target)
        return found["node_id"]

    @inlineCallbacks
    def find(self, hostname: str) -> Any:
        """``resolve_hostname`` through the registry; the cache when the registry is away."""
        try:
            reply = yield self._request({"type": "resolve_hostname", "hostname": hostname})
        except RegistryUnavailable:
            cached = self._names.get(hostname)
            if cached is None:
                # a name learned any other way (a lookup, a trusted peer) serves too
                known = [p for p in self.peers.values() if p.hostname == hostname]
                if len(known) == 1:
                    cached = (known[0].node_id, self.clock.seconds())
            if cached is not None and self.clock.seconds() - cached[1] < NAME_TTL:
                peer = self.peer(cached[0])
                return {"hostname": hostname, "node_id": peer.node_id, "address": str(peer.address),
                        "public": peer.public, "cached": True}
            raise RegistryUnavailable(f"cannot look up {hostname!r}: the rendezvous is unreachable",
                                      "established tunnels keep working; names never seen before need "
                                      "the rendezvous") from None
        except NotFound:
            raise NotFound(f"no node is called {hostname!r}",
                           "check the name; `pilotctl peers` lists the nodes this one knows") from None
        node_id = int(reply["node_id"])
        self._names[hostname] = (node_id, self.clock.seconds())
        peer = self.peer(node_id)
        peer.hostname = hostname
        peer.public = bool(reply.get("public"))
        return {"hostname": hostname, "node_id": node_id, "address": str(peer.address),
                "public": peer.public}

    # --- endpoints ----------------------------------------------------------------------

    @inlineCallbacks
    def endpoint(self, node_id: int, fresh: bool = False) -> Any:
        """Where ``node_id`` is: the cache, else the registry's ``resolve`` (signed)."""
        peer = self.peer(node_id)
        now = self.clock.seconds()
        if peer.endpoint is not None and not fresh and now - peer.resolved_at < ENDPOINT_TTL:
            return peer.endpoint
        try:
            reply = yield self._request({"type": "resolve", "node_id": node_id}, "requester_id")
        except RegistryUnavailable:
            if peer.endpoint is not None:
                return peer.endpoint  # the rendezvous is down: keep going where it was
            raise
        except NotTrusted:
            raise NotTrusted(f"node {node_id} is private and has not approved this node",
                             f"run `pilotctl handshake {peer.hostname or node_id}` and have it approve you") \
                from None
        except NotFound:
            raise NotFound(f"node {node_id} is not registered", "it may be offline") from None
        endpoint = parse_endpoint(reply.get("real_addr"))
        local = parse_endpoint(reply.get("local_addr"))
        if local is not None:
            # the registry saw us both behind one public address: the LAN path needs no hairpin
            endpoint = local
        if endpoint is None:
            raise PilotError(f"the registry has no usable endpoint for node {node_id}",
                             "the node may still be starting; retry")
        self.update(node_id, endpoint)
        peer.resolved_at = now
        return endpoint

    def update(self, node_id: int, endpoint: Endpoint) -> None:
        peer = self.peer(node_id)
        if peer.endpoint != endpoint:
            if peer.endpoint is not None:
                self.log.info("node {node} moved from {old} to {new}", node=node_id,
                              old=format_endpoint(*peer.endpoint), new=format_endpoint(*endpoint))
            peer.endpoint = endpoint
            peer.changed_at = self.clock.seconds()
            if self._paths is not None:
                self._paths.endpoint_learned(node_id, endpoint)

    def seen_at(self, node_id: int, endpoint: Endpoint) -> None:
        """An authenticated frame came from ``endpoint`` (the tunnel layer moved already)."""
        peer = self.peer(node_id)
        if peer.endpoint != endpoint:
            peer.endpoint = endpoint
            peer.changed_at = self.clock.seconds()
        peer.resolved_at = self.clock.seconds()

    def expire(self, node_id: int) -> None:
        """The peer did not answer: ask the registry where it is next time."""
        self.peer(node_id).resolved_at = 0.0

    # --- keys -----------------------------------------------------------------------------

    def key(self, node_id: int) -> "Deferred[Optional[bytes]]":
        """The Ed25519 key we expect from ``node_id``: the trust store's pin, else the registry's."""
        pinned = self._pinned_key(node_id)
        if pinned:
            return succeed(pinned)
        peer = self.peer(node_id)
        if peer.public_key:
            return succeed(peer.public_key)
        d = self.lookup(node_id)
        d.addCallback(lambda info: self.peer(node_id).public_key or None)
        d.addErrback(lambda failure: None)
        return d

    @inlineCallbacks
    def lookup(self, node_id: int) -> Any:
        """The registry's ``lookup`` of a node, remembered."""
        reply = yield self._request({"type": "lookup", "node_id": node_id})
        peer = self.peer(node_id)
        try:
            peer.public_key = b64decode(reply.get("public_key"), 32, "public_key")
        except ValueError:
            pass
        if isinstance(reply.get("hostname"), str):
            peer.hostname = reply["hostname"]
        peer.public = bool(reply.get("public"))
        tags = reply.get("tags")
        peer.tags = [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []
        return reply
