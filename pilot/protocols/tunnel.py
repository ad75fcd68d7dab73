# -*- test-case-name: tests.protocols.test_tunnel -*-
"""
The node's one UDP socket: beacon replies and tunnel frames, told apart by
their first byte (facts §4.1), handed to the node's logic.

Thin, as every protocol here: decode, call, never raise into the reactor.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from pilot.errors import MalformedFrame
from pilot.wire import beacon as bw
from pilot.wire.tunnel import PILP

Endpoint = tuple[str, int]
#: Punch probes sent on a punch command (the reference sends three).
PUNCH_PROBES = 3


class NodeDatagrams(Protocol):
    """What the socket feeds: the node service implements it."""

    def discovered(self, observed: Endpoint, source: Endpoint) -> None: ...
    def punch_commanded(self, peer: Endpoint) -> None: ...
    def frame_received(self, data: bytes, source: Endpoint, via_relay: bool) -> None: ...


class NodeDatagramProtocol(DatagramProtocol):
    log = Logger()

    def __init__(self, node: NodeDatagrams, is_beacon: Callable[[Endpoint], bool]) -> None:
        self.node = node
        self.is_beacon = is_beacon
        self.counters: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        source: Endpoint = (addr[0], addr[1])
        try:
            if data[:1] and data[0] < 0x10:
                self._beacon_message(data, source)
            else:
                self.node.frame_received(data, source, False)
        except Exception:
            self.log.failure("handling a datagram from {source}", source=source)

    def _beacon_message(self, data: bytes, source: Endpoint) -> None:
        if not self.is_beacon(source):
            self._count("beacon_not_from_beacon")  # only our beacon may steer us
            return
        try:
            message = bw.decode(data)
        except MalformedFrame:
            self._count("beacon_malformed")
            return
        if isinstance(message, bw.DiscoverReply):
            self.node.discovered((message.host, message.port), source)
        elif isinstance(message, bw.PunchCommand):
            self.node.punch_commanded((message.host, message.port))
        elif isinstance(message, bw.RelayDeliver):
            self.node.frame_received(message.frame, source, True)
        else:
            self._count("beacon_unexpected")

    def send(self, data: bytes, endpoint: Endpoint) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(data, endpoint)
        except OSError as e:
            # unreachable networks and full buffers are the network's business, not a crash
            self._count("send_error")
            self.log.debug("sending to {endpoint} failed: {error}", endpoint=endpoint, error=e)

    def punch(self, peer: Endpoint) -> None:
        for _ in range(PUNCH_PROBES):
            self.send(PILP, peer)
