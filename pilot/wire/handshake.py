# -*- test-case-name: tests.wire.test_handshake -*-
"""
The trust handshake message a node writes to a peer's port 444 (docs/reference-wire.md §5.1).

One JSON object per stream, all seven fields always present (empty strings
where unused)::

    {"type": "handshake_request", "node_id": 7, "public_key": "<base64>",
     "justification": "...", "signature": "<base64>", "reason": "",
     "timestamp": 1795301057}

``type`` is one of :data:`TYPES`; ``node_id`` is the sender (u32);
``public_key`` the sender's Ed25519 key in standard base64 (may be empty);
``signature`` is base64 of the Ed25519 signature over
``handshake:<sender id>:<receiver id>`` (:func:`challenge`), the same
challenge for every type, covering neither the type nor the timestamp;
``timestamp`` is Unix seconds (an integer, as Go's ``int64``).

The receiver reads only the first chunk of the stream, so a message must fit
one 4096-byte segment (:data:`MAX_MESSAGE`); :func:`decode` refuses anything
longer.  Decoding is strict about presence and types and raises only
:class:`~pilot.errors.MalformedFrame`; keys it does not know are ignored, as
the reference's JSON decoder ignores them.

Pure: no I/O, no clock.  What a receiver does with a message (time window,
replay filter, whose key verifies it) is in :mod:`pilot.machines.trust`.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import attr

from pilot.errors import MalformedFrame
from pilot.identity import PUBLIC_KEY_LEN, SIGNATURE_LEN, b64decode, b64encode, verify

HANDSHAKE_PORT = 444

REQUEST = "handshake_request"
ACCEPT = "handshake_accept"
REJECT = "handshake_reject"
REVOKE = "handshake_revoke"
TYPES = frozenset({REQUEST, ACCEPT, REJECT, REVOKE})

#: The reason the reference writes in a revoke.
REVOKE_REASON = "trust revoked"

#: One stream segment: the receiver parses only the first chunk it reads.
MAX_MESSAGE = 4096

MAX_NODE_ID = 0xFFFFFFFF
#: Go's int64; anything beyond is not a time a peer could have sent.
_MIN_TS = -(1 << 63)
_MAX_TS = (1 << 63) - 1

#: Wire order of the fields (the table in docs/reference-wire.md §5.1).
FIELDS = ("type", "node_id", "public_key", "justification", "signature", "reason", "timestamp")


def challenge(sender_id: int, receiver_id: int) -> bytes:
    """The bytes a sender signs: ``handshake:<sender>:<receiver>`` in decimal."""
    return f"handshake:{int(sender_id)}:{int(receiver_id)}".encode("ascii")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_type(instance: object, attribute: "attr.Attribute[str]", value: str) -> None:
    if value not in TYPES:
        raise ValueError(f"unknown handshake type {value!r}")


def _check_node_id(instance: object, attribute: "attr.Attribute[int]", value: int) -> None:
    if not _is_int(value) or not 0 <= value <= MAX_NODE_ID:
        raise ValueError(f"node_id must be an integer 0..{MAX_NODE_ID}, not {value!r}")


def _check_bytes(length: int) -> Callable[[object, "attr.Attribute[bytes]", bytes], None]:
    def check(instance: object, attribute: "attr.Attribute[bytes]", value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) not in (0, length):
            raise ValueError(f"{attribute.name} must be empty or {length} bytes")
    return check


def _check_text(instance: object, attribute: "attr.Attribute[str]", value: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{attribute.name} must be text")


def _check_timestamp(instance: object, attribute: "attr.Attribute[int]", value: int) -> None:
    if not _is_int(value) or not _MIN_TS <= value <= _MAX_TS:
        raise ValueError(f"timestamp must be integer Unix seconds, not {value!r}")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class HandshakeMessage:
    """One port-444 message; validated on construction (``ValueError``)."""

    type: str = attr.ib(validator=_check_type)
    node_id: int = attr.ib(validator=_check_node_id)
    public_key: bytes = attr.ib(validator=_check_bytes(PUBLIC_KEY_LEN), repr=False)
    justification: str = attr.ib(validator=_check_text)
    signature: bytes = attr.ib(validator=_check_bytes(SIGNATURE_LEN), repr=False)
    reason: str = attr.ib(validator=_check_text)
    timestamp: int = attr.ib(validator=_check_timestamp)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "node_id": self.node_id,
            "public_key": b64encode(self.public_key) if self.public_key else "",
            "justification": self.justification,
            "signature": b64encode(self.signature) if self.signature else "",
            "reason": self.reason,
            "timestamp": self.timestamp,
        }

    def encode(self) -> bytes:
        """
        Compact UTF-8 JSON.  ``ValueError`` if it would not fit one segment
        (a local mistake: the caller let a justification or reason grow too long).
        """
        data = json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"handshake message is {len(data)} bytes; at most {MAX_MESSAGE} fit one segment")
        return data

    @classmethod
    def from_json(cls, value: Any) -> "HandshakeMessage":
        """The message in a decoded JSON value; ``MalformedFrame`` for anything else."""
        if not isinstance(value, dict):
            raise MalformedFrame("a handshake message is a JSON object")
        missing = [f for f in FIELDS if f not in value]
        if missing:
            raise MalformedFrame(f"handshake message lacks {', '.join(missing)}")
        for name in ("type", "public_key", "justification", "signature", "reason"):
            if not isinstance(value[name], str):
                raise MalformedFrame(f"handshake {name} must be a string")
        for name in ("node_id", "timestamp"):
            if not _is_int(value[name]):
                raise MalformedFrame(f"handshake {name} must be an integer")
        try:
            public_key = b64decode(value["public_key"], PUBLIC_KEY_LEN, "public_key") \
                if value["public_key"] else b""
            signature = b64decode(value["signature"], SIGNATURE_LEN, "signature") \
                if value["signature"] else b""
            return cls(value["type"], value["node_id"], public_key, value["justification"],
                       signature, value["reason"], value["timestamp"])
        except ValueError as e:
            raise MalformedFrame(f"bad handshake message: {e}") from None

    def signed_by(self, receiver_id: int, sign: Callable[[bytes], bytes]) -> "HandshakeMessage":
        """This message with ``signature`` set by ``sign`` over the challenge to ``receiver_id``."""
        return attr.evolve(self, signature=sign(challenge(self.node_id, receiver_id)))

    def verifies(self, receiver_id: int, public_key: bytes) -> bool:
        """True if ``signature`` is ``public_key``'s, over the challenge to ``receiver_id``."""
        if not self.signature:
            return False
        return verify(public_key, challenge(self.node_id, receiver_id), self.signature)


def make_message(type: str, sender_id: int, receiver_id: int, public_key: bytes,
                 sign: Callable[[bytes], bytes], timestamp: int,
                 justification: str = "", reason: str = "") -> HandshakeMessage:
    """A signed message from ``sender_id`` (whose key is ``public_key``) to ``receiver_id``."""
    unsigned = HandshakeMessage(type, sender_id, public_key, justification, b"", reason, timestamp)
    return unsigned.signed_by(receiver_id, sign)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MalformedFrame(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise MalformedFrame(f"{name} is not JSON")


def decode(data: Any) -> HandshakeMessage:
    """
    Decode one message from the first chunk of a port-444 stream.

    Raises only :class:`MalformedFrame`: for non-bytes, more than
    :data:`MAX_MESSAGE` bytes, bad UTF-8, bad or nested-too-deep JSON,
    ``NaN``/``Infinity``, duplicate keys, a missing field, a wrong type, an
    unknown ``type``, bad base64 or a key or signature of the wrong length.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise MalformedFrame(f"a handshake message is bytes, not {type(data).__name__}")
    if len(data) > MAX_MESSAGE:
        raise MalformedFrame(f"handshake message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                           parse_constant=_no_constants)
    except MalformedFrame:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MalformedFrame(f"handshake message is not JSON: {str(e)[:100]}") from None
    return HandshakeMessage.from_json(value)
