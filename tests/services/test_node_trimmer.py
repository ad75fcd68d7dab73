"""Tests for L{pilot.services.node.MemoryTrimmer}."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.services import node


class MemoryTrimmerTests(SynchronousTestCase):
    def test_at_start_then_every_interval(self) -> None:
        calls: list[None] = []
        self.patch(node, "release_free_memory", lambda: calls.append(None))
        clock = Clock()
        trimmer = node.MemoryTrimmer(clock)
        trimmer.startService()
        self.assertEqual(len(calls), 1)
        clock.advance(node.TRIM_INTERVAL)
        self.assertEqual(len(calls), 2)
        trimmer.stopService()
        clock.advance(node.TRIM_INTERVAL * 3)
        self.assertEqual(len(calls), 2)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_without_start(self) -> None:
        node.MemoryTrimmer(Clock()).stopService()  # a service whose parent failed to start
