# -*- test-case-name: tests.server.test_registry -*-
"""
The reference's remaining registry requests, answered for compatibility with
little logic of our own: networks (the backbone only; custom networks are not
built), polo scores, the beacon list, and replication (handed to ``Registry.replica``
when the server has a pair; "replication not configured" otherwise).

Each is a :data:`~pilot.server.requests.Handler` over the registry's state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pilot.errors import ErrorCode
from pilot.server.requests import Message, Peer, RequestError, Session
from pilot.server.state import Node
from pilot.wire.registry import get_int, get_str

if TYPE_CHECKING:
    from pilot.server.registry import Registry

#: A beacon that has not registered again for this long is dropped from the list.
BEACON_TTL = 60.0


def list_nodes(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    network = get_int(msg, "network_id", 16, default=0)
    if network == 0:
        raise RequestError(ErrorCode.invalid_argument, "listing backbone nodes is not permitted")
    raise RequestError(ErrorCode.not_found, f"network {network} does not exist")


def list_networks(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    return {"type": "list_networks_ok", "networks": [
        {"id": 0, "name": "backbone", "members": len(registry.state.nodes), "join_rule": "open"}]}


def _score_reply(kind: str, node: Node) -> Message:
    return {"type": kind, "node_id": node.id, "address": str(node.address), "polo_score": node.polo_score}


def get_polo_score(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    return _score_reply("get_polo_score_ok", registry.need(get_int(msg, "node_id")))


def _score_change_allowed(registry: Registry, msg: Message, target: Node) -> None:
    # The reference takes score changes unsigned; a proven node's score
    # moves only for a request signed (replay-proof) by a registered node.
    if "auth" in msg or target.id in registry.state.proven:
        signer = registry.need(get_int(msg, "requester_id"), "requester")
        if "auth" not in msg:
            raise RequestError(ErrorCode.unauthorized, "changing this node's score needs a signed request")
        registry.authenticate(msg, signer)


def update_polo_score(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node = registry.need(get_int(msg, "node_id"))
    delta = msg.get("delta")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not -1e6 <= delta <= 1e6:
        raise RequestError(ErrorCode.invalid_argument, "'delta' must be a number")
    _score_change_allowed(registry, msg, node)
    node.polo_score = max(-(1 << 31), min((1 << 31) - 1, node.polo_score + int(delta)))
    registry.on_change()
    return _score_reply("update_polo_score_ok", node)


def set_polo_score(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node = registry.need(get_int(msg, "node_id"))
    score = msg.get("polo_score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not -(1 << 31) <= score < 1 << 31:
        raise RequestError(ErrorCode.invalid_argument, "'polo_score' must be a number")
    _score_change_allowed(registry, msg, node)
    node.polo_score = int(score)
    registry.on_change()
    return _score_reply("set_polo_score_ok", node)


def networks_wip(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    raise RequestError(ErrorCode.invalid_argument, "custom networks are WIP")


def beacon_register(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    beacon_id = get_int(msg, "beacon_id")
    if beacon_id == 0:
        raise RequestError(ErrorCode.invalid_argument, "beacon_id must not be 0")
    addr = get_str(msg, "addr", max_len=128)
    now = registry.clock.seconds()
    for bid in [b for b, (_, t) in registry.beacons.items() if now - t > BEACON_TTL]:
        del registry.beacons[bid]
    if len(registry.beacons) >= 1024 and beacon_id not in registry.beacons:
        raise RequestError(ErrorCode.rate_limited, "too many beacons")
    registry.beacons[beacon_id] = (addr, registry.clock.seconds())
    return {"type": "beacon_register_ok", "beacon_id": beacon_id}


def beacon_list(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    now = registry.clock.seconds()
    return {"type": "beacon_list_ok", "beacons": [
        {"id": b, "addr": a} for b, (a, t) in sorted(registry.beacons.items()) if now - t <= BEACON_TTL]}


def subscribe_replication(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    """A standby subscribes (``pilot.server.replication_role``); the reply is the first snapshot."""
    if registry.replica is None:
        raise RequestError(ErrorCode.invalid_argument, "replication not configured")
    return registry.replica.subscribe(msg, peer, session)


def replication_promote(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    """Ours: a standby takes over now (``pilotctl rendezvous promote``; the token authenticates)."""
    if registry.replica is None:
        raise RequestError(ErrorCode.invalid_argument, "replication not configured")
    return registry.replica.promote(msg, peer, session)


def replication_ack(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    """Ours: a standby holds the deltas up to ``seq`` (``--sync-replication`` waits for it)."""
    if registry.replica is None:
        raise RequestError(ErrorCode.invalid_argument, "replication not configured")
    return registry.replica.ack(msg, peer, session)


HANDLERS = {f.__name__: f for f in (list_nodes, list_networks, get_polo_score, update_polo_score, set_polo_score,
                                    beacon_register, beacon_list, subscribe_replication, replication_promote,
                                    replication_ack)}
HANDLERS.update({name: networks_wip for name in ("create_network", "join_network", "leave_network")})
