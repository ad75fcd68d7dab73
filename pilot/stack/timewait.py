# -*- test-case-name: tests.test_stack_time_wait -*-
"""
:class:`TimeWaits`: the stack's TIME_WAIT entries, kept apart from the
connection table (``docs/stack.md``, "TIME_WAIT").

A connection that reaches TIME_WAIT hands over what TIME_WAIT still needs
(its send sequence, its last window, whether the peer's FIN+ACK echo is
still owed an ACK) and is released at once.  What is left is one entry per
(peer address, peer port, local port) in an insertion-ordered dict, with its
expiry: no connection object, no timer of its own, and no place in the
connection limits (as TCP's TIME_WAIT sockets are not part of a listener's
accept backlog).  One delayed call per table purges the entries that ran
out, oldest first; past ``limit`` entries the oldest is dropped early.

While an entry lasts it does what the connection's TIME_WAIT did
(``docs/connection.md``): a repeated FIN is answered with FIN+ACK again, the
reference's echo of our FIN+ACK gets at most one pure ACK, an RST ends the
entry, and any other packet for the four-tuple (an old duplicate: data, an
ACK, a SYN+ACK) is dropped rather than answered with an RST or taken for a
new connection.  A SYN ends the entry and is handled as a new SYN.
"""

from __future__ import annotations

import collections
from typing import Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from pilot.address import Address
from pilot.wire.packet import ACK, FIN, RST, STREAM, SYN, VERSION, Packet

Key = tuple[Address, int, int]  # (peer address, peer port, local port)

#: TIME_WAIT entries kept at most; past it the oldest is dropped early (docs/stack.md).
MAX_TIME_WAIT = 16384

_INBOUND = 1      # the connection was accepted (the trust gate applies to what still comes)
_ACK_OWED = 2     # we answered the peer's FIN: its FIN+ACK echo gets one pure ACK

# (expiry, send sequence, window, flags)
Entry = tuple[float, int, int, int]


class TimeWaits:
    """See the module docstring."""

    def __init__(self, clock: IReactorTime, send: Callable[[Packet], None], local: Callable[[], Address],
                 counters: collections.Counter[str], duration: float, limit: int = MAX_TIME_WAIT) -> None:
        self.clock = clock
        self._send = send
        self._local = local
        self._counters = counters
        self.duration = duration
        self.limit = limit
        self._entries: collections.OrderedDict[Key, Entry] = collections.OrderedDict()
        #: Entries per local port (an ephemeral port in TIME_WAIT is not handed out again).
        self.ports: collections.Counter[int] = collections.Counter()
        self._purge: Optional[IDelayedCall] = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def add(self, key: Key, seq: int, window: int, inbound: bool, ack_owed: bool) -> None:
        """A connection entered TIME_WAIT: keep what answering stray packets needs, for ``duration``."""
        self.remove(key)
        while len(self._entries) >= self.limit:
            self._forget(self._entries.popitem(last=False)[0])
            self._counters["time_wait.evicted"] += 1
        flags = (_INBOUND if inbound else 0) | (_ACK_OWED if ack_owed else 0)
        self._entries[key] = (self.clock.seconds() + self.duration, seq, window, flags)
        self.ports[key[2]] += 1
        if self._purge is None:
            self._purge = self.clock.callLater(self.duration, self._expire)

    def remove(self, key: Key) -> bool:
        if self._entries.pop(key, None) is None:
            return False
        self._forget(key)
        return True

    def _forget(self, key: Key) -> None:
        port = key[2]
        self.ports[port] -= 1
        if self.ports[port] <= 0:
            del self.ports[port]

    def _expire(self) -> None:
        """The purge: drop every entry that ran out, then wait for the oldest left."""
        self._purge = None
        now = self.clock.seconds()
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if entry[0] > now:
                self._purge = self.clock.callLater(entry[0] - now, self._expire)
                return
            del entries[key]
            self._forget(key)

    def clear(self) -> None:
        """Forget every entry and cancel the purge (the stack stops)."""
        self._entries.clear()
        self.ports.clear()
        if self._purge is not None and self._purge.active():
            self._purge.cancel()
        self._purge = None

    def packet_received(self, packet: Packet, key: Key, allowed: Callable[[], bool]) -> bool:
        """
        A stream packet for no connection: True if a TIME_WAIT entry took it;
        False if there is none (any more) and the packet is for no connection.
        ``allowed()`` is the trust gate, asked only for an accepted connection's entry.
        """
        entry = self._entries.get(key)
        if entry is None:
            return False
        expiry, seq, window, flags = entry
        if expiry <= self.clock.seconds():
            self.remove(key)
            return False
        counters = self._counters
        pflags = packet.flags
        if flags & _INBOUND and not allowed():
            self.remove(key)
            counters["refused.untrusted"] += 1
        elif pflags & RST:
            self.remove(key)
        elif pflags & (SYN | ACK) == SYN:
            self.remove(key)  # the peer reuses its ports: a new connection
            counters["time_wait.reopened"] += 1
            return False
        elif pflags & (FIN | ACK) == FIN:
            self._answer(packet, FIN | ACK, seq, window)  # our FIN+ACK was lost
        elif pflags & FIN and flags & _ACK_OWED:
            self._entries[key] = (expiry, seq, window, flags & ~_ACK_OWED)
            self._answer(packet, ACK, seq, window)
        else:
            counters["dropped.time_wait"] += 1  # an old duplicate
        return True

    def _answer(self, packet: Packet, flags: int, seq: int, window: int) -> None:
        self._send(Packet.unchecked(VERSION, flags, STREAM, self._local(), packet.src, packet.dst_port,
                                    packet.src_port, seq & 0xFFFFFFFF, (packet.seq + 1) & 0xFFFFFFFF,
                                    window, b""))
