"""
Tests for pilot.services.forked: a compaction rendered and written by a
child process (real forks of the test process), byte for byte what the
writer thread would write, and a child's failure a failed write that loses
nothing.
"""

from __future__ import annotations

import errno
import gc
import os
import select
import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from pilot.server.compaction import StateView, StoreMirror
from pilot.server.state import RegistryState
from pilot.services import forked
from pilot.services.durable import DurableWriter, WriterThread
from pilot.services.forked import ChildFailed, ForkedStoreWriter, write_in_thread
from pilot.services.rendezvous import RendezvousService, RendezvousSettings
from pilot.services.store import RETRY_DELAY

from tests.server.test_state import sample_state
from tests.services import test_durable
from tests.services.test_rendezvous import FakeReactor

if not hasattr(os, "fork"):
    raise SkipTest("no os.fork here: the store is written in the writer thread")


def mirror_of(state: RegistryState) -> StoreMirror:
    return StoreMirror(StateView.of(state))


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def fail_in_render(mirror: StoreMirror, path: str) -> None:
    raise ValueError("a mirror that cannot be rendered")


def killed(mirror: StoreMirror, path: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class ForkedStoreWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.state = sample_state()

    def test_same_bytes_as_in_the_thread(self) -> None:
        """The child writes the very file the writer thread would, and the state itself would."""
        in_thread, in_child = (os.path.join(self.folder, name) for name in ("thread.json", "child.json"))
        write_in_thread(mirror_of(self.state), in_thread)
        writer = ForkedStoreWriter()
        writer(mirror_of(self.state), in_child)
        self.assertEqual(read(in_child), read(in_thread))
        self.assertEqual(read(in_child), self.state.to_bytes())
        self.assertEqual(writer.children, 1)
        self.assertGreater(writer.child_maxrss, 0)
        self.assertEqual(sorted(os.listdir(self.folder)), ["child.json", "thread.json"])  # no temporary file

    def test_mirror_built_in_the_parent(self) -> None:
        """The parent's mirror is formatted before the fork: the records that follow need it anyway."""
        mirror = mirror_of(self.state)
        ForkedStoreWriter()(mirror, os.path.join(self.folder, "s.json"))
        self.assertIsNone(mirror.view)

    def test_written_in_the_thread_without_fork(self) -> None:
        pids: list[int] = []

        def write(mirror: StoreMirror, path: str) -> None:
            pids.append(os.getpid())
            write_in_thread(mirror, path)
        path = os.path.join(self.folder, "s.json")
        writer = ForkedStoreWriter(fork=None, write=write)
        writer(mirror_of(self.state), path)
        self.assertEqual((pids, writer.children), ([os.getpid()], 0))
        self.assertEqual(read(path), self.state.to_bytes())

    def test_written_in_the_thread_when_the_fork_fails(self) -> None:
        """No child to be had (EAGAIN, ENOMEM): logged, and written here rather than not at all."""
        def no_fork() -> int:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        path = os.path.join(self.folder, "s.json")
        writer = ForkedStoreWriter(fork=no_fork)
        with capturedLogs() as events:
            writer(mirror_of(self.state), path)
        self.assertEqual((writer.fork_failures, writer.children), (1, 0))
        self.assertTrue(any("could not fork" in formatEvent(e) for e in events))
        self.assertEqual(read(path), self.state.to_bytes())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_child_that_raises(self) -> None:
        """Its exception's type and text come back in the parent's error (the child logs nothing)."""
        writer = ForkedStoreWriter(write=fail_in_render)
        e = self.assertRaises(ChildFailed, writer, mirror_of(self.state), os.path.join(self.folder, "s.json"))
        self.assertIn("status 1: ValueError: a mirror that cannot be rendered", str(e))
        self.assertEqual(os.listdir(self.folder), [])

    def test_child_os_error_keeps_its_errno(self) -> None:
        """An OSError in the child is one in the parent, with its errno (a full disk says so)."""
        def full(path: str, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        self.patch(forked, "atomic_write_bytes", full)
        path = os.path.join(self.folder, "s.json")
        e = self.assertRaises(OSError, ForkedStoreWriter(), mirror_of(self.state), path)
        self.assertEqual(e.errno, errno.ENOSPC)
        self.assertIn("No space left on device", str(e))
        self.assertIn(path, str(e))

    def test_child_killed(self) -> None:
        writer = ForkedStoreWriter(write=killed)
        e = self.assertRaises(ChildFailed, writer, mirror_of(self.state), os.path.join(self.folder, "s.json"))
        self.assertIn(f"killed by signal {int(signal.SIGKILL)}", str(e))

    def test_child_finishes_through_a_stop_signal(self) -> None:
        """SIGTERM and SIGINT to the group do not end the child's write; it runs no collection."""
        def signalled(mirror: StoreMirror, path: str) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            if gc.isenabled():
                raise AssertionError("the collector is on in the child")
            write_in_thread(mirror, path)
        path = os.path.join(self.folder, "s.json")
        ForkedStoreWriter(write=signalled)(mirror_of(self.state), path)
        self.assertEqual(read(path), self.state.to_bytes())
        self.assertTrue(gc.isenabled())  # here, in the parent

    def test_child_dies_with_its_parent(self) -> None:
        """
        The rendezvous killed mid-compaction: its child is killed too (it
        must not rename an old store over the one a restarted rendezvous
        wrote).  A middle process stands in for the rendezvous; its child
        blocks; the pipe both hold says when the child runs, and its end when
        the child is gone.
        """
        if forked._die_with_parent() is None:
            raise SkipTest("no prctl(PR_SET_PDEATHSIG) here")
        gone_r, gone_w = os.pipe()  # EOF here once the middle process and its child are gone
        block_r, block_w = os.pipe()  # the child waits on it (EOF only when this test closes it)
        path = os.path.join(self.folder, "s.json")

        def blocked(mirror: StoreMirror, path: str) -> None:
            os.write(gone_w, b"s")  # started
            os.read(block_r, 1)
            write_in_thread(mirror, path)
        middle = os.fork()
        if middle == 0:
            try:
                os.close(block_w)
                os.close(gone_r)
                ForkedStoreWriter(write=blocked)(mirror_of(self.state), path)
            finally:
                os._exit(0)
        os.close(gone_w)
        os.close(block_r)
        self.addCleanup(os.close, block_w)
        self.addCleanup(os.close, gone_r)
        self.assertEqual(os.read(gone_r, 1), b"s")  # the child is running: now the middle dies
        os.kill(middle, signal.SIGKILL)
        self.assertEqual(os.waitpid(middle, 0)[1] & 0x7f, signal.SIGKILL)
        ready, _, _ = select.select([gone_r], [], [], 30.0)  # a bound, not a measure: EOF comes at once
        self.assertEqual((ready, os.read(gone_r, 1)), ([gone_r], b""))
        self.assertFalse(os.path.exists(path))

    def test_child_killed_mid_write_leaves_the_old_store(self) -> None:
        """Killed after its temporary file is written, before the rename: the old store is whole."""
        path = os.path.join(self.folder, "s.json")
        write_in_thread(mirror_of(RegistryState()), path)
        old = read(path)

        def killed_before_rename(src: str, dst: str) -> None:
            os.kill(os.getpid(), signal.SIGKILL)
        self.patch(os, "replace", killed_before_rename)
        self.assertRaises(ChildFailed, ForkedStoreWriter(), mirror_of(self.state), path)
        self.assertEqual(read(path), old)


class Ended(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class UnderTheReactorTests(TestCase):
    """The writer thread of a running reactor, whose SIGCHLD handler reaps the processes it spawned."""

    @inlineCallbacks
    def test_the_status_is_ours(self) -> Any:
        """
        Twisted reaps only its own children (``reapAllProcesses`` waits for
        each registered pid): the writer thread's ``wait4`` gets its child's
        status, a success and a failure, while a process Twisted spawned ends.
        """
        thread = WriterThread(reactor)
        thread.start()
        self.addCleanup(thread.stop)
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "s.json")
        state = sample_state()
        spawned = Ended()
        reactor.spawnProcess(spawned, "/bin/sh", ["sh", "-c", "exit 0"], env={})
        yield thread.run(lambda: ForkedStoreWriter()(mirror_of(state), path))
        self.assertNotEqual(signal.getsignal(signal.SIGCHLD), signal.SIG_DFL)  # Twisted's handler is in place
        self.assertEqual(read(path), state.to_bytes())
        failed = ForkedStoreWriter(write=fail_in_render)
        e = yield self.assertFailure(thread.run(lambda: failed(mirror_of(state), path)), ChildFailed)
        self.assertIn("status 1", str(e))
        yield spawned.ended


class ForkedDurableWriterTests(test_durable.DurableWriterTests):
    """
    Every test of the writer again, its compactions written by real children
    (those that watch the mirror's calls are left to the in-thread run: a
    child's calls happen in the child).
    """

    def make(self, state: RegistryState, **kw: Any) -> DurableWriter:
        self.forked = ForkedStoreWriter()
        return DurableWriter(self.path, state, self.clock, self.thread, write_store=self.forked, **kw)

    def test_forked(self) -> None:
        """The compactions here are the children's."""
        self.start()
        self.assertEqual((self.writer.snapshots, self.forked.children), (1, 1))

    def test_child_that_fails_is_retried_and_loses_nothing(self) -> None:
        """A child that raises, then one that is killed: failed writes, the journal kept; the retry writes all."""
        self.start()
        for _ in range(3):
            self.acknowledged_after_one_write(self.register())
        self.writer.journal_limit = self.writer.journal.size  # the next write compacts
        before = read(self.path)
        for broken in (fail_in_render, killed):
            self.forked.write = broken
            waiting = self.register()
            self.clock.advance(RETRY_DELAY * 4)
            with capturedLogs():
                self.thread.run_one()
            self.assertEqual(len(self.flushLoggedErrors(ChildFailed)), 1)
            self.assertNoResult(waiting)
            self.assertEqual(read(self.path), before)
            self.assertEqual(self.journal_lines(), 3)  # the journal is kept: a crash now loses nothing
            self.assertEqual(set(self.reload().nodes), {1, 2, 3, 4})  # the journal, not the last change
        self.forked.write = write_in_thread
        self.clock.advance(RETRY_DELAY * 8)
        self.thread.run_one()
        self.successResultOf(waiting)
        self.assertEqual((self.writer.failures, self.journal_lines()), (0, 0))
        self.assertEqual(set(self.reload().nodes), {1, 2, 3, 4, 5, 6})

    def _in_the_child(self) -> None:
        raise SkipTest("they watch the mirror's calls, which a child makes in its own memory; "
                       "DurableWriterTests runs them with the compaction in the writer thread")

    test_every_compaction_is_made_in_the_writer_thread = _in_the_child
    test_writes_after_a_flush_compact_in_the_writer_thread = _in_the_child


class RendezvousTests(SynchronousTestCase):
    def test_its_writer_thread_compacts_in_a_child(self) -> None:
        """The rendezvous' own writer thread has its compactions written by a child; an injected runner not."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        settings = RendezvousSettings(store=os.path.join(folder, "registry.json"), raise_open_files=False)
        service = RendezvousService(settings, FakeReactor())
        assert service.store is not None
        self.assertIsInstance(service.store.write_store, ForkedStoreWriter)
        injected = RendezvousService(settings, FakeReactor(), run_writes=maybeDeferred)
        assert injected.store is not None
        self.assertIs(injected.store.write_store, write_in_thread)
