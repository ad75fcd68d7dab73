# -*- test-case-name: tests.protocols.test_control_server -*-
"""
The control socket's plain requests (``docs/control.md``): each is one call on
the :class:`~pilot.nodeapi.NodeAPI` with its arguments checked.

The requests that change what the connection carries (``connect`` and
``attach`` make it a raw stream, ``listen`` and ``recv`` a stream of events)
are handled by :class:`~pilot.protocols.control_server.ControlProtocol`.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred

from pilot.nodeapi import NodeAPI
from pilot.search import MAX_QUERY
from pilot.wire.control import (MAX_PING_COUNT, MAX_PING_INTERVAL, MAX_PING_TIMEOUT, MAX_TAG_LEN, MAX_TAGS,
                                MAX_TARGET, MAX_TEXT, Arguments)

#: A plain request: its checked arguments to the API's Deferred.
Command = Callable[[Arguments], "Deferred[Any]"]


def api_commands(api: NodeAPI) -> dict[str, Command]:
    """The plain requests served by ``api``, by command name."""
    commands: dict[str, Command] = {
        "info": lambda a: api.info(),
        "set_hostname": lambda a: api.set_hostname(a.text("hostname", 253)),
        "set_public": lambda a: api.set_public(a.flag("public")),
        "set_tags": lambda a: api.set_tags(a.texts("tags", MAX_TAGS, MAX_TAG_LEN)),
        "shutdown": lambda a: api.shutdown(),
        "find": lambda a: api.find(a.text("hostname", MAX_TARGET)),
        "peers": lambda a: api.peers(a.text("search", MAX_TARGET, None)),
        "handshake": lambda a: api.handshake(a.target(), a.text("justification", MAX_TEXT, "")),
        "pending": lambda a: api.pending(),
        "trust": lambda a: api.trusted(),
        "approve": lambda a: api.approve(a.node_id()),
        "reject": lambda a: api.reject(a.node_id(), a.text("reason", MAX_TEXT, "")),
        "untrust": lambda a: api.untrust(a.node_id()),
        "ping": lambda a: _ping(api, a),
        "send": lambda a: api.send_datagram(a.target(), a.port(), a.data("data")),
        "search": lambda a: api.search(a.text("query", MAX_QUERY)),
        "disconnect": lambda a: api.disconnect(a.integer("conn_id", 0, 0xFFFFFFFF)),
        # port forwarding (pilot.services.forward)
        "forward": lambda a: api.forward(a.port("local_port"), a.target(), _pilot_port(a)),
        "unforward": lambda a: api.unforward(a.port("local_port")),
        "expose": lambda a: api.expose(_pilot_port(a), a.target("host"), a.port("host_port")),
        "unexpose": lambda a: api.unexpose(_pilot_port(a)),
        "forwards": lambda a: api.forwards_list(),
    }
    return commands


def _pilot_port(args: Arguments) -> int:
    return args.integer("port", 1, 0xFFFF)


def _ping(api: NodeAPI, args: Arguments) -> Deferred[Any]:
    target = args.target()
    count = args.integer("count", 1, MAX_PING_COUNT, 4)
    timeout = args.number("timeout", 0.001, MAX_PING_TIMEOUT, 30.0)
    interval = args.number("interval", 0.0, MAX_PING_INTERVAL, 1.0)
    return api.ping(target, count, timeout, interval)
