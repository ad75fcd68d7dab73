"""
An echo service on a Pilot port, through the running daemon (docs/api.md).

    python3 examples/echo_server.py [--port 1000] [--home DIR]

Any Twisted protocol runs unchanged on a ``pilot:`` endpoint string; this one
sends back what it receives.  Peers must be trusted (``pilotctl handshake``).
"""

from __future__ import annotations

import argparse

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--port", type=int, default=1000)
    parser.add_argument("--home", help="the daemon's PILOT_HOME (default: $PILOT_HOME)")
    args = parser.parse_args()
    where = f"pilot:{args.port}" + (f":home={args.home}" if args.home else "")
    d = serverFromString(reactor, where).listen(Factory.forProtocol(Echo))

    def listening(port: object) -> None:
        print(f"echo listening on {where}", flush=True)

    def failed(failure: object) -> None:
        print(f"cannot listen: {failure}", flush=True)
        reactor.stop()

    d.addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    main()
