# -*- test-case-name: tests.server.test_journal -*-
"""
A dict and a set that remember which keys were changed since their
``changes`` were last cleared, for the store's journal
(:mod:`pilot.server.journal`): a journal record then costs what changed, not
what is held.  They remember nothing until :meth:`TrackedDict.track` (only a
journal clears ``changes``; without one they would grow for good).

Every mutating method of ``dict`` and ``set`` is overridden; a key set,
replaced, deleted, added or discarded lands in ``changes`` (a deleted key too:
whoever reads ``changes`` looks the key up to see what became of it).  A
container replaced whole (``state.trust = {...}``) is not tracked any more:
the journal sees that and writes a full snapshot instead.
"""

from __future__ import annotations

from typing import Any, Hashable, Iterable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Forgotten(set[Any]):
    """``changes`` of a container nobody tracks: holds nothing."""

    def add(self, item: Any) -> None:
        pass

    def update(self, *others: Iterable[Any]) -> None:
        pass


UNTRACKED: set[Any] = _Forgotten()


class TrackedDict(dict[K, V]):
    __slots__ = ("changes",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changes: set[K] = UNTRACKED

    def track(self) -> None:
        """Remember changes from now on (again: forget those remembered so far)."""
        self.changes = set()

    def __setitem__(self, key: K, value: V) -> None:
        self.changes.add(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: K) -> None:
        super().__delitem__(key)
        self.changes.add(key)

    def pop(self, key: K, *default: Any) -> Any:
        self.changes.add(key)
        return super().pop(key, *default)

    def popitem(self) -> tuple[K, V]:
        key, value = super().popitem()
        self.changes.add(key)
        return key, value

    def setdefault(self, key: K, default: Any = None) -> Any:
        if key not in self:
            self.changes.add(key)
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> "TrackedDict[K, V]":  # type: ignore[override,misc]
        self.update(other)
        return self

    def clear(self) -> None:
        self.changes.update(self)
        super().clear()


class TrackedSet(set[K]):
    __slots__ = ("changes",)

    def __init__(self, items: Iterable[K] = ()) -> None:
        super().__init__(items)
        self.changes: set[K] = UNTRACKED

    def track(self) -> None:
        """Remember changes from now on (again: forget those remembered so far)."""
        self.changes = set()

    def add(self, item: K) -> None:
        self.changes.add(item)
        super().add(item)

    def discard(self, item: Any) -> None:
        self.changes.add(item)
        super().discard(item)

    def remove(self, item: K) -> None:
        super().remove(item)
        self.changes.add(item)

    def pop(self) -> K:
        item = super().pop()
        self.changes.add(item)
        return item

    def clear(self) -> None:
        self.changes.update(self)
        super().clear()

    def update(self, *others: Iterable[K]) -> None:
        for other in others:
            for item in other:
                self.add(item)

    def difference_update(self, *others: Iterable[Any]) -> None:
        for other in others:
            for item in list(other):
                self.discard(item)

    def intersection_update(self, *others: Iterable[Any]) -> None:
        keep = set(self).intersection(*others)
        self.difference_update([item for item in self if item not in keep])

    def symmetric_difference_update(self, other: Iterable[K]) -> None:
        for item in set(other):
            if item in self:
                self.discard(item)
            else:
                self.add(item)

    def __ior__(self, other: Any) -> "TrackedSet[K]":  # type: ignore[override,misc]
        self.update(other)
        return self

    def __isub__(self, other: Any) -> "TrackedSet[K]":  # type: ignore[misc]
        self.difference_update(other)
        return self

    def __iand__(self, other: Any) -> "TrackedSet[K]":  # type: ignore[misc]
        self.intersection_update(other)
        return self

    def __ixor__(self, other: Any) -> "TrackedSet[K]":  # type: ignore[override,misc]
        self.symmetric_difference_update(other)
        return self
