"""
Publish/subscribe fan-out with pilot.aio: three subscribers on one topic of a
node's event stream (port 1002), one publisher, every subscriber gets every event.

    python3 examples/pubsub_fanout.py BROKER [--topic alerts] [--count 3] [--home DIR]

``BROKER`` is the node whose event stream carries the topic (it must trust us).
The broker is the event stream every node runs on port 1002 (issue 13, item 2).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from pilot import aio
from pilot.errors import PilotError


async def main(args: argparse.Namespace) -> int:
    try:
        subscriptions = [aio.subscribe(args.broker, args.topic, home=args.home) for _ in range(3)]
        for subscription in subscriptions:
            await subscription.start()  # the stream is open and the subscription sent
        await asyncio.sleep(0.5)  # the broker acknowledges nothing: give it time to read them
        for n in range(args.count):
            await aio.publish(args.broker, args.topic, f"event {n}", home=args.home)

        async def collect(name: str, subscription: aio.Subscription) -> list[str]:
            got = []
            async for event in subscription:
                got.append(f"{name}: {event.get('topic')} {event.get('data')}")
                if len(got) == args.count:
                    break
            await subscription.aclose()
            return got

        received = await asyncio.wait_for(asyncio.gather(
            *(collect(f"sub{i}", s) for i, s in enumerate(subscriptions))), 30)
    except PilotError as e:
        print(f"error: {e.message} ({e.code.name}); {e.hint}", file=sys.stderr)
        return int(e.code)
    for lines in received:
        for line in lines:
            print(line)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("broker")
    parser.add_argument("--topic", default="alerts")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--home", help="the daemon's PILOT_HOME (default: $PILOT_HOME)")
    sys.exit(asyncio.run(main(parser.parse_args())))
