# -*- test-case-name: tests.test_cli_stats -*-
"""
``pilotctl stats`` (the node's metrics in the terminal: the figures its
``--metrics`` endpoint serves, from the same ``info`` document,
``pilot.web.nodemetrics``) and ``pilotctl bench NAME [MB]`` (a stream of MB
mebibytes through the peer's echo service on port 7 and back, as the
reference's ``bench`` does; progress on stderr when it is a terminal).
"""

from __future__ import annotations

import argparse
import select
import socket
import time
from typing import Any

from pilot.cli import COMMANDS, Context, Result, arg
from pilot.cli_node import as_dict, ask, client, socket_option, target, timeout_option
from pilot.cli_progress import Progress, human_bytes, human_duration
from pilot.errors import ConnectionFailed, Timeout

#: The echo service's port (docs/reference-wire.md §7).
ECHO_PORT = 7
#: The most ``bench`` sends (MiB), and the default.
MAX_BENCH_MB = 1024
DEFAULT_BENCH_MB = 1.0
_CHUNK = 64 * 1024
#: Extra seconds for the daemon to open the stream.
DAEMON_MARGIN = 10.0
#: Seconds per MiB ``bench`` may take on top of --timeout.
SECONDS_PER_MIB = 2.0


@COMMANDS.command("stats", "show this node's metrics: peers by path, bytes, packets, drops, path MTU",
                  socket_option(),
                  epilog="The figures `pilotctl daemon start --metrics ADDR` serves as Prometheus\n"
                         "metrics (pilot_node_<name>), from the same counters; --json gives them\n"
                         "as {name: value} or {name: {label: value}}.  docs/operations.md says\n"
                         "what each means.")
def stats(ctx: Context) -> Result:
    from pilot.web.nodemetrics import figures  # prometheus_client only for this command
    values = figures(as_dict(ask(ctx, "info")))
    return Result(values, stats_text(values))


_LABELS = (("uptime_seconds", "Uptime"), ("registered", "Registered"), ("peers", "Peers by path"),
           ("tunnels", "Tunnels"), ("peer_received_bytes", "Received"), ("peer_sent_bytes", "Sent"),
           ("packets_received", "Packets in"), ("packets_sent", "Packets out"),
           ("datagrams_received", "Datagrams in"), ("datagrams_sent", "Datagrams out"),
           ("connections", "Connections"), ("retransmits", "Retransmits"), ("fast_retransmits", "Fast retx"),
           ("path_mtu_bytes", "Path MTU"), ("tunnel_events", "Tunnel"), ("path_events", "Path"),
           ("stack_events", "Stack"), ("udp_events", "UDP socket"), ("app_events", "Services"))


def _shown(name: str, value: Any) -> str:
    def one(v: float) -> str:
        if name.endswith("_bytes") and name != "path_mtu_bytes":
            return human_bytes(v)
        if name == "path_mtu_bytes":
            return f"{v:.0f} B"
        return f"{v:.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {one(v)}" for k, v in sorted(value.items())) or "-"
    if name == "uptime_seconds":
        return human_duration(value)
    if name == "registered":
        return "yes" if value else "no"
    return one(value)


def stats_text(values: dict[str, Any]) -> str:
    return "\n".join(f"{label + ':':<15} {_shown(name, values.get(name, 0))}" for name, label in _LABELS)


def megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of MiB: {text[:40]!r}") from None
    if not 0 < value <= MAX_BENCH_MB:
        raise argparse.ArgumentTypeError(f"between 0 and {MAX_BENCH_MB} MiB, not {text[:40]}")
    return value


@COMMANDS.command("bench", "measure throughput to a peer: MB through its echo service (port 7) and back",
                  arg("target", metavar="NAME|ADDR", type=target, help="hostname, address or node id"),
                  arg("mb", metavar="MB", nargs="?", type=megabytes, default=DEFAULT_BENCH_MB,
                      help=f"mebibytes to send (default {DEFAULT_BENCH_MB:g}, at most {MAX_BENCH_MB})"),
                  timeout_option(30.0, "seconds to wait, plus 2 s per MiB"), socket_option(),
                  epilog="Progress (rate, bytes, time left) shows on stderr when it is a terminal.\n"
                         "The result: bytes, seconds and bytes_per_second of the round trip.")
def bench(ctx: Context) -> Result:
    a = ctx.args
    total = int(a.mb * (1 << 20))
    wait = a.timeout + SECONDS_PER_MIB * a.mb
    c = client(ctx, wait + DAEMON_MARGIN)
    try:
        sock: socket.socket = c.open_stream(a.target, ECHO_PORT, timeout=wait + DAEMON_MARGIN)
    finally:
        c.close()
    progress = Progress(ctx.out.stderr, total, f"bench {a.target}")
    with sock:
        echoed = echo_through(sock, total, time.monotonic() + wait, progress)
    progress.finish()
    if echoed < total:
        raise Timeout(f"{a.target} echoed {echoed} of {total} bytes within {wait:g} s",
                      "raise --timeout, or send fewer MB")
    figures = progress.figures()
    data = {"target": a.target, "bytes": total, **figures}
    rate = figures["bytes_per_second"] or 0.0
    return Result(data, f"{human_bytes(total)} to {a.target} and back in {figures['seconds']:.2f} s: "
                        f"{human_bytes(rate)}/s ({rate * 8 / 1e6:.1f} Mbit/s)")


def echo_through(sock: socket.socket, total: int, deadline: float, progress: Progress) -> int:
    """Write ``total`` bytes while reading their echo; the bytes echoed by ``deadline``."""
    sock.setblocking(False)
    chunk = b"\x5a" * _CHUNK
    sent = echoed = 0
    while echoed < total:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        writers = [sock] if sent < total else []
        readable, writable, _ = select.select([sock], writers, [], min(left, 0.5))
        if writable:
            try:
                sent += sock.send(chunk[:min(_CHUNK, total - sent)])
            except BlockingIOError:
                pass
            except OSError as e:
                raise ConnectionFailed(f"the stream closed while sending: {e.strerror or e}",
                                       "check that the peer runs and trusts you") from None
        if readable:
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError as e:
                raise ConnectionFailed(f"the stream closed: {e.strerror or e}", "check the peer") from None
            if not data:
                raise ConnectionFailed(f"the peer closed the stream after echoing {echoed} bytes",
                                       "its echo service (port 7) may be off")
            echoed += len(data)
            progress.update(min(echoed, total))
    return echoed


__all__ = ["stats", "bench", "echo_through", "stats_text"]
