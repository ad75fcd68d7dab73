# -*- test-case-name: tests.server.test_sidecar -*-
"""
The store's sidecar: what a store file written by our own writer holds, as
plain values, so that a start need not parse and check 28 MB of JSON
(100,000 nodes: ~0.3 s of CPU to parse, ~0.45 s to check and build, against
~0.3 s for all of it from the sidecar; ``docs/performance.md``, issue 16).

The store file (``registry.json``, the reference's format) stays the truth:
the sidecar (``registry.json.sidecar``) is written beside it at a clean stop,
after the store, and is used only while it still matches the store byte for
byte.  Its layout::

    b"pilot-store-sidecar/1\\n"
    32 bytes   SHA-256 of the store file it was made with
    8 bytes    that store file's size (big-endian)
    32 bytes   SHA-256 of the payload
    payload    marshal (plain values only: never pickle) of a dict

The payload holds the nodes, the key index and ``auth_ts`` as columns (a list
per field, in the store's order), and the store's other sections as the
store's own JSON values (``RegistryState.from_json`` checks those as for any
store).  :func:`decode` uses it only if the header is whole, the store's
digest and size match the store file's bytes, and the payload's digest
matches the payload; otherwise it raises :class:`SidecarError` and the
loader parses and checks the store as if there were no sidecar.

A sidecar is never trusted for its values, only for saving the parse: every
column is checked for its type and range (in C, a pass over each column:
~60 ms at 100,000 nodes) before a node is made, the same checks the store's
loader makes of the JSON, so a sidecar crafted to match a store yields either
a :class:`SidecarError` (and the full check of the store) or a state that a
store file could have held as well; never a malformed one.
"""

from __future__ import annotations

import hashlib
import marshal
import math
import struct
from itertools import chain
from operator import attrgetter
from typing import Any

from pilot.server.state import RegistryState, loaded_nodes
from pilot.server.times import MAX_TIME, StoreFormatError

MAGIC = b"pilot-store-sidecar/1\n"
_HEADER = struct.Struct(">32sQ32s")
#: the payload's version: a payload of another is not used
VERSION = 1

#: the nodes' fields in a payload's ``nodes`` columns (the order of ``Node``'s own fields)
NODE_FIELDS = ("id", "public_key", "real_addr", "last_seen", "hostname", "tags", "public", "owner",
               "polo_score", "task_exec", "networks", "local_addr")
_MAX_ID = 0xFFFFFFFF


class SidecarError(ValueError):
    """A sidecar that cannot be used (the store is then loaded as if there were none); the message says why."""


def path_of(store: str) -> str:
    """Where the sidecar of the store file ``store`` is."""
    return store + ".sidecar"


def encode(state: RegistryState, store: bytes) -> bytes:
    """
    The sidecar of ``store``, the bytes :meth:`RegistryState.to_bytes` made of
    ``state`` just now (the nodes as that file holds them: ``last_seen`` to
    the second, no empty ``networks``).
    """
    nodes = [state.nodes[i] for i in sorted(state.nodes)]
    columns: list[list[Any]] = [list(map(attrgetter(name), nodes)) for name in NODE_FIELDS]
    columns[3] = [float(math.floor(x)) for x in columns[3]]
    columns[5] = list(map(tuple, columns[5]))
    columns[10] = [tuple(x) or (0,) for x in columns[10]]
    keys = sorted(state.key_index.items(), key=lambda kv: kv[1])
    auth = sorted(state.auth_ts.items())
    rest = state.to_json(nodes=False)
    rest.pop("pub_key_idx", None)
    rest.pop("auth_ts", None)
    rest["networks"]["0"]["members"] = []
    payload = marshal.dumps({
        "version": VERSION, "nodes": columns,
        "key_index": [[k for k, _ in keys], [v for _, v in keys]],
        "auth_ts": [[k for k, _ in auth], [v for _, v in auth]],
        "rest": rest,
    })
    return MAGIC + _HEADER.pack(hashlib.sha256(store).digest(), len(store),
                                hashlib.sha256(payload).digest()) + payload


def decode(data: bytes, store: bytes) -> RegistryState:
    """
    The state the store file ``store`` holds, from its sidecar ``data``: the
    same as :meth:`RegistryState.from_json` makes of the store's JSON.
    Raises :class:`SidecarError` for a sidecar that is not of this store, is
    damaged, or holds a value the store's checks would refuse.
    """
    start = len(MAGIC) + _HEADER.size
    if len(data) < start or not data.startswith(MAGIC):
        raise SidecarError("not a sidecar, or cut short")
    store_digest, size, payload_digest = _HEADER.unpack_from(data, len(MAGIC))
    if size != len(store) or hashlib.sha256(store).digest() != store_digest:
        raise SidecarError("made with another store file (the store changed since)")
    payload = memoryview(data)[start:]
    if hashlib.sha256(payload).digest() != payload_digest:
        raise SidecarError("damaged (its digest does not match)")
    try:
        value = marshal.loads(payload)
    except (ValueError, EOFError, TypeError) as e:
        raise SidecarError(f"damaged ({e})") from None
    if type(value) is not dict or value.get("version") != VERSION:
        raise SidecarError("of another version")
    try:
        return _state(value)
    except StoreFormatError as e:
        raise SidecarError(f"holds what a store may not: {e}") from None


def _state(value: dict[str, Any]) -> RegistryState:
    columns = _columns(value.get("nodes"), len(NODE_FIELDS), "nodes")
    ids, keys, real_addrs, last_seen, hostnames, tags, public, owners, polo, task_exec, networks, local = columns
    _ids(ids, "nodes")
    if len(set(ids)) != len(ids):
        raise StoreFormatError("a node id twice")
    _typed(keys, bytes, "public_key")
    if keys and set(map(len, keys)) != {32}:
        raise StoreFormatError("a public_key is not 32 bytes")
    for column, name in ((real_addrs, "real_addr"), (hostnames, "hostname"), (owners, "owner"),
                         (local, "local_addr")):
        _typed(column, str, name)
    _typed(last_seen, float, "last_seen")
    if last_seen and not (all(map(math.isfinite, last_seen)) and min(last_seen) >= 0
                          and max(last_seen) < MAX_TIME + 1):
        raise StoreFormatError("a last_seen is not a time")
    _typed(public, bool, "public")
    _typed(task_exec, bool, "task_exec")
    _typed(polo, int, "polo_score")
    _typed(tags, tuple, "tags")
    _typed(list(chain.from_iterable(tags)), str, "tags")
    _typed(networks, tuple, "networks")
    if networks and min(map(len, networks)) < 1:
        raise StoreFormatError("empty networks")
    _ids(list(chain.from_iterable(networks)), "networks")
    key_ids, key_values = _columns(value.get("key_index"), 2, "key_index")
    _typed(key_ids, bytes, "pub_key_idx")
    if key_ids and set(map(len, key_ids)) != {32}:
        raise StoreFormatError("a pub_key_idx key is not 32 bytes")
    _ids(key_values, "pub_key_idx")
    auth_ids, auth_ms = _columns(value.get("auth_ts"), 2, "auth_ts")
    _ids(auth_ids, "auth_ts")
    _typed(auth_ms, int, "auth_ts")
    if auth_ms and not (min(auth_ms) >= 0 and max(auth_ms) < 1 << 53):
        raise StoreFormatError("an auth_ts is not Unix milliseconds")
    rest = value.get("rest")
    if type(rest) is not dict or rest.get("nodes", {}) != {} or "pub_key_idx" in rest or "auth_ts" in rest:
        raise StoreFormatError("its other sections are not a store's")
    state = RegistryState.from_json(rest)  # every other section checked as in any store
    state.nodes.update(zip(ids, loaded_nodes(ids, keys, real_addrs, last_seen, hostnames,
                                             list(map(list, tags)), public, owners, polo, task_exec,
                                             list(map(list, networks)), local)))
    state.key_index.update(zip(key_ids, key_values))
    state.auth_ts.update(zip(auth_ids, auth_ms))
    state.rebuild_indexes()
    return state


def _columns(value: Any, count: int, where: str) -> list[list[Any]]:
    if type(value) is not list or len(value) != count or set(map(type, value)) - {list}:
        raise StoreFormatError(f"{where}: not {count} columns")
    if len(set(map(len, value))) > 1:
        raise StoreFormatError(f"{where}: columns of different lengths")
    return value


def _typed(column: list[Any], typ: type, where: str) -> None:
    if set(map(type, column)) - {typ}:
        raise StoreFormatError(f"a {where} is not {typ.__name__}")


def _ids(column: list[Any], where: str) -> None:
    _typed(column, int, where)
    if column and not (min(column) >= 0 and max(column) <= _MAX_ID):
        raise StoreFormatError(f"{where}: not a node id")
