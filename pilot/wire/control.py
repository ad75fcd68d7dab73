# -*- test-case-name: tests.wire.test_control -*-
"""
The control socket's frames (``docs/control.md``): bytes <-> JSON objects,
and typed access to a request's arguments.

Framing is the registry's (4-byte big-endian length, a UTF-8 JSON object, at
most 1 MiB): frames are written with :func:`~pilot.wire.registry.encode_frame`
and read with the registry's :class:`~pilot.wire.registry.FrameDecoder`, made
by :func:`frame_decoder`; the server takes frames one at a time, so that the
bytes following a ``connect`` or ``attach`` request stay behind as the start
of the raw stream.  :class:`Arguments` checks a request's arguments;
:func:`ok_reply` and :func:`error_reply` build the reply objects.

Pure: no I/O, no reactor, no logging.  The server is
:mod:`pilot.protocols.control_server`, the client :mod:`pilot.control_client`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

from pilot.errors import InvalidArgument, MalformedFrame, PilotError
from pilot.wire.registry import MAX_FRAME, FrameDecoder

MAX_MESSAGE = 4096

MAX_TEXT = 4096
MAX_TARGET = 512
MAX_TAGS = 64
MAX_TAG_LEN = 256
MAX_PING_COUNT = 10_000
MAX_PING_TIMEOUT = 3600.0
MAX_PING_INTERVAL = 60.0
MAX_ID = (1 << 53) - 1


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


def frame_decoder(max_frame: int = MAX_FRAME) -> FrameDecoder:
    """A reader of control frames: the registry's framing, any JSON object as the body."""
    return FrameDecoder(max_frame, decode_message, "control")


# --- replies ---------------------------------------------------------------------------------

def ok_reply(request_id: int | None, result: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}


def error_reply(request_id: int | None, error: PilotError) -> dict[str, Any]:
    return {"id": request_id, "ok": False,
            "error": {"code": error.code.name, "message": _clip(error.message),
                      "hint": _clip(error.hint or "")}}


def _clip(text: str) -> str:
    text = text if isinstance(text, str) else str(text)
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."


# --- a request's arguments -------------------------------------------------------------------

_REQUIRED: Any = object()


class Arguments:
    """Typed access to a request's arguments; each accessor raises ``InvalidArgument`` with the reason."""

    def __init__(self, message: dict[str, Any]) -> None:
        self._m = message

    def _get(self, key: str, default: Any) -> Any:
        value = self._m.get(key)
        if value is None:
            if default is _REQUIRED:
                raise InvalidArgument(f"missing argument {key!r}")
            return default
        return value

    def text(self, key: str, max_len: int = MAX_TEXT, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if not isinstance(value, str):
            raise InvalidArgument(f"argument {key!r} must be a string")
        if len(value) > max_len:
            raise InvalidArgument(f"argument {key!r} is longer than {max_len} characters")
        return value

    def integer(self, key: str, low: int, high: int, default: Any = _REQUIRED) -> int:
        value = self._get(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"argument {key!r} must be an integer")
        if not low <= value <= high:
            raise InvalidArgument(f"argument {key!r} must be {low} to {high}, got {value}")
        return value

    def number(self, key: str, low: float, high: float, default: Any = _REQUIRED) -> float:
        value = self._get(key, default)
        if value is default and default is not _REQUIRED:
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"argument {key!r} must be a number")
        value = float(value)
        if not (math.isfinite(value) and low <= value <= high):
            raise InvalidArgument(f"argument {key!r} must be {low:g} to {high:g}")
        return value

    def flag(self, key: str) -> bool:
        value = self._get(key, _REQUIRED)
        if not isinstance(value, bool):
            raise InvalidArgument(f"argument {key!r} must be true or false")
        return value

    def texts(self, key: str, max_items: int, max_len: int) -> list[str]:
        value = self._get(key, _REQUIRED)
        if not isinstance(value, list):
            raise InvalidArgument(f"argument {key!r} must be a list of strings")
        if len(value) > max_items:
            raise InvalidArgument(f"argument {key!r} has more than {max_items} items")
        for item in value:
            if not isinstance(item, str) or len(item) > max_len:
                raise InvalidArgument(f"argument {key!r} must be a list of strings "
                                      f"of at most {max_len} characters")
        return list(value)

    def data(self, key: str) -> bytes:
        value = self._get(key, _REQUIRED)
        if not isinstance(value, str):
            raise InvalidArgument(f"argument {key!r} must be a base64 string")
        try:
            return base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise InvalidArgument(f"argument {key!r} is not valid base64") from None

    def port(self, key: str = "port") -> int:
        return self.integer(key, 0, 0xFFFF)

    def node_id(self, key: str = "node_id") -> int:
        return self.integer(key, 0, 0xFFFFFFFF)

    def target(self, key: str = "target") -> str:
        value = self.text(key, MAX_TARGET)
        if not value:
            raise InvalidArgument(f"argument {key!r} must not be empty")
        return value
