# -*- test-case-name: tests.wire.test_dataexchange -*-
"""
Data exchange frames, port 1001 (``docs/reference-wire.md`` §8.1), byte for
byte the reference's::

    type (4 bytes, 1 text, 2 binary, 3 JSON, 4 file) | length L (4 bytes) | payload (L bytes)

A file frame's payload is ``name length (2 bytes) | name (UTF-8) | content``.
All integers big-endian; L is at most 16 MiB (:data:`MAX_PAYLOAD`).

:class:`FrameReader` is sans-I/O and incremental: a file of 16 MiB passes
through it in the pieces it arrived in, so a receiver can write it to disk
as it comes (it never holds a whole payload).  It yields :class:`Start` (the
type, the length and, for a file, the name), :class:`Chunk` and :class:`End`
for each frame.  :class:`FrameDecoder` collects whole frames on top of it,
for the small frames (the ACK/ERR replies).  A length over the limit, a
file name longer than its payload or not UTF-8 break the stream: the reader
raises ``MalformedFrame`` and every later call raises it again.

Pure: no I/O, no reactor, no logging.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Union

from pilot.errors import MalformedFrame

TEXT, BINARY, JSON, FILE = 1, 2, 3, 4
#: The names the reference's replies use (``ACK TEXT 5 bytes``).
TYPE_NAMES = {TEXT: "TEXT", BINARY: "BINARY", JSON: "JSON", FILE: "FILE"}
TYPES_BY_NAME = {name.lower(): number for number, name in TYPE_NAMES.items()}

#: The reference's limit on a frame's payload (16 MiB); a larger length aborts the stream.
MAX_PAYLOAD = 16 * 1024 * 1024
MAX_NAME = 0xFFFF
HEADER_LEN = 8

_HEADER = struct.Struct(">II")
_NAME_LEN = struct.Struct(">H")


@dataclass(frozen=True)
class Frame:
    """A whole frame: its type number and payload (for a file, the name is still inside)."""

    type: int
    payload: bytes


@dataclass(frozen=True)
class Start:
    """A frame begins: ``length`` payload bytes follow (for a file, ``length`` counts the content only)."""

    type: int
    length: int
    name: str | None = None


@dataclass(frozen=True)
class Chunk:
    data: bytes


@dataclass(frozen=True)
class End:
    """The frame whose :class:`Start` came last is complete."""


Event = Union[Start, Chunk, End]


def type_name(frame_type: int) -> str:
    """``TEXT``, ``BINARY``, ``JSON``, ``FILE``, or ``TYPE<n>`` for a number the reference does not use."""
    return TYPE_NAMES.get(frame_type, f"TYPE{frame_type}")


def encode_header(frame_type: int, length: int) -> bytes:
    if not 0 <= frame_type <= 0xFFFFFFFF:
        raise ValueError(f"frame type {frame_type} does not fit in 4 bytes")
    if not 0 <= length <= MAX_PAYLOAD:
        raise ValueError(f"payload of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return _HEADER.pack(frame_type, length)


def encode_frame(frame_type: int, payload: bytes) -> bytes:
    return encode_header(frame_type, len(payload)) + payload


def file_prefix(name: str, content_length: int) -> bytes:
    """A file frame's header and name: write the ``content_length`` content bytes after it."""
    raw = name.encode("utf-8")
    if len(raw) > MAX_NAME:
        raise ValueError(f"file name of {len(raw)} bytes exceeds {MAX_NAME}")
    return encode_header(FILE, _NAME_LEN.size + len(raw) + content_length) + _NAME_LEN.pack(len(raw)) + raw


def encode_file(name: str, content: bytes) -> bytes:
    return file_prefix(name, len(content)) + content


def decode_file(payload: bytes) -> tuple[str, bytes]:
    """A file frame's payload to ``(name, content)``; ``MalformedFrame`` if the name does not fit or decode."""
    if len(payload) < _NAME_LEN.size:
        raise MalformedFrame("file frame shorter than its name length")
    (n,) = _NAME_LEN.unpack_from(payload)
    if _NAME_LEN.size + n > len(payload):
        raise MalformedFrame(f"file name of {n} bytes is longer than the frame")
    return _name(payload[2:2 + n]), payload[2 + n:]


def _name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedFrame("file name is not UTF-8") from None


def ack_text(frame_type: int, length: int) -> str:
    """The reference's reply to a saved frame (``length``: the payload's, for a file its content's)."""
    return f"ACK {type_name(frame_type)} {length} bytes"


def err_text(frame_type: int, reason: str) -> str:
    return f"ERR {type_name(frame_type)} save failed: {reason}"


class FrameReader:
    """See the module docstring: bytes in, :class:`Start` / :class:`Chunk` / :class:`End` out."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._max = max_payload
        self._buf = bytearray()
        self._type = 0
        self._left = -1       # payload bytes still to pass on; -1 between frames
        self._naming = False  # a file frame whose name is not complete yet
        self.broken: str | None = None

    @property
    def idle(self) -> bool:
        """True between frames with nothing buffered: the peer may close here without losing data."""
        return self._left < 0 and not self._buf

    def feed(self, data: bytes) -> list[Event]:
        if self.broken is not None:
            raise MalformedFrame(self.broken)
        self._buf += data
        out: list[Event] = []
        try:
            while self._step(out):
                pass
        except MalformedFrame as e:
            self.broken = str(e)
            self._buf.clear()
            raise
        return out

    def _step(self, out: list[Event]) -> bool:
        if self._left < 0:
            if len(self._buf) < HEADER_LEN:
                return False
            self._type, length = _HEADER.unpack_from(self._buf)
            if length > self._max:
                raise MalformedFrame(f"data exchange frame of {length} bytes exceeds the {self._max}-byte limit")
            del self._buf[:HEADER_LEN]
            self._left = length
            if self._type == FILE:
                self._naming = True
            else:
                out.append(Start(self._type, length))
            return True
        if self._naming:
            if self._left < _NAME_LEN.size:
                raise MalformedFrame("file frame shorter than its name length")
            if len(self._buf) < _NAME_LEN.size:
                return False
            (n,) = _NAME_LEN.unpack_from(self._buf)
            if _NAME_LEN.size + n > self._left:
                raise MalformedFrame(f"file name of {n} bytes is longer than the frame")
            if len(self._buf) < _NAME_LEN.size + n:
                return False
            name = _name(bytes(self._buf[2:2 + n]))
            del self._buf[:2 + n]
            self._left -= 2 + n
            self._naming = False
            out.append(Start(FILE, self._left, name))
            return True
        if self._left > 0:
            if not self._buf:
                return False
            take = min(self._left, len(self._buf))
            out.append(Chunk(bytes(self._buf[:take])))
            del self._buf[:take]
            self._left -= take
            return True
        out.append(End())
        self._left = -1
        return True


class FrameDecoder:
    """Whole :class:`Frame` values (a file's name still in its payload), for small frames such as replies."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._reader = FrameReader(max_payload)
        self._start: Start | None = None
        self._parts: list[bytes] = []

    @property
    def idle(self) -> bool:
        return self._reader.idle

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        for event in self._reader.feed(data):
            if isinstance(event, Start):
                self._start, self._parts = event, []
            elif isinstance(event, Chunk):
                self._parts.append(event.data)
            elif self._start is not None:
                body = b"".join(self._parts)
                if self._start.name is not None:
                    raw = self._start.name.encode("utf-8")
                    body = _NAME_LEN.pack(len(raw)) + raw + body
                frames.append(Frame(self._start.type, body))
                self._start, self._parts = None, []
        return frames
