# -*- test-case-name: tests.server.test_timing -*-
"""
How long the registry took to answer its requests, by request type, in the
buckets of a Prometheus histogram (``pilot_request_duration_seconds``,
``docs/operations.md``).

:class:`Durations` only counts: one ``bisect`` and two additions a request.
The registry reads its injected clock around each request
(``Registry.handle``); the time is the registry's own work (checks,
signatures, the change), not the network's nor a durable write's.
"""

from __future__ import annotations

import bisect

#: Upper bounds, in seconds, of the buckets (a last one, +Inf, holds the rest).
BOUNDS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Durations:
    """Per-type counts by bucket (not cumulative: bucket ``i`` holds ``BOUNDS[i-1] < d <= BOUNDS[i]``) and sums."""

    def __init__(self, bounds: tuple[float, ...] = BOUNDS) -> None:
        self.bounds = bounds
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, kind: str, seconds: float) -> None:
        """One request of type ``kind`` took ``seconds`` (a clock stepped back counts as 0)."""
        seconds = max(0.0, seconds)
        counts = self.counts.get(kind)
        if counts is None:
            counts = self.counts[kind] = [0] * (len(self.bounds) + 1)
            self.sums[kind] = 0.0
        counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sums[kind] += seconds

    def cumulative(self) -> dict[str, tuple[list[tuple[float, int]], float]]:
        """A copy: per type, ``[(upper bound, requests at most that long), ..., (inf, all)]`` and the sum."""
        out: dict[str, tuple[list[tuple[float, int]], float]] = {}
        for kind, counts in self.counts.items():
            running, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), counts):
                running += count
                buckets.append((bound, running))
            out[kind] = (buckets, self.sums[kind])
        return out
