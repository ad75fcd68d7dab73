# -*- test-case-name: tests.services.test_busypoll -*-
"""
A lean pass for the epoll reactor, and a short busy poll before it sleeps
(off unless a window is given: ``rendezvous start --busy-poll MICROSECONDS``,
see :data:`WINDOW`).

One request at a time on one connection (a node waiting for each answer),
the rate is the round trip, and part of the round trip is the wake-up: the
reactor, back in ``epoll_wait`` as soon as the reply is sent, is asleep when
the next request comes, and its CPU idles (on a virtual machine the idle
vCPU halts and must be woken by the host) before the request is read.  The
reference's Go runtime looks for work a little longer before its threads
sleep; this does the same for Twisted's epoll reactor, bounded:

* after a reactor pass that handled events (never after a pass that only
  ran timers, so an idle process spends nothing), the next wait first asks
  the poller without blocking, again and again, for at most :data:`WINDOW`
  seconds (and never past the wait's own timeout); what comes in that time
  is handled at once; then the reactor waits as before, for what is left of
  its timeout;
* it keeps on only while it pays.  A score follows the share of spins that
  caught something (each spin weighs :data:`WEIGHT`); once it falls under
  :data:`KEEP`, the next :data:`PROBE_EVERY` passes that handled events wait
  at once, and then one spin probes: if it catches something the spins go
  on (the score starts again from 1), if not the wait starts over.  A
  client that waits for each answer is caught nearly every time, and an
  isolated late request (the client descheduled) does not stop it; a
  fleet's requests arriving at random are caught too seldom (at 10,000
  nodes on the reference's cadence, about a thousand a second, a spin of
  250 µs catches one about one time in five; at 6,000 a second three in
  four), so there the cost is a few dozen spins every :data:`PROBE_EVERY`
  passes at most.
  ``docs/performance.md`` (issue 16, "a short poll before the reactor
  sleeps") has the figures.

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
is left as it is.  The clock is injected, for tests.
"""

from __future__ import annotations

import select
import time
from typing import Any, Callable, Protocol

from twisted.application.service import Service
from twisted.logger import Logger

#: Seconds a spin lasts at most; 0, the default, turns the spins off.  0.00025 (a Python client's
#: next request comes 30-200 µs after its answer) was measured: on this busy machine it cost a
#: closed loop more than it caught, and its gain on a quiet one is not shown (docs/performance.md).
WINDOW = 0.0
#: The window measured, to turn the spins on with: ``rendezvous start --busy-poll 250``
#: (``BusyPollService(reactor, window=SPIN_WINDOW)``).
SPIN_WINDOW = 0.00025
#: Passes that handled events without a spin, once spins stopped paying, before one probes again.
PROBE_EVERY = 1024
#: The weight of one spin in the score of spins that caught something.
WEIGHT = 1 / 64
#: Spins go on while that score is at least this (a closed loop's is near 1).
KEEP = 0.9
#: ``select.epoll``, where the system has it (Linux); elsewhere nothing is installed
_EPOLL: Any = getattr(select, "epoll", None)


class Poller(Protocol):
    """What the busy poll uses of a ``select.epoll``."""

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]: ...


class BusyPoll:
    """Waits on a :class:`Poller`, spinning briefly before blocking after a wait that brought events."""

    def __init__(self, poller: Poller, window: float = WINDOW, probe_every: int = PROBE_EVERY,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.poller = poller
        self.window = window
        self.probe_every = probe_every
        self.clock = clock
        #: the last wait brought events (the reactor has just handled them)
        self._served = False
        #: passes that handled events still to go before the next spin
        self._skip = 0
        #: the share of recent spins that caught something (weighted, :data:`WEIGHT` a spin)
        self.score = 1.0
        #: spins made, spins that caught events, and seconds spent spinning (for tests and profiles)
        self.spins = 0
        self.caught = 0
        self.spun = 0.0

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        if timeout != 0 and self._served and self.window > 0:
            if self._skip > 0:
                self._skip -= 1
            else:
                events, timeout = self._spin(timeout, maxevents)
                if events:
                    return events
        events = self.poller.poll(timeout, maxevents)
        self._served = bool(events)
        return events

    def _spin(self, timeout: float, maxevents: int) -> tuple[list[tuple[int, int]], float]:
        """Poll without blocking for up to the window (and the timeout); (events, the timeout left)."""
        poll, clock = self.poller.poll, self.clock
        start = clock()
        end = start + (self.window if timeout < 0 else min(self.window, timeout))
        self.spins += 1
        now = start
        while True:
            events = poll(0, maxevents)
            now = clock()
            if events:
                self.caught += 1
                self.spun += now - start
                # served again (_served stays True); a probe that caught something resumes the spins
                self.score = 1.0 if self.score < KEEP else self.score + (1.0 - self.score) * WEIGHT
                return events, timeout
            if now >= end:
                break
        self.spun += now - start
        self.score -= self.score * WEIGHT
        if self.score < KEEP:
            self._skip = self.probe_every  # it does not pay: wait at once for a while
        self._served = False
        return [], (timeout if timeout < 0 else max(0.0, timeout - (now - start)))


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


class BusyPollService(Service):
    """Makes the reactor's pass a :class:`ReactorPass` while running (a no-op on a reactor without epoll)."""

    log = Logger()

    def __init__(self, reactor: Any, window: float = WINDOW, probe_every: int = PROBE_EVERY) -> None:
        self.reactor = reactor
        self.window = window
        self.probe_every = probe_every
        self.busy: BusyPoll | None = None

    def startService(self) -> None:
        super().startService()
        self.busy = install(self.reactor, self.window, self.probe_every)

    def stopService(self) -> None:
        super().stopService()
        if self.busy is not None:
            uninstall(self.reactor, self.busy)
            self.log.debug("busy poll: {spins} spins, {caught} caught events, {seconds:.3f} s spent",
                           spins=self.busy.spins, caught=self.busy.caught, seconds=self.busy.spun)
            self.busy = None
