"""
Two nodes inside one program, no daemon: each an ``EmbeddedNode`` (its own
identity in its own folder) as a Twisted service.  The first asks the second
for trust, the second approves, then an echo runs between them on Pilot port
1000 through the nodes' endpoints.

    python3 examples/embedded_echo.py --registry HOST:PORT [--beacon HOST:PORT] HOME_A HOME_B
"""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet import defer, task
from twisted.internet.protocol import Factory, Protocol

from pilot.api import EmbeddedNode


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Ask(Protocol):
    def __init__(self) -> None:
        self.answer: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.answer.called:
            self.answer.callback(data)


async def until(reactor: Any, check: Any, what: str, timeout: float = 30.0) -> Any:
    """Poll ``check`` (a Deferred-returning callable) every 0.1 s until it gives something truthy."""
    for _ in range(int(timeout / 0.1)):
        value = await check()
        if value:
            return value
        await task.deferLater(reactor, 0.1, lambda: None)
    raise TimeoutError(f"gave up waiting for {what}")


async def run(reactor: Any, args: argparse.Namespace) -> None:
    options = {"registry": args.registry, "listen": "127.0.0.1:0"}
    if args.beacon:
        options["beacon"] = args.beacon
    a = EmbeddedNode(reactor, args.homes[0], hostname="embedded-a", **options)
    b = EmbeddedNode(reactor, args.homes[1], hostname="embedded-b", **options)
    for node in (a, b):
        node.startService()
    try:
        for node in (a, b):
            await until(reactor, lambda: node.api.info().addCallback(
                lambda info: info["registry"].get("state") == "registered"), "registration")
        print(f"a is {a.address}, b is {b.address}", flush=True)
        await a.api.handshake("embedded-b", "embedded example")
        a_id = a.address.node
        await until(reactor, lambda: b.api.pending().addCallback(
            lambda rows: any(r["node_id"] == a_id for r in rows)), "the trust request")
        await b.api.approve(a_id)
        await until(reactor, lambda: a.api.trusted().addCallback(
            lambda rows: any(r["node_id"] == b.address.node for r in rows)), "trust")
        port = await b.server_endpoint(1000).listen(Factory.forProtocol(Echo))
        proto = await a.client_endpoint("embedded-b", 1000).connect(Factory.forProtocol(Ask))
        proto.transport.write(b"hello from an embedded node")
        print(f"echoed: {await proto.answer!r}", flush=True)
        proto.transport.loseConnection()
        await port.stopListening()
    finally:
        await defer.gatherResults([defer.maybeDeferred(node.stopService) for node in (a, b)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", required=True)
    parser.add_argument("--beacon")
    parser.add_argument("homes", nargs=2)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
