"""
A received datagram's way up to an application's ``dataReceived``
(docs/architecture.md): protocol -> tunnels -> stack -> connection ->
transport -> application, each file once, at most 7 files of ``pilot/``.
"""

from __future__ import annotations

import os
import traceback
from typing import Optional

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import pilot
from pilot.address import Address
from tests.node.fakes import pair

PILOT = os.path.dirname(os.path.abspath(pilot.__file__))
# A machine's input dispatch (Automat's, or the shorter one pilot.machines.table.indexed installs)
# is not a layer of the way up: neither file counts.
DISPATCH = os.path.join(PILOT, "machines", "table.py")
PORT = 5000


class Capture(Protocol):
    """Records the pilot/ files on the stack at its first ``dataReceived``."""

    files: Optional[list[str]] = None
    data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.files is None:
            self.files = [os.path.relpath(frame.filename, os.path.dirname(PILOT))
                          for frame in traceback.extract_stack()
                          if os.path.abspath(frame.filename).startswith(PILOT + os.sep)
                          and os.path.abspath(frame.filename) != DISPATCH]


class Writer(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello")


def runs(files: list[str]) -> list[str]:
    """``files`` with consecutive repeats folded: one entry per run."""
    return [f for i, f in enumerate(files) if i == 0 or files[i - 1] != f]


class WayUpTests(SynchronousTestCase):
    def walk(self) -> list[str]:
        """Two real nodes on a clock; ``a`` opens a stream to ``b`` and writes: the files on b's way up."""
        clock = Clock()
        network, a, b = pair(clock)
        captured = Capture()
        b.node.stack.listen(PORT, Factory.forProtocol(lambda: captured))
        d = a.node.stack.connect(Address(0, b.node.own_id), PORT, Writer(), timeout=5.0)
        for _ in range(200):
            clock.advance(0.01)
        self.successResultOf(d)
        self.assertEqual(captured.data, b"hello")
        assert captured.files is not None
        return runs(captured.files)

    def test_one_run_per_file(self) -> None:
        walk = self.walk()
        self.assertEqual(len(walk), len(set(walk)), f"a file is left and visited again: {walk}")
        self.assertEqual(walk[:3], ["pilot/protocols/tunnel.py", "pilot/machines/tunnel/layer.py",
                                    "pilot/stack/demux.py"])
        self.assertEqual(walk[-1], "pilot/stack/transport.py", walk)
        self.assertNotIn("pilot/node/core.py", walk)  # the node wires; it is no pass-through
        self.assertNotIn("pilot/services/node.py", walk)

    def test_at_most_seven_files(self) -> None:
        walk = self.walk()
        self.assertLessEqual(len(walk), 7, walk)
