# -*- test-case-name: tests.machines.test_path -*-
"""
Which way our frames go to each peer: straight to its endpoint, through a
hole punched with the beacon's help, or relayed by the beacon; rules and
reasons in ``docs/nat.md``.

:class:`Paths` (one per node, :mod:`.layer`) keeps one :class:`PeerPath`
machine per peer (:mod:`.peer`); the timeouts are in :mod:`.config`.
"""

from pilot.endpoint import Endpoint
from pilot.machines.path.config import (
    COLLISION_QUIET, COLLISION_QUIET_MAX, DIRECT, DIRECT_SILENCE, DIRECT_TIMEOUT, DIRECT_TRYING, IDLE,
    KEEPALIVE, KEEPER_INTERVAL, KEEPER_TTL, OPENER_SKEW, PATH_NAMES, PUNCH_ANSWER_WINDOW, REASONS,
    PUNCH_HINT_WINDOW, PUNCH_TIMEOUT, PUNCHED, PUNCHING, RELAY_IDLE, RELAYED, UNMATCHED_MAX, PathConfig,
)
from pilot.machines.path.layer import Paths, punches_first, takes_unsolicited
from pilot.machines.path.peer import (
    PathCore, PathOwner, PeerPath, PeerPathMachine, TunnelControl, transitions,
)

__all__ = [
    "COLLISION_QUIET", "COLLISION_QUIET_MAX", "DIRECT", "DIRECT_SILENCE", "DIRECT_TIMEOUT", "DIRECT_TRYING",
    "IDLE", "KEEPALIVE", "KEEPER_INTERVAL", "KEEPER_TTL", "OPENER_SKEW", "PATH_NAMES", "REASONS",
    "PUNCHED", "PUNCHING", "PUNCH_ANSWER_WINDOW", "PUNCH_HINT_WINDOW",
    "PUNCH_TIMEOUT", "RELAYED", "RELAY_IDLE", "UNMATCHED_MAX",
    "Endpoint", "PathConfig", "PathCore", "PathOwner", "Paths", "PeerPath", "PeerPathMachine",
    "TunnelControl", "punches_first", "takes_unsolicited", "transitions",
]
