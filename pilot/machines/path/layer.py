# -*- test-case-name: tests.machines.test_path -*-
"""
:class:`Paths`, the node's path layer: one
:class:`~pilot.machines.path.peer.PeerPath` machine per peer, and what the
peers share: punch requests to the beacon and the matching of the beacon's
punch commands to peers (``docs/nat.md``).

Pure: no sockets, no reactor import; the tunnel layer, the datagram sender,
the beacon's address, our id and signing key, the clock and the jitter source
are injected.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import random as _random
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from pilot.endpoint import Endpoint
from pilot.interfaces import IPathEvents
from pilot.machines.path.config import DIRECT, IDLE, PATH_NAMES, PUNCHED, UNMATCHED_MAX, PathConfig
from pilot.machines.path.peer import PathCore, TunnelControl, check_silence, heard_direct
from pilot.wire import beacon as bw

#: The states whose per-packet inputs are loops the layer runs without the dispatch (``running``).
_DIRECT_STATES = frozenset((DIRECT, PUNCHED))


#: Where a datagram nobody asked for is taken: a LAN (or this host), with no NAT
#: between us that could keep an entry for it (``docs/nat.md``).
_TAKES_UNSOLICITED = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16",
    "::1/128", "fc00::/7", "fe80::/10")]


def takes_unsolicited(endpoint: Endpoint) -> bool:
    """Is ``endpoint`` a LAN (or loopback) address, where a first contact may go straight?"""
    try:
        ip = ipaddress.ip_address(endpoint[0])
    except ValueError:
        return False
    return any(ip in net for net in _TAKES_UNSOLICITED)


def _order(endpoint: Endpoint) -> tuple[int, int, str, int]:
    try:
        ip = ipaddress.ip_address(endpoint[0])
    except ValueError:
        return (9, 0, endpoint[0], endpoint[1])
    return (ip.version, int(ip), "", endpoint[1])


def punches_first(own: Optional[Endpoint], peer: Endpoint) -> bool:
    """
    Do we punch first toward ``peer``?  The side whose public endpoint (as
    the beacon sees it: the endpoint the peer's punch command names) is the
    lower one.  Both sides compute it from the same two endpoints, so they
    agree without a word on the wire (the reference's PunchCommand carries
    only the endpoint).  Not knowing our own endpoint yet, we go second.
    """
    return own is not None and _order(own) < _order(peer)


@implementer(IPathEvents)
class Paths:
    """
    The path to every peer of one node.

    :param tunnels: the node's ``Tunnels``, seen through :class:`TunnelControl`.
    :param send_datagram: ``(bytes, endpoint)`` on the node's UDP socket (PILP
        probes, punch requests, PILAs to endpoints of no known peer).
    :param beacon: ``() -> endpoint or None``.
    :param node_id: ``() -> our node id or None``; ``sign``: our Ed25519 signer
        (punch requests carry a proof, ``pilot.wire.beacon``).
    :param path_changed: ``(node_id, state, endpoint)`` after every change of
        state or of endpoint, for the owner's log.
    :param send_limited: ``(bytes, endpoint, ttl)`` on the same socket with a hop
        limit (the recovery's keepers); ``public_endpoint``: ``() -> our endpoint
        as the beacon sees it, or None`` (who punches first, :func:`punches_first`).
    """

    def __init__(self, *, tunnels: TunnelControl, send_datagram: Callable[[bytes, Endpoint], None],
                 beacon: Callable[[], Optional[Endpoint]], node_id: Callable[[], Optional[int]],
                 sign: Callable[[bytes], bytes], clock: IReactorTime,
                 config: PathConfig = PathConfig(), random: Callable[[], float] = _random.random,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 path_changed: Callable[[int, str, Optional[Endpoint]], None] = lambda n, s, e: None,
                 send_limited: Callable[[bytes, Endpoint, int], None] = lambda d, e, t: None,
                 public_endpoint: Callable[[], Optional[Endpoint]] = lambda: None) -> None:
        self._tunnels = tunnels
        self._send_limited = send_limited
        self._public_endpoint = public_endpoint
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
        self._peers: dict[int, PathCore] = {}
        self._outstanding: dict[int, float] = {}  # node id -> when we asked the beacon to punch
        self._unmatched: collections.OrderedDict[Endpoint, float] = collections.OrderedDict()

    # -- what the node tells us --

    def sending(self, node_id: int, endpoint: Optional[Endpoint] = None) -> None:
        """The node is about to send ``node_id`` a packet; ``endpoint``: the directory's, if known."""
        core = self._peers.get(node_id) or self._peer(node_id)
        if core.registered is None and endpoint is not None:
            core.registered = endpoint
        core.last_used = self._clock.seconds()
        # not running(core.machine), without the call (per packet)
        if core.state in _DIRECT_STATES and core.machine.__automat_postponed__ is None:
            check_silence(core.machine, core)  # direct or punched: its packet_sent loop, per packet, undispatched
        elif core.state == IDLE and self._punch_first(core.registered or core.endpoint):
            core.machine.punch_first()
        else:
            core.machine.packet_sent()

    def _punch_first(self, endpoint: Optional[Endpoint]) -> bool:
        """Does a first contact with ``endpoint`` start with a punch (nothing sent there before)?"""
        return (self.config.punch_first and endpoint is not None and not takes_unsolicited(endpoint)
                and self._beacon() is not None and self._own_id() is not None)

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
            self.count("punch_commands")
            self._outstanding.pop(core.node_id, None)
            core.machine.punch_commanded(endpoint)
        if matches:
            return
        # Someone we do not know yet wants to reach us: our PILA through the PILPs'
        # hole lets it start its exchange (it may be behind a symmetric NAT,
        # where only our packets can tell it which mapping reaches us).
        self.count("punch_commands_unmatched")
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
        if (core.state in _DIRECT_STATES and endpoint == core.endpoint
                and core.machine.__automat_postponed__ is None):  # not running(), without the call
            heard_direct(core.machine, core, endpoint)  # its direct_frame_received loop, per packet, undispatched
        else:
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
        ``rtt_ms`` (None: we do not measure it here), ``path_changed_at`` (clock seconds)
        and ``reason``: why a relayed pair is relayed (``REASONS``), None when not relayed."""
        core = self._peers.get(node_id)
        if core is None:
            return None
        return {"path": PATH_NAMES[core.state], "state": core.state, "endpoint": core.endpoint,
                "rtt_ms": None, "path_changed_at": core.changed_at, "reason": core.reason()}

    def peers(self) -> list[int]:
        return sorted(self._peers)

    def stop(self) -> None:
        """Cancel every timer (the node is stopping)."""
        for core in self._peers.values():
            core.cancel()

    # -- what the peer machines ask (pilot.machines.path.peer.PathOwner) --

    def request_punch(self, node_id: int) -> bool:
        """A signed punch request for ``node_id`` to our beacon; its command is awaited.
        False: we cannot ask (no beacon, or not registered)."""
        beacon, own = self._beacon(), self._own_id()
        if beacon is None or own is None:
            self.count("punch_impossible")
            return False
        base = bw.PunchRequest(own, node_id).base
        ts_ms = int(self._clock.seconds() * 1000)
        self._send_datagram(bw.with_proof(base, self._sign, ts_ms, self._random_bytes(8)), beacon)
        self._outstanding[node_id] = self._clock.seconds()
        self.count("punch_requests")
        return True

    def punches_first(self, endpoint: Endpoint) -> bool:
        """Do we punch first toward ``endpoint`` (:func:`punches_first`)?"""
        return punches_first(self._public_endpoint(), endpoint)

    def forget_punch_request(self, node_id: int) -> None:
        self._outstanding.pop(node_id, None)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def _peer(self, node_id: int) -> PathCore:
        core = self._peers.get(node_id)
        if core is None:
            core = self._peers[node_id] = PathCore(
                node_id=node_id, owner=self, tunnels=self._tunnels, clock=self._clock, config=self.config,
                random=self._random, send_datagram=self._send_datagram, send_limited=self._send_limited,
                path_changed=self._path_changed)
        return core
