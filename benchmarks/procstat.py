"""
What the benchmarks read about a process and a sample, shared by every
script here (each imports it as a sibling: ``from procstat import ...``).
"""

from __future__ import annotations

import os


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
