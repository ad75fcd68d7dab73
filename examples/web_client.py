"""
Fetch a page over Pilot with twisted.web's Agent.

    python3 examples/web_client.py http://TARGET:PORT/PATH [--home DIR] [--sha256]

The URL's host is a Pilot hostname (or node id); the Agent is given an
endpoint factory that turns it into a ``pilot:`` endpoint string.  The body
goes to stdout (or only its size and SHA-256 with ``--sha256``).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


@implementer(IAgentEndpointFactory)
class PilotEndpoints:
    def __init__(self, reactor: Any, home: str | None) -> None:
        self.reactor = reactor
        self.home = home

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        where = f"pilot:{uri.host.decode()}:{uri.port}" + (f":home={self.home}" if self.home else "")
        return clientFromString(self.reactor, where)


async def run(reactor: Any, args: argparse.Namespace) -> None:
    agent = Agent.usingEndpointFactory(reactor, PilotEndpoints(reactor, args.home))
    response = await agent.request(b"GET", args.url.encode())
    body = await readBody(response)
    if args.sha256:
        print(f"{response.code} {len(body)} {hashlib.sha256(body).hexdigest()}")
    else:
        sys.stdout.write(body.decode(errors="replace"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("url")
    parser.add_argument("--home", help="the daemon's PILOT_HOME (default: $PILOT_HOME)")
    parser.add_argument("--sha256", action="store_true", help="print the status, size and SHA-256 only")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
