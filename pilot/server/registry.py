# -*- test-case-name: tests.server.test_registry -*-
"""
The registry: every request type a reference node sends, answered with the
reference's reply fields (facts §2), over our state.

Pure logic: no sockets, no files; time from the injected ``IReactorTime``.
The TCP protocol feeds :meth:`Registry.handle` one decoded request at a time
with the connection's :class:`Session`; the reply is returned, and events for
subscribed nodes are pushed through their sessions.  Whenever persistent
state changes, ``on_change`` is called (the service coalesces the writes).

Where the reference is weak, this registry differs behind the same wire
format (``docs/security.md``): node ids come from the key; directed trust;
proven keys; a private node resolves (and is punched, and relayed to) only
for peers it trusts; real error reasons.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Protocol

import attr
from twisted.internet.interfaces import IReactorTime

from pilot.address import node_id_for_key
from pilot.endpoint import format_endpoint, parse_endpoint
from pilot.errors import ErrorCode, MalformedFrame
from pilot.identity import b64decode, b64encode
from pilot.names import hostname_problem, normalise_tags
from pilot.server.auth import MAX_SKEW, AuthFailed, Authenticator
from pilot.ratelimit import KeyedLimiter
from pilot.server.state import HandshakeRequest, HandshakeResponse, Node, RegistryState
from pilot.wire.registry import get_bool, get_int, get_str, get_str_list

_PORT = re.compile(r"[0-9]{1,5}")
MAX_INBOX = 100
MAX_TRUSTED = 10_000
MAX_RESPONSES = 100
MAX_JUSTIFICATION = 1024
BEACON_TTL = 60.0


@attr.s(auto_attribs=True, frozen=True)
class RegistryConfig:
    #: A node silent for this long is removed (the reference: 3 minutes).
    stale_after: float = 180.0
    #: Registrations per source IP per minute (the reference: 10); 0 disables.
    registrations_per_minute: float = 10.0
    #: Requests of any kind per source IP per second, and the burst; 0 disables.
    requests_per_second: float = 500.0
    request_burst: float = 2000.0
    max_skew: float = MAX_SKEW


@attr.s(auto_attribs=True, frozen=True)
class Peer:
    """Where a request came from, as the registry's socket saw it."""

    host: str
    port: int


class Session(Protocol):
    """What the registry needs of a client connection."""

    def push(self, message: dict[str, Any]) -> None:
        """Send an unsolicited message (an event) on this connection."""


class RequestError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_reply(code: ErrorCode, message: str) -> dict[str, Any]:
    return {"type": "error", "error": message, "code": code.name}


def listen_port(text: str) -> int | None:
    """The port of a ``listen_addr`` (its host is ignored); None if there is none."""
    _, sep, port = text.rpartition(":")
    if not sep or _PORT.fullmatch(port) is None or not 0 < int(port) <= 0xFFFF:
        return None
    return int(port)


def _host(endpoint: str) -> str:
    return endpoint.rpartition(":")[0]


class Registry:
    def __init__(self, clock: IReactorTime, config: RegistryConfig | None = None,
                 state: RegistryState | None = None,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.clock = clock
        self.config = config or RegistryConfig()
        self.state = state or RegistryState(created=clock.seconds())
        self.on_change = on_change
        self.auth = Authenticator(self.config.max_skew)
        self.register_limit = KeyedLimiter(self.config.registrations_per_minute / 60.0,
                                           max(self.config.registrations_per_minute, 1.0))
        self.request_limit = KeyedLimiter(self.config.requests_per_second, self.config.request_burst)
        self.subscribers: dict[int, set[Session]] = {}
        self.beacons: dict[int, tuple[str, float]] = {}
        self.counters: dict[str, int] = {}
        now = clock.seconds()
        for node in self.state.nodes.values():
            # a restarted registry gives every node a full period to check in again
            node.last_seen = max(node.last_seen, now)

    # --- entry point ------------------------------------------------------------

    def handle(self, msg: dict[str, Any], peer: Peer, session: Session | None = None) -> dict[str, Any]:
        kind = msg.get("type")
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        self._count(f"request.{kind}" if handler else "request.unknown")
        now = self.clock.seconds()
        if not self.request_limit.allow(peer.host, now):
            self._count("error.rate_limited")
            return error_reply(ErrorCode.rate_limited, "too many requests from this address")
        if handler is None:
            return error_reply(ErrorCode.invalid_argument, f"unknown request type {str(kind)[:40]!r}")
        try:
            return handler(self, msg, peer, session)
        except RequestError as e:
            self._count(f"error.{e.code.name}")
            return error_reply(e.code, e.message)
        except MalformedFrame as e:
            self._count("error.malformed")
            return error_reply(ErrorCode.invalid_argument, e.reason)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    # --- helpers ------------------------------------------------------------------

    def node(self, node_id: int) -> Node | None:
        return self.state.nodes.get(node_id)

    def _need(self, node_id: int, what: str = "node") -> Node:
        node = self.state.nodes.get(node_id)
        if node is None:
            raise RequestError(ErrorCode.not_found, f"{what} {node_id} is not registered")
        return node

    def _authenticate(self, msg: dict[str, Any], node: Node) -> None:
        try:
            fresh = self.auth.check(msg, node.public_key, node.id in self.state.proven, self.clock.seconds())
        except AuthFailed as e:
            raise RequestError(ErrorCode.unauthorized, str(e)) from None
        if fresh and node.id not in self.state.proven:
            self.state.proven.add(node.id)
            self.on_change()

    def _signed(self, msg: dict[str, Any], field: str) -> Node:
        node = self._need(get_int(msg, field))
        self._authenticate(msg, node)
        return node

    def trusts(self, truster: int, trustee: int) -> bool:
        return (truster, trustee) in self.state.trust

    def may_see(self, requester: int, target: Node) -> bool:
        """May ``requester`` learn ``target``'s real endpoint?"""
        if requester == target.id or target.public or self.trusts(target.id, requester):
            return True
        other = self.state.nodes.get(requester)
        return other is not None and bool(set(target.networks) & set(other.networks) - {0})

    def _push(self, node_id: int, event: dict[str, Any]) -> None:
        for session in list(self.subscribers.get(node_id, ())):
            session.push(event)

    def session_closed(self, session: Session) -> None:
        for node_id in [n for n, s in self.subscribers.items() if session in s]:
            self.subscribers[node_id].discard(session)
            if not self.subscribers[node_id]:
                del self.subscribers[node_id]

    def touch(self, node: Node) -> None:
        node.last_seen = self.clock.seconds()

    def reap(self) -> list[int]:
        """Remove nodes silent for longer than ``stale_after``; return their ids."""
        cutoff = self.clock.seconds() - self.config.stale_after
        gone = [n.id for n in self.state.nodes.values() if n.last_seen < cutoff]
        for node_id in gone:
            self._remove(node_id)
        if gone:
            self.on_change()
        now = self.clock.seconds()
        for bid in [b for b, (_, t) in self.beacons.items() if now - t > BEACON_TTL]:
            del self.beacons[bid]
        return gone

    def _remove(self, node_id: int) -> None:
        node = self.state.nodes.pop(node_id, None)
        if node is not None and node.hostname and self.state.hostnames.get(node.hostname) == node_id:
            del self.state.hostnames[node.hostname]

    def _set_hostname(self, node: Node, hostname: str) -> None:
        if node.hostname and self.state.hostnames.get(node.hostname) == node.id:
            del self.state.hostnames[node.hostname]
        node.hostname = hostname
        if hostname:
            self.state.hostnames[hostname] = node.id

    def _hostname_check(self, node_id: int, hostname: str) -> str | None:
        problem = hostname_problem(hostname)
        if problem is None and self.state.hostnames.get(hostname, node_id) != node_id:
            problem = f"hostname {hostname!r} is taken by another node"
        return problem

    def _lookup_json(self, node: Node) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node_id": node.id, "address": str(node.address), "networks": list(node.networks),
            "public_key": b64encode(node.public_key), "public": node.public,
            "polo_score": node.polo_score,
        }
        if node.hostname:
            out["hostname"] = node.hostname
        if node.tags:
            out["tags"] = list(node.tags)
        if node.task_exec:
            out["task_exec"] = True
        return out

    # --- handlers -------------------------------------------------------------------

    def register(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        try:
            key = b64decode(msg.get("public_key"), 32, "public_key")
        except ValueError as e:
            raise RequestError(ErrorCode.invalid_argument, str(e)) from None
        now = self.clock.seconds()
        known = self.state.key_index.get(key)
        if not self.register_limit.allow(peer.host, now) and known is None:
            raise RequestError(ErrorCode.rate_limited, "too many registrations from this address")
        # like the reference, a listen_addr or hostname it cannot use falls back instead of failing
        listen = msg.get("listen_addr")
        listen = listen if isinstance(listen, str) and len(listen) <= 128 else ""
        owner = get_str(msg, "owner", "", max_len=256)
        hostname = msg.get("hostname")
        hostname = hostname[:256] if isinstance(hostname, str) else ""
        if known is not None and known in self.state.proven and "auth" not in msg:
            raise RequestError(ErrorCode.unauthorized,
                               "this key has proved itself; an unsigned register cannot move its endpoint")
        fresh = False
        if "auth" in msg:
            try:
                fresh = self.auth.check(msg, key, True, now)
            except AuthFailed as e:
                raise RequestError(ErrorCode.unauthorized, str(e)) from None
        node_id = known if known is not None else node_id_for_key(
            key, lambda nid: self.state.id_keys.get(nid, key) != key)
        # the host part is ignored (the reference's rule): the address the registry sees is the truth
        port = listen_port(listen)
        real_addr = format_endpoint(peer.host, port if port else peer.port)
        node = self.state.nodes.get(node_id)
        # a node coming back (deregistered or reaped) counts as moved too: its peers
        # still hold the endpoint it had before it left
        moved = node.real_addr != real_addr if node is not None else known is not None
        changed = node is None or moved
        if node is None:
            node = Node(id=node_id, public_key=key, real_addr=real_addr, last_seen=now, owner=owner)
            self.state.nodes[node_id] = node
        self.state.index_key(key, node_id)
        node.real_addr = real_addr
        node.last_seen = now
        local = parse_endpoint(msg.get("local_addr", ""))
        local_addr = format_endpoint(*local) if local is not None else ""
        if node.local_addr != local_addr:
            node.local_addr, changed = local_addr, True
        if owner and owner != node.owner:
            node.owner, changed = owner, True
        if fresh and node_id not in self.state.proven:
            self.state.proven.add(node_id)
            changed = True
        reply: dict[str, Any] = {"type": "register_ok", "node_id": node_id, "network_id": 0,
                                 "address": str(node.address), "public_key": b64encode(key)}
        if hostname:
            problem = self._hostname_check(node_id, hostname)
            if problem is None:
                if node.hostname != hostname:
                    self._set_hostname(node, hostname)
                    changed = True
            elif hostname_problem(hostname) is not None:
                reply["hostname_error"] = problem
        if node.hostname:
            reply["hostname"] = node.hostname
        self._count("registered")
        if changed:
            self.on_change()
        if moved:
            self._notify_endpoint(node)
        return reply

    def _notify_endpoint(self, node: Node) -> None:
        event = {"type": "event", "event": "endpoint_changed", "node_id": node.id,
                 "real_addr": node.real_addr}
        for truster, trustee in list(self.state.trust):
            if truster == node.id and trustee in self.subscribers:
                self._push(trustee, event)

    def lookup(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        node = self._need(get_int(msg, "node_id"))
        reply = {"type": "lookup_ok", **self._lookup_json(node)}
        if node.public:
            reply["real_addr"] = node.real_addr
        return reply

    def resolve(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        requester = self._signed(msg, "requester_id")
        target = self._need(get_int(msg, "node_id"))
        self.touch(requester)
        if not self.may_see(requester.id, target):
            raise RequestError(ErrorCode.not_trusted,
                               f"node {target.id} is private and does not trust node {requester.id}")
        reply = {"type": "resolve_ok", "node_id": target.id, "real_addr": target.real_addr}
        if target.local_addr and _host(requester.real_addr) == _host(target.real_addr):
            # behind the same NAT (one public address): the LAN path needs no hairpin
            reply["local_addr"] = target.local_addr
        return reply

    def resolve_hostname(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        name = get_str(msg, "hostname", max_len=256)
        node_id = self.state.hostnames.get(name)
        if node_id is None:
            raise RequestError(ErrorCode.not_found, f"no node has the hostname {name[:63]!r}")
        node = self.state.nodes[node_id]
        return {"type": "resolve_hostname_ok", "node_id": node.id, "address": str(node.address),
                "public": node.public, "hostname": node.hostname}

    def set_hostname(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        node = self._signed(msg, "node_id")
        name = get_str(msg, "hostname", "", max_len=256)
        if name:
            problem = self._hostname_check(node.id, name)
            if problem is not None:
                code = ErrorCode.already_exists if "taken" in problem else ErrorCode.invalid_argument
                raise RequestError(code, problem)
        if node.hostname != name:
            self._set_hostname(node, name)
            self.on_change()
        return {"type": "set_hostname_ok", "node_id": node.id, "hostname": node.hostname}

    def set_visibility(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        node = self._signed(msg, "node_id")
        public = get_bool(msg, "public")
        if node.public != public:
            node.public = public
            self.on_change()
        return {"type": "set_visibility_ok", "node_id": node.id,
                "visibility": "public" if public else "private"}

    def set_tags(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        node = self._signed(msg, "node_id")
        try:
            tags = normalise_tags(get_str_list(msg, "tags", 10, 64))
        except ValueError as e:
            raise RequestError(ErrorCode.invalid_argument, str(e)) from None
        if node.tags != tags:
            node.tags = tags
            self.on_change()
        return {"type": "set_tags_ok", "node_id": node.id, "tags": list(tags)}

    def set_task_exec(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        node = self._signed(msg, "node_id")
        enabled = get_bool(msg, "enabled")
        if node.task_exec != enabled:
            node.task_exec = enabled
            self.on_change()
        return {"type": "set_task_exec_ok", "node_id": node.id, "task_exec": enabled}

    def heartbeat(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        node = self._signed(msg, "node_id")
        self.touch(node)
        return {"type": "heartbeat_ok", "time": int(self.clock.seconds())}

    def deregister(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        node_id = get_int(msg, "node_id")
        node = self.state.nodes.get(node_id)
        if node is not None:
            self._authenticate(msg, node)
            self._remove(node_id)
            self.on_change()
        return {"type": "deregister_ok"}

    def rotate_key(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        node = self._signed(msg, "node_id")
        try:
            new = b64decode(msg.get("new_public_key"), 32, "new_public_key")
        except ValueError as e:
            raise RequestError(ErrorCode.invalid_argument, str(e)) from None
        holder = self.state.key_index.get(new)
        if holder is not None and holder != node.id:
            raise RequestError(ErrorCode.already_exists, "that key belongs to another node")
        self.state.key_index.pop(node.public_key, None)
        node.public_key = new
        self.state.index_key(new, node.id)
        self.touch(node)
        self.on_change()
        return {"type": "rotate_key_ok", "node_id": node.id, "address": str(node.address),
                "public_key": b64encode(new)}

    def report_trust(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        node = self._signed(msg, "node_id")
        peer_id = get_int(msg, "peer_id")
        if peer_id == node.id:
            raise RequestError(ErrorCode.invalid_argument, "a node cannot trust itself")
        if peer_id not in self.state.id_keys:
            raise RequestError(ErrorCode.not_found, f"node {peer_id} is not known")
        if (node.id, peer_id) not in self.state.trust:
            if sum(1 for a, _ in self.state.trust if a == node.id) >= MAX_TRUSTED:
                raise RequestError(ErrorCode.rate_limited, f"a node may trust at most {MAX_TRUSTED} peers")
            self.state.trust.add((node.id, peer_id))
            self.on_change()
            self._push(peer_id, {"type": "event", "event": "trust_granted", "node_id": node.id})
        return {"type": "report_trust_ok"}

    def revoke_trust(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        node = self._signed(msg, "node_id")
        peer_id = get_int(msg, "peer_id")
        edges = {(node.id, peer_id), (peer_id, node.id)} & self.state.trust
        if not edges:
            raise RequestError(ErrorCode.not_found, f"no trust between {node.id} and {peer_id}")
        self.state.trust -= edges
        self.on_change()
        self._push(peer_id, {"type": "event", "event": "trust_revoked", "node_id": node.id})
        return {"type": "revoke_trust_ok"}

    def request_handshake(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        sender = self._signed(msg, "from_node_id")
        target_id = get_int(msg, "to_node_id")
        self._need(target_id, "target node")
        if target_id == sender.id:
            raise RequestError(ErrorCode.invalid_argument, "a node cannot handshake with itself")
        justification = get_str(msg, "justification", "", max_len=MAX_JUSTIFICATION)
        inbox = self.state.inbox.setdefault(target_id, [])
        inbox[:] = [r for r in inbox if r.from_node_id != sender.id]  # a repeat replaces the pending one
        if len(inbox) >= MAX_INBOX:
            raise RequestError(ErrorCode.rate_limited, f"node {target_id} has {MAX_INBOX} pending requests")
        request = HandshakeRequest(sender.id, justification, self.clock.seconds())
        inbox.append(request)
        self.state.asked.add((sender.id, target_id))
        self.on_change()
        self._push(target_id, {"type": "event", "event": "handshake_request", **_request_json(request)})
        return {"type": "request_handshake_ok", "status": "delivered"}

    def poll_handshakes(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        node = self._signed(msg, "node_id")
        self.touch(node)
        requests = self.state.inbox.pop(node.id, [])
        responses = self.state.responses.pop(node.id, [])
        if requests or responses:
            self.on_change()
        return {"type": "poll_handshakes_ok",
                "requests": [_request_json(r) for r in requests],
                "responses": [_response_json(r) for r in responses]}

    def respond_handshake(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        node = self._signed(msg, "node_id")
        peer_id = get_int(msg, "peer_id")
        accept = get_bool(msg, "accept")
        if peer_id == node.id:
            raise RequestError(ErrorCode.invalid_argument, "a node cannot answer itself")
        if peer_id not in self.state.id_keys:
            raise RequestError(ErrorCode.not_found, f"node {peer_id} is not known")
        inbox = self.state.inbox.get(node.id, [])
        if any(r.from_node_id == peer_id for r in inbox):
            self.state.inbox[node.id] = [r for r in inbox if r.from_node_id != peer_id]
        # polled or not, the requester's signed request stays its consent until answered
        asked = (peer_id, node.id) in self.state.asked
        self.state.asked.discard((peer_id, node.id))
        if accept:
            self.state.trust.add((node.id, peer_id))
            if asked:
                # the requester's signed request is its consent to trust us back
                self.state.trust.add((peer_id, node.id))
        queue = self.state.responses.setdefault(peer_id, [])
        response = HandshakeResponse(node.id, accept, self.clock.seconds())
        if not any(r.from_node_id == node.id and r.accept == accept for r in queue):
            queue.append(response)
            del queue[:-MAX_RESPONSES]
        self.on_change()
        self._push(peer_id, {"type": "event", "event": "handshake_response", **_response_json(response)})
        return {"type": "respond_handshake_ok", "accept": accept, "peer_id": peer_id}

    def punch(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        requester = self._signed(msg, "requester_id")
        a = self._need(get_int(msg, "node_a"))
        b = self._need(get_int(msg, "node_b"))
        if requester.id not in (a.id, b.id):
            raise RequestError(ErrorCode.invalid_argument, "the requester must be one of the two nodes")
        other = b if requester.id == a.id else a
        if not self.may_see(requester.id, other):
            raise RequestError(ErrorCode.not_trusted,
                               f"node {other.id} is private and does not trust node {requester.id}")
        return {"type": "punch_ok", "node_a": a.id, "node_a_addr": a.real_addr,
                "node_b": b.id, "node_b_addr": b.real_addr}

    def list_nodes(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        network = get_int(msg, "network_id", 16, default=0)
        if network == 0:
            raise RequestError(ErrorCode.invalid_argument, "listing backbone nodes is not permitted")
        raise RequestError(ErrorCode.not_found, f"network {network} does not exist")

    def list_networks(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        return {"type": "list_networks_ok", "networks": [
            {"id": 0, "name": "backbone", "members": len(self.state.nodes), "join_rule": "open"}]}

    def _score_reply(self, kind: str, node: Node) -> dict[str, Any]:
        return {"type": kind, "node_id": node.id, "address": str(node.address), "polo_score": node.polo_score}

    def get_polo_score(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        return self._score_reply("get_polo_score_ok", self._need(get_int(msg, "node_id")))

    def _score_change_allowed(self, msg: dict[str, Any], target: Node) -> None:
        # The reference takes score changes unsigned; a proven node's score
        # moves only for a request signed (replay-proof) by a registered node.
        if "auth" in msg or target.id in self.state.proven:
            signer = self._need(get_int(msg, "requester_id"), "requester")
            if "auth" not in msg:
                raise RequestError(ErrorCode.unauthorized, "changing this node's score needs a signed request")
            self._authenticate(msg, signer)

    def update_polo_score(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        node = self._need(get_int(msg, "node_id"))
        delta = msg.get("delta")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not -1e6 <= delta <= 1e6:
            raise RequestError(ErrorCode.invalid_argument, "'delta' must be a number")
        self._score_change_allowed(msg, node)
        node.polo_score = max(-(1 << 31), min((1 << 31) - 1, node.polo_score + int(delta)))
        self.on_change()
        return self._score_reply("update_polo_score_ok", node)

    def set_polo_score(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        node = self._need(get_int(msg, "node_id"))
        score = msg.get("polo_score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not -(1 << 31) <= score < 1 << 31:
            raise RequestError(ErrorCode.invalid_argument, "'polo_score' must be a number")
        self._score_change_allowed(msg, node)
        node.polo_score = int(score)
        self.on_change()
        return self._score_reply("set_polo_score_ok", node)

    def networks_wip(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        raise RequestError(ErrorCode.invalid_argument, "custom networks are WIP")

    def beacon_register(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        beacon_id = get_int(msg, "beacon_id")
        if beacon_id == 0:
            raise RequestError(ErrorCode.invalid_argument, "beacon_id must not be 0")
        addr = get_str(msg, "addr", max_len=128)
        now = self.clock.seconds()
        for bid in [b for b, (_, t) in self.beacons.items() if now - t > BEACON_TTL]:
            del self.beacons[bid]
        if len(self.beacons) >= 1024 and beacon_id not in self.beacons:
            raise RequestError(ErrorCode.rate_limited, "too many beacons")
        self.beacons[beacon_id] = (addr, self.clock.seconds())
        return {"type": "beacon_register_ok", "beacon_id": beacon_id}

    def beacon_list(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        now = self.clock.seconds()
        return {"type": "beacon_list_ok", "beacons": [
            {"id": b, "addr": a} for b, (a, t) in sorted(self.beacons.items()) if now - t <= BEACON_TTL]}

    def subscribe_replication(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        raise RequestError(ErrorCode.invalid_argument, "replication not configured")

    def subscribe_events(self, msg: dict[str, Any], peer: Peer, session: Session | None) -> dict[str, Any]:
        """Ours: push handshake and trust events to this connection (auth required)."""
        node_id = get_int(msg, "node_id")
        node = self._need(node_id)
        if "auth" not in msg:
            raise RequestError(ErrorCode.unauthorized, "subscribe_events needs an 'auth' signature")
        self._authenticate(msg, node)
        if session is None:
            raise RequestError(ErrorCode.invalid_argument, "events need a connection")
        self.subscribers.setdefault(node_id, set()).add(session)
        return {"type": "subscribe_events_ok", "node_id": node_id,
                "pending_requests": len(self.state.inbox.get(node_id, ())),
                "pending_responses": len(self.state.responses.get(node_id, ()))}


def _request_json(r: HandshakeRequest) -> dict[str, Any]:
    return {"from_node_id": r.from_node_id, "justification": r.justification, "timestamp": int(r.timestamp)}


def _response_json(r: HandshakeResponse) -> dict[str, Any]:
    return {"from_node_id": r.from_node_id, "accept": r.accept, "timestamp": int(r.timestamp)}


_HANDLERS: dict[str, Callable[[Registry, dict[str, Any], Peer, Session | None], dict[str, Any]]] = {
    name: getattr(Registry, name) for name in (
        "register", "lookup", "resolve", "resolve_hostname", "set_hostname", "set_visibility",
        "set_tags", "set_task_exec", "heartbeat", "deregister", "rotate_key", "report_trust",
        "revoke_trust", "request_handshake", "poll_handshakes", "respond_handshake", "punch",
        "list_nodes", "list_networks", "get_polo_score", "update_polo_score", "set_polo_score",
        "beacon_register", "beacon_list", "subscribe_replication", "subscribe_events")
}
_HANDLERS.update({name: Registry.networks_wip for name in ("create_network", "join_network", "leave_network")})

