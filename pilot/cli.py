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

from pilot import __version__
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


#: The modules registering each command's first word: :func:`load_commands` imports only those
#: (``tests.test_cli`` checks this table against the commands the modules define).
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("init", "daemon"), ("pilot.cli_daemon",)),
    **dict.fromkeys(("approve", "clear-hostname", "find", "handshake", "info", "peers", "pending", "reject",
                     "set-hostname", "set-private", "set-public", "set-tags", "trust", "untrust"),
                    ("pilot.cli_node",)),
    **dict.fromkeys(("connect", "listen", "ping", "recv", "send"), ("pilot.cli_traffic",)),
    **dict.fromkeys(("connections", "disconnect", "inbox", "publish", "received", "send-file", "send-message",
                     "subscribe"), ("pilot.cli_apps",)),
    **dict.fromkeys(("expose", "forward", "unexpose", "unforward"), ("pilot.cli_forward",)),
    **dict.fromkeys(("bench", "stats"), ("pilot.cli_stats",)),
    "rendezvous": ("pilot.cli_server", "pilot.cli_rendezvous"),
}


def load_commands(argv: Sequence[str] = ()) -> None:
    """
    Import the modules that register the command named in ``argv``, and
    only those: ``daemon start --foreground`` (the node daemon itself) then
    imports neither the other commands nor the rendezvous' server modules,
    about 2 MB of an idle node's memory, and a restarted rendezvous answers
    sooner (``docs/performance.md``).  With no command, or one not in
    :data:`COMMAND_MODULES` (help, a typo), every module.
    """
    words = [a for a in argv if not a.startswith("-")]
    names = COMMAND_MODULES.get(words[0], ()) if words else ()
    for name in names or sorted({n for group in COMMAND_MODULES.values() for n in group}):
        importlib.import_module(name)  # importing it registers its commands
