"""
Tests for L{pilot.protocols.sendnow}: a reply goes to the socket in the
reactor pass that made it, unless bytes are queued before it.

The TCP transport is Twisted's own ``tcp.Connection`` over a
``socket.socketpair()`` (a local pair: nothing leaves the machine), with a
``MemoryReactor`` that records which descriptors want to be told of
writability.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.tcp import Connection
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pilot.protocols.registry import RegistryServerProtocol
from pilot.protocols.sendnow import write_now
from pilot.server.registry import Registry, RegistryConfig
from pilot.wire.registry import FrameDecoder, encode_frame


class PairConnection(Connection):
    """A ``tcp.Connection`` over one end of a socket pair, connected."""

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)


class WriteNowTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)
        self.theirs.setblocking(False)
        self.reactor = MemoryReactorClock()
        self.transport = PairConnection(self.ours, Protocol(), self.reactor)
        self.transport.connected = 1

    def received(self) -> bytes:
        try:
            return self.theirs.recv(1 << 20)
        except BlockingIOError:
            return b""

    def assertWrittenThroughTwisted(self, data: bytes) -> None:
        """``write_now(data)`` goes to the transport's own ``write``, none of it straight to the socket."""
        written: list[bytes] = []
        self.patch(self.transport, "write", written.append)
        write_now(self.transport, data)
        self.assertEqual(written, [data])
        self.assertEqual(self.received(), b"")

    def queued(self) -> bool:
        return self.transport in self.reactor.getWriters()

    def test_sent_at_once(self) -> None:
        """Nothing queued: the bytes are on the socket when the call returns, and nothing waits."""
        write_now(self.transport, b"reply one")
        self.assertEqual(self.received(), b"reply one")
        self.assertFalse(self.queued())
        self.assertEqual(self.transport._tempDataLen, 0)

    def test_behind_queued_bytes(self) -> None:
        """Bytes already queued go first: the new ones queue behind them, in order."""
        self.transport.write(b"first ")
        write_now(self.transport, b"second")
        self.assertEqual(self.received(), b"")
        self.assertTrue(self.queued())
        self.transport.doWrite()
        self.assertEqual(self.received(), b"first second")
        self.assertFalse(self.queued())

    def test_socket_full(self) -> None:
        """What the socket does not take is queued, and sent in order once it drains."""
        self.ours.setblocking(False)
        filler = 0
        try:
            while True:
                filler += self.ours.send(b"f" * 65536)
        except BlockingIOError:
            pass
        write_now(self.transport, b"the reply")
        self.assertTrue(self.queued())
        got = b""
        while len(got) < filler + len(b"the reply"):
            got += self.received()
            self.transport.doWrite()
        self.assertEqual(got[filler:], b"the reply")
        self.assertFalse(self.queued())

    def test_partly_taken(self) -> None:
        """A short send: the rest is queued, and follows the part sent."""
        class ShortSocket:
            def send(self, data: bytes) -> int:
                return 3
        self.patch(self.transport, "socket", ShortSocket())
        write_now(self.transport, b"abcdef")
        self.assertEqual(self.transport._tempDataBuffer, [b"def"])
        self.assertTrue(self.queued())

    def test_lost_connection(self) -> None:
        """A send that fails is queued, so the reactor's ``doWrite`` reports the loss as ever."""
        self.theirs.close()
        write_now(self.transport, b"too late")
        self.assertTrue(self.queued())
        self.assertIsInstance(self.transport.doWrite(), Exception)

    def test_closing(self) -> None:
        """After ``loseConnection`` the bytes are queued (Twisted flushes them, then closes)."""
        self.transport.disconnecting = True
        write_now(self.transport, b"last words")
        self.assertEqual(self.received(), b"")
        self.assertEqual(self.transport._tempDataBuffer, [b"last words"])

    def test_aborted(self) -> None:
        """After ``abortConnection`` nothing more reaches the socket."""
        self.transport.abortConnection()
        write_now(self.transport, b"after the abort")
        self.assertEqual(self.received(), b"")

    def test_tls(self) -> None:
        """A connection that started TLS writes through TLS: never straight to the socket."""
        self.patch(self.transport, "TLS", True)
        self.assertWrittenThroughTwisted(b"secret")

    def test_private_names_missing(self) -> None:
        """A Twisted without the private names this reads: its own ``write``, never an error."""
        del self.transport._tempDataLen  # (an instance attribute: as if another Twisted named it otherwise)
        self.assertWrittenThroughTwisted(b"reply")

    def test_other_transports(self) -> None:
        """Any other transport (TLS, tests) gets ``write``."""
        transport = StringTransport()
        write_now(transport, b"data")
        self.assertEqual(transport.value(), b"data")


class ImportTests(SynchronousTestCase):
    def test_tcp_not_imported(self) -> None:
        """
        The registry protocol does not import ``twisted.internet.tcp`` (which
        loads pyOpenSSL): ``pilot.cli`` imports it before a rendezvous without
        TLS installs its reactor without pyOpenSSL (issue 16: restart time).
        """
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = ("import sys, pilot.cli, pilot.protocols.registry; "
                "print('twisted.internet.tcp' in sys.modules, 'OpenSSL' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                             env=dict(os.environ, PYTHONPATH=root), timeout=120)
        self.assertEqual(out.stdout.split(), ["False", "False"], out.stderr)


class RegistryReplyTests(SynchronousTestCase):
    def test_reply_in_the_same_pass(self) -> None:
        """A request read from the socket has its reply on the socket when ``dataReceived`` returns."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        reactor = MemoryReactorClock()
        registry = Registry(Clock(), RegistryConfig())
        protocol = RegistryServerProtocol(registry, Clock())
        transport = PairConnection(ours, protocol, reactor)
        transport.connected = 1
        protocol.makeConnection(transport)
        protocol.dataReceived(encode_frame({"type": "lookup", "node_id": 7}))
        self.assertNotIn(transport, reactor.getWriters())
        theirs.setblocking(False)
        (reply,) = FrameDecoder().feed(theirs.recv(65536))
        assert isinstance(reply, dict)
        self.assertEqual((reply["type"], reply["code"]), ("error", "not_found"))
        protocol.connectionLost(Failure(ConnectionError("done")))
