"""
Send a line to an echo service over Pilot and print what comes back.

    python3 examples/echo_client.py TARGET TEXT [--port 1000] [--home DIR]

``TARGET`` is the peer's hostname, node id or address.  The connection is a
``pilot:TARGET:PORT`` endpoint string through the running daemon.
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory, Protocol

from pilot.errors import PilotError


class Collect(Protocol):
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.expected and not self.done.called:
            self.done.callback(self.received)
            self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        if not self.done.called:
            self.done.callback(self.received)


async def run(reactor: object, args: argparse.Namespace) -> None:
    text = args.text.encode()
    where = f"pilot:{args.target}:{args.port}" + (f":home={args.home}" if args.home else "")
    try:
        proto = await clientFromString(reactor, where).connect(Factory.forProtocol(lambda: Collect(len(text))))
    except PilotError as e:
        print(f"error: {e.message} ({e.code.name}); {e.hint}", file=sys.stderr)
        raise SystemExit(int(e.code))  # pilotctl's exit status for the same error
    proto.transport.write(text)
    print((await proto.done).decode(errors="replace"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("target")
    parser.add_argument("text")
    parser.add_argument("--port", type=int, default=1000)
    parser.add_argument("--home", help="the daemon's PILOT_HOME (default: $PILOT_HOME)")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
