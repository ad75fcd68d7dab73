# -*- test-case-name: tests.wire.test_tunnel -*-
"""
Tunnel crypto: the session key, sealing, nonces and the replay window.

Everything follows the reference (docs/reference-wire.md §4.3, §4.4):

* key = SHA-256(``pilot-tunnel-v1:`` + X25519(own private, peer public)),
  the same key both ways; an all-zero shared secret (a low-order peer key)
  is refused, as Go's ``crypto/ecdh`` refuses it;
* AES-256-GCM, 12-byte nonce, 16-byte tag, no additional data;
* nonce = a random 4-byte prefix per derived state ‖ an 8-byte big-endian
  counter, incremented before use, so the first frame carries counter 1;
* the receiver keeps a 256-entry sliding window over counters (not prefixes).

The reference marks a counter before decrypting and clears its bit when
decryption fails, but it does not undo the slide, so one forged frame with a
huge counter pushes every honest counter out of the window.
:class:`ReplayWindow` separates :meth:`~ReplayWindow.check` (no change) from
:meth:`~ReplayWindow.mark`, so a caller marks only after the tag verified;
:class:`TunnelSession` does exactly that.  For honest traffic both behave
the same.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import TYPE_CHECKING, Any, Callable

import attr
import nacl.bindings
import nacl.exceptions

from pilot.errors import MalformedFrame

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_CONTEXT = b"pilot-tunnel-v1:"
X25519_KEY_LEN = 32
KEY_LEN = 32
NONCE_LEN = 12
NONCE_PREFIX_LEN = 4
TAG_LEN = 16
MAX_COUNTER = (1 << 64) - 1
WINDOW_SIZE = 256

_COUNTER = struct.Struct(">Q")


def derive_key(own_x25519_private: Any, peer_x25519_public: Any) -> bytes:
    """The tunnel's AES-256 key; ``MalformedFrame`` for a bad or low-order peer key."""
    if not isinstance(own_x25519_private, bytes) or len(own_x25519_private) != X25519_KEY_LEN:
        raise ValueError("own X25519 private key must be 32 bytes")
    if not isinstance(peer_x25519_public, (bytes, bytearray, memoryview)):
        raise MalformedFrame("peer X25519 key must be bytes")
    peer = bytes(peer_x25519_public)
    if len(peer) != X25519_KEY_LEN:
        raise MalformedFrame(f"peer X25519 key must be 32 bytes, got {len(peer)}")
    try:
        shared = nacl.bindings.crypto_scalarmult(own_x25519_private, peer)
    except nacl.exceptions.CryptoError:
        # libsodium refuses a result of all zeros (a low-order point).
        raise MalformedFrame("peer X25519 key is a low-order point") from None
    if shared == bytes(X25519_KEY_LEN):
        raise MalformedFrame("peer X25519 key is a low-order point")
    return hashlib.sha256(KEY_CONTEXT + shared).digest()


def _aead(key: bytes) -> "AESGCM":
    # cryptography is imported with the first session, not with this module: an idle node
    # without peers does without its 6 MB (docs/performance.md, the idle daemon)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    if not isinstance(key, bytes) or len(key) != KEY_LEN:
        raise ValueError("the tunnel key is 32 bytes")
    return AESGCM(key)


def _invalid_tag() -> type[Exception]:
    """cryptography's bad-tag error (named in ``except`` clauses: evaluated only when something was raised)."""
    from cryptography.exceptions import InvalidTag
    return InvalidTag


def seal(key: bytes, nonce: bytes, plaintext: bytes) -> bytes:
    """AES-256-GCM ciphertext followed by the 16-byte tag."""
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_LEN:
        raise ValueError("the nonce is 12 bytes")
    return _aead(key).encrypt(nonce, bytes(plaintext), None)


def open_(key: bytes, nonce: Any, ciphertext: Any) -> bytes:
    """The plaintext; ``MalformedFrame`` if the tag does not verify or the input is not bytes."""
    if not isinstance(nonce, (bytes, bytearray, memoryview)) or len(nonce) != NONCE_LEN:
        raise MalformedFrame("the nonce must be 12 bytes")
    if not isinstance(ciphertext, (bytes, bytearray, memoryview)) or len(ciphertext) < TAG_LEN:
        raise MalformedFrame(f"ciphertext must be at least the {TAG_LEN}-byte tag")
    try:
        return _aead(key).decrypt(bytes(nonce), bytes(ciphertext), None)
    except _invalid_tag():
        raise MalformedFrame("tunnel frame does not decrypt (bad tag)") from None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Nonce:
    """A 12-byte GCM nonce: 4-byte prefix ‖ 8-byte big-endian counter."""

    prefix: bytes
    counter: int

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.prefix, bytes) or len(self.prefix) != NONCE_PREFIX_LEN:
            raise ValueError("nonce prefix is 4 bytes")
        if isinstance(self.counter, bool) or not isinstance(self.counter, int) \
                or not 0 <= self.counter <= MAX_COUNTER:
            raise ValueError(f"nonce counter must be a 64-bit unsigned integer, not {self.counter!r}")

    def to_bytes(self) -> bytes:
        return self.prefix + _COUNTER.pack(self.counter)

    @classmethod
    def from_bytes(cls, data: Any) -> "Nonce":
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != NONCE_LEN:
            raise MalformedFrame("a nonce is 12 bytes")
        data = bytes(data)
        return cls(data[:NONCE_PREFIX_LEN], _COUNTER.unpack_from(data, NONCE_PREFIX_LEN)[0])


class NonceSequence:
    """The sending side: a fixed prefix and a counter incremented before each use."""

    def __init__(self, prefix: bytes) -> None:
        Nonce(prefix, 0)  # validates the prefix
        self._prefix = prefix
        self._counter = 0

    @classmethod
    def fresh(cls, random_bytes: Callable[[int], bytes] = os.urandom) -> "NonceSequence":
        return cls(random_bytes(NONCE_PREFIX_LEN))

    @property
    def prefix(self) -> bytes:
        return self._prefix

    @property
    def last_counter(self) -> int:
        return self._counter

    def next(self) -> Nonce:
        return Nonce(self._prefix, _COUNTER.unpack_from(self.next_bytes(), NONCE_PREFIX_LEN)[0])

    def next_bytes(self) -> bytes:
        """The next nonce's 12 bytes (what :meth:`next` encodes, without the object: per packet)."""
        counter = self._counter
        if counter >= MAX_COUNTER:
            raise OverflowError("nonce counter exhausted; re-key")
        self._counter = counter = counter + 1
        return self._prefix + _COUNTER.pack(counter)


class ReplayWindow:
    """
    The receive side's 256-entry sliding window over nonce counters.

    * the first counter after a reset is accepted and becomes the highest;
    * a counter above the highest is accepted and slides the window (all
      bits clear if it jumps by 256 or more);
    * a counter 256 or more below the highest is too old;
    * inside the window, a counter is accepted once.

    :meth:`check` decides without changing anything; :meth:`mark` records an
    accepted counter; :meth:`accept` is both.  :meth:`unmark` clears one
    counter's bit, the reference's undo after a failed decryption.
    """

    def __init__(self) -> None:
        self._highest: int | None = None
        self._bits = 0  # bit (counter % 256) set = seen

    def reset(self) -> None:
        self._highest = None
        self._bits = 0

    @property
    def highest(self) -> int | None:
        return self._highest

    def check(self, counter: int) -> bool:
        if self._highest is None or counter > self._highest:
            return True
        if self._highest - counter >= WINDOW_SIZE:
            return False
        return not (self._bits >> (counter % WINDOW_SIZE)) & 1

    def mark(self, counter: int) -> None:
        highest = self._highest
        if highest is not None and counter == highest + 1:  # in order: the common case
            self._bits |= 1 << (counter % WINDOW_SIZE)  # the slide clears this bit, the mark sets it
            self._highest = counter
            return
        if not self.check(counter):
            raise ValueError(f"counter {counter} is not acceptable; check() it first")
        if highest is None:
            self._highest = counter
        elif counter > highest:
            if counter - highest >= WINDOW_SIZE:
                self._bits = 0
            else:
                for c in range(highest + 1, counter + 1):
                    self._bits &= ~(1 << (c % WINDOW_SIZE))
            self._highest = counter
        self._bits |= 1 << (counter % WINDOW_SIZE)

    def accept(self, counter: int) -> bool:
        if not self.check(counter):
            return False
        self.mark(counter)
        return True

    def unmark(self, counter: int) -> None:
        if self._highest is not None and 0 <= self._highest - counter < WINDOW_SIZE:
            self._bits &= ~(1 << (counter % WINDOW_SIZE))


class TunnelSession:
    """
    The crypto state for one peer: key, send nonces, replay window.

    A new one is made for every accepted key exchange (fresh prefix, counter
    0, empty window), as the reference does.
    """

    def __init__(self, key: bytes, nonces: NonceSequence) -> None:
        self._aead = _aead(key)
        self.nonces = nonces
        self.window = ReplayWindow()

    @classmethod
    def derive(cls, own_x25519_private: bytes, peer_x25519_public: Any,
               random_bytes: Callable[[int], bytes] = os.urandom) -> "TunnelSession":
        return cls(derive_key(own_x25519_private, peer_x25519_public), NonceSequence.fresh(random_bytes))

    def seal(self, plaintext: bytes) -> tuple[bytes, bytes]:
        """(nonce, ciphertext with tag) for the next counter."""
        nonce = self.nonces.next_bytes()
        return nonce, self._aead.encrypt(nonce, plaintext if type(plaintext) is bytes else bytes(plaintext), None)

    def decrypt(self, nonce: bytes, ciphertext: bytes) -> bytes:
        """The plaintext under this key, no replay check; ``MalformedFrame`` for a bad tag.
        The AES-GCM object is made once per session, not per frame."""
        try:
            return self._aead.decrypt(nonce, ciphertext, None)
        except _invalid_tag():
            raise MalformedFrame("tunnel frame does not decrypt (bad tag)") from None

    def open(self, nonce: Any, ciphertext: Any) -> bytes:
        """Check the counter, decrypt, then mark it; ``MalformedFrame`` for a replay or a bad tag."""
        counter = Nonce.from_bytes(nonce).counter
        if not self.window.check(counter):
            raise MalformedFrame(f"replayed or too old nonce counter {counter}")
        if not isinstance(ciphertext, (bytes, bytearray, memoryview)) or len(ciphertext) < TAG_LEN:
            raise MalformedFrame(f"ciphertext must be at least the {TAG_LEN}-byte tag")
        plaintext = self.decrypt(bytes(nonce), bytes(ciphertext))
        self.window.mark(counter)
        return plaintext
