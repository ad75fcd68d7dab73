"""
Fakes for the stack tests: a tunnel joining :class:`~pilot.stack.Stack`
objects on a ``task.Clock``, and protocols that record what they are told.

The tunnel routes by ``packet.dst.node`` (as the real tunnel layer does),
checks that a stack only sends packets from its own address (the real layer
authenticates the sender), and by default carries every packet as bytes
(``encode`` then ``decode``) so the tests see what the wire carries.  Loss
comes from a seeded ``random.Random``; ``down`` drops everything.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import attr
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from pilot.address import Address
from pilot.stack import Stack
from pilot.wire.packet import Packet

A, B, C = Address(0, 0x1111), Address(0, 0x2222), Address(0, 0x3333)


@attr.s(auto_attribs=True, eq=False)
class FakeTunnel:
    clock: Clock
    delay: float = 0.005
    loss: float = 0.0
    seed: int = 0
    encode: bool = True
    down: bool = False
    stacks: dict[int, Stack] = attr.ib(factory=dict)
    #: Every packet offered: (time, packet, delivered?).
    log: list[tuple[float, Packet, bool]] = attr.ib(factory=list)
    #: Return True to drop a packet.
    rules: list[Callable[[Packet], bool]] = attr.ib(factory=list)
    _random: random.Random = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def add(self, address: Address, trusted: set[int] | None = None, **kw: Any) -> Stack:
        """A stack at ``address`` that trusts the nodes in ``trusted`` (all, if None)."""
        trust = trusted

        def is_trusted(node: int) -> bool:
            return trust is None or node in trust

        stack = Stack(self.clock, lambda: address, self.sender(address), is_trusted, **kw)
        self.stacks[address.node] = stack
        return stack

    def sender(self, address: Address) -> Callable[[Packet], None]:
        def send(packet: Packet) -> None:
            assert packet.src.node == address.node, f"{address} sent a packet from {packet.src}"
            self.transmit(packet)

        return send

    def transmit(self, packet: Packet) -> None:
        dropped = self.down or any(rule(packet) for rule in self.rules)
        if not dropped and self.loss and self._random.random() < self.loss:
            dropped = True
        self.log.append((self.clock.seconds(), packet, not dropped))
        if not dropped:
            self.clock.callLater(self.delay, self._deliver, packet.encode() if self.encode else packet)

    def _deliver(self, data: bytes | Packet) -> None:
        packet = Packet.decode(data) if isinstance(data, bytes) else data
        stack = self.stacks.get(packet.dst.node)
        if stack is not None:
            stack.packet_received(packet)

    def sent(self, src: Address | None = None) -> list[Packet]:
        return [p for _, p, _ in self.log if src is None or p.src == src]


class Recorder(Protocol):
    """Records every callback; optional hooks run on connection and data."""

    transport: Any  # a StreamTransport once connected

    def __init__(self, on_made: Callable[["Recorder"], None] | None = None,
                 on_data: Callable[["Recorder", bytes], None] | None = None) -> None:
        self.made = 0
        self.data = bytearray()
        self.lost: list[Failure] = []
        self.on_made = on_made
        self.on_data = on_data

    def connectionMade(self) -> None:
        self.made += 1
        if self.on_made is not None:
            self.on_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.on_data is not None:
            self.on_data(self, data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost.append(reason)


class RecordingFactory(Factory):
    """Builds :class:`Recorder` protocols (``make`` overrides); keeps them and the addresses asked for."""

    def __init__(self, make: Callable[[], Recorder | None] = Recorder) -> None:
        self.make = make
        self.built: list[Recorder] = []
        self.addresses: list[object] = []
        self.started = 0
        self.stopped = 0

    def startFactory(self) -> None:
        self.started += 1

    def stopFactory(self) -> None:
        self.stopped += 1

    def buildProtocol(self, addr: object) -> Recorder | None:
        self.addresses.append(addr)
        protocol = self.make()
        if protocol is not None:
            protocol.factory = self
            self.built.append(protocol)
        return protocol
