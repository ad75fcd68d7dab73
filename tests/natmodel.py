"""
An in-memory NAT model for the path tests (``tests.machines.test_path``):
hosts with private addresses behind NAT boxes, a public segment, and a
beacon; everything on one ``task.Clock``, no sockets.

* :class:`Internet` carries datagrams between public addresses after a fixed
  one-way latency, across ``hops`` transit routers (0: the boxes share one
  segment).  Datagrams carry an IP TTL: a box forwarding a datagram (either
  way) and each transit router take one from it and drop it at 1; a box
  delivering to itself (below) does not look at it.  So a host's hop-limited
  opener (``pilot/node/openers.py``) with TTL 2 passes its own box and dies
  at the first transit router.  A datagram with TTL 1 dies at the host's own
  box, but first renews the box's live flow to its destination, if there is
  one (Linux conntrack runs before the forward TTL check); it makes no new
  one (a new entry is confirmed only on the way out).
* :class:`NatBox` sits between one host and the internet.  Kinds (RFC 4787
  terms):

  ========================  =====================================  ==========================================
  kind                      mapping                                inbound filtering
  ========================  =====================================  ==========================================
  ``public``                none (the host is on the internet)     none
  ``full-cone``             endpoint-independent, port kept (1:1)  none (anyone may send to a live mapping)
  ``port-restricted``       endpoint-independent, random port      address and port dependent
  ``symmetric``             endpoint-dependent, random port each   address and port dependent
  ``firewall``              none (public address), stateful        address and port dependent
  ``udp-blocked``           like port-restricted                   and only the beacon, either way
  ========================  =====================================  ==========================================

  ``local_delivery`` models a Linux router whose INPUT chain accepts what
  reaches it (Docker, Podman and libvirt hosts, cloud NAT instances): an
  unsolicited datagram to a mapped port is delivered to the router itself
  and leaves an UNREPLIED conntrack entry (remote -> our port) for
  ``timeout`` after the last such datagram.  While it lives, our host's
  *first* datagram to that remote collides with it, as MASQUERADE's SNAT
  does when its reply tuple is taken: that flow gets another port (for as
  long as it lives), so the mapping is no longer endpoint-independent for
  that remote (``docs/nat.md``, "The conntrack collision").  Without it the
  router drops such datagrams (an INPUT filter), which leaves nothing.

  A mapping lives ``timeout`` seconds after the last datagram *sent* through
  it, and each remote endpoint's permission lives ``timeout`` after the last
  datagram sent to it (inbound traffic refreshes nothing: RFC 4787 lets a NAT
  do either; the stricter choice shows that each side keeps its own NAT
  open).  ``blocked`` holds remote IPs dropped both ways (a firewall rule);
  :meth:`NatBox.rebind` forgets every mapping (a NAT reboot: new ports).
* :class:`World` runs a real ``pilot.server.registry.Registry`` and
  ``pilot.server.beacon.Beacon`` at :data:`BEACON`, and :class:`ModelNode`
  objects: each the real :class:`pilot.node.Node` (its own wiring, nothing
  copied) on the world's clock, behind a real ``NodeDatagramProtocol`` whose
  socket is the NAT box, talking to the registry through an in-memory
  connection; it registers itself (public), heartbeats every
  ``discover_interval`` and sends a signed Discover after a heartbeat whose
  answer shows the beacon holding no endpoint for it, or another one.
  The nodes trust each other; packets are stack datagrams on :data:`PORT`.
"""

from __future__ import annotations

import collections
import random
from typing import Any, Callable, Optional

import attr
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from pilot.address import Address
from pilot.endpoint import parse_endpoint
from pilot.errors import RegistryUnavailable
from pilot.identity import Identity
from pilot.interfaces import IRegistryConnector, IRegistryLink, IRouteProber
from pilot.machines.path import PathConfig, Paths
from pilot.node import Node
from pilot.protocols.handshake import OneMessage
from pilot.protocols.registry_client import reply_error
from pilot.protocols.tunnel import NodeDatagramProtocol
from pilot.server.beacon import Beacon
from pilot.server.registry import Peer, Registry, RegistryConfig
from pilot.trust import TrustedPeer, TrustStore
from tests.node.fakes import DEFAULT_TTL, HopLimitSocket

Endpoint = tuple[str, int]

PUBLIC = "public"
FULL_CONE = "full-cone"
PORT_RESTRICTED = "port-restricted"
SYMMETRIC = "symmetric"
FIREWALL = "firewall"
UDP_BLOCKED = "udp-blocked"
KINDS = (PUBLIC, FULL_CONE, PORT_RESTRICTED, SYMMETRIC, FIREWALL, UDP_BLOCKED)

BEACON: Endpoint = ("198.51.100.1", 9001)
#: One-way delay of every hop (s).
LATENCY = 0.03
#: A common UDP mapping lifetime (s).
MAPPING_TIMEOUT = 30.0
#: The node's Discover after each registry heartbeat (``HEARTBEAT_INTERVAL``).
DISCOVER_INTERVAL = 25.0
#: Model time starts here (proof timestamps are checked against the same clock).
T0 = 1_700_000_000.0
LOCAL_PORT = 4000
#: The stack datagram port the model's packets use.
PORT = 1000


class Internet:
    """Public addresses and the datagrams between them."""

    def __init__(self, clock: Clock, latency: float = LATENCY, hops: int = 0) -> None:
        self.clock = clock
        self.latency = latency
        self.hops = hops
        self.hosts: dict[str, Callable[[bytes, Endpoint, Endpoint, int], None]] = {}
        self.sent: list[tuple[float, Endpoint, Endpoint, bytes]] = []
        #: Extra one-way delay (s) from one public IP to another (a longer route).
        self.extra: dict[tuple[str, str], float] = {}
        #: Datagrams a transit router dropped for their TTL.
        self.expired = 0

    def attach(self, ip: str, receive: Callable[[bytes, Endpoint, Endpoint, int], None]) -> None:
        self.hosts[ip] = receive

    def send(self, src: Endpoint, dst: Endpoint, data: bytes, ttl: int = DEFAULT_TTL) -> None:
        if ttl <= self.hops:
            self.expired += 1  # a transit router's "time exceeded", which nobody here reads
            return
        self.sent.append((self.clock.seconds(), src, dst, data))
        delay = self.latency + self.extra.get((src[0], dst[0]), 0.0)
        self.clock.callLater(delay, self._arrive, src, dst, data, ttl - self.hops)

    def _arrive(self, src: Endpoint, dst: Endpoint, data: bytes, ttl: int) -> None:
        receive = self.hosts.get(dst[0])
        if receive is not None:
            receive(data, src, dst, ttl)


class _Mapping:
    def __init__(self, port: int, now: float) -> None:
        self.port = port
        self.last_out = now
        self.permits: dict[Endpoint, float] = {}


class NatBox:
    """One host's NAT (or firewall, or nothing); see the module docstring."""

    def __init__(self, internet: Internet, kind: str, public_ip: str, private_ip: str = "192.168.1.2",
                 timeout: float = MAPPING_TIMEOUT, rng: Optional[random.Random] = None,
                 beacon: Endpoint = BEACON, local_delivery: bool = False) -> None:
        assert kind in KINDS, kind
        self.internet = internet
        self.kind = kind
        self.public_ip = public_ip
        self.private: Endpoint = (public_ip if kind in (PUBLIC, FIREWALL) else private_ip, LOCAL_PORT)
        self.timeout = timeout
        self.rng = rng or random.Random(public_ip)
        self.beacon = beacon
        self.blocked: set[str] = set()
        self.counters: collections.Counter[str] = collections.Counter()
        self.host: Callable[[bytes, Endpoint], None] = lambda data, src: None
        self._mappings: dict[Optional[Endpoint], _Mapping] = {}
        self._by_port: dict[int, _Mapping] = {}
        self._shift = 0
        self.local_delivery = local_delivery and kind in (PORT_RESTRICTED, SYMMETRIC, UDP_BLOCKED)
        #: (remote, our public port) -> when an unsolicited datagram last reached the router itself.
        self.unreplied: dict[tuple[Endpoint, int], float] = {}
        #: remote -> the flow that collided with an unreplied entry, on its own port.
        self._moved: dict[Endpoint, _Mapping] = {}
        internet.attach(public_ip, self.inbound)

    @property
    def clock(self) -> Clock:
        return self.internet.clock

    def outbound(self, data: bytes, dst: Endpoint, ttl: int = DEFAULT_TTL) -> None:
        """The host sends ``data`` to ``dst`` with IP TTL ``ttl``."""
        if self.kind == PUBLIC:
            if dst[0] not in self.blocked:
                self.internet.send(self.private, dst, data, ttl)
            return
        if ttl <= 1:
            # conntrack runs before the forward TTL check: a live flow's entry is refreshed,
            # nothing new is made (a new entry is confirmed only on the way out), then it dies
            self.counters["ttl_expired"] += 1
            self._refresh(dst)
            return
        ttl -= 1
        if dst[0] in self.blocked:
            self.counters["blocked"] += 1
            return
        if self.kind == UDP_BLOCKED and dst != self.beacon:
            self.counters["udp_blocked"] += 1
            return
        now = self.clock.seconds()
        key = dst if self.kind == SYMMETRIC else None
        mapping = self._mappings.get(key)
        if mapping is None or now - mapping.last_out >= self.timeout:
            if mapping is not None:
                self._by_port.pop(mapping.port, None)
                self.counters["expired"] += 1
            mapping = self._mappings[key] = _Mapping(self._allocate(), now)
            self._by_port[mapping.port] = mapping
        mapping.last_out = now
        mapping = self._flow(mapping, dst, now)
        mapping.permits[dst] = now
        self.internet.send((self.public_ip, mapping.port), dst, data, ttl)

    def inbound(self, data: bytes, src: Endpoint, dst: Endpoint, ttl: int = DEFAULT_TTL) -> None:
        """``data`` from ``src`` reaches our public address ``dst`` with ``ttl`` left."""
        if src[0] in self.blocked:
            self.counters["blocked"] += 1
            return
        if self.kind == PUBLIC:
            self.host(data, src)
            return
        if self.kind == UDP_BLOCKED and src != self.beacon:
            self.counters["udp_blocked"] += 1
            return
        now = self.clock.seconds()
        mapping = self._by_port.get(dst[1])
        if mapping is None or now - mapping.last_out >= self.timeout:
            self.counters["no_mapping"] += 1
            self._unsolicited(src, dst[1], now)
            return
        if self.kind != FULL_CONE:
            permitted = mapping.permits.get(src)
            if permitted is None or now - permitted >= self.timeout:
                self.counters["filtered"] += 1
                self._unsolicited(src, dst[1], now)
                return
        if ttl <= 1:
            self.counters["ttl_expired"] += 1
            return
        self.host(data, src)

    def _refresh(self, dst: Endpoint) -> None:
        """A hop-limited datagram to ``dst`` that dies here renews our live flow to ``dst``, if any."""
        now = self.clock.seconds()
        key = dst if self.kind == SYMMETRIC else None
        moved = self._moved.get(dst)
        for mapping in (moved, self._mappings.get(key)):
            if mapping is None or now - mapping.last_out >= self.timeout:
                continue
            permitted = mapping.permits.get(dst)
            if permitted is not None and now - permitted < self.timeout:
                self.counters["ttl_refreshed"] += 1
                mapping.last_out = mapping.permits[dst] = now
                return

    def _unsolicited(self, src: Endpoint, port: int, now: float) -> None:
        """A datagram our host did not ask for: a local-delivery router keeps an UNREPLIED entry."""
        if self.local_delivery:
            self.counters["delivered_locally"] += 1
            self.unreplied[(src, port)] = now

    def _flow(self, mapping: _Mapping, dst: Endpoint, now: float) -> _Mapping:
        """The mapping our host's datagram to ``dst`` leaves by: ``mapping``, unless the flow collides."""
        moved = self._moved.get(dst)
        if moved is not None and now - moved.last_out < self.timeout:
            moved.last_out = now
            return moved
        permitted = mapping.permits.get(dst)
        if permitted is not None and now - permitted < self.timeout:
            return mapping  # our flow to dst is live: no new conntrack entry
        hit = self.unreplied.get((dst, mapping.port))
        if hit is None or now - hit >= self.timeout:
            return mapping
        self.counters["collision"] += 1
        if moved is not None:
            self._by_port.pop(moved.port, None)
        moved = self._moved[dst] = _Mapping(self._allocate(), now)
        self._by_port[moved.port] = moved
        return moved

    def public_endpoint(self, dst: Endpoint = BEACON) -> Optional[Endpoint]:
        """The live mapping toward ``dst`` (any destination but a symmetric NAT's)."""
        if self.kind == PUBLIC:
            return self.private
        mapping = self._mappings.get(dst if self.kind == SYMMETRIC else None)
        if mapping is None or self.clock.seconds() - mapping.last_out >= self.timeout:
            return None
        return (self.public_ip, mapping.port)

    def rebind(self) -> None:
        """Forget every mapping (a NAT reboot); new mappings get new ports."""
        self._mappings.clear()
        self._by_port.clear()
        self._moved.clear()
        self.unreplied.clear()
        self._shift += 1000

    def _allocate(self) -> int:
        if self.kind == FIREWALL:
            return self.private[1]
        if self.kind == FULL_CONE:
            return self.private[1] + self._shift
        while True:
            port = self.rng.randrange(20000, 60000)
            if port not in self._by_port:
                return port


class _Socket:
    """The host's UDP socket: writes go to its NAT box (until the process dies)."""

    def __init__(self, box: NatBox) -> None:
        self.box = box
        self.closed = False
        self.socket = HopLimitSocket()

    def write(self, data: bytes, addr: Endpoint) -> None:
        assert isinstance(data, bytes)
        if not self.closed:
            self.box.outbound(data, (addr[0], addr[1]), self.socket.ttl)

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", *self.box.private)

    def loseConnection(self) -> None:
        self.closed = True


@attr.s(auto_attribs=True, frozen=True)
class Received:
    """One model packet as it arrived: its sequence number and payload."""

    seq: int
    payload: bytes


class _RegistryConnection:
    """One registry connection, in memory: requests go to the world's registry, pushes come back."""

    def __init__(self, world: "World", host: str, link: IRegistryLink) -> None:
        self.world = world
        self.host = host
        self.link = link
        self.closed = False

    def request(self, msg: dict[str, Any]) -> "Deferred[dict[str, Any]]":
        if self.closed:
            return fail(RegistryUnavailable("cannot reach the registry: closed"))
        reply = self.world.registry.handle(msg, Peer(self.host, 50000), self)
        error = reply_error(reply)
        return fail(error) if error is not None else succeed(reply)

    def push(self, message: dict[str, Any]) -> None:
        if not self.closed:
            self.link.event_received(message)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.world.registry.session_closed(self)
            self.link.connection_lost(self, "closed")


@implementer(IRegistryConnector)
class _RegistryConnector:
    def __init__(self, world: "World", host: str) -> None:
        self.world = world
        self.host = host
        self.connections: list[_RegistryConnection] = []

    def connect(self, link: IRegistryLink) -> "Deferred[_RegistryConnection]":
        connection = _RegistryConnection(self.world, self.host, link)
        self.connections.append(connection)
        return succeed(connection)

    def crash(self) -> None:
        """The process died: its connections close without a word."""
        for connection in self.connections:
            connection.closed = True
            self.world.registry.session_closed(connection)


@implementer(IRouteProber)
class _FixedRoute:
    """The host never changes networks in the model: its address is its box's private one."""

    def __init__(self, host: str) -> None:
        self.host = host

    def source_for(self, destination: Endpoint) -> Optional[str]:
        return self.host


class ModelNode:
    """One host behind its NAT box, running the real :class:`pilot.node.Node`."""

    def __init__(self, world: "World", n: int, kind: str, timeout: float, config: PathConfig,
                 local_delivery: bool = False) -> None:
        self.world = world
        self.name = f"{kind}-{n}"
        self.identity = Identity.from_seed(bytes([n]) * 32)
        self.box = NatBox(world.internet, kind, f"203.0.113.{n}", timeout=timeout,
                          rng=random.Random(n), local_delivery=local_delivery)
        self.rng = random.Random(1000 + n)
        self.trust_store = TrustStore()   # the process's trust file: kept across a restart
        self.delivered: list[tuple[float, Received, int]] = []
        self.echo = False
        self.config = config
        #: the next process starts without a trust file (restores trust from the registry)
        self.restore_trust = False
        self._build()

    def _build(self) -> None:
        """A fresh process: new socket protocol, new node (new X25519 key), new registry connection."""
        world = self.world
        self._socket = _Socket(self.box)
        self.udp = NodeDatagramProtocol()
        self.udp.makeConnection(self._socket)  # type: ignore[arg-type]
        self.box.host = self.udp.datagramReceived
        self.connector = _RegistryConnector(world, self.box.public_ip)
        self.node = Node(identity=self.identity, trust_store=self.trust_store, save_trust=self._save_trust,
                         clock=world.clock, sender=self.udp, connector=self.connector,
                         prober=_FixedRoute(self.box.private[0]),
                         one_message=OneMessage, public=True, heartbeat=world.discover_interval,
                         path_config=self.config, rng=self.rng, random_bytes=self.rng.randbytes,
                         restore_trust=self.restore_trust)
        self.udp.wire(beacon=self.node, frames=self.node.tunnels)
        self.node.stack.bind_datagrams(PORT, self._received)

    def _save_trust(self) -> None:
        pass

    @property
    def node_id(self) -> int:
        return self.node.own_id

    @property
    def paths(self) -> Paths:
        return self.node.paths

    @property
    def public_endpoint(self) -> Optional[Endpoint]:
        return self.node.public_endpoint

    def trust(self, other: "ModelNode") -> None:
        self.trust_store.trusted[other.node_id] = TrustedPeer(other.node_id, other.identity.public_key,
                                                              self.world.clock.seconds(), mutual=True)

    def start(self) -> None:
        self.node.start(BEACON)

    def restart(self) -> None:
        """The daemon restarts on a new local port: a new process, a new mapping; it registers again."""
        self.connector.crash()
        self._socket.closed = True
        self.node.stop()
        self.box.rebind()
        self._build()
        self.start()  # the reply moves our public endpoint: register again

    def discover(self) -> None:
        """A Discover now, as after a heartbeat."""
        self.node.discover()

    def send(self, peer: "ModelNode", seq: int, payload: bytes = b"") -> None:
        """Resolve the peer (as ``pilotctl send-datagram`` does) and send one datagram."""
        d = self.node.peers.endpoint(peer.node_id)
        d.addCallback(self._send, peer.node_id, seq.to_bytes(4, "big") + payload)

    def _send(self, _: object, node_id: int, data: bytes) -> None:
        self.node.stack.send_datagram(Address(0, node_id), PORT, data, src_port=PORT)

    def _received(self, source: Address, src_port: int, data: bytes) -> None:
        p = Received(int.from_bytes(data[:4], "big"), data[4:])
        self.delivered.append((self.world.clock.seconds(), p, source.node))
        if self.echo and p.payload != b"echo":
            self.send(self.world.by_id[source.node], p.seq, b"echo")

    # -- for the tests --

    def state(self, peer: "ModelNode") -> str:
        return self.paths.state(peer.node_id)

    def received(self, seq: int, payload: Optional[bytes] = None) -> list[float]:
        return [t for t, p, _ in self.delivered if p.seq == seq and (payload is None or p.payload == payload)]


class World:
    """The registry, the beacon, the internet and the nodes, on one clock."""

    def __init__(self, latency: float = LATENCY, discover_interval: float = DISCOVER_INTERVAL,
                 push_endpoint_changes: bool = True, hops: int = 0) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.internet = Internet(self.clock, latency, hops)
        self.registry = Registry(self.clock, RegistryConfig(registrations_per_minute=0, requests_per_second=0))
        self.beacon = Beacon(self.registry, self.clock)
        self.registry.beacon_endpoint = self.beacon.endpoint_text  # as the rendezvous wires it
        self.internet.attach(BEACON[0], self._beacon_received)
        self.discover_interval = discover_interval
        self.push_endpoint_changes = push_endpoint_changes
        self.nodes: list[ModelNode] = []
        self.by_id: dict[int, ModelNode] = {}

    # -- building --

    def node(self, kind: str, timeout: float = MAPPING_TIMEOUT,
             config: PathConfig = PathConfig(), local_delivery: bool = False) -> ModelNode:
        """A node behind a NAT box of ``kind``; ``local_delivery``: its router has no INPUT filter."""
        node = ModelNode(self, len(self.nodes) + 1, kind, timeout, config, local_delivery)
        self.nodes.append(node)
        self.by_id[node.node_id] = node
        return node

    def start(self) -> None:
        """
        Every node trusts every other and starts: Discover, register (public),
        Discover signed.  With ``push_endpoint_changes`` the registry holds
        the trust too, and pushes each node's new endpoint to the others.
        """
        for node in self.nodes:
            for other in self.nodes:
                if other is not node:
                    node.trust(other)
                    if self.push_endpoint_changes:
                        self.registry.state.trust.add((node.node_id, other.node_id))
        for node in self.nodes:
            node.start()
        self.run(2.0)
        for node in self.nodes:
            assert node.node.registration.is_registered(), node.name
            assert self.beacon.endpoint_of(node.node_id) is not None, node.name

    # -- what the tests ask --

    def key(self, node_id: int) -> Optional[bytes]:
        node = self.registry.node(node_id)
        return node.public_key if node is not None else None

    def resolve(self, node_id: int) -> Optional[Endpoint]:
        node = self.registry.node(node_id)
        return parse_endpoint(node.real_addr) if node is not None else None

    # -- running --

    def _beacon_received(self, data: bytes, src: Endpoint, dst: Endpoint, ttl: int) -> None:
        for out, to in self.beacon.datagram_received(data, src):
            self.internet.send(BEACON, to, out)

    def run(self, seconds: float) -> None:
        """Advance ``seconds``, running every call at its own time."""
        self.run_until(self.clock.seconds() + seconds)

    def run_until(self, when: float, done: Callable[[], bool] = lambda: False) -> bool:
        """Run scheduled calls in time order up to ``when`` or until ``done()``; True if done."""
        while not done():
            calls = self.clock.getDelayedCalls()
            upcoming = min((c.getTime() for c in calls), default=None)
            if upcoming is None or upcoming > when:
                self.clock.advance(max(0.0, when - self.clock.seconds()))
                return done()
            self.clock.advance(max(0.0, upcoming - self.clock.seconds()))
        return True

    def now(self) -> float:
        return self.clock.seconds()
