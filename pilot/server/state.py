# -*- test-case-name: tests.server.test_state -*-
"""
The registry's state, and its JSON store format.

The store file is the reference's (docs/reference-wire.md §2.9), so a reference store loads
and a reference reader can read ours; what the reference has no place for is
in extra keys it ignores:

* ``trust_edges``: directed trust, ``"A>B"`` = node A trusts node B.  The
  reference keeps undirected pairs, which lets either side alone open the
  other's endpoint; ``trust_pairs`` is still written (the mutual pairs) and a
  reference store's pairs load as trust both ways.
* ``proven``: node ids whose key has signed a replay-proof request; their
  endpoint can no longer be moved by an unsigned ``register``.
* ``trust_statements``: each node's signed trust statements
  (``pilot.server.statements``), ``{"<node id>": ["pilot-trust/1 ...", ...]}``.
* ``auth_ts``: node id -> the newest ``auth.ts`` (Unix ms) the registry accepted
  from that node's key, or the newest timestamp of a beacon proof of it.
  The nonce memory is not saved; after a restart a request (or proof) not
  newer than this is refused, so a captured one cannot be replayed across a
  restart (``docs/security.md``).
* ``keys_gone``: node id -> when (Unix seconds) its node was deregistered or
  reaped while its key stayed indexed (so that it keeps its id if it comes
  back).  After the registry's ``key_retention`` the key is forgotten
  (:meth:`RegistryState.forget`).
* ``pilot_journal_seq``: with ``--durable``, the number of the last journal
  record this file holds (``pilot.server.journal``).
* ``pilot_term``: the replication term of a paired registry (``docs/deploy.md``,
  ``pilot.server.replication``); absent for a registry that never had a pair.

With ``--durable`` the journal tracks the containers a record is made from
(``pilot.server.tracked``): change them in place, never replace them (a
replaced one costs a full snapshot).  A :class:`Node`'s fields are assigned,
never mutated in place; assigning one puts the node's id in its
``journal_sink`` (the journal's set of changed nodes, when one tracks it).
"""

from __future__ import annotations

import itertools
import json
import math
import operator
from typing import Any

import attr

from pilot.errors import MalformedFrame
from pilot.identity import b64decode, b64encode
from pilot.server.fields import (
    checked_id, get_field, id_text, list_of_dicts, opt_field, split_ids, stamp_text, strict_b64,
)
from pilot.server.inbox import HandshakeRequest, HandshakeResponse
from pilot.server.node import Node, address_text  # noqa: F401 (address_text: part of this module's API)
from pilot.server.times import (  # noqa: F401 (parse_time_ns, rfc3339_ns: part of this module's API)
    MAX_TIME, StoreFormatError, parse_time_cached, rfc3339_second, parse_time, parse_time_ns, rfc3339,
    rfc3339_ns,
)
from pilot.wire.statement import TrustStatement, decode as decode_statement

STORE_FORMAT = 1
_NO_NODES = '"nodes":{}'


_hostname = operator.attrgetter("hostname")
_public_key = operator.attrgetter("public_key")
_last_seen = operator.attrgetter("last_seen")
_journal_sink = operator.attrgetter("journal_sink")
_set_last_seen = Node.__dict__["last_seen"].__set__  # the slot itself: no assignment hook


@attr.s(slots=True, auto_attribs=True, eq=False)
class RegistryState:
    """Everything the registry persists.  Plain data; the logic is in ``registry.py``."""

    nodes: dict[int, Node] = attr.Factory(dict)
    key_index: dict[bytes, int] = attr.Factory(dict)
    trust: set[tuple[int, int]] = attr.Factory(set)
    proven: set[int] = attr.Factory(set)
    #: (requester, target) of signed handshake requests not answered yet: the
    #: requester's consent to trust the target once it accepts
    asked: set[tuple[int, int]] = attr.Factory(set)
    inbox: dict[int, list[HandshakeRequest]] = attr.Factory(dict)
    responses: dict[int, list[HandshakeResponse]] = attr.Factory(dict)
    created: float = 0.0
    hostnames: dict[str, int] = attr.Factory(dict)
    id_keys: dict[int, bytes] = attr.Factory(dict)
    #: granter -> peer -> the newest signed statement (ours; outlives the granter's registration)
    statements: dict[int, dict[int, TrustStatement]] = attr.Factory(dict)
    #: node id -> newest accepted ``auth.ts`` (ms) of its key
    auth_ts: dict[int, int] = attr.Factory(dict)
    #: node id -> when its node left, for keys still indexed without a node
    gone: dict[int, float] = attr.Factory(dict)
    #: the last journal record the store file holds (``--durable``)
    journal_seq: int = 0
    #: the replication term (0: never part of a pair)
    term: int = 0
    _key_text: dict[bytes, str] = attr.ib(factory=dict, init=False, repr=False)
    _node_text: dict[int, tuple[tuple[Any, ...], str]] = attr.ib(factory=dict, init=False, repr=False)

    def key_text(self, key: bytes) -> str:
        """The base64 text of ``key``, made once while the key is indexed (replies and writes need it)."""
        text = self._key_text.get(key)
        if text is None:
            text = self._key_text[key] = b64encode(key)
        return text

    def drop_key_text(self, key: bytes) -> None:
        """Forget the base64 kept for ``key`` (no longer indexed)."""
        self._key_text.pop(key, None)

    def index_key(self, key: bytes, node_id: int) -> None:
        old = self.id_keys.get(node_id)
        if old is not None and old != key:
            self.key_index.pop(old, None)
            self._key_text.pop(old, None)
        self.key_index[key] = node_id
        self.id_keys[node_id] = key

    def forget(self, node_id: int) -> None:
        """Drop everything kept for ``node_id`` whose node is gone: its key, replay state and trust."""
        key = self.id_keys.pop(node_id, None)
        if key is not None and self.key_index.get(key) == node_id:
            del self.key_index[key]
            self._key_text.pop(key, None)
        self.gone.pop(node_id, None)
        self.auth_ts.pop(node_id, None)
        self.proven.discard(node_id)
        # in place: the containers are tracked for the journal
        self.trust.difference_update([(a, b) for a, b in self.trust if node_id in (a, b)])
        self.asked.difference_update([(a, b) for a, b in self.asked if node_id in (a, b)])
        self.inbox.pop(node_id, None)
        self.responses.pop(node_id, None)
        self.statements.pop(node_id, None)  # its own signed statements go with its key

    def rebuild_indexes(self) -> None:
        """
        The hostname and key indexes from the nodes, in passes over columns
        of them (a store may hold 100,000): every node's key indexed unless
        the key is already (the first node keeps a key two share), every
        hostname to its node (a name two share, which only a damaged store
        holds: the lowest id keeps it, the others lose it).
        """
        nodes = list(self.nodes.values())
        ids = list(self.nodes)
        names = list(map(_hostname, nodes))
        keys = list(map(_public_key, nodes))
        key_index = self.key_index
        if not keys or (len(set(keys)) == len(keys) and not set(keys) - key_index.keys()):
            pass  # the usual case: every node's key is in the store's key index already
        else:
            for node_id, key in zip(ids, keys):
                key_index.setdefault(key, node_id)
        hostnames = dict(zip(names, ids))
        named = len(names) - names.count("")
        hostnames.pop("", None)
        if len(hostnames) != named:
            hostnames = self._settle_hostnames(nodes)
        self.hostnames = hostnames
        id_keys = dict(zip(key_index.values(), key_index.keys()))
        id_keys.update(zip(ids, keys))
        self.id_keys = id_keys

    def floor_last_seen(self, now: float) -> None:
        """Every node's ``last_seen`` moved up to ``now`` (a start): a pass over columns, not a loop."""
        nodes = list(self.nodes.values())
        if list(map(_journal_sink, nodes)).count(None) != len(nodes):  # tracked: through the hook
            for node in nodes:
                node.last_seen = max(node.last_seen, now)
            return
        list(map(_set_last_seen, nodes, map(max, map(_last_seen, nodes), itertools.repeat(now))))

    def _settle_hostnames(self, nodes: list[Node]) -> dict[str, int]:
        """The hostname index of a store where two nodes share a name: the lowest id keeps it."""
        hostnames: dict[str, int] = {}
        taken: list[Node] = []
        for node in nodes:
            name = node.hostname
            if name and hostnames.setdefault(name, node.id) != node.id:
                taken.append(node)
        for node in sorted(taken, key=lambda n: n.id):
            holder = hostnames[node.hostname]
            if node.id < holder:
                self.nodes[holder].hostname = ""
                hostnames[node.hostname] = node.id
            else:
                node.hostname = ""
        return hostnames

    # --- JSON -----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """
        The store as compact JSON, exactly ``dump_json(to_json(), pretty=False)``,
        but reusing the text of every node unchanged since the last call: with
        ``--durable`` the store is written many times a second.
        """
        out = self.to_json(nodes=False)
        cache, keys, fresh = self._node_text, self._key_text, {}
        parts = []
        for node_id in sorted(self.nodes):
            n = self.nodes[node_id]
            mark = (n.public_key, n.real_addr, math.floor(n.last_seen), n.hostname, tuple(n.tags), n.public,
                    n.owner, n.polo_score, n.task_exec, tuple(n.networks), n.local_addr)
            hit = cache.get(node_id)
            text = hit[1] if hit is not None and hit[0] == mark else \
                json.dumps(node_json(n, keys[n.public_key]), separators=(",", ":"))
            fresh[node_id] = (mark, text)
            parts.append(f'"{node_id}":{text}')
        self._node_text = fresh
        head = json.dumps(out, separators=(",", ":"))
        at = head.index(_NO_NODES)  # the third key, before any text a node chose
        return (head[:at] + '"nodes":{' + ",".join(parts) + "}" + head[at + len(_NO_NODES):]).encode("utf-8")

    def to_json(self, nodes: bool = True) -> dict[str, Any]:
        # the base64 of every key, kept between writes: a store is written often (--durable)
        old, keys = self._key_text, {}
        for key in self.key_index:
            keys[key] = old.get(key) or b64encode(key)
        for node in self.nodes.values():
            keys[node.public_key] = old.get(node.public_key) or b64encode(node.public_key)
        self._key_text = keys
        out: dict[str, Any] = {
            "next_node": max([0, *self.id_keys]) + 1,
            "next_net": 1,
            "nodes": {str(n.id): node_json(n, keys[n.public_key])
                      for n in sorted(self.nodes.values(), key=lambda n: n.id)} if nodes else {},
            "networks": {"0": {"id": 0, "name": "backbone", "join_rule": "open",
                               "members": sorted(self.nodes), "created": rfc3339(self.created)}},
        }
        pairs = sorted({(min(a, b), max(a, b)) for a, b in self.trust if (b, a) in self.trust})
        if pairs:
            out["trust_pairs"] = [f"{a}:{b}" for a, b in pairs]
        if self.key_index:
            out["pub_key_idx"] = {keys[k]: v for k, v in sorted(self.key_index.items(), key=lambda kv: kv[1])}
        inbox = {str(t): inbox_json(reqs) for t, reqs in sorted(self.inbox.items()) if reqs}
        if inbox:
            out["handshake_inbox"] = inbox
        responses = {str(t): responses_json(rs) for t, rs in sorted(self.responses.items()) if rs}
        if responses:
            out["handshake_responses"] = responses
        if self.trust:
            out["trust_edges"] = [f"{a}>{b}" for a, b in sorted(self.trust)]
        if self.proven:
            out["proven"] = sorted(self.proven)
        if self.gone:
            out["keys_gone"] = {str(k): int(v) for k, v in sorted(self.gone.items())}
        if self.auth_ts:
            out["auth_ts"] = {str(k): v for k, v in sorted(self.auth_ts.items())}
        if self.asked:
            out["handshake_asked"] = [f"{a}>{b}" for a, b in sorted(self.asked)]
        if self.statements:
            out["trust_statements"] = {str(g): [s.encode() for _, s in sorted(kept.items())]
                                       for g, kept in sorted(self.statements.items()) if kept}
        if self.journal_seq:
            out["pilot_journal_seq"] = self.journal_seq
        if self.term:
            out["pilot_term"] = self.term
        out["pilot_store_format"] = STORE_FORMAT
        return out

    @classmethod
    def from_json(cls, value: Any) -> "RegistryState":
        if not isinstance(value, dict):
            raise StoreFormatError("the store is not a JSON object")
        state = cls()
        nodes = get_field(value, "nodes", dict, {})
        decoded: dict[str, bytes] = {}
        for key, raw in nodes.items():
            node = _well_formed_node(raw, decoded) or _node_from_json(raw, f"nodes[{key!r}]", decoded)
            if str(node.id) != key:
                raise StoreFormatError(f"nodes[{key!r}] has id {node.id}")
            state.nodes[node.id] = node
        for key_b64, node_id in get_field(value, "pub_key_idx", dict, {}).items():
            public_key = decoded.get(key_b64)
            if public_key is not None and type(node_id) is int and 0 <= node_id <= 0xFFFFFFFF:
                state.key_index[public_key] = node_id  # the usual case, checked in line
                continue
            if public_key is None:
                try:
                    public_key = b64decode(key_b64, 32, "key")
                except ValueError as e:
                    raise StoreFormatError(f"pub_key_idx: {e}") from None
            state.key_index[public_key] = checked_id(node_id, f"pub_key_idx[{key_b64!r}]")
        for pair in get_field(value, "trust_pairs", list, []):
            a, b = split_ids(pair, ":", "trust_pairs")
            state.trust.update({(a, b), (b, a)})
        if "trust_edges" in value:
            # ours: directed edges are the truth, the pairs were only derived from them
            state.trust.clear()
            state.trust.update(split_ids(e, ">", "trust_edges")
                               for e in get_field(value, "trust_edges", list, []))
        state.proven.update(checked_id(i, "proven") for i in get_field(value, "proven", list, []))
        for text, when in get_field(value, "keys_gone", dict, {}).items():
            if isinstance(when, bool) or not isinstance(when, int) or not 0 <= when <= MAX_TIME:
                raise StoreFormatError(f"keys_gone[{text!r}]: {when!r} is not Unix seconds")
            state.gone[checked_id(id_text(text, "keys_gone"), "keys_gone")] = float(when)
        for text, ms in get_field(value, "auth_ts", dict, {}).items():
            if isinstance(ms, bool) or not isinstance(ms, int) or not 0 <= ms < 1 << 53:
                raise StoreFormatError(f"auth_ts[{text!r}]: {ms!r} is not Unix milliseconds")
            state.auth_ts[checked_id(id_text(text, "auth_ts"), "auth_ts")] = ms
        state.asked.update(split_ids(e, ">", "handshake_asked")
                           for e in get_field(value, "handshake_asked", list, []))
        for target, reqs in get_field(value, "handshake_inbox", dict, {}).items():
            tid = checked_id(id_text(target, "handshake_inbox"), "handshake_inbox")
            state.inbox[tid] = [
                HandshakeRequest(checked_id(get_field(r, "from_node_id", int), "from_node_id"),
                                 get_field(r, "justification", str, ""), parse_time(r.get("timestamp")),
                                 stamp_text(r))
                for r in list_of_dicts(reqs, "handshake_inbox")]
        for target, rs in get_field(value, "handshake_responses", dict, {}).items():
            tid = checked_id(id_text(target, "handshake_responses"), "handshake_responses")
            state.responses[tid] = [
                HandshakeResponse(checked_id(get_field(r, "from_node_id", int), "from_node_id"),
                                  bool(get_field(r, "accept", bool, False)), parse_time(r.get("timestamp")),
                                  stamp_text(r))
                for r in list_of_dicts(rs, "handshake_responses")]
        for granter, texts in get_field(value, "trust_statements", dict, {}).items():
            gid = checked_id(id_text(granter, "trust_statements"), "trust_statements")
            if not isinstance(texts, list):
                raise StoreFormatError("trust_statements must map ids to lists of statements")
            kept = state.statements.setdefault(gid, {})
            for text in texts:
                try:
                    statement = decode_statement(text)
                except MalformedFrame as e:
                    raise StoreFormatError(f"trust_statements[{granter!r}]: {e.reason}") from None
                if statement.granter != gid:
                    raise StoreFormatError(f"trust_statements[{granter!r}] holds node {statement.granter}'s")
                kept[statement.peer] = statement
        seq = get_field(value, "pilot_journal_seq", int, 0)
        if seq < 0:
            raise StoreFormatError(f"pilot_journal_seq: {seq} is negative")
        state.journal_seq = seq
        term = get_field(value, "pilot_term", int, 0)
        if term < 0:
            raise StoreFormatError(f"pilot_term: {term} is negative")
        state.term = term
        backbone = get_field(value, "networks", dict, {}).get("0")
        if isinstance(backbone, dict):
            state.created = parse_time(backbone.get("created"))
        state.rebuild_indexes()
        return state


def inbox_json(reqs: list[HandshakeRequest]) -> list[dict[str, Any]]:
    return [{"from_node_id": r.from_node_id, "justification": r.justification, "timestamp": r.stamp_text}
            for r in reqs]


def responses_json(rs: list[HandshakeResponse]) -> list[dict[str, Any]]:
    return [{"from_node_id": r.from_node_id, "accept": r.accept, "timestamp": r.stamp_text} for r in rs]


def node_json(n: Node, key_text: str) -> dict[str, Any]:
    out: dict[str, Any] = {"id": n.id}
    if n.owner:
        out["owner"] = n.owner
    out["public_key"] = key_text
    if n.real_addr:
        out["real_addr"] = n.real_addr
    out["networks"] = list(n.networks)
    if n.public:
        out["public"] = True
    out["last_seen"] = rfc3339_second(math.floor(n.last_seen))
    if n.hostname:
        out["hostname"] = n.hostname
    if n.tags:
        out["tags"] = list(n.tags)
    if n.polo_score:
        out["polo_score"] = n.polo_score
    if n.task_exec:
        out["task_exec"] = True
    if n.local_addr:
        out["local_addr"] = n.local_addr
    return out


def _well_formed_node(raw: Any, keys: dict[str, bytes]) -> Node | None:
    """
    :func:`_node_from_json` for a node whose every field has its usual type
    and whose lists hold only what they must (what this writer and the
    reference's write), in a few calls; None for anything else, which
    ``_node_from_json`` then checks field by field and refuses or takes.
    Accepts nothing that one refuses, and makes the same node of it.
    """
    if type(raw) is not dict:
        return None
    get = raw.get
    node_id, text, last_seen = get("id"), get("public_key"), get("last_seen")
    real_addr, hostname, owner, local_addr = get("real_addr", ""), get("hostname", ""), get("owner", ""), \
        get("local_addr", "")
    tags, networks = get("tags", _NO_TAGS), get("networks", _BACKBONE)
    public, task_exec, polo_score = get("public", False), get("task_exec", False), get("polo_score", 0)
    if not (type(node_id) is int and 0 <= node_id <= 0xFFFFFFFF and type(text) is str and len(text) == 44
            and type(last_seen) is str and type(real_addr) is str and type(hostname) is str
            and type(owner) is str and type(local_addr) is str and type(public) is bool
            and type(task_exec) is bool and type(polo_score) is int and type(tags) is list
            and type(networks) is list and (not tags or all(type(t) is str for t in tags))
            and (networks == _BACKBONE and type(networks[0]) is int
                 or networks and all(type(n) is int and 0 <= n <= 0xFFFFFFFF for n in networks))):
        return None
    try:
        key = strict_b64(text)
    except (ValueError, TypeError):
        return None
    if len(key) != 32:
        return None
    keys[text] = key
    return _LoadedNode(node_id, key, real_addr, parse_time_cached(last_seen), hostname,
                       list(tags) if tags else [], public, owner, polo_score, task_exec, list(networks),
                       local_addr)


class _LoadedNode(Node):
    """
    A :class:`Node` made for the loader at twice the speed of attrs' ``__init__``
    (which sets each field through ``object.__setattr__`` calls: a quarter of a
    store's load): its fields are set by plain assignments, with no hook (no
    journal tracks a node being loaded), then the object is made a ``Node``.
    """

    __slots__ = ()
    __setattr__ = object.__setattr__

    def __init__(self, id: int, public_key: bytes, real_addr: str, last_seen: float, hostname: str,
                 tags: list[str], public: bool, owner: str, polo_score: int, task_exec: bool,
                 networks: list[int], local_addr: str) -> None:
        self.id, self.public_key, self.real_addr, self.last_seen = id, public_key, real_addr, last_seen
        self.hostname, self.tags, self.public, self.owner = hostname, tags, public, owner
        self.polo_score, self.task_exec = polo_score, task_exec
        self.networks, self.local_addr = networks, local_addr
        self.journal_sink = None
        self.__class__ = Node  # type: ignore[assignment]


def loaded_nodes(*columns: list[Any]) -> list[Node]:
    """Nodes made from columns of checked values, one per field in ``Node``'s order (a store's sidecar)."""
    return list(map(_LoadedNode, *columns))


_NO_TAGS: list[str] = []
_BACKBONE = [0]


def _node_from_json(raw: Any, where: str, keys: dict[str, bytes] | None = None) -> Node:
    """One node; ``keys`` collects base64 text -> key so the key index need not decode it again."""
    if not isinstance(raw, dict):
        raise StoreFormatError(f"{where} is not an object")
    text = raw.get("public_key")
    try:
        key = b64decode(text, 32, "public_key")
    except ValueError as e:
        raise StoreFormatError(f"{where}: {e}") from None
    if keys is not None and isinstance(text, str):
        keys[text] = key
    tags = opt_field(raw, "tags", list, [])
    if not all(isinstance(t, str) for t in tags):
        raise StoreFormatError(f"{where}.tags must be strings")
    networks = opt_field(raw, "networks", list, [0])
    last_seen = raw.get("last_seen")
    return Node(
        id=checked_id(get_field(raw, "id", int), f"{where}.id"),
        public_key=key,
        real_addr=opt_field(raw, "real_addr", str, ""),
        last_seen=parse_time_cached(last_seen) if isinstance(last_seen, str) else parse_time(last_seen),
        hostname=opt_field(raw, "hostname", str, ""),
        tags=list(tags),
        public=opt_field(raw, "public", bool, False),
        owner=opt_field(raw, "owner", str, ""),
        polo_score=opt_field(raw, "polo_score", int, 0),
        task_exec=opt_field(raw, "task_exec", bool, False),
        networks=[checked_id(x, f"{where}.networks") for x in networks] or [0],
        local_addr=opt_field(raw, "local_addr", str, ""),
    )
