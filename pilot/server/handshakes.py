# -*- test-case-name: tests.server.test_registry_trust -*-
"""
The registry's trust and handshake requests: ``report_trust``,
``revoke_trust``, ``request_handshake``, ``poll_handshakes`` and
``respond_handshake`` (``docs/trust.md``).

Each is a :data:`~pilot.server.requests.Handler` over the registry's state.
Trust is directed (``(truster, trustee)`` pairs); a handshake request waits in
the target's inbox (at most :data:`MAX_INBOX`) until polled or answered, and an
answer waits in the requester's queue (at most :data:`MAX_RESPONSES`).  Nodes
subscribed to events hear of each change at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pilot.errors import ErrorCode
from pilot.server.requests import Message, Peer, RequestError, Session
from pilot.server.state import HandshakeRequest, HandshakeResponse
from pilot.wire.registry import get_bool, get_int, get_str

if TYPE_CHECKING:
    from pilot.server.registry import Registry

MAX_INBOX = 100
MAX_TRUSTED = 10_000
MAX_RESPONSES = 100
MAX_JUSTIFICATION = 1024


def report_trust(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node = registry.signed(msg, "node_id")
    peer_id = get_int(msg, "peer_id")
    if peer_id == node.id:
        raise RequestError(ErrorCode.invalid_argument, "a node cannot trust itself")
    if peer_id not in registry.state.id_keys:
        raise RequestError(ErrorCode.not_found, f"node {peer_id} is not known")
    if (node.id, peer_id) not in registry.state.trust:
        if sum(1 for a, _ in registry.state.trust if a == node.id) >= MAX_TRUSTED:
            raise RequestError(ErrorCode.rate_limited, f"a node may trust at most {MAX_TRUSTED} peers")
        registry.state.trust.add((node.id, peer_id))
        registry.on_change()
        registry.push_event(peer_id, {"type": "event", "event": "trust_granted", "node_id": node.id})
    return {"type": "report_trust_ok"}


def revoke_trust(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node = registry.signed(msg, "node_id")
    peer_id = get_int(msg, "peer_id")
    edges = {(node.id, peer_id), (peer_id, node.id)} & registry.state.trust
    if not edges:
        raise RequestError(ErrorCode.not_found, f"no trust between {node.id} and {peer_id}")
    registry.state.trust -= edges
    registry.on_change()
    registry.push_event(peer_id, {"type": "event", "event": "trust_revoked", "node_id": node.id})
    return {"type": "revoke_trust_ok"}


def request_handshake(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    sender = registry.signed(msg, "from_node_id")
    target_id = get_int(msg, "to_node_id")
    registry.need(target_id, "target node")
    if target_id == sender.id:
        raise RequestError(ErrorCode.invalid_argument, "a node cannot handshake with itself")
    justification = get_str(msg, "justification", "", max_len=MAX_JUSTIFICATION)
    inbox = registry.state.inbox.setdefault(target_id, [])
    inbox[:] = [r for r in inbox if r.from_node_id != sender.id]  # a repeat replaces the pending one
    if len(inbox) >= MAX_INBOX:
        raise RequestError(ErrorCode.rate_limited, f"node {target_id} has {MAX_INBOX} pending requests")
    request = HandshakeRequest(sender.id, justification, registry.clock.seconds())
    inbox.append(request)
    registry.state.asked.add((sender.id, target_id))
    registry.on_change()
    registry.push_event(target_id, {"type": "event", "event": "handshake_request", **_request_json(request)})
    return {"type": "request_handshake_ok", "status": "delivered"}


def poll_handshakes(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node = registry.signed(msg, "node_id")
    registry.touch(node)
    requests = registry.state.inbox.pop(node.id, [])
    responses = registry.state.responses.pop(node.id, [])
    if requests or responses:
        registry.on_change()
    return {"type": "poll_handshakes_ok",
            "requests": [_request_json(r) for r in requests],
            "responses": [_response_json(r) for r in responses]}


def respond_handshake(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node = registry.signed(msg, "node_id")
    peer_id = get_int(msg, "peer_id")
    accept = get_bool(msg, "accept")
    if peer_id == node.id:
        raise RequestError(ErrorCode.invalid_argument, "a node cannot answer itself")
    if peer_id not in registry.state.id_keys:
        raise RequestError(ErrorCode.not_found, f"node {peer_id} is not known")
    inbox = registry.state.inbox.get(node.id, [])
    if any(r.from_node_id == peer_id for r in inbox):
        registry.state.inbox[node.id] = [r for r in inbox if r.from_node_id != peer_id]
    # polled or not, the requester's signed request stays its consent until answered
    asked = (peer_id, node.id) in registry.state.asked
    registry.state.asked.discard((peer_id, node.id))
    if accept:
        registry.state.trust.add((node.id, peer_id))
        if asked:
            # the requester's signed request is its consent to trust us back
            registry.state.trust.add((peer_id, node.id))
    queue = registry.state.responses.setdefault(peer_id, [])
    response = HandshakeResponse(node.id, accept, registry.clock.seconds())
    if not any(r.from_node_id == node.id and r.accept == accept for r in queue):
        queue.append(response)
        del queue[:-MAX_RESPONSES]
    registry.on_change()
    registry.push_event(peer_id, {"type": "event", "event": "handshake_response", **_response_json(response)})
    return {"type": "respond_handshake_ok", "accept": accept, "peer_id": peer_id}


def _request_json(r: HandshakeRequest) -> Message:
    return {"from_node_id": r.from_node_id, "justification": r.justification, "timestamp": int(r.timestamp)}



def _response_json(r: HandshakeResponse) -> Message:
    return {"from_node_id": r.from_node_id, "accept": r.accept, "timestamp": int(r.timestamp)}


HANDLERS = {f.__name__: f for f in (report_trust, revoke_trust, request_handshake, poll_handshakes,
                                    respond_handshake)}
