"""
Tests for pilot.services.durable: group commit through the journal, written
by a writer "thread" that the tests run by hand, and what a restart after a
crash at any point finds (pilot.services.store.load_store).
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import Identity
from pilot.server.compaction import StoreMirror
from pilot.server.journal import encode_record
from pilot.server.registry import Peer
from pilot.server.state import Node, RegistryState
from pilot.server import sidecar
from pilot.services import durable, store
from pilot.services.durable import DurableWriter
from pilot.services.rendezvous import RendezvousService, RendezvousSettings
from pilot.services.store import RETRY_DELAY, StoreError, journal_path, load_store

from pilot.wire.beacon import Discover, PunchRequest, with_proof
from pilot.wire.registry import sign_request

from tests.server.test_state import KEYS, T0
from tests.services.test_rendezvous import FakeReactor


TO_BYTES = RegistryState.to_bytes  # the real one, to compare with when a test forbids it


class ManualThread:
    """The writer thread, run by the test: each write waits for :meth:`run_one`."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        #: True while a write runs (what the writer thread, not the reactor, is doing)
        self.running = False

    def __call__(self, write: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((write, d))
        return d

    def run_one(self) -> None:
        write, d = self.queue.pop(0)
        self.running = True
        try:
            result = write()
        except Exception as e:
            self.running = False
            d.errback(e)
        else:
            self.running = False
            d.callback(result)


class DurableWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "registry.json")
        self.clock = Clock()
        self.thread = ManualThread()
        self.state = RegistryState(created=T0)
        self.writer = self.make(self.state)
        self.next_id = 1

    def make(self, state: RegistryState, **kw: Any) -> DurableWriter:
        return DurableWriter(self.path, state, self.clock, self.thread, **kw)

    def register(self) -> Deferred[None]:
        """A change, as the registry makes one; the Deferred fires when it may be acknowledged."""
        node_id, self.next_id = self.next_id, self.next_id + 1
        key = node_id.to_bytes(4, "big") * 8
        self.state.nodes[node_id] = Node(id=node_id, public_key=key, real_addr=f"192.0.2.1:{node_id}",
                                         last_seen=T0)
        self.state.index_key(key, node_id)
        self.state.proven.add(node_id)
        self.writer.changed()
        return self.writer.when_saved(self.writer.generation)

    def journal_lines(self) -> int:
        with open(journal_path(self.path), "rb") as f:
            return f.read().count(b"\n")

    def reload(self) -> RegistryState:
        """What a registry restarted now (after a crash) would load."""
        state = load_store(self.path)
        assert state is not None
        return state

    def start(self) -> None:
        """The first write of a new store (a snapshot), done."""
        self.acknowledged_after_one_write(self.register())

    def acknowledged_after_one_write(self, d: Deferred[None]) -> None:
        self.clock.advance(0)
        self.assertNoResult(d)
        self.thread.run_one()
        self.successResultOf(d)

    def test_first_write_is_a_snapshot_then_records(self) -> None:
        self.start()
        self.assertEqual((self.writer.snapshots, self.journal_lines()), (1, 0))
        self.acknowledged_after_one_write(self.register())
        self.acknowledged_after_one_write(self.register())
        self.assertEqual((self.writer.snapshots, self.writer.writes, self.journal_lines()), (1, 3, 2))
        with open(self.path) as f:
            self.assertEqual(list(json.load(f)["nodes"]), ["1"])  # the store file is not rewritten
        self.assertEqual(set(self.reload().nodes), {1, 2, 3})

    def test_compaction_keeps_the_replication_term(self) -> None:
        """A paired registry's term survives compactions, a change of it too (no record carries it)."""
        self.state.term = 2
        self.start()
        with open(self.path) as f:
            self.assertEqual(json.load(f)["pilot_term"], 2)
        self.state.term = 3  # promoted
        self.writer.rewrite()
        self.acknowledged_after_one_write(self.register())
        self.assertEqual(self.reload().term, 3)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), self.state.to_bytes())

    def test_group_commit(self) -> None:
        """Changes made while a write is under way go together in the next one, started when it is done."""
        self.start()
        first = self.register()
        self.clock.advance(0)
        group = [self.register() for _ in range(20)]
        self.assertEqual(len(self.thread.queue), 1)
        self.thread.run_one()
        self.successResultOf(first)
        for d in group:
            self.assertNoResult(d)
        self.assertEqual(len(self.thread.queue), 1)  # the next group, already handed over
        self.thread.run_one()
        for d in group:
            self.successResultOf(d)
        self.assertEqual(self.journal_lines(), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_crash_after_records_loses_nothing_acknowledged(self) -> None:
        """
        Records on disk, no snapshot since: a restart replays them; the
        restarted writer's first write (a compaction, in its thread) folds
        them into the store and empties the journal.
        """
        self.start()
        for _ in range(5):
            self.acknowledged_after_one_write(self.register())
        unacknowledged = self.register()  # its record is never written: a crash comes first
        self.clock.advance(0)
        self.assertNoResult(unacknowledged)
        self.thread.queue.clear()  # the crash: that write never runs
        state = self.reload()
        self.assertEqual(set(state.nodes), {1, 2, 3, 4, 5, 6})
        self.assertEqual(state.proven, {1, 2, 3, 4, 5, 6})
        self.assertEqual(self.journal_lines(), 5)  # kept: the start formats no store
        with open(self.path) as f:
            self.assertEqual(len(json.load(f)["nodes"]), 1)
        self.assertEqual(set(self.reload().nodes), {1, 2, 3, 4, 5, 6})  # replayed again: nothing twice
        self.writer = self.make(state)
        self.assertTrue(self.writer.compact_due)
        self.writer.changed()  # what the rendezvous does at start
        self.clock.advance(0)
        self.thread.run_one()
        self.assertEqual(self.writer.snapshots, 1)
        self.assertEqual(self.journal_lines(), 0)
        with open(self.path) as f:
            stored = json.load(f)
        self.assertEqual(len(stored["nodes"]), 6)
        self.assertEqual(stored["pilot_journal_seq"], 6)  # the records it holds: 2 to 6
        self.assertEqual(set(self.reload().nodes), {1, 2, 3, 4, 5, 6})

    def test_records_after_a_torn_one_that_a_start_cut_off(self) -> None:
        """A start cuts a torn last record off the journal it keeps: records appended later stay readable."""
        self.start()
        for _ in range(2):
            self.acknowledged_after_one_write(self.register())
        with open(journal_path(self.path), "ab") as f:
            f.write(encode_record(4, {"add": {"proven": [99]}})[:-5])  # torn by a crash
        with capturedLogs() as events:
            state = self.reload()
        self.assertTrue(any("torn" in formatEvent(e) for e in events))
        self.assertEqual((set(state.nodes), state.journal_seq), ({1, 2, 3}, 3))
        self.assertEqual(self.journal_lines(), 2)
        self.state, self.writer = state, self.make(state, journal_limit=1 << 20)
        self.writer.run = self.thread
        self.writer._compact_due = False  # as if it had folded already: records go on the journal
        self.acknowledged_after_one_write(self.register())
        self.assertEqual(self.journal_lines(), 3)
        reloaded = self.reload()
        self.assertEqual(set(reloaded.nodes), {1, 2, 3, 4})
        self.assertNotIn(99, reloaded.proven)

    def test_crash_between_snapshot_and_emptying_the_journal(self) -> None:
        """The snapshot says which records it holds: the journal left beside it applies nothing twice."""
        self.writer = self.make(self.state, journal_limit=1)
        self.start()
        self.acknowledged_after_one_write(self.register())  # record 1
        with open(journal_path(self.path), "rb") as f:
            journal = f.read()
        self.state.nodes.pop(2)  # deregistered after record 1 ...
        self.acknowledged_after_one_write(self.register())  # ... and the journal passed its limit: a snapshot
        self.assertEqual((self.writer.snapshots, self.journal_lines()), (2, 0))
        # the crash came before the journal was emptied, and a torn record follows
        with open(journal_path(self.path), "wb") as f:
            f.write(journal + encode_record(2, {"add": {"proven": [99]}})[:-5])
        with capturedLogs() as events:
            state = self.reload()
        self.assertEqual(set(state.nodes), {1, 3})
        self.assertNotIn(99, state.proven)
        self.assertTrue(any("torn" in formatEvent(e) for e in events))

    def test_failed_write_is_loud_and_retried_as_a_snapshot(self) -> None:
        """A failed append (a full disk): a loud log, replies wait, the retries are snapshots."""
        self.start()

        def full(data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.patch(self.writer.journal, "append", full)
        waiting = self.register()
        self.clock.advance(0)
        with capturedLogs() as events:
            self.thread.run_one()
        self.assertTrue(any("COULD NOT SAVE THE REGISTRY STORE" in formatEvent(e) for e in events))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertNoResult(waiting)
        later = self.register()  # waits for the retry too
        self.assertEqual(self.thread.queue, [])
        # the folder is gone at the first retry, back at the second
        os.rename(self.folder, self.folder + ".moved")
        with open(self.folder, "w") as f:
            f.write("the store's folder is gone")
        self.clock.advance(RETRY_DELAY)
        with capturedLogs():
            self.thread.run_one()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertNoResult(later)
        os.remove(self.folder)
        os.rename(self.folder + ".moved", self.folder)
        self.clock.advance(RETRY_DELAY * 2)
        with capturedLogs():
            self.thread.run_one()
        self.successResultOf(waiting)
        self.successResultOf(later)
        self.assertEqual((self.writer.snapshots, self.writer.failures), (2, 0))
        self.assertEqual(set(self.reload().nodes), {1, 2, 3})

    def test_flush_at_stop(self) -> None:
        """Shutdown (no write under way): one snapshot, here, and an empty journal."""
        self.start()
        self.acknowledged_after_one_write(self.register())
        self.assertTrue(self.writer.flush())  # nothing unsaved, but the journal holds a record
        self.assertEqual((self.writer.snapshots, self.journal_lines()), (2, 0))
        with open(self.path) as f:
            self.assertEqual(len(json.load(f)["nodes"]), 2)
        self.state.nodes[1].hostname = "last"
        self.writer.changed()
        self.assertTrue(self.writer.flush())
        self.assertEqual(self.journal_lines(), 0)
        self.assertEqual(self.reload().nodes[1].hostname, "last")
        self.assertTrue(self.writer.flush())  # nothing left: nothing written
        self.assertEqual(self.writer.snapshots, 3)

    def no_snapshot_in_the_reactor(self) -> Callable[[], None]:
        """
        Fail the test if the reactor thread makes the whole store (only the
        writer thread may); the function that lifts the ban (a restart may).
        """
        def refused(state: RegistryState) -> bytes:
            raise AssertionError("the whole store was made in the reactor thread")
        return self.patch(RegistryState, "to_bytes", refused).restore

    def stored(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def test_compaction_is_made_by_the_writer_thread(self) -> None:
        """
        Past the journal's limit the store file is rewritten from the mirror in
        the writer thread (issue 12: the reactor made it, ~80 ms at 10,000
        nodes); the file is what the state itself would write.
        """
        self.start()
        self.no_snapshot_in_the_reactor()
        for _ in range(4):
            self.acknowledged_after_one_write(self.register())
        self.assertEqual((self.writer.snapshots, self.journal_lines()), (1, 4))
        self.writer.journal_limit = self.writer.journal.size  # reached: the next write compacts
        self.state.nodes[2].hostname = "renamed"
        self.state.nodes.pop(3)
        self.state.trust.add((1, 2))
        self.acknowledged_after_one_write(self.register())
        self.assertEqual((self.writer.snapshots, self.journal_lines()), (2, 0))
        self.assertEqual(self.stored(), TO_BYTES(self.state))
        reloaded = self.reload()
        self.assertEqual((set(reloaded.nodes), reloaded.nodes[2].hostname), ({1, 2, 4, 5, 6}, "renamed"))

    def test_new_store_and_failed_writes_are_compacted_by_the_writer_thread(self) -> None:
        self.no_snapshot_in_the_reactor()
        self.start()  # a new store: its first write
        self.assertEqual(self.writer.snapshots, 1)

        def full(data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.patch(self.writer.journal, "append", full)
        waiting = self.register()
        self.clock.advance(0)
        with capturedLogs():
            self.thread.run_one()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.clock.advance(RETRY_DELAY)
        with capturedLogs():
            self.thread.run_one()  # the retry: the whole store, from the mirror
        self.successResultOf(waiting)
        self.assertEqual((self.writer.snapshots, self.writer.failures), (2, 0))
        self.assertEqual(self.stored(), TO_BYTES(self.state))

    def test_mirror_that_failed_is_made_again(self) -> None:
        """A record the mirror could not take: loud, and the retry starts from a new view of the state."""
        self.start()

        def broken(record: dict[str, Any]) -> None:
            raise ValueError("a bug")
        self.patch(self.writer.mirror, "apply", broken)
        waiting = self.register()
        self.clock.advance(0)
        with capturedLogs() as events:
            self.thread.run_one()
        self.assertTrue(any("COULD NOT SAVE THE REGISTRY STORE" in formatEvent(e) for e in events))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.clock.advance(RETRY_DELAY)
        self.thread.run_one()
        self.successResultOf(waiting)
        self.assertEqual(self.stored(), self.state.to_bytes())
        self.acknowledged_after_one_write(self.register())  # records again, on the new mirror
        self.assertEqual(self.journal_lines(), 1)
        self.assertEqual(set(self.reload().nodes), {1, 2, 3})

    def test_replaced_container_starts_a_new_mirror(self) -> None:
        self.start()
        self.acknowledged_after_one_write(self.register())
        self.state.proven = {1}  # replaced whole: no longer tracked
        self.no_snapshot_in_the_reactor()
        self.acknowledged_after_one_write(self.register())
        self.assertEqual(self.journal_lines(), 0)
        self.assertEqual(self.stored(), TO_BYTES(self.state))

    def mirror_only_in_the_writer_thread(self) -> list[str]:
        """
        Fail the test if the mirror is formatted, changed or rendered while no
        write runs (in the reactor thread); the names of its calls, in order.
        """
        calls: list[str] = []
        wrong: list[str] = []
        self.addCleanup(lambda: self.assertEqual(wrong, [], "StoreMirror used in the reactor thread"))
        for name in ("build", "apply", "render"):
            original = getattr(StoreMirror, name)

            def guarded(mirror: StoreMirror, *args: Any, _name: str = name, _original: Any = original) -> Any:
                (calls if self.thread.running else wrong).append(_name)
                return _original(mirror, *args)
            self.patch(StoreMirror, name, guarded)
        return calls

    def test_every_compaction_is_made_in_the_writer_thread(self) -> None:
        """
        A new store, a journal past its limit, a container replaced whole: each
        rewrites the store file from the mirror, and only the writer thread
        touches the mirror; the reactor never makes the whole store.
        """
        calls = self.mirror_only_in_the_writer_thread()
        allow = self.no_snapshot_in_the_reactor()
        self.start()
        self.assertEqual((self.writer.snapshots, calls.count("render")), (1, 1))
        for _ in range(3):
            self.acknowledged_after_one_write(self.register())
        self.assertEqual((self.writer.snapshots, self.journal_lines()), (1, 3))
        self.writer.journal_limit = self.writer.journal.size
        self.acknowledged_after_one_write(self.register())
        self.assertEqual((self.writer.snapshots, self.journal_lines()), (2, 0))
        self.writer.journal_limit = 1 << 20
        self.state.trust = {(1, 2)}  # replaced whole: a new view, then a compaction
        self.acknowledged_after_one_write(self.register())
        self.assertEqual((self.writer.snapshots, self.journal_lines()), (3, 0))
        self.acknowledged_after_one_write(self.register())
        self.assertEqual(self.journal_lines(), 1)
        self.assertEqual((calls.count("render"), calls.count("apply")), (3, 6))
        allow()  # a restart after a crash folds the journal into the store: not the reactor of a running registry
        self.assertEqual(json.loads(TO_BYTES(self.reload())), json.loads(TO_BYTES(self.state)))

    def test_changes_during_a_compaction_go_in_the_next_write(self) -> None:
        """
        The compaction holds the state as it was when it was handed to the
        thread; what changes while it runs is the next write's record, and a
        crash after that one loses nothing acknowledged.
        """
        self.mirror_only_in_the_writer_thread()
        self.start()
        self.acknowledged_after_one_write(self.register())
        self.writer.journal_limit = self.writer.journal.size  # the next write compacts
        self.state.nodes[1].hostname = "before"
        first = self.register()
        self.clock.advance(0)
        self.assertEqual(len(self.thread.queue), 1)
        self.state.nodes[1].hostname = "during"
        self.state.nodes[2].tags = ["late"]
        self.state.auth_ts[2] = 7
        second = self.register()
        self.thread.run_one()  # the compaction
        self.successResultOf(first)
        self.assertNoResult(second)
        stored = json.loads(self.stored())
        self.assertEqual((stored["nodes"]["1"]["hostname"], sorted(stored["nodes"])), ("before", ["1", "2", "3"]))
        self.assertNotIn("auth_ts", stored)
        self.assertEqual((self.writer.snapshots, self.journal_lines(), len(self.thread.queue)), (2, 0, 1))
        self.thread.run_one()  # the next group: a record
        self.successResultOf(second)
        self.assertEqual(self.journal_lines(), 1)
        reloaded = self.reload()  # a crash now
        self.assertEqual((reloaded.nodes[1].hostname, reloaded.nodes[2].tags, reloaded.auth_ts),
                         ("during", ["late"], {2: 7}))
        self.assertEqual(json.loads(TO_BYTES(reloaded)), json.loads(TO_BYTES(self.state)))

    def test_writes_after_a_flush_compact_in_the_writer_thread(self) -> None:
        """A clean stop's snapshot (in the reactor) leaves the mirror behind: the next write starts a new one."""
        self.start()
        self.acknowledged_after_one_write(self.register())
        self.assertTrue(self.writer.flush())
        self.assertEqual((self.writer.snapshots, self.journal_lines()), (2, 0))
        calls = self.mirror_only_in_the_writer_thread()
        allow = self.no_snapshot_in_the_reactor()
        self.state.nodes[1].hostname = "after the flush"
        self.acknowledged_after_one_write(self.register())
        self.assertEqual((self.writer.snapshots, self.journal_lines()), (3, 0))
        self.assertEqual(self.stored(), TO_BYTES(self.state))
        self.acknowledged_after_one_write(self.register())
        self.assertEqual(self.journal_lines(), 1)
        self.assertIn("render", calls)
        allow()
        self.assertEqual(self.reload().nodes[1].hostname, "after the flush")

    def test_touch_is_lazy_until_a_change(self) -> None:
        """Replay state alone is written within ``touch_delay``; a change brings that write forward."""
        self.start()
        self.state.auth_ts[1] = 5
        self.writer.touched()
        self.clock.advance(1)
        self.assertEqual(self.thread.queue, [])
        d = self.register()
        self.clock.advance(0)
        self.thread.run_one()
        self.successResultOf(d)
        self.assertEqual(self.reload().auth_ts, {1: 5})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_change_that_changed_nothing(self) -> None:
        """A change the state does not show (already undone) writes no record, and is acknowledged."""
        self.start()
        self.writer.changed()
        self.clock.advance(0)
        self.thread.run_one()
        self.successResultOf(self.writer.when_saved(self.writer.generation))
        self.assertFalse(os.path.exists(journal_path(self.path)) and self.journal_lines())

    def test_idle(self) -> None:
        self.start()
        self.successResultOf(self.writer.idle())
        self.register()
        self.clock.advance(0)
        idle = self.writer.idle()
        self.assertNoResult(idle)
        self.assertFalse(self.writer.flush())  # never while a write is under way
        self.thread.run_one()
        self.successResultOf(idle)

    def test_damaged_journal_refused(self) -> None:
        """A bad record with good ones after it is damage, not a crash: the registry does not start."""
        self.start()
        with open(journal_path(self.path), "wb") as f:
            f.write(b"00000000 {}\n" + encode_record(1, {"add": {"proven": [5]}}))
        with self.assertRaises(StoreError) as caught:
            load_store(self.path)
        self.assertIn("damaged journal", str(caught.exception))
        self.assertTrue(os.path.exists(journal_path(self.path)))  # left for whoever repairs it

    def test_journal_with_malformed_auth_ts_refused(self) -> None:
        """
        A whole record (its checksum right) whose replay state is not Unix
        milliseconds: the start is refused, and the store and the journal are
        left as they are.
        """
        self.start()
        self.acknowledged_after_one_write(self.register())
        with open(self.path, "rb") as f:
            store_bytes = f.read()
        with open(journal_path(self.path), "rb") as f:
            good = f.read()
        for bad in ({"7": "1"}, {"7": -1}, {"7": True}, {"7": 1.5}, {"7": 1 << 53}, {"x": 1}, {"7": None}):
            journal = good + encode_record(self.state.journal_seq + 1, {"set": {"auth_ts": bad}})
            with open(journal_path(self.path), "wb") as f:
                f.write(journal)
            with self.assertRaises(StoreError, msg=repr(bad)) as caught:
                load_store(self.path)
            self.assertIn("auth_ts", str(caught.exception))
            with open(self.path, "rb") as f:
                self.assertEqual(f.read(), store_bytes)
            with open(journal_path(self.path), "rb") as f:
                self.assertEqual(f.read(), journal)

    def test_journal_that_cannot_be_cut_back_refused(self) -> None:
        """A journal whose torn end cannot be cut off stops the start, loudly, and stays."""
        self.start()
        self.acknowledged_after_one_write(self.register())
        with open(journal_path(self.path), "ab") as f:
            f.write(b"0badf00d {")

        def unwritable(path: str, size: int) -> None:
            raise PermissionError(errno.EACCES, "Permission denied")
        self.patch(store, "truncate_durably", unwritable)
        with capturedLogs(), self.assertRaises(StoreError) as caught:
            load_store(self.path)
        self.assertIn("could not be cut back", str(caught.exception))
        self.assertTrue(os.path.exists(journal_path(self.path)))

    def test_journal_folded_later_fails_loudly_and_is_retried(self) -> None:
        """The fold is the restarted writer's first write: if the store cannot be written, it is retried."""
        self.start()
        self.acknowledged_after_one_write(self.register())
        state = self.reload()
        self.writer = self.make(state)
        self.writer.changed()
        self.clock.advance(0)

        def unwritable(path: str, data: bytes) -> None:
            raise PermissionError(errno.EACCES, "Permission denied")
        from pilot.services import forked  # the compaction's writer (in this thread here)
        patched = self.patch(forked, "atomic_write_bytes", unwritable)
        with capturedLogs() as events:
            self.thread.run_one()
        patched.restore()
        self.assertTrue(any("COULD NOT SAVE" in formatEvent(e) for e in events))
        self.assertEqual(len(self.flushLoggedErrors(PermissionError)), 1)
        self.assertEqual(self.journal_lines(), 1)  # still there: nothing lost
        self.clock.advance(RETRY_DELAY)
        self.thread.run_one()
        self.assertEqual(self.journal_lines(), 0)
        self.assertEqual(set(self.reload().nodes), {1, 2})


class SidecarWriteTests(SynchronousTestCase):
    """
    The store's sidecar (``pilot.server.sidecar``) is written at a clean stop,
    after the store, removed before any later write of the store, and a
    failure to write it costs only the next start's speed.
    """

    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "registry.json")
        self.side = sidecar.path_of(self.path)
        self.clock = Clock()
        self.thread = ManualThread()
        self.state = RegistryState(created=T0)
        for i in range(1, 4):
            self.add(i)

    def add(self, node_id: int) -> None:
        key = node_id.to_bytes(4, "big") * 8
        self.state.nodes[node_id] = Node(id=node_id, public_key=key, last_seen=T0, hostname=f"n{node_id}")
        self.state.index_key(key, node_id)

    def make(self, **kw: Any) -> DurableWriter:
        return DurableWriter(self.path, self.state, self.clock, self.thread, **kw)

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def test_flush_writes_it_after_the_store(self) -> None:
        writer = self.make()
        self.assertTrue(writer.flush())
        self.assertTrue(writer.sidecar_current)
        data = self.read(self.path)
        self.assertEqual(sidecar.decode(self.read(self.side), data).to_bytes(), data)
        loaded = store.load(self.path)
        self.assertTrue(loaded.sidecar_current)
        assert loaded.state is not None
        self.assertEqual(loaded.state.to_bytes(), data)

    def test_nothing_written_at_stop_while_it_is_current(self) -> None:
        self.assertTrue(self.make().flush())
        before = (self.read(self.path), os.stat(self.path).st_ino, os.stat(self.side).st_ino)
        writer = self.make(sidecar_current=True)
        self.assertTrue(writer.flush())
        self.assertEqual((self.read(self.path), os.stat(self.path).st_ino, os.stat(self.side).st_ino), before)

    def test_unchanged_store_without_one_rewritten_at_stop(self) -> None:
        """A store loaded without a current sidecar gets one (and is written again with it) at a clean stop."""
        with open(self.path, "wb") as f:
            f.write(json.dumps(self.state.to_json(), indent=2).encode())  # as a hand or the reference wrote it
        writer = self.make()
        self.assertEqual((writer.compact_due, writer.dirty), (False, False))
        self.assertTrue(writer.flush())
        self.assertEqual(self.read(self.path), self.state.to_bytes())
        self.assertTrue(store.load(self.path).sidecar_current)

    def test_a_compaction_removes_it_first(self) -> None:
        writer = self.make(journal_limit=0)  # every write compacts
        self.assertTrue(writer.flush())
        self.assertTrue(os.path.exists(self.side))
        self.add(9)
        writer.changed()
        self.clock.advance(0)
        self.assertFalse(writer.sidecar_current)
        self.assertTrue(os.path.exists(self.side))  # the writer thread has not run yet
        self.thread.run_one()
        self.assertEqual(writer.snapshots, 2)
        self.assertFalse(os.path.exists(self.side))
        self.assertFalse(store.load(self.path).sidecar_current)
        self.assertTrue(writer.flush())  # nothing unsaved, but no sidecar: the stop writes both
        self.assertTrue(store.load(self.path).sidecar_current)

    def test_a_record_keeps_it_and_the_restart_replays_from_the_json(self) -> None:
        """A journal record leaves the store (and its sidecar) as they are; a crash then replays the JSON."""
        self.assertTrue(self.make().flush())
        writer = self.make(sidecar_current=True)  # started again on them
        self.add(9)
        writer.changed()
        self.clock.advance(0)
        self.thread.run_one()
        self.assertTrue(os.path.exists(self.side))
        loaded = store.load(self.path)
        self.assertFalse(loaded.sidecar_current)
        assert loaded.state is not None
        self.assertEqual(set(loaded.state.nodes), {1, 2, 3, 9})

    def test_sidecar_not_written(self) -> None:
        """The store is saved, the stop succeeds, the next start checks the store in full."""
        def fail(state: RegistryState, store: bytes) -> bytes:
            raise OSError(errno.ENOSPC, "no space")
        self.patch(sidecar, "encode", fail)
        writer = self.make()
        with capturedLogs() as events:
            self.assertTrue(writer.flush())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertIn("sidecar", formatEvent(events[-1]))
        self.assertFalse(writer.sidecar_current)
        self.assertFalse(os.path.exists(self.side))
        self.assertEqual(len(json.loads(self.read(self.path))["nodes"]), 3)

    def test_a_sidecar_that_cannot_be_removed_stops_no_write(self) -> None:
        """The stale sidecar stays (it no longer matches the store, so it is not used); the store is written."""
        self.assertTrue(self.make().flush())
        writer = self.make(journal_limit=0, sidecar_current=True)

        def fail(path: str) -> None:
            raise PermissionError(errno.EACCES, "denied", path)
        self.patch(durable, "remove_durably", fail)
        self.add(9)
        writer.changed()
        self.clock.advance(0)
        self.thread.run_one()  # a compaction
        self.assertEqual((writer.snapshots, writer.failures), (1, 0))
        self.assertTrue(os.path.exists(self.side))
        self.add(10)
        writer.changed()
        self.assertTrue(writer.flush())
        loaded = store.load(self.path)
        assert loaded.state is not None
        self.assertEqual(set(loaded.state.nodes), {1, 2, 3, 9, 10})
        self.assertTrue(loaded.sidecar_current)  # the one written after the store, over the stale one

    def test_store_not_rewritten_for_it(self) -> None:
        """Nothing unsaved and the rewrite fails: the store on disk is whole, the stop succeeds."""
        original = json.dumps(self.state.to_json()).encode()
        with open(self.path, "wb") as f:
            f.write(original)
        writer = self.make()

        def fail(path: str, data: bytes) -> None:
            raise OSError(errno.EROFS, "read-only")
        self.patch(durable, "atomic_write_bytes", fail)
        with capturedLogs():
            self.assertTrue(writer.flush())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(writer.failures, 0)
        self.assertEqual(self.read(self.path), original)

    def test_rendezvous_restart_uses_it(self) -> None:
        """A rendezvous stopped cleanly starts again from the sidecar and, unchanged, writes nothing at stop."""
        reactor = FakeReactor()
        reactor.advance(1_800_000_000)
        settings = RendezvousSettings(store=self.path, raise_open_files=False)
        with open(self.path, "wb") as f:
            f.write(self.state.to_bytes())
        for from_sidecar in (False, True, True):
            service = RendezvousService(settings, reactor, run_writes=maybeDeferred)
            assert service.store is not None
            self.assertEqual(service.store.sidecar_current, from_sidecar)
            self.assertEqual(set(service.registry.state.nodes), {1, 2, 3})
            with capturedLogs():
                service.startService()
                self.successResultOf(service.stopService())
            self.assertTrue(os.path.exists(self.side))


class DefaultModeTests(SynchronousTestCase):
    """Without --durable the store takes the same journal (issue 12 (b)); only the replies do not wait."""

    def test_default_mode_appends_records(self) -> None:
        reactor = FakeReactor()
        reactor.advance(1_800_000_000)
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "registry.json")
        service = RendezvousService(RendezvousSettings(store=path, raise_open_files=False), reactor,
                                    run_writes=maybeDeferred)
        self.assertIsNone(service.factory.durability)
        assert isinstance(service.store, DurableWriter)
        with capturedLogs():
            service.startService()
        reactor.advance(1)
        self.no_snapshot_in_the_reactor()
        for seed in range(1, 4):
            reply = service.registry.handle({"type": "register", "public_key": b64(bytes([seed]) * 32),
                                             "listen_addr": "198.51.100.4:4000"}, Peer("198.51.100.4", 4000))
            self.assertEqual(reply["type"], "register_ok")
            reactor.advance(0.25)  # the coalescing delay: one record each
        with open(journal_path(path), "rb") as f:
            self.assertEqual(f.read().count(b"\n"), 3)
        with open(path) as f:
            self.assertEqual(json.load(f)["nodes"], {})  # the store file itself was not rewritten
        self.forbidden = False  # a clean stop may: the store file then holds everything
        with capturedLogs():
            self.successResultOf(service.stopService())
        with open(path) as f:
            self.assertEqual(len(json.load(f)["nodes"]), 3)  # a clean stop: the store holds everything

    def test_a_replayed_journal_is_folded_right_after_start(self) -> None:
        """After a crash: the start replays the journal; the writer folds it into the store at once."""
        reactor = FakeReactor()
        reactor.advance(1_800_000_000)
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "registry.json")
        settings = RendezvousSettings(store=path, raise_open_files=False)
        service = RendezvousService(settings, reactor, run_writes=maybeDeferred)
        with capturedLogs():
            service.startService()
        reactor.advance(1)
        for seed in range(1, 4):
            service.registry.handle({"type": "register", "public_key": b64(bytes([seed]) * 32),
                                     "listen_addr": "198.51.100.4:4000"}, Peer("198.51.100.4", 4000))
            reactor.advance(0.25)
        with open(journal_path(path), "rb") as f:
            self.assertEqual(f.read().count(b"\n"), 3)  # then a crash: no clean stop
        assert service.store is not None
        service.store.close()  # (only its file descriptor: nothing is written)
        with capturedLogs():
            again = RendezvousService(settings, reactor, run_writes=maybeDeferred)
        self.assertEqual(len(again.registry.state.nodes), 3)
        with open(path) as f:
            self.assertEqual(json.load(f)["nodes"], {})  # not rewritten before listening
        with capturedLogs():
            again.startService()
        reactor.advance(1)
        self.assertEqual(os.path.getsize(journal_path(path)), 0)
        with open(path) as f:
            self.assertEqual(len(json.load(f)["nodes"]), 3)
        with capturedLogs():
            self.successResultOf(again.stopService())

    def no_snapshot_in_the_reactor(self) -> None:
        self.forbidden = True

        def refused(state: RegistryState) -> bytes:
            if self.forbidden:
                raise AssertionError("the whole store was made in the reactor thread")
            return TO_BYTES(state)
        self.patch(RegistryState, "to_bytes", refused)


def b64(data: bytes) -> str:
    import base64
    return base64.b64encode(data).decode("ascii")


class ReplayStateAcrossRestartTests(SynchronousTestCase):
    """
    The replay state (``auth_ts``: the newest signature of each key the
    registry or the beacon accepted) reaches the store through the journal, in
    both modes, and a registry started after a crash refuses what was captured
    before it (issue 12: the nonce memory is not saved).
    """

    NOW = 1_800_000_000

    def setUp(self) -> None:
        folder = self.mktemp()
        os.makedirs(folder)
        self.path = os.path.join(folder, "registry.json")
        self.alice = Identity.from_seed(b"\x0a" * 32)
        self.nonces = iter(range(1, 1 << 30))

    def service(self, durable: bool, seconds: float) -> tuple[Any, Any]:
        """A rendezvous on the store (its writes run inline) and its reactor, started at ``seconds``."""
        reactor = FakeReactor()
        reactor.advance(seconds)
        service = RendezvousService(RendezvousSettings(store=self.path, durable=durable, raise_open_files=False),
                                    reactor, run_writes=maybeDeferred)
        assert isinstance(service.store, DurableWriter)
        self.addCleanup(service.store.close)
        with capturedLogs():
            service.startService()
        return service, reactor

    def signed(self, reactor: Any, msg: dict[str, Any]) -> dict[str, Any]:
        return sign_request(msg, self.alice.sign, int(reactor.seconds() * 1000), next(self.nonces).to_bytes(16, "big"),
                            legacy=False)

    def proof(self, reactor: Any, base: bytes) -> bytes:
        return with_proof(base, self.alice.sign, int(reactor.seconds() * 1000), next(self.nonces).to_bytes(8, "big"))

    def captured_then_crashed(self, durable: bool) -> tuple[int, list[dict[str, Any]], list[bytes]]:
        """
        alice registers, sends a heartbeat and a beacon proof; all are
        captured; the replay state is written (lazily: within the writer's
        ``touch_delay``); then a crash (no clean stop).
        """
        service, reactor = self.service(durable, self.NOW)
        register = self.signed(reactor, {"type": "register", "public_key": self.alice.public_key_b64,
                                         "listen_addr": "198.51.100.4:4000"})
        reply = service.registry.handle(register, Peer("198.51.100.4", 4000))
        self.assertEqual(reply["type"], "register_ok", reply)
        node_id = int(reply["node_id"])
        reactor.advance(1)
        heartbeat = self.signed(reactor, {"type": "heartbeat", "node_id": node_id})
        self.assertEqual(service.registry.handle(heartbeat, Peer("198.51.100.4", 4000))["type"], "heartbeat_ok")
        reactor.advance(1)
        discover = self.proof(reactor, Discover(node_id).encode())
        self.assertEqual(len(service.beacon.datagram_received(discover, ("198.51.100.4", 4000))), 1)
        punch = self.proof(reactor, PunchRequest(node_id, node_id + 1).encode())
        newest = int(reactor.seconds() * 1000)
        self.assertEqual(service.registry.state.auth_ts[node_id], newest)
        reactor.advance(service.store.touch_delay)
        with open(journal_path(self.path), "rb") as f:
            self.assertIn(b'"auth_ts":{"%d":%d}' % (node_id, newest), f.read())  # on disk, not yet in the store
        self.assertEqual(service.store.saved, service.store.generation)
        return node_id, [register, heartbeat], [discover, punch]

    def check_replays_refused(self, durable: bool) -> None:
        node_id, requests, proofs = self.captured_then_crashed(durable)
        restarted, reactor = self.service(durable, self.NOW + 15)
        self.assertEqual(restarted.registry.replay_floor(node_id), int((self.NOW + 2) * 1000))
        attacker = Peer("203.0.113.66", 6666)
        for msg in requests:
            reply = restarted.registry.handle(dict(msg), attacker)
            self.assertEqual((reply["type"], reply.get("code")), ("error", "unauthorized"), reply)
            self.assertIn("restarted", reply["error"])
        self.assertEqual(restarted.registry.state.nodes[node_id].real_addr, "198.51.100.4:4000")
        restarted.beacon._record(node_id, ("198.51.100.4", 4000))
        for data in proofs:
            self.assertEqual(restarted.beacon.datagram_received(data, ("203.0.113.66", 6666)), [])
            self.assertIn("restarted", restarted.beacon.last_refusal[1])
        self.assertEqual(restarted.beacon.endpoint_of(node_id), ("198.51.100.4", 4000))
        # alice's own new requests pass, and raise the floor for the next restart
        fresh = self.signed(reactor, {"type": "heartbeat", "node_id": node_id})
        self.assertEqual(restarted.registry.handle(fresh, Peer("198.51.100.4", 4000))["type"], "heartbeat_ok")
        self.assertEqual(restarted.registry.state.auth_ts[node_id], fresh["auth"]["ts"])

    def test_default_mode(self) -> None:
        self.check_replays_refused(durable=False)

    def test_durable(self) -> None:
        self.check_replays_refused(durable=True)

    def registered(self, durable: bool) -> tuple[Any, Any, int]:
        service, reactor = self.service(durable, self.NOW)
        register = self.signed(reactor, {"type": "register", "public_key": self.alice.public_key_b64,
                                         "listen_addr": "198.51.100.4:4000"})
        node_id = int(service.registry.handle(register, Peer("198.51.100.4", 4000))["node_id"])
        reactor.advance(1)  # the registration is written
        return service, reactor, node_id

    def on_disk(self, node_id: int, ts: int) -> bool:
        with open(journal_path(self.path), "rb") as f:
            return b'"auth_ts":{"%d":%d}' % (node_id, ts) in f.read()

    def test_durable_reply_waits_for_replay_state(self) -> None:
        """
        With ``--durable`` a signed request that changes nothing but the
        replay state (a heartbeat) is a change: its reply is held until the
        replay state is on disk, so nothing answered can be replayed after a
        crash; a beacon proof's replay state is written at once too.
        """
        service, reactor, node_id = self.registered(durable=True)
        before = service.store.generation
        heartbeat = self.signed(reactor, {"type": "heartbeat", "node_id": node_id})
        self.assertEqual(service.registry.handle(heartbeat, Peer("198.51.100.4", 4000))["type"], "heartbeat_ok")
        self.assertGreater(service.store.generation, before)  # the connection holds the reply for it
        self.assertFalse(self.on_disk(node_id, heartbeat["auth"]["ts"]))
        reactor.advance(0)
        self.assertTrue(self.on_disk(node_id, heartbeat["auth"]["ts"]))
        self.assertEqual(service.store.saved, service.store.generation)
        reactor.advance(1)
        discover = self.proof(reactor, Discover(node_id).encode())
        self.assertEqual(len(service.beacon.datagram_received(discover, ("198.51.100.4", 4000))), 1)
        reactor.advance(0)
        self.assertTrue(self.on_disk(node_id, int(reactor.seconds() * 1000)))

    def test_default_mode_replay_state_within_flush_delay(self) -> None:
        """Without ``--durable`` replay state is written with the changes' delay (0.25 s), not later."""
        service, reactor, node_id = self.registered(durable=False)
        heartbeat = self.signed(reactor, {"type": "heartbeat", "node_id": node_id})
        before = service.store.generation
        self.assertEqual(service.registry.handle(heartbeat, Peer("198.51.100.4", 4000))["type"], "heartbeat_ok")
        self.assertEqual(service.store.generation, before)  # no reply waits in this mode
        reactor.advance(0.2)
        self.assertFalse(self.on_disk(node_id, heartbeat["auth"]["ts"]))
        reactor.advance(0.05)
        self.assertTrue(self.on_disk(node_id, heartbeat["auth"]["ts"]))


class WriterThreadTests(SynchronousTestCase):
    def test_switch_interval(self) -> None:
        """While the writer thread runs, the reactor's thread gets the interpreter back within 1 ms."""
        import sys

        from twisted.internet.testing import MemoryReactor

        from pilot.services.durable import SWITCH_INTERVAL, WriterThread
        before = sys.getswitchinterval()
        self.addCleanup(sys.setswitchinterval, before)
        thread = WriterThread(MemoryReactor())
        thread.start()
        try:
            self.assertLessEqual(sys.getswitchinterval(), SWITCH_INTERVAL + 1e-9)
        finally:
            thread.stop()
        self.assertAlmostEqual(sys.getswitchinterval(), before)
        thread.stop()  # again: nothing
        self.assertAlmostEqual(sys.getswitchinterval(), before)
