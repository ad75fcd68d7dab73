# -*- test-case-name: tests.test_control_client -*-
"""
The control socket's client: what pilotctl (and scripts) use to talk to the
node daemon (``docs/control.md``; the server is ``pilot.protocols.control_server``).

Blocking sockets and no reactor: a pilotctl command lives for one request or
one stream.  ::

    client = ControlClient()                  # $PILOT_SOCKET, else $PILOT_HOME/pilot.sock
    client.call("info")                       # -> the result, or raises a PilotError
    sock = client.open_stream("sensor-1", 1000)        # a plain socket carrying the stream
    sock = client.open_stream("sensor-1", 7, first=b"ping")   # ... its first bytes sent with the request
    for event in client.subscribe("recv", deadline=time.monotonic() + 10, port=5000):
        ...
    sock = client.attach(event["conn_id"])    # an accepted stream, from a ``listen``

Errors are :class:`~pilot.errors.PilotError` subclasses: an error reply maps
through :func:`~pilot.errors.error_for`; no socket, or nobody behind it, is
:class:`~pilot.errors.NotRunning`; no reply in time is
:class:`~pilot.errors.Timeout`; a daemon that hangs up is
:class:`~pilot.errors.NotRunning` if it turns out to have stopped
(:func:`daemon_gone`), else :class:`~pilot.errors.ConnectionFailed` (it
refused this user, say).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from typing import Any, Iterator, Mapping

from pilot.errors import ConnectionFailed, ErrorCode, InvalidArgument, MalformedFrame, NotRunning, PilotError
from pilot.errors import Timeout, error_for
from pilot.identity import default_home
from pilot.wire.control import decode_message, frame_decoder
from pilot.wire.registry import MAX_FRAME, FrameDecoder, encode_frame

DEFAULT_TIMEOUT = 30.0
SOCKET_NAME = "pilot.sock"
START_HINT = "start the daemon with `pilotctl daemon start` (or point --socket / PILOT_SOCKET at its socket)"
_RECV = 65536
#: The most ``open_stream(first=...)`` sends behind the request: it fits the Unix socket's
#: buffer, so the write never waits for the daemon, which reads nothing more until the stream is open.
MAX_FIRST = 65536


def default_socket_path() -> str:
    """``$PILOT_SOCKET``, else ``$PILOT_HOME/pilot.sock`` (``PILOT_HOME`` defaults to ``~/.pilot``)."""
    return os.environ.get("PILOT_SOCKET") or os.path.join(default_home(), SOCKET_NAME)


class ControlClient:
    """
    Requests to the daemon over its control socket.

    :meth:`call` reuses one connection for any number of requests; each
    stream (:meth:`open_stream`, :meth:`attach`) and each subscription
    (:meth:`subscribe`) has a connection of its own.  ``timeout`` bounds
    connecting and each reply.
    """

    def __init__(self, socket_path: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._next_id = 1

    # --- requests ------------------------------------------------------------------------

    def call(self, cmd: str, /, **args: Any) -> Any:
        """Send ``cmd`` with ``args``; the reply's result, or the PilotError it carries."""
        return self.request(cmd, args)

    def request(self, cmd: str, args: Mapping[str, Any] | None = None, timeout: float | None = None) -> Any:
        """:meth:`call` with the arguments as a mapping and a timeout of its own (for ``ping``)."""
        deadline = _deadline(self.timeout if timeout is None else timeout)
        if self._sock is None:
            self._sock = self._connect(deadline)
        sock = self._sock
        try:
            request_id = self._send(sock, cmd, args or {}, deadline)
            reply = _read_frame(sock, deadline)
            return _result(reply, request_id)
        except _HungUp:
            self._drop()
            if daemon_gone(self.socket_path):
                raise _stopped() from None
            raise
        except PilotError as e:
            if isinstance(e, _LinkError):
                self._drop()
            raise
        except BaseException:
            self._drop()
            raise

    def open_stream(self, target: str, port: int, timeout: float | None = None,
                    first: bytes = b"") -> socket.socket:
        """
        A connected socket carrying the Pilot stream to ``target:port`` (raw
        bytes both ways).  ``first`` (at most :data:`MAX_FIRST` bytes) goes
        right behind the ``connect`` request, so the daemon writes it the
        moment the stream opens (it rides on the handshake's last ACK) and a
        request/response costs one round trip less through the control
        socket.  If the open fails, ``first`` was not delivered.
        """
        args, after = connect_request(target, port, first)
        return self._stream("connect", args, timeout, after)

    def attach(self, conn_id: int, timeout: float | None = None) -> socket.socket:
        """The socket for a stream a ``listen`` subscription announced (``conn_id``)."""
        return self._stream("attach", {"conn_id": conn_id}, timeout)

    def subscribe(self, cmd: str, /, deadline: float | None = None, **args: Any) -> Subscription:
        """
        Start ``listen`` or ``recv``; the :class:`Subscription` yields event
        dicts until ``deadline`` (a :func:`time.monotonic` value; None: no end).
        """
        reply_deadline = _deadline(self.timeout)
        sock = self._connect(reply_deadline)
        with self._closed_on_failure(sock):
            request_id = self._send(sock, cmd, args, reply_deadline)
            decoder = frame_decoder()
            while True:
                frame = _next_frame(sock, decoder, reply_deadline)
                if "event" not in frame:
                    break
            result = _result(frame, request_id)
        return Subscription(sock, decoder, result, deadline, self.socket_path)

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _closed_on_failure(self, sock: socket.socket) -> Iterator[None]:
        """A dedicated socket is closed when anything fails; a daemon gone mid-way is ``not_running``."""
        try:
            yield
        except _HungUp:
            sock.close()
            if daemon_gone(self.socket_path):
                raise _stopped() from None
            raise
        except BaseException:
            sock.close()
            raise

    def _stream(self, cmd: str, args: dict[str, Any], timeout: float | None,
                first: bytes = b"") -> socket.socket:
        deadline = _deadline(self.timeout if timeout is None else timeout)
        sock = self._connect(deadline)
        with self._closed_on_failure(sock):
            request_id = self._send(sock, cmd, args, deadline, first)
            # exact reads: every byte after the reply belongs to the stream
            _result(_read_frame(sock, deadline), request_id)
            sock.settimeout(None)
        return sock

    def _connect(self, deadline: float) -> socket.socket:
        path = self.socket_path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(path)
        except socket.timeout:
            sock.close()
            raise Timeout(f"the daemon did not accept a connection on {path} in time",
                          "the daemon may be overloaded or stuck; see its log") from None
        except (FileNotFoundError, NotADirectoryError):
            sock.close()
            raise NotRunning(f"the daemon is not running (no control socket at {path})", START_HINT) from None
        except ConnectionRefusedError:
            sock.close()
            raise NotRunning(f"the daemon is not running (nobody listens on the control socket {path}: "
                             "a daemon that stopped without cleaning up left it)",
                             START_HINT + "; `pilotctl daemon stop` removes the stale files") from None
        except PermissionError:
            sock.close()
            raise ConnectionFailed(f"permission denied on the control socket {path}",
                                   "the daemon belongs to another user; "
                                   "run as that user or set PILOT_HOME") from None
        except OSError as e:
            sock.close()
            if e.errno in (errno.ENAMETOOLONG, errno.EINVAL) or "too long" in str(e):
                raise InvalidArgument(f"control socket path is too long for a Unix socket: {path}",
                                      "use a shorter PILOT_HOME or --socket") from None
            raise ConnectionFailed(f"cannot connect to the control socket {path}: {e.strerror or e}",
                                   "check that the daemon runs: `pilotctl daemon status`") from None
        return sock

    def _send(self, sock: socket.socket, cmd: str, args: Mapping[str, Any], deadline: float,
              after: bytes = b"") -> int:
        """Send one request frame, and ``after`` (a stream's first bytes) in the same write."""
        request_id = self._next_id
        self._next_id += 1
        message = {**args, "id": request_id, "cmd": cmd}
        try:
            frame = encode_frame(message)
        except ValueError:
            raise InvalidArgument(f"the request is larger than the control socket's {MAX_FRAME}-byte limit",
                                  "send less data at once") from None
        except TypeError as e:
            raise InvalidArgument(f"an argument cannot be sent: {e}") from None
        try:
            sock.settimeout(_remaining(deadline))
            sock.sendall(frame + after if after else frame)
        except socket.timeout:
            raise _timeout() from None
        except OSError as e:
            raise _hung_up(e) from None
        return request_id

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


class Subscription:
    """
    The events of a ``listen`` or ``recv``: iterate (blocking until the next
    event; the iteration ends at the deadline), or, with your own
    :mod:`selectors` loop, register it (it has :meth:`fileno`) and call
    :meth:`read_events` when it is readable.  Closing it ends the
    subscription (the daemon unbinds the port).
    """

    def __init__(self, sock: socket.socket, decoder: FrameDecoder, result: Any,
                 deadline: float | None, socket_path: str | None = None) -> None:
        self.socket = sock
        self.result = result
        self.deadline = deadline
        self.socket_path = socket_path
        self._decoder = decoder
        self._events: list[dict[str, Any]] = []
        self._collect()

    def fileno(self) -> int:
        return self.socket.fileno()

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        while not self._events:
            if self.deadline is not None:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise StopIteration
            else:
                remaining = None
            if not self._receive(remaining):
                raise StopIteration
        return self._events.pop(0)

    @property
    def has_buffered(self) -> bool:
        """Events already read (a readiness loop will not hear about them)."""
        return bool(self._events)

    def take_buffered(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def read_events(self, timeout: float | None = 0.0) -> list[dict[str, Any]]:
        """Events that arrived, after at most one read waiting up to ``timeout`` seconds."""
        if not self._events:
            self._receive(timeout)
        events, self._events = self._events, []
        return events

    def _receive(self, timeout: float | None) -> bool:
        """One read; False if it timed out."""
        try:
            self.socket.settimeout(timeout)
            data = self.socket.recv(_RECV)
        except (socket.timeout, BlockingIOError):
            return False
        except OSError:
            data = b""
        if not data:
            if self.socket_path is not None and daemon_gone(self.socket_path):
                raise NotRunning("the daemon stopped", START_HINT)
            raise ConnectionFailed("the daemon closed the subscription", "see `pilotctl daemon status` and its log")
        self._decoder.receive(data)
        self._collect()
        return True

    def _collect(self) -> None:
        while True:
            try:
                frame = self._decoder.next_frame()
            except MalformedFrame as e:
                raise _malformed(e.reason) from None
            if frame is None:
                return
            if isinstance(frame, MalformedFrame):
                raise _malformed(frame.reason)
            if isinstance(frame.get("event"), str):
                self._events.append(frame)

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- frames and replies -----------------------------------------------------------------------

def connect_request(target: str, port: int,
                    first: bytes | bytearray | memoryview = b"") -> tuple[dict[str, Any], bytes]:
    """
    A ``connect`` request's arguments, and the stream's first bytes to send
    right behind its frame (``docs/control.md``); ``InvalidArgument`` if
    ``first`` is not bytes or exceeds :data:`MAX_FIRST`.
    """
    if not isinstance(first, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"first must be bytes, not {type(first).__name__}")
    if len(first) > MAX_FIRST:
        raise InvalidArgument(f"first is {len(first)} bytes, more than {MAX_FIRST}",
                              "write the rest once the stream is open")
    args: dict[str, Any] = {"target": target, "port": port}
    if first:
        args["first"] = len(first)
    return args, bytes(first)


def _deadline(timeout: float) -> float:
    return time.monotonic() + timeout


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _timeout()
    return remaining


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        try:
            sock.settimeout(_remaining(deadline))
            data = sock.recv(n - len(chunks))
        except socket.timeout:
            raise _timeout() from None
        except OSError as e:
            raise _hung_up(e) from None
        if not data:
            raise _hung_up(None)
        chunks += data
    return bytes(chunks)


def _read_frame(sock: socket.socket, deadline: float) -> dict[str, Any]:
    """One frame, reading exactly its bytes and no more."""
    length = int.from_bytes(_recv_exact(sock, 4, deadline), "big")
    if length > MAX_FRAME:
        raise _malformed(f"reply frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    try:
        return decode_message(_recv_exact(sock, length, deadline))
    except MalformedFrame as e:
        raise _malformed(e.reason) from None


def _next_frame(sock: socket.socket, decoder: FrameDecoder, deadline: float) -> dict[str, Any]:
    while True:
        try:
            frame = decoder.next_frame()
        except MalformedFrame as e:
            raise _malformed(e.reason) from None
        if isinstance(frame, MalformedFrame):
            raise _malformed(frame.reason)
        if frame is not None:
            return frame
        try:
            sock.settimeout(_remaining(deadline))
            data = sock.recv(_RECV)
        except socket.timeout:
            raise _timeout() from None
        except OSError as e:
            raise _hung_up(e) from None
        if not data:
            raise _hung_up(None)
        decoder.receive(data)


def _result(reply: dict[str, Any], request_id: int) -> Any:
    if reply.get("id") != request_id and reply.get("id") is not None:
        raise _malformed(f"reply for request {reply.get('id')!r}, expected {request_id}")
    ok = reply.get("ok")
    if ok is True:
        return reply.get("result")
    error = reply.get("error")
    if ok is not False or not isinstance(error, dict):
        raise _malformed("reply has neither a result nor an error")
    code = error.get("code")
    message = error.get("message")
    hint = error.get("hint")
    if not isinstance(code, (str, int)) or isinstance(code, bool):
        raise _malformed("error reply has no code")
    raise error_for(code, message if isinstance(message, str) else "the daemon reported an error",
                    hint if isinstance(hint, str) and hint else None)


class _LinkError:
    """Marks an error of the connection itself (not an error reply): the connection is out of step."""


class _NoAnswer(Timeout, _LinkError):
    pass


class _HungUp(ConnectionFailed, _LinkError):
    pass


class _BadReply(PilotError, _LinkError):
    code = ErrorCode.malformed


def _timeout() -> Timeout:
    return _NoAnswer("the daemon did not answer in time",
                     "the daemon may be busy or stuck; try again, raise --timeout, or see its log")


def _hung_up(e: OSError | None) -> ConnectionFailed:
    detail = f": {e.strerror or e}" if e is not None else ""
    return _HungUp(f"the daemon closed the control connection{detail}",
                   "the daemon may have refused this user; see `pilotctl daemon status` and its log")


def _malformed(reason: str) -> PilotError:
    return _BadReply(f"bad reply from the daemon: {reason}", "the daemon and pilotctl may be different versions")


def _stopped() -> NotRunning:
    return NotRunning("the daemon stopped before it answered", START_HINT)


def daemon_gone(path: str, attempts: int = 5) -> bool:
    """
    After the daemon hung up on us: is it gone (stopped, or stopping), rather
    than alive and refusing us?  A stopping daemon may still hold its socket
    for a moment and reset what it queued, so look a few times: no socket
    file, or nobody behind it, is "gone"; a connection it keeps open is
    "alive"; one it closes at once (refused, or dying) is looked at again.
    """
    for _ in range(attempts):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(0.5)
            probe.connect(path)
            probe.settimeout(0.1)
            probe.recv(1)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return True
        except socket.timeout:
            return False
        except OSError:
            pass  # reset: dying, or refusing
        finally:
            probe.close()
        time.sleep(0.05)
    return False
