# -*- test-case-name: tests.server.test_registry -*-
"""
What every registry request handler shares: where a request came from
(:class:`Peer`), the connection events are pushed on (:class:`Session`), the
error a handler raises (:class:`RequestError`) and the reply it becomes
(:func:`error_reply`).

A handler is a function ``(registry, msg, peer, session) -> reply`` (the
:data:`Handler` type); :meth:`pilot.server.registry.Registry.handle` looks it up
by the request's ``type``.  The handlers live by job: the node's own record in
``registry.py``, trust and handshakes in ``handshakes.py``, the reference's
remaining requests in ``compat.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

from pilot.errors import ErrorCode
from pilot.wire.value import Value, set_field

if TYPE_CHECKING:
    from pilot.server.registry import Registry

#: A decoded request or a reply: one JSON object.
Message = dict[str, Any]


class Peer(Value):
    """Where a request came from, as the registry's socket saw it."""

    __slots__ = ("host", "port")
    host: str
    port: int

    def __init__(self, host: str, port: int) -> None:
        set_field(self, "host", host)
        set_field(self, "port", port)


class Session(Protocol):
    """What the registry needs of a client connection."""

    def push(self, message: dict[str, Any]) -> None:
        """Send an unsolicited message (an event) on this connection."""


class RequestError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_reply(code: ErrorCode, message: str) -> dict[str, Any]:
    return {"type": "error", "error": message, "code": code.name}


Handler = Callable[["Registry", Message, Peer, "Session | None"], Message]
