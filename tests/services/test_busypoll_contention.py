"""
Tests for :mod:`pilot.services.busypoll`: the busy poll stands down on a contended machine.

Every clock is injected (a wall clock, this thread's CPU clock, the count of runnable tasks): no real time.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import InvalidArgument
from pilot.nodeconfig import load_settings
from pilot.options import DAEMON_BUSY_POLL
from pilot.services.busypoll import (
    COUNT_EVERY, DAEMON_WINDOW, HOLD, MAX_HOLD, MIN_LOST, BusyPoll, BusyPollService, ReactorPass, Runnable,
)

EVENT = [(7, 1)]
WINDOW = 0.00025
STEP = 0.00001  # the wall clock moves 10 µs each time it is read


class Machine:
    """The injected clocks: wall time moves ``STEP`` a read; the CPU clock gets ``share`` of it."""

    def __init__(self, runnable: int = 1) -> None:
        self.wall = 100.0
        self.cpu_time = 5.0
        self.share = 1.0
        self.runnable = [runnable]  # one answer a count; the last one repeats

    def clock(self) -> float:
        self.wall += STEP
        self.cpu_time += STEP * self.share
        return self.wall

    def cpu(self) -> float:
        return self.cpu_time

    def count(self) -> int:
        return self.runnable.pop(0) if len(self.runnable) > 1 else self.runnable[0]


class Poller:
    """Answers each blocking wait with an event, and each non-blocking poll from ``spin`` ([] past its end)."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.spin: list[list[tuple[int, int]]] = []
        self.fail: BaseException | None = None

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        self.calls.append(timeout)
        if timeout != 0:
            return EVENT
        if self.fail is not None:
            raise self.fail
        return self.spin.pop(0) if self.spin else []


def make(machine: Machine, window: float = WINDOW, cpus: int = 2) -> tuple[BusyPoll, Poller]:
    poller = Poller()
    b = BusyPoll(poller, window, probe_every=1024, clock=machine.clock, cpu=machine.cpu,
                 runnable=machine.count, cpus=cpus)
    b.poll(-1, 10)  # served: the next wait may spin
    return b, poller


def spun(b: BusyPoll, poller: Poller, timeout: float = 1.0) -> bool:
    """One wait after a served pass: True if it began with a spin."""
    del poller.calls[:]
    b.poll(timeout, 10)
    return bool(poller.calls) and poller.calls[0] == 0


class ContentionTests(SynchronousTestCase):

    def test_a_quiet_machine_spins(self) -> None:
        machine = Machine(runnable=2)  # this process and the client it serves, on two CPUs
        b, poller = make(machine)
        self.assertTrue(spun(b, poller))
        self.assertEqual((b.spins, b.contended), (1, 0))

    def test_more_runnable_tasks_than_cpus_do_not_spin(self) -> None:
        """Another task waits for a CPU: the wait blocks at once, and spins are held off."""
        machine = Machine(runnable=3)
        b, poller = make(machine)
        self.assertFalse(spun(b, poller))
        self.assertEqual(poller.calls, [1.0])  # the whole timeout, nothing spent
        self.assertEqual((b.spins, b.contended), (0, 1))

    def test_the_hold_lasts_then_a_spin_probes(self) -> None:
        machine = Machine(runnable=3)
        b, poller = make(machine)
        spun(b, poller)
        machine.runnable = [1]
        self.assertFalse(spun(b, poller))  # held, though the machine is quiet now
        machine.wall += HOLD
        self.assertTrue(spun(b, poller))
        self.assertEqual(b.contended, 1)

    def test_signs_in_a_row_double_the_hold_up_to_a_limit(self) -> None:
        machine = Machine(runnable=5)
        b, poller = make(machine)
        holds = []
        for _ in range(10):
            spun(b, poller)
            holds.append(b._hold)
            machine.wall += b._hold
        self.assertEqual(holds[:4], [HOLD, 2 * HOLD, 4 * HOLD, 8 * HOLD])
        self.assertEqual(max(holds), MAX_HOLD)
        self.assertEqual(holds[-1], MAX_HOLD)
        self.assertEqual(b.spins, 0)

    def test_a_clean_spin_ends_the_doubling(self) -> None:
        machine = Machine(runnable=3)
        b, poller = make(machine)
        spun(b, poller)
        machine.wall += HOLD
        machine.runnable = [1]
        self.assertTrue(spun(b, poller))
        self.assertEqual(b._hold, 0.0)
        machine.runnable = [3]
        spun(b, poller)
        self.assertEqual(b._hold, HOLD)

    def test_a_descheduled_spin_backs_off(self) -> None:
        """A spin that got a third of its wall time as CPU: what it caught is served, then no spins."""
        machine = Machine()
        b, poller = make(machine)
        machine.share = 1 / 3
        poller.spin = [[]] * 20 + [EVENT]
        self.assertEqual(b.poll(1.0, 10), EVENT)
        self.assertEqual((b.spins, b.caught, b.contended), (1, 1, 1))
        self.assertFalse(spun(b, poller))

    def test_a_small_loss_is_tolerated(self) -> None:
        """Lost time under MIN_LOST (a clock read, an interrupt) is no sign."""
        machine = Machine()
        b, poller = make(machine)
        machine.share = 1 - (MIN_LOST / 2) / WINDOW  # loses MIN_LOST / 2 over a whole window
        self.assertTrue(spun(b, poller))
        self.assertEqual(b.contended, 0)
        self.assertTrue(spun(b, poller))

    def test_a_task_waiting_during_the_spin_stops_it(self) -> None:
        """Counted every COUNT_EVERY polls: a task that becomes runnable ends the spin there."""
        machine = Machine()
        b, poller = make(machine, window=0.01)
        machine.runnable = [1, 3]  # quiet at the start, crowded at the first count during the spin
        b.poll(1.0, 10)
        self.assertEqual(poller.calls.count(0), COUNT_EVERY)
        self.assertAlmostEqual(poller.calls[-1], 1.0 - COUNT_EVERY * STEP, places=9)  # what is left
        self.assertEqual(b.contended, 1)

    def test_the_wall_clock_going_backwards_ends_a_spin(self) -> None:
        machine = Machine()
        b, poller = make(machine)
        readings = iter([100.0, 99.0])
        b.clock = lambda: next(readings, 50.0)
        b.poll(1.0, 10)
        self.assertEqual(poller.calls.count(0), 1)
        self.assertEqual(poller.calls[-1], 1.0)  # no time counted as spent: the timeout is not stretched
        self.assertEqual(b.spins, 1)

    def test_the_wall_clock_going_backwards_during_a_hold_restarts_it(self) -> None:
        machine = Machine(runnable=3)
        b, poller = make(machine)
        spun(b, poller)
        machine.runnable = [1]
        machine.wall -= 10.0  # backwards
        self.assertFalse(spun(b, poller))  # held from the new now
        machine.wall += HOLD / 2
        self.assertFalse(spun(b, poller))
        machine.wall += HOLD
        self.assertTrue(spun(b, poller))

    def test_the_cpu_clock_going_backwards_is_a_sign(self) -> None:
        machine = Machine()
        b, poller = make(machine)
        machine.share = -1.0
        spun(b, poller)
        self.assertEqual(b.contended, 1)

    def test_an_unknown_count_is_not_a_sign(self) -> None:
        machine = Machine(runnable=0)  # no /proc/loadavg
        b, poller = make(machine, cpus=1)
        self.assertTrue(spun(b, poller))

    def test_windows_that_are_not_a_duration_are_refused(self) -> None:
        machine = Machine()
        for bad in (-0.001, -1, float("nan"), float("inf"), True, "250"):
            self.assertRaises(ValueError, BusyPoll, Poller(), bad)
            self.assertRaises(ValueError, BusyPollService, object(), bad)
        b, poller = make(machine, window=0)
        self.assertFalse(spun(b, poller))
        self.assertEqual(b.spins, 0)

    def test_a_negative_probe_count_waits_no_passes(self) -> None:
        b = BusyPoll(Poller(), WINDOW, probe_every=-5, runnable=lambda: 0)
        self.assertEqual(b.probe_every, 0)

    def test_an_interrupted_spin_leaves_the_pass_usable(self) -> None:
        """EINTR from a non-blocking poll: the reactor's pass returns, the next one works and spins."""
        machine = Machine()
        b, poller = make(machine)
        handled: list[int] = []
        reactor = FakeReactor(handled)
        reactor_pass = ReactorPass(reactor, b)
        poller.fail = InterruptedError(4, "Interrupted system call")
        reactor_pass(1.0)
        self.assertEqual(handled, [])
        poller.fail = None
        poller.spin = [EVENT]
        reactor_pass(1.0)
        self.assertEqual(handled, [7])
        self.assertEqual((b.spins, b.caught), (2, 1))


class FakeReactor:
    def __init__(self, handled: list[int]) -> None:
        self._selectables = {7: object()}
        self.handled = handled

    def _doReadOrWrite(self, selectable: Any, fd: int, event: int) -> None:
        self.handled.append(fd)


class RunnableTests(SynchronousTestCase):

    def loadavg(self, text: str) -> str:
        fd, path = tempfile.mkstemp()
        os.write(fd, text.encode())
        os.close(fd)
        self.addCleanup(os.remove, path)
        return path

    def test_the_fourth_field(self) -> None:
        count = Runnable(self.loadavg("0.50 0.40 0.30 3/140 1234\n"))
        self.addCleanup(count.close)
        self.assertEqual(count(), 3)
        self.assertEqual(count(), 3)  # read again from the start

    def test_unknown_is_zero(self) -> None:
        missing = Runnable(os.path.join(tempfile.gettempdir(), "no-such-loadavg-here"))
        self.assertEqual(missing(), 0)
        garbled = Runnable(self.loadavg("garbage\n"))
        self.assertEqual(garbled(), 0)
        garbled.close()
        garbled.close()  # twice is fine
        self.assertEqual(garbled(), 0)


class SettingTests(SynchronousTestCase):
    """The daemon's --busy-poll: flag, PILOT_BUSY_POLL, config.json's busy_poll; microseconds in, seconds out."""

    def home(self, config: dict[str, Any] | None = None) -> str:
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        if config is not None:
            with open(os.path.join(home, "config.json"), "w") as f:
                json.dump(config, f)
        return home

    def test_on_by_default(self) -> None:
        self.assertEqual(load_settings({}, {}, self.home()).busy_poll, DAEMON_WINDOW)
        self.assertEqual(DAEMON_WINDOW, DAEMON_BUSY_POLL / 1e6)
        self.assertGreater(DAEMON_WINDOW, 0)

    def test_each_source(self) -> None:
        self.assertEqual(load_settings({"busy_poll": "0"}, {}, self.home()).busy_poll, 0.0)
        self.assertAlmostEqual(load_settings({}, {"PILOT_BUSY_POLL": "500"}, self.home()).busy_poll, 0.0005)
        self.assertAlmostEqual(load_settings({}, {}, self.home({"busy_poll": 100})).busy_poll, 0.0001)
        self.assertAlmostEqual(load_settings({}, {}, self.home({"busy-poll": "0"})).busy_poll, 0.0)

    def test_bad_values_are_a_clear_error(self) -> None:
        for bad in ("-1", "10001", "soon"):
            e = self.assertRaises(InvalidArgument, load_settings, {"busy_poll": bad}, {}, self.home())
            self.assertIn("busy", str(e) + str(getattr(e, "hint", "")))
