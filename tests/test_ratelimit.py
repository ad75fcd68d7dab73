"""
Tests for L{pilot.ratelimit.KeyedLimiter}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pilot.ratelimit import KeyedLimiter

T0 = 1.8e9


class KeyedLimiterTests(SynchronousTestCase):
    def test_burst_then_refused(self) -> None:
        limiter = KeyedLimiter(rate=1.0, burst=3)
        self.assertEqual([limiter.allow("a", T0) for _ in range(5)], [True, True, True, False, False])

    def test_keys_are_independent(self) -> None:
        limiter = KeyedLimiter(rate=1.0, burst=1)
        self.assertTrue(limiter.allow("a", T0))
        self.assertFalse(limiter.allow("a", T0))
        self.assertTrue(limiter.allow("b", T0))
        self.assertEqual(len(limiter), 2)

    def test_refill(self) -> None:
        limiter = KeyedLimiter(rate=10 / 60, burst=10)  # the reference's registration limit
        self.assertTrue(all(limiter.allow("ip", T0) for _ in range(10)))
        self.assertFalse(limiter.allow("ip", T0 + 1))
        self.assertFalse(limiter.allow("ip", T0 + 5.9))
        self.assertTrue(limiter.allow("ip", T0 + 6.1))  # one token back after 6 s
        self.assertFalse(limiter.allow("ip", T0 + 6.2))

    def test_fractional_refill_accumulates(self) -> None:
        limiter = KeyedLimiter(rate=1.0, burst=1)
        self.assertTrue(limiter.allow("a", T0))
        # refused attempts do not throw the partial refill away
        self.assertFalse(limiter.allow("a", T0 + 0.4))
        self.assertFalse(limiter.allow("a", T0 + 0.8))
        self.assertTrue(limiter.allow("a", T0 + 1.05))

    def test_refill_capped_at_burst(self) -> None:
        limiter = KeyedLimiter(rate=100.0, burst=2, idle=1e9)
        self.assertTrue(limiter.allow("a", T0))
        results = [limiter.allow("a", T0 + 1000) for _ in range(4)]
        self.assertEqual(results, [True, True, False, False])

    def test_clock_going_backwards_gives_no_tokens(self) -> None:
        limiter = KeyedLimiter(rate=1.0, burst=1)
        self.assertTrue(limiter.allow("a", T0))
        self.assertFalse(limiter.allow("a", T0 - 100))
        self.assertFalse(limiter.allow("a", T0 + 0.5))
        self.assertTrue(limiter.allow("a", T0 + 1.0))

    def test_cost(self) -> None:
        limiter = KeyedLimiter(rate=1.0, burst=5)
        self.assertTrue(limiter.allow("a", T0, cost=4))
        self.assertFalse(limiter.allow("a", T0, cost=2))
        self.assertTrue(limiter.allow("a", T0, cost=1))

    def test_burst_at_least_one(self) -> None:
        limiter = KeyedLimiter(rate=1.0, burst=0)
        self.assertTrue(limiter.allow("a", T0))
        self.assertFalse(limiter.allow("a", T0))

    def test_disabled(self) -> None:
        for rate in (0, -1):
            limiter = KeyedLimiter(rate=rate, burst=1)
            self.assertFalse(limiter.enabled)
            self.assertTrue(all(limiter.allow("a", T0) for _ in range(10_000)))
            self.assertEqual(len(limiter), 0)
        self.assertTrue(KeyedLimiter(rate=0.1, burst=1).enabled)

    def test_idle_buckets_pruned(self) -> None:
        limiter = KeyedLimiter(rate=1.0, burst=1, idle=120.0)
        limiter.allow("old", T0)
        limiter.allow("recent", T0 + 100)
        self.assertEqual(len(limiter), 2)
        limiter.allow("new", T0 + 150)
        # 'old' has been idle 150 s >= 120 s; 'recent' only 50 s
        self.assertEqual(len(limiter), 2)
        limiter.allow("other", T0 + 400)
        self.assertEqual(len(limiter), 1)

    def test_prune_runs_at_most_once_per_idle(self) -> None:
        limiter = KeyedLimiter(rate=1.0, burst=1, idle=120.0)
        limiter.allow("a", T0)  # prunes (nothing) and records the prune time
        limiter.allow("b", T0 + 60)
        limiter.allow("c", T0 + 130)  # prune: 'a' is idle 130 s, 'b' only 70 s
        self.assertEqual(len(limiter), 2)
        limiter.allow("d", T0 + 200)  # 'b' now idle 140 s, but no prune until T0 + 250
        self.assertEqual(len(limiter), 3)
        limiter.allow("e", T0 + 251)  # prune: 'b' (191 s) and 'c' (121 s) go, 'd' (51 s) stays
        self.assertEqual(len(limiter), 2)

    def test_pruned_bucket_starts_full(self) -> None:
        limiter = KeyedLimiter(rate=10 / 60, burst=10, idle=120.0)
        self.assertTrue(all(limiter.allow("ip", T0) for _ in range(10)))
        self.assertTrue(all(limiter.allow("ip", T0 + 121) for _ in range(10)))

    def test_max_keys(self) -> None:
        limiter = KeyedLimiter(rate=1.0, burst=1, max_keys=3)
        for key in ("a", "b", "c", "d", "e"):
            self.assertTrue(limiter.allow(key, T0))
            self.assertLessEqual(len(limiter), 3)
        self.assertEqual(len(limiter), 3)
        # the oldest buckets went first: 'a' starts again full, 'e' is still empty
        self.assertTrue(limiter.allow("a", T0))
        self.assertFalse(limiter.allow("e", T0))

    def test_flood_of_sources_is_bounded(self) -> None:
        limiter = KeyedLimiter(rate=1.0, burst=1, max_keys=1000)
        for i in range(20_000):
            limiter.allow(f"10.0.{i >> 8}.{i & 255}", T0 + i * 0.001)
        self.assertLessEqual(len(limiter), 1000)
