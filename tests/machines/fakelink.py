"""
A deterministic lossy link between two :class:`~pilot.machines.connection.Connection`
objects, and an application that records what a connection tells it.

Every packet crosses the link as bytes (``encode`` then ``decode``), so what
the tests see is what the wire carries.  Loss, duplication, reordering and
delay come from a ``random.Random`` with a fixed seed; ``rules`` drop chosen
packets exactly.  Time is a ``task.Clock``; :func:`run_until` advances it
from one scheduled call to the next, so no test sleeps.
"""

from __future__ import annotations

import random
from typing import Callable, Protocol

import attr
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from pilot.address import Address
from pilot.machines.connection import Connection, ConnectionConfig
from pilot.wire.packet import Packet

A_ADDR, A_PORT = Address(0, 1), 49152
B_ADDR, B_PORT = Address(0, 2), 7

#: A rule sees (sender side "a" or "b", packet) and returns True to drop it.
Rule = Callable[[str, Packet], bool]


class Link(Protocol):
    """What :func:`make_pair` needs of a link (:class:`FakeLink`, ``tests.machines.simlink.SimLink``)."""

    ends: dict[str, Connection]

    def sender(self, side: str) -> Callable[[Packet], None]: ...


@attr.s(auto_attribs=True, eq=False)
class App:
    """Records the callbacks of one connection."""

    made: int = 0
    data: bytearray = attr.ib(factory=bytearray)
    lost: list[Failure] = attr.ib(factory=list)
    released: int = 0
    on_data: Callable[[bytes], None] | None = None
    on_made: Callable[[], None] | None = None

    def connection_made(self) -> None:
        self.made += 1
        if self.on_made is not None:
            self.on_made()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.on_data is not None:
            self.on_data(data)

    def connection_lost(self, reason: Failure) -> None:
        self.lost.append(reason)

    def release(self) -> None:
        self.released += 1


@attr.s(auto_attribs=True, eq=False)
class FakeLink:
    clock: Clock
    seed: int = 0
    delay: float = 0.010
    loss: float = 0.0
    duplicate: float = 0.0
    #: Probability that a packet is held back by ``reorder_delay`` extra (so later ones overtake it).
    reorder: float = 0.0
    reorder_delay: float = 0.025
    rules: list[Rule] = attr.ib(factory=list)
    #: Every packet offered to the link: (time, side, packet, delivered?).
    log: list[tuple[float, str, Packet, bool]] = attr.ib(factory=list)
    ends: dict[str, Connection] = attr.ib(factory=dict)
    down: bool = False
    _random: random.Random = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def sender(self, side: str) -> Callable[[Packet], None]:
        return lambda packet: self.transmit(side, packet)

    def transmit(self, side: str, packet: Packet) -> None:
        data = packet.encode()
        dropped = self.down or any(rule(side, packet) for rule in list(self.rules))
        r = self._random
        if not dropped and self.loss and r.random() < self.loss:
            dropped = True
        self.log.append((self.clock.seconds(), side, packet, not dropped))
        if dropped:
            return
        copies = 2 if self.duplicate and r.random() < self.duplicate else 1
        for _ in range(copies):
            delay = self.delay
            if self.reorder and r.random() < self.reorder:
                delay += self.reorder_delay * (0.5 + r.random())
            self.clock.callLater(delay, self._deliver, side, data)

    def _deliver(self, side: str, data: bytes) -> None:
        target = self.ends.get("b" if side == "a" else "a")
        if target is not None:
            target.packet_received(Packet.decode(data))

    def sent(self, side: str | None = None, since: float = float("-inf")) -> list[Packet]:
        return [p for t, s, p, _ in self.log if (side is None or s == side) and t >= since]

    def drop_first(self, predicate: Rule, count: int = 1) -> None:
        """Drop the next ``count`` packets matching ``predicate``."""
        left = [count]

        def rule(side: str, packet: Packet) -> bool:
            if left[0] and predicate(side, packet):
                left[0] -= 1
                return True
            return False

        self.rules.append(rule)


def run_until(clock: Clock, done: Callable[[], bool], limit: float = 600.0) -> bool:
    """Advance ``clock`` call by call until ``done()`` or ``limit`` seconds have passed."""
    end = clock.seconds() + limit
    while not done():
        calls = clock.getDelayedCalls()
        if not calls:
            return done()
        when = min(c.getTime() for c in calls)
        if when > end:
            clock.advance(end - clock.seconds())
            return done()
        clock.advance(max(0.0, when - clock.seconds()))
    return True


def make_pair(
    clock: Clock, link: Link, config: ConnectionConfig | None = None,
    iss_a: int = 0, iss_b: int = 0,
) -> tuple[Connection, Connection, App, App]:
    """An active side ``a`` and a passive side ``b`` (opened by a's SYN) joined by ``link``."""
    app_a, app_b = App(), App()
    a = Connection(clock=clock, send=link.sender("a"), local=A_ADDR, local_port=A_PORT,
                   remote=B_ADDR, remote_port=B_PORT, data_received=app_a.data_received,
                   connection_made=app_a.connection_made, connection_lost=app_a.connection_lost,
                   released=app_a.release, config=config, initial_sequence=iss_a)
    b = Connection(clock=clock, send=link.sender("b"), local=B_ADDR, local_port=B_PORT,
                   remote=A_ADDR, remote_port=A_PORT, data_received=app_b.data_received,
                   connection_made=app_b.connection_made, connection_lost=app_b.connection_lost,
                   released=app_b.release, config=config, initial_sequence=iss_b)
    link.ends.update(a=a, b=b)
    return a, b, app_a, app_b


def pattern(size: int, seed: int = 1) -> bytes:
    """``size`` pseudo-random bytes (fixed seed), so misplaced bytes cannot go unnoticed."""
    return random.Random(seed).randbytes(size)
