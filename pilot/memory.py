# -*- test-case-name: tests.test_memory -*-
"""
Giving freed heap memory back to the system.

CPython's allocator and glibc keep freed memory for reuse; a process that
once held much (a start-up's imports, thousands of closed connections'
buffers) keeps that RSS for good, the heap being too fragmented to shrink
by itself.  glibc's ``malloc_trim`` returns the free pages.  The rendezvous
calls it every 20 s, the node daemon once it has started and then every
minute (``docs/performance.md``).
"""

from __future__ import annotations

import ctypes
from typing import Any

_LIBC: list[Any] = []


def release_free_memory() -> bool:
    """``malloc_trim(0)``; False where there is no such call (not glibc)."""
    if not _LIBC:
        # the symbols the interpreter is linked with, libc's among them: no ctypes.util.find_library,
        # which runs ``ldconfig -p`` in a child process (and imports ctypes.util) in the daemon
        try:
            libc: Any = ctypes.CDLL(None)
            _LIBC.append(libc if hasattr(libc, "malloc_trim") else None)
        except OSError:
            _LIBC.append(None)
    libc = _LIBC[0]
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
