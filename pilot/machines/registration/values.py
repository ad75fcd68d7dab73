# -*- test-case-name: tests.machines.test_registration -*-
"""
The registry session's fixed values: its timings, its state names, the
request each setting travels in, and the shapes of the collaborators it is
given (the session is described in :mod:`pilot.machines.registration`).
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

#: Seconds between heartbeats to a registry that pushes events (ours).  The
#: registry forgets a node silent for 180 s (checked every 60 s) and counts
#: it active while heard from within 60 s: 50 s fits both with room.  The NAT
#: mapping to the beacon is kept by the owner's unsigned Discover
#: (``pilot.node.core.DISCOVER_PROBE``), and a registry that died without
#: closing the connection is found by :meth:`Registration.check_now` when its
#: beacon stops answering, not by this (``docs/registration.md``).
HEARTBEAT_INTERVAL = 50.0
#: At most this long (s) between heartbeats to a registry that does not push
#: events (a reference one): each heartbeat is followed by ``poll_handshakes``,
#: so a handshake request waits at most this long, as with the reference's 30 s.
POLL_INTERVAL = 25.0
#: First reconnect window (s); doubles per failure up to BACKOFF_MAX.
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
#: Once the rendezvous's beacon answers again, reconnects are spread over this long (s)
#: instead of waiting out the backoff: a fleet comes back within seconds of a restart.
SEEN_SPREAD = 2.0
#: A request unanswered this long (s) means the connection is dead.
REQUEST_TIMEOUT = 10.0
#: A connection attempt is abandoned after this long (s).
CONNECT_TIMEOUT = 10.0
#: ``stop()`` waits at most this long (s) for ``deregister``.
STOP_TIMEOUT = 2.0

IDLE = "idle"
CONNECTING = "connecting"
REGISTERING = "registering"
REGISTERED = "registered"
WAITING = "waiting"
STOPPED = "stopped"

#: Setting name -> the request that carries it.
SETTING_REQUESTS = {"public": "set_visibility", "tags": "set_tags", "hostname": "set_hostname"}

Reply = dict[str, Any]


class RegistryClient(Protocol):
    """One connection to the registry (``RegistryClientProtocol`` is one)."""

    def request(self, msg: dict[str, Any]) -> "Deferred[Reply]":
        "Send ``msg``; the reply, or a PilotError (RegistryUnavailable when the connection is gone)."

    def close(self) -> None:
        "Close the connection."


class Jitter(Protocol):
    def uniform(self, a: float, b: float) -> float:
        "A number in ``[a, b]`` (``random.Random`` is one)."


class Stale(Exception):
    """The connection or registration attempt this work belonged to is gone."""


def reason(failure: Failure) -> str:
    """A failure as one line of text for logs and ``status()``."""
    return failure.getErrorMessage() or failure.type.__name__
