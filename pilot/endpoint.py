# -*- test-case-name: tests.test_endpoint -*-
"""
``host:port`` as text, parsed by one grammar.

The grammar: ``[ip6]:port`` (an IPv6 address goes in brackets), ``host:port``
(an IPv4 address, or a name where names are allowed), and, for a listen
address only, ``:port`` or ``port`` alone (every IPv4 interface).

One entry point per contract:

- :func:`parse_endpoint`: wire text (the registry's ``real_addr`` and
  ``local_addr``): an IP literal and a port from 1 to 65535, or None for
  anything else; it never raises (a peer's junk is dropped, not reported);
  :func:`parse_port` takes only the port of such text (a ``listen_addr``);
- :func:`parse_listen`: a listen address typed by a user (``--listen``):
  an interface IP (``localhost`` taken as ``127.0.0.1``) or none, and a
  port from 0 (any free port) to 65535;
- :func:`parse_host_port`: a server typed by a user (``--registry``): a
  name or an IP, and a port from 1 to 65535.

The user-facing ones raise :class:`~pilot.errors.InvalidArgument` whose
message quotes the text and says how to write it.  :func:`format_endpoint`
writes an endpoint back in the same grammar.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from pilot.errors import InvalidArgument

#: A UDP or TCP endpoint: ``(host, port)``.
Endpoint = tuple[str, int]

#: Longest wire text taken: ``[`` + the longest IPv6 text (45) + ``]:65535``.
_WIRE_MAX = 64


def format_endpoint(host: str, port: int) -> str:
    """``:9000``, ``127.0.0.1:9000``, ``[::1]:9000``: the grammar's own form, as the product prints it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: Any) -> Optional[Endpoint]:
    """Wire text ``ip:port`` / ``[ip6]:port`` to ``(ip, port)``; None for anything else (a name, port 0, junk)."""
    if not isinstance(text, str) or len(text) > _WIRE_MAX:
        return None
    try:
        host, port_text, _ = _split(text, bare_port=False)
        port = _port(port_text, lowest=1)
        return str(ipaddress.ip_address(host)), port
    except (InvalidArgument, ValueError):
        return None


def parse_port(text: Any) -> Optional[int]:
    """
    The port (1 to 65535) of wire text whose host is not looked at (a node's
    ``listen_addr``: ``:4000``, ``0.0.0.0:4000``, ``[::]:4000``); None if it has none.
    """
    if not isinstance(text, str):
        return None
    try:
        return _port(_split(text, bare_port=False)[1], lowest=1)
    except ValueError:
        return None


def parse_listen(text: str) -> Endpoint:
    """
    A listen address to ``(interface, port)``: ``:9000`` and ``9000`` (all
    IPv4 interfaces, ``""``), ``127.0.0.1:9000``, ``[::1]:9000``, ``[::]:9000``
    (IPv6, and IPv4 too where the system is dual-stack), ``localhost:9000``.
    Port 0 picks a free port.  Raises :class:`InvalidArgument` otherwise.
    """
    host, port_text, bracketed = _user_split(text, "listen address", "[host]:port", bare_port=True)
    if bracketed:
        if not _is_ip(host, 6):
            raise InvalidArgument(f"bad listen address {text!r}: {host!r} is not an IPv6 address")
    elif host == "localhost":
        host = "127.0.0.1"
    elif host and not _is_ip(host, 4):
        raise InvalidArgument(f"bad listen address {text!r}: {host!r} is not an IP address "
                              f"(leave it out to listen on every interface)")
    return host, _user_port(text, port_text, "listen address", lowest=0)


def parse_host_port(text: str) -> Endpoint:
    """
    A server's address to ``(host, port)``: ``rendezvous.example:9000``,
    ``192.0.2.10:9000``, ``[::1]:9000``; the port from 1 to 65535.  The host is
    not resolved here.  Raises :class:`InvalidArgument` otherwise.
    """
    host, port_text, bracketed = _user_split(text, "server address", "host:port", bare_port=False)
    if bracketed and not _is_ip(host, 6):
        raise InvalidArgument(f"bad server address {text!r}: {host!r} is not an IPv6 address")
    if not host or any(c.isspace() or c in "/[]@" for c in host):
        raise InvalidArgument(f"bad server address {text!r}: write it as HOST:PORT, as in 192.0.2.10:9000")
    return host, _user_port(text, port_text, "server address", lowest=1)


# --- the grammar -----------------------------------------------------------------

def _split(text: str, bare_port: bool) -> tuple[str, str, bool]:
    """``(host, port text, bracketed)``; ValueError(reason) when the text has no port where one must be."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError("write an IPv6 address as [::1]:9000")
        return host, rest[1:], True
    if ":" in text:
        host, _, port_text = text.rpartition(":")
        return host, port_text, False
    if bare_port:
        return "", text, False
    raise ValueError("write it as HOST:PORT, as in 192.0.2.10:9000")


def _user_split(text: str, noun: str, form: str, bare_port: bool) -> tuple[str, str, bool]:
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument(f"a {noun} is {form}, not {text!r}")
    try:
        host, port_text, bracketed = _split(text.strip(), bare_port)
    except ValueError as e:
        raise InvalidArgument(f"bad {noun} {text!r}: {e}") from None
    if not bracketed and ":" in host:
        raise InvalidArgument(f"bad {noun} {text!r}: put an IPv6 address in brackets, as in [::1]:9000")
    return host, port_text, bracketed


def _port(text: str, lowest: int) -> int:
    if not (text.isascii() and text.isdigit()) or not lowest <= int(text) <= 0xFFFF:
        raise ValueError(f"the port must be a number from {lowest} to 65535")
    return int(text)


def _user_port(text: str, port_text: str, noun: str, lowest: int) -> int:
    try:
        return _port(port_text, lowest)
    except ValueError as e:
        raise InvalidArgument(f"bad {noun} {text!r}: {e}") from None


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False
