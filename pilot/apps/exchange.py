# -*- test-case-name: tests.apps.test_exchange -*-
"""
The data exchange receiver (port 1001): one :class:`Receiver` per
connection turns the frames of :class:`pilot.wire.dataexchange.FrameReader`
into saved messages and files and the reference's replies (``ACK TEXT 5
bytes``, ``ERR FILE save failed: <reason>``; ``docs/reference-wire.md`` §8.1).

A message is held in memory until whole, so the bytes all receivers hold
together are bounded by :class:`Budget`; a message that does not fit is
refused with ``ERR`` (and its bytes skipped), not buffered.  A file goes to
disk as it arrives (:mod:`pilot.apps.storage`).  What happened is counted in
the shared ``counters`` (``docs/apps.md`` lists them).  Pure apart from the
storage's file calls: no reactor, no logging.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable

from pilot.apps.storage import IncomingFile, Storage, StorageError
from pilot.wire.dataexchange import (
    BINARY, FILE, JSON, TEXT, Chunk, End, Event, Start, ack_text, err_text,
)

#: Bytes of unfinished messages all receivers may hold together.
MESSAGE_BUDGET = 64 * 1024 * 1024


class Budget:
    """Bytes shared by every receiver: :meth:`take` succeeds only while the total stays under ``limit``."""

    def __init__(self, limit: int = MESSAGE_BUDGET) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held = max(0, self.held - n)


class Receiver:
    """
    One connection's frames in, reply texts out.  ``sender`` is the peer's
    address as text; ``now`` the clock's ``seconds``.
    """

    def __init__(self, storage: Storage, sender: str, now: Callable[[], float], budget: Budget,
                 counters: collections.Counter[str]) -> None:
        self.storage = storage
        self.sender = sender
        self.now = now
        self.budget = budget
        self.counters = counters
        self._start: Start | None = None
        self._parts: list[bytes] = []
        self._held = 0
        self._file: IncomingFile | None = None
        self._error: str | None = None

    def events(self, events: Iterable[Event]) -> list[str]:
        replies: list[str] = []
        for event in events:
            if isinstance(event, Start):
                self._begin(event)
            elif isinstance(event, Chunk):
                self._chunk(event.data)
            elif isinstance(event, End):
                replies.append(self._end())
        return replies

    def _begin(self, start: Start) -> None:
        self._start, self._parts, self._error = start, [], None
        if start.type == FILE:
            try:
                self._file = self.storage.begin_file(start.name or "", start.length, self.sender, self.now())
            except StorageError as e:
                self._error = str(e)
            else:
                if self._file.base + self._file.ext != start.name:
                    self.counters["names.cleaned"] += 1  # a path, hidden or control characters, too long
        elif start.type not in (TEXT, BINARY, JSON):
            self._error = f"unknown frame type {start.type}"
        elif self.budget.take(start.length):
            self._held = start.length
        else:
            self._error = "busy: too many messages being received; retry"

    def _chunk(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._file is not None:
            try:
                self._file.write(data)
            except StorageError as e:
                self._file = None
                self._error = str(e)
        else:
            self._parts.append(data)

    def _end(self) -> str:
        start, self._start = self._start, None
        assert start is not None
        data, self._parts = b"".join(self._parts), []
        self.budget.give(self._held)
        self._held = 0
        kind = "file" if start.type == FILE else "message"
        try:
            if self._error is not None:
                raise StorageError(self._error)
            if self._file is not None:
                incoming, self._file = self._file, None
                incoming.commit()
            else:
                self.storage.save_message(start.type, self.sender, data, self.now())
        except StorageError as e:
            self.counters[f"{kind}s.refused"] += 1
            return err_text(start.type, str(e))
        self.counters[f"{kind}s.saved"] += 1
        self.counters["bytes.saved"] += start.length
        return ack_text(start.type, start.length)

    def lost(self) -> None:
        """The connection ended: a frame cut short is dropped (and its temporary file removed)."""
        if self._start is not None:
            self.counters["frames.truncated"] += 1
        if self._file is not None:
            self._file.abort()
            self._file = None
        self.budget.give(self._held)
        self._held = 0
        self._start, self._parts = None, []
