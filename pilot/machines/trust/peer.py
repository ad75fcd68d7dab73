# -*- test-case-name: tests.machines.test_trust -*-
"""
One peer's trust as a machine: four states, the inputs an operator or the
peer can give, and what each does (``docs/trust.md``).  Every input is
declared in every state; an operator's impossible request (approving a
request that is not there) raises :class:`~pilot.errors.NotFound`, a peer's
message that makes no sense here is logged and ignored.

The trust store is the only state: :func:`peer_machine` builds the machine
in the state the store gives, for one input, and the behaviours change the
store (through :class:`~pilot.machines.trust.effects.Effects`) before they
send anything, so a collaborator that answers at once sees the new state.
"""

from __future__ import annotations

from typing import Protocol

import attr
from automat import TypeMachineBuilder

from pilot.errors import NotFound
from pilot.machines.table import Transition, TransitionTable
from pilot.machines.trust.effects import Effects
from pilot.machines.trust.values import PENDING, REQUESTED, TRUSTED, UNKNOWN


class PeerTrust(Protocol):
    """Inputs about one peer.  Built fresh for every input, in the state the store gives."""

    def handshake_requested(self, justification: str) -> None:
        "Our operator asks the peer for trust."

    def approved(self) -> None:
        "Our operator (or a rule) approves the peer's request."

    def rejected(self, reason: str) -> None:
        "Our operator rejects the peer's request."

    def untrusted(self) -> None:
        "Our operator withdraws trust, or a request we sent."

    def request_received(self, justification: str, public_key: bytes) -> None:
        "The peer asks for trust (direct: key verified; relayed: key empty)."

    def accept_received(self, public_key: bytes) -> None:
        "The peer accepted (direct: key verified; relayed: key empty)."

    def reject_received(self) -> None:
        "The peer rejected our request."

    def revoke_received(self, report: bool) -> None:
        "The peer revoked trust (direct: ``report`` to the registry; pushed event: it knows)."


@attr.s(auto_attribs=True, eq=False)
class Peer:
    """The peer an input is about, and the effects the behaviours use."""

    peer: int
    effects: Effects


_builder = TypeMachineBuilder(PeerTrust, Peer)
unknown = _builder.state(UNKNOWN)
requested = _builder.state(REQUESTED)
pending = _builder.state(PENDING)
trusted = _builder.state(TRUSTED)
table = TransitionTable((unknown, requested, pending, trusted))


# unknown

@table.on(unknown, PeerTrust.handshake_requested, requested)
def _ask(m: PeerTrust, c: Peer, justification: str) -> None:
    c.effects.record_outgoing(c.peer, justification)
    c.effects.send_request(c.peer, justification)


@table.on(unknown, PeerTrust.approved, unknown)
def _nothing_to_approve(m: PeerTrust, c: Peer) -> None:
    raise NotFound(f"no pending request from node {c.peer}")


@table.on(unknown, PeerTrust.rejected, unknown)
def _nothing_to_reject(m: PeerTrust, c: Peer, reason: str) -> None:
    raise NotFound(f"no pending request from node {c.peer}")


@table.on(unknown, PeerTrust.untrusted, unknown)
def _nothing_to_untrust(m: PeerTrust, c: Peer) -> None:
    raise NotFound(f"node {c.peer} is not trusted")


@table.on(unknown, PeerTrust.request_received, pending)
def _keep_pending(m: PeerTrust, c: Peer, justification: str, public_key: bytes) -> None:
    c.effects.record_pending(c.peer, justification, public_key)


@table.on(unknown, PeerTrust.accept_received, unknown)
def _unasked_accept(m: PeerTrust, c: Peer, public_key: bytes) -> None:
    c.effects.ignored(c.peer, "an accept, but we sent no request")


@table.on(unknown, PeerTrust.reject_received, unknown)
def _unasked_reject(m: PeerTrust, c: Peer) -> None:
    c.effects.ignored(c.peer, "a reject, but we sent no request")


@table.on(unknown, PeerTrust.revoke_received, unknown)
def _nothing_to_revoke(m: PeerTrust, c: Peer, report: bool) -> None:
    # Usual: a revoke comes both directly and as the registry's event.
    c.effects.of.log.debug("trust: node {peer} revoked trust we did not have", peer=c.peer)


# requested

@table.on(requested, PeerTrust.handshake_requested, requested)
def _ask_again(m: PeerTrust, c: Peer, justification: str) -> None:
    c.effects.record_outgoing(c.peer, justification)
    c.effects.send_request(c.peer, justification)


@table.on(requested, PeerTrust.approved, requested)
def _approve_own_request(m: PeerTrust, c: Peer) -> None:
    raise NotFound(f"no pending request from node {c.peer} (we are waiting for its answer)")


@table.on(requested, PeerTrust.rejected, requested)
def _reject_own_request(m: PeerTrust, c: Peer, reason: str) -> None:
    raise NotFound(f"no pending request from node {c.peer} (we are waiting for its answer)")


@table.on(requested, PeerTrust.untrusted, unknown)
def _withdraw(m: PeerTrust, c: Peer) -> None:
    c.effects.forget(c.peer)


@table.on(requested, PeerTrust.request_received, trusted)
def _crossed(m: PeerTrust, c: Peer, justification: str, public_key: bytes) -> None:
    c.effects.trust(c.peer, public_key)
    c.effects.grant(c.peer)


@table.on(requested, PeerTrust.accept_received, trusted)
def _accepted(m: PeerTrust, c: Peer, public_key: bytes) -> None:
    c.effects.trust(c.peer, public_key)
    c.effects.report_trust(c.peer)


@table.on(requested, PeerTrust.reject_received, unknown)
def _refused(m: PeerTrust, c: Peer) -> None:
    c.effects.forget(c.peer)


@table.on(requested, PeerTrust.revoke_received, unknown)
def _refused_by_revoke(m: PeerTrust, c: Peer, report: bool) -> None:
    c.effects.forget(c.peer)


# pending

@table.on(pending, PeerTrust.handshake_requested, trusted)
def _ask_who_asked(m: PeerTrust, c: Peer, justification: str) -> None:
    c.effects.trust(c.peer, c.effects.pending_key(c.peer))
    c.effects.grant(c.peer)


@table.on(pending, PeerTrust.approved, trusted)
def _approve(m: PeerTrust, c: Peer) -> None:
    c.effects.trust(c.peer, c.effects.pending_key(c.peer))
    c.effects.grant(c.peer)


@table.on(pending, PeerTrust.rejected, unknown)
def _reject(m: PeerTrust, c: Peer, reason: str) -> None:
    c.effects.forget(c.peer)
    c.effects.refuse(c.peer, reason)


@table.on(pending, PeerTrust.untrusted, pending)
def _untrust_pending(m: PeerTrust, c: Peer) -> None:
    raise NotFound(f"node {c.peer} is not trusted (its request is pending: reject it)")


@table.on(pending, PeerTrust.request_received, pending)
def _asked_again(m: PeerTrust, c: Peer, justification: str, public_key: bytes) -> None:
    c.effects.record_pending(c.peer, justification, public_key)


@table.on(pending, PeerTrust.accept_received, pending)
def _pending_accept(m: PeerTrust, c: Peer, public_key: bytes) -> None:
    c.effects.ignored(c.peer, "an accept, but we sent no request")


@table.on(pending, PeerTrust.reject_received, pending)
def _pending_reject(m: PeerTrust, c: Peer) -> None:
    c.effects.ignored(c.peer, "a reject, but we sent no request")


@table.on(pending, PeerTrust.revoke_received, unknown)
def _request_withdrawn(m: PeerTrust, c: Peer, report: bool) -> None:
    c.effects.forget(c.peer)


# trusted

@table.on(trusted, PeerTrust.handshake_requested, trusted)
def _ask_trusted(m: PeerTrust, c: Peer, justification: str) -> None:
    # Already trusted: ask again anyway, so a peer that lost its side can answer.
    c.effects.send_request(c.peer, justification)


table.ignore((trusted,), PeerTrust.approved, why="approving twice changes nothing")


@table.on(trusted, PeerTrust.rejected, trusted)
def _reject_trusted(m: PeerTrust, c: Peer, reason: str) -> None:
    raise NotFound(f"no pending request from node {c.peer} (it is trusted: untrust it)")


@table.on(trusted, PeerTrust.untrusted, unknown)
def _untrust(m: PeerTrust, c: Peer) -> None:
    c.effects.forget(c.peer)
    c.effects.revoke(c.peer, tell_peer=True, tell_registry=True)


@table.on(trusted, PeerTrust.request_received, trusted)
def _reassure(m: PeerTrust, c: Peer, justification: str, public_key: bytes) -> None:
    c.effects.confirm(c.peer, public_key, mutual=False)
    c.effects.answer_accept(c.peer)


@table.on(trusted, PeerTrust.accept_received, trusted)
def _accepted_again(m: PeerTrust, c: Peer, public_key: bytes) -> None:
    c.effects.confirm(c.peer, public_key, mutual=True)


@table.on(trusted, PeerTrust.reject_received, trusted)
def _trusted_reject(m: PeerTrust, c: Peer) -> None:
    c.effects.ignored(c.peer, "a reject, but the peer is trusted (a revoke ends trust)")


@table.on(trusted, PeerTrust.revoke_received, unknown)
def _revoked(m: PeerTrust, c: Peer, report: bool) -> None:
    c.effects.forget(c.peer)
    c.effects.revoke(c.peer, tell_peer=False, tell_registry=report)


PeerTrustMachine = _builder.build()
_STATES = {UNKNOWN: unknown, REQUESTED: requested, PENDING: pending, TRUSTED: trusted}


def peer_machine(peer: int, effects: Effects, status: str) -> PeerTrust:
    """The machine for ``peer`` in ``status`` (``unknown``, ``requested``, ``pending``, ``trusted``)."""
    return PeerTrustMachine(Peer(peer, effects), _STATES[status])


def transitions(ignored: bool = False) -> list[Transition]:
    """Every transition of the per-peer table (with ``ignored``, the harmless inputs too)."""
    return table.transitions(ignored)
