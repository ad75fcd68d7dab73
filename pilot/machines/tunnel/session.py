# -*- test-case-name: tests.machines.test_tunnel -*-
"""
One X25519 agreement with a peer: the AES key, our send nonces and a replay
window per nonce prefix of the peer (``docs/tunnel.md``; the nonce rules are
in ``docs/reference-wire.md`` §4.4).
"""

from __future__ import annotations

import collections
import struct
from typing import Callable

import attr

from pilot.endpoint import Endpoint
from pilot.errors import MalformedFrame
from pilot.wire.tunnel import NONCE_PREFIX_LEN, SealedFrame
from pilot.wire.tunnel_crypto import NonceSequence, ReplayWindow, TunnelSession

_unpack_counter = struct.Struct(">Q").unpack_from  # a nonce's counter, after its prefix

PREFIX_WINDOWS = 8         # recent peer nonce prefixes with a live replay window
RETIRED_PREFIXES = 1024    # older prefixes, all of whose frames are refused


class Dropped(Exception):
    """A sealed frame refused; ``reason`` is the counter it is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Session:
    """One X25519 agreement: the key, our send nonces, a replay window per peer prefix."""

    def __init__(self, key: bytes, peer_x25519: bytes, random_bytes: Callable[[int], bytes]) -> None:
        self.key = key
        self.peer_x25519 = peer_x25519
        self.sender = TunnelSession(key, NonceSequence.fresh(random_bytes))
        self.windows: collections.OrderedDict[bytes, ReplayWindow] = collections.OrderedDict()
        self.retired: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def acceptable(self, prefix: bytes, counter: int) -> bool:
        window = self.windows.get(prefix)
        return prefix not in self.retired and (window is None or window.check(counter))

    def open(self, frame: SealedFrame) -> bytes:
        """The plaintext, or :class:`Dropped`; a new prefix gets a window only once a frame decrypts."""
        nonce = frame.nonce
        prefix = nonce[:NONCE_PREFIX_LEN]
        counter = _unpack_counter(nonce, NONCE_PREFIX_LEN)[0]
        window = self.windows.get(prefix)
        # what acceptable() decides, with one lookup (a prefix with a window was never retired)
        refused = prefix in self.retired if window is None else not window.check(counter)
        if refused:
            raise Dropped("pils_replayed")
        try:
            plaintext = self.sender.decrypt(nonce, frame.ciphertext)
        except MalformedFrame:
            raise Dropped("pils_undecryptable") from None
        if window is None:
            window = self.windows[prefix] = ReplayWindow()
            while len(self.windows) > PREFIX_WINDOWS:
                self.retired[self.windows.popitem(last=False)[0]] = None
            while len(self.retired) > RETIRED_PREFIXES:
                self.retired.popitem(last=False)
        window.mark(counter)
        return plaintext


@attr.s(auto_attribs=True, eq=False)
class Candidate:
    """
    A session offered by a PILA with a new X25519 key while another session
    is in use: a restart of the peer, or an old PILA replayed (a PILA carries
    no freshness).  Only a frame sealed under it proves it (``docs/tunnel.md``).
    """

    session: Session
    frame: bytes        # the PILA that offered it, byte for byte (a repeat needs no lookup)
    source: Endpoint    # where the latest PILA carrying its key came from ...
    via_relay: bool     # ... and whether through the beacon: where copies under it go
