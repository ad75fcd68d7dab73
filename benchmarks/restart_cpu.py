#!/usr/bin/env python3
"""
The rendezvous' start, measured where a busy machine moves it least (issue 16).

Runs ``python -m pilot rendezvous start --store STORE`` (ports 0 on
127.0.0.1) of each ``--tree`` in turn, ``--rounds`` times, and ends each
process at its reactor's first pass, when the store is loaded and the ports
listen (what a first lookup waits for, less the lookup): prints the CPU the
process used by then (``time.process_time``) per tree, least and median.
With ``--callgrind`` each start runs once under ``valgrind --tool=callgrind``
instead and prints the instructions it executed, which no other load on the
machine changes (SHA-256 runs without the CPU's SHA instructions there, so
the store's digests weigh more than in a real start).

    python3 benchmarks/restart_cpu.py --nodes 10000 --tree /work/main --tree . --rounds 8
    python3 benchmarks/restart_cpu.py --nodes 10000 --tree /work/main --tree . --callgrind

The store (``--nodes``, with its sidecar, as a clean stop leaves it) is built
as ``registry_restart.py`` builds it, and never written by the starts (each
process ends before any write).  Bounded: at most 20 rounds, 120 s per
start; nothing but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: Run in the started interpreter: ``python -m pilot ARGS``, ended at the reactor's first pass.
PROBE = """
import importlib.machinery, os, runpy, sys, time

class Hook:
    def find_spec(self, name, path=None, target=None):
        if name != "pilot.tap":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            build = module.build_service
            def built(settings, reactor):
                service = build(settings, reactor)
                def first_pass():
                    sys.stderr.write(f"cpu {time.process_time():.4f}\\n")
                    sys.stderr.flush()
                    os._exit(0)
                reactor.callWhenRunning(lambda: reactor.callLater(0, first_pass))
                return service
            module.build_service = built
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Hook())
sys.argv = ["pilot"] + sys.argv[1:]
runpy.run_module("pilot", run_name="__main__", alter_sys=True)
"""


def start(tree: str, store: str, callgrind: bool, cache: str) -> float:
    """One start of ``tree``'s rendezvous: its CPU seconds, or its instructions (``callgrind``)."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), PYTHONPYCACHEPREFIX=cache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode kept, as installed
    args = ["--json", "rendezvous", "start", "--listen", "127.0.0.1:0", "--beacon", "127.0.0.1:0",
            "--store", store, "--log-level", "error"]
    cmd = [sys.executable, "-c", PROBE, *args]
    if callgrind:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd]
    done = subprocess.run(cmd, cwd=os.path.abspath(tree), env=env, capture_output=True, text=True, timeout=120)
    if callgrind:
        found = re.search(r"Collected : (\d+)", done.stderr)
        if not found:
            raise SystemExit(f"callgrind gave no count: {done.stderr[-500:]}")
        return float(found.group(1))
    found = re.search(r"^cpu ([0-9.]+)$", done.stderr, re.M)
    if not found:
        raise SystemExit(f"the rendezvous of {tree} did not start: {done.stderr[-500:]}")
    return float(found.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=10000, help="nodes in the store (1..100000)")
    p.add_argument("--tree", action="append", required=True, help="a source tree (repeat: alternated)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--callgrind", action="store_true", help="instructions under callgrind, one start per tree")
    args = p.parse_args()
    if not (1 <= args.rounds <= 20 and 1 <= args.nodes <= 100000):
        raise SystemExit("--rounds 1..20, --nodes 1..100000")
    rounds = 1 if args.callgrind else args.rounds
    with tempfile.TemporaryDirectory(prefix="pilot-start-") as cache:
        store = os.path.join(cache, "registry.json")
        from registry_restart import build_store
        build_store(store, args.nodes)
        for tree in args.tree:  # one start each first, untimed: compiles the bytecode
            start(tree, store, False, cache)
        results: dict[str, list[float]] = {tree: [] for tree in args.tree}
        for _ in range(rounds):
            for tree in args.tree:
                results[tree].append(start(tree, store, args.callgrind, cache))
    for tree, values in results.items():
        values.sort()
        if args.callgrind:
            print(f"{tree}: {values[0] / 1e6:.1f} M instructions to the reactor's first pass")
        else:
            print(f"{tree}: CPU to the reactor's first pass: least {values[0] * 1000:.0f} ms, median "
                  f"{values[len(values) // 2] * 1000:.0f} ms ({', '.join(f'{v * 1000:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
