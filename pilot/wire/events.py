# -*- test-case-name: tests.wire.test_events -*-
"""
Event stream frames, port 1002 (``docs/reference-wire.md`` §8.2), byte for
byte the reference's::

    topic length T (2 bytes, at most 1024) | topic (UTF-8) | payload length P (4 bytes) | payload

All integers big-endian; P is at most 16 MiB.  The first event on a
connection is the subscription (its topic the subscribed topic, its payload
ignored); every later one is a publish.  ``*`` is the only wildcard.

:class:`EventDecoder` is sans-I/O: feed it bytes, get :class:`Event` values.
A topic or payload length over its limit breaks the stream
(``MalformedFrame``, then :attr:`EventDecoder.broken` and every later call
raises); a topic that is not UTF-8 is returned as the ``MalformedFrame`` it
gave, in its place, and the stream stays usable (its length was honest).

Pure: no I/O, no reactor, no logging.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pilot.errors import MalformedFrame

MAX_TOPIC = 1024
MAX_PAYLOAD = 16 * 1024 * 1024
#: The topic a subscriber names to receive every topic.
WILDCARD = "*"

_TOPIC_LEN = struct.Struct(">H")
_PAYLOAD_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class Event:
    topic: str
    payload: bytes = b""


def encode_event(topic: str, payload: bytes = b"") -> bytes:
    raw = topic.encode("utf-8")
    if len(raw) > MAX_TOPIC:
        raise ValueError(f"topic of {len(raw)} bytes exceeds {MAX_TOPIC}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"event payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return _TOPIC_LEN.pack(len(raw)) + raw + _PAYLOAD_LEN.pack(len(payload)) + payload


def check_topic(topic: str) -> str | None:
    """Why ``topic`` cannot be sent (empty, too long), or None."""
    if not topic:
        return "the topic is empty"
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC:
        return f"the topic is longer than {MAX_TOPIC} bytes"
    return None


class EventDecoder:
    """See the module docstring."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._max = max_payload
        self._buf = bytearray()
        self.broken: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete event."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event | MalformedFrame]:
        if self.broken is not None:
            raise MalformedFrame(self.broken)
        self._buf += data
        out: list[Event | MalformedFrame] = []
        while True:
            try:
                item = self._next()
            except MalformedFrame as e:
                self.broken = str(e)
                self._buf.clear()
                raise
            if item is None:
                return out
            out.append(item)

    def _next(self) -> Event | MalformedFrame | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        (t,) = _TOPIC_LEN.unpack_from(buf)
        if t > MAX_TOPIC:
            raise MalformedFrame(f"event topic of {t} bytes exceeds {MAX_TOPIC}")
        if len(buf) < 2 + t + 4:
            return None
        (p,) = _PAYLOAD_LEN.unpack_from(buf, 2 + t)
        if p > self._max:
            raise MalformedFrame(f"event payload of {p} bytes exceeds the {self._max}-byte limit")
        end = 6 + t + p
        if len(buf) < end:
            return None
        raw_topic, payload = bytes(buf[2:2 + t]), bytes(buf[6 + t:end])
        del buf[:end]
        try:
            return Event(raw_topic.decode("utf-8"), payload)
        except UnicodeDecodeError:
            return MalformedFrame("event topic is not UTF-8")
