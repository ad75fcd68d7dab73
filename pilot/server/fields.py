# -*- test-case-name: tests.server.test_state -*-
"""
Checks of the values a registry store's JSON holds (``pilot.server.state``):
each returns the value, or raises :class:`StoreFormatError` saying where.
"""

from __future__ import annotations

import binascii
from typing import Any

from pilot.server.times import StoreFormatError


def opt_field(raw: dict[str, Any], key: str, typ: type, default: Any) -> Any:
    """``_get`` for an optional field, with a fast path for the common, well-typed case."""
    value = raw.get(key)
    if value is None:
        return default
    if type(value) is typ:
        return value
    return get_field(raw, key, typ, default)


def get_field(obj: Any, key: str, typ: type, default: Any = None) -> Any:
    if not isinstance(obj, dict):
        raise StoreFormatError(f"expected an object holding {key!r}")
    if key not in obj or obj[key] is None:
        if default is None:
            raise StoreFormatError(f"missing {key!r}")
        return default
    value = obj[key]
    if typ is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise StoreFormatError(f"{key!r} must be {typ.__name__}, found {type(value).__name__}")
    return value


def stamp_text(r: dict[str, Any]) -> str:
    value = r.get("timestamp")
    return value if isinstance(value, str) else ""


def checked_id(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise StoreFormatError(f"{where}: {value!r} is not a node id")
    return value


def id_text(text: str, where: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        raise StoreFormatError(f"{where}: key {text!r} is not a node id")
    return int(text)


def split_ids(text: Any, sep: str, where: str) -> tuple[int, int]:
    if not isinstance(text, str) or text.count(sep) != 1:
        raise StoreFormatError(f"{where}: {text!r} is not 'A{sep}B'")
    a, b = text.split(sep)
    return checked_id(id_text(a, where), where), checked_id(id_text(b, where), where)


def list_of_dicts(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise StoreFormatError(f"{where} must map ids to lists of objects")
    return value


def strict_b64(text: str) -> bytes:
    """Standard base64 as strictly as :func:`pilot.identity.b64decode` (which says why it refuses)."""
    # before Python 3.11: TypeError, and the loader checks field by field
    return binascii.a2b_base64(text, **_STRICT)


_STRICT: dict[str, Any] = {"strict_mode": True}
