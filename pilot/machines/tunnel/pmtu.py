# -*- test-case-name: tests.machines.test_pmtu -*-
"""
Packetization-layer path MTU discovery (RFC 8899, DPLPMTUD) for one path
to one peer: the :class:`PathMtu` machine and its core :class:`MtuCore`
(``docs/tunnel.md``, "Datagrams that fit the path")::

    idle -started-> searching -search_finished-> complete
    searching -probe_acked / probe_timed_out / probe_too_big-> searching
    complete -raise_timer_fired (600 s)-> searching (the sizes above the current one)
    searching, complete -black_hole_detected-> searching (from the base size again)

Sizes are UDP payloads, as our socket sends them (the beacon's relay header
included on a relayed path).  Every path starts at :data:`BASE` (1,200
bytes, QUIC's minimum) and climbs :data:`STEPS` up to the cap, a
4,096-byte segment (the reference's) in a sealed frame: one probe at a time,
:data:`MAX_PROBES` tries of :data:`PROBE_TIMER` each, and a size that is
never acknowledged (or that the kernel refuses, EMSGSIZE) ends the search.
``size_changed(mss)`` tells the stream layer the segment size that fits.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import attr
from automat import TypeMachineBuilder
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from pilot.interfaces import DatagramTooBig
from pilot.machines.table import Transition, TransitionTable, indexed
from pilot.wire.probe import MtuProbe

#: BASE_PLPMTU: the UDP payload every path is assumed to carry (QUIC's 1,200 bytes).
BASE = 1200
#: A sealed frame around a packet: magic 4, sender id 4, nonce 12, packet header 34, tag 16.
FRAME_OVERHEAD = 70
#: The beacon's Relay header (type, our id, the peer's id) in front of a relayed frame.
RELAY_OVERHEAD = 9
#: The reference's segment: the largest we ever send (docs/reference-wire.md §4.7).
MAX_SEGMENT = 4096
#: Sizes tried on the way up: a 1,280-byte link (IPv4: 1,252; IPv6: 1,232), tunnels and
#: PPPoE below 1,500 (1,400, 1,452, 1,464), a 1,500-byte link (1,472), then the cap.
STEPS = (1232, 1252, 1400, 1452, 1464, 1472)
PROBE_TIMER = 0.5
MAX_PROBES = 3
RAISE_TIMER = 600.0


def cap(overhead: int) -> int:
    """The largest datagram of a path with ``overhead`` bytes before the frame."""
    return MAX_SEGMENT + FRAME_OVERHEAD + overhead


def segment_for(plpmtu: int, overhead: int) -> int:
    """The segment size (stream payload) that a ``plpmtu``-byte datagram carries."""
    return min(MAX_SEGMENT, plpmtu - FRAME_OVERHEAD - overhead)


#: A segment that fits the base size on either path (what a stream starts with).
SAFE_SEGMENT = segment_for(BASE, RELAY_OVERHEAD)


class PathMtu(Protocol):
    """Inputs about one path's MTU."""

    def started(self) -> None:
        "The path carries a session: begin the search."

    def probe_acked(self, size: int) -> None:
        "The peer acknowledged our outstanding probe of ``size`` bytes."

    def probe_timed_out(self) -> None:
        "PROBE_TIMER passed without an ack."

    def probe_too_big(self) -> None:
        "The kernel refused to send the probe (EMSGSIZE): larger than the local link."

    def search_finished(self) -> None:
        "No larger size to try, or the last one failed."

    def raise_timer_fired(self) -> None:
        "Time to look for a larger size again."

    def black_hole_detected(self) -> None:
        "Datagrams of the current size stopped arriving (repeated timeouts, or EMSGSIZE on data)."


@attr.s(auto_attribs=True, eq=False)
class MtuCore:
    """One path's search: what it confirmed, what it is probing, its timers."""

    clock: IReactorTime
    #: ``send_probe(token, size)``: False if it could not be sent because it is too big.
    send_probe: Callable[[bytes, int], bool]
    size_changed: Callable[[int], None]
    random_bytes: Callable[[int], bytes]
    overhead: int = 0
    max_datagram: Optional[int] = None
    machine: Any = None
    state: str = "idle"
    #: The confirmed size (PLPMTU).
    plpmtu: int = BASE
    probed: int = 0
    token: bytes = b""
    probes: int = 0
    #: Sizes still to try, smallest first.
    todo: list[int] = attr.Factory(list)
    probe_call: Optional[IDelayedCall] = None
    raise_call: Optional[IDelayedCall] = None
    probes_sent: int = 0
    black_holes: int = 0

    @property
    def mss(self) -> int:
        return segment_for(self.plpmtu, self.overhead)

    def candidates(self, above: int) -> list[int]:
        top = cap(self.overhead)
        if self.max_datagram is not None:
            top = max(BASE, min(top, self.max_datagram))
        return [s for s in STEPS if above < s < top] + ([top] if top > above else [])

    def probe(self) -> None:
        """Send the next size (a new token each time); the machine hears if it was too big."""
        self.cancel()
        self.token = self.random_bytes(8)
        self.probes += 1
        self.probes_sent += 1
        self.probe_call = self.clock.callLater(PROBE_TIMER, self.machine.probe_timed_out)
        if not self.send_probe(self.token, self.probed):
            self.machine.probe_too_big()

    def next_size(self) -> None:
        """Probe the next candidate, or end the search."""
        if self.todo:
            self.probed = self.todo.pop(0)
            self.probes = 0
            self.probe()
        else:
            self.machine.search_finished()

    def confirm(self, size: int) -> None:
        if size != self.plpmtu:
            self.plpmtu = size
            self.size_changed(self.mss)

    def cancel(self) -> None:
        for call in (self.probe_call, self.raise_call):
            if call is not None and call.active():
                call.cancel()
        self.probe_call = self.raise_call = None

    def stats(self) -> dict[str, Any]:
        return {"mtu": self.plpmtu, "mss": self.mss, "mtu_state": self.state,
                "mtu_probing": self.probed if self.state == "searching" else None}


def _named(core: MtuCore, old: str, new: str, event: str) -> None:
    core.state = new


_builder = TypeMachineBuilder(PathMtu, MtuCore)
idle = _builder.state("idle")
searching = _builder.state("searching")
complete = _builder.state("complete")
table = TransitionTable((idle, searching, complete), before=_named)
I = PathMtu  # noqa: E741


@table.on(idle, I.started, searching)
def _start(m: PathMtu, c: MtuCore) -> None:
    c.todo = c.candidates(c.plpmtu)
    c.next_size()


@table.on(searching, I.probe_acked, searching)
def _acked(m: PathMtu, c: MtuCore, size: int) -> None:
    if size != c.probed:
        return  # an ack of an earlier probe of this search (its token matched): nothing new
    c.cancel()
    c.confirm(size)
    c.next_size()


@table.on(searching, I.probe_timed_out, searching)
def _lost(m: PathMtu, c: MtuCore) -> None:
    if c.probes < MAX_PROBES:
        c.probe()
    else:
        m.search_finished()


@table.on(searching, I.probe_too_big, searching)
def _too_big(m: PathMtu, c: MtuCore) -> None:
    m.search_finished()


@table.on(searching, I.search_finished, complete)
def _finish(m: PathMtu, c: MtuCore) -> None:
    c.cancel()
    c.todo = []
    c.probed = 0
    c.raise_call = c.clock.callLater(RAISE_TIMER, m.raise_timer_fired)


@table.on(complete, I.raise_timer_fired, searching)
def _raise(m: PathMtu, c: MtuCore) -> None:
    c.raise_call = None
    c.todo = c.candidates(c.plpmtu)
    c.next_size()


@table.on(searching, I.black_hole_detected, searching)
@table.on(complete, I.black_hole_detected, searching)
def _black_hole(m: PathMtu, c: MtuCore) -> None:
    c.cancel()
    c.black_holes += 1
    c.confirm(BASE)
    c.todo = c.candidates(BASE)
    c.next_size()


table.ignore((idle, complete), I.probe_acked,
             why="a late or repeated ack once the search ended (or before it began) changes nothing")
table.ignore((idle,), I.black_hole_detected, why="nothing above the base size was confirmed yet")
table.ignore((searching, complete), I.started, why="already running")
# probe_timed_out and raise_timer_fired are cancelled whenever their state is left, and
# search_finished comes only from a searching behaviour: anywhere else they raise.

PathMtuMachine = indexed(_builder.build())


def transitions() -> list[Transition]:
    """Every transition: (state, input, next state, behaviour), for docs and tests."""
    return table.transitions()


def path_mtu(clock: IReactorTime, send_probe: Callable[[bytes, int], bool],
             size_changed: Callable[[int], None], random_bytes: Callable[[int], bytes],
             overhead: int = 0, max_datagram: Optional[int] = None) -> tuple[PathMtu, MtuCore]:
    """A machine for one path, and its core (for ``stats``)."""
    core = MtuCore(clock, send_probe, size_changed, random_bytes, overhead, max_datagram=max_datagram)
    machine: PathMtu = PathMtuMachine(core)
    core.machine = machine
    return machine, core


@attr.s(auto_attribs=True, eq=False, kw_only=True)
class PathMtus:
    """
    Every path's search, by (peer, relayed?): the tunnel layer tells it which
    path a peer uses (:meth:`using`), hands it the PILM frames it receives,
    and the stream layer's timeouts (:meth:`path_trouble`).
    ``send_frame(node_id, frame, relay)`` may raise :class:`~pilot.interfaces.DatagramTooBig`.
    """

    clock: IReactorTime
    send_frame: Callable[[int, bytes, bool], bool]
    own_id: Callable[[], Optional[int]]
    segment_size_changed: Callable[[int, int], None]
    random_bytes: Callable[[int], bytes]
    count: Callable[[str], None]
    #: Search no higher than this (the benchmark's 1,400-byte runs, a known link); None: the cap.
    max_datagram: Optional[int] = None
    _paths: dict[tuple[int, bool], tuple[PathMtu, MtuCore]] = attr.Factory(dict)
    #: node id -> the path (relay or not) a peer with a session is reached by; read per packet sent
    in_use: dict[int, bool] = attr.Factory(dict)

    def using(self, node_id: int, relay: bool) -> None:
        """The peer has a session and is reached this way: search this path (once), report its size."""
        if self.in_use.get(node_id) is relay:
            return
        self.in_use[node_id] = relay
        path = self._paths.get((node_id, relay))
        if path is None:
            path = self._paths[node_id, relay] = self._new(node_id, relay)
            self.segment_size_changed(node_id, path[1].mss)
            path[0].started()
        else:
            self.segment_size_changed(node_id, path[1].mss)

    def _new(self, node_id: int, relay: bool) -> tuple[PathMtu, MtuCore]:
        overhead = RELAY_OVERHEAD if relay else 0

        def send_probe(token: bytes, size: int) -> bool:
            own = self.own_id()
            if own is None:
                return True  # nothing can go out yet: the probe counts as lost
            try:
                self.send_frame(node_id, MtuProbe(own, token, size, size - overhead).encode(), relay)
            except DatagramTooBig:
                self.count("mtu_probe_too_big")
                return False
            return True

        def changed(mss: int) -> None:
            if self.in_use.get(node_id) is relay:
                self.segment_size_changed(node_id, mss)

        return path_mtu(self.clock, send_probe, changed, self.random_bytes, overhead, self.max_datagram)

    def ack_received(self, node_id: int, token: bytes, size: int, via_relay: bool) -> None:
        path = self._paths.get((node_id, via_relay))
        if path is None or path[1].state != "searching" or token != path[1].token:
            self.count("mtu_ack_unmatched")
            return
        path[0].probe_acked(size)

    def too_big(self, node_id: int, relay: bool, frame_len: int) -> None:
        """
        The kernel refused a frame of ours to the peer (EMSGSIZE).  If the path
        was believed to carry it, the path got smaller; a frame larger than
        the path (an application datagram) is only dropped: we never fragment.
        """
        self.count("too_big")
        path = self._paths.get((node_id, relay))
        if path is not None and frame_len + path[1].overhead <= path[1].plpmtu:
            self._black_hole(path)

    def path_trouble(self, node_id: int) -> None:
        """A stream to the peer timed out repeatedly: maybe its datagrams no longer fit."""
        relay = self.in_use.get(node_id)
        if relay is not None:
            self._black_hole(self._paths.get((node_id, relay)))

    def _black_hole(self, path: Optional[tuple[PathMtu, MtuCore]]) -> None:
        if path is not None and path[1].plpmtu > BASE:
            self.count("mtu_black_hole")
            path[0].black_hole_detected()

    def stats(self, node_id: int) -> dict[str, Any]:
        relay = self.in_use.get(node_id)
        path = self._paths.get((node_id, relay)) if relay is not None else None
        if path is None:
            return {"mtu": None, "mss": None, "mtu_state": None, "mtu_probing": None}
        return path[1].stats()

    def stop(self) -> None:
        for _, core in self._paths.values():
            core.cancel()
