"""Tests for L{pilot.cli_progress}: a progress line on a terminal only, and the final figures."""

from __future__ import annotations

import io

from twisted.trial.unittest import SynchronousTestCase

from pilot.cli_progress import REFRESH, Progress, human_bytes, human_duration, is_terminal


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ProgressTests(SynchronousTestCase):
    def test_terminal_line(self) -> None:
        out, clock = Terminal(), FakeClock()
        p = Progress(out, 10 << 20, "file to b", clock)
        self.assertTrue(p.enabled)
        clock.now += 1.0
        p.update(2 << 20)
        self.assertEqual(out.getvalue(), "\rfile to b  2.0 MiB / 10.0 MiB   20%  2.0 MiB/s  ETA 0:04")
        clock.now += REFRESH / 2
        p.update(3 << 20)  # too soon: not redrawn
        self.assertEqual(out.getvalue().count("\r"), 1)
        clock.now += 4.0
        p.update(10 << 20)
        last = out.getvalue().split("\r")[-1]
        self.assertIn("100%", last)
        self.assertNotIn("ETA", last)
        p.finish()
        self.assertTrue(out.getvalue().endswith("\r"))
        self.assertEqual(p.figures(), {"seconds": 5.1, "bytes_per_second": round((10 << 20) / 5.1, 1)})

    def test_not_a_terminal_writes_nothing(self) -> None:
        out, clock = io.StringIO(), FakeClock()
        p = Progress(out, 1000, "x", clock)
        self.assertFalse(p.enabled)
        for done in range(0, 1001, 100):
            clock.now += 1
            p.update(done)
        p.finish()
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(p.figures(), {"seconds": 11.0, "bytes_per_second": round(1000 / 11.0, 1)})

    def test_nothing_done_in_no_time(self) -> None:
        p = Progress(io.StringIO(), 0, "x", FakeClock())
        p.finish()
        self.assertEqual(p.figures(), {"seconds": 0.0, "bytes_per_second": None})

    def test_closed_stream_is_not_a_terminal(self) -> None:
        s = io.StringIO()
        s.close()
        self.assertFalse(is_terminal(s))

    def test_human(self) -> None:
        self.assertEqual(human_bytes(512), "512 B")
        self.assertEqual(human_bytes(1536), "1.5 KiB")
        self.assertEqual(human_bytes(3 << 30), "3.0 GiB")
        self.assertEqual(human_duration(65), "1:05")
        self.assertEqual(human_duration(3725), "1:02:05")
