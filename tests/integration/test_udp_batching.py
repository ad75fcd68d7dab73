"""
Real sockets on 127.0.0.1: a batch sent with UDP GSO (L{pilot.protocols.udpbatch})
arrives as the same datagrams at a receiver without UDP GRO (the kernel cuts it)
and at one with it (L{GroReader} cuts it).  Skipped, naming the option, where
the kernel refuses UDP_SEGMENT or UDP_GRO.
"""

from __future__ import annotations

import errno
import select
import socket
import sys
import time
from typing import Any, Callable

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from pilot.protocols.udpbatch import SOL_UDP, UDP_GRO, GroReader, SendBatch, gso_supported

HOST = "127.0.0.1"
WAIT = 5.0  # seconds at most for the datagrams to arrive


class Collector:
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.got.append(data)


class RealPort:
    """What L{GroReader} reads of a Twisted port, around a real socket."""

    maxPacketSize = 65535
    maxThroughput = 256 * 1024
    addressFamily = socket.AF_INET
    _connectedAddr = None

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.protocol = Collector()


class GsoOnLoopback(SynchronousTestCase):
    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("UDP GSO/GRO are Linux's")
        self.sender = self._socket()
        if not gso_supported(self.sender):
            raise SkipTest("the kernel refuses UDP_SEGMENT (UDP GSO)")
        self.counts: dict[str, int] = {}
        self.later: list[Callable[[], None]] = []

    def _socket(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind((HOST, 0))
        s.setblocking(False)
        return s

    def send(self, to: socket.socket, datagrams: list[bytes]) -> None:
        batch = SendBatch(lambda: self.sender, self.later.append,
                          lambda n: self.counts.__setitem__(n, self.counts.get(n, 0) + 1))
        endpoint = to.getsockname()
        batch.accepted(endpoint, max(len(d) for d in datagrams))
        held = []
        for d in datagrams:
            held.append(batch.hold(d, endpoint))
            if not held[-1]:
                self.sender.sendto(d, endpoint)  # the first of a batch goes at once, plainly
        self.assertEqual(held, [False] + [True] * (len(datagrams) - 1))
        batch.flush()
        if not batch.enabled:
            raise SkipTest(f"the kernel refuses UDP_SEGMENT (UDP GSO) on loopback: {self.counts}")
        self.assertEqual(self.counts, {"gso_sends": 1})

    def receive(self, read: Callable[[], list[bytes]], count: int) -> list[bytes]:
        got: list[bytes] = []
        deadline = time.monotonic() + WAIT
        while len(got) < count and time.monotonic() < deadline:
            select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            got.extend(read())
        return got

    def datagrams(self) -> list[bytes]:
        return [bytes([65 + i]) * 1330 for i in range(20)] + [b"z" * 100]

    def test_a_receiver_without_gro_gets_the_same_datagrams(self) -> None:
        receiver = self._socket()
        self.fd = receiver.fileno()
        sent = self.datagrams()
        self.send(receiver, sent)

        def read() -> list[bytes]:
            out = []
            while True:
                try:
                    out.append(receiver.recv(65535))
                except BlockingIOError:
                    return out

        self.assertEqual(self.receive(read, len(sent)), sent)

    def test_a_receiver_with_gro_gets_the_same_datagrams(self) -> None:
        receiver = self._socket()
        try:
            receiver.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError as e:
            if e.errno in (errno.ENOPROTOOPT, errno.EINVAL):
                raise SkipTest("the kernel refuses UDP_GRO") from None
            raise
        self.fd = receiver.fileno()
        port = RealPort(receiver)
        counts: dict[str, int] = {}
        reader = GroReader(port, lambda n: counts.__setitem__(n, counts.get(n, 0) + 1))
        sent = self.datagrams()
        self.send(receiver, sent)

        def read() -> list[bytes]:
            before = len(port.protocol.got)
            reader.doRead()
            return port.protocol.got[before:]

        self.assertEqual(self.receive(read, len(sent)), sent)
        self.assertEqual(counts, {"gro_reads": 1})  # the first alone, then one buffer cut in 20
