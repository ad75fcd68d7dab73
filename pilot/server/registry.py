# -*- test-case-name: tests.server.test_registry -*-
"""
The registry: every request type a reference node sends, answered with the
reference's reply fields (``docs/reference-wire.md`` §2), over our state.

Here: :class:`Registry` (dispatch, rate limits, shared helpers) and the
requests that look up other nodes (``lookup``, ``resolve``,
``resolve_hostname``, ``punch``).  The requests about a node's own record
are in ``records.py``, trust and handshakes in ``handshakes.py``,
searching in ``directory.py``, the reference's other requests in
``compat.py``, the types every handler shares in ``requests.py``.

Pure logic: no sockets, no files; time from the injected ``IReactorTime``.
The TCP protocol feeds :meth:`Registry.handle` one request at a time with its
:class:`Session` and gets the reply; events for subscribed nodes go out through
their sessions.  A change of persistent state calls ``on_change`` (coalesced).

Where the reference is weak this registry differs behind the same wire
(``docs/security.md``): ids from the key, directed trust, proven keys, a
private node resolved (punched, relayed to) only for peers it trusts, real errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import attr
from twisted.internet.interfaces import IReactorTime

from pilot.errors import ErrorCode, MalformedFrame
from pilot.ratelimit import KeyedLimiter
from pilot.server import compat, directory, handshakes, records, statements
from pilot.server.auth import MAX_SKEW, AuthFailed, Authenticator
from pilot.server.compat import BEACON_TTL
from pilot.server.requests import Handler, Message, Peer, RequestError, Session, error_reply
from pilot.server.state import Node, RegistryState
from pilot.server.timing import Durations
from pilot.wire.registry import encode_frame, get_int, get_str

_set_last_seen = Node.__dict__["last_seen"].__set__  # the slot itself: no assignment hook

if TYPE_CHECKING:
    from pilot.server.replication_role import Replica

__all__ = ["Registry", "RegistryConfig", "Peer", "Session", "RequestError", "error_reply", "BEACON_TTL"]


@attr.s(auto_attribs=True, frozen=True)
class RegistryConfig:
    #: A node silent for this long is removed (the reference: 3 minutes).
    stale_after: float = 180.0
    #: Registrations per source IP per minute (the reference: 10); 0 disables.
    registrations_per_minute: float = 10.0
    #: Requests of any kind per source IP per second, and the burst; 0 disables.
    requests_per_second: float = 500.0
    request_burst: float = 2000.0
    max_skew: float = MAX_SKEW
    #: A key whose node left (deregistered or reaped) this long ago is forgotten, with its
    #: trust and replay state; until then the key keeps its node id.  math.inf: never.
    key_retention: float = 7 * 24 * 3600.0


class ReplyFrames:
    """
    The encoded answers to ``lookup`` and ``resolve_hostname``, kept per node
    and per name while what they show is unchanged (a node is looked up far
    more often than it changes): :meth:`Registry.answer` then sends the kept
    frame instead of building and encoding the reply again.

    An entry is used only while it was made from the very :class:`Node` object
    the state holds now and every field the reply shows is the same (a node's
    fields are assigned, never changed in place: ``pilot.server.node``), so a
    change, a removal or a new node under the same id or name is never
    answered from it.  Every request still goes through
    :meth:`Registry.handle` (counters, rate limits, durations); only the
    reply's building and encoding are skipped.  Not used by a paired server
    (its replies carry the current term).  At most :data:`MAX_ENTRIES` of each
    kind, forgotten all at once when full: about 800 bytes a node and 500 a
    name, so at most about 42 MB (``docs/performance.md``).
    """

    MAX_ENTRIES = 1 << 15

    def __init__(self) -> None:
        #: node id -> (node, the fields the reply shows, the reply, its frame)
        self.lookups: dict[int, tuple[Node, tuple[Any, ...], Message, bytes]] = {}
        #: hostname -> (node, its public flag, the reply, its frame)
        self.names: dict[str, tuple[Node, bool, Message, bytes]] = {}
        #: set by a handler that answered from here: (the reply it returned, its frame)
        self.hit: tuple[Message, bytes] | None = None

    def keep_lookup(self, node: Node, shown: tuple[Any, ...], reply: Message) -> None:
        if len(self.lookups) >= self.MAX_ENTRIES:
            self.lookups.clear()
        frame = encode_frame(reply)
        self.lookups[node.id] = (node, shown, reply, frame)
        self.hit = (reply, frame)

    def keep_name(self, name: str, node: Node, reply: Message) -> None:
        if len(self.names) >= self.MAX_ENTRIES:
            self.names.clear()
        frame = encode_frame(reply)
        self.names[name] = (node, node.public, reply, frame)
        self.hit = (reply, frame)


def _host(endpoint: str) -> str:
    return endpoint.rpartition(":")[0]


class Registry:
    def __init__(self, clock: IReactorTime, config: RegistryConfig | None = None,
                 state: RegistryState | None = None,
                 on_change: Callable[[], None] = lambda: None,
                 on_touch: Callable[[], None] = lambda: None) -> None:
        self.clock = clock
        self.config = config or RegistryConfig()
        self.state = state or RegistryState(created=clock.seconds())
        self.on_change = on_change
        #: called when only replay state (``auth_ts``) changed: worth saving, not at once
        self.on_touch = on_touch
        #: the newest accepted ``auth.ts`` per node before this start: older ones are replays
        self.restored_ts = dict(self.state.auth_ts)
        self.auth = Authenticator(self.config.max_skew)
        self.register_limit = KeyedLimiter(self.config.registrations_per_minute / 60.0,
                                           max(self.config.registrations_per_minute, 1.0))
        self.request_limit = KeyedLimiter(self.config.requests_per_second, self.config.request_burst)
        self.search_limit = KeyedLimiter(directory.SEARCH_RATE, directory.SEARCH_BURST)
        self.subscribers: dict[int, set[Session]] = {}
        self.beacons: dict[int, tuple[str, float]] = {}
        #: the endpoint the beacon recorded for a node, as its DiscoverReply shows it, or None
        #: (``pilot.server.beacon.Beacon.endpoint_text``; the rendezvous wires it)
        self.beacon_endpoint: Callable[[int], str | None] = lambda node_id: None
        self.counters: dict[str, int] = {}
        #: set for a server with a pair (``pilot.server.replication_role``): standby refusals, terms
        self.replica: Replica | None = None
        #: time spent answering, by request type (``pilot_request_duration_seconds``)
        self.durations = Durations()
        #: ``lookup`` and ``resolve_hostname`` answers kept encoded (used by :meth:`answer`)
        self.frames = ReplyFrames()
        now = clock.seconds()
        # a restarted registry gives every node a full period to check in again
        self.state.floor_last_seen(now)
        for node_id in sorted(self.state.id_keys.keys() - self.state.nodes.keys()):
            # a key without a node and no record of when it left (a reference store): from now
            self.state.gone.setdefault(node_id, now)

    # --- entry point ------------------------------------------------------------

    def handle(self, msg: Message, peer: Peer, session: Session | None = None) -> Message:
        seconds = self.clock.seconds
        t0 = seconds()
        kind = msg.get("type")
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        try:
            replica = self.replica
            if replica is None:
                return self._handle(handler, kind, msg, peer, session, t0)
            # a paired server: a standby refuses writes, and every reply carries the term
            return replica.stamp(replica.refusal(kind) or self._handle(handler, kind, msg, peer, session, t0))
        finally:
            self.durations.observe(str(kind) if handler else "unknown", seconds() - t0)

    def answer(self, msg: Message, peer: Peer, session: Session | None = None) -> bytes:
        """:meth:`handle`'s reply as a frame: made once for an unchanged node's ``lookup`` or
        ``resolve_hostname`` answer (:class:`ReplyFrames`), encoded here for every other."""
        frames = self.frames
        frames.hit = None
        reply = self.handle(msg, peer, session)
        hit = frames.hit
        if hit is not None and hit[0] is reply:
            frames.hit = None
            return hit[1]
        return encode_frame(reply)

    def _handle(self, handler: Handler | None, kind: object, msg: Message, peer: Peer,
                session: Session | None, now: float) -> Message:
        name = (_REQUEST_COUNTERS.get(kind) or f"request.{kind}") if handler else "request.unknown"
        counters = self.counters
        counters[name] = counters.get(name, 0) + 1
        if not self.request_limit.allow(peer.host, now):
            self.count("error.rate_limited")
            return error_reply(ErrorCode.rate_limited, "too many requests from this address")
        if handler is None:
            return error_reply(ErrorCode.invalid_argument, f"unknown request type {str(kind)[:40]!r}")
        try:
            return handler(self, msg, peer, session)
        except RequestError as e:
            self.count(f"error.{e.code.name}")
            return error_reply(e.code, e.message)
        except MalformedFrame as e:
            self.count("error.malformed")
            return error_reply(ErrorCode.invalid_argument, e.reason)

    def count(self, name: str) -> None:
        self._count_by(name, 1)

    def _count_by(self, name: str, n: int) -> None:
        if n:
            self.counters[name] = self.counters.get(name, 0) + n

    # --- helpers ------------------------------------------------------------------

    def node(self, node_id: int) -> Node | None:
        return self.state.nodes.get(node_id)

    def need(self, node_id: int, what: str = "node") -> Node:
        """The registered node ``node_id``, or :class:`RequestError` ``not_found``."""
        node = self.state.nodes.get(node_id)
        if node is None:
            raise RequestError(ErrorCode.not_found, f"{what} {node_id} is not registered")
        return node

    def authenticate(self, msg: Message, node: Node) -> None:
        """Check ``msg``'s signature by ``node`` (:class:`RequestError` ``unauthorized`` if wrong)."""
        try:
            fresh = self.auth.check(msg, node.public_key, node.id in self.state.proven, self.clock.seconds(),
                                    self.restored_ts.get(node.id, 0))
        except AuthFailed as e:
            raise RequestError(ErrorCode.unauthorized, str(e)) from None
        if fresh:
            self.accepted(node.id, msg)
        if fresh and node.id not in self.state.proven:
            self.state.proven.add(node.id)
            self.on_change()

    def accepted(self, node_id: int, msg: Message) -> None:
        """Remember ``msg``'s (verified) ``auth.ts`` as the node's newest, to be saved."""
        ts: int = msg["auth"]["ts"]
        if ts > self.state.auth_ts.get(node_id, 0):
            self.state.auth_ts[node_id] = ts
            self.on_touch()

    def replay_floor(self, node_id: int) -> int:
        """The newest ``auth.ts`` or beacon proof timestamp (ms) of ``node_id`` accepted before this start."""
        return self.restored_ts.get(node_id, 0)

    def proof_accepted(self, node_id: int, ts_ms: int) -> None:
        """The beacon accepted a proof of ``node_id`` stamped ``ts_ms``: remember it as replay state."""
        if ts_ms > self.state.auth_ts.get(node_id, 0):
            self.state.auth_ts[node_id] = ts_ms
            self.on_touch()

    def signed(self, msg: Message, field: str) -> Node:
        """The node named by ``msg[field]``, which must have signed ``msg``."""
        node = self.need(get_int(msg, field))
        self.authenticate(msg, node)
        return node

    def trusts(self, truster: int, trustee: int) -> bool:
        return (truster, trustee) in self.state.trust

    def may_see(self, requester: int, target: Node) -> bool:
        """May ``requester`` learn ``target``'s real endpoint?"""
        if requester == target.id or target.public or self.trusts(target.id, requester):
            return True
        other = self.state.nodes.get(requester)
        return other is not None and bool(set(target.networks) & set(other.networks) - {0})

    def push_event(self, node_id: int, event: Message) -> None:
        """Send ``event`` on every connection subscribed for ``node_id``."""
        if self.replica is not None:
            event = self.replica.stamp(dict(event))
        for session in list(self.subscribers.get(node_id, ())):
            session.push(event)

    def session_closed(self, session: Session) -> None:
        if self.replica is not None:
            self.replica.session_closed(session)
        for node_id in [n for n, s in self.subscribers.items() if session in s]:
            self.subscribers[node_id].discard(session)
            if not self.subscribers[node_id]:
                del self.subscribers[node_id]

    def touch(self, node: Node) -> None:
        """
        The node was heard from: liveness, not a change the store's journal
        records (the slot is set past the assignment hook).  A start and a
        standby's promotion move every node's ``last_seen`` to their own
        time, so a journaled one is never read back.  Journaled, it put every
        heartbeating node's JSON in the next record again: ~400 kB and ~6.5
        ms of the reactor a second at 100,000 nodes, and a compaction every
        ~40 s (``docs/performance.md``, issue 16).  The reference's
        heartbeat does not mark its store dirty either
        (``docs/reference-wire.md`` §2.9).
        """
        _set_last_seen(node, self.clock.seconds())

    def reap(self) -> list[int]:
        """Remove nodes silent for longer than ``stale_after``; return their ids."""
        cutoff = self.clock.seconds() - self.config.stale_after
        gone = [n.id for n in self.state.nodes.values() if n.last_seen < cutoff]
        for node_id in gone:
            self.remove(node_id)
        now = self.clock.seconds()
        forgotten = [n for n, t in self.state.gone.items()
                     if now - t > self.config.key_retention and n not in self.state.nodes]
        for node_id in forgotten:
            self.state.forget(node_id)
        self._count_by("keys_forgotten", len(forgotten))
        if gone or forgotten:
            self.on_change()
        for bid in [b for b, (_, t) in self.beacons.items() if now - t > BEACON_TTL]:
            del self.beacons[bid]
        return gone

    def remove(self, node_id: int) -> None:
        node = self.state.nodes.pop(node_id, None)
        if node is not None and node_id in self.state.id_keys:
            self.state.gone[node_id] = self.clock.seconds()
        if node is not None and node.hostname and self.state.hostnames.get(node.hostname) == node_id:
            del self.state.hostnames[node.hostname]

    def _lookup_reply(self, node: Node) -> dict[str, Any]:
        out: dict[str, Any] = {  # one dict, in the reply's field order
            "type": "lookup_ok", "node_id": node.id, "address": node.address_text,
            "networks": list(node.networks), "public_key": self.state.key_text(node.public_key),
            "public": node.public, "polo_score": node.polo_score,
        }
        if node.hostname:
            out["hostname"] = node.hostname
        if node.tags:
            out["tags"] = list(node.tags)
        if node.task_exec:
            out["task_exec"] = True
        return out

    # --- handlers: looking up other nodes ----------------------------------------

    def lookup(self, msg: Message, peer: Peer, session: Session | None) -> Message:
        node = self.need(get_int(msg, "node_id"))
        # every field the reply shows (the address and key text follow from the id and the key)
        shown = (node.public_key, node.public, node.real_addr, node.hostname, node.tags, node.networks,
                 node.polo_score, node.task_exec)
        kept = self.frames.lookups.get(node.id)
        if kept is not None and kept[0] is node and kept[1] == shown and self.replica is None:
            self.frames.hit = (kept[2], kept[3])
            return kept[2]
        reply = self._lookup_reply(node)
        if node.public:
            reply["real_addr"] = node.real_addr
        if self.replica is None:
            self.frames.keep_lookup(node, shown, reply)
        return reply

    def resolve(self, msg: Message, peer: Peer, session: Session | None) -> Message:
        requester = self.signed(msg, "requester_id")
        target = self.need(get_int(msg, "node_id"))
        self.touch(requester)
        if not self.may_see(requester.id, target):
            raise RequestError(ErrorCode.not_trusted,
                               f"node {target.id} is private and does not trust node {requester.id}")
        reply = {"type": "resolve_ok", "node_id": target.id, "real_addr": target.real_addr}
        if target.local_addr and _host(requester.real_addr) == _host(target.real_addr):
            # behind the same NAT (one public address): the LAN path needs no hairpin
            reply["local_addr"] = target.local_addr
        return reply

    def resolve_hostname(self, msg: Message, peer: Peer, session: Session | None) -> Message:
        name = get_str(msg, "hostname", max_len=256)
        node_id = self.state.hostnames.get(name)
        if node_id is None:
            raise RequestError(ErrorCode.not_found, f"no node has the hostname {name[:63]!r}")
        node = self.state.nodes[node_id]
        kept = self.frames.names.get(name)
        if (kept is not None and kept[0] is node and kept[1] is node.public and node.hostname == name
                and self.replica is None):
            self.frames.hit = (kept[2], kept[3])
            return kept[2]
        reply = {"type": "resolve_hostname_ok", "node_id": node.id, "address": node.address_text,
                 "public": node.public, "hostname": node.hostname}
        if self.replica is None and node.hostname == name:
            self.frames.keep_name(name, node, reply)
        return reply

    def punch(self, msg: Message, peer: Peer, session: Session | None) -> Message:
        requester = self.signed(msg, "requester_id")
        a = self.need(get_int(msg, "node_a"))
        b = self.need(get_int(msg, "node_b"))
        if requester.id not in (a.id, b.id):
            raise RequestError(ErrorCode.invalid_argument, "the requester must be one of the two nodes")
        other = b if requester.id == a.id else a
        if not self.may_see(requester.id, other):
            raise RequestError(ErrorCode.not_trusted,
                               f"node {other.id} is private and does not trust node {requester.id}")
        return {"type": "punch_ok", "node_a": a.id, "node_a_addr": a.real_addr,
                "node_b": b.id, "node_b_addr": b.real_addr}


_HANDLERS: dict[str, Handler] = {
    name: getattr(Registry, name) for name in (
        "lookup", "resolve", "resolve_hostname", "punch")
}
for _more in (records.HANDLERS, handshakes.HANDLERS, compat.HANDLERS, directory.HANDLERS, statements.HANDLERS):
    _HANDLERS.update(_more)
_REQUEST_COUNTERS: dict[object, str] = {kind: f"request.{kind}" for kind in _HANDLERS}  # made once
