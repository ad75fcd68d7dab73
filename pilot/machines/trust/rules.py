# -*- test-case-name: tests.machines.test_trust -*-
"""
The auto-approve rules: which incoming trust requests are approved without
the operator (``docs/trust.md``).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping

import attr

from pilot.errors import InvalidArgument
from pilot.identity import PUBLIC_KEY_LEN, b64decode


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{what} must be a list of strings")
    return tuple(value)


def _tag(text: str) -> str:
    return (text[1:] if text.startswith("#") else text).lower()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AutoApprove:
    """
    Which incoming requests are approved without the operator.

    ``hostnames`` are glob patterns (``fnmatch``: ``*``, ``?``, ``[...]``)
    matched against the hostname the registry reports for the peer;
    ``public_keys`` are raw 32-byte keys (standard base64 in the config);
    ``tags`` are matched exactly (a leading ``#`` ignored) against the peer's
    tags.  Hostnames and tags are whatever the registry says and tags are
    chosen by each node itself, so only key rules identify a peer; see
    ``docs/trust.md``.
    """

    hostnames: tuple[str, ...] = ()
    public_keys: tuple[bytes, ...] = ()
    tags: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, value: Mapping[str, Any] | None) -> "AutoApprove":
        """From ``{"hostnames": [...], "public_keys": [base64...], "tags": [...]}``."""
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise InvalidArgument("auto_approve must be an object")
        unknown = set(value) - {"hostnames", "public_keys", "tags"}
        if unknown:
            raise InvalidArgument(f"unknown auto_approve keys: {', '.join(sorted(unknown))}")
        try:
            keys = tuple(b64decode(k, PUBLIC_KEY_LEN, "an auto_approve public key")
                         for k in _strings(value.get("public_keys"), "public_keys"))
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        return cls(tuple(h.lower() for h in _strings(value.get("hostnames"), "hostnames")), keys,
                   tuple(_tag(t) for t in _strings(value.get("tags"), "tags")))

    def __bool__(self) -> bool:
        return bool(self.hostnames or self.public_keys or self.tags)

    @property
    def needs_info(self) -> bool:
        return bool(self.hostnames or self.tags)

    def by_key(self, public_key: bytes) -> str | None:
        """The matching rule for this key, described, or None."""
        if public_key and public_key in self.public_keys:
            return "public key"
        return None

    def by_info(self, info: Any) -> str | None:
        """The matching rule for a registry ``lookup`` answer (``hostname``, ``tags``), or None."""
        if not isinstance(info, Mapping):
            return None
        hostname = info.get("hostname")
        if isinstance(hostname, str) and hostname:
            for pattern in self.hostnames:
                if fnmatch.fnmatchcase(hostname.lower(), pattern):
                    return f"hostname {pattern}"
        tags = info.get("tags")
        if isinstance(tags, list):
            have = {_tag(t) for t in tags if isinstance(t, str)}
            for tag in self.tags:
                if tag in have:
                    return f"tag {tag}"
        return None
