"""
Tests for L{pilot.trust}: the trust store file.
"""

from __future__ import annotations

from tests import capture

import json
import os
import stat
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import b64encode
from pilot.persist import StateFileError
from pilot.trust import (
    FILE_NAME, OutgoingRequest, PendingRequest, TrustedPeer, TrustStore, format_time, parse_time, path_beside,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
T0 = 1795301057.0
T0_TEXT = "2026-11-21T22:44:17Z"


def vector_path() -> str:
    return capture.vector_path("go-session-2", "trust-store.json")


def full_store() -> TrustStore:
    return TrustStore(
        trusted={2: TrustedPeer(2, KEY_A, T0, True), 5: TrustedPeer(5, b"", T0 + 1, False, network=7)},
        pending={9: PendingRequest(9, KEY_B, "let me in", T0 + 2), 10: PendingRequest(10, b"", "", T0 + 3)},
        outgoing={4: OutgoingRequest(4, "please", T0 + 4), 6: OutgoingRequest(6, "", T0 + 5)},
        extra={"future_key": {"x": [1, 2]}})


class FormatTests(SynchronousTestCase):
    def test_vector_round_trip(self) -> None:
        """The reference's file loads, and saves back to the same JSON."""
        path = vector_path()
        with open(path, "rb") as f:
            original = json.load(f)
        store = TrustStore.load(path)
        self.assertEqual(store.trusted, {2: TrustedPeer(
            2, bytes.fromhex("679ffd17aed7e75bd9a12816a2d7c742" "58be25d57e28527c0da75dccf1dd90bb"),
            T0, True, 0)})
        self.assertEqual(store.pending, {})
        self.assertEqual(store.outgoing, {})
        self.assertEqual(store.to_json(), original)
        out = self.mktemp()
        store.save(out)
        with open(out, "rb") as f:
            self.assertEqual(json.load(f), original)

    def test_pretty_two_space_indent(self) -> None:
        path = self.mktemp()
        TrustStore(trusted={2: TrustedPeer(2, KEY_A, T0, True)}).save(path)
        with open(path) as f:
            text = f.read()
        self.assertEqual(text, (
            '{\n'
            '  "trusted": [\n'
            '    {\n'
            '      "node_id": 2,\n'
            f'      "public_key": "{b64encode(KEY_A)}",\n'
            '      "approved_at": "2026-11-21T22:44:17Z",\n'
            '      "mutual": true\n'
            '    }\n'
            '  ]\n'
            '}\n'))

    def test_empty_store(self) -> None:
        self.assertEqual(TrustStore().to_json(), {"trusted": []})

    def test_full_round_trip(self) -> None:
        store = full_store()
        value = store.to_json()
        self.assertEqual(value["trusted"][1], {"node_id": 5, "public_key": "", "network": 7,
                                               "approved_at": "2026-11-21T22:44:18Z", "mutual": False})
        self.assertEqual(value["pending"][1], {"node_id": 10, "received_at": "2026-11-21T22:44:20Z"})
        self.assertEqual(value["outgoing"][1], {"node_id": 6, "sent_at": "2026-11-21T22:44:22Z"})
        self.assertEqual(value["future_key"], {"x": [1, 2]})
        again = TrustStore.from_json(json.loads(json.dumps(value)))
        self.assertEqual((again.trusted, again.pending, again.outgoing, again.extra),
                         (store.trusted, store.pending, store.outgoing, store.extra))
        path = self.mktemp()
        store.save(path)
        loaded = TrustStore.load(path)
        self.assertEqual(loaded.to_json(), value)

    def test_go_nil_slices_and_missing_optionals(self) -> None:
        store = TrustStore.from_json({"trusted": None, "pending": None})
        self.assertEqual((store.trusted, store.pending), ({}, {}))
        store = TrustStore.from_json({"trusted": [{"node_id": 3, "approved_at": "2026-11-21T22:44:17Z"}],
                                      "pending": [{"node_id": 4, "received_at": "2026-11-21T22:44:17Z"}]})
        self.assertEqual(store.trusted[3], TrustedPeer(3, b"", T0, False, 0))
        self.assertEqual(store.pending[4], PendingRequest(4, b"", "", T0))

    def test_times(self) -> None:
        self.assertEqual(format_time(T0), "2026-11-21T22:44:17Z")
        self.assertEqual(format_time(T0 + 0.9), "2026-11-21T22:44:17Z")
        store = TrustStore.from_json({"trusted": [
            {"node_id": 1, "approved_at": "2026-11-21T22:44:17.123456789Z"},
            {"node_id": 2, "approved_at": "2026-11-22T00:44:17+02:00"},
            {"node_id": 3, "approved_at": "0001-01-01T00:00:00Z"}]})  # Go's zero time
        self.assertAlmostEqual(store.trusted[1].approved_at, T0 + 0.123456789, places=5)
        self.assertEqual(store.trusted[2].approved_at, T0)
        self.assertEqual(store.to_json()["trusted"][2]["approved_at"], "0001-01-01T00:00:00Z")
        self.assertEqual(parse_time("1969-12-31T23:59:59.5Z"), -0.5)
        self.assertEqual(format_time(-0.5), "1969-12-31T23:59:59Z")
        self.assertEqual(parse_time("9999-12-31T23:59:59Z"), 253402300799.0)
        for bad in ("", "2026-11-21", "2026-11-21T22:44:17", "2026-11-21 22:44:17Z", "2026-02-30T00:00:00Z",
                    "2026-11-21T24:00:00Z", "2026-11-21T22:44:17.Z", "2026-11-21T22:44:17.1234567890Z",
                    "\uff12026-11-21T22:44:17Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
                    " 2026-11-21T22:44:17Z", "2026-11-21T22:44:17Z\n"):
            self.assertRaises(ValueError, parse_time, bad)

    def test_ipc_views(self) -> None:
        store = full_store()
        self.assertEqual(store.trusted[2].as_ipc(), {"node_id": 2, "public_key": b64encode(KEY_A),
                                                     "approved_at": int(T0), "mutual": True, "network": 0})
        self.assertEqual(store.pending[10].as_ipc(), {"node_id": 10, "public_key": "", "justification": "",
                                                      "received_at": int(T0) + 3})

    def test_forget(self) -> None:
        store = full_store()
        self.assertTrue(store.forget(2))
        self.assertTrue(store.forget(9))
        self.assertTrue(store.forget(4))
        self.assertFalse(store.forget(99))
        self.assertEqual((set(store.trusted), set(store.pending), set(store.outgoing)), ({5}, {10}, {6}))

    def test_path_beside(self) -> None:
        self.assertEqual(path_beside("/home/u/.pilot/identity.json"), "/home/u/.pilot/" + FILE_NAME)


class FileTests(SynchronousTestCase):
    def test_missing_is_empty(self) -> None:
        store = TrustStore.load(self.mktemp())
        self.assertEqual(store.to_json(), {"trusted": []})

    def test_mode_0600_and_no_temporaries(self) -> None:
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, FILE_NAME)
        with open(path, "w") as f:
            f.write("{}")
        os.chmod(path, 0o644)
        full_store().save(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(os.listdir(folder), [FILE_NAME])

    def test_creates_folder(self) -> None:
        path = os.path.join(self.mktemp(), "a", FILE_NAME)
        TrustStore().save(path)
        self.assertEqual(TrustStore.load(path).to_json(), {"trusted": []})


GOOD_ENTRY = {"node_id": 2, "public_key": b64encode(KEY_A), "approved_at": "2026-11-21T22:44:17Z",
              "mutual": True}


def trusted_with(**changes: Any) -> dict[str, Any]:
    entry = dict(GOOD_ENTRY)
    for key, value in changes.items():
        if value is ...:
            del entry[key]
        else:
            entry[key] = value
    return {"trusted": [entry]}


CORRUPT: list[bytes] = [
    b"",
    b"\x00\x01\x02garbage",
    b"\xff\xfe",
    b'{"trusted": [',
    b"[]",
    b'"trusted"',
    b"null",
    json.dumps({"trusted": {}}).encode(),
    json.dumps({"trusted": [5]}).encode(),
    json.dumps({"trusted": "x"}).encode(),
    json.dumps({"pending": [[]]}).encode(),
    json.dumps({"outgoing": [{"node_id": 1}]}).encode(),
    json.dumps({"trusted": [GOOD_ENTRY, GOOD_ENTRY]}).encode(),
    json.dumps({"pending": [{"node_id": 1, "received_at": "yesterday"}]}).encode(),
    json.dumps({"pending": [{"node_id": 1, "received_at": T0_TEXT, "justification": 5}]}).encode(),
    json.dumps({"pending": [{"node_id": 1, "received_at": T0_TEXT, "public_key": None}]}).encode(),
] + [json.dumps(trusted_with(**change)).encode() for change in (
    {"node_id": ...}, {"node_id": "2"}, {"node_id": True}, {"node_id": -1}, {"node_id": 1 << 32},
    {"node_id": 2.0}, {"public_key": "not base64!"}, {"public_key": b64encode(KEY_A[:31])},
    {"public_key": None}, {"approved_at": ...}, {"approved_at": 1795301057},
    {"approved_at": "2026-13-45T99:00:00Z"}, {"approved_at": ""}, {"mutual": "yes"}, {"mutual": 1},
    {"network": -1}, {"network": 70000}, {"network": "7"},
)]


class CorruptFileTests(SynchronousTestCase):
    def test_every_corruption_raises_and_leaves_the_file(self) -> None:
        for data in CORRUPT:
            path = self.mktemp()
            with open(path, "wb") as f:
                f.write(data)
            before = os.stat(path)
            with self.assertRaises(StateFileError, msg=repr(data)[:200]) as e:
                TrustStore.load(path)
            self.assertEqual(e.exception.path, path)
            with open(path, "rb") as f:
                self.assertEqual(f.read(), data)
            self.assertEqual(os.stat(path).st_mtime_ns, before.st_mtime_ns)
            self.assertEqual(os.listdir(os.path.dirname(path)).count(os.path.basename(path)), 1)

    def test_truncated_vector(self) -> None:
        with open(vector_path(), "rb") as f:
            data = f.read()
        for end in range(len(data.rstrip())):
            path = self.mktemp()
            with open(path, "wb") as f:
                f.write(data[:end])
            with self.assertRaises(StateFileError, msg=repr(data[:end])[-40:]):
                TrustStore.load(path)

    def test_unreadable(self) -> None:
        path = self.mktemp()
        os.makedirs(path)
        with self.assertRaises(StateFileError):
            TrustStore.load(path)
