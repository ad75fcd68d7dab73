"""
A twisted.web site on a Pilot port, through the running daemon.

    python3 examples/web_server.py [--port 80] [--home DIR]

``GET /`` answers with a short page naming the asking node; ``GET /big?n=N``
with N bytes.  Nothing in the site knows it is not on TCP.
"""

from __future__ import annotations

import argparse

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class Page(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if request.path == b"/big":
            n = int(request.args.get(b"n", [b"1000"])[0])
            return bytes(i % 251 for i in range(n))
        return f"hello from Pilot, {request.getClientAddress()}\n".encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--home", help="the daemon's PILOT_HOME (default: $PILOT_HOME)")
    args = parser.parse_args()
    where = f"pilot:{args.port}" + (f":home={args.home}" if args.home else "")
    d = serverFromString(reactor, where).listen(Site(Page()))
    d.addCallback(lambda port: print(f"web site on {where}", flush=True))
    d.addErrback(lambda failure: (print(f"cannot listen: {failure.value}", flush=True), reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    main()
