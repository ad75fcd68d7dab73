"""
The control socket's codec (pilot.wire.control, docs/control.md): frames read
with the registry's FrameDecoder one at a time, replies, and argument checks.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import InvalidArgument, MalformedFrame, NotFound
from pilot.wire.control import MAX_MESSAGE, Arguments, decode_message, error_reply, frame_decoder, ok_reply
from pilot.wire.registry import MAX_FRAME, FrameDecoder, encode_frame


def request(request_id: Any, cmd: Any, **args: Any) -> bytes:
    return encode_frame({"id": request_id, "cmd": cmd, **args})


class DecoderTests(SynchronousTestCase):
    def test_one_decoder_for_both(self) -> None:
        """The control socket reads with the registry's decoder, at the registry's limit."""
        decoder = frame_decoder()
        self.assertIsInstance(decoder, FrameDecoder)
        decoder.receive(struct.pack(">I", MAX_FRAME) + b"{")
        self.assertIsNone(decoder.next_frame())
        self.assertIsNone(decoder.broken)

    def test_rest_after_a_frame(self) -> None:
        decoder = frame_decoder()
        decoder.receive(request(1, "connect") + b"raw")
        self.assertTrue(decoder.has_frame)
        self.assertEqual(decoder.next_frame(), {"id": 1, "cmd": "connect"})
        self.assertFalse(decoder.has_frame)
        self.assertEqual(decoder.take_rest(), b"raw")
        self.assertEqual(decoder.buffered, 0)

    def test_any_object_is_a_message(self) -> None:
        """Unlike a registry message, a control request needs no 'type'."""
        decoder = frame_decoder()
        self.assertEqual(decoder.feed(request(1, "info")), [{"id": 1, "cmd": "info"}])

    def test_bad_bodies_are_values(self) -> None:
        decoder = frame_decoder()
        decoder.receive(struct.pack(">I", 3) + b"[1]" + request(2, "info"))
        bad = decoder.next_frame()
        self.assertIsInstance(bad, MalformedFrame)
        assert isinstance(bad, MalformedFrame)
        self.assertIn("control frame must be a JSON object", bad.reason)
        self.assertEqual(decoder.next_frame(), {"id": 2, "cmd": "info"})
        self.assertIsNone(decoder.broken)

    def test_broken_stays_broken(self) -> None:
        decoder = frame_decoder(max_frame=10)
        decoder.receive(struct.pack(">I", 11))
        self.assertTrue(decoder.has_frame)
        with self.assertRaises(MalformedFrame) as caught:
            decoder.next_frame()
        self.assertEqual(caught.exception.reason, "control frame of 11 bytes exceeds the 10-byte limit")
        decoder.receive(request(1, "info"))
        self.assertEqual(decoder.buffered, 0)
        self.assertRaises(MalformedFrame, decoder.next_frame)
        self.assertRaises(MalformedFrame, decoder.feed, b"")

    def test_decode_message(self) -> None:
        self.assertEqual(decode_message(b'{"a": 1}'), {"a": 1})
        for body in (b"", b"null", b"[]", b"\xff", b'{"n": NaN}', b"[" * 100000):
            self.assertRaises(MalformedFrame, decode_message, body)


class ReplyTests(SynchronousTestCase):
    def test_ok(self) -> None:
        self.assertEqual(ok_reply(3, {"x": 1}), {"id": 3, "ok": True, "result": {"x": 1}})

    def test_error_is_clipped(self) -> None:
        reply = error_reply(4, NotFound("m" * (MAX_MESSAGE + 10), "h"))
        self.assertEqual(reply["id"], 4)
        self.assertIs(reply["ok"], False)
        self.assertEqual(reply["error"]["code"], "not_found")
        self.assertEqual(reply["error"]["message"], "m" * MAX_MESSAGE + "...")
        self.assertEqual(reply["error"]["hint"], "h")


class ArgumentsTests(SynchronousTestCase):
    def test_typed_access(self) -> None:
        args = Arguments({"s": "x", "n": 5.0, "f": 0.5, "b": True, "l": ["a"], "d": "eHk=", "t": "node"})
        self.assertEqual(args.text("s"), "x")
        self.assertEqual(args.text("missing", default=None), None)
        self.assertEqual(args.integer("n", 0, 9), 5)
        self.assertEqual(args.integer("missing", 0, 9, 4), 4)
        self.assertEqual(args.number("f", 0, 1), 0.5)
        self.assertIs(args.flag("b"), True)
        self.assertEqual(args.texts("l", 2, 5), ["a"])
        self.assertEqual(args.data("d"), b"xy")
        self.assertEqual(args.target("t"), "node")

    def test_each_problem_is_an_invalid_argument(self) -> None:
        args = Arguments({"s": 1, "long": "x" * 10, "n": True, "big": 10, "f": "1", "inf": float("inf"),
                          "b": 1, "l": "a", "many": ["a", "b", "c"], "d": "!!", "empty": ""})
        for call in (lambda: args.text("s"), lambda: args.text("long", 5), lambda: args.text("missing"),
                     lambda: args.integer("n", 0, 9), lambda: args.integer("big", 0, 9),
                     lambda: args.number("f", 0, 1), lambda: args.number("inf", 0, 1e400),
                     lambda: args.flag("b"), lambda: args.texts("l", 5, 5), lambda: args.texts("many", 2, 5),
                     lambda: args.data("d"), lambda: args.target("empty"), lambda: args.port("n")):
            self.assertRaises(InvalidArgument, call)
