# -*- test-case-name: tests.web.test_stats -*-
"""
What the rendezvous' dashboard, ``/api/stats`` and ``/metrics`` show, read
from the live registry and beacon.

:class:`RendezvousFigures` is one reading of the counters and the state;
:class:`RendezvousStats` takes readings (at most one per ``max_age`` seconds,
so polling browsers cost one reading a second whatever their number; a
Prometheus scrape takes a fresh one), keeps
a ring of samples for the last hour's chart (:meth:`RendezvousStats.sample`,
called every :data:`SAMPLE_INTERVAL` seconds by the web service) and builds
the public ``/api/stats`` document.

The public document holds counts and the virtual addresses of public nodes
only: no IP address, endpoint, key or hostname of any node; a private node is
counted, never listed (``docs/operations.md``).  Of replication it holds the
role and term only (not where the primary or the standbys are).
"""

from __future__ import annotations

import collections
from typing import Any

import attr
from twisted.internet.interfaces import IReactorTime

from pilot.server.beacon import Beacon
from pilot.server.registry import Registry

#: Seconds between the chart's samples, and how many are kept (one hour).
SAMPLE_INTERVAL = 10.0
HISTORY_LENGTH = 360
#: A node heard from within this many seconds is online (two heartbeats and a margin;
#: nodes heartbeat every 25 s, ``pilot.machines.registration``).
ONLINE_WINDOW = 60.0
#: How many of the busiest relayed nodes the dashboard lists.
TOP_RELAYS = 10


@attr.s(auto_attribs=True, frozen=True)
class RendezvousFigures:
    """One reading of the rendezvous' counters and state (taken in the reactor thread)."""

    at: float
    uptime: float
    nodes_total: int
    nodes_online: int
    nodes_public: int
    trust_links: int
    task_executors: int
    unique_tags: int
    requests: dict[str, int]
    errors: dict[str, int]
    registry_counters: dict[str, int]
    beacon_counters: dict[str, int]
    beacon_endpoints: int
    #: (address text, bytes) of the busiest relayed public nodes, busiest first
    top_relays: tuple[tuple[str, int], ...]
    #: per request type: cumulative ``[(upper bound, count), ...]`` and the sum of seconds (``Durations.cumulative``)
    durations: dict[str, tuple[list[tuple[float, int]], float]] = attr.Factory(dict)
    #: a paired server's role ("primary" or "standby") and term; None when unpaired
    replication: tuple[str, int] | None = None

    @property
    def requests_total(self) -> int:
        return sum(self.requests.values())

    @property
    def relay_bytes(self) -> int:
        return self.beacon_counters.get("relay_bytes", 0)

    @property
    def punches(self) -> int:
        return self.beacon_counters.get("punch", 0)


def read_figures(registry: Registry, beacon: Beacon, started: float, now: float) -> RendezvousFigures:
    """Read the registry and the beacon; one pass over the nodes."""
    online_since = now - ONLINE_WINDOW
    online = public = executors = 0
    tags: set[str] = set()
    nodes = registry.state.nodes
    for node in nodes.values():
        if node.last_seen >= online_since:
            online += 1
        if node.public:
            public += 1
        if node.task_exec:
            executors += 1
        if node.tags:
            tags.update(node.tags)
    requests: dict[str, int] = {}
    errors: dict[str, int] = {}
    for name, value in registry.counters.items():
        if name.startswith("request."):
            requests[name[len("request."):]] = value
        elif name.startswith("error."):
            errors[name[len("error."):]] = value
    relayed = []
    for node_id, count in beacon.relayed_by.items():
        sender = nodes.get(node_id)
        if sender is not None and sender.public:
            relayed.append((count, node_id))
    relayed.sort(reverse=True)
    top = tuple((str(nodes[node_id].address), count) for count, node_id in relayed[:TOP_RELAYS])
    replica = registry.replica
    replication = None if replica is None else ("standby" if replica.standby else "primary", replica.term)
    return RendezvousFigures(
        at=now, uptime=max(0.0, now - started), nodes_total=len(nodes), nodes_online=online,
        nodes_public=public, trust_links=len(registry.state.trust), task_executors=executors,
        unique_tags=len(tags), requests=requests, errors=errors,
        registry_counters=dict(registry.counters), beacon_counters=dict(beacon.counters),
        beacon_endpoints=len(beacon), top_relays=top, durations=registry.durations.cumulative(),
        replication=replication)


@attr.s(auto_attribs=True, frozen=True)
class Sample:
    """One point of the chart: totals at ``at``; rates come from two neighbours."""

    at: float
    nodes_online: int
    nodes_total: int
    requests: int
    relay_bytes: int
    punches: int


def _rate(new: float, old: float, seconds: float) -> float:
    return round(max(0.0, new - old) / seconds, 3) if seconds > 0 else 0.0


class RendezvousStats:
    def __init__(self, registry: Registry, beacon: Beacon, clock: IReactorTime, max_age: float = 1.0,
                 history: int = HISTORY_LENGTH) -> None:
        self.registry = registry
        self.beacon = beacon
        self.clock = clock
        self.max_age = max_age
        self.started = clock.seconds()
        self.history: collections.deque[Sample] = collections.deque(maxlen=history)
        self._figures: RendezvousFigures | None = None

    def figures(self, max_age: float | None = None) -> RendezvousFigures:
        """A reading no older than ``max_age`` seconds (default: the one given at construction)."""
        now = self.clock.seconds()
        age = self.max_age if max_age is None else max_age
        if self._figures is None or now - self._figures.at >= age or now < self._figures.at:
            self._figures = read_figures(self.registry, self.beacon, self.started, now)
        return self._figures

    def sample(self) -> Sample:
        """Add a point to the chart (a fresh reading)."""
        self._figures = None
        f = self.figures()
        point = Sample(f.at, f.nodes_online, f.nodes_total, f.requests_total, f.relay_bytes, f.punches)
        self.history.append(point)
        return point

    def public(self) -> dict[str, Any]:
        """The ``/api/stats`` document: the reference's fields first, then ours."""
        f = self.figures()
        last = self.history[-1] if self.history else Sample(self.started, 0, 0, 0, 0, 0)
        seconds = f.at - last.at
        return {
            "total_nodes": f.nodes_total,
            "active_nodes": f.nodes_online,
            "total_trust_links": f.trust_links,
            "total_requests": f.requests_total,
            "unique_tags": f.unique_tags,
            "task_executors": f.task_executors,
            "uptime_secs": int(f.uptime),
            "public_nodes": f.nodes_public,
            "private_nodes": f.nodes_total - f.nodes_public,
            "requests_per_second": _rate(f.requests_total, last.requests, seconds),
            "relayed_bytes": f.relay_bytes,
            "relayed_datagrams": f.beacon_counters.get("relayed", 0),
            "punches": f.punches,
            "top_relays": [{"address": address, "bytes": count} for address, count in f.top_relays],
            "history": self.chart(Sample(f.at, f.nodes_online, f.nodes_total, f.requests_total, f.relay_bytes,
                                         f.punches)),
            "sample_interval_secs": SAMPLE_INTERVAL,
            "replication": None if f.replication is None else {"role": f.replication[0], "term": f.replication[1]},
        }

    def chart(self, now: Sample | None = None) -> list[dict[str, Any]]:
        """
        The ring as points with rates between neighbours (the first point has
        none), and ``now`` last when it is newer than the ring's last sample.
        """
        points: list[dict[str, Any]] = []
        previous: Sample | None = None
        samples = list(self.history)
        if now is not None and (not samples or now.at > samples[-1].at):
            samples.append(now)
        for s in samples:
            seconds = s.at - previous.at if previous is not None else 0.0
            points.append({
                "t": int(s.at), "online": s.nodes_online, "total": s.nodes_total,
                "requests_per_second": _rate(s.requests, previous.requests, seconds) if previous else 0.0,
                "relay_bytes_per_second": _rate(s.relay_bytes, previous.relay_bytes, seconds) if previous else 0.0,
            })
            previous = s
        return points
