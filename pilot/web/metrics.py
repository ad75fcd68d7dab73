# -*- test-case-name: tests.web.test_metrics -*-
"""
``/metrics``: the Prometheus text format through ``prometheus_client``.

Each exporter is a ``prometheus_client`` collector on a registry of its own
(never the library's global one): nothing is counted per request; a scrape
reads the live counters and state.  ``prometheus_client``'s Twisted resource
serves the scrape from a thread of the reactor's pool, so a collector asks
the reactor thread for its reading (:func:`in_reactor`) and builds the
families from that.

The names and meanings are in ``docs/operations.md``; the reference's names
are kept where it has one (``pilot_nodes_online``, ``pilot_requests_total``,
...).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

from prometheus_client.core import (
    CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python import threadable
from twisted.python.threadable import isInIOThread
from twisted.web.resource import IResource

from pilot.web.stats import RendezvousFigures, RendezvousStats

T = TypeVar("T")


def in_reactor(reactor: IReactorFromThreads, read: Callable[[], T]) -> T:
    """``read()`` in the reactor thread: at once when already there (or no reactor runs), else waiting for it."""
    if threadable.ioThread is None or isInIOThread():
        return read()
    from twisted.internet.threads import blockingCallFromThread
    result: T = blockingCallFromThread(reactor, read)
    return result


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def labelled(kind: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str, doc: str, label: str,
             values: Iterable[tuple[str, float]]) -> Metric:
    family = kind(name, doc, labels=[label])
    for key, value in sorted(values):
        family.add_metric([key], value)
    return family


def _prefixed(counters: dict[str, int], prefix: str) -> list[tuple[str, float]]:
    return [(name[len(prefix):], value) for name, value in counters.items() if name.startswith(prefix)]


class RendezvousCollector(Collector):
    """The rendezvous: registry requests and state, the beacon, the relay."""

    def __init__(self, stats: RendezvousStats, reactor: IReactorFromThreads) -> None:
        self.stats = stats
        self.reactor = reactor

    def describe(self) -> Iterator[Metric]:
        """The families without values (a scrape asking for some names only uses them)."""
        return families(EMPTY)

    def collect(self) -> Iterator[Metric]:
        return families(in_reactor(self.reactor, lambda: self.stats.figures(max_age=0.0)))


EMPTY = RendezvousFigures(at=0.0, uptime=0.0, nodes_total=0, nodes_online=0, nodes_public=0, trust_links=0,
                          task_executors=0, unique_tags=0, requests={}, errors={}, registry_counters={},
                          beacon_counters={}, beacon_endpoints=0, top_relays=())


def families(f: RendezvousFigures) -> Iterator[Metric]:
    """The rendezvous' metric families for one reading."""
    reg, beacon = f.registry_counters, f.beacon_counters
    yield labelled(CounterMetricFamily, "pilot_requests", "Registry requests received, by type.",
                   "type", f.requests.items())
    yield labelled(CounterMetricFamily, "pilot_errors", "Registry requests refused, by error code.",
                   "code", f.errors.items())
    yield durations(f)
    yield gauge("pilot_nodes_online", "Registered nodes heard from in the last minute.", f.nodes_online)
    yield gauge("pilot_nodes_total", "Registered nodes.", f.nodes_total)
    yield gauge("pilot_nodes_public", "Registered public nodes.", f.nodes_public)
    yield gauge("pilot_trust_links", "Directed trust links held by the registry.", f.trust_links)
    yield gauge("pilot_task_executors", "Registered nodes that accept tasks.", f.task_executors)
    yield gauge("pilot_uptime_seconds", "Seconds since the rendezvous started.", f.uptime)
    yield counter("pilot_registrations", "Successful registrations.", reg.get("registered", 0))
    yield counter("pilot_deregistrations", "Deregistration requests.", f.requests.get("deregister", 0))
    yield counter("pilot_trust_reports", "Trust report requests.", f.requests.get("report_trust", 0))
    yield counter("pilot_trust_revocations", "Trust revocation requests.", f.requests.get("revoke_trust", 0))
    yield counter("pilot_handshake_requests", "Handshake requests relayed by the registry.",
                  f.requests.get("request_handshake", 0))
    yield counter("pilot_keys_forgotten", "Keys forgotten after their node left.", reg.get("keys_forgotten", 0))
    yield counter("pilot_beacon_datagrams", "Datagrams received by the beacon.", beacon.get("received", 0))
    yield labelled(CounterMetricFamily, "pilot_beacon_dropped", "Beacon datagrams dropped, by reason.",
                   "reason", _prefixed(beacon, "dropped."))
    yield counter("pilot_beacon_discovers", "Discover requests answered.", beacon.get("discover", 0))
    yield counter("pilot_beacon_punches", "Punch requests answered (two commands each).", beacon.get("punch", 0))
    yield gauge("pilot_beacon_endpoints", "Node endpoints the beacon holds.", f.beacon_endpoints)
    yield counter("pilot_beacon_evictions", "Endpoints evicted from a full beacon table.", beacon.get("evicted", 0))
    yield counter("pilot_relay_datagrams", "Frames relayed between nodes by the beacon.", beacon.get("relayed", 0))
    yield counter("pilot_relay_bytes", "Frame bytes relayed between nodes by the beacon.",
                  beacon.get("relay_bytes", 0))


def durations(f: RendezvousFigures) -> Metric:
    """``pilot_request_duration_seconds``: the registry's time per request, by type (``pilot.server.timing``)."""
    family = HistogramMetricFamily("pilot_request_duration_seconds",
                                   "Seconds the registry took to answer a request, by type.", labels=["type"])
    for kind, (buckets, total) in sorted(f.durations.items()):
        family.add_metric([kind], [(floatToGoString(bound), count) for bound, count in buckets], total)
    return family


def collector_registry(*collectors: Collector) -> CollectorRegistry:
    """A registry of ours holding ``collectors`` (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    return registry


def metrics_resource(registry: CollectorRegistry) -> IResource:
    """``prometheus_client``'s own Twisted resource over ``registry`` (the reactor's thread pool)."""
    from prometheus_client.twisted import MetricsResource  # imports the global reactor
    resource: IResource = MetricsResource(registry)
    return resource


def scrape(registry: CollectorRegistry) -> bytes:
    """The text a scrape would get (tests, ``pilotctl stats``)."""
    from prometheus_client.exposition import generate_latest
    return generate_latest(registry)


__all__ = ["RendezvousCollector", "collector_registry", "metrics_resource", "scrape", "in_reactor",
           "counter", "gauge", "labelled"]
