# -*- test-case-name: tests.machines.test_tunnel -*-
"""
The node side of the tunnel layer (``docs/reference-wire.md`` §4); rules, and
where they differ from the reference, in ``docs/tunnel.md``.

:class:`Tunnels` (one per node, :mod:`.layer`) decodes frames, checks PILA
signatures against ``expected_key`` and feeds one :class:`PeerTunnel` machine
per peer (:mod:`.peer`): ``idle`` -> ``exchanging`` (our PILA resent 250 ms
doubling to 2 s, give up at 10 s) -> ``established``.  Only authenticated
traffic: no PILT or PILK is ever sent, every PILT is dropped, every PILK
refused.  A repeated PILA with the same X25519 key keeps the session (send
counter, replay windows, :mod:`.session`); replay windows are kept per nonce
prefix, so a reference peer that re-keys is still heard.  Once a session
exists, a PILA with a new X25519 key (from any path, after any idle spell)
only makes a candidate session, promoted by the first frame sealed under it:
an old PILA replayed cannot cut a tunnel nor move the peer's endpoint.
"""

from pilot.endpoint import Endpoint
from pilot.machines.tunnel.layer import (
    ANSWERS_PER_SECOND, LOOKUP_BACKLOG, LOOKUPS_IN_FLIGHT, QUEUE_PER_PEER, QUEUED_PEERS, Tunnels,
)
from pilot.machines.tunnel.peer import (
    ANSWER_BURST, ANSWER_INTERVAL, ANSWER_WINDOW, CANDIDATE_COPIES, CANDIDATES, GIVE_UP, RETIRED_KEYS,
    RETRY_FIRST, RETRY_MAX, Peer, PeerTunnel, PeerTunnelMachine, TunnelOwner, transitions,
)
from pilot.machines.tunnel.session import PREFIX_WINDOWS, RETIRED_PREFIXES, Candidate, Dropped, Session

__all__ = [
    "ANSWERS_PER_SECOND", "ANSWER_BURST", "ANSWER_INTERVAL", "ANSWER_WINDOW", "CANDIDATES", "CANDIDATE_COPIES",
    "GIVE_UP", "LOOKUPS_IN_FLIGHT", "LOOKUP_BACKLOG", "PREFIX_WINDOWS", "QUEUED_PEERS", "QUEUE_PER_PEER",
    "RETIRED_KEYS", "RETIRED_PREFIXES", "RETRY_FIRST", "RETRY_MAX", "Candidate", "Dropped", "Endpoint", "Peer",
    "PeerTunnel", "PeerTunnelMachine", "Session", "TunnelOwner", "Tunnels", "transitions",
]
