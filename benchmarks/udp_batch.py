#!/usr/bin/env python3
"""
The tunnel socket's own cost per datagram, with and without batches through
the kernel (UDP GSO on send, UDP GRO on receive; ``pilot.protocols.udpbatch``).

One process, two sockets on 127.0.0.1: ``NodeDatagramProtocol.send`` of
``--per-pass`` equal datagrams, then the end of the "pass" (a ``task.Clock``
at 0, where the batch leaves), then one ``doRead`` of the receiving socket
(Twisted's loop of ``recvfrom`` without GRO, :class:`GroReader` with it), for
``--rounds`` rounds, in both modes alternately.  Prints CPU microseconds per
datagram for each side, user and system (``getrusage``), and the total
(``process_time``): on loopback the sender's system time includes the
receiving kernel's work.  Figures the machine's load moves little, since
they are CPU time, not wall time; no tunnel, crypto or stack work is in them.

    python3 benchmarks/udp_batch.py
    python3 benchmarks/udp_batch.py --size 4166 --per-pass 15

Only 127.0.0.1; bounded by ``--rounds``.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402

from pilot.protocols.tunnel import NodeDatagramProtocol  # noqa: E402
from pilot.protocols.udpbatch import SOL_UDP, UDP_GRO, GroReader, gso_supported  # noqa: E402


class SocketTransport:
    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    def write(self, data: bytes, addr: Any) -> None:
        self.socket.sendto(data, addr)


class Sink:
    def __init__(self) -> None:
        self.count = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.count += 1


class Port:
    maxPacketSize = 65535
    maxThroughput = 256 * 1024
    addressFamily = socket.AF_INET
    _connectedAddr = None

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.protocol = Sink()


def usage() -> tuple[float, float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, time.process_time()


def run(batch: bool, size: int, per_pass: int, rounds: int) -> dict[str, float]:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender.bind(("127.0.0.1", 0))
        receiver.bind(("127.0.0.1", 0))
        receiver.setblocking(False)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        protocol, clock = NodeDatagramProtocol(), Clock()
        protocol.makeConnection(SocketTransport(sender))  # type: ignore[arg-type]
        port = Port(receiver)
        if batch:
            receiver.setsockopt(SOL_UDP, UDP_GRO, 1)
            protocol.batch(clock)
            read = GroReader(port, lambda name: None).doRead
        else:
            def read() -> None:  # Twisted's udp.Port.doRead, without its error handling
                got = 0
                while got < port.maxThroughput:
                    try:
                        data, addr = receiver.recvfrom(port.maxPacketSize)
                    except BlockingIOError:
                        return
                    got += len(data)
                    port.protocol.datagramReceived(data, addr)
        endpoint, data = receiver.getsockname(), b"P" * size
        send = [0.0, 0.0, 0.0]
        receive = [0.0, 0.0, 0.0]
        for _ in range(rounds):
            a = usage()
            for _ in range(per_pass):
                protocol.send(data, endpoint)
            clock.advance(0)
            b = usage()
            read()
            c = usage()
            for i in range(3):
                send[i] += b[i] - a[i]
                receive[i] += c[i] - b[i]
        n = per_pass * rounds
        if port.protocol.count != n:
            raise SystemExit(f"sent {n} datagrams, received {port.protocol.count}")
        us = 1e6 / n
        return {"send_user": send[0] * us, "send_sys": send[1] * us, "send": send[2] * us,
                "recv_user": receive[0] * us, "recv_sys": receive[1] * us, "recv": receive[2] * us,
                "gso_sends": protocol.counters.get("gso_sends", 0)}
    finally:
        sender.close()
        receiver.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1330, help="datagram bytes (1330: a 1,400-byte frame's segment)")
    p.add_argument("--per-pass", type=int, default=32, help="datagrams sent in one pass")
    p.add_argument("--rounds", type=int, default=1000, help="passes in each mode")
    p.add_argument("--repeat", type=int, default=3, help="runs of each mode, alternating")
    args = p.parse_args()
    if not (16 <= args.size <= 8000 and 1 <= args.per_pass <= 200 and 1 <= args.rounds <= 20000
            and 1 <= args.repeat <= 10):
        raise SystemExit("--size 16..8000, --per-pass 1..200, --rounds 1..20000, --repeat 1..10")
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    supported = gso_supported(probe)
    probe.close()
    if not supported:
        raise SystemExit("this kernel has no UDP GSO (UDP_SEGMENT)")
    print(f"{args.size}-byte datagrams, {args.per_pass} a pass, {args.rounds} passes a run; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("mode        send us/datagram (user+sys = cpu)   receive us/datagram (user+sys = cpu)  sendmsg calls")
    for _ in range(args.repeat):
        for batch in (False, True):
            r = run(batch, args.size, args.per_pass, args.rounds)
            print(f"{'GSO+GRO' if batch else 'one each':10}  {r['send_user']:5.2f} + {r['send_sys']:5.2f} = "
                  f"{r['send']:5.2f}               {r['recv_user']:5.2f} + {r['recv_sys']:5.2f} = {r['recv']:5.2f}"
                  f"              {int(r['gso_sends'])}")


if __name__ == "__main__":
    main()
