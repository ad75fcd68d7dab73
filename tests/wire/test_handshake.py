"""
Tests for L{pilot.wire.handshake}: the port-444 trust message.
"""

from __future__ import annotations

from tests import capture

import json
import os
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import MalformedFrame
from pilot.identity import Identity, b64encode
from pilot.wire.handshake import (
    ACCEPT, FIELDS, MAX_MESSAGE, REJECT, REQUEST, REVOKE, REVOKE_REASON, TYPES, HandshakeMessage,
    challenge, decode, make_message,
)

ALICE = Identity.from_seed(b"a" * 32)
BOB = Identity.from_seed(b"b" * 32)
TS = 1795301000


def vectors_dir() -> str:
    return capture.vectors_dir()


def load_json(session: str, name: str) -> Any:
    with open(os.path.join(vectors_dir(), session, name), "rb") as f:
        return json.load(f)


def sample(**changes: Any) -> dict[str, Any]:
    """A valid message as JSON, with ``changes`` applied (a value of ``...`` removes the key)."""
    value: dict[str, Any] = make_message(REQUEST, 7, 9, ALICE.public_key, ALICE.sign, TS,
                                         justification="hello").to_json()
    for key, new in changes.items():
        if new is ...:
            del value[key]
        else:
            value[key] = new
    return value


def raw(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")


class ChallengeTests(SynchronousTestCase):
    def test_format(self) -> None:
        self.assertEqual(challenge(2, 1), b"handshake:2:1")
        self.assertEqual(challenge(4294967295, 0), b"handshake:4294967295:0")

    def test_same_as_request_handshake(self) -> None:
        """
        The registry's request_handshake signs the same challenge, so the
        reference's captured signature from node 1 to node 2 is exactly what
        agent-a would put in a direct message; Ed25519 is deterministic.
        """
        transcript = load_json("go-session-2", "transcript.json")
        agent_a = Identity.from_json(load_json("go-session-2", "identity-agent-a.json"))
        [req] = [e["json"] for e in transcript["tcp"] if e["json"].get("type") == "request_handshake"]
        self.assertEqual((req["from_node_id"], req["to_node_id"]), (1, 2))
        message = make_message(REQUEST, 1, 2, agent_a.public_key, agent_a.sign, TS,
                               justification=req["justification"])
        self.assertEqual(b64encode(message.signature), req["signature"])
        self.assertTrue(decode(message.encode()).verifies(2, agent_a.public_key))


class CodecTests(SynchronousTestCase):
    def test_round_trip_every_type(self) -> None:
        for kind in sorted(TYPES):
            message = make_message(kind, 7, 9, ALICE.public_key, ALICE.sign, TS,
                                   justification="why not", reason="because")
            self.assertEqual(decode(message.encode()), message)

    def test_all_seven_fields_always_present(self) -> None:
        message = HandshakeMessage(REVOKE, 3, b"", "", b"", REVOKE_REASON, TS)
        value = json.loads(message.encode())
        self.assertEqual(list(value), list(FIELDS))
        self.assertEqual(value, {"type": "handshake_revoke", "node_id": 3, "public_key": "",
                                 "justification": "", "signature": "", "reason": "trust revoked",
                                 "timestamp": TS})

    def test_compact_utf8(self) -> None:
        message = make_message(REQUEST, 7, 9, ALICE.public_key, ALICE.sign, TS, justification="héllo ✓")
        data = message.encode()
        self.assertNotIn(b": ", data)
        self.assertNotIn(b", ", data)
        self.assertIn("héllo ✓".encode("utf-8"), data)
        self.assertEqual(decode(data).justification, "héllo ✓")

    def test_reads_go_escapes(self) -> None:
        """Go escapes <, > and & as \\u003c...; those decode to the characters."""
        data = raw(sample(justification="a<b")).replace(b"<", b"\\u003c")
        self.assertEqual(decode(data).justification, "a<b")

    def test_unknown_keys_ignored(self) -> None:
        """As the reference's JSON decoder does."""
        self.assertEqual(decode(raw(sample(extra=[1, 2]))), decode(raw(sample())))

    def test_accepts_byte_buffers(self) -> None:
        data = raw(sample())
        self.assertEqual(decode(bytearray(data)), decode(data))
        self.assertEqual(decode(memoryview(data)), decode(data))

    def test_exactly_one_segment(self) -> None:
        base = len(raw(sample(justification="")).replace(b" ", b""))
        fits = json.dumps(sample(justification="x" * (MAX_MESSAGE - base)), separators=(",", ":")).encode()
        self.assertEqual(len(fits), MAX_MESSAGE)
        self.assertEqual(len(decode(fits).justification), MAX_MESSAGE - base)
        with self.assertRaises(MalformedFrame):
            decode(fits + b" ")

    def test_encode_refuses_oversized(self) -> None:
        """A local mistake: ValueError, not MalformedFrame."""
        message = HandshakeMessage(REQUEST, 1, b"", "x" * MAX_MESSAGE, b"", "", TS)
        with self.assertRaises(ValueError) as e:
            message.encode()
        self.assertNotIsInstance(e.exception, MalformedFrame)

    def test_construction_validates(self) -> None:
        bad: list[tuple[Any, ...]] = [
            ("handshake_hello", 1, b"", "", b"", "", TS),
            (REQUEST, -1, b"", "", b"", "", TS),
            (REQUEST, 1 << 32, b"", "", b"", "", TS),
            (REQUEST, True, b"", "", b"", "", TS),
            (REQUEST, 1, b"short", "", b"", "", TS),
            (REQUEST, 1, b"", "", b"x" * 63, "", TS),
            (REQUEST, 1, b"", None, b"", "", TS),
            (REQUEST, 1, b"", "", b"", 5, TS),
            (REQUEST, 1, b"", "", b"", "", 1.5),
            (REQUEST, 1, "key", "", b"", "", TS),
        ]
        for args in bad:
            with self.assertRaises(ValueError, msg=repr(args)):
                HandshakeMessage(*args)


class SignatureTests(SynchronousTestCase):
    def test_sign_and_verify(self) -> None:
        message = make_message(ACCEPT, 7, 9, ALICE.public_key, ALICE.sign, TS)
        self.assertEqual(message.signature, ALICE.sign(b"handshake:7:9"))
        self.assertTrue(message.verifies(9, ALICE.public_key))

    def test_wrong_key_or_receiver(self) -> None:
        message = make_message(REQUEST, 7, 9, ALICE.public_key, ALICE.sign, TS)
        self.assertFalse(message.verifies(9, BOB.public_key))
        self.assertFalse(message.verifies(8, ALICE.public_key))
        self.assertFalse(message.verifies(9, b""))

    def test_unsigned_never_verifies(self) -> None:
        message = HandshakeMessage(REQUEST, 7, ALICE.public_key, "", b"", "", TS)
        self.assertFalse(message.verifies(9, ALICE.public_key))

    def test_challenge_covers_neither_type_nor_time(self) -> None:
        """The reference's weakness (docs/reference-wire.md §9 item 12), kept for compatibility."""
        request = make_message(REQUEST, 7, 9, ALICE.public_key, ALICE.sign, TS)
        reject = make_message(REJECT, 7, 9, ALICE.public_key, ALICE.sign, TS + 999)
        self.assertEqual(request.signature, reject.signature)


class HostileInputTests(SynchronousTestCase):
    def assertMalformed(self, data: Any) -> None:
        with self.assertRaises(MalformedFrame, msg=repr(data)[:200]):
            decode(data)

    def test_not_bytes(self) -> None:
        for data in (None, "{}", 5, [b"{}"], {"type": REQUEST}):
            self.assertMalformed(data)

    def test_every_truncation(self) -> None:
        data = raw(sample())
        for end in range(len(data)):
            self.assertMalformed(data[:end])

    def test_garbage(self) -> None:
        for data in (b"", b"\x00" * 10, b"\xff\xfe{}", b"null", b"[]", b"42", b'"handshake_request"',
                     b"{", b"}", b"{}", b'{"type":}', b"NaN", b"\xc3\x28"):
            self.assertMalformed(data)

    def test_huge(self) -> None:
        self.assertMalformed(raw(sample(justification="x" * 5000)))
        self.assertMalformed(b" " * (MAX_MESSAGE + 1))
        self.assertMalformed(b"x" * 10_000_000)

    def test_deep_nesting(self) -> None:
        self.assertMalformed(b"[" * 4000)
        self.assertMalformed(b"[" * 2000 + b"]" * 2000)
        self.assertMalformed(raw(sample()).replace(b'"hello"', b"[" * 1000 + b"]" * 1000))

    def test_missing_each_field(self) -> None:
        for name in FIELDS:
            self.assertMalformed(raw(sample(**{name: ...})))

    def test_wrong_types(self) -> None:
        wrong: list[Any] = [None, True, 1.0, "1", [], {}]
        for name in FIELDS:
            for value in wrong:
                if isinstance(sample()[name], str) and isinstance(value, str):
                    continue  # the right type
                self.assertMalformed(raw(sample(**{name: value})))
        self.assertMalformed(raw(sample(node_id=1.5)))
        self.assertMalformed(raw(sample(timestamp=1795301000.0)))
        self.assertMalformed(raw(sample(timestamp="1795301000")))

    def test_out_of_range(self) -> None:
        for value in (-1, 1 << 32, 10 ** 40):
            self.assertMalformed(raw(sample(node_id=value)))
        self.assertMalformed(raw(sample(timestamp=10 ** 30)))

    def test_unknown_type(self) -> None:
        for kind in ("handshake_hello", "", "HANDSHAKE_REQUEST", "handshake_request "):
            self.assertMalformed(raw(sample(type=kind)))

    def test_bad_base64(self) -> None:
        for field in ("public_key", "signature"):
            for text in ("!!!!", "a" * 43, b64encode(b"x" * 31), b64encode(b"x" * 33),
                         b64encode(b"x" * 32)[:-1] + "\n", "é" * 44):
                self.assertMalformed(raw(sample(**{field: text})))

    def test_constants_and_duplicates(self) -> None:
        self.assertMalformed(raw(sample()).replace(str(TS).encode(), b"NaN"))
        self.assertMalformed(raw(sample()).replace(str(TS).encode(), b"Infinity"))
        data = raw(sample())
        self.assertMalformed(data[:-1] + b',"type":"handshake_accept"}')

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=MAX_MESSAGE + 10))
    def test_random_bytes(self, data: bytes) -> None:
        try:
            decode(data)
        except MalformedFrame:
            pass

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                          max_size=4),
        max_leaves=10)

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.sampled_from(FIELDS + ("x",)), json_values, max_size=9))
    def test_random_objects(self, value: dict[str, Any]) -> None:
        try:
            decode(json.dumps(value).encode())
        except MalformedFrame:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(FIELDS), json_values)
    def test_one_field_replaced(self, name: str, value: Any) -> None:
        try:
            message = decode(raw(sample(**{name: value})))
        except MalformedFrame:
            return
        self.assertEqual(getattr(message, name) if name not in ("public_key", "signature") else
                         message.to_json()[name], value)
