"""
Tests for L{pilot.protocols.udpbatch} and its use by the node's datagram
protocol: fake sockets that record each ``sendto``/``sendmsg``/``recvmsg``
and its cmsgs (no network, no real time).
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any, Optional

from twisted.internet import udp
from twisted.internet.error import MessageLengthError
from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport
from twisted.trial.unittest import SynchronousTestCase

from pilot.interfaces import DatagramTooBig
from pilot.protocols import udpbatch
from pilot.protocols.tunnel import NodeDatagramProtocol
from pilot.protocols.udpbatch import (
    MAX_BATCH_BYTES, MAX_SEGMENTS, SOL_UDP, UDP_GRO, UDP_SEGMENT, GroReader, SendBatch, enable_gro,
    gro_segment, split,
)

PEER = ("203.0.113.5", 4000)
OTHER = ("203.0.113.6", 4000)
BEACON = ("198.51.100.1", 9001)


def seg(size: int) -> list[tuple[int, int, bytes]]:
    return [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]


class FakeSocket:
    """Records what is sent; ``fail`` maps a call name to the errnos its next calls raise."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []
        self.fail: dict[str, list[int]] = {}
        self.options: dict[tuple[int, int], int] = {(socket.IPPROTO_IP, socket.IP_TTL): 64}
        self.refuse_options: set[tuple[int, int]] = set()

    def _maybe_fail(self, name: str) -> None:
        errors = self.fail.get(name)
        if errors:
            no = errors.pop(0)
            raise OSError(no, errno.errorcode.get(no, "error"))

    def sendto(self, data: bytes, endpoint: Any) -> int:
        self._maybe_fail("sendto")
        self.sent.append(("sendto", data, endpoint, self.options[(socket.IPPROTO_IP, socket.IP_TTL)]))
        return len(data)

    def sendmsg(self, buffers: list[bytes], ancdata: Any, flags: int, endpoint: Any) -> int:
        self._maybe_fail("sendmsg")
        self.sent.append(("sendmsg", b"".join(buffers), endpoint, list(ancdata)))
        return sum(len(b) for b in buffers)

    def getsockopt(self, level: int, name: int) -> int:
        if (level, name) in self.refuse_options:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        return self.options.get((level, name), 0)

    def setsockopt(self, level: int, name: int, value: int) -> None:
        if (level, name) in self.refuse_options:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        self.options[(level, name)] = value

    def datagrams(self) -> list[bytes]:
        """What the wire carries: each sendmsg cut by its segment size, as the kernel does."""
        out: list[bytes] = []
        for call in self.sent:
            if call[0] == "sendto":
                out.append(call[1])
            else:
                size = struct.unpack("=H", call[3][0][2])[0]
                out.extend(split(call[1], size))
        return out


class Batches(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sock: Optional[FakeSocket] = FakeSocket()
        self.counts: dict[str, int] = {}
        self.batch = SendBatch(lambda: self.sock, lambda f: self.clock.callLater(0, f), self.count)
        self.batch.accepted(PEER, 1400)
        self.batch.accepted(OTHER, 1400)

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def send_all(self, datagrams: list[bytes], endpoint: Any = PEER) -> list[bool]:
        """Each as the protocol sends it: held, or sent plainly by the caller at once."""
        held = []
        for d in datagrams:
            held.append(self.batch.hold(d, endpoint))
            if not held[-1]:
                self.sock.sendto(d, endpoint)  # type: ignore[union-attr]
        return held

    def kinds(self) -> list[str]:
        return [c[0] for c in self.sock.sent]  # type: ignore[union-attr]

    def test_an_unknown_endpoint_or_larger_size_is_not_held(self) -> None:
        self.assertFalse(self.batch.hold(b"x" * 100, ("192.0.2.1", 1)))
        self.assertFalse(self.batch.hold(b"x" * 100, ("192.0.2.1", 1)))
        self.assertFalse(self.batch.hold(b"x" * 1401, PEER))
        self.assertFalse(self.batch.hold(b"x" * 1401, PEER))
        self.assertFalse(self.batch.hold(b"", PEER))
        self.assertFalse(self.batch.hold(b"", PEER))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_first_at_once_the_rest_in_one_sendmsg_at_the_end_of_the_pass(self) -> None:
        data = [bytes([i]) * 1300 for i in range(5)]
        self.assertEqual(self.send_all(data), [False, True, True, True, True])
        self.assertEqual(self.kinds(), ["sendto"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # one flush a pass
        self.clock.advance(0)
        self.assertEqual(self.sock.sent[1], ("sendmsg", b"".join(data[1:]), PEER, seg(1300)))  # type: ignore
        self.assertEqual(self.counts, {"gso_sends": 1})
        self.assertEqual(self.send_all(data[:1]), [False])  # a new pass: the first goes at once again

    def test_one_held_datagram_goes_as_a_plain_sendto(self) -> None:
        self.send_all([b"a" * 1000, b"b" * 1000])
        self.clock.advance(0)
        self.assertEqual(self.sock.sent, [("sendto", b"a" * 1000, PEER, 64),  # type: ignore[union-attr]
                                          ("sendto", b"b" * 1000, PEER, 64)])

    def test_another_endpoint_or_size_flushes_first(self) -> None:
        sent = [b"a" * 1000, b"b" * 1000, b"c" * 1000]
        self.send_all(sent)
        self.send_all([b"d" * 1000], OTHER)
        self.send_all([b"e" * 1200, b"f" * 1200, b"g" * 1200], OTHER)  # larger: a new batch
        self.clock.advance(0)
        self.assertEqual(self.kinds(), ["sendto", "sendmsg", "sendto", "sendto", "sendmsg"])
        self.assertEqual(self.sock.datagrams(),  # type: ignore[union-attr]
                         sent + [b"d" * 1000, b"e" * 1200, b"f" * 1200, b"g" * 1200])

    def test_a_shorter_datagram_ends_the_batch(self) -> None:
        self.send_all([b"a" * 1000, b"b" * 1000, b"c" * 1000, b"d" * 10])
        self.assertEqual(self.sock.sent[1], ("sendmsg", b"b" * 1000 + b"c" * 1000 + b"d" * 10,  # type: ignore
                                             PEER, seg(1000)))
        self.assertEqual(self.send_all([b"e" * 1000]), [False])
        self.clock.advance(0)
        self.assertEqual(self.sock.datagrams()[-1], b"e" * 1000)  # type: ignore[union-attr]

    def test_at_most_max_segments(self) -> None:
        data = [i.to_bytes(2, "big") * 50 for i in range(MAX_SEGMENTS + 3)]
        self.send_all(data)
        self.assertEqual(self.kinds(), ["sendto", "sendmsg", "sendto"])  # 1 + 64, then 1 opens the next
        self.assertEqual(len(self.sock.sent[1][1]), MAX_SEGMENTS * 100)  # type: ignore[union-attr]
        self.clock.advance(0)
        self.assertEqual(self.sock.datagrams(), data)  # type: ignore[union-attr]
        self.assertEqual(self.kinds(), ["sendto", "sendmsg", "sendto", "sendto"])

    def test_at_most_max_batch_bytes_and_none_lost_at_the_limit(self) -> None:
        data = [i.to_bytes(2, "big") * 700 for i in range(100)]
        self.send_all(data)
        self.clock.advance(0)
        self.assertEqual(self.sock.datagrams(), data)  # type: ignore[union-attr]
        full = MAX_BATCH_BYTES // 1400
        self.assertEqual([len(c[1]) // 1400 for c in self.sock.sent],  # type: ignore[union-attr]
                         [1, full, 1, full, 1, 100 - 3 - 2 * full])
        for call in self.sock.sent:  # type: ignore[union-attr]
            self.assertLessEqual(len(call[1]), MAX_BATCH_BYTES)

    def test_gso_refused_falls_back_and_stops_batching(self) -> None:
        for no in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT):
            self.setUp()
            self.sock.fail["sendmsg"] = [no]  # type: ignore[union-attr]
            data = [b"a" * 1000, b"b" * 1000, b"c" * 1000]
            self.send_all(data)
            self.clock.advance(0)
            self.assertEqual(self.kinds(), ["sendto"] * 3)
            self.assertEqual(self.sock.datagrams(), data)  # type: ignore[union-attr]
            self.assertFalse(self.batch.enabled)
            self.assertEqual(self.counts, {"gso_off": 1})
            self.assertEqual(self.send_all(data), [False] * 3)
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_shrunk_path_is_not_taken_for_missing_gso(self) -> None:
        # the path's MTU fell under the segment size: GSO says EINVAL, a plain send EMSGSIZE
        self.send_all([b"a" * 1000, b"b" * 1000, b"c" * 1000])
        self.sock.fail = {"sendmsg": [errno.EINVAL], "sendto": [errno.EMSGSIZE, errno.EMSGSIZE]}  # type: ignore
        self.clock.advance(0)
        self.assertTrue(self.batch.enabled)
        self.assertEqual(self.counts, {"too_big": 2})
        # the next ones to that endpoint are not held: their sender sends them and learns "too big"
        self.assertEqual(self.send_all([b"d" * 1000, b"e" * 1000]), [False, False])
        self.assertEqual(self.send_all([b"d" * 1000, b"e" * 1000], OTHER), [False, True])

    def test_too_big_closes_the_batch(self) -> None:
        self.send_all([b"a" * 1000, b"b" * 1000])
        self.batch.too_big(PEER)
        self.assertEqual(self.sock.datagrams(), [b"a" * 1000, b"b" * 1000])  # type: ignore[union-attr]
        self.assertFalse(self.batch.hold(b"c" * 1000, PEER))
        self.assertFalse(self.batch.hold(b"c" * 1000, PEER))

    def test_a_full_buffer_loses_the_batch_quietly(self) -> None:
        self.sock.fail["sendmsg"] = [errno.ENOBUFS, errno.ECONNREFUSED]  # type: ignore[union-attr]
        self.send_all([b"a" * 1000, b"b" * 1000, b"c" * 1000])
        self.clock.advance(0)
        self.assertEqual(self.counts, {"send_error": 1, "batch_lost": 1})
        self.assertTrue(self.batch.enabled)
        self.send_all([b"a" * 1000, b"b" * 1000, b"c" * 1000])
        self.clock.advance(0)
        self.assertEqual(self.counts, {"send_error": 1, "batch_lost": 1})

    def test_closed_socket(self) -> None:
        self.send_all([b"a" * 1000, b"b" * 1000, b"c" * 1000])
        self.sock = None
        self.clock.advance(0)
        self.assertEqual(self.counts, {"batch_closed": 1})

    def test_cancel_sends_what_is_held(self) -> None:
        self.send_all([b"a" * 1000, b"b" * 1000, b"c" * 1000])
        self.batch.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.sock.datagrams()), 3)  # type: ignore[union-attr]

    def test_remembered_endpoints_are_bounded(self) -> None:
        for port in range(1, udpbatch.GOOD_ENDPOINTS + 2):
            self.batch.accepted(("192.0.2.1", port), 1000)
        self.assertLessEqual(len(self.batch._good), udpbatch.GOOD_ENDPOINTS)


class SocketTransport(FakeDatagramTransport):
    """A datagram transport with a socket, writing as Twisted's port does."""

    def __init__(self, sock: FakeSocket) -> None:
        super().__init__()
        self.socket = sock

    def write(self, packet: bytes, addr: Any = FakeDatagramTransport.noAddr) -> None:
        try:
            self.socket.sendto(packet, addr)
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                raise MessageLengthError("message too long") from None
            raise


class ProtocolBatches(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sock = FakeSocket()
        self.protocol = NodeDatagramProtocol()
        self.protocol.makeConnection(SocketTransport(self.sock))
        self.assertEqual(self.protocol.batch(self.clock), (True, False))  # no udp.Port: no GRO

    def test_the_first_goes_at_once_the_rest_in_a_batch(self) -> None:
        data = [b"P" + bytes([i]) * 1299 for i in range(5)]
        for d in data:
            self.protocol.send(d, PEER)
        # the first ever to PEER (its size unknown), the first of the batch, then the batch
        self.assertEqual(self.sock.sent, [("sendto", data[0], PEER, 64), ("sendto", data[1], PEER, 64)])
        self.clock.advance(0)
        self.assertEqual(self.sock.sent[2], ("sendmsg", b"".join(data[2:]), PEER, seg(1300)))
        self.assertEqual(self.sock.datagrams(), data)

    def test_a_beacon_message_keeps_its_place(self) -> None:
        frames = [b"P" * 1300] * 3
        for d in frames:
            self.protocol.send(d, PEER)
        self.protocol.send(b"\x01beacon", PEER)
        self.protocol.send(b"\x01beacon", PEER)  # never held, even once its size is known
        self.protocol.send(frames[0], PEER)
        self.clock.advance(0)
        self.assertEqual(self.sock.datagrams(), frames + [b"\x01beacon"] * 2 + frames[:1])

    def test_a_ttl_limited_send_keeps_its_place_and_its_ttl(self) -> None:
        for _ in range(4):
            self.protocol.send(b"P" * 1300, PEER)
        self.protocol.send_limited(b"P" * 1300, PEER, 3)
        self.assertEqual([(c[0], c[-1]) for c in self.sock.sent],
                         [("sendto", 64), ("sendto", 64), ("sendmsg", seg(1300)), ("sendto", 3)])
        self.assertEqual(self.sock.options[(socket.IPPROTO_IP, socket.IP_TTL)], 64)

    def test_too_big_reaches_the_sender(self) -> None:
        for _ in range(4):
            self.protocol.send(b"P" * 1300, PEER)  # two at once, two held
        self.sock.fail["sendto"] = [errno.EMSGSIZE]
        self.assertRaises(DatagramTooBig, self.protocol.send, b"P" * 1400, PEER)  # a larger probe
        self.assertEqual(self.sock.datagrams(), [b"P" * 1300] * 4)  # the held ones went first
        self.assertEqual(self.protocol.counters, {"gso_sends": 1, "too_big": 1})

    def test_too_big_after_the_path_shrank(self) -> None:
        for _ in range(4):
            self.protocol.send(b"P" * 1300, PEER)
        self.sock.fail = {"sendmsg": [errno.EINVAL], "sendto": [errno.EMSGSIZE] * 3}
        self.clock.advance(0)
        self.assertEqual(self.protocol.counters.get("too_big"), 2)
        self.assertRaises(DatagramTooBig, self.protocol.send, b"P" * 1300, PEER)

    def test_stopping_sends_what_is_held(self) -> None:
        for _ in range(4):
            self.protocol.send(b"P" * 1300, PEER)
        self.assertEqual(len(self.sock.datagrams()), 2)
        self.protocol.doStop()
        self.assertEqual(len(self.sock.datagrams()), 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_gso_no_batching(self) -> None:
        sock = FakeSocket()
        sock.refuse_options.add((SOL_UDP, UDP_SEGMENT))
        protocol = NodeDatagramProtocol()
        protocol.makeConnection(SocketTransport(sock))
        self.assertEqual(protocol.batch(self.clock), (False, False))
        for _ in range(3):
            protocol.send(b"P" * 1300, PEER)
        self.assertEqual([c[0] for c in sock.sent], ["sendto"] * 3)

    def test_no_socket_no_batching(self) -> None:
        protocol = NodeDatagramProtocol()
        protocol.makeConnection(FakeDatagramTransport())
        self.assertEqual(protocol.batch(self.clock), (False, False))


def gro(size: int, length: int = 4) -> list[tuple[int, int, bytes]]:
    return [(SOL_UDP, UDP_GRO, size.to_bytes(length, "little", signed=True))]


class Codec(SynchronousTestCase):
    def test_gro_segment(self) -> None:
        self.assertEqual(gro_segment(gro(1330)), 1330)
        self.assertEqual(gro_segment(gro(1330, 2)), 1330)
        self.assertEqual(gro_segment([]), 0)
        self.assertEqual(gro_segment(gro(-5)), 0)
        self.assertEqual(gro_segment(gro(1330, 3)), 0)  # a cmsg of the wrong length
        self.assertEqual(gro_segment([(SOL_UDP, UDP_GRO, b"")]), 0)
        self.assertEqual(gro_segment([(socket.IPPROTO_IP, UDP_GRO, b"\x10\x00\x00\x00")]), 0)

    def test_split(self) -> None:
        self.assertEqual(split(b"aabbc", 2), [b"aa", b"bb", b"c"])  # not a multiple: the last shorter
        self.assertEqual(split(b"aabb", 2), [b"aa", b"bb"])
        self.assertEqual(split(b"aabb", 0), [b"aabb"])
        self.assertEqual(split(b"aabb", -1), [b"aabb"])
        self.assertEqual(split(b"aabb", 4), [b"aabb"])
        self.assertEqual(split(b"aabb", 9), [b"aabb"])


class ReadSocket:
    def __init__(self, reads: list[Any]) -> None:
        self.reads = reads
        self.calls = 0

    def recvmsg(self, size: int, ancsize: int) -> Any:
        self.calls += 1
        if not self.reads:
            raise BlockingIOError(errno.EAGAIN, "would block")
        item = self.reads.pop(0)
        if isinstance(item, OSError):
            raise item
        return item


class Receiver:
    def __init__(self, fail_on: Optional[bytes] = None) -> None:
        self.got: list[tuple[bytes, Any]] = []
        self.fail_on = fail_on
        self.refused = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.got.append((data, addr))
        if data == self.fail_on:
            raise ValueError("boom")

    def connectionRefused(self) -> None:
        self.refused += 1


class FakePort:
    def __init__(self, reads: list[Any], family: int = socket.AF_INET, fail_on: Optional[bytes] = None) -> None:
        self.socket = ReadSocket(reads)
        self.protocol = Receiver(fail_on)
        self.maxPacketSize = 65535
        self.maxThroughput = 256 * 1024
        self.addressFamily = family
        self._connectedAddr = None


ADDR = ("127.0.0.1", 5000)


class Reading(SynchronousTestCase):
    def read(self, reads: list[Any], **kw: Any) -> tuple[FakePort, dict[str, int]]:
        port = FakePort(reads, **kw)
        counts: dict[str, int] = {}
        GroReader(port, lambda n: counts.__setitem__(n, counts.get(n, 0) + 1)).doRead()
        return port, counts

    def test_a_coalesced_buffer_is_cut_into_its_datagrams(self) -> None:
        port, counts = self.read([(b"aabbc", gro(2), 0, ADDR), (b"plain", [], 0, ADDR)])
        self.assertEqual(port.protocol.got, [(b"aa", ADDR), (b"bb", ADDR), (b"c", ADDR), (b"plain", ADDR)])
        self.assertEqual(counts, {"gro_reads": 1})

    def test_hostile_cmsgs_give_one_datagram(self) -> None:
        port, _ = self.read([(b"aabb", gro(0), 0, ADDR), (b"ccdd", gro(2, 3), 0, ADDR),
                             (b"eeff", gro(-2), 0, ADDR), (b"", gro(2), 0, ADDR)])
        self.assertEqual([d for d, _ in port.protocol.got], [b"aabb", b"ccdd", b"eeff", b""])

    def test_truncated_buffer_loses_its_last_piece(self) -> None:
        port, counts = self.read([(b"aabbc", gro(2), socket.MSG_TRUNC, ADDR)])
        self.assertEqual([d for d, _ in port.protocol.got], [b"aa", b"bb"])
        self.assertEqual(counts, {"gro_reads": 1, "gro_truncated": 1})

    def test_the_byte_budget_is_kept(self) -> None:
        buf = b"x" * 65000
        port, _ = self.read([(buf, gro(1300), 0, ADDR)] * 10)
        self.assertEqual(port.socket.calls, 5)  # 4 x 65,000 < 256 KiB, the 5th reaches it
        self.assertEqual(len(port.protocol.got), 5 * 50)
        self.assertEqual(len(port.socket.reads), 5)

    def test_a_raising_protocol_does_not_stop_the_read(self) -> None:
        port, _ = self.read([(b"aabb", gro(2), 0, ADDR), (b"cc", [], 0, ADDR)], fail_on=b"aa")
        self.assertEqual([d for d, _ in port.protocol.got], [b"aa", b"bb", b"cc"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_errors(self) -> None:
        port, _ = self.read([OSError(errno.ECONNREFUSED, "refused")])
        self.assertEqual(port.protocol.refused, 0)  # not connected: nothing to tell
        self.assertRaises(OSError, self.read, [OSError(errno.EBADF, "bad")])

    def test_ipv6_address_is_host_and_port(self) -> None:
        port, _ = self.read([(b"a", [], 0, ("::1", 5000, 0, 0))], family=socket.AF_INET6)
        self.assertEqual(port.protocol.got, [(b"a", ("::1", 5000))])

    def test_enable_gro_only_on_a_udp_port(self) -> None:
        self.assertFalse(enable_gro(FakePort([]), lambda n: None))
        self.assertFalse(enable_gro(object(), lambda n: None))

    def test_enable_gro_refused(self) -> None:
        port = udp.Port(0, NodeDatagramProtocol(), "127.0.0.1")
        sock = FakeSocket()
        sock.refuse_options.add((SOL_UDP, UDP_GRO))
        port.socket = sock
        self.assertFalse(enable_gro(port, lambda n: None))
        self.assertNotIn("doRead", port.__dict__)
        port.socket = FakeSocket()
        self.assertTrue(enable_gro(port, lambda n: None))
        self.assertEqual(port.socket.options[(SOL_UDP, UDP_GRO)], 1)
        self.assertIn("doRead", port.__dict__)


class ListeningPort(SocketTransport):
    """What ``reactor.listenUDP`` gives ``TunnelPort``: a socket and a host."""

    def __init__(self, protocol: Any, sock: FakeSocket) -> None:
        super().__init__(sock)
        protocol.makeConnection(self)

    def getHost(self) -> Any:
        return type("Host", (), {"port": 4000})()


class ListeningReactor(Clock):
    def __init__(self, sock: FakeSocket) -> None:
        super().__init__()
        self.sock = sock

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any:
        return ListeningPort(protocol, self.sock)


class TheNodesSocket(SynchronousTestCase):
    def start(self, batching: bool) -> tuple[NodeDatagramProtocol, ListeningReactor]:
        from pilot.services.node import TunnelPort
        reactor = ListeningReactor(FakeSocket())
        protocol = NodeDatagramProtocol()
        TunnelPort(reactor, protocol, "127.0.0.1:0", self.mktemp(), batching).startService()
        return protocol, reactor

    def test_the_tunnel_port_batches(self) -> None:
        protocol, reactor = self.start(True)
        for _ in range(4):
            protocol.send(b"P" * 1300, PEER)
        reactor.advance(0)
        self.assertEqual([c[0] for c in reactor.sock.sent], ["sendto", "sendto", "sendmsg"])

    def test_the_tunnel_port_without_batches(self) -> None:
        protocol, reactor = self.start(False)
        for _ in range(3):
            protocol.send(b"P" * 1300, PEER)
        reactor.advance(0)
        self.assertEqual([c[0] for c in reactor.sock.sent], ["sendto"] * 3)

    def test_the_environment_turns_it_off(self) -> None:
        from pilot.services.node import udp_batching
        self.assertTrue(udp_batching({}))
        self.assertTrue(udp_batching({"PILOT_UDP_BATCH": "1"}))
        self.assertFalse(udp_batching({"PILOT_UDP_BATCH": " 0 "}))
