# -*- test-case-name: tests.machines.test_connection -*-
"""
A stream connection's timers (split from
:mod:`~pilot.machines.connection.transfer`, which declares them): one
restartable ``callLater`` (:class:`Timer`), one that moves a deadline
instead (:class:`CoalescedTimer`), and the slot that makes each the first
time it is read (:class:`TimerSlot`).  Time comes from the injected clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Generic, Optional, TypeVar, overload

import attr
from twisted.internet.interfaces import IDelayedCall, IReactorTime

if TYPE_CHECKING:
    from pilot.machines.connection.transfer import Transfer


@attr.s(auto_attribs=True, eq=False)
class Timer:
    """One restartable ``callLater``."""

    clock: IReactorTime
    fire: Callable[[], None]
    _call: Optional[IDelayedCall] = None

    @property
    def active(self) -> bool:
        return self._call is not None

    def start(self, delay: float) -> None:
        self.cancel()
        self._call = self.clock.callLater(max(0.0, delay), self._run)

    def ensure(self, delay: float) -> None:
        if self._call is None:
            self.start(delay)

    def cancel(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Cancel the delayed call itself (the connection is ending)."""
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _run(self) -> None:
        self._call = None
        self.fire()



#: A coalesced timer fires this close to its deadline (the clocks' float arithmetic).
DEADLINE_SLACK = 1e-9


@attr.s(auto_attribs=True, eq=False)
class CoalescedTimer(Timer):
    """
    A timer restarted or cancelled for nearly every packet (the retransmission
    timer on each ACK, the delayed ACK on each ACK sent): it moves a deadline
    and keeps one delayed call, which re-arms itself for the rest when it
    fires before the deadline, and does nothing when the timer was cancelled
    meanwhile.  A ``callLater`` and a ``cancel`` per packet become one per
    timeout (docs/performance.md); the timer still fires at its deadline.
    :meth:`stop` cancels the delayed call itself.
    """

    _deadline: Optional[float] = None

    @property
    def active(self) -> bool:
        return self._deadline is not None

    def start(self, delay: float) -> None:
        delay = max(0.0, delay)
        deadline = self._deadline = self.clock.seconds() + delay
        call = self._call
        if call is not None:
            if call.getTime() <= deadline + DEADLINE_SLACK:
                return  # it comes first, and re-arms for the rest
            if call.active():
                call.cancel()
        self._call = self.clock.callLater(delay, self._run)

    def ensure(self, delay: float) -> None:
        if self._deadline is None:
            self.start(delay)

    def cancel(self) -> None:
        self._deadline = None  # the delayed call stays: it comes to nothing, or is reused

    def stop(self) -> None:
        self._deadline = None
        super().stop()

    def _run(self) -> None:
        self._call = None
        deadline = self._deadline
        if deadline is None:
            return
        now = self.clock.seconds()
        if now + DEADLINE_SLACK < deadline:
            self._call = self.clock.callLater(deadline - now, self._run)
            return
        self._deadline = None
        self.fire()


class _Feed:
    """
    A timer's ``fire``: feeds the machine one input.  One small object per
    timer where a closure took three (function, cell, tuple), each of which
    the garbage collector walks for as long as the connection lives.
    """

    __slots__ = ("core", "event")

    def __init__(self, core: "Transfer", event: str) -> None:
        self.core = core
        self.event = event

    def __call__(self) -> None:
        getattr(self.core.machine, self.event)()


T = TypeVar("T", bound=Timer)


class TimerSlot(Generic[T]):
    """
    One of a connection's timers, made the first time it is read: a short
    connection (a ping) starts four of its eight, and each one made is two
    more objects per connection to allocate and for the garbage collector to
    walk while it lives (``docs/performance.md``).  :meth:`cancel_in` cancels
    it only if it was ever made.  It feeds the machine ``event`` when it
    fires (None: it runs the core's liveness check).
    """

    def __init__(self, kind: type[T], event: str | None) -> None:
        self.kind = kind
        self.event = event
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, core: None, owner: type) -> "TimerSlot[T]": ...
    @overload
    def __get__(self, core: "Transfer", owner: type) -> T: ...

    def __get__(self, core: "Transfer | None", owner: type) -> "T | TimerSlot[T]":
        if core is None:
            return self
        event = self.event
        timer = self.kind(core.clock, core._liveness_check if event is None else _Feed(core, event))
        core.__dict__[self.name] = timer  # read from the instance from now on
        core.timers.append(timer)
        return timer

    def cancel_in(self, core: "Transfer") -> None:
        """``cancel()`` the timer of ``core``, unless it was never made (then nothing runs)."""
        timer = core.__dict__.get(self.name)
        if timer is not None:
            timer.cancel()
