# -*- test-case-name: tests.test_tap -*-
"""
Command-line options described once, for twistd, pilotctl and the
environment alike.

A table of :class:`Setting` (``--name VALUE``) and :class:`Switch`
(``--name``) entries is parsed by :func:`parse_table` from whatever source
gave the raw values: argparse, twistd's ``usage.Options``, ``PILOT_<NAME>``
environment variables (:func:`environment_values`) or a JSON config file.
Each value parser returns the value or raises ``ValueError(reason)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import attr

from pilot.endpoint import format_endpoint, parse_host_port, parse_listen
from pilot.errors import InvalidArgument

# --- value parsers: each returns the value or raises ValueError(reason) ---------

def parse_address(text: str) -> str:
    """
    A listening address, as :func:`pilot.endpoint.parse_listen` takes it
    (``:9000``, ``9000``, ``127.0.0.1:9000``, ``[::1]:9000``; port 0 asks the
    system for a free port), in its normal form (``:9000``).
    """
    try:
        host, port = parse_listen(text)
    except InvalidArgument as e:
        raise ValueError(e.message) from None
    return format_endpoint(host, port)


def parse_server(text: str) -> str:
    """
    A server's address, as :func:`pilot.endpoint.parse_host_port` takes it
    (``rendezvous.example:9000``, ``192.0.2.1:9000``, ``[::1]:9000``), in its
    normal form.
    """
    try:
        host, port = parse_host_port(text)
    except InvalidArgument as e:
        raise ValueError(e.message) from None
    return format_endpoint(host, port)


def parse_rate(text: str) -> float:
    """A rate or count limit: a number >= 0, where 0 disables the limit."""
    value = _number(text)
    if value < 0:
        raise ValueError(f"{text!r} is negative; use 0 to disable the limit")
    return value


def parse_amount(text: str) -> float:
    """A burst size: a number > 0."""
    value = _number(text)
    if value <= 0:
        raise ValueError(f"{text!r} must be more than 0")
    return value


def parse_duration(text: str) -> float:
    """A number of seconds > 0."""
    value = _number(text)
    if value <= 0:
        raise ValueError(f"{text!r} must be more than 0 seconds")
    return value


def parse_expiry(text: str) -> float:
    """Seconds of silence before an entry is removed; 0 means never (returned as infinity)."""
    value = _number(text)
    if value < 0:
        raise ValueError(f"{text!r} is negative; use 0 to never expire entries")
    return math.inf if value == 0 else value


def parse_delay(text: str) -> float:
    """A delay in seconds >= 0."""
    value = _number(text)
    if value < 0:
        raise ValueError(f"{text!r} is negative")
    return value


#: The busy poll's default windows in microseconds: the node daemon's (``daemon start --busy-poll``,
#: ``busy_poll`` in config.json) and the rendezvous' (``rendezvous start --busy-poll``); measured in
#: docs/performance.md ("a contention-aware busy poll"), used by ``pilot/services/busypoll.py``.
DAEMON_BUSY_POLL = 250
RENDEZVOUS_BUSY_POLL = 250

#: The longest busy poll ``parse_microseconds`` takes: past a few hundred microseconds a spin costs
#: more than a wake-up saves.
MAX_MICROSECONDS = 10_000


def parse_microseconds(text: str) -> float:
    """A short time in microseconds, 0 to :data:`MAX_MICROSECONDS`."""
    value = _number(text)
    if not 0 <= value <= MAX_MICROSECONDS:
        raise ValueError(f"{text!r} must be from 0 to {MAX_MICROSECONDS:,} microseconds")
    return value


def parse_path(text: str) -> str:
    if not text.strip():
        raise ValueError("an empty path")
    if "\0" in text:
        raise ValueError("a path cannot contain a NUL character")
    return text


def _number(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


# --- the option table ------------------------------------------------------------

@attr.s(frozen=True, auto_attribs=True)
class Setting:
    """One valued option: ``--name VALUE``, parsed by ``parse``; None default = computed later."""

    name: str
    default: str | None
    parse: Callable[[str], Any]
    metavar: str
    help: str

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")


@attr.s(frozen=True, auto_attribs=True)
class Switch:
    """An on/off option: ``--name``."""

    name: str
    help: str

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")



def _fmt(value: float) -> str:
    if value == math.inf:
        return "0"
    return str(int(value)) if float(value).is_integer() else repr(value)


def flag_name(option: "Setting | Switch") -> str:
    return f"--{option.name}"


def parse_table(table: Sequence["Setting | Switch"], raw: Mapping[str, Any],
                name: Callable[["Setting | Switch"], str] = flag_name) -> dict[str, Any]:
    """
    Parse every option of ``table`` found in ``raw`` (keys with underscores;
    switches as booleans; absent or None valued options take their defaults).
    Raises ``ValueError`` whose message starts with the option at fault.
    """
    out: dict[str, Any] = {}
    for opt in table:
        value = raw.get(opt.key)
        if isinstance(opt, Switch):
            out[opt.key] = bool(value)
            continue
        text = opt.default if value is None else value
        if text is None:
            out[opt.key] = None
            continue
        try:
            out[opt.key] = opt.parse(str(text))
        except ValueError as e:
            raise ValueError(f"{name(opt)}: {e}") from None
    return out


ENV_PREFIX = "PILOT_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def environment_name(option: Setting | Switch) -> str:
    return ENV_PREFIX + option.key.upper()


def environment_values(table: Sequence["Setting | Switch"], environ: Mapping[str, str],
                       special: Callable[[str, str], "dict[str, Any] | None"] = lambda key, text: None,
                       ) -> dict[str, Any]:
    """
    Raw option values from ``PILOT_<NAME>`` variables (``PILOT_LISTEN``,
    ``PILOT_NO_STORE``...), for :func:`parse_table`.  A switch takes
    1/true/yes/on or 0/false/no/off.  ``special(key, text)`` may claim a
    variable by returning the raw values it stands for.
    """
    raw: dict[str, Any] = {}
    for opt in table:
        text = environ.get(environment_name(opt))
        if text is None:
            continue
        if isinstance(opt, Switch):
            word = text.strip().lower()
            if word not in _TRUE | _FALSE:
                raise ValueError(f"{environment_name(opt)}: {text!r} is not one of 1, 0, true, false, yes, no")
            raw[opt.key] = word in _TRUE
        elif (claimed := special(opt.key, text)) is not None:
            raw.update(claimed)
        elif text != "":
            raw[opt.key] = text
    return raw


