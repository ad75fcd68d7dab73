# -*- test-case-name: tests.test_cli_rendezvous -*-
"""
``pilotctl rendezvous promote``: make a standby rendezvous primary now
(``docs/deploy.md``, the failover drill).  ``rendezvous start`` is in
:mod:`pilot.cli_server`.

It sends ``{"type":"replication_promote","token":T}`` to the registry, the
token read from ``--replication-token-file`` or ``PILOT_REPLICATION_TOKEN``
(never a flag), over TLS pinned by ``--fingerprint`` when given, and reports
the term the server now has.  A plain socket: no reactor for one request.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
from typing import Any, Callable

from pilot import tap
from pilot.cli import PROG, COMMANDS, Context, Result, arg
from pilot.endpoint import format_endpoint, parse_host_port
from pilot.errors import InvalidArgument, MalformedFrame, PilotError, RegistryUnavailable, Timeout, error_for
from pilot.wire.registry import FrameDecoder, encode_frame

TIMEOUT = 10.0

#: How the command reaches the registry: ``(host, port, fingerprint, timeout) -> socket``; tests replace it.
Opener = Callable[[str, int, "str | None", float], socket.socket]


def open_registry(host: str, port: int, fingerprint: str | None, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    if not fingerprint:
        return sock
    import ssl  # here: this module is loaded with `rendezvous start`, whose process has no ssl (pilot.cli)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the pin below is the check (docs/reference-wire.md 2.10)
    tls = context.wrap_socket(sock, server_hostname=host)
    der = tls.getpeercert(binary_form=True) or b""
    if not hmac.compare_digest(hashlib.sha256(der).hexdigest(), fingerprint.replace(":", "").lower()):
        tls.close()
        raise PilotError(f"the certificate of {format_endpoint(host, port)} does not match --fingerprint",
                         "check the fingerprint the rendezvous printed at start", code=InvalidArgument.code)
    return tls


opener: Opener = open_registry


def request(host: str, port: int, message: dict[str, Any], fingerprint: str | None,
            timeout: float = TIMEOUT) -> dict[str, Any]:
    where = format_endpoint(host, port)
    try:
        sock = opener(host, port, fingerprint, timeout)
    except socket.timeout:
        raise Timeout(f"{where} did not answer within {timeout:.0f} s") from None
    except OSError as e:
        raise RegistryUnavailable(f"cannot reach the rendezvous at {where}: {e.strerror or e}",
                                  "check --registry and that the rendezvous runs") from None
    try:
        sock.sendall(encode_frame(message))
        decoder = FrameDecoder()
        while True:
            data = sock.recv(65536)
            if not data:
                raise RegistryUnavailable(f"{where} closed the connection without an answer")
            for frame in decoder.feed(data):
                if isinstance(frame, MalformedFrame):
                    raise RegistryUnavailable(f"{where} sent a malformed answer: {frame.reason}")
                return frame
    except socket.timeout:
        raise Timeout(f"{where} did not answer within {timeout:.0f} s") from None
    except MalformedFrame as e:
        raise RegistryUnavailable(f"{where} sent a malformed answer: {e.reason}") from None
    except OSError as e:
        raise RegistryUnavailable(f"the connection to {where} failed: {e.strerror or e}") from None
    finally:
        sock.close()


_EPILOG = """\
Makes the standby at --registry (default 127.0.0.1:9000) primary now, with the
next term; its former primary steps down when it sees that term.  The token
comes from --replication-token-file or PILOT_REPLICATION_TOKEN.  Example:

  $ pilotctl rendezvous promote --registry 10.0.0.2:9000 --replication-token-file /etc/pilot/replication.token
  10.0.0.2:9000 is primary now (term 3)

With --json: {"registry":"10.0.0.2:9000","promoted":true,"term":3}
Exit status 8 (registry_unavailable) if it cannot be reached, 11 (unauthorized)
for a wrong token, 2 (invalid_argument) if it has no pair.
"""


@COMMANDS.command("rendezvous promote", "make a standby rendezvous primary now (the failover drill)",
                  arg("--registry", metavar="HOST:PORT", default="127.0.0.1:9000",
                      help="the standby's registry address (default: 127.0.0.1:9000)"),
                  arg("--replication-token-file", metavar="PATH", default=None,
                      help="the pair's token file (or PILOT_REPLICATION_TOKEN)"),
                  arg("--fingerprint", metavar="SHA256", default=None,
                      help="the registry's TLS certificate fingerprint, if it serves TLS"),
                  arg("--timeout", metavar="SECONDS", type=float, default=TIMEOUT,
                      help=f"seconds to wait for the answer (default: {TIMEOUT:.0f})"),
                  epilog=_EPILOG)
def rendezvous_promote(ctx: Context) -> Result:
    from pilot.wire.replication import PROMOTE  # here: `rendezvous start` answers sooner without it
    a = ctx.args
    hint = f"see `{PROG} rendezvous promote --help`"
    try:
        token = tap.read_token(a.replication_token_file, os.environ)
    except ValueError as e:
        raise InvalidArgument(str(e), hint) from None
    if token is None:
        raise InvalidArgument("the replication token is needed: --replication-token-file PATH or "
                              f"{tap.TOKEN_VARIABLE}", hint)
    host, port = parse_host_port(a.registry)
    reply = request(host, port, {"type": PROMOTE, "token": token.decode("utf-8", "surrogateescape")},
                    a.fingerprint, a.timeout)
    where = format_endpoint(host, port)
    if reply.get("type") == "error":
        code = reply.get("code", "internal")
        raise error_for(code if isinstance(code, str) else "internal", f"{where}: {reply.get('error')}")
    if reply.get("type") != PROMOTE + "_ok":
        raise RegistryUnavailable(f"{where} answered {str(reply.get('type'))[:40]!r}: not a rendezvous of ours?")
    promoted, term = bool(reply.get("promoted")), reply.get("term")
    text = f"{where} is primary now (term {term})" if promoted else f"{where} was primary already (term {term})"
    return Result({"registry": where, "promoted": promoted, "term": term}, text)
