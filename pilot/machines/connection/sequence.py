# -*- test-case-name: tests.machines.test_connection -*-
"""
Sequence numbers: absolute Python ints inside a connection, their low 32
bits on the wire (``docs/reference-wire.md`` §4.5).  :func:`wire` gives the
header field, :func:`unwrap` recovers the absolute number nearest to what we
expect (signed 32-bit difference), so wrap-around needs no special case.
"""

from __future__ import annotations

SEQ_MASK = 0xFFFFFFFF


def wire(n: int) -> int:
    """An absolute sequence number as the 32-bit header field."""
    return n & SEQ_MASK


def unwrap(value: int, near: int) -> int:
    """The absolute number with low 32 bits ``value`` nearest ``near`` (signed 32-bit difference)."""
    diff = (value - near) & SEQ_MASK
    if diff >= 1 << 31:
        diff -= 1 << 32
    return near + diff
