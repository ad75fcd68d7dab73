# -*- test-case-name: tests.server.test_replication_role -*-
"""
A paired registry's role and term: primary or standby, promotion, stepping
down; and the requests that belong to replication (subscribe, promote,
acknowledge).  Sans I/O: what needs a socket or a timer is asked of the
service through :class:`Links` (``pilot.services.replication``).

Rules (``docs/deploy.md`` tells them to operators):

* A server with a pair (a replication token, or ``--standby``) has a term >= 1,
  kept in its store (``pilot_term``), stamped on every reply and event.
* A standby answers the read-only requests of ``docs/reference-wire.md`` 2.11
  and refuses the rest with ``not_primary`` naming the primary.
* A standby becomes primary with the next term when its primary has been
  silent for ``--takeover-after`` seconds (the service decides when), or when
  asked (``replication_promote`` with the token).
* A primary that sees a higher term steps down: a subscription from a primary
  of a higher term (the promoted standby probing its former primary), or a
  reply of a higher term from the server it probes.  Of two primaries of one
  term (a former standby restarted without ``--standby``), the one probed
  steps down: the prober is the one that took over.  It then follows that
  server and takes its whole store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from automat import TypeMachineBuilder
from twisted.logger import Logger

from pilot.endpoint import format_endpoint
from pilot.errors import ErrorCode
from pilot.machines.table import TransitionTable
from pilot.server.replication import Publisher, Subscriber, tokens_match
from pilot.server.requests import Message, Peer, RequestError
from pilot.server.state import RegistryState
from pilot.wire import replication as wire

if TYPE_CHECKING:
    from pilot.server.requests import Session

#: What a standby answers (docs/reference-wire.md 2.11), and ours that change nothing.
READ_ONLY = frozenset({
    "lookup", "resolve", "list_networks", "list_nodes", "heartbeat", "poll_handshakes", "resolve_hostname",
    "beacon_list", "search_nodes", "get_trust_statements", "get_polo_score", wire.PROMOTE,
})


class Links(Protocol):
    """What the role asks of its service."""

    def settle(self) -> None:
        """Load into the state whatever the standby holds but has not loaded yet."""

    def follow(self, primary: str) -> None:
        """Subscribe to ``primary`` (HOST:PORT) as a standby, dropping any other subscription."""

    def lead(self) -> None:
        """This server is primary now: serve writes, keep probing the former primary."""

    def persist(self) -> None:
        """The term changed: write the store soon."""

    def revive(self) -> None:
        """A new primary: give every node a full period to check in before it is reaped."""

    def drop_clients(self) -> None:
        """This server stepped down: close its clients' connections (soon), so that they move."""


class Role(Protocol):
    def promoted(self, reason: str) -> None:
        "This standby takes over (its primary is silent, or an operator asked)."

    def outranked(self, term: int, primary: str) -> None:
        "A server of a higher term (``primary``, HOST:PORT, if known) is primary."


class Replica:
    """The registry's view of replication (``Registry.replica``); its role is a machine."""

    log = Logger()

    def __init__(self, state: RegistryState, publisher: Publisher, token: bytes | None,
                 standby_of: str | None, links: Links) -> None:
        self.state = state
        self.publisher = publisher
        self.token = token
        self.links = links
        #: where the primary is, as far as this server knows ("" if unknown or itself)
        self.primary = standby_of or ""
        self.standby = standby_of is not None
        #: promotions of this server to primary, and its steps down to standby (for /metrics)
        self.takeovers = 0
        self.step_downs = 0
        if not state.term:
            state.term = 1
        publisher.term = state.term
        self.role: Role = _factory(self, standby if self.standby else primary)

    @property
    def term(self) -> int:
        return self.state.term

    def _set_term(self, term: int) -> None:
        if term != self.state.term:
            self.state.term = term
            self.publisher.term = term
            self.links.persist()

    # --- the registry's check ------------------------------------------------------------

    def refusal(self, kind: object) -> Message | None:
        """The reply to a request this server must not answer (it is a standby), or None."""
        if not self.standby or kind in READ_ONLY:
            return None
        where = f"; the primary is {self.primary}" if self.primary else ""
        reply: Message = {"type": "error", "error": f"this rendezvous is a standby{where}",
                          "code": ErrorCode.not_primary.name}
        if self.primary:
            reply["primary"] = self.primary
        return reply

    def stamp(self, message: Message) -> Message:
        message["term"] = self.state.term
        return message

    # --- requests ---------------------------------------------------------------------------

    def _check_token(self, given: str) -> None:
        if self.token is None:
            raise RequestError(ErrorCode.invalid_argument, "replication not configured")
        if not tokens_match(self.token, given):
            raise RequestError(ErrorCode.unauthorized, "invalid replication token")

    def subscribe(self, msg: Message, peer: Peer, session: Session | None) -> Message:
        sub = wire.decode_subscribe(msg)
        self._check_token(sub.token)
        if session is None:
            raise RequestError(ErrorCode.invalid_argument, "replication needs a connection")
        rival = sub.role == "primary" and (sub.term > self.term or sub.term == self.term and not self.standby)
        if sub.term > self.term or rival:
            if rival:
                self.role.outranked(sub.term, format_endpoint(peer.host, sub.port) if sub.port else "")
                refusal = self.refusal(wire.SUBSCRIBE)
                assert refusal is not None
                return refusal
            raise RequestError(ErrorCode.not_primary,
                               f"this primary's term ({self.term}) is older than the standby's ({sub.term})")
        return self.publisher.subscribe(session, sub, format_endpoint(peer.host, peer.port))

    def promote(self, msg: Message, peer: Peer, session: Session | None) -> Message:
        token = msg.get("token")
        self._check_token(token if isinstance(token, str) else "")
        was_standby = self.standby
        if was_standby:
            self.role.promoted(f"promoted by request from {peer.host}")
        return {"type": wire.PROMOTE + "_ok", "promoted": was_standby}

    def ack(self, msg: Message, peer: Peer, session: Session | None) -> Message:
        if session is not None:
            self.publisher.acked(session, wire.decode_ack(msg))
        return {"type": wire.ACK + "_ok"}

    def session_closed(self, session: Subscriber) -> None:
        self.publisher.closed(session)

    # --- what the service reports -------------------------------------------------------------

    def primary_silent(self, primary: str, seconds: float) -> None:
        self.role.promoted(f"primary {primary} silent for {seconds:.0f} s")

    def saw_term(self, term: int, primary: str) -> bool:
        """
        A server we reached (``primary``) is of ``term``; True if this server
        stepped down for it (or, as a standby, now follows it).
        """
        if term > self.term:
            self.role.outranked(term, primary)
            return True
        return False


# --- the role machine ---------------------------------------------------------------------

_builder = TypeMachineBuilder(Role, Replica)
standby = _builder.state("standby")
primary = _builder.state("primary")
table = TransitionTable((standby, primary))


@table.on(standby, Role.promoted, primary)
def _take_over(role: Role, core: Replica, reason: str) -> None:
    core.links.settle()  # every delta it acknowledged, before it answers a write
    core._set_term(core.term + 1)
    core.standby = False
    core.takeovers += 1
    former, core.primary = core.primary, ""
    core.log.critical("PROMOTED TO PRIMARY, term {term}: {reason}; this server now accepts writes "
                      "(the former primary {former} steps down when it sees this term)",
                      term=core.term, reason=reason, former=former or "?")
    core.links.revive()
    core.links.lead()


@table.on(primary, Role.outranked, standby)
def _step_down(role: Role, core: Replica, term: int, where: str) -> None:
    old = core.term
    core._set_term(max(term, core.term))
    core.standby = True
    core.step_downs += 1
    core.primary = where
    core.log.critical("STEPPING DOWN TO STANDBY: {primary} is primary with term {term} (ours was {old}); "
                      "this server takes its store and refuses writes", primary=where or "?", term=term, old=old)
    for session in core.publisher.drop_all():
        _close(session)
    core.links.drop_clients()
    if where:
        core.links.follow(where)


@table.on(standby, Role.outranked, standby)
def _follow_newer(role: Role, core: Replica, term: int, where: str) -> None:
    core._set_term(max(term, core.term))
    if where and where != core.primary:
        core.log.warn("following {primary} (term {term}) instead of {old}", primary=where, term=term,
                      old=core.primary or "?")
        core.primary = where
        core.links.follow(where)


table.ignore((primary,), Role.promoted, why="a primary asked to take over already has")

_factory = _builder.build()


def _close(session: Any) -> None:
    lose = getattr(getattr(session, "transport", None), "loseConnection", None)
    if lose is not None:
        lose()
