# -*- test-case-name: tests.test_cli_traffic -*-
"""
pilotctl's traffic commands: ``ping``, streams (``connect``, ``listen``) and
datagrams (``send``, ``recv``), through the running daemon's control socket
(:mod:`pilot.control_client`, ``docs/control.md``).

The shared parts (argument types, :func:`~pilot.cli_node.client`, output
helpers) are in :mod:`pilot.cli_node`; the output is documented in
``docs/cli.md``.  Tests replace :data:`pilot.cli_node.make_client` (how a
command reaches the daemon) and :data:`stdin` (what ``connect`` without
``--message`` sends).
"""

from __future__ import annotations

import base64
import codecs
import selectors
import socket
import sys
import threading
import time
from typing import Any, BinaryIO, Callable

from pilot.cli import PROG, COMMANDS, Context, Result, arg
from pilot.cli_node import (as_dict, as_list, as_text, ask, client, is_number, port_number, positive_count,
                            shown_value, socket_option, target, timeout_option, write_line, write_note)
from pilot.errors import ConnectionFailed, InvalidArgument, NotFound, NotTrusted, Timeout

#: Where ``connect`` without ``--message`` reads what it sends.
stdin: Callable[[], BinaryIO] = lambda: sys.stdin.buffer

PING_INTERVAL = 1.0
MAX_PING_COUNT = 1000
#: Extra seconds the client waits for the daemon beyond the time the work itself may take.
DAEMON_MARGIN = 10.0
_RECV = 65536


# --- ping --------------------------------------------------------------------------------------------

@COMMANDS.command("ping", "check that a node answers (echo, port 7)",
                  arg("target", metavar="NAME|ADDR", type=target, help="hostname, address or node id"),
                  arg("--count", metavar="N", type=positive_count, default=4,
                      help="pings to send (default: 4)"),
                  timeout_option(5.0, "seconds to wait for each reply"), socket_option(),
                  epilog="One line per ping (seq=N time=T ms, or seq=N error: ...), then a summary.\n"
                         "Exit status 7 (timeout) when no ping was answered, 9 (not_trusted) when\n"
                         "the peer refused every ping because it does not trust this node.")
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
    d = as_dict(data)
    results = [as_dict(r) for r in as_list(d.get("results"))]
    rtts = [float(r["rtt_ms"]) for r in results if "error" not in r and is_number(r.get("rtt_ms"))]
    if not rtts:
        errors = [str(r["error"]) for r in results if r.get("error")]
        detail = f" ({errors[0]})" if errors else ""
        if errors and all(r.get("code") == "not_trusted" for r in results if r.get("error")):
            # every ping was refused on the echo port, which only a peer that does not trust us does
            raise NotTrusted(f"no reply from {a.target}{detail}",
                             "a node that just moved restores its trust within seconds; otherwise "
                             f"`{PROG} handshake {a.target}` and have it approved")
        raise Timeout(f"no reply from {a.target}{detail}",
                      f"check that the peer runs and trusts you, or raise --timeout (now {a.timeout:g} s)")
    shown = d.get("target")
    lines = [f"PING {a.target}" + (f" ({shown})" if shown and shown != a.target else "")]
    for r in results:
        if "error" in r:
            lines.append(f"seq={shown_value(r.get('seq'))} error: {r['error']}")
        elif is_number(r.get("rtt_ms")):
            lines.append(f"seq={shown_value(r.get('seq'))} time={float(r['rtt_ms']):.3f} ms")
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
                  timeout_option(30.0,
                                 "seconds to wait for the connection, and for the peer after all is sent"),
                  socket_option(),
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
    received = as_text(bytes(sink.kept))
    if not received and not ctx.json:
        write_note(ctx, f"sent {len(payload)} bytes (no response)")
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
    return Result({"sent": sent[0], "received": as_text(bytes(sink.kept))}, "")


@COMMANDS.command("listen", "accept streams on a port and print what they carry",
                  arg("port", metavar="PORT", type=port_number, help="the port (0-65535)"),
                  arg("--count", metavar="N", type=positive_count, default=None,
                      help="stop after N streams have ended (default: no limit)"),
                  timeout_option(None, "stop after this many seconds"), socket_option(),
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
                write_note(ctx, f"listening on port {a.port}")
            with _Listener(ctx, c, sub) as listener:
                listener.run(deadline)
                entries = listener.entries
    finally:
        c.close()
    if not entries:
        raise Timeout(f"no stream to port {a.port} within {a.timeout:g} s" if a.timeout is not None
                      else f"no stream to port {a.port}", "raise --timeout, or check the sender")
    data = [{"from": e["from"], "port": e["port"], "data": as_text(e["data"]), "bytes": len(e["data"])}
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
                write_note(self.ctx, f"stream {conn_id} from {event.get('from')} is gone: {e.message}")
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
                write_line(self.ctx, f"[{entry['from']}:{entry['port']}] {as_text(chunk)}")
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
                  socket_option())
def send(ctx: Context) -> Result:
    a = ctx.args
    payload = a.data.encode("utf-8", errors="surrogateescape")
    data = ask(ctx, "send", target=a.target, port=a.port, data=base64.b64encode(payload).decode("ascii"))
    sent = as_dict(data).get("sent", len(payload))
    return Result(data, f"sent {sent} bytes to {a.target} port {a.port}")


@COMMANDS.command("recv", "print the datagrams that arrive on a port",
                  arg("port", metavar="PORT", type=port_number, help="the port (0-65535)"),
                  arg("--count", metavar="N", type=positive_count, default=None,
                      help="stop after N datagrams (default: no limit)"),
                  timeout_option(None, "stop after this many seconds"), socket_option(),
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
            write_note(ctx, f"waiting for datagrams on port {a.port}")
        with sub:
            for event in sub:
                if event.get("event") != "datagram":
                    continue
                try:
                    payload = base64.b64decode(str(event.get("data", "")).encode("ascii"), validate=True)
                except (ValueError, UnicodeEncodeError):
                    continue
                entry = {"from": event.get("from"), "src_port": event.get("src_port"),
                         "data": as_text(payload), "bytes": len(payload)}
                entries.append(entry)
                if not ctx.json:
                    write_line(ctx, f"[{entry['from']}:{entry['src_port']}] {entry['data']}")
                if a.count is not None and len(entries) >= a.count:
                    break
    finally:
        c.close()
    if not entries:
        raise Timeout(f"no datagram to port {a.port} within {a.timeout:g} s" if a.timeout is not None
                      else f"no datagram to port {a.port}", "raise --timeout, or check the sender")
    return Result(entries, "")
