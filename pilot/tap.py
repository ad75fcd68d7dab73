# -*- test-case-name: tests.test_tap -*-
"""
``twistd pilot-rendezvous`` (and ``twist pilot-rendezvous``): command-line
options and ``makeService``.

The options are described once, in :data:`RENDEZVOUS_OPTIONS`, and parsed by
the plain functions here; :class:`RendezvousOptions` (twistd) and
``pilotctl rendezvous start`` (argparse, ``pilot.cli``) are both built from
that table, so the two entry points take the same flags with the same
defaults, meanings and error messages.  :func:`settings_from` turns the
parsed values into a :class:`RendezvousSettings`.

A store that cannot be loaded is a startup error, reported in one line by
:func:`makeService` (``SystemExit`` with the message, as twistd does for its
own startup failures), never as a traceback; so is a port that cannot be
bound when twistd starts the service (:class:`pilot.startup.StartupGuard`).
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any, Callable, Mapping

import attr
from twisted.python import usage

from pilot import log
from pilot.options import (
    Setting, Switch, _fmt, environment_name, environment_values, flag_name, parse_address, parse_amount,
    parse_delay, parse_duration, parse_expiry, parse_microseconds, parse_path, parse_rate, parse_server,
    parse_table, RENDEZVOUS_BUSY_POLL,
)

__all__ = ["RendezvousOptions", "Options", "makeService", "build_service", "StartupError", "RENDEZVOUS_OPTIONS",
           "parse_values", "values_from_environment", "settings_from", "environment_name", "Setting", "Switch"]
from pilot.errors import ErrorCode, PilotError
from pilot.persist import StateFileError
from pilot.server.beacon import BeaconConfig
from pilot.server.pair_defaults import SYNC_TIMEOUT
from pilot.server.registry import RegistryConfig
from pilot.services.rendezvous import RendezvousService, RendezvousSettings
from pilot.services.pairing import TAKEOVER_AFTER, ReplicationSettings
from pilot.services.store import StoreError, collector_paused, default_store_path
from pilot.startup import StartupGuard

TAPNAME = "pilot-rendezvous"
DEFAULT_LISTEN = ":9000"
DEFAULT_BEACON = ":9001"
DEFAULT_FLUSH_DELAY = RendezvousSettings().flush_delay
DEFAULT_REAP_INTERVAL = RendezvousSettings().reap_interval


_REG = RegistryConfig()
_BEACON = BeaconConfig()


RENDEZVOUS_OPTIONS: tuple[Setting | Switch, ...] = (
    Setting("listen", DEFAULT_LISTEN, parse_address, "ADDR",
           "registry TCP address, [HOST]:PORT (port 0: any free port)"),
    Setting("beacon", DEFAULT_BEACON, parse_address, "ADDR",
           "beacon UDP address, [HOST]:PORT (port 0: any free port)"),
    Setting("store", None, parse_path, "PATH",
           "registry store (JSON, written atomically); default: /var/lib/pilot/registry.json "
           "if that folder is writable, else ~/.pilot/registry.json"),
    Switch("no-store", "keep the registry in memory only (nothing is written)"),
    Switch("durable", "acknowledge a change only once the store holding it is on disk "
                      "(group commit; slower, survives kill -9)"),
    Switch("tls", "serve the registry over TLS (a self-signed certificate unless --tls-cert/--tls-key)"),
    Setting("tls-cert", None, parse_path, "PATH", "TLS certificate (PEM); implies --tls"),
    Setting("tls-key", None, parse_path, "PATH", "TLS private key (PEM); implies --tls"),
    Setting("log-format", None, log.check_format, "FORMAT",
           f"log format: {' or '.join(log.FORMATS)} (default: {log.DEFAULT_FORMAT}; under twistd "
           f"or twist, theirs unless this is given)"),
    Setting("log-level", None, log.level_name, "LEVEL",
           f"lowest level logged: {', '.join(log.LEVELS)} (default: {log.DEFAULT_LEVEL})"),
    Setting("registrations-per-minute", _fmt(_REG.registrations_per_minute), parse_rate, "N",
           "registrations per source IP per minute (0: no limit)"),
    Setting("requests-per-second", _fmt(_REG.requests_per_second), parse_rate, "N",
           "registry requests per source IP per second (0: no limit)"),
    Setting("request-burst", _fmt(_REG.request_burst), parse_amount, "N",
           "registry requests a source IP may send at once before --requests-per-second applies"),
    Setting("stale-after", _fmt(_REG.stale_after), parse_expiry, "SECONDS",
           "remove a node silent for this long (0: never)"),
    Setting("forget-keys-after", _fmt(_REG.key_retention), parse_expiry, "SECONDS",
           "forget the key (and trust) of a node gone this long; until then it keeps its id (0: never)"),
    Setting("beacon-datagrams-per-second", _fmt(_BEACON.datagrams_per_second), parse_rate, "N",
           "beacon datagrams per source IP per second (0: no limit)"),
    Setting("beacon-burst", _fmt(_BEACON.burst), parse_amount, "N",
           "beacon datagrams a source IP may send at once before the rate applies"),
    Setting("relay-bytes-per-second", _fmt(_BEACON.relay_bytes_per_second), parse_rate, "N",
           "bytes the beacon relays per sending node per second (0: no limit)"),
    Setting("relay-burst-bytes", _fmt(_BEACON.relay_burst_bytes), parse_amount, "N",
           "bytes a node may have relayed at once before the rate applies"),
    Setting("connections-per-address", str(RendezvousSettings().max_per_address), parse_rate, "N",
           "registry connections one source IP may hold at once (0: no limit)"),
    Setting("http", None, parse_address, "ADDR",
           "serve the dashboard, /api/stats and /metrics over HTTP on [HOST]:PORT (default: off)"),
    Switch("metrics-public", "serve /metrics to every peer of --http (default: loopback peers only)"),
    Setting("busy-poll", str(RENDEZVOUS_BUSY_POLL), parse_microseconds, "MICROSECONDS",
           "after serving requests, poll this long before the reactor sleeps (0: off): lower latency "
           "for clients that wait for each answer, while it pays and the machine is not contended "
           "(docs/performance.md)"),
    Setting("flush-delay", _fmt(DEFAULT_FLUSH_DELAY), parse_delay, "SECONDS",
           "write the store at most this long after a change"),
    Setting("reap-interval", _fmt(DEFAULT_REAP_INTERVAL), parse_duration, "SECONDS",
           "how often silent nodes are looked for"),
    Setting("replication-token-file", None, parse_path, "PATH",
           "the primary/standby pair's shared token, read from this file (or PILOT_REPLICATION_TOKEN; "
           "never on the command line); a primary with it accepts standbys (docs/deploy.md)"),
    Setting("standby", None, parse_server, "PRIMARY:PORT",
           "run as a standby of this primary: follow its store, answer reads, refuse writes, take over "
           "when it is silent (needs the replication token)"),
    Setting("takeover-after", _fmt(TAKEOVER_AFTER), parse_duration, "SECONDS",
           "a standby takes over after its primary has been silent this long"),
    Switch("sync-replication", "acknowledge a change only once a standby holds it (or --sync-timeout "
                               "passed; then it is acknowledged anyway, and logged)"),
    Setting("sync-timeout", _fmt(SYNC_TIMEOUT), parse_duration, "SECONDS",
           "with --sync-replication, the longest a reply waits for a standby"),
    Setting("primary-fingerprint", None, str, "SHA256",
           "a standby of a TLS primary: the primary's certificate fingerprint (hex), pinned"),
)

#: The environment variable that may hold the replication token itself.
TOKEN_VARIABLE = "PILOT_REPLICATION_TOKEN"


def parse_values(raw: Mapping[str, Any],
                 name: Callable[[Setting | Switch], str] = flag_name) -> dict[str, Any]:
    """
    Parse every option of :data:`RENDEZVOUS_OPTIONS` found in ``raw`` (keys
    with underscores; flags as booleans; absent or None valued options take
    their defaults) and check the combinations.  Raises ``ValueError`` whose
    message starts with the option at fault, as ``name`` calls it.
    """
    out = parse_table(RENDEZVOUS_OPTIONS, raw, name)
    by_key = {o.key: o for o in RENDEZVOUS_OPTIONS}
    if out["no_store"] and raw.get("store") is not None:
        raise ValueError(f"{name(by_key['store'])} and {name(by_key['no_store'])}: choose one")
    if out["no_store"] and out["durable"]:
        raise ValueError(f"{name(by_key['durable'])} needs a store: drop {name(by_key['no_store'])}")
    if bool(out["tls_cert"]) != bool(out["tls_key"]):
        missing = by_key["tls_key" if out["tls_cert"] else "tls_cert"]
        raise ValueError(f"{name(missing)} is missing: a certificate and its key go together")
    if out["tls_cert"]:
        out["tls"] = True
    return out


def read_token(path: str | None, environ: Mapping[str, str]) -> bytes | None:
    """The replication token from ``path`` or the environment (ValueError if unusable)."""
    if path:
        try:
            with open(path, "rb") as f:
                token = f.read(8192).strip()
        except OSError as e:
            raise ValueError(f"--replication-token-file: cannot read {path}: {e.strerror or e}") from None
        where = path
    else:
        text = environ.get(TOKEN_VARIABLE)
        if text is None:
            return None
        token, where = text.strip().encode("utf-8", "surrogateescape"), TOKEN_VARIABLE
    if len(token) < 16:
        raise ValueError(f"the replication token in {where} is {len(token)} bytes: use at least 16 "
                         f"random ones (for example `head -c 32 /dev/urandom | base64`)")
    return token


def values_from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Raw values from ``PILOT_<NAME>`` variables; ``PILOT_STORE=none`` means ``--no-store``."""
    def store_none(key: str, text: str) -> dict[str, Any] | None:
        return {"no_store": True} if key == "store" and text.strip().lower() == "none" else None
    return environment_values(RENDEZVOUS_OPTIONS, environ, store_none)


def settings_from(values: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> RendezvousSettings:
    """Settings from the output of :func:`parse_values` (the token may come from ``environ``)."""
    environ = os.environ if environ is None else environ
    store = None if values["no_store"] else (values["store"] or default_store_path())
    registry = attr.evolve(
        _REG,
        stale_after=values["stale_after"],
        key_retention=values["forget_keys_after"],
        registrations_per_minute=values["registrations_per_minute"],
        requests_per_second=values["requests_per_second"],
        request_burst=values["request_burst"],
    )
    beacon = attr.evolve(
        _BEACON,
        datagrams_per_second=values["beacon_datagrams_per_second"],
        burst=values["beacon_burst"],
        relay_bytes_per_second=values["relay_bytes_per_second"],
        relay_burst_bytes=values["relay_burst_bytes"],
    )
    return RendezvousSettings(
        listen=values["listen"],
        beacon_listen=values["beacon"],
        store=store,
        tls=values["tls"],
        tls_cert=values["tls_cert"],
        tls_key=values["tls_key"],
        registry=registry,
        beacon=beacon,
        flush_delay=values["flush_delay"],
        max_per_address=int(values["connections_per_address"]),
        durable=values["durable"],
        reap_interval=values["reap_interval"],
        replication=replication_from(values, environ),
        http=values["http"],
        metrics_public=values["metrics_public"],
        busy_poll=values["busy_poll"] / 1e6,
    )


def replication_from(values: Mapping[str, Any], environ: Mapping[str, str]) -> ReplicationSettings:
    token = read_token(values.get("replication_token_file"), environ)
    standby = values.get("standby")
    if standby and token is None:
        raise ValueError(f"--standby needs the replication token: --replication-token-file PATH or "
                         f"{TOKEN_VARIABLE}")
    if values.get("sync_replication") and token is None:
        raise ValueError(f"--sync-replication needs a pair: --replication-token-file PATH or {TOKEN_VARIABLE}")
    return ReplicationSettings(token=token, standby_of=standby, takeover_after=values["takeover_after"],
                               sync=bool(values.get("sync_replication")), sync_timeout=values["sync_timeout"],
                               primary_fingerprint=values.get("primary_fingerprint"))


# --- twistd -------------------------------------------------------------------------

class RendezvousOptions(usage.Options):
    synopsis = "[options]"
    longdesc = ("Run a Pilot rendezvous: the registry on TCP (--listen, default :9000) and the "
                "beacon on UDP (--beacon, default :9001), in one process, with the registry's "
                "state kept in a JSON store.")

    optFlags = [[o.name, None, o.help] for o in RENDEZVOUS_OPTIONS if isinstance(o, Switch)]
    optParameters = [[o.name, None, o.default, o.help] for o in RENDEZVOUS_OPTIONS
                     if isinstance(o, Setting)]

    parsed: dict[str, Any]
    settings: RendezvousSettings

    compData = usage.Completions(optActions={
        "store": usage.CompleteFiles("*.json"),
        "tls-cert": usage.CompleteFiles("*.pem"),
        "tls-key": usage.CompleteFiles("*.pem"),
        "log-format": usage.CompleteList(list(log.FORMATS)),
        "log-level": usage.CompleteList(list(log.LEVELS)),
    })

    def postOptions(self) -> None:
        try:
            self.parsed = parse_values({o.key: self[o.name] for o in RENDEZVOUS_OPTIONS})
            self.settings = settings_from(self.parsed)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self._choose_twistd_logger()

    def _choose_twistd_logger(self) -> None:
        """
        Under twistd or twist, ``--log-format`` / ``--log-level`` given here
        choose the runner's log observer: twistd's ``logger`` option (unless
        twistd was given ``--logger``, which wins), or twist's observer factory
        and level.
        """
        parent = getattr(self, "parent", None)
        fmt, level = self.parsed["log_format"], self.parsed["log_level"]
        if parent is None or (fmt is None and level is None):
            return
        fmt, level = fmt or log.DEFAULT_FORMAT, level or log.DEFAULT_LEVEL
        if "nodaemon" in parent:  # twistd
            if not parent.get("logger"):
                parent["logger"] = log.choose_for_twistd(fmt, level, parent.get("logfile"),
                                                         bool(parent.get("nodaemon")))
        elif "fileLogObserverFactory" in parent:  # twist
            if self.parsed["log_format"] is not None:
                parent["fileLogObserverFactory"] = log.file_observer_factory(fmt)
                parent["logFormat"] = fmt
            if self.parsed["log_level"] is not None:
                parent["logLevel"] = log.parse_level(level)


#: The plugin's ServiceMaker looks up ``Options`` and ``makeService`` in this module.
Options = RendezvousOptions


class StartupError(Exception):
    """The service cannot be built from these settings: why, what to do, and the error code."""

    def __init__(self, message: str, hint: str, code: ErrorCode = ErrorCode.invalid_argument) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


def build_service(settings: RendezvousSettings, reactor: Any) -> RendezvousService:
    """
    The service for ``settings`` on ``reactor``; :class:`StartupError` with
    one line for a store, certificate or key that cannot be used.
    """
    try:
        with collector_paused():  # the store's nodes and the writer's view of them: no garbage yet
            service = RendezvousService(settings, reactor)
            # what was loaded lives as long as the process: out of the collector's generations, so
            # that no full collection walks every node of the store on the reactor (~0.1 s at
            # 100,000 nodes); frozen before the collector resumes, or its first collection would
            # walk every object made since it paused (~5 ms at 10,000 nodes)
            gc.freeze()
    except StoreError as e:
        raise StartupError(f"cannot load the registry store {e}",
                           "move the file aside, or choose another with --store (or --no-store)",
                           ErrorCode.malformed) from e
    except StateFileError as e:
        raise StartupError(f"cannot use {e}", "check --tls-cert and --tls-key") from e
    except PilotError as e:
        raise StartupError(e.message, e.hint, e.code) from e
    except OSError as e:
        where = f" {e.filename}:" if e.filename else ""
        raise StartupError(f"cannot start:{where} {e.strerror or e}",
                           "check the paths given and their permissions") from e
    return service


def install_reactor_without_tls() -> None:
    """
    Install the global reactor without its TLS support, for a rendezvous that
    uses no TLS: Twisted's reactor otherwise loads pyOpenSSL and
    ``cryptography``'s X.509 modules whatever the ports, about 0.1 s of CPU
    of the ~0.45 s a start takes (``docs/performance.md``, issue 16).  Done
    only when the reactor is not installed yet (a real start, not a test);
    pyOpenSSL stays importable afterwards.
    """
    if "twisted.internet.reactor" in sys.modules or "twisted.internet.tcp" in sys.modules:
        return
    hidden = sys.modules.get("OpenSSL", _MISSING)
    # makes ``import OpenSSL`` fail: Twisted goes without
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]
    try:
        from twisted.internet import reactor  # noqa: F401 (installed now)
    finally:
        if hidden is _MISSING:
            del sys.modules["OpenSSL"]
        else:
            sys.modules["OpenSSL"] = hidden


_MISSING: Any = object()


def makeService(options: RendezvousOptions) -> StartupGuard:
    """The rendezvous, guarded: a busy port at start is one line, not a traceback (``pilot.startup``)."""
    # twistd has installed the reactor by now; this edge is where it is named.
    from twisted.internet import reactor

    try:
        return StartupGuard(build_service(options.settings, reactor), TAPNAME)
    except StartupError as e:
        raise SystemExit(f"{TAPNAME}: error: {e}") from None
