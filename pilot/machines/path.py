# -*- test-case-name: tests.machines.test_path -*-
"""
Which way our frames go to each peer: straight to its endpoint, through a
hole punched with the beacon's help, or relayed by the beacon; rules and
reasons in ``docs/nat.md``.

:class:`Paths` (one per node) keeps one :class:`PeerPath` machine per peer::

    idle -packet_sent-> direct_trying -direct_timed_out (1 s)-> punching
         -punch_timed_out (2 s)-> relayed -retry_timer_fired (2 s doubling
         to 8 s, jittered): punch again-> ... -direct_frame_received-> punched

``direct_trying`` and ``punching`` end in ``direct`` and ``punched`` as soon
as an authenticated frame arrives from the peer's endpoint without the
relay (the tunnel layer's ``direct_frame`` hook).  Direct and punched paths
send a 4-byte PILP after 15 s without traffic, so that our NAT keeps its
mapping, and go back to ``direct_trying`` when what we send stays unanswered
for 3 s, or when the peer's registered endpoint changes.

Pure: no sockets, no reactor import; the tunnel layer, the datagram sender,
the beacon's address, our id and signing key, the clock and the jitter source
are injected.
"""

from __future__ import annotations

import collections
import os
import random as _random
from typing import Any, Callable, Optional, Protocol

import attr
from automat import TypeMachineBuilder
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from pilot.interfaces import IPathEvents
from pilot.machines.table import transition_table
from pilot.wire import beacon as bw
from pilot.wire.tunnel import PILP

Endpoint = tuple[str, int]

#: A first contact goes straight to the registered endpoint; without an
#: authenticated answer within this long (s) we ask the beacon to punch.  A
#: handful of round trips plus the peer's key lookup; the reference waits for
#: three SYN retransmissions (about 7 s) before it relays.
DIRECT_TIMEOUT = 1.0
#: After a punch request (or a punch command from the peer's side), this long
#: (s) for an authenticated frame through the hole before we relay.
PUNCH_TIMEOUT = 2.0
#: While relayed we punch again after this long (s), doubling ...
PUNCH_RETRY_FIRST = 2.0
#: ... up to this; each wait is shortened by up to RETRY_JITTER of itself, so
#: a lifted block is noticed within PUNCH_RETRY_MAX plus a round trip.
PUNCH_RETRY_MAX = 8.0
RETRY_JITTER = 0.25
#: A relayed peer with no traffic either way for this long (s) stops punching
#: until traffic resumes (then it punches at once, and backs off again).
RELAY_IDLE = 60.0
#: A direct or punched path with nothing sent for this long (s) gets a PILP, so
#: our NAT keeps its mapping (commonly dropped after 30 s of silence, some after 10 s).
KEEPALIVE = 8.0
#: A direct or punched path whose sends have gone unanswered (no authenticated
#: direct frame) for this long (s), without a pause as long in our sending, is
#: tried again: direct, punch, relay.  Streams are answered within a round trip.
DIRECT_SILENCE = 3.0
#: A punch command whose endpoint is no peer's we know is taken as the answer
#: to our request when exactly one request is younger than this (s).
PUNCH_ANSWER_WINDOW = PUNCH_TIMEOUT
#: A new peer first heard directly from an endpoint the beacon told us to punch
#: within this long (s) is counted as punched, not direct.
PUNCH_HINT_WINDOW = 10.0
#: Punch commands for endpoints of no known peer remembered (and answered with
#: our PILA at most once per PUNCH_TIMEOUT each).
UNMATCHED_MAX = 256

IDLE = "idle"
DIRECT_TRYING = "direct_trying"
PUNCHING = "punching"
RELAYED = "relayed"
DIRECT = "direct"
PUNCHED = "punched"

#: What ``pilotctl peers`` shows for each state.
PATH_NAMES: dict[str, Optional[str]] = {
    IDLE: None, DIRECT_TRYING: "trying", PUNCHING: "trying", RELAYED: "relay",
    DIRECT: "direct", PUNCHED: "punched",
}


@attr.s(auto_attribs=True, frozen=True, kw_only=True)
class PathConfig:
    """Every timeout and interval (s); the defaults are the module constants."""

    direct_timeout: float = DIRECT_TIMEOUT
    punch_timeout: float = PUNCH_TIMEOUT
    punch_retry_first: float = PUNCH_RETRY_FIRST
    punch_retry_max: float = PUNCH_RETRY_MAX
    retry_jitter: float = RETRY_JITTER
    relay_idle: float = RELAY_IDLE
    keepalive: float = KEEPALIVE
    direct_silence: float = DIRECT_SILENCE
    punch_answer_window: float = PUNCH_ANSWER_WINDOW
    punch_hint_window: float = PUNCH_HINT_WINDOW


class TunnelControl(Protocol):
    """What a path needs of ``pilot.machines.tunnel.Tunnels``."""

    def set_path(self, node_id: int, direct_endpoint: Optional[Endpoint], relay: bool) -> None: ...
    def send_key_exchange(self, node_id: int, endpoint: Optional[Endpoint] = None) -> None: ...
    def key_exchange_frame(self) -> bytes: ...
    def state(self, node_id: int) -> str: ...
    def stats(self, node_id: int) -> Optional[dict[str, Any]]: ...


class PeerPath(Protocol):
    """Inputs about the path to one peer."""

    def packet_sent(self) -> None:
        "The node is sending the peer a packet."

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
        "Time to punch again while relayed."

    def keepalive_timer_fired(self) -> None:
        "Time to see whether the NAT mapping needs a probe."

    def direct_went_silent(self) -> None:
        "What we sent directly has gone unanswered for DIRECT_SILENCE."

    def exchange_gave_up(self) -> None:
        "The tunnel's key exchange with the peer gave up (it did not answer any way)."


@attr.s(auto_attribs=True, eq=False)
class _Core:
    node_id: int
    paths: "Paths"
    state: str = IDLE
    registered: Optional[Endpoint] = None   # where the registry says the peer is
    endpoint: Optional[Endpoint] = None     # where we send (or would send) directly
    changed_at: Optional[float] = None
    deadline: Optional[IDelayedCall] = None
    keepalive_call: Optional[IDelayedCall] = None
    retry_delay: float = 0.0
    parked: bool = False                    # relayed, not punching until traffic resumes
    last_direct_rx: Optional[float] = None
    awaiting_since: Optional[float] = None  # first direct send not yet answered
    last_sent: Optional[float] = None
    last_probe: Optional[float] = None
    last_used: Optional[float] = None       # a packet sent, or a frame received, not our probes
    machine: Any = None

    # -- shared by the behaviours --

    def now(self) -> float:
        return self.paths._clock.seconds()

    def cancel(self) -> None:
        for call in (self.deadline, self.keepalive_call):
            if call is not None and call.active():
                call.cancel()
        self.deadline = self.keepalive_call = None

    def after(self, delay: float, fire: Callable[[], None]) -> None:
        self.deadline = self.paths._clock.callLater(delay, fire)

    def route(self, endpoint: Optional[Endpoint], relay: bool) -> None:
        if endpoint is not None:
            self.endpoint = endpoint
        self.paths._tunnels.set_path(self.node_id, self.endpoint, relay)

    def established(self) -> bool:
        return self.paths._tunnels.state(self.node_id) == "established"

    def send_pila(self, endpoint: Optional[Endpoint]) -> None:
        """Our PILA to ``endpoint`` directly (None: by the peer's current path)."""
        self.paths._count("pila_probes")
        self.paths._tunnels.send_key_exchange(self.node_id, endpoint)

    def request_punch(self) -> None:
        self.paths._request_punch(self.node_id)

    def jittered(self, delay: float) -> float:
        config = self.paths.config
        return delay * (1.0 - config.retry_jitter * self.paths._random())

    def schedule_retry(self, m: PeerPath) -> None:
        self.after(self.jittered(self.retry_delay), m.retry_timer_fired)
        self.retry_delay = min(self.retry_delay * 2, self.paths.config.punch_retry_max)

    def schedule_keepalive(self, m: PeerPath) -> None:
        stats = self.paths._tunnels.stats(self.node_id) or {}
        sent = [t for t in (stats.get("last_tx"), self.last_probe) if t is not None]
        due = (max(sent) if sent else self.now()) + self.paths.config.keepalive
        self.keepalive_call = self.paths._clock.callLater(max(0.0, due - self.now()), m.keepalive_timer_fired)


_builder = TypeMachineBuilder(PeerPath, _Core)
idle = _builder.state(IDLE)
direct_trying = _builder.state(DIRECT_TRYING)
punching = _builder.state(PUNCHING)
relayed = _builder.state(RELAYED)
direct = _builder.state(DIRECT)
punched = _builder.state(PUNCHED)
_STATES = (idle, direct_trying, punching, relayed, direct, punched)
_defined: set[tuple[str, str]] = set()
I = PeerPath  # noqa: E741
_Behaviour = Callable[..., None]


def _enter(core: _Core, old: str, new: str, event: str) -> None:
    if old != new:
        core.changed_at = core.now()
        core.state = new


def _entered(core: _Core, old: str, new: str, event: str) -> None:
    if old != new:
        core.paths._path_changed(core.node_id, new, core.endpoint)


_on = transition_table(_defined, before=_enter, after=_entered)


# -- trying the registered endpoint ----------------------------------------------------------

@_on(idle, I.packet_sent, direct_trying)
def _first_send(m: PeerPath, c: _Core) -> None:
    c.cancel()
    c.route(c.registered or c.endpoint, relay=False)  # the tunnel's PILA (re)tries go there
    c.after(c.paths.config.direct_timeout, m.direct_timed_out)


@_on(direct, I.direct_went_silent, direct_trying)
@_on(punched, I.direct_went_silent, direct_trying)
def _try_again(m: PeerPath, c: _Core) -> None:
    c.paths._count("direct_silent")
    _try_direct(m, c, c.endpoint)


@_on(direct_trying, I.endpoint_moved, direct_trying)
@_on(punching, I.endpoint_moved, direct_trying)
@_on(direct, I.endpoint_moved, direct_trying)
@_on(punched, I.endpoint_moved, direct_trying)
def _try_direct(m: PeerPath, c: _Core, endpoint: Optional[Endpoint]) -> None:
    c.cancel()
    c.awaiting_since = None
    if endpoint != c.endpoint:
        c.changed_at = c.now()
    c.route(endpoint, relay=False)
    if c.established():
        c.send_pila(c.endpoint)  # an established tunnel sends no PILA by itself
    c.after(c.paths.config.direct_timeout, m.direct_timed_out)


# -- punching ----------------------------------------------------------------------------------

@_on(direct_trying, I.direct_timed_out, punching)
def _request_punch(m: PeerPath, c: _Core) -> None:
    c.cancel()
    c.request_punch()
    c.after(c.paths.config.punch_timeout, m.punch_timed_out)


@_on(idle, I.punch_commanded, punching)
@_on(direct_trying, I.punch_commanded, punching)
def _punched_at(m: PeerPath, c: _Core, endpoint: Endpoint) -> None:
    c.cancel()
    _aim(m, c, endpoint)
    c.after(c.paths.config.punch_timeout, m.punch_timed_out)


@_on(punching, I.punch_commanded, punching)
def _aim(m: PeerPath, c: _Core, endpoint: Endpoint) -> None:
    """The beacon's answer: the peer's endpoint as it sees it; our PILA follows the PILPs."""
    c.route(endpoint, relay=False)
    c.send_pila(endpoint)


# -- relayed -----------------------------------------------------------------------------------

@_on(punching, I.punch_timed_out, relayed)
@_on(idle, I.relayed_frame_received, relayed)
@_on(direct_trying, I.relayed_frame_received, relayed)
@_on(punching, I.relayed_frame_received, relayed)
def _relay(m: PeerPath, c: _Core) -> None:
    c.cancel()
    c.paths._count("relay_fallbacks")
    c.route(None, relay=True)
    if not c.established():
        c.send_pila(None)  # through the beacon now; the tunnel would wait for its next retry
    c.parked = False
    c.retry_delay = c.paths.config.punch_retry_first
    c.schedule_retry(m)


@_on(relayed, I.retry_timer_fired, relayed)
def _punch_again(m: PeerPath, c: _Core) -> None:
    c.deadline = None
    if c.last_used is None or c.now() - c.last_used >= c.paths.config.relay_idle:
        c.parked = True  # nobody is using the path; wait for traffic
        return
    c.request_punch()
    c.schedule_retry(m)


@_on(relayed, I.packet_sent, relayed)
@_on(relayed, I.relayed_frame_received, relayed)
def _resume(m: PeerPath, c: _Core) -> None:
    if c.parked:
        c.parked = False
        c.retry_delay = c.paths.config.punch_retry_first
        c.request_punch()
        c.schedule_retry(m)


@_on(relayed, I.punch_commanded, relayed)
def _aim_relayed(m: PeerPath, c: _Core, endpoint: Endpoint) -> None:
    c.route(endpoint, relay=True)  # frames keep going through the beacon until the hole answers
    c.send_pila(endpoint)


@_on(relayed, I.endpoint_moved, relayed)
def _moved_relayed(m: PeerPath, c: _Core, endpoint: Endpoint) -> None:
    c.cancel()
    c.changed_at = c.now()
    _aim_relayed(m, c, endpoint)
    c.parked = False
    c.retry_delay = c.paths.config.punch_retry_first
    c.request_punch()
    c.schedule_retry(m)


# -- direct and punched ------------------------------------------------------------------------

@_on(idle, I.direct_frame_received, direct)
@_on(direct_trying, I.direct_frame_received, direct)
@_on(idle, I.punched_frame_received, punched)
@_on(punching, I.direct_frame_received, punched)
@_on(relayed, I.direct_frame_received, punched)
def _use_direct(m: PeerPath, c: _Core, endpoint: Endpoint) -> None:
    c.cancel()
    c.parked = False
    c.paths._outstanding.pop(c.node_id, None)
    c.route(endpoint, relay=False)
    c.last_direct_rx, c.awaiting_since = c.now(), None
    c.schedule_keepalive(m)


@_on(direct, I.direct_frame_received, direct)
@_on(punched, I.direct_frame_received, punched)
def _heard_direct(m: PeerPath, c: _Core, endpoint: Endpoint) -> None:
    c.last_direct_rx, c.awaiting_since = c.now(), None
    if endpoint != c.endpoint:  # roaming or a NAT rebinding: the tunnel moved already
        c.changed_at = c.now()
        c.route(endpoint, relay=False)
        c.paths._path_changed(c.node_id, c.state, endpoint)


@_on(direct, I.packet_sent, direct)
@_on(punched, I.packet_sent, punched)
def _check_silence(m: PeerPath, c: _Core) -> None:
    now, silence = c.now(), c.paths.config.direct_silence
    if c.awaiting_since is None or c.last_sent is None or now - c.last_sent >= silence:
        c.awaiting_since = now  # the first send since an answer, or after a pause
    elif now - c.awaiting_since >= silence:
        m.direct_went_silent()
    c.last_sent = now


@_on(direct, I.keepalive_timer_fired, direct)
@_on(punched, I.keepalive_timer_fired, punched)
def _keepalive(m: PeerPath, c: _Core) -> None:
    c.keepalive_call = None
    stats = c.paths._tunnels.stats(c.node_id) or {}
    sent = [t for t in (stats.get("last_tx"), c.last_probe) if t is not None]
    if not sent or c.now() - max(sent) >= c.paths.config.keepalive:
        c.last_probe = c.now()
        if c.endpoint is not None:
            c.paths._count("keepalives")
            c.paths._send_datagram(PILP, c.endpoint)
    c.schedule_keepalive(m)


@_on(direct, I.punch_commanded, direct)
@_on(punched, I.punch_commanded, punched)
def _answer_punch(m: PeerPath, c: _Core, endpoint: Endpoint) -> None:
    """The peer punches toward us: it does not hear us directly.  Let it, where we send and where it asks."""
    c.send_pila(c.endpoint)
    if endpoint != c.endpoint:
        c.send_pila(endpoint)


# -- giving up ---------------------------------------------------------------------------------

@_on(direct_trying, I.exchange_gave_up, idle)
@_on(punching, I.exchange_gave_up, idle)
@_on(relayed, I.exchange_gave_up, idle)
@_on(direct, I.exchange_gave_up, idle)
@_on(punched, I.exchange_gave_up, idle)
def _reset(m: PeerPath, c: _Core) -> None:
    c.cancel()
    c.parked = False
    c.awaiting_since = None
    c.paths._outstanding.pop(c.node_id, None)
    c.endpoint = c.registered or c.endpoint
    c.paths._tunnels.set_path(c.node_id, c.endpoint, False)  # the next attempt starts direct again


# Everything else changes nothing: late timers (each is cancelled on leaving its
# state), frames and commands that add nothing in the state they meet.
for _state in _STATES:
    for _name in ("packet_sent", "direct_frame_received", "punched_frame_received", "relayed_frame_received",
                  "punch_commanded", "endpoint_moved", "direct_timed_out", "punch_timed_out",
                  "retry_timer_fired", "keepalive_timer_fired", "direct_went_silent", "exchange_gave_up"):
        if (_state.name, _name) not in _defined:
            _state.upon(getattr(I, _name)).loop().returns(None)

_machine = _builder.build()


def transitions() -> list[tuple[str, str, str, str]]:
    """Every transition that does something: (state, input, next state, behaviour), for docs and tests."""
    rows = [(old.name, event, new.name, outputs[-1].name)
            for old, event, new, outputs in _machine.__automat_automaton__._transitions
            if outputs[-1].name != "returns(None)"]
    order = [state.name for state in _STATES]
    return sorted(rows, key=lambda row: (order.index(row[0]), row[1]))


@implementer(IPathEvents)
class Paths:
    """
    The path to every peer of one node.

    :param tunnels: the node's ``Tunnels`` (``set_path``, ``send_key_exchange``,
        ``key_exchange_frame``, ``state``, ``stats``).
    :param send_datagram: ``(bytes, endpoint)`` on the node's UDP socket (PILP
        probes, punch requests, PILAs to endpoints of no known peer).
    :param beacon: ``() -> endpoint or None``.
    :param node_id: ``() -> our node id or None``; ``sign``: our Ed25519 signer
        (punch requests carry a proof, ``pilot.wire.beacon``).
    :param path_changed: ``(node_id, state, endpoint)`` after every change of
        state or of endpoint, for the owner's log.
    """

    def __init__(self, *, tunnels: TunnelControl, send_datagram: Callable[[bytes, Endpoint], None],
                 beacon: Callable[[], Optional[Endpoint]], node_id: Callable[[], Optional[int]],
                 sign: Callable[[bytes], bytes], clock: IReactorTime,
                 config: PathConfig = PathConfig(), random: Callable[[], float] = _random.random,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 path_changed: Callable[[int, str, Optional[Endpoint]], None] = lambda n, s, e: None) -> None:
        self._tunnels = tunnels
        self._send_datagram = send_datagram
        self._beacon = beacon
        self._own_id = node_id
        self._sign = sign
        self._clock = clock
        self.config = config
        self._random = random
        self._random_bytes = random_bytes
        self._path_changed = path_changed
        self.counters: collections.Counter[str] = collections.Counter()
        self._peers: dict[int, _Core] = {}
        self._outstanding: dict[int, float] = {}  # node id -> when we asked the beacon to punch
        self._unmatched: collections.OrderedDict[Endpoint, float] = collections.OrderedDict()

    # -- what the node tells us --

    def sending(self, node_id: int, endpoint: Optional[Endpoint] = None) -> None:
        """The node is about to send ``node_id`` a packet; ``endpoint``: the directory's, if known."""
        core = self._peer(node_id)
        if core.registered is None and endpoint is not None:
            core.registered = endpoint
        core.last_used = self._clock.seconds()
        core.machine.packet_sent()

    def endpoint_learned(self, node_id: int, endpoint: Endpoint) -> None:
        """
        The registry's endpoint for ``node_id`` (resolved or pushed).  A change
        of it is tried at once; the first one only fills in what we did not
        know (a peer behind a symmetric NAT reaches us from another port than
        the one it registered, and that working path stays).
        """
        core = self._peer(node_id)
        old, core.registered = core.registered, endpoint
        if old is None or old == endpoint or core.state == IDLE or endpoint == core.endpoint:
            return
        core.machine.endpoint_moved(endpoint)

    def punch_commanded(self, endpoint: Endpoint) -> None:
        """A PunchCommand from our beacon (the node sent the PILPs already)."""
        now = self._clock.seconds()
        matches = [c for c in self._peers.values() if endpoint in (c.endpoint, c.registered)]
        if not matches:
            waiting = [n for n, t in self._outstanding.items() if now - t <= self.config.punch_answer_window]
            if len(waiting) == 1:
                matches = [self._peers[waiting[0]]]
        for core in matches:
            self._count("punch_commands")
            self._outstanding.pop(core.node_id, None)
            core.machine.punch_commanded(endpoint)
        if matches:
            return
        # Someone we do not know yet wants to reach us: our PILA through the PILPs'
        # hole lets it start its exchange (it may be behind a symmetric NAT,
        # where only our packets can tell it which mapping reaches us).
        self._count("punch_commands_unmatched")
        last = self._unmatched.pop(endpoint, None)
        self._unmatched[endpoint] = now
        while len(self._unmatched) > UNMATCHED_MAX:
            self._unmatched.popitem(last=False)
        if self._own_id() is not None and (last is None or now - last >= self.config.punch_timeout):
            self._send_datagram(self._tunnels.key_exchange_frame(), endpoint)

    def direct_frame(self, node_id: int, endpoint: Endpoint) -> None:
        """Tunnel hook: an authenticated frame from the peer's endpoint, not relayed."""
        core = self._peers.get(node_id)
        if core is None:
            core = self._peer(node_id)
            core.last_used = self._clock.seconds()
            hinted = self._unmatched.get(endpoint)
            if hinted is not None and self._clock.seconds() - hinted <= self.config.punch_hint_window:
                core.machine.punched_frame_received(endpoint)
                return
        core.last_used = self._clock.seconds()
        core.machine.direct_frame_received(endpoint)

    def relayed_frame(self, node_id: int) -> None:
        """Tunnel hook: an authenticated frame from the peer came through the beacon."""
        core = self._peer(node_id)
        core.last_used = self._clock.seconds()
        core.machine.relayed_frame_received()

    def unreachable(self, node_id: int) -> None:
        """Tunnel hook: the key exchange with the peer gave up."""
        core = self._peers.get(node_id)
        if core is not None:
            core.machine.exchange_gave_up()

    # -- what the node asks --

    def state(self, node_id: int) -> str:
        core = self._peers.get(node_id)
        return core.state if core is not None else IDLE

    def status(self, node_id: int) -> Optional[dict[str, Any]]:
        """``path`` (direct | punched | relay | trying | None), ``state``, ``endpoint``,
        ``rtt_ms`` (None: we do not measure it here) and ``path_changed_at`` (clock seconds)."""
        core = self._peers.get(node_id)
        if core is None:
            return None
        return {"path": PATH_NAMES[core.state], "state": core.state, "endpoint": core.endpoint,
                "rtt_ms": None, "path_changed_at": core.changed_at}

    def peers(self) -> list[int]:
        return sorted(self._peers)

    def stop(self) -> None:
        """Cancel every timer (the node is stopping)."""
        for core in self._peers.values():
            core.cancel()

    # -- used by the machines --

    def _peer(self, node_id: int) -> _Core:
        core = self._peers.get(node_id)
        if core is None:
            core = self._peers[node_id] = _Core(node_id, self)
            core.machine = _machine(core)
        return core

    def _request_punch(self, target: int) -> None:
        beacon, own = self._beacon(), self._own_id()
        if beacon is None or own is None:
            self._count("punch_impossible")
            return
        base = bw.PunchRequest(own, target).base
        ts_ms = int(self._clock.seconds() * 1000)
        self._send_datagram(bw.with_proof(base, self._sign, ts_ms, self._random_bytes(8)), beacon)
        self._outstanding[target] = self._clock.seconds()
        self._count("punch_requests")

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n
