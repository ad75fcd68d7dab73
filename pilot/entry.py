# -*- test-case-name: tests.test_entry -*-
"""
The process entry of ``pilotctl`` and ``python -m pilot``: what a server's
process prepares before its command imports anything.

Every module a process imports stays in its memory for good, and a server's
start pays for each one.  Two commands start a long-lived server in their own
process, and each is prepared here, before :func:`pilot.cli.main` imports
Twisted; any other command, the client API (``pilot.api``, ``pilot.aio``),
``twistd`` and the tests are left as they are.

**The node daemon** (``daemon start --foreground``, the command ``daemon
start`` runs in the background; issue 11, an idle daemon's memory).  It
imports the Python standard library through Twisted and asyncio, and some of
it only in case: asyncio, ``http.client`` and ``urllib.request`` import
``ssl`` if they can, and ``hashlib`` loads OpenSSL's ``libcrypto`` for its
digests if it can.  A daemon uses neither, and together they are about
4.5 MB of an idle daemon's 39 MB (``docs/performance.md``).  So its process
declares them absent (:data:`DAEMON_ABSENT`): a ``None`` entry in
``sys.modules``, which makes ``import ssl`` raise ``ImportError``, the case
those modules handle.

* ``ssl``: the daemon's only TLS (to a registry whose fingerprint is
  pinned) is pyOpenSSL's, through Twisted (``pilot.tls``), which does not use
  the standard library's ``ssl``;
* ``_hashlib``: OpenSSL's digests for ``hashlib``.  The daemon hashes a few
  short strings (addresses, a tunnel's key, replay keys); CPython's built-in
  SHA-256 serves them, and ``hashlib`` falls back to it by itself.
  ``cryptography`` (AES-GCM, pyOpenSSL) carries its own OpenSSL.
* :data:`ABSENT_WITHOUT_TLS`, declared by ``cli_daemon.load_node`` once the
  settings are read, when no registry fingerprint is pinned: ``OpenSSL``,
  pyOpenSSL, which Twisted's TCP support imports if it can (about 6 MB).
* :data:`NEEDED_FOR_METRICS`: kept when the daemon is asked for
  ``--metrics`` (:func:`asks_for_metrics`): ``prometheus_client`` imports
  ``ssl``.

**The rendezvous** (``rendezvous start``; issue 16, a restart answers
sooner).  :func:`begin_server_start`:

* pauses the cyclic garbage collector until :func:`end_server_start`: the
  imports and the store's load make hundreds of thousands of objects and no
  garbage, and some 70 collections walked them over and over (~15 ms of a
  10,000-node restart).  The server freezes what it loaded
  (``pilot.tap.build_service``) and then ends the pause, so no collection
  ever walks them;
* loads the modules of :data:`LOADED_ON_FIRST_USE` (that Twisted imports
  only to bind a name) on first use;
* declares those of :data:`RENDEZVOUS_ABSENT_UNLESS` absent, unless the
  command line gives a flag that needs them.

``docs/architecture.md``, "The daemon's process", keeps the same tables.  A
declaration never replaces a module already imported.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Any, Mapping, Optional, Sequence, cast

#: The command line the daemon's own process runs (``cli_daemon`` starts it so).
DAEMON_COMMAND = ("daemon", "start", "--foreground")
#: The command that starts a rendezvous in this process (after ``--json`` and flags).
RENDEZVOUS_COMMAND = ("rendezvous", "start")

#: Declared absent in the daemon's process, before any import (module -> why).
DAEMON_ABSENT: Mapping[str, str] = {
    "ssl": "the daemon's TLS is pyOpenSSL's (pilot.tls); asyncio, http.client and urllib import ssl only if "
           "they can",
    "_hashlib": "OpenSSL's digests for hashlib (libcrypto, about 3.4 MB resident); the daemon's few short "
                "SHA-256 digests use CPython's built-in one",
}

#: Declared absent in the daemon's process when no registry fingerprint is pinned (module -> why).
ABSENT_WITHOUT_TLS: Mapping[str, str] = {
    "OpenSSL": "pyOpenSSL, imported by Twisted's TCP support if it can; no TLS without a pinned fingerprint",
}

#: Not declared absent in the daemon's process when it is asked for ``--metrics`` (module -> why).
NEEDED_FOR_METRICS: Mapping[str, str] = {
    "ssl": "prometheus_client, which serves --metrics, imports it unconditionally",
}

#: Declared absent in a rendezvous' process unless one of the flags given needs them
#: (module -> (those flags, why)).
RENDEZVOUS_ABSENT_UNLESS: Mapping[str, tuple[tuple[str, ...], str]] = {
    "ssl": (("--http",), "the standard library's TLS, which asyncio imports if it can (Twisted imports "
                         "asyncio) and the rendezvous never uses: its TLS is pyOpenSSL's (pilot.tls); about "
                         "10 ms of a start and libssl's memory.  The dashboard's prometheus_client needs it"),
}

#: Modules that Twisted imports on every start only to bind a name, and that a rendezvous
#: never uses: loaded on first use instead (``importlib.util.LazyLoader``), name -> why.
LOADED_ON_FIRST_USE: Mapping[str, str] = {
    "http.cookiejar": "twisted.python.compat's old name cookielib; with urllib.request, http.client and "
                      "email, which it imports, about 10 ms of a start",
    "twisted.internet.unix": "UNIX sockets, which a rendezvous does not open (posixbase imports it for "
                             "listenUNIX)",
}

#: What this process declared absent (module -> why); empty outside a server's process.
declared: dict[str, str] = {}
#: Set by :func:`enter` in the daemon's process.
_daemon: list[bool] = []
#: Whether the collector was enabled when :func:`begin_server_start` paused it (while paused).
_paused: list[bool] = []


def _words(argv: Sequence[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-")]


def is_daemon_command(argv: Sequence[str]) -> bool:
    """
    Is ``argv`` (without the program's name) the daemon's own command,
    ``daemon start --foreground [OPTIONS]``, with ``--json`` perhaps first?
    """
    words = [a for a in argv if a != "--json"]
    return tuple(words[:3]) == DAEMON_COMMAND


def starts_rendezvous(argv: Sequence[str]) -> bool:
    """Is ``argv`` (without the program's name) ``rendezvous start [OPTIONS]``?"""
    return tuple(_words(argv)[:2]) == RENDEZVOUS_COMMAND


def declare_absent(modules: Mapping[str, str]) -> list[str]:
    """
    Declare ``modules`` absent from this process, those not imported yet;
    return their names.  Only a server's entry calls this.
    """
    names = []
    for name, why in modules.items():
        if name not in sys.modules:
            cast(Any, sys.modules)[name] = None  # None: "import NAME" raises ImportError
            declared[name] = why
            names.append(name)
    return names


def asks_for_metrics(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """
    Does the daemon's command line, environment or ``$PILOT_HOME/config.json``
    ask for ``--metrics`` (``pilot.nodeconfig``'s order)?  Read here, before
    anything is imported: ``prometheus_client`` needs ``ssl`` and
    ``urllib.request``'s ``HTTPSHandler``, which exists only if ``ssl`` did when
    ``urllib.request`` (imported by Twisted) was.  A broken config is no: the
    settings report it.
    """
    if any(a == "--metrics" or a.startswith("--metrics=") for a in argv) or environ.get("PILOT_METRICS"):
        return True
    home = environ.get("PILOT_HOME") or os.path.join(os.path.expanduser("~"), ".pilot")
    try:
        with open(os.path.join(home, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("metrics"))


def in_daemon_process() -> bool:
    """Did this process enter as the daemon (:func:`enter`)?"""
    return bool(_daemon)


def enter(argv: Sequence[str]) -> list[str]:
    """
    Prepare this process for its command, ``argv`` (without the program's
    name): the daemon's declarations, or a rendezvous' start
    (:func:`begin_server_start`); return what was declared absent.
    """
    if is_daemon_command(argv):
        _daemon.append(True)
        needed = NEEDED_FOR_METRICS if asks_for_metrics(argv, os.environ) else {}
        return declare_absent({name: why for name, why in DAEMON_ABSENT.items() if name not in needed})
    if starts_rendezvous(argv):
        return begin_server_start(argv)
    return []


def begin_server_start(argv: Sequence[str] = ()) -> list[str]:
    """
    Prepare this process for a rendezvous' start, before its modules are
    imported: pause the collector until :func:`end_server_start`, load
    :data:`LOADED_ON_FIRST_USE` on first use, and declare
    :data:`RENDEZVOUS_ABSENT_UNLESS` absent unless ``argv`` gives a flag that
    needs it.  Return what was declared absent.  Once only.
    """
    if _paused:
        return []
    _paused.append(gc.isenabled())
    gc.disable()
    for name in LOADED_ON_FIRST_USE:
        _load_on_first_use(name)
    given = {a.partition("=")[0] for a in argv if a.startswith("--")}
    return declare_absent({name: why for name, (flags, why) in RENDEZVOUS_ABSENT_UNLESS.items()
                           if not given.intersection(flags)})


def end_server_start() -> None:
    """End the pause :func:`begin_server_start` made (the collector as it was before); idempotent."""
    if _paused and _paused.pop():
        gc.enable()


def _load_on_first_use(name: str) -> None:
    import importlib.util
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
        return
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)  # nothing runs: the module's code runs at its first attribute
    parent, _, child = name.rpartition(".")
    if parent:  # the package's attribute too, so that ``from http import cookiejar`` takes it as it is
        setattr(sys.modules[parent], child, module)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``pilotctl``: :func:`enter`, then :func:`pilot.cli.main`."""
    args = list(sys.argv[1:] if argv is None else argv)
    enter(args)
    from pilot.cli import main as cli_main  # after enter(): pilot.cli imports Twisted
    try:
        return cli_main(args)
    finally:
        end_server_start()  # if the command has not: after an error, or a usage error
