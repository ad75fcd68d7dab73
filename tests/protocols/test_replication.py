"""pilot.protocols.replication: the subscriber's stream over a StringTransport."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pilot.protocols.replication import ReplicationClientFactory, ReplicationClientProtocol
from pilot.wire import replication as wire
from pilot.wire.registry import FrameDecoder, encode_frame

SUBSCRIPTION = {"type": "subscribe_replication", "token": "t", "deltas": True}


class Receiver:
    def __init__(self) -> None:
        self.frames: list[wire.Frame] = []
        self.lost: list[str] = []

    def frame_received(self, link: ReplicationClientProtocol, frame: wire.Frame) -> None:
        self.frames.append(frame)

    def link_lost(self, attempt: ReplicationClientFactory, reason: str) -> None:
        self.lost.append(reason)


class Aborting(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class StreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.receiver = Receiver()
        self.factory = ReplicationClientFactory(SUBSCRIPTION, self.receiver, self.clock, read_deadline=45)
        self.protocol = self.factory.buildProtocol(None)
        self.transport = Aborting()
        self.protocol.makeConnection(self.transport)

    def sent(self) -> list[dict[str, Any]]:
        frames = FrameDecoder().feed(self.transport.value())
        return [f for f in frames if isinstance(f, dict)]

    def test_subscribes_on_connect(self) -> None:
        self.assertEqual(self.sent(), [SUBSCRIPTION])

    def test_frames_reach_the_receiver_in_pieces(self) -> None:
        data = encode_frame({"type": "heartbeat", "term": 2}) + \
            len(body := wire.encode_snapshot_bytes(b'{"nodes":{}}', 2, 1)).to_bytes(4, "big") + body
        for i in range(len(data)):
            self.protocol.dataReceived(data[i:i + 1])
        self.assertEqual(self.receiver.frames, [wire.Heartbeat(2), wire.Snapshot({"nodes": {}}, 2, 1)])

    def test_acks_are_written(self) -> None:
        self.transport.clear()
        self.protocol.send_ack(7)
        self.assertEqual(self.sent(), [{"type": "replication_ack", "seq": 7}])

    def test_malformed_frame_closes(self) -> None:
        self.protocol.dataReceived(encode_frame({"type": "replication_delta", "seq": "x", "changes": {}}))
        self.assertTrue(self.transport.aborted)
        self.protocol.connectionLost()
        self.assertEqual(len(self.receiver.lost), 1)
        self.assertIn("malformed", self.receiver.lost[0])
        self.assertEqual(self.receiver.frames, [])

    def test_not_json_closes(self) -> None:
        self.protocol.dataReceived(b"\x00\x00\x00\x03abc")
        self.assertTrue(self.transport.aborted)

    def test_oversized_length_closes(self) -> None:
        self.protocol.dataReceived(b"\xff\xff\xff\xff")
        self.assertTrue(self.transport.aborted)

    def test_frames_after_a_bad_one_are_not_delivered(self) -> None:
        self.protocol.dataReceived(encode_frame({"type": "nonsense"}) + encode_frame({"type": "heartbeat"}))
        self.assertEqual(self.receiver.frames, [])

    def test_silence_closes_after_the_read_deadline(self) -> None:
        self.clock.advance(44)
        self.protocol.dataReceived(encode_frame({"type": "heartbeat"}))
        self.clock.advance(44)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(1)
        self.assertTrue(self.transport.aborted)
        self.protocol.connectionLost()
        self.assertIn("nothing received for 45 s", self.receiver.lost[0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failed_attempt_reported(self) -> None:
        from twisted.python.failure import Failure
        from twisted.internet.error import ConnectionRefusedError
        self.factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(len(self.receiver.lost), 1)

    def test_snapshot_json_is_whole(self) -> None:
        body = wire.encode_snapshot_bytes(json.dumps({"nodes": {"1": {"id": 1}}}).encode(), 1, 0)
        self.protocol.dataReceived(len(body).to_bytes(4, "big") + body)
        self.assertEqual(self.receiver.frames, [wire.Snapshot({"nodes": {"1": {"id": 1}}}, 1, 0)])
