"""
Tests for pilot.services.store: coalesced writes and refusing bad store files.
"""

from __future__ import annotations

import json
import marshal
import os
import stat
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pilot.server.state import RegistryState
from pilot.server import sidecar
from pilot.server.journal import encode_record
from pilot.services.store import (
    RETRY_DELAY, StoreError, StoreWriter, default_store_path, journal_path, load, load_store,
)

from tests import capture
from tests.server.test_sidecar import forge, rich_state

VECTORS = capture.vectors_dir()


class Snapshots:
    def __init__(self) -> None:
        self.calls = 0
        self.value: dict[str, Any] = {"n": 0}

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return dict(self.value)


class StoreWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = self.mktemp()
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "registry.json")
        self.clock = Clock()
        self.snapshot = Snapshots()
        self.writer = StoreWriter(self.path, self.snapshot, self.clock, delay=0.25)

    def read(self) -> Any:
        with open(self.path) as f:
            return json.load(f)

    def test_coalesces(self) -> None:
        """A burst of changes costs one write, ``delay`` seconds after the first."""
        for i in range(50):
            self.snapshot.value = {"n": i}
            self.writer.changed()
            self.clock.advance(0.001)
        self.assertFalse(os.path.exists(self.path))
        self.clock.advance(0.25)
        self.assertEqual((self.snapshot.calls, self.writer.writes), (1, 1))
        self.assertEqual(self.read(), {"n": 49})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_compact_and_private(self) -> None:
        self.writer.changed()
        self.clock.advance(1)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b'{"n":0}')
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_next_burst_writes_again(self) -> None:
        self.writer.changed()
        self.clock.advance(1)
        self.snapshot.value = {"n": 2}
        self.writer.changed()
        self.writer.changed()
        self.clock.advance(1)
        self.assertEqual(self.writer.writes, 2)
        self.assertEqual(self.read(), {"n": 2})

    def test_touched_writes_lazily(self) -> None:
        """Replay state alone is written within ``touch_delay``; a real change brings that forward."""
        self.writer.touched()
        self.clock.advance(4.9)
        self.assertEqual(self.writer.writes, 0)
        self.clock.advance(0.1)
        self.assertEqual(self.writer.writes, 1)
        self.writer.touched()
        self.clock.advance(1)
        self.writer.changed()
        self.clock.advance(0.25)
        self.assertEqual(self.writer.writes, 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.writer.touched()
        self.assertTrue(self.writer.flush())
        self.assertEqual(self.writer.writes, 3)

    def test_when_saved(self) -> None:
        """Durable acknowledgements: a change's Deferred fires once a write holding it is done."""
        self.writer.changed()
        first = self.writer.when_saved(self.writer.generation)
        self.writer.changed()
        second = self.writer.when_saved(self.writer.generation)
        self.assertNoResult(first)
        self.clock.advance(0.25)
        self.successResultOf(first)
        self.successResultOf(second)  # one write, both changes: a group commit
        self.assertEqual((self.writer.saved, self.writer.writes), (2, 1))
        self.successResultOf(self.writer.when_saved(1))  # already on disk

    def test_when_saved_waits_through_failures(self) -> None:
        """A failed write acknowledges nothing; the retry does; or the waiters are failed at the end."""
        os.rmdir(self.folder)
        with open(self.folder, "w") as f:
            f.write("not a folder")
        self.writer.changed()
        waiting = self.writer.when_saved(self.writer.generation)
        self.clock.advance(0.25)
        self.assertNoResult(waiting)
        self.assertEqual(self.writer.saved, 0)
        os.remove(self.folder)
        os.makedirs(self.folder)
        self.clock.advance(RETRY_DELAY)
        self.successResultOf(waiting)
        self.writer.changed()
        lost = self.writer.when_saved(self.writer.generation)
        self.writer.abandon_waiters(RuntimeError("gone"))
        self.failureResultOf(lost, RuntimeError)
        self.flushLoggedErrors()

    def test_flush(self) -> None:
        """flush writes now if dirty and cancels the scheduled write; clean, it does nothing."""
        self.assertTrue(self.writer.flush())
        self.assertEqual(self.snapshot.calls, 0)
        self.writer.changed()
        self.assertTrue(self.writer.flush())
        self.assertEqual(self.read(), {"n": 0})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.writer.writes, 1)

    def test_write_error_retried(self) -> None:
        """A failed write is logged loudly and retried later; nothing raises."""
        os.rmdir(self.folder)
        with open(self.folder, "w") as f:  # the folder is now a file: every write fails
            f.write("x")
        with capturedLogs() as events:
            self.writer.changed()
            self.clock.advance(0.25)
        self.assertEqual(self.writer.failures, 1)
        self.assertTrue(self.writer.dirty)
        self.assertIn("COULD NOT SAVE", events[0]["log_format"])
        self.flushLoggedErrors()
        self.assertFalse(self.writer.flush())
        self.flushLoggedErrors()
        os.unlink(self.folder)
        os.makedirs(self.folder)
        self.writer.changed()  # a retry is already scheduled; this rides along
        self.clock.advance(RETRY_DELAY * 2)
        self.assertEqual(self.read(), {"n": 0})
        self.assertEqual((self.writer.failures, self.writer.dirty), (0, False))

    def test_snapshot_error_contained(self) -> None:
        def broken() -> dict[str, Any]:
            raise RuntimeError("bug")

        writer = StoreWriter(self.path, broken, self.clock)
        with capturedLogs():
            writer.changed()
            self.clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(writer.dirty)

    def test_stop(self) -> None:
        self.writer.changed()
        self.writer.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LoadStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = self.mktemp()
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "registry.json")

    def write(self, data: bytes) -> None:
        with open(self.path, "wb") as f:
            f.write(data)

    def test_missing(self) -> None:
        self.assertIsNone(load_store(self.path))

    def test_round_trip(self) -> None:
        state = RegistryState(created=1_800_000_000.0)
        self.write(json.dumps(state.to_json()).encode())
        loaded = load_store(self.path)
        assert loaded is not None
        self.assertEqual(loaded.to_json(), state.to_json())

    def test_reference_stores(self) -> None:
        for name in ("go-session-1", "go-session-2"):
            path = os.path.join(VECTORS, name, "registry-store.json")
            state = load_store(path)
            self.assertIsInstance(state, RegistryState, path)
        state = load_store(os.path.join(VECTORS, "go-session-2", "registry-store.json"))
        assert state is not None
        self.assertEqual(sorted(state.nodes), [1])
        self.assertEqual(state.nodes[1].hostname, "agent-a")
        self.assertIn((1, 2), state.trust)

    def assertRefused(self, data: bytes, *words: str) -> None:
        self.write(data)
        with self.assertRaises(StoreError) as raised:
            load_store(self.path)
        message = str(raised.exception)
        self.assertIn(self.path, message)
        self.assertIn("left untouched", message)
        for word in words:
            self.assertIn(word, message)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), data)

    def test_not_json(self) -> None:
        self.assertRefused(b'{"nodes": {', "JSON")

    def test_not_utf8(self) -> None:
        self.assertRefused(b"\xff\xfe\x00garbage")

    def test_empty_file(self) -> None:
        self.assertRefused(b"")

    def test_nested_too_deeply(self) -> None:
        self.assertRefused(b"[" * 200_000 + b"]" * 200_000)
        self.assertRefused(b'{"nodes": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")

    def test_not_an_object(self) -> None:
        self.assertRefused(b"[1, 2, 3]", "object")

    def test_wrong_types(self) -> None:
        self.assertRefused(b'{"nodes": []}', "not a registry store")
        self.assertRefused(b'{"nodes": {"1": {"id": "one"}}}', "not a registry store")
        self.assertRefused(b'{"nodes": {"1": {"id": 2, "public_key": "a9o8PZ7dms65UfJGt0uyAT6iWNqCteg3jd9Hojjm/7E=",'
                           b' "networks": [0]}}}', "not a registry store")
        self.assertRefused(b'{"trust_pairs": ["1-2"]}', "not a registry store")
        self.assertRefused(b'{"pub_key_idx": {"!!": 1}}', "not a registry store")
        self.assertRefused(b'{"handshake_inbox": {"x": []}}', "not a registry store")

    def test_malformed_auth_ts(self) -> None:
        """
        The replay state is refused whole when any entry is wrong (a start with
        a wrong floor would let captured requests back in, or lock a node out):
        the file is left as it is, for whoever repairs it.
        """
        for bad in ('{"7": "1"}', '{"7": -1}', '{"7": true}', '{"7": 1.5}', '{"7": null}', '{"7": 9007199254740992}',
                    '{"x": 1}', '{"": 1}', '{"-7": 1}', '{"4294967296": 1}', '[7]', '"7:1"', '{"7": [1]}'):
            self.assertRefused(b'{"nodes": {}, "auth_ts": %s}' % bad.encode(), "not a registry store", "auth_ts")
        self.write(b'{"nodes": {}, "auth_ts": {"7": 9007199254740991, "4294967295": 0}}')  # the bounds: taken
        state = load_store(self.path)
        assert state is not None
        self.assertEqual(state.auth_ts, {7: (1 << 53) - 1, 0xFFFFFFFF: 0})

    def test_unreadable(self) -> None:
        os.makedirs(self.path)  # a folder where the file should be
        with self.assertRaises(StoreError) as raised:
            load_store(self.path)
        self.assertIn(self.path, str(raised.exception))

    def test_stale_temporaries_removed(self) -> None:
        stale = os.path.join(self.folder, ".registry.json.abc123.tmp")
        other = os.path.join(self.folder, ".other.json.abc.tmp")
        for p in (stale, other):
            with open(p, "w") as f:
                f.write("{")
        self.assertIsNone(load_store(self.path))
        self.assertFalse(os.path.exists(stale))
        self.assertTrue(os.path.exists(other))


class SidecarLoadTests(SynchronousTestCase):
    """
    ``load`` takes the store's sidecar only while it matches the store and
    nothing is to be replayed; every other case loads and checks the store
    as if there were no sidecar, and a malformed store is still refused.
    """

    def setUp(self) -> None:
        self.folder = self.mktemp()
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "registry.json")
        self.state = rich_state()
        self.store = self.state.to_bytes()
        self.side = sidecar.encode(self.state, self.store)
        self.expected = RegistryState.from_json(json.loads(self.store)).to_bytes()
        self.put(self.path, self.store)
        self.put(sidecar.path_of(self.path), self.side)

    def put(self, path: str, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)

    def loaded(self, from_sidecar: bool) -> RegistryState:
        with capturedLogs() as events:
            result = load(self.path)
        assert result.state is not None
        self.assertEqual(result.sidecar_current, from_sidecar)
        self.assertEqual(result.state.to_bytes(), self.expected)
        self.assertEqual([e for e in events if e.get("log_level") == LogLevel.critical], [])
        return result.state

    def test_matching_sidecar_used(self) -> None:
        self.loaded(from_sidecar=True)

    def test_store_replaced_after_the_sidecar(self) -> None:
        """A store written since (by hand, by the reference, by another writer) is checked in full."""
        self.store = json.dumps(json.loads(self.store), indent=1).encode()
        self.put(self.path, self.store)
        self.loaded(from_sidecar=False)

    def test_no_sidecar(self) -> None:
        os.remove(sidecar.path_of(self.path))
        self.loaded(from_sidecar=False)

    def test_damaged_sidecars(self) -> None:
        other = rich_state()
        del other.nodes[7]
        for bad in (b"", self.side[:100], self.side[:-1], self.side[:-1] + b"\x00",
                    sidecar.encode(other, other.to_bytes()), b"pilot-store-sidecar/1\n" + bytes(200)):
            self.put(sidecar.path_of(self.path), bad)
            self.loaded(from_sidecar=False)

    def test_crafted_sidecar_does_not_hide_a_malformed_store(self) -> None:
        """A malformed store with a sidecar forged to match it (malformed too) is refused, clearly."""
        store = self.store.replace(b'"hostname":"alpha"', b'"hostname":5')
        value = marshal.loads(self.side[len(sidecar.MAGIC) + 72:])
        value["nodes"][sidecar.NODE_FIELDS.index("hostname")][1] = 5
        self.put(self.path, store)
        self.put(sidecar.path_of(self.path), forge(value, store))
        with self.assertRaises(StoreError) as raised:
            load(self.path)
        self.assertIn("not a registry store", str(raised.exception))

    def test_unreadable_sidecar(self) -> None:
        os.remove(sidecar.path_of(self.path))
        os.makedirs(sidecar.path_of(self.path))
        self.loaded(from_sidecar=False)

    def test_journal_records_replayed_from_the_json(self) -> None:
        """A journal with records (a crash) is replayed into the store's JSON: the sidecar is not used."""
        self.put(journal_path(self.path), encode_record(42, {"set": {"auth_ts": {"7": 9}}}))
        result = load(self.path)
        assert result.state is not None
        self.assertEqual((result.sidecar_current, result.state.auth_ts[7]), (False, 9))

    def test_empty_journal_removed(self) -> None:
        self.put(journal_path(self.path), b"")
        self.loaded(from_sidecar=True)
        self.assertFalse(os.path.exists(journal_path(self.path)))

    def test_sidecar_temporaries_removed(self) -> None:
        stale = os.path.join(self.folder, ".registry.json.sidecar.abc123.tmp")
        self.put(stale, b"x")
        self.loaded(from_sidecar=True)
        self.assertFalse(os.path.exists(stale))


class DefaultPathTests(SynchronousTestCase):
    def test_system_folder_when_writable(self) -> None:
        system = self.mktemp()
        self.assertEqual(default_store_path(system, home="/nowhere"), os.path.join(system, "registry.json"))
        self.assertTrue(os.path.isdir(system))

    def test_home_when_not(self) -> None:
        parent = self.mktemp()
        os.makedirs(parent)
        blocker = os.path.join(parent, "file")
        with open(blocker, "w") as f:
            f.write("")
        # a folder under a regular file can neither exist nor be created
        self.assertEqual(default_store_path(os.path.join(blocker, "pilot"), home="/home/u"),
                         "/home/u/.pilot/registry.json")
