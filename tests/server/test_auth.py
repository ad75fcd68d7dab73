"""
Tests for L{pilot.server.auth}: the reference's fixed-challenge signature and
our replay-proof ``auth`` form, and the nonce memory behind it.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import Identity, b64decode
from pilot.server import auth as auth_module
from pilot.server.auth import (
    MAX_SKEW, AuthFailed, Authenticator, NonceCache, VerifiedSignatures, decode_b64,
)
from pilot.wire.registry import legacy_challenge, sign_request

NOW = 1.8e9
ALICE = Identity.from_seed(b"\x01" * 32)
MALLORY = Identity.from_seed(b"\x02" * 32)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def legacy(ident: Identity, msg: dict[str, Any]) -> dict[str, Any]:
    challenge = legacy_challenge(msg)
    assert challenge is not None
    return {**msg, "signature": ident.sign_b64(challenge)}


def authed(ident: Identity, msg: dict[str, Any], ts: float = NOW, nonce: bytes = b"\x07" * 16,
           legacy_too: bool = False) -> dict[str, Any]:
    return sign_request(msg, ident.sign, int(ts * 1000), nonce, legacy=legacy_too)


class DecodeTests(SynchronousTestCase):
    """L{decode_b64} (the fast path) accepts and refuses what L{b64decode} does, with its reasons."""

    def outcome(self, decode: Any, text: Any, length: int) -> tuple[str, Any]:
        try:
            return "ok", decode(text, length, "field")
        except ValueError as e:
            return "error", str(e)

    def test_same_as_identity(self) -> None:
        key = bytes(range(32))
        good = b64(key)
        texts: list[Any] = [
            good, b64(bytes(range(16))), b64(bytes(range(64))), good[:-1] + "=", good[:-2] + "B=",
            good.rstrip("="), good[:-1] + "A", "!" + good[1:], " " + good[1:], good[:10] + "\n" + good[11:],
            good[:-2] + "==", "=" * 44, "é" * 44, "", None, 12, key, good + "AAAA", "-_" + good[2:],
        ]
        for text in texts:
            for length in (16, 32, 64):
                self.assertEqual(self.outcome(decode_b64, text, length),
                                 self.outcome(b64decode, text, length),
                                 (text, length))


class NonceCacheTests(SynchronousTestCase):
    def test_repeat_refused_until_expiry(self) -> None:
        cache = NonceCache()
        self.assertTrue(cache.add(b"n", expires=10.0, now=0.0))
        self.assertFalse(cache.add(b"n", expires=20.0, now=5.0))
        self.assertFalse(cache.add(b"n", expires=20.0, now=9.99))
        self.assertTrue(cache.add(b"n", expires=20.0, now=10.0))
        self.assertFalse(cache.add(b"n", expires=30.0, now=11.0))

    def test_distinct_nonces(self) -> None:
        cache = NonceCache()
        self.assertTrue(all(cache.add(bytes([i]), 10.0, 0.0) for i in range(200)))
        self.assertEqual(len(cache), 200)

    def test_expired_entries_dropped(self) -> None:
        cache = NonceCache()
        for i in range(100):
            cache.add(i.to_bytes(2, "big"), expires=float(i + 1), now=0.0)
        self.assertEqual(len(cache), 100)
        cache.add(b"new", expires=1000.0, now=50.0)  # the 50 entries with expiry <= 50 go
        self.assertEqual(len(cache), 50 + 1)
        cache.add(b"newer", expires=1000.0, now=500.0)
        self.assertEqual(len(cache), 2)

    def test_bounded(self) -> None:
        cache = NonceCache(max_entries=5)
        for i in range(50):
            self.assertTrue(cache.add(bytes([i]), expires=1e12, now=0.0))
            self.assertLessEqual(len(cache), 5)
        # the oldest are forgotten first, the newest remembered
        self.assertFalse(cache.add(bytes([49]), 1e12, 0.0))
        self.assertTrue(cache.add(bytes([0]), 1e12, 0.0))

    def test_eviction_and_readd_keep_cache_consistent(self) -> None:
        cache = NonceCache(max_entries=3)
        for round_ in range(10):
            for i in range(4):
                cache.add(bytes([i]), expires=1e12, now=float(round_))
            self.assertLessEqual(len(cache), 3)
            self.assertLessEqual(len(cache._order), 3)


class LegacySignatureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.auth = Authenticator()

    def test_vector_style_challenge(self) -> None:
        msg = legacy(ALICE, {"type": "heartbeat", "node_id": 1})
        self.assertIs(self.auth.check(msg, ALICE.public_key, False, NOW), False)

    def test_every_challenge_type(self) -> None:
        for msg in ({"type": "set_hostname", "node_id": 9, "hostname": "a"},
                    {"type": "resolve", "requester_id": 9, "node_id": 4},
                    {"type": "request_handshake", "from_node_id": 9, "to_node_id": 4},
                    {"type": "respond_handshake", "node_id": 9, "peer_id": 4, "accept": True},
                    {"type": "report_trust", "node_id": 9, "peer_id": 4},
                    {"type": "revoke_trust", "node_id": 9, "peer_id": 4},
                    {"type": "punch", "requester_id": 9, "node_a": 9, "node_b": 4},
                    {"type": "rotate_key", "node_id": 9}):
            self.assertFalse(self.auth.check(legacy(ALICE, msg), ALICE.public_key, False, NOW))

    def test_legacy_replays_forever(self) -> None:
        # the reference's rule, kept for nodes that never proved their key
        msg = legacy(ALICE, {"type": "heartbeat", "node_id": 1})
        for t in (NOW, NOW + 1, NOW + 86400 * 365):
            self.assertFalse(self.auth.check(msg, ALICE.public_key, False, t))

    def test_wrong_key(self) -> None:
        msg = legacy(MALLORY, {"type": "heartbeat", "node_id": 1})
        self.assertRaises(AuthFailed, self.auth.check, msg, ALICE.public_key, False, NOW)

    def test_other_challenge(self) -> None:
        msg = legacy(ALICE, {"type": "heartbeat", "node_id": 2})
        msg["node_id"] = 1
        self.assertRaises(AuthFailed, self.auth.check, msg, ALICE.public_key, False, NOW)

    def test_missing_or_garbage(self) -> None:
        good = ALICE.sign_b64(b"heartbeat:1")
        for sig in (None, "", "!!!!", "AAAA", good[:-4], good + "AAAA", 12, [good], {"s": good},
                    b64(b"\x00" * 64), b64(b"\x00" * 63), "\u00e9" * 88):
            msg: dict[str, Any] = {"type": "heartbeat", "node_id": 1}
            if sig is not None:
                msg["signature"] = sig
            self.assertRaises(AuthFailed, self.auth.check, msg, ALICE.public_key, False, NOW)

    def test_no_challenge_for_type(self) -> None:
        msg = {"type": "subscribe_events", "node_id": 1, "signature": ALICE.sign_b64(b"subscribe_events:1")}
        self.assertRaises(AuthFailed, self.auth.check, msg, ALICE.public_key, False, NOW)

    def test_bad_ids_in_challenge(self) -> None:
        for node_id in ("1", -1, 1.5, True, None, 1 << 40):
            msg = {"type": "heartbeat", "node_id": node_id, "signature": ALICE.sign_b64(b"heartbeat:1")}
            self.assertRaises(AuthFailed, self.auth.check, msg, ALICE.public_key, False, NOW)

    def test_proven_key_refuses_legacy(self) -> None:
        msg = legacy(ALICE, {"type": "heartbeat", "node_id": 1})
        self.assertRaises(AuthFailed, self.auth.check, msg, ALICE.public_key, True, NOW)


class VerifiedSignaturesTests(SynchronousTestCase):
    """A legacy signature repeated byte for byte is not checked twice; anything else is."""

    def setUp(self) -> None:
        self.auth = Authenticator()
        self.checks: list[tuple[bytes, bytes, bytes]] = []
        real = auth_module.verify

        def counting(key: bytes, message: bytes, sig: bytes) -> bool:
            self.checks.append((key, message, sig))
            return real(key, message, sig)
        self.patch(auth_module, "verify", counting)

    def test_repeat_checked_once(self) -> None:
        msg = legacy(ALICE, {"type": "heartbeat", "node_id": 1})
        for t in (NOW, NOW + 30, NOW + 60):
            self.assertFalse(self.auth.check(dict(msg), ALICE.public_key, False, t))
        self.assertEqual(len(self.checks), 1)
        self.assertEqual(self.auth.verified.hits, 2)

    def test_other_bytes_checked(self) -> None:
        beat = legacy(ALICE, {"type": "heartbeat", "node_id": 1})
        self.auth.check(beat, ALICE.public_key, False, NOW)
        # the same signature under another challenge, another key, or another signature: checked, refused
        moved = dict(beat, node_id=2)
        self.assertRaises(AuthFailed, self.auth.check, moved, ALICE.public_key, False, NOW)
        self.assertRaises(AuthFailed, self.auth.check, beat, MALLORY.public_key, False, NOW)
        poll = dict(beat, type="poll_handshakes")
        self.assertRaises(AuthFailed, self.auth.check, poll, ALICE.public_key, False, NOW)
        self.assertEqual(len(self.checks), 4)
        self.assertEqual(self.auth.verified.hits, 0)

    def test_failure_not_remembered(self) -> None:
        bad = legacy(MALLORY, {"type": "heartbeat", "node_id": 1})
        for _ in range(3):
            self.assertRaises(AuthFailed, self.auth.check, bad, ALICE.public_key, False, NOW)
        self.assertEqual(len(self.checks), 3)
        self.assertEqual(len(self.auth.verified), 0)

    def test_proven_key_still_refused(self) -> None:
        msg = legacy(ALICE, {"type": "heartbeat", "node_id": 1})
        self.auth.check(msg, ALICE.public_key, False, NOW)
        self.assertRaises(AuthFailed, self.auth.check, msg, ALICE.public_key, True, NOW)

    def test_auth_form_always_checked(self) -> None:
        for i in range(3):
            self.auth.check(authed(ALICE, {"type": "heartbeat", "node_id": 1}, nonce=bytes([i]) * 16),
                            ALICE.public_key, False, NOW)
        self.assertEqual(len(self.checks), 3)

    def test_bounded_oldest_first(self) -> None:
        cache = VerifiedSignatures(max_entries=2)
        sigs = [(f"heartbeat:{i}".encode(), ALICE.sign(f"heartbeat:{i}".encode())) for i in range(3)]
        for challenge, sig in sigs:
            self.assertTrue(cache.verify(ALICE.public_key, challenge, sig))
        self.assertEqual(len(cache), 2)
        self.assertEqual(len(self.checks), 3)
        cache.verify(ALICE.public_key, *sigs[2])
        self.assertEqual(len(self.checks), 3)
        cache.verify(ALICE.public_key, *sigs[0])  # forgotten: checked again
        self.assertEqual(len(self.checks), 4)


class AuthFormTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.auth = Authenticator()

    def test_accepted(self) -> None:
        msg = authed(ALICE, {"type": "set_hostname", "node_id": 1, "hostname": "alice"})
        self.assertIs(self.auth.check(msg, ALICE.public_key, False, NOW), True)

    def test_accepted_for_proven_key(self) -> None:
        msg = authed(ALICE, {"type": "heartbeat", "node_id": 1})
        self.assertTrue(self.auth.check(msg, ALICE.public_key, True, NOW))

    def test_with_legacy_signature_too(self) -> None:
        msg = authed(ALICE, {"type": "heartbeat", "node_id": 1}, legacy_too=True)
        self.assertIn("signature", msg)
        self.assertTrue(self.auth.check(msg, ALICE.public_key, True, NOW))

    def test_auth_preferred_over_good_legacy(self) -> None:
        msg = authed(ALICE, {"type": "heartbeat", "node_id": 1}, legacy_too=True)
        msg["auth"] = {**msg["auth"], "sig": b64(b"\x00" * 64)}
        self.assertRaises(AuthFailed, self.auth.check, msg, ALICE.public_key, False, NOW)

    def test_replay_refused(self) -> None:
        msg = authed(ALICE, {"type": "heartbeat", "node_id": 1})
        self.assertTrue(self.auth.check(copy.deepcopy(msg), ALICE.public_key, False, NOW))
        self.assertRaises(AuthFailed, self.auth.check, copy.deepcopy(msg), ALICE.public_key, False, NOW)
        self.assertRaises(AuthFailed, self.auth.check, msg, ALICE.public_key, False, NOW + 100)

    def test_same_nonce_other_key_is_independent(self) -> None:
        a = authed(ALICE, {"type": "heartbeat", "node_id": 1})
        m = authed(MALLORY, {"type": "heartbeat", "node_id": 1})
        self.assertTrue(self.auth.check(a, ALICE.public_key, False, NOW))
        self.assertTrue(self.auth.check(m, MALLORY.public_key, False, NOW))

    def test_failed_check_does_not_burn_the_nonce(self) -> None:
        msg = authed(ALICE, {"type": "heartbeat", "node_id": 1})
        self.assertRaises(AuthFailed, self.auth.check, msg, MALLORY.public_key, False, NOW)
        self.assertTrue(self.auth.check(msg, ALICE.public_key, False, NOW))

    def test_time_window(self) -> None:
        for n, offset in enumerate((-MAX_SKEW, 0.0, MAX_SKEW, -MAX_SKEW + 1, MAX_SKEW - 1)):
            msg = authed(ALICE, {"type": "heartbeat", "node_id": 1}, ts=NOW + offset, nonce=bytes([n]) * 16)
            self.assertTrue(self.auth.check(msg, ALICE.public_key, False, NOW), offset)
        for n, offset in enumerate((-MAX_SKEW - 1, MAX_SKEW + 1, -86400, 86400)):
            msg = authed(ALICE, {"type": "heartbeat", "node_id": 1}, ts=NOW + offset,
                         nonce=bytes([n + 100]) * 16)
            self.assertRaises(AuthFailed, self.auth.check, msg, ALICE.public_key, False, NOW)

    def test_seconds_instead_of_milliseconds(self) -> None:
        msg = sign_request({"type": "heartbeat", "node_id": 1}, ALICE.sign, int(NOW), b"\x01" * 16,
                           legacy=False)
        self.assertRaises(AuthFailed, self.auth.check, msg, ALICE.public_key, False, NOW)

    def test_configurable_skew(self) -> None:
        auth = Authenticator(max_skew=5)
        ok = authed(ALICE, {"type": "heartbeat", "node_id": 1}, ts=NOW - 4)
        late = authed(ALICE, {"type": "heartbeat", "node_id": 1}, ts=NOW - 6, nonce=b"\x09" * 16)
        self.assertTrue(auth.check(ok, ALICE.public_key, False, NOW))
        self.assertRaises(AuthFailed, auth.check, late, ALICE.public_key, False, NOW)

    def test_covers_every_field(self) -> None:
        base = {"type": "set_hostname", "node_id": 1, "hostname": "alice"}
        for n, (key, value) in enumerate((("hostname", "mallory"), ("node_id", 2), ("type", "set_tags"),
                                         ("extra", 1), ("hostname", None))):
            msg = authed(ALICE, base, nonce=bytes([n]) * 16)
            msg[key] = value
            self.assertRaises(AuthFailed, self.auth.check, msg, ALICE.public_key, False, NOW)

    def test_removed_field_refused(self) -> None:
        msg = authed(ALICE, {"type": "set_visibility", "node_id": 1, "public": False})
        del msg["public"]
        self.assertRaises(AuthFailed, self.auth.check, msg, ALICE.public_key, False, NOW)

    def test_signature_field_not_covered(self) -> None:
        # the legacy signature rides along for reference registries; it is not part of 'auth'
        msg = authed(ALICE, {"type": "heartbeat", "node_id": 1}, legacy_too=True)
        msg["signature"] = "garbage"
        self.assertTrue(self.auth.check(msg, ALICE.public_key, False, NOW))

    def test_tampered_auth_parts(self) -> None:
        good = authed(ALICE, {"type": "heartbeat", "node_id": 1})
        a = good["auth"]
        bad_auths: list[Any] = [
            None, "x", 1, [], [a], {},
            {**a, "ts": a["ts"] + 1},
            {**a, "ts": float(a["ts"])},
            {**a, "ts": str(a["ts"])},
            {**a, "ts": True},
            {**a, "ts": -1},
            {**a, "ts": 1 << 60},
            {**a, "nonce": b64(b"\x08" * 16)},
            {**a, "nonce": b64(b"\x07" * 15)},
            {**a, "nonce": b64(b"\x07" * 17)},
            {**a, "nonce": "not base64!"},
            {**a, "nonce": None},
            {**a, "sig": b64(b"\x00" * 64)},
            {**a, "sig": a["sig"][:-4]},
            {**a, "sig": 5},
            {k: v for k, v in a.items() if k != "sig"},
            {k: v for k, v in a.items() if k != "ts"},
            {k: v for k, v in a.items() if k != "nonce"},
        ]
        for bad in bad_auths:
            msg = {**good, "auth": bad}
            self.assertRaises(AuthFailed, self.auth.check, msg, ALICE.public_key, False, NOW)
        # none of those burnt the nonce
        self.assertTrue(self.auth.check(good, ALICE.public_key, False, NOW))

    def test_invalid_public_key(self) -> None:
        msg = authed(ALICE, {"type": "heartbeat", "node_id": 1})
        for key in (b"", b"\x00" * 32, b"\xff" * 32, b"\x01" * 31):
            self.assertRaises(AuthFailed, self.auth.check, msg, key, False, NOW)
