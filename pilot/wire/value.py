# -*- test-case-name: tests.wire.test_value -*-
"""
Frozen value classes written out instead of generated (issue 16).

attrs builds each class's ``__init__``, ``__eq__``, ``__repr__`` and
``__hash__`` from source text at import, and a slotted class twice: about
half a millisecond a class, paid by every start of every process that imports
the codec (a restarted rendezvous loads dozens, ``docs/performance.md``).  The
codecs' hot value classes subclass :class:`Value` instead: each writes its own
``__init__`` (the checks included, in the order attrs ran them) and names its
fields in ``__slots__``; :class:`Value` gives them what attrs gave: equality
and hashing by class and fields, ``Name(field=value, ...)`` as repr,
``__match_args__``, and ``FrozenInstanceError`` on any assignment.

:func:`as_bytes`, every codec's check of its input, is here too: the beacon's
codec needs it, not the packet's (a rendezvous never loads that one).
"""

from __future__ import annotations

from typing import Any, ClassVar

from attr.exceptions import FrozenInstanceError

from pilot.errors import MalformedFrame

def as_bytes(data: Any, what: str = "frame") -> bytes:
    """``data`` as ``bytes`` if it is a byte buffer; ``MalformedFrame`` otherwise."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise MalformedFrame(f"{what} must be bytes, not {type(data).__name__}")


#: What a :class:`Value`'s ``__init__`` sets its fields with (assignment is refused).
set_field = object.__setattr__


class Value:
    """A frozen value: equal, hashed and shown by its ``__slots__`` (its fields, in order)."""

    __slots__: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields: list[str] = []
        for klass in reversed(cls.__mro__):
            fields.extend(klass.__dict__.get("__slots__", ()))
        cls._fields = tuple(fields)
        cls._compared = tuple(name for name in fields if name not in cls._not_compared)
        cls._shown = tuple(name for name in fields if name not in cls._not_shown)
        setattr(cls, "__match_args__", cls._fields)  # as attrs: ``case Discover(node_id, proof)``

    #: The fields, in order: the ``__slots__`` of the class and its bases.
    _fields: ClassVar[tuple[str, ...]] = ()
    #: Fields left out of equality and the hash (attrs' ``eq=False``), and out of the repr (``repr=False``).
    _not_compared: ClassVar[tuple[str, ...]] = ()
    _not_shown: ClassVar[tuple[str, ...]] = ()
    _compared: ClassVar[tuple[str, ...]] = ()
    _shown: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple([getattr(self, name) for name in self._compared])

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Value)
        return self._values() == other._values()

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash((self.__class__, self._values()))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._shown)
        return f"{self.__class__.__qualname__}({shown})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError()

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError()

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, tuple([getattr(self, name) for name in self._fields]))
