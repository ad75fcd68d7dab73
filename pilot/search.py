# -*- test-case-name: tests.test_search -*-
"""
Searching the network for nodes (``pilotctl peers --search Q``), the node's
side: ask the registry (``search_nodes``, ``docs/registration.md``) and, when
it cannot answer, fall back to the peers this node knows, saying so.

:func:`search_network` is what the node's API calls; it needs only a way to
send a signed registry request and a way to list the known peers, so it is
tested without a node.  Every node it returns has the same keys:
``hostname``, ``address``, ``node_id``, ``public`` (None when only the
known peers were searched and the node's visibility is not known) and
``tags``.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from pilot.errors import InvalidArgument, RegistryUnavailable

#: The registry's bound on a query (``pilot.server.directory.MAX_QUERY``).
MAX_QUERY = 64

#: Sends a registry request signed by this node as ``requester_id``.
RegistryRequest = Callable[[dict[str, Any]], "Deferred[dict[str, Any]]"]
#: The peers this node knows whose hostname, address or id contain the query.
KnownPeers = Callable[[str], "Deferred[list[dict[str, Any]]]"]

FIELDS = ("hostname", "address", "node_id", "public", "tags")


def search_network(request: RegistryRequest, query: str, known: KnownPeers) -> Deferred[dict[str, Any]]:
    """
    Fire with ``{"nodes": [...], "source": "registry" | "known peers",
    "truncated": bool, "note": str | None}``; the note says why the known
    peers were searched instead of the registry.
    """
    query = query.strip()
    if not query or len(query) > MAX_QUERY:
        return _failed(InvalidArgument(f"a search is 1 to {MAX_QUERY} characters",
                                       "search by a part of a hostname, a tag or an address"))
    d = request({"type": "search_nodes", "query": query})
    d.addCallback(_from_registry)
    d.addErrback(_fall_back, query, known)
    return d


def _failed(error: Exception) -> Deferred[dict[str, Any]]:
    d: Deferred[dict[str, Any]] = Deferred()
    d.errback(Failure(error))
    return d


def _from_registry(reply: dict[str, Any]) -> dict[str, Any]:
    nodes = reply.get("nodes")
    rows = [shaped(n) for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []
    return {"nodes": rows, "source": "registry", "truncated": reply.get("truncated") is True, "note": None}


def _fall_back(failure: Failure, query: str, known: KnownPeers) -> Deferred[dict[str, Any]] | Failure:
    error = failure.value
    if isinstance(error, RegistryUnavailable):
        why = f"the registry cannot be reached ({error.message})"
    elif isinstance(error, InvalidArgument) and "unknown request type" in error.message:
        why = "the registry does not know search_nodes (a reference registry?)"
    else:
        return failure
    note = f"{why}; only the peers this node already knows were searched"
    return known(query).addCallback(_from_known, note)


def _from_known(rows: list[dict[str, Any]], note: str) -> dict[str, Any]:
    return {"nodes": [shaped(r, known_only=True) for r in rows if isinstance(r, dict)],
            "source": "known peers", "truncated": False, "note": note}


def shaped(node: dict[str, Any], known_only: bool = False) -> dict[str, Any]:
    """A node with exactly the documented keys (and the values' types checked)."""
    hostname = node.get("hostname")
    node_id = node.get("node_id")
    address = node.get("address")
    public = node.get("public")
    tags = node.get("tags")
    return {"hostname": hostname if isinstance(hostname, str) and hostname else None,
            "address": address if isinstance(address, str) else None,
            "node_id": node_id if isinstance(node_id, int) and not isinstance(node_id, bool) else None,
            "public": None if known_only or not isinstance(public, bool) else public,
            "tags": [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []}
