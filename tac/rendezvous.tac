# -*- mode: python -*-
"""
A Pilot rendezvous (registry on TCP, beacon on UDP) as a twistd application:

    twistd -ny tac/rendezvous.tac

Settings come from the environment, with the defaults of
``pilotctl rendezvous start`` and ``twistd pilot-rendezvous``:

    PILOT_LISTEN      registry TCP address        (default :9000)
    PILOT_BEACON      beacon UDP address          (default :9001)
    PILOT_STORE       store path, or "none"       (default /var/lib/pilot/registry.json
                                                   if writable, else ~/.pilot/registry.json)
    PILOT_LOG_FORMAT  text or json                (default text)
    PILOT_LOG_LEVEL   debug, info, warn, error    (default info)
    PILOT_LOG_FILE    where those go              (default stdout; use it, or twistd's
                                                   --logger, when not running with -n)
    PILOT_HTTP        dashboard, /api/stats and   (default off; /metrics answers loopback
                      /metrics on TCP              peers only unless PILOT_METRICS_PUBLIC=1;
                                                   docs/operations.md)

A pair (docs/deploy.md): PILOT_REPLICATION_TOKEN (or PILOT_REPLICATION_TOKEN_FILE)
on both servers, and on the standby PILOT_STANDBY=PRIMARY:PORT; PILOT_TAKEOVER_AFTER,
PILOT_SYNC_REPLICATION=1 and PILOT_SYNC_TIMEOUT as the flags of the same names.

Every other option of ``twistd pilot-rendezvous --help`` may be given as
PILOT_<NAME>, the option's name in capitals with "_" for "-" (for example
PILOT_FLUSH_DELAY=0.1, PILOT_REGISTRATIONS_PER_MINUTE=0, PILOT_TLS=1).
A bad value, a store that cannot be loaded or a busy port stops twistd
with one line.
"""

import os
import sys

from twisted.application import service
from twisted.internet import reactor
from twisted.logger import ILogObserver

from pilot import log, tap
from pilot.startup import StartupGuard

try:
    _values = tap.parse_values(tap.values_from_environment(os.environ), tap.environment_name)
    _settings = tap.settings_from(_values)
    _rendezvous = tap.build_service(_settings, reactor)
except (ValueError, tap.StartupError) as e:
    sys.exit(f"rendezvous.tac: error: {e}")

application = service.Application("pilot-rendezvous")
# a busy port is one line, not a traceback
StartupGuard(_rendezvous, "rendezvous.tac").setServiceParent(application)
if _values["log_format"] or _values["log_level"]:
    # used unless twistd is given --logger
    application.setComponent(ILogObserver, log.make_observer(
        _values["log_format"] or log.DEFAULT_FORMAT, log.stream_from_environment(),
        _values["log_level"] or log.DEFAULT_LEVEL))
