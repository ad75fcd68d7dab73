# -*- test-case-name: tests.node.test_service -*-
"""
``twistd pilot-node`` (and ``twist pilot-node``): the node daemon's options
and ``makeService``.  The options are :data:`pilot.nodeconfig.NODE_OPTIONS`,
the same as ``pilotctl daemon start``'s, with the same precedence (flags,
``PILOT_*`` variables, ``$PILOT_HOME/config.json``, defaults).
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from pilot.errors import PilotError
from pilot.nodeconfig import NODE_OPTIONS, NodeSettings, load_settings
from pilot.options import Switch
from pilot.services.node import NodeService, NodeStartupError
from pilot.startup import StartupGuard

TAPNAME = "pilot-node"


class NodeOptions(usage.Options):
    synopsis = "[options]"
    longdesc = ("Run a Pilot node: register with the rendezvous, keep the registration and NAT "
                "mappings alive, serve encrypted tunnels and the control socket in $PILOT_HOME.")
    optFlags = [[o.name, None, o.help] for o in NODE_OPTIONS if isinstance(o, Switch)]
    optParameters = [[o.name, None, None, o.help] for o in NODE_OPTIONS if not isinstance(o, Switch)]

    settings: NodeSettings

    def postOptions(self) -> None:
        flags: dict[str, Any] = {o.key: self[o.name] for o in NODE_OPTIONS}
        try:
            self.settings = load_settings(flags)
        except PilotError as e:
            raise usage.UsageError(e.message) from None


Options = NodeOptions


def makeService(options: NodeOptions) -> StartupGuard:
    """
    The node, guarded: a second daemon on the same ``PILOT_HOME`` or a busy
    port at start is one line and the error's exit status (``pilot.startup``).
    """
    from twisted.internet import reactor  # an edge: the one place the reactor is chosen
    try:
        return StartupGuard(NodeService(options.settings, reactor), TAPNAME)
    except NodeStartupError as e:
        raise SystemExit(f"{TAPNAME}: error: {e.message} ({e.hint})") from None
