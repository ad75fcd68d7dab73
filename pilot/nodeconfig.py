# -*- test-case-name: tests.test_nodeconfig -*-
"""
The node daemon's settings, and where they come from.

Precedence, highest first (``docs/config.md``):

1. command-line flags (``pilotctl daemon start --registry ...``,
   ``twistd pilot-node --registry ...``);
2. environment variables ``PILOT_<NAME>`` (``PILOT_REGISTRY``,
   ``PILOT_HOSTNAME``...);
3. ``$PILOT_HOME/config.json``: a flat JSON object whose keys are the
   option names (hyphens or underscores), plus ``auto_approve``;
4. the defaults below.

``--registry`` and ``--beacon`` take one ``HOST:PORT`` or a comma-separated
list, paired by index (``docs/config.md``, "A list of rendezvous servers");
:attr:`NodeSettings.registries`, :attr:`~NodeSettings.beacons` and
:attr:`~NodeSettings.fingerprints` give the entries.

``PILOT_HOME`` (default ``~/.pilot``) holds the identity, the trust store,
the config file, the control socket, the pid file and the log.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import attr

from pilot import log
from pilot.endpoint import format_endpoint, parse_host_port
from pilot.errors import InvalidArgument, PilotError
from pilot.identity import default_home
from pilot.machines.registration.servers import MAX_SERVERS
from pilot.machines.trust import AutoApprove
from pilot.names import hostname_problem, normalise_tags
from pilot.options import (DAEMON_BUSY_POLL, Setting, Switch, environment_values, parse_address, parse_duration,
                           parse_microseconds, parse_path, parse_server, parse_table)
from pilot.persist import StateFileError, read_json_object

DEFAULT_REGISTRY = "127.0.0.1:9000"
BEACON_PORT = 9001
#: Heartbeats every 50 s (25 s to a registry that does not push events): the registry forgets a
#: node after 180 s of silence (``pilot.machines.registration.HEARTBEAT_INTERVAL``).
DEFAULT_HEARTBEAT = 50.0


def parse_hostname(text: str) -> str:
    problem = hostname_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


def parse_tags(text: str) -> list[str]:
    tags = [t for t in text.replace(",", " ").split() if t]
    try:
        return normalise_tags(tags)
    except ValueError as e:
        raise ValueError(str(e)) from None


def parse_server_list(text: str) -> str:
    """
    One rendezvous server or a comma-separated list (``a:9000,b:9000``), in
    normal form; at most MAX_SERVERS entries, none empty, none twice.
    """
    entries = [entry.strip() for entry in text.split(",")]
    if len(entries) > MAX_SERVERS:
        raise ValueError(f"{len(entries)} servers given; at most {MAX_SERVERS}")
    out: list[str] = []
    for i, entry in enumerate(entries):
        if not entry:
            raise ValueError(f"entry {i + 1} of {text.strip()!r} is empty")
        normal = parse_server(entry)
        if normal in out:
            raise ValueError(f"{normal} is listed twice")
        out.append(normal)
    return ",".join(out)


def parse_fingerprints(text: str) -> str:
    """One TLS fingerprint for every server, or a comma-separated list, one per registry entry."""
    entries = [entry.strip() for entry in text.split(",")]
    if any(not entry for entry in entries):
        raise ValueError(f"an empty fingerprint in {text.strip()!r}")
    if len(entries) > MAX_SERVERS:
        raise ValueError(f"{len(entries)} fingerprints given; at most {MAX_SERVERS}")
    return ",".join(entries)


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not true or false")


NODE_OPTIONS: tuple[Setting | Switch, ...] = (
    Setting("registry", None, parse_server_list, "HOST:PORT[,HOST:PORT...]",
            f"the rendezvous registry, or a list to fail over along (default: {DEFAULT_REGISTRY})"),
    Setting("beacon", None, parse_server_list, "HOST:PORT[,HOST:PORT...]",
            f"the rendezvous beacon, or one per registry in the same order (default: each registry's host, "
            f"port {BEACON_PORT})"),
    Setting("hostname", None, parse_hostname, "NAME", "this node's hostname"),
    Setting("listen", ":0", parse_address, "ADDR",
            "UDP address of the tunnel socket, [HOST]:PORT (port 0: any free port)"),
    Switch("public", "make this node public (anyone may resolve its endpoint)"),
    Setting("tags", None, parse_tags, "TAGS", "tags, separated by commas or spaces"),
    Setting("identity", None, parse_path, "PATH", "identity file (default: $PILOT_HOME/identity.json)"),
    Setting("socket", None, parse_path, "PATH", "control socket (default: $PILOT_HOME/pilot.sock)"),
    Setting("registry-fingerprint", None, parse_fingerprints, "SHA256[,SHA256...]",
            "the registry serves TLS; accept only the certificate with this SHA-256 fingerprint "
            "(one for every registry, or one per registry in the same order)"),
    Setting("heartbeat", str(int(DEFAULT_HEARTBEAT)), parse_duration, "SECONDS",
            "seconds between registry heartbeats"),
    Setting("log-format", None, log.check_format, "FORMAT", f"log format: {' or '.join(log.FORMATS)}"),
    Setting("log-level", None, log.level_name, "LEVEL", f"lowest level logged: {', '.join(log.LEVELS)}"),
    Setting("metrics", None, parse_address, "ADDR",
            "serve Prometheus /metrics over HTTP on [HOST]:PORT (no host: 127.0.0.1; default: off)"),
    Setting("busy-poll", str(DAEMON_BUSY_POLL), parse_microseconds, "MICROSECONDS",
            "after handling packets, poll this long before sleeping (0: off): lower latency for pings and "
            "request/response traffic, while it pays and the machine is not contended (docs/performance.md)"),
)


@attr.s(frozen=True, auto_attribs=True)
class NodeSettings:
    home: str
    identity: str
    socket: str
    registry: str = DEFAULT_REGISTRY
    beacon: str = ""
    hostname: str | None = None
    listen: str = ":0"
    public: bool = False
    tags: tuple[str, ...] = ()
    registry_fingerprint: str | None = None
    heartbeat: float = DEFAULT_HEARTBEAT
    auto_approve: AutoApprove = attr.Factory(AutoApprove)
    log_format: str | None = None
    log_level: str | None = None
    #: The HTTP address of /metrics (docs/operations.md); None: not served.
    metrics: str | None = None
    #: Seconds the reactor polls without sleeping after handling packets (0: off; pilot/services/busypoll.py).
    busy_poll: float = DAEMON_BUSY_POLL / 1e6

    @property
    def registries(self) -> tuple[str, ...]:
        """The registry entries, in order (``--registry a:9000,b:9000``)."""
        return tuple(self.registry.split(","))

    @property
    def beacons(self) -> tuple[str, ...]:
        """The beacon entries, paired by index with :attr:`registries`."""
        return tuple(self.beacon.split(","))

    @property
    def fingerprints(self) -> tuple[str | None, ...]:
        """The TLS fingerprint of each registry entry (None: plain TCP)."""
        if not self.registry_fingerprint:
            return (None,) * len(self.registries)
        pins = tuple(self.registry_fingerprint.split(","))
        return pins * len(self.registries) if len(pins) == 1 else pins

    @property
    def trust_path(self) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(self.identity)), "trust.json")

    @property
    def pid_path(self) -> str:
        return os.path.join(self.home, "pilot.pid")

    @property
    def log_path(self) -> str:
        return os.path.join(self.home, "pilot.log")


def check_pairs(registry: str, beacon: str, fingerprints: str | None, config: str) -> None:
    """The beacon (and fingerprint) lists pair with the registry list: InvalidArgument otherwise."""
    hint = f"give --registry and --beacon (PILOT_REGISTRY, PILOT_BEACON, {config}) lists in the same order"
    count = len(registry.split(","))
    if len(beacon.split(",")) != count:
        raise InvalidArgument(f"{count} registry entries but {len(beacon.split(','))} beacon entries", hint)
    pins = len(fingerprints.split(",")) if fingerprints else 1
    if pins not in (1, count):
        raise InvalidArgument(f"{count} registry entries but {pins} TLS fingerprints",
                              "give one fingerprint for every registry, or one per registry in the same order")


def config_path(home: str) -> str:
    return os.path.join(home, "config.json")


def read_config(home: str) -> dict[str, Any]:
    """``$PILOT_HOME/config.json`` as raw option values; missing = {}; broken = InvalidArgument."""
    path = config_path(home)
    try:
        value = read_json_object(path)
    except FileNotFoundError:
        return {}
    except StateFileError as e:
        if isinstance(e.__cause__, OSError):  # unreadable, or PILOT_HOME is not a usable directory
            raise InvalidArgument(f"cannot use {e}", "PILOT_HOME (default ~/.pilot) must be a directory this "
                                  "user can write: fix its permissions or point PILOT_HOME elsewhere") from None
        raise InvalidArgument(f"cannot use {e}", f"fix or remove {path}") from None
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def load_settings(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None,
                  home: str | None = None) -> NodeSettings:
    """Settings from flags, then ``PILOT_*`` variables, then config.json, then defaults."""
    environ = os.environ if environ is None else environ
    home = os.path.abspath(os.path.expanduser(home or environ.get("PILOT_HOME") or default_home()))
    config = read_config(home)
    raw: dict[str, Any] = {}
    known = {o.key for o in NODE_OPTIONS}
    for key, value in config.items():
        if key == "auto_approve" or key not in known:
            continue
        if isinstance(value, bool):
            raw[key] = value if key == "public" else str(value).lower()
        elif isinstance(value, list):
            raw[key] = ",".join(str(v) for v in value)
        elif value is not None:
            raw[key] = str(value)
    try:
        raw.update(environment_values(NODE_OPTIONS, environ))
    except ValueError as e:
        raise InvalidArgument(str(e), "check the PILOT_* variables") from None
    for key, value in flags.items():
        if value is not None and value is not False and key in known:
            raw[key] = value
    if isinstance(raw.get("public"), str):
        try:
            raw["public"] = parse_bool(raw["public"])
        except ValueError as e:
            raise InvalidArgument(f"public: {e}", f"fix it in {config_path(home)}") from None
    try:
        values = parse_table(NODE_OPTIONS, raw)
        auto = AutoApprove.from_config(config.get("auto_approve"))
    except (ValueError, PilotError) as e:
        raise InvalidArgument(str(e), f"check the flags, PILOT_* variables and {config_path(home)}") from None
    registry = values["registry"] or DEFAULT_REGISTRY
    beacon = values["beacon"] or ",".join(format_endpoint(parse_host_port(entry)[0], BEACON_PORT)
                                          for entry in registry.split(","))
    check_pairs(registry, beacon, values["registry_fingerprint"], config_path(home))
    return NodeSettings(
        home=home,
        identity=values["identity"] or os.path.join(home, "identity.json"),
        socket=values["socket"] or environ.get("PILOT_SOCKET") or os.path.join(home, "pilot.sock"),
        registry=registry,
        beacon=beacon,
        hostname=values["hostname"],
        listen=values["listen"],
        public=bool(values["public"]),
        tags=tuple(values["tags"] or ()),
        registry_fingerprint=values["registry_fingerprint"],
        heartbeat=values["heartbeat"],
        auto_approve=auto,
        log_format=values["log_format"],
        log_level=values["log_level"],
        metrics=values["metrics"],
        busy_poll=values["busy_poll"] / 1e6,
    )
