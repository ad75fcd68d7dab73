"""
A simulated path with a bottleneck, for the congestion-control tests and
``benchmarks/lossy_link.py``: two :class:`~pilot.machines.connection.Connection`
objects (made by :func:`tests.machines.fakelink.make_pair`) joined by a link
with, in each direction,

* a bottleneck of ``rate`` bytes per second whose queue holds at most
  ``queue_limit`` bytes (a packet that does not fit is dropped: tail drop,
  so queueing delay and congestion loss exist);
* a one-way propagation ``delay`` after the bottleneck;
* random loss with probability ``loss`` (a seeded ``random.Random``), and
  reordering: with probability ``reorder`` a packet takes ``reorder_delay``
  longer, so the packets behind it overtake it.

Every packet crosses as bytes (``encode`` then ``decode``).  Time is a
``task.Clock``; :func:`run` advances it from one scheduled call to the next,
so a transfer of several simulated seconds takes a fraction of one.
"""

from __future__ import annotations

import random
from typing import Callable

import attr
from twisted.internet.task import Clock

from pilot.machines.connection import Connection
from pilot.wire.packet import Packet


@attr.s(auto_attribs=True, eq=False)
class Direction:
    """One direction's bottleneck and counters."""

    #: When the bottleneck finishes sending what is queued.
    busy_until: float = 0.0
    delivered: int = 0
    lost: int = 0
    tail_dropped: int = 0
    max_queue: int = 0


@attr.s(auto_attribs=True, eq=False)
class SimLink:
    clock: Clock
    #: Bottleneck bandwidth, bytes per second, each direction.
    rate: float = 10e6
    #: One-way propagation delay, seconds (the RTT is twice this plus queueing).
    delay: float = 0.025
    #: Bytes the bottleneck's queue holds (beyond the packet being sent).
    queue_limit: int = 256 * 1024
    loss: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.005
    seed: int = 0
    #: Record (time, side, payload bytes) of every packet offered, in :attr:`offered`.
    record: bool = False
    offered: list[tuple[float, str, int]] = attr.ib(factory=list)
    ends: dict[str, Connection] = attr.ib(factory=dict)
    directions: dict[str, Direction] = attr.ib(factory=lambda: {"a": Direction(), "b": Direction()})
    _random: random.Random = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def sender(self, side: str) -> Callable[[Packet], None]:
        return lambda packet: self.transmit(side, packet)

    def transmit(self, side: str, packet: Packet) -> None:
        data = packet.encode()
        way = self.directions[side]
        now = self.clock.seconds()
        if self.record:
            self.offered.append((now, side, len(packet.payload)))
        backlog = max(0.0, way.busy_until - now) * self.rate
        if backlog + len(data) > self.queue_limit:
            way.tail_dropped += 1
            return
        way.max_queue = max(way.max_queue, int(backlog))
        way.busy_until = max(way.busy_until, now) + len(data) / self.rate
        r = self._random
        if self.loss and r.random() < self.loss:
            way.lost += 1  # lost on the wire, after taking its time at the bottleneck
            return
        arrival = way.busy_until + self.delay
        if self.reorder and r.random() < self.reorder:
            arrival += self.reorder_delay
        way.delivered += 1
        self.clock.callLater(arrival - now, self._deliver, side, data)

    def _deliver(self, side: str, data: bytes) -> None:
        target = self.ends.get("b" if side == "a" else "a")
        if target is not None:
            target.packet_received(Packet.decode(data))


def run(clock: Clock, done: Callable[[], bool], limit: float = 600.0) -> bool:
    """Advance ``clock`` call by call until ``done()`` or ``limit`` simulated seconds have passed."""
    end = clock.seconds() + limit
    calls = clock.calls  # kept sorted by the clock
    while not done():
        if not calls:
            return done()
        when = calls[0].getTime()
        if when > end:
            clock.advance(end - clock.seconds())
            return done()
        clock.advance(max(0.0, when - clock.seconds()))
    return True
