# -*- test-case-name: tests.services.test_busypoll -*-
"""
A lean pass for the epoll reactor, and a short busy poll before it sleeps
(on by default in the node daemon and the rendezvous, :data:`DAEMON_WINDOW`
and :data:`RENDEZVOUS_WINDOW`; ``--busy-poll 0`` turns it off).

One request at a time on one connection (a node waiting for each answer,
a ping's four packets), the rate is the round trip, and part of the round
trip is the wake-up: the reactor, back in ``epoll_wait`` as soon as the
reply is sent, is asleep when the next packet comes, and its CPU idles (on
a virtual machine the idle vCPU halts and must be woken by the host, and
work after a halt runs cold) before the packet is read.  The reference's Go
runtime looks for work a little longer before its threads sleep; this does
the same for Twisted's epoll reactor, bounded:

* after a reactor pass that handled events (never after a pass that only
  ran timers, so an idle process spends nothing), the next wait first asks
  the poller without blocking, again and again, for at most the window
  (and never past the wait's own timeout); what comes in that time is
  handled at once; then the reactor waits as before, for what is left of
  its timeout;
* it keeps on only while it pays.  A score follows the share of spins that
  caught something (each spin weighs :data:`WEIGHT`); once it falls under
  :data:`KEEP`, the next :data:`PROBE_EVERY` passes that handled events wait
  at once, and then one spin probes: if it catches something the spins go
  on (the score starts again from 1), if not the wait starts over;
* it stands down when the machine is contended, where a spin would hold a
  CPU that another task needs (the client it waits for, often): a spin
  does not start, or stops, while more tasks are runnable than this
  process has CPUs (counted every :data:`COUNT_EVERY` polls), and a spin
  that got less CPU time than its wall time (more than :data:`MIN_LOST`
  and :data:`MAX_LOST_SHARE` of it: it was descheduled) is a sign too.
  After a sign, no spin for :data:`HOLD` seconds, doubled at each sign in
  a row up to :data:`MAX_HOLD`; a clean spin ends the doubling.

``docs/performance.md`` (issue 16, "a short poll before the reactor
sleeps", and "a contention-aware busy poll") has the figures.

Installed, it is the epoll reactor's pass (:class:`ReactorPass` in place of
``EPollReactor.doPoll``, on the reactor object only): wait through the busy
poll on the reactor's own ``select.epoll`` (``_poller``, which the
reactor's bookkeeping of readers and writers keeps using), then hand each
ready descriptor to the reactor's ``_doReadOrWrite`` (which catches and logs
what a descriptor raises, and disconnects it) as ``doPoll`` does, but
without wrapping each in ``log.callWithLogger``: that sets the legacy
``twisted.python.log`` context (its ``system`` field) for the call: the
pass for one ready descriptor takes 10.8k instructions instead of 24.1k
(``benchmarks/reactor_pass.py``).  Our modules log through
``twisted.logger``, which does not read that context; only a legacy message
Twisted logs from inside a descriptor (a protocol's exception, say) shows
``-`` as its system instead of the connection's prefix.  Any other reactor
is left as it is.  The clocks and the count of runnable tasks are
injected, for tests.
"""

from __future__ import annotations

import math
import os
import select
import time
from typing import Any, Callable, Protocol

from twisted.application.service import Service
from twisted.logger import Logger

from pilot.options import DAEMON_BUSY_POLL, RENDEZVOUS_BUSY_POLL

#: The default spin of the node daemon (``daemon start --busy-poll``, ``busy_poll`` in config.json) and
#: of the rendezvous (``rendezvous start --busy-poll``), in seconds; 0 turns the spins off.  Measured
#: (docs/performance.md, "a contention-aware busy poll").
DAEMON_WINDOW = DAEMON_BUSY_POLL / 1e6
RENDEZVOUS_WINDOW = RENDEZVOUS_BUSY_POLL / 1e6
#: A :class:`BusyPoll` made without a window does not spin (the lean pass only).
WINDOW = 0.0
#: The window first measured (a Python client's next request comes 30-200 µs after its answer).
SPIN_WINDOW = 0.00025
#: Passes that handled events without a spin, once spins stopped paying, before one probes again.
PROBE_EVERY = 1024
#: The weight of one spin in the score of spins that caught something.
WEIGHT = 1 / 64
#: Spins go on while that score is at least this (a closed loop's is near 1).
KEEP = 0.9
#: A spin that lost more than this share of its wall time (and more than :data:`MIN_LOST` seconds) to
#: other tasks was descheduled: the machine is contended.
MAX_LOST_SHARE = 0.25
MIN_LOST = 0.00002
#: Seconds without spins after a sign of contention, doubled at each sign in a row up to :data:`MAX_HOLD`.
HOLD = 0.25
MAX_HOLD = 8.0
#: During a spin, the runnable tasks are counted every this many non-blocking polls.
COUNT_EVERY = 8
#: ``select.epoll``, where the system has it (Linux); elsewhere nothing is installed
_EPOLL: Any = getattr(select, "epoll", None)


class Poller(Protocol):
    """What the busy poll uses of a ``select.epoll``."""

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]: ...


class Runnable:
    """The machine's runnable tasks now (``/proc/loadavg``'s fourth field, this one included); 0 unknown."""

    def __init__(self, path: str = "/proc/loadavg") -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            self.fd = -1

    def __call__(self) -> int:
        if self.fd < 0:
            return 0
        try:
            return int(os.pread(self.fd, 128, 0).split()[3].split(b"/")[0])
        except (OSError, ValueError, IndexError):
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_window(window: float) -> float:
    """A spin window in seconds: a finite number >= 0 (0: no spin); ValueError otherwise."""
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 <= window < math.inf:
        raise ValueError(f"a busy poll window must be a number of seconds >= 0, not {window!r}")
    return float(window)


class BusyPoll:
    """
    Waits on a :class:`Poller`, spinning briefly before blocking after a wait that brought events,
    unless the machine is contended.  ``clock`` is the wall clock, ``cpu`` this thread's CPU time,
    ``runnable`` the machine's runnable tasks (0: unknown) and ``cpus`` the CPUs this process may use.
    """

    def __init__(self, poller: Poller, window: float = WINDOW, probe_every: int = PROBE_EVERY,
                 clock: Callable[[], float] = time.perf_counter,
                 cpu: Callable[[], float] = time.thread_time,
                 runnable: Callable[[], int] | None = None, cpus: int | None = None) -> None:
        self.poller = poller
        self.window = check_window(window)
        self.probe_every = max(0, int(probe_every))
        self.clock = clock
        self.cpu = cpu
        self.runnable: Callable[[], int] = runnable if runnable is not None else (
            Runnable() if self.window > 0 else (lambda: 0))
        self.cpus = max(1, cpus if cpus is not None else _cpus())
        #: the last wait brought events (the reactor has just handled them)
        self._served = False
        #: passes that handled events still to go before the next spin
        self._skip = 0
        #: the share of recent spins that caught something (weighted, :data:`WEIGHT` a spin)
        self.score = 1.0
        #: no spin from ``_held_at`` (wall clock) for ``_hold`` seconds (0: not held)
        self._held_at = 0.0
        self._hold = 0.0
        #: spins made, spins that caught events, seconds spent spinning, and signs of contention
        self.spins = 0
        self.caught = 0
        self.spun = 0.0
        self.contended = 0

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        if timeout != 0 and self._served and self.window > 0:
            if self._skip > 0:
                self._skip -= 1
            elif not self._held():
                events, timeout = self._spin(timeout, maxevents)
                if events:
                    return events
        events = self.poller.poll(timeout, maxevents)
        self._served = bool(events)
        return events

    def _held(self) -> bool:
        """Held off after contention; a clock gone backwards starts the hold again from now."""
        if self._hold <= 0:
            return False
        now = self.clock()
        if now < self._held_at:
            self._held_at = now
            return True
        return now - self._held_at < self._hold

    def _contended(self, now: float) -> None:
        """A sign of contention: no spin for a while, twice as long as the last time if it was in a row."""
        self.contended += 1
        self._hold = min(MAX_HOLD, self._hold * 2) if self._hold > 0 else HOLD
        self._held_at = now
        self._served = False

    def _crowded(self) -> bool:
        """More runnable tasks than CPUs: a spin would keep one of them waiting."""
        return self.runnable() > self.cpus

    def _spin(self, timeout: float, maxevents: int) -> tuple[list[tuple[int, int]], float]:
        """Poll without blocking for up to the window (and the timeout); (events, the timeout left)."""
        poll, clock = self.poller.poll, self.clock
        start = clock()
        if self._crowded():
            self._contended(start)
            return [], timeout
        cpu0 = self.cpu()
        end = start + (self.window if timeout < 0 else min(self.window, timeout))
        self.spins += 1
        now = start
        polls = 0
        events: list[tuple[int, int]] = []
        crowded = False
        while True:
            events = poll(0, maxevents)
            now = clock()
            polls += 1
            if events or now >= end or now < start:  # a clock gone backwards ends the spin
                break
            if polls % COUNT_EVERY == 0 and self._crowded():
                crowded = True
                break
        wall = max(0.0, now - start)
        lost = wall - (self.cpu() - cpu0)
        self.spun += wall
        if events:
            self.caught += 1
            # a probe that caught something resumes the spins
            self.score = 1.0 if self.score < KEEP else self.score + (1.0 - self.score) * WEIGHT
        else:
            self.score -= self.score * WEIGHT
            if self.score < KEEP:
                self._skip = self.probe_every  # it does not pay: wait at once for a while
            self._served = False
        if crowded or (lost > MIN_LOST and lost > wall * MAX_LOST_SHARE):
            self._contended(now)  # descheduled, or others waiting: stand down
        elif self._hold > 0:
            self._hold = 0.0  # a clean spin: the next sign of contention holds the spins off afresh
        if events:
            return events, timeout
        return [], (timeout if timeout < 0 else max(0.0, timeout - wall))


class ReactorPass:
    """One pass of an epoll reactor: the busy poll's wait, then each ready descriptor to the reactor."""

    log = Logger()

    def __init__(self, reactor: Any, busy: BusyPoll) -> None:
        self.reactor = reactor
        self.busy = busy

    def __call__(self, timeout: float | None) -> None:
        reactor = self.reactor
        selectables = reactor._selectables
        try:
            events = self.busy.poll(-1 if timeout is None else timeout, len(selectables))
        except InterruptedError:
            return
        handle = reactor._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    handle(selectable, fd, event)  # catches what the descriptor raises
                except Exception:
                    self.log.failure("while handling {selectable}", selectable=selectable)


def install(reactor: Any, window: float = WINDOW, probe_every: int = PROBE_EVERY) -> BusyPoll | None:
    """Make ``reactor``'s pass a :class:`ReactorPass`; None (nothing done) for a reactor without epoll."""
    installed = vars(reactor).get("doIteration") if hasattr(reactor, "__dict__") else None
    if isinstance(installed, ReactorPass):
        return installed.busy
    poller = getattr(reactor, "_poller", None)
    if _EPOLL is None or not isinstance(poller, _EPOLL) \
            or not isinstance(getattr(reactor, "_selectables", None), dict) \
            or not hasattr(reactor, "_doReadOrWrite"):
        return None
    busy = BusyPoll(poller, window, probe_every)
    reactor.doIteration = ReactorPass(reactor, busy)  # the reactor object's own: the class's doPoll stays
    return busy


def uninstall(reactor: Any, busy: BusyPoll) -> None:
    """Give ``reactor`` its own pass back (if ``busy``'s is still the one it has)."""
    installed = vars(reactor).get("doIteration")
    if isinstance(installed, ReactorPass) and installed.busy is busy:
        del reactor.doIteration
    if isinstance(busy.runnable, Runnable):
        busy.runnable.close()


class BusyPollService(Service):
    """Makes the reactor's pass a :class:`ReactorPass` while running (a no-op on a reactor without epoll)."""

    log = Logger()

    def __init__(self, reactor: Any, window: float = WINDOW, probe_every: int = PROBE_EVERY) -> None:
        self.reactor = reactor
        self.window = check_window(window)
        self.probe_every = probe_every
        self.busy: BusyPoll | None = None

    def startService(self) -> None:
        super().startService()
        self.busy = install(self.reactor, self.window, self.probe_every)

    def stopService(self) -> None:
        super().stopService()
        if self.busy is not None:
            uninstall(self.reactor, self.busy)
            self.log.debug("busy poll: {spins} spins, {caught} caught events, {seconds:.3f} s spent, "
                           "{contended} signs of contention", spins=self.busy.spins, caught=self.busy.caught,
                           seconds=self.busy.spun, contended=self.busy.contended)
            self.busy = None
