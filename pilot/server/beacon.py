# -*- test-case-name: tests.server.test_beacon -*-
"""
The beacon: endpoint discovery, punch coordination and relaying (docs/reference-wire.md §3),
with the rules the reference lacks (docs/reference-wire.md §9 item 8, ``docs/security.md``).

Pure logic: :meth:`Beacon.datagram_received` takes one datagram and its
source and returns the datagrams to send; no sockets; time from the injected
``IReactorTime``.  It never raises, whatever the input.

The beacon keeps its own table: node id -> the UDP endpoint it observed for
that node (the NAT mapping of the node's tunnel socket), where punch commands
and relayed frames go.  Only nodes registered in the registry have entries.
The rules:

* Every datagram counts against a per-source-IP (IPv6: per /64) rate limit
  (``datagrams_per_second``, ``burst``; 0 disables).  Over the limit,
  malformed, or of a type a beacon does not take (0x02, 0x04, 0x06): dropped.
* **Discover, id 0**: reply with the observed address; record nothing.
* **Discover, id X, with a proof** (``pilot.wire.beacon``): the signature
  must verify with the key the registry holds for X, its timestamp be within
  ``max_skew`` of our clock, its nonce unseen (remembered per key for the
  window), and newer than the newest signature of X accepted before the
  registry (re)started (the nonce memory is not saved; the newest accepted
  timestamp of each key is, with the store, as the registry's own ``auth.ts``
  are: ``pilot.server.auth``).  Then record X -> source and reply.  A proof that fails: dropped,
  no reply.  (X unregistered: reply, record nothing.)
* **Discover, id X, no proof** (a reference node): always answered (it only
  tells the sender its own address).  Recorded only if X is registered, X's
  key has never proved itself (a proven key must prove every endpoint move),
  and the source IP is the IP of X's registry ``real_addr`` (the registry saw
  that IP on X's own TCP connection).
* **PunchRequest R -> T**: R registered; with a proof, it must verify with
  R's key; without, R must not be proven and the source must be R's recorded
  endpoint.  T registered, with a recorded endpoint, and
  ``registry.may_see(R, T)`` (a private node's endpoint goes only to peers it
  trusts).  Then R's endpoint is set to the source (a move only with a proof)
  and a PunchCommand goes to R with T's endpoint and to T with R's.
* **Relay S -> D**: the source must be S's recorded endpoint (S registered);
  D registered with a recorded endpoint; ``may_see(S, D)`` and
  ``may_see(D, S)`` (each lets the other see it: trust both ways, public, or
  a shared network; a one-sided ``report_trust`` grants no relay, else its
  maker could relay into, and replay key exchanges at, a node that never
  trusted it); within S's relay byte budget
  (``relay_bytes_per_second``, ``relay_burst_bytes``; 0 disables).  Then
  RelayDeliver(S, frame) goes to D's endpoint.  Nothing is relayed to or for
  unregistered nodes.  A punch or relay naming the same node twice is dropped.
* **Sync**: counted and ignored.  We run one beacon per rendezvous; peer
  beacons and gossip forwarding are not implemented.
* Entries of nodes the registry no longer has are dropped when met, and by
  :meth:`Beacon.prune` (the service calls it every minute).  The table holds
  at most ``max_endpoints`` entries; past that the least recently recorded
  one goes.

Counters (``Beacon.counters``): ``received``; ``dropped.<reason>`` with reason
``malformed``, ``rate_limited``, ``unexpected``, ``invalid``,
``unauthorized``, ``unknown_node``, ``no_endpoint``, ``not_trusted``,
``relay_budget``; ``discover`` (answered), ``discover.recorded``,
``discover.unrecorded.unauthorized``, ``discover.unrecorded.unknown_node``;
``punch``; ``relayed`` and ``relay_bytes``; ``sync``; ``pruned``, ``evicted``.
``Beacon.relayed_by`` holds the bytes relayed per sending node (the dashboard's
busiest relays); a node's entry goes with its endpoint.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Protocol

import attr
from twisted.internet.interfaces import IReactorTime

from pilot.endpoint import Endpoint, format_endpoint
from pilot.errors import MalformedFrame
from pilot.ratelimit import KeyedLimiter
from pilot.server.auth import MAX_SKEW, NonceCache
from pilot.server.state import Node, RegistryState
from pilot.wire.beacon import (
    DISCOVER_REPLY, Discover, DiscoverReply, Proof, PunchCommand, PunchRequest, Relay, RelayDeliver, Sync,
    canonical_host, decode,
)

Outgoing = list[tuple[bytes, Endpoint]]

#: Source hosts (and Discover replies) remembered, then forgotten all at once: parsing an
#: address was a third of a Discover's cost, and a fleet's sources repeat every interval.
#: Past this many sources (a fleet of 100,000 nodes) most lookups miss, so a miss from a
#: canonical IPv4 source, what an IPv4 socket reports, is cheap too (:func:`_ipv4`).
MEMO_LIMIT = 65_536
#: The head of a DiscoverReply carrying an IPv4 address (``pilot.wire.beacon``), and its port.
_REPLY_V4 = bytes([DISCOVER_REPLY, 4])
_PORT = struct.Struct(">H")
#: The unsigned Discover (id 0) most datagrams are (every node's probe), and its decoding,
#: shared: it is answered without parsing it again.
_PROBE = Discover(0).base
_PROBE_MSG = Discover(0)


@attr.s(auto_attribs=True, frozen=True)
class BeaconConfig:
    #: Datagrams of any kind per source IP per second, and the burst; 0 disables.
    datagrams_per_second: float = 1000.0
    burst: float = 2000.0
    #: Relayed frame bytes per sender node per second, and the burst; 0 disables.
    #: A burst smaller than a frame refuses that frame.
    relay_bytes_per_second: float = float(1 << 20)
    relay_burst_bytes: float = float(2 << 20)
    #: Most node endpoints kept.
    max_endpoints: int = 100_000
    #: How far a proof's timestamp may be from our clock (seconds).
    max_skew: float = MAX_SKEW
    #: Most proof nonces remembered.
    max_nonces: int = 1_000_000


class NodeDirectory(Protocol):
    """What the beacon needs of the registry (``pilot.server.registry.Registry``)."""

    state: RegistryState

    def node(self, node_id: int) -> Node | None:
        """The registered node with this id, or None."""

    def may_see(self, requester: int, target: Node) -> bool:
        """May ``requester`` learn ``target``'s real endpoint?"""

    def replay_floor(self, node_id: int) -> int:
        """The newest timestamp (ms) of ``node_id``'s signatures accepted before this start."""

    def proof_accepted(self, node_id: int, ts_ms: int) -> None:
        """Remember ``ts_ms`` as ``node_id``'s newest accepted signature (saved with the store)."""


class Beacon:
    def __init__(self, registry: NodeDirectory, clock: IReactorTime,
                 config: BeaconConfig | None = None) -> None:
        self.registry = registry
        self.clock = clock
        self.config = config or BeaconConfig()
        self.counters: dict[str, int] = {}
        #: frame bytes relayed per sending node (registered nodes only)
        self.relayed_by: dict[int, int] = {}
        #: For the last datagram, if it was dropped (or, a Discover, not recorded): the
        #: counter it went to and the reason in words; otherwise None.
        self.last_refusal: tuple[str, str] | None = None
        self._endpoints: dict[int, Endpoint] = {}
        self._nonces = NonceCache(self.config.max_nonces)
        self._source_limit = KeyedLimiter(self.config.datagrams_per_second, self.config.burst)
        #: source host -> its rate-limit key ("" if it is not an IP address)
        self._hosts: dict[str, str] = {}
        #: source endpoint -> the encoded DiscoverReply telling it that endpoint
        self._replies: dict[Endpoint, bytes] = {}
        self._relay_limit = KeyedLimiter(self.config.relay_bytes_per_second, self.config.relay_burst_bytes)

    # --- entry points ---------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> Outgoing:
        """Handle one datagram from ``addr``; return the datagrams to send, with their destinations."""
        self.last_refusal = None
        self._count("received")
        source = _source(addr)
        ip_key = self._host_key(source[0]) if source is not None else ""
        if source is None or not ip_key:
            return self._drop("malformed", "unusable source address")
        if not self._source_limit.allow(ip_key, self.clock.seconds()):
            return self._drop("rate_limited", f"over the limit for {source[0]}")
        if data == _PROBE:
            return self._discover(_PROBE_MSG, source)
        try:
            msg = decode(data)
        except MalformedFrame as e:
            return self._drop("malformed", e.reason)
        if isinstance(msg, Discover):
            return self._discover(msg, source)
        if isinstance(msg, PunchRequest):
            return self._punch(msg, source)
        if isinstance(msg, Relay):
            return self._relay(msg, source)
        if isinstance(msg, Sync):
            self._count("sync")
            return []
        return self._drop("unexpected", f"{type(msg).__name__} is sent by a beacon, not to one")

    def endpoint_of(self, node_id: int) -> Endpoint | None:
        """The UDP endpoint recorded for a registered node (as the socket reported it), or None."""
        if self._registered(node_id) is None:
            return None
        return self._endpoints.get(node_id)

    def endpoint_text(self, node_id: int) -> str | None:
        """
        The endpoint recorded for ``node_id`` as ``host:port`` (``[v6]:port``), written as
        this beacon's DiscoverReply would show it to the node, or None if none is recorded.
        The registry puts it in the node's ``heartbeat_ok`` (``docs/registration.md``): the
        node then proves its endpoint again only when this is missing or not what it saw.
        """
        endpoint = self.endpoint_of(node_id)
        if endpoint is None:
            return None
        host, port = endpoint
        if _ipv4(host) is None:
            try:
                host = canonical_host(host)  # an IPv4-mapped source is shown as IPv4, as in the reply
            except ValueError:
                return None
        return format_endpoint(host, port)

    def prune(self) -> list[int]:
        """Forget the endpoints of nodes the registry no longer has; return their ids."""
        nodes = self.registry.state.nodes  # a dict test, not a call per endpoint (100,000 a minute)
        gone = [node_id for node_id in self._endpoints if node_id not in nodes]
        for node_id in gone:
            del self._endpoints[node_id]
        for node_id in [n for n in self.relayed_by if n not in nodes]:
            del self.relayed_by[node_id]
        self._count("pruned", len(gone))
        return gone

    def __len__(self) -> int:
        return len(self._endpoints)

    # --- handlers ---------------------------------------------------------------------

    def _host_key(self, host: str) -> str:
        """``host``'s rate-limit key (:func:`_ip_key`), or "" if it is not an IP address; remembered."""
        key = self._hosts.get(host)
        if key is None:
            if _ipv4(host) is not None:
                key = host  # canonical IPv4: its own key, as _ip_key would say
            else:
                try:
                    canonical_host(host)
                except ValueError:
                    key = ""
                else:
                    key = _ip_key(host)
            if len(self._hosts) >= MEMO_LIMIT:
                self._hosts.clear()
            self._hosts[host] = key
        return key

    def _discover(self, msg: Discover, source: Endpoint) -> Outgoing:
        data = self._replies.get(source)
        if data is None:
            packed = _ipv4(source[0])
            data = _REPLY_V4 + packed + _PORT.pack(source[1]) if packed is not None else \
                DiscoverReply(*source).encode()
            if len(self._replies) >= MEMO_LIMIT:
                self._replies.clear()
            self._replies[source] = data
        reply = [(data, source)]
        if msg.node_id == 0:
            self._count("discover")
            return reply
        node = self._registered(msg.node_id)
        if node is not None and msg.proof is not None:
            problem = self._proof_problem(node, msg.base, msg.proof)
            if problem is not None:
                return self._drop("unauthorized", f"discover for node {node.id}: {problem}")
        self._count("discover")
        refusal = self._unrecordable(node, msg, source)
        if node is not None and refusal is None:
            self._record(node.id, source)
            self._count("discover.recorded")
        elif refusal is not None:
            counter = f"discover.unrecorded.{refusal[0]}"
            self._count(counter)
            self.last_refusal = (counter, refusal[1])
        return reply

    def _unrecordable(self, node: Node | None, msg: Discover, source: Endpoint) -> tuple[str, str] | None:
        """Why a Discover (whose proof, if any, verified) may not record its source; None if it may."""
        if node is None:
            return "unknown_node", f"node {msg.node_id} is not registered"
        if msg.proof is not None:
            return None
        if node.id in self.registry.state.proven:
            return "unauthorized", f"node {node.id} has proved its key; its endpoint moves only with a proof"
        if not _same_ip(source[0], node.real_addr):
            return "unauthorized", f"source {source[0]} is not node {node.id}'s registry address"
        return None

    def _punch(self, msg: PunchRequest, source: Endpoint) -> Outgoing:
        if msg.requester == msg.target:
            return self._drop("invalid", f"node {msg.requester} asked to punch itself")
        requester = self._registered(msg.requester)
        if requester is None:
            return self._drop("unknown_node", f"punch requester {msg.requester} is not registered")
        if msg.proof is not None:
            problem = self._proof_problem(requester, msg.base, msg.proof)
            if problem is not None:
                return self._drop("unauthorized", f"punch from node {requester.id}: {problem}")
        elif requester.id in self.registry.state.proven:
            return self._drop("unauthorized", f"node {requester.id} has proved its key; punch needs a proof")
        elif self._endpoints.get(requester.id) != source:
            return self._drop("unauthorized", f"punch from {source} is not node {requester.id}'s endpoint")
        target = self._registered(msg.target)
        if target is None:
            return self._drop("unknown_node", f"punch target {msg.target} is not registered")
        target_endpoint = self._endpoints.get(target.id)
        if target_endpoint is None:
            return self._drop("no_endpoint", f"punch target {target.id} has no endpoint")
        if not self.registry.may_see(requester.id, target):
            return self._drop("not_trusted", f"node {target.id} does not let node {requester.id} see it")
        if msg.proof is not None:
            self._record(requester.id, source)
        self._count("punch")
        return [(PunchCommand(*target_endpoint).encode(), source),
                (PunchCommand(*source).encode(), target_endpoint)]

    def _relay(self, msg: Relay, source: Endpoint) -> Outgoing:
        if msg.sender == msg.destination:
            return self._drop("invalid", f"node {msg.sender} relayed to itself")
        sender = self._registered(msg.sender)
        if sender is None:
            return self._drop("unknown_node", f"relay sender {msg.sender} is not registered")
        if self._endpoints.get(sender.id) != source:
            return self._drop("unauthorized", f"relay from {source} is not node {sender.id}'s endpoint")
        destination = self._registered(msg.destination)
        if destination is None:
            return self._drop("unknown_node", f"relay destination {msg.destination} is not registered")
        endpoint = self._endpoints.get(destination.id)
        if endpoint is None:
            return self._drop("no_endpoint", f"relay destination {destination.id} has no endpoint")
        # both ways: a one-sided report_trust must not let its maker relay into the other node
        # (issue 12: a node that "trusted" two victims relayed and replayed their key exchanges)
        may_see = self.registry.may_see
        if not may_see(destination.id, sender):
            return self._drop("not_trusted", f"node {sender.id} does not let node {destination.id} see it")
        if not may_see(sender.id, destination):
            return self._drop("not_trusted", f"node {destination.id} does not let node {sender.id} see it")
        if not self._relay_limit.allow(sender.id, self.clock.seconds(), len(msg.frame)):
            return self._drop("relay_budget", f"node {sender.id} is over its relay budget")
        self._count("relayed")
        self._count("relay_bytes", len(msg.frame))
        self.relayed_by[sender.id] = self.relayed_by.get(sender.id, 0) + len(msg.frame)
        return [(RelayDeliver(sender.id, msg.frame).encode(), endpoint)]

    # --- helpers ------------------------------------------------------------------------

    def _proof_problem(self, node: Node, base: bytes, proof: Proof) -> str | None:
        """Why ``proof`` does not authenticate ``base`` for ``node``; None if it does."""
        now = self.clock.seconds()
        when = proof.ts_ms / 1000.0
        if abs(when - now) > self.config.max_skew:
            return f"proof timestamp is {when - now:+.0f} s from our clock"
        if not proof.verify(node.public_key, base):
            return "proof signature does not verify with the node's key"
        if proof.ts_ms <= self.registry.replay_floor(node.id):
            return "replayed proof (not newer than one accepted before the registry restarted)"
        if not self._nonces.add(node.public_key + proof.nonce, when + self.config.max_skew, now):
            return "replayed proof"
        self.registry.proof_accepted(node.id, proof.ts_ms)
        return None

    def _registered(self, node_id: int) -> Node | None:
        node = self.registry.node(node_id)
        if node is None:
            self._endpoints.pop(node_id, None)
        return node

    def _record(self, node_id: int, endpoint: Endpoint) -> None:
        if self._endpoints.pop(node_id, None) is None and len(self._endpoints) >= self.config.max_endpoints:
            del self._endpoints[next(iter(self._endpoints))]
            self._count("evicted")
        self._endpoints[node_id] = endpoint

    def _drop(self, reason: str, detail: str) -> Outgoing:
        self._count(f"dropped.{reason}")
        self.last_refusal = (f"dropped.{reason}", detail)
        return []

    def _count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount


def _source(addr: object) -> Endpoint | None:
    """``(host, port)`` of a socket address (IPv6 ones have 4 items) whose host is a string and
    port in range, None otherwise (whether the host is an IP address: :meth:`Beacon._host_key`).
    A ``(host, port)`` tuple is returned itself, not copied: a reply to it goes to the very
    address the socket reported (``pilot.protocols.beacon`` sends those without Twisted's checks)."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        return None
    host, port = addr[0], addr[1]
    if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
        return None
    if not 0 < port <= 0xFFFF:
        return None
    return addr if len(addr) == 2 else (host, port)


def _ipv4(host: str) -> bytes | None:
    """
    The 4 bytes of ``host`` if it is an IPv4 address in canonical dotted form
    (what an IPv4 socket reports), else None (then the ``ipaddress`` path
    decides: IPv6, IPv4-mapped, or not an address).  A C round trip, about a
    tenth of ``ipaddress``'s cost.
    """
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError, TypeError):
        return None
    return packed if socket.inet_ntop(socket.AF_INET, packed) == host else None


def _ip_key(host: str) -> str:
    """The rate-limit key of a source: its IPv4 address, or its IPv6 /64 (one site's share)."""
    try:
        canonical = canonical_host(host)
    except ValueError:
        return host
    if ":" in canonical:
        return str(ipaddress.ip_network(f"{canonical.partition('%')[0]}/64", strict=False))
    return canonical


def _same_ip(host: str, real_addr: str) -> bool:
    """Is ``host`` the IP of ``real_addr`` (``ip:port`` or ``[ip6]:port``)?"""
    registered, sep, _ = real_addr.rpartition(":")
    if not sep:
        return False
    if registered.startswith("[") and registered.endswith("]"):
        registered = registered[1:-1]
    try:
        return canonical_host(registered) == canonical_host(host)
    except ValueError:
        return False
