# -*- test-case-name: tests.services.test_durable -*-
"""
The registry's store writer: group commit through a journal, written and
compacted by a thread of its own, so that no write stops the reactor.

The rendezvous uses it with or without ``--durable``; ``--durable`` makes the
registry's connections hold a changing request's reply until
:meth:`DurableWriter.when_saved` says a write holding it is on disk (and
writes at once instead of ``flush_delay`` after the first change).  Every
change bumps :attr:`DurableWriter.generation`.  A write is either

* a **journal record** (``<store>.journal``, :mod:`pilot.server.journal`):
  what changed since the last record (~300 bytes a registration), appended
  and ``fdatasync``-ed; or
* a **compaction** (counted in :attr:`DurableWriter.snapshots`): the whole
  store rewritten atomically (:mod:`pilot.persist`), then the journal
  emptied.  The first write of a new store is one, and so are the write
  after the journal passes ``journal_limit`` bytes and the write after a
  failed one.  The file is made from the writer thread's
  :class:`pilot.server.compaction.StoreMirror` (a view of the state taken
  when tracking began, plus every record since), not from the live state:
  the reactor never formats the whole store, except at a clean stop
  (:meth:`flush`, nothing is answered then anyway).  The rendezvous has a
  child process render and write it (:mod:`pilot.services.forked`), which
  the writer thread waits for without holding the interpreter.

A clean stop also writes the store's sidecar (:mod:`pilot.server.sidecar`),
after the store, so that the next start need not parse and check the store's
JSON; a compaction removes it before it rewrites the store.

The reactor thread only takes each group's changes from the tracker (a
record costs what changed, not the store's size), through a
:class:`pilot.server.journal.Feed` that a paired primary's replication reads
too (its pushes are the same records); the writer thread applies
them to the mirror, encodes, writes and syncs them, one write at a time,
while the reactor answers requests and gathers the next group: every change
made while a write is under way goes in the next one, started as soon as it
is done.

A crash at any point loses no acknowledged change: a record is on disk before
its replies go out; a compacted store holds the number of the last record it
includes, so a crash between writing it and emptying the journal replays
nothing twice; a torn last record was never acknowledged
(:func:`pilot.services.store.load_store` replays the journal and folds it into
the store before the registry starts).  A failed write is logged loudly and
retried as a compaction (from a new view of the state if the mirror itself
failed); replies wait meanwhile, and at shutdown the service exits non-zero
if the store still could not be written.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from pilot.persist import AppendOnlyFile, atomic_write_bytes, remove_durably
from pilot.server import sidecar
from pilot.server.compaction import StateView, StoreMirror
from pilot.server.journal import Feed, Tracker, record_line
from pilot.server.state import RegistryState
from pilot.services.forked import StoreWriter, write_in_thread
from pilot.services.store import RETRY_DELAY, RETRY_MAX, journal_path, journal_pending

#: Runs a function in the writer thread; the Deferred fires in the reactor thread.
Runner = Callable[[Callable[[], Any]], "Deferred[Any]"]

#: Past this many journal bytes the next write is a snapshot (which empties the journal).
JOURNAL_LIMIT = 16 * 1024 * 1024


class DurableWriter:
    """The store of a ``--durable`` registry: see the module's docstring."""

    log = Logger()

    def __init__(self, path: str, state: RegistryState, clock: IReactorTime, run: Runner,
                 delay: float = 0.0, touch_delay: float = 5.0, journal_limit: int = JOURNAL_LIMIT,
                 sidecar_current: bool = False, write_store: StoreWriter = write_in_thread) -> None:
        """
        ``sidecar_current``: the store file has a sidecar that matches it (the
        state was loaded from it); ``write_store``: how the writer thread
        writes a compaction (:mod:`pilot.services.forked`: in the thread, or
        in a child process it waits for).
        """
        self.path = path
        self.sidecar_current = sidecar_current
        self.state = state
        self.clock = clock
        self.run = run
        self.delay = delay
        self.touch_delay = touch_delay
        self.journal_limit = journal_limit
        self.write_store = write_store
        self.journal = AppendOnlyFile(journal_path(path))
        self.tracker = Tracker(state)
        #: the tracker's records, read by this writer and by replication's publisher (if paired)
        self.feed = Feed(self.tracker)
        self.feed.join(self)
        #: the store as the writer thread rebuilds it from the records (compaction off the reactor)
        self.mirror = StoreMirror(StateView.of(state))
        self._mirror_lost = False
        #: changes made so far, and how many of them are on disk
        self.generation = 0
        self.saved = 0
        self.dirty = False
        self.writes = 0
        self.snapshots = 0
        self.failures = 0
        self._busy = False
        #: the first write is a compaction for a new store, and for a journal a start replayed
        #: (``pilot.services.store.load_store`` leaves it for this writer to fold into the store)
        self._compact_due = not os.path.exists(path) or journal_pending(path)
        self._call: IDelayedCall | None = None
        self._retry = RETRY_DELAY
        self._waiting: collections.deque[tuple[int, Deferred[None]]] = collections.deque()
        self._idle: list[Deferred[None]] = []

    @property
    def scheduled(self) -> bool:
        return self._call is not None and self._call.active()

    @property
    def compact_due(self) -> bool:
        """The next write rewrites the whole store (a new store, a replayed journal, a failed write)."""
        return self._compact_due

    @property
    def busy(self) -> bool:
        """A write is under way in the writer thread."""
        return self._busy

    def changed(self) -> None:
        self.dirty = True
        self.generation += 1
        if self._busy or self.failures:
            return  # written as soon as the write under way is done, or at the retry
        call = self._call
        if call is not None and call.active() and call.getTime() > self.clock.seconds() + self.delay:
            call.reset(self.delay)  # a lazy write (``touched``) was pending: bring it forward
        elif not self.scheduled:
            self._call = self.clock.callLater(self.delay, self._timer_fired)

    def rewrite(self) -> None:
        """The state was replaced or a value the journal does not track changed: the next write is a snapshot."""
        self._mirror_lost = True  # a new mirror from the state, and a compaction
        self.changed()

    def touched(self) -> None:
        """Replay state changed: worth writing, not at once (within ``touch_delay``)."""
        self.dirty = True
        if not self._busy and not self.scheduled:
            self._call = self.clock.callLater(self.touch_delay, self._timer_fired)

    def when_saved(self, generation: int) -> Deferred[None]:
        if generation <= self.saved:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append((generation, d))
        return d

    def abandon_waiters(self, reason: Exception) -> None:
        waiting, self._waiting = self._waiting, collections.deque()
        for _, d in waiting:
            d.errback(reason)

    def idle(self) -> Deferred[None]:
        """Fires once no write is under way in the writer thread."""
        if not self._busy:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def flush(self) -> bool:
        """
        At shutdown, with no write under way: write a snapshot now, in this
        thread, if anything is unsaved or in the journal (so that the store
        alone holds everything, and the next start replays nothing), or if the
        store has no current sidecar; then the store's sidecar
        (``pilot.server.sidecar``: the next start need not parse and check the
        store).  True if the store is up to date.
        """
        self._cancel()
        if self._busy:
            self.log.error("the registry store was flushed while a write was under way")
            return False
        unsaved = self.dirty or self._compact_due or self.journal.size > 0
        if not unsaved and self.sidecar_current:
            return True
        generation = self.generation
        self.dirty = False
        side = sidecar.path_of(self.path)
        try:
            data = self.state.to_bytes()  # holds journal_seq: the last record it includes
            self._mirror_lost = True  # a new mirror (and a compaction), if writes go on
            self.sidecar_current = False
            _drop_sidecar(side)  # before the store changes
            atomic_write_bytes(self.path, data)
            self.journal.truncate()
        except Exception as e:
            if not unsaved:
                # the store on disk was whole and up to date: only its sidecar is missing
                self.log.failure("could not rewrite the registry store {path} for its sidecar; the next "
                                 "start checks the store in full", Failure(e), path=self.path)
                return True
            self._failed(Failure(e), retry=False)
            return False
        self._done(generation, snapshot=True)
        try:
            atomic_write_bytes(side, sidecar.encode(self.state, data))
            self.sidecar_current = True
        except Exception:
            self.log.failure("could not write the registry store's sidecar {path}; the next start checks "
                             "the store in full", path=side)
        return True

    def stop(self) -> None:
        """Cancel any scheduled write (without writing)."""
        self._cancel()

    def close(self) -> None:
        self._cancel()
        self.journal.close()

    # --- writing ---------------------------------------------------------------------

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _timer_fired(self) -> None:
        self._call = None
        self._start()

    def _start(self) -> None:
        """Hand the next group to the writer thread (when none is under way)."""
        if self._busy or not self.dirty:
            return
        self._cancel()
        generation = self.generation
        self.dirty = False
        try:
            if self._mirror_lost:
                self.feed.lose(self)
            delta = self.feed.take(self)
            if delta is None:
                # a container was replaced whole, or the mirror missed a record: a new mirror
                self.mirror = StoreMirror(StateView.of(self.state))
                self._mirror_lost = False
                self._compact_due = True
                delta = {}
            if delta:
                self.state.journal_seq += 1
            compact = self._compact_due or self.journal.size >= self.journal_limit
            if compact:
                self.sidecar_current = False  # the writer thread removes it before the store changes
            write = self._write(delta, self.state.journal_seq, compact,
                                self.state.term)
        except Exception:
            self.dirty = True
            self.log.failure("could not make the registry store's next write")
            self._failed(Failure(), retry=True, logged=True)
            return
        self._busy = True
        d = self.run(write)
        d.addCallbacks(self._written, self._write_failed, callbackArgs=(generation,))

    def _write(self, delta: dict[str, Any], seq: int, compact: bool, term: int = 0) -> Callable[[], bool]:
        """
        What the writer thread does for one group: the record of ``delta``
        (record ``seq``) applied to the mirror and appended to the journal, or,
        with ``compact``, the store file rewritten from the mirror (it then
        holds the record, and ``term``: the replication term is no record's)
        and the journal emptied (once ``write_store`` has written the file:
        a child that failed leaves the journal whole).  Its result says which.
        """
        mirror = self.mirror

        def write() -> bool:
            body = b""
            if delta:
                try:
                    body = mirror.apply({"seq": seq, **delta})
                except Exception:
                    self._mirror_lost = True  # read by the reactor once this write has failed
                    raise
            if compact:
                mirror.term = term
                _drop_sidecar(sidecar.path_of(self.path))
                self.write_store(mirror, self.path)
                self.journal.truncate()
            elif delta:
                self.journal.append(record_line(body))
            return compact
        return write

    def _written(self, compacted: bool, generation: int) -> None:
        self._busy = False
        self._done(generation, compacted)
        if self.dirty:
            self._start()
        if not self._busy:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _done(self, generation: int, snapshot: bool) -> None:
        if snapshot:
            self.snapshots += 1
            self._compact_due = False
        self.writes += 1
        self.saved = max(self.saved, generation)
        while self._waiting and self._waiting[0][0] <= self.saved:
            self._waiting.popleft()[1].callback(None)
        if self.failures:
            self.log.info("registry store saved to {path} again after {failures} failed attempts",
                          path=self.path, failures=self.failures)
        self.failures = 0
        self._retry = RETRY_DELAY

    def _write_failed(self, failure: Failure) -> None:
        self._busy = False
        self._failed(failure, retry=True)
        idle, self._idle = self._idle, []
        for d in idle:
            d.callback(None)

    def _failed(self, failure: Failure, retry: bool, logged: bool = False) -> None:
        # what the failed write held is not on disk: the next write rewrites the whole store
        self.dirty = True
        self._compact_due = True
        self.failures += 1
        if not logged:
            self.log.failure("COULD NOT SAVE THE REGISTRY STORE to {path} (attempt {failures}); replies to "
                             "changes wait, and the registry retries in {retry:.0f} s", failure,
                             path=self.path, failures=self.failures, retry=self._retry)
        if retry and not self.scheduled:
            self._call = self.clock.callLater(self._retry, self._timer_fired)
            self._retry = min(self._retry * 2, RETRY_MAX)


def _drop_sidecar(path: str) -> None:
    """
    Remove the store's sidecar before the store changes.  A sidecar left by a
    failed removal is harmless (its digest no longer matches the store, so it
    is not used): that failure must not stop the store's write.
    """
    with contextlib.suppress(OSError):
        remove_durably(path)


#: How long the writer thread may hold the interpreter before the reactor's thread gets it
#: (CPython's default is 5 ms, and a reply needs it several times: a compaction of 100,000
#: nodes kept each request waiting 5 ms or more, ``docs/performance.md``, issue 16).
SWITCH_INTERVAL = 0.001


class WriterThread:
    """The one thread that runs the writes, in order; their results come back in the reactor thread."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(1, 1, name="pilot-store-writer")
        self._interval: float | None = None

    def start(self) -> None:
        if not self.pool.started:
            self._interval = sys.getswitchinterval()
            sys.setswitchinterval(min(self._interval, SWITCH_INTERVAL))
            self.pool.start()
            # whatever else happens, the thread must not keep the process alive after the reactor
            self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self) -> None:
        """Wait for the write under way (if any) and end the thread (again: nothing)."""
        if self.pool.started:
            self.pool.stop()
        if self._interval is not None:
            sys.setswitchinterval(self._interval)
            self._interval = None

    def run(self, write: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, write)
