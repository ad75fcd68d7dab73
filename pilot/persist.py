# -*- test-case-name: tests.test_persist -*-
"""
Files that hold state, written atomically.

A write goes to a temporary file in the same folder, is flushed and fsynced,
renamed over the target, and then the folder is fsynced, so that a crash or a
``kill -9`` at any moment leaves either the old file or the new one, never a
half-written one.  Readers get a clear :class:`StateFileError` for a file that
is missing, unreadable or not the JSON they expect; nothing here ever
overwrites a file it could not read.

:class:`AppendOnlyFile` is the other kind: a file that only grows, by whole
records, each on disk when :meth:`AppendOnlyFile.append` returns (a journal
of changes; the registry's store uses one with ``--durable``).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from typing import Any


class StateFileError(Exception):
    """A state file that exists but cannot be used."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def atomic_write_bytes(path: str, data: bytes, mode: int = 0o600) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:  # owns fd from here, so it is closed on any failure
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    dirfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def remove_durably(path: str) -> None:
    """Remove ``path`` (if it is there) and make the removal survive a crash."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


class AppendOnlyFile:
    """
    A file written only at its end: :meth:`append` returns once the bytes are on
    disk (``fdatasync``; the folder is fsynced once when the file is created, so
    the file itself survives a crash too), in the file that is at ``path``: if
    that file was moved or removed (its folder gone, a volume unmounted),
    :meth:`append` raises instead of writing where no reader will look.  An append that fails is cut off
    again where possible, so a later append never follows half a record; if
    even that fails, :meth:`append` and :meth:`truncate` raise, and the caller
    must stop appending until :meth:`truncate` succeeds.  One thread at a time.
    """

    def __init__(self, path: str, mode: int = 0o600) -> None:
        self.path = path
        self.mode = mode
        self._fd: int | None = None
        #: bytes known to be whole records on disk
        self.size = 0
        self._torn = False

    def _open(self) -> int:
        if self._fd is None:
            folder = os.path.dirname(os.path.abspath(self.path))
            flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, self.mode)
                created = True
            except FileExistsError:
                fd = os.open(self.path, flags)
                created = False
            try:
                if created:
                    _fsync_folder(folder)
                self.size = os.fstat(fd).st_size
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def append(self, data: bytes) -> None:
        if self._torn:
            raise OSError(f"{self.path}: an earlier append failed and was not cut off; truncate first")
        fd = self._open()
        try:
            if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                raise FileNotFoundError(errno.ENOENT, "the file at this path is not the one open", self.path)
        except FileNotFoundError:
            self.close()
            self._torn = True  # what is at the path now is unknown: truncate before appending again
            raise
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fdatasync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, self.size)
                os.fsync(fd)
            except OSError:
                self._torn = True
            raise
        self.size += len(data)

    def truncate(self) -> None:
        """Empty the file (durably), opened again by its path (so it is the one beside its store)."""
        self.close()
        fd = self._open()
        os.ftruncate(fd, 0)
        os.fsync(fd)
        self.size = 0
        self._torn = False

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def dump_json(value: Any, pretty: bool = True) -> bytes:
    if pretty:
        return (json.dumps(value, indent=2, sort_keys=False) + "\n").encode("utf-8")
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def atomic_write_json(path: str, value: Any, mode: int = 0o600, pretty: bool = True) -> None:
    atomic_write_bytes(path, dump_json(value, pretty), mode)


#: No state file of ours is anywhere near this; a bigger one is not ours.
MAX_STATE_FILE = 512 * 1024 * 1024


def read_json_object(path: str) -> dict[str, Any]:
    """
    Read a JSON object from ``path``.

    Raises ``FileNotFoundError`` if there is no file (callers decide whether
    that is fine) and :class:`StateFileError` for anything else that is wrong.
    """
    return parse_json_object(path, read_state_file(path))


def read_state_file(path: str) -> bytes:
    """The bytes of the state file ``path``; ``FileNotFoundError``, or :class:`StateFileError`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATE_FILE + 1)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise StateFileError(path, f"cannot read: {e.strerror or e}") from e
    if len(data) > MAX_STATE_FILE:
        raise StateFileError(path, "file is too large to be a pilot state file")
    return data


def parse_json_object(path: str, data: bytes) -> dict[str, Any]:
    """The JSON object that ``data``, read from ``path``, holds; :class:`StateFileError` if none."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StateFileError(path, f"not valid JSON ({str(e)[:200]}); the file is left untouched") from e
    if not isinstance(value, dict):
        raise StateFileError(path, f"expected a JSON object, found {type(value).__name__}")
    return value


def remove_stale_temporaries(path: str) -> None:
    """Remove temporaries a crashed writer of ``path`` left behind (never the file itself)."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = "." + os.path.basename(path) + "."
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
