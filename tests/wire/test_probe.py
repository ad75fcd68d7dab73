"""Tests for L{pilot.wire.probe}: path MTU probes and their acks."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import MalformedFrame
from pilot.wire.probe import HEADER_LEN, MtuProbe, MtuProbeAck, decode, is_probe_frame
from pilot.wire.tunnel import decode_frame

TOKEN = bytes(range(8))


class ProbeTests(SynchronousTestCase):
    def test_probe_padded_to_its_length(self) -> None:
        data = MtuProbe(7, TOKEN, 1400, 1391).encode()
        self.assertEqual(len(data), 1391)
        self.assertEqual(data[:19], b"PILM" + b"\x00\x00\x00\x07" + b"\x01" + TOKEN + b"\x05\x78")
        self.assertEqual(decode(data), MtuProbe(7, TOKEN, 1400, 1391))
        self.assertTrue(is_probe_frame(data))

    def test_ack_bytes(self) -> None:
        data = MtuProbeAck(7, TOKEN, 1400).encode()
        self.assertEqual(data, b"PILM\x00\x00\x00\x07\x02" + TOKEN + b"\x05\x78")
        self.assertEqual(len(data), HEADER_LEN)
        self.assertEqual(decode(data), MtuProbeAck(7, TOKEN, 1400))

    def test_garbage(self) -> None:
        for data in (b"", b"PILM", b"PILM" + bytes(14), b"PILM\x00\x00\x00\x07\x03" + TOKEN + b"\x00\x01",
                     b"PILS" + bytes(30), "PILM"):
            self.assertRaises(MalformedFrame, decode, data)

    def test_bad_values(self) -> None:
        self.assertRaises(ValueError, MtuProbe, 7, b"short", 1400, 1400)
        self.assertRaises(ValueError, MtuProbe, 7, TOKEN, 1400, 10)
        self.assertRaises(ValueError, MtuProbeAck, -1, TOKEN, 1400)

    def test_not_a_tunnel_frame(self) -> None:
        """The tunnel codec (and a reference daemon, docs/reference-wire.md §4.1) does not know PILM."""
        self.assertRaises(MalformedFrame, decode_frame, MtuProbe(7, TOKEN, 1400, 1400).encode())
