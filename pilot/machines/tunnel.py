# -*- test-case-name: tests.machines.test_tunnel -*-
"""
The node side of the tunnel layer (facts §4); rules, and where they differ
from the reference, in ``docs/tunnel.md``.

:class:`Tunnels` (one per node) decodes frames, checks PILA signatures against
``expected_key`` and feeds one :class:`PeerTunnel` machine per peer: ``idle``
-> ``exchanging`` (our PILA resent 250 ms doubling to 2 s, give up at 10 s)
-> ``established``.  Only authenticated traffic: no PILT or PILK is ever sent,
every PILT is dropped, every PILK refused.  A repeated PILA with the same
X25519 key keeps the session (send counter, replay windows); replay windows
are kept per nonce prefix, so a reference peer that re-keys is still heard.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable, Deque, Optional, Protocol

import attr
from automat import TypeMachineBuilder
from nacl.public import PrivateKey
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from pilot.errors import MalformedFrame
from pilot.identity import Identity, verify
from pilot.interfaces import IFrameReceiver, IPathEvents
from pilot.wire.beacon import Relay
from pilot.wire.packet import Packet
from pilot.wire.tunnel import (
    AuthKeyExchange, KeyExchange, PlainFrame, PunchProbe, SealedFrame, decode_frame,
)
from pilot.wire.tunnel_crypto import NonceSequence, ReplayWindow, TunnelSession, derive_key, open_

Endpoint = tuple[str, int]

QUEUE_PER_PEER = 64        # packets held per peer while exchanging; the oldest go first
QUEUED_PEERS = 256         # peers holding packets; the longest-holding peer's queue goes first
RETRY_FIRST = 0.25         # first PILA retransmission (s), doubling ...
RETRY_MAX = 2.0            # ... up to this
GIVE_UP = 10.0             # exchange abandoned after this (s)
ANSWER_INTERVAL = 0.5      # at most one answering PILA per peer per interval ...
ANSWER_BURST = 5           # ... and this many answers to repeated PILAs ...
ANSWER_WINDOW = 30.0       # ... per window (s)
ANSWERS_PER_SECOND = 20    # answers to unauthenticated frames (PILK), all peers together
LOOKUPS_IN_FLIGHT = 256    # expected_key lookups at once
LOOKUP_BACKLOG = 4         # PILA frames held per sender while its key is looked up
PREFIX_WINDOWS = 8         # recent peer nonce prefixes with a live replay window
RETIRED_PREFIXES = 1024    # older prefixes, all of whose frames are refused
RETIRED_KEYS = 8           # old peer X25519 keys refused (a restarted peer never reuses one)


class _Dropped(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Session:
    """One X25519 agreement: the key, our send nonces, a replay window per peer prefix."""

    def __init__(self, key: bytes, peer_x25519: bytes, random_bytes: Callable[[int], bytes]) -> None:
        self.key = key
        self.peer_x25519 = peer_x25519
        self.sender = TunnelSession(key, NonceSequence.fresh(random_bytes))
        self.windows: collections.OrderedDict[bytes, ReplayWindow] = collections.OrderedDict()
        self.retired: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def acceptable(self, prefix: bytes, counter: int) -> bool:
        window = self.windows.get(prefix)
        return prefix not in self.retired and (window is None or window.check(counter))

    def open(self, frame: SealedFrame) -> bytes:
        """The plaintext, or ``_Dropped``; a new prefix gets a window only once a frame decrypts."""
        prefix, counter = frame.nonce_prefix, frame.counter
        if not self.acceptable(prefix, counter):
            raise _Dropped("pils_replayed")
        try:
            plaintext = open_(self.key, frame.nonce, frame.ciphertext)
        except MalformedFrame:
            raise _Dropped("pils_undecryptable") from None
        window = self.windows.get(prefix)
        if window is None:
            window = self.windows[prefix] = ReplayWindow()
            while len(self.windows) > PREFIX_WINDOWS:
                self.retired[self.windows.popitem(last=False)[0]] = None
            while len(self.retired) > RETIRED_PREFIXES:
                self.retired.popitem(last=False)
        window.mark(counter)
        return plaintext


class PeerTunnel(Protocol):
    """Inputs about one peer."""

    def packet_queued(self, packet: Packet) -> None:
        "The node wants ``packet`` carried to the peer."

    def key_exchange_received(self, frame: AuthKeyExchange, key: bytes, source: Endpoint,
                              via_relay: bool) -> None:
        "A PILA whose signature verified with the peer's expected key; ``key`` is the derived AES key."

    def sealed_frame_received(self, frame: SealedFrame, source: Endpoint,
                              via_relay: bool) -> Optional[Packet]:
        "A PILS from the peer; the authenticated packet, or None if dropped."

    def retry_timer_fired(self) -> None:
        "Time to resend our PILA."

    def exchange_timed_out(self) -> None:
        "The exchange has run for GIVE_UP seconds."


@attr.s(auto_attribs=True, eq=False)
class _Peer:
    node_id: int
    tunnels: "Tunnels"
    endpoint: Optional[Endpoint] = None
    relay: bool = False
    queue: Deque[Packet] = attr.Factory(collections.deque)
    session: Optional[_Session] = None
    accepted: bytes = b""  # the last accepted PILA, byte for byte
    retired_keys: Deque[bytes] = attr.Factory(lambda: collections.deque(maxlen=RETIRED_KEYS))
    retry_delay: float = RETRY_FIRST
    retry_call: Optional[IDelayedCall] = None
    give_up_call: Optional[IDelayedCall] = None
    last_pila_sent: Optional[float] = None
    answers: Deque[float] = attr.Factory(collections.deque)
    established_at: Optional[float] = None
    last_rx: Optional[float] = None
    last_tx: Optional[float] = None
    bytes_rx: int = 0
    bytes_tx: int = 0
    machine: Any = None

    # -- shared by the behaviours --

    def transmit(self, frame: bytes, endpoint: Optional[Endpoint] = None,
                 relay: Optional[bool] = None) -> bool:
        """Send ``frame`` by the peer's path (or the one given); False if there is none."""
        t = self.tunnels
        relay = self.relay if relay is None else relay
        if not t._emit(self.node_id, frame, endpoint or self.endpoint, relay):
            return False
        self.last_tx = t._now()
        self.bytes_tx += len(frame)
        return True

    def send_pila(self, endpoint: Optional[Endpoint] = None, relay: Optional[bool] = None) -> None:
        t = self.tunnels
        if t._own_id() is None:
            t._count("no_node_id")
        elif self.transmit(t.key_exchange_frame(), endpoint, relay):
            self.last_pila_sent = t._now()

    def send_sealed(self, packet: Packet) -> None:
        assert self.session is not None
        own = self.tunnels._own_id()
        if own is None:
            self.tunnels._count("no_node_id")
        else:
            self.transmit(SealedFrame.seal(self.session.sender, own, packet).encode())

    def schedule_retry(self) -> None:
        self.retry_call = self.tunnels._clock.callLater(self.retry_delay, self.machine.retry_timer_fired)

    def stop_timers(self) -> None:
        for call in (self.retry_call, self.give_up_call):
            if call is not None and call.active():
                call.cancel()
        self.retry_call = self.give_up_call = None

    def set_endpoint(self, endpoint: Endpoint) -> None:
        if endpoint != self.endpoint:
            self.endpoint = endpoint
            self.tunnels._endpoint_changed(self.node_id, endpoint)

    def may_answer(self, now: float) -> bool:
        """Answer a repeated PILA?  Not within ANSWER_INTERVAL of our last one (this ends
        PILA ping-pong between two established peers), at most ANSWER_BURST per window."""
        while self.answers and now - self.answers[0] >= ANSWER_WINDOW:
            self.answers.popleft()
        if (self.last_pila_sent is not None and now - self.last_pila_sent < ANSWER_INTERVAL) \
                or len(self.answers) >= ANSWER_BURST:
            self.tunnels._count("answer_rate_limited")
            return False
        self.answers.append(now)
        return True


_builder = TypeMachineBuilder(PeerTunnel, _Peer)
idle = _builder.state("idle")
exchanging = _builder.state("exchanging")
established = _builder.state("established")


@idle.upon(PeerTunnel.packet_queued).to(exchanging)
def _start(m: PeerTunnel, c: _Peer, packet: Packet) -> None:
    c.tunnels._hold(c, packet)
    c.send_pila()
    c.retry_delay = RETRY_FIRST
    c.schedule_retry()
    c.give_up_call = c.tunnels._clock.callLater(GIVE_UP, m.exchange_timed_out)


@exchanging.upon(PeerTunnel.packet_queued).loop()
def _hold(m: PeerTunnel, c: _Peer, packet: Packet) -> None:
    c.tunnels._hold(c, packet)


@established.upon(PeerTunnel.packet_queued).loop()
def _seal(m: PeerTunnel, c: _Peer, packet: Packet) -> None:
    c.send_sealed(packet)


@exchanging.upon(PeerTunnel.retry_timer_fired).loop()
def _retry(m: PeerTunnel, c: _Peer) -> None:
    c.send_pila()
    c.retry_delay = min(c.retry_delay * 2, RETRY_MAX)
    c.schedule_retry()


@exchanging.upon(PeerTunnel.exchange_timed_out).to(idle)
def _give_up(m: PeerTunnel, c: _Peer) -> None:
    c.stop_timers()
    c.tunnels._count("unreachable_dropped", len(c.queue))
    c.tunnels._release(c)
    c.tunnels._peer_unreachable(c.node_id)


def _accept(m: PeerTunnel, c: _Peer, frame: AuthKeyExchange, key: bytes, source: Endpoint,
            via_relay: bool) -> None:
    t, now = c.tunnels, c.tunnels._now()
    c.stop_timers()
    known = c.endpoint  # a repeated PILA (replayable) vouches only for the endpoint we knew
    if c.session is not None and c.session.peer_x25519 == frame.x25519_public:
        # The same agreement again (a retransmission, a replay, or a peer that did not get
        # our PILA): keep counters and windows (#10); only a PILS moves a known endpoint.
        if c.endpoint is None and not via_relay:
            c.set_endpoint(source)
        if c.may_answer(now):
            c.send_pila(source, via_relay)
    else:
        if c.session is not None:  # the peer restarted: new X25519 key, new session
            c.retired_keys.append(c.session.peer_x25519)
            t._count("peer_rekeyed")
        c.session = _Session(key, frame.x25519_public, t._random_bytes)
        c.established_at = now
        c.answers.clear()
        if via_relay:
            c.relay = c.relay or c.endpoint is None
        else:
            c.set_endpoint(source)
        c.send_pila(source, via_relay)
        known = c.endpoint
    c.accepted = frame.encode()
    t._heard(c, source, via_relay, source == known)
    queued = list(c.queue)
    t._release(c)
    for packet in queued:
        c.send_sealed(packet)


def _no_session(m: PeerTunnel, c: _Peer, frame: SealedFrame, source: Endpoint,
                via_relay: bool) -> Optional[Packet]:
    c.tunnels._count("pils_no_session")
    c.tunnels._answer_with_pila(frame.sender, source, via_relay)
    return None


@established.upon(PeerTunnel.sealed_frame_received).loop()
def _open(m: PeerTunnel, c: _Peer, frame: SealedFrame, source: Endpoint,
          via_relay: bool) -> Optional[Packet]:
    assert c.session is not None
    try:
        packet = Packet.decode(c.session.open(frame))
        if packet.src.node != c.node_id:  # #9: the sender id must be the packet's source
            raise _Dropped("pils_wrong_source")
    except _Dropped as e:
        c.tunnels._count(e.reason)
        return None
    except MalformedFrame:
        c.tunnels._count("pils_bad_packet")
        return None
    c.last_rx = c.tunnels._now()
    c.bytes_rx += 20 + len(frame.ciphertext)
    if not via_relay:
        c.set_endpoint(source)  # roaming: an authenticated frame from a new address
    c.tunnels._heard(c, source, via_relay, True)
    return packet


idle.upon(PeerTunnel.key_exchange_received).to(established)(_accept)
exchanging.upon(PeerTunnel.key_exchange_received).to(established)(_accept)
established.upon(PeerTunnel.key_exchange_received).loop()(_accept)
for _state in (idle, exchanging):
    _state.upon(PeerTunnel.sealed_frame_received).loop()(_no_session)
for _state in (idle, established):  # timers are cancelled on leaving exchanging; late ones are no-ops
    _state.upon(PeerTunnel.retry_timer_fired).loop().returns(None)
    _state.upon(PeerTunnel.exchange_timed_out).loop().returns(None)

PeerTunnelMachine = _builder.build()


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
    counters: collections.Counter[str] = attr.ib(init=False, factory=collections.Counter)
    _peers: dict[int, _Peer] = attr.ib(init=False, factory=dict)
    _holding: collections.OrderedDict[int, None] = attr.ib(init=False, factory=collections.OrderedDict)
    _lookups: dict[int, list[tuple[AuthKeyExchange, Endpoint, bool]]] = attr.ib(init=False, factory=dict)
    _pila: tuple[int, bytes] = attr.ib(init=False, default=(-1, b""))
    _answer_second: tuple[int, int] = attr.ib(init=False, default=(-1, 0))

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
            self._count("no_route")
            return
        peer.machine.packet_queued(packet)

    def set_path(self, node_id: int, direct_endpoint: Optional[Endpoint], relay: bool) -> None:
        """Send to the peer directly or through the beacon from now on; the session is kept."""
        peer = self._peer(node_id)
        if direct_endpoint is not None:
            peer.endpoint = direct_endpoint
        peer.relay = relay

    def send_key_exchange(self, node_id: int, endpoint: Optional[Endpoint] = None) -> None:
        """Our PILA to the peer now: to ``endpoint`` directly, or (None) by its current path."""
        self._peer(node_id).send_pila(endpoint, False if endpoint is not None else None)

    def frame_received(self, data: Any, source: Endpoint, via_relay: bool = False) -> None:
        """One tunnel frame (unwrapped from a RelayDeliver if ``via_relay``); never raises for bad input."""
        try:
            frame = decode_frame(data)
        except MalformedFrame:
            self._count("malformed")
            return
        if isinstance(frame, PlainFrame):
            self._count("plaintext_dropped")
        elif isinstance(frame, PunchProbe):
            self._count("punch_ignored")
        elif frame.sender == self._own_id():
            self._count("from_self")
        elif isinstance(frame, KeyExchange):
            self._refuse_unauthenticated(frame, source, via_relay)
        elif isinstance(frame, AuthKeyExchange):
            self._key_exchange(frame, source, via_relay)
        else:
            peer = self._peers.get(frame.sender)
            if peer is None:
                # sealed with a session we do not have (we restarted): offer ours
                self._count("pils_no_session")
                self._answer_with_pila(frame.sender, source, via_relay)
                return
            packet = peer.machine.sealed_frame_received(frame, source, via_relay)
            if packet is not None:
                self._deliver(packet, frame.sender)

    def key_exchange_frame(self) -> bytes:
        """Our PILA for our current node id."""
        own = self._own_id() or 0
        if self._pila[0] != own:
            frame = AuthKeyExchange.build(own, self.x25519_public, self._identity.public_key,
                                          self._identity.sign)
            self._pila = (own, frame.encode())
        return self._pila[1]

    def state(self, node_id: int) -> str:
        peer = self._peers.get(node_id)
        if peer is not None and peer.session is not None:
            return "established"
        return "exchanging" if peer is not None and peer.give_up_call is not None else "idle"

    def stats(self, node_id: int) -> Optional[dict[str, Any]]:
        peer = self._peers.get(node_id)
        if peer is None:
            return None
        return {"state": self.state(node_id), "endpoint": peer.endpoint,
                "path": "relay" if peer.relay else "direct", "established_at": peer.established_at,
                "last_rx": peer.last_rx, "last_tx": peer.last_tx, "bytes_rx": peer.bytes_rx,
                "bytes_tx": peer.bytes_tx, "queued": len(peer.queue)}

    def peers(self) -> list[int]:
        return sorted(self._peers)

    def stop(self) -> None:
        """Cancel every timer (the service is stopping)."""
        for peer in self._peers.values():
            peer.stop_timers()

    # -- receiving key exchanges --

    def _refuse_unauthenticated(self, frame: KeyExchange, source: Endpoint, via_relay: bool) -> None:
        """Never accepted (#11); answered with our PILA, within a global per-second budget."""
        self._count("pilk_refused")
        self._answer_with_pila(frame.sender, source, via_relay)

    def _answer_with_pila(self, sender: int, source: Endpoint, via_relay: bool) -> None:
        """
        Send our PILA to a peer that needs it: one that offered an
        unauthenticated exchange, or one still sealing with a session we no
        longer have (we restarted).  Within a global per-second budget and at
        most once per ``ANSWER_INTERVAL`` per peer.
        """
        now, (second, used) = self._now(), self._answer_second
        peer = self._peers.get(sender)
        recent = peer is not None and peer.last_pila_sent is not None \
            and now - peer.last_pila_sent < ANSWER_INTERVAL
        if recent or (second == int(now) and used >= ANSWERS_PER_SECOND) or self._own_id() is None:
            self._count("answer_rate_limited")
            return
        self._answer_second = (int(now), used + 1 if second == int(now) else 1)
        if self._emit(sender, self.key_exchange_frame(), source, via_relay) and peer is not None:
            peer.last_pila_sent = now

    def _key_exchange(self, frame: AuthKeyExchange, source: Endpoint, via_relay: bool) -> None:
        peer = self._peers.get(frame.sender)
        if peer is not None and frame.x25519_public in peer.retired_keys:
            self._count("pila_stale_key")
            return
        if peer is not None and peer.session is not None and frame.encode() == peer.accepted:
            peer.machine.key_exchange_received(frame, peer.session.key, source, via_relay)
            return
        if not verify(frame.ed25519_public, frame.signed_message, frame.signature):
            self._count("pila_bad_signature")
            return
        waiting = self._lookups.get(frame.sender)
        if waiting is not None:
            if len(waiting) >= LOOKUP_BACKLOG:
                self._count("pila_lookup_busy")
            else:
                waiting.append((frame, source, via_relay))
            return
        if len(self._lookups) >= LOOKUPS_IN_FLIGHT:
            self._count("pila_lookup_busy")
            return
        self._lookups[frame.sender] = [(frame, source, via_relay)]
        d = maybeDeferred(self._expected_key, frame.sender)
        d.addCallbacks(self._key_found, self._key_lookup_failed,
                       callbackArgs=(frame.sender,), errbackArgs=(frame.sender,))

    def _key_found(self, expected: Optional[bytes], sender: int) -> None:
        for frame, source, via_relay in self._lookups.pop(sender, []):
            self._verified(frame, expected, source, via_relay)

    def _key_lookup_failed(self, failure: Failure, sender: int) -> None:
        self._count("pila_lookup_failed", len(self._lookups.pop(sender, [])))

    def _verified(self, frame: AuthKeyExchange, expected: Optional[bytes], source: Endpoint,
                  via_relay: bool) -> None:
        if not expected:
            self._count("pila_unknown_key")
            return
        if not frame.verify(expected):
            self._count("pila_wrong_key")
            return
        peer = self._peer(frame.sender)
        if frame.x25519_public in peer.retired_keys:
            self._count("pila_stale_key")
            return
        if peer.session is not None and peer.session.peer_x25519 == frame.x25519_public:
            key = peer.session.key
        else:
            try:
                key = derive_key(bytes(self._x25519), frame.x25519_public)
            except MalformedFrame:
                self._count("pila_bad_x25519")
                return
        peer.machine.key_exchange_received(frame, key, source, via_relay)

    # -- used by the peers --

    def _peer(self, node_id: int) -> _Peer:
        peer = self._peers.get(node_id)
        if peer is None:
            peer = self._peers[node_id] = _Peer(node_id, self)
            peer.machine = PeerTunnelMachine(peer)
        return peer

    def _heard(self, peer: _Peer, source: Endpoint, via_relay: bool, from_endpoint: bool) -> None:
        """Tell the path layer how an authenticated frame came."""
        if via_relay:
            self._relayed_frame(peer.node_id)
        elif from_endpoint:
            self._direct_frame(peer.node_id, source)

    def _hold(self, peer: _Peer, packet: Packet) -> None:
        if peer.node_id not in self._holding:
            if len(self._holding) >= QUEUED_PEERS:
                oldest = self._peers[next(iter(self._holding))]
                self._count("queue_overflow", len(oldest.queue))
                self._release(oldest)
            self._holding[peer.node_id] = None
        if len(peer.queue) >= QUEUE_PER_PEER:
            peer.queue.popleft()
            self._count("queue_overflow")
        peer.queue.append(packet)

    def _release(self, peer: _Peer) -> None:
        peer.queue.clear()
        self._holding.pop(peer.node_id, None)

    def _emit(self, node_id: int, frame: bytes, endpoint: Optional[Endpoint], relay: bool) -> bool:
        if relay:
            beacon, own = self._beacon(), self._own_id()
            if beacon is None or own is None:
                self._count("no_beacon" if beacon is None else "no_node_id")
                return False
            self._send_datagram(Relay(own, node_id, frame).encode(), beacon)
        elif endpoint is None:
            self._count("no_route")
            return False
        else:
            self._send_datagram(frame, endpoint)
        return True

    def _now(self) -> float:
        return self._clock.seconds()

    def _count(self, reason: str, n: int = 1) -> None:
        if n:
            self.counters[reason] += n
