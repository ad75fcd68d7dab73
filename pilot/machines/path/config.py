# -*- test-case-name: tests.machines.test_path -*-
"""
The path machine's timeouts and intervals (``docs/nat.md`` gives the
reasons and the reference's values), its state names and what
``pilotctl peers`` shows for each.
"""

from __future__ import annotations

from typing import Optional

import attr

#: A first contact goes straight to the registered endpoint; without an
#: authenticated answer within this long (s) we ask the beacon to punch.  A
#: handful of round trips plus the peer's key lookup; the reference waits for
#: three SYN retransmissions (about 7 s) before it relays.
DIRECT_TIMEOUT = 1.0
#: After a punch request (or a punch command from the peer's side), this long
#: (s) for an authenticated frame through the hole before we relay.
PUNCH_TIMEOUT = 2.0
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

#: On a punch command, PILPs with these hop limits go first, OPENER_STEP (s)
#: apart, and the punch itself OPENER_STEP after the last: each router is opened
#: by our own datagram before the peer's can reach it when a hop stands between
#: the two NATs (``pilot/node/openers.py``, ``docs/nat.md``).
OPENER_TTLS = (2, 3, 4)
OPENER_STEP = 0.08
#: The side that punches second (``punches_first``) sends each opener this much
#: (s) later than the first side sends the same one.  More than the two nodes'
#: drift in acting on the beacon's simultaneous commands (a few ms; tens on a
#: loaded host), so on one segment the first side's opener always reaches the
#: second side's router first: the collision, if the routers deliver WAN input
#: locally, always leaves the first side's mapping right, which is what the
#: recovery relies on.  OPENER_STEP - OPENER_SKEW (40 ms) is the margin the
#: transit case keeps: the first side's next opener, one hop longer, still
#: reaches the second side's router after that side's own opener opened it.
OPENER_SKEW = 0.04

#: After a failed punch the pair recovers without the beacon, in rounds
#: (``docs/nat.md``, "Recovery"): the side that punched first (the "winner")
#: keeps its router's entry for the peer alive with PILPs of hop limit
#: KEEPER_TTL every KEEPER_INTERVAL (s), which refresh the entry at its own
#: router and die there, and sends nothing else directly; the other side sends
#: nothing directly for COLLISION_QUIET (s), longer than Linux's timeout for an
#: UNREPLIED UDP entry (``nf_conntrack_udp_timeout``, 30 s) plus the two sides'
#: drift and the punch's last datagrams, so that the entry the winner's punch
#: left on its router and its own moved flow are gone; then it sends first, at
#: the normal TTL, and its router's new mapping keeps its port, which the
#: winner's live entry expects.  KEEPER_INTERVAL: well inside the shortest
#: UDP timeouts in use (10 s on some routers, the lab's keepalive scenario).
KEEPER_TTL = 1
KEEPER_INTERVAL = 5.0
COLLISION_QUIET = 33.0
#: A round whose attempt brought no answer within PUNCH_TIMEOUT ends; the next
#: swaps the roles (the drift was larger than the skew, or a router was
#: poisoned before we punched).  From the third round on the quiet period
#: doubles, up to COLLISION_QUIET_MAX (s): a pair that must relay (a symmetric
#: NAT against a filtering one) costs a few datagrams per round.
COLLISION_QUIET_MAX = 264.0

#: Why a pair is relayed (``Paths.status``'s ``reason``; ``pilotctl peers``).
REASON_NO_BEACON = "no_beacon"              # we cannot punch: no beacon (or not registered yet)
REASON_PEER_RELAYS = "peer_relays"          # the peer's frames came through the relay first
REASON_COLLISION = "collision_recovering"   # no frame through the hole: recovery rounds (quiet, then one side sends)
REASON_IDLE = "idle"                        # nobody uses the path; we punch when traffic resumes
REASONS = (REASON_NO_BEACON, REASON_PEER_RELAYS, REASON_COLLISION, REASON_IDLE)

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
    collision_quiet: float = COLLISION_QUIET
    collision_quiet_max: float = COLLISION_QUIET_MAX
    relay_idle: float = RELAY_IDLE
    keepalive: float = KEEPALIVE
    direct_silence: float = DIRECT_SILENCE
    punch_answer_window: float = PUNCH_ANSWER_WINDOW
    punch_hint_window: float = PUNCH_HINT_WINDOW
    #: A first contact with a public endpoint starts with a punch through the
    #: beacon, sending nothing there before the command (``docs/nat.md``); False:
    #: straight to the endpoint first, as before issue 10 and as the reference does.
    punch_first: bool = True
    #: Hop limits of the openers sent before a punch; () punches at once (the reference's way).
    opener_ttls: tuple[int, ...] = OPENER_TTLS
    opener_step: float = OPENER_STEP
    opener_skew: float = OPENER_SKEW
    keeper_ttl: int = KEEPER_TTL
    keeper_interval: float = KEEPER_INTERVAL
