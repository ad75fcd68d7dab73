# -*- test-case-name: tests.test_cli -*-
"""
``pilotctl`` (also ``python -m pilot``).

Commands live in one table, :data:`COMMANDS`; each is one function taking a
:class:`Context` and returning a :class:`Result` (or raising
:class:`~pilot.errors.PilotError`), registered with its arguments by the
:meth:`CommandTable.command` decorator::

    @COMMANDS.command("daemon status", "show whether the daemon runs",
                      arg("--socket", help="control socket"))
    def daemon_status(ctx: Context) -> Result:
        ...

A name with a space makes a group (``daemon`` → ``start``, ``stop``,
``status``); the argparse tree, ``--help`` on every level and the global
``--json`` (accepted before or after the command name) come from the table.

The output contract (``docs/cli.md``): on success the bare value goes to
stdout, as compact JSON with ``--json`` and as text otherwise.  On failure
nothing goes to stdout; stderr gets ``{"error": {"code", "message", "hint"}}``
with ``--json`` (``error: ...`` / ``hint: ...`` otherwise) and the exit
status is the code's :class:`~pilot.errors.ErrorCode` value.  Usage errors are
``invalid_argument`` (2).  Nothing escapes as a traceback and nothing prompts.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import signal
import sys
from typing import IO, Any, Callable, NoReturn, Sequence

import attr
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError

from pilot import __version__, log
from pilot.endpoint import format_endpoint
from pilot.errors import Internal, InvalidArgument, PermissionDenied, PilotError

PROG = "pilotctl"


# --- results and output -------------------------------------------------------------

@attr.s(frozen=True, auto_attribs=True)
class Result:
    """What a command produced: ``data`` for ``--json``, ``text`` for people (default: ``data`` as JSON)."""

    data: Any
    text: str | None = None
    #: The command wrote its output as it came (``subscribe``): with ``--json`` nothing more is printed.
    streamed: bool = False


@attr.s(auto_attribs=True)
class Output:
    """Writes results and errors according to the contract."""

    json: bool
    stdout: IO[str]
    stderr: IO[str]

    def result(self, result: Result) -> None:
        if self.json and result.streamed:
            return
        if self.json:
            line = json.dumps(result.data, separators=(",", ":"), ensure_ascii=False)
        elif result.text is not None:
            line = result.text
        elif isinstance(result.data, (dict, list)):
            line = json.dumps(result.data, indent=2, ensure_ascii=False)
        else:
            line = str(result.data)
        if line:
            self.stdout.write(line if line.endswith("\n") else line + "\n")
        self.stdout.flush()

    def error(self, err: PilotError) -> int:
        if self.json:
            self.stderr.write(json.dumps({"error": err.as_dict()}, separators=(",", ":"),
                                         ensure_ascii=False) + "\n")
        else:
            self.stderr.write(f"error: {err.message}\n")
            if err.hint:
                self.stderr.write(f"hint: {err.hint}\n")
        self.stderr.flush()
        return int(err.code)


@attr.s(auto_attribs=True)
class Context:
    """What a command function gets: its parsed arguments and where to write."""

    args: argparse.Namespace
    out: Output
    reactor: Any = None

    @property
    def json(self) -> bool:
        return self.out.json

    def get_reactor(self) -> Any:
        """The reactor to run on: the one given to :func:`main`, else the global one."""
        if self.reactor is None:
            from twisted.internet import reactor
            self.reactor = reactor
        return self.reactor


# --- the command table -----------------------------------------------------------------

@attr.s(frozen=True, auto_attribs=True)
class Arg:
    """``add_argument(*flags, **kwargs)``, kept for later."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any]


def arg(*flags: str, **kwargs: Any) -> Arg:
    return Arg(flags, kwargs)


CommandFunction = Callable[[Context], "Result | None"]


@attr.s(frozen=True, auto_attribs=True)
class Command:
    path: tuple[str, ...]
    function: CommandFunction
    help: str
    description: str | None
    args: tuple[Arg, ...]
    epilog: str | None = None

    @property
    def name(self) -> str:
        return " ".join(self.path)


class CommandTable:
    """Commands and groups by path; builds the argparse tree."""

    def __init__(self) -> None:
        self.commands: dict[tuple[str, ...], Command] = {}
        self.groups: dict[tuple[str, ...], str] = {}

    def group(self, name: str, help: str) -> None:
        self.groups[tuple(name.split())] = help

    def command(self, name: str, help: str, *args: Arg, description: str | None = None,
                epilog: str | None = None) -> Callable[[CommandFunction], CommandFunction]:
        path = tuple(name.split())

        def register(function: CommandFunction) -> CommandFunction:
            if path in self.commands or path in self.groups:
                raise ValueError(f"command {name!r} is defined twice")
            for i in range(1, len(path)):
                self.groups.setdefault(path[:i], f"{' '.join(path[:i])} commands")
            self.commands[path] = Command(path, function, help, description, args, epilog)
            return function

        return register

    def build_parser(self, stdout: IO[str]) -> "_Parser":
        root = _Parser(prog=PROG, stdout=stdout, allow_abbrev=False,
                       description="Pilot Protocol: a node's identity, daemon and peers, "
                                   "and a self-hosted rendezvous.",
                       epilog="Every command takes --help.  With --json, output is one JSON value "
                              "and errors are {\"error\": {...}} (docs/cli.md).")
        root.add_argument("--json", action="store_true", default=False,
                          help="machine-readable output: compact JSON on stdout, JSON errors on stderr")
        root.add_argument("--version", action=_VersionAction, help="print the version and exit")
        self._add_children(root, (), stdout)
        return root

    def _children(self, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
        names = {p[:len(prefix) + 1] for p in [*self.commands, *self.groups]
                 if len(p) > len(prefix) and p[:len(prefix)] == prefix}
        return sorted(names)

    def _add_children(self, parser: "_Parser", prefix: tuple[str, ...], stdout: IO[str]) -> None:
        children = self._children(prefix)
        if not children:
            return
        dest = "_command_" + "_".join(prefix) if prefix else "_command"
        subs = parser.add_subparsers(dest=dest, metavar="COMMAND", required=True,
                                     title="commands", parser_class=_Parser)
        for path in children:
            name = path[-1]
            command = self.commands.get(path)
            help = command.help if command else self.groups[path]
            child = subs.add_parser(name, help=help, stdout=stdout, allow_abbrev=False,
                                    description=(command.description or command.help) if command else help,
                                    epilog=command.epilog if command else None,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
            child.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                               help="machine-readable output (same as before the command)")
            if command is not None:
                for a in command.args:
                    child.add_argument(*a.flags, **a.kwargs)
                child.set_defaults(_handler=command)
            else:
                self._add_children(child, path, stdout)


COMMANDS = CommandTable()


# --- argparse, without exits or prints of its own ------------------------------------

class _UsageError(Exception):
    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.message = message
        self.prog = prog


class _Exit(Exception):
    """argparse finished early (``--help``): the status, and text for stdout."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _ShowVersion(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, stdout: IO[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stdout = stdout or sys.stdout

    def print_help(self, file: Any = None) -> None:
        super().print_help(file or self._stdout)

    def print_usage(self, file: Any = None) -> None:
        super().print_usage(file or self._stdout)

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message, self.prog)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if status:
            raise _UsageError((message or "invalid arguments").strip(), self.prog)
        raise _Exit(status)


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        raise _ShowVersion()


def _wants_json(argv: Sequence[str]) -> bool:
    """Was ``--json`` given (for reporting errors found before parsing finished)?"""
    for token in argv:
        if token == "--":
            return False
        if token == "--json":
            return True
    return False


# --- rendezvous ------------------------------------------------------------------------------

COMMANDS.group("rendezvous", "run a rendezvous server: registry (TCP) and beacon (UDP)")


def _rendezvous_args() -> tuple[Arg, ...]:
    from pilot import tap
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


def add_rendezvous_start() -> None:
    """
    Register ``rendezvous start``: done by :func:`load_commands` only when the
    command is ``rendezvous`` or unknown, since its options come from
    :mod:`pilot.tap`, which imports the rendezvous' server modules (a node
    daemon needs none of them: ``docs/performance.md``, the idle daemon).
    """
    if ("rendezvous", "start") not in COMMANDS.commands:
        COMMANDS.command("rendezvous start", "run the registry and beacon in the foreground",
                         *_rendezvous_args(), epilog=_RENDEZVOUS_EPILOG,
                         description="Run a Pilot rendezvous in the foreground: the registry on TCP\n"
                                     "and the beacon on UDP, in one process.")(rendezvous_start)


def rendezvous_start(ctx: Context) -> None:
    from pilot import tap
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


# --- main ----------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None, stdout: IO[str] | None = None,
         stderr: IO[str] | None = None, reactor: Any = None) -> int:
    """Run one pilotctl command; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    out = Output(_wants_json(argv), stdout, stderr)
    try:
        load_commands(argv)
        parser = COMMANDS.build_parser(stdout)
        try:
            args, extra = parser.parse_known_args(argv)
            if extra:
                where = f"{PROG} {args._handler.name}" if hasattr(args, "_handler") else PROG
                raise _UsageError(f"unrecognized arguments: {' '.join(extra)}", where)
        except _Exit as e:
            stdout.flush()
            return e.status
        except _ShowVersion:
            out.result(Result({"version": __version__}, f"{PROG} {__version__}"))
            return 0
        except _UsageError as e:
            return out.error(InvalidArgument(e.message, f"see `{e.prog} --help`"))
        except argparse.ArgumentError as e:
            return out.error(InvalidArgument(str(e), f"see `{PROG} --help`"))
        out.json = bool(args.json)
        command: Command = args._handler
        result = command.function(Context(args, out, reactor))
        if result is not None:
            out.result(result)
        return 0
    except PilotError as e:
        return out.error(e)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # the reader went away (``| head``): not an error of ours, and no
        # "Exception ignored" noise when Python flushes stdout at exit
        _silence(stdout)
        return 0
    except OSError as e:
        if e.filename is None:
            return out.error(Internal(f"{type(e).__name__}: {e}",
                                      "this is a bug in pilotctl; please report it with the command line"))
        return out.error(file_error(e))
    except Exception as e:  # the contract: no tracebacks, ever
        return out.error(Internal(f"{type(e).__name__}: {e}",
                                  "this is a bug in pilotctl; please report it with the command line"))


def file_error(e: OSError) -> PilotError:
    """
    A file or directory pilotctl could not use, naming the path:
    ``permission_denied`` when the system refused this user (EACCES, EPERM,
    a read-only file system), else ``invalid_argument`` (a path through a
    file...), since the fix is a setting (``PILOT_HOME``, ``--socket``...).
    """
    path = os.fsdecode(e.filename)
    reason = e.strerror or type(e).__name__
    hint = ("PILOT_HOME (default ~/.pilot) must be a directory this user can write: "
            "fix its permissions or point PILOT_HOME elsewhere")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"cannot use {path}: {reason}", hint)
    return InvalidArgument(f"cannot use {path}: {reason}", hint)


def _silence(stream: IO[str]) -> None:
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


#: The module registering each command's first word: :func:`load_commands` imports only that one
#: (``tests.test_cli`` checks this table against the commands the modules define).
COMMAND_MODULES: dict[str, str] = {
    **dict.fromkeys(("init", "daemon"), "pilot.cli_daemon"),
    **dict.fromkeys(("approve", "clear-hostname", "find", "handshake", "info", "peers", "pending", "reject",
                     "set-hostname", "set-private", "set-public", "set-tags", "trust", "untrust"), "pilot.cli_node"),
    **dict.fromkeys(("connect", "listen", "ping", "recv", "send"), "pilot.cli_traffic"),
    **dict.fromkeys(("connections", "disconnect", "inbox", "publish", "received", "send-file", "send-message",
                     "subscribe"), "pilot.cli_apps"),
    **dict.fromkeys(("expose", "forward", "unexpose", "unforward"), "pilot.cli_forward"),
    **dict.fromkeys(("bench", "stats"), "pilot.cli_stats"),
    "rendezvous": "pilot.cli_rendezvous",
}


def load_commands(argv: Sequence[str] = ()) -> None:
    """
    Import the module that registers the command named in ``argv``, and
    only that one: ``daemon start --foreground`` (the node daemon itself)
    then imports neither the other commands nor the rendezvous' server
    modules, about 3 MB of an idle node's memory, and a restarted
    rendezvous answers sooner (``docs/performance.md``).  With no command,
    or one not in :data:`COMMAND_MODULES` (help, a typo), every module.
    """
    words = [a for a in argv if not a.startswith("-")]
    module = COMMAND_MODULES.get(words[0]) if words else None
    if module is not None:
        importlib.import_module(module)  # importing it registers its commands
        if words[0] == "rendezvous":
            add_rendezvous_start()
        return
    for name in sorted(set(COMMAND_MODULES.values())):
        importlib.import_module(name)
    add_rendezvous_start()
