# -*- test-case-name: tests.protocols.test_control_server -*-
"""
Who is at the other end of a Unix socket (``SO_PEERCRED``): the control
socket serves only the owner of ``PILOT_HOME`` and root (``docs/control.md``,
``docs/security.md``).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SO_PEERCRED: int | None = getattr(socket, "SO_PEERCRED", None)


def unix_credentials_known() -> bool:
    """Can this system tell a Unix socket's peer (``SO_PEERCRED``)?"""
    return _SO_PEERCRED is not None


def peer_uid(transport: Any) -> int | None:
    """The uid of the process at the other end of a Unix-socket transport (``SO_PEERCRED``), or None."""
    if _SO_PEERCRED is None:
        return None
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        sock = get_handle()
        if getattr(sock, "family", None) != socket.AF_UNIX:
            return None
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
        _pid, uid, _gid = _UCRED.unpack(raw)
    except (AttributeError, OSError, ValueError, TypeError, struct.error):
        return None
    return int(uid)


def home_owner(home: str) -> int:
    """The uid owning ``home`` (``PILOT_HOME``): who may use the control socket."""
    return os.stat(home).st_uid
