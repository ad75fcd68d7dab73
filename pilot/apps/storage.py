# -*- test-case-name: tests.apps.test_storage -*-
"""
Where data exchange (port 1001) keeps what it receives, in the reference's
layout under the node's home (``docs/apps.md``; ``docs/reference-wire.md``
§8.1):

* ``inbox/<TYPE>-<YYYYMMDD-HHMMSS.mmm>.json``: a text, JSON or binary
  message as ``{type, from, data, bytes, received_at}`` (a binary payload
  that is not UTF-8 as base64, with ``"encoding": "base64"``);
* ``received/<base>-<YYYYMMDD-HHMMSS.mmm><ext>``: a file.

A name from the wire is untrusted: :func:`safe_name` keeps only its last
path component, without control characters or leading dots, and bounded in
length.  A file is written to ``incoming/`` and renamed into ``received/``
once whole, so a half-received file never appears there; an existing file is
never replaced (a ``-N`` suffix is added).  Before a file is begun the disk
must hold its length plus :data:`RESERVE` bytes, and a write that meets a
full disk fails with :class:`StorageError` ("no space left on device").

Blocking file calls, each short: the receiver writes a piece as it arrives.
The listing and clearing functions serve pilotctl (``inbox``, ``received``).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import time
import unicodedata
import uuid
from typing import Any, BinaryIO

from pilot.wire.dataexchange import BINARY, type_name

INBOX, RECEIVED, INCOMING = "inbox", "received", "incoming"
#: Bytes a new file must leave free on the disk.
RESERVE = 64 * 1024 * 1024
MAX_BASE = 100
MAX_EXT = 16
#: Entries ``inbox`` and ``received`` list at most.
MAX_LISTED = 10_000


class StorageError(Exception):
    """Why something received could not be kept: the reason goes into the ``ERR`` reply."""


def timestamp(seconds: float) -> str:
    """``YYYYMMDD-HHMMSS.mmm`` in UTC, the reference's stamp."""
    whole = int(seconds)
    millis = int(round((seconds - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(whole)) + f".{millis:03d}"


def iso_time(seconds: float) -> str:
    """RFC 3339 in UTC to the second, as the reference writes ``received_at``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(seconds)))


def safe_name(name: str) -> tuple[str, str]:
    """
    ``(base, ext)`` for a file name from the wire: its last component after
    ``/`` or ``\\``, control and format characters removed, leading dots and
    spaces stripped, each part bounded; ``file`` when nothing is left.
    """
    last = name.replace("\\", "/").rsplit("/", 1)[-1]
    clean = "".join(c for c in last if unicodedata.category(c)[0] != "C").strip().lstrip(". ")
    base, ext = os.path.splitext(clean)
    if len(ext) > MAX_EXT or not ext[1:].isalnum():
        base, ext = clean, ""
    base = base[:MAX_BASE].rstrip(". ") or "file"
    return base, ext


class Storage:
    """The inbox and the received files of one node home."""

    def __init__(self, home: str, reserve: int = RESERVE) -> None:
        self.home = home
        self.reserve = reserve
        self.inbox = os.path.join(home, INBOX)
        self.received = os.path.join(home, RECEIVED)
        self.incoming = os.path.join(home, INCOMING)

    def clean_incoming(self) -> int:
        """Remove what a previous run left half-received; the number removed."""
        removed = 0
        try:
            names = os.listdir(self.incoming)
        except OSError:
            return 0
        for name in names:
            try:
                os.unlink(os.path.join(self.incoming, name))
                removed += 1
            except OSError:
                pass
        return removed

    # --- messages -----------------------------------------------------------------------------

    def save_message(self, frame_type: int, sender: str, data: bytes, now: float) -> str:
        """Write one message to the inbox; its path, or :class:`StorageError`."""
        # as the reference, ``data`` is the payload as text; where that would lose bytes (a binary
        # payload that is not UTF-8, which the reference stores with U+FFFD in their place) it is base64
        encoding = None
        try:
            shown = data.decode("utf-8")
        except UnicodeDecodeError:
            if frame_type == BINARY:
                shown, encoding = base64.b64encode(data).decode("ascii"), "base64"
            else:
                shown = data.decode("utf-8", "replace")
        record = {"type": type_name(frame_type), "from": sender, "data": shown, "bytes": len(data),
                  "received_at": iso_time(now)}
        if encoding is not None:
            record["encoding"] = encoding
        body = json.dumps(record, indent=2).encode("utf-8") + b"\n"
        self._check_space(len(body))
        temp = ""
        try:
            temp = self._temp()
            with _create(temp) as f:
                f.write(body)
            return self._place(temp, self.inbox, type_name(frame_type), ".json", now)
        except OSError as e:
            _unlink(temp)
            raise StorageError(_reason(e)) from None

    # --- files --------------------------------------------------------------------------------

    def begin_file(self, name: str, length: int, sender: str, now: float) -> IncomingFile:
        """A file of ``length`` bytes is coming: where to write it, or :class:`StorageError`."""
        self._check_space(length)
        try:
            temp = self._temp()
            f = _create(temp)
        except OSError as e:
            raise StorageError(_reason(e)) from None
        return IncomingFile(self, f, temp, safe_name(name), length, sender, now)

    def _check_space(self, length: int) -> None:
        try:
            os.makedirs(self.home, mode=0o700, exist_ok=True)
            st = os.statvfs(self.home)
        except OSError as e:
            raise StorageError(_reason(e)) from None
        free = st.f_bavail * st.f_frsize
        if free < length + self.reserve:
            raise StorageError(f"disk full: {free} bytes free, {length} needed "
                               f"(and {self.reserve} kept in reserve)")

    def _temp(self) -> str:
        """A new name in ``incoming/`` (on the same file system as ``inbox/`` and ``received/``)."""
        os.makedirs(self.incoming, mode=0o700, exist_ok=True)
        return os.path.join(self.incoming, f"{uuid.uuid4().hex}.part")

    def _place(self, temp: str, folder: str, base: str, ext: str, now: float) -> str:
        """
        Link the whole file ``temp`` into ``folder`` as ``<base>-<stamp><ext>``
        under a name no file has (``-N`` added), then drop ``temp``: never
        replaces a file, never shows a partial one.  Not fsynced: a crash may
        lose the newest entries, never leave a torn one (``docs/apps.md``).
        """
        os.makedirs(folder, mode=0o700, exist_ok=True)
        stem = os.path.join(folder, f"{base}-{timestamp(now)}")
        for n in range(1000):
            path = f"{stem}{ext}" if n == 0 else f"{stem}-{n}{ext}"
            try:
                os.link(temp, path)  # fails if the name is taken: no overwrite
            except FileExistsError:
                continue
            os.unlink(temp)
            return path
        _unlink(temp)
        raise StorageError("too many entries of that name in the same millisecond")

    # --- listing ------------------------------------------------------------------------------

    def messages(self) -> list[dict[str, Any]]:
        """The inbox, oldest first; an unreadable entry shows as ``{"file", "error"}``."""
        out: list[dict[str, Any]] = []
        for name in _names(self.inbox, ".json"):
            path = os.path.join(self.inbox, name)
            try:
                with open(path, "rb") as f:
                    record = json.loads(f.read(64 * 1024 * 1024))
                if not isinstance(record, dict):
                    raise ValueError("not an object")
                out.append({**record, "file": name})
            except (OSError, ValueError) as e:
                out.append({"file": name, "error": str(e)[:200]})
        # order by arrival: the names are TYPE-YYYYMMDD-HHMMSS.mmm[-N], and received_at has whole
        # seconds only (the reference's), so the name's stamp after the type decides
        out.sort(key=lambda m: (_stamp(m["file"]), m["file"]))
        return out

    def files(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name in _names(self.received, ""):
            path = os.path.join(self.received, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            out.append({"name": name, "path": path, "bytes": st.st_size, "modified": iso_time(st.st_mtime)})
        return out

    def clear(self, which: str) -> int:
        """Delete every entry of ``inbox`` or ``received``; how many were deleted."""
        folder = self.inbox if which == INBOX else self.received
        removed = 0
        for name in _names(folder, ".json" if which == INBOX else ""):
            try:
                os.unlink(os.path.join(folder, name))
                removed += 1
            except OSError:
                pass
        return removed


class IncomingFile:
    """A file being received: :meth:`write` its pieces, then :meth:`commit` or :meth:`abort`."""

    def __init__(self, storage: Storage, f: BinaryIO, temp: str, name: tuple[str, str], length: int,
                 sender: str, now: float) -> None:
        self.storage = storage
        self._f: BinaryIO | None = f
        self.temp = temp
        self.base, self.ext = name
        self.length = length
        self.sender = sender
        self.started = now
        self.written = 0

    def write(self, data: bytes) -> None:
        if self._f is None:
            raise StorageError("the file is closed")
        if self.written + len(data) > self.length:
            self.abort()
            raise StorageError("more bytes than announced")
        try:
            self._f.write(data)
        except OSError as e:
            self.abort()
            raise StorageError(_reason(e)) from None
        self.written += len(data)

    def commit(self) -> str:
        """Close and move into ``received/``: the final path."""
        f, self._f = self._f, None
        if f is None:
            raise StorageError("the file is closed")
        try:
            f.close()
            if self.written != self.length:
                raise StorageError(f"{self.written} of {self.length} bytes received")
            return self.storage._place(self.temp, self.storage.received, self.base, self.ext, self.started)
        except OSError as e:
            self._remove()
            raise StorageError(_reason(e)) from None
        except StorageError:
            self._remove()
            raise

    def abort(self) -> None:
        """Drop what was written (idempotent)."""
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        self._remove()

    def _remove(self) -> None:
        _unlink(self.temp)


def _create(path: str) -> BinaryIO:
    """A new file, readable only by this user (as the rest of ``PILOT_HOME``)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def _unlink(path: str) -> None:
    if not path:
        return
    try:
        os.unlink(path)
    except OSError:
        pass


def _names(folder: str, suffix: str) -> list[str]:
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    # by stem, so that ``X.json`` comes before ``X-1.json`` (the second in the same millisecond)
    kept = (n for n in names if n.endswith(suffix) and not n.startswith("."))
    return sorted(kept, key=lambda n: os.path.splitext(n)[0])[:MAX_LISTED]


def _reason(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full: no space left on device"
    return e.strerror or str(e)


def _stamp(name: str) -> str:
    """The arrival stamp of an inbox file's name (``TYPE-STAMP.json``): what follows the type."""
    return os.path.splitext(name)[0].partition("-")[2]
