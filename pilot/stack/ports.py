# -*- test-case-name: tests.test_stack -*-
"""
Ports and limits of the stack: the constants (docs/reference-wire.md §4.6-§4.8 and ours),
ephemeral port allocation, and :class:`Listening`, the handle of a bound port.
"""

from __future__ import annotations

from typing import Callable

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from zope.interface import implementer

from pilot.errors import ConnectionFailed, InvalidArgument
from pilot.stack.transport import PilotAddress
from pilot.wire.packet import EPHEMERAL_END, EPHEMERAL_START, HEADER_LEN, MAX_PAYLOAD

# The reference's (docs/reference-wire.md §4.7).
MAX_PER_PORT = 1024             # connections per local port
MAX_CONNECTIONS = 4096          # connections in all
SYN_RATE = 100.0                # new-connection SYNs per second from all untrusted nodes together ...
SYN_RATE_PER_NODE = 10.0        # ... and from one untrusted node (token buckets holding one second's worth)
ACCEPT_QUEUE = 64               # handshakes in progress from untrusted nodes (the reference: per port)

# Ours (docs/stack.md, "SYNs and half-open connections"): a trusted node's
# burst of new streams is never held to the reference's 10 SYNs a second
# (a dropped SYN costs the dialler the 1 s initial RTO), and a flood is
# bounded by the half-open cap, which sheds the heaviest sender's oldest
# handshake first.
SYN_RATE_TRUSTED = 1000.0       # new-connection SYNs per second from one trusted node ...
SYN_BURST_TRUSTED = 1024.0      # ... with a burst of one port's worth of connections (MAX_PER_PORT)
HALF_OPEN = 1024                # inbound handshakes in progress in all, from every node
UNTRUSTED_PER_NODE = 4          # connections held (or being opened) by one untrusted node (port 444 only)

#: The largest datagram payload: the whole packet stays within 65535 bytes.
MAX_DATAGRAM = MAX_PAYLOAD - HEADER_LEN


def check_port(port: object, name: str = "port") -> int:
    """``port`` if it is an integer from 1 to 65535 (0 is the control port); ``InvalidArgument`` otherwise."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 0xFFFF:
        raise InvalidArgument(f"{name} must be an integer from 1 to 65535, not {port!r}")
    return port


class EphemeralPorts:
    """
    Ports from ``first`` to ``last`` handed out in turn, wrapping, skipping
    those ``in_use`` says are taken (docs/reference-wire.md §4.6).
    """

    def __init__(self, in_use: Callable[[int], bool], first: int = EPHEMERAL_START,
                 last: int = EPHEMERAL_END) -> None:
        self._in_use = in_use
        self.first, self.last = first, last
        #: The next port to try.
        self.next = first

    def allocate(self) -> int:
        for _ in range(self.last - self.first + 1):
            port = self.next
            self.next = port + 1 if port < self.last else self.first
            if not self._in_use(port):
                return port
        raise ConnectionFailed(f"all {self.last - self.first + 1} ephemeral ports are in use",
                               hint="close some connections or listeners and retry")


@implementer(IListeningPort)
@attr.s(auto_attribs=True, eq=False)
class Listening:
    """
    A bound port, for streams (``kind == "stream"``) or datagrams.
    :meth:`close` unbinds it (idempotent); connections already accepted
    carry on, handshakes still in progress are refused.
    """

    port: int
    kind: str
    _unbind: Callable[["Listening"], None] = attr.ib(repr=False)
    host: PilotAddress
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._unbind(self)

    def startListening(self) -> None:
        """Already listening: the stack binds when it hands this out."""

    def stopListening(self) -> Deferred[None]:
        self.close()
        return succeed(None)

    def getHost(self) -> PilotAddress:
        return self.host
