# -*- test-case-name: tests.test_cli_daemon -*-
"""
pilotctl ``init`` and ``daemon start|stop|status``: the node's identity and
its daemon's lifecycle.

``daemon start`` runs the node in the background by default: it starts
``python -m pilot daemon start --foreground`` in a new session (a process
that declares a few optional modules absent, ``pilot.entry``) with its
output in ``$PILOT_HOME/pilot.log``, then waits until the daemon answers on
its control socket and has registered, and prints ``Registered as NAME
(ADDRESS)``.  If the registry cannot be reached, it reports
``registry_unavailable`` (exit 8) with the registry's last answer and leaves
the daemon running: it keeps retrying.  ``--foreground`` runs the node in
this process until SIGTERM or SIGINT.  ``--hostname``, ``--registry`` and
``--beacon`` are remembered in config.json, as ``init`` remembers them.
"""

from __future__ import annotations

import gc
import os
import signal
import stat
import subprocess
import sys
import time
from typing import Any

from pilot import entry, log
from pilot.cli import COMMANDS, Context, Result, arg
from pilot.errors import (
    AlreadyExists, ConnectionFailed, ErrorCode, InvalidArgument, NotRunning, PilotError, RegistryUnavailable,
    Timeout,
)
from pilot.identity import Identity, default_home
from pilot.nodeconfig import NODE_OPTIONS, config_path, load_settings, read_config
from pilot.options import Switch
from pilot.persist import StateFileError, atomic_write_json

#: How long ``daemon start`` waits for the daemon to register before it reports.
START_WAIT = 15.0
STOP_WAIT = 10.0


def _home(ctx: Context) -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("PILOT_HOME") or default_home()))


# --- init -------------------------------------------------------------------------------

@COMMANDS.command(
    "init", "make this node's identity (once) and remember its settings",
    arg("--hostname", help="this node's hostname (saved in config.json)"),
    arg("--registry", help="the rendezvous registry HOST:PORT, or a comma-separated list to fail over "
                           "along (saved in config.json)"),
    arg("--beacon", help="the rendezvous beacon HOST:PORT, or one per registry in the same order "
                         "(saved in config.json)"),
    arg("--force", action="store_true", help="replace an existing identity (a new key: a new address)"),
    description="Make the Ed25519 identity in $PILOT_HOME/identity.json (default ~/.pilot), once,\n"
                "and print its public key and virtual address.  Running it again keeps the key\n"
                "(unless --force) and updates the saved settings.",
)
def init(ctx: Context) -> Result:
    home = _home(ctx)
    given = {k: getattr(ctx.args, k) for k in ("hostname", "registry", "beacon") if getattr(ctx.args, k)}
    # validate the settings exactly as the daemon will read them
    load_settings(given, environ={"PILOT_HOME": home})
    path = os.path.join(home, "identity.json")
    created = False
    try:
        identity = Identity.load(path)
        if ctx.args.force:
            raise FileNotFoundError
    except FileNotFoundError:
        identity = Identity.generate()
        os.makedirs(home, mode=0o700, exist_ok=True)
        identity.save(path)
        created = True
    except StateFileError as e:
        raise InvalidArgument(f"cannot use {e}",
                              "restore the file from a backup, or pass --force to make a new identity "
                              "(a new key is a new address)") from None
    if given:
        config = read_config(home)
        config.update(given)
        atomic_write_json(config_path(home), config, mode=0o600)
    data = {"identity": path, "created": created, "public_key": identity.public_key_b64,
            "address": str(identity.address), "node_id": identity.address.node,
            **({"hostname": given["hostname"]} if "hostname" in given else {})}
    verb = "Identity created" if created else "Identity exists"
    text = "\n".join([f"{verb}: {path}",
                      f"Public key: {identity.public_key_b64} (Ed25519)",
                      f"Virtual address: {identity.address}"]
                     + ([f"Hostname: {given['hostname']}"] if "hostname" in given else []))
    return Result(data, text)


# --- daemon -------------------------------------------------------------------------------

COMMANDS.group("daemon", "start, stop and inspect the node daemon")


def _node_args() -> tuple[Any, ...]:
    out = []
    for opt in NODE_OPTIONS:
        if isinstance(opt, Switch):
            out.append(arg(f"--{opt.name}", dest=opt.key, action="store_true", default=None, help=opt.help))
        else:
            out.append(arg(f"--{opt.name}", dest=opt.key, metavar=opt.metavar, default=None, help=opt.help))
    return tuple(out)


def _client(socket_path: str, timeout: float = 5.0) -> Any:
    from pilot.control_client import ControlClient
    return ControlClient(socket_path, timeout)


def _running_info(socket_path: str) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = _client(socket_path, 2.0).call("info")
        return info
    except (NotRunning, ConnectionFailed, Timeout):
        return None  # nobody there, or a daemon closing its socket as it stops


@COMMANDS.command(
    "daemon start", "start the node daemon (in the background unless --foreground)",
    *_node_args(),
    arg("--foreground", action="store_true", help="run in this process until SIGTERM or SIGINT"),
    arg("--wait", type=float, default=START_WAIT, metavar="SECONDS",
        help=f"how long to wait for the registration (default {START_WAIT:g})"),
    description="Start the node: register with the rendezvous, keep the registration and NAT\n"
                "mappings alive, serve tunnels and the control socket.  Settings: flags, then\n"
                "PILOT_* variables, then $PILOT_HOME/config.json (docs/config.md).",
)
def daemon_start(ctx: Context) -> Result | None:
    flags = {o.key: getattr(ctx.args, o.key, None) for o in NODE_OPTIONS}
    settings = load_settings(flags)
    if _running_info(settings.socket) is not None:
        raise AlreadyExists("the daemon is already running",
                            "`pilotctl daemon status` shows it; `pilotctl daemon stop` stops it")
    if not os.path.exists(settings.identity):
        identity = Identity.generate()
        os.makedirs(os.path.dirname(os.path.abspath(settings.identity)), mode=0o700, exist_ok=True)
        identity.save(settings.identity)
    _remember(settings.home, flags)
    if ctx.args.foreground:
        _run_foreground(ctx, settings)
        return None  # the daemon ran until a signal; its log said everything
    return _start_background(ctx, settings)


#: The settings ``daemon start`` keeps in config.json, as ``init`` does.
REMEMBERED = ("hostname", "registry", "beacon")


def _remember(home: str, flags: dict[str, Any]) -> None:
    """
    Save ``--hostname``, ``--registry`` and ``--beacon`` in config.json, so
    that ``daemon start --hostname my-agent`` without ``init`` (the first
    article's first command) registers the same name at the next plain start.
    """
    given = {k: flags[k] for k in REMEMBERED if flags.get(k)}
    if not given:
        return
    config = read_config(home)
    if all(config.get(k) == v for k, v in given.items()):
        return
    config.update(given)
    os.makedirs(home, mode=0o700, exist_ok=True)
    atomic_write_json(config_path(home), config, mode=0o600)


def load_node(settings: Any) -> Any:
    """
    Import the node daemon for ``daemon start --foreground``: its service
    module, and nothing the daemon does not use (``tests.test_daemon_imports``
    checks which modules a daemon holds; :mod:`pilot.entry` declares the
    optional ones absent in the daemon's process).  Returns
    :mod:`pilot.services.node`.
    """
    if not settings.registry_fingerprint and entry.in_daemon_process():
        # no TLS to the registry: pyOpenSSL declared absent before the reactor's TCP support looks
        # for it (pilot.entry says what the daemon's process declares absent, and why)
        entry.declare_absent(entry.ABSENT_WITHOUT_TLS)
    from pilot.services import node
    return node


def _run_foreground(ctx: Context, settings: Any) -> None:
    node = load_node(settings)
    NodeService, NodeStartupError = node.NodeService, node.NodeStartupError
    reactor = ctx.get_reactor()
    log.start_logging(settings.log_format or log.DEFAULT_FORMAT, ctx.out.stderr,
                      settings.log_level or log.DEFAULT_LEVEL)
    try:
        service = NodeService(settings, reactor)
    except NodeStartupError as e:
        raise PilotError(e.message, e.hint, code=e.code) from None
    service.startService()
    # what the start loaded lives as long as the process: out of the collector's generations, so
    # that a full collection walks what streams and peers hold, not every module (~60,000
    # objects, a 30-40 ms pause in the middle of a ping series; docs/performance.md); the start's
    # own garbage collected first, or it would stay for good
    gc.collect()
    gc.freeze()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


def _start_background(ctx: Context, settings: Any) -> Result:
    os.makedirs(settings.home, mode=0o700, exist_ok=True)
    argv = [sys.executable, "-m", "pilot", "daemon", "start", "--foreground"]
    for opt in NODE_OPTIONS:
        value = getattr(ctx.args, opt.key, None)
        if value is None or value is False:
            continue
        argv += [f"--{opt.name}"] if value is True else [f"--{opt.name}", str(value)]
    env = dict(os.environ, PILOT_HOME=settings.home)
    try:
        log_start = os.path.getsize(settings.log_path)
    except OSError:
        log_start = 0
    with open(settings.log_path, "ab") as logfile:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                                env=env, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + max(ctx.args.wait, 0.5)
    info = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            # the foreground daemon exits with its error's code: pass it on
            code = proc.returncode if proc.returncode in ErrorCode._value2member_map_ else ErrorCode.internal
            raise PilotError(f"the daemon exited at start: {_log_tail(settings.log_path, log_start)}",
                             f"the whole log is in {settings.log_path}", code=ErrorCode(code))
        info = _running_info(settings.socket)
        registry = (info or {}).get("registry", {})
        failures = registry.get("consecutive_failures")
        # with a list of rendezvous servers, as many attempts on each (docs/registration.md)
        give_up = GIVE_UP_AFTER * len(settings.registries)
        if registry.get("state") == "registered" or (isinstance(failures, int) and failures >= give_up):
            break
        time.sleep(0.05)
    if info is None:
        raise Timeout(f"the daemon (pid {proc.pid}) did not open its control socket in {ctx.args.wait:g} s",
                      f"see {settings.log_path}")
    data = {"pid": proc.pid, "address": info.get("address"), "hostname": info.get("hostname"),
            "node_id": info.get("node_id"), "registry": info.get("registry"), "log": settings.log_path}
    registry = info.get("registry", {})
    if registry.get("state") == "registered":
        name = info.get("hostname") or info.get("address")
        return Result(data, f"Registered as {name} ({info.get('address')})")
    raise not_registered(proc.pid, info, settings.registry, ctx.args.wait)


#: ``daemon start`` stops waiting after this many failed attempts to reach the registry (per entry of a list).
GIVE_UP_AFTER = 3


def not_registered(pid: int, info: dict[str, Any], server: str, waited: float) -> RegistryUnavailable:
    """
    The daemon runs but has not registered: ``registry_unavailable``, with
    the registry's last answer (``Connection refused``...) in the message.
    The daemon is left running: it keeps retrying, as it does when the
    rendezvous goes away later.
    """
    registry = info.get("registry", {})
    reason = registry.get("last_error") or registry.get("error") or f"no answer in {waited:g} s"
    return RegistryUnavailable(
        f"the daemon (pid {pid}, {info.get('address')}) could not register with {server}: {reason}",
        "it keeps retrying in the background; check --registry, "
        "`pilotctl daemon status` shows progress, `pilotctl daemon stop` stops it")


def _log_tail(path: str, start: int = 0, lines: int = 5) -> str:
    """The last lines this start wrote to the log (from byte ``start``)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(start, f.tell() - 4000))
            tail = f.read().decode("utf-8", "replace").strip().splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return " | ".join(tail)


@COMMANDS.command("daemon stop", "stop the node daemon (it deregisters first)",
                  arg("--socket", help="control socket (default: $PILOT_HOME/pilot.sock)"))
def daemon_stop(ctx: Context) -> Result:
    settings = load_settings({"socket": ctx.args.socket})
    pid = _read_pid(settings.pid_path)
    try:
        _client(settings.socket).call("shutdown")
    except NotRunning:
        removed = _remove_stale(settings, pid)
        left = f" (it had stopped without cleaning up; removed {' and '.join(removed)})" if removed else ""
        raise NotRunning(f"the daemon is not running{left}", "`pilotctl daemon start` starts it") from None
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline:
        if _running_info(settings.socket) is None and (pid is None or not _alive(pid)):
            return Result({"status": "stopped", "pid": pid}, "Daemon stopped")
        time.sleep(0.05)
    if pid is not None and _alive(pid):
        os.kill(pid, signal.SIGTERM)
    raise Timeout(f"the daemon did not stop within {STOP_WAIT:g} s; sent it SIGTERM",
                  f"check `pilotctl daemon status`; the log is {settings.log_path}")


def _remove_stale(settings: Any, pid: int | None) -> list[str]:
    """
    After a crash: remove the pid file (if its process is gone) and the
    control socket (nobody answers on it); return what was removed.
    """
    if pid is not None and _alive(pid):
        return []  # a process with that pid runs: perhaps a daemon that does not answer; leave it be
    removed = []
    for path, kind in ((settings.pid_path, stat.S_ISREG), (settings.socket, stat.S_ISSOCK)):
        try:
            if not kind(os.lstat(path).st_mode):
                continue  # not what we left: not ours to remove
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


@COMMANDS.command("daemon status", "show whether the node daemon runs, and its registration",
                  arg("--socket", help="control socket (default: $PILOT_HOME/pilot.sock)"))
def daemon_status(ctx: Context) -> Result:
    settings = load_settings({"socket": ctx.args.socket})
    info = _running_info(settings.socket)
    if info is None:
        raise NotRunning("the daemon is not running", "`pilotctl daemon start` starts it")
    registry = info.get("registry", {})
    data = {"running": True, "pid": _read_pid(settings.pid_path), "address": info.get("address"),
            "hostname": info.get("hostname"), "registry": registry, "uptime_secs": info.get("uptime_secs")}
    text = (f"Daemon running (pid {data['pid']}): {info.get('hostname') or '-'} {info.get('address')}, "
            f"registry {registry.get('server', '?')} {registry.get('state', '?')}"
            + (f" (term {registry['term']})" if registry.get("term") is not None else ""))
    return Result(data, text)


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Does ``pid`` run?  A zombie (dead, not yet reaped: a container's init may never reap it) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:
        return True  # no /proc (not Linux): the signal test is all there is

