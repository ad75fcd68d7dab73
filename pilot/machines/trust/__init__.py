# -*- test-case-name: tests.machines.test_trust -*-
"""
Trust between this node and each other node: handshake requests, approvals,
revocations and key pins (``docs/reference-wire.md`` §5; ``docs/trust.md``).

Each peer is in one of four states, and the trust store says which:

``unknown``
    nothing recorded.
``requested``
    we asked the peer (an ``outgoing`` entry) and have no answer yet.
``pending``
    the peer asked us (a ``pending`` entry); our operator (or a rule) decides.
``trusted``
    a ``trusted`` entry, with the peer's key pinned once known.

The store is the only state.  Every input builds the peer's machine
(:mod:`pilot.machines.trust.peer`, an Automat ``TypeMachineBuilder`` table) in the state
the store gives, and the behaviours change the store, save it, and only then
call collaborators, so a collaborator that answers at once (re-entering this
object) sees the new state, and the store and the table cannot disagree.

Rules (where they differ from the reference, ``docs/reference-wire.md`` §9 item
numbers):

* Private by default: a request nobody expected is kept as pending.  It is
  answered with an accept at once only if the peer is already trusted, if we
  have our own request out to it (crossing requests trust both ways), or if an
  :class:`AutoApprove` rule matches (hostname glob, public key, tag).
* A direct message (port 444) counts only if it comes, over the tunnel, from
  the node it names; its timestamp is at most 5 minutes old and 30 s ahead;
  it is not a repeat (bounded replay filter); and its signature verifies with
  the key **the registry holds** for that node, not the key in the message
  (#12).  A trusted peer's pinned key must equal that key.
* An accept (direct or relayed) is honoured only while we have a request out
  to that node (#12).  Repeated accepts change nothing.
* Granting trust sends ``report_trust``, then one ``respond_handshake``
  accept, then a direct accept, each after the previous one finished, so the
  direct try no longer races the registry's trust pair and no second
  ``respond_handshake`` is sent (#14).
* Asking sends the direct request and ``request_handshake`` together: the
  direct path works whenever the peer can be reached, the relay (with the
  registry's push events) whenever it cannot (#13).
* Untrusting removes the entry, sends a direct revoke and ``revoke_trust``.

The package, one job a module: :mod:`~pilot.machines.trust.machine`
(:class:`TrustMachine`, what the owner calls, and the checks on direct
messages), :mod:`~pilot.machines.trust.peer` (one peer's states and what each
input does there), :mod:`~pilot.machines.trust.effects` (the store changes
and the messages out), :mod:`~pilot.machines.trust.rules`
(:class:`AutoApprove`), :mod:`~pilot.machines.trust.replay` (the replay
filter) and :mod:`~pilot.machines.trust.values` (limits and state names).
"""

from pilot.machines.trust.machine import TrustMachine
from pilot.machines.trust.peer import PeerTrust, table, transitions
from pilot.machines.trust.replay import ReplayFilter, digest
from pilot.machines.trust.rules import AutoApprove
from pilot.machines.trust.values import (
    MAX_AGE, MAX_AHEAD, MAX_PENDING, MAX_TEXT, PENDING, REPLAY_ENTRIES, REPLAY_MEMORY, REQUESTED, TRUSTED,
    UNKNOWN,
)

__all__ = [
    "MAX_AGE", "MAX_AHEAD", "MAX_PENDING", "MAX_TEXT", "PENDING", "REPLAY_ENTRIES", "REPLAY_MEMORY",
    "REQUESTED", "TRUSTED", "UNKNOWN", "AutoApprove", "PeerTrust", "ReplayFilter", "TrustMachine", "digest",
    "table", "transitions",
]
