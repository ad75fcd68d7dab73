# -*- test-case-name: tests.machines.test_tunnel -*-
"""
:class:`Tunnels`, the node's tunnel layer: decodes frames, checks PILA
signatures against ``expected_key`` and feeds one
:class:`~pilot.machines.tunnel.peer.PeerTunnel` machine per peer; it holds
what the peers share (our PILA, the answer budget, the queues' bound, the
key look-ups).  Rules in ``docs/tunnel.md``.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable, Optional

import attr
from nacl.public import PrivateKey
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from pilot.endpoint import Endpoint
from pilot.errors import MalformedFrame
from pilot.identity import Identity, verify
from pilot.interfaces import DatagramTooBig, IFrameReceiver, IPathEvents
from pilot.machines.tunnel.peer import Peer, open_sealed
from pilot.machines.tunnel.pmtu import PathMtus
from pilot.wire import probe as pw
from pilot.wire.beacon import Relay
from pilot.wire.packet import Packet
from pilot.wire.tunnel import (
    MAGIC_LEN, PILS, SEALED_MIN, AuthKeyExchange, KeyExchange, PlainFrame, PunchProbe, SealedFrame, decode_frame,
)
from pilot.wire.tunnel_crypto import derive_key

QUEUE_PER_PEER = 64        # packets held per peer while exchanging; the oldest go first
QUEUED_PEERS = 256         # peers holding packets; the longest-holding peer's queue goes first
ANSWERS_PER_SECOND = 20    # answers to unauthenticated frames (PILK), all peers together
LOOKUPS_IN_FLIGHT = 256    # expected_key lookups at once
LOOKUP_BACKLOG = 4         # PILA frames held per sender while its key is looked up


@implementer(IFrameReceiver)
@attr.s(auto_attribs=True, kw_only=True, eq=False)
class Tunnels:
    """
    Every tunnel of one node.  ``node_id()`` may change after registration
    (None before it); ``expected_key(node_id)`` returns a Deferred (or a value):
    the peer's Ed25519 key from the trust store or registry, or None.
    """

    _own_id: Callable[[], Optional[int]] = attr.ib(alias="node_id")
    _identity: Identity
    _send_datagram: Callable[[bytes, Endpoint], None]
    _deliver: Callable[[Packet, int], None]
    _expected_key: Callable[[int], "Deferred[Optional[bytes]] | Optional[bytes]"]
    _clock: IReactorTime
    _x25519: PrivateKey = attr.Factory(PrivateKey.generate)  # one per process
    _beacon: Callable[[], Optional[Endpoint]] = lambda: None  # where relayed frames go
    _peer_unreachable: Callable[[int], None] = lambda node_id: None
    _endpoint_changed: Callable[[int, Endpoint], None] = lambda node_id, endpoint: None
    # path hooks (pilot.machines.path): an authenticated frame from the peer's endpoint, or relayed
    _direct_frame: Callable[[int, Endpoint], None] = lambda node_id, endpoint: None
    _relayed_frame: Callable[[int], None] = lambda node_id: None
    _random_bytes: Callable[[int], bytes] = os.urandom
    #: ``segment_size_changed(node_id, mss)``: the stream segment that fits the peer's path now.
    _segment_size_changed: Callable[[int, int], None] = lambda node_id, mss: None
    #: The largest UDP payload the path search may try (None: a 4,096-byte segment's frame).
    _max_datagram: Optional[int] = None
    counters: collections.Counter[str] = attr.ib(init=False, factory=collections.Counter)
    _peers: dict[int, Peer] = attr.ib(init=False, factory=dict)
    _holding: collections.OrderedDict[int, None] = attr.ib(init=False, factory=collections.OrderedDict)
    _lookups: dict[int, list[tuple[AuthKeyExchange, Endpoint, bool]]] = attr.ib(init=False, factory=dict)
    _pila: tuple[int, bytes] = attr.ib(init=False, default=(-1, b""))
    _answer_second: tuple[int, int] = attr.ib(init=False, default=(-1, 0))
    #: Path MTU discovery, per peer and path (``pilot.machines.tunnel.pmtu``).
    mtu: PathMtus = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        self.mtu = PathMtus(clock=self._clock, send_frame=self._send_probe_frame, own_id=self._own_id,
                            segment_size_changed=lambda node_id, mss: self._segment_size_changed(node_id, mss),
                            random_bytes=self._random_bytes, count=self.count,
                            max_datagram=self._max_datagram)

    @property
    def x25519_public(self) -> bytes:
        return bytes(self._x25519.public_key)

    def wire(self, paths: IPathEvents) -> None:
        """Connect the path layer (built after us, as it drives :meth:`set_path`)."""
        self._direct_frame = paths.direct_frame
        self._relayed_frame = paths.relayed_frame

    # -- the node's side --

    def send(self, packet: Packet, node_id: int, endpoint: Optional[Endpoint] = None) -> None:
        """Carry ``packet`` to ``node_id``; ``endpoint`` is used only if no route is known yet."""
        peer = self._peer(node_id)
        if peer.endpoint is None and endpoint is not None and not peer.relay:
            peer.endpoint = endpoint
        if peer.endpoint is None and not peer.relay:
            self.count("no_route")
            return
        if peer.session is None:
            peer.machine.packet_queued(packet)
            return
        if self.mtu.in_use.get(node_id) is not peer.relay:  # using()'s test, without its call per packet
            self.mtu.using(node_id, peer.relay)
        if peer.machine.__automat_postponed__ is not None:  # running(peer.machine), without the call
            peer.machine.packet_queued(packet)  # queued after the behaviour under way, as any input
        else:
            # established (a session is installed on the way there and never dropped): that state's
            # packet_queued loop (_seal) run as the machine would, without the input's dispatch
            peer.send_sealed(packet)

    def path_trouble(self, node_id: int) -> None:
        """A stream to the peer timed out again and again: check that its datagrams still fit."""
        self.mtu.path_trouble(node_id)

    def set_path(self, node_id: int, direct_endpoint: Optional[Endpoint], relay: bool,
                 hold: bool = False) -> None:
        """Send to the peer directly or through the beacon from now on; the session is kept.
        ``hold``: our key exchanges wait for the path layer (a punch, ``docs/nat.md``)."""
        peer = self._peer(node_id)
        if direct_endpoint is not None:
            peer.endpoint = direct_endpoint
        peer.relay = relay
        peer.held = hold

    def send_key_exchange(self, node_id: int, endpoint: Optional[Endpoint] = None) -> None:
        """Our PILA to the peer now: to ``endpoint`` directly, or (None) by its current path."""
        self._peer(node_id).send_pila(endpoint, False if endpoint is not None else None)

    def frame_received(self, data: Any, source: Endpoint, via_relay: bool = False,
                       relay_sender: Optional[int] = None) -> None:
        """
        One tunnel frame (unwrapped from a RelayDeliver if ``via_relay``); never raises for bad input.
        ``relay_sender`` is the node id the beacon says relayed it (docs/reference-wire.md §3): a
        relayed frame that names another sender is dropped and counted (``relay_sender_mismatch``).
        """
        frame: Any
        if type(data) is bytes and data[:MAGIC_LEN] == PILS and len(data) >= SEALED_MIN:
            frame = SealedFrame._from(data)  # nearly every frame: what decode_frame does first
        elif isinstance(data, (bytes, bytearray, memoryview)) and bytes(data[:4]) == pw.PILM:
            self._probe_frame(data, source, via_relay, relay_sender)
            return
        else:
            try:
                frame = decode_frame(data)
            except MalformedFrame:
                self.count("malformed")
                return
        if relay_sender is not None and self._relay_mismatch(getattr(frame, "sender", None), relay_sender):
            return
        if type(frame) is SealedFrame and frame.sender != self._own_id():  # the data path first
            peer = self._peers.get(frame.sender)
            # _sealed()'s common case, without the call: established, nothing under way
            if (peer is not None and peer.session is not None
                    and peer.machine.__automat_postponed__ is None):
                packet = open_sealed(peer.machine, peer, frame, source, via_relay)
                if packet is not None:
                    self._deliver(packet, frame.sender)
            else:
                self._sealed(frame, source, via_relay)
        elif isinstance(frame, PlainFrame):
            self.count("plaintext_dropped")
        elif isinstance(frame, PunchProbe):
            self.count("punch_ignored")
        elif frame.sender == self._own_id():
            self.count("from_self")
        elif isinstance(frame, KeyExchange):
            self._refuse_unauthenticated(frame, source, via_relay)
        elif isinstance(frame, AuthKeyExchange):
            self._key_exchange(frame, source, via_relay)
        else:
            self._sealed(frame, source, via_relay)

    def _sealed(self, frame: SealedFrame, source: Endpoint, via_relay: bool) -> None:
        peer = self._peers.get(frame.sender)
        if peer is None:
            # sealed with a session we do not have (we restarted): offer ours
            self.count("pils_no_session")
            self.answer_with_pila(frame.sender, source, via_relay)
            return
        if peer.session is not None and peer.machine.__automat_postponed__ is None:  # not running()
            packet = open_sealed(peer.machine, peer, frame, source, via_relay)  # established's loop, as in send()
        else:
            packet = peer.machine.sealed_frame_received(frame, source, via_relay)
        if packet is not None:
            self._deliver(packet, frame.sender)

    def _relay_mismatch(self, sender: Optional[int], relay_sender: Optional[int]) -> bool:
        """True (and counted) if a relayed frame's own sender is not the node the beacon named."""
        if relay_sender is None or sender is None or sender == relay_sender:
            return False
        self.count("relay_sender_mismatch")
        return True

    def _probe_frame(self, data: Any, source: Endpoint, via_relay: bool,
                     relay_sender: Optional[int] = None) -> None:
        """A path MTU probe (answered on the path it came by, to a peer with a session) or its ack."""
        try:
            frame = pw.decode(data)
        except MalformedFrame:
            self.count("malformed")
            return
        if self._relay_mismatch(frame.sender, relay_sender):
            return
        if isinstance(frame, pw.MtuProbeAck):
            self.mtu.ack_received(frame.sender, frame.token, frame.size, via_relay)
        elif frame.sender == self._own_id() or not self.is_established(frame.sender):
            self.count("mtu_probe_refused")
        else:
            own = self._own_id()
            assert own is not None
            self.count("mtu_probe_answered")
            self.emit(frame.sender, pw.MtuProbeAck(own, frame.token, frame.size).encode(), source, via_relay)

    def key_exchange_frame(self) -> bytes:
        """Our PILA for our current node id."""
        own = self._own_id() or 0
        if self._pila[0] != own:
            frame = AuthKeyExchange.build(own, self.x25519_public, self._identity.public_key,
                                          self._identity.sign)
            self._pila = (own, frame.encode())
        return self._pila[1]

    # -- what the node (and the path layer) ask --

    def state(self, node_id: int) -> str:
        """``idle``, ``exchanging`` or ``established``, for logs, ``pilotctl`` and tests."""
        peer = self._peers.get(node_id)
        if peer is not None and peer.session is not None:
            return "established"
        return "exchanging" if peer is not None and peer.exchanging else "idle"

    def is_established(self, node_id: int) -> bool:
        """Do we hold a session with the peer (so that it needs no PILA from us to hear us)?"""
        peer = self._peers.get(node_id)
        return peer is not None and peer.session is not None

    def last_sent(self, node_id: int) -> Optional[float]:
        """When we last sent the peer a frame (clock seconds), None if never."""
        peer = self._peers.get(node_id)
        return peer.last_tx if peer is not None else None

    def stats(self, node_id: int) -> Optional[dict[str, Any]]:
        peer = self._peers.get(node_id)
        if peer is None:
            return None
        return {"state": self.state(node_id), "endpoint": peer.endpoint,
                "path": "relay" if peer.relay else "direct", "established_at": peer.established_at,
                "last_rx": peer.last_rx, "last_tx": peer.last_tx, "bytes_rx": peer.bytes_rx,
                "bytes_tx": peer.bytes_tx, "queued": len(peer.queue), **self.mtu.stats(node_id)}

    def peers(self) -> list[int]:
        return sorted(self._peers)

    def stop(self) -> None:
        """Cancel every timer (the service is stopping)."""
        for peer in self._peers.values():
            peer.stop_timers()
        self.mtu.stop()

    # -- what the peer machines ask (pilot.machines.tunnel.peer.TunnelOwner) --

    def own_id(self) -> Optional[int]:
        return self._own_id()

    def count(self, reason: str, n: int = 1) -> None:
        if n:
            self.counters[reason] += n

    def emit(self, node_id: int, frame: bytes, endpoint: Optional[Endpoint], relay: bool) -> bool:
        """Send ``frame`` to the peer directly or through the beacon; False if there is no way."""
        try:
            if endpoint is not None and not relay:
                self._send_datagram(frame, endpoint)  # direct: _emit()'s last branch, per packet
                return True
            return self._emit(node_id, frame, endpoint, relay)
        except DatagramTooBig:
            self.mtu.too_big(node_id, relay, len(frame))
            return False

    def _send_probe_frame(self, node_id: int, frame: bytes, relay: bool) -> bool:
        """A probe by the peer's path; DatagramTooBig goes to the caller (the search)."""
        peer = self._peers.get(node_id)
        return peer is not None and self._emit(node_id, frame, peer.endpoint, relay)

    def _emit(self, node_id: int, frame: bytes, endpoint: Optional[Endpoint], relay: bool) -> bool:
        if relay:
            beacon, own = self._beacon(), self._own_id()
            if beacon is None or own is None:
                self.count("no_beacon" if beacon is None else "no_node_id")
                return False
            self._send_datagram(Relay(own, node_id, frame).encode(), beacon)
        elif endpoint is None:
            self.count("no_route")
            return False
        else:
            self._send_datagram(frame, endpoint)
        return True

    def hold(self, peer: Peer, packet: Packet) -> None:
        """Queue ``packet`` while the peer exchanges keys; the node holds at most QUEUED_PEERS queues."""
        if peer.node_id not in self._holding:
            if len(self._holding) >= QUEUED_PEERS:
                oldest = self._peers[next(iter(self._holding))]
                self.count("queue_overflow", len(oldest.queue))
                self.release(oldest)
            self._holding[peer.node_id] = None
        if len(peer.queue) >= QUEUE_PER_PEER:
            peer.queue.popleft()
            self.count("queue_overflow")
        peer.queue.append(packet)

    def release(self, peer: Peer) -> None:
        peer.queue.clear()
        self._holding.pop(peer.node_id, None)

    def answer_with_pila(self, sender: int, source: Endpoint, via_relay: bool) -> None:
        """
        Send our PILA to a peer that needs it: one that offered an
        unauthenticated exchange, or one still sealing with a session we no
        longer have (we restarted).  Within a global per-second budget and at
        most once per ``ANSWER_INTERVAL`` per peer.
        """
        now, (second, used) = self._clock.seconds(), self._answer_second
        peer = self._peers.get(sender)
        recent = peer is not None and peer.recently_sent_pila(now)
        if recent or (second == int(now) and used >= ANSWERS_PER_SECOND) or self._own_id() is None:
            self.count("answer_rate_limited")
            return
        self._answer_second = (int(now), used + 1 if second == int(now) else 1)
        if self.emit(sender, self.key_exchange_frame(), source, via_relay) and peer is not None:
            peer.last_pila_sent = now

    def heard(self, node_id: int, source: Endpoint, via_relay: bool, from_endpoint: bool) -> None:
        """Tell the path layer how an authenticated frame came."""
        if via_relay:
            self._relayed_frame(node_id)
        elif from_endpoint:
            self._direct_frame(node_id, source)

    def moved(self, node_id: int, endpoint: Endpoint) -> None:
        self._endpoint_changed(node_id, endpoint)

    def gave_up(self, node_id: int) -> None:
        self._peer_unreachable(node_id)

    # -- receiving key exchanges --

    def _refuse_unauthenticated(self, frame: KeyExchange, source: Endpoint, via_relay: bool) -> None:
        """Never accepted (#11); answered with our PILA, within a global per-second budget."""
        self.count("pilk_refused")
        self.answer_with_pila(frame.sender, source, via_relay)

    def _key_exchange(self, frame: AuthKeyExchange, source: Endpoint, via_relay: bool) -> None:
        peer = self._peers.get(frame.sender)
        if peer is not None and peer.is_retired(frame.x25519_public):
            self.count("pila_stale_key")
            return
        if peer is not None and peer.session is not None:
            encoded = frame.encode()
            known = peer.session.key if encoded == peer.accepted else peer.candidate_key(
                encoded, frame.x25519_public)
            if known is not None:  # byte for byte a PILA already verified: no second lookup
                peer.machine.key_exchange_received(frame, known, source, via_relay)
                return
        if not verify(frame.ed25519_public, frame.signed_message, frame.signature):
            self.count("pila_bad_signature")
            return
        waiting = self._lookups.get(frame.sender)
        if waiting is not None:
            if len(waiting) >= LOOKUP_BACKLOG:
                self.count("pila_lookup_busy")
            else:
                waiting.append((frame, source, via_relay))
            return
        if len(self._lookups) >= LOOKUPS_IN_FLIGHT:
            self.count("pila_lookup_busy")
            return
        self._lookups[frame.sender] = [(frame, source, via_relay)]
        d = maybeDeferred(self._expected_key, frame.sender)
        d.addCallbacks(self._key_found, self._key_lookup_failed,
                       callbackArgs=(frame.sender,), errbackArgs=(frame.sender,))

    def _key_found(self, expected: Optional[bytes], sender: int) -> None:
        for frame, source, via_relay in self._lookups.pop(sender, []):
            self._verified(frame, expected, source, via_relay)

    def _key_lookup_failed(self, failure: Failure, sender: int) -> None:
        self.count("pila_lookup_failed", len(self._lookups.pop(sender, [])))

    def _verified(self, frame: AuthKeyExchange, expected: Optional[bytes], source: Endpoint,
                  via_relay: bool) -> None:
        if not expected:
            self.count("pila_unknown_key")
            return
        if not frame.verify(expected):
            self.count("pila_wrong_key")
            return
        peer = self._peer(frame.sender)
        if peer.is_retired(frame.x25519_public):
            self.count("pila_stale_key")
            return
        key = peer.known_key(frame.x25519_public)
        if key is None:
            try:
                key = derive_key(bytes(self._x25519), frame.x25519_public)
            except MalformedFrame:
                self.count("pila_bad_x25519")
                return
        peer.machine.key_exchange_received(frame, key, source, via_relay)

    def _peer(self, node_id: int) -> Peer:
        peer = self._peers.get(node_id)
        if peer is None:
            peer = self._peers[node_id] = Peer(node_id, self, self._clock, self._random_bytes)
        return peer
