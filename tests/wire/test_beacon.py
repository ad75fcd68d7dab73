"""
Tests for L{pilot.wire.beacon}: every beacon message, the proof extension,
the reference's captured datagrams, and hostile input.
"""

from __future__ import annotations

from tests import capture

import json
import os
import random
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import MalformedFrame
from pilot.identity import Identity
from pilot.wire import beacon
from pilot.wire.beacon import (
    MAX_DATAGRAM, PROOF_LEN, Discover, DiscoverReply, Proof, PunchCommand, PunchRequest, Relay,
    RelayDeliver, Sync, decode, proof_message, with_proof,
)

BEACON_PORTS = {29001, 29101}


def vectors_dir() -> str:
    return capture.vectors_dir()


def beacon_datagrams() -> list[dict[str, Any]]:
    """Every UDP entry to or from a beacon in both Go sessions (ports as ints)."""
    out = []
    for session in ("go-session-1", "go-session-2"):
        with open(os.path.join(vectors_dir(), session, "transcript.json")) as f:
            transcript = json.load(f)
        for entry in transcript["udp"]:
            src, dst = int(entry["from"]), int(entry["to"])
            if src in BEACON_PORTS or dst in BEACON_PORTS:
                out.append({"session": session, "t": entry["t"], "from": src, "to": dst,
                            "data": bytes.fromhex(entry["hex"])})
    return out


IDENT = Identity.from_seed(bytes(range(32)))
TS = 1_700_000_000_123
NONCE = bytes.fromhex("0102030405060708")


def samples() -> list[Any]:
    proof = Proof(TS, NONCE, b"\x55" * 64)
    return [
        Discover(0), Discover(0xFFFFFFFF), Discover(7, proof),
        DiscoverReply("127.0.0.1", 24101), DiscoverReply("2001:db8::1", 9001),
        PunchRequest(1, 2), PunchRequest(3, 4, proof),
        PunchCommand("10.0.0.1", 1), PunchCommand("fe80::1", 65535),
        Relay(1, 2, b"PILP"), Relay(5, 6, b"x" * (MAX_DATAGRAM - 9)),
        RelayDeliver(1, b"PILS" + b"\0" * 40), Sync(9, ()), Sync(9, (1, 2, 0xFFFFFFFF)),
    ]


class VectorTests(SynchronousTestCase):
    def test_all_transcript_datagrams_round_trip(self) -> None:
        datagrams = beacon_datagrams()
        self.assertEqual(len(datagrams), 27)
        for d in datagrams:
            msg = decode(d["data"])
            self.assertEqual(msg.encode(), d["data"], d)
            to_beacon = d["to"] in BEACON_PORTS
            self.assertEqual(isinstance(msg, (Discover, PunchRequest)), to_beacon, d)

    def test_replies_carry_the_senders_port(self) -> None:
        datagrams = beacon_datagrams()
        for d in datagrams:
            msg = decode(d["data"])
            if isinstance(msg, DiscoverReply):
                self.assertEqual(msg.endpoint, ("127.0.0.1", d["to"]))

    def test_reference_wire_vector(self) -> None:
        self.assertEqual(decode(bytes.fromhex("0100000001")), Discover(1))
        reply = DiscoverReply("127.0.0.1", 24101)
        self.assertEqual(reply.encode(), bytes.fromhex("02047f0000015e25"))
        self.assertEqual(decode(bytes.fromhex("02047f0000015e25")), reply)

    def test_punch_vector(self) -> None:
        self.assertEqual(decode(bytes.fromhex("030000000100000002")), PunchRequest(1, 2))
        self.assertEqual(decode(bytes.fromhex("04047f0000015e26")), PunchCommand("127.0.0.1", 24102))
        self.assertEqual(PunchCommand("127.0.0.1", 24101).encode(), bytes.fromhex("04047f0000015e25"))


class MessageTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        for msg in samples():
            data = msg.encode()
            self.assertEqual(data[0], type(msg).TYPE)
            self.assertEqual(decode(data), msg)
            self.assertEqual(type(msg).decode(data), msg)

    def test_layouts(self) -> None:
        self.assertEqual(Relay(1, 2, b"ab").encode(), bytes.fromhex("05" "00000001" "00000002") + b"ab")
        self.assertEqual(RelayDeliver(1, b"ab").encode(), bytes.fromhex("06" "00000001") + b"ab")
        self.assertEqual(Sync(3, (1, 2)).encode(),
                         bytes.fromhex("07" "00000003" "0002" "00000001" "00000002"))
        self.assertEqual(DiscoverReply("2001:db8::1", 1).encode(),
                         bytes.fromhex("0210" "20010db8000000000000000000000001" "0001"))

    def test_ipv4_mapped_sent_as_ipv4(self) -> None:
        reply = DiscoverReply("::ffff:192.0.2.1", 7)
        self.assertEqual(reply.host, "192.0.2.1")
        self.assertEqual(reply.encode(), bytes.fromhex("0204c00002010007"))

    def test_sizes(self) -> None:
        self.assertEqual([len(Discover(1).encode()), len(PunchRequest(1, 2).encode())], [5, 9])
        proof = Proof(TS, NONCE, b"\0" * 64)
        self.assertEqual(len(Discover(1, proof).encode()), 85)
        self.assertEqual(len(PunchRequest(1, 2, proof).encode()), 89)
        self.assertEqual(PROOF_LEN, 80)

    def test_constructors_refuse_bad_values(self) -> None:
        bad = [
            lambda: Discover(-1), lambda: Discover(1 << 32), lambda: Discover(True),
            lambda: Discover(1, b"proof"),  # type: ignore[arg-type]
            lambda: DiscoverReply("example.com", 1), lambda: DiscoverReply("1.2.3.4", 65536),
            lambda: PunchCommand(1234, 1),  # type: ignore[arg-type]
            lambda: Relay(1, 2, b""), lambda: Relay(1, 2, b"x" * (MAX_DATAGRAM - 8)),
            lambda: RelayDeliver(1, b""),
            lambda: RelayDeliver(1, "text"),  # type: ignore[arg-type]
            lambda: Sync(1, (1 << 32,)), lambda: Sync(1, range(20000)),
            lambda: Proof(-1, NONCE, b"\0" * 64), lambda: Proof(1, b"short", b"\0" * 64),
            lambda: Proof(1, NONCE, b"\0" * 63),
        ]
        for make in bad:
            self.assertRaises(ValueError, make)


class ProofTests(SynchronousTestCase):
    def test_build_and_verify_discover(self) -> None:
        base = Discover(42).encode()
        data = with_proof(base, IDENT.sign, TS, NONCE)
        self.assertEqual(len(data), 85)
        self.assertEqual(data[:5], base)
        msg = decode(data)
        assert isinstance(msg, Discover) and msg.proof is not None
        self.assertEqual((msg.node_id, msg.proof.ts_ms, msg.proof.nonce), (42, TS, NONCE))
        self.assertEqual(msg.base, base)
        self.assertTrue(msg.proof.verify(IDENT.public_key, msg.base))
        self.assertEqual(msg.encode(), data)

    def test_signed_message(self) -> None:
        base = PunchRequest(1, 2).encode()
        self.assertEqual(proof_message(base, TS, NONCE),
                         b"pilot-beacon-v1" + base + TS.to_bytes(8, "big") + NONCE)
        data = with_proof(base, IDENT.sign, TS, NONCE)
        self.assertEqual(data[9:17], TS.to_bytes(8, "big"))
        self.assertEqual(data[17:25], NONCE)
        self.assertEqual(data[25:], IDENT.sign(proof_message(base, TS, NONCE)))

    def test_verify_refuses(self) -> None:
        msg = decode(with_proof(PunchRequest(1, 2).encode(), IDENT.sign, TS, NONCE))
        assert isinstance(msg, PunchRequest) and msg.proof is not None
        other = Identity.from_seed(b"\x01" * 32)
        self.assertTrue(msg.proof.verify(IDENT.public_key, msg.base))
        self.assertFalse(msg.proof.verify(other.public_key, msg.base))
        self.assertFalse(msg.proof.verify(IDENT.public_key, PunchRequest(1, 3).encode()))
        self.assertFalse(Proof(TS + 1, NONCE, msg.proof.signature).verify(IDENT.public_key, msg.base))
        self.assertFalse(Proof(TS, b"\0" * 8, msg.proof.signature).verify(IDENT.public_key, msg.base))
        self.assertFalse(msg.proof.verify(b"short", msg.base))

    def test_with_proof_needs_a_base(self) -> None:
        for base in (b"", Discover(1, Proof(1, NONCE, b"\0" * 64)).encode(), Relay(1, 2, b"x").encode(),
                     b"\x01\0\0\0", b"\x03" + b"\0" * 9):
            self.assertRaises(ValueError, with_proof, base, IDENT.sign, TS, NONCE)


class MalformedTests(SynchronousTestCase):
    def assertMalformed(self, data: Any) -> None:
        try:
            decode(data)
        except MalformedFrame as e:
            self.assertIsInstance(e.reason, str)
        else:
            self.fail(f"decoded {data!r}")

    def test_truncated_at_every_length(self) -> None:
        for msg in samples():
            data = msg.encode()
            for n in range(len(data) if len(data) < 200 else 12):
                cut = data[:n]
                if isinstance(msg, (Discover, PunchRequest)) and n in (5, 9) and n == len(msg.base):
                    continue  # a proof-carrying message cut to its base is the plain form
                if isinstance(msg, Sync) and n == 7 and data[5:7] == b"\0\0":
                    continue
                if isinstance(msg, (Relay, RelayDeliver)) and n > len(data) - len(msg.frame):
                    continue  # a shorter frame is still a frame
                self.assertMalformed(cut)

    def test_wrong_sizes(self) -> None:
        for data in [b"\x01" + b"\0" * n for n in (0, 3, 5, 83, 85, 200)] + \
                    [b"\x03" + b"\0" * n for n in (7, 9, 87, 89)] + \
                    [bytes.fromhex("02047f0000015e25") + b"\0", bytes.fromhex("02047f0000015e"),
                     bytes.fromhex("02057f0000015e2500"), bytes.fromhex("02007f"), b"\x02",
                     bytes.fromhex("0410") + b"\0" * 17, b"\x05" + b"\0" * 8, b"\x06" + b"\0" * 4,
                     bytes.fromhex("07000000010002" "00000001"), bytes.fromhex("07000000010000" "00")]:
            self.assertMalformed(data)

    def test_unknown_types_and_empty(self) -> None:
        self.assertMalformed(b"")
        for kind in [0x00, 0x08, 0x0F, 0x10, ord("P"), 0xFF]:
            self.assertMalformed(bytes([kind]) + b"\0" * 8)

    def test_oversized(self) -> None:
        self.assertMalformed(b"\x05" + b"\0" * MAX_DATAGRAM)
        self.assertMalformed(b"\x06" + b"\0" * MAX_DATAGRAM)

    def test_not_bytes(self) -> None:
        for value in (None, "0100000001", 1, [1, 0, 0, 0, 1]):
            self.assertMalformed(value)
        self.assertEqual(decode(bytearray.fromhex("0100000001")), Discover(1))
        self.assertEqual(decode(memoryview(bytes.fromhex("0100000001"))), Discover(1))

    def test_random_bytes(self) -> None:
        rng = random.Random(20260227)
        decoded = 0
        for i in range(5000):
            n = rng.choice([0, 1, 2, 5, 8, 9, 20, 85, 89, rng.randrange(0, 300)])
            first = bytes([rng.randrange(0, 9)]) if i % 2 else b""
            data = first + rng.randbytes(n)
            try:
                msg = decode(data)
            except MalformedFrame:
                continue
            decoded += 1
            self.assertEqual(msg.encode(), data)
        self.assertGreater(decoded, 0)

    def test_module_exports(self) -> None:
        self.assertEqual([beacon.DISCOVER, beacon.DISCOVER_REPLY, beacon.PUNCH_REQUEST, beacon.PUNCH_COMMAND,
                          beacon.RELAY, beacon.RELAY_DELIVER, beacon.SYNC], list(range(1, 8)))
