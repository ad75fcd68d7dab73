# -*- test-case-name: tests.server.test_replication -*-
"""
Replication, sans I/O: what a primary sends its standbys (:class:`Publisher`)
and how a standby turns what it receives into a store (:class:`Follower`).
The frames are ``pilot.wire.replication``'s; the roles and terms are in
``replication_role.py``; sockets and timers in ``pilot.services.replication``.

A subscriber gets the whole store when it subscribes.  Then, on
:meth:`Publisher.publish` (the service calls it a flush delay after a
change), a subscriber of ours gets what changed since the last push,
numbered: the store journal's record of it, taken from the registry's
:class:`~pilot.server.journal.Feed` (the same tracker the store's writer
reads), so a push costs what changed, not the store's size.  Only a
reference subscriber (and one of ours too old to read records) gets the
whole store again with every push; that store is made only while such a
subscriber is there.  The first snapshot of a subscriber of ours is made in
another thread when the service gives one (``off_reactor``): the reactor
only copies the state (``pilot.server.compaction.StateView``), and what is
pushed meanwhile is held for that subscriber until its snapshot is sent.
Heartbeats go to each subscriber at the interval it asked for (the
reference's 15 s by default).

A standby of ours applies each record to its registry's state as it comes
(:class:`Follower` given the state; ``pilot.server.applier``), so a delta
costs it what changed too; only snapshots (and an older primary's deltas)
are loaded whole.

Synchronous replication (``--sync-replication``): :meth:`Publisher.when_saved`
has the shape of the store's (``pilot.protocols.registry.Durability``): a
reply to a change waits until a standby acknowledged a delta holding it, or
``sync_timeout`` passed (then it goes anyway, and the publisher logs it).
With no standby of ours subscribed, replies go at once (the log says the pair
is degraded).
"""

from __future__ import annotations

import gc
import hmac
from typing import Any, Callable, Protocol

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pilot.errors import ErrorCode, MalformedFrame
from pilot.server.applier import apply_to_state
from pilot.server.compaction import StateView, StoreMirror
from pilot.server.journal import Feed, JournalError, apply_record
from pilot.server.pair_defaults import SYNC_TIMEOUT
from pilot.server.requests import RequestError
from pilot.server.state import RegistryState
from pilot.wire import replication as wire
from pilot.wire.registry import MAX_FRAME as REFERENCE_MAX_FRAME

#: The reference's heartbeat interval.
HEARTBEAT = 15.0
#: The shortest heartbeat interval a subscriber may ask for.
MIN_HEARTBEAT = 0.2
#: The fewest bytes a node takes in a store (its object, with its key; and its key again in pub_key_idx).
MIN_NODE_BYTES = 150


#: Runs a function in another thread; the Deferred fires in the reactor's.
Runner = Callable[[Callable[[], Any]], "Deferred[Any]"]


class Subscriber(Protocol):
    """A subscriber's connection (the registry's :class:`~pilot.server.requests.Session`)."""

    def push(self, message: dict[str, Any]) -> None: ...


def tokens_match(configured: bytes, given: str) -> bool:
    """Constant-time comparison of a replication token (``hmac.compare_digest``)."""
    return hmac.compare_digest(configured, given.encode("utf-8", "surrogatepass"))


@attr.s(auto_attribs=True)
class Subscription:
    session: Subscriber
    deltas: bool
    heartbeat: float
    where: str
    #: it reads the journal's records (else a whole store per push)
    records: bool = False
    last_beat: float = 0.0
    #: highest delta number this subscriber acknowledged
    acked: int = 0
    #: frames held while its first snapshot is made off the reactor (None: it has it)
    held: list[tuple[bytes, bool]] | None = None


class Publisher:
    """The primary's side of replication: see the module's docstring."""

    log = Logger()

    def __init__(self, clock: IReactorTime, snapshot: Callable[[], bytes], feed: Feed,
                 sync_timeout: float = SYNC_TIMEOUT, off_reactor: Runner | None = None) -> None:
        """
        ``snapshot()``: the store's bytes now; ``feed``: what changed in the
        same state; ``off_reactor``: runs a function in another thread (the
        first snapshot of a subscriber of ours is made there; without it, here).
        """
        self.clock = clock
        self.snapshot = snapshot
        self.feed = feed
        self.off_reactor = off_reactor
        self.sync_timeout = sync_timeout
        self.term = 0
        self.subscriptions: dict[Subscriber, Subscription] = {}
        #: the number of the last push, and the store's numbers as of it
        self.seq = 0
        self._scalars: dict[str, int] = {}
        #: changes seen, and the highest change a standby of ours acknowledged
        self.generation = 0
        self.saved = 0
        self._pushed: list[tuple[int, int]] = []  # (seq, generation) not acknowledged yet
        self._waiting: list[tuple[int, Deferred[None], IDelayedCall]] = []
        self._degraded_logged = False
        # counters for /metrics (``pilot.web.replication``): plain ints, read when scraped
        #: pushes of what changed (one per :meth:`publish` that found a change)
        self.pushes = 0
        #: bytes of the snapshots and deltas sent (the frames' bodies; heartbeats are not counted)
        self.bytes_pushed = 0
        self.snapshots_sent = 0
        self.deltas_sent = 0
        self.heartbeats_sent = 0
        #: acknowledgements received from standbys of ours, and the highest change number among them
        self.acks = 0
        self.last_acked = 0
        #: --sync-replication replies that waited for a standby, and those released by the timeout
        self.sync_waits = 0
        self.sync_timeouts = 0

    # --- subscribers ------------------------------------------------------------------

    def subscribe(self, session: Subscriber, sub: wire.Subscribe, where: str) -> dict[str, Any]:
        """
        Add ``session``.  A reference subscriber's reply is the snapshot (as
        the reference sends it, within its 1 MiB frames); one of ours gets the
        snapshot, numbered, pushed whole (any size), and a short reply after it.
        """
        interval = HEARTBEAT if not sub.heartbeat else max(MIN_HEARTBEAT, min(HEARTBEAT, sub.heartbeat))
        # the subscribers there are get what changed so far: the snapshot below is their base too
        self.publish()
        if not self.feed.joined(self):
            self.feed.join(self)  # changes from now on: the snapshot below holds the others
            self._scalars = self._store_scalars()
        subscription = Subscription(session, sub.deltas, interval, where, sub.records,
                                    last_beat=self.clock.seconds())
        if sub.deltas:
            self.subscriptions[session] = subscription
            self._log_joined(subscription)
            if self.off_reactor is None:
                data = wire.encode_snapshot_bytes(self.snapshot(), self.term, self.seq)
                self._push_frame(session, data, True)
            else:
                self._snapshot_off_reactor(subscription)
            return {"type": wire.SUBSCRIBE + "_ok", "seq": self.seq}
        # a store that cannot fit by its nodes alone is refused without making it (a reference standby
        # tries again every 3 s)
        nodes = len(self.feed.tracker.state.nodes)
        data = self.snapshot() if nodes * MIN_NODE_BYTES <= REFERENCE_MAX_FRAME else b""
        if not data or len(data) > REFERENCE_MAX_FRAME - 100:
            if not self.subscriptions:
                self.feed.leave(self)
            size = f"{len(data)} bytes" if data else f"{nodes} nodes, over {nodes * MIN_NODE_BYTES} bytes"
            raise RequestError(ErrorCode.invalid_argument,
                               f"the store ({size}) does not fit the reference's "
                               f"{REFERENCE_MAX_FRAME}-byte frames: a reference standby cannot follow it")
        self.subscriptions[session] = subscription
        self._log_joined(subscription)
        self.snapshots_sent += 1
        self.bytes_pushed += len(data)
        return {"type": wire.SNAPSHOT, "snapshot": wire.store_object(data)}

    def _snapshot_off_reactor(self, sub: Subscription) -> None:
        """
        The store as it is now, made in another thread from a copy of the
        state (``pilot.server.compaction``: the copy costs the reactor about
        20 ms at 100,000 nodes, the store's text 1.5 s of the other thread);
        what is pushed meanwhile waits for it.
        """
        assert self.off_reactor is not None
        sub.held = []
        collecting = gc.isenabled()
        gc.disable()  # the copy makes a tuple per node, none garbage: a collection would walk them all
        try:
            view, seq = StateView.of(self.feed.tracker.state), self.seq
        finally:
            if collecting:
                gc.enable()

        def made(data: bytes) -> None:
            held, sub.held = sub.held, None
            if self.subscriptions.get(sub.session) is not sub or held is None:
                return  # gone meanwhile
            self._push_frame(sub.session, wire.encode_snapshot_bytes(data, self.term, seq), True)
            for body, snapshot in held:
                self._push_frame(sub.session, body, snapshot)

        def failed(failure: Any) -> None:
            self.log.failure("the snapshot for {where} could not be made off the reactor; making it here",
                             failure, where=sub.where)
            sub.held = None
            if self.subscriptions.get(sub.session) is sub:  # the store now holds what was held
                now = wire.encode_snapshot_bytes(self.snapshot(), self.term, self.seq)
                self._push_frame(sub.session, now, True)
        self.off_reactor(lambda: StoreMirror(view).render()).addCallbacks(made, failed)

    def _log_joined(self, sub: Subscription) -> None:
        kind = "records" if sub.records else "snapshots, numbered" if sub.deltas else "snapshots, reference"
        self.log.info("replication subscriber {where} ({kind}) joined", where=sub.where, kind=kind)

    def closed(self, session: Subscriber) -> None:
        gone = self.subscriptions.pop(session, None)
        if gone is not None:
            self.log.info("replication subscriber {where} left", where=gone.where)

    @property
    def followers(self) -> int:
        """Subscribers of ours (that acknowledge what they hold)."""
        return sum(1 for s in self.subscriptions.values() if s.deltas)

    def drop_all(self) -> list[Subscriber]:
        """Forget every subscriber (this server stepped down); their sessions, to close."""
        sessions = list(self.subscriptions)
        self.subscriptions.clear()
        self.feed.leave(self)  # a standby now: nothing to keep for pushes
        return sessions

    # --- pushing --------------------------------------------------------------------------

    def changed(self) -> None:
        self.generation += 1

    def _store_scalars(self) -> dict[str, int]:
        state = self.feed.tracker.state
        return {"pilot_journal_seq": state.journal_seq, "pilot_term": state.term}

    def publish(self) -> None:
        """Push what changed since the last push to every subscriber."""
        if not self.subscriptions:
            self.feed.leave(self)
            self._settle_without_followers()
            return
        generation = self.generation
        record = self.feed.take(self)  # None: the tracking restarted; every subscriber needs the whole store
        scalars = self._store_scalars()
        changed = {k: v for k, v in scalars.items() if self._scalars.get(k) != v}
        self._scalars = scalars
        if record == {} and not changed:
            return
        self.seq += 1
        self._pushed.append((self.seq, generation))
        delta_body = None if record is None else \
            wire.encode_body(wire.encode_delta(wire.Delta(self.seq, {}, self.term, record, changed)))
        # the whole store only for a reference subscriber (or an older one of ours), or when the tracking
        # restarted (a container was replaced whole)
        kinds = {s.deltas for s in self.subscriptions.values() if delta_body is None or not s.records}
        data = self.snapshot() if kinds else b""
        frames = {deltas: wire.encode_snapshot_bytes(data, self.term, self.seq if deltas else 0)
                  for deltas in kinds}
        for sub in list(self.subscriptions.values()):
            body = delta_body if delta_body is not None and sub.records else frames[sub.deltas]
            if sub.held is not None:
                sub.held.append((body, body is not delta_body))
            else:
                self._push_frame(sub.session, body, body is not delta_body)
        self.pushes += 1
        self._settle_without_followers()

    def beat(self) -> None:
        """Send heartbeats that are due."""
        now = self.clock.seconds()
        message = wire.encode_heartbeat(self.term, self.seq)
        for sub in list(self.subscriptions.values()):
            if sub.held is None and now - sub.last_beat >= sub.heartbeat - 1e-6:
                sub.last_beat = now
                self.heartbeats_sent += 1
                self._push(sub.session, message)

    def next_beat(self) -> float:
        """Seconds until the next heartbeat is due (for the service's timer)."""
        if not self.subscriptions:
            return HEARTBEAT
        now = self.clock.seconds()
        return max(0.0, min(s.last_beat + s.heartbeat - now for s in self.subscriptions.values()))

    def _push(self, session: Subscriber, message: dict[str, Any]) -> None:
        session.push(message)

    def _push_frame(self, session: Subscriber, body: bytes, snapshot: bool) -> None:
        push_body = getattr(session, "push_body", None)
        self.bytes_pushed += len(body)
        if snapshot:
            self.snapshots_sent += 1
        else:
            self.deltas_sent += 1
        if push_body is not None:
            push_body(body)
        else:
            session.push(wire.store_object(body))

    # --- acknowledgements (--sync-replication) ------------------------------------------

    def acked(self, session: Subscriber, ack: wire.Ack) -> None:
        sub = self.subscriptions.get(session)
        if sub is None or ack.seq > self.seq:
            return
        self.acks += 1
        self.last_acked = max(self.last_acked, ack.seq)
        sub.acked = max(sub.acked, ack.seq)
        while self._pushed and self._pushed[0][0] <= ack.seq:
            self.saved = max(self.saved, self._pushed.pop(0)[1])
        self._release()

    def when_saved(self, generation: int) -> Deferred[None]:
        """Fires once a standby holds change ``generation`` (or ``sync_timeout`` passed)."""
        if generation <= self.saved or not self.followers:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.sync_waits += 1
        call = self.clock.callLater(self.sync_timeout, self._timed_out, generation)
        self._waiting.append((generation, d, call))
        return d

    def _timed_out(self, generation: int) -> None:
        due = [w for w in self._waiting if w[0] <= generation]
        if not due:
            return
        self.log.warn("no standby acknowledged change {generation} within {timeout} s: answering anyway "
                      "(that change is not on a standby yet)", generation=generation, timeout=self.sync_timeout)
        self.sync_timeouts += len(due)
        self.saved = max(self.saved, generation)
        self._release()

    def _settle_without_followers(self) -> None:
        if self.followers:
            self._degraded_logged = False
            return
        if self._waiting and not self._degraded_logged:
            self._degraded_logged = True
            self.log.warn("synchronous replication: no standby is subscribed; changes are acknowledged "
                          "without one (the pair is degraded)")
        self.saved = self.generation
        self._release()

    def _release(self) -> None:
        ready = [w for w in self._waiting if w[0] <= self.saved]
        self._waiting = [w for w in self._waiting if w[0] > self.saved]
        for _, d, call in ready:
            if call.active():
                call.cancel()
            d.callback(None)


class Gap(Exception):
    """A delta that does not follow the last one applied: a new snapshot is needed."""


class Follower:
    """
    A standby's copy of its primary's store.  A snapshot is loaded at once (a
    store that does not load raises :class:`MalformedFrame`); a delta that
    does not follow the last one raises :class:`Gap`.  Given the registry's
    ``state``, a delta in the journal's record form is applied to it at once
    (``pilot.server.applier``: what the record holds, whatever the store's
    size), and the store object a snapshot left is dropped.  Otherwise (no
    state, or an older primary's ``changes``) deltas are applied to the store
    object and :meth:`load` makes the state of all of them, when the service
    chooses: a load costs about 100 ms at 10,000 nodes.
    """

    def __init__(self, state: RegistryState | None = None) -> None:
        self.state = state
        self.store: dict[str, Any] | None = None
        #: the deltas go to ``state`` directly (the store object is dropped)
        self.live = False
        self.seq = 0
        #: snapshots and deltas applied (``applied`` is their sum)
        self.applied = 0
        self.snapshots = 0
        self.deltas = 0
        #: deltas applied to the store object since the last load
        self.pending = 0
        #: the store's lists that records changed since the last load, held as sets meanwhile (an item
        #: added to a list of 100,000 costs the item, not a sort of the list)
        self._sets: dict[str, set[Any]] = {}

    @property
    def holding(self) -> bool:
        """It holds the primary's store (a snapshot, and every delta since)."""
        return self.store is not None or self.live

    def snapshot(self, frame: wire.Snapshot) -> RegistryState:
        state = _load(frame.store)
        self.store, self.seq, self.pending, self.live = frame.store, frame.seq, 0, False
        self._sets.clear()
        self.applied += 1
        self.snapshots += 1
        return state

    def delta(self, frame: wire.Delta) -> set[int] | None:
        """
        Apply ``frame``; for a record applied to the state, the node ids whose
        ``auth_ts`` it changed (None: it waits in the store object for a load).
        """
        if not self.holding or frame.seq != self.seq + 1:
            raise Gap(f"delta {frame.seq} after {self.seq if self.holding else 'no snapshot'}")
        applied = None
        if frame.record is not None and self.state is not None and not self.pending:
            try:
                applied = apply_to_state(self.state, frame.record)
            except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError, RecursionError) as e:
                raise MalformedFrame(f"a delta that does not apply: {type(e).__name__}: {e}") from None
            self.store, self.live = None, True
            self._sets.clear()
        elif self.store is None:
            raise Gap(f"delta {frame.seq} holds no record: a whole snapshot is needed")
        elif frame.record is not None:
            try:
                self._apply(self.store, frame.seq, frame.record)
            except JournalError as e:
                raise MalformedFrame(f"a delta that does not apply: {e}") from None
            self.store.update(frame.scalars)
        else:
            self._lists()
            wire.apply(self.store, frame.changes)
        self.seq = frame.seq
        self.applied += 1
        self.deltas += 1
        if applied is None:
            self.pending += 1
        return applied

    def load(self) -> RegistryState:
        """The state of the store object now (:class:`MalformedFrame` if it does not load)."""
        if self.store is None:
            raise Gap("no snapshot yet")
        self.pending = 0
        self._lists()
        return _load(self.store)

    def reset(self) -> None:
        self.store, self.seq, self.pending, self.live = None, 0, 0, False
        self._sets.clear()

    def _apply(self, store: dict[str, Any], seq: int, record: dict[str, Any]) -> None:
        """A record applied as the journal's replay does (checked by it), its list items to the sets."""
        apply_record(store, {"seq": seq, **{k: v for k, v in record.items() if k in ("set", "del")}})
        for part in ("add", "drop"):
            sections = record.get(part, {})
            # the replay checks the lists' names, and makes trust_edges of a reference store's pairs
            first = {name: [] for name in sections if name not in self._sets} \
                if isinstance(sections, dict) else sections
            apply_record(store, {"seq": seq, part: first})
            for name, items in sections.items():
                if not isinstance(items, list) or not all(isinstance(x, (str, int)) for x in items):
                    raise JournalError(f"record {seq}: {part}.{name} is not a list of ids")
                kept = self._sets.get(name)
                if kept is None:
                    kept = self._sets[name] = set(store[name])
                if part == "add":
                    kept.update(items)
                else:
                    kept.difference_update(items)

    def _lists(self) -> None:
        """The lists held as sets back in the store object, sorted as the journal's replay sorts them."""
        assert self.store is not None
        for name, kept in self._sets.items():
            self.store[name] = sorted(kept, key=lambda x: (isinstance(x, str), x))
        self._sets.clear()


def _load(store: dict[str, Any]) -> RegistryState:
    try:
        return RegistryState.from_json(store)
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError, RecursionError) as e:
        raise MalformedFrame(f"a replicated store that does not load: {type(e).__name__}: {e}") from None


def adopt(target: RegistryState, source: RegistryState) -> None:
    """Make ``target`` hold ``source``'s content (the registry, beacon and store keep ``target``)."""
    for field in attr.fields(RegistryState):
        setattr(target, field.name, getattr(source, field.name))
