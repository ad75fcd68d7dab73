# -*- test-case-name: tests.test_cli_forward -*-
"""
pilotctl's port forwarding (``docs/cli.md``): ``forward``, ``unforward``,
``expose``, ``unexpose`` and ``forward --list``.  The listeners and the
connections run in the daemon (:mod:`pilot.services.forward`), so each
command returns at once; they last until the daemon stops.
"""

from __future__ import annotations

import argparse
from typing import Any

from pilot.cli import PROG, COMMANDS, Context, Result, arg
from pilot.cli_node import as_dict, as_list, ask, port_number, socket_option, target
from pilot.errors import InvalidArgument


def destination(text: str) -> tuple[str, int]:
    """``NAME:PORT`` (the name may be an address, whose colons stay: the port is after the last one)."""
    name, colon, port = text.rpartition(":")
    if not colon or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:PORT, not {text[:60]!r}")
    return target(name), port_number(port)


def service(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of a TCP service (``[::1]:80`` for IPv6)."""
    host, colon, port = text.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or len(host) > 253:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text[:60]!r}")
    return host, port_number(port)


def _listing(ctx: Context) -> Result:
    data = as_dict(ask(ctx, "forwards"))
    lines = []
    for f in (as_dict(x) for x in as_list(data.get("forwards"))):
        lines.append(f"forward {f.get('local')} -> {f.get('target')}:{f.get('port')}  "
                     f"({f.get('active')} open, {f.get('total')} total, {f.get('failed')} failed)")
    for e in (as_dict(x) for x in as_list(data.get("exposed"))):
        lines.append(f"expose  pilot port {e.get('port')} -> {e.get('service')}  "
                     f"({e.get('active')} open, {e.get('total')} total, {e.get('failed')} failed)")
    return Result(data, "\n".join(lines) if lines else "no forwards and no exposed ports")


@COMMANDS.command("forward", "forward a local TCP port to a peer's Pilot port (as ssh -L)",
                  arg("local_port", metavar="LOCAL_PORT", type=port_number, nargs="?",
                      help="TCP port on 127.0.0.1 (0: any free one)"),
                  arg("destination", metavar="NAME:PORT", type=destination, nargs="?",
                      help="the peer (hostname, address or node id) and its Pilot port"),
                  arg("--list", action="store_true", help="list the forwards and exposed ports"),
                  socket_option(),
                  epilog="The daemon listens on 127.0.0.1:LOCAL_PORT; each TCP connection becomes a Pilot\n"
                         "stream to NAME:PORT (the peer must trust this node).  The command returns at once;\n"
                         f"`{PROG} unforward LOCAL_PORT` removes it.")
def forward(ctx: Context) -> Result:
    a = ctx.args
    if a.list:
        return _listing(ctx)
    if a.local_port is None or a.destination is None:
        raise InvalidArgument("forward needs LOCAL_PORT and NAME:PORT (or --list)",
                              f"e.g. `{PROG} forward 8080 agent-b:80`")
    name, port = a.destination
    if port == 0:
        raise InvalidArgument("Pilot port 0 cannot be forwarded to", "name a port from 1 to 65535")
    data = as_dict(ask(ctx, "forward", local_port=a.local_port, target=name, port=port))
    return Result(data, f"forwarding {data.get('local')} -> {name}:{port}")


@COMMANDS.command("unforward", "remove a forward (open connections carry on)",
                  arg("local_port", metavar="LOCAL_PORT", type=port_number), socket_option())
def unforward(ctx: Context) -> Result:
    data = as_dict(ask(ctx, "unforward", local_port=ctx.args.local_port))
    return Result(data, f"removed forward {data.get('local')} -> {data.get('target')}:{data.get('port')}")


@COMMANDS.command("expose", "connect streams arriving on a Pilot port to a local TCP service",
                  arg("port", metavar="PORT", type=port_number, nargs="?", help="the Pilot port"),
                  arg("service", metavar="HOST:PORT", type=service, nargs="?",
                      help="the TCP service, e.g. 127.0.0.1:8000"),
                  arg("--list", action="store_true", help="list the forwards and exposed ports"),
                  socket_option(),
                  epilog="Only trusted peers reach the port, as every Pilot port.  The command returns at\n"
                         f"once; `{PROG} unexpose PORT` removes it.")
def expose(ctx: Context) -> Result:
    a = ctx.args
    if a.list:
        return _listing(ctx)
    if a.port is None or a.service is None:
        raise InvalidArgument("expose needs PORT and HOST:PORT (or --list)",
                              f"e.g. `{PROG} expose 80 127.0.0.1:8000`")
    if a.port == 0:
        raise InvalidArgument("Pilot port 0 cannot be exposed", "name a port from 1 to 65535")
    host, host_port = a.service
    data = as_dict(ask(ctx, "expose", port=a.port, host=host, host_port=host_port))
    return Result(data, f"exposing pilot port {a.port} -> {data.get('service')}")


@COMMANDS.command("unexpose", "stop exposing a Pilot port (open connections carry on)",
                  arg("port", metavar="PORT", type=port_number), socket_option())
def unexpose(ctx: Context) -> Result:
    data: Any = as_dict(ask(ctx, "unexpose", port=ctx.args.port))
    return Result(data, f"removed pilot port {data.get('port')} -> {data.get('service')}")
