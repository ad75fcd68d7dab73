# -*- test-case-name: tests.node.test_core -*-
"""
The node, sans I/O: its parts built and wired in one place, the beacon's
discovery and the route watch on the injected clock.

The parts (docs/architecture.md draws them):

* :class:`pilot.machines.registration.Registration`: the registry session;
* :class:`pilot.node.peers.PeerDirectory`: names, endpoints and keys of peers;
* :class:`pilot.machines.tunnel.Tunnels`: authenticated, encrypted tunnels;
* :class:`pilot.machines.path.Paths`: direct, punched or relayed, per peer;
* :class:`pilot.stack.Stack`: connections and datagrams on virtual ports;
* :class:`pilot.machines.trust.TrustMachine`: handshakes, approvals, pins;
* :class:`pilot.node.carried.CarriedTrust`: the signed trust statements kept
  at the registry, restoring trust when the trust file was missing.

What it needs of the world comes in through the interfaces of
:mod:`pilot.interfaces`: a datagram sender (the tunnel socket), a registry
connector, a route prober and a clock.  ``pilot.services.node`` gives it the
real ones; ``tests.natmodel`` and ``tests.node`` give it fakes.

The beacon tells us our public endpoint (Discover); we register that, prove
it to the beacon with a signed Discover (on registration, and after a
heartbeat whose answer shows the beacon holds no endpoint for us or another
one), keep the NAT mapping alive with an unsigned Discover an interval after
the last Discover of either kind (:mod:`pilot.node.probe`: shorter behind a NAT
seen dropping it), and re-register at once when it changes (docs/nat.md,
docs/registration.md).
"""

from __future__ import annotations

import functools
import os
import random as _random
from typing import Any, Callable, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProtocol, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from pilot.address import Address
from pilot.endpoint import Endpoint, format_endpoint, parse_endpoint
from pilot.errors import NotFound
from pilot.identity import Identity
from pilot.interfaces import (
    IBeaconListener, IDatagramSender, IRegistryConnector, IRegistryLink, IRouteProber,
)
from pilot.machines.path import PathConfig, Paths
from pilot.machines.registration import HEARTBEAT_INTERVAL, Registration
from pilot.machines.trust import AutoApprove, TrustMachine
from pilot.machines.tunnel import Tunnels
from pilot.machines.tunnel.pmtu import SAFE_SEGMENT
from pilot.node.carried import CarriedTrust
from pilot.node.openers import Openers
from pilot.node.peers import PeerDirectory
from pilot.node.probe import OUTAGE_PROBE, PROBE_ANSWER_WAIT, ProbeInterval
from pilot.stack import Stack
from pilot.trust import TrustStore
from pilot.wire import beacon as bw
from pilot.wire.handshake import HANDSHAKE_PORT
from pilot.wire.packet import Packet
from pilot.wire.registry import SIGNER_FIELD

#: Startup Discovers are repeated this often until the beacon answers.
DISCOVER_RETRY = 1.0
#: How often the node checks which local address routes to the beacon (no
#: packet is sent): a change of network shows within this long.
ROUTE_CHECK = 1.0
#: The first registration waits at most this long for the beacon's answer.
REGISTER_WAIT = 0.5
#: A node with no NAT of its own (its socket's address is the one the beacon
#: sees: a public host, a stateful firewall) acts on a punch command this much
#: later (s): no router of ours can be left an entry to collide with, so the
#: NAT'd peer's datagrams go first and open its router before ours reach it
#: (``docs/nat.md``, the conntrack collision).
NO_NAT_PUNCH_DELAY = 0.1


@implementer(IBeaconListener, IRegistryLink)
class Node:
    """
    One node's logic.  Build it, :meth:`start` it with the beacon's address,
    :meth:`stop` it.  Its parts are public attributes, for the control API
    (``pilot.services.api``) and the tests.

    :param one_message: builds the stream protocol that writes one port-444
        message and closes (``pilot.protocols.handshake.OneMessage``).
    :param save_trust: writes the trust store (called after every change).
    :param restore_trust: there was no trust file: restore trust from our
        signed statements at the registry (``docs/trust.md``).
    """

    log = Logger()

    def __init__(self, *, identity: Identity, trust_store: TrustStore, save_trust: Callable[[], None],
                 clock: IReactorTime, sender: IDatagramSender,
                 connector: IRegistryConnector | Sequence[IRegistryConnector],
                 prober: IRouteProber, one_message: Callable[[bytes], IProtocol],
                 hostname: Optional[str] = None, public: bool = False, tags: tuple[str, ...] = (),
                 heartbeat: float = HEARTBEAT_INTERVAL, auto_approve: Optional[AutoApprove] = None,
                 path_config: PathConfig = PathConfig(), rng: Optional[_random.Random] = None,
                 random_bytes: Callable[[int], bytes] = os.urandom, restore_trust: bool = False,
                 max_datagram: Optional[int] = None, servers: Sequence[str] = ("",)) -> None:
        self.identity = identity
        self.trust_store = trust_store
        self.clock = clock
        self._sender = sender
        # one connector per rendezvous entry, paired by index with the beacons given to start()
        self._connectors = list(connector) if isinstance(connector, Sequence) else [connector]
        self._prober = prober
        self._one_message = one_message
        self._random_bytes = random_bytes
        rng = rng if rng is not None else _random.Random()
        self.own_id: int = identity.address.node
        self._address = Address(0, self.own_id)
        self.beacon_addr: Optional[Endpoint] = None
        self._beacons: list[Optional[Endpoint]] = [None]
        self.public_endpoint: Optional[Endpoint] = None
        self.lan_host: Optional[str] = None
        self._punch_calls: set[IDelayedCall] = set()
        self.started_at: Optional[float] = None
        self.running = False
        self._discover_call: Optional[IDelayedCall] = None
        self._register_call: Optional[IDelayedCall] = None
        self._probe_call: Optional[IDelayedCall] = None
        self._route_source: Optional[str] = None
        self._last_probe = 0.0
        self.probe = ProbeInterval()
        #: seconds between the last Discover and the one before it; the (route source, beacon) of our endpoint
        self._probe_gap = 0.0
        self._seen_via: tuple[Optional[str], Optional[Endpoint]] = (None, None)
        #: when the oldest Discover the beacon has not answered yet went, and whether we acted on it
        self._unanswered_since: Optional[float] = None
        self._doubted = False

        self.stack = Stack(clock, self.local_address, self._send_packet, self.is_trusted,
                           segment_size=SAFE_SEGMENT)
        self.registration = Registration(
            connect=self._connect_registry, identity=identity, clock=clock, endpoint=self.endpoint_text,
            register_extra=self.register_extra, registered=self._registered, unregistered=self._unregistered,
            event=self._registry_event, heartbeat_ok=self._heartbeat_ok, servers=servers,
            server_changed=self._server_changed, hostname=hostname, public=public,
            tags=list(tags), heartbeat_interval=heartbeat, random=rng, random_bytes=random_bytes)
        self.peers = PeerDirectory(clock, self.registration.request, self.pinned_key)
        self.tunnels = Tunnels(
            node_id=self.node_id, identity=identity, send_datagram=sender.send,
            deliver=self.stack.packet_received, expected_key=self.peers.key, clock=clock,
            beacon=self.beacon, peer_unreachable=self._peer_unreachable, endpoint_changed=self.peers.seen_at,
            random_bytes=random_bytes, segment_size_changed=self.stack.set_segment_size,
            max_datagram=max_datagram)
        self.stack.watch_paths(self.tunnels.path_trouble)
        self.paths = Paths(
            tunnels=self.tunnels, send_datagram=sender.send, beacon=self.beacon, node_id=self.node_id,
            sign=identity.sign, clock=clock, config=path_config, random=rng.random,
            random_bytes=random_bytes, path_changed=self._path_changed, send_limited=sender.send_limited,
            public_endpoint=self.seen_endpoint)
        self.tunnels.wire(self.paths)
        self.openers = Openers(clock, sender, self.paths.punch_commanded, ttls=path_config.opener_ttls,
                               step=path_config.opener_step, skew=path_config.opener_skew)
        self.peers.wire(self.paths)
        self.carried = CarriedTrust(
            identity=identity, store=trust_store, save=save_trust, request=self._trust_request, clock=clock,
            node_id=self.node_id, restore=restore_trust)
        self._save_trust = save_trust
        self.trust = TrustMachine(
            node_id=self.own_id, public_key=identity.public_key, sign=identity.sign, store=trust_store,
            save=self._trust_saved, send_direct=self._send_direct, registry_request=self._trust_request,
            lookup_key=self._lookup_key, clock=clock, rules=auto_approve or AutoApprove(),
            peer_info=self.peers.lookup, trust_ended=self._trust_ended)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, *beacons: Optional[Endpoint]) -> None:
        """
        Ask the beacon where we are; register once it answers (or after
        ``REGISTER_WAIT``).  With a list of rendezvous servers, one beacon per
        entry, in the order of the connectors (docs/registration.md).
        """
        self.running = True
        self.started_at = self.clock.seconds()
        self._beacons = list(beacons) or [None]
        self.beacon_addr = self._beacons[min(self.registration.server_index, len(self._beacons) - 1)]
        self._discover()
        # register once the beacon told us our public endpoint (or after a
        # short wait without it), so the first registration is the right one
        self._register_call = self.clock.callLater(REGISTER_WAIT, self._start_registration)

    def stop(self) -> "Deferred[None]":
        """Cancel every timer, close every connection and tunnel, deregister (a Deferred)."""
        self.running = False
        for call in (self._discover_call, self._register_call, self._probe_call):
            if call is not None and call.active():
                call.cancel()
        self._discover_call = self._register_call = self._probe_call = None
        for call in self._punch_calls:
            if call.active():
                call.cancel()
        self._punch_calls.clear()
        self.openers.stop()
        self.stack.stop()
        self.tunnels.stop()
        self.paths.stop()
        return self.registration.stop()

    def _start_registration(self) -> None:
        if self._register_call is not None and self._register_call.active():
            self._register_call.cancel()
        self._register_call = None
        if self.running and self.registration.is_idle():
            self.registration.start()

    # --- public queries ----------------------------------------------------------------------

    def node_id(self) -> int:
        return self.own_id

    def local_address(self) -> Address:
        address = self._address  # read for every packet (pilot.stack): made once per node id
        if address.node != self.own_id:
            address = self._address = Address(0, self.own_id)
        return address

    def beacon(self) -> Optional[Endpoint]:
        return self.beacon_addr

    def local_port(self) -> int:
        """The tunnel socket's local port (0 before it is bound)."""
        return self._sender.local_port()

    def local_endpoint(self) -> Optional[str]:
        """Our tunnel socket on our own LAN (``host:port``), for peers behind the same NAT."""
        port = self.local_port()
        if self.lan_host is None or not port:
            return None
        return format_endpoint(self.lan_host, port)

    def endpoint_text(self) -> str:
        """What we register: the endpoint the beacon saw, else our local port."""
        if self.public_endpoint is not None:
            host, port = self.public_endpoint
        else:
            host, port = "0.0.0.0", self.local_port()
        return format_endpoint(host, port)

    def register_extra(self) -> dict[str, Any]:
        local = self.local_endpoint()
        return {"local_addr": local} if local is not None else {}

    def is_trusted(self, node_id: int) -> bool:
        return node_id in self.trust_store.trusted

    def pinned_key(self, node_id: int) -> bytes:
        entry = self.trust_store.trusted.get(node_id)
        return entry.public_key if entry is not None else b""

    # --- the beacon (IBeaconListener) ----------------------------------------------------------

    def is_beacon(self, source: Endpoint) -> bool:
        return self.beacon_addr is not None and (source[0], source[1]) == self.beacon_addr

    def discovered(self, observed: Endpoint) -> None:
        self._unanswered_since, self._doubted = None, False
        if self.registration.is_waiting():
            self.registration.server_seen()  # the beacon answers: the rendezvous is back
        via, self._seen_via = self._seen_via, (self._route_source, self.beacon_addr)
        if observed == self.public_endpoint:
            return
        old, self.public_endpoint = self.public_endpoint, observed
        if old is not None and via == self._seen_via:
            self.probe.mapping_lost(self._probe_gap)  # same route, same beacon: the NAT forgot us
        self.log.info("public endpoint {endpoint} (seen by the beacon)", endpoint=format_endpoint(*observed))
        if self.registration.is_idle():
            self._start_registration()
        elif old is not None or self.registration.is_registered():
            self.registration.endpoint_changed()

    def punch_commanded(self, peer: Endpoint) -> None:
        if self.behind_no_nat():
            call = self.clock.callLater(NO_NAT_PUNCH_DELAY, self._punch, peer)
            self._punch_calls.add(call)
        else:
            self._punch(peer)

    def _punch(self, peer: Endpoint) -> None:
        self._punch_calls = {c for c in self._punch_calls if c.active()}
        # hop-limited openers (the lower public endpoint's first), then the PILPs and our PILA
        self.openers.punch(peer, first=self.paths.punches_first(peer))

    def seen_endpoint(self) -> Optional[Endpoint]:
        """Our endpoint as the beacon sees it (None before it answered)."""
        return self.public_endpoint

    def behind_no_nat(self) -> bool:
        """Is the endpoint the beacon sees our socket's own (no NAT between us and it)?"""
        host = self._route_source or self.lan_host
        return (self.public_endpoint is not None and host is not None
                and self.public_endpoint == (host, self.local_port()))

    def discover(self) -> None:
        """Ask the beacon for our public endpoint now; signed once we are registered (records it there)."""
        if self.beacon_addr is None:
            return
        base = bw.Discover(self.own_id if self.registration.node_id is not None else 0).base
        if self.registration.node_id is not None:
            data = bw.with_proof(base, self.identity.sign, int(self.clock.seconds() * 1000),
                                 self._random_bytes(8))
        else:
            data = base
        self._send_discover(data, self.beacon_addr)

    def _send_discover(self, data: bytes, beacon: Endpoint) -> None:
        """Send a Discover; any Discover restarts the unsigned probe's wait (``self.probe.interval``)."""
        now = self.clock.seconds()
        self._probe_gap, self._last_probe = now - self._last_probe, now
        if self._unanswered_since is None:
            self._unanswered_since = now
        self._sender.send(data, beacon)

    def _discover(self) -> None:
        """Discover, then again every ``DISCOVER_RETRY`` until answered; then watch the route."""
        self._discover_call = None
        if self.beacon_addr is None or not self.running:
            return
        self.discover()
        if self.public_endpoint is None:
            self._discover_call = self.clock.callLater(DISCOVER_RETRY, self._discover)
        elif self._probe_call is None:
            self._probe_call = self.clock.callLater(ROUTE_CHECK, self._probe)

    def _probe(self) -> None:
        """
        Watch for our own IP changing, cheaply.  Every ``ROUTE_CHECK`` seconds
        ask the prober which local address reaches the beacon (nothing is
        sent); when it changed (another network, a new lease), ask the beacon
        at once (and go back to the default interval).  Every
        ``self.probe.interval`` seconds ask the beacon anyway (unsigned: it
        only answers), counted from our last Discover of any kind, which
        catches a NAT that changed our public address alone and keeps our
        mapping to the beacon open for punch commands and relays.
        A Discover left unanswered ``PROBE_ANSWER_WAIT`` seconds makes the
        registration heartbeat at once (``Registration.check_now``).
        """
        self._probe_call = None
        if self.beacon_addr is None or not self.running:
            return
        now = self.clock.seconds()
        local = self._prober.source_for(self.beacon_addr)
        moved = local is not None and self._route_source is not None and local != self._route_source
        if local is not None:
            self._route_source = local
        if (self._unanswered_since is not None and not self._doubted
                and now - self._unanswered_since >= PROBE_ANSWER_WAIT):
            # the beacon (the rendezvous's own process) went silent: a registry that died without
            # closing our connection would otherwise be found only by the next heartbeat (50 s)
            self._doubted = True
            self.registration.check_now()
        # while the registry is lost, ask the beacon more often: its answer says the
        # rendezvous is back, and we reconnect without waiting out the backoff
        every = OUTAGE_PROBE if self.registration.is_lost() else self.probe.interval
        if moved or now - self._last_probe >= every:
            if moved:
                self.log.info("our local address is now {address}: asking the beacon", address=local)
                self.probe.reset("our local address changed")
            self._send_discover(bw.Discover(0).base, self.beacon_addr)
        self._probe_call = self.clock.callLater(ROUTE_CHECK, self._probe)

    # --- the registry (IRegistryLink) ----------------------------------------------------------

    def _connect_registry(self) -> "Deferred[Any]":
        index = self.registration.server_index
        return self._connectors[min(index, len(self._connectors) - 1)].connect(self)

    def _server_changed(self, index: int) -> None:
        """
        The registration moved to another rendezvous entry: our trust
        statements are fetched there again, and discovery, punch and relay
        follow it to the paired beacon.  Established tunnels are
        not touched; an unsigned Discover asks the new beacon where we are
        (its answer also cuts the registration's wait short).
        """
        self.carried.server_changed()
        beacon = self._beacons[min(index, len(self._beacons) - 1)]
        if beacon == self.beacon_addr:
            return
        self.log.info("rendezvous: beacon now {beacon}", beacon=format_endpoint(*beacon) if beacon else None)
        self.beacon_addr = beacon
        self.probe.reset("another beacon")
        if beacon is not None and self.running:
            self._send_discover(bw.Discover(0).base, beacon)

    def event_received(self, event: dict[str, Any]) -> None:
        self.registration.event_received(event)

    def connection_lost(self, client: Any, reason: Any) -> None:
        self.registration.connection_lost(reason, client)

    def lan_address_learned(self, host: str) -> None:
        self.lan_host = host

    def _trust_request(self, msg: dict[str, Any]) -> "Deferred[Any]":
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
        self.carried.registered()
        self._discover()

    def _unregistered(self, reason: str) -> None:
        if not self.running:
            return  # we are stopping: we deregistered on purpose
        self.log.info("registry unavailable: {reason}; tunnels keep working, re-registering by itself",
                      reason=reason)

    def _heartbeat_ok(self, when: float, reply: dict[str, Any]) -> None:
        """
        The registry answered a heartbeat.  Ours says which endpoint the
        beacon (the same process) holds for us: when that is what the beacon
        last told us, a signed Discover would only prove it again.  A
        missing one (the rendezvous restarted, or a reference registry that
        never says) or another one: prove ours now (signed), which also
        shows us any move the NAT made since our last Discover.
        """
        held = parse_endpoint(reply.get("endpoint"))
        if held is None or held != self.public_endpoint:
            self._discover()

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

    def _lookup_key(self, node_id: int) -> "Deferred[bytes]":
        d = self.peers.lookup(node_id)
        return d.addCallback(functools.partial(self._registry_key, node_id))

    def _registry_key(self, node_id: int, _: object) -> bytes:
        peer = self.peers.peer(node_id)
        if not peer.public_key:
            raise NotFound(f"the registry has no key for node {node_id}")
        return peer.public_key

    def _send_direct(self, node_id: int, message: bytes) -> "Deferred[Any]":
        """One port-444 message over a stream; fails when the peer cannot be reached directly."""
        d: Deferred[Any] = self.peers.endpoint(node_id)
        d.addCallback(self._dial_handshake, node_id, message)
        return d

    def _dial_handshake(self, _: object, node_id: int, message: bytes) -> "Deferred[Any]":
        return self.stack.connect(Address(0, node_id), HANDSHAKE_PORT, self._one_message(message), timeout=5.0)

    def _trust_saved(self) -> None:
        self._save_trust()
        self.carried.trust_changed()

    def _trust_ended(self, node_id: int) -> None:
        # the revoke to the peer's port 444 is already on its way: let it arrive
        self.stack.abort_peer(node_id, spare_port=HANDSHAKE_PORT)

    # --- packets, the way down ------------------------------------------------------------------

    def _send_packet(self, packet: Packet) -> None:
        node_id = packet.dst.node
        endpoint = self.peers.peer(node_id).endpoint
        self.paths.sending(node_id, endpoint)
        self.tunnels.send(packet, node_id, endpoint)

    def _peer_unreachable(self, node_id: int) -> None:
        self.log.info("node {node} did not answer our key exchange", node=node_id)
        self.peers.expire(node_id)
        self.paths.unreachable(node_id)

    def _path_changed(self, node_id: int, state: str, endpoint: Optional[Endpoint]) -> None:
        self.log.info("path to node {node}: {state} {endpoint}", node=node_id, state=state, endpoint=endpoint)
