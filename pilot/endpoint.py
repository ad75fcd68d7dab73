# -*- test-case-name: tests.test_endpoint -*-
"""
UDP/TCP endpoints as text: ``ip:port``, and ``[ip6]:port`` for IPv6 (the
registry's ``real_addr``, ``listen_addr`` and ``local_addr``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Optional

Endpoint = tuple[str, int]
_PORT = re.compile(r"[0-9]{1,5}")


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: Any) -> Optional[Endpoint]:
    """``ip:port`` / ``[ip6]:port`` to ``(ip, port)``; None for anything else (a name, port 0, junk)."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or _PORT.fullmatch(port) is None or not 0 < int(port) <= 0xFFFF:
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        return None
