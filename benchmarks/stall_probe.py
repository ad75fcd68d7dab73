#!/usr/bin/env python3
"""
Runs ``python -m pilot ARGS...`` with a probe of its reactor's passes, for
``registry_load.py --stalls``: where a long wait for an answer comes from.

    python3 benchmarks/stall_probe.py OUT.json -- --json rendezvous start ...

The probe records, with the wall-clock time of each:

* every reactor pass (from ``epoll_wait`` returning to the next call of it)
  longer than ``LONG`` seconds, and a count of passes by length;
* every garbage collection (``gc.callbacks``): generation, length, what it
  freed, and the thread it ran in (a collection holds the interpreter: the
  reactor waits for it whichever thread set it off);
* with ``PILOT_STALL_STACKS=1`` in the environment, during a pass longer
  than ``LONG``, a watchdog thread's samples of the reactor thread's stack
  (``sys._current_frames``, every ``SAMPLE`` s): what the pass was doing,
  or waiting for the interpreter behind (the watchdog
  needs the interpreter to sample, so it sees the reactor thread mostly
  where that thread lets go of it: system calls, Ed25519 checks);
* every call longer than 1 ms of the periodic and O(state) functions in
  ``TIMED`` (the reaper, the beacon's prune, ``malloc_trim``, the journal's
  delta, the store mirror's apply and render), and in which thread.

The stack samples are off by default: a 100,000-node run with them ended in
a segmentation fault of the interpreter (3.11.7) during the registrations,
most likely ``sys._current_frames`` walking the frames of a running thread.

It writes them to OUT.json when the process exits.  Nothing in ``pilot/``
changes: the probe wraps the reactor's poller and the functions of
``TIMED``, and adds a gc callback.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import sys
import threading
import time
import traceback
from typing import Any

#: A pass longer than this is recorded, with the reactor thread's stack sampled while it lasts (s).
LONG = 0.02
#: The watchdog's period (s).
SAMPLE = 0.005
#: Pass-length buckets (ms) for the histogram.
BUCKETS = (1, 5, 10, 20, 50, 100, 200, 500)
#: At most this many long passes and collections are kept (a bounded record).
KEEP = 20000
#: (module, attribute path) of the functions timed; patched once the reactor runs, where they are looked up
TIMED = (("pilot.services.rendezvous", "release_free_memory"), ("pilot.server.registry", "Registry.reap"),
         ("pilot.server.beacon", "Beacon.prune"), ("pilot.server.journal", "Tracker.delta"),
         ("pilot.server.journal", "Feed.take"), ("pilot.server.compaction", "StoreMirror.apply"),
         ("pilot.server.compaction", "StoreMirror.render"), ("pilot.server.compaction", "StateView.of"),
         ("pilot.persist", "AppendOnlyFile.append"),
         ("pilot.services.forked", "ForkedStoreWriter.__call__"))  # a compaction by a child: the render is its


class Probe:
    def __init__(self, out: str) -> None:
        self.out = out
        self.passes: list[dict[str, Any]] = []
        self.collections: list[list[Any]] = []
        self.hist = [0] * (len(BUCKETS) + 1)
        self.reactor_thread = 0
        self.out_of_poll: float | None = None  # when the pass under way began (None: in epoll_wait)
        self.samples: list[str] = []
        self._gc_start = 0.0
        self.calls: list[list[Any]] = []

    def time_calls(self) -> None:
        """Wrap the functions of ``TIMED`` (in the reactor thread, once it runs)."""
        for module, path in TIMED:
            owner: Any = sys.modules.get(module)
            if owner is None:
                continue
            *parents, name = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
            if original is None:
                continue
            if isinstance(original, classmethod):
                continue
            setattr(owner, name, self._timed(path, original))

    def _timed(self, label: str, f: Any) -> Any:
        probe = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                if took > 0.001 and len(probe.calls) < KEEP:
                    probe.calls.append([time.time(), label, round(took * 1000, 2),
                                        threading.current_thread().name])
        return timed

    # --- gc -----------------------------------------------------------------------------------
    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_start
        if len(self.collections) < KEEP and (info["generation"] == 2 or took > 0.002):
            self.collections.append([time.time(), info["generation"], round(took * 1000, 2), info["collected"],
                                     threading.current_thread().name])

    # --- the reactor's passes -----------------------------------------------------------------
    def wrap(self, reactor: Any) -> None:
        self.reactor_thread = threading.get_ident()
        probe = self
        poller = reactor._poller

        class Poller:
            def __getattr__(self, name: str) -> Any:
                return getattr(poller, name)

            def poll(self, *args: Any) -> Any:
                began = probe.out_of_poll
                now = time.perf_counter()
                if began is not None:
                    probe.end_pass(now - began)
                probe.out_of_poll = None
                try:
                    return poller.poll(*args)
                finally:
                    probe.out_of_poll = time.perf_counter()
        reactor._poller = Poller()

    def end_pass(self, took: float) -> None:
        ms = took * 1000
        i = 0
        while i < len(BUCKETS) and ms > BUCKETS[i]:
            i += 1
        self.hist[i] += 1
        if took > LONG:
            if len(self.passes) < KEEP:
                self.passes.append({"end": time.time(), "ms": round(ms, 2), "stacks": self.samples})
            self.samples = []
        elif self.samples:
            self.samples = []

    def watch(self) -> None:
        while True:
            time.sleep(SAMPLE)
            began = self.out_of_poll
            if began is None or time.perf_counter() - began < LONG:
                continue
            frame = sys._current_frames().get(self.reactor_thread)
            if frame is not None and len(self.samples) < 200:
                where = traceback.extract_stack(frame)[-6:]
                self.samples.append(" < ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}"
                                               for f in reversed(where)))

    def install_when_running(self) -> None:
        """Wrap the reactor's poller once the program has installed its reactor (from this thread)."""
        deadline = time.time() + 60
        # the module is in sys.modules while it is still being imported: wait for the reactor itself
        while getattr(sys.modules.get("twisted.internet.reactor"), "_poller", None) is None:
            if time.time() > deadline:
                return
            time.sleep(0.01)
        reactor = sys.modules["twisted.internet.reactor"]
        reactor.callFromThread(self.wrap, reactor)
        time.sleep(1.0)
        reactor.callFromThread(self.time_calls)
        if os.environ.get("PILOT_STALL_STACKS") == "1":
            self.watch()

    def dump(self) -> None:
        with open(self.out, "w") as f:
            json.dump({"passes": self.passes, "collections": self.collections, "calls": self.calls,
                       "hist": self.hist,
                       "buckets": list(BUCKETS)}, f)


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        raise SystemExit("usage: stall_probe.py OUT.json -- ARGS (for python -m pilot)")
    probe = Probe(sys.argv[1])
    gc.callbacks.append(probe.on_gc)
    atexit.register(probe.dump)
    threading.Thread(target=probe.install_when_running, name="stall-probe", daemon=True).start()
    sys.argv = ["pilot"] + sys.argv[3:]
    runpy.run_module("pilot", run_name="__main__", alter_sys=True)


def summary(path: str, start: float, end: float) -> list[str]:
    """What a probe's file says about the window ``start``..``end`` (wall-clock), as lines to print."""
    with open(path) as f:
        data = json.load(f)
    lines = []
    hist = data["hist"]
    names = [f"<={b}" for b in data["buckets"]] + [f">{data['buckets'][-1]}"]
    lines.append("reactor passes by length (ms, whole run): " + ", ".join(
        f"{n}: {c}" for n, c in zip(names, hist) if c))
    passes = [p for p in data["passes"] if start <= p["end"] <= end]
    cols = [c for c in data["collections"] if start <= c[0] <= end]
    gen2 = [c for c in cols if c[1] == 2]
    lines.append(f"in the window: {len(passes)} passes over {LONG * 1000:.0f} ms (longest "
                 f"{max((p['ms'] for p in passes), default=0):.0f} ms, together "
                 f"{sum(p['ms'] for p in passes):.0f} ms); gen-2 collections: {len(gen2)} "
                 f"({', '.join(f'{c[2]:.0f} ms in {c[4]}' for c in gen2[:8])}); slower gen 0/1 collections "
                 f"(>2 ms): {len(cols) - len(gen2)}")
    calls = [c for c in data.get("calls", []) if start <= c[0] <= end]
    by: dict[tuple[str, str], list[float]] = {}
    for c in calls:
        by.setdefault((c[1], c[3]), []).append(c[2])
    for (label, thread), took in sorted(by.items()):
        lines.append(f"  {label} in {thread}: {len(took)} calls over 1 ms, longest {max(took):.1f} ms, "
                     f"together {sum(took):.0f} ms")
    kinds: dict[str, list[float]] = {}
    for p in passes:
        seen: dict[str, int] = {}
        for s in p["stacks"]:
            seen[s.split(" < ")[0]] = seen.get(s.split(" < ")[0], 0) + 1
        top = max(seen.items(), key=lambda x: x[1])[0] if seen else "(no sample)"
        kinds.setdefault(top, []).append(p["ms"])
    lines.append("  long passes by the frame sampled most in them:")
    for top, mss in sorted(kinds.items(), key=lambda x: -sum(x[1]))[:8]:
        lines.append(f"    {len(mss)} passes, {sum(mss):.0f} ms, longest {max(mss):.0f} ms: {top}")
    for p in sorted(passes, key=lambda p: -p["ms"])[:8]:
        overlap = [c for c in cols if p["end"] - p["ms"] / 1000 - 0.001 <= c[0] <= p["end"] + 0.001]
        gcs = "; ".join(f"gen {c[1]} {c[2]:.0f} ms ({c[4]})" for c in overlap) or "no collection"
        during = [c for c in calls if p["end"] - p["ms"] / 1000 - 0.001 <= c[0] <= p["end"] + 0.001]
        gcs += "".join(f"; {c[1]} {c[2]:.0f} ms ({c[3]})" for c in during)
        lines.append(f"  pass {p['ms']:.0f} ms ending {time.strftime('%H:%M:%S', time.gmtime(p['end']))}: "
                     f"{gcs}")
        seen: dict[str, int] = {}
        for s in p["stacks"]:
            seen[s] = seen.get(s, 0) + 1
        for s, k in sorted(seen.items(), key=lambda x: -x[1])[:3]:
            lines.append(f"    {k}x {s}")
    return lines


if __name__ == "__main__":
    main()
