"""
pilot: Pilot Protocol on Twisted.

Every node has a permanent virtual address derived from its Ed25519 key,
encrypted peer-to-peer tunnels that cross NATs, and a mutual-trust model, with
one small self-hosted rendezvous server.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any  # noqa: E402

if TYPE_CHECKING:
    from pilot.address import Address, SocketAddress, node_id_for_key


def __getattr__(name: str) -> Any:
    # ``import pilot`` imports nothing more: it runs before pilotctl's entry, which declares
    # ``_hashlib`` absent in the node daemon's process (pilot.entry), and pilot.address imports hashlib
    if name in ("Address", "SocketAddress", "node_id_for_key"):
        from pilot import address
        value = getattr(address, name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["__version__", "Address", "SocketAddress", "node_id_for_key"]
