# -*- test-case-name: tests.server.test_registry -*-
"""
The registry's requests about a node's own record: ``register``,
``heartbeat``, ``deregister``, ``rotate_key``, the settings
(``set_hostname``, ``set_visibility``, ``set_tags``, ``set_task_exec``) and
``subscribe_events`` (``docs/reference-wire.md`` §2, ``docs/registration.md``).

Each is a :data:`~pilot.server.requests.Handler` over the registry's state;
:class:`pilot.server.registry.Registry` dispatches to them.  Where the
reference is weak these differ behind the same wire (``docs/security.md``):
ids from the key, a proven key's requests must be signed, a new key must
prove it is held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pilot.address import node_id_for_key
from pilot.endpoint import format_endpoint, parse_endpoint, parse_port
from pilot.errors import ErrorCode
from pilot.identity import b64decode, verify
from pilot.names import hostname_problem, normalise_tags
from pilot.server.auth import AuthFailed, decode_b64
from pilot.server.requests import Message, Peer, RequestError, Session
from pilot.server.state import Node
from pilot.wire.registry import get_bool, get_int, get_str, get_str_list, rotate_proof_message

if TYPE_CHECKING:
    from pilot.server.registry import Registry


def _set_hostname(registry: Registry, node: Node, hostname: str) -> None:
    if node.hostname and registry.state.hostnames.get(node.hostname) == node.id:
        del registry.state.hostnames[node.hostname]
    node.hostname = hostname
    if hostname:
        registry.state.hostnames[hostname] = node.id


def _hostname_check(registry: Registry, node_id: int, hostname: str) -> str | None:
    problem = hostname_problem(hostname)
    if problem is None and registry.state.hostnames.get(hostname, node_id) != node_id:
        problem = f"hostname {hostname!r} is taken by another node"
    return problem


def register(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    try:
        key = decode_b64(msg.get("public_key"), 32, "public_key")
    except ValueError as e:
        raise RequestError(ErrorCode.invalid_argument, str(e)) from None
    now = registry.clock.seconds()
    known = registry.state.key_index.get(key)
    if not registry.register_limit.allow(peer.host, now) and known is None:
        raise RequestError(ErrorCode.rate_limited, "too many registrations from this address")
    # like the reference, a listen_addr or hostname it cannot use falls back instead of failing
    listen = msg.get("listen_addr")
    listen = listen if isinstance(listen, str) and len(listen) <= 128 else ""
    owner = get_str(msg, "owner", "", max_len=256)
    hostname = msg.get("hostname")
    hostname = hostname[:256] if isinstance(hostname, str) else ""
    if known is not None and known in registry.state.proven and "auth" not in msg:
        raise RequestError(ErrorCode.unauthorized,
                           "this key has proved itself; an unsigned register cannot move its endpoint")
    fresh = False
    if "auth" in msg:
        try:
            fresh = registry.auth.check(msg, key, True, now,
                                    registry.restored_ts.get(known, 0) if known is not None else 0)
        except AuthFailed as e:
            raise RequestError(ErrorCode.unauthorized, str(e)) from None
    node_id = known if known is not None else node_id_for_key(
        key, lambda nid: registry.state.id_keys.get(nid, key) != key)
    # the host part is ignored (the reference's rule): the address the registry sees is the truth
    port = parse_port(listen)
    real_addr = format_endpoint(peer.host, port if port else peer.port)
    node = registry.state.nodes.get(node_id)
    # a node coming back (deregistered or reaped) counts as moved too: its peers
    # still hold the endpoint it had before it left
    moved = node.real_addr != real_addr if node is not None else known is not None
    changed = node is None or moved
    if node is None:
        node = Node(id=node_id, public_key=key, real_addr=real_addr, last_seen=now, owner=owner)
        registry.state.nodes[node_id] = node
        registry.state.gone.pop(node_id, None)
    if registry.state.id_keys.get(node_id) != key or registry.state.key_index.get(key) != node_id:
        registry.state.index_key(key, node_id)  # (only when it changes: the journal records each write)
    if moved:
        node.real_addr = real_addr
    node.last_seen = now
    local_text = msg.get("local_addr")
    local = parse_endpoint(local_text) if local_text else None
    local_addr = format_endpoint(*local) if local is not None else ""
    if node.local_addr != local_addr:
        node.local_addr, changed = local_addr, True
    if owner and owner != node.owner:
        node.owner, changed = owner, True
    if fresh:
        registry.accepted(node_id, msg)
    if fresh and node_id not in registry.state.proven:
        registry.state.proven.add(node_id)
        changed = True
    reply: dict[str, Any] = {"type": "register_ok", "node_id": node_id, "network_id": 0,
                             "address": node.address_text, "public_key": registry.state.key_text(key)}
    if hostname:
        problem = _hostname_check(registry, node_id, hostname)
        if problem is None:
            if node.hostname != hostname:
                _set_hostname(registry, node, hostname)
                changed = True
        elif hostname_problem(hostname) is not None:
            reply["hostname_error"] = problem
    if node.hostname:
        reply["hostname"] = node.hostname
    counters = registry.counters
    counters["registered"] = counters.get("registered", 0) + 1
    if changed:
        registry.on_change()
    if moved:
        _notify_endpoint(registry, node)
    return reply


def _notify_endpoint(registry: Registry, node: Node) -> None:
    event = {"type": "event", "event": "endpoint_changed", "node_id": node.id,
             "real_addr": node.real_addr}
    for truster, trustee in list(registry.state.trust):
        if truster == node.id and trustee in registry.subscribers:
            registry.push_event(trustee, event)


def set_hostname(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node = registry.signed(msg, "node_id")
    name = get_str(msg, "hostname", "", max_len=256)
    if name:
        problem = _hostname_check(registry, node.id, name)
        if problem is not None:
            code = ErrorCode.already_exists if "taken" in problem else ErrorCode.invalid_argument
            raise RequestError(code, problem)
    if node.hostname != name:
        _set_hostname(registry, node, name)
        registry.on_change()
    return {"type": "set_hostname_ok", "node_id": node.id, "hostname": node.hostname}


def set_visibility(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node = registry.signed(msg, "node_id")
    public = get_bool(msg, "public")
    if node.public != public:
        node.public = public
        registry.on_change()
    return {"type": "set_visibility_ok", "node_id": node.id,
            "visibility": "public" if public else "private"}


def set_tags(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node = registry.signed(msg, "node_id")
    try:
        tags = normalise_tags(get_str_list(msg, "tags", 10, 64))
    except ValueError as e:
        raise RequestError(ErrorCode.invalid_argument, str(e)) from None
    if node.tags != tags:
        node.tags = tags
        registry.on_change()
    return {"type": "set_tags_ok", "node_id": node.id, "tags": list(tags)}


def set_task_exec(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node = registry.signed(msg, "node_id")
    enabled = get_bool(msg, "enabled")
    if node.task_exec != enabled:
        node.task_exec = enabled
        registry.on_change()
    return {"type": "set_task_exec_ok", "node_id": node.id, "task_exec": enabled}


def heartbeat(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node = registry.signed(msg, "node_id")
    registry.touch(node)
    reply: dict[str, Any] = {"type": "heartbeat_ok", "time": int(registry.clock.seconds())}
    # what the beacon holds for the node (the same process): a node whose last Discover showed
    # the same endpoint need not prove it again; absent, it proves it (docs/registration.md)
    endpoint = registry.beacon_endpoint(node.id)
    if endpoint is not None:
        reply["endpoint"] = endpoint
    return reply


def deregister(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node_id = get_int(msg, "node_id")
    node = registry.state.nodes.get(node_id)
    if node is not None:
        registry.authenticate(msg, node)
        registry.remove(node_id)
        registry.on_change()
    return {"type": "deregister_ok"}


def rotate_key(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node = registry.signed(msg, "node_id")
    try:
        new = b64decode(msg.get("new_public_key"), 32, "new_public_key")
    except ValueError as e:
        raise RequestError(ErrorCode.invalid_argument, str(e)) from None
    holder = registry.state.key_index.get(new)
    if holder is not None and holder != node.id:
        raise RequestError(ErrorCode.already_exists, "that key belongs to another node")
    # proof of possession (docs/security.md): the new key must sign the hand-over,
    # or a node could take a key it does not hold and so the id of the key's owner
    proof = msg.get("new_key_proof")
    if proof is None:
        raise RequestError(ErrorCode.unauthorized,
                           "rotate_key needs 'new_key_proof', a signature by the new key")
    try:
        sig = b64decode(proof, 64, "new_key_proof")
    except ValueError as e:
        raise RequestError(ErrorCode.unauthorized, str(e)) from None
    if not verify(new, rotate_proof_message(node.id, node.public_key, new), sig):
        raise RequestError(ErrorCode.unauthorized, "'new_key_proof' does not verify for the new key")
    registry.state.key_index.pop(node.public_key, None)
    node.public_key = new
    registry.state.index_key(new, node.id)
    registry.touch(node)
    registry.on_change()
    return {"type": "rotate_key_ok", "node_id": node.id, "address": node.address_text,
            "public_key": registry.state.key_text(new)}


def subscribe_events(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    """Ours: push handshake and trust events to this connection (auth required)."""
    node_id = get_int(msg, "node_id")
    node = registry.need(node_id)
    if "auth" not in msg:
        raise RequestError(ErrorCode.unauthorized, "subscribe_events needs an 'auth' signature")
    registry.authenticate(msg, node)
    if session is None:
        raise RequestError(ErrorCode.invalid_argument, "events need a connection")
    registry.subscribers.setdefault(node_id, set()).add(session)
    return {"type": "subscribe_events_ok", "node_id": node_id,
            "pending_requests": len(registry.state.inbox.get(node_id, ())),
            "pending_responses": len(registry.state.responses.get(node_id, ()))}




HANDLERS = {f.__name__: f for f in (register, set_hostname, set_visibility, set_tags, set_task_exec, heartbeat,
                                    deregister, rotate_key, subscribe_events)}
