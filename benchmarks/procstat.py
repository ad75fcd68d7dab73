"""
What the benchmarks read about a process and a sample, shared by every
script here (each imports it as a sibling: ``from procstat import ...``).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile of ``values`` (nearest rank); NaN for none."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100.0 * len(s)))]


def rss_mb(pid: int) -> float:
    """The process's resident set, MiB (``/proc/PID/status`` VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU seconds so far (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_stoppable(run: Callable[[Any], int], args: Any) -> None:
    """
    ``sys.exit(run(args))``, with SIGTERM taken as Ctrl-C: the benchmark's
    ``finally`` blocks run, so every process it started is stopped (exit 130).
    """
    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    try:
        status = run(args)
    except KeyboardInterrupt:
        print("interrupted; the processes it started are stopped", file=sys.stderr)
        status = 130
    sys.exit(status)
