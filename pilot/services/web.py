# -*- test-case-name: tests.services.test_web -*-
"""
The HTTP side: a twisted.web ``Site`` on one TCP port, and for the
rendezvous the chart's sampler (every ``SAMPLE_INTERVAL`` seconds).

``HTTPService(listen, resource, reactor)`` binds in ``privilegedStartService``
(as the rendezvous' own ports do) and closes on stop; :meth:`HTTPService.port`
is the bound port.  :class:`RendezvousHTTP` serves the rendezvous' dashboard,
``/api/stats`` and ``/metrics``; :class:`NodeMetricsHTTP` a node's
``/metrics``.  The access log is off: a polling dashboard would fill it.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from pilot.endpoint import format_endpoint, parse_listen
from pilot.web.dashboard import metrics_root, rendezvous_root
from pilot.web.metrics import RendezvousCollector, collector_registry, metrics_resource
from pilot.web.nodemetrics import NodeCollector
from pilot.web.replication import ReplicationCollector, ReplicationSource
from pilot.web.stats import SAMPLE_INTERVAL, RendezvousStats

LOOPBACK = "127.0.0.1"


class QuietSite(Site):
    def log(self, request: Any) -> None:
        pass


class HTTPService(MultiService):
    log = Logger()

    def __init__(self, listen: str, resource: Resource, reactor: Any, what: str = "HTTP") -> None:
        super().__init__()
        self.host, self._port_number = parse_listen(listen)
        self.site = QuietSite(resource, reactor=reactor)
        self.reactor = reactor
        self.what = what
        self.listening: IListeningPort | None = None

    def _listen(self) -> None:
        if self.listening is None:
            self.listening = self.reactor.listenTCP(self._port_number, self.site, interface=self.host)

    def privilegedStartService(self) -> None:
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self._listen()
        super().startService()
        self.log.info("{what} listening on {endpoint}", what=self.what,
                      endpoint=format_endpoint(self.host, self.port()))

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[Any] = super().stopService()
        listening, self.listening = self.listening, None
        if listening is not None:
            closed = listening.stopListening()
            if closed is not None:
                return stopped.addCallback(lambda _: closed)
        return stopped

    def port(self) -> int:
        """The bound TCP port (the real one when configured as 0)."""
        if self.listening is None:
            raise RuntimeError(f"the {self.what} side is not listening (the service is not running)")
        number: int = self.listening.getHost().port  # type: ignore[attr-defined]
        return number


class RendezvousHTTP(HTTPService):
    """
    The dashboard, ``/api/stats`` and ``/metrics`` of the rendezvous, with the
    chart's sampler; ``replication`` (a paired server's) adds the
    ``pilot_replication_*`` families, which an unpaired one does not have.
    """

    def __init__(self, listen: str, registry: Any, beacon: Any, reactor: Any, metrics_public: bool = False,
                 replication: ReplicationSource | None = None) -> None:
        self.stats = RendezvousStats(registry, beacon, reactor)
        collectors: list[Any] = [RendezvousCollector(self.stats, reactor)]
        if replication is not None:
            collectors.append(ReplicationCollector(replication, reactor, reactor))
        self.metrics = collector_registry(*collectors)
        super().__init__(listen, rendezvous_root(self.stats, metrics_resource(self.metrics), metrics_public),
                         reactor, "Dashboard")
        sampler = TimerService(SAMPLE_INTERVAL, self.stats.sample)
        sampler.clock = reactor
        sampler.setServiceParent(self)


class NodeMetricsHTTP(HTTPService):
    """A node's ``/metrics``, read from its control API's ``info`` at each scrape.

    ``listen`` without a host binds to 127.0.0.1 only: a node's figures name
    its peers and paths; an operator who wants them elsewhere names the host.
    """

    def __init__(self, listen: str, info: Callable[[], Any], reactor: Any) -> None:
        host, port = parse_listen(listen)
        self.metrics = collector_registry(NodeCollector(info, reactor))
        super().__init__(format_endpoint(host or LOOPBACK, port), metrics_root(metrics_resource(self.metrics), True),
                         reactor, "Metrics")
