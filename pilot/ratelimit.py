# -*- test-case-name: tests.test_ratelimit -*-
"""Token buckets, one per key (a source IP), with idle buckets dropped."""

from __future__ import annotations

from typing import Hashable


class KeyedLimiter:
    """
    ``rate`` tokens per second refill each key's bucket up to ``burst``.

    ``rate <= 0`` disables the limit.  Buckets untouched for ``idle`` seconds
    are dropped (checked at most once per ``idle``), and at most
    ``max_keys`` are kept, so a flood of sources cannot grow memory without
    bound: past it the oldest bucket is dropped.
    """

    def __init__(self, rate: float, burst: float, idle: float = 120.0, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.idle = idle
        self.max_keys = max_keys
        self._buckets: dict[Hashable, list[float]] = {}
        self._last_prune = 0.0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        if self.rate <= 0:
            return True
        if now - self._last_prune >= self.idle:
            self._prune(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.pop(next(iter(self._buckets)))
            bucket = self._buckets[key] = [self.burst, now]
        tokens, last = bucket
        tokens = min(self.burst, tokens + (now - last) * self.rate) if now > last else tokens
        bucket[1] = max(now, last)
        if tokens >= cost:
            bucket[0] = tokens - cost
            return True
        bucket[0] = tokens
        return False

    def _prune(self, now: float) -> None:
        self._last_prune = now
        stale = [k for k, (_, last) in self._buckets.items() if now - last >= self.idle]
        for k in stale:
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)
