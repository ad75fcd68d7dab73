# -*- test-case-name: tests.node.test_probe -*-
"""
How often the node asks the beacon (unsigned) where it is: an interval that
adapts to the NAT in front of it (docs/registration.md, "The probe's
interval"; docs/nat.md).

The probe keeps the tunnel socket's UDP mapping toward the beacon open
(punch commands and relayed frames come from there) and sees a move only the
NAT knows of.  Most NATs keep an answered UDP mapping far longer than
``DISCOVER_PROBE`` (Linux conntrack: 120 s once a reply was seen, 30 s
before; RFC 4787 REQ-5 asks for at least 2 minutes; WireGuard's persistent
keepalive is 25 s for the home NATs that drop idle UDP after 30 s).  A few
are more aggressive.  Such a NAT shows itself: the beacon answers a probe
with another public endpoint while our own route to it did not change.  The
node then probes more often (:data:`PROBE_STEPS`), down to a floor, and
keeps the shorter interval for this network: until our route's source
address or the beacon changes (:meth:`ProbeInterval.reset`).

A node behind no NAT (its socket's address is what the beacon sees) has no
mapping the beacon could show moving, so its interval never shortens: it
stays at ``DISCOVER_PROBE``.  It is not lengthened either: such a host may
sit behind a stateful firewall (a cloud security group, a host's conntrack)
whose pinhole lets the beacon's punch commands in, and which drops it
without any sign to us; 25 s is under the 30 s such firewalls keep an idle
flow, and the probe also finds a silent rendezvous (``PROBE_ANSWER_WAIT``).
"""

from __future__ import annotations

from typing import Optional

from twisted.logger import Logger

#: How long after its last Discover (signed or not) the node asks the beacon
#: again (unsigned) on a network where no NAT has dropped its mapping yet (s):
#: WireGuard's keepalive, under every common UDP timeout (docs/registration.md).
DISCOVER_PROBE = 25.0
#: The intervals, longest first: each time a NAT drops our mapping between
#: probes the node moves to the next one shorter than the gap that lost it.
PROBE_STEPS = (DISCOVER_PROBE, 15.0, 10.0)
#: A Discover the beacon has not answered this long (s) makes the node doubt its registry
#: connection (the rendezvous may have died without closing it): it heartbeats at once.
PROBE_ANSWER_WAIT = 3.0
#: While the registry is lost, the beacon is asked this often whether the rendezvous is back.
OUTAGE_PROBE = 2.0


class ProbeInterval:
    """
    The unsigned probe's interval for the network the node is on.

    :param steps: the intervals, longest (the default) first.
    """

    log = Logger()

    def __init__(self, steps: tuple[float, ...] = PROBE_STEPS) -> None:
        self._steps = steps
        self._index = 0

    @property
    def interval(self) -> float:
        return self._steps[self._index]

    def mapping_lost(self, gap: float) -> bool:
        """
        The beacon saw us at another endpoint, our route unchanged, after
        ``gap`` seconds without a Discover: the NAT dropped the mapping within
        ``gap``.  Move to the longest step shorter than both ``gap`` and the
        interval now (a move a shorter interval could not have prevented
        changes nothing); say whether the interval changed.
        """
        for index in range(self._index + 1, len(self._steps)):
            if self._steps[index] < gap:
                before, self._index = self.interval, index
                floor = " (the floor)" if index == len(self._steps) - 1 else ""
                self.log.info("the NAT dropped our mapping to the beacon within {gap:.0f} s: probing every "
                              "{interval:.0f} s{floor}, was {before:.0f} s, until the network changes",
                              gap=gap, interval=self.interval, floor=floor, before=before)
                return True
        return False

    def reset(self, why: Optional[str] = None) -> None:
        """Another network or another beacon: back to the default interval."""
        if self._index:
            self.log.info("probing every {interval:.0f} s again: {why}", interval=self._steps[0], why=why)
        self._index = 0
