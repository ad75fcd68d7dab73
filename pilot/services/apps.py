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
from pilot.protocols.apps import (
    DATA_EXCHANGE_PORT, EVENT_STREAM_PORT, DataExchangeFactory, EventStreamFactory,
)


@dataclass
class Apps:
    exchange: DataExchangeFactory
    events: EventStreamFactory

    def counters(self) -> dict[str, dict[str, int]]:
        """What ``info`` shows under ``counters``: ``dataexchange`` and ``eventstream``."""
        return {"dataexchange": dict(self.exchange.counters), "eventstream": dict(self.events.broker.counters)}


def listen_apps(stack: Any, home: str, now: Callable[[], float]) -> Apps:
    """Bind ports 1001 and 1002 of ``stack`` (a :class:`pilot.stack.Stack`); the factories, for their counters."""
    apps = Apps(DataExchangeFactory(Storage(home), now), EventStreamFactory())
    stack.listen(DATA_EXCHANGE_PORT, apps.exchange)
    stack.listen(EVENT_STREAM_PORT, apps.events)
    return apps
