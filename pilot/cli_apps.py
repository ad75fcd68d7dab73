# -*- test-case-name: tests.test_cli_apps -*-
"""
pilotctl's application commands (``docs/apps.md``, ``docs/cli.md``):
data exchange on port 1001 (``send-message``, ``send-file``, and ``inbox``,
``received`` reading what this node received), the event stream on port
1002 (``publish``, ``subscribe``), and ``connections``/``disconnect``.

The senders speak the wire themselves (``pilot.wire.dataexchange``,
``pilot.wire.events``) over a raw stream the daemon opens
(``ControlClient.open_stream``), as the reference's pilotctl does; ``inbox``
and ``received`` read ``$PILOT_HOME`` directly (no daemon needed).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from typing import Any

from pilot.apps.storage import INBOX, RECEIVED, Storage
from pilot.cli import COMMANDS, PROG, Context, Result, arg
from pilot.cli_node import (_table, as_dict, as_list, as_text, ask, client, node_id, positive_count,
                            socket_option, target, timeout_option, write_line, write_note)
from pilot.cli_progress import Progress
from pilot.errors import ConnectionFailed, InvalidArgument, MalformedFrame, NotFound, Timeout
from pilot.identity import default_home
from pilot.wire.dataexchange import (
    JSON, MAX_NAME, MAX_PAYLOAD, TYPES_BY_NAME, FrameDecoder, encode_frame, file_prefix,
)
from pilot.wire.packet import DATA_EXCHANGE as DATA_EXCHANGE_PORT, EVENT_STREAM as EVENT_STREAM_PORT
from pilot.wire.events import MAX_PAYLOAD as MAX_EVENT, Event, EventDecoder, check_topic, encode_event

#: Extra seconds for the daemon to open the stream, beyond the command's own time.
DAEMON_MARGIN = 10.0
#: Seconds per MiB a file transfer may take on top of --timeout.
SECONDS_PER_MIB = 2.0
_CHUNK = 64 * 1024
#: A reply is one short text frame.
MAX_REPLY = 64 * 1024


def _home() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("PILOT_HOME") or default_home()))


def _open(ctx: Context, port: int, timeout: float) -> socket.socket:
    c = client(ctx, timeout + DAEMON_MARGIN)
    try:
        sock: socket.socket = c.open_stream(ctx.args.target, port, timeout=timeout + DAEMON_MARGIN)
        return sock
    finally:
        c.close()


def _send(sock: socket.socket, data: bytes, what: str) -> None:
    try:
        sock.sendall(data)
    except OSError as e:
        raise ConnectionFailed(f"the stream closed while sending {what}: {e.strerror or e}",
                               "check that the peer runs and trusts you") from None


def _reply(ctx: Context, sock: socket.socket, timeout: float) -> str:
    """The peer's ACK or ERR text frame; ``ConnectionFailed`` for an ERR, ``Timeout`` for none."""
    decoder = FrameDecoder(MAX_REPLY)
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise Timeout(f"no reply from {ctx.args.target} port {DATA_EXCHANGE_PORT} within {timeout:g} s",
                          "raise --timeout, or check that the peer runs data exchange")
        sock.settimeout(left)
        try:
            data = sock.recv(_CHUNK)
        except socket.timeout:
            continue
        except OSError as e:
            raise ConnectionFailed(f"the stream closed before the reply: {e.strerror or e}") from None
        if not data:
            raise ConnectionFailed(f"{ctx.args.target} closed the stream without a reply",
                                   "the peer may not run data exchange on port 1001")
        try:
            frames = decoder.feed(data)
        except MalformedFrame as e:
            raise ConnectionFailed(f"the peer's reply is not a data exchange frame: {e}") from None
        if frames:
            text = as_text(frames[0].payload)
            if text.startswith("ERR "):
                raise ConnectionFailed(f"{ctx.args.target} could not save it: {text}",
                                       "the peer's disk may be full, or the frame too large for it")
            return text


def _acked_bytes(text: str) -> int | None:
    parts = text.split()
    if len(parts) == 4 and parts[0] == "ACK" and parts[3] == "bytes" and parts[2].isdigit():
        return int(parts[2])
    return None


# --- data exchange, port 1001 ----------------------------------------------------------------------

@COMMANDS.command("send-message", "send a text, JSON or binary message to a peer's inbox (port 1001)",
                  arg("target", metavar="NAME|ADDR", type=target, help="hostname, address or node id"),
                  arg("--data", metavar="TEXT", required=True, help="the message"),
                  arg("--type", choices=("text", "json", "binary"), default="text",
                      help="how the peer files it (default: text); json must parse"),
                  timeout_option(30.0, "seconds to wait for the peer's reply"), socket_option(),
                  epilog="Prints the peer's reply (ACK TEXT 5 bytes).  The message lands in the peer's\n"
                         "inbox ($PILOT_HOME/inbox/ on our nodes, ~/.pilot/inbox/ on the reference's).\n"
                         "An ERR reply exits 6 (connection_failed) with the peer's reason.")
def send_message(ctx: Context) -> Result:
    a = ctx.args
    payload = a.data.encode("utf-8", errors="surrogateescape")
    kind = TYPES_BY_NAME[a.type]
    if kind == JSON:
        try:
            json.loads(payload)
        except ValueError as e:
            raise InvalidArgument(f"--data is not JSON: {e}", "quote the JSON for the shell, or use --type text")
    if len(payload) > MAX_PAYLOAD:
        raise InvalidArgument(f"--data is {len(payload)} bytes; a message is at most {MAX_PAYLOAD}",
                              f"send it as a file with `{PROG} send-file`")
    with _open(ctx, DATA_EXCHANGE_PORT, a.timeout) as sock:
        _send(sock, encode_frame(kind, payload), "the message")
        reply = _reply(ctx, sock, a.timeout)
    return Result({"target": a.target, "type": a.type, "bytes": len(payload), "reply": reply,
                   "acked": _acked_bytes(reply) == len(payload)}, reply)


@COMMANDS.command("send-file", "send a file to a peer's received/ folder (port 1001)",
                  arg("target", metavar="NAME|ADDR", type=target, help="hostname, address or node id"),
                  arg("path", metavar="PATH", help="the file (at most 16 MiB, the reference's limit)"),
                  timeout_option(30.0, "seconds to wait for the reply, plus 2 s per MiB"), socket_option(),
                  epilog="The peer keeps the file's name (its last component) with a timestamp added:\n"
                         "received/report-20260101-120000.000.pdf.  Prints the peer's reply.")
def send_file(ctx: Context) -> Result:
    a = ctx.args
    name = os.path.basename(a.path)
    try:
        size = os.path.getsize(a.path)
        f = open(a.path, "rb")
    except FileNotFoundError:
        raise NotFound(f"no file {a.path}", "check the path") from None
    except OSError as e:
        raise InvalidArgument(f"cannot read {a.path}: {e.strerror or e}", "check the path and its permissions")
    raw_name = name.encode("utf-8", errors="surrogateescape")
    limit = MAX_PAYLOAD - 2 - len(raw_name)
    if size > limit or len(raw_name) > MAX_NAME:
        f.close()
        raise InvalidArgument(f"{a.path} is {size} bytes; a file frame holds at most {limit}",
                              "split it, or serve it with `pilotctl connect`/`listen`")
    wait = a.timeout + SECONDS_PER_MIB * size / (1 << 20)
    progress = Progress(ctx.out.stderr, size, f"{name} to {a.target}")
    with f, _open(ctx, DATA_EXCHANGE_PORT, wait) as sock:
        _send(sock, file_prefix(raw_name.decode("utf-8", errors="replace"), size), "the file")
        sent = 0
        while sent < size:
            chunk = f.read(min(_CHUNK, size - sent))
            if not chunk:
                raise InvalidArgument(f"{a.path} shrank while it was sent", "send it again")
            _send(sock, chunk, "the file")
            sent += len(chunk)
            progress.update(sent)
        reply = _reply(ctx, sock, wait)
    progress.finish()
    return Result({"target": a.target, "file": name, "bytes": size, "reply": reply,
                   "acked": _acked_bytes(reply) == size, **progress.figures()}, reply)


@COMMANDS.command("inbox", "list the messages peers sent this node (port 1001)",
                  arg("--clear", action="store_true", help="delete them all"),
                  epilog="Reads $PILOT_HOME/inbox/ (no daemon needed).")
def inbox(ctx: Context) -> Result:
    storage = Storage(_home())
    if ctx.args.clear:
        n = storage.clear(INBOX)
        return Result({"cleared": n, "dir": storage.inbox}, f"cleared {n} messages")
    messages = storage.messages()
    data = {"messages": messages, "total": len(messages), "dir": storage.inbox}
    if not messages:
        return Result(data, f"inbox is empty ({storage.inbox})")
    lines = [f"Inbox ({len(messages)} messages):"]
    for m in messages:
        if "error" in m:
            lines.append(f"  {m['file']}: unreadable ({m['error']})")
        else:
            lines.append(f"  [{m.get('received_at', '-')}] {m.get('type', '?')} from {m.get('from', '?')}: "
                         f"{str(m.get('data', ''))[:200]}")
    lines.append(f"clear with: {PROG} inbox --clear")
    return Result(data, "\n".join(lines))


@COMMANDS.command("received", "list the files peers sent this node (port 1001)",
                  arg("--clear", action="store_true", help="delete them all"),
                  epilog="Reads $PILOT_HOME/received/ (no daemon needed).")
def received(ctx: Context) -> Result:
    storage = Storage(_home())
    if ctx.args.clear:
        n = storage.clear(RECEIVED)
        return Result({"cleared": n, "dir": storage.received}, f"cleared {n} files")
    files = storage.files()
    data = {"files": files, "total": len(files), "dir": storage.received}
    if not files:
        return Result(data, f"no files received ({storage.received})")
    return Result(data, _table(["NAME", "BYTES", "MODIFIED"],
                               [[f["name"], f["bytes"], f["modified"]] for f in files]))


# --- event stream, port 1002 ----------------------------------------------------------------------

def _topic(text: str) -> str:
    problem = check_topic(text)
    if problem is not None:
        raise InvalidArgument(problem, "a topic is 1 to 1024 bytes of UTF-8; `*` subscribes to all")
    return text


@COMMANDS.command("publish", "publish an event to a peer's broker (port 1002)",
                  arg("target", metavar="NAME|ADDR", type=target, help="hostname, address or node id"),
                  arg("topic", metavar="TOPIC", help="the topic"),
                  arg("--data", metavar="MSG", required=True, help="the event's payload"),
                  timeout_option(30.0, "seconds to open the stream"), socket_option(),
                  epilog="Nothing is acknowledged (the reference's broker answers nothing): the command\n"
                         "succeeds once the event is handed to the stream.")
def publish(ctx: Context) -> Result:
    a = ctx.args
    topic = _topic(a.topic)
    payload = a.data.encode("utf-8", errors="surrogateescape")
    if len(payload) > MAX_EVENT:
        raise InvalidArgument(f"--data is {len(payload)} bytes; an event is at most {MAX_EVENT}")
    with _open(ctx, EVENT_STREAM_PORT, a.timeout) as sock:
        # the first event on a connection is its subscription (docs/reference-wire.md §8.2)
        _send(sock, encode_event(topic) + encode_event(topic, payload), "the event")
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    return Result({"target": a.target, "topic": topic, "bytes": len(payload)},
                  f"published {len(payload)} bytes to {topic!r} on {a.target}")


def _event_data(event: Event) -> dict[str, Any]:
    try:
        return {"topic": event.topic, "data": event.payload.decode("utf-8"), "bytes": len(event.payload)}
    except UnicodeDecodeError:
        return {"topic": event.topic, "data": base64.b64encode(event.payload).decode("ascii"),
                "encoding": "base64", "bytes": len(event.payload)}


@COMMANDS.command("subscribe", "print the events a peer's broker forwards on a topic (port 1002)",
                  arg("target", metavar="NAME|ADDR", type=target, help="hostname, address or node id"),
                  arg("topic", metavar="TOPIC", help="the topic, or * for every topic"),
                  arg("--count", metavar="N", type=positive_count, default=None,
                      help="stop after N events (default: run until --timeout or Ctrl-C)"),
                  timeout_option(None, "stop after this many seconds"), socket_option(),
                  epilog="One line per event ([topic] data); with --json one JSON object per line\n"
                         '({"topic": ..., "data": ..., "bytes": N}; "encoding": "base64" when the\n'
                         "payload is not UTF-8).  Exit 7 (timeout) when --count events did not come.")
def subscribe(ctx: Context) -> Result:
    a = ctx.args
    topic = _topic(a.topic)
    deadline = None if a.timeout is None else time.monotonic() + a.timeout
    got = 0
    decoder = EventDecoder()
    with _open(ctx, EVENT_STREAM_PORT, a.timeout or 30.0) as sock:
        _send(sock, encode_event(topic), "the subscription")
        if not ctx.json:
            write_note(ctx, f"subscribed to {topic!r} on {a.target}")
        while a.count is None or got < a.count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            sock.settimeout(left)
            try:
                data = sock.recv(_CHUNK)
            except socket.timeout:
                break
            except OSError as e:
                raise ConnectionFailed(f"the subscription ended: {e.strerror or e}") from None
            if not data:
                break
            try:
                items = decoder.feed(data)
            except MalformedFrame as e:
                raise ConnectionFailed(f"the broker sent a malformed event: {e}") from None
            for item in items:
                if not isinstance(item, Event):
                    continue
                entry = _event_data(item)
                write_line(ctx, json.dumps(entry, separators=(",", ":"), ensure_ascii=False) if ctx.json
                           else f"[{item.topic}] {as_text(item.payload)}")
                got += 1
                if a.count is not None and got >= a.count:
                    break
    if a.count is not None and got < a.count:
        raise Timeout(f"{got} of {a.count} events on {topic!r} came",
                      "raise --timeout, or check that someone publishes")
    return Result({"events": got}, "", streamed=True)


# --- connections ------------------------------------------------------------------------------------

@COMMANDS.command("connections", "list this node's stream connections", socket_option(),
                  epilog="The reference's conn_list fields; `disconnect ID` resets one.")
def connections(ctx: Context) -> Result:
    rows = [as_dict(r) for r in as_list(as_dict(ask(ctx, "info")).get("conn_list"))]
    if not rows:
        return Result(rows, "no connections")
    return Result(rows, _table(["ID", "LOCAL", "REMOTE", "STATE", "SENT", "RECV", "RTT"],
                               [[r.get("id"), r.get("local_port"),
                                 f"{r.get('remote_addr')}:{r.get('remote_port')}", r.get("state"),
                                 r.get("bytes_sent"), r.get("bytes_recv"), _ms(r.get("srtt_ms"))]
                                for r in rows]))


def _ms(value: object) -> str:
    """An RTT for the table: milliseconds to two decimals, "-" when unknown."""
    return f"{value:.2f} ms" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


@COMMANDS.command("disconnect", "reset one stream connection",
                  arg("id", metavar="ID", type=node_id, help="a connection id from `pilotctl connections`"),
                  socket_option())
def disconnect(ctx: Context) -> Result:
    data = ask(ctx, "disconnect", conn_id=ctx.args.id)
    return Result(data, f"connection {ctx.args.id} reset")

