"""
pilot: Pilot Protocol on Twisted.

Every node has a permanent virtual address derived from its Ed25519 key,
encrypted peer-to-peer tunnels that cross NATs, and a mutual-trust model, with
one small self-hosted rendezvous server.
"""

__version__ = "0.1.0"

from pilot.address import Address, SocketAddress, node_id_for_key  # noqa: E402

__all__ = ["__version__", "Address", "SocketAddress", "node_id_for_key"]
