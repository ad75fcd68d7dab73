# -*- test-case-name: tests.test_log -*-
"""
Where pilot's log events go: human-readable text (the default) or JSON lines.

Three ways in, one set of observers:

* ``pilotctl`` foreground commands call :func:`start_logging` with the
  ``--log-format`` and ``--log-level`` they were given (events go to stderr;
  stdout is the command's output).
* ``twistd --logger pilot.log.json_logger ...`` (or ``text_logger``) uses the
  zero-argument factories here; they write to stdout, or to the file named by
  ``$PILOT_LOG_FILE``, at the level named by ``$PILOT_LOG_LEVEL``.
* ``twistd pilot-rendezvous --log-format json`` selects the same observer via
  :func:`choose_for_twistd` and :func:`twistd_logger` (see ``pilot.tap``).

JSON is :func:`twisted.logger.jsonFileLogObserver`'s, one object per line
(no RFC 7464 record separator, so ``jq`` and line tools read it directly);
:func:`twisted.logger.eventsFromJSONLogFile` reads it back, and every named
field of a format string stays a field of the record.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Callable

import attr

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)

FORMATS: tuple[str, ...] = ("text", "json")

LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

DEFAULT_FORMAT = "text"
DEFAULT_LEVEL = "info"

#: Text lines: an ISO-8601 timestamp with the zone offset, like twistd's.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def check_format(fmt: str) -> str:
    """``fmt`` (in lower case) if it is a known log format; ``ValueError`` naming the choices otherwise."""
    key = fmt.strip().lower()
    if key not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return key


def parse_level(name: str) -> LogLevel:
    """The :class:`LogLevel` called ``name`` (``warning`` is accepted for ``warn``)."""
    key = name.strip().lower()
    if key == "warning":
        key = "warn"
    try:
        return LEVELS[key]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}; choose one of: {', '.join(LEVELS)}") from None


def level_name(name: str) -> str:
    """The canonical name of the level called ``name``; ``ValueError`` if there is none."""
    return parse_level(name).name


def file_observer_factory(fmt: str) -> Callable[[IO[str]], ILogObserver]:
    """``stream -> observer`` writing ``fmt``, unfiltered (for runners that filter themselves)."""
    if check_format(fmt) == "json":
        return lambda stream: jsonFileLogObserver(stream, recordSeparator="")
    return lambda stream: textFileLogObserver(stream, timeFormat=TIME_FORMAT)


def make_observer(fmt: str, stream: IO[str], level: str | LogLevel = DEFAULT_LEVEL) -> ILogObserver:
    """An observer writing events at ``level`` or above to ``stream`` as ``fmt``."""
    fmt = check_format(fmt)
    threshold = parse_level(level) if isinstance(level, str) else level
    inner = file_observer_factory(fmt)(stream)
    return FilteringLogObserver(inner, [LogLevelFilterPredicate(defaultLogLevel=threshold)])


def start_logging(fmt: str = DEFAULT_FORMAT, stream: IO[str] | None = None,
                  level: str | LogLevel = DEFAULT_LEVEL) -> ILogObserver:
    """
    Begin global logging for a foreground command: events at ``level`` or
    above go to ``stream`` (stderr by default) as ``fmt``.

    Call once per process, from an edge (the CLI); events logged before the
    call are buffered by Twisted and written then.  Standard output is not
    redirected: it belongs to the command.
    """
    observer = make_observer(fmt, sys.stderr if stream is None else stream, level)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    return observer


def stream_from_environment() -> IO[str]:
    """The file named by ``$PILOT_LOG_FILE`` (appended to), or stdout."""
    path = os.environ.get("PILOT_LOG_FILE", "")
    if path and path != "-":
        return open(path, "a", encoding="utf-8", buffering=1)
    return sys.stdout


def level_from_environment() -> str:
    """``$PILOT_LOG_LEVEL``, or info."""
    return os.environ.get("PILOT_LOG_LEVEL", "") or DEFAULT_LEVEL


def json_logger() -> ILogObserver:
    """
    ``twistd --logger pilot.log.json_logger``: JSON lines to stdout (or
    ``$PILOT_LOG_FILE``), filtered at ``$PILOT_LOG_LEVEL`` (info by default).
    """
    return make_observer("json", stream_from_environment(), level_from_environment())


def text_logger() -> ILogObserver:
    """``twistd --logger pilot.log.text_logger``: as :func:`json_logger`, as text lines."""
    return make_observer("text", stream_from_environment(), level_from_environment())


@attr.s(frozen=True, auto_attribs=True)
class _TwistdChoice:
    fmt: str
    level: str
    logfile: str | None


#: What ``twistd pilot-rendezvous --log-format/--log-level`` asked for; see :func:`choose_for_twistd`.
_twistd_choice: _TwistdChoice | None = None


def choose_for_twistd(fmt: str, level: str, logfile: str | None, nodaemon: bool) -> str:
    """
    Remember a plugin's log format and level for twistd, and return the name
    to put in twistd's ``logger`` option (twistd wants a dotted name, which
    it imports after parsing the options): :func:`twistd_logger`.

    twistd's own ``--logfile`` is honoured as twistd does: ``"-"``, or
    nothing with ``--nodaemon``, is stdout; nothing for a daemon is
    ``twistd.log``.
    """
    global _twistd_choice
    if not logfile and not nodaemon:
        logfile = "twistd.log"
    _twistd_choice = _TwistdChoice(check_format(fmt), level_name(level), logfile)
    return f"{__name__}.twistd_logger"


def twistd_logger() -> ILogObserver:
    """The observer :func:`choose_for_twistd` chose (as :func:`text_logger` if none was)."""
    choice = _twistd_choice
    if choice is None:
        return text_logger()
    if choice.logfile and choice.logfile != "-":
        stream: IO[str] = open(choice.logfile, "a", encoding="utf-8", buffering=1)
    else:
        stream = sys.stdout
    return make_observer(choice.fmt, stream, choice.level)
