# -*- test-case-name: tests.machines.test_datatransfer -*-
"""
The receiving half of a stream: reassembly, the advertised window, SACK blocks.

Sequence numbers here are *absolute* (unbounded Python ints); the connection
maps them to and from the 32-bit wire values.  Nothing here knows about time,
packets or the application: the connection asks :meth:`RecvBuffer.receive`
what happened to a segment, takes in-order bytes with :meth:`RecvBuffer.take`
when the application is reading, and puts :meth:`RecvBuffer.window` and
:meth:`RecvBuffer.sack_blocks` in the ACKs it sends.

Window (docs/reference-wire.md §4.5, §4.7): the header's window is the number of free
4096-byte slots in the receive queue, at most 512.  Only in-order bytes that
the application has not taken yet occupy the queue; out-of-order segments
are held apart, as the reference does, so that the window stays steady
during loss recovery: at most 128 slots' worth of bytes (the reference's 128
segments of 4096 bytes: counting segments would hold only 170 KB of a
1 MiB window of 1,330-byte segments, and drop the rest on every loss), in
at most 512 pieces.  The reference's *sender* reads a window
of 0 as "no limit", so a full queue is advertised as 1, never 0; to keep that
promise bounded, in-order data is accepted only up to one segment past the
queue's size and anything beyond is dropped (and answered at once with an
ACK, which the sender's persist logic understands; see ``docs/connection.md``).
"""

from __future__ import annotations

import collections
import enum

import attr

MSS = 4096
RECV_QUEUE_SEGMENTS = 512
MAX_OOO_SEGMENTS = 128
#: Pieces held out of order, at most this many per slot of the budget (a peer cutting tiny
#: segments cannot make us keep many thousands of them).
OOO_PIECES_PER_SLOT = 4
MAX_SACK_BLOCKS = 4


class Receipt(enum.Enum):
    """What became of one received data segment."""

    #: New bytes at the expected sequence number (perhaps pulling in buffered ones).
    IN_ORDER = "in_order"
    #: Held in the out-of-order buffer until the gap before it is filled.
    OUT_OF_ORDER = "out_of_order"
    #: Every byte was already received.
    DUPLICATE = "duplicate"
    #: Dropped: the queue (or the out-of-order buffer) is full.
    NO_ROOM = "no_room"
    #: Dropped: starts beyond anything the advertised window allows.
    OUT_OF_WINDOW = "out_of_window"


@attr.s(auto_attribs=True, eq=False)
class RecvBuffer:
    #: Next byte expected: everything before it was received in order.
    rcv_nxt: int
    mss: int = MSS
    queue_segments: int = RECV_QUEUE_SEGMENTS
    max_ooo: int = MAX_OOO_SEGMENTS
    #: In-order bytes the application has not taken yet.
    ready_bytes: int = 0
    #: True after a :meth:`receive` whose segment closed a gap below buffered data.
    filled_gap: bool = False
    _ready: collections.deque[bytes] = attr.ib(factory=collections.deque)
    _ooo: dict[int, bytes] = attr.ib(factory=dict)
    _ooo_bytes: int = 0
    #: Start of the most recently buffered out-of-order segment (its SACK block goes first).
    _latest: int | None = None

    @property
    def limit(self) -> int:
        return self.queue_segments * self.mss

    @property
    def ooo_count(self) -> int:
        return len(self._ooo)

    def receive(self, start: int, payload: bytes) -> Receipt:
        """Take one data segment that begins at absolute sequence number ``start``."""
        self.filled_gap = False
        rcv_nxt = self.rcv_nxt
        size = len(payload)
        if start + size <= rcv_nxt:
            return Receipt.DUPLICATE
        if start < rcv_nxt:
            payload = payload[rcv_nxt - start:]
            size = len(payload)
            start = rcv_nxt
        room = (self.queue_segments + 1) * self.mss  # limit + mss
        if start - rcv_nxt >= room:
            return Receipt.OUT_OF_WINDOW
        if start > rcv_nxt:
            return self._hold(start, payload)
        if self.ready_bytes + size > room:
            return Receipt.NO_ROOM
        self._ready.append(payload)  # _append(), once per segment
        self.ready_bytes += size
        self.rcv_nxt = rcv_nxt + size
        if self._ooo:
            self._pull_in()
        return Receipt.IN_ORDER

    def _hold(self, start: int, payload: bytes) -> Receipt:
        held = self._ooo.get(start)
        if held is not None and len(held) >= len(payload):
            return Receipt.DUPLICATE
        grow = len(payload) - (len(held) if held is not None else 0)
        if (self._ooo_bytes + grow > self.max_ooo * self.mss
                or held is None and len(self._ooo) >= self.max_ooo * OOO_PIECES_PER_SLOT):
            return Receipt.NO_ROOM
        self._ooo_bytes += grow
        self._ooo[start] = payload
        self._latest = start
        return Receipt.OUT_OF_ORDER

    def _append(self, payload: bytes) -> None:
        self._ready.append(payload)
        self.ready_bytes += len(payload)
        self.rcv_nxt += len(payload)

    def _pull_in(self) -> None:
        """Move buffered segments that now touch ``rcv_nxt`` into the queue."""
        while True:
            found = False
            for start in sorted(self._ooo):
                if start > self.rcv_nxt:
                    break
                payload = self._ooo.pop(start)
                self._ooo_bytes -= len(payload)
                found = True
                end = start + len(payload)
                if end > self.rcv_nxt:
                    self._append(payload[self.rcv_nxt - start:])
                    self.filled_gap = True
            if not found:
                return

    def take(self) -> bytes:
        """Every in-order byte not yet handed to the application (and forget them)."""
        if not self._ready:
            return b""
        data = b"".join(self._ready)
        self._ready.clear()
        self.ready_bytes = 0
        return data

    def window(self) -> int:
        """Free queue slots, in segments, for the header: 1 to ``queue_segments``."""
        slots, mss = self.queue_segments, self.mss
        free = (slots * mss - self.ready_bytes) // mss  # (limit - ready_bytes) // mss, once per packet sent
        if free > slots:
            free = slots
        return 1 if free < 1 else free if free < 0xFFFF else 0xFFFF

    def sack_blocks(self) -> list[tuple[int, int]]:
        """
        Up to four (left, right) absolute ranges held out of order, right edge
        exclusive: the one holding the latest arrival first (RFC 2018), then
        the others in sequence order.
        """
        if not self._ooo:
            return []
        blocks: list[list[int]] = []
        for start in sorted(self._ooo):
            end = start + len(self._ooo[start])
            if blocks and start <= blocks[-1][1]:
                blocks[-1][1] = max(blocks[-1][1], end)
            else:
                blocks.append([start, end])
        first = [b for b in blocks if self._latest is not None and b[0] <= self._latest < b[1]]
        rest = [b for b in blocks if b not in first]
        return [(left, right) for left, right in (first + rest)[:MAX_SACK_BLOCKS]]
