# -*- test-case-name: tests.wire.test_probe -*-
"""
Path MTU probes (``docs/tunnel.md``, "Datagrams that fit the path"): a
padded probe and its small acknowledgement, our own frames beside the
reference's (docs/reference-wire.md §4.1)::

    PILM  magic (4), sender node id (4), kind (1: probe, 2: ack),
          token (8), size (2), then zeros up to the probe's size

``size`` is the datagram size the prober measured (its UDP payload, the
beacon's relay header included when relayed); the ack repeats the token and
the size, so a prober matches an ack to the one probe it sent.  A reference
daemon drops a frame with an unknown magic silently (§4.1), so a probe to a
reference peer costs one datagram and is never acknowledged: the search
ends at the base size.

Pure: bytes to frozen values and back; decoders raise only
:class:`~pilot.errors.MalformedFrame`.
"""

from __future__ import annotations

import struct
from typing import Any, Union

import attr

from pilot.errors import MalformedFrame
from pilot.wire.value import as_bytes

PILM = b"PILM"
PROBE = 1
ACK = 2
TOKEN_LEN = 8
_HEADER = struct.Struct("!4sIB8sH")
#: The bytes of an ack, and the least a probe can be.
HEADER_LEN = _HEADER.size  # 19


def _token(instance: Any, attribute: Any, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != TOKEN_LEN:
        raise ValueError(f"{attribute.name} must be {TOKEN_LEN} bytes")


def _u(bits: int) -> Any:
    def check(instance: Any, attribute: Any, value: int) -> None:
        if not isinstance(value, int) or not 0 <= value < 1 << bits:
            raise ValueError(f"{attribute.name} must fit in {bits} bits, not {value!r}")
    return check


@attr.s(frozen=True, slots=True, auto_attribs=True)
class MtuProbe:
    """A probe: ``frame_len`` bytes on the wire (the header, then zeros)."""

    sender: int = attr.ib(validator=_u(32))
    token: bytes = attr.ib(validator=_token)
    size: int = attr.ib(validator=_u(16))
    frame_len: int = attr.ib(validator=_u(16))

    def __attrs_post_init__(self) -> None:
        if self.frame_len < HEADER_LEN:
            raise ValueError(f"a probe is at least {HEADER_LEN} bytes")

    def encode(self) -> bytes:
        return _HEADER.pack(PILM, self.sender, PROBE, self.token, self.size) + bytes(
            self.frame_len - HEADER_LEN)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class MtuProbeAck:
    """The peer's answer to one probe: same token, same size."""

    sender: int = attr.ib(validator=_u(32))
    token: bytes = attr.ib(validator=_token)
    size: int = attr.ib(validator=_u(16))

    def encode(self) -> bytes:
        return _HEADER.pack(PILM, self.sender, ACK, self.token, self.size)


ProbeFrame = Union[MtuProbe, MtuProbeAck]


def is_probe_frame(data: bytes) -> bool:
    return data[:4] == PILM


def decode(datagram: Any) -> ProbeFrame:
    data = as_bytes(datagram, "datagram")
    if len(data) < HEADER_LEN:
        raise MalformedFrame(f"a PILM frame of {len(data)} bytes (at least {HEADER_LEN})")
    magic, sender, kind, token, size = _HEADER.unpack_from(data)
    if magic != PILM:
        raise MalformedFrame("not a PILM frame")
    if kind == PROBE:
        return MtuProbe(sender, token, size, len(data))
    if kind == ACK:
        return MtuProbeAck(sender, token, size)
    raise MalformedFrame(f"unknown PILM kind {kind}")
