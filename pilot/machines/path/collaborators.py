# -*- test-case-name: tests.machines.test_path -*-
"""
What one peer's path machine (:mod:`pilot.machines.path.peer`) needs of the
others: the tunnel layer (:class:`TunnelControl`, ``pilot.machines.tunnel.Tunnels``)
and the node's path layer (:class:`PathOwner`, ``Paths``).  Public methods only.
"""

from __future__ import annotations

from typing import Optional, Protocol

from pilot.endpoint import Endpoint


class TunnelControl(Protocol):
    """What a path needs of the tunnel layer (``pilot.machines.tunnel.Tunnels``)."""

    def set_path(self, node_id: int, direct_endpoint: Optional[Endpoint], relay: bool,
                 hold: bool = False) -> None:
        """Send to the peer directly (to ``direct_endpoint``, None: the known one) or through the beacon;
        ``hold``: our key exchanges wait (they go only where :meth:`send_key_exchange` says)."""

    def send_key_exchange(self, node_id: int, endpoint: Optional[Endpoint] = None) -> None:
        "Our PILA to the peer now: to ``endpoint`` directly, or (None) by its current path."

    def key_exchange_frame(self) -> bytes:
        "Our PILA, for an endpoint of no peer we know yet."

    def is_established(self, node_id: int) -> bool:
        "Do we hold a session with the peer?"

    def last_sent(self, node_id: int) -> Optional[float]:
        "When we last sent the peer a frame (clock seconds), None if never."


class PathOwner(Protocol):
    """What one peer's path asks of the node's path layer (``Paths``)."""

    def request_punch(self, node_id: int) -> bool:
        "Ask our beacon to punch toward the peer; False if we cannot (no beacon, not registered)."

    def punches_first(self, endpoint: Endpoint) -> bool:
        "Do we punch first toward the peer at ``endpoint`` (``pilot.machines.path.punches_first``)?"

    def forget_punch_request(self, node_id: int) -> None:
        "The peer is heard directly (or given up): no punch command is awaited for it any more."

    def count(self, name: str, n: int = 1) -> None:
        "Count an event."
