# -*- test-case-name: tests.machines.test_path -*-
"""
The path to one peer: the :class:`PeerPath` machine, its core
:class:`PathCore` and the behaviours that hold its logic (``docs/nat.md``)::

    idle -punch_first (a public endpoint: nothing sent there before the
         beacon's command)-> punching
    idle -packet_sent (a LAN endpoint)-> direct_trying -direct_timed_out (1 s)->
         punching -punch_timed_out (2 s)-> relayed -retry_timer_fired (after
         COLLISION_QUIET, 33 s, on the side that punched second): our PILA
         straight to the peer-> ... -direct_frame_received-> punched

Relayed, the pair recovers in rounds without the beacon (``docs/nat.md``,
"Recovery"): one side keeps its router's entry for the peer alive with
hop-limited keepers (``keepalive_timer_fired`` while relayed) and sends
nothing else directly; the other stays silent for the quiet period, then
sends first.  The roles swap each round.

``direct_trying`` and ``punching`` end in ``direct`` and ``punched`` as soon
as an authenticated frame arrives from the peer's endpoint without the
relay.  Direct and punched paths send a 4-byte PILP after a silence of
``keepalive``, and go back to ``direct_trying`` when what we send stays
unanswered for ``direct_silence``, or when the peer's registered endpoint
changes.

What the machine needs of the tunnel layer is :class:`TunnelControl`; what
it needs of the node's path layer (``Paths``) is :class:`PathOwner` (both in
:mod:`.collaborators`).  Both
are public methods; no behaviour reads another object's private fields.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import attr
from automat import TypeMachineBuilder
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from pilot.endpoint import Endpoint
from pilot.machines.path.config import (
    DIRECT, DIRECT_TRYING, IDLE, PUNCHED, PUNCHING, REASON_COLLISION, REASON_IDLE, REASON_NO_BEACON,
    REASON_PEER_RELAYS, RELAYED, PathConfig,
)
from pilot.machines.path.collaborators import PathOwner, TunnelControl
from pilot.machines.table import Transition, TransitionTable, indexed
from pilot.wire.tunnel import PILP


class PeerPath(Protocol):
    """Inputs about the path to one peer."""

    def packet_sent(self) -> None:
        "The node is sending the peer a packet."

    def punch_first(self) -> None:
        "The node's first packet to a peer whose endpoint may not take unsolicited frames."

    def direct_frame_received(self, endpoint: Endpoint) -> None:
        "An authenticated frame came from the peer's endpoint, not through the relay."

    def punched_frame_received(self, endpoint: Endpoint) -> None:
        "The first frame of a peer came directly from an endpoint we had just been told to punch."

    def relayed_frame_received(self) -> None:
        "An authenticated frame from the peer came through the relay."

    def punch_commanded(self, endpoint: Endpoint) -> None:
        "The beacon told us to punch toward the peer at ``endpoint``."

    def endpoint_moved(self, endpoint: Endpoint) -> None:
        "The peer's registered endpoint changed (the registry said so)."

    def direct_timed_out(self) -> None:
        "DIRECT_TIMEOUT passed in direct_trying."

    def punch_timed_out(self) -> None:
        "PUNCH_TIMEOUT passed in punching."

    def retry_timer_fired(self) -> None:
        "Relayed: the next step of the recovery round is due."

    def keepalive_timer_fired(self) -> None:
        "Time to see whether the NAT mapping needs a probe (relayed: a keeper)."

    def direct_went_silent(self) -> None:
        "What we sent directly has gone unanswered for DIRECT_SILENCE."

    def exchange_gave_up(self) -> None:
        "The tunnel's key exchange with the peer gave up (it did not answer any way)."


@attr.s(auto_attribs=True, kw_only=True, eq=False)
class PathCore:
    """The path to one peer and its collaborators, shared by the behaviours."""

    node_id: int
    owner: PathOwner
    tunnels: TunnelControl
    clock: IReactorTime
    config: PathConfig
    random: Callable[[], float]                       # jitter source in [0, 1)
    send_datagram: Callable[[bytes, Endpoint], None]  # our PILP keepalives
    send_limited: Callable[[bytes, Endpoint, int], None]  # the recovery's keepers (a hop limit)
    path_changed: Callable[[int, str, Optional[Endpoint]], None]
    state: str = IDLE
    registered: Optional[Endpoint] = None   # where the registry says the peer is
    endpoint: Optional[Endpoint] = None     # where we send (or would send) directly
    changed_at: Optional[float] = None
    deadline: Optional[IDelayedCall] = None
    keepalive_call: Optional[IDelayedCall] = None
    round: int = 0                          # the recovery round while relayed
    holding: bool = False                   # this round we keep our router's entry (the other sends)
    attempted: bool = False                 # this round we sent first (we do not hold)
    cannot_punch: bool = False
    parked: bool = False                    # relayed, not punching until traffic resumes
    last_direct_rx: Optional[float] = None
    awaiting_since: Optional[float] = None  # first direct send not yet answered
    last_sent: Optional[float] = None
    last_probe: Optional[float] = None
    last_used: Optional[float] = None       # a packet sent, or a frame received, not our probes
    machine: Any = None

    def __attrs_post_init__(self) -> None:
        self.machine = PeerPathMachine(self)

    # -- shared by the behaviours --

    def now(self) -> float:
        return self.clock.seconds()

    def cancel(self) -> None:
        for call in (self.deadline, self.keepalive_call):
            if call is not None and call.active():
                call.cancel()
        self.deadline = self.keepalive_call = None

    def after(self, delay: float, fire: Callable[[], None]) -> None:
        self.deadline = self.clock.callLater(delay, fire)

    def route(self, endpoint: Optional[Endpoint], relay: bool, hold: bool = False) -> None:
        if endpoint is not None:
            self.endpoint = endpoint
        self.tunnels.set_path(self.node_id, self.endpoint, relay, hold=hold)

    def punch(self) -> None:
        """A punch request for the peer, now."""
        self.cannot_punch = not self.owner.request_punch(self.node_id)

    def reason(self) -> Optional[str]:
        """Why we are relayed (``REASONS``), None if we are not."""
        if self.state != RELAYED:
            return None
        if self.parked:
            return REASON_IDLE
        if self.cannot_punch:
            return REASON_NO_BEACON
        if self.peer_endpoint() is None:
            return REASON_PEER_RELAYS  # the peer's frames came relayed; the beacon's command shows where it is
        return REASON_COLLISION  # the recovery rounds run (docs/nat.md, "Recovery")

    def send_pila(self, endpoint: Optional[Endpoint]) -> None:
        """Our PILA to ``endpoint`` directly (None: by the peer's current path)."""
        self.owner.count("pila_probes")
        self.tunnels.send_key_exchange(self.node_id, endpoint)

    def start_recovery(self, m: PeerPath, round: int = 0) -> None:
        """
        A recovery round (``docs/nat.md``, "Recovery").  The side that punched
        first in round 0 (and second in round 1, and so on) holds: keepers every
        ``keeper_interval`` and the round's end after the quiet period and a
        punch timeout.  The other waits the quiet period, then sends first.
        """
        self.cancel()
        self.parked = False
        self.round, self.attempted = round, False
        quiet = self.config.collision_quiet
        if round >= 2:
            quiet = min(quiet * 2 ** (round - 1), self.config.collision_quiet_max)
        endpoint = self.peer_endpoint()
        self.holding = endpoint is not None and self.owner.punches_first(endpoint) == (round % 2 == 0)
        if self.holding:
            self.after(quiet + self.config.punch_timeout, m.retry_timer_fired)
            self.keepalive_call = self.clock.callLater(self.config.keeper_interval, m.keepalive_timer_fired)
        else:
            self.after(quiet, m.retry_timer_fired)

    def peer_endpoint(self) -> Optional[Endpoint]:
        return self.endpoint or self.registered

    def last_activity(self) -> Optional[float]:
        """When the NAT mapping was last refreshed by us: a frame sent or a probe."""
        sent = [t for t in (self.tunnels.last_sent(self.node_id), self.last_probe) if t is not None]
        return max(sent) if sent else None

    def schedule_keepalive(self, m: PeerPath) -> None:
        last = self.last_activity()
        due = (last if last is not None else self.now()) + self.config.keepalive
        self.keepalive_call = self.clock.callLater(max(0.0, due - self.now()), m.keepalive_timer_fired)


_builder = TypeMachineBuilder(PeerPath, PathCore)
idle = _builder.state(IDLE)
direct_trying = _builder.state(DIRECT_TRYING)
punching = _builder.state(PUNCHING)
relayed = _builder.state(RELAYED)
direct = _builder.state(DIRECT)
punched = _builder.state(PUNCHED)
I = PeerPath  # noqa: E741


def _enter(core: PathCore, old: str, new: str, event: str) -> None:
    if old != new:
        core.changed_at = core.now()
        core.state = new


def _entered(core: PathCore, old: str, new: str, event: str) -> None:
    if old != new:
        core.path_changed(core.node_id, new, core.endpoint)


table = TransitionTable((idle, direct_trying, punching, relayed, direct, punched),
                        before=_enter, after=_entered)


# -- trying the registered endpoint ----------------------------------------------------------

@table.on(idle, I.packet_sent, direct_trying)
def _first_send(m: PeerPath, c: PathCore) -> None:
    c.cancel()
    c.route(c.registered or c.endpoint, relay=False)  # the tunnel's PILA (re)tries go there
    c.after(c.config.direct_timeout, m.direct_timed_out)


@table.on(direct, I.direct_went_silent, direct_trying)
@table.on(punched, I.direct_went_silent, direct_trying)
def _try_again(m: PeerPath, c: PathCore) -> None:
    c.owner.count("direct_silent")
    _try_direct(m, c, c.endpoint)


@table.on(direct_trying, I.endpoint_moved, direct_trying)
@table.on(punching, I.endpoint_moved, direct_trying)
@table.on(direct, I.endpoint_moved, direct_trying)
@table.on(punched, I.endpoint_moved, direct_trying)
def _try_direct(m: PeerPath, c: PathCore, endpoint: Optional[Endpoint]) -> None:
    c.cancel()
    c.awaiting_since = None
    if endpoint != c.endpoint:
        c.changed_at = c.now()
    c.route(endpoint, relay=False)
    if c.tunnels.is_established(c.node_id):
        c.send_pila(c.endpoint)  # an established tunnel sends no PILA by itself
    c.after(c.config.direct_timeout, m.direct_timed_out)


# -- punching ----------------------------------------------------------------------------------

@table.on(direct_trying, I.direct_timed_out, punching)
def _request_punch(m: PeerPath, c: PathCore) -> None:
    c.cancel()
    c.punch()
    c.after(c.config.punch_timeout, m.punch_timed_out)


@table.on(idle, I.punch_first, punching)
def _punch_first(m: PeerPath, c: PathCore) -> None:
    """
    Nothing to the peer's public endpoint before the peer sends to us too: a
    datagram that reaches its router first can leave an entry there that moves
    the peer's mapping (``docs/nat.md``, the conntrack collision).  The beacon
    tells both sides at once; our PILA goes with its command (``_aim``).  With a
    session (rare here) frames go through the relay meanwhile.
    """
    c.cancel()
    established = c.tunnels.is_established(c.node_id)
    c.route(c.registered or c.endpoint, relay=established, hold=not established)
    c.punch()
    c.after(c.config.punch_timeout, m.punch_timed_out)


@table.on(idle, I.punch_commanded, punching)
@table.on(direct_trying, I.punch_commanded, punching)
def _punched_at(m: PeerPath, c: PathCore, endpoint: Endpoint) -> None:
    c.cancel()
    _aim(m, c, endpoint)
    c.after(c.config.punch_timeout, m.punch_timed_out)


@table.on(punching, I.punch_commanded, punching)
def _aim(m: PeerPath, c: PathCore, endpoint: Endpoint) -> None:
    """The beacon's answer: the peer's endpoint as it sees it; our PILA follows the PILPs."""
    c.route(endpoint, relay=False)
    c.send_pila(endpoint)


# -- relayed -----------------------------------------------------------------------------------

@table.on(punching, I.punch_timed_out, relayed)
def _punch_failed(m: PeerPath, c: PathCore) -> None:
    """Nothing came through the hole: the relay carries the traffic, and the recovery rounds begin."""
    _relay(m, c)


@table.on(idle, I.relayed_frame_received, relayed)
@table.on(direct_trying, I.relayed_frame_received, relayed)
@table.on(punching, I.relayed_frame_received, relayed)
def _relay(m: PeerPath, c: PathCore) -> None:
    c.cancel()
    c.owner.count("relay_fallbacks")
    c.route(None, relay=True)
    if not c.tunnels.is_established(c.node_id):
        c.send_pila(None)  # through the beacon now; the tunnel would wait for its next retry
    c.start_recovery(m)


@table.on(relayed, I.retry_timer_fired, relayed)
def _recovery_step(m: PeerPath, c: PathCore) -> None:
    """
    The side that does not hold sends first once its quiet period is over:
    what our punch left on the routers has expired (the peer refreshed its
    own router's entry only, with keepers that die there), so our router's new
    flow keeps its port and the peer's live entry expects it: our PILA is
    delivered and the peer's answer comes straight back (``_upgrade``).
    Without an answer within a punch timeout, and on the holder's side at
    the same time, the holder sends its PILA too (a block lifted meanwhile:
    the peer's attempt opened the peer's router), and the next round begins,
    quiet from now, with the roles swapped.
    """
    c.deadline = None
    if c.last_used is None or c.now() - c.last_used >= c.config.relay_idle:
        c.cancel()
        c.parked = True  # nobody is using the path; wait for traffic
        return
    endpoint = c.peer_endpoint()
    if endpoint is None:  # nowhere to send: the beacon's command brings the endpoint
        c.punch()
        c.start_recovery(m, c.round + 1)
        return
    if not c.holding and not c.attempted:
        c.attempted = True
        c.owner.count("recovery_attempts")
        c.route(endpoint, relay=True)  # frames keep going through the beacon until the peer answers
        c.send_pila(endpoint)
        c.after(c.config.punch_timeout, m.retry_timer_fired)
        return
    if c.holding:
        # Nothing came: our entry was not the live one (a block, an outer NAT's entry expired, the
        # drift beat the skew).  The peer's attempt opened its router for us just now, so our PILA
        # gets through unless our router keeps an entry from that attempt (then it leaves from
        # another port, refreshes nothing the next round needs, and the next round, quiet from now,
        # has us send first).
        c.owner.count("counter_attempts")
        c.route(endpoint, relay=True)
        c.send_pila(endpoint)
    c.start_recovery(m, c.round + 1)


@table.on(relayed, I.keepalive_timer_fired, relayed)
def _keep_entry(m: PeerPath, c: PathCore) -> None:
    """A keeper: refreshes our router's entry for the peer and dies there (hop limit 1)."""
    c.keepalive_call = None
    endpoint = c.peer_endpoint()
    if endpoint is None or not c.holding:
        return
    c.owner.count("keepers")
    c.send_limited(PILP, endpoint, c.config.keeper_ttl)
    c.keepalive_call = c.clock.callLater(c.config.keeper_interval, m.keepalive_timer_fired)


@table.on(relayed, I.packet_sent, relayed)
@table.on(relayed, I.relayed_frame_received, relayed)
def _resume(m: PeerPath, c: PathCore) -> None:
    if c.parked:
        c.punch()
        c.start_recovery(m)


@table.on(relayed, I.punch_commanded, relayed)
def _aim_relayed(m: PeerPath, c: PathCore, endpoint: Endpoint) -> None:
    """A coordinated punch while relayed (ours after a pause, or the peer's): it sent datagrams at the
    normal TTL, so the recovery starts again from round 0, both sides at once."""
    c.route(endpoint, relay=True)  # frames keep going through the beacon until the hole answers
    c.send_pila(endpoint)
    c.start_recovery(m)


@table.on(relayed, I.endpoint_moved, relayed)
def _moved_relayed(m: PeerPath, c: PathCore, endpoint: Endpoint) -> None:
    c.changed_at = c.now()
    _aim_relayed(m, c, endpoint)
    c.punch()


# -- direct and punched ------------------------------------------------------------------------

@table.on(relayed, I.direct_frame_received, punched)
def _upgrade(m: PeerPath, c: PathCore, endpoint: Endpoint) -> None:
    """The hole answers after a retry: our PILA through it at once, so that a peer still relayed
    hears it too, not only at its next quiet-period retry or with its next traffic."""
    _use_direct(m, c, endpoint)
    if c.tunnels.is_established(c.node_id):
        c.send_pila(endpoint)


@table.on(idle, I.direct_frame_received, direct)
@table.on(direct_trying, I.direct_frame_received, direct)
@table.on(idle, I.punched_frame_received, punched)
@table.on(punching, I.direct_frame_received, punched)
def _use_direct(m: PeerPath, c: PathCore, endpoint: Endpoint) -> None:
    c.cancel()
    c.parked = False
    c.owner.forget_punch_request(c.node_id)
    c.route(endpoint, relay=False)
    c.last_direct_rx, c.awaiting_since = c.now(), None
    c.schedule_keepalive(m)


@table.on(direct, I.direct_frame_received, direct)
@table.on(punched, I.direct_frame_received, punched)
def _heard_direct(m: PeerPath, c: PathCore, endpoint: Endpoint) -> None:
    c.last_direct_rx, c.awaiting_since = c.clock.seconds(), None  # (c.now(), per packet)
    if endpoint != c.endpoint:  # roaming or a NAT rebinding: the tunnel moved already
        c.changed_at = c.now()
        c.route(endpoint, relay=False)
        c.path_changed(c.node_id, c.state, endpoint)


@table.on(direct, I.packet_sent, direct)
@table.on(punched, I.packet_sent, punched)
def _check_silence(m: PeerPath, c: PathCore) -> None:
    now, silence = c.clock.seconds(), c.config.direct_silence  # (c.now(), per packet)
    last, c.last_sent = c.last_sent, now  # before the input below (an input a behaviour calls waits for it)
    if c.awaiting_since is None or last is None or now - last >= silence:
        c.awaiting_since = now  # the first send since an answer, or after a pause
    elif now - c.awaiting_since >= silence:
        m.direct_went_silent()


@table.on(direct, I.keepalive_timer_fired, direct)
@table.on(punched, I.keepalive_timer_fired, punched)
def _keepalive(m: PeerPath, c: PathCore) -> None:
    c.keepalive_call = None
    last = c.last_activity()
    if last is None or c.now() - last >= c.config.keepalive:
        c.last_probe = c.now()
        if c.endpoint is not None:
            c.owner.count("keepalives")
            c.send_datagram(PILP, c.endpoint)
    c.schedule_keepalive(m)


@table.on(direct, I.punch_commanded, direct)
@table.on(punched, I.punch_commanded, punched)
def _answer_punch(m: PeerPath, c: PathCore, endpoint: Endpoint) -> None:
    """The peer punches toward us: it does not hear us directly.  Let it, where we send and where it asks."""
    c.send_pila(c.endpoint)
    if endpoint != c.endpoint:
        c.send_pila(endpoint)


# -- giving up ---------------------------------------------------------------------------------

@table.on(direct_trying, I.exchange_gave_up, idle)
@table.on(punching, I.exchange_gave_up, idle)
@table.on(relayed, I.exchange_gave_up, idle)
@table.on(direct, I.exchange_gave_up, idle)
@table.on(punched, I.exchange_gave_up, idle)
def _reset(m: PeerPath, c: PathCore) -> None:
    c.cancel()
    c.parked = False
    c.awaiting_since = None
    c.owner.forget_punch_request(c.node_id)
    c.endpoint = c.registered or c.endpoint
    c.tunnels.set_path(c.node_id, c.endpoint, False)  # the next attempt starts direct again


# -- harmless inputs; every other pair raises NoTransition -------------------------------------
# Each timer is cancelled on leaving the state that set it, ``punched_frame_received`` comes only
# for a peer just met (idle), ``direct_went_silent`` only from ``_check_silence`` and
# ``endpoint_moved`` never in idle (``Paths.endpoint_learned`` keeps it for the first send).

table.ignore((direct_trying, punching), I.packet_sent,
             why="the attempt under way carries the packet; its deadline runs")
table.ignore((direct, punched), I.relayed_frame_received,
             why="the peer relays until it hears us directly; our direct path stands")
table.ignore((idle,), I.exchange_gave_up,
             why="the path is at its start already (reset before, or never used)")

PeerPathMachine = indexed(_builder.build())  # a dict lookup per packet, not Automat's scan


def transitions(ignored: bool = False) -> list[Transition]:
    """Every transition that does something (and, with ``ignored``, the harmless
    inputs): (state, input, next state, behaviour), for docs and tests."""
    return table.transitions(ignored)

heard_direct, check_silence = _heard_direct, _check_silence  # loops the layer runs without dispatch
