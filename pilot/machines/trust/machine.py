# -*- test-case-name: tests.machines.test_trust -*-
"""
:class:`TrustMachine`, this node's trust as its owner sees it: the
operator's requests, the peers' messages (relayed, or direct and verified
here against the key the registry holds), the auto-approve rules applied to
a new request, and the queries.  Each input about a peer goes to that peer's
machine (:mod:`pilot.machines.trust.peer`); the rules of the whole are in
:mod:`pilot.machines.trust`.
"""

from __future__ import annotations

from typing import Any, Callable, Generator

import attr
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.errors import InvalidArgument
from pilot.identity import PUBLIC_KEY_LEN
from pilot.machines.trust.effects import Effects
from pilot.machines.trust.peer import PeerTrust, peer_machine
from pilot.machines.trust.replay import ReplayFilter, digest
from pilot.machines.trust.rules import AutoApprove
from pilot.machines.trust.values import (
    MAX_AGE, MAX_AHEAD, MAX_PENDING, MAX_TEXT, PENDING, REQUESTED, TRUSTED, UNKNOWN,
)
from pilot.trust import OutgoingRequest, PendingRequest, TrustedPeer, TrustStore
from pilot.wire.handshake import ACCEPT, MAX_NODE_ID, REJECT, REQUEST, REVOKE, HandshakeMessage


def _valid_node_id(node_id: object) -> bool:
    return isinstance(node_id, int) and not isinstance(node_id, bool) and 0 < node_id <= MAX_NODE_ID


@attr.s(auto_attribs=True, eq=False)
class TrustMachine:
    """
    This node's trust.  Pure: every effect goes through a collaborator.

    :param node_id: this node's id; ``public_key`` its Ed25519 key and
        ``sign`` its signing function (for port-444 messages).
    :param store: the trust store (the state); ``save()`` writes it and is
        called after every change.
    :param send_direct: ``(node_id, message bytes)``: one message on a
        stream to the node's port 444; may return a Deferred (failure is
        expected when the node cannot be reached).
    :param registry_request: sends one registry request (``request_handshake``,
        ``respond_handshake``, ``report_trust``, ``revoke_trust``), signing it;
        returns a Deferred of the reply.
    :param lookup_key: ``node_id -> Deferred[bytes]``, the key the registry holds.
    :param peer_info: ``node_id -> Deferred[dict]``, the registry's ``lookup``
        answer (``hostname``, ``tags``); needed only for hostname or tag rules.
    :param trust_ended: called with a node id when trust with it ends (so the
        node can close its tunnel).
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
    log: Logger = attr.Factory(lambda: Logger(namespace="pilot.machines.trust"))
    rules: AutoApprove = attr.Factory(AutoApprove)
    peer_info: Callable[[int], "Deferred[dict[str, Any]]"] | None = None
    trust_ended: Callable[[int], None] | None = None
    replay: ReplayFilter = attr.Factory(ReplayFilter)
    _considering: set[int] = attr.ib(factory=set, init=False)
    _effects: Effects = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        self._effects = Effects(self)
        if self.rules.needs_info and self.peer_info is None:
            raise InvalidArgument("hostname and tag auto-approve rules need a peer_info lookup")

    # queries

    def status(self, node_id: int) -> str:
        """``trusted``, ``pending`` (it asked us), ``requested`` (we asked it) or ``unknown``."""
        if node_id in self.store.trusted:
            return TRUSTED
        if node_id in self.store.pending:
            return PENDING
        if node_id in self.store.outgoing:
            return REQUESTED
        return UNKNOWN

    def is_trusted(self, node_id: int, public_key: bytes) -> bool:
        """
        True if ``node_id`` is trusted with this (verified) key.  An entry
        without a key takes this one and is pinned from then on; a different
        key is refused and logged.
        """
        entry = self.store.trusted.get(node_id)
        if entry is None:
            return False
        if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_LEN:
            return False
        if not entry.public_key:
            self.store.trusted[node_id] = attr.evolve(entry, public_key=public_key)
            self._effects.changed()
            self.log.info("trust: pinned the key of node {peer}", peer=node_id)
            return True
        if entry.public_key == public_key:
            return True
        self._pin_mismatch(node_id, "a connection")
        return False

    def pending(self) -> list[PendingRequest]:
        return sorted(self.store.pending.values(), key=lambda e: e.node_id)

    def trusted(self) -> list[TrustedPeer]:
        return sorted(self.store.trusted.values(), key=lambda e: e.node_id)

    def outgoing(self) -> list[OutgoingRequest]:
        return sorted(self.store.outgoing.values(), key=lambda e: e.node_id)

    # operator inputs (raise PilotError for misuse)

    def handshake(self, node_id: int, justification: str = "") -> None:
        """Ask ``node_id`` for trust (if it already asked us, this approves it)."""
        self._check_peer(node_id)
        if not isinstance(justification, str) or len(justification) > MAX_TEXT:
            raise InvalidArgument(f"a justification is text of at most {MAX_TEXT} characters")
        try:
            self._effects.message(REQUEST, node_id, justification=justification).encode()
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        self._input(node_id, lambda m: m.handshake_requested(justification))

    def approve(self, node_id: int) -> None:
        """Approve ``node_id``'s pending request (``NotFound`` if there is none)."""
        self._check_peer(node_id)
        self._input(node_id, lambda m: m.approved())

    def reject(self, node_id: int, reason: str = "") -> None:
        """Reject ``node_id``'s pending request (``NotFound`` if there is none)."""
        self._check_peer(node_id)
        if not isinstance(reason, str) or len(reason) > MAX_TEXT:
            raise InvalidArgument(f"a reason is text of at most {MAX_TEXT} characters")
        self._input(node_id, lambda m: m.rejected(reason))

    def untrust(self, node_id: int) -> None:
        """End trust in ``node_id``, or withdraw our request to it (``NotFound`` if neither)."""
        self._check_peer(node_id)
        self._input(node_id, lambda m: m.untrusted())

    # network inputs (never raise; bad input is logged and dropped)

    def relayed_request(self, from_node_id: int, justification: str, timestamp: float) -> None:
        """A ``handshake_request`` from the registry (a poll or a pushed event)."""
        if not self._from_peer(from_node_id, "relayed request") or not isinstance(justification, str):
            return
        self._request(from_node_id, justification, b"")

    def relayed_response(self, from_node_id: int, accept: bool, timestamp: float) -> None:
        """A ``handshake_response`` from the registry (a poll or a pushed event)."""
        if not self._from_peer(from_node_id, "relayed response") or not isinstance(accept, bool):
            return
        if accept:
            self._input(from_node_id, lambda m: m.accept_received(b""))
        else:
            self._input(from_node_id, lambda m: m.reject_received())

    def trust_revoked_event(self, node_id: int) -> None:
        """The registry pushed ``trust_revoked``: ``node_id`` revoked its trust with us."""
        if self._from_peer(node_id, "trust_revoked event"):
            self._input(node_id, lambda m: m.revoke_received(False))

    def direct_message_received(self, from_node_id: int, message: HandshakeMessage) -> "Deferred[None]":
        """
        A port-444 message that arrived over the tunnel from ``from_node_id``.
        The Deferred fires (with None) once it has been acted on or dropped.
        """
        now = self.clock.seconds()
        if not self._from_peer(from_node_id, "direct message"):
            return succeed(None)
        if message.node_id != from_node_id:
            return self._drop(from_node_id, message, "it names node {claimed}", claimed=message.node_id)
        if message.timestamp < now - MAX_AGE:
            return self._drop(from_node_id, message, "it is stale ({age:.0f} s old)",
                              age=now - message.timestamp)
        if message.timestamp > now + MAX_AHEAD:
            return self._drop(from_node_id, message, "it is dated {ahead:.0f} s ahead",
                              ahead=message.timestamp - now)
        seen = digest(message)
        if not self.replay.first_time(seen, now):
            return self._drop(from_node_id, message, "it is a replay")

        def verify(key: bytes) -> None:
            if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_LEN:
                self.replay.forget(seen)
                self._drop(from_node_id, message, "the registry has no key for it")
            elif message.public_key and message.public_key != key:
                self.replay.forget(seen)
                self._drop(from_node_id, message, "it carries a key the registry does not hold")
            elif not message.verifies(self.node_id, key):
                self.replay.forget(seen)
                self._drop(from_node_id, message, "its signature does not verify")
            else:
                entry = self.store.trusted.get(from_node_id)
                if entry is not None and entry.public_key and entry.public_key != key:
                    self._pin_mismatch(from_node_id, f"a {message.type}")
                    return
                self._dispatch(from_node_id, message, key)

        def lookup_failed(failure: Failure) -> None:
            self.replay.forget(seen)
            self._drop(from_node_id, message, "its key lookup failed: {why}", why=failure.getErrorMessage())

        d: Deferred[None] = maybeDeferred(self.lookup_key, from_node_id).addCallbacks(verify, lookup_failed)
        return d

    # --- internals ---

    def _check_peer(self, node_id: int) -> None:
        if not _valid_node_id(node_id):
            raise InvalidArgument(f"not a node id: {node_id!r}"[:100])
        if node_id == self.node_id:
            raise InvalidArgument("a node does not handshake with itself")

    def _from_peer(self, node_id: object, what: str) -> bool:
        if _valid_node_id(node_id) and node_id != self.node_id:
            return True
        self.log.warn("trust: dropped a {what} with node id {peer!r}", what=what, peer=str(node_id)[:40])
        return False

    def _drop(self, peer: int, message: HandshakeMessage, because: str, **fields: Any) -> "Deferred[None]":
        self.log.warn("trust: dropped a direct {kind} from node {peer}: " + because,
                      kind=message.type, peer=peer, **fields)
        return succeed(None)

    def _pin_mismatch(self, peer: int, what: str) -> None:
        self.log.warn("trust: {what} from node {peer} used a key other than the pinned one; not trusted",
                      what=what, peer=peer)

    def _input(self, node_id: int, feed: Callable[[PeerTrust], None]) -> None:
        before = self.status(node_id)
        feed(peer_machine(node_id, self._effects, before))
        after = self.status(node_id)
        if after != before:
            self.log.info("trust: node {peer} {old} -> {new}", peer=node_id, old=before, new=after)

    def _dispatch(self, peer: int, message: HandshakeMessage, key: bytes) -> None:
        if message.type == REQUEST:
            self._request(peer, message.justification, key)
        elif message.type == ACCEPT:
            self._input(peer, lambda m: m.accept_received(key))
        elif message.type == REJECT:
            self._input(peer, lambda m: m.reject_received())
        else:
            assert message.type == REVOKE
            self._input(peer, lambda m: m.revoke_received(True))

    def _request(self, peer: int, justification: str, key: bytes) -> None:
        if self.status(peer) == UNKNOWN and len(self.store.pending) >= MAX_PENDING:
            self.log.warn("trust: dropped a request from node {peer}: {count} requests are pending",
                          peer=peer, count=len(self.store.pending))
            return
        self._input(peer, lambda m: m.request_received(justification[:MAX_TEXT], key))
        if self.status(peer) == PENDING:
            self._consider(peer)

    @inlineCallbacks
    def _consider(self, peer: int) -> Generator[Deferred[Any], Any, None]:
        """Approve a pending request if an auto-approve rule matches."""
        if not self.rules or peer in self._considering:
            return
        self._considering.add(peer)
        try:
            rule = None
            if self.rules.public_keys:
                key = self.store.pending[peer].public_key
                if not key:
                    key = yield maybeDeferred(self.lookup_key, peer)
                rule = self.rules.by_key(key)
            if rule is None and self.rules.needs_info and self.peer_info is not None:
                info = yield maybeDeferred(self.peer_info, peer)
                rule = self.rules.by_info(info)
            if rule is not None and self.status(peer) == PENDING:
                self.log.info("trust: approving node {peer} by the auto-approve rule {rule}",
                              peer=peer, rule=rule)
                self._input(peer, lambda m: m.approved())
        except Exception:
            self.log.failure("trust: could not check auto-approve rules for node {peer}", peer=peer)
        finally:
            self._considering.discard(peer)
