"""
Tests for L{pilot.identity}: the reference's identity file, signing, verifying.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import Identity, b64decode, b64encode, verify
from pilot.persist import StateFileError, dump_json

from tests import capture


def vector_files() -> list[str]:
    return [capture.vector_path(s, f"identity-agent-{n}.json") for s in ("go-session-1", "go-session-2") for n in "ab"]


class VectorFileTests(SynchronousTestCase):
    def test_load_and_reserialise(self) -> None:
        """The Go files load, and writing them back gives the same JSON (Go adds no final newline)."""
        for path in vector_files():
            with open(path, "rb") as f:
                raw = f.read()
            ident = Identity.load(path)
            self.assertEqual(ident.to_json(), json.loads(raw))
            self.assertEqual(dump_json(ident.to_json()), raw + b"\n")
            self.assertEqual(ident.public_key_b64, json.loads(raw)["public_key"])

    def test_save_round_trip(self) -> None:
        for path in vector_files():
            ident = Identity.load(path)
            copy = self.mktemp()
            ident.save(copy)
            self.assertEqual(Identity.load(copy).to_json(), ident.to_json())

    def test_private_key_layout(self) -> None:
        for path in vector_files():
            ident = Identity.load(path)
            private = base64.b64decode(ident.to_json()["private_key"])
            self.assertEqual(len(private), 64)
            self.assertEqual(private[32:], ident.public_key)
            self.assertEqual(Identity.from_seed(private[:32]).public_key, ident.public_key)


class CorruptFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.good = Identity.from_seed(bytes(range(32))).to_json()
        self.other = Identity.from_seed(bytes(32)).to_json()

    def assertRefused(self, content: bytes) -> StateFileError:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        e = self.assertRaises(StateFileError, Identity.load, path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), content, "the file must be left untouched")
        return e

    def refuse_value(self, value: Any) -> StateFileError:
        return self.assertRefused(json.dumps(value).encode())

    def test_wrong_lengths(self) -> None:
        private = base64.b64decode(self.good["private_key"])
        public = base64.b64decode(self.good["public_key"])
        for priv, pub in ((private[:63], public), (private + b"\x00", public), (private[:32], public),
                          (private, public[:31]), (private, public + b"\x00"), (b"", b"")):
            self.refuse_value({"private_key": b64encode(priv), "public_key": b64encode(pub)})

    def test_mismatched(self) -> None:
        e = self.refuse_value({"private_key": self.good["private_key"],
                               "public_key": self.other["public_key"]})
        self.assertIn("does not match", e.reason)
        # The seed's key stated as public_key, but the private key's second half is another key.
        private = base64.b64decode(self.good["private_key"])
        other_public = base64.b64decode(self.other["public_key"])
        self.refuse_value({"private_key": b64encode(private[:32] + other_public),
                           "public_key": self.good["public_key"]})

    def test_not_json(self) -> None:
        for content in (b"", b"{", b"not json", b"\xff\xfe{}", b'{"private_key": NaN}', b'[' * 100000):
            self.assertRefused(content)

    def test_not_object(self) -> None:
        for value in ([], [self.good], "text", 5, None, True):
            self.refuse_value(value)

    def test_bad_fields(self) -> None:
        for value in ({}, {"private_key": self.good["private_key"]}, {"public_key": self.good["public_key"]},
                      dict(self.good, private_key=None), dict(self.good, public_key=5),
                      dict(self.good, public_key=self.good["public_key"].rstrip("=")),
                      dict(self.good, public_key="!" * 44),
                      dict(self.good, private_key=self.good["private_key"].replace("=", "A"))):
            self.refuse_value(value)

    def test_missing_file(self) -> None:
        self.assertRaises(FileNotFoundError, Identity.load, self.mktemp())

    def test_from_json_raises_value_error(self) -> None:
        self.assertRaises(ValueError, Identity.from_json, [])
        self.assertRaises(ValueError, Identity.from_json, {})


class GeneratedIdentityTests(SynchronousTestCase):
    def test_save_mode(self) -> None:
        folder = self.mktemp()
        path = os.path.join(folder, "nested", "identity.json")
        ident = Identity.generate()
        ident.save(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(Identity.load(path).public_key, ident.public_key)
        with open(path, "rb") as f:
            text = f.read().decode()
        self.assertTrue(text.startswith('{\n  "private_key": "'))

    def test_save_replaces(self) -> None:
        path = self.mktemp()
        Identity.generate().save(path)
        ident = Identity.generate()
        ident.save(path)
        self.assertEqual(Identity.load(path).public_key, ident.public_key)
        self.assertEqual(os.listdir(os.path.dirname(path)), [os.path.basename(path)])

    def test_distinct(self) -> None:
        self.assertNotEqual(Identity.generate().public_key, Identity.generate().public_key)

    def test_repr_hides_private_key(self) -> None:
        ident = Identity.from_seed(bytes(range(32)))
        self.assertNotIn(ident.to_json()["private_key"][:20], repr(ident))
        self.assertIn(ident.public_key_b64, repr(ident))


class Base64Tests(SynchronousTestCase):
    def test_accepts(self) -> None:
        self.assertEqual(b64decode(b64encode(bytes(32)), 32), bytes(32))
        self.assertEqual(b64decode("AAEC", None), b"\x00\x01\x02")
        self.assertEqual(b64decode("", None), b"")

    def test_strict(self) -> None:
        key = b64encode(bytes(range(32)))
        for text in (key.rstrip("="), key + "=", key + "\n", " " + key, key[:-2] + "-=",
                     key[:-2] + "_=", key[:10] + "=" + key[11:], key.replace("A", "é", 1),
                     b64encode(bytes(31)), b64encode(bytes(33))):
            self.assertRaises(ValueError, b64decode, text, 32)
        for value in (key.encode(), None, 32, [key]):
            self.assertRaises(ValueError, b64decode, value, 32)
        self.assertRaises(ValueError, b64decode, "AAE", None)
        self.assertRaises(ValueError, b64decode, "A===", None)

    def test_reason_names_the_field(self) -> None:
        e = self.assertRaises(ValueError, b64decode, "x", 32, "public_key")
        self.assertIn("public_key", str(e))


class SignVerifyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ident = Identity.from_seed(bytes(range(32)))
        self.sig = self.ident.sign(b"heartbeat:1")

    def test_verify(self) -> None:
        self.assertEqual(len(self.sig), 64)
        self.assertEqual(self.ident.sign(b"heartbeat:1"), self.sig, "Ed25519 is deterministic")
        self.assertTrue(verify(self.ident.public_key, b"heartbeat:1", self.sig))
        self.assertEqual(self.ident.sign_b64(b"heartbeat:1"), b64encode(self.sig))

    def test_false_on_garbage(self) -> None:
        key = self.ident.public_key
        other = Identity.from_seed(bytes(32)).public_key
        flipped = bytes([self.sig[0] ^ 1]) + self.sig[1:]
        for args in ((key, b"heartbeat:2", self.sig), (other, b"heartbeat:1", self.sig),
                     (key, b"heartbeat:1", flipped), (key, b"heartbeat:1", self.sig[:63]),
                     (key, b"heartbeat:1", self.sig + b"\x00"), (key[:31], b"heartbeat:1", self.sig),
                     (bytes(32), b"heartbeat:1", self.sig), (b"\xff" * 32, b"heartbeat:1", self.sig),
                     (key, b"heartbeat:1", bytes(64)), (key, b"heartbeat:1", b"\xff" * 64),
                     (None, b"heartbeat:1", self.sig), (key, b"heartbeat:1", None),
                     (key.hex(), b"heartbeat:1", self.sig), (key, "heartbeat:1", self.sig),
                     (key, None, self.sig), (list(key), b"heartbeat:1", self.sig)):
            self.assertFalse(verify(*args), args)  # type: ignore[arg-type]
