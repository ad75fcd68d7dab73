"""
Tests for :mod:`pilot.services.busypoll`: the short poll before the reactor sleeps.
"""

from __future__ import annotations

import os
import random
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pilot.services import busypoll
from pilot.services.busypoll import (
    DAEMON_WINDOW, KEEP, PROBE_EVERY, RENDEZVOUS_WINDOW, SPIN_WINDOW, WEIGHT, WINDOW, BusyPoll, BusyPollService, ReactorPass, install,
    uninstall,
)
from pilot.services.rendezvous import RendezvousService, RendezvousSettings

EVENT = [(7, 1)]


class FakePoller:
    """A poller that answers each ``poll`` from a script (``[]`` once it runs out) and records the calls."""

    def __init__(self, *answers: list[tuple[int, int]]) -> None:
        self.answers = list(answers)
        self.calls: list[float] = []

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        self.calls.append(timeout)
        return self.answers.pop(0) if self.answers else []


class Client(FakePoller):
    """A client waiting for each answer: its next request is there during a spin, or it is late."""

    def __init__(self) -> None:
        super().__init__()
        self.late = False

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        if self.answers:
            return super().poll(timeout, maxevents)
        self.calls.append(timeout)
        return [] if timeout == 0 and self.late else EVENT

    def serve(self, b: BusyPoll, late: bool) -> str:
        """One request: 'caught' by a spin, 'missed' (spun, then waited) or 'waited' (no spin)."""
        self.late = late
        spins, caught = b.spins, b.caught
        self.calls.clear()
        assert b.poll(-1, 10) == EVENT
        return "caught" if b.caught > caught else "missed" if b.spins > spins else "waited"


class Ticks:
    """A clock that moves ``step`` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now = 100.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def busy(poller: FakePoller, step: float = 0.00005, window: float = SPIN_WINDOW,
         probe_every: int = 3) -> BusyPoll:
    """A busy poll on a quiet machine: the CPU clock keeps up with the wall clock, one task runnable."""
    clock = Ticks(step)
    return BusyPoll(poller, window, probe_every, clock=clock, cpu=lambda: clock.now, runnable=lambda: 1, cpus=2)


class BusyPollTests(SynchronousTestCase):

    def test_idle_waits_at_once(self) -> None:
        """Before anything was served, a wait is the poller's own: an idle process spends nothing."""
        poller = FakePoller()
        b = busy(poller)
        self.assertEqual(b.poll(5.0, 10), [])
        self.assertEqual(b.poll(-1, 10), [])
        self.assertEqual(poller.calls, [5.0, -1])
        self.assertEqual(b.spins, 0)

    def test_spin_catches_the_next_request(self) -> None:
        """After a pass that handled events, the next wait polls without blocking and returns what comes."""
        poller = FakePoller(EVENT, [], [], EVENT)
        b = busy(poller)
        self.assertEqual(b.poll(-1, 10), EVENT)
        self.assertEqual(b.poll(-1, 10), EVENT)  # caught by the third non-blocking poll
        self.assertEqual(poller.calls, [-1, 0, 0, 0])
        self.assertEqual((b.spins, b.caught), (1, 1))
        # served again: the next wait spins too
        poller.answers = [EVENT]
        self.assertEqual(b.poll(-1, 10), EVENT)
        self.assertEqual(poller.calls[-1], 0)

    def test_spin_is_bounded_by_the_window(self) -> None:
        """Nothing comes: the spin stops after the window, and the wait gets what is left of its timeout."""
        poller = FakePoller(EVENT)
        b = busy(poller, step=0.00005, window=0.00025)
        b.poll(-1, 10)
        self.assertEqual(b.poll(1.0, 10), [])
        spun = poller.calls[1:-1]
        self.assertEqual(set(spun), {0})
        self.assertEqual(len(spun), 5)  # 50 µs a poll, 250 µs: five
        self.assertAlmostEqual(poller.calls[-1], 1.0 - 0.00025, places=9)
        self.assertAlmostEqual(b.spun, 0.00025, places=9)
        self.assertEqual((b.spins, b.caught), (1, 0))

    def test_spin_is_bounded_by_the_timeout(self) -> None:
        """A timer due sooner than the window ends the spin; the wait then does not block."""
        poller = FakePoller(EVENT)
        b = busy(poller, step=0.00005, window=0.00025)
        b.poll(-1, 10)
        b.poll(0.0001, 10)
        self.assertEqual(poller.calls[1:], [0, 0, 0.0])

    def test_no_window_no_spin(self) -> None:
        """A window of 0 turns the spins off: the reactor's own wait, its pass without the log context."""
        poller = FakePoller(EVENT, EVENT)
        b = busy(poller, window=0)
        b.poll(-1, 10)
        b.poll(-1, 10)
        self.assertEqual(poller.calls, [-1, -1])
        self.assertEqual(b.spins, 0)

    def test_infinite_wait_stays_infinite(self) -> None:
        poller = FakePoller(EVENT)
        b = busy(poller)
        b.poll(-1, 10)
        b.poll(-1, 10)
        self.assertEqual(poller.calls[-1], -1)

    def test_no_spin_when_asked_not_to_wait(self) -> None:
        """A zero timeout (the reactor has work now) is passed on as it is."""
        poller = FakePoller(EVENT)
        b = busy(poller)
        b.poll(-1, 10)
        b.poll(0, 10)
        self.assertEqual(poller.calls, [-1, 0])
        self.assertEqual(b.spins, 0)

    def test_no_spin_after_a_pass_without_events(self) -> None:
        """A wait that ended on its timeout (timers only) is not followed by a spin."""
        poller = FakePoller(EVENT, [], [], [], [], [], [])
        b = busy(poller)
        b.poll(-1, 10)
        b.poll(1.0, 10)  # spins, catches nothing, then waits: nothing
        calls = len(poller.calls)
        b.poll(1.0, 10)
        self.assertEqual(poller.calls[calls:], [1.0])
        self.assertEqual(b.spins, 1)

    def test_an_isolated_miss_is_tolerated(self) -> None:
        """A closed loop whose client was once late keeps spinning."""
        client = Client()
        b = busy(client, probe_every=3)
        client.serve(b, late=False)  # the first request: no spin yet
        client.serve(b, late=True)
        self.assertEqual(b.score, 1.0 - WEIGHT)
        self.assertEqual(client.serve(b, late=False), "caught")
        self.assertEqual((b.spins, b.caught), (2, 1))

    def test_misses_back_off(self) -> None:
        """Spins that do not pay stop; after ``probe_every`` served passes one probes again."""
        client = Client()
        b = busy(client, probe_every=3)
        client.serve(b, late=False)
        self.assertEqual([client.serve(b, late=True) for _ in range(7)], ["missed"] * 7)
        self.assertLess(b.score, KEEP)  # 0.896
        self.assertEqual([client.serve(b, late=False) for _ in range(3)], ["waited"] * 3)
        self.assertEqual(client.serve(b, late=True), "missed")  # the probe: three more passes without
        self.assertEqual([client.serve(b, late=False) for _ in range(3)], ["waited"] * 3)
        self.assertEqual(client.serve(b, late=False), "caught")  # this probe pays: the spins go on
        self.assertEqual(b.score, 1.0)
        self.assertEqual(client.serve(b, late=False), "caught")
        self.assertEqual((b.spins, b.caught), (10, 2))

    def test_random_arrivals_cost_a_few_spins(self) -> None:
        """Requests that a spin would catch three times in four: a spin in under one pass in twenty."""
        client = Client()
        b = busy(client, probe_every=PROBE_EVERY)
        rng = random.Random(16)
        for _ in range(20_000):
            client.serve(b, late=rng.random() < 0.25)
        self.assertLess(b.spins, 1_000)

    def test_a_closed_loop_keeps_spinning(self) -> None:
        """A client on time 98 times in 100 keeps the spins on nearly all the time."""
        client = Client()
        b = busy(client, probe_every=PROBE_EVERY)
        rng = random.Random(16)
        for _ in range(20_000):
            client.serve(b, late=rng.random() < 0.02)
        self.assertGreater(b.spins, 18_000)

    def test_a_miss_does_not_back_off_an_idle_process(self) -> None:
        """Passes without events neither spin nor count towards the next probe: only served ones do."""
        client = Client()
        b = busy(client, probe_every=2)
        client.serve(b, late=False)
        for _ in range(7):
            client.serve(b, late=True)
        client.answers = [[]] * 10
        for _ in range(5):
            b.poll(1.0, 10)  # timers only
        self.assertEqual(b.spins, 7)
        self.assertEqual(b._skip, 1)  # the one served pass after the miss counted; the timers did not


class PipeReader:
    """A reader on a pipe's read end, for a real epoll reactor (no socket)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.w = -1
        self.got = b""
        self.fail = False
        self.lost = False

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.got += os.read(self.fd, 100)
        if self.fail:
            1 / 0

    def connectionLost(self, reason: object) -> None:
        self.lost = True

    def logPrefix(self) -> str:
        return "pipe"


class InstallTests(SynchronousTestCase):

    def epoll_reactor(self) -> EPollReactor:
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        return reactor

    def test_install_on_epoll(self) -> None:
        """The epoll reactor's pass is replaced, and the reactor still reads; uninstall gives it back."""
        reactor = self.epoll_reactor()
        own = reactor._poller
        b = install(reactor, window=0.001, probe_every=4)
        assert b is not None
        assert isinstance(b.runnable, busypoll.Runnable)
        b.runnable.close()
        b.runnable = lambda: 0  # as if the machine were quiet
        self.assertIsInstance(vars(reactor)["doIteration"], ReactorPass)
        self.assertIs(reactor._poller, own)  # the reactor's bookkeeping is untouched
        self.assertIs(b.poller, own)
        self.assertEqual((b.window, b.probe_every), (0.001, 4))
        self.assertIs(install(reactor), b)  # once only

        reader = self.pipe_reader(reactor)
        os.write(reader.w, b"one")
        reactor.iterate(0)
        self.assertEqual(reader.got, b"one")
        os.write(reader.w, b"two")
        reactor.doIteration(1.0)  # served before: spins, and catches the bytes already there
        self.assertEqual(reader.got, b"onetwo")
        self.assertEqual((b.spins, b.caught), (1, 1))
        reactor.removeReader(reader)

        uninstall(reactor, b)
        self.assertNotIn("doIteration", vars(reactor))
        self.assertEqual(reactor.doIteration.__func__, EPollReactor.doPoll)

    def pipe_reader(self, reactor: EPollReactor) -> PipeReader:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        reader = PipeReader(r)
        reader.w = w
        reactor.addReader(reader)
        return reader

    def test_nothing_escapes_into_the_reactor(self) -> None:
        """What handling a descriptor raises is logged, and the next descriptor is still handled."""
        reactor = self.epoll_reactor()
        install(reactor)
        first, second = self.pipe_reader(reactor), self.pipe_reader(reactor)
        handled: list[int] = []

        def handle(selectable: Any, fd: int, event: int) -> None:
            handled.append(fd)
            if len(handled) == 1:
                raise RuntimeError("boom")
        reactor._doReadOrWrite = handle  # type: ignore[method-assign]
        os.write(first.w, b"x")
        os.write(second.w, b"y")
        with capturedLogs() as events:
            reactor.doIteration(0)
        self.assertEqual(sorted(handled), sorted([first.fd, second.fd]))
        self.assertEqual([e["log_failure"].value.args for e in events if "log_failure" in e], [("boom",)])
        self.flushLoggedErrors(RuntimeError)

    def test_a_descriptor_that_raises_is_disconnected(self) -> None:
        """The reactor's own handling: a reader whose doRead raises is logged and removed."""
        reactor = self.epoll_reactor()
        install(reactor)
        reader = self.pipe_reader(reactor)
        reader.fail = True
        os.write(reader.w, b"x")
        reactor.doIteration(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertNotIn(reader, reactor.getReaders())
        self.assertTrue(reader.lost)

    def test_other_reactors_are_left_alone(self) -> None:
        reactor = MemoryReactorClock()
        self.assertIsNone(install(reactor))
        epoll = self.epoll_reactor()
        self.patch(busypoll, "_EPOLL", None)  # a system without epoll
        self.assertIsNone(install(epoll))
        self.assertNotIn("doIteration", vars(epoll))
        service = BusyPollService(reactor)
        service.startService()
        self.assertIsNone(service.busy)
        service.stopService()

    def test_service(self) -> None:
        """Installed while running, removed when stopped."""
        reactor = self.epoll_reactor()
        own = reactor._poller
        service = BusyPollService(reactor, window=0.0005, probe_every=8)
        service.startService()
        installed = vars(reactor)["doIteration"]
        self.assertIsInstance(installed, ReactorPass)
        self.assertEqual(installed.busy.window, 0.0005)
        self.assertIs(installed.busy.poller, own)
        service.stopService()
        self.assertNotIn("doIteration", vars(reactor))
        self.assertIsNone(service.busy)

    def test_a_service_without_a_window_does_not_spin(self) -> None:
        """A service made without a window installs the lean pass only (the servers pass theirs)."""
        reactor = self.epoll_reactor()
        service = BusyPollService(reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(WINDOW, 0.0)
        assert service.busy is not None
        self.assertEqual(service.busy.window, 0.0)
        self.assertEqual(SPIN_WINDOW, 0.00025)
        self.assertEqual((DAEMON_WINDOW, RENDEZVOUS_WINDOW), (0.00025, 0.00025))

    def test_rendezvous_has_it(self) -> None:
        """The rendezvous runs one (a node does not)."""
        service = RendezvousService(RendezvousSettings(listen="127.0.0.1:0", beacon_listen="127.0.0.1:0"),
                                    MemoryReactorClock())
        self.assertEqual(sum(isinstance(s, BusyPollService) for s in service), 1)
