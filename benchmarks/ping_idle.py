"""
The node daemon's ping, back to back and paced, quiet or next to CPU hogs, and an
idle pair's CPU: how the busy poll (``--busy-poll``, ``PILOT_BUSY_POLL``) is
measured (docs/performance.md, "a contention-aware busy poll").

Starts a rendezvous and two trusted daemons as ``benchmarks/tunnel.py`` does
(127.0.0.1 only), then for each window given (``--busy-poll 0,250``: the
processes of each run get ``PILOT_BUSY_POLL``), in turn:

* ``--pings`` pings back to back and ``--paced-pings`` 0.12 s apart (daemon
  a's ``ping``, timed inside a from the dial to the whole echo), p50 and min;
* the same next to ``--hogs`` bounded CPU hogs (``timeout`` each, killed after);
* ``--idle`` seconds of nothing: each process' CPU (utime+stime) and context
  switches from ``/proc``.

    python3 benchmarks/ping_idle.py --busy-poll 0,250,0,250
    python3 benchmarks/ping_idle.py --busy-poll 0,250 --idle 60 --hogs 2

Bounded: at most 1,000 pings a kind, 10 windows, 4 hogs, 300 s idle.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tunnel as T  # noqa: E402


def proc_cpu_and_switches(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/status") as f:
        switches = sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), switches


def pings(a: T.Daemon, b: T.Daemon, count: int, interval: float) -> str:
    rtts = sorted(T.ping(a, b, count, interval)["rtts"])
    if not rtts:
        return "no answers"
    return f"p50 {statistics.median(rtts):.3f} ms, min {rtts[0]:.3f} ms ({len(rtts)}/{count} answered)"


def one_window(window: str, args: argparse.Namespace) -> None:
    os.environ["PILOT_BUSY_POLL"] = window  # tunnel.py's child_env copies it to every process
    tmp = tempfile.mkdtemp(prefix="pilot-pi-")
    rendezvous = T.Rendezvous(tmp)
    a, b = T.Daemon("pi-a", os.path.join(tmp, "a")), T.Daemon("pi-b", os.path.join(tmp, "b"))
    hogs: list[subprocess.Popen[Any]] = []
    try:
        rendezvous.start()
        a.start(rendezvous)
        b.start(rendezvous)
        T.establish_trust(a, b)
        T.ping(a, b, 1)
        time.sleep(1.1)  # the reference-sized SYN bucket refills
        print(f"--busy-poll {window} (load {T.loadavg()})")
        for loaded in (False, True) if args.hogs else (False,):
            if loaded:
                hogs = [subprocess.Popen(["timeout", "60", sys.executable, "-c", "while 1: pass"])
                        for _ in range(args.hogs)]
                time.sleep(0.5)
            label = f" + {args.hogs} hogs" if loaded else ""
            print(f"  back to back{label}: {pings(a, b, args.pings, 0.0)}")
            time.sleep(1.1)
            print(f"  every {T.PACED_INTERVAL:g} s{label}: {pings(a, b, args.paced_pings, T.PACED_INTERVAL)}"
                  f" (load {T.loadavg()})")
            for hog in hogs:
                hog.terminate()
                hog.wait()
            hogs = []
        if args.idle:
            assert a.pid is not None and b.pid is not None and rendezvous.proc is not None
            pids = {"daemon a": a.pid, "daemon b": b.pid, "rendezvous": rendezvous.proc.pid}
            before = {name: proc_cpu_and_switches(pid) for name, pid in pids.items()}
            time.sleep(args.idle)
            for name, pid in pids.items():
                cpu, switches = proc_cpu_and_switches(pid)
                print(f"  idle {args.idle:g} s, {name}: {cpu - before[name][0]:.2f} s CPU, "
                      f"{(switches - before[name][1]) / args.idle:.1f} context switches a second")
    finally:
        for hog in hogs:
            hog.terminate()
            hog.wait()
        a.stop()
        b.stop()
        rendezvous.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy-poll", default="0,250", help="windows in microseconds, one run each, in order")
    p.add_argument("--pings", type=int, default=200)
    p.add_argument("--paced-pings", type=int, default=40)
    p.add_argument("--hogs", type=int, default=0, help="CPU hogs for a second round of pings (0: none)")
    p.add_argument("--idle", type=float, default=0.0, help="seconds of an idle trusted pair (0: skip)")
    args = p.parse_args()
    windows = [w.strip() for w in args.busy_poll.split(",") if w.strip()]
    if not (1 <= len(windows) <= 10 and 1 <= args.pings <= 1000 and 1 <= args.paced_pings <= 1000
            and 0 <= args.hogs <= 4 and 0 <= args.idle <= 300):
        raise SystemExit("--busy-poll 1..10 windows, --pings/--paced-pings 1..1000, --hogs 0..4, --idle 0..300")
    print(f"pilot ping/idle benchmark: {' '.join(sys.argv[1:])}; load average {T.loadavg()}")
    for window in windows:
        one_window(window, args)


if __name__ == "__main__":
    main()
