# -*- test-case-name: tests.test_cli_progress -*-
"""
Progress of long work (``send-file``, ``bench``) on stderr, only when stderr
is a terminal: one line rewritten in place with the bytes done, the rate and
the time left, at most :data:`REFRESH` times a second, cleared at the end.
When stderr is not a terminal (a pipe, a log, ``--json`` consumers) nothing
is written; the final figures are in the command's result either way
(:meth:`Progress.figures`).
"""

from __future__ import annotations

import time
from typing import IO, Any, Callable

#: Seconds between two redraws of the line.
REFRESH = 0.2


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def human_duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    def __init__(self, stream: IO[str], total: int, label: str, clock: Callable[[], float] = time.monotonic,
                 enabled: bool | None = None) -> None:
        self.stream = stream
        self.total = total
        self.label = label
        self.clock = clock
        self.enabled = is_terminal(stream) if enabled is None else enabled
        self.started = clock()
        self.done = 0
        self._drawn = 0.0
        self._width = 0
        self.finished_at: float | None = None

    def update(self, done: int) -> None:
        """``done`` bytes of ``total`` are done."""
        self.done = done
        if not self.enabled:
            return
        now = self.clock()
        if now - self._drawn < REFRESH and done < self.total:
            return
        self._drawn = now
        self._write(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        parts = [self.label, f"{human_bytes(self.done)} / {human_bytes(self.total)}"]
        if self.total:
            parts.append(f"{100 * self.done // self.total:3d}%")
        parts.append(f"{human_bytes(rate)}/s")
        if rate > 0 and self.done < self.total:
            parts.append(f"ETA {human_duration((self.total - self.done) / rate)}")
        return "  ".join(parts)

    def _write(self, text: str) -> None:
        pad = max(0, self._width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)

    def finish(self) -> None:
        """Clear the line (the result says the rest)."""
        self.finished_at = self.clock()
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def figures(self) -> dict[str, Any]:
        """``seconds`` and ``bytes_per_second`` for the result (``--json``)."""
        end = self.finished_at if self.finished_at is not None else self.clock()
        seconds = max(end - self.started, 0.0)
        return {"seconds": round(seconds, 6),
                "bytes_per_second": round(self.done / seconds, 1) if seconds > 0 else None}
