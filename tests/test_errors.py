"""
Tests for L{pilot.errors}: stable codes, the code -> exception table, and
the dictionary form sent over the control API.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pilot import errors
from pilot.errors import (
    DEFAULT_HINTS, ErrorCode, Internal, InvalidArgument, MalformedFrame, NotFound, PilotError,
    error_for,
)


def subclasses() -> list[type[PilotError]]:
    return [cls for cls in vars(errors).values()
            if isinstance(cls, type) and issubclass(cls, PilotError) and cls is not PilotError]


class ErrorCodeTests(SynchronousTestCase):
    def test_distinct(self) -> None:
        """No two names share a value (an IntEnum would silently make an alias)."""
        self.assertEqual(len(ErrorCode.__members__), len(list(ErrorCode)))
        self.assertEqual(len({int(c) for c in ErrorCode}), len(list(ErrorCode)))

    def test_stable_values(self) -> None:
        """The values are pilotctl's exit statuses and must not move; 0 and 1 are never codes."""
        self.assertEqual(min(ErrorCode), 2)
        self.assertEqual(ErrorCode.invalid_argument, 2)
        self.assertEqual(ErrorCode.not_found, 3)
        self.assertEqual(ErrorCode.malformed, 13)
        self.assertTrue(all(0 < c < 126 for c in ErrorCode))

    def test_every_code_has_a_hint(self) -> None:
        self.assertEqual(set(DEFAULT_HINTS), set(ErrorCode))
        self.assertTrue(all(DEFAULT_HINTS.values()))

    def test_one_class_per_code(self) -> None:
        codes = [cls.code for cls in subclasses()]
        self.assertEqual(len(codes), len(set(codes)))


class ErrorForTests(SynchronousTestCase):
    def test_by_name(self) -> None:
        for cls in subclasses():
            e = error_for(cls.code.name, "boom")
            self.assertIs(type(e), cls)
            self.assertEqual(e.message, "boom")
            self.assertEqual(e.hint, DEFAULT_HINTS[cls.code])

    def test_by_code_and_number(self) -> None:
        self.assertIs(type(error_for(ErrorCode.not_found, "x")), NotFound)
        self.assertIs(type(error_for(3, "x")), NotFound)

    def test_code_without_class(self) -> None:
        e = error_for("malformed", "bad bytes")
        self.assertIs(type(e), PilotError)
        self.assertEqual(e.code, ErrorCode.malformed)
        self.assertEqual(e.as_dict()["code"], "malformed")
        self.assertEqual(error_for(13, "bad").code, ErrorCode.malformed)

    def test_unknown(self) -> None:
        for code in ("no_such_code", "", "NOT_FOUND", "3", 99, -1, 0, True, None, 2.0):
            e = error_for(code, "boom")  # type: ignore[arg-type]
            self.assertIs(type(e), Internal)
            self.assertIn("boom", e.message)
            self.assertIn(repr(code), e.message)
            e.as_dict()

    def test_hint(self) -> None:
        self.assertEqual(error_for("timeout", "slow", "try later").hint, "try later")
        self.assertEqual(error_for("bogus", "x", "given").hint, "given")


class PilotErrorTests(SynchronousTestCase):
    def test_as_dict(self) -> None:
        e = InvalidArgument("port must be a number")
        self.assertEqual(e.as_dict(), {"code": "invalid_argument", "message": "port must be a number",
                                       "hint": DEFAULT_HINTS[ErrorCode.invalid_argument]})
        self.assertEqual(str(e), "port must be a number")
        self.assertEqual(NotFound("x", "look elsewhere").as_dict()["hint"], "look elsewhere")

    def test_code_override(self) -> None:
        e = PilotError("x", code=ErrorCode.timeout)
        self.assertEqual(e.code, ErrorCode.timeout)
        self.assertEqual(PilotError("y").code, ErrorCode.internal)
        self.assertEqual(InvalidArgument.code, ErrorCode.invalid_argument, "class attribute unchanged")

    def test_repr(self) -> None:
        self.assertEqual(repr(NotFound("no node 7")), "NotFound(not_found: 'no node 7')")


class MalformedFrameTests(SynchronousTestCase):
    def test_is_value_error_not_pilot_error(self) -> None:
        e = MalformedFrame("short frame")
        self.assertIsInstance(e, ValueError)
        self.assertNotIsInstance(e, PilotError)
        self.assertEqual(e.reason, "short frame")
        self.assertEqual(str(e), "short frame")
