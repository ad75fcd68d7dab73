# -*- test-case-name: tests.machines.test_datatransfer -*-
"""
The bytes a stream was given and has not cut into segments yet
(:class:`SendQueue`), and the rule that keeps a segment from reading as a
SACK option (:func:`sack_safe`).  Split from
:mod:`~pilot.machines.connection.sendbuffer`, whose
:class:`~pilot.machines.connection.sendbuffer.Sender` takes every new
segment from here: arithmetic on bytes, no clock, no packets.
"""

from __future__ import annotations

import collections

from pilot.wire.packet import SACK_MAGIC, parse_sack


def sack_safe(chunk: bytes) -> bytes:
    """``chunk``, shortened if needed so that it does not parse as a SACK option."""
    blocks = parse_sack(chunk)
    if blocks is None:
        return chunk
    return chunk[:5 + 8 * len(blocks) - 1]


class SendQueue:
    """
    The application's writes, in order, and how far the head one has been
    cut.  The head write is read from an offset, never sliced off: a 64 KiB
    write cut into small segments would otherwise copy what is left of it for
    every segment.
    """

    __slots__ = ("_chunks", "queued", "_offset")

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        #: Bytes written and not yet taken.
        self.queued = 0
        #: Bytes of the head write already taken.
        self._offset = 0

    def write(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self.queued += len(data)

    def take(self, n: int) -> bytes:
        """
        The next ``n`` bytes (``0 < n <= queued``), or fewer if they would
        read as a SACK option (:func:`sack_safe`), removed from the queue.
        """
        chunks = self._chunks
        head = chunks[0]
        offset = self._offset
        end = offset + n
        if end <= len(head):  # within the head write: every segment of a large write
            piece = head[offset:end]
            if piece[:4] == SACK_MAGIC:
                piece = sack_safe(piece)
                end = offset + len(piece)
            if end == len(head):
                chunks.popleft()
                self._offset = 0
            else:
                self._offset = end
            self.queued -= len(piece)
            return piece
        piece = sack_safe(self._peek(n))
        self._consume(len(piece))
        return piece

    def _peek(self, n: int) -> bytes:
        out: list[bytes] = []
        need = n
        offset = self._offset
        for chunk in self._chunks:
            piece = chunk[offset:offset + need]
            offset = 0
            out.append(piece)
            need -= len(piece)
            if not need:
                break
        return out[0] if len(out) == 1 else b"".join(out)

    def _consume(self, n: int) -> None:
        self.queued -= n
        chunks = self._chunks
        while n:
            left = len(chunks[0]) - self._offset
            if left <= n:
                chunks.popleft()
                self._offset = 0
                n -= left
            else:
                self._offset += n
                n = 0
