# -*- test-case-name: tests.server.test_journal -*-
"""
The store's write-ahead journal (``--durable``): what changed, appended.

With durable acknowledgements a change is acknowledged once a journal record
holding it is on disk; the store file itself (``registry.json``) is rewritten
from a snapshot only now and then, and the journal emptied after it.  A record
costs what changed since the last one (:class:`Tracker`), not the 10,000
nodes the store holds.

A record is one line: the CRC-32 of its JSON in 8 hex digits, a space, the
JSON, a newline.  Its JSON is ``{"seq": n, "set": {...}, "del": {...},
"add": {...}, "drop": {...}}``, in the store's own terms: ``set`` and ``del``
give and remove keys of the store's objects (``nodes``, ``pub_key_idx``,
``auth_ts``, ...), ``add`` and ``drop`` items of its lists (``trust_edges``,
``proven``, ``handshake_asked``).  Records are numbered; the store file says
the last one it holds (``pilot_journal_seq``).

Replay (:func:`replay`) applies, in order, the records numbered after the
store's to the store's JSON before it is loaded.  A record left torn by a
crash (no newline, a wrong CRC, not JSON) can only be the last one written,
since each append waits for the one before to be on disk: it was never
acknowledged and is ignored.  A bad record followed by a good one is damage,
not a crash, and is refused (:class:`JournalError`).
"""

from __future__ import annotations

import itertools
import json
import zlib
from typing import Any, Callable, cast

from pilot.identity import b64encode
from pilot.server.state import Node, RegistryState, inbox_json, node_json, responses_json
from pilot.server.tracked import TrackedDict, TrackedSet

#: the store's objects a record may set keys of, and its lists it may add items to
MAPS = ("nodes", "pub_key_idx", "auth_ts", "keys_gone", "handshake_inbox", "handshake_responses",
        "trust_statements")
LISTS = ("trust_edges", "proven", "handshake_asked")


class JournalError(ValueError):
    """A journal that is damaged (not just torn at its end); the message says where."""


_ENCODE = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_SET_SINK = Node.__dict__["journal_sink"].__set__


def encode_record(seq: int, delta: dict[str, Any]) -> bytes:
    """One journal line for record number ``seq`` holding ``delta``."""
    return record_line(_ENCODE({"seq": seq, **delta}).encode("utf-8"))


def record_line(body: bytes) -> bytes:
    """The journal line of a record whose JSON is ``body`` (one line: no raw newline in it)."""
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode_line(line: bytes) -> dict[str, Any] | None:
    if len(line) < 10 or line[8:9] != b" " or not line.endswith(b"\n"):
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        record = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    seq = record.get("seq") if isinstance(record, dict) else None
    if isinstance(seq, bool) or not isinstance(seq, int):
        return None
    return record


def read_records(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """
    The whole records in a journal's bytes, and how many bytes at its end were
    a torn record (ignored).  Raises :class:`JournalError` for a bad record
    followed by a good one, or numbers that do not go up.
    """
    records: list[dict[str, Any]] = []
    lines = data.splitlines(keepends=True)
    for i, line in enumerate(lines):
        record = _decode_line(line)
        if record is None:
            if any(_decode_line(later) is not None for later in lines[i + 1:]):
                raise JournalError(f"record {i + 1} is damaged and good records follow it")
            return records, len(data) - sum(len(x) for x in lines[:i])
        if records and record["seq"] <= records[-1]["seq"]:
            raise JournalError(f"record {i + 1} is numbered {record['seq']}, after {records[-1]['seq']}")
        records.append(record)
    return records, 0


def replay(value: dict[str, Any], records: list[dict[str, Any]]) -> int:
    """
    Apply to a store's JSON ``value``, in order, the records numbered after its
    ``pilot_journal_seq``; how many were applied.
    """
    done = value.get("pilot_journal_seq", 0)
    if isinstance(done, bool) or not isinstance(done, int):
        raise JournalError(f"the store's pilot_journal_seq is {done!r}")
    applied = 0
    for record in records:
        if record["seq"] > done:
            apply_record(value, record)
            value["pilot_journal_seq"] = done = record["seq"]
            applied += 1
    return applied


def apply_record(value: dict[str, Any], record: dict[str, Any]) -> None:
    """Apply one record to a store's JSON (checked for shape; the store's loader checks the values)."""
    for part, names in (("set", MAPS), ("del", MAPS), ("add", LISTS), ("drop", LISTS)):
        changes = record.get(part, {})
        if not isinstance(changes, dict) or not set(changes) <= set(names):
            raise JournalError(f"record {record['seq']}: {part!r} is not an object of {', '.join(names)}")
        for name, items in changes.items():
            if name == "trust_edges" and name not in value:
                value[name] = _edges_from_pairs(value.get("trust_pairs"))
            current = value.get(name)
            if part in ("set", "del"):
                current = current if isinstance(current, dict) else {}
                if part == "set" and isinstance(items, dict):
                    current.update(items)
                elif part == "del" and isinstance(items, list):
                    for key in items:
                        current.pop(key, None)
                else:
                    raise JournalError(f"record {record['seq']}: {part}.{name} has the wrong shape")
            else:
                if not isinstance(items, list) or not all(isinstance(x, (str, int)) for x in items):
                    raise JournalError(f"record {record['seq']}: {part}.{name} is not a list of ids")
                kept = set(current) if isinstance(current, list) else set()
                kept = kept | set(items) if part == "add" else kept - set(items)
                current = sorted(kept, key=lambda x: (isinstance(x, str), x))
            value[name] = current


def _edges_from_pairs(pairs: Any) -> list[str]:
    """A reference store's undirected trust pairs as our directed edges (both ways)."""
    edges: list[str] = []
    for pair in pairs if isinstance(pairs, list) else []:
        if isinstance(pair, str) and pair.count(":") == 1:
            a, b = pair.split(":")
            edges += [f"{a}>{b}", f"{b}>{a}"]
    return edges


class Tracker:
    """
    What changed in a :class:`RegistryState` since the last record (or
    snapshot): :meth:`delta` makes the next record's content and starts over.
    """

    def __init__(self, state: RegistryState) -> None:
        self.state = state
        self._node_changes: set[int] = set()
        self.reset()

    def _tracked(self) -> tuple[Any, ...]:
        s = self.state
        return s.nodes, s.key_index, s.auth_ts, s.gone, s.trust, s.proven, s.asked

    def reset(self) -> None:
        """The state as it is now is on disk (a snapshot was taken): track from here."""
        s = self.state
        if not isinstance(s.nodes, TrackedDict):
            s.nodes = TrackedDict(s.nodes)
        for name in ("key_index", "auth_ts", "gone"):
            if not isinstance(getattr(s, name), TrackedDict):
                setattr(s, name, TrackedDict(getattr(s, name)))
        for name in ("trust", "proven", "asked"):
            if not isinstance(getattr(s, name), TrackedSet):
                setattr(s, name, TrackedSet(getattr(s, name)))
        for container in self._tracked():
            container.track()
        sink = self._node_changes = set()
        # the slot itself, node after node in C (not the assignment hook: setting the sink is no change)
        nodes = list(s.nodes.values())
        list(map(_SET_SINK, nodes, itertools.repeat(sink, len(nodes))))
        self._watched = self._tracked()
        self._inbox: dict[int, Any] = {k: list(v) for k, v in s.inbox.items()}
        self._responses: dict[int, Any] = {k: list(v) for k, v in s.responses.items()}
        self._statements: dict[int, Any] = {k: dict(v) for k, v in s.statements.items()}

    def intact(self) -> bool:
        """False if a tracked container was replaced whole: only a snapshot is right then."""
        return all(a is b for a, b in zip(self._tracked(), self._watched))

    def delta(self) -> dict[str, Any]:
        """The changes since the last call (or :meth:`reset`), as a record's content; {} if none."""
        s = self.state
        sets: dict[str, dict[str, Any]] = {}
        dels: dict[str, list[Any]] = {}

        def put(section: str, key: str, value: Any) -> None:
            if value is None:
                dels.setdefault(section, []).append(key)
            else:
                sets.setdefault(section, {})[key] = value

        nodes = cast(TrackedDict[int, Any], s.nodes)
        sink = self._node_changes
        changed = nodes.changes | sink
        nodes.changes.clear()
        sink.clear()
        key_texts: dict[bytes, str] = {}
        node_sets: dict[str, Any] = {}
        for node_id in changed:
            node = nodes.get(node_id)
            if node is None:
                dels.setdefault("nodes", []).append(str(node_id))
                continue
            node.journal_sink = sink  # a new node: its later changes too
            text = key_texts[node.public_key] = s.key_text(node.public_key)
            node_sets[str(node_id)] = node_json(node, text)
        if node_sets:
            sets["nodes"] = node_sets
        maps: tuple[tuple[str, dict[Any, Any], Callable[[bytes], str | None] | None], ...] = (
            ("pub_key_idx", s.key_index, key_texts.get), ("auth_ts", s.auth_ts, None), ("keys_gone", s.gone, None))
        for section, mapping, key_text in maps:
            tracked = cast(TrackedDict[Any, Any], mapping)
            if not tracked.changes:
                continue
            section_sets: dict[str, Any] = {}
            for key in tracked.changes:
                value = tracked.get(key)
                text = (key_text(key) or b64encode(key)) if key_text is not None else str(key)
                if value is None:
                    dels.setdefault(section, []).append(text)
                else:
                    section_sets[text] = int(value) if section == "keys_gone" else value
            tracked.changes.clear()
            if section_sets:
                sets[section] = section_sets
        # copies of these (changed in place) are compared: in C, and equal items are the same objects
        queues: tuple[tuple[str, dict[int, Any], dict[int, Any], Callable[[Any], Any]], ...] = (
            ("handshake_inbox", s.inbox, self._inbox, inbox_json),
            ("handshake_responses", s.responses, self._responses, responses_json),
            ("trust_statements", s.statements, self._statements,
             lambda kept: [st.encode() for _, st in sorted(kept.items())]))
        for section, current, old, to_json in queues:
            if current == old:
                continue
            for key in current.keys() | old.keys():
                now = current.get(key)
                if now != old.get(key):
                    put(section, str(key), to_json(now) if now else None)
                    if now is None:
                        old.pop(key, None)
                    else:
                        old[key] = type(now)(now)
        adds: dict[str, list[Any]] = {}
        drops: dict[str, list[Any]] = {}
        for section, items in (("trust_edges", s.trust), ("proven", s.proven), ("handshake_asked", s.asked)):
            tracked_set = cast(TrackedSet[Any], items)
            for item in tracked_set.changes:
                (adds if item in tracked_set else drops).setdefault(section, []).append(
                    item if isinstance(item, int) else f"{item[0]}>{item[1]}")
            tracked_set.changes.clear()
        out: dict[str, Any] = {}
        for part, content in (("set", sets), ("del", dels), ("add", adds), ("drop", drops)):
            if content:
                out[part] = content
        return out


class _Pending:
    """Records merged into one: a key's last change wins (each key in at most one of set/del, add/drop)."""

    __slots__ = ("sets", "dels", "adds", "drops")

    def __init__(self) -> None:
        self.sets: dict[str, dict[str, Any]] = {}
        self.dels: dict[str, dict[Any, None]] = {}
        self.adds: dict[str, dict[Any, None]] = {}
        self.drops: dict[str, dict[Any, None]] = {}

    def __bool__(self) -> bool:
        return any(any(part.values()) for part in (self.sets, self.dels, self.adds, self.drops))

    def add(self, delta: dict[str, Any]) -> None:
        for section, items in delta.get("set", {}).items():
            self.sets.setdefault(section, {}).update(items)
            gone = self.dels.get(section)
            if gone:
                for key in items:
                    gone.pop(key, None)
        for section, keys in delta.get("del", {}).items():
            gone, kept = self.dels.setdefault(section, {}), self.sets.get(section)
            for key in keys:
                gone[key] = None
                if kept:
                    kept.pop(key, None)
        for part, other, name in ((self.adds, self.drops, "add"), (self.drops, self.adds, "drop")):
            for section, items in delta.get(name, {}).items():
                mine, theirs = part.setdefault(section, {}), other.get(section)
                for item in items:
                    mine[item] = None
                    if theirs:
                        theirs.pop(item, None)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, part in (("set", self.sets), ("del", self.dels), ("add", self.adds), ("drop", self.drops)):
            content = {s: (items if name == "set" else list(items)) for s, items in part.items() if items}
            if content:
                out[name] = content
        return out


class Feed:
    """
    One :class:`Tracker` read by several readers (the store's writer, and a
    paired primary's replication): :meth:`take` gives a reader everything that
    changed since its own last take, in a record's form, whoever took from the
    tracker in between; or None when the reader must start again from the
    whole state (it just joined after :meth:`lose`, or the tracking restarted:
    a container was replaced whole).  A record handed out is never changed
    afterwards (the writer thread may read it).
    """

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        #: reader -> what changed since its last take (None: it needs the whole state)
        self._readers: dict[object, _Pending | None] = {}

    def join(self, reader: object) -> None:
        """Read from now on (the reader holds the state as it is now: what changed before is the others')."""
        self._readers[reader] = None
        self.take(reader)

    def leave(self, reader: object) -> None:
        self._readers.pop(reader, None)

    def joined(self, reader: object) -> bool:
        return reader in self._readers

    def lose(self, reader: object) -> None:
        """The reader no longer holds what it took: its next take is None."""
        self._readers[reader] = None

    def take(self, reader: object) -> dict[str, Any] | None:
        if not self.tracker.intact():
            self.tracker.reset()
            self._readers = dict.fromkeys(self._readers)
        delta = self.tracker.delta()
        mine = self._readers.get(reader)
        if delta:
            for other, pending in self._readers.items():
                if other is not reader and pending is not None:
                    pending.add(delta)
        self._readers[reader] = _Pending()
        if mine is None:
            return None
        if not mine:
            return delta
        mine.add(delta)
        return mine.record()
