# -*- test-case-name: tests.test_cli_node -*-
"""
pilotctl's node commands: everything that asks the running daemon, over its
control socket (:mod:`pilot.control_client`, ``docs/control.md``).

This module holds what every node command shares (argument types, reaching
the daemon, output helpers) and the commands about this node, discovery and
trust; :mod:`pilot.cli_traffic` holds ``ping``, streams and datagrams.

Each command is one function registered in :data:`pilot.cli.COMMANDS`
(``pilot/cli.py`` imports both modules).  Arguments are checked before the
daemon is contacted (``invalid_argument``); each command takes ``--socket
PATH`` (default ``$PILOT_SOCKET``, else ``$PILOT_HOME/pilot.sock``) and
``--json``; none of them prompts.  The output is documented in ``docs/cli.md``.

Tests replace :data:`make_client` (how a command reaches the daemon).
"""

from __future__ import annotations

import argparse
import math
import re
import time
from typing import Any, Callable, Iterable, Optional

from pilot.address import Address
from pilot.cli import PROG, COMMANDS, Arg, Context, Result, arg
from pilot.control_client import DEFAULT_TIMEOUT, ControlClient
from pilot.errors import InvalidArgument, MalformedFrame
from pilot.names import hostname_problem, normalise_tags
from pilot.search import MAX_QUERY, shaped

#: How a command reaches the daemon: ``make_client(socket_path_or_None, timeout)``.
make_client: Callable[[str | None, float], Any] = ControlClient

_DIGITS = re.compile(r"[0-9]+")


# --- argument types (argparse turns ArgumentTypeError into invalid_argument) ---------------

def port_number(text: str) -> int:
    if _DIGITS.fullmatch(text) is None or int(text) > 0xFFFF:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 0 to 65535, not {text[:40]!r}")
    return int(text)


def positive_count(text: str) -> int:
    if _DIGITS.fullmatch(text) is None or not 0 < int(text) < 1 << 31:
        raise argparse.ArgumentTypeError(f"a count is a whole number above 0, not {text[:40]!r}")
    return int(text)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 86400 * 366):
        raise argparse.ArgumentTypeError(f"a timeout is a number of seconds above 0, not {text[:40]!r}")
    return value


def node_id(text: str) -> int:
    """A node id: decimal (``5``) or the node's address (``0:0000.0000.0005``)."""
    if _DIGITS.fullmatch(text) is not None and len(text) <= 10 and int(text) <= 0xFFFFFFFF:
        return int(text)
    try:
        return Address.parse(text).node
    except MalformedFrame:
        raise argparse.ArgumentTypeError(
            f"a node id is a number from 0 to 4294967295 (or an address), not {text[:40]!r}") from None


def target(text: str) -> str:
    """A peer: a hostname, an address (``0:0000.0000.0005``) or a decimal node id."""
    if _DIGITS.fullmatch(text) is not None:
        if len(text) > 10 or int(text) > 0xFFFFFFFF:
            raise argparse.ArgumentTypeError(f"node id out of range: {text[:40]!r}")
        return text
    if ":" in text:
        try:
            Address.parse(text)
        except MalformedFrame as e:
            raise argparse.ArgumentTypeError(e.reason) from None
        return text
    problem = hostname_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text[:64]!r} is not a hostname, address or node id: {problem}")
    return text


def hostname(text: str) -> str:
    problem = hostname_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text[:64]!r}: {problem}")
    return text


def socket_option() -> Arg:
    return arg("--socket", metavar="PATH", default=None,
               help="the daemon's control socket (default: $PILOT_SOCKET, else $PILOT_HOME/pilot.sock)")


def timeout_option(default: float | None, what: str) -> Arg:
    shown = f" (default: {default:g})" if default is not None else " (default: none)"
    return arg("--timeout", metavar="S", type=seconds, default=default, help=what + shown)


# --- reaching the daemon -------------------------------------------------------------------------

def client(ctx: Context, timeout: float = DEFAULT_TIMEOUT) -> Any:
    return make_client(ctx.args.socket, timeout)


def ask(ctx: Context, cmd: str, **args: Any) -> Any:
    """One request on a short-lived client."""
    c = client(ctx)
    try:
        return c.call(cmd, **args)
    finally:
        c.close()


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def shown_value(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    cells = [headers] + [[shown_value(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def when(value: Any) -> str:
    if not is_number(value):
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
    except (OverflowError, OSError, ValueError):
        return "-"


def as_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def write_line(ctx: Context, text: str) -> None:
    ctx.out.stdout.write(text if text.endswith("\n") else text + "\n")
    ctx.out.stdout.flush()


def write_note(ctx: Context, text: str) -> None:
    ctx.out.stderr.write(text + "\n")
    ctx.out.stderr.flush()


# --- this node -------------------------------------------------------------------------------------

@COMMANDS.command("info", "show this node: address, hostname, visibility, peers", socket_option(),
                  epilog="Example:\n  $ pilotctl info\n  Node ID:      5\n"
                         "  Address:      0:0000.0000.0005\n  ...")
def info(ctx: Context) -> Result:
    data = ask(ctx, "info")
    return Result(data, _info_text(as_dict(data)))


def _info_text(data: dict[str, Any]) -> str:
    uptime: Any = data.get("uptime_secs")
    if is_number(uptime) and uptime >= 0:
        u = int(uptime)
        uptime_text = f"{u // 3600:02d}:{u // 60 % 60:02d}:{u % 60:02d}"
    else:
        uptime_text = "-"
    public = data.get("public")
    rows = [("Node ID", data.get("node_id")), ("Address", data.get("address")),
            ("Hostname", data.get("hostname")),
            ("Visibility", None if public is None else "public" if public else "private"),
            ("Public key", data.get("public_key")), ("Endpoint", data.get("endpoint")),
            ("NAT", data.get("nat")),
            ("Registry", _registry_text(data.get("registry"))), ("Uptime", uptime_text),
            ("Peers", data.get("peers")), ("Connections", data.get("connections"))]
    lines = [f"{name + ':':<13} {shown_value(value)}" for name, value in rows]
    paths = [as_dict(p) for p in as_list(data.get("peer_list")) if is_number(as_dict(p).get("mtu"))]
    if paths:
        lines.append("Path MTU:")
        lines += [f"  {shown_value(p.get('address'))}: {p.get('mtu')} B datagrams, {p.get('mss')} B segments"
                  f" ({shown_value(p.get('mtu_state'))})" for p in paths]
    counters = _flatten(data.get("counters"))
    if counters:
        lines.append("Counters:")
        lines += [f"  {key}: {shown_value(value)}" for key, value in counters]
    return "\n".join(lines)


def _registry_text(registry: Any) -> Any:
    """The registry's address, and its state when the daemon says (``rv:9000 (registered)``)."""
    if not isinstance(registry, dict):
        return registry
    server, state = registry.get("server"), registry.get("state")
    servers, term = registry.get("servers"), registry.get("term")
    if state and isinstance(servers, list) and len(servers) > 1 and isinstance(registry.get("server_index"), int):
        state = f"{state}, entry {registry['server_index'] + 1} of {len(servers)}"  # docs/registration.md
    if state and term is not None:
        state = f"{state}, term {term}"
    if server and state:
        return f"{server} ({state})"
    return server or state


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested counters as sorted ``(dotted.name, value)`` pairs."""
    if not isinstance(value, dict):
        return [(prefix, value)] if prefix else []
    out: list[tuple[str, Any]] = []
    for key in sorted(value, key=str):
        out += _flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
    return out


@COMMANDS.command("set-hostname", "give this node a hostname others can find it by",
                  arg("name", metavar="NAME", type=hostname,
                      help="1-63 lower-case letters, digits and '-'"), socket_option())
def set_hostname(ctx: Context) -> Result:
    data = ask(ctx, "set_hostname", hostname=ctx.args.name)
    return Result(data, f"hostname set: {as_dict(data).get('hostname', ctx.args.name)}")


@COMMANDS.command("clear-hostname", "remove this node's hostname", socket_option())
def clear_hostname(ctx: Context) -> Result:
    data = ask(ctx, "set_hostname", hostname="")
    return Result(data, "hostname cleared")


@COMMANDS.command("set-public", "let any node find this node's endpoint", socket_option())
def set_public(ctx: Context) -> Result:
    data = ask(ctx, "set_public", public=True)
    return Result(data, f"visibility: {as_dict(data).get('visibility', 'public')}")


@COMMANDS.command("set-private", "show this node's endpoint only to trusted peers", socket_option())
def set_private(ctx: Context) -> Result:
    data = ask(ctx, "set_public", public=False)
    return Result(data, f"visibility: {as_dict(data).get('visibility', 'private')}")


@COMMANDS.command("set-tags", "set this node's tags (replacing the old ones)",
                  arg("tags", metavar="TAG", nargs="+", help="1-32 lower-case letters, digits and '-'; "
                                                             "a leading '#' is dropped"),
                  socket_option())
def set_tags(ctx: Context) -> Result:
    try:
        tags = normalise_tags(ctx.args.tags)
    except ValueError as e:
        raise InvalidArgument(str(e), f"see `{PROG} set-tags --help`") from None
    data = ask(ctx, "set_tags", tags=tags)
    shown = as_list(as_dict(data).get("tags", tags))
    return Result(data, "tags set: " + " ".join(f"#{t}" for t in shown) if shown else "tags cleared")


# --- discovery -------------------------------------------------------------------------------------

@COMMANDS.command("find", "look a node up by hostname",
                  arg("name", metavar="NAME", type=hostname, help="the node's hostname"), socket_option(),
                  epilog="Prints NAME ADDRESS public|private ENDPOINT, for example:\n"
                         "  sensor-1 1:0001.0000.0001 public 203.0.113.50:4000\n"
                         "(the endpoint is '-' for a private node or when unknown).")
def find(ctx: Context) -> Result:
    data = ask(ctx, "find", hostname=ctx.args.name)
    d = as_dict(data)
    public = bool(d.get("public"))
    endpoint = d.get("endpoint") if public else None
    text = (f"{d.get('hostname') or ctx.args.name} {shown_value(d.get('address'))} "
            f"{'public' if public else 'private'} {shown_value(endpoint)}")
    return Result(data, text)


_PEERS_EPILOG = """\
Without --search: the nodes this node knows (met, trusted or pending).
With --search Q: the nodes on the rendezvous whose hostname, tag or address
contain Q (public nodes, and private nodes that trust this one; at most 100),
for example to enrol a fleet:

  for sensor in $(pilotctl --json peers --search "sensor" | jq -r '.[].hostname'); do
    pilotctl handshake "$sensor" "Automated fleet enrollment"
  done

With --json, a list of objects: hostname, address, node_id, public, tags.
When the registry cannot search (a reference registry, or none reachable),
the known peers are searched instead and a note on stderr says so."""


@COMMANDS.command("peers", "list the nodes this node knows, or search the network for nodes",
                  arg("--search", metavar="Q", default=None,
                      help="search the rendezvous for nodes whose hostname, tag or address contain Q"),
                  socket_option(), epilog=_PEERS_EPILOG)
def peers(ctx: Context) -> Result:
    search = ctx.args.search
    if search is not None:
        return _search(ctx, search)
    data = ask(ctx, "peers")
    rows = [as_dict(p) for p in as_list(data)]
    if not rows:
        return Result(data, "no peers")
    return Result(data, _table(["HOSTNAME", "ADDRESS", "NODE ID", "ENDPOINT", "PATH", "MTU"],
                               [[p.get("hostname"), p.get("address"), p.get("node_id"), p.get("endpoint"),
                                 _path_text(p), _mtu_text(p)] for p in rows]))


def _path_text(peer: dict[str, Any]) -> Optional[str]:
    """``relay (collision_recovering)``: the path, and why a relayed pair is relayed (docs/nat.md)."""
    path, reason = peer.get("path"), peer.get("path_reason")
    if path is None:
        return None
    return f"{path} ({reason})" if reason else str(path)


def _mtu_text(peer: dict[str, Any]) -> Any:
    """``1472`` once the path search is over, ``1252 searching`` while it runs, None unknown."""
    mtu, state = peer.get("mtu"), peer.get("mtu_state")
    if not is_number(mtu):
        return None
    return f"{mtu} {state}" if state == "searching" else mtu


def _search(ctx: Context, query: str) -> Result:
    if not query.strip() or len(query) > MAX_QUERY:
        raise InvalidArgument(f"--search takes 1 to {MAX_QUERY} characters", f"see `{PROG} peers --help`")
    try:
        answer = as_dict(ask(ctx, "search", query=query))
    except InvalidArgument as e:
        if "unknown command" not in e.message:
            raise
        # a daemon from before the registry search: the peers it knows are all it can search
        answer = {"nodes": ask(ctx, "peers", search=query), "source": "known peers",
                  "note": "this daemon cannot search the registry; only the peers it already knows were searched"}
    known_only = answer.get("source") != "registry"
    nodes = [shaped(as_dict(r), known_only) for r in as_list(answer.get("nodes"))]
    note = answer.get("note")
    if isinstance(note, str) and note:
        write_note(ctx, f"note: {note}")
    if not nodes:
        return Result(nodes, f"no nodes matching {query!r}")
    return Result(nodes, _table(["HOSTNAME", "ADDRESS", "NODE ID", "VISIBILITY", "TAGS"],
                                [[n["hostname"], n["address"], n["node_id"],
                                  None if n["public"] is None else "public" if n["public"] else "private",
                                  " ".join(f"#{t}" for t in n["tags"])] for n in nodes]))


# --- trust -----------------------------------------------------------------------------------------

@COMMANDS.command("handshake", "ask a node to trust this one",
                  arg("target", metavar="NAME|ADDR", type=target, help="hostname, address or node id"),
                  arg("reason", metavar="REASON", nargs="?", default="",
                      help="why (shown to the peer's operator)"),
                  socket_option())
def handshake(ctx: Context) -> Result:
    if len(ctx.args.reason) > 1024:
        raise InvalidArgument("the reason is longer than 1024 characters", f"see `{PROG} handshake --help`")
    data = ask(ctx, "handshake", target=ctx.args.target, justification=ctx.args.reason)
    d = as_dict(data)
    who = d.get("node_id", ctx.args.target)
    if d.get("status") == "approved":
        text = f"trust established with node {who}"
    else:
        text = f"handshake request sent to node {who}; it must approve (or send a handshake back)"
    return Result(data, text)


@COMMANDS.command("pending", "list handshake requests waiting for approval", socket_option())
def pending(ctx: Context) -> Result:
    data = ask(ctx, "pending")
    rows = [as_dict(p) for p in as_list(data)]
    if not rows:
        return Result(data, "no pending handshake requests")
    return Result(data, _table(["NODE ID", "HOSTNAME", "JUSTIFICATION", "RECEIVED"],
                               [[p.get("node_id"), p.get("hostname"), p.get("justification"),
                                 when(p.get("received_at"))] for p in rows]))


@COMMANDS.command("approve", "approve a pending handshake request",
                  arg("node_id", metavar="NODE_ID", type=node_id, help="the requesting node's id"),
                  socket_option())
def approve(ctx: Context) -> Result:
    data = ask(ctx, "approve", node_id=ctx.args.node_id)
    return Result(data, f"trust established with node {ctx.args.node_id}")


@COMMANDS.command("reject", "reject a pending handshake request",
                  arg("node_id", metavar="NODE_ID", type=node_id, help="the requesting node's id"),
                  arg("reason", metavar="REASON", nargs="?", default="", help="why (sent to the peer)"),
                  socket_option())
def reject(ctx: Context) -> Result:
    if len(ctx.args.reason) > 1024:
        raise InvalidArgument("the reason is longer than 1024 characters", f"see `{PROG} reject --help`")
    data = ask(ctx, "reject", node_id=ctx.args.node_id, reason=ctx.args.reason)
    return Result(data, f"handshake from node {ctx.args.node_id} rejected")


@COMMANDS.command("trust", "list the nodes this node trusts", socket_option())
def trust(ctx: Context) -> Result:
    data = ask(ctx, "trust")
    rows = [as_dict(p) for p in as_list(data)]
    if not rows:
        return Result(data, "no trusted peers")
    return Result(data, _table(["NODE ID", "HOSTNAME", "MUTUAL", "APPROVED"],
                               [[p.get("node_id"), p.get("hostname"),
                                 "yes" if p.get("mutual") else "no", when(p.get("approved_at"))]
                                for p in rows]))


@COMMANDS.command("untrust", "stop trusting a node",
                  arg("node_id", metavar="NODE_ID", type=node_id, help="the node's id"), socket_option())
def untrust(ctx: Context) -> Result:
    data = ask(ctx, "untrust", node_id=ctx.args.node_id)
    return Result(data, f"trust revoked for node {ctx.args.node_id}")
