"""
Ask an asyncio request/response service over Pilot, one line per request.

    python3 examples/aio_client.py TARGET LINE... [--port 1000] [--home DIR]

Errors are PilotError subclasses: the exit status is pilotctl's for the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from pilot import aio
from pilot.errors import PilotError


async def main(args: argparse.Namespace) -> int:
    try:
        reader, writer = await aio.open_connection(args.target, args.port, home=args.home)
    except PilotError as e:
        print(f"error: {e.message} ({e.code.name}); {e.hint}", file=sys.stderr)
        return int(e.code)
    for line in args.lines:
        writer.write(line.encode() + b"\n")
        await writer.drain()
        print((await reader.readline()).decode().rstrip("\n"))
    writer.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("target")
    parser.add_argument("lines", nargs="+")
    parser.add_argument("--port", type=int, default=1000)
    parser.add_argument("--home", help="the daemon's PILOT_HOME (default: $PILOT_HOME)")
    sys.exit(asyncio.run(main(parser.parse_args())))
