#!/usr/bin/env python3
"""
Replication at scale (issues 14 and 16), in one process, no sockets: a
registry of ``--nodes`` nodes (10,000), its store's change feed read by the
store's writer and by a publisher with one standby of ours, and the
standby's follower.

For ``--changes`` single changes (a node registering again from a new port:
the commonest write) it measures:

* bytes pushed per change to our standby (a delta: the journal's record);
* the primary's CPU per push (taking the change from the feed, encoding it):
  what the reactor spends per push; the writer's take of the same change
  (its journal record) is timed apart;
* the standby's CPU per delta: the frame decoded and the record applied to
  its registry state in place (``Follower(state)``, as the service does), and
  its own store writer's take of the same change (its journal record); with
  ``--whole-loads`` also the way before issue 16's standby change, for
  comparison: the record applied to a store object and the whole store
  loaded into a state (the service did that at most every 0.5 s);
* the first synchronisation: snapshot bytes and the CPU on both sides;
* a reference standby's whole snapshot, made per push only while one is
  subscribed (a store over the reference's 1 MiB frames cannot have one:
  about 3,500 nodes).

At the end the standby's store must equal the primary's byte for byte.

    python3 benchmarks/replication.py
    python3 benchmarks/replication.py --nodes 100000 --changes 30

CPU is ``time.process_time`` (one thread); bounded in count.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402

from pilot.server.compaction import StateView, StoreMirror  # noqa: E402
from pilot.server.journal import Feed, Tracker  # noqa: E402
from pilot.server.registry import Peer, Registry  # noqa: E402
from pilot.server.replication import Follower, Publisher, adopt  # noqa: E402
from pilot.server.state import RegistryState  # noqa: E402
from pilot.services.replication import LOAD_INTERVAL  # noqa: E402
from pilot.wire import replication as wire  # noqa: E402


class Recorder:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def push(self, message: dict[str, Any]) -> None:
        self.bodies.append(wire.encode_body(message))

    def push_body(self, body: bytes) -> None:
        self.bodies.append(body)


def register(registry: Registry, key: bytes, port: int, i: int) -> None:
    reply = registry.handle({"type": "register", "public_key": base64.b64encode(key).decode(),
                             "listen_addr": f"0.0.0.0:{port}", "hostname": f"node-{i}"},
                            Peer(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", port))
    assert reply["type"] == "register_ok", reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--whole-loads", action="store_true",
                        help="also time the old standby: records to a store object, whole loads")
    a = parser.parse_args()
    a.nodes, a.changes = min(a.nodes, 100_000), min(a.changes, 1000)
    clock = Clock()
    clock.advance(1_800_000_000)
    registry = Registry(clock)
    registry.config = registry.config.__class__(registrations_per_minute=0, requests_per_second=0)
    registry.register_limit.rate = 0
    keys = [os.urandom(32) for _ in range(a.nodes)]
    for i, key in enumerate(keys):
        register(registry, key, 4000, i)
    feed = Feed(Tracker(registry.state))
    writer = object()  # the store's writer: the other reader of the feed
    feed.join(writer)
    publisher = Publisher(clock, registry.state.to_bytes, feed)
    publisher.term = registry.state.term = 1
    ours = Recorder()
    standby = RegistryState()
    follower = Follower(standby)
    old_follower = Follower()  # the way before: records applied to the store object, loaded whole

    t0 = time.process_time()
    publisher.subscribe(ours, wire.Subscribe("t", deltas=True, records=True), "ours")
    subscribe_cpu = time.process_time() - t0
    snapshot = ours.bodies.pop()
    # the service makes it in another thread (Publisher(off_reactor=...)): the reactor copies the state only
    gc.disable()  # as the publisher does around the copy
    t0 = time.process_time()
    view = StateView.of(registry.state)
    view_cpu = time.process_time() - t0
    gc.enable()
    t0 = time.process_time()
    rendered = StoreMirror(view).render()
    render_cpu = time.process_time() - t0
    assert rendered == registry.state.to_bytes()
    t0 = time.process_time()
    adopt(standby, follower.snapshot(wire.decode(json.loads(snapshot))))  # type: ignore[arg-type]
    load_cpu = time.process_time() - t0
    standby_feed = Feed(Tracker(standby))  # the standby's own store writer
    standby_writer = object()
    standby_feed.join(standby_writer)
    if a.whole_loads:
        old_follower.snapshot(wire.decode(json.loads(snapshot)))  # type: ignore[arg-type]

    push_cpu, take_cpu, apply_cpu, load_cpu_each, delta_bytes, ref_cpu = [], [], [], [], [], []
    standby_take_cpu: list[float] = []
    old_apply_cpu: list[float] = []
    for n in range(a.changes):
        i = n * 7919 % a.nodes
        register(registry, keys[i], 5000 + n, i)
        t0 = time.process_time()
        feed.take(writer)
        take_cpu.append(time.process_time() - t0)
        t0 = time.process_time()
        publisher.publish()
        push_cpu.append(time.process_time() - t0)
        [body] = ours.bodies
        ours.bodies.clear()
        delta_bytes.append(len(body))
        t0 = time.process_time()
        follower.delta(wire.decode(json.loads(body)))  # type: ignore[arg-type]
        apply_cpu.append(time.process_time() - t0)
        t0 = time.process_time()
        standby_feed.take(standby_writer)
        standby_take_cpu.append(time.process_time() - t0)
        if a.whole_loads:
            t0 = time.process_time()
            old_follower.delta(wire.decode(json.loads(body)))  # type: ignore[arg-type]
            old_apply_cpu.append(time.process_time() - t0)
            t0 = time.process_time()
            old_follower.load()
            load_cpu_each.append(time.process_time() - t0)
        if n < 5:  # what a reference standby would cost the push (whatever its frames' limit)
            t0 = time.process_time()
            wire.encode_snapshot_bytes(registry.state.to_bytes(), publisher.term)
            ref_cpu.append(time.process_time() - t0)
    new_bytes = []
    for n in range(10):
        register(registry, os.urandom(32), 6000 + n, a.nodes + n)
        publisher.publish()
        new_bytes.append(len(ours.bodies[-1]))
        follower.delta(wire.decode(json.loads(ours.bodies.pop())))  # type: ignore[arg-type]
    standby.journal_seq = registry.state.journal_seq  # a scalar of the push: the standby numbers its own
    assert standby.to_bytes() == registry.state.to_bytes(), "the standby's store differs"

    ms = 1000.0
    print(f"nodes: {a.nodes}, changes: {a.changes} (one re-registration each)")
    print(f"first sync: snapshot {len(snapshot):,} bytes; primary {subscribe_cpu * ms:.0f} ms CPU, "
          f"standby load {load_cpu * ms:.0f} ms CPU")
    print(f"first sync off the reactor (the service's way): the reactor copies the state in "
          f"{view_cpu * ms:.0f} ms, the other thread makes the store in {render_cpu * ms:.0f} ms CPU")
    print(f"per change, our standby: delta {statistics.median(delta_bytes):,.0f} bytes (median)")
    print(f"per new node, our standby: delta {statistics.median(new_bytes):,.0f} bytes (median)")
    print(f"primary CPU per push (the change from the feed, encoded, pushed): "
          f"median {statistics.median(push_cpu) * ms:.2f} ms, max {max(push_cpu) * ms:.2f} ms")
    print(f"the store writer's take of the same change (its journal record): "
          f"median {statistics.median(take_cpu) * ms:.2f} ms")
    print(f"a reference standby's whole snapshot per push (only while one is subscribed): "
          f"median {statistics.median(ref_cpu) * ms:.0f} ms")
    print(f"standby CPU per delta (decoded, applied to its registry state in place): "
          f"median {statistics.median(apply_cpu) * ms:.2f} ms, max {max(apply_cpu) * ms:.2f} ms")
    print(f"the standby's store writer's take of the same change (its journal record): "
          f"median {statistics.median(standby_take_cpu) * ms:.2f} ms")
    busiest = (statistics.median(apply_cpu) + statistics.median(standby_take_cpu)) / 0.25 * 100
    print(f"standby CPU with a change in every push (one per 0.25 s flush delay): {busiest:.2f}% of a core")
    if a.whole_loads:
        old_delta, old_load = statistics.median(old_apply_cpu), statistics.median(load_cpu_each)
        share = (old_delta / 0.25 + old_load / LOAD_INTERVAL) * 100
        print(f"before (--whole-loads): per delta to the store object {old_delta * ms:.2f} ms, per whole "
              f"load of the store into a state {old_load * ms:.0f} ms (median; at most one per "
              f"{LOAD_INTERVAL} s): {share:.0f}% of a core with a change in every push")
    print("the standby's store equals the primary's, byte for byte")


if __name__ == "__main__":
    main()
