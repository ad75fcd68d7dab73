# -*- test-case-name: tests.protocols.test_registry -*-
"""
The registry's TCP server: the factory that builds one
:class:`~pilot.protocols.registry_connection.RegistryServerProtocol` per
connection (reading frames, answering them, writing the replies: that
module's docstring), and the limits on connections it keeps: at most
:data:`MAX_CONNECTIONS` at once and :data:`MAX_PER_ADDRESS` from one source
address (``docs/security.md``).  The client is in ``registry_client.py``.

The connection's names are importable from here too, where they lived before
the two jobs were split.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.protocols.registry_connection import (
    BATCH_BYTES, BUFFER_BUDGET, FRAME_DEADLINE, IDLE_TIMEOUT, MAX_REQUEST, MAX_UNSENT, ByteBudget, Durability,
    RegistryServerProtocol, StreamTransport, abort, peer_of, stream_of,
)
from pilot.server.registry import Registry

__all__ = [
    "BATCH_BYTES", "BUFFER_BUDGET", "FRAME_DEADLINE", "IDLE_TIMEOUT", "MAX_CONNECTIONS", "MAX_PER_ADDRESS",
    "MAX_REQUEST", "MAX_UNSENT", "ByteBudget", "CountedProtocol", "Durability", "RefusedConnection",
    "RegistryServerFactory", "RegistryServerProtocol", "StreamTransport", "abort", "peer_of", "stream_of",
]

#: Concurrent connections one registry accepts; over it new ones are closed at once.
MAX_CONNECTIONS = 20_000
#: Concurrent connections from one source address (a NAT may hide many nodes: keep it generous).
MAX_PER_ADDRESS = 256

class RefusedConnection(Protocol):
    """A connection over the limit: aborted as soon as it is made, nothing read."""

    def connectionMade(self) -> None:
        abort(self)

    def dataReceived(self, data: bytes) -> None:
        pass


class CountedProtocol(RegistryServerProtocol):
    """A factory's connection: tells the factory when it goes, for the per-address count."""

    factory: "RegistryServerFactory"
    host = ""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.factory.connection_gone(self.host)


class RegistryServerFactory(Factory):
    """
    Builds a :class:`RegistryServerProtocol` per connection, sharing one registry.

    At most ``max_connections`` are open at once, and at most
    ``max_per_address`` from one source address; a connection over a limit
    is aborted as soon as it is accepted.  (``buildProtocol`` returns a
    :class:`RefusedConnection` rather than ``None``: a TLS port wraps whatever
    it gets and would fail on ``None``.)
    """

    log = Logger()
    noisy = False

    def __init__(self, registry: Registry, clock: IReactorTime, idle_timeout: float = IDLE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS, max_unsent: int = MAX_UNSENT,
                 max_per_address: int = MAX_PER_ADDRESS, frame_deadline: float = FRAME_DEADLINE,
                 max_request: int = MAX_REQUEST, buffer_budget: int = BUFFER_BUDGET,
                 durability: Durability | None = None) -> None:
        self.registry = registry
        self.durability = durability
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_unsent = max_unsent
        self.max_per_address = max_per_address
        self.frame_deadline = frame_deadline
        self.max_request = max_request
        self.budget = ByteBudget(buffer_budget)
        self.connections: set[RegistryServerProtocol] = set()
        self.per_address: dict[str, int] = {}
        self.refused = 0
        self.refused_per_address = 0

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                self.log.warn("registry is at its limit of {limit} connections; refused {count} so far",
                              limit=self.max_connections, count=self.refused)
            return RefusedConnection()
        host = peer_of(addr).host if addr is not None else ""
        if self.max_per_address > 0 and self.per_address.get(host, 0) >= self.max_per_address:
            self.refused_per_address += 1
            if self.refused_per_address == 1 or self.refused_per_address % 1000 == 0:
                self.log.warn("{host} is at its limit of {limit} registry connections; "
                              "refused {count} so far (all addresses)", host=host,
                              limit=self.max_per_address, count=self.refused_per_address)
            return RefusedConnection()
        protocol = CountedProtocol(self.registry, self.clock, self.idle_timeout, self.max_unsent,
                                   self.connections, self.frame_deadline, self.max_request, self.budget,
                                   self.durability)
        protocol.factory = self
        protocol.host = host
        self.per_address[host] = self.per_address.get(host, 0) + 1
        return protocol

    def connection_gone(self, host: str) -> None:
        count = self.per_address.get(host, 0) - 1
        if count > 0:
            self.per_address[host] = count
        else:
            self.per_address.pop(host, None)

    def disconnect_all(self) -> None:
        """Close every open connection (used when the service stops)."""
        for protocol in list(self.connections):
            stream_of(protocol).loseConnection()
