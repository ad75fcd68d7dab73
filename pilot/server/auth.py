# -*- test-case-name: tests.server.test_auth -*-
"""
Checking a request's signature: our replay-proof ``auth`` form, or the
reference's fixed-challenge ``signature``.

The rule (``docs/security.md``): a request carrying ``auth`` must verify, be
timestamped within :data:`MAX_SKEW` of the registry's clock, and carry a
nonce not seen within that window, and, when the registry has restarted, be
newer than the last request of that node it accepted before the restart (the
nonce memory is not persisted; that timestamp is, see ``state.py``; the
beacon's proofs follow the same rule, ``beacon.py``).  A key that has once verified this way is
*proven*; from then on the reference's replayable ``signature`` alone is no
longer enough for it.  Keys that never proved themselves (reference nodes)
keep the reference's rules.

A reference node signs the same challenge with the same key every 30 s, and
Ed25519 is deterministic, so its heartbeats and polls carry the very bytes
already verified.  :class:`VerifiedSignatures` remembers legacy signatures
that verified, keyed by the exact key, challenge and signature bytes: a
request whose three are all equal to a verified one is known good without a
second Ed25519 check; any other bytes are checked.  (The ``auth`` form never
repeats: its nonce is fresh, so it is always checked.)
"""

from __future__ import annotations

import binascii
import collections
from typing import Any

from pilot.errors import MalformedFrame
from pilot.identity import b64decode, verify
from pilot.wire.registry import NONCE_LEN, auth_message, legacy_challenge

#: How far a request's timestamp may be from the registry's clock (seconds).
MAX_SKEW = 120.0


def decode_b64(text: Any, length: int, what: str) -> bytes:
    """
    :func:`pilot.identity.b64decode` of ``length`` bytes, in C for the usual
    (canonical) text: what it accepts and refuses, and why, is the same.
    """
    if type(text) is str and len(text) == 4 * ((length + 2) // 3):
        try:
            data = binascii.a2b_base64(text)
        except ValueError:
            pass
        else:
            if len(data) == length and binascii.b2a_base64(data, newline=False) == text.encode("ascii"):
                return data
    return b64decode(text, length, what)


class AuthFailed(Exception):
    """The request's signature is missing, wrong, stale or replayed."""


class NonceCache:
    """Nonces seen within the skew window; bounded, oldest expire first."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self._seen: dict[bytes, float] = {}
        self._order: collections.deque[tuple[float, bytes]] = collections.deque()
        self.max_entries = max_entries

    def add(self, nonce: bytes, expires: float, now: float) -> bool:
        """Remember ``nonce`` until ``expires``; False if it was already there."""
        order = self._order
        while order and (order[0][0] <= now or len(order) >= self.max_entries):
            exp, old = order.popleft()
            if self._seen.get(old) == exp:
                del self._seen[old]
        if nonce in self._seen:
            return False
        self._seen[nonce] = expires
        order.append((expires, nonce))
        return True

    def __len__(self) -> int:
        return len(self._seen)


class VerifiedSignatures:
    """
    Legacy signatures that verified, by ``key ‖ signature ‖ challenge`` (the
    exact bytes); at most ``max_entries``, the oldest forgotten first.  Only
    a signature that verified is remembered, so a miss is always checked.
    """

    def __init__(self, max_entries: int = 262_144) -> None:
        self._seen: dict[bytes, None] = {}
        self.max_entries = max_entries
        self.hits = 0

    def verify(self, public_key: bytes, challenge: bytes, signature: bytes) -> bool:
        entry = public_key + signature + challenge
        if entry in self._seen and len(public_key) == 32 and len(signature) == 64:
            self.hits += 1
            return True
        if not verify(public_key, challenge, signature):
            return False
        if len(self._seen) >= self.max_entries:
            del self._seen[next(iter(self._seen))]
        self._seen[entry] = None
        return True

    def __len__(self) -> int:
        return len(self._seen)


class Authenticator:
    def __init__(self, max_skew: float = MAX_SKEW) -> None:
        self.max_skew = max_skew
        self.nonces = NonceCache()
        self.verified = VerifiedSignatures()

    def check(self, msg: dict[str, Any], public_key: bytes, proven: bool, now: float,
              floor_ms: int = 0) -> bool:
        """
        Verify ``msg`` as signed by ``public_key``; return True if it used the
        replay-proof form.  Raise :class:`AuthFailed` with the reason otherwise.
        ``floor_ms`` is the newest ``auth.ts`` of this key accepted before the
        registry (re)started: a request not newer than that is a replay.
        """
        auth = msg.get("auth")
        if auth is not None:
            self._check_auth(msg, auth, public_key, now, floor_ms)
            return True
        if proven:
            raise AuthFailed("this node has proved its key; requests must carry a fresh 'auth' signature")
        sig_text = msg.get("signature")
        if sig_text is None or sig_text == "":
            raise AuthFailed("missing signature")
        try:
            sig = decode_b64(sig_text, 64, "signature")
            challenge = legacy_challenge(msg)
        except (ValueError, MalformedFrame) as e:
            raise AuthFailed(str(e)) from None
        if challenge is None or not self.verified.verify(public_key, challenge, sig):
            raise AuthFailed("signature does not verify for this node's key")
        return False

    def _check_auth(self, msg: dict[str, Any], auth: Any, public_key: bytes, now: float,
                    floor_ms: int) -> None:
        if not isinstance(auth, dict):
            raise AuthFailed("'auth' must be an object")
        ts = auth.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts < 1 << 53:
            raise AuthFailed("'auth.ts' must be Unix milliseconds")
        try:
            nonce = decode_b64(auth.get("nonce"), NONCE_LEN, "auth.nonce")
            sig = decode_b64(auth.get("sig"), 64, "auth.sig")
        except ValueError as e:
            raise AuthFailed(str(e)) from None
        when = ts / 1000.0
        if abs(when - now) > self.max_skew:
            raise AuthFailed(f"'auth.ts' is {when - now:+.0f} s from the registry's clock "
                             f"(at most {self.max_skew:.0f} s allowed); check the node's clock")
        if not verify(public_key, auth_message(msg, ts, nonce), sig):
            raise AuthFailed("'auth' signature does not verify for this node's key")
        if ts <= floor_ms:
            raise AuthFailed("replayed request (not newer than one accepted before the registry restarted)")
        if not self.nonces.add(public_key + nonce, when + self.max_skew, now):
            raise AuthFailed("replayed request (nonce already used)")
