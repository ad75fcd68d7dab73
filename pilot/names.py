# -*- test-case-name: tests.test_names -*-
"""Hostname and tag rules (the reference's), shared by the registry, the daemon and pilotctl."""

from __future__ import annotations

import re

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TAG = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
RESERVED_HOSTNAMES = frozenset({"localhost", "backbone", "broadcast"})
MAX_TAGS = 10


def hostname_problem(name: str) -> str | None:
    """Why ``name`` is not a valid hostname, or None if it is."""
    if not isinstance(name, str):
        return "a hostname is text"
    if not 1 <= len(name) <= 63:
        return "a hostname is 1 to 63 characters"
    if _LABEL.fullmatch(name) is None:
        return "a hostname is lower-case letters, digits and '-', starting and ending with a letter or digit"
    if name in RESERVED_HOSTNAMES:
        return f"{name!r} is reserved"
    return None


def normalise_tags(tags: list[str]) -> list[str]:
    """Validate and normalise tags (one leading '#' stripped); ``ValueError`` with the reason."""
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags")
    out: list[str] = []
    for tag in tags:
        if not isinstance(tag, str):
            raise ValueError("a tag is text")
        t = tag[1:] if tag.startswith("#") else tag
        if _TAG.fullmatch(t) is None:
            raise ValueError(f"invalid tag {tag[:40]!r}: 1-32 lower-case letters, digits and '-'")
        if t not in out:
            out.append(t)
    return out
