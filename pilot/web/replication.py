# -*- test-case-name: tests.web.test_replication -*-
"""
A paired rendezvous' replication in ``/metrics``: its role and term, the
standbys it feeds, whether it (a standby) follows its primary, and the
stream's counters (``docs/operations.md``; the pair is ``docs/deploy.md``'s).

:func:`read_replication` takes one reading of a :class:`ReplicationSource`
(``pilot.services.replication.ReplicationService``: its replica, publisher
and follower count as they go, in plain ints); :class:`ReplicationCollector`
makes the families from a reading when scraped, in the reactor thread, as
``pilot.web.metrics``' collector does.  Nothing is counted per request here.

An unpaired rendezvous has no replication service and the HTTP side
registers no such collector: the ``pilot_replication_*`` families are
absent, not zero (a zero would read as "a primary with no standby").
"""

from __future__ import annotations

from typing import Iterator, Protocol

import attr
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime

from pilot.server.replication import Follower, Publisher
from pilot.server.replication_role import Replica
from pilot.web.metrics import counter, gauge, in_reactor, labelled

ROLES = ("primary", "standby")


class ReplicationSource(Protocol):
    """What the collector reads (``ReplicationService`` has it)."""

    replica: Replica
    publisher: Publisher
    follower: Follower
    #: the clock's reading when the standby last heard its primary
    last_heard: float

    @property
    def synchronised(self) -> bool: ...


@attr.s(auto_attribs=True, frozen=True)
class ReplicationFigures:
    """One reading of a paired server's replication (taken in the reactor thread)."""

    standby: bool
    term: int
    #: subscribers of ours (deltas, acknowledged) and reference ones (whole snapshots)
    standbys: int
    reference_standbys: int
    synchronised: bool
    #: seconds since a standby last heard its primary (0 on a primary)
    silence: float
    pushes: int
    pushed_bytes: int
    snapshots_sent: int
    deltas_sent: int
    heartbeats_sent: int
    snapshots_received: int
    deltas_received: int
    acks: int
    sync_waits: int
    sync_timeouts: int
    takeovers: int
    step_downs: int
    #: the last change number pushed, the highest a standby acknowledged, the last a standby holds
    seq_sent: int
    seq_acked: int
    seq_held: int

    @property
    def role(self) -> str:
        return "standby" if self.standby else "primary"


def read_replication(source: ReplicationSource, now: float) -> ReplicationFigures:
    replica, publisher, follower = source.replica, source.publisher, source.follower
    ours = publisher.followers
    return ReplicationFigures(
        standby=replica.standby, term=replica.term, standbys=ours,
        reference_standbys=len(publisher.subscriptions) - ours, synchronised=source.synchronised,
        silence=max(0.0, now - source.last_heard) if replica.standby else 0.0,
        pushes=publisher.pushes, pushed_bytes=publisher.bytes_pushed, snapshots_sent=publisher.snapshots_sent,
        deltas_sent=publisher.deltas_sent, heartbeats_sent=publisher.heartbeats_sent,
        snapshots_received=follower.snapshots, deltas_received=follower.deltas, acks=publisher.acks,
        sync_waits=publisher.sync_waits, sync_timeouts=publisher.sync_timeouts, takeovers=replica.takeovers,
        step_downs=replica.step_downs, seq_sent=publisher.seq, seq_acked=publisher.last_acked,
        seq_held=follower.seq)


class ReplicationCollector(Collector):
    """The ``pilot_replication_*`` families of a paired rendezvous."""

    def __init__(self, source: ReplicationSource, clock: IReactorTime, reactor: IReactorFromThreads) -> None:
        self.source = source
        self.clock = clock
        self.reactor = reactor

    def describe(self) -> Iterator[Metric]:
        return families(EMPTY)

    def collect(self) -> Iterator[Metric]:
        return families(in_reactor(self.reactor, lambda: read_replication(self.source, self.clock.seconds())))


EMPTY = ReplicationFigures(False, 0, 0, 0, False, 0.0, *([0] * 15))


def families(f: ReplicationFigures) -> Iterator[Metric]:
    """The replication families for one reading."""
    yield labelled(GaugeMetricFamily, "pilot_replication_role",
                   "1 for this server's role in its pair (primary or standby), 0 for the other.",
                   "role", [(role, 1.0 if role == f.role else 0.0) for role in ROLES])
    yield gauge("pilot_replication_term", "The pair's term (epoch) this server is in.", f.term)
    yield labelled(GaugeMetricFamily, "pilot_replication_standbys",
                   "Standbys subscribed to this server (a primary), by kind: pilot (deltas) or reference.",
                   "kind", [("pilot", f.standbys), ("reference", f.reference_standbys)])
    yield gauge("pilot_replication_synchronised",
                "1 when this standby holds its primary's store and hears it on a live stream.",
                1.0 if f.synchronised else 0.0)
    yield gauge("pilot_replication_primary_silence_seconds",
                "Seconds since this standby last heard its primary (0 on a primary).", f.silence)
    yield counter("pilot_replication_pushes", "Pushes of what changed to the standbys.", f.pushes)
    yield counter("pilot_replication_pushed_bytes", "Bytes of the snapshots and deltas sent to standbys.",
                  f.pushed_bytes)
    yield labelled(CounterMetricFamily, "pilot_replication_sent", "Frames sent to standbys, by kind.", "kind",
                   [("snapshot", f.snapshots_sent), ("delta", f.deltas_sent), ("heartbeat", f.heartbeats_sent)])
    yield labelled(CounterMetricFamily, "pilot_replication_received", "Frames applied by this standby, by kind.",
                   "kind", [("snapshot", f.snapshots_received), ("delta", f.deltas_received)])
    yield counter("pilot_replication_acks", "Acknowledgements received from standbys.", f.acks)
    yield counter("pilot_replication_sync_waits",
                  "Replies held until a standby acknowledged the change (--sync-replication).", f.sync_waits)
    yield counter("pilot_replication_sync_timeouts",
                  "Held replies sent without a standby's acknowledgement (the sync timeout passed).",
                  f.sync_timeouts)
    yield counter("pilot_replication_takeovers", "Promotions of this server to primary.", f.takeovers)
    yield counter("pilot_replication_step_downs", "Steps down of this server to standby.", f.step_downs)
    yield labelled(GaugeMetricFamily, "pilot_replication_seq",
                   "Change numbers: the last sent, the highest acknowledged by a standby, the last held here.",
                   "stage", [("sent", f.seq_sent), ("acknowledged", f.seq_acked), ("held", f.seq_held)])


__all__ = ["ReplicationCollector", "ReplicationFigures", "ReplicationSource", "read_replication"]
