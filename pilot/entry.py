# -*- test-case-name: tests.test_entry -*-
"""
The process entry of ``pilotctl`` and ``python -m pilot``, and the optional
modules the node daemon's process declares absent.

Every module a process imports stays in its memory for good.  The node
daemon (``daemon start --foreground``, the command ``daemon start`` runs in
the background) imports the Python standard library through Twisted and
asyncio, and some of it only in case: asyncio, ``http.client`` and
``urllib.request`` import ``ssl`` if they can, and ``hashlib`` loads
OpenSSL's ``libcrypto`` for its digests if it can.  A daemon uses neither,
and together they are about 4.5 MB of an idle daemon's 39 MB
(``docs/performance.md``, issue 11).  So the daemon's process declares them
absent before anything is imported: a ``None`` entry in ``sys.modules``,
which makes ``import ssl`` raise ``ImportError``, the case those modules
handle.

What is declared, and why (``docs/architecture.md``, "The daemon's process", keeps the
same table):

* :data:`DAEMON_ABSENT`, always, at this entry, for the daemon's process only:

  - ``ssl``: the daemon's only TLS (to a registry whose fingerprint is
    pinned) is pyOpenSSL's, through Twisted (``pilot.tls``), which does not
    use the standard library's ``ssl``;
  - ``_hashlib``: OpenSSL's digests for ``hashlib``.  The daemon hashes a
    few short strings (addresses, a tunnel's key, replay keys); CPython's
    built-in SHA-256 serves them, and ``hashlib`` falls back to it by
    itself.  ``cryptography`` (AES-GCM, pyOpenSSL) carries its own OpenSSL.

* :data:`ABSENT_WITHOUT_TLS`, declared by ``cli_daemon.load_node`` once the
  settings are read, when no registry fingerprint is pinned:

  - ``OpenSSL``: pyOpenSSL, which Twisted's TCP support imports if it can
    (about 6 MB); with no fingerprint the daemon makes no TLS connection.

Nothing else is touched: other commands, the client API (``pilot.api``,
``pilot.aio``), ``twistd pilot-node`` and the tests import what they import.
A declaration never replaces a module already imported.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Optional, Sequence, cast

#: The command line the daemon's own process runs (``cli_daemon`` starts it so).
DAEMON_COMMAND = ("daemon", "start", "--foreground")

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

#: What this process declared absent (module -> why); empty outside the daemon's process.
declared: dict[str, str] = {}
#: Set by :func:`enter` in the daemon's process.
_daemon: list[bool] = []


def is_daemon_command(argv: Sequence[str]) -> bool:
    """
    Is ``argv`` (without the program's name) the daemon's own command,
    ``daemon start --foreground [OPTIONS]``, with ``--json`` perhaps first?
    """
    words = [a for a in argv if a != "--json"]
    return tuple(words[:3]) == DAEMON_COMMAND


def declare_absent(modules: Mapping[str, str]) -> list[str]:
    """
    Declare ``modules`` absent from this process, those not imported yet;
    return their names.  Only the daemon's entry calls this.
    """
    names = []
    for name, why in modules.items():
        if name not in sys.modules:
            cast(Any, sys.modules)[name] = None  # None: "import NAME" raises ImportError
            declared[name] = why
            names.append(name)
    return names


def in_daemon_process() -> bool:
    """Did this process enter as the daemon (:func:`enter`)?"""
    return bool(_daemon)


def enter(argv: Sequence[str]) -> list[str]:
    """Declare :data:`DAEMON_ABSENT` if ``argv`` is the daemon's command; return what was declared."""
    if not is_daemon_command(argv):
        return []
    _daemon.append(True)
    return declare_absent(DAEMON_ABSENT)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``pilotctl``: :func:`enter`, then :func:`pilot.cli.main`."""
    args = list(sys.argv[1:] if argv is None else argv)
    enter(args)
    from pilot.cli import main as cli_main  # after enter(): pilot.cli imports Twisted
    return cli_main(args)
