# -*- test-case-name: tests.protocols.test_control_server -*-
"""
What the node daemon offers its local clients: the interface between the
control socket (``pilot.protocols.control_server``) and the node service.

Every method returns a Deferred firing with a JSON-ready value (the ``data``
pilotctl prints with ``--json``) or failing with a
:class:`~pilot.errors.PilotError`.  ``target`` arguments are a hostname, a
text address (``0:0000.1234.ABCD``) or a decimal node id; the node resolves
them.  The control protocol is specified in ``docs/control.md``.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory


class Listening(Protocol):
    """A bound port; ``close()`` unbinds it."""

    def close(self) -> None: ...


class NodeAPI(Protocol):
    # --- this node ------------------------------------------------------------
    def info(self) -> Deferred[dict[str, Any]]: ...
    def set_hostname(self, hostname: str) -> Deferred[dict[str, Any]]: ...  # "" clears
    def set_public(self, public: bool) -> Deferred[dict[str, Any]]: ...
    def set_tags(self, tags: list[str]) -> Deferred[dict[str, Any]]: ...
    def shutdown(self) -> Deferred[dict[str, Any]]: ...

    # --- discovery --------------------------------------------------------------
    def find(self, hostname: str) -> Deferred[dict[str, Any]]: ...
    def peers(self, search: str | None) -> Deferred[list[dict[str, Any]]]: ...
    def search(self, query: str) -> Deferred[dict[str, Any]]:
        """The network, not only the peers we met: ``{"nodes", "source", "truncated", "note"}``
        (:func:`pilot.search.search_network`)."""
        ...

    # --- trust ------------------------------------------------------------------
    def handshake(self, target: str, justification: str) -> Deferred[dict[str, Any]]: ...
    def pending(self) -> Deferred[list[dict[str, Any]]]: ...
    def approve(self, node_id: int) -> Deferred[dict[str, Any]]: ...
    def reject(self, node_id: int, reason: str) -> Deferred[dict[str, Any]]: ...
    def trusted(self) -> Deferred[list[dict[str, Any]]]: ...
    def untrust(self, node_id: int) -> Deferred[dict[str, Any]]: ...

    # --- traffic ----------------------------------------------------------------
    def ping(self, target: str, count: int, timeout: float, interval: float) -> Deferred[dict[str, Any]]: ...

    def connect(self, target: str, port: int, protocol: IProtocol) -> Deferred[dict[str, Any]]:
        """Open a stream to ``target:port`` driving ``protocol``; fires with the connection's description."""

    def listen(self, port: int, factory: IProtocolFactory) -> Deferred[Listening]:
        """Accept streams on ``port``; each gets ``factory.buildProtocol(PilotAddress)``."""

    def send_datagram(self, target: str, port: int, data: bytes) -> Deferred[dict[str, Any]]: ...

    def disconnect(self, conn_id: int) -> Deferred[dict[str, Any]]:
        """Reset the stream connection ``conn_id`` (an ``id`` of ``info``'s ``conn_list``)."""

    def bind_datagrams(self, port: int,
                       received: Callable[[dict[str, Any], bytes], None]) -> Deferred[Listening]:
        """Deliver datagrams for ``port`` as ``received({"from": addr, "src_port": n}, data)``."""

    # --- port forwarding (pilot.services.forward) --------------------------------------------
    def forward(self, local_port: int, target: str, port: int) -> Deferred[dict[str, Any]]:
        """A TCP listener on 127.0.0.1:``local_port`` whose connections become streams to ``target:port``."""
    def unforward(self, local_port: int) -> Deferred[dict[str, Any]]: ...
    def expose(self, port: int, host: str, host_port: int) -> Deferred[dict[str, Any]]:
        """Streams arriving on Pilot ``port`` are connected to the TCP service ``host:host_port``."""
    def unexpose(self, port: int) -> Deferred[dict[str, Any]]: ...
    def forwards_list(self) -> Deferred[dict[str, Any]]: ...
