"""
Tests for L{pilot.apps.storage}: the reference's layout, untrusted names,
no overwrite, no half-received file, a full disk.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.apps.storage import Storage, StorageError, safe_name, timestamp
from pilot.wire.dataexchange import BINARY, JSON, TEXT

NOW = 1_780_000_000.25  # 2026-05-28 20:26:40.250 UTC


class NameTests(SynchronousTestCase):
    def test_traversal(self) -> None:
        """Only the last component survives, whichever separator the sender used."""
        self.assertEqual(safe_name("../../etc/passwd"), ("passwd", ""))
        self.assertEqual(safe_name("..\\..\\boot.ini"), ("boot", ".ini"))
        self.assertEqual(safe_name("/abs/path/report.pdf"), ("report", ".pdf"))

    def test_hidden_and_empty(self) -> None:
        self.assertEqual(safe_name(".bashrc"), ("bashrc", ""))
        self.assertEqual(safe_name(".."), ("file", ""))
        self.assertEqual(safe_name(""), ("file", ""))
        self.assertEqual(safe_name("dir/"), ("file", ""))

    def test_control_characters(self) -> None:
        self.assertEqual(safe_name("a\x00b\nc\u202e.txt"), ("abc", ".txt"))

    def test_long(self) -> None:
        base, ext = safe_name("x" * 5000 + ".tar")
        self.assertEqual((len(base), ext), (100, ".tar"))
        self.assertEqual(safe_name("a." + "e" * 40), ("a." + "e" * 40, ""))  # not an extension

    def test_timestamp(self) -> None:
        self.assertEqual(timestamp(NOW), "20260528-202640.250")
        self.assertEqual(timestamp(0.9999), "19700101-000001.000")


class StorageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = self.mktemp()
        self.storage = Storage(self.home, reserve=0)

    def test_message_layout(self) -> None:
        """inbox/<TYPE>-<stamp>.json holding {type, from, data, bytes, received_at}."""
        path = self.storage.save_message(TEXT, "0:0000.0000.0005", b"hello", NOW)
        self.assertEqual(path, os.path.join(self.home, "inbox", "TEXT-20260528-202640.250.json"))
        with open(path) as f:
            record = json.load(f)
        self.assertEqual(record, {"type": "TEXT", "from": "0:0000.0000.0005", "data": "hello", "bytes": 5,
                                  "received_at": "2026-05-28T20:26:40Z"})

    def test_private_and_nothing_left_behind(self) -> None:
        path = self.storage.save_message(TEXT, "a", b"x", NOW)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(self.storage.incoming), [])
        f = self.storage.begin_file("f", 1, "a", NOW)
        f.write(b"1")
        self.assertEqual(os.stat(f.commit()).st_mode & 0o777, 0o600)

    def test_inbox_unwritable(self) -> None:
        """A folder that cannot be made is a StorageError with the reason, not a crash."""
        os.makedirs(self.home)
        with open(os.path.join(self.home, "incoming"), "w"):
            pass  # a file where the folder should be
        self.assertRaises(StorageError, self.storage.save_message, TEXT, "a", b"x", NOW)
        self.assertRaises(StorageError, self.storage.begin_file, "f", 1, "a", NOW)

    def test_binary_is_base64(self) -> None:
        """Binary that is not UTF-8 is kept whole, as base64 (the reference loses it)."""
        self.storage.save_message(BINARY, "a", b"\xff\x00", NOW)
        [m] = self.storage.messages()
        self.assertEqual((m["data"], m["encoding"], m["bytes"]), ("/wA=", "base64", 2))

    def test_binary_text_as_the_reference(self) -> None:
        self.storage.save_message(BINARY, "a", b"raw bytes", NOW)
        [m] = self.storage.messages()
        self.assertEqual((m["data"], m.get("encoding")), ("raw bytes", None))

    def test_same_millisecond(self) -> None:
        """Two messages in one millisecond: both kept."""
        a = self.storage.save_message(JSON, "a", b"{}", NOW)
        b = self.storage.save_message(JSON, "a", b"[]", NOW)
        self.assertNotEqual(a, b)
        self.assertEqual([m["data"] for m in self.storage.messages()], ["{}", "[]"])

    def test_listed_by_arrival(self) -> None:
        """Not by file name, which starts with the type."""
        self.storage.save_message(TEXT, "a", b"first", NOW)
        self.storage.save_message(JSON, "a", b"2", NOW + 1)
        self.assertEqual([m["type"] for m in self.storage.messages()], ["TEXT", "JSON"])

    def test_listed_by_arrival_within_a_second(self) -> None:
        """received_at has whole seconds: two messages 5 ms apart keep their order."""
        self.storage.save_message(TEXT, "a", b"first", NOW)
        self.storage.save_message(JSON, "a", b"2", NOW + 0.005)
        self.assertEqual([m["type"] for m in self.storage.messages()], ["TEXT", "JSON"])

    def test_list_and_clear(self) -> None:
        self.storage.save_message(TEXT, "a", b"1", NOW)
        self.storage.save_message(TEXT, "a", b"2", NOW + 1)
        with open(os.path.join(self.home, "inbox", "broken.json"), "w") as f:
            f.write("{")
        listed = self.storage.messages()
        self.assertEqual(len(listed), 3)
        self.assertIn("error", [m for m in listed if m["file"] == "broken.json"][0])
        self.assertEqual(self.storage.clear("inbox"), 3)
        self.assertEqual(self.storage.messages(), [])

    def test_file_layout(self) -> None:
        """received/<base>-<stamp><ext>, appearing only once whole."""
        incoming = self.storage.begin_file("../x/report.pdf", 6, "a", NOW)
        incoming.write(b"abc")
        self.assertEqual(self.storage.files(), [])
        incoming.write(b"def")
        path = incoming.commit()
        self.assertEqual(path, os.path.join(self.home, "received", "report-20260528-202640.250.pdf"))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"abcdef")
        self.assertEqual(os.listdir(os.path.join(self.home, "incoming")), [])
        [entry] = self.storage.files()
        self.assertEqual((entry["name"], entry["bytes"]), ("report-20260528-202640.250.pdf", 6))

    def test_no_overwrite(self) -> None:
        paths = []
        for content in (b"one", b"two", b"six"):
            f = self.storage.begin_file("same.txt", 3, "a", NOW)
            f.write(content)
            paths.append(f.commit())
        self.assertEqual([os.path.basename(p) for p in paths],
                         ["same-20260528-202640.250.txt", "same-20260528-202640.250-1.txt",
                          "same-20260528-202640.250-2.txt"])
        with open(paths[0], "rb") as fh:
            self.assertEqual(fh.read(), b"one")

    def test_short_file_never_appears(self) -> None:
        f = self.storage.begin_file("a.bin", 10, "a", NOW)
        f.write(b"12345")
        self.assertRaises(StorageError, f.commit)
        self.assertEqual(self.storage.files(), [])
        self.assertEqual(os.listdir(self.storage.incoming), [])

    def test_abort(self) -> None:
        f = self.storage.begin_file("a.bin", 10, "a", NOW)
        f.write(b"12345")
        f.abort()
        f.abort()
        self.assertEqual(os.listdir(self.storage.incoming), [])

    def test_more_than_announced(self) -> None:
        f = self.storage.begin_file("a.bin", 2, "a", NOW)
        self.assertRaises(StorageError, f.write, b"123")
        self.assertEqual(os.listdir(self.storage.incoming), [])

    def test_disk_full_before(self) -> None:
        """Refused before a byte is written when the disk cannot hold the file and the reserve."""
        storage = Storage(self.home, reserve=1 << 62)
        with self.assertRaises(StorageError) as caught:
            storage.begin_file("a", 1, "a", NOW)
        self.assertIn("disk full", str(caught.exception))
        self.assertRaises(StorageError, storage.save_message, TEXT, "a", b"x", NOW)

    def test_disk_full_while_writing(self) -> None:
        """ENOSPC in the middle: a clear reason, the temporary file gone."""
        f = self.storage.begin_file("a", 10, "a", NOW)

        class Full:
            def write(self, data: bytes) -> Any:
                raise OSError(errno.ENOSPC, "No space left on device")

            def close(self) -> None:
                pass

        f._f = Full()  # type: ignore[assignment]
        with self.assertRaises(StorageError) as caught:
            f.write(b"x")
        self.assertEqual(str(caught.exception), "disk full: no space left on device")
        self.assertEqual(os.listdir(self.storage.incoming), [])

    def test_clean_incoming(self) -> None:
        f = self.storage.begin_file("a", 10, "a", NOW)
        f.write(b"1")
        self.assertEqual(self.storage.clean_incoming(), 1)
