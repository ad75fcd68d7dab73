# -*- test-case-name: tests.test_cli -*-
"""
``pilotctl rendezvous start``: the registry and the beacon in the
foreground, in this process.

Apart from :mod:`pilot.cli` because its options come from :mod:`pilot.tap`,
which imports the rendezvous' server modules: ``pilot.cli.load_commands``
imports this module only for ``rendezvous`` commands (and for help), so
that the node daemon, which runs in ``pilotctl daemon start --foreground``,
does without them (``docs/performance.md``, the idle daemon).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError

from pilot import log, tap
from pilot.cli import COMMANDS, PROG, Arg, Context, Result, arg
from pilot.entry import end_server_start
from pilot.endpoint import format_endpoint
from pilot.errors import Internal, InvalidArgument, PilotError

COMMANDS.group("rendezvous", "run a rendezvous server: registry (TCP) and beacon (UDP)")


def _rendezvous_args() -> tuple[Arg, ...]:
    out = []
    for opt in tap.RENDEZVOUS_OPTIONS:
        if isinstance(opt, tap.Switch):
            out.append(arg(f"--{opt.name}", dest=opt.key, action="store_true", help=opt.help))
        else:
            shown = f" (default: {opt.default})" if opt.default is not None else ""
            out.append(arg(f"--{opt.name}", dest=opt.key, metavar=opt.metavar, default=None,
                           help=opt.help + shown))
    return tuple(out)


_RENDEZVOUS_EPILOG = """\
Prints where it listens, then logs to stderr until SIGTERM or SIGINT, which
stop it cleanly (the store is written first).  Example:

  $ pilotctl rendezvous start --listen :9000 --beacon :9001
  Registry listening on :9000 (TCP)
  Beacon listening on :9001 (UDP)
  Persistence: /var/lib/pilot/registry.json

With --json, one line instead:
  {"registry":":9000","beacon":":9001","store":"...","tls_fingerprint":null}
"""


@COMMANDS.command("rendezvous start", "run the registry and beacon in the foreground",
                  *_rendezvous_args(), epilog=_RENDEZVOUS_EPILOG,
                  description="Run a Pilot rendezvous in the foreground: the registry on TCP\n"
                              "and the beacon on UDP, in one process.")
def rendezvous_start(ctx: Context) -> None:
    hint = f"see `{PROG} rendezvous start --help`"
    try:
        values = tap.parse_values(vars(ctx.args))
        settings = tap.settings_from(values)
    except ValueError as e:
        raise InvalidArgument(str(e), hint) from None
    if ctx.reactor is None and not (settings.tls or settings.replication.primary_fingerprint
                                    or settings.http):
        tap.install_reactor_without_tls()
    reactor = ctx.get_reactor()
    try:
        service = tap.build_service(settings, reactor)
    except tap.StartupError as e:
        raise PilotError(e.message, e.hint, code=e.code) from None
    end_server_start()  # what the start loaded is frozen now (build_service): the collector may run
    log.start_logging(values["log_format"] or log.DEFAULT_FORMAT, ctx.out.stderr,
                      values["log_level"] or log.DEFAULT_LEVEL)
    try:
        service.startService()
        registry = _with_port(settings.listen, service.registry_port())
        beacon = _with_port(settings.beacon_listen, service.beacon_port())
    except CannotListenError as e:
        _stop_quietly(service)
        raise InvalidArgument(f"cannot listen on {_where(e)}: {_reason(e)}",
                              "another process may hold the port; choose others with "
                              "--listen and --beacon (port 0: any free port)") from None
    except BaseException:
        _stop_quietly(service)
        raise
    fingerprint = service.tls_fingerprint
    lines = [f"Registry listening on {registry} ({'TLS' if settings.tls else 'TCP'})",
             f"Beacon listening on {beacon} (UDP)",
             f"Persistence: {settings.store}" if settings.store else "Persistence: none (--no-store)"]
    if fingerprint:
        lines.append(f"TLS fingerprint: {fingerprint}")
    data: dict[str, Any] = {"registry": registry, "beacon": beacon, "store": settings.store,
                            "tls_fingerprint": fingerprint}
    if service.replication is not None:  # a pair (docs/deploy.md)
        replica = service.replication.replica
        data["replication"] = {"role": "standby" if replica.standby else "primary", "term": replica.term,
                               "primary": replica.primary or None}
        lines.append(f"Replication: standby of {replica.primary} (term {replica.term})" if replica.standby
                     else f"Replication: primary (term {replica.term})")
    http = _with_port(settings.http, service.http.port()) if settings.http and service.http else None
    if http:
        lines.append(f"Dashboard on {http} (HTTP: /, /api/stats, /metrics)")
        data["http"] = http
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    ctx.out.result(Result(data, "\n".join(lines)))
    reactor.run()
    if service.unsaved:
        raise Internal(f"the registry store {settings.store} could not be saved at shutdown; "
                       f"changes acknowledged since its last write are lost",
                       "check that the store's folder exists and is writable")
    return None


def _with_port(address: str, port: int) -> str:
    host = address.rpartition(":")[0]
    return f"{host}:{port}"


def _where(e: CannotListenError) -> str:
    return format_endpoint(e.interface or "", e.port)


def _reason(e: CannotListenError) -> str:
    socket_error = e.socketError
    return getattr(socket_error, "strerror", None) or str(socket_error)


def _stop_quietly(service: Any) -> None:
    """Undo a start that failed part way: stop whatever did start, ignoring what did not."""
    for child in reversed(list(service)):
        if child.running:
            try:
                stopped = child.stopService()
            except Exception:
                continue
            if isinstance(stopped, Deferred):
                stopped.addErrback(lambda failure: None)
