# -*- test-case-name: tests.server.test_directory -*-
"""
Ours: ``search_nodes``, finding nodes on the rendezvous by hostname, tag or
address (``docs/registration.md``, "Searching the registry").

The request is signed by the asking node (``requester_id`` and ``auth``, as
for ``resolve``).  The answer lists the nodes the asker may see: public
nodes, and private nodes that trust it (or share a network with it, the rule
of :meth:`~pilot.server.registry.Registry.may_see`); never a private node
that does not.  It carries no endpoints: ``resolve`` stays the only way to
learn one.

Bounds: the query is 1 to :data:`MAX_QUERY` characters; at most
:data:`MAX_RESULTS` nodes come back (``truncated`` says when more matched);
each node may search :data:`SEARCH_BURST` times at once, then
:data:`SEARCH_RATE` times a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pilot.errors import ErrorCode
from pilot.server.requests import Message, Peer, RequestError, Session
from pilot.server.state import Node
from pilot.wire.registry import get_str

if TYPE_CHECKING:
    from pilot.server.registry import Registry

MAX_QUERY = 64
MAX_RESULTS = 100
SEARCH_RATE = 1.0
SEARCH_BURST = 10.0


def matches(node: Node, query: str) -> bool:
    """Does ``query`` (lower case) appear in the node's hostname, a tag, its address or its id?"""
    tag_query = query.lstrip("#")
    return (query in (node.hostname or "").lower()
            or (bool(tag_query) and any(tag_query in tag for tag in node.tags))
            or query in str(node.address).lower()
            or query == str(node.id))


def node_json(node: Node) -> dict[str, Any]:
    return {"node_id": node.id, "address": str(node.address), "hostname": node.hostname or None,
            "public": node.public, "tags": list(node.tags)}


def search_nodes(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    requester = registry.signed(msg, "requester_id")
    query = get_str(msg, "query", max_len=MAX_QUERY).strip().lower()
    if not query:
        raise RequestError(ErrorCode.invalid_argument, "'query' must not be empty")
    if not registry.search_limit.allow(requester.id, registry.clock.seconds()):
        raise RequestError(ErrorCode.rate_limited, "too many searches from this node; slow down")
    registry.touch(requester)
    found = [node for node in registry.state.nodes.values()
             if node.id != requester.id and matches(node, query) and registry.may_see(requester.id, node)]
    found.sort(key=lambda n: (n.hostname or "\uffff", n.id))
    return {"type": "search_nodes_ok", "nodes": [node_json(n) for n in found[:MAX_RESULTS]],
            "truncated": len(found) > MAX_RESULTS}


HANDLERS = {"search_nodes": search_nodes}
