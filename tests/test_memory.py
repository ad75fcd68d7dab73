"""Tests for L{pilot.memory}."""

from __future__ import annotations

import sys

from twisted.trial.unittest import SynchronousTestCase

from pilot import memory


class ReleaseTests(SynchronousTestCase):
    def test_release(self) -> None:
        result = memory.release_free_memory()
        self.assertEqual(result, sys.platform.startswith("linux"))
        self.assertEqual(memory.release_free_memory(), result)  # the library is looked up once

    def test_no_libc(self) -> None:
        self.patch(memory, "_LIBC", [None])
        self.assertFalse(memory.release_free_memory())
