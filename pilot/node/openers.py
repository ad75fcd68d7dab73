# -*- test-case-name: tests.node.test_openers -*-
"""
What the node sends when the beacon tells it to punch: a ramp of hop-limited
openers, then the punch itself (``docs/nat.md``, "Openers").

The first datagram of a flow that reaches a Linux router before the router's
own host has sent on that flow is delivered to the router itself when its
INPUT chain is open, and the UNREPLIED conntrack entry it leaves makes the
host's own datagrams to us leave from another port (the conntrack
collision).  The two sides' routers are safe only if each has sent before
the other side's first datagram arrives.  So, on a punch command, we send a
PILP with a hop limit of 2, then 3, then 4, ``opener_step`` apart, and only
then the full punch (the PILPs and our PILA at the normal TTL).  An opener
that passes our own NAT(s) opens our router for the peer and expires at the
next hop (an ICMP time exceeded the socket ignores); it reaches the peer's
router only when no router stands between the two NATs.  A router
``n`` hops from our host is opened by the opener of step ``n - 1``; the
peer's first datagram that reaches it is the one whose limit exceeds the
hops between them: with at least one transit hop between the NATs and equal
NAT depth on both sides, every router is opened at least ``opener_step``
before anything from the other side can reach it, whatever the few hundred
microseconds between the two nodes acting on their commands.  Internet paths
have many hops; two routers on one segment (two hosts of one cloud subnet)
have none: there the first opener that passes one router is delivered to the
other.  So the two sides do not send at once: the side that punches first
(``pilot.machines.path.punches_first``, the lower public endpoint) sends each
opener ``skew`` earlier than the other side sends the same one.  On one
segment the first side's opener always reaches the second side's router
first, so the collision there always leaves the first side's mapping right,
and the path machine's recovery knows which side holds the good entry
(``docs/nat.md``, "Recovery").  With a hop between the NATs nothing changes,
as ``skew`` is smaller than ``step``: each level still reaches the far
router after the far side's previous, shorter opener opened it.  Both sides
punch at the same instant, ``step`` after the second side's last opener
would have been due without the skew.

Sans I/O: the clock and the sender (:class:`pilot.interfaces.IDatagramSender`)
are injected.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pilot.endpoint import Endpoint
from pilot.interfaces import IDatagramSender
from pilot.machines.path.config import OPENER_SKEW, OPENER_STEP, OPENER_TTLS
from pilot.wire.tunnel import PILP

#: Punch probes sent at the normal TTL after the openers (the reference sends three).
PUNCH_PROBES = 3


class Openers:
    """
    Punches, each preceded by its openers.  ``punched(endpoint)`` runs after
    the punch probes (the path machine aims the tunnel there and sends our
    PILA).  A command for an endpoint whose ramp is running is taken into it.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, sender: IDatagramSender, punched: Callable[[Endpoint], None],
                 ttls: tuple[int, ...] = OPENER_TTLS, step: float = OPENER_STEP,
                 skew: float = OPENER_SKEW) -> None:
        if ttls and not 0 <= skew < step:
            raise ValueError(f"skew {skew} must be under step {step}: the second side's opener leaves "
                             "before the first side's next, longer one")
        self._clock = clock
        self._sender = sender
        self._punched = punched
        self._ttls = ttls
        self._step = step
        self._skew = skew
        self._ramps: dict[Endpoint, IDelayedCall] = {}
        self.counters = {"ramps": 0, "merged": 0, "openers": 0}

    def punch(self, peer: Endpoint, first: bool = True) -> None:
        """
        The beacon's command: openers, then the punch.  ``first``: we punch
        first (each opener ``skew`` before the peer's); else each opener goes
        ``skew`` later.  The punch itself goes ``len(ttls) x step`` after the
        command on both sides.
        """
        if peer in self._ramps:
            self.counters["merged"] += 1
            return
        self.counters["ramps"] += 1
        if first or not self._ttls:
            self._opener(peer, 0, first)
        else:
            self._ramps[peer] = self._clock.callLater(self._skew, self._opener, peer, 0, first)

    def _opener(self, peer: Endpoint, index: int, first: bool) -> None:
        if index >= len(self._ttls):
            self._ramps.pop(peer, None)
            for _ in range(PUNCH_PROBES):
                self._sender.send(PILP, peer)
            self._punched(peer)
            return
        self.counters["openers"] += 1
        self._sender.send_limited(PILP, peer, self._ttls[index])
        last = index == len(self._ttls) - 1
        delay = self._step - self._skew if last and not first else self._step
        self._ramps[peer] = self._clock.callLater(delay, self._opener, peer, index + 1, first)

    def running(self) -> int:
        """How many ramps are under way."""
        return len(self._ramps)

    def stop(self) -> None:
        for call in self._ramps.values():
            if call.active():
                call.cancel()
        self._ramps.clear()
