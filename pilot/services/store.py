# -*- test-case-name: tests.services.test_store -*-
"""
The registry's store file: loading it at start, and writing it after changes.

Writes are coalesced: the first change schedules one write ``delay`` seconds
later and changes until then ride along, so a burst of registrations costs
one write (the reference flushes dirty state on a 1-second ticker).  Each
write replaces the file atomically (:mod:`pilot.persist`).  A failed write is
logged loudly and retried; it never takes the registry down.  On shutdown the
service calls :meth:`StoreWriter.flush`.

Durable acknowledgements (``--durable``): every change bumps
:attr:`StoreWriter.generation`; :meth:`StoreWriter.when_saved` gives a
Deferred that fires once a write holding that generation is on disk (the
atomic write fsyncs the file and its folder).  The registry's connections
hold a changing request's reply until then, so an acknowledged change
survives ``kill -9``.  Writes are group commits: one write carries every
change made before it started.

The rendezvous itself (with or without ``--durable``) writes through a
journal beside the store instead (``pilot.services.durable``: no write stops
the reactor); :class:`StoreWriter` remains for callers that snapshot a small
state.  Loading replays a journal left there into the state, before anything
listens; the journal stays (cut back to its last whole record) until the
store writer's first write, a compaction in its own thread, folds it into the
store: formatting the whole store in the start path cost ~2 s at 100,000
nodes.  A journal none of whose records is newer than the store is removed.

A store with no journal record to replay whose sidecar (written at a clean
stop: :mod:`pilot.server.sidecar`) still matches it is loaded from the
sidecar, not parsed and checked as JSON (:func:`load`).

Loading refuses, with a :class:`StoreError`, a file that exists but cannot be
used, and leaves it untouched: starting empty would overwrite it at the first
change and lose every registration in it.
"""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Any, Callable, Iterator, NamedTuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pilot.persist import (
    MAX_STATE_FILE, StateFileError, atomic_write_bytes, atomic_write_json, parse_json_object, read_state_file,
    remove_durably, remove_stale_temporaries,
)
from pilot.server import sidecar
from pilot.server.journal import JournalError, read_records, replay
from pilot.server.state import RegistryState, StoreFormatError

SYSTEM_STORE_DIR = "/var/lib/pilot"
STORE_NAME = "registry.json"

#: After a failed write, the next attempt waits this long (doubling to RETRY_MAX).
RETRY_DELAY = 5.0
RETRY_MAX = 60.0

log = Logger(namespace="pilot.services.store")  # for loading; the writer has its own


class StoreError(StateFileError):
    """A store file that exists but cannot be loaded; the registry must not start over it."""

    def __init__(self, path: str, reason: str) -> None:
        reason = reason.replace("; the file is left untouched", "")
        super().__init__(path, f"{reason}; the file was left untouched, and the registry will not start "
                               f"until it is repaired or moved away")


def journal_path(store: str) -> str:
    """Where the ``--durable`` journal of the store ``store`` is."""
    return store + ".journal"


class Loaded(NamedTuple):
    """What :func:`load` found."""

    state: RegistryState | None
    #: the state came from the store's sidecar, which matches the store file: a clean stop
    #: with nothing to save need not write either again
    sidecar_current: bool


def load_store(path: str) -> RegistryState | None:
    """
    The state saved in ``path`` (and its journal), or None if there is neither.

    Leftover temporaries of a crashed writer are removed first; a journal is
    replayed into the state and left for the store writer to fold into the
    store (:func:`journal_pending`), its torn last record (if any) cut off.
    Raises :class:`StoreError` (naming the file) for a file that is
    unreadable, not JSON, or not a registry store, for a damaged journal, and
    for a journal that could not be cut back or removed.
    """
    return load(path).state


def load(path: str) -> Loaded:
    """
    :func:`load_store`, and whether the state came from the store's sidecar
    (``pilot.server.sidecar``: a store with no journal records to replay,
    whose sidecar still matches it byte for byte, is not parsed and checked
    as JSON; any other store is, as if it had no sidecar).
    """
    remove_stale_temporaries(path)
    with collector_paused():
        return _load(path)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """
    No cyclic garbage collection while a store loads: parsing and building
    100,000 nodes allocates millions of objects, none of them garbage, and
    the collections they would set off cost about a third of the load.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _load(path: str) -> Loaded:
    data: bytes | None
    try:
        data = read_state_file(path)
    except FileNotFoundError:
        data = None
    except StateFileError as e:
        raise StoreError(path, e.reason) from e
    journal = _read_journal(path)
    if journal is not None and not journal[0]:
        _remove_journal(path)  # no record in it: nothing to replay
        journal = None
    if journal is not None:
        return Loaded(_fold_journal(path, None if data is None else _parse(path, data), journal), False)
    if data is None:
        return Loaded(None, False)
    state = _from_sidecar(path, data)
    if state is not None:
        return Loaded(state, True)
    return Loaded(_state(path, _parse(path, data)), False)


def _parse(path: str, data: bytes) -> dict[str, Any]:
    try:
        return parse_json_object(path, data)
    except StateFileError as e:
        raise StoreError(path, e.reason) from e
    except RecursionError as e:  # JSON nested deeper than the parser's stack
        raise StoreError(path, "not valid JSON (nested too deeply)") from e


def _from_sidecar(path: str, data: bytes) -> RegistryState | None:
    """The state from the sidecar of the store ``path`` (its bytes ``data``), if it has a usable one."""
    where = sidecar.path_of(path)
    try:
        with open(where, "rb") as f:
            blob = f.read(MAX_STATE_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warn("{path}: cannot read ({error}); the store is checked in full", path=where, error=e)
        return None
    try:
        return sidecar.decode(blob, data)
    except sidecar.SidecarError as e:
        log.info("{path}: not used, {reason}; the store is checked in full", path=where, reason=e)
    except Exception:
        # whatever a damaged or crafted sidecar makes go wrong, the store's own checks decide
        log.failure("{path}: not used; the store is checked in full", path=where)
    return None


def _remove_journal(path: str) -> None:
    try:
        remove_durably(journal_path(path))
    except OSError as e:
        raise StoreError(journal_path(path), f"the journal (no record newer than the store) could not be "
                                             f"removed: {e.strerror or e}") from e


def journal_pending(path: str) -> bool:
    """True if the journal of the store ``path`` holds records the store file does not (yet)."""
    try:
        return os.path.getsize(journal_path(path)) > 0
    except OSError:
        return False


def _read_journal(path: str) -> tuple[list[dict[str, Any]], int] | None:
    """The journal's whole records and the length of their bytes; None if there is no journal."""
    try:
        with open(journal_path(path), "rb") as f:
            data = f.read(MAX_STATE_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(journal_path(path), f"cannot read: {e.strerror or e}") from e
    try:
        records, torn = read_records(data)
    except JournalError as e:
        raise StoreError(journal_path(path), f"a damaged journal: {e}") from e
    if torn:
        log.warn("{path}: ignoring a torn last record ({size} bytes): it was being written when the "
                 "registry stopped, and was never acknowledged", path=journal_path(path), size=torn)
    return records, len(data) - torn


def _fold_journal(path: str, value: dict[str, Any] | None, journal: tuple[list[dict[str, Any]], int]
                  ) -> RegistryState | None:
    """
    Replay the journal into the store's ``value``.  A journal with records
    newer than the store stays, cut back to its whole records (records
    appended after a torn one would make it damaged): the store writer's
    first write folds it into the store.  Any other journal is removed.
    """
    records, whole = journal
    merged = value if value is not None else {}
    try:
        applied = replay(merged, records)
    except JournalError as e:
        raise StoreError(journal_path(path), f"a damaged journal: {e}") from e
    state = _state(path, merged) if applied or value is not None else None
    try:
        if applied and state is not None:
            truncate_durably(journal_path(path), whole)
        else:
            remove_durably(journal_path(path))
    except OSError as e:
        what = "cut back" if applied else "removed"
        raise StoreError(journal_path(path), f"the journal ({applied} records newer than the store) could "
                                             f"not be {what}: {e.strerror or e}") from e
    if applied:
        log.info("{path}: {count} journal records replayed; the store writer folds them into the store",
                 path=path, count=applied)
    return state


def truncate_durably(path: str, size: int) -> None:
    """Cut ``path`` back to ``size`` bytes (if longer), on disk before this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
            os.fsync(fd)
    finally:
        os.close(fd)


def _state(path: str, value: dict[str, Any]) -> RegistryState:
    try:
        return RegistryState.from_json(value)
    except StoreFormatError as e:
        raise StoreError(path, f"not a registry store: {e}") from e
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError, RecursionError) as e:
        raise StoreError(path, f"not a registry store: {type(e).__name__}: {e}") from e


def default_store_path(system_dir: str = SYSTEM_STORE_DIR, home: str | None = None) -> str:
    """
    ``/var/lib/pilot/registry.json`` when that folder exists (or can be
    created) and is writable, else ``~/.pilot/registry.json``.
    """
    try:
        os.makedirs(system_dir, mode=0o755, exist_ok=True)
    except OSError:
        pass
    if os.path.isdir(system_dir) and os.access(system_dir, os.W_OK | os.X_OK):
        return os.path.join(system_dir, STORE_NAME)
    home = home if home is not None else os.path.expanduser("~")
    return os.path.join(home, ".pilot", STORE_NAME)


class StoreWriter:
    """Writes ``snapshot()`` to ``path`` ``delay`` seconds after the first unsaved change."""

    log = Logger()

    def __init__(self, path: str, snapshot: Callable[[], dict[str, Any] | bytes], clock: IReactorTime,
                 delay: float = 0.25, touch_delay: float = 5.0) -> None:
        self.path = path
        self.snapshot = snapshot
        self.clock = clock
        self.delay = delay
        self.touch_delay = touch_delay
        self.dirty = False
        self.writes = 0
        self.failures = 0
        self._call: IDelayedCall | None = None
        self._retry = RETRY_DELAY
        #: changes made so far, and how many of them the file on disk holds
        self.generation = 0
        self.saved = 0
        self._waiting: list[tuple[int, Deferred[None]]] = []

    @property
    def scheduled(self) -> bool:
        return self._call is not None and self._call.active()

    def changed(self) -> None:
        """The state changed: make sure a write happens soon."""
        self.dirty = True
        self.generation += 1
        soon = self.clock.seconds() + self.delay
        if not self.failures and self._call is not None and self._call.active() and self._call.getTime() > soon:
            self._call.reset(self.delay)  # a lazy write (``touched``) was pending: bring it forward
        elif not self.scheduled:
            self._call = self.clock.callLater(self.delay, self._timer_fired)

    def touched(self) -> None:
        """
        Something worth saving but not urgent changed (replay state): write
        within ``touch_delay`` seconds, or with the next change or flush.
        """
        self.dirty = True
        if not self.scheduled:
            self._call = self.clock.callLater(self.touch_delay, self._timer_fired)

    def when_saved(self, generation: int) -> Deferred[None]:
        """Fires once a write holding change number ``generation`` is on disk."""
        d: Deferred[None] = Deferred()
        if generation <= self.saved:
            d.callback(None)
        else:
            self._waiting.append((generation, d))
        return d

    def abandon_waiters(self, reason: Exception) -> None:
        """Fail every :meth:`when_saved` still waiting (the registry is going away unsaved)."""
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.errback(reason)

    def flush(self) -> bool:
        """Write now if anything is unsaved (shutdown); True if the file is up to date."""
        self._cancel()
        if not self.dirty:
            return True
        return self._write()

    def stop(self) -> None:
        """Cancel any scheduled write (without writing)."""
        self._cancel()

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _timer_fired(self) -> None:
        self._call = None
        if self.dirty:
            self._write()

    def _write(self) -> bool:
        # Clear the flag first: a change made while writing (none today, the
        # snapshot is synchronous) must cause another write.
        self.dirty = False
        generation = self.generation
        try:
            value = self.snapshot()
            if isinstance(value, bytes):
                atomic_write_bytes(self.path, value)
            else:
                atomic_write_json(self.path, value, pretty=False)
        except Exception:
            self.dirty = True
            self.failures += 1
            self.log.failure("COULD NOT SAVE THE REGISTRY STORE to {path} (attempt {failures}); "
                             "the registry keeps running and retries in {retry:.0f} s",
                             path=self.path, failures=self.failures, retry=self._retry)
            if not self.scheduled:
                self._call = self.clock.callLater(self._retry, self._timer_fired)
            self._retry = min(self._retry * 2, RETRY_MAX)
            return False
        self.writes += 1
        self.saved = generation
        if self._waiting:
            ready = [d for g, d in self._waiting if g <= generation]
            self._waiting = [(g, d) for g, d in self._waiting if g > generation]
            for d in ready:
                d.callback(None)
        if self.failures:
            self.log.info("registry store saved to {path} again after {failures} failed attempts",
                          path=self.path, failures=self.failures)
        self.failures = 0
        self._retry = RETRY_DELAY
        return True
