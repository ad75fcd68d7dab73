# -*- test-case-name: tests.server.test_state -*-
"""
Times in the registry's store: RFC 3339 text (to the second or to the
nanosecond, as the reference writes them) to and from Unix seconds.
"""

from __future__ import annotations

import datetime
import functools
import math
from typing import Any


class StoreFormatError(ValueError):
    """The store's JSON is not a registry store; the message says where."""


#: Times a store may hold: 1970 up to the end of year 9999.
MAX_TIME = 253402300799


def rfc3339(ts: float, nanos: bool = False) -> str:
    """Unix seconds to RFC 3339 UTC, to the second or (``nanos``) to the nanosecond."""
    whole = math.floor(ts)
    return rfc3339_ns(whole * 1_000_000_000 + (round((ts - whole) * 1e9) if nanos else 0), nanos)


@functools.lru_cache(maxsize=4096)
def rfc3339_second(whole: int) -> str:
    # a store's nodes share few distinct last_seen seconds
    return rfc3339_ns(whole * 1_000_000_000, False)


def rfc3339_ns(ns: int, nanos: bool = True) -> str:
    sec, frac = divmod(ns, 1_000_000_000)
    text = datetime.datetime.fromtimestamp(sec, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{frac:09d}Z" if nanos else text + "Z"


def parse_time(text: Any) -> float:
    """RFC 3339 (with up to nanoseconds) or a number to Unix seconds; absent means 0."""
    sec, ns = divmod(parse_time_ns(text), 1_000_000_000)
    return sec + ns / 1e9


def parse_time_ns(text: Any) -> int:
    """RFC 3339 (with up to nanoseconds) or a number of seconds to Unix nanoseconds; absent means 0."""
    if text is None or text == "":
        return 0
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not (0 <= text <= MAX_TIME):  # also refuses NaN
            raise StoreFormatError(f"{text!r} is not a time")
        return int(round(text * 1e9)) if isinstance(text, float) else text * 1_000_000_000
    if not isinstance(text, str) or len(text) > 64 or not text.isascii():
        raise StoreFormatError(f"{str(text)[:64]!r} is not a time")
    s = text.strip()
    nanos = 0
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    if "." in s:
        head, rest = s.split(".", 1)
        digits = ""
        while rest and rest[0] in "0123456789":
            digits, rest = digits + rest[0], rest[1:]
        if not digits or len(digits) > 9:
            raise StoreFormatError(f"{text!r} is not an RFC 3339 time")
        nanos = int(digits.ljust(9, "0"))
        s = head + rest
    try:
        dt = datetime.datetime.fromisoformat(s)
    except ValueError:
        raise StoreFormatError(f"{text!r} is not an RFC 3339 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    seconds = int(dt.timestamp())
    if not 0 <= seconds <= MAX_TIME:
        raise StoreFormatError(f"{text!r} is out of range")
    return seconds * 1_000_000_000 + nanos


@functools.lru_cache(maxsize=4096)
def parse_time_cached(text: str) -> float:
    # a store's nodes share few distinct last_seen stamps (one per flush second)
    return parse_time(text)
