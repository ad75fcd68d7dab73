"""
Tests for L{pilot.protocols.udpbatch.GroReader} with a protocol that takes a
GRO buffer's datagrams in one call (``datagramsReceived``, as
L{pilot.protocols.tunnel.NodeDatagramProtocol} does).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase

from pilot.protocols.udpbatch import GroReader
from tests.protocols.test_udpbatch import ADDR, FakePort, Receiver, gro


class ManyReceiver(Receiver):
    """A protocol that takes a buffer's datagrams in one call, as NodeDatagramProtocol does."""

    def __init__(self, fail_on: Optional[bytes] = None) -> None:
        super().__init__(fail_on)
        self.buffers: list[list[bytes]] = []

    def datagramsReceived(self, pieces: list[bytes], addr: Any) -> None:
        self.buffers.append(list(pieces))
        for piece in pieces:
            self.got.append((piece, addr))
        if self.fail_on in pieces:
            raise ValueError("boom")


class ReadingMany(SynchronousTestCase):
    def test_a_buffer_in_one_call_where_the_protocol_takes_it(self) -> None:
        """datagramsReceived gets a coalesced buffer's datagrams at once; a single one still goes
        to datagramReceived; a raising call is logged and the read goes on."""
        port = FakePort([(b"aabbc", gro(2), 0, ADDR), (b"plain", [], 0, ADDR), (b"ddee", gro(2), 0, ADDR)])
        receiver = port.protocol = ManyReceiver(fail_on=b"bb")
        counts: dict[str, int] = {}
        GroReader(port, lambda n: counts.__setitem__(n, counts.get(n, 0) + 1)).doRead()
        self.assertEqual(receiver.buffers, [[b"aa", b"bb", b"c"], [b"dd", b"ee"]])
        self.assertEqual(receiver.got, [(b"aa", ADDR), (b"bb", ADDR), (b"c", ADDR), (b"plain", ADDR),
                                             (b"dd", ADDR), (b"ee", ADDR)])
        self.assertEqual(counts, {"gro_reads": 2})
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
