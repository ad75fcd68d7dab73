# -*- test-case-name: tests.machines.test_trust -*-
"""
The replay filter for direct trust messages (port 444): a message seen once
in its validity window is not acted on again (``docs/trust.md``).
"""

from __future__ import annotations

import collections
import hashlib
import json

from pilot.machines.trust.values import REPLAY_ENTRIES, REPLAY_MEMORY
from pilot.wire.handshake import HandshakeMessage


class ReplayFilter:
    """
    Digests of recently accepted messages, each kept ``memory`` seconds; at
    most ``entries`` (the oldest go first when full).
    """

    def __init__(self, memory: float = REPLAY_MEMORY, entries: int = REPLAY_ENTRIES) -> None:
        self.memory = memory
        self.entries = entries
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def first_time(self, digest: bytes, now: float) -> bool:
        """True (and remembered) if ``digest`` is new; False for a repeat."""
        while self._seen:
            oldest, expires = next(iter(self._seen.items()))
            if expires > now:
                break
            del self._seen[oldest]
        if digest in self._seen:
            return False
        while len(self._seen) >= self.entries:
            self._seen.popitem(last=False)
        self._seen[digest] = now + self.memory
        return True

    def forget(self, digest: bytes) -> None:
        self._seen.pop(digest, None)


def digest(message: HandshakeMessage) -> bytes:
    """SHA-256 of the message's canonical JSON (what the replay filter remembers)."""
    text = json.dumps(message.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).digest()
