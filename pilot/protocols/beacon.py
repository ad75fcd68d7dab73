# -*- test-case-name: tests.protocols.test_beacon -*-
"""
The beacon's UDP socket: each datagram goes to :class:`pilot.server.beacon.Beacon`,
and whatever it returns is written to the addresses it names.

Hostile input is normal for a public UDP port, so refused datagrams are logged
at debug level only; at most once per ``summary_interval`` a warning sums up
what was dropped since the last one.  An unexpected exception (a bug) is
logged with its traceback, also at most once per interval, and never reaches
the reactor.

A reply to the datagram's own source (every Discover's) is sent with the
port socket's ``sendto``: Twisted's ``Port.write`` checks the address is an
IPv4 or IPv6 one of the socket's family (three parses of the host string,
one of them an exception) for an address the socket itself reported.  Every
other destination (punch commands, relayed frames: endpoints from the
beacon's table), any transport that is not a plain unconnected
``twisted.internet.udp.Port`` (test transports), and any ``sendto`` that
fails go through ``transport.write`` as before, so its errors are Twisted's
(``pilot.protocols.sendnow`` does the same for TCP).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from pilot.server.beacon import Beacon

#: not imported here: the reactor's own module is whatever the reactor loaded
_UDP = "twisted.internet.udp"

SendTo = Callable[[bytes, Any], Any]


def _direct_sendto(transport: object) -> Optional[SendTo]:
    """The socket's ``sendto`` of a plain, unconnected Twisted UDP port; None for anything else."""
    udp = sys.modules.get(_UDP)
    if udp is None or type(transport) is not udp.Port:
        return None
    if getattr(transport, "_connectedAddr", True):  # connected, or another Twisted's names: its own write
        return None
    sendto: Optional[SendTo] = getattr(getattr(transport, "socket", None), "sendto", None)  # None: not listening
    return sendto


class BeaconProtocol(DatagramProtocol):
    log = Logger()

    def __init__(self, beacon: Beacon, clock: IReactorTime, summary_interval: float = 60.0) -> None:
        self.beacon = beacon
        self.clock = clock
        self.summary_interval = summary_interval
        self._refused: dict[str, int] = {}
        self._errors = 0
        self._last_summary = clock.seconds()
        self._last_failure: float | None = None
        #: the transport the cached ``sendto`` belongs to, and that ``sendto`` (None: write)
        self._direct_for: object = None
        self._sendto: Optional[SendTo] = None

    def startProtocol(self) -> None:
        self._direct_for = None  # a port listening (again) may hold a new socket: look again

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            replies = self.beacon.datagram_received(datagram, addr)
            refusal = self.beacon.last_refusal
        except Exception:
            self._errors += 1
            now = self.clock.seconds()
            if self._last_failure is None or now - self._last_failure >= self.summary_interval:
                self._last_failure = now
                self.log.failure("beacon failed on a datagram of {length} bytes from {addr}",
                                 length=len(datagram), addr=addr)
            replies, refusal = [], None
        if refusal is not None:
            counter, reason = refusal
            self.log.debug("beacon: {outcome} for a datagram from {addr}: {reason}",
                           outcome=counter, addr=addr, reason=reason)
            if counter.startswith("dropped."):
                self._refused[counter] = self._refused.get(counter, 0) + 1
        transport = self.transport
        if transport is not None and replies:
            if transport is not self._direct_for:
                self._direct_for, self._sendto = transport, _direct_sendto(transport)
            sendto = self._sendto
            for data, destination in replies:
                try:
                    if destination is addr and sendto is not None:
                        try:
                            sendto(data, destination)  # the address the socket reported
                            continue
                        except OSError:
                            pass  # full, interrupted, refused, closed: Port.write decides, as ever
                    transport.write(data, destination)
                except Exception:
                    self.log.debug("beacon could not send {length} bytes to {destination}",
                                   length=len(data), destination=destination)
        self._maybe_summarise()

    def _maybe_summarise(self) -> None:
        now = self.clock.seconds()
        if now - self._last_summary < self.summary_interval:
            return
        if self._refused or self._errors:
            self.log.warn("beacon dropped {dropped} datagrams in the last {seconds:.0f} s ({reasons}); "
                          "{errors} failed with errors",
                          dropped=sum(self._refused.values()), seconds=now - self._last_summary,
                          reasons=", ".join(f"{k}: {v}" for k, v in sorted(self._refused.items())),
                          refused=dict(self._refused), errors=self._errors)
        self._refused.clear()
        self._errors = 0
        self._last_summary = now
