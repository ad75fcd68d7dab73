"""
Tests for L{pilot.address}: text and binary forms, strict parsing, and the
key-derived node id.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pilot import address
from pilot.address import (
    BEACON, NAMESERVER, REGISTRY, RESERVED_NODE_IDS, ZERO, Address, SocketAddress, address_for_key,
    node_id_candidates, node_id_for_key,
)
from pilot.errors import MalformedFrame
from pilot.identity import Identity

#: go-session-1's agent-a key (identity-agent-a.json).
VECTOR_KEY = base64.b64decode("odaYU0Fu3X19Z+DR2CvUMcVc1n6UKgAc+VhBsMhOpvQ=")

addresses = st.builds(Address, st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF))


def first4(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:4], "big")


class TextFormTests(SynchronousTestCase):
    def test_examples(self) -> None:
        self.assertEqual(str(Address(0, 1)), "0:0000.0000.0001")
        self.assertEqual(str(Address(1, 0x00A3F291)), "1:0001.00A3.F291")
        self.assertEqual(str(Address(65535, 0xFFFFFFFF)), "65535:FFFF.FFFF.FFFF")
        self.assertEqual(Address.parse("1:0001.00A3.F291"), Address(1, 0x00A3F291))

    @settings(max_examples=200, deadline=None, database=None)
    @given(addresses)
    def test_round_trips(self, addr: Address) -> None:
        self.assertEqual(Address.parse(str(addr)), addr)
        data = addr.to_bytes()
        self.assertEqual(len(data), 6)
        self.assertEqual(data, addr.network.to_bytes(2, "big") + addr.node.to_bytes(4, "big"))
        self.assertEqual(Address.from_bytes(data), addr)

    def test_lower_case_hex(self) -> None:
        addr = Address.parse("10:000a.00a3.f291")
        self.assertEqual(addr, Address(10, 0x00A3F291))
        self.assertEqual(str(addr), "10:000A.00A3.F291")
        self.assertEqual(Address.parse("10:000A.00a3.F291"), addr)

    def test_network_mismatch(self) -> None:
        """The first hex group repeats the network; SPEC.md's ``1:00A3.F291.0004`` is refused."""
        for text in ("1:0000.0000.0001", "0:0001.0000.0001", "1:00A3.F291.0004", "16:0016.0000.0001"):
            e = self.assertRaises(MalformedFrame, Address.parse, text)
            self.assertIn("mismatch", e.reason)
        self.assertEqual(Address.parse("16:0010.0000.0001"), Address(16, 1))

    def test_out_of_range(self) -> None:
        for text in ("65536:0000.0000.0001", "99999:869F.0000.0001", "100000:0000.0000.0001"):
            self.assertRaises(MalformedFrame, Address.parse, text)

    def test_strict(self) -> None:
        for text in ("", "0", "0:", ":0000.0000.0001", "0:0000.0000", "0:0000.0000.0001.0002",
                     "0:000.0000.0001", "0:00000.0000.0001", "0:0000.0000.000", "0:0000.0000.000g",
                     "0:0000:0000:0001", "0:0000.0000.0001 ", " 0:0000.0000.0001", "0:0000.0000.0001\n",
                     "-1:0000.0000.0001", "+0:0000.0000.0001", "0x0:0000.0000.0001",
                     "0:+000.0000.0001", "0:0000.0000.0_01", "0:0000.0000.０００１",
                     "\u0660:0000.0000.0001", "\uff10:0000.0000.0001", "0:0000.0000.0001:7"):
            self.assertRaises(MalformedFrame, Address.parse, text)

    def test_not_text(self) -> None:
        for value in (None, b"0:0000.0000.0001", 1, ("0", 1)):
            self.assertRaises(MalformedFrame, Address.parse, value)

    def test_binary_errors(self) -> None:
        for value in (b"", bytes(5), bytes(7), None, "abcdef", 6):
            self.assertRaises(MalformedFrame, Address.from_bytes, value)
        self.assertEqual(Address.from_bytes(bytearray(b"\x00\x01\x00\x00\x00\x02")), Address(1, 2))

    def test_constructor_range(self) -> None:
        for network, node in ((-1, 0), (0x10000, 0), (0, -1), (0, 1 << 32), ("0", 1), (0, 1.0), (None, 1)):
            self.assertRaises(ValueError, Address, network, node)


class SpecialAddressTests(SynchronousTestCase):
    def test_constants(self) -> None:
        self.assertEqual([str(a) for a in (ZERO, REGISTRY, BEACON, NAMESERVER)],
                         ["0:0000.0000.0000", "0:0000.0000.0001", "0:0000.0000.0002", "0:0000.0000.0003"])
        self.assertTrue(ZERO.is_zero)
        self.assertFalse(Address(1, 0).is_zero)
        self.assertTrue(Address(7, 0xFFFFFFFF).is_broadcast)
        self.assertFalse(REGISTRY.is_broadcast)
        self.assertEqual(RESERVED_NODE_IDS, {0, 1, 2, 3, 0xFFFFFFFF})

    def test_value_semantics(self) -> None:
        self.assertEqual(Address(0, 5), Address.parse("0:0000.0000.0005"))
        self.assertEqual(len({Address(0, 5), Address(0, 5), Address(1, 5)}), 2)
        self.assertLess(Address(0, 9), Address(1, 0))
        self.assertEqual(repr(Address(0, 1)), "Address(0:0000.0000.0001)")

    @given(addresses, addresses)
    def test_equality_and_hash(self, a: Address, b: Address) -> None:
        """The written-out __eq__/__ne__/__hash__ agree with the fields, as attrs' did."""
        same = (a.network, a.node) == (b.network, b.node)
        self.assertEqual(a == b, same)
        self.assertEqual(a != b, not same)
        self.assertEqual(a == Address(a.network, a.node), True)
        self.assertEqual(hash(a), hash(Address(a.network, a.node)))
        self.assertEqual(a < b, (a.network, a.node) < (b.network, b.node))
        self.assertEqual(len({a, b, Address(b.network, b.node)}), 1 if same else 2)

    def test_equality_other_types(self) -> None:
        """Not equal to a tuple of its fields, nor to an address with the fields swapped."""
        self.assertNotEqual(Address(1, 2), (1, 2))
        self.assertFalse(Address(1, 2) == (1, 2))
        self.assertTrue(Address(1, 2) != (1, 2))
        self.assertNotEqual(Address(1, 2), Address(2, 1))
        self.assertNotEqual(Address(0, 1 << 16), Address(1, 0))
        self.assertNotEqual(hash(Address(0, 0xFFFFFFFF)), hash(Address(1, 0)))


class SocketAddressTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        sa = SocketAddress(Address(0, 1), 1000)
        self.assertEqual(str(sa), "0:0000.0000.0001:1000")
        self.assertEqual(SocketAddress.parse("0:0000.0000.0001:1000"), sa)
        self.assertEqual(SocketAddress.parse("1:0001.00a3.f291:65535"),
                         SocketAddress(Address(1, 0xA3F291), 65535))

    def test_errors(self) -> None:
        for text in ("0:0000.0000.0001", "0:0000.0000.0001:", "0:0000.0000.0001:65536",
                     "0:0000.0000.0001:-1", "0:0000.0000.0001:+1", "0:0000.0000.0001:1 ",
                     "0:0000.0000.0001:\u00b2", "0:0000.0000.0001:\u0661", "0:0000.0000.0001:123456",
                     "1:0000.0000.0001:80", ""):
            self.assertRaises(MalformedFrame, SocketAddress.parse, text)
        for value in (None, b"0:0000.0000.0001:1", 5):
            self.assertRaises(MalformedFrame, SocketAddress.parse, value)  # type: ignore[arg-type]

    def test_port_range(self) -> None:
        self.assertRaises(ValueError, SocketAddress, ZERO, -1)
        self.assertRaises(ValueError, SocketAddress, ZERO, 0x10000)


class NodeIdTests(SynchronousTestCase):
    def test_vector_key(self) -> None:
        self.assertEqual(node_id_for_key(VECTOR_KEY), 0x75DCBEE6)
        self.assertEqual(str(address_for_key(VECTOR_KEY)), "0:0000.75DC.BEE6")
        self.assertEqual(str(address_for_key(VECTOR_KEY, network=3)), "3:0003.75DC.BEE6")

    def test_first_candidate_is_sha256_prefix(self) -> None:
        for i in range(20):
            key = hashlib.sha256(b"key %d" % i).digest()
            self.assertEqual(node_id_for_key(key), first4(key))

    def test_deterministic(self) -> None:
        self.assertEqual(node_id_for_key(VECTOR_KEY), node_id_for_key(bytes(VECTOR_KEY)))
        ident = Identity.from_seed(bytes(32))
        self.assertEqual(ident.address, address_for_key(ident.public_key))
        self.assertEqual(Identity.from_seed(bytes(32)).address, ident.address)

    def test_candidates(self) -> None:
        """Candidate n hashes the key followed by n as minimal big-endian bytes."""
        candidates = list(itertools.islice(node_id_candidates(VECTOR_KEY), 258))
        self.assertEqual(candidates[0], first4(VECTOR_KEY))
        self.assertEqual(candidates[1], first4(VECTOR_KEY + b"\x01"))
        self.assertEqual(candidates[2], first4(VECTOR_KEY + b"\x02"))
        self.assertEqual(candidates[255], first4(VECTOR_KEY + b"\xff"))
        self.assertEqual(candidates[256], first4(VECTOR_KEY + b"\x01\x00"))
        self.assertEqual(len(set(candidates)), len(candidates))

    def test_held_by_other(self) -> None:
        first, second, third = itertools.islice(node_id_candidates(VECTOR_KEY), 3)
        self.assertEqual(node_id_for_key(VECTOR_KEY, lambda n: n == first), second)
        self.assertEqual(node_id_for_key(VECTOR_KEY, lambda n: n in (first, second)), third)
        self.assertEqual(node_id_for_key(VECTOR_KEY, lambda n: n == 12345), first)
        asked: list[int] = []

        def held(node_id: int) -> bool:
            asked.append(node_id)
            return node_id == first

        node_id_for_key(VECTOR_KEY, held)
        self.assertEqual(asked, [first, second])

    def test_reserved_skipped(self) -> None:
        """A hash landing on a reserved id moves to the next candidate."""
        key = bytes(range(32))
        digests = {
            key: b"\x00\x00\x00\x01",
            key + b"\x01": b"\xff\xff\xff\xff",
            key + b"\x02": b"\x00\x00\x00\x00",
            key + b"\x03": b"\x12\x34\x56\x78",
        }

        class FakeHash:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def digest(self) -> bytes:
                return digests.get(self.data, hashlib.sha256(self.data).digest()[:4]) + bytes(28)

        class FakeHashlib:
            sha256 = FakeHash

        self.patch(address, "hashlib", FakeHashlib)
        self.assertEqual(node_id_for_key(key), 0x12345678)
        self.assertEqual(next(node_id_candidates(key)), 0x12345678)
        for reserved in RESERVED_NODE_IDS:
            self.assertNotIn(reserved, itertools.islice(node_id_candidates(key), 50))

    def test_bad_key(self) -> None:
        for key in (b"", bytes(31), bytes(33)):
            self.assertRaises(ValueError, node_id_for_key, key)

    def test_no_reserved_ids_in_practice(self) -> None:
        for i in range(200):
            key: Any = hashlib.sha256(b"k%d" % i).digest()
            self.assertNotIn(node_id_for_key(key), RESERVED_NODE_IDS)
