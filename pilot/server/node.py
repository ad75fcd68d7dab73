# -*- test-case-name: tests.server.test_state -*-
"""
A node as the registry keeps it (``pilot.server.state`` holds them, and
re-exports :class:`Node`): fields assigned, never mutated in place; an
assignment puts the node's id in its ``journal_sink``.
"""

from __future__ import annotations

import functools
from typing import Any

import attr

from pilot.address import Address


def _note_change(node: "Node", attribute: Any, value: Any) -> Any:
    sink = node.journal_sink
    if sink is not None and attribute.name != "journal_sink":
        sink.add(node.id)
    return value


@attr.s(slots=True, auto_attribs=True, eq=False, on_setattr=_note_change)
class Node:
    id: int
    public_key: bytes
    real_addr: str = ""
    last_seen: float = 0.0
    hostname: str = ""
    tags: list[str] = attr.Factory(list)
    public: bool = False
    owner: str = ""
    polo_score: int = 0
    task_exec: bool = False
    networks: list[int] = attr.Factory(lambda: [0])
    #: ours: the node's tunnel socket on its own LAN, for peers behind the same NAT
    local_addr: str = ""
    #: where an assignment puts the node's id: the set of changed nodes of the journal
    #: tracking it (``pilot.server.journal.Tracker``), so a record need not look at every node
    journal_sink: "set[int] | None" = attr.ib(default=None, init=False, repr=False)

    @property
    def address(self) -> Address:
        return Address(0, self.id)

    @property
    def address_text(self) -> str:
        """``str(self.address)``, made once per id."""
        return address_text(self.id)


@functools.lru_cache(maxsize=1 << 17)
def address_text(node_id: int) -> str:
    """The backbone address of ``node_id`` as text (every reply about a node carries it):
    ``str(Address(0, node_id))``, formatted here (a new node's registration makes it)."""
    if not 0 <= node_id <= 0xFFFFFFFF:
        return str(Address(0, node_id))  # its error
    return f"0:0000.{node_id >> 16:04X}.{node_id & 0xFFFF:04X}"
