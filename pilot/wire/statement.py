# -*- test-case-name: tests.wire.test_statement -*-
"""
A trust statement: one node's signed word that it trusts (or no longer
trusts) another, kept for it by the rendezvous so that trust travels with
the key (``docs/trust.md``, "Trust carried by the key").

One line of ASCII, fields separated by single spaces::

    pilot-trust/1 <granter> <granter key> <peer> <peer key> <granted at> <seq> <grant|revoke> <signature>

``granter`` and ``peer`` are node ids (decimal, 1..2**32-1, different);
the keys are standard base64 Ed25519 keys (the peer's is ``-`` while it is
not known yet); ``granted at`` is Unix seconds; ``seq`` orders the
statements of one (granter, peer) pair, the newest wins (the granter takes
its clock in milliseconds, or one more than the last it used); the
signature is the granter's Ed25519 signature over everything before the
last space.  The leading ``pilot-trust/1`` is the domain separator: no
other message a node signs starts with it.

Pure: no I/O, no clock.  :func:`decode` raises only
:class:`~pilot.errors.MalformedFrame`; whether a statement is *ours* and its
signature good is :meth:`TrustStatement.is_by`.
"""

from __future__ import annotations

from typing import Any, Callable

from pilot.errors import MalformedFrame
from pilot.identity import PUBLIC_KEY_LEN, SIGNATURE_LEN, b64decode, b64encode, verify
from pilot.wire.value import Value, set_field

MAGIC = "pilot-trust/1"
GRANT = "grant"
REVOKE = "revoke"
#: No valid statement is longer (about 250 bytes in practice).
MAX_STATEMENT = 400
#: Statements in one ``put_trust_statements`` request.
MAX_PER_REQUEST = 64
MAX_NODE_ID = 0xFFFFFFFF
#: Times and sequence numbers fit JavaScript's exact integers.
MAX_NUMBER = (1 << 53) - 1
_FIELDS = 9


def _number(text: str, what: str, low: int, high: int) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 16 or (len(text) > 1 and text[0] == "0"):
        raise MalformedFrame(f"trust statement {what} {text[:20]!r} is not a decimal number")
    value = int(text)
    if not low <= value <= high:
        raise MalformedFrame(f"trust statement {what} {value} is out of range")
    return value


class TrustStatement(Value):
    """One statement; build signed ones with :func:`make_statement`."""

    __slots__ = ("granter", "granter_key", "peer", "peer_key", "granted_at", "seq", "revoked", "signature")
    _not_shown = ("granter_key", "peer_key", "signature")
    granter: int
    granter_key: bytes
    peer: int
    peer_key: bytes
    granted_at: int
    seq: int
    revoked: bool
    signature: bytes

    def __init__(self, granter: int, granter_key: bytes, peer: int, peer_key: bytes, granted_at: int, seq: int,
                 revoked: bool, signature: bytes = b"") -> None:
        set_field(self, "granter", granter)
        set_field(self, "granter_key", granter_key)
        set_field(self, "peer", peer)
        set_field(self, "peer_key", peer_key)
        set_field(self, "granted_at", granted_at)
        set_field(self, "seq", seq)
        set_field(self, "revoked", revoked)
        set_field(self, "signature", signature)

    @property
    def pair(self) -> tuple[int, int]:
        return (self.granter, self.peer)

    def body(self) -> bytes:
        """What the signature covers."""
        peer_key = b64encode(self.peer_key) if self.peer_key else "-"
        kind = REVOKE if self.revoked else GRANT
        return " ".join([MAGIC, str(self.granter), b64encode(self.granter_key), str(self.peer), peer_key,
                         str(self.granted_at), str(self.seq), kind]).encode("ascii")

    def encode(self) -> str:
        return self.body().decode("ascii") + " " + b64encode(self.signature)

    def is_by(self, node_id: int, public_key: bytes) -> bool:
        """Is this ``node_id``'s statement, under ``public_key``, with a good signature?"""
        return (self.granter == node_id and self.granter_key == public_key
                and verify(public_key, self.body(), self.signature))


def make_statement(granter: int, granter_key: bytes, peer: int, peer_key: bytes, granted_at: int, seq: int,
                   revoked: bool, sign: Callable[[bytes], bytes]) -> TrustStatement:
    """A statement signed by ``sign``; ``ValueError`` for values it could never carry."""
    for what, node in (("granter", granter), ("peer", peer)):
        if isinstance(node, bool) or not isinstance(node, int) or not 0 < node <= MAX_NODE_ID:
            raise ValueError(f"{what} {node!r} is not a node id")
    if granter == peer:
        raise ValueError("a node does not state trust in itself")
    if len(granter_key) != PUBLIC_KEY_LEN or len(peer_key) not in (0, PUBLIC_KEY_LEN):
        raise ValueError("keys are 32 bytes (the peer's may be empty)")
    for what, n in (("granted_at", granted_at), ("seq", seq)):
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_NUMBER:
            raise ValueError(f"{what} {n!r} is out of range")
    unsigned = TrustStatement(granter, granter_key, peer, peer_key, granted_at, seq, revoked)
    return TrustStatement(granter, granter_key, peer, peer_key, granted_at, seq, revoked, sign(unsigned.body()))


def decode(text: Any) -> TrustStatement:
    """One statement from its text; :class:`MalformedFrame` for anything else (the signature is unchecked)."""
    if not isinstance(text, str):
        raise MalformedFrame(f"a trust statement is text, not {type(text).__name__}")
    if len(text) > MAX_STATEMENT:
        raise MalformedFrame(f"trust statement of {len(text)} characters exceeds {MAX_STATEMENT}")
    if not text.isascii():
        raise MalformedFrame("a trust statement is ASCII")
    parts = text.split(" ")
    if len(parts) != _FIELDS:
        raise MalformedFrame(f"a trust statement has {_FIELDS} fields, not {len(parts)}")
    magic, granter, granter_key, peer, peer_key, granted_at, seq, kind, signature = parts
    if magic != MAGIC:
        raise MalformedFrame(f"not a trust statement (starts {magic[:20]!r})")
    if kind not in (GRANT, REVOKE):
        raise MalformedFrame(f"trust statement kind {kind[:20]!r} is neither {GRANT} nor {REVOKE}")
    granter_id = _number(granter, "granter", 1, MAX_NODE_ID)
    peer_id = _number(peer, "peer", 1, MAX_NODE_ID)
    if granter_id == peer_id:
        raise MalformedFrame("a trust statement names the same node twice")
    try:
        statement = TrustStatement(
            granter_id, b64decode(granter_key, PUBLIC_KEY_LEN, "granter key"), peer_id,
            b"" if peer_key == "-" else b64decode(peer_key, PUBLIC_KEY_LEN, "peer key"),
            _number(granted_at, "time", 0, MAX_NUMBER), _number(seq, "seq", 0, MAX_NUMBER), kind == REVOKE,
            b64decode(signature, SIGNATURE_LEN, "signature"))
    except ValueError as e:
        if isinstance(e, MalformedFrame):
            raise
        raise MalformedFrame(f"bad trust statement: {e}") from None
    if statement.encode() != text:
        raise MalformedFrame("a trust statement is not in its one canonical form")
    return statement


def newest(statements: "list[TrustStatement]") -> dict[tuple[int, int], TrustStatement]:
    """The statement with the highest ``seq`` for each (granter, peer) pair (the first one on a tie)."""
    out: dict[tuple[int, int], TrustStatement] = {}
    for s in statements:
        old = out.get(s.pair)
        if old is None or s.seq > old.seq:
            out[s.pair] = s
    return out
