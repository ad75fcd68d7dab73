# -*- test-case-name: tests.machines.test_trust -*-
"""
Trust between this node and each other node: handshake requests, approvals,
revocations and key pins (facts §5; ``docs/trust.md``).

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
(:data:`_peer_machine`, an Automat ``TypeMachineBuilder`` table) in the state
the store gives, and the behaviours change the store, save it, and only then
call collaborators, so a collaborator that answers at once (re-entering this
object) sees the new state, and the store and the table cannot disagree.

Rules (where they differ from the reference, facts §9 item numbers):

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
"""

from __future__ import annotations

import collections
import fnmatch
import hashlib
import json
from typing import Any, Callable, Generator, Mapping, Protocol

import attr
from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.errors import InvalidArgument, NotFound
from pilot.identity import PUBLIC_KEY_LEN, b64decode
from pilot.trust import OutgoingRequest, PendingRequest, TrustedPeer, TrustStore
from pilot.wire.handshake import (
    ACCEPT, MAX_NODE_ID, REJECT, REQUEST, REVOKE, REVOKE_REASON, HandshakeMessage, make_message,
)

#: A direct message older than this (seconds) is dropped.
MAX_AGE = 300.0
#: A direct message dated further ahead than this is dropped.
MAX_AHEAD = 30.0
#: How long a seen message is remembered; longer than the window it is accepted in.
REPLAY_MEMORY = 600.0
REPLAY_ENTRIES = 4096
#: Longest justification or reason kept or sent (the registry's limit).
MAX_TEXT = 1024
#: Requests kept waiting for an operator; more are dropped until some are answered.
MAX_PENDING = 1000

UNKNOWN = "unknown"
REQUESTED = "requested"
PENDING = "pending"
TRUSTED = "trusted"


# --- configuration ---------------------------------------------------------------------------

def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{what} must be a list of strings")
    return tuple(value)


def _tag(text: str) -> str:
    return (text[1:] if text.startswith("#") else text).lower()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AutoApprove:
    """
    Which incoming requests are approved without the operator.

    ``hostnames`` are glob patterns (``fnmatch``: ``*``, ``?``, ``[...]``)
    matched against the hostname the registry reports for the peer;
    ``public_keys`` are raw 32-byte keys (standard base64 in the config);
    ``tags`` are matched exactly (a leading ``#`` ignored) against the peer's
    tags.  Hostnames and tags are whatever the registry says and tags are
    chosen by each node itself, so only key rules identify a peer; see
    ``docs/trust.md``.
    """

    hostnames: tuple[str, ...] = ()
    public_keys: tuple[bytes, ...] = ()
    tags: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, value: Mapping[str, Any] | None) -> "AutoApprove":
        """From ``{"hostnames": [...], "public_keys": [base64...], "tags": [...]}``."""
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise InvalidArgument("auto_approve must be an object")
        unknown = set(value) - {"hostnames", "public_keys", "tags"}
        if unknown:
            raise InvalidArgument(f"unknown auto_approve keys: {', '.join(sorted(unknown))}")
        try:
            keys = tuple(b64decode(k, PUBLIC_KEY_LEN, "an auto_approve public key")
                         for k in _strings(value.get("public_keys"), "public_keys"))
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        return cls(tuple(h.lower() for h in _strings(value.get("hostnames"), "hostnames")), keys,
                   tuple(_tag(t) for t in _strings(value.get("tags"), "tags")))

    def __bool__(self) -> bool:
        return bool(self.hostnames or self.public_keys or self.tags)

    @property
    def needs_info(self) -> bool:
        return bool(self.hostnames or self.tags)

    def by_key(self, public_key: bytes) -> str | None:
        """The matching rule for this key, described, or None."""
        if public_key and public_key in self.public_keys:
            return "public key"
        return None

    def by_info(self, info: Any) -> str | None:
        """The matching rule for a registry ``lookup`` answer (``hostname``, ``tags``), or None."""
        if not isinstance(info, Mapping):
            return None
        hostname = info.get("hostname")
        if isinstance(hostname, str) and hostname:
            for pattern in self.hostnames:
                if fnmatch.fnmatchcase(hostname.lower(), pattern):
                    return f"hostname {pattern}"
        tags = info.get("tags")
        if isinstance(tags, list):
            have = {_tag(t) for t in tags if isinstance(t, str)}
            for tag in self.tags:
                if tag in have:
                    return f"tag {tag}"
        return None


# --- replay filter ---------------------------------------------------------------------------

class ReplayFilter:
    """
    Digests of recently accepted messages, each kept ``memory`` seconds; at
    most ``entries`` (the oldest go first when full).
    """

    def __init__(self, memory: float = REPLAY_MEMORY, entries: int = REPLAY_ENTRIES) -> None:
        self.memory = memory
        self.entries = entries
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def first_time(self, digest: bytes, now: float) -> bool:
        """True (and remembered) if ``digest`` is new; False for a repeat."""
        while self._seen:
            oldest, expires = next(iter(self._seen.items()))
            if expires > now:
                break
            del self._seen[oldest]
        if digest in self._seen:
            return False
        while len(self._seen) >= self.entries:
            self._seen.popitem(last=False)
        self._seen[digest] = now + self.memory
        return True

    def forget(self, digest: bytes) -> None:
        self._seen.pop(digest, None)


def digest(message: HandshakeMessage) -> bytes:
    """SHA-256 of the message's canonical JSON (what the replay filter remembers)."""
    text = json.dumps(message.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).digest()


# --- the per-peer table ----------------------------------------------------------------------

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
class _Peer:
    peer: int
    trust: "TrustMachine"


_builder = TypeMachineBuilder(PeerTrust, _Peer)
unknown = _builder.state(UNKNOWN)
requested = _builder.state(REQUESTED)
pending = _builder.state(PENDING)
trusted = _builder.state(TRUSTED)


# unknown

@unknown.upon(PeerTrust.handshake_requested).to(requested)
def _ask(m: PeerTrust, c: _Peer, justification: str) -> None:
    c.trust._record_outgoing(c.peer, justification)
    c.trust._send_request(c.peer, justification)


@unknown.upon(PeerTrust.approved).loop()
def _nothing_to_approve(m: PeerTrust, c: _Peer) -> None:
    raise NotFound(f"no pending request from node {c.peer}")


@unknown.upon(PeerTrust.rejected).loop()
def _nothing_to_reject(m: PeerTrust, c: _Peer, reason: str) -> None:
    raise NotFound(f"no pending request from node {c.peer}")


@unknown.upon(PeerTrust.untrusted).loop()
def _nothing_to_untrust(m: PeerTrust, c: _Peer) -> None:
    raise NotFound(f"node {c.peer} is not trusted")


@unknown.upon(PeerTrust.request_received).to(pending)
def _keep_pending(m: PeerTrust, c: _Peer, justification: str, public_key: bytes) -> None:
    c.trust._record_pending(c.peer, justification, public_key)


@unknown.upon(PeerTrust.accept_received).loop()
def _unasked_accept(m: PeerTrust, c: _Peer, public_key: bytes) -> None:
    c.trust._ignored(c.peer, "an accept, but we sent no request")


@unknown.upon(PeerTrust.reject_received).loop()
def _unasked_reject(m: PeerTrust, c: _Peer) -> None:
    c.trust._ignored(c.peer, "a reject, but we sent no request")


@unknown.upon(PeerTrust.revoke_received).loop()
def _nothing_to_revoke(m: PeerTrust, c: _Peer, report: bool) -> None:
    # Usual: a revoke comes both directly and as the registry's event.
    c.trust.log.debug("trust: node {peer} revoked trust we did not have", peer=c.peer)


# requested

@requested.upon(PeerTrust.handshake_requested).loop()
def _ask_again(m: PeerTrust, c: _Peer, justification: str) -> None:
    c.trust._record_outgoing(c.peer, justification)
    c.trust._send_request(c.peer, justification)


@requested.upon(PeerTrust.approved).loop()
def _approve_own_request(m: PeerTrust, c: _Peer) -> None:
    raise NotFound(f"no pending request from node {c.peer} (we are waiting for its answer)")


@requested.upon(PeerTrust.rejected).loop()
def _reject_own_request(m: PeerTrust, c: _Peer, reason: str) -> None:
    raise NotFound(f"no pending request from node {c.peer} (we are waiting for its answer)")


@requested.upon(PeerTrust.untrusted).to(unknown)
def _withdraw(m: PeerTrust, c: _Peer) -> None:
    c.trust._forget(c.peer)


@requested.upon(PeerTrust.request_received).to(trusted)
def _crossed(m: PeerTrust, c: _Peer, justification: str, public_key: bytes) -> None:
    c.trust._trust(c.peer, public_key)
    c.trust._grant(c.peer)


@requested.upon(PeerTrust.accept_received).to(trusted)
def _accepted(m: PeerTrust, c: _Peer, public_key: bytes) -> None:
    c.trust._trust(c.peer, public_key)
    c.trust._report_trust(c.peer)


@requested.upon(PeerTrust.reject_received).to(unknown)
def _refused(m: PeerTrust, c: _Peer) -> None:
    c.trust._forget(c.peer)


@requested.upon(PeerTrust.revoke_received).to(unknown)
def _refused_by_revoke(m: PeerTrust, c: _Peer, report: bool) -> None:
    c.trust._forget(c.peer)


# pending

@pending.upon(PeerTrust.handshake_requested).to(trusted)
def _ask_who_asked(m: PeerTrust, c: _Peer, justification: str) -> None:
    c.trust._trust(c.peer, c.trust.store.pending[c.peer].public_key)
    c.trust._grant(c.peer)


@pending.upon(PeerTrust.approved).to(trusted)
def _approve(m: PeerTrust, c: _Peer) -> None:
    c.trust._trust(c.peer, c.trust.store.pending[c.peer].public_key)
    c.trust._grant(c.peer)


@pending.upon(PeerTrust.rejected).to(unknown)
def _reject(m: PeerTrust, c: _Peer, reason: str) -> None:
    c.trust._forget(c.peer)
    c.trust._refuse(c.peer, reason)


@pending.upon(PeerTrust.untrusted).loop()
def _untrust_pending(m: PeerTrust, c: _Peer) -> None:
    raise NotFound(f"node {c.peer} is not trusted (its request is pending: reject it)")


@pending.upon(PeerTrust.request_received).loop()
def _asked_again(m: PeerTrust, c: _Peer, justification: str, public_key: bytes) -> None:
    c.trust._record_pending(c.peer, justification, public_key)


@pending.upon(PeerTrust.accept_received).loop()
def _pending_accept(m: PeerTrust, c: _Peer, public_key: bytes) -> None:
    c.trust._ignored(c.peer, "an accept, but we sent no request")


@pending.upon(PeerTrust.reject_received).loop()
def _pending_reject(m: PeerTrust, c: _Peer) -> None:
    c.trust._ignored(c.peer, "a reject, but we sent no request")


@pending.upon(PeerTrust.revoke_received).to(unknown)
def _request_withdrawn(m: PeerTrust, c: _Peer, report: bool) -> None:
    c.trust._forget(c.peer)


# trusted

@trusted.upon(PeerTrust.handshake_requested).loop()
def _ask_trusted(m: PeerTrust, c: _Peer, justification: str) -> None:
    # Already trusted: ask again anyway, so a peer that lost its side can answer.
    c.trust._send_request(c.peer, justification)


trusted.upon(PeerTrust.approved).loop().returns(None)  # approving twice changes nothing


@trusted.upon(PeerTrust.rejected).loop()
def _reject_trusted(m: PeerTrust, c: _Peer, reason: str) -> None:
    raise NotFound(f"no pending request from node {c.peer} (it is trusted: untrust it)")


@trusted.upon(PeerTrust.untrusted).to(unknown)
def _untrust(m: PeerTrust, c: _Peer) -> None:
    c.trust._forget(c.peer)
    c.trust._revoke(c.peer, tell_peer=True, tell_registry=True)


@trusted.upon(PeerTrust.request_received).loop()
def _reassure(m: PeerTrust, c: _Peer, justification: str, public_key: bytes) -> None:
    c.trust._confirm(c.peer, public_key, mutual=False)
    c.trust._answer_accept(c.peer)


@trusted.upon(PeerTrust.accept_received).loop()
def _accepted_again(m: PeerTrust, c: _Peer, public_key: bytes) -> None:
    c.trust._confirm(c.peer, public_key, mutual=True)


@trusted.upon(PeerTrust.reject_received).loop()
def _trusted_reject(m: PeerTrust, c: _Peer) -> None:
    c.trust._ignored(c.peer, "a reject, but the peer is trusted (a revoke ends trust)")


@trusted.upon(PeerTrust.revoke_received).to(unknown)
def _revoked(m: PeerTrust, c: _Peer, report: bool) -> None:
    c.trust._forget(c.peer)
    c.trust._revoke(c.peer, tell_peer=False, tell_registry=report)


_peer_machine = _builder.build()
_STATES = {UNKNOWN: unknown, REQUESTED: requested, PENDING: pending, TRUSTED: trusted}


# --- the node's trust ------------------------------------------------------------------------

def _valid_node_id(node_id: object) -> bool:
    return isinstance(node_id, int) and not isinstance(node_id, bool) and 0 < node_id <= MAX_NODE_ID


@attr.s(auto_attribs=True, eq=False)
class TrustMachine:
    """
    This node's trust logic.  Pure: every effect goes through a collaborator.

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
    log: Logger = attr.Factory(lambda: Logger(namespace=__name__))
    rules: AutoApprove = attr.Factory(AutoApprove)
    peer_info: Callable[[int], "Deferred[dict[str, Any]]"] | None = None
    trust_ended: Callable[[int], None] | None = None
    replay: ReplayFilter = attr.Factory(ReplayFilter)
    _considering: set[int] = attr.ib(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
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
            self._changed()
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
            self._message(REQUEST, node_id, justification=justification).encode()
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
        feed(_peer_machine(_Peer(node_id, self), _STATES[before]))
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

    def _changed(self) -> None:
        try:
            self.save()
        except Exception:
            self.log.failure("trust: could not save the trust store")

    def _now(self) -> float:
        return self.clock.seconds()

    # store changes (each saves)

    def _record_outgoing(self, peer: int, justification: str) -> None:
        self.store.outgoing[peer] = OutgoingRequest(peer, justification, self._now())
        self._changed()

    def _record_pending(self, peer: int, justification: str, key: bytes) -> None:
        old = self.store.pending.get(peer)
        if old is None:
            new = PendingRequest(peer, key, justification, self._now())
        else:
            new = attr.evolve(old, public_key=key or old.public_key,
                              justification=justification or old.justification)
            if new == old:
                return
        self.store.pending[peer] = new
        self._changed()
        if old is None:
            self.log.info("trust: node {peer} asks for trust: {justification}",
                          peer=peer, justification=justification)

    def _trust(self, peer: int, key: bytes) -> None:
        """Trust ``peer`` (mutual: it asked us or accepted our request)."""
        self.store.forget(peer)
        self.store.trusted[peer] = TrustedPeer(peer, key, self._now(), mutual=True)
        self._changed()
        if not key:
            self._fill_key(peer)

    def _confirm(self, peer: int, key: bytes, mutual: bool) -> None:
        entry = self.store.trusted[peer]
        new = attr.evolve(entry, public_key=entry.public_key or key, mutual=entry.mutual or mutual)
        if new != entry:
            self.store.trusted[peer] = new
            self._changed()

    def _forget(self, peer: int) -> None:
        self.store.forget(peer)
        self._changed()

    def _fill_key(self, peer: int) -> None:
        def fill(key: bytes) -> None:
            entry = self.store.trusted.get(peer)
            if entry is not None and not entry.public_key and isinstance(key, bytes) \
                    and len(key) == PUBLIC_KEY_LEN:
                self.store.trusted[peer] = attr.evolve(entry, public_key=key)
                self._changed()

        def failed(failure: Failure) -> None:
            self.log.info("trust: no key yet for node {peer} ({why}); the first verified one is pinned",
                          peer=peer, why=failure.getErrorMessage())

        maybeDeferred(self.lookup_key, peer).addCallbacks(fill, failed)

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

    # messages out

    def _message(self, kind: str, peer: int, justification: str = "", reason: str = "") -> HandshakeMessage:
        return make_message(kind, self.node_id, peer, self.public_key, self.sign, int(self._now()),
                            justification=justification, reason=reason)

    def _direct(self, kind: str, peer: int, justification: str = "", reason: str = "") -> "Deferred[None]":
        def failed(failure: Failure) -> None:
            self.log.info("trust: direct {kind} to node {peer} not delivered: {why}",
                          kind=kind, peer=peer, why=failure.getErrorMessage())

        def send() -> Any:
            data = self._message(kind, peer, justification[:MAX_TEXT], reason[:MAX_TEXT]).encode()
            return self.send_direct(peer, data)

        d: Deferred[None] = maybeDeferred(send).addCallbacks(lambda _: None, failed)
        return d

    def _registry(self, msg: dict[str, Any], quiet: bool = False) -> "Deferred[None]":
        def failed(failure: Failure) -> None:
            # "No such trust" is what a revoke_trust wants; the peer's own may have come first.
            expected = quiet or (msg["type"] == "revoke_trust" and failure.check(NotFound) is not None)
            (self.log.debug if expected else self.log.warn)(
                "trust: registry {type} for node {peer} failed: {why}", type=msg["type"],
                peer=msg.get("peer_id", msg.get("to_node_id")), why=failure.getErrorMessage())

        d: Deferred[None] = maybeDeferred(self.registry_request, msg).addCallbacks(lambda _: None, failed)
        return d

    def _send_request(self, peer: int, justification: str) -> None:
        self._direct(REQUEST, peer, justification=justification)
        self._registry({"type": "request_handshake", "from_node_id": self.node_id, "to_node_id": peer,
                        "justification": justification})

    def _report_trust(self, peer: int) -> "Deferred[None]":
        return self._registry({"type": "report_trust", "node_id": self.node_id, "peer_id": peer})

    def _respond(self, peer: int, accept: bool) -> "Deferred[None]":
        return self._registry({"type": "respond_handshake", "node_id": self.node_id, "peer_id": peer,
                               "accept": accept})

    def _grant(self, peer: int) -> None:
        """report_trust, then one respond_handshake accept, then a direct accept."""
        d = self._report_trust(peer)
        d.addCallback(lambda _: self._respond(peer, True))
        d.addCallback(lambda _: self._direct(ACCEPT, peer))

    def _answer_accept(self, peer: int) -> None:
        """A trusted peer asked again: respond_handshake accept, then a direct accept."""
        self._respond(peer, True).addCallback(lambda _: self._direct(ACCEPT, peer))

    def _refuse(self, peer: int, reason: str) -> None:
        self._respond(peer, False)
        self._direct(REJECT, peer, reason=reason)

    def _revoke(self, peer: int, tell_peer: bool, tell_registry: bool) -> None:
        if tell_peer:
            self._direct(REVOKE, peer, reason=REVOKE_REASON)
        if tell_registry:
            # After a peer's revoke the registry has usually heard it from the peer
            # already (ours drops both directions at once), so a refusal is expected.
            self._registry({"type": "revoke_trust", "node_id": self.node_id, "peer_id": peer},
                           quiet=not tell_peer)
        if self.trust_ended is not None:
            try:
                self.trust_ended(peer)
            except Exception:
                self.log.failure("trust: trust_ended({peer}) failed", peer=peer)

    def _ignored(self, peer: int, what: str) -> None:
        self.log.warn("trust: ignored {what} from node {peer}", what=what, peer=peer)
