"""
Tests for L{pilot.wire.registry}: framing, field access, and both signature
forms, checked against every signed request the Go reference sent.
"""

from __future__ import annotations

from tests import capture

import base64
import json
import os
import random
import struct
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import MalformedFrame
from pilot.identity import Identity, verify
from pilot.wire import registry as registry_wire
from pilot.wire.registry import (
    AUTH_CONTEXT, LEGACY_CHALLENGES, MAX_FRAME, SIGNER_FIELD, FrameDecoder, auth_message,
    canonical_body, decode_body, encode_frame, get_bool, get_int, get_str, get_str_list,
    legacy_challenge, sign_request,
)

SESSIONS = ("go-session-1", "go-session-2")


def vectors_dir() -> str:
    return capture.vectors_dir()


def load_json(session: str, name: str) -> Any:
    with open(os.path.join(vectors_dir(), session, name), "rb") as f:
        return json.load(f)


def signed_requests(session: str) -> list[tuple[dict[str, Any], int, bytes]]:
    """
    Every request carrying ``signature``, with the sender's node id and key,
    matched by TCP source port through that connection's register/register_ok.
    """
    transcript = load_json(session, "transcript.json")
    node_of_port: dict[int, tuple[int, bytes]] = {}
    out = []
    for entry in transcript["tcp"]:
        msg = entry["json"]
        if msg["type"] == "register_ok":
            node_of_port[int(entry["to"])] = (msg["node_id"], base64.b64decode(msg["public_key"]))
        elif "signature" in msg:
            node_id, key = node_of_port[int(entry["from"])]
            out.append((msg, node_id, key))
    return out


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class EncodeTests(SynchronousTestCase):
    def test_encode(self) -> None:
        body = b'{"type":"heartbeat","node_id":1}'
        self.assertEqual(encode_frame({"type": "heartbeat", "node_id": 1}),
                         struct.pack(">I", len(body)) + body)

    def test_utf8(self) -> None:
        data = encode_frame({"type": "set_hostname", "hostname": "caf\u00e9"})
        data[4:].decode("ascii")  # non-ASCII text travels as JSON escapes, so any string encodes
        self.assertEqual(FrameDecoder().feed(data), [{"type": "set_hostname", "hostname": "caf\u00e9"}])

    def test_too_large(self) -> None:
        self.assertRaises(ValueError, encode_frame, {"type": "x", "pad": "a" * MAX_FRAME})

    def test_same_text_as_the_json_module(self) -> None:
        """The encoder made once writes what ``json.JSONEncoder(...).encode`` writes, value for value."""
        values: list[Any] = [
            {}, {"type": "lookup_ok", "node_id": 4294967295, "networks": [0, 7], "public": True, "x": None},
            {"s": "caf\u00e9 \ud800 \"quoted\" \\ \n\t\u0000", "f": 1.5, "e": 1e300, "neg": -0.0},
            {"nested": [{"a": [[], {}]}, "b"], "z": 1, "a": 2}, {"nan": float("nan"), "inf": float("inf")},
            {1: "int key", True: "bool key"}, [1, "list at the top"], ("a", "tuple"),
        ]
        plain = json.JSONEncoder(separators=(",", ":"), check_circular=False)
        canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), check_circular=False)
        for value in values:
            self.assertEqual(registry_wire._ENCODE(value), plain.encode(value))
            self.assertEqual(registry_wire._CANONICAL(value), canonical.encode(value))
        for encode in (registry_wire._ENCODE, registry_wire._CANONICAL):
            self.assertRaises(TypeError, encode, {"not json": object()})
            self.assertRaises(TypeError, encode, {"bytes": b"x"})

    def test_without_the_c_encoder(self) -> None:
        """Where ``json`` has no C encoder, the encoder's own ``encode`` is used."""
        encoder = json.JSONEncoder(separators=(",", ":"), check_circular=False)
        self.patch(json.encoder, "c_make_encoder", None)
        self.assertEqual(registry_wire._one_shot(encoder), encoder.encode)


class FrameDecoderTests(SynchronousTestCase):
    messages: list[dict[str, Any]] = [{"type": "register", "public_key": "k"}, {"type": "heartbeat", "node_id": 1},
                {"type": "set_tags", "tags": ["a", "b"], "node_id": 2}]

    def test_byte_by_byte(self) -> None:
        data = b"".join(encode_frame(m) for m in self.messages)
        decoder = FrameDecoder()
        got: list[Any] = []
        ends = set()
        pos = 0
        for m in self.messages:
            pos += len(encode_frame(m))
            ends.add(pos)
        for i in range(len(data)):
            out = decoder.feed(data[i:i + 1])
            if i + 1 in ends:
                self.assertEqual(len(out), 1)
            else:
                self.assertEqual(out, [])
            got.extend(out)
        self.assertEqual(got, self.messages)
        self.assertEqual(decoder.buffered, 0)

    def test_many_in_one_feed(self) -> None:
        data = b"".join(encode_frame(m) for m in self.messages)
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(data + data[:7]), self.messages)
        self.assertEqual(decoder.buffered, 7)
        self.assertEqual(decoder.feed(data[7:]), self.messages)

    def test_oversized_length_breaks_stream(self) -> None:
        decoder = FrameDecoder()
        good = encode_frame(self.messages[0])
        self.assertRaises(MalformedFrame, decoder.feed, good + struct.pack(">I", MAX_FRAME + 1))
        self.assertTrue(decoder.broken)
        self.assertRaises(MalformedFrame, decoder.feed, good)
        small = FrameDecoder(max_frame=10)
        self.assertRaises(MalformedFrame, small.feed, frame(b'{"type":"heartbeat"}'))

    def test_limit_is_inclusive(self) -> None:
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(struct.pack(">I", MAX_FRAME) + b"{"), [])
        self.assertIsNone(decoder.broken)

    def test_bad_bodies_are_values(self) -> None:
        bad = [b"", b"not json", b"[1, 2]", b'"type"', b"null", b'{"no_type": 1}', b'{"type": 5}',
               b'{"type": null}', b"\xff\xfe", b'{"type": "x", "n": NaN}', b'{"type": "x", "n": Infinity}',
               b'{"type": "x", "n": -Infinity}', b"[" * 100000, b'{"type": "x"} trailing']
        decoder = FrameDecoder()
        good = encode_frame(self.messages[1])
        out = decoder.feed(b"".join(frame(b) + good for b in bad))
        self.assertEqual(len(out), 2 * len(bad))
        for i, item in enumerate(out):
            if i % 2:
                self.assertEqual(item, self.messages[1])
            else:
                self.assertIsInstance(item, MalformedFrame, bad[i // 2][:20])
        self.assertIsNone(decoder.broken)

    def test_whole_frames_alone(self) -> None:
        """A frame fed whole and alone (the usual request) decodes as one fed with others or in parts."""
        bad = [b"", b"not json", b"[1, 2]", b"null", b'{"type": 5}', b"\xff\xfe", b'{"type": "x", "n": NaN}',
               b'{"type": "x"} trailing', b'{"type": "x"}{"type": "y"}', b"[" * 100000]
        for body in bad:
            decoder = FrameDecoder()
            (item,) = decoder.feed(frame(body))
            self.assertIsInstance(item, MalformedFrame, body[:20])
            self.assertEqual(decoder.feed(encode_frame(self.messages[0])), [self.messages[0]])
        for body in (b' {"type": "x"}', b'{"type": "x"} \r\n', b'\t{ "type" : "x" }\n'):
            self.assertEqual(FrameDecoder().feed(frame(body)), [{"type": "x"}])
        decoder = FrameDecoder(max_frame=10)
        self.assertRaises(MalformedFrame, decoder.feed, frame(b'{"type":"heartbeat"}'))
        self.assertTrue(decoder.broken)
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(encode_frame(self.messages[0])[:-1]), [])
        self.assertEqual(decoder.feed(encode_frame(self.messages[0])[-1:]), [self.messages[0]])
        self.assertEqual(decoder.buffered, 0)

    def test_deep_nesting(self) -> None:
        for body in (b'{"type": "x", "a": ' + b"[" * 50000 + b"]" * 50000 + b"}",
                     b'{"type": "x", "a": ' + b'{"a": ' * 50000 + b"1" + b"}" * 50001):
            try:
                decode_body(body)
            except MalformedFrame:
                pass

    def test_random_bytes(self) -> None:
        rng = random.Random(42)
        for _ in range(500):
            decoder = FrameDecoder(max_frame=4096)
            try:
                for item in decoder.feed(rng.randbytes(rng.randrange(0, 300))):
                    self.assertIsInstance(item, (dict, MalformedFrame))
            except MalformedFrame:
                self.assertTrue(decoder.broken)
        for _ in range(500):
            body = rng.randbytes(rng.randrange(0, 60))
            try:
                decode_body(body)
            except MalformedFrame:
                pass


class FieldTests(SynchronousTestCase):
    def test_get_int(self) -> None:
        msg = {"a": 7, "f": 7.0, "half": 7.5, "t": True, "s": "7", "neg": -1, "big": 1 << 32,
               "n": None, "inf": float("inf"), "nan": float("nan"), "l": [7], "huge": 1e300}
        self.assertEqual(get_int(msg, "a"), 7)
        self.assertEqual(get_int(msg, "f"), 7)
        self.assertIsInstance(get_int(msg, "f"), int)
        for key in ("half", "t", "s", "neg", "big", "inf", "nan", "l", "huge", "missing", "n"):
            self.assertRaises(MalformedFrame, get_int, msg, key)
        self.assertEqual(get_int(msg, "missing", default=3), 3)
        self.assertEqual(get_int(msg, "n", default=3), 3)
        self.assertEqual(get_int({"p": 65535}, "p", bits=16), 65535)
        self.assertRaises(MalformedFrame, get_int, {"p": 65536}, "p", bits=16)
        self.assertEqual(get_int({"p": (1 << 32) - 1}, "p"), (1 << 32) - 1)

    def test_get_str(self) -> None:
        self.assertEqual(get_str({"h": "agent-a"}, "h"), "agent-a")
        self.assertEqual(get_str({"h": ""}, "h"), "")
        for value in (5, None, ["x"], b"x", True):
            self.assertRaises(MalformedFrame, get_str, {"h": value}, "h")
        self.assertRaises(MalformedFrame, get_str, {}, "h")
        self.assertEqual(get_str({}, "h", default="d"), "d")
        self.assertRaises(MalformedFrame, get_str, {"h": "x" * 11}, "h", max_len=10)

    def test_get_bool(self) -> None:
        self.assertIs(get_bool({"p": True}, "p"), True)
        self.assertIs(get_bool({"p": False}, "p"), False)
        values: list[Any] = [1, 0, "true", None, []]
        for value in values:
            self.assertRaises(MalformedFrame, get_bool, {"p": value}, "p")
        self.assertIs(get_bool({}, "p", default=False), False)

    def test_get_str_list(self) -> None:
        self.assertEqual(get_str_list({"t": ["a", "b"]}, "t", 10), ["a", "b"])
        self.assertEqual(get_str_list({}, "t", 10), [])
        self.assertEqual(get_str_list({"t": None}, "t", 10), [])
        for value in ("a", {"a": 1}, [1], ["a", None], [["a"]], ["x" * 257]):
            self.assertRaises(MalformedFrame, get_str_list, {"t": value}, "t", 10)
        self.assertRaises(MalformedFrame, get_str_list, {"t": ["a"] * 11}, "t", 10)


class LegacyChallengeTests(SynchronousTestCase):
    def test_every_entry(self) -> None:
        expected = {
            "set_hostname": "set_hostname:11", "set_visibility": "set_visibility:11",
            "set_tags": "set_tags:11", "set_task_exec": "set_task_exec:11", "heartbeat": "heartbeat:11",
            "deregister": "deregister:11", "rotate_key": "rotate:11", "resolve": "resolve:22:11",
            "report_trust": "report_trust:11:33", "revoke_trust": "revoke_trust:11:33",
            "request_handshake": "handshake:44:55", "poll_handshakes": "poll_handshakes:11",
            "respond_handshake": "respond:11:33", "punch": "punch:66:77",
        }
        self.assertEqual(set(expected), set(LEGACY_CHALLENGES))
        ids = {"node_id": 11, "requester_id": 22, "peer_id": 33, "from_node_id": 44, "to_node_id": 55,
               "node_a": 66, "node_b": 77}
        for kind, challenge in expected.items():
            self.assertEqual(legacy_challenge(dict(ids, type=kind)), challenge.encode("ascii"))

    def test_float_ids(self) -> None:
        self.assertEqual(legacy_challenge({"type": "heartbeat", "node_id": 1.0}), b"heartbeat:1")

    def test_unsigned_types(self) -> None:
        for msg in ({"type": "register"}, {"type": "lookup", "node_id": 1}, {"type": "nope"}, {},
                    {"type": ["heartbeat"]}, {"type": None}):
            self.assertIsNone(legacy_challenge(msg))

    def test_missing_or_bad_ids(self) -> None:
        for msg in ({"type": "heartbeat"}, {"type": "resolve", "node_id": 1},
                    {"type": "heartbeat", "node_id": "1"}, {"type": "heartbeat", "node_id": -1}):
            self.assertRaises(MalformedFrame, legacy_challenge, msg)


class VectorSignatureTests(SynchronousTestCase):
    def test_every_signature_verifies(self) -> None:
        total = 0
        challenges = set()
        for session, count in zip(SESSIONS, (11, 17)):
            requests = signed_requests(session)
            self.assertEqual(len(requests), count, session)
            for msg, node_id, key in requests:
                challenge = legacy_challenge(msg)
                assert challenge is not None, msg
                challenges.add(challenge.decode())
                self.assertEqual(get_int(msg, SIGNER_FIELD[msg["type"]]), node_id)
                self.assertTrue(verify(key, challenge, base64.b64decode(msg["signature"])), msg)
                self.assertFalse(verify(key, challenge + b"x", base64.b64decode(msg["signature"])))
            total += len(requests)
        self.assertEqual(total, 28)
        self.assertTrue({"set_hostname:1", "resolve:2:1", "handshake:2:1", "set_visibility:2", "set_tags:2",
                         "deregister:2", "heartbeat:1", "poll_handshakes:1", "report_trust:2:1",
                         "respond:2:1"} <= challenges)

    def test_sign_request_reproduces_signatures(self) -> None:
        for session in SESSIONS:
            identities = {}
            for n in "ab":
                ident = Identity.from_json(load_json(session, f"identity-agent-{n}.json"))
                identities[ident.public_key] = ident
            for msg, _, key in signed_requests(session):
                unsigned = {k: v for k, v in msg.items() if k != "signature"}
                signed = sign_request(unsigned, identities[key].sign, 1_700_000_000_000, bytes(16))
                self.assertEqual(signed["signature"], msg["signature"], msg)


class SignRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ident = Identity.from_seed(bytes(range(32)))
        self.msg = {"type": "set_hostname", "node_id": 5, "hostname": "agent-a"}
        self.nonce = bytes(range(16))

    def test_both_forms(self) -> None:
        signed = sign_request(self.msg, self.ident.sign, 1234, self.nonce)
        self.assertEqual(self.msg, {"type": "set_hostname", "node_id": 5, "hostname": "agent-a"},
                         "not mutated")
        self.assertTrue(verify(self.ident.public_key, b"set_hostname:5",
                               base64.b64decode(signed["signature"])))
        auth = signed["auth"]
        self.assertEqual(auth["ts"], 1234)
        self.assertEqual(base64.b64decode(auth["nonce"]), self.nonce)
        message = auth_message(signed, 1234, self.nonce)
        self.assertTrue(message.startswith(AUTH_CONTEXT + b"\n1234\n"))
        self.assertTrue(verify(self.ident.public_key, message, base64.b64decode(auth["sig"])))

    def test_auth_covers_values(self) -> None:
        a = sign_request(self.msg, self.ident.sign, 1234, self.nonce)
        b = sign_request(dict(self.msg, hostname="agent-b"), self.ident.sign, 1234, self.nonce)
        self.assertNotEqual(auth_message(a, 1234, self.nonce), auth_message(b, 1234, self.nonce))
        self.assertNotEqual(a["auth"]["sig"], b["auth"]["sig"])
        # The reference's signature covers only "set_hostname:5" and cannot tell them apart.
        self.assertEqual(a["signature"], b["signature"])
        # Timestamp and nonce are covered too.
        self.assertNotEqual(auth_message(a, 1235, self.nonce), auth_message(a, 1234, self.nonce))
        self.assertNotEqual(auth_message(a, 1234, bytes(16)), auth_message(a, 1234, self.nonce))
        # A signature made for agent-a does not verify for agent-b.
        self.assertFalse(verify(self.ident.public_key, auth_message(b, 1234, self.nonce),
                                base64.b64decode(a["auth"]["sig"])))

    def test_canonical_body(self) -> None:
        signed = sign_request(self.msg, self.ident.sign, 1, self.nonce)
        self.assertEqual(canonical_body(signed), canonical_body(self.msg))
        self.assertEqual(canonical_body({"b": 1, "a": "\u00e9"}), b'{"a":"\\u00e9","b":1}')

    def test_old_signatures_replaced(self) -> None:
        stale = dict(self.msg, signature="old", auth={"sig": "old"})
        signed = sign_request(stale, self.ident.sign, 1, self.nonce)
        self.assertNotEqual(signed["signature"], "old")
        self.assertNotEqual(signed["auth"]["sig"], "old")

    def test_legacy_off_or_unsigned_type(self) -> None:
        self.assertNotIn("signature", sign_request(self.msg, self.ident.sign, 1, self.nonce, legacy=False))
        signed = sign_request({"type": "lookup", "node_id": 1}, self.ident.sign, 1, self.nonce)
        self.assertNotIn("signature", signed)
        self.assertIn("auth", signed)
