"""pilot.wire.value: frozen value classes written out, as attrs made them."""

from __future__ import annotations

import copy
import pickle

from attr.exceptions import FrozenInstanceError
from twisted.trial.unittest import SynchronousTestCase

from pilot.wire.value import Value, set_field


class Point(Value):
    __slots__ = ("x", "y")
    x: int
    y: int

    def __init__(self, x: int, y: int = 0) -> None:
        set_field(self, "x", x)
        set_field(self, "y", y)


class Labelled(Point):
    __slots__ = ("label",)
    label: str

    def __init__(self, x: int, y: int, label: str) -> None:
        super().__init__(x, y)
        set_field(self, "label", label)


class Stamped(Value):
    __slots__ = ("x", "stamp", "secret")
    _not_compared = ("stamp",)
    _not_shown = ("secret",)
    x: int
    stamp: str
    secret: bytes

    def __init__(self, x: int, stamp: str = "", secret: bytes = b"") -> None:
        set_field(self, "x", x)
        set_field(self, "stamp", stamp)
        set_field(self, "secret", secret)


class ValueTests(SynchronousTestCase):
    def test_fields(self) -> None:
        self.assertEqual(Point._fields, ("x", "y"))
        self.assertEqual(Labelled._fields, ("x", "y", "label"))
        self.assertEqual(getattr(Labelled, "__match_args__"), ("x", "y", "label"))

    def test_equality_and_hash(self) -> None:
        self.assertEqual(Point(1, 2), Point(1, 2))
        self.assertNotEqual(Point(1, 2), Point(1, 3))
        self.assertFalse(Point(1, 2) != Point(1, 2))
        self.assertEqual(hash(Point(1, 2)), hash(Point(1, 2)))
        self.assertEqual(len({Point(1, 2), Point(1, 2), Point(2, 1)}), 2)

    def test_other_classes_differ(self) -> None:
        """A subclass with the same leading fields, or a tuple, is not equal."""
        self.assertNotEqual(Point(1, 2), Labelled(1, 2, "a"))
        self.assertNotEqual(Point(1, 2), (1, 2))
        self.assertTrue(Point(1, 2) != (1, 2))

    def test_repr(self) -> None:
        self.assertEqual(repr(Labelled(1, 2, "a")), "Labelled(x=1, y=2, label='a')")

    def test_fields_left_out(self) -> None:
        """attrs' eq=False and repr=False: a field left out of equality and hash, one out of the repr."""
        self.assertEqual(Stamped(1, "a"), Stamped(1, "b"))
        self.assertEqual(hash(Stamped(1, "a")), hash(Stamped(1, "b")))
        self.assertNotEqual(Stamped(1, "a", b"k"), Stamped(1, "a", b"j"))
        self.assertEqual(repr(Stamped(1, "a", b"k")), "Stamped(x=1, stamp='a')")
        copied = pickle.loads(pickle.dumps(Stamped(1, "a", b"k")))
        self.assertEqual((copied.stamp, copied.secret), ("a", b"k"))

    def test_frozen(self) -> None:
        p = Point(1, 2)
        with self.assertRaises(FrozenInstanceError):
            p.x = 3
        with self.assertRaises(FrozenInstanceError):
            del p.y
        with self.assertRaises(AttributeError):
            setattr(p, "z", 1)
        self.assertEqual(p, Point(1, 2))

    def test_no_dict(self) -> None:
        self.assertFalse(hasattr(Point(1), "__dict__"))

    def test_pickle_and_copy(self) -> None:
        p = Labelled(1, 2, "a")
        self.assertEqual(pickle.loads(pickle.dumps(p)), p)
        self.assertEqual(copy.copy(p), p)
        self.assertEqual(copy.deepcopy(p), p)
