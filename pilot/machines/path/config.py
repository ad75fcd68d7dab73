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
#: While relayed we punch again after this long (s), doubling ...
PUNCH_RETRY_FIRST = 2.0
#: ... up to this; each wait is shortened by up to RETRY_JITTER of itself.
PUNCH_RETRY_MAX = 8.0
RETRY_JITTER = 0.25
#: After this many quick retries have failed too ...
QUICK_RETRIES = 1
#: ... we punch only every COLLISION_QUIET (s): longer than Linux's conntrack
#: timeout for unreplied UDP (``nf_conntrack_udp_timeout``, 30 s), so an
#: UNREPLIED entry that our punch left on the peer's router (the conntrack
#: collision, ``docs/nat.md``) expires before the next coordinated attempt.
#: Every punch command for the peer (ours or the peer's) starts the wait again,
#: so neither side refreshes the entry in the other's quiet period.  The wait
#: is lengthened (never shortened) by up to RETRY_JITTER x PUNCH_RETRY_FIRST.  A
#: lifted block is noticed within about COLLISION_QUIET plus a round trip.
COLLISION_QUIET = 32.0
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
OPENER_STEP = 0.02

#: Why a pair is relayed (``Paths.status``'s ``reason``; ``pilotctl peers``).
REASON_NO_BEACON = "no_beacon"              # we cannot punch: no beacon (or not registered yet)
REASON_PEER_RELAYS = "peer_relays"          # the peer's frames came through the relay first
REASON_PUNCH_FAILED = "punch_failed"        # no frame through the hole; quick retries running
REASON_COLLISION = "collision_recovering"   # quiet period, then a coordinated retry
REASON_IDLE = "idle"                        # nobody uses the path; we punch when traffic resumes
REASONS = (REASON_NO_BEACON, REASON_PEER_RELAYS, REASON_PUNCH_FAILED, REASON_COLLISION, REASON_IDLE)

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
    quick_retries: int = QUICK_RETRIES
    collision_quiet: float = COLLISION_QUIET
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
