"""
Tests for L{pilot.machines.tunnel.pmtu}: path MTU discovery by probes
(RFC 8899) on a task.Clock, with fake paths that drop datagrams above a
size, refuse them (EMSGSIZE), or shrink in the middle of a transfer.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

from automat import NoTransition
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.interfaces import DatagramTooBig
from pilot.machines.connection import ConnectionConfig
from pilot.machines.tunnel import pmtu
from pilot.services.node import max_datagram
from pilot.machines.tunnel.pmtu import (
    BASE, FRAME_OVERHEAD, MAX_PROBES, PROBE_TIMER, RAISE_TIMER, RELAY_OVERHEAD, SAFE_SEGMENT, MtuCore,
    PathMtu, PathMtus, path_mtu,
)
from pilot.wire import probe as pw
from pilot.wire.packet import Packet
from tests.machines.fakelink import FakeLink, make_pair, pattern, run_until
from tests.machines.test_tunnel import A_ADDR, B_ADDR, BEACON, Base, packet

RTT = 0.02
#: A sealed frame adds magic, sender id and nonce (20 bytes) and the tag (16) to the packet.
SEAL = 36


def datagram(p: Packet) -> int:
    return len(p.encode()) + SEAL


def tokens() -> Callable[[int], bytes]:
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "big")


class FakePath:
    """Carries probes no larger than ``limit`` (acked after RTT); ``refuse`` above it: EMSGSIZE."""

    def __init__(self, clock: Clock, limit: int, refuse: bool = False) -> None:
        self.clock = clock
        self.limit = limit
        self.refuse = refuse
        self.sent: list[int] = []
        self.sizes: list[int] = []
        self.machine: PathMtu | None = None

    def send_probe(self, token: bytes, size: int) -> bool:
        self.sent.append(size)
        if size > self.limit:
            return not self.refuse
        self.clock.callLater(RTT, lambda: self.machine.probe_acked(size))  # type: ignore[union-attr]
        return True

    def build(self, overhead: int = 0) -> tuple[PathMtu, MtuCore]:
        machine, core = path_mtu(self.clock, self.send_probe, self.sizes.append, tokens(), overhead)
        self.machine = machine
        return machine, core


class SearchTests(SynchronousTestCase):
    def search(self, limit: int, overhead: int = 0, refuse: bool = False) -> tuple[FakePath, MtuCore, Clock]:
        clock = Clock()
        path = FakePath(clock, limit, refuse)
        machine, core = path.build(overhead)
        machine.started()
        clock.advance(0)
        for _ in range(1000):
            if core.state == "complete":
                break
            clock.advance(0.01)
        self.assertEqual(core.state, "complete")
        return path, core, clock

    def test_starts_at_base(self) -> None:
        clock = Clock()
        _, core = FakePath(clock, 9000).build()
        self.assertEqual((core.plpmtu, core.mss), (BASE, BASE - FRAME_OVERHEAD))
        self.assertEqual(SAFE_SEGMENT, BASE - FRAME_OVERHEAD - RELAY_OVERHEAD)

    def test_1500_byte_link(self) -> None:
        path, core, _ = self.search(1472)
        self.assertEqual(core.plpmtu, 1472)
        self.assertEqual(core.mss, 1472 - 70)
        # the cap was tried MAX_PROBES times, then given up
        self.assertEqual(path.sent[-MAX_PROBES:], [4096 + 70] * MAX_PROBES)
        self.assertEqual(path.sizes[-1], 1402)

    def test_1280_byte_link(self) -> None:
        path, core, _ = self.search(1280 - 28)
        self.assertEqual(core.plpmtu, 1252)
        self.assertEqual(path.sent.count(1400), MAX_PROBES)

    def test_loopback_reaches_the_cap(self) -> None:
        _, core, _ = self.search(65507)
        self.assertEqual((core.plpmtu, core.mss), (4166, 4096))

    def test_relayed_path_counts_the_relay_header(self) -> None:
        _, core, _ = self.search(65507, overhead=RELAY_OVERHEAD)
        self.assertEqual((core.plpmtu, core.mss), (4175, 4096))
        _, core, _ = self.search(1472, overhead=RELAY_OVERHEAD)
        self.assertEqual(core.mss, 1472 - 70 - 9)

    def test_emsgsize_ends_the_search_at_once(self) -> None:
        path, core, clock = self.search(1452, refuse=True)
        self.assertEqual(core.plpmtu, 1452)
        self.assertEqual(path.sent.count(1464), 1)  # refused once: no waiting for timeouts
        self.assertEqual([c.getTime() - clock.seconds() for c in clock.getDelayedCalls()], [RAISE_TIMER])

    def test_nothing_acked_stays_at_base(self) -> None:
        """A reference peer ignores PILM (docs/reference-wire.md §4.1): three probes, then base."""
        path, core, clock = self.search(0)
        self.assertEqual(core.plpmtu, BASE)
        self.assertEqual(path.sent, [1232] * MAX_PROBES)
        self.assertEqual(path.sizes, [])
        self.assertLess(clock.seconds(), MAX_PROBES * PROBE_TIMER + 0.1)

    def test_black_hole_falls_back_then_searches_again(self) -> None:
        path, core, clock = self.search(65507)
        path.limit = 1400
        core.machine.black_hole_detected()
        self.assertEqual(path.sizes[-1], BASE - FRAME_OVERHEAD)
        for _ in range(200):
            clock.advance(0.01)
        self.assertEqual((core.state, core.plpmtu), ("complete", 1400))
        self.assertEqual(core.black_holes, 1)

    def test_raise_timer_looks_for_more(self) -> None:
        path, core, clock = self.search(1400)
        path.limit = 1472
        clock.advance(RAISE_TIMER)
        for _ in range(200):
            clock.advance(0.01)
        self.assertEqual(core.plpmtu, 1472)

    def test_late_ack_ignored_and_stray_timer_raises(self) -> None:
        _, core, _ = self.search(1472)
        core.machine.probe_acked(1472)
        self.assertEqual(core.state, "complete")
        self.assertRaises(NoTransition, core.machine.probe_timed_out)

    def test_max_datagram_bounds_the_search(self) -> None:
        clock = Clock()
        path = FakePath(clock, 65507)
        machine, core = path_mtu(clock, path.send_probe, path.sizes.append, tokens(), 0, max_datagram=1400)
        path.machine = machine
        machine.started()
        for _ in range(100):
            clock.advance(0.05)
        self.assertEqual((core.state, core.plpmtu, max(path.sent)), ("complete", 1400, 1400))
        self.assertEqual([max_datagram(e) for e in ({}, {"PILOT_MAX_DATAGRAM": "1400"},
                                                    {"PILOT_MAX_DATAGRAM": "x"})], [None, 1400, None])

    def test_table(self) -> None:
        rows = {(t.state, t.input, t.next) for t in pmtu.transitions()}
        self.assertIn(("complete", "black_hole_detected", "searching"), rows)
        self.assertIn(("searching", "search_finished", "complete"), rows)


def probe_filter(limit: list[int]) -> Callable[[Any, Any, bytes], list[bytes]]:
    return lambda src, dst, data: [data] if len(data) <= limit[0] else []


class TunnelProbeTests(Base):
    """Two tunnel layers: probes cross the fake network, sizes reach ``segment_size_changed``."""

    def setUp(self) -> None:
        super().setUp()
        self.sizes: list[tuple[int, int]] = []
        self.a.tunnels._segment_size_changed = lambda n, m: self.sizes.append((n, m))
        self.limit = [1472]
        self.net.impair = probe_filter(self.limit)

    def converge(self) -> None:
        for _ in range(100):
            self.net.run()
            self.clock.advance(0.05)

    def test_direct_path_discovered(self) -> None:
        self.establish()
        self.a.tunnels.send(packet(1, 2, seq=2), 2)
        self.converge()
        self.assertEqual(self.sizes[0], (2, BASE - FRAME_OVERHEAD))
        self.assertEqual(self.sizes[-1], (2, 1472 - FRAME_OVERHEAD))
        stats = self.a.tunnels.stats(2)
        assert stats is not None
        self.assertEqual((stats["mtu"], stats["mss"], stats["mtu_state"]), (1472, 1402, "complete"))
        self.assertEqual(self.b.tunnels.counters["mtu_probe_answered"], 6)  # 1232, 1252, 1400, ... 1472
        # no datagram larger than the path ever left after the search
        self.assertTrue(all(len(d) <= 4166 for _, _, d in self.net.sent))

    def test_relayed_path_is_searched_apart(self) -> None:
        self.establish()
        self.a.tunnels.send(packet(1, 2, seq=2), 2)
        self.converge()
        self.a.tunnels.set_path(2, None, relay=True)
        self.a.tunnels.send(packet(1, 2, seq=3), 2)
        self.assertEqual(self.sizes[-1], (2, BASE - FRAME_OVERHEAD - RELAY_OVERHEAD))
        self.converge()
        self.assertEqual(self.sizes[-1], (2, 1472 - FRAME_OVERHEAD - RELAY_OVERHEAD))
        relayed = [d for s, dst, d in self.net.sent if dst == BEACON and d[9:13] == pw.PILM]
        self.assertTrue(relayed)
        self.assertLessEqual(max(len(d) for d in relayed), 4175)
        self.a.tunnels.set_path(2, None, relay=False)
        self.a.tunnels.send(packet(1, 2, seq=4), 2)
        self.assertEqual(self.sizes[-1], (2, 1402))  # the direct path's size is remembered

    def test_probe_from_a_stranger_not_answered(self) -> None:
        probe = pw.MtuProbe(9, bytes(8), 1300, 1300).encode()
        self.b.tunnels.frame_received(probe, A_ADDR)
        self.b.tunnels.frame_received(b"PILM" + bytes(3), A_ADDR)
        self.assertEqual(self.b.tunnels.counters["mtu_probe_refused"], 1)
        self.assertEqual(self.b.tunnels.counters["malformed"], 1)
        self.assertEqual(self.net.sent, [])

    def test_forged_ack_ignored(self) -> None:
        self.establish()
        self.a.tunnels.send(packet(1, 2, seq=2), 2)
        self.a.tunnels.frame_received(pw.MtuProbeAck(2, b"x" * 8, 4166).encode(), B_ADDR)
        self.assertEqual(self.a.tunnels.counters["mtu_ack_unmatched"], 1)
        self.assertEqual(self.a.tunnels.stats(2)["mtu"], BASE)  # type: ignore[index]

    def test_emsgsize_on_data_falls_back(self) -> None:
        self.establish()
        self.a.tunnels.send(packet(1, 2, seq=2), 2)
        self.converge()
        real = self.a.tunnels._send_datagram

        def too_big(data: bytes, endpoint: Any) -> None:
            if len(data) > 1300:
                raise DatagramTooBig()
            real(data, endpoint)

        self.a.tunnels._send_datagram = too_big
        self.a.tunnels.send(packet(1, 2, seq=3, payload=b"x" * 1500), 2)  # larger than the path: dropped
        self.assertEqual(self.a.tunnels.counters["too_big"], 1)
        self.assertEqual(self.sizes[-1], (2, 1472 - FRAME_OVERHEAD))  # not a sign the path shrank
        self.a.tunnels.counters.clear()
        self.a.tunnels.send(packet(1, 2, seq=3, payload=b"x" * 1350), 2)  # fitted the path: it shrank
        self.assertEqual(self.a.tunnels.counters["too_big"], 1)
        self.assertEqual(self.sizes[-1], (2, BASE - FRAME_OVERHEAD))
        self.converge()
        self.assertEqual(self.sizes[-1], (2, 1252 - FRAME_OVERHEAD))


class StreamOverPathTests(SynchronousTestCase):
    """
    A stream pair on the fake link whose datagrams (packet + 70 bytes of
    sealed frame) are dropped above ``limit``, each side with a path search
    whose probes obey the same limit, wired as the node wires them.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.limit = 1280 - 28
        self.link = FakeLink(self.clock, delay=0.005)
        self.link.rules.append(lambda side, p: datagram(p) > self.limit)
        self.a, self.b, self.app_a, self.app_b = make_pair(self.clock, self.link, ConnectionConfig())
        self.a.set_segment_size(SAFE_SEGMENT)
        self.b.set_segment_size(SAFE_SEGMENT)
        self.mtus: dict[str, PathMtus] = {}
        for side, conn in (("a", self.a), ("b", self.b)):
            self.mtus[side] = self.searcher(side, conn)
            conn._core.path_trouble = (lambda s: lambda: self.mtus[s].path_trouble(0))(side)

    def searcher(self, side: str, conn: Any) -> PathMtus:
        counters: dict[str, int] = {}

        def send_frame(node: int, frame: bytes, relay: bool) -> bool:
            if len(frame) <= self.limit:
                probe = pw.decode(frame)
                self.clock.callLater(0.01, lambda: mtus.ack_received(0, probe.token, probe.size, False))
            return True

        mtus = PathMtus(clock=self.clock, send_frame=send_frame, own_id=lambda: 1,
                        segment_size_changed=lambda node, mss: conn.set_segment_size(mss),
                        random_bytes=tokens(), count=lambda n: counters.__setitem__(n, counters.get(n, 0) + 1))
        return mtus

    def largest_delivered(self, since: float = 0.0) -> int:
        return max(datagram(p) for t, _, p, ok in self.link.log if ok and t >= since)

    def transfer(self, size: int, during: Callable[[], None] | None = None) -> None:
        up = pattern(size, 3)
        self.a.open_active()
        for mtus in self.mtus.values():
            mtus.using(0, False)
        self.a.write(up)
        if during is not None:
            during()
        self.assertTrue(run_until(self.clock, lambda: len(self.app_b.data) >= size, 600),
                        f"stalled at {len(self.app_b.data)} of {size}")
        self.assertEqual(bytes(self.app_b.data), up)

    def test_1280_link_3000_byte_message(self) -> None:
        self.transfer(3000)
        self.assertLessEqual(self.largest_delivered(), self.limit)

    def test_1280_link_multi_mib_byte_exact(self) -> None:
        self.transfer(3 * 1024 * 1024)
        self.assertEqual(self.a.segment_size, 1252 - FRAME_OVERHEAD)
        dropped = [p for _, _, p, ok in self.link.log if not ok]
        self.assertEqual(dropped, [])  # no data datagram was ever too big for the path

    def test_path_shrinks_mid_transfer(self) -> None:
        self.limit = 65507
        size = 4 * 1024 * 1024

        def shrink() -> None:
            run_until(self.clock, lambda: self.a.segment_size == 4096, 1)
            run_until(self.clock, lambda: len(self.app_b.data) >= size // 4, 600)
            self.assertEqual(self.a.segment_size, 4096)
            self.assertLess(len(self.app_b.data), size // 2)
            self.shrunk_at = self.clock.seconds()
            self.limit = 1400

        self.transfer(size, shrink)
        self.assertEqual(self.a.segment_size, 1400 - FRAME_OVERHEAD)
        self.assertLessEqual(self.largest_delivered(self.shrunk_at), 1400)


class PacketSizeTests(SynchronousTestCase):
    def test_segment_plus_overhead_is_the_datagram(self) -> None:
        p = Packet(protocol=1, flags=2, src=A_ADDR_PKT, dst=A_ADDR_PKT, src_port=1, dst_port=2,
                   payload=b"x" * (1472 - FRAME_OVERHEAD))
        self.assertEqual(datagram(p), 1472)


from pilot.address import Address  # noqa: E402

A_ADDR_PKT = Address(0, 1)
