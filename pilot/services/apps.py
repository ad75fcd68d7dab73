# -*- test-case-name: tests.protocols.test_apps -*-
"""
The node's built-in services on its stack (``docs/apps.md``): data exchange
on port 1001, storing under the node's home, and the event broker on port
1002.  :func:`listen_apps` binds both when the node starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pilot.apps.storage import Storage
from pilot.protocols.apps import DataExchangeFactory, EventStreamFactory
from pilot.wire.packet import DATA_EXCHANGE, EVENT_STREAM


@dataclass
class Apps:
    exchange: DataExchangeFactory
    events: EventStreamFactory

    def counters(self) -> dict[str, dict[str, int]]:
        """What ``info`` shows under ``counters.apps``: ``dataexchange`` and ``eventstream`` (with the gauges
        ``subscribers`` and ``topics``)."""
        broker = self.events.broker
        return {"dataexchange": dict(self.exchange.counters),
                "eventstream": {**broker.counters, "subscribers": broker.subscribers, "topics": len(broker.topics)}}

    def listen(self, stack: Any) -> None:
        """Bind ports 1001 and 1002 of ``stack`` (a :class:`pilot.stack.Stack`)."""
        stack.listen(DATA_EXCHANGE, self.exchange)
        stack.listen(EVENT_STREAM, self.events)


def make_apps(home: str, now: Callable[[], float]) -> Apps:
    """The services of a node whose home is ``home``; :meth:`Apps.listen` binds them."""
    return Apps(DataExchangeFactory(Storage(home), now), EventStreamFactory())


def listen_apps(stack: Any, home: str, now: Callable[[], float]) -> Apps:
    """:func:`make_apps`, bound on ``stack`` at once."""
    apps = make_apps(home, now)
    apps.listen(stack)
    return apps
