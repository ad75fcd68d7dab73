# -*- test-case-name: tests.protocols.test_control -*-
"""
The control socket's frames (``docs/control.md``): bytes <-> JSON objects.

Framing is the registry's (4-byte big-endian length, a UTF-8 JSON object, at
most 1 MiB): frames are written with :func:`~pilot.wire.registry.encode_frame`
and read with :class:`ControlDecoder`, which, unlike the registry's decoder,
hands frames out one at a time, so that the bytes following a ``connect`` or
``attach`` request stay behind as the start of the raw stream.
:func:`ok_reply` and :func:`error_reply` build the reply objects.

Pure: no I/O, no reactor, no logging.  The server is
:mod:`pilot.protocols.control`, the client ``pilot/control.py``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from pilot.errors import MalformedFrame, PilotError
from pilot.wire.registry import MAX_FRAME

MAX_MESSAGE = 4096

_LEN = struct.Struct(">I")


def decode_message(body: bytes) -> dict[str, Any]:
    """One frame's body to a JSON object; ``MalformedFrame`` with the reason otherwise."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MalformedFrame(f"control frame is not JSON: {str(e)[:80]}") from None
    if not isinstance(value, dict):
        raise MalformedFrame(f"control frame must be a JSON object, not {type(value).__name__}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class ControlDecoder:
    """
    Sans-I/O frame reader: :meth:`feed` bytes, take frames with :meth:`next_frame`.

    Frames are taken one at a time so that :meth:`take_rest` can hand the
    bytes after a frame to whatever the connection becomes next (raw mode).
    An oversized length breaks the stream for good: every later
    :meth:`next_frame` raises.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self.broken: str | None = None

    def feed(self, data: bytes) -> None:
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
            self.broken = f"control frame of {length} bytes exceeds the {self._max}-byte limit"
            self._buf.clear()
            raise MalformedFrame(self.broken)
        if len(self._buf) < 4 + length:
            return None
        body = bytes(self._buf[4:4 + length])
        del self._buf[:4 + length]
        try:
            return decode_message(body)
        except MalformedFrame as e:
            return e

    def take_rest(self) -> bytes:
        """Everything fed but not yet taken as a frame; the decoder is empty afterwards."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def has_frame(self) -> bool:
        """Would :meth:`next_frame` return (or raise) something now?"""
        if self.broken is not None or len(self._buf) < 4:
            return self.broken is not None
        length: int = _LEN.unpack_from(self._buf)[0]
        return length > self._max or len(self._buf) >= 4 + length


def ok_reply(request_id: int | None, result: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}


def error_reply(request_id: int | None, error: PilotError) -> dict[str, Any]:
    return {"id": request_id, "ok": False,
            "error": {"code": error.code.name, "message": _clip(error.message),
                      "hint": _clip(error.hint or "")}}


def _clip(text: str) -> str:
    text = text if isinstance(text, str) else str(text)
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."
