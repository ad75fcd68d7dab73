# -*- test-case-name: tests.test_startup -*-
"""
One line, not a traceback, when a twistd service cannot start for a reason
that is the user's to fix: a busy port, a second daemon on the same
``PILOT_HOME``, an unusable file.

twistd builds the service in ``makeService`` (where our startup errors are
already one line) but binds its ports later, in ``privilegedStartService``
and ``startService``; an exception there used to reach twistd as a 30-40
line traceback.  :class:`StartupGuard` wraps the service built by
``twistd pilot-rendezvous``, ``twistd pilot-node`` and the ``.tac`` files:
a :class:`~twisted.internet.error.CannotListenError`, or any error carrying
an :class:`~pilot.errors.ErrorCode` as ``code`` with a ``message`` and a
``hint`` (``PilotError``, the taps' startup errors), is logged as one line

    pilot-rendezvous: error: cannot listen on 127.0.0.1:9000: Address already in use (...) [invalid_argument]

(to twistd's log, which is the terminal with ``-n``) and twistd exits with
the code's number, as pilotctl would.  Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from twisted.application.service import IService, MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from pilot.endpoint import format_endpoint
from pilot.errors import ErrorCode


class StartupGuard(MultiService):
    """``inner``, started and stopped as it is, with its startup errors made one line and an exit status."""

    log = Logger()

    def __init__(self, inner: IService, prog: str) -> None:
        super().__init__()
        self.inner = inner
        self.prog = prog
        inner.setServiceParent(self)

    def privilegedStartService(self) -> None:
        with self._one_line():
            super().privilegedStartService()

    def startService(self) -> None:
        with self._one_line():
            super().startService()

    @contextmanager
    def _one_line(self) -> Iterator[None]:
        try:
            yield
        except CannotListenError as e:
            self._exit(f"cannot listen on {_where(e)}: {_reason(e)}",
                       "another process may hold the port; choose another address", ErrorCode.invalid_argument)
        except Exception as e:
            code = getattr(e, "code", None)
            message, hint = getattr(e, "message", None), getattr(e, "hint", None)
            if not (isinstance(code, ErrorCode) and isinstance(message, str)):
                raise
            self._exit(message, hint if isinstance(hint, str) else "", code)

    def _exit(self, message: str, hint: str, code: ErrorCode) -> None:
        line = f"{self.prog}: error: {message}" + (f" ({hint})" if hint else "") + f" [{code.name}]"
        self.log.critical("{line}", line=line, code=code.name)
        raise SystemExit(int(code))


def _where(e: CannotListenError) -> str:
    return format_endpoint(e.interface or "", e.port)


def _reason(e: CannotListenError) -> str:
    socket_error = e.socketError
    return getattr(socket_error, "strerror", None) or str(socket_error)
