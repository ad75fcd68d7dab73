# -*- test-case-name: tests.protocols.test_udpbatch -*-
"""
Datagrams through the kernel in batches, for the node's tunnel socket (Linux).

* Send (:class:`SendBatch`, UDP GSO): datagrams to one endpoint, of one size,
  sent within one reactor pass leave in two calls: the first at once with a
  plain ``sendto``, the others in one ``sendmsg`` with a ``UDP_SEGMENT``
  cmsg at the end of the pass; the kernel cuts the buffer back into the
  same datagrams (the last may be shorter), so the wire carries exactly
  what one ``sendto`` each would.  Only datagrams whose endpoint already
  took one of at least their size by a plain send are held (their "too
  big" answer is known), so the sender that must learn
  :class:`~pilot.interfaces.DatagramTooBig` (the path MTU search) always
  sends synchronously.  A batch the kernel
  refuses goes out again one ``sendto`` each; when it was GSO that failed
  (EIO: a device without checksum offload, EINVAL, ENOPROTOOPT) batching
  stops for the socket, counted and logged once.
* Receive (:class:`GroReader`, UDP GRO): the socket may hand several
  datagrams of one sender in one buffer with the segment size in a
  ``UDP_GRO`` cmsg; the port's ``doRead`` reads with ``recvmsg`` and cuts
  the buffer back into datagrams, each given to ``datagramReceived`` as
  before (or all of one buffer to the protocol's ``datagramsReceived``, if
  it has one), within Twisted's per-``doRead`` byte budget
  (``udp.Port.maxThroughput``).

``docs/tunnel.md`` ("The socket") says what the node does with them.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any, Callable, Optional

from twisted.internet import udp
from twisted.logger import Logger

from pilot.endpoint import Endpoint

#: Linux's values (<linux/udp.h>); Python's socket module may not name them.
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)

#: segments in one GSO send (the kernel's UDP_MAX_SEGMENTS is 64 on every kernel with GSO)
MAX_SEGMENTS = 64
#: payload bytes in one GSO send: an IP datagram's 65,535 less IPv6's 40 and UDP's 8 bytes
MAX_BATCH_BYTES = 65535 - 40 - 8
#: endpoints whose largest accepted size is remembered
GOOD_ENDPOINTS = 1024

_GSO_OFF = (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP)
_GRO_CMSG = socket.CMSG_SPACE(4)
_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")



def gso_supported(sock: Any) -> bool:
    """Whether the socket takes ``UDP_SEGMENT`` (Linux 4.18 on)."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except (AttributeError, OSError):
        return False
    return True


def gro_segment(ancdata: list[tuple[int, int, bytes]]) -> int:
    """
    The segment size of a ``UDP_GRO`` cmsg (an int, or a u16 from some
    kernels), 0 for none or for a cmsg of another length.
    """
    for level, kind, value in ancdata:
        if level == SOL_UDP and kind == UDP_GRO:
            if len(value) == _INT.size:
                return max(0, _INT.unpack(value)[0])
            if len(value) == _U16.size:
                return int(_U16.unpack(value)[0])
            return 0
    return 0


def split(data: bytes, segment: int) -> list[bytes]:
    """``data`` cut into ``segment``-byte datagrams, the last maybe shorter; whole for 0."""
    if segment <= 0 or segment >= len(data):
        return [data]
    return [data[i:i + segment] for i in range(0, len(data), segment)]


class SendBatch:
    """
    The datagrams held for one GSO send: same endpoint, same size, the last
    maybe shorter (which closes the batch).  ``socket()`` gives the port's
    socket (None once it closed); ``later(f)`` runs ``f`` at the end of the
    reactor pass (``reactor.callLater(0, f)``); ``count(name)`` counts.
    """

    log = Logger()

    def __init__(self, socket_of: Callable[[], Any], later: Callable[[Callable[[], None]], Any],
                 count: Callable[[str], None]) -> None:
        self._socket = socket_of
        self._later = later
        self._count = count
        self.enabled = True
        self._good: dict[Endpoint, int] = {}  # endpoint -> largest size a plain send took
        self._held: list[bytes] = []
        self._endpoint: Optional[Endpoint] = None
        self._size = 0
        self._bytes = 0
        self._pending: Any = None

    def accepted(self, endpoint: Endpoint, size: int) -> None:
        """A plain send of ``size`` bytes to ``endpoint`` went out: later ones may be held."""
        if self._good.get(endpoint, 0) < size:
            if len(self._good) >= GOOD_ENDPOINTS and endpoint not in self._good:
                self._good.clear()
            self._good[endpoint] = size

    def hold(self, data: bytes, endpoint: Endpoint) -> bool:
        """
        Hold ``data`` for the batch open to its endpoint and size and say True;
        or send what is held (order is kept) and say False: the caller sends
        ``data`` itself, at once.  That plain send opens a batch when the
        endpoint took that size before: the first of a batch never waits (an
        ACK alone goes as soon as it is made, and the receiver starts on the
        first datagram while the others are made), the rest wait for the end
        of the pass.
        """
        size = len(data)
        if self._endpoint is not None:
            held = self._held
            if (endpoint == self._endpoint and size <= self._size and len(held) < MAX_SEGMENTS
                    and self._bytes + size <= MAX_BATCH_BYTES):
                held.append(data)
                self._bytes += size
                if size < self._size or len(held) == MAX_SEGMENTS:
                    self.flush()  # a shorter one is the last a batch may have
                return True
            self.flush()
        if self.enabled and size and self._good.get(endpoint, 0) >= size:
            self._endpoint, self._size, self._bytes = endpoint, size, 0
            if self._pending is None:
                self._pending = self._later(self._end_of_pass)
        return False

    def too_big(self, endpoint: Endpoint) -> None:
        """A plain send to ``endpoint`` was refused as too big: hold nothing more for it."""
        if self._endpoint == endpoint:
            self.flush()
        self._good.pop(endpoint, None)

    def _end_of_pass(self) -> None:
        self._pending = None
        self.flush()

    def cancel(self) -> None:
        """The port stops: send what is held, wait for no pass."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.active():
            pending.cancel()
        self.flush()

    def flush(self) -> None:
        held, endpoint, size = self._held, self._endpoint, self._size
        self._endpoint = None  # the batch is closed
        if not held or endpoint is None:
            return
        self._held, self._size, self._bytes = [], 0, 0
        sock = self._socket()
        if sock is None:
            self._count("batch_closed")
            return
        if len(held) == 1:
            self._one(sock, held[0], endpoint)
            return
        try:
            sock.sendmsg([b"".join(held)], [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, endpoint)
        except OSError as e:
            if e.errno in _GSO_OFF or e.errno == errno.EMSGSIZE:
                self._one_each(sock, held, endpoint, e)
            elif e.errno == errno.ECONNREFUSED:
                pass  # an ICMP error for an earlier datagram
            else:  # a full buffer: the datagrams are lost, as a router would lose them
                self._count("send_error")
                self._count("batch_lost")
        else:
            self._count("gso_sends")

    def _one_each(self, sock: Any, held: list[bytes], endpoint: Endpoint, e: OSError) -> None:
        too_big = False
        for data in held:
            too_big = self._one(sock, data, endpoint) or too_big
        if e.errno == errno.EMSGSIZE or too_big:
            return  # the path shrank, not GSO: the next plain send tells its sender
        self.enabled = False
        self._count("gso_off")
        self.log.warn("UDP GSO refused ({error}): the tunnel socket sends one datagram a call from now on",
                      error=e)

    def _one(self, sock: Any, data: bytes, endpoint: Endpoint) -> bool:
        """One plain send of a held datagram; True if the path refused it as too big."""
        try:
            sock.sendto(data, endpoint)
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                self._count("too_big")
                self._good.pop(endpoint, None)  # the next one goes plain and raises to its sender
                return True
            if e.errno != errno.ECONNREFUSED:
                self._count("send_error")
        return False


class GroReader:
    """
    A ``doRead`` for a Twisted ``udp.Port`` whose socket has ``UDP_GRO``:
    ``recvmsg``, the buffer cut by the cmsg's segment size, each datagram
    to the protocol, at most ``maxThroughput`` bytes a call (as Twisted's).
    """

    def __init__(self, port: Any, count: Callable[[str], None]) -> None:
        self.port = port
        self._count = count

    def doRead(self) -> None:
        port = self.port
        sock, protocol, size = port.socket, port.protocol, port.maxPacketSize
        v6 = port.addressFamily == socket.AF_INET6
        # a protocol that takes a buffer's datagrams in one call (NodeDatagramProtocol) gets them so:
        # its loop instead of the call chain per datagram
        many = getattr(protocol, "datagramsReceived", None)
        read = 0
        while read < port.maxThroughput:
            try:
                data, ancdata, flags, addr = sock.recvmsg(size, _GRO_CMSG)
            except OSError as se:
                no = se.args[0]
                if no in udp._sockErrReadIgnore:
                    return
                if no in udp._sockErrReadRefuse:
                    if port._connectedAddr:
                        protocol.connectionRefused()
                    return
                raise
            read += len(data)
            if v6:
                addr = addr[:2]
            pieces = split(data, gro_segment(ancdata) if ancdata else 0) if data else [data]
            if flags & socket.MSG_TRUNC:
                self._count("gro_truncated")  # the last piece is cut short: not a datagram that was sent
                pieces = pieces[:-1]
            if len(pieces) > 1:
                self._count("gro_reads")
                if many is not None:
                    try:
                        many(pieces, addr)
                    except BaseException:
                        udp.log.err()
                    continue
            for piece in pieces:
                try:
                    protocol.datagramReceived(piece, addr)
                except BaseException:
                    udp.log.err()


def enable_gro(port: Any, count: Callable[[str], None]) -> bool:
    """``UDP_GRO`` on a Twisted ``udp.Port``'s socket and its ``doRead`` by :class:`GroReader`."""
    if not isinstance(port, udp.Port):
        return False
    try:
        port.socket.setsockopt(SOL_UDP, UDP_GRO, 1)
    except (AttributeError, OSError):
        return False
    patched: Any = port  # this port's doRead only, not udp.Port's
    patched.doRead = GroReader(port, count).doRead
    return True
