# -*- test-case-name: tests.machines.test_tunnel -*-
"""
One peer's tunnel: the :class:`PeerTunnel` machine, its core :class:`Peer`
and the behaviours that hold its logic (``docs/tunnel.md``)::

    idle -packet_queued-> exchanging -key_exchange_received-> established
    exchanging -retry_timer_fired-> exchanging (our PILA again, 250 ms doubling to 2 s)
    exchanging -exchange_timed_out (10 s)-> idle (queue dropped, the node told)

Once established, a PILA with a new X25519 key only offers a *candidate*
session: the session in use stays, and so does the endpoint, until a frame
sealed under the candidate arrives (a PILA carries no freshness, so it may be
an old one replayed; issue 12).

The machine asks the node's tunnel layer for what it shares with the other
peers through :class:`TunnelOwner`, a handful of public methods; it never
reads the owner's fields.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Deque, Optional, Protocol

import attr
from automat import TypeMachineBuilder
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from pilot.endpoint import Endpoint
from pilot.errors import MalformedFrame
from pilot.machines.table import Transition, TransitionTable, indexed
from pilot.machines.tunnel.session import Candidate, Dropped, Session
from pilot.wire.packet import Packet
from pilot.wire.tunnel import AuthKeyExchange, SealedFrame

RETRY_FIRST = 0.25         # first PILA retransmission (s), doubling ...
RETRY_MAX = 2.0            # ... up to this
GIVE_UP = 10.0             # exchange abandoned after this (s)
ANSWER_INTERVAL = 0.5      # at most one answering PILA per peer per interval ...
ANSWER_BURST = 5           # ... and this many answers to repeated PILAs ...
ANSWER_WINDOW = 30.0       # ... per window (s)
RETIRED_KEYS = 1024        # old peer X25519 keys refused, per peer (their first 16 bytes)
CANDIDATES = 4             # unconfirmed sessions (new X25519 keys) held per peer, the oldest go first
CANDIDATE_COPIES = 8       # packets also sealed under the candidates, per peer per ANSWER_WINDOW
RETIRED_DIGEST = 16        # bytes of a retired key remembered


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


class TunnelOwner(Protocol):
    """What one peer's machine asks of the node's tunnel layer (``Tunnels``)."""

    def own_id(self) -> Optional[int]:
        "Our node id, None before registration."

    def key_exchange_frame(self) -> bytes:
        "Our PILA for our current node id."

    def emit(self, node_id: int, frame: bytes, endpoint: Optional[Endpoint], relay: bool) -> bool:
        "Send ``frame`` to the peer directly or through the beacon; False if there is no way."

    def hold(self, peer: "Peer", packet: Packet) -> None:
        "Queue ``packet`` on ``peer`` while it exchanges keys, within the node's bounds."

    def release(self, peer: "Peer") -> None:
        "Empty ``peer``'s queue."

    def answer_with_pila(self, sender: int, source: Endpoint, via_relay: bool) -> None:
        "Our PILA to a peer sealing with a session we do not have, within the node's budget."

    def heard(self, node_id: int, source: Endpoint, via_relay: bool, from_endpoint: bool) -> None:
        "An authenticated frame came from the peer (for the path layer)."

    def moved(self, node_id: int, endpoint: Endpoint) -> None:
        "The peer's endpoint changed."

    def gave_up(self, node_id: int) -> None:
        "The key exchange with the peer gave up."

    def count(self, reason: str, n: int = 1) -> None:
        "Count a drop or an event."


@attr.s(auto_attribs=True, eq=False)
class Peer:
    """The state of the tunnel to one peer, shared by the behaviours."""

    node_id: int
    owner: TunnelOwner
    clock: IReactorTime
    random_bytes: Callable[[int], bytes]
    endpoint: Optional[Endpoint] = None
    relay: bool = False
    held: bool = False  # our PILA goes only where the path layer sends it (a punch under way)
    queue: Deque[Packet] = attr.Factory(collections.deque)
    session: Optional[Session] = None
    # new keys' sessions, each waiting for a frame that proves it, by the peer's X25519 key
    candidates: collections.OrderedDict[bytes, Candidate] = attr.Factory(collections.OrderedDict)
    copies: Deque[float] = attr.Factory(collections.deque)  # when packets were copied to candidates
    accepted: bytes = b""  # the last accepted PILA, byte for byte
    retired_keys: collections.OrderedDict[bytes, None] = attr.Factory(collections.OrderedDict)
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

    def __attrs_post_init__(self) -> None:
        self.machine = PeerTunnelMachine(self)

    # -- what the owner asks --

    @property
    def exchanging(self) -> bool:
        return self.give_up_call is not None

    def is_retired(self, x25519_public: bytes) -> bool:
        """A key of an earlier run of the peer, superseded by a proven one."""
        return x25519_public[:RETIRED_DIGEST] in self.retired_keys

    def candidate_key(self, frame: bytes, x25519_public: bytes) -> Optional[bytes]:
        """The AES key of a candidate offered by exactly ``frame`` (a repeat needs no lookup)."""
        candidate = self.candidates.get(x25519_public)
        return candidate.session.key if candidate is not None and candidate.frame == frame else None

    def known_key(self, x25519_public: bytes) -> Optional[bytes]:
        """The AES key already derived for ``x25519_public`` (the session's or a candidate's)."""
        if self.session is not None and self.session.peer_x25519 == x25519_public:
            return self.session.key
        candidate = self.candidates.get(x25519_public)
        return candidate.session.key if candidate is not None else None

    def recently_sent_pila(self, now: float) -> bool:
        return self.last_pila_sent is not None and now - self.last_pila_sent < ANSWER_INTERVAL

    # -- shared by the behaviours --

    def now(self) -> float:
        return self.clock.seconds()

    def transmit(self, frame: bytes, endpoint: Optional[Endpoint] = None,
                 relay: Optional[bool] = None) -> bool:
        """Send ``frame`` by the peer's path (or the one given); False if there is none."""
        relay = self.relay if relay is None else relay
        if not self.owner.emit(self.node_id, frame, endpoint or self.endpoint, relay):
            return False
        self.last_tx = self.clock.seconds()
        self.bytes_tx += len(frame)
        return True

    def send_pila(self, endpoint: Optional[Endpoint] = None, relay: Optional[bool] = None) -> None:
        if self.owner.own_id() is None:
            self.owner.count("no_node_id")
        elif self.held and endpoint is None and relay is None and not self.relay:
            self.owner.count("pila_held")
        elif self.transmit(self.owner.key_exchange_frame(), endpoint, relay):
            self.last_pila_sent = self.now()

    def send_sealed(self, packet: Packet) -> None:
        """``packet`` under the session by the peer's path, and (within CANDIDATE_COPIES per
        ANSWER_WINDOW) a copy under each candidate, to where its PILA came from: a peer that
        restarted can open only the copy, and its answer proves the candidate."""
        assert self.session is not None
        own = self.owner.own_id()
        if own is None:
            self.owner.count("no_node_id")
            return
        frame = SealedFrame.sealed(self.session.sender, own, packet)
        if self.owner.emit(self.node_id, frame, self.endpoint, self.relay):  # transmit(frame), per packet
            self.last_tx = self.clock.seconds()
            self.bytes_tx += len(frame)
        if not self.candidates:
            return  # the common case, per packet
        for candidate in reversed(self.candidates.values()):
            if not self.may_copy(self.now()):
                break
            frame = SealedFrame.sealed(candidate.session.sender, own, packet)
            if self.transmit(frame, candidate.source, candidate.via_relay):
                self.owner.count("candidate_copy")

    def may_copy(self, now: float) -> bool:
        while self.copies and now - self.copies[0] >= ANSWER_WINDOW:
            self.copies.popleft()
        if len(self.copies) >= CANDIDATE_COPIES:
            self.owner.count("candidate_copy_limited")
            return False
        self.copies.append(now)
        return True

    def schedule_retry(self) -> None:
        self.retry_call = self.clock.callLater(self.retry_delay, self.machine.retry_timer_fired)

    def stop_timers(self) -> None:
        for call in (self.retry_call, self.give_up_call):
            if call is not None and call.active():
                call.cancel()
        self.retry_call = self.give_up_call = None

    def set_endpoint(self, endpoint: Endpoint) -> None:
        if endpoint != self.endpoint:
            self.endpoint = endpoint
            self.owner.moved(self.node_id, endpoint)

    def install(self, session: Session, source: Endpoint, via_relay: bool) -> None:
        """A new session (first contact, or a proven candidate) and the path it came by."""
        if self.session is not None:
            self.retire(self.session.peer_x25519)
            self.owner.count("peer_rekeyed")
        self.session = session
        self.candidates.clear()
        self.copies.clear()
        self.established_at = self.now()
        self.answers.clear()
        if via_relay:
            self.relay = self.relay or self.endpoint is None
        else:
            self.set_endpoint(source)

    def retire(self, x25519_public: bytes) -> None:
        """Refuse ``x25519_public`` from now on.  Only a proven session retires a key, so
        nobody but the peer can fill (or flush) this list; a key that falls off it is
        harmless anyway: replayed, it only offers a candidate."""
        self.retired_keys[x25519_public[:RETIRED_DIGEST]] = None
        while len(self.retired_keys) > RETIRED_KEYS:
            self.retired_keys.popitem(last=False)

    def offer(self, frame: AuthKeyExchange, key: bytes, source: Endpoint, via_relay: bool) -> None:
        """Hold the session a new key offers as a candidate; its latest PILA's path is kept."""
        candidate = self.candidates.pop(frame.x25519_public, None)
        if candidate is None:
            candidate = Candidate(Session(key, frame.x25519_public, self.random_bytes),
                                  frame.encode(), source, via_relay)
        candidate.source, candidate.via_relay = source, via_relay
        self.candidates[frame.x25519_public] = candidate
        while len(self.candidates) > CANDIDATES:
            self.candidates.popitem(last=False)
            self.owner.count("candidate_dropped")

    def may_answer(self, now: float) -> bool:
        """Answer a repeated PILA?  Not within ANSWER_INTERVAL of our last one (this ends
        PILA ping-pong between two established peers), at most ANSWER_BURST per window."""
        while self.answers and now - self.answers[0] >= ANSWER_WINDOW:
            self.answers.popleft()
        if self.recently_sent_pila(now) or len(self.answers) >= ANSWER_BURST:
            self.owner.count("answer_rate_limited")
            return False
        self.answers.append(now)
        return True


_builder = TypeMachineBuilder(PeerTunnel, Peer)
idle = _builder.state("idle")
exchanging = _builder.state("exchanging")
established = _builder.state("established")
table = TransitionTable((idle, exchanging, established))
I = PeerTunnel  # noqa: E741


@table.on(idle, I.packet_queued, exchanging)
def _start(m: PeerTunnel, c: Peer, packet: Packet) -> None:
    c.owner.hold(c, packet)
    c.send_pila()
    c.retry_delay = RETRY_FIRST
    c.schedule_retry()
    c.give_up_call = c.clock.callLater(GIVE_UP, m.exchange_timed_out)


@table.on(exchanging, I.packet_queued, exchanging)
def _hold(m: PeerTunnel, c: Peer, packet: Packet) -> None:
    c.owner.hold(c, packet)


@table.on(established, I.packet_queued, established)
def _seal(m: PeerTunnel, c: Peer, packet: Packet) -> None:
    c.send_sealed(packet)


@table.on(exchanging, I.retry_timer_fired, exchanging)
def _retry(m: PeerTunnel, c: Peer) -> None:
    c.send_pila()
    c.retry_delay = min(c.retry_delay * 2, RETRY_MAX)
    c.schedule_retry()


@table.on(exchanging, I.exchange_timed_out, idle)
def _give_up(m: PeerTunnel, c: Peer) -> None:
    c.stop_timers()
    c.owner.count("unreachable_dropped", len(c.queue))
    c.owner.release(c)
    c.owner.gave_up(c.node_id)


@table.on(idle, I.key_exchange_received, established)
@table.on(exchanging, I.key_exchange_received, established)
@table.on(established, I.key_exchange_received, established)
def _accept(m: PeerTunnel, c: Peer, frame: AuthKeyExchange, key: bytes, source: Endpoint,
            via_relay: bool) -> None:
    now = c.now()
    c.stop_timers()
    known = c.endpoint  # a repeated PILA (replayable) vouches only for the endpoint we knew
    if c.session is not None and c.session.peer_x25519 == frame.x25519_public:
        # The same agreement again (a retransmission, a replay, or a peer that did not get
        # our PILA): keep counters and windows (#10); only a PILS moves a known endpoint.
        if c.endpoint is None and not via_relay:
            c.set_endpoint(source)
        if c.may_answer(now):
            c.send_pila(source, via_relay)
    elif c.session is not None:
        # A new key while we hold a session: a restart, or an old PILA replayed (a PILA carries
        # no freshness), from any path and after any idle spell.  Keep the session and the
        # endpoint; the new session is only a candidate until a frame sealed under it arrives
        # (_open promotes it).  Answered, so that a really restarted peer can derive the key
        # and prove it; packets go under the session, with bounded copies under the candidates.
        c.offer(frame, key, source, via_relay)
        c.owner.count("pila_candidate")
        if c.may_answer(now):
            c.send_pila(source, via_relay)
        return
    else:
        c.install(Session(key, frame.x25519_public, c.random_bytes), source, via_relay)
        c.send_pila(source, via_relay)
        known = c.endpoint
    c.accepted = frame.encode()
    c.owner.heard(c.node_id, source, via_relay, source == known)
    queued = list(c.queue)
    c.owner.release(c)
    for packet in queued:
        c.send_sealed(packet)


@table.on(idle, I.sealed_frame_received, idle)
@table.on(exchanging, I.sealed_frame_received, exchanging)
def _no_session(m: PeerTunnel, c: Peer, frame: SealedFrame, source: Endpoint,
                via_relay: bool) -> Optional[Packet]:
    c.owner.count("pils_no_session")
    c.owner.answer_with_pila(frame.sender, source, via_relay)
    return None


@table.on(established, I.sealed_frame_received, established)
def _open(m: PeerTunnel, c: Peer, frame: SealedFrame, source: Endpoint,
          via_relay: bool) -> Optional[Packet]:
    assert c.session is not None
    try:
        try:
            plaintext = c.session.open(frame)  # the session's key: every frame but a restarted peer's
        except Dropped as e:
            plaintext = _open_candidate(c, frame, source, via_relay, e)
        packet = Packet.decode(plaintext)
        if packet.src.node != c.node_id:  # #9: the sender id must be the packet's source
            raise Dropped("pils_wrong_source")
    except Dropped as e:
        c.owner.count(e.reason)
        if e.reason == "pils_undecryptable":
            # Sealed under a key we do not hold (the peer restarted and its candidate was pushed
            # out, or we lost ours): our PILA makes the peer send its own, within the answer budget.
            c.owner.answer_with_pila(c.node_id, source, via_relay)
        return None
    except MalformedFrame:
        c.owner.count("pils_bad_packet")
        return None
    c.last_rx = c.clock.seconds()
    c.bytes_rx += 20 + len(frame.ciphertext)
    if not via_relay and source != c.endpoint:
        c.set_endpoint(source)  # roaming: an authenticated frame from a new address
    c.owner.heard(c.node_id, source, via_relay, True)
    return packet


def _open_candidate(c: Peer, frame: SealedFrame, source: Endpoint, via_relay: bool, first: Dropped) -> bytes:
    """The session did not open ``frame`` (``first``): try the candidates (newest first); the one
    that opens it is proven: it becomes the session, the old key is retired."""
    if not c.candidates or first.reason != "pils_undecryptable":
        raise first
    for candidate in reversed(c.candidates.values()):
        try:
            plaintext = candidate.session.open(frame)
        except Dropped:
            continue
        c.install(candidate.session, source, via_relay)
        c.accepted = candidate.frame
        c.owner.count("candidate_promoted")
        return plaintext
    raise first


# Nothing is ignored: both timers are cancelled whenever the machine leaves
# ``exchanging``, so a timer input in ``idle`` or ``established`` is a bug and raises.

PeerTunnelMachine = indexed(_builder.build())


def transitions() -> list[Transition]:
    """Every transition: (state, input, next state, behaviour), for docs and tests."""
    return table.transitions()


#: The established state's ``sealed_frame_received`` behaviour, for the layer's dispatch-free path.
open_sealed = _open
