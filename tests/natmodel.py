"""
An in-memory NAT model for the path tests (``tests.machines.test_path``):
hosts with private addresses behind NAT boxes, a public segment, and a
beacon; everything on one ``task.Clock``, no sockets.

* :class:`Internet` carries datagrams between public addresses after a fixed
  one-way latency.
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

  A mapping lives ``timeout`` seconds after the last datagram *sent* through
  it, and each remote endpoint's permission lives ``timeout`` after the last
  datagram sent to it (inbound traffic refreshes nothing: RFC 4787 lets a NAT
  do either; the stricter choice shows that each side keeps its own NAT
  open).  ``blocked`` holds remote IPs dropped both ways (a firewall rule);
  :meth:`NatBox.rebind` forgets every mapping (a NAT reboot: new ports).
* :class:`World` runs a real ``pilot.server.registry.Registry`` and
  ``pilot.server.beacon.Beacon`` at :data:`BEACON`, and :class:`ModelNode`
  objects: each a real ``NodeDatagramProtocol`` + ``Tunnels`` + ``Paths``
  wired as ``pilot.services.node`` wires them, registered (proven key,
  public), sending a signed Discover every ``discover_interval``.
"""

from __future__ import annotations

import collections
import random
from typing import Any, Callable, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from pilot.address import Address
from pilot.identity import Identity
from pilot.machines.path import PathConfig, Paths
from pilot.machines.tunnel import Tunnels
from pilot.protocols.tunnel import NodeDatagramProtocol
from pilot.server.beacon import Beacon
from pilot.server.registry import Peer, Registry, RegistryConfig
from pilot.endpoint import parse_endpoint
from pilot.wire import beacon as bw
from pilot.wire.packet import ACK, STREAM, Packet
from pilot.wire.registry import sign_request

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


class Internet:
    """Public addresses and the datagrams between them."""

    def __init__(self, clock: Clock, latency: float = LATENCY) -> None:
        self.clock = clock
        self.latency = latency
        self.hosts: dict[str, Callable[[bytes, Endpoint, Endpoint], None]] = {}
        self.sent: list[tuple[float, Endpoint, Endpoint, bytes]] = []

    def attach(self, ip: str, receive: Callable[[bytes, Endpoint, Endpoint], None]) -> None:
        self.hosts[ip] = receive

    def send(self, src: Endpoint, dst: Endpoint, data: bytes) -> None:
        self.sent.append((self.clock.seconds(), src, dst, data))
        self.clock.callLater(self.latency, self._arrive, src, dst, data)

    def _arrive(self, src: Endpoint, dst: Endpoint, data: bytes) -> None:
        receive = self.hosts.get(dst[0])
        if receive is not None:
            receive(data, src, dst)


class _Mapping:
    def __init__(self, port: int, now: float) -> None:
        self.port = port
        self.last_out = now
        self.permits: dict[Endpoint, float] = {}


class NatBox:
    """One host's NAT (or firewall, or nothing); see the module docstring."""

    def __init__(self, internet: Internet, kind: str, public_ip: str, private_ip: str = "192.168.1.2",
                 timeout: float = MAPPING_TIMEOUT, rng: Optional[random.Random] = None,
                 beacon: Endpoint = BEACON) -> None:
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
        internet.attach(public_ip, self.inbound)

    @property
    def clock(self) -> Clock:
        return self.internet.clock

    def outbound(self, data: bytes, dst: Endpoint) -> None:
        """The host sends ``data`` to ``dst``."""
        if dst[0] in self.blocked:
            self.counters["blocked"] += 1
            return
        if self.kind == UDP_BLOCKED and dst != self.beacon:
            self.counters["udp_blocked"] += 1
            return
        if self.kind == PUBLIC:
            self.internet.send(self.private, dst, data)
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
        mapping.permits[dst] = now
        self.internet.send((self.public_ip, mapping.port), dst, data)

    def inbound(self, data: bytes, src: Endpoint, dst: Endpoint) -> None:
        """``data`` from ``src`` reaches our public address ``dst``."""
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
            return
        if self.kind != FULL_CONE:
            permitted = mapping.permits.get(src)
            if permitted is None or now - permitted >= self.timeout:
                self.counters["filtered"] += 1
                return
        self.host(data, src)

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
    """The host's UDP socket: writes go to its NAT box."""

    def __init__(self, box: NatBox) -> None:
        self.box = box

    def write(self, data: bytes, addr: Endpoint) -> None:
        assert isinstance(data, bytes)
        self.box.outbound(data, (addr[0], addr[1]))

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", *self.box.private)

    def loseConnection(self) -> None:
        pass


def packet(src: int, dst: int, seq: int, payload: bytes = b"") -> Packet:
    return Packet(protocol=STREAM, flags=ACK, src=Address(0, src), dst=Address(0, dst),
                  src_port=49152, dst_port=7, seq=seq, window=512, payload=payload)


class ModelNode:
    """
    A node's networking as ``pilot.services.node`` wires it: the datagram
    protocol, ``Tunnels`` and ``Paths``; registry look-ups go straight to the
    world's registry.
    """

    def __init__(self, world: "World", n: int, kind: str, timeout: float, config: PathConfig) -> None:
        self.world = world
        self.name = f"{kind}-{n}"
        self.identity = Identity.from_seed(bytes([n]) * 32)
        self.node_id: Optional[int] = None
        self.public_endpoint: Optional[Endpoint] = None
        self.box = NatBox(world.internet, kind, f"203.0.113.{n}", timeout=timeout,
                          rng=random.Random(n))
        self.rng = random.Random(1000 + n)
        self.directory: dict[int, Endpoint] = {}   # resolved endpoints (PeerDirectory)
        self.delivered: list[tuple[float, Packet, int]] = []
        self.changes: list[tuple[float, int, str, Optional[Endpoint]]] = []
        self.unreachable: list[int] = []
        self.echo = False
        self.config = config
        self._build()

    def _build(self) -> None:
        """A fresh process: new socket protocol, tunnels (new X25519 key) and paths."""
        world, config = self.world, self.config
        self.udp = NodeDatagramProtocol(self, lambda source: source == BEACON)
        self.udp.makeConnection(_Socket(self.box))  # type: ignore[arg-type]
        self.box.host = self.udp.datagramReceived
        clock = world.clock
        self.tunnels = Tunnels(
            node_id=lambda: self.node_id, identity=self.identity, send_datagram=self.udp.send,
            deliver=self._deliver, expected_key=world.key, clock=clock, beacon=lambda: BEACON,
            peer_unreachable=self._unreachable,
            direct_frame=lambda node, endpoint: self.paths.direct_frame(node, endpoint),
            relayed_frame=lambda node: self.paths.relayed_frame(node))
        self.paths = Paths(
            tunnels=self.tunnels, send_datagram=self.udp.send, beacon=lambda: BEACON,
            node_id=lambda: self.node_id, sign=self.identity.sign, clock=clock, config=config,
            random=self.rng.random, random_bytes=self.rng.randbytes,
            path_changed=lambda node, state, endpoint: self.changes.append(
                (clock.seconds(), node, state, endpoint)))

    def restart(self) -> None:
        """The daemon restarts on a new local port: a new process, a new mapping; it registers again."""
        self.box.rebind()
        self.directory.clear()
        self._build()
        self.discover()  # the reply moves our public endpoint: register again

    # -- NodeDatagrams (as NodeService) --

    def discovered(self, observed: Endpoint, source: Endpoint) -> None:
        old, self.public_endpoint = self.public_endpoint, observed
        if old is not None and old != observed and self.node_id is not None:
            self.world.reregister(self)

    def punch_commanded(self, peer: Endpoint) -> None:
        self.udp.punch(peer)
        self.paths.punch_commanded(peer)

    def frame_received(self, data: bytes, source: Endpoint, via_relay: bool) -> None:
        self.tunnels.frame_received(data, source, via_relay)

    # -- as NodeService and PeerDirectory --

    def discover(self) -> None:
        base = bw.Discover(self.node_id or 0).base
        if self.node_id is not None:
            base = bw.with_proof(base, self.identity.sign, int(self.world.clock.seconds() * 1000),
                                 self.rng.randbytes(8))
        self.udp.send(base, BEACON)

    def learn(self, node_id: int, endpoint: Endpoint) -> None:
        """PeerDirectory.update: a resolved or pushed endpoint."""
        if self.directory.get(node_id) != endpoint:
            self.directory[node_id] = endpoint
            self.paths.endpoint_learned(node_id, endpoint)

    def send(self, peer: "ModelNode", seq: int, payload: bytes = b"") -> None:
        """Resolve (as ``api._reach``) and send one packet (as ``NodeService._send_packet``)."""
        assert self.node_id is not None and peer.node_id is not None
        endpoint = self.world.resolve(peer.node_id)
        if endpoint is not None:
            self.learn(peer.node_id, endpoint)
        hint = self.directory.get(peer.node_id)
        self.paths.sending(peer.node_id, hint)
        self.tunnels.send(packet(self.node_id, peer.node_id, seq, payload), peer.node_id, hint)

    def _deliver(self, p: Packet, from_node: int) -> None:
        self.delivered.append((self.world.clock.seconds(), p, from_node))
        if self.echo and p.payload != b"echo":
            peer = self.world.by_id[from_node]
            self.send(peer, p.seq, b"echo")

    def _unreachable(self, node_id: int) -> None:
        self.unreachable.append(node_id)
        self.paths.unreachable(node_id)

    # -- for the tests --

    def state(self, peer: "ModelNode") -> str:
        assert peer.node_id is not None
        return self.paths.state(peer.node_id)

    def received(self, seq: int, payload: Optional[bytes] = None) -> list[float]:
        return [t for t, p, _ in self.delivered if p.seq == seq and (payload is None or p.payload == payload)]


class World:
    """The registry, the beacon, the internet and the nodes, on one clock."""

    def __init__(self, latency: float = LATENCY, discover_interval: float = DISCOVER_INTERVAL,
                 push_endpoint_changes: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.internet = Internet(self.clock, latency)
        self.registry = Registry(self.clock, RegistryConfig(registrations_per_minute=0, requests_per_second=0))
        self.beacon = Beacon(self.registry, self.clock)
        self.internet.attach(BEACON[0], self._beacon_received)
        self.discover_interval = discover_interval
        self.push_endpoint_changes = push_endpoint_changes
        self.nodes: list[ModelNode] = []
        self.by_id: dict[int, ModelNode] = {}
        self._nonces = iter(range(1, 1 << 30))

    # -- building --

    def node(self, kind: str, timeout: float = MAPPING_TIMEOUT,
             config: PathConfig = PathConfig()) -> ModelNode:
        node = ModelNode(self, len(self.nodes) + 1, kind, timeout, config)
        self.nodes.append(node)
        return node

    def start(self) -> None:
        """Discover, register (signed, public), Discover signed; then every ``discover_interval``."""
        for node in self.nodes:
            node.discover()
        self.run(1.0)
        for node in self.nodes:
            assert node.public_endpoint is not None, f"{node.name} heard no DiscoverReply"
            self.register(node)
            node.discover()
            self.clock.callLater(self.discover_interval, self._rediscover, node)
        self.run(1.0)
        for node in self.nodes:
            assert self.beacon.endpoint_of(node.node_id) is not None, node.name  # type: ignore[arg-type]

    def _rediscover(self, node: ModelNode) -> None:
        node.discover()
        self.clock.callLater(self.discover_interval, self._rediscover, node)

    def register(self, node: ModelNode) -> None:
        assert node.public_endpoint is not None
        host, port = node.public_endpoint
        reply = self.request(node, {"type": "register", "public_key": node.identity.public_key_b64,
                                    "listen_addr": f"{host}:{port}"})
        node.node_id = int(reply["node_id"])
        self.by_id[node.node_id] = node
        self.request(node, {"type": "set_visibility", "node_id": node.node_id, "public": True})

    def reregister(self, node: ModelNode) -> None:
        """Our node's endpoint changed (the beacon saw a new one): register it; the registry pushes it."""
        self.register(node)
        if not self.push_endpoint_changes:
            return
        endpoint = self.resolve(node.node_id)  # type: ignore[arg-type]
        assert endpoint is not None
        for other in self.nodes:
            if other is not node and node.node_id in other.directory:
                other.learn(node.node_id, endpoint)  # type: ignore[arg-type]

    def request(self, node: ModelNode, msg: dict[str, Any]) -> dict[str, Any]:
        signed = sign_request(msg, node.identity.sign, int(self.clock.seconds() * 1000),
                              next(self._nonces).to_bytes(16, "big"))
        reply = self.registry.handle(signed, Peer(node.box.public_ip, 50000))
        assert reply.get("type") != "error", reply
        return reply

    # -- what nodes ask --

    def key(self, node_id: int) -> Optional[bytes]:
        node = self.registry.node(node_id)
        return node.public_key if node is not None else None

    def resolve(self, node_id: int) -> Optional[Endpoint]:
        node = self.registry.node(node_id)
        return parse_endpoint(node.real_addr) if node is not None else None

    # -- running --

    def _beacon_received(self, data: bytes, src: Endpoint, dst: Endpoint) -> None:
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
