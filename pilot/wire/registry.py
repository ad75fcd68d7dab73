# -*- test-case-name: tests.wire.test_registry -*-
"""
Registry messages on TCP: framing, field access, and the two signature forms.

Framing is the reference's: each message, both ways, is a 4-byte big-endian
length and then that many bytes of UTF-8 JSON holding one object; at most
1 MiB.  :class:`FrameDecoder` is sans-I/O: feed it bytes, get objects back;
the control socket reads its frames with it too (``pilot/wire/control.py``).

Signatures.  The reference signs a fixed challenge (``heartbeat:7``) with no
nonce, so a captured request replays forever and one signature authorises any
field value.  Our nodes add an ``auth`` object (ignored by the reference)::

    "auth": {"ts": <unix milliseconds>, "nonce": "<base64 of 16 bytes>",
             "sig": "<base64 Ed25519 signature>"}

signed over :func:`auth_message`: a context string, the timestamp, the nonce
and the canonical JSON of every other field of the request, so the signature
covers the values, and a registry that remembers nonces for the allowed clock
skew refuses any replay (``docs/security.md``).
"""

from __future__ import annotations

import json
import math
import struct
import base64
from typing import Any, Callable

from pilot.errors import MalformedFrame

MAX_FRAME = 1 << 20
_LEN = struct.Struct(">I")

AUTH_CONTEXT = b"pilot-registry-auth-v1"
#: Domain separation for the new key's proof of possession in ``rotate_key``.
ROTATE_CONTEXT = b"pilot-rotate-key-v1"
NONCE_LEN = 16


def _one_shot(encoder: json.JSONEncoder) -> Callable[[Any], str]:
    """
    ``encoder.encode`` for objects, with its C encoder made once: ``encode``
    makes a new one per call (about a third of a small reply's encoding time,
    on every request the registry answers).  The same C function with the
    same arguments as ``JSONEncoder.iterencode`` gives; without the C
    extension, ``encoder.encode`` itself.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None or encoder.check_circular or encoder.indent is not None:
        return encoder.encode
    escape = json.encoder.encode_basestring_ascii if encoder.ensure_ascii else json.encoder.encode_basestring
    iterencode = make(None, encoder.default, escape, None, encoder.key_separator, encoder.item_separator,
                      encoder.sort_keys, encoder.skipkeys, encoder.allow_nan)

    def encode(value: Any) -> str:
        return "".join(iterencode(value, 0))
    return encode


# made once: json.dumps/loads with any option build a new encoder/decoder per call
# (no cycle check: what they encode came from JSON or from our handlers)
_ENCODE = _one_shot(json.JSONEncoder(separators=(",", ":"), check_circular=False))
_CANONICAL = _one_shot(json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                                        check_circular=False))


def encode_frame(message: dict[str, Any]) -> bytes:
    # ASCII escapes: a lone surrogate a client sent us still encodes
    body = _ENCODE(message).encode("ascii")
    if len(body) > MAX_FRAME:
        raise ValueError(f"registry message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """One frame's body to a message object; ``MalformedFrame`` for anything else."""
    try:
        text = body.decode("utf-8")
        try:
            # most bodies are exactly one object: no whitespace to skip around it
            value, end = _RAW_DECODE(text)
            if end != len(text):
                raise ValueError("more than one value")
        except ValueError:
            value = _DECODE(text)  # the whole rule (whitespace around it), and its errors
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MalformedFrame(f"registry frame is not JSON: {str(e)[:80]}") from None
    if not isinstance(value, dict):
        raise MalformedFrame(f"registry frame must be a JSON object, not {type(value).__name__}")
    if not isinstance(value.get("type"), str):
        raise MalformedFrame("registry message has no string 'type'")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_DECODE = _DECODER.decode
_RAW_DECODE = _DECODER.raw_decode


class FrameDecoder:
    """
    Sans-I/O reader of length-prefixed JSON frames: the registry's, and the
    control socket's (:func:`pilot.wire.control.frame_decoder`).

    ``max_frame`` bounds a frame's length, ``decode`` turns one body into a
    message (raising ``MalformedFrame``), ``kind`` names the frames in errors.
    :meth:`feed` buffers bytes and returns every complete frame; a reader that
    must stop after one frame (the control socket, whose ``connect`` turns the
    rest of the stream into raw bytes) uses :meth:`receive`,
    :meth:`next_frame` and :meth:`take_rest` instead.

    After a ``MalformedFrame`` from an oversized length the stream cannot be
    resynchronised, so :attr:`broken` is set and every later call raises.
    A frame whose body is bad JSON is a ``MalformedFrame`` value; the stream
    stays usable.
    """

    def __init__(self, max_frame: int = MAX_FRAME,
                 decode: Callable[[bytes], dict[str, Any]] = decode_body, kind: str = "registry") -> None:
        self._buf = bytearray()
        self._max = max_frame
        self._decode = decode
        self._kind = kind
        self.broken: str | None = None

    def feed(self, data: bytes) -> list[dict[str, Any] | MalformedFrame]:
        """
        Every complete frame so far, each as a message or as the
        ``MalformedFrame`` its body gave; raises ``MalformedFrame`` when the
        stream itself is broken (an oversized length).
        """
        if self.broken is not None:
            raise MalformedFrame(self.broken)
        if not self._buf and len(data) >= 4:
            # the common case, a request that came whole and alone: no copy into the buffer
            (length,) = _LEN.unpack_from(data)
            if length <= self._max and len(data) == 4 + length:
                try:
                    return [self._decode(data[4:])]
                except MalformedFrame as e:
                    return [e]
        self.receive(data)
        out: list[dict[str, Any] | MalformedFrame] = []
        while (item := self.next_frame()) is not None:
            out.append(item)
        return out

    def receive(self, data: bytes) -> None:
        """Buffer ``data`` (dropped once the stream is broken); take frames with :meth:`next_frame`."""
        if self.broken is None:
            self._buf += data

    def next_frame(self) -> dict[str, Any] | MalformedFrame | None:
        """The next message (or the ``MalformedFrame`` its body gave), or None if incomplete."""
        if self.broken is not None:
            raise MalformedFrame(self.broken)
        if len(self._buf) < 4:
            return None
        (length,) = _LEN.unpack_from(self._buf)
        if length > self._max:
            self.broken = f"{self._kind} frame of {length} bytes exceeds the {self._max}-byte limit"
            self._buf.clear()
            raise MalformedFrame(self.broken)
        if len(self._buf) < 4 + length:
            return None
        body = bytes(self._buf[4:4 + length])
        del self._buf[:4 + length]
        try:
            return self._decode(body)
        except MalformedFrame as e:
            return e

    def take_rest(self) -> bytes:
        """Everything received but not yet taken as a frame; the decoder is empty afterwards."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def has_frame(self) -> bool:
        """Would :meth:`next_frame` return (or raise) something now?"""
        if self.broken is not None:
            return True
        if len(self._buf) < 4:
            return False
        length: int = _LEN.unpack_from(self._buf)[0]
        return length > self._max or len(self._buf) >= 4 + length


# --- field access: every accessor raises MalformedFrame(reason) -------------

def get_int(msg: dict[str, Any], key: str, bits: int = 32, default: int | None = None) -> int:
    if key not in msg or msg[key] is None:
        if default is not None:
            return default
        raise MalformedFrame(f"missing field {key!r}")
    value = msg[key]
    if isinstance(value, bool):
        raise MalformedFrame(f"field {key!r} must be a number")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise MalformedFrame(f"field {key!r} must be a whole number")
        value = int(value)
    if not isinstance(value, int):
        raise MalformedFrame(f"field {key!r} must be a number")
    if not 0 <= value < (1 << bits):
        raise MalformedFrame(f"field {key!r} out of range")
    return value


def get_str(msg: dict[str, Any], key: str, default: str | None = None, max_len: int = 4096) -> str:
    if key not in msg or msg[key] is None:
        if default is not None:
            return default
        raise MalformedFrame(f"missing field {key!r}")
    value = msg[key]
    if not isinstance(value, str):
        raise MalformedFrame(f"field {key!r} must be a string")
    if len(value) > max_len:
        raise MalformedFrame(f"field {key!r} is longer than {max_len} characters")
    return value


def get_bool(msg: dict[str, Any], key: str, default: bool | None = None) -> bool:
    if key not in msg or msg[key] is None:
        if default is not None:
            return default
        raise MalformedFrame(f"missing field {key!r}")
    value = msg[key]
    if not isinstance(value, bool):
        raise MalformedFrame(f"field {key!r} must be true or false")
    return value


def get_str_list(msg: dict[str, Any], key: str, max_items: int, max_len: int = 256) -> list[str]:
    value = msg.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedFrame(f"field {key!r} must be a list of strings")
    if len(value) > max_items:
        raise MalformedFrame(f"field {key!r} has more than {max_items} items")
    for item in value:
        if not isinstance(item, str) or len(item) > max_len:
            raise MalformedFrame(f"field {key!r} must hold strings of at most {max_len} characters")
    return list(value)


# --- signatures ---------------------------------------------------------------

#: Request type -> (challenge prefix, the id fields after it), as the reference signs.
LEGACY_CHALLENGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "set_hostname": ("set_hostname", ("node_id",)),
    "set_visibility": ("set_visibility", ("node_id",)),
    "set_tags": ("set_tags", ("node_id",)),
    "set_task_exec": ("set_task_exec", ("node_id",)),
    "heartbeat": ("heartbeat", ("node_id",)),
    "deregister": ("deregister", ("node_id",)),
    "rotate_key": ("rotate", ("node_id",)),
    "resolve": ("resolve", ("requester_id", "node_id")),
    "report_trust": ("report_trust", ("node_id", "peer_id")),
    "revoke_trust": ("revoke_trust", ("node_id", "peer_id")),
    "request_handshake": ("handshake", ("from_node_id", "to_node_id")),
    "poll_handshakes": ("poll_handshakes", ("node_id",)),
    "respond_handshake": ("respond", ("node_id", "peer_id")),
    "punch": ("punch", ("node_a", "node_b")),
}

#: Request type -> the field naming the node whose key signs it.
SIGNER_FIELD: dict[str, str] = {
    "set_hostname": "node_id", "set_visibility": "node_id", "set_tags": "node_id",
    "set_task_exec": "node_id", "heartbeat": "node_id", "deregister": "node_id",
    "rotate_key": "node_id", "resolve": "requester_id", "report_trust": "node_id",
    "revoke_trust": "node_id", "request_handshake": "from_node_id",
    "poll_handshakes": "node_id", "respond_handshake": "node_id", "punch": "requester_id",
    "subscribe_events": "node_id", "lookup": "requester_id", "list_nodes": "requester_id",
    "put_trust_statements": "node_id", "get_trust_statements": "node_id",
}


def legacy_challenge(msg: dict[str, Any]) -> bytes | None:
    """The reference's fixed challenge for this request, or None if it has none."""
    kind = msg.get("type")
    spec = LEGACY_CHALLENGES.get(kind) if isinstance(kind, str) else None
    if spec is None:
        return None
    prefix, keys = spec
    return ":".join([prefix] + [str(get_int(msg, k)) for k in keys]).encode("ascii")


def canonical_body(msg: dict[str, Any]) -> bytes:
    body = {k: v for k, v in msg.items() if k not in ("auth", "signature")}
    return _CANONICAL(body).encode("ascii")


def auth_message(msg: dict[str, Any], ts_ms: int, nonce: bytes) -> bytes:
    return b"\n".join([AUTH_CONTEXT, str(ts_ms).encode("ascii"), nonce, canonical_body(msg)])


def rotate_proof_message(node_id: int, old_key: bytes, new_key: bytes) -> bytes:
    """
    What the *new* key signs in ``rotate_key``'s ``new_key_proof`` field: "the
    holder of ``new_key`` agrees to take over node ``node_id`` from ``old_key``".
    """
    return b"\n".join([ROTATE_CONTEXT, str(node_id).encode("ascii"), old_key, new_key])


def sign_request(msg: dict[str, Any], sign: Callable[[bytes], bytes], ts_ms: int, nonce: bytes,
                 legacy: bool = True) -> dict[str, Any]:
    """
    ``msg`` with both signature forms added: the reference's ``signature``
    (so a reference registry accepts it) and our ``auth`` (which ours prefers).
    ``sign`` is the node's Ed25519 signing function.
    """
    out = dict(msg)
    out.pop("auth", None)
    out.pop("signature", None)
    if legacy:
        challenge = legacy_challenge(out)
        if challenge is not None:
            out["signature"] = base64.b64encode(sign(challenge)).decode("ascii")
    sig = sign(auth_message(out, ts_ms, nonce))
    out["auth"] = {
        "ts": ts_ms,
        "nonce": base64.b64encode(nonce).decode("ascii"),
        "sig": base64.b64encode(sig).decode("ascii"),
    }
    return out
