# -*- test-case-name: tests.web.test_nodemetrics -*-
"""
A node's metrics, from the document ``pilotctl info`` shows (the control
API's ``info``: ``pilot.services.api.NodeAPIImpl.info``), so that
``pilotctl daemon start --metrics ADDR`` (``/metrics``) and ``pilotctl
stats`` show the same figures from the same counters.

:func:`node_families` turns one ``info`` document into Prometheus families;
:func:`figures` into plain ``{name: value}`` / ``{name: {label: value}}``
rows for the terminal and ``--json``.  Nothing is counted here: the node's
parts count (tunnel drops by reason, path changes, the stack's packets), and
a scrape reads them.  Peer byte and retransmission sums cover the peers and
connections the node holds now (a forgotten peer leaves the sum), so they are
gauges.  The meanings are in ``docs/operations.md``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads

from pilot.web.metrics import counter, gauge, in_reactor, labelled

Info = Mapping[str, Any]


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _counts(section: Any) -> list[tuple[str, float]]:
    """The numeric entries of a counters section, nested sections joined with dots."""
    out: list[tuple[str, float]] = []
    if isinstance(section, Mapping):
        for name, value in section.items():
            if isinstance(value, Mapping):
                out += [(f"{name}.{inner}", v) for inner, v in _counts(value)]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append((str(name), float(value)))
    return out


def figures(info: Info) -> dict[str, Any]:
    """The node's figures by metric name (no ``pilot_node_`` prefix); labelled ones as dicts."""
    peers = [p for p in info.get("peer_list") or () if isinstance(p, Mapping)]
    conns = [c for c in info.get("conn_list") or () if isinstance(c, Mapping)]
    counters = info.get("counters") or {}
    stack = dict(_counts(counters.get("stack")))
    by_path: dict[str, float] = {}
    by_state: dict[str, float] = {}
    rx: dict[str, float] = {}
    tx: dict[str, float] = {}
    mtu: dict[str, float] = {}
    for p in peers:
        path = str(p.get("path") or "none")
        by_path[path] = by_path.get(path, 0) + 1
        state = str(p.get("state") or "none")
        by_state[state] = by_state.get(state, 0) + 1
        rx[path] = rx.get(path, 0) + _number(p.get("bytes_rx"))
        tx[path] = tx.get(path, 0) + _number(p.get("bytes_tx"))
        if isinstance(p.get("mtu"), int):
            mtu[str(p.get("address"))] = float(p["mtu"])
    registry = info.get("registry") or {}
    return {
        "uptime_seconds": _number(info.get("uptime_secs")),
        "registered": 1.0 if registry.get("state") == "registered" else 0.0,
        "peers": by_path,
        "tunnels": by_state,
        "peer_received_bytes": rx,
        "peer_sent_bytes": tx,
        "packets_sent": stack.get("packets.sent", 0.0),
        "packets_received": stack.get("packets.received", 0.0),
        "datagrams_sent": stack.get("datagrams.sent", 0.0),
        "datagrams_received": stack.get("datagrams.received", 0.0),
        "connections": float(len(conns)),
        "retransmits": sum(_number(c.get("retransmits")) for c in conns),
        "fast_retransmits": sum(_number(c.get("fast_retx")) for c in conns),
        "path_mtu_bytes": mtu,
        "tunnel_events": dict(_counts(counters.get("tunnel"))),
        "path_events": dict(_counts(counters.get("path"))),
        "stack_events": stack,
        "udp_events": dict(_counts(counters.get("udp"))),
        "app_events": dict(_counts(counters.get("apps"))),
    }


#: name -> (kind, help, label) for :func:`node_families`; kind "counter" or "gauge"
METRICS: dict[str, tuple[str, str, str | None]] = {
    "uptime_seconds": ("gauge", "Seconds since the node started.", None),
    "registered": ("gauge", "1 while the node is registered with its registry.", None),
    "peers": ("gauge", "Peers with a tunnel, by path (direct, punched, relay, trying).", "path"),
    "tunnels": ("gauge", "Tunnels by state (established, exchanging, idle).", "state"),
    "peer_received_bytes": ("gauge", "Bytes received from the current peers, by path.", "path"),
    "peer_sent_bytes": ("gauge", "Bytes sent to the current peers, by path.", "path"),
    "packets_sent": ("counter", "Packets sent by the stack.", None),
    "packets_received": ("counter", "Packets received by the stack.", None),
    "datagrams_sent": ("counter", "Datagrams sent on virtual ports.", None),
    "datagrams_received": ("counter", "Datagrams received on virtual ports.", None),
    "connections": ("gauge", "Open stream connections.", None),
    "retransmits": ("gauge", "Segments retransmitted by the open connections.", None),
    "fast_retransmits": ("gauge", "Fast retransmissions by the open connections.", None),
    "path_mtu_bytes": ("gauge", "The discovered datagram size of the path to each peer.", "peer"),
    "tunnel_events": ("counter", "Tunnel layer events: drops by reason, key exchanges, MTU probes.", "event"),
    "path_events": ("counter", "Path events: punches, relay fallbacks, keepalives.", "event"),
    "stack_events": ("counter", "Stack events: packets, refusals, resets, errors.", "event"),
    "udp_events": ("counter", "The tunnel socket's events.", "event"),
    "app_events": ("counter", "Built-in services' events (data exchange, event stream).", "event"),
}


def node_families(info: Info) -> Iterator[Metric]:
    values = figures(info)
    for name, (kind, doc, label) in METRICS.items():
        full = f"pilot_node_{name}"
        value = values[name]
        if label is None:
            yield counter(full, doc, value) if kind == "counter" else gauge(full, doc, value)
        else:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield labelled(family, full, doc, label, value.items())


def fired(d: Any) -> Info:
    """The result of an already fired Deferred (the control API's ``info`` is one), or the value itself."""
    if not isinstance(d, Deferred):
        result: Info = d
        return result
    out: list[Any] = []
    d.addBoth(out.append)
    if not out:
        raise RuntimeError("the node's info was not ready")
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    value: Info = out[0]
    return value


class NodeCollector(Collector):
    """The node's families, reading ``info()`` in the reactor thread at each scrape."""

    def __init__(self, info: Callable[[], Any], reactor: IReactorFromThreads) -> None:
        self.info = info
        self.reactor = reactor

    def describe(self) -> Iterator[Metric]:
        return node_families({})

    def collect(self) -> Iterator[Metric]:
        return node_families(in_reactor(self.reactor, lambda: fired(self.info())))
