# -*- test-case-name: tests.services.test_forked -*-
"""
A compaction of the registry's store written by a child process (the design
of Redis' ``BGSAVE``), so that it never holds the rendezvous' interpreter.

:class:`pilot.services.durable.DurableWriter` rewrites the whole store now and
then (a compaction).  Rendered in its writer thread, the
:class:`pilot.server.compaction.StoreMirror` of 100,000 nodes took about
1.25 s of interpreter time, and every system call of the reactor thread gave
the interpreter up and waited to get it back meanwhile: its passes stalled
however short the switch interval (``docs/performance.md``, issue 16).
:class:`ForkedStoreWriter` instead forks in the writer thread; the CHILD renders
the mirror and writes the store file through the same
:func:`pilot.persist.atomic_write_bytes` (a temporary file, ``fsync``, rename,
the folder's ``fsync``: the same bytes, the same crash safety), then leaves with
``os._exit`` (0, or 1 on any exception: no ``atexit``, no logging, no flushing
of the parent's buffers, the reactor never touched).  The writer thread waits
for it in ``os.wait4``, which releases the interpreter: the compaction's CPU
is the child's, on another core.  A non-zero status or a signal is a failed
write (:class:`ChildFailed`, or the child's ``OSError`` with its errno): the
writer's failure path logs it and retries, and the journal, not yet emptied,
still holds every change.

What forking costs and shares:

* ``os.fork`` itself copies the page tables, with the interpreter held: a
  few ms for a process of some hundreds of MB (measured in
  ``docs/performance.md``); :attr:`ForkedStoreWriter.fork_seconds` holds
  the last one.
* Memory is copy-on-write: the child writes only the pages it allocates
  (the rendered file) and those whose objects' reference counts it touches;
  :attr:`ForkedStoreWriter.child_maxrss` holds the child's peak as the kernel
  counts it (shared pages included).
* The child inherits every file descriptor (sockets, the reactor's epoll and
  wakeup pipe, the journal): it uses none of them and exits as soon as the
  file is written, which closes only its own copies.  A port the parent
  closes meanwhile stays bound until then.  It drops the signal wakeup
  descriptor (a signal to it must not wake the parent's reactor) and ignores
  SIGINT and SIGTERM: a stop signalled to the whole process group (Ctrl-C, a
  service manager) lets it finish its write (about a second at 100,000
  nodes: the parent's shutdown waits for its writer thread anyway) instead
  of turning a clean stop into a failed write; SIGKILL still ends it.
* The child's cyclic garbage collector is off: a collection would walk, and
  so copy, every tracked object of the parent's heap; rendering makes no
  cycles, and the child exits when it is done.
* The parent's own writes to pages it still shares with the child copy them
  (a page fault each) while the child lives: part of the cost is the
  parent's, spread over the child's life.
* The child must not outlive the rendezvous: killed (``kill -9``, a crash)
  and restarted at once, a new rendezvous could write a newer store that an
  orphaned child's rename then replaced with an older one, the journal
  already emptied.  On Linux the child asks the kernel for SIGKILL when the
  thread that forked it ends (``prctl(PR_SET_PDEATHSIG)``; that thread
  waits for the child, so it ends only when the process dies), and leaves
  at once if its parent is already gone.  Elsewhere a service manager that
  stops the whole process group (systemd's default) is the guard.
* Twisted's SIGCHLD handler reaps only the processes Twisted spawned
  (``twisted.internet.process.reapAllProcesses`` waits for each registered
  pid): this module's ``wait4`` gets the child's status
  (``tests.services.test_forked`` checks it under a real reactor).
* Forking a threaded process is safe only if the child takes no lock that
  another thread may hold; Python 3.12 warns about it (``DeprecationWarning``:
  "use of fork() may lead to deadlocks in the child"); we run 3.11.  The child
  renders (Python objects and the C JSON encoder: no locks; CPython resets its
  own interpreter and import locks at fork, glibc its ``malloc``), and
  writes a file (``tempfile.mkstemp`` in a named folder: its only lock guards
  making its name generator, which no other thread of the rendezvous does).

Where ``os.fork`` does not exist, the store is written in the writer thread
(:func:`write_in_thread`, what the unit tests of the writer use), and so is
it, logged, when a fork fails (no memory or process for a child, e.g. under
``vm.overcommit_memory=2``): a compaction that could never be written would
keep every later write failing.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from typing import Callable, NoReturn

from twisted.logger import Logger

from pilot.persist import atomic_write_bytes
from pilot.server.compaction import StoreMirror

#: Writes the store file ``path`` from the mirror (in the writer thread, or a child it waits for).
StoreWriter = Callable[[StoreMirror, str], None]

#: the most of the child's failure it hands back (the parent reads it after the child has exited)
_REASON_LIMIT = 1024


def write_in_thread(mirror: StoreMirror, path: str) -> None:
    """The store file rendered and written in the calling thread."""
    atomic_write_bytes(path, mirror.render())


class ChildFailed(Exception):
    """The child that was to write the store exited with a failure or was killed."""


class ForkedStoreWriter:
    """A :data:`StoreWriter` whose render and write run in a child process (see the module)."""

    log = Logger()

    def __init__(self, fork: Callable[[], int] | None = getattr(os, "fork", None),
                 write: StoreWriter = write_in_thread) -> None:
        """``fork``: ``os.fork`` (None: write in the thread); ``write``: what the child runs."""
        self.fork = fork
        self.write = write
        self.children = 0
        self.fork_failures = 0
        #: the last fork's duration in the parent, the child's CPU time (s) and peak RSS (KiB)
        self.fork_seconds = 0.0
        self.child_cpu = 0.0
        self.child_maxrss = 0

    def __call__(self, mirror: StoreMirror, path: str) -> None:
        if self.fork is None:
            self.write(mirror, path)
            return
        mirror.build()  # here: the parent's mirror needs it for the records that follow anyway
        die_with_parent = _die_with_parent()
        parent = os.getpid()
        read_end, write_end = os.pipe()
        try:
            started = time.perf_counter()
            try:
                pid = self.fork()
            except OSError:
                # no memory or process for a child (a strict overcommit policy): the write must not fail
                # for it, or every retry would too and the journal would grow without end
                self.fork_failures += 1
                self.log.failure("could not fork to write the registry store {path}; writing it in the "
                                 "store's thread instead (the reactor's passes wait meanwhile)", path=path)
                self.write(mirror, path)
                return
            if pid == 0:
                os.close(read_end)
                _child(self.write, mirror, path, write_end, parent, die_with_parent)
            self.fork_seconds = time.perf_counter() - started
            self.children += 1
            os.close(write_end)
            write_end = -1
            _, status, usage = os.wait4(pid, 0)  # releases the interpreter; retried after a signal
            self.child_cpu = usage.ru_utime + usage.ru_stime
            self.child_maxrss = usage.ru_maxrss
            reason = os.read(read_end, _REASON_LIMIT) if status else b""
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        _check(status, reason, path)


def _child(write: StoreWriter, mirror: StoreMirror, path: str, report: int, parent: int,
           die_with_parent: Callable[[], None] | None) -> NoReturn:
    """In the child: write the store and leave at once, whatever happens."""
    code = 1
    try:
        if die_with_parent is not None:
            die_with_parent()
        if os.getppid() != parent:
            raise ChildFailed("the parent died before the child could be tied to it")
        gc.disable()  # a collection would touch (and copy) every tracked object of the parent's heap
        signal.set_wakeup_fd(-1)  # the parent reactor's: a signal here must not wake it
        # a stop signalled to the whole group (Ctrl-C, a service manager) lets the write finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        write(mirror, path)
        code = 0
    except BaseException as e:
        try:
            if isinstance(e, OSError) and e.errno:
                text = f"{e.errno} {e.strerror}: {e.filename}" if e.filename else f"{e.errno} {e.strerror}"
            else:
                text = f"0 {type(e).__name__}: {e}"
            os.write(report, text[:_REASON_LIMIT].encode("utf-8", "replace"))
        except BaseException:
            pass
    finally:
        os._exit(code)


#: prctl(2)'s option, and the call (None: none here), found once, in the parent (no import in a child)
PR_SET_PDEATHSIG = 1
_PRCTL: list[Callable[[], None] | None] = []


def _die_with_parent() -> Callable[[], None] | None:
    """What makes the calling child get SIGKILL when the thread that forked it ends (Linux)."""
    if not _PRCTL:
        call: Callable[[], None] | None = None
        try:
            import ctypes
            prctl = ctypes.CDLL(None, use_errno=True).prctl
            kill = int(signal.SIGKILL)

            def call() -> None:
                if prctl(PR_SET_PDEATHSIG, kill, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        except (ImportError, OSError, AttributeError):
            pass
        _PRCTL.append(call)
    return _PRCTL[0]


def _check(status: int, reason: bytes, path: str) -> None:
    """Raise what the child's ``status`` says went wrong (nothing for a success)."""
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return
    if os.WIFSIGNALED(status):
        raise ChildFailed(f"the child writing the registry store {path} was killed by signal "
                          f"{os.WTERMSIG(status)}")
    errno, _, text = reason.decode("utf-8", "replace").partition(" ")
    if errno.isdigit() and int(errno):
        raise OSError(int(errno), f"{text} (in the child writing the registry store)")
    raise ChildFailed(f"the child writing the registry store {path} exited with status "
                      f"{os.waitstatus_to_exitcode(status)}: {text or 'no reason given'}")
