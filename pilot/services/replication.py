# -*- test-case-name: tests.services.test_replication -*-
"""
Replication's lifecycle: the timers and the connection a paired registry
needs (``docs/deploy.md``; the logic is in ``pilot.server.replication`` and
``pilot.server.replication_role``).

* **Primary**: pushes what changed a flush delay after a change (at once with
  ``--sync-replication``), heartbeats to each subscriber at its interval; if
  it was promoted, it keeps dialling its former primary's address: a server
  there that still thinks itself primary sees the higher term and steps down.
* **Standby**: subscribes to its primary (10 s dial timeout, 45 s read
  deadline, a new attempt 3 s after any failure, as the reference's standby),
  applies each snapshot or delta to the registry's state and store, and
  acknowledges it: a snapshot is loaded and adopted whole, a delta (the
  journal's record) applied to the state in place, its store's writer
  journalling the same change.  When nothing came from the primary for
  ``takeover_after`` seconds it takes over, if it has held the primary's
  store since it started (a standby that never had it would take over with
  an empty or stale registry: that needs an operator's ``pilotctl rendezvous
  promote``).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from pilot.endpoint import parse_host_port
from pilot.errors import MalformedFrame
from pilot.protocols.replication import ReplicationClientFactory, ReplicationClientProtocol
from pilot.protocols.registry import Durability
from pilot.server.journal import Feed, Tracker
from pilot.server.registry import Registry
from pilot.server.replication import Follower, Gap, Publisher, Runner, adopt
from pilot.server.replication_role import Replica
from pilot.server.state import RegistryState
from pilot.services.pairing import (  # noqa: F401 (here too: the settings are part of this module's API)
    RECONNECT_DELAY, TAKEOVER_AFTER, ReplicationSettings,
)
from pilot.wire import replication as wire

#: A standby's dial timeout (the reference's).
DIAL_TIMEOUT = 10.0
#: How often heartbeats that are due are sent.
BEAT_TICK = 0.5
#: A standby loads the deltas it received at most this often, when they cannot be applied to its state
#: one by one (an older primary's, not the journal's records): a load costs ~100 ms at 10,000 nodes.
LOAD_INTERVAL = 0.5


def _in_thread(reactor: Any) -> Runner | None:
    """A runner on the reactor's thread pool (None for a reactor without one: a test's)."""
    pool = getattr(reactor, "getThreadPool", None)
    if pool is None:
        return None
    return lambda f: deferToThreadPool(reactor, pool(), f)


class BothSaved:
    """A change is acknowledged once both the store and a standby hold it (``--durable --sync-replication``)."""

    def __init__(self, store: Durability, publisher: Publisher) -> None:
        self.store = store
        self.publisher = publisher
        self.saved = 0

    @property
    def generation(self) -> int:
        return self.publisher.generation

    @generation.setter
    def generation(self, value: int) -> None:
        raise AttributeError("counted by the publisher")

    def when_saved(self, generation: int) -> Deferred[None]:
        both = gatherResults([self.store.when_saved(self.store.generation), self.publisher.when_saved(generation)])

        def done(_: object) -> None:
            self.saved = max(self.saved, generation)
        return both.addCallback(done)


class ReplicationService(Service):
    log = Logger()

    def __init__(self, registry: Registry, settings: ReplicationSettings, reactor: Any,
                 push_delay: float, listen_port: Callable[[], int], persist: Callable[[bool], None],
                 tls: bool = False, snapshot: Callable[[], bytes] | None = None,
                 disconnect_clients: Callable[[], None] = lambda: None, feed: Feed | None = None) -> None:
        """
        ``persist(whole)`` writes the store soon (``whole``: as a snapshot, the
        state was replaced); ``snapshot()`` gives the store's bytes (by default
        made afresh); ``feed`` tells what changed in the state (the store
        writer's, shared; without a store, one of its own);
        ``disconnect_clients()`` closes every registry connection (on stepping
        down: nodes move at once).
        """
        self._disconnect_clients = disconnect_clients
        self.registry = registry
        self.settings = settings
        self.reactor = reactor
        self.push_delay = 0.0 if settings.sync else push_delay
        self.listen_port = listen_port
        self._persist = persist
        self.tls = tls
        self.publisher = Publisher(reactor, snapshot or registry.state.to_bytes,
                                   feed or Feed(Tracker(registry.state)), settings.sync_timeout,
                                   off_reactor=_in_thread(reactor))
        self.follower = Follower(registry.state)
        self.replica = Replica(registry.state, self.publisher, settings.token, settings.standby_of, self)
        registry.replica = self.replica
        #: where this server dials: its primary (standby), or its former primary (a promoted one)
        self.target = settings.standby_of
        self.link: ReplicationClientProtocol | None = None
        #: the connection attempt under way or connected (frames of any other are stale)
        self.attempt: ReplicationClientFactory | None = None
        self.synced = False
        self.last_heard = 0.0
        self._calls: dict[str, IDelayedCall] = {}
        self._failures = 0
        self._refused_logged = False

    @property
    def synchronised(self) -> bool:
        """A standby that holds its primary's store and hears it on a live stream (``/metrics``)."""
        return self.replica.standby and self.link is not None and self.follower.holding

    # --- lifecycle ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.last_heard = self.reactor.seconds()
        self._persist(False)  # the term, new or not, is in the store from the start
        self._later("beat", BEAT_TICK, self._beat)
        if self.replica.standby:
            self.log.info("standby of {primary} (term {term}): takes over after {seconds:.0f} s of silence",
                          primary=self.target, term=self.replica.term, seconds=self.settings.takeover_after)
            self._arm_takeover()
        else:
            self.log.info("replication primary, term {term}", term=self.replica.term)
        if self.target:
            self._later("dial", 0, self._dial)

    def stopService(self) -> None:
        super().stopService()
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        if self.link is not None:
            self.link.close("the service stopped")

    def _later(self, name: str, delay: float, f: Callable[[], None]) -> None:
        old = self._calls.get(name)
        if old is not None and old.active():
            old.cancel()

        def fire() -> None:
            self._calls.pop(name, None)
            f()
        self._calls[name] = self.reactor.callLater(delay, fire)

    def _scheduled(self, name: str) -> bool:
        call = self._calls.get(name)
        return call is not None and call.active()

    # --- the primary's side ------------------------------------------------------------------

    def changed(self) -> None:
        """The registry's state changed (the rendezvous calls this with every change)."""
        self.publisher.changed()
        if not self.replica.standby and not self._scheduled("publish"):
            self._later("publish", self.push_delay, self._publish)

    def _publish(self) -> None:
        try:
            self.publisher.publish()
        except Exception:
            self.log.failure("replication push failed")

    def _beat(self) -> None:
        self._later("beat", BEAT_TICK, self._beat)
        if not self.replica.standby:
            self.publisher.beat()

    def durability(self, store: Durability | None) -> Durability | None:
        """What holds replies (``--sync-replication``, with or without ``--durable``)."""
        if not self.settings.sync:
            return store
        if store is None:
            return self.publisher
        return BothSaved(store, self.publisher)

    # --- dialling ---------------------------------------------------------------------------

    def _subscription(self) -> dict[str, Any]:
        heartbeat = max(0.5, self.settings.takeover_after / 4)
        try:
            port = self.listen_port()
        except RuntimeError:
            port = 0
        return wire.encode_subscribe(wire.Subscribe(
            self.settings.token.decode("utf-8", "surrogateescape") if self.settings.token else "",
            deltas=True, term=self.replica.term, heartbeat=heartbeat,
            role="standby" if self.replica.standby else "primary", port=port, records=True))

    def _dial(self) -> None:
        if not self.running or self.target is None or self.attempt is not None:
            return
        host, port = parse_host_port(self.target)
        factory = ReplicationClientFactory(self._subscription(), self, self.reactor, self.settings.read_deadline)
        if self.tls or self.settings.primary_fingerprint:
            from pilot.tls import client_options  # pyOpenSSL only when TLS is on
            self.reactor.connectSSL(host, port, factory, client_options(host, self.settings.primary_fingerprint),
                                    timeout=DIAL_TIMEOUT)
        else:
            self.reactor.connectTCP(host, port, factory, timeout=DIAL_TIMEOUT)
        self.attempt = factory

    def link_lost(self, attempt: ReplicationClientFactory, reason: str) -> None:
        if attempt is not self.attempt:
            return  # an attempt given up already (the role changed)
        self.attempt = self.link = None
        if not self.running:
            return
        self._failures += 1
        if self.replica.standby and (self._failures == 1 or self._failures % 20 == 0):
            self.log.warn("replication from {primary} lost ({reason}); again in {delay:.0f} s "
                          "(attempt {attempt})", primary=self.target, reason=reason,
                          delay=self.settings.reconnect_delay, attempt=self._failures)
        self._later("dial", self.settings.reconnect_delay, self._dial)

    # --- what the stream brings -----------------------------------------------------------

    def frame_received(self, link: ReplicationClientProtocol, frame: wire.Frame) -> None:
        if link.attempt is not self.attempt:
            link.close("a connection given up")
            return
        self.link = link
        self._failures = 0
        if not self.replica.standby:
            self._probe_answered(link, frame)
            return
        if frame.term and frame.term < self.replica.term:
            link.close(f"its term {frame.term} is older than ours ({self.replica.term})")
            return
        if isinstance(frame, wire.Refused):
            self._refused(link, frame)
            return
        self.last_heard = self.reactor.seconds()
        self._arm_takeover()
        if frame.term > self.replica.term:
            self.replica.saw_term(frame.term, self.target or "")
        try:
            if isinstance(frame, wire.Snapshot):
                self._apply(self.follower.snapshot(frame), frame.seq, link)
                self.synced = True
                self._refused_logged = False
                self.log.info("holding the store of {primary}: {nodes} nodes (term {term})", primary=self.target,
                              nodes=len(self.registry.state.nodes), term=self.replica.term)
            elif isinstance(frame, wire.Delta):
                auth = self.follower.delta(frame)
                link.send_ack(frame.seq)
                if auth is not None:
                    self._applied(auth, frame.scalars)
                elif not self._scheduled("load"):
                    self._later("load", LOAD_INTERVAL, self._load)
            elif isinstance(frame, wire.Heartbeat):
                if frame.seq > self.follower.seq:
                    raise Gap(f"the primary is at change {frame.seq}, this standby at {self.follower.seq}")
                link.send_ack(self.follower.seq)  # also keeps the primary's side of a quiet stream open
        except Gap as e:
            self.log.warn("replication gap ({reason}): subscribing again for a whole snapshot", reason=str(e))
            self.follower.reset()
            link.close("a gap in the deltas")
        except MalformedFrame as e:
            self.log.error("the primary sent a store this standby cannot load ({reason}); subscribing again",
                           reason=e.reason)
            self.follower.reset()
            link.close("a store that does not load")

    def _apply(self, state: RegistryState, seq: int, link: ReplicationClientProtocol) -> None:
        self._cancel("load")
        self._adopt(state)
        link.send_ack(seq)

    def _adopt(self, state: RegistryState) -> None:
        state.term = max(state.term, self.replica.term)
        # the store's journal numbers never go down (this store's writer may have journalled records since)
        state.journal_seq = max(state.journal_seq, self.registry.state.journal_seq)
        adopt(self.registry.state, state)
        self.registry.restored_ts = dict(self.registry.state.auth_ts)
        self.publisher.term = self.registry.state.term
        self._persist(True)

    def _applied(self, auth: set[int], scalars: dict[str, int]) -> None:
        """
        A record was applied to the registry's state in place: the replay
        floor follows its ``auth_ts``, the term its ``pilot_term``; the store's
        writer journals the same changes (its tracker sees them), and rewrites
        the store for a new term (no record holds it).  The primary's
        ``pilot_journal_seq`` is its own journal's: this store numbers its own.
        """
        state = self.registry.state
        for node_id in auth:
            ts = state.auth_ts.get(node_id)
            if ts is None:
                self.registry.restored_ts.pop(node_id, None)
            else:
                self.registry.restored_ts[node_id] = ts
        term = max(scalars.get("pilot_term", 0), state.term, self.replica.term)
        whole = term != state.term
        state.term = self.publisher.term = term
        self._persist(whole)

    def _load(self) -> None:
        """Load the deltas received since the last load into the registry's state."""
        if not self.follower.pending:
            return
        try:
            self._adopt(self.follower.load())
        except (MalformedFrame, Gap) as e:
            self.log.error("the primary's store no longer loads here ({reason}); subscribing again",
                           reason=str(e))
            self.follower.reset()
            self._give_up_link("a store that does not load")
            self._later("dial", 0, self._dial)

    def _cancel(self, name: str) -> None:
        call = self._calls.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _refused(self, link: ReplicationClientProtocol, frame: wire.Refused) -> None:
        if frame.code == "not_primary" and frame.primary and frame.primary != self.target:
            self.log.warn("{old} is not primary; following {new} (term {term})", old=self.target,
                          new=frame.primary, term=frame.term)
            self.replica.saw_term(max(frame.term, self.replica.term), frame.primary)
            return
        if not self._refused_logged:
            self._refused_logged = True
            hint = "it is a standby too: promote one of the two" if frame.code == "not_primary" else \
                "check the replication token on both servers"
            self.log.error("{primary} refused the replication subscription: {error} ({code}); {hint}",
                           primary=self.target, error=frame.error, code=frame.code or "?", hint=hint)
        link.close("refused")

    def _probe_answered(self, link: ReplicationClientProtocol, frame: wire.Frame) -> None:
        """As a primary we dialled our former primary: does it still think itself primary?"""
        if isinstance(frame, (wire.Snapshot, wire.Delta, wire.Heartbeat)) and frame.term and \
                self.replica.saw_term(frame.term, self.target or ""):
            return  # stepped down: following it now (a new subscription, as a standby)
        if isinstance(frame, wire.Refused) and frame.term and \
                self.replica.saw_term(frame.term, frame.primary if frame.primary != self.target else ""):
            return
        link.close("probed")

    # --- takeover ---------------------------------------------------------------------------

    def _arm_takeover(self) -> None:
        if self.replica.standby:
            self._later("takeover", self.settings.takeover_after, self._silence)

    def _silence(self) -> None:
        if not self.replica.standby:
            return
        silent = self.reactor.seconds() - self.last_heard
        if silent < self.settings.takeover_after:
            self._later("takeover", self.settings.takeover_after - silent, self._silence)
            return
        if not self.synced:
            self.log.error("the primary {primary} has been silent for {seconds:.0f} s, but this standby has "
                           "not held its store since it started: not taking over by itself (run `pilotctl "
                           "rendezvous promote` if the primary is lost)", primary=self.target, seconds=silent)
            self._later("takeover", self.settings.takeover_after, self._silence)
            return
        self.replica.primary_silent(self.target or "?", silent)

    # --- Links: what the role asks ------------------------------------------------------------

    def follow(self, primary: str) -> None:
        self.target = primary
        self.follower.reset()
        self.last_heard = self.reactor.seconds()
        self._arm_takeover()
        self._give_up_link(f"following {primary}")
        self._failures = 0
        self._later("dial", 0, self._dial)

    def settle(self) -> None:
        self._cancel("load")
        self._load()

    def lead(self) -> None:
        self._cancel("takeover")
        self.follower.reset()
        self._give_up_link("promoted")
        if self.target:
            self._later("dial", self.settings.reconnect_delay, self._dial)
        self.changed()

    def _give_up_link(self, why: str) -> None:
        link, self.link, self.attempt = self.link, None, None
        if link is not None:
            link.close(why)

    def persist(self) -> None:
        self._persist(True)

    def drop_clients(self) -> None:
        # later: the refusal to the request that made it step down goes out first
        self._later("drop", 0, self._disconnect_clients)

    def revive(self) -> None:
        now = self.reactor.seconds()
        for node in self.registry.state.nodes.values():
            if node.last_seen < now:
                node.last_seen = now
