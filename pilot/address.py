# -*- test-case-name: tests.test_address -*-
"""
Virtual addresses, and the node id as a function of the node's public key.

A virtual address is 48 bits: a 16-bit network id and a 32-bit node id.  The
text form is the reference's (``N:NNNN.HHHH.LLLL``: the network in decimal,
then the network again and the node id's high and low halves as four
upper-case hex digits each); the binary form is 2 + 4 bytes, big-endian.

The node id is derived from the Ed25519 public key (``docs/addressing.md``):
the first four bytes, big-endian, of SHA-256 over the 32-byte key; if that
value is reserved, or already held by a different key, SHA-256 over the key
followed by the byte 1, then 2, and so on.  A node computes its own address
before it ever reaches a registry with :func:`node_id_for_key`.
"""

from __future__ import annotations

import hashlib
import re
import struct
from typing import Callable, Iterator

import attr

from pilot.errors import MalformedFrame

BACKBONE = 0
BROADCAST_NODE = 0xFFFFFFFF

#: Node ids with a fixed meaning in the reference (zero, registry, beacon,
#: nameserver, broadcast); never given to a key.
RESERVED_NODE_IDS = frozenset({0, 1, 2, 3, BROADCAST_NODE})

ADDRESS_LEN = 6
# ASCII digits only: ``\d`` would also match other scripts' digits, which int() accepts.
_TEXT = re.compile(r"([0-9]{1,5}):([0-9A-Fa-f]{4})\.([0-9A-Fa-f]{4})\.([0-9A-Fa-f]{4})")
_PORT = re.compile(r"[0-9]{1,5}")
_NODE = struct.Struct(">HI")


@attr.s(frozen=True, slots=True, order=True, auto_attribs=True, repr=False, auto_detect=True)
class Address:
    network: int
    node: int

    def __attrs_post_init__(self) -> None:
        if not (isinstance(self.network, int) and 0 <= self.network <= 0xFFFF):
            raise ValueError(f"network id out of range: {self.network!r}")
        if not (isinstance(self.node, int) and 0 <= self.node <= 0xFFFFFFFF):
            raise ValueError(f"node id out of range: {self.node!r}")

    @classmethod
    def parse(cls, text: str) -> "Address":
        """Parse ``N:NNNN.HHHH.LLLL`` strictly; raise ``MalformedFrame`` with the reason."""
        if not isinstance(text, str):
            raise MalformedFrame(f"address must be text, not {type(text).__name__}")
        m = _TEXT.fullmatch(text)
        if m is None:
            raise MalformedFrame(f"not a virtual address (want N:XXXX.XXXX.XXXX): {text[:64]!r}")
        network = int(m.group(1))
        if network > 0xFFFF:
            raise MalformedFrame(f"network id out of range in {text!r}")
        if int(m.group(2), 16) != network:
            raise MalformedFrame(f"network mismatch in {text!r}: {m.group(1)} vs {m.group(2)}")
        return cls(network, (int(m.group(3), 16) << 16) | int(m.group(4), 16))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "Address":
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedFrame(f"binary address must be bytes, not {type(data).__name__}")
        if len(data) != ADDRESS_LEN:
            raise MalformedFrame(f"binary address is {ADDRESS_LEN} bytes, got {len(data)}")
        return cls(*_NODE.unpack(data))

    def to_bytes(self) -> bytes:
        return _NODE.pack(self.network, self.node)

    # Equality and hash written out (auto_detect keeps them; attrs still writes the ordering):
    # an Address keys the stream table, looked up for every packet, and attrs' __hash__ builds
    # and hashes a tuple each time.  The hash is the 48-bit value itself: distinct per address.
    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Address:
            return NotImplemented
        return self.node == other.node and self.network == other.network

    def __ne__(self, other: object) -> bool:
        if other.__class__ is not Address:
            return NotImplemented
        return self.node != other.node or self.network != other.network

    def __hash__(self) -> int:
        return (self.network << 32) | self.node

    def __str__(self) -> str:
        return f"{self.network}:{self.network:04X}.{self.node >> 16:04X}.{self.node & 0xFFFF:04X}"

    def __repr__(self) -> str:
        return f"Address({self})"

    @property
    def is_broadcast(self) -> bool:
        return self.node == BROADCAST_NODE

    @property
    def is_zero(self) -> bool:
        return self.network == 0 and self.node == 0


@attr.s(frozen=True, slots=True, order=True, auto_attribs=True)
class SocketAddress:
    address: Address
    port: int

    def __attrs_post_init__(self) -> None:
        if not (isinstance(self.port, int) and 0 <= self.port <= 0xFFFF):
            raise ValueError(f"port out of range: {self.port!r}")

    @classmethod
    def parse(cls, text: str) -> "SocketAddress":
        """``N:NNNN.HHHH.LLLL:PORT``, split at the last colon."""
        if not isinstance(text, str):
            raise MalformedFrame(f"socket address must be text, not {type(text).__name__}")
        head, sep, port = text.rpartition(":")
        if not sep or _PORT.fullmatch(port) is None or int(port) > 0xFFFF:
            raise MalformedFrame(f"not a socket address (want ADDRESS:PORT): {text[:64]!r}")
        return cls(Address.parse(head), int(port))

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


ZERO = Address(0, 0)
REGISTRY = Address(0, 1)
BEACON = Address(0, 2)
NAMESERVER = Address(0, 3)


def node_id_candidates(public_key: bytes) -> Iterator[int]:
    """Every node id the key may take, in order of preference (reserved ids skipped)."""
    if len(public_key) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
    counter = 0
    while True:
        data = public_key if counter == 0 else public_key + counter.to_bytes((counter.bit_length() + 7) // 8, "big")
        candidate = int.from_bytes(hashlib.sha256(data).digest()[:4], "big")
        if candidate not in RESERVED_NODE_IDS:
            yield candidate
        counter += 1


def node_id_for_key(public_key: bytes, held_by_other: Callable[[int], bool] = lambda node_id: False) -> int:
    """
    The node id for ``public_key``: the first candidate that no other key holds.

    ``held_by_other(node_id)`` says whether a *different* key already holds
    the id; a node that has not asked a registry passes nothing and gets the
    first candidate, which is its id unless a collision happened.
    """
    asked = None
    if len(public_key) == 32:  # the first candidate, as node_id_candidates makes it: nearly always the id
        first = int.from_bytes(hashlib.sha256(public_key).digest()[:4], "big")
        if first not in RESERVED_NODE_IDS:
            if not held_by_other(first):
                return first
            asked = first  # the candidates below start with it: not asked twice
    for candidate in node_id_candidates(public_key):
        if asked is not None:
            asked = None
            continue
        if not held_by_other(candidate):
            return candidate
    raise AssertionError("unreachable")  # pragma: no cover


def address_for_key(public_key: bytes, network: int = BACKBONE) -> Address:
    return Address(network, node_id_for_key(public_key))
