# -*- test-case-name: tests.protocols.test_tunnel -*-
"""
The node's one UDP socket: beacon replies and tunnel frames, told apart by
their first byte (docs/reference-wire.md §4.1).  Beacon messages are decoded
here and handed to the node (``IBeaconListener``); tunnel frames go straight
to the tunnel layer (``IFrameReceiver``), which decodes and opens them.

Thin, as every protocol here: decode, call, never raise into the reactor.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, Optional, Sequence

from twisted.internet.error import MessageLengthError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from pilot.endpoint import Endpoint
from pilot.errors import MalformedFrame
from pilot.interfaces import DatagramTooBig, IBeaconListener, IDatagramSender, IFrameReceiver
from pilot.protocols.udpbatch import SendBatch, enable_gro, gso_supported
from pilot.wire import beacon as bw

CHECKED_ENDPOINTS = 1024  # endpoints remembered as accepted by the port's write()


@implementer(IDatagramSender)
class NodeDatagramProtocol(DatagramProtocol):
    """
    Build it, give it to the node as its sender, then :meth:`wire` it to the
    node (the beacon's messages) and the node's tunnels (frames).
    """

    log = Logger()

    def __init__(self) -> None:
        self._beacon: Optional[IBeaconListener] = None
        self._frames: Optional[IFrameReceiver] = None
        self.counters: dict[str, int] = {}
        self._default_ttl: Optional[int] = None
        self._checked: set[Endpoint] = set()
        self._batch: Optional[SendBatch] = None

    def batch(self, reactor: Any) -> tuple[bool, bool]:
        """
        Once listening: datagrams sent in batches where the socket allows (UDP
        GSO) and read in batches (UDP GRO), ``pilot.protocols.udpbatch``.
        Says which of the two the kernel took.
        """
        port: Any = self.transport
        sock = getattr(port, "socket", None)
        if sock is not None and gso_supported(sock):
            # the port's socket, not the transport's: doStop() forgets the transport first
            self._batch = SendBatch(lambda: getattr(port, "socket", None),
                                    lambda f: reactor.callLater(0, f), self._count)
        return self._batch is not None, enable_gro(port, self._count)

    def stopProtocol(self) -> None:
        if self._batch is not None:
            self._batch.cancel()

    def wire(self, beacon: IBeaconListener, frames: IFrameReceiver) -> None:
        self._beacon = beacon
        self._frames = frames

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.datagramsReceived((data,), addr)

    def datagramsReceived(self, pieces: Sequence[bytes], addr: Any) -> None:
        """
        Datagrams from one sender: one (``datagramReceived``) or the pieces of one GRO buffer
        (``GroReader``), the source and the wiring taken once for all of them.
        """
        beacon, frames = self._beacon, self._frames
        if beacon is None or frames is None:
            for _ in pieces:
                self._count("not_wired")
            return
        source: Endpoint = (addr[0], addr[1])
        frame_received = frames.frame_received
        for data in pieces:
            try:
                if data[:1] and data[0] < 0x10:
                    self._beacon_message(beacon, frames, data, source)
                else:
                    frame_received(data, source, False)
            except Exception:
                self.log.failure("handling a datagram from {source}", source=source)

    def _beacon_message(self, beacon: IBeaconListener, frames: IFrameReceiver, data: bytes,
                        source: Endpoint) -> None:
        if not beacon.is_beacon(source):
            self._count("beacon_not_from_beacon")  # only our beacon may steer us
            return
        try:
            message = bw.decode(data)
        except MalformedFrame:
            self._count("beacon_malformed")
            return
        if isinstance(message, bw.DiscoverReply):
            beacon.discovered((message.host, message.port))
        elif isinstance(message, bw.PunchCommand):
            beacon.punch_commanded((message.host, message.port))
        elif isinstance(message, bw.RelayDeliver):
            # the beacon names who relayed it; Tunnels drops a frame that names another sender
            frames.frame_received(message.frame, source, True, message.sender)
        else:
            self._count("beacon_unexpected")

    # -- IDatagramSender --

    def send(self, data: bytes, endpoint: Endpoint) -> None:
        batch = self._batch
        if batch is None:
            self._send_now(data, endpoint)
            return
        if data[:1] >= b"\x10":
            if batch.hold(data, endpoint):
                return
        else:
            batch.flush()  # a beacon message (first byte under 0x10) never waits in a batch
        try:
            self._send_now(data, endpoint)
        except DatagramTooBig:
            batch.too_big(endpoint)
            raise
        batch.accepted(endpoint, len(data))  # it did not raise: the size fits the path

    def _send_now(self, data: bytes, endpoint: Endpoint) -> None:
        transport = self.transport
        if transport is None:
            return
        if endpoint in self._checked:
            # an endpoint the port's write() accepted before: straight to the socket, without
            # the address checks write() repeats for every datagram (docs/performance.md)
            try:
                transport.socket.sendto(data, endpoint)  # type: ignore[attr-defined]
                return
            except OSError as e:
                if e.errno not in (errno.EINTR, errno.ENOBUFS, errno.EAGAIN):
                    self._send_failed(e, data, endpoint)
                    return
            except AttributeError:  # the port closed meanwhile: write() says what to do
                self._checked.clear()
        try:
            transport.write(data, endpoint)
        except MessageLengthError:
            # don't-fragment is set (services/node.py): larger than the path allows
            self._count("too_big")
            raise DatagramTooBig(len(data)) from None
        except OSError as e:
            self._send_failed(e, data, endpoint)
        else:
            if getattr(transport, "socket", None) is not None:
                if len(self._checked) >= CHECKED_ENDPOINTS:
                    self._checked.clear()
                self._checked.add(endpoint)

    def _send_failed(self, e: OSError, data: bytes, endpoint: Endpoint) -> None:
        if e.errno == errno.EMSGSIZE:
            self._count("too_big")
            raise DatagramTooBig(len(data)) from None
        if e.errno == errno.ECONNREFUSED:
            return  # an ICMP error for an earlier datagram (what the port's write() ignores too)
        # unreachable networks and full buffers are the network's business, not a crash
        self._count("send_error")
        self.log.debug("sending to {endpoint} failed: {error}", endpoint=endpoint, error=e)

    def send_limited(self, data: bytes, endpoint: Endpoint, ttl: int) -> None:
        sock = getattr(self.transport, "socket", None)
        if sock is None:
            self._count("no_ttl")  # a transport without a socket cannot limit hops: send nothing
            return
        try:
            if self._default_ttl is None:
                self._default_ttl = int(sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        except OSError as e:
            self._count("ttl_error")
            self.log.debug("cannot set a hop limit: {error}", error=e)
            return
        if self._batch is not None:
            self._batch.flush()  # what was sent before goes before, with the socket's own TTL
        try:
            self._send_now(data, endpoint)
        finally:
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, self._default_ttl)
            except OSError as e:  # pragma: no cover - it was settable a moment ago
                self.log.error("cannot restore the socket's TTL: {error}", error=e)

    def local_port(self) -> int:
        transport: Any = self.transport
        return int(transport.getHost().port) if transport is not None else 0
