# -*- test-case-name: tests.test_details -*-
"""
What the registry says about the nodes in a list this node shows: the
hostname and public key of each ``pending`` request and ``trust`` entry.

A handshake relayed by the registry carries only the sender's node id, so
the trust store holds no key (``public_key`` ``""``) and no name for it;
``pilotctl pending`` then showed neither, and ``trust`` showed hostname
``-``.  :func:`with_details` fills them in with the registry's ``lookup``
(the node's API calls it; tested here without a node).  The key shown is
only what the registry claims; it pins nothing (pinning stays the trust
machine's, ``docs/trust.md``).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, succeed

#: ``lookup(node_id)``: the registry's ``lookup_ok`` reply for the node.
Lookup = Callable[[int], "Deferred[dict[str, Any]]"]

#: Look up at most this many nodes per list (the rest keep what the node knows).
MAX_LOOKUPS = 64


def with_details(rows: list[dict[str, Any]], lookup: Lookup) -> Deferred[list[dict[str, Any]]]:
    """
    ``rows`` (each with ``node_id``), each given ``hostname`` (None if the
    registry has none or cannot say) and, when empty, ``public_key``.
    A row that already has both is not looked up; a failed lookup leaves
    the row as it was.
    """
    out = [dict(row, hostname=row.get("hostname") or None) for row in rows]
    wanted = [row for row in out if isinstance(row.get("node_id"), int)
              and (row["hostname"] is None or not row.get("public_key"))][:MAX_LOOKUPS]
    if not wanted:
        return succeed(out)
    lookups = [_fill(row, lookup) for row in wanted]
    return DeferredList(lookups, consumeErrors=True).addCallback(lambda _: out)


def _fill(row: dict[str, Any], lookup: Lookup) -> Deferred[None]:
    def filled(reply: dict[str, Any]) -> None:
        hostname, key = reply.get("hostname"), reply.get("public_key")
        if row["hostname"] is None and isinstance(hostname, str) and hostname:
            row["hostname"] = hostname
        if not row.get("public_key") and isinstance(key, str) and key:
            row["public_key"] = key

    return lookup(row["node_id"]).addCallback(filled)
