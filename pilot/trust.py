# -*- test-case-name: tests.test_trust -*-
"""
A node's trust store: ``trust.json`` beside the identity file
(``docs/reference-wire.md`` §5.4).

The format is the reference's, pretty-printed with a two-space indent and
replaced atomically (mode 0600) on every change::

    {
      "trusted": [
        {"node_id": 2, "public_key": "<base64 or empty>",
         "approved_at": "2026-11-21T22:44:17Z", "mutual": true, "network": 5}
      ],
      "pending": [
        {"node_id": 9, "public_key": "<base64>", "justification": "...",
         "received_at": "2026-11-21T22:44:17Z"}
      ],
      "outgoing": [
        {"node_id": 4, "justification": "...", "sent_at": "2026-11-21T22:44:17Z"}
      ]
    }

``trusted`` is always written (``null`` is read as empty, as Go writes a nil
slice); ``network`` is omitted when 0; ``pending`` is omitted when empty, and
in a pending entry ``public_key`` and ``justification`` are omitted when
empty.  ``outgoing`` (the requests this node has sent and not yet seen
answered) is ours: the reference keeps them in memory only and ignores the
key.  Other top-level keys are kept and written back unchanged.

A missing file is an empty store.  A file that cannot be read or is not a
trust store raises :class:`~pilot.persist.StateFileError` and is never
overwritten by this module.

The values are plain data; the rules that change them are in
:mod:`pilot.machines.trust`.
"""

from __future__ import annotations

import datetime
import os
import re
from typing import Any, Iterable, TypeVar

import attr

from pilot.identity import PUBLIC_KEY_LEN, b64decode, b64encode
from pilot.persist import StateFileError, atomic_write_json, read_json_object

FILE_NAME = "trust.json"
MAX_NODE_ID = 0xFFFFFFFF
MAX_NETWORK_ID = 0xFFFF


def path_beside(identity_path: str) -> str:
    """Where the reference keeps the trust store: ``trust.json`` in the identity file's folder."""
    return os.path.join(os.path.dirname(os.path.abspath(identity_path)), FILE_NAME)


def format_time(ts: float) -> str:
    """RFC 3339 in UTC to the second (``2026-11-21T22:44:17Z``), as the reference's files show."""
    dt = datetime.datetime.fromtimestamp(int(ts // 1), datetime.timezone.utc)
    return dt.isoformat(timespec="seconds").replace("+00:00", "Z")


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
                      r"(?:\.([0-9]{1,9}))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))")


def parse_time(text: str) -> float:
    """
    RFC 3339 (as Go writes ``time.Time``: fractions up to nanoseconds, ``Z``
    or an offset) to Unix seconds; ``ValueError`` for anything else.  Go's
    zero time (``0001-01-01T00:00:00Z``) is a valid value.
    """
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise ValueError(f"{text[:64]!r} is not an RFC 3339 time")
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    offset = datetime.timedelta(0)
    if m.group(9):
        offset = datetime.timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        if m.group(9) == "-":
            offset = -offset
    try:
        utc = datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.timezone.utc) - offset
    except (ValueError, OverflowError):
        raise ValueError(f"{text[:64]!r} is not a valid date and time in years 1 to 9999") from None
    whole = (utc - _EPOCH) // datetime.timedelta(seconds=1)
    return whole + (int(m.group(7)) / 10 ** len(m.group(7)) if m.group(7) else 0.0)


def _time(value: Any, what: str) -> float:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be an RFC 3339 time")
    try:
        return parse_time(value)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def _int(value: Any, what: str, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise ValueError(f"{what} must be an integer 0..{high}, not {value!r}"[:200])
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    return value


def _key(value: Any, what: str) -> bytes:
    if value == "":
        return b""
    return b64decode(value, PUBLIC_KEY_LEN, what)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TrustedPeer:
    """A node we trust.  An empty ``public_key`` is filled by the first verified key, then pinned."""

    node_id: int
    public_key: bytes
    approved_at: float
    mutual: bool = False
    network: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node_id": self.node_id,
            "public_key": b64encode(self.public_key) if self.public_key else "",
            "approved_at": format_time(self.approved_at),
            "mutual": self.mutual,
        }
        if self.network:
            out["network"] = self.network
        return out

    @classmethod
    def from_json(cls, value: Any) -> "TrustedPeer":
        v = _object(value, "a trusted entry")
        node_id = _int(v.get("node_id"), "node_id", MAX_NODE_ID)
        mutual = v.get("mutual", False)
        if not isinstance(mutual, bool):
            raise ValueError(f"mutual of node {node_id} must be true or false")
        return cls(node_id, _key(v.get("public_key", ""), f"public_key of node {node_id}"),
                   _time(v.get("approved_at"), f"approved_at of node {node_id}"), mutual,
                   _int(v.get("network", 0), f"network of node {node_id}", MAX_NETWORK_ID))

    def as_ipc(self) -> dict[str, Any]:
        """The IPC view (``docs/reference-wire.md`` §5.5): times in Unix seconds."""
        return {"node_id": self.node_id, "public_key": b64encode(self.public_key) if self.public_key else "",
                "approved_at": int(self.approved_at), "mutual": self.mutual, "network": self.network}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PendingRequest:
    """A request from another node, waiting for this node's operator (or a rule)."""

    node_id: int
    public_key: bytes
    justification: str
    received_at: float

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node_id": self.node_id}
        if self.public_key:
            out["public_key"] = b64encode(self.public_key)
        if self.justification:
            out["justification"] = self.justification
        out["received_at"] = format_time(self.received_at)
        return out

    @classmethod
    def from_json(cls, value: Any) -> "PendingRequest":
        v = _object(value, "a pending entry")
        node_id = _int(v.get("node_id"), "node_id", MAX_NODE_ID)
        return cls(node_id, _key(v.get("public_key", ""), f"public_key of node {node_id}"),
                   _text(v.get("justification", ""), f"justification of node {node_id}"),
                   _time(v.get("received_at"), f"received_at of node {node_id}"))

    def as_ipc(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "public_key": b64encode(self.public_key) if self.public_key else "",
                "justification": self.justification, "received_at": int(self.received_at)}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class OutgoingRequest:
    """A request this node sent and has not seen answered (ours; the reference does not save these)."""

    node_id: int
    justification: str
    sent_at: float

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node_id": self.node_id}
        if self.justification:
            out["justification"] = self.justification
        out["sent_at"] = format_time(self.sent_at)
        return out

    @classmethod
    def from_json(cls, value: Any) -> "OutgoingRequest":
        v = _object(value, "an outgoing entry")
        node_id = _int(v.get("node_id"), "node_id", MAX_NODE_ID)
        return cls(node_id, _text(v.get("justification", ""), f"justification of node {node_id}"),
                   _time(v.get("sent_at"), f"sent_at of node {node_id}"))

    def as_ipc(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "justification": self.justification, "sent_at": int(self.sent_at)}


E = TypeVar("E", TrustedPeer, PendingRequest, OutgoingRequest)


def _entries(value: Any, key: str, cls: type[E]) -> dict[int, E]:
    if value is None:
        return {}
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list")
    out: dict[int, E] = {}
    for item in value:
        entry = cls.from_json(item)
        if entry.node_id in out:
            raise ValueError(f"node {entry.node_id} is listed twice in {key}")
        out[entry.node_id] = entry
    return out


def _sorted(entries: Iterable[E]) -> list[E]:
    return sorted(entries, key=lambda e: e.node_id)


@attr.s(auto_attribs=True, eq=False)
class TrustStore:
    """The three tables, keyed by node id.  Plain data; :meth:`save` writes it."""

    trusted: dict[int, TrustedPeer] = attr.Factory(dict)
    pending: dict[int, PendingRequest] = attr.Factory(dict)
    outgoing: dict[int, OutgoingRequest] = attr.Factory(dict)
    #: Top-level keys we do not know, written back as found.
    extra: dict[str, Any] = attr.Factory(dict)

    KNOWN_KEYS = ("trusted", "pending", "outgoing")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trusted": [e.to_json() for e in _sorted(self.trusted.values())]}
        if self.pending:
            out["pending"] = [e.to_json() for e in _sorted(self.pending.values())]
        if self.outgoing:
            out["outgoing"] = [e.to_json() for e in _sorted(self.outgoing.values())]
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_json(cls, value: Any) -> "TrustStore":
        """``ValueError`` with the reason if ``value`` is not a trust store."""
        v = _object(value, "a trust store")
        return cls(_entries(v.get("trusted"), "trusted", TrustedPeer),
                   _entries(v.get("pending"), "pending", PendingRequest),
                   _entries(v.get("outgoing"), "outgoing", OutgoingRequest),
                   {k: x for k, x in v.items() if k not in cls.KNOWN_KEYS})

    @classmethod
    def load(cls, path: str) -> "TrustStore":
        """The store in ``path``; empty if there is no file; ``StateFileError`` if it is unusable."""
        try:
            value = read_json_object(path)
        except FileNotFoundError:
            return cls()
        try:
            return cls.from_json(value)
        except (ValueError, TypeError) as e:
            raise StateFileError(path, f"not a trust store: {e}; the file is left untouched") from e

    def save(self, path: str) -> None:
        """Replace ``path`` atomically with this store (mode 0600)."""
        atomic_write_json(path, self.to_json(), mode=0o600)

    def forget(self, node_id: int) -> bool:
        """Drop every entry for ``node_id``; True if there was one."""
        trusted = self.trusted.pop(node_id, None)
        pending = self.pending.pop(node_id, None)
        outgoing = self.outgoing.pop(node_id, None)
        return (trusted, pending, outgoing) != (None, None, None)
