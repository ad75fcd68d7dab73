# -*- test-case-name: tests.machines.test_trust -*-
"""
What trust does to the world: change the trust store (saving after each
change) and send the messages a decision calls for, direct (port 444) and
through the registry, in the order ``docs/trust.md`` gives.  The per-peer
machine (:mod:`pilot.machines.trust.peer`) decides which; this module knows
no states.
"""

from __future__ import annotations

from typing import Any, Callable, Generator, Protocol

import attr
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.errors import NotFound
from pilot.identity import PUBLIC_KEY_LEN
from pilot.machines.trust.values import MAX_TEXT
from pilot.trust import OutgoingRequest, PendingRequest, TrustedPeer, TrustStore
from pilot.wire.handshake import (
    ACCEPT, REJECT, REQUEST, REVOKE, REVOKE_REASON, HandshakeMessage, make_message,
)


class Collaborators(Protocol):
    """
    Who we are and whom we talk to, read afresh at every use: the owner may
    set ``node_id`` once the registry has given it
    (:class:`~pilot.machines.trust.machine.TrustMachine` is one).
    """

    node_id: int
    public_key: bytes
    sign: Callable[[bytes], bytes]
    store: TrustStore
    save: Callable[[], None]
    send_direct: Callable[[int, bytes], Any]
    registry_request: Callable[[dict[str, Any]], "Deferred[Any]"]
    lookup_key: Callable[[int], "Deferred[bytes]"]
    clock: IReactorTime
    log: Logger
    trust_ended: Callable[[int], None] | None


@attr.s(auto_attribs=True, eq=False)
class Effects:
    of: Collaborators

    # --- the store (each change saves) ---------------------------------------------------

    def changed(self) -> None:
        try:
            self.of.save()
        except Exception:
            self.of.log.failure("trust: could not save the trust store")

    def now(self) -> float:
        return self.of.clock.seconds()

    def pending_key(self, peer: int) -> bytes:
        """The key a pending request from ``peer`` came with (empty if relayed)."""
        return self.of.store.pending[peer].public_key

    def record_outgoing(self, peer: int, justification: str) -> None:
        self.of.store.outgoing[peer] = OutgoingRequest(peer, justification, self.now())
        self.changed()

    def record_pending(self, peer: int, justification: str, key: bytes) -> None:
        store = self.of.store
        old = store.pending.get(peer)
        if old is None:
            new = PendingRequest(peer, key, justification, self.now())
        else:
            new = attr.evolve(old, public_key=key or old.public_key,
                              justification=justification or old.justification)
            if new == old:
                return
        store.pending[peer] = new
        self.changed()
        if old is None:
            self.of.log.info("trust: node {peer} asks for trust: {justification}",
                             peer=peer, justification=justification)

    def trust(self, peer: int, key: bytes) -> None:
        """Trust ``peer`` (mutual: it asked us or accepted our request)."""
        self.of.store.forget(peer)
        self.of.store.trusted[peer] = TrustedPeer(peer, key, self.now(), mutual=True)
        self.changed()
        if not key:
            self._fill_key(peer)

    def confirm(self, peer: int, key: bytes, mutual: bool) -> None:
        """A trusted peer spoke again: pin its key if we had none, note that trust is mutual."""
        entry = self.of.store.trusted[peer]
        new = attr.evolve(entry, public_key=entry.public_key or key, mutual=entry.mutual or mutual)
        if new != entry:
            self.of.store.trusted[peer] = new
            self.changed()

    def forget(self, peer: int) -> None:
        self.of.store.forget(peer)
        self.changed()

    def _fill_key(self, peer: int) -> None:
        def fill(key: bytes) -> None:
            entry = self.of.store.trusted.get(peer)
            if entry is not None and not entry.public_key and isinstance(key, bytes) \
                    and len(key) == PUBLIC_KEY_LEN:
                self.of.store.trusted[peer] = attr.evolve(entry, public_key=key)
                self.changed()

        def failed(failure: Failure) -> None:
            self.of.log.info("trust: no key yet for node {peer} ({why}); the first verified one is pinned",
                             peer=peer, why=failure.getErrorMessage())

        maybeDeferred(self.of.lookup_key, peer).addCallbacks(fill, failed)

    # --- messages out ----------------------------------------------------------------------

    def message(self, kind: str, peer: int, justification: str = "", reason: str = "") -> HandshakeMessage:
        """A signed direct message from us to ``peer``, dated now."""
        of = self.of
        return make_message(kind, of.node_id, peer, of.public_key, of.sign, int(self.now()),
                            justification=justification, reason=reason)

    def _direct(self, kind: str, peer: int, justification: str = "", reason: str = "") -> "Deferred[None]":
        def failed(failure: Failure) -> None:
            self.of.log.info("trust: direct {kind} to node {peer} not delivered: {why}",
                             kind=kind, peer=peer, why=failure.getErrorMessage())

        def send() -> Any:
            data = self.message(kind, peer, justification[:MAX_TEXT], reason[:MAX_TEXT]).encode()
            return self.of.send_direct(peer, data)

        d: Deferred[None] = maybeDeferred(send).addCallbacks(lambda _: None, failed)
        return d

    def _registry(self, msg: dict[str, Any], quiet: bool = False) -> "Deferred[None]":
        def failed(failure: Failure) -> None:
            # "No such trust" is what a revoke_trust wants; the peer's own may have come first.
            expected = quiet or (msg["type"] == "revoke_trust" and failure.check(NotFound) is not None)
            (self.of.log.debug if expected else self.of.log.warn)(
                "trust: registry {type} for node {peer} failed: {why}", type=msg["type"],
                peer=msg.get("peer_id", msg.get("to_node_id")), why=failure.getErrorMessage())

        d: Deferred[None] = maybeDeferred(self.of.registry_request, msg).addCallbacks(lambda _: None, failed)
        return d

    def send_request(self, peer: int, justification: str) -> None:
        """Ask: the direct request and ``request_handshake`` together (whichever gets through)."""
        self._direct(REQUEST, peer, justification=justification)
        self._registry({"type": "request_handshake", "from_node_id": self.of.node_id, "to_node_id": peer,
                        "justification": justification})

    def report_trust(self, peer: int) -> "Deferred[None]":
        return self._registry({"type": "report_trust", "node_id": self.of.node_id, "peer_id": peer})

    def _respond(self, peer: int, accept: bool) -> "Deferred[None]":
        return self._registry({"type": "respond_handshake", "node_id": self.of.node_id, "peer_id": peer,
                               "accept": accept})

    @inlineCallbacks
    def grant(self, peer: int) -> Generator["Deferred[None]", Any, None]:
        """report_trust, then one respond_handshake accept, then a direct accept, each after the last."""
        yield self.report_trust(peer)
        yield self._respond(peer, True)
        yield self._direct(ACCEPT, peer)

    @inlineCallbacks
    def answer_accept(self, peer: int) -> Generator["Deferred[None]", Any, None]:
        """A trusted peer asked again: respond_handshake accept, then a direct accept."""
        yield self._respond(peer, True)
        yield self._direct(ACCEPT, peer)

    def refuse(self, peer: int, reason: str) -> None:
        self._respond(peer, False)
        self._direct(REJECT, peer, reason=reason)

    def revoke(self, peer: int, tell_peer: bool, tell_registry: bool) -> None:
        """Trust with ``peer`` ended: tell whom it concerns, then the owner (to close the tunnel)."""
        if tell_peer:
            self._direct(REVOKE, peer, reason=REVOKE_REASON)
        if tell_registry:
            # After a peer's revoke the registry has usually heard it from the peer
            # already (ours drops both directions at once), so a refusal is expected.
            self._registry({"type": "revoke_trust", "node_id": self.of.node_id, "peer_id": peer},
                           quiet=not tell_peer)
        if self.of.trust_ended is not None:
            try:
                self.of.trust_ended(peer)
            except Exception:
                self.of.log.failure("trust: trust_ended({peer}) failed", peer=peer)

    def ignored(self, peer: int, what: str) -> None:
        self.of.log.warn("trust: ignored {what} from node {peer}", what=what, peer=peer)
