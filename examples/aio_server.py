"""
An asyncio request/response service on a Pilot port, through the running daemon.

    python3 examples/aio_server.py [--port 1000] [--home DIR]

Each request is one line; the answer is one line: the request reversed, and
who asked.  ``pilot.aio.start_server`` hands each stream over as asyncio's
``(StreamReader, StreamWriter)``.
"""

from __future__ import annotations

import argparse
import asyncio

from pilot import aio


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while line := await reader.readline():
        writer.write(line.rstrip(b"\n")[::-1] + b"\n")
        await writer.drain()  # waits while the peer does not read
    writer.close()


async def main(args: argparse.Namespace) -> None:
    server = await aio.start_server(handle, args.port, home=args.home)
    print(f"aio server on Pilot port {args.port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--port", type=int, default=1000)
    parser.add_argument("--home", help="the daemon's PILOT_HOME (default: $PILOT_HOME)")
    asyncio.run(main(parser.parse_args()))
