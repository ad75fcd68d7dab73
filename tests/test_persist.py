"""
Tests for L{pilot.persist}: atomic state files and their strict reading.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot import persist
from pilot.persist import (
    AppendOnlyFile, StateFileError, atomic_write_bytes, atomic_write_json, dump_json, read_json_object,
    remove_durably, remove_stale_temporaries,
)


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class AtomicWriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = self.mktemp()
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "store.json")

    def test_creates_and_replaces(self) -> None:
        atomic_write_bytes(self.path, b"first")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"first")
        inode = os.stat(self.path).st_ino
        atomic_write_bytes(self.path, b"second")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"second")
        self.assertNotEqual(os.stat(self.path).st_ino, inode, "replaced by rename, not rewritten")

    def test_open_reader_keeps_old_content(self) -> None:
        atomic_write_bytes(self.path, b"old")
        with open(self.path, "rb") as reader:
            atomic_write_bytes(self.path, b"new")
            self.assertEqual(reader.read(), b"old")

    def test_mode(self) -> None:
        atomic_write_bytes(self.path, b"x")
        self.assertEqual(mode_of(self.path), 0o600)
        atomic_write_bytes(self.path, b"x", mode=0o644)
        self.assertEqual(mode_of(self.path), 0o644)
        atomic_write_json(self.path, {"a": 1})
        self.assertEqual(mode_of(self.path), 0o600)

    def test_creates_private_folder(self) -> None:
        path = os.path.join(self.folder, "sub", "deeper", "state.json")
        atomic_write_json(path, {"a": 1})
        self.assertEqual(mode_of(os.path.dirname(path)) & 0o077, 0)
        self.assertEqual(read_json_object(path), {"a": 1})

    def test_no_temporaries_left(self) -> None:
        for i in range(5):
            atomic_write_json(self.path, {"i": i})
        self.assertEqual(os.listdir(self.folder), ["store.json"])

    def test_failed_write_leaves_old_file_and_no_temporary(self) -> None:
        atomic_write_bytes(self.path, b"old")
        self.assertRaises(TypeError, atomic_write_bytes, self.path, "not bytes")  # type: ignore[arg-type]
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"old")
        self.assertEqual(os.listdir(self.folder), ["store.json"])

    def test_failed_json_leaves_old_file(self) -> None:
        atomic_write_json(self.path, {"a": 1})
        self.assertRaises(TypeError, atomic_write_json, self.path, {"a": object()})
        self.assertEqual(read_json_object(self.path), {"a": 1})
        self.assertEqual(os.listdir(self.folder), ["store.json"])

    def test_dump_json(self) -> None:
        self.assertEqual(dump_json({"b": 1, "a": [1, 2]}), b'{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n')
        self.assertEqual(dump_json({"b": 1, "a": "\u00e9"}, pretty=False), b'{"b":1,"a":"\\u00e9"}')


class ReadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = self.mktemp()
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "state.json")

    def write(self, content: bytes) -> None:
        with open(self.path, "wb") as f:
            f.write(content)

    def assertRefused(self, content: bytes) -> StateFileError:
        self.write(content)
        e = self.assertRaises(StateFileError, read_json_object, self.path)
        self.assertEqual(e.path, self.path)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), content, "the file must be left untouched")
        return e

    def test_reads_object(self) -> None:
        self.write(b'{"nodes": {"1": {"id": 1}}}')
        self.assertEqual(read_json_object(self.path), {"nodes": {"1": {"id": 1}}})

    def test_missing(self) -> None:
        self.assertRaises(FileNotFoundError, read_json_object, self.path)

    def test_corrupt(self) -> None:
        for content in (b"", b"{", b'{"a": 1', b"\x00\x01\x02", b"\xff\xfe", b"{}{}", b"[" * 100000,
                        b'{"a": 1}\x00'):
            self.assertRefused(content)

    def test_not_object(self) -> None:
        for content in (b"[]", b"5", b'"text"', b"null", b"true"):
            e = self.assertRefused(content)
            self.assertIn("JSON object", e.reason)

    def test_too_large(self) -> None:
        self.patch(persist, "MAX_STATE_FILE", 16)
        self.assertRefused(json.dumps({"a": "x" * 20}).encode())

    def test_unreadable(self) -> None:
        os.makedirs(self.path)
        e = self.assertRaises(StateFileError, read_json_object, self.path)
        self.assertIn("cannot read", e.reason)


class StaleTemporaryTests(SynchronousTestCase):
    def test_removes_only_temporaries(self) -> None:
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "store.json")
        atomic_write_bytes(path, b"{}")
        names = [".store.json.abc123.tmp", ".store.json.x.tmp", ".other.json.abc.tmp",
                 "store.json.tmp", ".store.json.abc", "unrelated"]
        for name in names:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"partial")
        remove_stale_temporaries(path)
        self.assertEqual(sorted(os.listdir(folder)),
                         sorted(["store.json", ".other.json.abc.tmp", "store.json.tmp", ".store.json.abc",
                                 "unrelated"]))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"{}")

    def test_missing_folder(self) -> None:
        remove_stale_temporaries(os.path.join(self.mktemp(), "nothing", "store.json"))


class AppendOnlyFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = self.mktemp()
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "journal")
        self.file = AppendOnlyFile(self.path)
        self.addCleanup(self.file.close)

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def test_appends_and_truncates(self) -> None:
        self.file.append(b"one\n")
        self.file.append(b"two\n")
        self.assertEqual((self.read(), self.file.size), (b"one\ntwo\n", 8))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.file.truncate()
        self.file.append(b"three\n")
        self.assertEqual((self.read(), self.file.size), (b"three\n", 6))

    def test_continues_an_existing_file(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"old\n")
        self.file.append(b"new\n")
        self.assertEqual((self.read(), self.file.size), (b"old\nnew\n", 8))

    def test_failed_append_is_cut_off(self) -> None:
        """A write that fails halfway leaves no half record for the next append to follow."""
        self.file.append(b"whole\n")
        real = os.write
        calls = []

        def half_then_full(fd: int, data: Any) -> int:
            calls.append(len(data))
            if len(calls) == 1:
                return real(fd, bytes(data[:3]))
            raise OSError(errno.ENOSPC, "No space left on device")
        self.patch(os, "write", half_then_full)
        with self.assertRaises(OSError):
            self.file.append(b"broken\n")
        self.patch(os, "write", real)
        self.assertEqual(self.read(), b"whole\n")
        self.file.append(b"next\n")
        self.assertEqual(self.read(), b"whole\nnext\n")

    def test_append_refused_after_a_cut_that_failed(self) -> None:
        self.file.append(b"whole\n")

        def fail(*args: Any) -> None:
            raise OSError(errno.EIO, "I/O error")
        self.patch(os, "fdatasync", fail)
        self.patch(os, "ftruncate", fail)
        with self.assertRaises(OSError):
            self.file.append(b"x\n")
        self.patch(os, "fdatasync", real_fdatasync)
        with self.assertRaises(OSError):
            self.file.append(b"y\n")  # it would follow a torn record
        self.patch(os, "ftruncate", real_ftruncate)
        self.file.truncate()
        self.file.append(b"z\n")
        self.assertEqual(self.read(), b"z\n")

    def test_truncate_reopens_by_path(self) -> None:
        """After a truncate the file is the one at the path, even if the old one was moved away."""
        self.file.append(b"a\n")
        os.rename(self.path, self.path + ".moved")
        self.file.truncate()
        self.file.append(b"b\n")
        self.assertEqual(self.read(), b"b\n")

    def test_append_refused_when_the_file_was_moved(self) -> None:
        """Appending to a file nobody will read (moved away, its folder gone) fails instead."""
        self.file.append(b"a\n")
        os.rename(self.path, self.path + ".moved")
        with self.assertRaises(FileNotFoundError):
            self.file.append(b"b\n")
        with open(self.path, "wb") as f:
            f.write(b"someone else's\n")
        with self.assertRaises(OSError):
            self.file.append(b"c\n")  # not after a file it does not know
        with open(self.path + ".moved", "rb") as f:
            self.assertEqual(f.read(), b"a\n")
        self.file.truncate()
        self.file.append(b"d\n")
        self.assertEqual(self.read(), b"d\n")

    def test_remove_durably(self) -> None:
        self.file.append(b"a\n")
        remove_durably(self.path)
        self.assertFalse(os.path.exists(self.path))
        remove_durably(self.path)  # already gone: fine


real_fdatasync = os.fdatasync
real_ftruncate = os.ftruncate
