"""
Tests for L{pilot.wire.tunnel} and L{pilot.wire.tunnel_crypto}, against the
frames captured from the Go reference in go-session-2.
"""

from __future__ import annotations

from tests import capture

import collections
import hashlib
import json
import os
import random
from typing import Any, Callable

import nacl.bindings
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings, strategies as st
from nacl.public import PrivateKey
from twisted.trial.unittest import SynchronousTestCase

from pilot.address import Address
from pilot.errors import MalformedFrame
from pilot.identity import Identity
from pilot.wire.packet import ACK, ECHO, STREAM, SYN, Packet
from pilot.wire.tunnel import (
    PILA, PILK, PILP, PILS, PILT, AuthKeyExchange, FrameKind, KeyExchange, Nonce, NonceSequence,
    PlainFrame, PunchProbe, ReplayWindow, SealedFrame, TunnelSession, auth_message, classify,
    decode_frame, derive_key, open_, seal,
)
from pilot.wire.tunnel_crypto import MAX_COUNTER

GO_PILT = bytes.fromhex("50494c54" "1101" "0000" "0000" "00000001" "0000" "00000002" "c000" "0007"
                        "00000000" "00000000" "0200" "65a71a43")

# RFC 7748 section 6.1.
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


# --- the captured vectors ---------------------------------------------------------

def vectors_dir() -> str:
    return capture.vectors_dir()


def load_json(session: str, name: str) -> Any:
    with open(os.path.join(vectors_dir(), session, name), "rb") as f:
        return json.load(f)


def udp_entries(session: str) -> list[tuple[int, int, bytes]]:
    """(from port, to port, payload) for every UDP entry; ports are strings in session 1."""
    return [(int(e["from"]), int(e["to"]), bytes.fromhex(e["hex"]))
            for e in load_json(session, "transcript.json")["udp"]]


class Session2:
    """Who is who in go-session-2, worked out from its registry traffic and identity files."""

    def __init__(self) -> None:
        transcript = load_json("go-session-2", "transcript.json")
        identities = [Identity.from_json(load_json("go-session-2", f"identity-agent-{n}.json")) for n in "ab"]
        by_key = {i.public_key_b64: i for i in identities}
        tunnel_port: dict[int, int] = {}  # TCP port -> UDP tunnel port from listen_addr
        self.identity: dict[int, Identity] = {}  # node id -> identity
        self.node_at: dict[int, int] = {}  # UDP tunnel port -> node id
        for e in transcript["tcp"]:
            msg = e["json"]
            if msg["type"] == "register":
                tunnel_port[int(e["from"])] = int(msg["listen_addr"].rsplit(":", 1)[1])
            elif msg["type"] == "register_ok":
                self.identity[msg["node_id"]] = by_key[msg["public_key"]]
                self.node_at[tunnel_port[int(e["to"])]] = msg["node_id"]
        self.udp = udp_entries("go-session-2")

    def frames(self, magic: bytes) -> list[tuple[int, int, bytes]]:
        return [e for e in self.udp if e[2][:4] == magic]


# --- helpers --------------------------------------------------------------------

def sample_packet(payload: bytes = b"") -> Packet:
    return Packet(protocol=STREAM, flags=ACK, src=Address(0, 1), dst=Address(0, 2),
                  src_port=49152, dst_port=ECHO, seq=1, ack=1, window=512, payload=payload)


def session_pair() -> tuple[TunnelSession, TunnelSession]:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    return (TunnelSession.derive(bytes(a), bytes(b.public_key)),
            TunnelSession.derive(bytes(b), bytes(a.public_key)))


def sample_frames() -> list[bytes]:
    ident = Identity.from_seed(bytes(range(32)))
    sender, _ = session_pair()
    return [
        PlainFrame(sample_packet(b"hello")).encode(),
        SealedFrame.seal(sender, 7, sample_packet(b"x" * 20)).encode(),
        KeyExchange(7, ALICE_PUBLIC).encode(),
        AuthKeyExchange.build(7, ALICE_PUBLIC, ident.public_key, ident.sign).encode(),
        PunchProbe().encode(),
    ]


DECODERS: list[Callable[[Any], Any]] = [
    PlainFrame.decode, SealedFrame.decode, KeyExchange.decode, AuthKeyExchange.decode,
    PunchProbe.decode, decode_frame, classify,
]


# --- classification ---------------------------------------------------------------

class ClassifyTests(SynchronousTestCase):
    def test_magics(self) -> None:
        self.assertEqual((PILT, PILS, PILK, PILA, PILP), (b"PILT", b"PILS", b"PILK", b"PILA", b"PILP"))
        for magic, kind in ((PILT, FrameKind.PLAIN), (PILS, FrameKind.SEALED),
                            (PILK, FrameKind.KEY_EXCHANGE), (PILA, FrameKind.AUTH_KEY_EXCHANGE),
                            (PILP, FrameKind.PUNCH)):
            self.assertIs(classify(magic + b"rest"), kind)

    def test_beacon(self) -> None:
        for first in range(0x10):
            self.assertIs(classify(bytes([first])), FrameKind.BEACON)
        self.assertIs(classify(bytearray(b"\x01\x00\x00\x00\x01")), FrameKind.BEACON)

    def test_unknown(self) -> None:
        for data in (b"", b"\x10", b"PIL", b"PILX", b"pilt....", b"HTTP/1.1", b"\xff" * 40):
            self.assertRaises(MalformedFrame, classify, data)

    def test_wrong_types(self) -> None:
        for value in (None, "PILT", 80, [0x50]):
            self.assertRaises(MalformedFrame, classify, value)

    def test_beacon_is_not_a_tunnel_frame(self) -> None:
        self.assertRaises(MalformedFrame, decode_frame, bytes.fromhex("02047f0000015e25"))

    def test_session_counts(self) -> None:
        """Session 2 has 4 PILA, 1 PILT, 6 PILP and 370 PILS frames; the rest are beacon messages."""
        udp = udp_entries("go-session-2")
        counts = collections.Counter(classify(data) for _, _, data in udp)
        self.assertEqual(counts, {FrameKind.BEACON: 19, FrameKind.AUTH_KEY_EXCHANGE: 4,
                                  FrameKind.PLAIN: 1, FrameKind.PUNCH: 6, FrameKind.SEALED: 370})
        self.assertEqual({classify(data) for _, _, data in udp_entries("go-session-1")}, {FrameKind.BEACON})


# --- the captured frames ---------------------------------------------------------

class VectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.s2 = Session2()

    def test_plain(self) -> None:
        [(src, dst, data)] = self.s2.frames(PILT)
        self.assertEqual(data, GO_PILT)
        frame = decode_frame(data)
        assert isinstance(frame, PlainFrame)
        self.assertEqual(frame.packet, Packet(
            version=1, flags=SYN, protocol=STREAM, src=Address(0, self.s2.node_at[src]),
            dst=Address(0, self.s2.node_at[dst]), src_port=49152, dst_port=ECHO, window=512))
        self.assertEqual(frame.packet.checksum, 0x65A71A43)
        self.assertEqual(frame.encode(), data)

    def test_auth_key_exchange(self) -> None:
        frames = self.s2.frames(PILA)
        self.assertEqual(len(frames), 4)
        for src, _, data in frames:
            self.assertEqual(len(data), 136)
            frame = decode_frame(data)
            assert isinstance(frame, AuthKeyExchange)
            ident = self.s2.identity[frame.sender]
            other = self.s2.identity[3 - frame.sender]
            self.assertEqual(frame.sender, self.s2.node_at[src])
            self.assertEqual(frame.ed25519_public, ident.public_key)
            self.assertEqual(frame.signed_message,
                             b"auth" + frame.sender.to_bytes(4, "big") + frame.x25519_public)
            self.assertTrue(frame.verify(ident.public_key))
            self.assertFalse(frame.verify(other.public_key))
            self.assertEqual(frame.encode(), data)
            ours = AuthKeyExchange.build(frame.sender, frame.x25519_public, ident.public_key, ident.sign)
            self.assertEqual(ours.encode(), data)

    def test_auth_key_exchange_tampered(self) -> None:
        src, _, data = self.s2.frames(PILA)[0]
        key = self.s2.identity[self.s2.node_at[src]].public_key
        for offset in (4, 7, 8, 39, 72, 135):
            damaged = bytearray(data)
            damaged[offset] ^= 0x01
            self.assertFalse(AuthKeyExchange.decode(bytes(damaged)).verify(key), offset)
        damaged = bytearray(data)
        damaged[40] ^= 0x01  # the carried key no longer matches the registry's
        self.assertFalse(AuthKeyExchange.decode(bytes(damaged)).verify(key))

    def test_sealed(self) -> None:
        frames = self.s2.frames(PILS)
        self.assertEqual(len(frames), 370)
        runs: dict[tuple[int, bytes], list[int]] = collections.defaultdict(list)
        prefixes: dict[int, list[bytes]] = collections.defaultdict(list)
        for src, _, data in frames:
            frame = decode_frame(data)
            assert isinstance(frame, SealedFrame)
            self.assertEqual(frame.encode(), data)
            self.assertEqual(frame.sender, self.s2.node_at[src])
            self.assertIn(len(data), (70, 76))
            # 34-byte header, or a 6-byte "ping-N" payload, plus the 16-byte tag.
            self.assertIn(len(frame.ciphertext), (34 + 16, 40 + 16))
            self.assertEqual(frame.nonce, frame.nonce_prefix + frame.counter.to_bytes(8, "big"))
            runs[(frame.sender, frame.nonce_prefix)].append(frame.counter)
            if frame.nonce_prefix not in prefixes[frame.sender]:
                prefixes[frame.sender].append(frame.nonce_prefix)
        for counters in runs.values():
            self.assertEqual(counters, list(range(1, len(counters) + 1)))
        # Node 2 re-keyed after node 1's repeated PILA: a new prefix, the counter back at 1.
        self.assertEqual(prefixes, {1: [bytes.fromhex("127be6a6")],
                                    2: [bytes.fromhex("4148de46"), bytes.fromhex("33919267")]})
        self.assertEqual(sorted(len(c) for c in runs.values()), [1, 184, 185])

    def test_reference_replay_rule_on_capture(self) -> None:
        """
        Node 1 never re-keyed from node 2's side, so its window saw counter 1
        under prefix 4148de46 and refuses the counter 1 under 33919267 (UDP entry 33).
        """
        window = ReplayWindow()
        verdicts = [window.accept(SealedFrame.decode(data).counter)
                    for src, _, data in self.s2.frames(PILS) if self.s2.node_at[src] == 2]
        self.assertEqual(verdicts[:3], [True, False, True])
        self.assertTrue(all(verdicts[2:]))

    def test_punch(self) -> None:
        frames = self.s2.frames(PILP)
        self.assertEqual(len(frames), 6)
        for _, _, data in frames:
            self.assertEqual(decode_frame(data), PunchProbe())
            self.assertEqual(PunchProbe().encode(), data)


# --- frames ------------------------------------------------------------------------

class FrameTests(SynchronousTestCase):
    def test_key_exchange(self) -> None:
        frame = KeyExchange(0x01020304, ALICE_PUBLIC)
        data = frame.encode()
        self.assertEqual(data, b"PILK\x01\x02\x03\x04" + ALICE_PUBLIC)
        self.assertEqual(len(data), 40)
        self.assertEqual(decode_frame(data), frame)

    def test_auth_key_exchange_layout(self) -> None:
        ident = Identity.from_seed(bytes(32))
        frame = AuthKeyExchange.build(9, ALICE_PUBLIC, ident.public_key, ident.sign)
        data = frame.encode()
        self.assertEqual(len(data), 136)
        self.assertEqual(data[:40], b"PILA\x00\x00\x00\x09" + ALICE_PUBLIC)
        self.assertEqual(data[40:72], ident.public_key)
        self.assertEqual(data[72:], ident.sign(auth_message(9, ALICE_PUBLIC)))
        self.assertEqual(auth_message(9, ALICE_PUBLIC), b"auth\x00\x00\x00\x09" + ALICE_PUBLIC)
        self.assertEqual(decode_frame(data), frame)
        self.assertTrue(frame.verify(ident.public_key))

    def test_trailing_bytes_ignored(self) -> None:
        """As in the reference, bytes after a fixed-size frame are ignored."""
        for data in sample_frames():
            if data[:4] != PILS:  # a PILS frame's ciphertext runs to the end
                self.assertEqual(decode_frame(data + b"extra").encode(), data)

    def test_sealed_layout(self) -> None:
        frame = SealedFrame(5, bytes(range(12)), b"c" * 16)
        self.assertEqual(frame.encode(), b"PILS\x00\x00\x00\x05" + bytes(range(12)) + b"c" * 16)
        self.assertEqual(frame.nonce_prefix, bytes(range(4)))
        self.assertEqual(frame.counter, int.from_bytes(bytes(range(4, 12)), "big"))

    def test_round_trips(self) -> None:
        for data in sample_frames():
            self.assertEqual(decode_frame(data).encode(), data)

    def test_constructors_validate(self) -> None:
        self.assertRaises(ValueError, KeyExchange, -1, ALICE_PUBLIC)
        self.assertRaises(ValueError, KeyExchange, 1 << 32, ALICE_PUBLIC)
        self.assertRaises(ValueError, KeyExchange, 1, ALICE_PUBLIC[:31])
        self.assertRaises(ValueError, KeyExchange, True, ALICE_PUBLIC)
        self.assertRaises(ValueError, AuthKeyExchange, 1, ALICE_PUBLIC, ALICE_PUBLIC, bytes(63))
        self.assertRaises(ValueError, AuthKeyExchange, 1, ALICE_PUBLIC, "k" * 32, bytes(64))
        self.assertRaises(ValueError, SealedFrame, 1, bytes(11), bytes(16))
        self.assertRaises(ValueError, SealedFrame, 1, bytes(12), bytes(15))
        self.assertRaises(ValueError, SealedFrame, 1, bytes(12), bytearray(16))


# --- hostile input -------------------------------------------------------------------

def decode_all(data: Any) -> None:
    """Every decoder either succeeds or raises MalformedFrame."""
    for decode in DECODERS:
        try:
            decode(data)
        except MalformedFrame:
            pass


class HostileInputTests(SynchronousTestCase):
    def test_truncations(self) -> None:
        minimum = {PILT: 38, PILS: 36, PILK: 40, PILA: 136, PILP: 4}
        for data in sample_frames():
            full_length = len(data) if data[:4] == PILT else minimum[data[:4]]
            for n in range(len(data)):
                decode_all(data[:n])
                if n < full_length:
                    self.assertRaises(MalformedFrame, decode_frame, data[:n])
                else:
                    decode_frame(data[:n])

    def test_wrong_magic(self) -> None:
        for data in sample_frames():
            for decode in DECODERS[:5]:
                if decode.__self__ is not type(decode_frame(data)):  # type: ignore[attr-defined]
                    self.assertRaises(MalformedFrame, decode, data)

    def test_wrong_types(self) -> None:
        for value in (None, "PILP", 5, 1.5, [80, 73, 76, 80], {"a": 1}, object()):
            for decode in DECODERS:
                self.assertRaises(MalformedFrame, decode, value)

    def test_random_bytes(self) -> None:
        rng = random.Random(0xC0FFEE)
        magics = [PILT, PILS, PILK, PILA, PILP, b"", b"\x05", b"PIL"]
        for _ in range(2000):
            data = rng.choice(magics) + rng.randbytes(rng.randrange(0, 200))
            decode_all(data)

    def test_oversized(self) -> None:
        rng = random.Random(3)
        big = rng.randbytes(70000)
        for magic in (PILT, PILS, PILK, PILA, PILP):
            decode_all(magic + big)
        header = bytearray(GO_PILT)
        header[6:8] = b"\xff\xff"  # payload length 65535, none present
        self.assertRaises(MalformedFrame, decode_frame, bytes(header))
        frame = decode_frame(PILS + big)
        assert isinstance(frame, SealedFrame)
        self.assertEqual(len(frame.ciphertext), 70000 - 16)

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.sampled_from([PILT, PILS, PILK, PILA, PILP, b""]), st.binary(max_size=180))
    def test_hypothesis(self, magic: bytes, tail: bytes) -> None:
        decode_all(magic + tail)


# --- crypto ------------------------------------------------------------------------

class DeriveKeyTests(SynchronousTestCase):
    def test_rfc7748(self) -> None:
        self.assertEqual(nacl.bindings.crypto_scalarmult(ALICE_PRIVATE, BOB_PUBLIC), SHARED)
        expected = hashlib.sha256(b"pilot-tunnel-v1:" + SHARED).digest()
        self.assertEqual(derive_key(ALICE_PRIVATE, BOB_PUBLIC), expected)
        self.assertEqual(derive_key(BOB_PRIVATE, ALICE_PUBLIC), expected)
        self.assertEqual(expected.hex(), "7fba3471bc8efe5a218c59651ad860926646b44c842bb2747ad11d976d60c50e")

    def test_both_sides_agree(self) -> None:
        for _ in range(5):
            a, b = PrivateKey.generate(), PrivateKey.generate()
            key = derive_key(bytes(a), bytes(b.public_key))
            self.assertEqual(len(key), 32)
            self.assertEqual(key, derive_key(bytes(b), bytes(a.public_key)))

    def test_low_order_points(self) -> None:
        for point in (bytes(32), b"\x01" + bytes(31), bytes.fromhex(
                "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")):
            self.assertRaises(MalformedFrame, derive_key, ALICE_PRIVATE, point)

    def test_bad_peer_keys(self) -> None:
        for point in (b"", bytes(31), bytes(33), None, "k" * 32):
            self.assertRaises(MalformedFrame, derive_key, ALICE_PRIVATE, point)

    def test_bad_own_key(self) -> None:
        self.assertRaises(ValueError, derive_key, bytes(31), BOB_PUBLIC)


class SealTests(SynchronousTestCase):
    key = derive_key(ALICE_PRIVATE, BOB_PUBLIC)
    nonce = Nonce(b"\x01\x02\x03\x04", 1).to_bytes()

    def test_round_trip(self) -> None:
        for plaintext in (b"", b"x", sample_packet(b"ping-1").encode()):
            sealed = seal(self.key, self.nonce, plaintext)
            self.assertEqual(len(sealed), len(plaintext) + 16)
            self.assertEqual(open_(self.key, self.nonce, sealed), plaintext)

    def test_no_additional_data(self) -> None:
        self.assertEqual(seal(self.key, self.nonce, b"abc"),
                         AESGCM(self.key).encrypt(self.nonce, b"abc", None))

    def test_tampered_ciphertext(self) -> None:
        sealed = seal(self.key, self.nonce, b"attack at dawn")
        for i in range(len(sealed)):
            damaged = bytearray(sealed)
            damaged[i] ^= 0x80
            self.assertRaises(MalformedFrame, open_, self.key, self.nonce, bytes(damaged))
        self.assertRaises(MalformedFrame, open_, self.key, self.nonce, sealed[:-1])
        self.assertRaises(MalformedFrame, open_, self.key, self.nonce, sealed[:15])

    def test_tampered_nonce(self) -> None:
        sealed = seal(self.key, self.nonce, b"attack at dawn")
        for i in range(12):
            damaged = bytearray(self.nonce)
            damaged[i] ^= 0x01
            self.assertRaises(MalformedFrame, open_, self.key, bytes(damaged), sealed)
        self.assertRaises(MalformedFrame, open_, self.key, self.nonce[:11], sealed)
        self.assertRaises(MalformedFrame, open_, self.key, None, sealed)

    def test_wrong_key(self) -> None:
        sealed = seal(self.key, self.nonce, b"attack at dawn")
        other = derive_key(ALICE_PRIVATE, ALICE_PUBLIC)
        self.assertRaises(MalformedFrame, open_, other, self.nonce, sealed)


class NonceTests(SynchronousTestCase):
    def test_layout(self) -> None:
        nonce = Nonce(b"\xaa\xbb\xcc\xdd", 0x0102030405060708)
        self.assertEqual(nonce.to_bytes(), bytes.fromhex("aabbccdd0102030405060708"))
        self.assertEqual(Nonce.from_bytes(nonce.to_bytes()), nonce)

    def test_invalid(self) -> None:
        self.assertRaises(ValueError, Nonce, b"abc", 1)
        self.assertRaises(ValueError, Nonce, b"abcd", -1)
        self.assertRaises(ValueError, Nonce, b"abcd", MAX_COUNTER + 1)
        for data in (b"", bytes(11), bytes(13), None, "x" * 12):
            self.assertRaises(MalformedFrame, Nonce.from_bytes, data)

    def test_sequence_starts_at_one(self) -> None:
        seq = NonceSequence.fresh(lambda n: b"\x11" * n)
        self.assertEqual(seq.prefix, b"\x11\x11\x11\x11")
        self.assertEqual(seq.last_counter, 0)
        self.assertEqual([seq.next().counter for _ in range(3)], [1, 2, 3])
        self.assertEqual(seq.next().to_bytes(), b"\x11" * 4 + (4).to_bytes(8, "big"))

    def test_fresh_prefixes_differ(self) -> None:
        self.assertNotEqual(NonceSequence.fresh().prefix, NonceSequence.fresh().prefix)

    def test_exhausted(self) -> None:
        seq = NonceSequence(b"abcd")
        seq._counter = MAX_COUNTER - 1
        self.assertEqual(seq.next().counter, MAX_COUNTER)
        self.assertRaises(OverflowError, seq.next)


class ReplayWindowTests(SynchronousTestCase):
    def test_first_after_reset(self) -> None:
        for first in (1, 1000, MAX_COUNTER):
            window = ReplayWindow()
            self.assertTrue(window.accept(first))
            self.assertEqual(window.highest, first)
            self.assertFalse(window.accept(first))
            window.reset()
            self.assertIsNone(window.highest)
            self.assertTrue(window.accept(first))

    def test_duplicates(self) -> None:
        window = ReplayWindow()
        for c in (1, 2, 3):
            self.assertTrue(window.accept(c))
        for c in (1, 2, 3):
            self.assertFalse(window.check(c))
            self.assertFalse(window.accept(c))

    def test_out_of_order_in_window(self) -> None:
        window = ReplayWindow()
        self.assertTrue(window.accept(10))
        self.assertTrue(window.accept(5))
        self.assertTrue(window.accept(9))
        self.assertFalse(window.accept(5))
        self.assertEqual(window.highest, 10)

    def test_too_old(self) -> None:
        window = ReplayWindow()
        window.accept(300)
        self.assertTrue(window.check(300 - 255))
        self.assertFalse(window.check(300 - 256))
        self.assertFalse(window.accept(0))
        self.assertTrue(window.accept(45))

    def test_slide_clears_reused_positions(self) -> None:
        """Counter 1 and 257 share a bit position; sliding past 1 clears it for 257."""
        window = ReplayWindow()
        for c in range(1, 257):
            self.assertTrue(window.accept(c))
        self.assertTrue(window.accept(257))
        self.assertFalse(window.check(1))  # now too old
        self.assertFalse(window.accept(257))
        self.assertFalse(window.accept(256))
        self.assertTrue(window.accept(300))
        self.assertFalse(window.accept(44))  # 256 behind
        self.assertFalse(window.accept(257))  # still marked
        self.assertTrue(window.accept(299))  # slid in, never seen

    def test_jump_of_256_or_more_clears_all(self) -> None:
        window = ReplayWindow()
        for c in (1, 2, 3):
            window.accept(c)
        self.assertTrue(window.accept(3 + 256))
        for c in range(4, 3 + 256):
            self.assertTrue(window.check(c), c)
        self.assertFalse(window.check(3))
        window = ReplayWindow()
        window.accept(10)
        self.assertTrue(window.accept(10 + 255))
        self.assertTrue(window.check(11))
        self.assertTrue(window.check(10 + 254))

    def test_check_does_not_mark(self) -> None:
        window = ReplayWindow()
        self.assertTrue(window.check(5))
        self.assertTrue(window.check(5))
        self.assertIsNone(window.highest)
        window.mark(5)
        self.assertFalse(window.check(5))
        self.assertRaises(ValueError, window.mark, 5)

    def test_unmark_after_failed_decrypt(self) -> None:
        """The reference's order: accept, decryption fails, unmark; the counter stays usable."""
        window = ReplayWindow()
        window.accept(1)
        self.assertTrue(window.accept(2))
        window.unmark(2)
        self.assertTrue(window.accept(2))
        self.assertFalse(window.accept(2))
        window.unmark(10_000)  # outside the window: nothing to clear
        self.assertFalse(window.check(1))


class TunnelSessionTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        a, b = session_pair()
        for i in range(1, 4):
            packet = sample_packet(b"ping-%d" % i)
            frame = SealedFrame.seal(a, 1, packet)
            self.assertEqual(frame.counter, i)
            self.assertEqual(frame.nonce_prefix, a.nonces.prefix)
            self.assertEqual(len(frame.encode()), 4 + 4 + 12 + 34 + 6 + 16)
            self.assertEqual(SealedFrame.decode(frame.encode()).open(b), packet)
        # Both directions use the same key.
        back = SealedFrame.seal(b, 2, sample_packet())
        self.assertEqual(len(back.encode()), 70)
        self.assertEqual(back.open(a), sample_packet())

    def test_replay_refused(self) -> None:
        a, b = session_pair()
        frame = SealedFrame.seal(a, 1, sample_packet())
        frame.open(b)
        self.assertRaises(MalformedFrame, frame.open, b)

    def test_failed_decrypt_does_not_consume_counter(self) -> None:
        a, b = session_pair()
        frame = SealedFrame.seal(a, 1, sample_packet())
        forged = SealedFrame(1, frame.nonce, bytes([frame.ciphertext[0] ^ 1]) + frame.ciphertext[1:])
        self.assertRaises(MalformedFrame, forged.open, b)
        self.assertEqual(frame.open(b), sample_packet())

    def test_forged_high_counter_does_not_slide(self) -> None:
        """Unlike the reference, a frame that fails to decrypt never moves the window."""
        a, b = session_pair()
        SealedFrame.seal(a, 1, sample_packet()).open(b)
        forged = SealedFrame(1, Nonce(a.nonces.prefix, 1 << 40).to_bytes(), bytes(50))
        self.assertRaises(MalformedFrame, forged.open, b)
        self.assertEqual(b.window.highest, 1)
        self.assertEqual(SealedFrame.seal(a, 1, sample_packet()).open(b), sample_packet())

    def test_not_a_packet_inside(self) -> None:
        a, b = session_pair()
        nonce, ciphertext = a.seal(b"not a packet")
        self.assertRaises(MalformedFrame, SealedFrame(1, nonce, ciphertext).open, b)

    def test_rekey_resets(self) -> None:
        """A new session: fresh prefix, counter from 1, empty window."""
        a_priv, b_priv = PrivateKey.generate(), PrivateKey.generate()
        a1 = TunnelSession.derive(bytes(a_priv), bytes(b_priv.public_key), lambda n: b"\x01" * n)
        b1 = TunnelSession.derive(bytes(b_priv), bytes(a_priv.public_key))
        old = SealedFrame.seal(a1, 1, sample_packet())
        old.open(b1)
        a2 = TunnelSession.derive(bytes(a_priv), bytes(b_priv.public_key), lambda n: b"\x02" * n)
        b2 = TunnelSession.derive(bytes(b_priv), bytes(a_priv.public_key))
        new = SealedFrame.seal(a2, 1, sample_packet())
        self.assertEqual((new.counter, new.nonce_prefix), (1, b"\x02" * 4))
        # The key is unchanged, so a captured old frame opens again after the re-key
        # (docs/reference-wire.md §9 item 10).
        self.assertEqual(old.open(b2), sample_packet())
        # A receiver that did not re-key refuses the re-keyed side's counter 1 (go-session-2 entry 33).
        self.assertRaises(MalformedFrame, new.open, b1)

    def test_bad_input(self) -> None:
        a, b = session_pair()
        self.assertRaises(MalformedFrame, b.open, bytes(11), bytes(32))
        self.assertRaises(MalformedFrame, b.open, bytes(12), bytes(15))
        self.assertRaises(MalformedFrame, b.open, bytes(12), None)
