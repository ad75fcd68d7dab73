# -*- test-case-name: tests.wire.test_replication -*-
"""
The replication stream between a primary registry and its standbys: message
values, their JSON, and the store diffs our standbys receive.  Pure: no
sockets, no clock (``docs/deploy.md`` has the whole story, and
``docs/reference-wire.md`` 2.11 the reference's part of it).

Frames use the registry's framing (``pilot.wire.registry``: 4-byte length,
one JSON object).  What the reference sends and reads:

* standby -> primary ``{"type":"subscribe_replication","token":T}``;
* primary -> standby ``{"type":"replication_snapshot","snapshot":STORE}``
  (``STORE``: the store object of 2.9) at subscription and after every
  flushed change, and ``{"type":"heartbeat"}`` every 15 s.

Ours add fields the reference ignores.  A subscription of ours says
``"deltas": true`` and may give its ``term``, the ``heartbeat`` interval it
wants, its ``role`` (``"standby"``, or ``"primary"`` for a promoted server
probing its former primary) and the ``port`` its registry listens on.  Such a
subscriber gets one snapshot, then ``{"type":"replication_delta","seq":N,
...}`` frames numbered from the snapshot's ``seq``; a gap makes the standby
close and subscribe again, for a new snapshot.  A delta holds either
``"changes":{...}`` (:func:`diff`, :func:`apply`: what the first version of
our primaries sends) or, to a subscriber that said ``"records": true``,
``"record":{...}``: what changed as a record of the store's journal
(``pilot.server.journal``: ``set``/``del`` keys of the store's objects,
``add``/``drop`` items of its lists), with ``"scalars":{...}`` for the
store's top-level numbers that changed (``pilot_journal_seq``,
``pilot_term``).  A primary sends records only to subscribers that asked;
to one of ours that did not, it pushes numbered snapshots instead.  A
standby acknowledges what it holds with ``{"type":"replication_ack","seq":N}``
(``--sync-replication`` waits for these).  Every frame of a paired server
carries ``"term"``.
"""

from __future__ import annotations

import json
from typing import Any, Union

import attr

from pilot.errors import MalformedFrame

SUBSCRIBE = "subscribe_replication"
SNAPSHOT = "replication_snapshot"
DELTA = "replication_delta"
HEARTBEAT = "heartbeat"
ACK = "replication_ack"
PROMOTE = "replication_promote"

#: A replication frame may hold a whole store: far more than a request (the reference's
#: 1 MiB limit caps what a reference standby can follow; ours take this much).
MAX_REPLICATION_FRAME = 256 * 1024 * 1024
#: Longest token we compare (a token is a shared secret, not a document).
MAX_TOKEN = 4096
#: Highest term or sequence number we take (JSON numbers beyond 2^53 lose precision).
MAX_COUNTER = (1 << 53) - 1
#: The store's top-level keys that a delta must never touch wholesale.
NODES = "nodes"


@attr.s(auto_attribs=True, frozen=True)
class Subscribe:
    token: str
    deltas: bool = False
    term: int = 0
    #: seconds between heartbeats the subscriber asks for (0: the reference's 15 s)
    heartbeat: float = 0.0
    role: str = "standby"
    #: the subscriber's registry port (0: unknown), to find it again as a primary
    port: int = 0
    #: it takes deltas as the store journal's records (``record``), not only as ``changes``
    records: bool = False


@attr.s(auto_attribs=True, frozen=True)
class Snapshot:
    store: dict[str, Any]
    term: int = 0
    seq: int = 0


@attr.s(auto_attribs=True, frozen=True)
class Delta:
    seq: int
    #: a :func:`diff` (``record`` is None), or nothing
    changes: dict[str, Any]
    term: int = 0
    #: or what changed as a store journal record (``pilot.server.journal``: set, del, add, drop)
    record: dict[str, Any] | None = None
    #: the store's top-level numbers that changed with it (``pilot_journal_seq``, ``pilot_term``)
    scalars: dict[str, int] = attr.Factory(dict)


@attr.s(auto_attribs=True, frozen=True)
class Heartbeat:
    term: int = 0
    seq: int = 0


@attr.s(auto_attribs=True, frozen=True)
class Ack:
    seq: int


@attr.s(auto_attribs=True, frozen=True)
class Refused:
    """An error reply to a subscription (or a probe): why, its code, and where the primary is."""

    error: str
    code: str = ""
    primary: str = ""
    term: int = 0


@attr.s(auto_attribs=True, frozen=True)
class Accepted:
    """The primary's reply to a subscription or an acknowledgement of ours (nothing to apply)."""

    term: int = 0


Frame = Union[Snapshot, Delta, Heartbeat, Refused, Accepted]


def _counter(msg: dict[str, Any], key: str) -> int:
    value = msg.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNTER:
        raise MalformedFrame(f"{key!r} must be a whole number from 0 to 2^53")
    return value


def _text(msg: dict[str, Any], key: str, limit: int, default: str = "") -> str:
    value = msg.get(key, default)
    if not isinstance(value, str) or len(value) > limit:
        raise MalformedFrame(f"{key!r} must be a string of at most {limit} characters")
    return value


def decode_subscribe(msg: dict[str, Any]) -> Subscribe:
    """A ``subscribe_replication`` request (:class:`MalformedFrame` if a field is wrong)."""
    heartbeat = msg.get("heartbeat", 0)
    if isinstance(heartbeat, bool) or not isinstance(heartbeat, (int, float)) or not 0 <= heartbeat <= 3600:
        raise MalformedFrame("'heartbeat' must be a number of seconds from 0 to 3600")
    role = _text(msg, "role", 16, "standby")
    if role not in ("standby", "primary"):
        raise MalformedFrame("'role' must be 'standby' or 'primary'")
    port = _counter(msg, "port")
    if port > 65535:
        raise MalformedFrame("'port' must be a port number")
    return Subscribe(token=_text(msg, "token", MAX_TOKEN), deltas=msg.get("deltas") is True,
                     term=_counter(msg, "term"), heartbeat=float(heartbeat), role=role, port=port,
                     records=msg.get("deltas") is True and msg.get("records") is True)


def encode_subscribe(sub: Subscribe) -> dict[str, Any]:
    out: dict[str, Any] = {"type": SUBSCRIBE, "token": sub.token}
    if sub.deltas:
        out.update(deltas=True, term=sub.term, heartbeat=sub.heartbeat, role=sub.role, port=sub.port)
        if sub.records:
            out["records"] = True
    return out


def decode(msg: dict[str, Any]) -> Frame:
    """A frame the primary sent to a subscriber; :class:`MalformedFrame` for anything else."""
    kind = msg.get("type")
    term = _counter(msg, "term")
    if kind == SNAPSHOT:
        store = msg.get("snapshot")
        if not isinstance(store, dict) or not isinstance(store.get(NODES, {}), dict):
            raise MalformedFrame("a snapshot must hold a store object")
        return Snapshot(store, term, _counter(msg, "seq"))
    if kind == DELTA and "record" in msg:
        record = _record(msg.get("record"))
        return Delta(_counter(msg, "seq"), {}, term, record, _scalars(msg.get("scalars", {})))
    if kind == DELTA:
        changes = msg.get("changes")
        if not isinstance(changes, dict):
            raise MalformedFrame("a delta must hold a 'changes' object")
        _check_changes(changes)
        return Delta(_counter(msg, "seq"), changes, term)
    if kind == HEARTBEAT:
        return Heartbeat(term, _counter(msg, "seq"))
    if kind in (SUBSCRIBE + "_ok", ACK + "_ok"):
        return Accepted(term)
    if kind == "error":
        primary = msg.get("primary", "")
        return Refused(_text(msg, "error", 1024), _text(msg, "code", 64),
                       primary if isinstance(primary, str) and len(primary) <= 300 else "", term)
    raise MalformedFrame(f"not a replication frame: {str(kind)[:40]!r}")


def encode_snapshot_bytes(store: bytes, term: int = 0, seq: int = 0) -> bytes:
    """
    The JSON body of a snapshot frame around the store's own bytes (not parsed
    again: at 10,000 nodes the store is megabytes).  Without a term and a
    sequence number it is exactly the reference's frame.
    """
    extra = b""
    if term:
        extra += b',"term":%d' % term
    if seq:
        extra += b',"seq":%d' % seq
    return b'{"type":"' + SNAPSHOT.encode() + b'"' + extra + b',"snapshot":' + store + b"}"


def encode_delta(delta: Delta) -> dict[str, Any]:
    out: dict[str, Any] = {"type": DELTA, "seq": delta.seq}
    if delta.record is not None:
        out["record"] = delta.record
        if delta.scalars:
            out["scalars"] = delta.scalars
    else:
        out["changes"] = delta.changes
    if delta.term:
        out["term"] = delta.term
    return out


#: a record's parts (``pilot.server.journal``: keys of the store's objects, items of its lists)
RECORD_PARTS = {"set": dict, "del": dict, "add": dict, "drop": dict}
#: the store's top-level numbers a record-form delta may carry
SCALARS = ("pilot_journal_seq", "pilot_term")


def _record(record: Any) -> dict[str, Any]:
    """A record-form delta's ``record``, checked for shape (the standby's journal replay checks the rest)."""
    if not isinstance(record, dict) or not all(isinstance(record.get(part, {}), kind)
                                               for part, kind in RECORD_PARTS.items()) or \
            not set(record) <= set(RECORD_PARTS):
        raise MalformedFrame("a delta's 'record' must be an object of set, del, add, drop objects")
    return record


def _scalars(scalars: Any) -> dict[str, int]:
    if not isinstance(scalars, dict) or not set(scalars) <= set(SCALARS):
        raise MalformedFrame(f"a delta's 'scalars' must be an object of {', '.join(SCALARS)}")
    return {key: _counter(scalars, key) for key in scalars}


def encode_heartbeat(term: int = 0, seq: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"type": HEARTBEAT}
    if term:
        out["term"] = term
    if seq:
        out["seq"] = seq
    return out


def encode_ack(seq: int) -> dict[str, Any]:
    return {"type": ACK, "seq": seq}


def decode_ack(msg: dict[str, Any]) -> Ack:
    return Ack(_counter(msg, "seq"))


# --- store diffs ------------------------------------------------------------------------

#: The store's network objects list their members: for the backbone (the only network in
#: this version) that is every node id, derived from ``nodes``, and not sent in deltas.
NETWORKS = "networks"
BACKBONE = "0"


def _without_members(networks: Any) -> Any:
    if not isinstance(networks, dict) or not isinstance(networks.get(BACKBONE), dict):
        return networks
    backbone = {k: v for k, v in networks[BACKBONE].items() if k != "members"}
    return {**networks, BACKBONE: backbone}


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """
    What turns the store object ``old`` into ``new``: ``nodes`` (changed or new
    node objects by id) and ``gone`` (removed node ids); ``maps`` (for other
    top-level objects present in both, ``{name: {"set": {...}, "del": [...]}}``
    by key: a new key costs its entry, not the 10,000 of ``pub_key_idx``);
    ``set`` (other top-level keys whose value changed, whole) and ``unset``
    (top-level keys removed).  The backbone's member list is left out (it is
    the node ids; :func:`apply` derives it).  Empty when they are equal.
    """
    out: dict[str, Any] = {}
    old_nodes, new_nodes = old.get(NODES, {}), new.get(NODES, {})
    changed = {k: v for k, v in new_nodes.items() if old_nodes.get(k) != v}
    gone = sorted(k for k in old_nodes if k not in new_nodes)
    sets: dict[str, Any] = {}
    maps: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if key == NODES or before == value:
            continue
        if key == NETWORKS and _without_members(before) == _without_members(value):
            continue
        if isinstance(value, dict) and isinstance(before, dict) and key != NETWORKS:
            section: dict[str, Any] = {}
            updated = {k: v for k, v in value.items() if before.get(k) != v}
            removed = sorted(k for k in before if k not in value)
            if updated:
                section["set"] = updated
            if removed:
                section["del"] = removed
            maps[key] = section
        else:
            sets[key] = _without_members(value) if key == NETWORKS else value
    unset = sorted(k for k in old if k != NODES and k not in new)
    for key, part in (("nodes", changed), ("gone", gone), ("maps", maps), ("set", sets), ("unset", unset)):
        if part:
            out[key] = part
    return out


def _check_changes(changes: dict[str, Any]) -> None:
    kinds = {"nodes": dict, "gone": list, "maps": dict, "set": dict, "unset": list}
    for key, value in changes.items():
        kind = kinds.get(key)
        if kind is None or not isinstance(value, kind):
            raise MalformedFrame(f"a delta's {str(key)[:20]!r} is not one of nodes, gone, maps, set, unset")
    if not all(isinstance(k, str) for k in changes.get("gone", [])) or \
            not all(isinstance(k, str) and k != NODES for k in changes.get("unset", [])) or \
            NODES in changes.get("set", {}) or NODES in changes.get("maps", {}):
        raise MalformedFrame("a delta's 'gone' and 'unset' must be lists of keys, not 'nodes'")
    for name, section in changes.get("maps", {}).items():
        if not isinstance(section, dict) or not set(section) <= {"set", "del"} or \
                not isinstance(section.get("set", {}), dict) or not isinstance(section.get("del", []), list) or \
                not all(isinstance(k, str) for k in section.get("del", [])):
            raise MalformedFrame(f"a delta's maps[{str(name)[:20]!r}] must be {{set: object, del: [keys]}}")


def apply(store: dict[str, Any], changes: dict[str, Any]) -> None:
    """Apply :func:`diff`'s ``changes`` to ``store`` in place (checked by :func:`decode`)."""
    nodes = store.setdefault(NODES, {})
    nodes.update(changes.get("nodes", {}))
    for key in changes.get("gone", ()):
        nodes.pop(key, None)
    for name, section in changes.get("maps", {}).items():
        current = store.get(name)
        current = dict(current) if isinstance(current, dict) else {}
        current.update(section.get("set", {}))
        for key in section.get("del", ()):
            current.pop(key, None)
        store[name] = current
    store.update(changes.get("set", {}))
    for key in changes.get("unset", ()):
        store.pop(key, None)
    networks = store.get(NETWORKS)
    if isinstance(networks, dict) and isinstance(networks.get(BACKBONE), dict) and \
            ("nodes" in changes or "gone" in changes or NETWORKS in changes.get("set", {})):
        backbone = dict(networks[BACKBONE])
        backbone["members"] = sorted(int(k) for k in nodes if k.isdigit())
        store[NETWORKS] = {**networks, BACKBONE: backbone}


def encode_body(message: dict[str, Any]) -> bytes:
    """A message's JSON body, of any size (``pilot.wire.registry.encode_frame`` caps requests at 1 MiB)."""
    return json.dumps(message, separators=(",", ":")).encode("ascii")


def store_object(data: bytes) -> dict[str, Any]:
    """The store object of the store's bytes (our own, trusted)."""
    value: dict[str, Any] = json.loads(data)
    return value
