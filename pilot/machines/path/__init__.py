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
    COLLISION_QUIET, DIRECT, DIRECT_SILENCE, DIRECT_TIMEOUT, DIRECT_TRYING, IDLE, KEEPALIVE, PATH_NAMES,
    PUNCH_ANSWER_WINDOW, QUICK_RETRIES, REASONS,
    PUNCH_HINT_WINDOW, PUNCH_RETRY_FIRST, PUNCH_RETRY_MAX, PUNCH_TIMEOUT, PUNCHED, PUNCHING, RELAY_IDLE,
    RELAYED, RETRY_JITTER, UNMATCHED_MAX, PathConfig,
)
from pilot.machines.path.layer import Paths, takes_unsolicited
from pilot.machines.path.peer import (
    PathCore, PathOwner, PeerPath, PeerPathMachine, TunnelControl, transitions,
)

__all__ = [
    "COLLISION_QUIET", "DIRECT", "DIRECT_SILENCE", "DIRECT_TIMEOUT", "DIRECT_TRYING", "IDLE", "KEEPALIVE",
    "PATH_NAMES", "QUICK_RETRIES", "REASONS",
    "PUNCHED", "PUNCHING", "PUNCH_ANSWER_WINDOW", "PUNCH_HINT_WINDOW", "PUNCH_RETRY_FIRST",
    "PUNCH_RETRY_MAX", "PUNCH_TIMEOUT", "RELAYED", "RELAY_IDLE", "RETRY_JITTER", "UNMATCHED_MAX",
    "Endpoint", "PathConfig", "PathCore", "PathOwner", "Paths", "PeerPath", "PeerPathMachine",
    "TunnelControl", "takes_unsolicited", "transitions",
]
