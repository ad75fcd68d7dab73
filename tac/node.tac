# -*- mode: python -*-
"""
A Pilot node daemon as a twistd application:

    PILOT_HOME=~/.pilot PILOT_REGISTRY=rendezvous.example:9000 twistd -ny tac/node.tac

Settings come as for ``pilotctl daemon start`` and ``twistd pilot-node``:
``PILOT_*`` variables (PILOT_REGISTRY, PILOT_BEACON, PILOT_HOSTNAME,
PILOT_LISTEN, PILOT_PUBLIC, PILOT_TAGS, ...), then
``$PILOT_HOME/config.json``, then the defaults (docs/config.md).  The
identity must exist (``pilotctl init``).  A setting, file or port it cannot
use stops twistd with one line.
"""

import sys

from twisted.application import service
from twisted.internet import reactor

from pilot.errors import PilotError
from pilot.nodeconfig import load_settings
from pilot.services.node import NodeService, NodeStartupError
from pilot.startup import StartupGuard

try:
    _node = NodeService(load_settings({}), reactor)
except (PilotError, NodeStartupError) as e:
    sys.exit(f"node.tac: error: {e}")

application = service.Application("pilot-node")
# a second daemon on this PILOT_HOME, or a busy port, is one line, not a traceback
StartupGuard(_node, "node.tac").setServiceParent(application)
