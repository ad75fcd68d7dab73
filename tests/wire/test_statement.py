"""
Tests for L{pilot.wire.statement}: the signed trust statement a node keeps at the rendezvous.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import MalformedFrame
from pilot.identity import Identity, b64encode
from pilot.wire.statement import MAGIC, MAX_STATEMENT, TrustStatement, decode, make_statement, newest

ALICE = Identity.from_seed(b"a" * 32)
BOB = Identity.from_seed(b"b" * 32)
MALLORY = Identity.from_seed(b"m" * 32)
A, B = ALICE.address.node, BOB.address.node


def grant(seq: int = 1000, by: Identity = ALICE, peer: int = B, peer_key: bytes = BOB.public_key,
          revoked: bool = False) -> TrustStatement:
    return make_statement(by.address.node, by.public_key, peer, peer_key, 1795301000, seq, revoked, by.sign)


class CodecTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        for s in (grant(), grant(revoked=True), grant(peer_key=b"")):
            text = s.encode()
            self.assertTrue(text.startswith(MAGIC + " "))
            self.assertLessEqual(len(text), MAX_STATEMENT)
            self.assertEqual(decode(text), s)
            self.assertTrue(decode(text).is_by(A, ALICE.public_key))

    def test_shape(self) -> None:
        fields = grant(seq=7).encode().split(" ")
        self.assertEqual(fields[1:4], [str(A), b64encode(ALICE.public_key), str(B)])
        self.assertEqual(fields[5:8], ["1795301000", "7", "grant"])
        self.assertEqual(grant(peer_key=b"").encode().split(" ")[4], "-")

    def test_malformed(self) -> None:
        good = grant().encode()
        fields = good.split(" ")
        bad = [
            None, b"bytes", 7, "", "x" * (MAX_STATEMENT + 1), good + " extra", good.replace("grant", "grunt"),
            good.replace(MAGIC, "pilot-trust/2"), good.replace(" ", "  ", 1), good + "\u00e9",
            " ".join(fields[:2] + ["not-base64!"] + fields[3:]),
            " ".join(fields[:3] + [str(A)] + fields[4:]),               # names itself twice
            " ".join(fields[:1] + ["0"] + fields[2:]),                  # node id 0
            " ".join(fields[:1] + ["4294967296"] + fields[2:]),         # beyond u32
            " ".join(fields[:1] + ["0" + str(A)] + fields[2:]),         # not canonical
            " ".join(fields[:6] + ["-1"] + fields[7:]),
            " ".join(fields[:8] + [fields[8][:-4]]),                    # short signature
        ]
        for text in bad:
            self.assertRaises(MalformedFrame, decode, text)

    def test_truncated(self) -> None:
        good = grant().encode()
        for n in range(len(good)):
            with self.subTest(n=n):
                self.assertRaises(MalformedFrame, decode, good[:n])

    def test_wrong_signature(self) -> None:
        s = grant()
        forged = TrustStatement(s.granter, s.granter_key, s.peer, s.peer_key, s.granted_at, s.seq + 1,
                                s.revoked, s.signature)
        self.assertFalse(decode(forged.encode()).is_by(A, ALICE.public_key))
        widened = TrustStatement(s.granter, s.granter_key, s.peer, MALLORY.public_key, s.granted_at, s.seq,
                                 s.revoked, s.signature)
        self.assertFalse(widened.is_by(A, ALICE.public_key))

    def test_someone_elses(self) -> None:
        theirs = grant(by=MALLORY, peer=B)
        self.assertTrue(theirs.is_by(MALLORY.address.node, MALLORY.public_key))
        self.assertFalse(theirs.is_by(A, ALICE.public_key))
        # Mallory's key signing a statement that claims to be Alice's
        claimed = make_statement(A, ALICE.public_key, B, BOB.public_key, 1, 1, False, MALLORY.sign)
        self.assertFalse(claimed.is_by(A, ALICE.public_key))

    def test_newest_wins(self) -> None:
        old, revoke = grant(seq=1), grant(seq=2, revoked=True)
        self.assertEqual(newest([revoke, old]), {(A, B): revoke})
        self.assertEqual(newest([old, revoke]), {(A, B): revoke})

    def test_make_refuses_impossible_values(self) -> None:
        for args in ((A, ALICE.public_key, A, b"", 1, 1), (0, ALICE.public_key, B, b"", 1, 1),
                     (A, b"short", B, b"", 1, 1), (A, ALICE.public_key, B, b"", -1, 1),
                     (A, ALICE.public_key, B, b"", 1, 1 << 60)):
            self.assertRaises(ValueError, make_statement, *args, False, ALICE.sign)
