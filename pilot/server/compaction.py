# -*- test-case-name: tests.server.test_compaction -*-
"""
The store file rebuilt from the journal's records, off the reactor.

The journal (``pilot.server.journal``) keeps a write small: a record holds
what changed.  Now and then the store file must hold everything again, so
that the journal can be emptied; making that file from the live
:class:`RegistryState` costs the reactor the whole store (about 80 ms at
10,000 nodes, during which nothing is answered).  A :class:`StoreMirror`
makes it in the store's writer thread instead, from

* a :class:`StateView`: the state's content when tracking began, copied in
  the reactor (a tuple per node and a copy of each container, a few ms at
  10,000 nodes; nothing is formatted there), and
* every record made since, applied in order (:meth:`StoreMirror.apply`).

It keeps each node, key and id as its JSON text, so applying a record costs
what the record holds, and :meth:`StoreMirror.render` only sorts and joins:
its output is what :meth:`RegistryState.to_bytes` would give for the same
state (the reference's format, ``docs/reference-wire.md`` §2.9; the tests
compare the two byte for byte).  Every step is short Python, so the
interpreter switches to the reactor thread every few milliseconds while the
mirror works.

The mirror belongs to the writer thread once the view is taken: the reactor
only hands it records (plain data made for it, never changed afterwards).
"""

from __future__ import annotations

import json
import operator
from typing import Any

import attr

from pilot.identity import b64encode
from pilot.server.journal import LISTS, MAPS, JournalError
from pilot.server.state import (
    STORE_FORMAT, Node, RegistryState, inbox_json, node_json, responses_json, rfc3339,
)

_ENCODE = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode

#: a node's fields, in ``Node``'s order (a tuple of them is made in C)
_FIELDS = operator.attrgetter("id", "public_key", "real_addr", "last_seen", "hostname", "tags", "public", "owner",
                              "polo_score", "task_exec", "networks", "local_addr")

#: the order :meth:`RegistryState.to_json` writes the sections in (after next_node, next_net, nodes, networks)
_TAIL = ("trust_pairs", "pub_key_idx", "handshake_inbox", "handshake_responses", "trust_edges", "proven",
         "keys_gone", "auth_ts", "handshake_asked", "trust_statements")


@attr.s(auto_attribs=True, frozen=True)
class StateView:
    """A :class:`RegistryState`'s content at one moment, in containers the reactor no longer changes."""

    created: str
    seq: int
    nodes: list[tuple[Any, ...]]
    key_index: dict[bytes, int]
    auth_ts: dict[int, int]
    gone: dict[int, float]
    trust: frozenset[tuple[int, int]]
    proven: frozenset[int]
    asked: frozenset[tuple[int, int]]
    inbox: dict[int, list[Any]]
    responses: dict[int, list[Any]]
    statements: dict[int, dict[int, Any]]
    #: the replication term (``pilot_term``; not in the journal's records: the writer hands it over)
    term: int = 0

    @classmethod
    def of(cls, s: RegistryState) -> "StateView":
        """Copy ``s`` (in the reactor): a tuple of each node's fields (assigned, never changed in place)."""
        return cls(
            rfc3339(s.created), s.journal_seq,
            list(map(_FIELDS, s.nodes.values())),
            dict(s.key_index), dict(s.auth_ts), dict(s.gone), frozenset(s.trust), frozenset(s.proven),
            frozenset(s.asked), {k: list(v) for k, v in s.inbox.items()},
            {k: list(v) for k, v in s.responses.items()}, {k: dict(v) for k, v in s.statements.items()},
            s.term)


class StoreMirror:
    """The store's content as JSON texts, kept up to date from the journal's records (writer thread)."""

    def __init__(self, view: StateView) -> None:
        self.view: StateView | None = view
        self.created = view.created
        self.seq = view.seq
        self.term = view.term
        #: section -> key (as in the store) -> the value's JSON text (pub_key_idx: in key_ids)
        self.maps: dict[str, dict[str, str]] = {name: {} for name in MAPS if name != "pub_key_idx"}
        #: pub_key_idx: a key's base64 -> its node id
        self.key_ids: dict[str, int] = {}
        self.lists: dict[str, set[Any]] = {name: set() for name in LISTS}

    def build(self) -> None:
        """Format the view taken at the start (once; in the writer thread)."""
        view, self.view = self.view, None
        if view is None:
            return
        nodes, keys = self.maps["nodes"], dict[bytes, str]()
        for fields in view.nodes:
            node = Node(*fields)
            text = keys.get(node.public_key) or b64encode(node.public_key)
            keys[node.public_key] = text
            nodes[str(node.id)] = _ENCODE(node_json(node, text))
        for key, node_id in view.key_index.items():
            self.key_ids[keys.get(key) or b64encode(key)] = node_id
        self.maps["auth_ts"].update((str(k), str(v)) for k, v in view.auth_ts.items())
        self.maps["keys_gone"].update((str(k), str(int(v))) for k, v in view.gone.items())
        for name, queues, to_json in (("handshake_inbox", view.inbox, inbox_json),
                                      ("handshake_responses", view.responses, responses_json)):
            self.maps[name].update((str(k), _ENCODE(to_json(v))) for k, v in queues.items() if v)
        self.maps["trust_statements"].update(
            (str(g), _ENCODE([st.encode() for _, st in sorted(kept.items())]))
            for g, kept in view.statements.items() if kept)
        self.lists["trust_edges"].update(f"{a}>{b}" for a, b in view.trust)
        self.lists["handshake_asked"].update(f"{a}>{b}" for a, b in view.asked)
        self.lists["proven"].update(view.proven)

    def apply(self, record: dict[str, Any]) -> bytes:
        """
        Apply one record (a :class:`pilot.server.journal.Tracker` delta with
        its ``seq``); return its JSON for the journal, made from the same
        texts (each value is encoded once).
        """
        self.build()
        seq = record["seq"]
        out = ['{"seq":', str(seq)]
        sets = record.get("set")
        if sets:
            parts = []
            for name, items in sets.items():
                if name == "pub_key_idx":
                    self.key_ids.update(items)
                    parts.append(f'"{name}":{_ENCODE(items)}')
                    continue
                section = self.maps[name]
                texts = []
                for key, value in items.items():
                    text = section[key] = str(value) if type(value) is int else _ENCODE(value)
                    texts.append(f'"{key}":{text}' if key.isdigit() else f"{_ENCODE(key)}:{text}")
                parts.append(f'"{name}":{{{",".join(texts)}}}')
            out += [',"set":{', ",".join(parts), "}"]
        for name, keys in record.get("del", {}).items():
            where: dict[str, Any] = self.key_ids if name == "pub_key_idx" else self.maps[name]
            for key in keys:
                where.pop(key, None)
        for name, items in record.get("add", {}).items():
            self.lists[name].update(items)
        for name, items in record.get("drop", {}).items():
            self.lists[name].difference_update(items)
        for part in ("del", "add", "drop"):
            if part in record:
                out += [f',"{part}":', _ENCODE(record[part])]
        out.append("}")
        self.seq = seq
        return "".join(out).encode("utf-8")

    def render(self) -> bytes:
        """
        The store file: what :meth:`RegistryState.to_bytes` makes of the same
        state.  Long sections are joined and encoded a few thousand items at a
        time: one C call over 100,000 nodes would hold the interpreter (and keep
        the reactor waiting) for tens of milliseconds.
        """
        self.build()
        nodes = self.maps["nodes"]
        node_ids = sorted([int(k) for k in nodes])  # (not map(): a loop in C never lets the reactor in)
        next_node = max(node_ids[-1] if node_ids else 0, max(self.key_ids.values(), default=0)) + 1
        out = [b'{"next_node":%d,"next_net":1,"nodes":{' % next_node]
        out += _chunks([f'"{i}":{nodes[str(i)]}' for i in node_ids])
        out += [b'},"networks":{"0":{"id":0,"name":"backbone","join_rule":"open","members":[']
        out += _chunks([str(i) for i in node_ids])
        out.append(b'],"created":%s}}' % _ENCODE(self.created).encode("utf-8"))
        edges = sorted(_split(e) for e in self.lists["trust_edges"])
        mutual = set(edges)
        sections: dict[str, list[bytes]] = {}
        pairs = sorted({(min(a, b), max(a, b)) for a, b in edges if (b, a) in mutual})
        if pairs:
            sections["trust_pairs"] = [_ENCODE([f"{a}:{b}" for a, b in pairs]).encode("utf-8")]
        if self.key_ids:
            keys = sorted(self.key_ids.items(), key=lambda kv: kv[1])
            sections["pub_key_idx"] = [b"{", *_chunks([f"{_ENCODE(k)}:{v}" for k, v in keys]), b"}"]
        for name in ("handshake_inbox", "handshake_responses", "keys_gone", "auth_ts", "trust_statements"):
            section = self.maps[name]
            if section:
                texts = [f'"{k}":{section[k]}' for k in sorted(section, key=int)]
                sections[name] = [b"{", *_chunks(texts), b"}"]
        if edges:
            sections["trust_edges"] = [b"[", *_chunks([f'"{a}>{b}"' for a, b in edges]), b"]"]
        if self.lists["proven"]:
            sections["proven"] = [b"[", *_chunks([str(i) for i in sorted(self.lists["proven"])]), b"]"]
        if self.lists["handshake_asked"]:
            sections["handshake_asked"] = [b"[", *_chunks([f'"{a}>{b}"' for a, b in sorted(
                _split(e) for e in self.lists["handshake_asked"])]), b"]"]
        for name in _TAIL:
            if name in sections:
                out.append(b',"%s":' % name.encode("ascii"))
                out += sections[name]
        if self.seq:
            out.append(b',"pilot_journal_seq":%d' % self.seq)
        if self.term:
            out.append(b',"pilot_term":%d' % self.term)
        out.append(b',"pilot_store_format":%d}' % STORE_FORMAT)
        return b"".join(out)


#: items joined and encoded at a time by :meth:`StoreMirror.render`
CHUNK = 2000


def _chunks(texts: list[str]) -> list[bytes]:
    """``",".join(texts)`` as UTF-8, made ``CHUNK`` items at a time (the commas between chunks included)."""
    out = []
    for at in range(0, len(texts), CHUNK):
        piece = ",".join(texts[at:at + CHUNK]).encode("utf-8")
        out.append(b"," + piece if at else piece)
    return out


def _split(edge: Any) -> tuple[int, int]:
    if not isinstance(edge, str) or edge.count(">") != 1:
        raise JournalError(f"{edge!r} is not 'A>B'")
    a, b = edge.split(">")
    return int(a), int(b)

