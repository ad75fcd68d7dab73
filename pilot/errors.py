# -*- test-case-name: tests.test_errors -*-
"""
Error codes shared by the wire, the control API and pilotctl.

Every failure that crosses a boundary (a registry reply, the control socket,
pilotctl's exit status) carries one :class:`ErrorCode`.  The integer value is
stable: it is pilotctl's exit status for that code and is listed in
``docs/cli.md``.  The name is the string code on the wire
(``{"error": {"code": "not_found", ...}}``).

Local misuse and remote misbehaviour are kept apart (as h11 does):
:class:`MalformedFrame` is what a codec raises for bytes that came from
somewhere else; :class:`PilotError` is a failure reported to a caller.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    invalid_argument = 2
    not_found = 3
    not_running = 4
    already_exists = 5
    connection_failed = 6
    timeout = 7
    registry_unavailable = 8
    not_trusted = 9
    internal = 10
    unauthorized = 11
    rate_limited = 12
    malformed = 13
    permission_denied = 14
    not_primary = 15


#: What a user can do about each code, when the raiser has nothing better.
DEFAULT_HINTS: dict[ErrorCode, str] = {
    ErrorCode.invalid_argument: "check the command's arguments with --help",
    ErrorCode.not_found: "check the name or node id; `pilotctl peers` lists what is known",
    ErrorCode.not_running: "start the daemon with `pilotctl daemon start`",
    ErrorCode.already_exists: "pass --force to replace it",
    ErrorCode.connection_failed: "check that the peer is running and trusts you",
    ErrorCode.timeout: "the peer did not answer in time; try again or raise --timeout",
    ErrorCode.registry_unavailable: "the rendezvous cannot be reached; established tunnels keep working",
    ErrorCode.not_trusted: "run `pilotctl handshake PEER` and have the peer approve it",
    ErrorCode.internal: "this is a bug; the daemon log has the details",
    ErrorCode.unauthorized: "the request's signature did not verify for this node",
    ErrorCode.rate_limited: "too many requests; slow down and retry",
    ErrorCode.malformed: "the message could not be decoded",
    ErrorCode.permission_denied: "this user may not use that file or folder: fix its permissions or pick another",
    ErrorCode.not_primary: "this rendezvous is a standby; the node moves to the primary by itself",
}


class PilotError(Exception):
    """A failure with a stable code, a message and a hint for the user."""

    code: ErrorCode = ErrorCode.internal

    def __init__(self, message: str, hint: str | None = None, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.hint = hint if hint is not None else DEFAULT_HINTS[self.code]

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code.name, "message": self.message, "hint": self.hint}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}: {self.message!r})"


class InvalidArgument(PilotError):
    code = ErrorCode.invalid_argument


class NotFound(PilotError):
    code = ErrorCode.not_found


class NotRunning(PilotError):
    code = ErrorCode.not_running


class AlreadyExists(PilotError):
    code = ErrorCode.already_exists


class ConnectionFailed(PilotError):
    code = ErrorCode.connection_failed


class Timeout(PilotError):
    code = ErrorCode.timeout


class RegistryUnavailable(PilotError):
    code = ErrorCode.registry_unavailable


class NotTrusted(PilotError):
    code = ErrorCode.not_trusted


class Unauthorized(PilotError):
    code = ErrorCode.unauthorized


class RateLimited(PilotError):
    code = ErrorCode.rate_limited


class Internal(PilotError):
    code = ErrorCode.internal


class PermissionDenied(PilotError):
    code = ErrorCode.permission_denied


_BY_CODE: dict[ErrorCode, type[PilotError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, NotRunning, AlreadyExists, ConnectionFailed, Timeout,
                RegistryUnavailable, NotTrusted, Unauthorized, RateLimited, Internal, PermissionDenied)
}


def _resolve(code: object) -> ErrorCode | None:
    if isinstance(code, str):
        return ErrorCode.__members__.get(code)
    if isinstance(code, int) and not isinstance(code, bool):
        try:
            return ErrorCode(code)
        except ValueError:
            return None
    return None


def error_for(code: str | int, message: str, hint: str | None = None) -> PilotError:
    """
    The exception for a code received from elsewhere: a name (``"not_found"``)
    or a number (an ``ErrorCode`` or a plain int).  An unknown code maps to
    ``internal``.
    """
    resolved = _resolve(code)
    if resolved is None:
        return Internal(f"{message} (unknown error code {code!r})", hint)
    cls = _BY_CODE.get(resolved)
    if cls is None:
        return PilotError(message, hint, code=resolved)
    return cls(message, hint)


class MalformedFrame(ValueError):
    """Bytes from the network (or a file) that do not decode.  Never raised for local misuse."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
