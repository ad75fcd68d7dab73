# -*- test-case-name: tests.test_cli_node -*-
"""
pilotctl's node commands: everything that asks the running daemon, over its
control socket (``pilot.control_client``, ``docs/control.md``).

Each command is one function registered in :data:`pilot.cli.COMMANDS`
(``pilot/cli.py`` imports this module).  Arguments are checked before the
daemon is contacted (``invalid_argument``); each command takes ``--socket
PATH`` (default ``$PILOT_SOCKET``, else ``$PILOT_HOME/pilot.sock``) and
``--json``; none of them prompts.  The output is documented in ``docs/cli.md``.

Tests replace :data:`make_client` (how a command reaches the daemon) and
:data:`stdin` (what ``connect`` without ``--message`` sends).
"""

from __future__ import annotations

import argparse
import base64
import codecs
import math
import re
import selectors
import socket
import sys
import threading
import time
from typing import Any, BinaryIO, Callable, Iterable

from pilot.address import Address
from pilot.cli import PROG, COMMANDS, Arg, Context, Result, arg
from pilot.control_client import DEFAULT_TIMEOUT, ControlClient
from pilot.errors import ConnectionFailed, InvalidArgument, MalformedFrame, NotFound, Timeout
from pilot.names import hostname_problem, normalise_tags

#: How a command reaches the daemon: ``make_client(socket_path_or_None, timeout)``.
make_client: Callable[[str | None, float], Any] = ControlClient
#: Where ``connect`` without ``--message`` reads what it sends.
stdin: Callable[[], BinaryIO] = lambda: sys.stdin.buffer

PING_INTERVAL = 1.0
MAX_PING_COUNT = 1000
#: Extra seconds the client waits for the daemon beyond the time the work itself may take.
DAEMON_MARGIN = 10.0
_RECV = 65536
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


def _socket() -> Arg:
    return arg("--socket", metavar="PATH", default=None,
               help="the daemon's control socket (default: $PILOT_SOCKET, else $PILOT_HOME/pilot.sock)")


def _timeout(default: float | None, what: str) -> Arg:
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


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _shown(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    cells = [headers] + [[_shown(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _when(value: Any) -> str:
    if not _is_number(value):
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
    except (OverflowError, OSError, ValueError):
        return "-"


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _line(ctx: Context, text: str) -> None:
    ctx.out.stdout.write(text if text.endswith("\n") else text + "\n")
    ctx.out.stdout.flush()


def _note(ctx: Context, text: str) -> None:
    ctx.out.stderr.write(text + "\n")
    ctx.out.stderr.flush()


# --- this node -------------------------------------------------------------------------------------

@COMMANDS.command("info", "show this node: address, hostname, visibility, peers", _socket(),
                  epilog="Example:\n  $ pilotctl info\n  Node ID:      5\n"
                         "  Address:      0:0000.0000.0005\n  ...")
def info(ctx: Context) -> Result:
    data = ask(ctx, "info")
    return Result(data, _info_text(_as_dict(data)))


def _info_text(data: dict[str, Any]) -> str:
    uptime: Any = data.get("uptime_secs")
    if _is_number(uptime) and uptime >= 0:
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
    lines = [f"{name + ':':<13} {_shown(value)}" for name, value in rows]
    counters = _flatten(data.get("counters"))
    if counters:
        lines.append("Counters:")
        lines += [f"  {key}: {_shown(value)}" for key, value in counters]
    return "\n".join(lines)


def _registry_text(registry: Any) -> Any:
    """The registry's address, and its state when the daemon says (``rv:9000 (registered)``)."""
    if not isinstance(registry, dict):
        return registry
    server, state = registry.get("server"), registry.get("state")
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
                      help="1-63 lower-case letters, digits and '-'"), _socket())
def set_hostname(ctx: Context) -> Result:
    data = ask(ctx, "set_hostname", hostname=ctx.args.name)
    return Result(data, f"hostname set: {_as_dict(data).get('hostname', ctx.args.name)}")


@COMMANDS.command("clear-hostname", "remove this node's hostname", _socket())
def clear_hostname(ctx: Context) -> Result:
    data = ask(ctx, "set_hostname", hostname="")
    return Result(data, "hostname cleared")


@COMMANDS.command("set-public", "let any node find this node's endpoint", _socket())
def set_public(ctx: Context) -> Result:
    data = ask(ctx, "set_public", public=True)
    return Result(data, f"visibility: {_as_dict(data).get('visibility', 'public')}")


@COMMANDS.command("set-private", "show this node's endpoint only to trusted peers", _socket())
def set_private(ctx: Context) -> Result:
    data = ask(ctx, "set_public", public=False)
    return Result(data, f"visibility: {_as_dict(data).get('visibility', 'private')}")


@COMMANDS.command("set-tags", "set this node's tags (replacing the old ones)",
                  arg("tags", metavar="TAG", nargs="+", help="1-32 lower-case letters, digits and '-'; "
                                                             "a leading '#' is dropped"),
                  _socket())
def set_tags(ctx: Context) -> Result:
    try:
        tags = normalise_tags(ctx.args.tags)
    except ValueError as e:
        raise InvalidArgument(str(e), f"see `{PROG} set-tags --help`") from None
    data = ask(ctx, "set_tags", tags=tags)
    shown = _as_list(_as_dict(data).get("tags", tags))
    return Result(data, "tags set: " + " ".join(f"#{t}" for t in shown) if shown else "tags cleared")


# --- discovery -------------------------------------------------------------------------------------

@COMMANDS.command("find", "look a node up by hostname",
                  arg("name", metavar="NAME", type=hostname, help="the node's hostname"), _socket(),
                  epilog="Prints NAME ADDRESS public|private ENDPOINT, for example:\n"
                         "  sensor-1 1:0001.0000.0001 public 192.168.1.50:4000\n"
                         "(the endpoint is '-' for a private node or when unknown).")
def find(ctx: Context) -> Result:
    data = ask(ctx, "find", hostname=ctx.args.name)
    d = _as_dict(data)
    public = bool(d.get("public"))
    endpoint = d.get("endpoint") if public else None
    text = (f"{d.get('hostname') or ctx.args.name} {_shown(d.get('address'))} "
            f"{'public' if public else 'private'} {_shown(endpoint)}")
    return Result(data, text)


@COMMANDS.command("peers", "list the nodes this node knows",
                  arg("--search", metavar="Q", default=None, help="only peers whose hostname, address, "
                                                                  "node id or tags contain Q"),
                  _socket(),
                  epilog="With --json, a list of objects (hostname, address, node_id, ...):\n"
                         "  pilotctl --json peers --search sensor | jq -r '.[].hostname'")
def peers(ctx: Context) -> Result:
    search = ctx.args.search
    if search is not None and len(search) > 256:
        raise InvalidArgument("--search is longer than 256 characters", f"see `{PROG} peers --help`")
    data = ask(ctx, "peers", **({"search": search} if search else {}))
    rows = [_as_dict(p) for p in _as_list(data)]
    if not rows:
        text = f"no peers matching {search!r}" if search else "no peers"
    else:
        text = _table(["HOSTNAME", "ADDRESS", "NODE ID", "ENDPOINT"],
                      [[p.get("hostname"), p.get("address"), p.get("node_id"), p.get("endpoint")]
                       for p in rows])
    return Result(data, text)


# --- trust -----------------------------------------------------------------------------------------

@COMMANDS.command("handshake", "ask a node to trust this one",
                  arg("target", metavar="NAME|ADDR", type=target, help="hostname, address or node id"),
                  arg("reason", metavar="REASON", nargs="?", default="",
                      help="why (shown to the peer's operator)"),
                  _socket())
def handshake(ctx: Context) -> Result:
    if len(ctx.args.reason) > 1024:
        raise InvalidArgument("the reason is longer than 1024 characters", f"see `{PROG} handshake --help`")
    data = ask(ctx, "handshake", target=ctx.args.target, justification=ctx.args.reason)
    d = _as_dict(data)
    who = d.get("node_id", ctx.args.target)
    if d.get("status") == "approved":
        text = f"trust established with node {who}"
    else:
        text = f"handshake request sent to node {who}; it must approve (or send a handshake back)"
    return Result(data, text)


@COMMANDS.command("pending", "list handshake requests waiting for approval", _socket())
def pending(ctx: Context) -> Result:
    data = ask(ctx, "pending")
    rows = [_as_dict(p) for p in _as_list(data)]
    if not rows:
        return Result(data, "no pending handshake requests")
    return Result(data, _table(["NODE ID", "JUSTIFICATION", "RECEIVED"],
                               [[p.get("node_id"), p.get("justification"), _when(p.get("received_at"))]
                                for p in rows]))


@COMMANDS.command("approve", "approve a pending handshake request",
                  arg("node_id", metavar="NODE_ID", type=node_id, help="the requesting node's id"), _socket())
def approve(ctx: Context) -> Result:
    data = ask(ctx, "approve", node_id=ctx.args.node_id)
    return Result(data, f"trust established with node {ctx.args.node_id}")


@COMMANDS.command("reject", "reject a pending handshake request",
                  arg("node_id", metavar="NODE_ID", type=node_id, help="the requesting node's id"),
                  arg("reason", metavar="REASON", nargs="?", default="", help="why (sent to the peer)"),
                  _socket())
def reject(ctx: Context) -> Result:
    if len(ctx.args.reason) > 1024:
        raise InvalidArgument("the reason is longer than 1024 characters", f"see `{PROG} reject --help`")
    data = ask(ctx, "reject", node_id=ctx.args.node_id, reason=ctx.args.reason)
    return Result(data, f"handshake from node {ctx.args.node_id} rejected")


@COMMANDS.command("trust", "list the nodes this node trusts", _socket())
def trust(ctx: Context) -> Result:
    data = ask(ctx, "trust")
    rows = [_as_dict(p) for p in _as_list(data)]
    if not rows:
        return Result(data, "no trusted peers")
    return Result(data, _table(["NODE ID", "HOSTNAME", "MUTUAL", "APPROVED"],
                               [[p.get("node_id"), p.get("hostname"),
                                 "yes" if p.get("mutual") else "no", _when(p.get("approved_at"))]
                                for p in rows]))


@COMMANDS.command("untrust", "stop trusting a node",
                  arg("node_id", metavar="NODE_ID", type=node_id, help="the node's id"), _socket())
def untrust(ctx: Context) -> Result:
    data = ask(ctx, "untrust", node_id=ctx.args.node_id)
    return Result(data, f"trust revoked for node {ctx.args.node_id}")


# --- ping --------------------------------------------------------------------------------------------

@COMMANDS.command("ping", "check that a node answers (echo, port 7)",
                  arg("target", metavar="NAME|ADDR", type=target, help="hostname, address or node id"),
                  arg("--count", metavar="N", type=positive_count, default=4,
                      help="pings to send (default: 4)"),
                  _timeout(5.0, "seconds to wait for each reply"), _socket(),
                  epilog="One line per ping (seq=N time=T ms, or seq=N error: ...), then a summary.\n"
                         "Exit status 7 (timeout) when no ping was answered.")
def ping(ctx: Context) -> Result:
    a = ctx.args
    if a.count > MAX_PING_COUNT:
        raise InvalidArgument(f"--count is at most {MAX_PING_COUNT}", f"see `{PROG} ping --help`")
    wait = a.count * (a.timeout + PING_INTERVAL) + DAEMON_MARGIN
    c = client(ctx, wait)
    try:
        data = c.request("ping", {"target": a.target, "count": a.count, "timeout": a.timeout,
                                  "interval": PING_INTERVAL}, timeout=wait)
    finally:
        c.close()
    d = _as_dict(data)
    results = [_as_dict(r) for r in _as_list(d.get("results"))]
    rtts = [float(r["rtt_ms"]) for r in results if "error" not in r and _is_number(r.get("rtt_ms"))]
    if not rtts:
        errors = [str(r["error"]) for r in results if r.get("error")]
        detail = f" ({errors[0]})" if errors else ""
        raise Timeout(f"no reply from {a.target}{detail}",
                      f"check that the peer runs and trusts you, or raise --timeout (now {a.timeout:g} s)")
    shown = d.get("target")
    lines = [f"PING {a.target}" + (f" ({shown})" if shown and shown != a.target else "")]
    for r in results:
        if "error" in r:
            lines.append(f"seq={_shown(r.get('seq'))} error: {r['error']}")
        elif _is_number(r.get("rtt_ms")):
            lines.append(f"seq={_shown(r.get('seq'))} time={float(r['rtt_ms']):.3f} ms")
    sent = max(len(results), 1)
    loss = round(100 * (sent - len(rtts)) / sent)
    lines.append(f"--- {a.target} ping statistics ---")
    lines.append(f"{sent} sent, {len(rtts)} received, {loss}% loss"
                 + (", timed out" if d.get("timeout") else "")
                 + f", rtt min/avg/max = {min(rtts):.3f}/{sum(rtts) / len(rtts):.3f}/{max(rtts):.3f} ms")
    return Result(data, "\n".join(lines))


# --- streams -------------------------------------------------------------------------------------------

class _Sink:
    """Received bytes: to stdout as they come (people, raw), or kept (for --json)."""

    def __init__(self, ctx: Context, stream: bool) -> None:
        self.ctx = ctx
        self.stream = stream
        self.kept = bytearray()
        self.total = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, data: bytes) -> None:
        self.total += len(data)
        if not self.stream:
            self.kept += data
            return
        out = self.ctx.out.stdout
        binary = getattr(out, "buffer", None)
        if binary is not None:
            out.flush()
            binary.write(data)
            binary.flush()
        else:
            out.write(self._decoder.decode(data))
            out.flush()


def _read_until_closed(sock: socket.socket, sink: _Sink, deadline: Callable[[], float | None]) -> bool:
    """Read into ``sink`` until the peer closes (True) or ``deadline()`` passes (False)."""
    while True:
        end = deadline()
        remaining = None if end is None else end - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        try:
            sock.settimeout(0.25 if remaining is None else min(remaining, 0.25))  # deadline() may change
            data = sock.recv(_RECV)
        except socket.timeout:
            continue
        except OSError:
            return True  # reset: the stream is over
        if not data:
            return True
        sink.add(data)


@COMMANDS.command("connect", "open a stream to a node's port",
                  arg("target", metavar="NAME|ADDR", type=target, help="hostname, address or node id"),
                  arg("port", metavar="PORT", type=port_number, help="the port (0-65535)"),
                  arg("--message", metavar="MSG", default=None,
                      help="send MSG, then print the answer until the peer closes or the timeout"),
                  _timeout(30.0, "seconds to wait for the connection, and for the peer after all is sent"),
                  _socket(),
                  epilog="Without --message, stdin goes to the stream and the stream to stdout;\n"
                         "at the end of stdin the stream is closed once the peer closes or the\n"
                         "timeout passes.  With --json: {\"sent\": N, \"received\": \"...\"}.\n"
                         "Exit status 7 (timeout) when nothing came back before the timeout.")
def connect(ctx: Context) -> Result:
    a = ctx.args
    c = client(ctx, a.timeout + DAEMON_MARGIN)
    try:
        sock = c.open_stream(a.target, a.port, timeout=a.timeout + DAEMON_MARGIN)
    finally:
        c.close()
    with sock:
        if a.message is not None:
            return _connect_message(ctx, sock, a.message.encode("utf-8", errors="surrogateescape"))
        return _connect_pipe(ctx, sock)


def _connect_message(ctx: Context, sock: socket.socket, payload: bytes) -> Result:
    a = ctx.args
    sink = _Sink(ctx, stream=False)
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        raise ConnectionFailed(f"the stream to {a.target} port {a.port} closed while sending: "
                               f"{e.strerror or e}") from None
    end = time.monotonic() + a.timeout
    closed = _read_until_closed(sock, sink, lambda: end)
    if not closed and not sink.kept:
        raise Timeout(f"no answer from {a.target} port {a.port} within {a.timeout:g} s",
                      "raise --timeout, or check that the peer listens on that port")
    received = _text(bytes(sink.kept))
    if not received and not ctx.json:
        _note(ctx, f"sent {len(payload)} bytes (no response)")
    return Result({"sent": len(payload), "received": received}, received)


def _connect_pipe(ctx: Context, sock: socket.socket) -> Result:
    a = ctx.args
    source = stdin()
    sink = _Sink(ctx, stream=not ctx.json)
    sent = [0]
    eof_at: list[float] = []
    failure: list[BaseException] = []

    def pump() -> None:
        read = getattr(source, "read1", None) or source.read
        try:
            while True:
                chunk = read(_RECV)
                if not chunk:
                    break
                sock.sendall(chunk)
                sent[0] += len(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            failure.append(e)
        except Exception as e:  # the reader thread must not die silently
            failure.append(e)
        finally:
            eof_at.append(time.monotonic())

    writer = threading.Thread(target=pump, name="pilotctl-connect-stdin", daemon=True)
    writer.start()
    closed = _read_until_closed(sock, sink, lambda: eof_at[0] + a.timeout if eof_at else None)
    writer.join(0.5)
    if not closed and sink.total == 0:
        raise Timeout(f"no answer from {a.target} port {a.port} within {a.timeout:g} s of the end of input",
                      "raise --timeout, or check that the peer listens on that port")
    return Result({"sent": sent[0], "received": _text(bytes(sink.kept))}, "")


@COMMANDS.command("listen", "accept streams on a port and print what they carry",
                  arg("port", metavar="PORT", type=port_number, help="the port (0-65535)"),
                  arg("--count", metavar="N", type=positive_count, default=None,
                      help="stop after N streams have ended (default: no limit)"),
                  _timeout(None, "stop after this many seconds"), _socket(),
                  epilog="Each chunk is printed as '[ADDRESS:PORT] TEXT'.  With --json, one list at\n"
                         "the end: [{\"from\", \"port\", \"data\", \"bytes\"}, ...], one entry per stream\n"
                         "(give --count or --timeout).  Exit status 7 (timeout) when no stream came.")
def listen(ctx: Context) -> Result:
    a = ctx.args
    deadline = None if a.timeout is None else time.monotonic() + a.timeout
    c = client(ctx)
    try:
        with c.subscribe("listen", deadline, port=a.port) as sub:
            if not ctx.json:
                _note(ctx, f"listening on port {a.port}")
            with _Listener(ctx, c, sub) as listener:
                listener.run(deadline)
                entries = listener.entries
    finally:
        c.close()
    if not entries:
        raise Timeout(f"no stream to port {a.port} within {a.timeout:g} s" if a.timeout is not None
                      else f"no stream to port {a.port}", "raise --timeout, or check the sender")
    data = [{"from": e["from"], "port": e["port"], "data": _text(e["data"]), "bytes": len(e["data"])}
            for e in entries]
    return Result(data, "")


class _Listener:
    """``listen``'s loop: the subscription's accepted events, and the attached streams' bytes."""

    def __init__(self, ctx: Context, client: Any, subscription: Any) -> None:
        self.ctx = ctx
        self.count: int | None = ctx.args.count
        self.client = client
        self.subscription = subscription
        self.selector = selectors.DefaultSelector()
        self.selector.register(subscription, selectors.EVENT_READ, None)
        self.entries: list[dict[str, Any]] = []
        self.finished = 0

    def run(self, deadline: float | None) -> None:
        while self.count is None or self.finished < self.count:
            if self.subscription.has_buffered:
                self.accepted(self.subscription.take_buffered())
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            for key, _ in self.selector.select(remaining):
                if key.data is None:
                    self.accepted(self.subscription.read_events())
                else:
                    self.readable(key.fileobj, key.data)  # type: ignore[arg-type]

    def accepted(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            conn_id = event.get("conn_id")
            if event.get("event") != "accepted" or isinstance(conn_id, bool) or not isinstance(conn_id, int):
                continue
            if self.count is not None and len(self.entries) >= self.count:
                continue  # the daemon closes it when nobody attaches
            try:
                stream = self.client.attach(conn_id)
            except NotFound as e:  # expired, or taken by another client: not ours to wait for
                _note(self.ctx, f"stream {conn_id} from {event.get('from')} is gone: {e.message}")
                continue
            entry = {"from": event.get("from"), "port": event.get("port"), "data": b""}
            self.entries.append(entry)
            self.selector.register(stream, selectors.EVENT_READ, entry)

    def readable(self, stream: socket.socket, entry: dict[str, Any]) -> None:
        try:
            chunk = stream.recv(_RECV)
        except OSError:
            chunk = b""
        if chunk:
            entry["data"] += chunk
            if not self.ctx.json:
                _line(self.ctx, f"[{entry['from']}:{entry['port']}] {_text(chunk)}")
            return
        self.selector.unregister(stream)
        stream.close()
        self.finished += 1

    def __enter__(self) -> _Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        for key in list(self.selector.get_map().values()):
            if key.data is not None:
                key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()


# --- datagrams --------------------------------------------------------------------------------------

@COMMANDS.command("send", "send one datagram to a node's port",
                  arg("target", metavar="NAME|ADDR", type=target, help="hostname, address or node id"),
                  arg("port", metavar="PORT", type=port_number, help="the port (0-65535)"),
                  arg("--data", metavar="MSG", required=True, help="what to send (UTF-8 text)"),
                  _socket())
def send(ctx: Context) -> Result:
    a = ctx.args
    payload = a.data.encode("utf-8", errors="surrogateescape")
    data = ask(ctx, "send", target=a.target, port=a.port, data=base64.b64encode(payload).decode("ascii"))
    sent = _as_dict(data).get("sent", len(payload))
    return Result(data, f"sent {sent} bytes to {a.target} port {a.port}")


@COMMANDS.command("recv", "print the datagrams that arrive on a port",
                  arg("port", metavar="PORT", type=port_number, help="the port (0-65535)"),
                  arg("--count", metavar="N", type=positive_count, default=None,
                      help="stop after N datagrams (default: no limit)"),
                  _timeout(None, "stop after this many seconds"), _socket(),
                  epilog="Each datagram is printed as '[ADDRESS:PORT] TEXT'.  With --json, one list at\n"
                         "the end: [{\"from\", \"src_port\", \"data\", \"bytes\"}, ...] (give --count or\n"
                         "--timeout).  Exit status 7 (timeout) when no datagram came.")
def recv(ctx: Context) -> Result:
    a = ctx.args
    deadline = None if a.timeout is None else time.monotonic() + a.timeout
    c = client(ctx)
    entries: list[dict[str, Any]] = []
    try:
        sub = c.subscribe("recv", deadline, port=a.port)
        if not ctx.json:
            _note(ctx, f"waiting for datagrams on port {a.port}")
        with sub:
            for event in sub:
                if event.get("event") != "datagram":
                    continue
                try:
                    payload = base64.b64decode(str(event.get("data", "")).encode("ascii"), validate=True)
                except (ValueError, UnicodeEncodeError):
                    continue
                entry = {"from": event.get("from"), "src_port": event.get("src_port"),
                         "data": _text(payload), "bytes": len(payload)}
                entries.append(entry)
                if not ctx.json:
                    _line(ctx, f"[{entry['from']}:{entry['src_port']}] {entry['data']}")
                if a.count is not None and len(entries) >= a.count:
                    break
    finally:
        c.close()
    if not entries:
        raise Timeout(f"no datagram to port {a.port} within {a.timeout:g} s" if a.timeout is not None
                      else f"no datagram to port {a.port}", "raise --timeout, or check the sender")
    return Result(entries, "")


