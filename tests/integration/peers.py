"""
Blocking clients for integration tests: talk to a real registry over TCP with
pilot's framing, and to a real beacon over UDP, from plain sockets.

Every call has a timeout; nothing here touches the reactor.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

from pilot.identity import Identity
from pilot.wire.registry import FrameDecoder, encode_frame, sign_request

from tests.integration.procs import LOOPBACK

TIMEOUT = 10.0


class RegistryClient:
    """One TCP connection to a registry; :meth:`request` sends a message and returns the reply."""

    def __init__(self, port: int, host: str = LOOPBACK, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.decoder = FrameDecoder()
        self.pending: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode_frame(message))

    def receive(self) -> dict[str, Any]:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the registry closed the connection")
            for item in self.decoder.feed(data):
                if isinstance(item, Exception):
                    raise item
                self.pending.append(item)
        return self.pending.pop(0)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.send(message)
        return self.receive()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def register_message(identity: Identity, listen_addr: str = "127.0.0.1:4000",
                     hostname: str = "") -> dict[str, Any]:
    message: dict[str, Any] = {"type": "register", "public_key": identity.public_key_b64,
                               "listen_addr": listen_addr}
    if hostname:
        message["hostname"] = hostname
    return message


def signed(identity: Identity, message: dict[str, Any]) -> dict[str, Any]:
    """``message`` with both signature forms, freshly timestamped."""
    return sign_request(message, identity.sign, int(time.time() * 1000), os.urandom(16))


def set_hostname_message(identity: Identity, node_id: int, hostname: str) -> dict[str, Any]:
    return signed(identity, {"type": "set_hostname", "node_id": node_id, "hostname": hostname})


def beacon_discover(port: int, node_id: int = 0, host: str = LOOPBACK,
                    timeout: float = TIMEOUT) -> tuple[bytes, tuple[str, int]]:
    """
    Send a Discover (0x01 + node id) to the beacon, resending every half
    second (it is UDP) until a reply or ``timeout``; return the reply and the
    local address it was sent from.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        s.settimeout(0.5)
        deadline = time.monotonic() + timeout
        while True:
            s.sendto(b"\x01" + struct.pack(">I", node_id), (host, port))
            try:
                data, _ = s.recvfrom(65535)
                return data, s.getsockname()
            except socket.timeout:
                if time.monotonic() >= deadline:
                    raise
