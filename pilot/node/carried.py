# -*- test-case-name: tests.node.test_carried -*-
"""
Trust carried by the key (``docs/trust.md``, "Trust carried by the key").

Every peer this node trusts is also a *trust statement* the node signs
(:mod:`pilot.wire.statement`) and deposits at the rendezvous; ending trust
deposits a newer, signed revoke.  A node started with its identity but
without ``trust.json`` fetches its statements once registered, keeps only
those that are its own (its node id, its key, its signature), takes the
newest per peer, and trusts again every peer whose newest statement is a
grant, with the key it had pinned.  When ``trust.json`` exists it is the
truth: the statements are brought in line with it, never the other way.

:class:`CarriedTrust` has no clock of its own and no socket: it is told when
the node registered (:meth:`registered`) and when the trust store was saved
(:meth:`trust_changed`), and talks to the registry through ``request``.
Against a registry that does not know these requests (the reference's) it
logs once that trust cannot be kept there, and the node goes on.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.errors import MalformedFrame, RegistryUnavailable
from pilot.identity import Identity
from pilot.trust import TrustedPeer, TrustStore
from pilot.wire.statement import MAX_PER_REQUEST, TrustStatement, decode, make_statement, newest

#: ``msg -> Deferred[reply]``: one request to the registry, signed by this node (field ``node_id``).
Request = Callable[[dict[str, Any]], "Deferred[Any]"]


class CarriedTrust:
    """
    Keeps this node's signed trust statements at the registry in line with
    its trust store, and restores the store from them when it was missing.

    :param restore: the trust file did not exist at start: fill the store
        from the statements the registry returns (once).
    :param save: writes the trust store.
    :param node_id: this node's id as the registry knows it (read at each use).
    """

    log = Logger()

    def __init__(self, *, identity: Identity, store: TrustStore, save: Callable[[], None], request: Request,
                 clock: IReactorTime, node_id: Callable[[], int], restore: bool) -> None:
        self.identity = identity
        self.store = store
        self.save = save
        self.request = request
        self.clock = clock
        self.node_id = node_id
        self.restore = restore
        #: The newest statement the registry holds from us per peer; None until fetched.
        self.deposited: Optional[dict[int, TrustStatement]] = None
        self.restored: list[int] = []
        self._fetching = False
        self._unsupported = False
        self._last_seq = 0

    # --- inputs ---------------------------------------------------------------------------

    def registered(self) -> None:
        """The node (re-)registered: fetch our statements the first time, then keep them in line."""
        if self._unsupported or self._fetching:
            return
        if self.deposited is None:
            self._fetch()
        else:
            self.sync()

    def server_changed(self) -> None:
        """
        The node moved to another rendezvous of its list (``docs/registration.md``):
        what that one holds is unknown, so the next registration fetches again
        and deposits what it lacks.
        """
        self.deposited = None
        self._unsupported = False

    def trust_changed(self) -> None:
        """The trust store was saved: deposit what changed (once we know what the registry holds)."""
        if self.deposited is not None and not self._fetching:
            self.sync()

    # --- fetching and restoring -----------------------------------------------------------

    def _fetch(self) -> None:
        self._fetching = True
        d = maybeDeferred(self.request, {"type": "get_trust_statements", "node_id": self.node_id()})
        d.addCallbacks(self._fetched, self._fetch_failed)
        d.addErrback(self._bug)

    def _fetched(self, reply: Any) -> None:
        self._fetching = False
        texts = reply.get("statements") if isinstance(reply, dict) else None
        if not isinstance(texts, list):
            self.log.warn("trust: the registry's get_trust_statements answer has no list of statements")
            texts = []
        mine = self.own_statements(texts)
        self.deposited = mine
        self._last_seq = max([self._last_seq, *(s.seq for s in mine.values())])
        if self.restore:
            self.restore = False
            self._restore(mine)
        self.sync()

    def own_statements(self, texts: list[Any]) -> dict[int, TrustStatement]:
        """The newest statement per peer among ``texts`` that is ours and verifies; others are logged."""
        me, key = self.node_id(), self.identity.public_key
        good: list[TrustStatement] = []
        for text in texts:
            try:
                statement = decode(text)
            except MalformedFrame as e:
                self.log.warn("trust: dropped a malformed statement from the registry: {why}", why=e.reason)
                continue
            if not statement.is_by(me, key):
                self.log.warn("trust: dropped a statement from the registry that is not ours "
                              "(node {granter}, about node {peer})", granter=statement.granter,
                              peer=statement.peer)
                continue
            good.append(statement)
        return {pair[1]: s for pair, s in newest(good).items()}

    def _restore(self, mine: dict[int, TrustStatement]) -> None:
        restored = []
        for peer, statement in sorted(mine.items()):
            if statement.revoked or peer in self.store.trusted:
                continue
            self.store.forget(peer)
            self.store.trusted[peer] = TrustedPeer(peer, statement.peer_key, float(statement.granted_at),
                                                   mutual=True)
            restored.append(peer)
        self.restored = restored
        if not restored:
            self.log.info("trust: no trust file and no trust statements of ours at the registry; "
                          "starting empty")
            return
        try:
            self.save()
        except Exception:
            self.log.failure("trust: could not save the restored trust store")
        self.log.info("trust: restored trust in {count} node(s) {peers} from our signed statements at the "
                      "registry (no trust file was found)", count=len(restored), peers=restored)
        for peer in restored:
            # the registry may have lost the pair; a duplicate changes nothing there
            self._send({"type": "report_trust", "node_id": self.node_id(), "peer_id": peer}, "report_trust")

    def _fetch_failed(self, failure: Failure) -> None:
        self._fetching = False
        if failure.check(RegistryUnavailable):
            self.log.info("trust: our trust statements wait for the registry ({why})",
                          why=failure.getErrorMessage())
            return  # the connection went: asked again at the next registration
        self._unsupported = True
        what = "trust could not be restored" if self.restore else "trust statements are not kept"
        self.log.warn("trust: the registry did not give our trust statements ({why}); {what} from the "
                      "registry this run", why=failure.getErrorMessage(), what=what)
        self.restore = False

    # --- depositing ---------------------------------------------------------------------------

    def _seq(self) -> int:
        self._last_seq = max(int(self.clock.seconds() * 1000), self._last_seq + 1)
        return self._last_seq

    def wanted(self) -> list[TrustStatement]:
        """The statements that would bring the registry in line with the trust store."""
        deposited = self.deposited or {}
        me, key, sign = self.node_id(), self.identity.public_key, self.identity.sign
        out = []
        for peer, entry in sorted(self.store.trusted.items()):
            held = deposited.get(peer)
            if held is None or held.revoked or held.peer_key != entry.public_key:
                out.append(make_statement(me, key, peer, entry.public_key, int(entry.approved_at),
                                          self._seq(), False, sign))
        for peer, held in sorted(deposited.items()):
            if not held.revoked and peer not in self.store.trusted:
                out.append(make_statement(me, key, peer, held.peer_key, held.granted_at, self._seq(), True,
                                          sign))
        return out

    def sync(self) -> None:
        """Deposit the grants and revokes the registry lacks."""
        if self.deposited is None:
            return
        try:
            statements = self.wanted()
        except ValueError as e:
            self.log.warn("trust: cannot state our trust: {why}", why=e)
            return
        for s in statements:
            self.deposited[s.peer] = s
        for i in range(0, len(statements), MAX_PER_REQUEST):
            batch = statements[i:i + MAX_PER_REQUEST]
            self._send({"type": "put_trust_statements", "node_id": self.node_id(),
                        "statements": [s.encode() for s in batch]}, "put_trust_statements")

    def _send(self, msg: dict[str, Any], what: str) -> None:
        def failed(failure: Failure) -> None:
            self.log.warn("trust: registry {what} failed: {why}", what=what, why=failure.getErrorMessage())
            if what == "put_trust_statements":
                self.deposited = None  # we no longer know what it holds: fetch again at the next registration

        maybeDeferred(self.request, msg).addErrback(failed).addErrback(self._bug)

    def _bug(self, failure: Failure) -> None:
        self.log.failure("trust: carrying trust failed", failure)
