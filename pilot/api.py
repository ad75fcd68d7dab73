# -*- test-case-name: tests.test_api -*-
"""
A node inside this process (``docs/api.md``): :class:`EmbeddedNode` is the
daemon's :class:`~pilot.services.node.NodeService` (its own identity and
``home``, no daemon) as a Twisted service, whose endpoints are the same
``IStreamClientEndpoint``/``IStreamServerEndpoint`` objects as the daemon's
(:mod:`pilot.endpoints`), but go straight to the node's stack.  ::

    node = EmbeddedNode(reactor, "/tmp/agent-a", registry="127.0.0.1:9000", hostname="agent-a")
    node.startService()
    proto = await node.client_endpoint("agent-b", 1000).connect(factory)   # (Deferred.fromFuture and alike)
    port = await node.server_endpoint(1000).listen(factory)

The node also serves its control socket in ``home``, so ``pilotctl`` (with
``PILOT_HOME=home``) and the daemon endpoints work against it too.
Trust is asked and given through :attr:`EmbeddedNode.api`
(:class:`~pilot.nodeapi.NodeAPI`): ``handshake``, ``approve``, ``pending``.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (IListeningPort, IProtocol, IProtocolFactory, IStreamClientEndpoint,
                                         IStreamServerEndpoint)
from twisted.logger import Logger
from zope.interface import implementer

from pilot.address import Address
from pilot.errors import ConnectionFailed
from pilot.identity import Identity
from pilot.nodeconfig import NodeSettings, load_settings
from pilot.services.api import NodeAPIImpl
from pilot.services.node import NodeService
from pilot.stack.transport import PilotAddress


class EmbeddedNode(MultiService):
    """
    A Pilot node as a service of this program.  ``home`` holds its identity
    (made on first use), trust store and control socket; ``options`` are the
    daemon's settings (``registry``, ``beacon``, ``hostname``, ``listen``,
    ``public``, ``tags``, ...: ``docs/config.md``), read as the daemon reads
    them but without ``PILOT_*`` variables.
    """

    log = Logger()

    def __init__(self, reactor: Any, home: str, **options: Any) -> None:
        super().__init__()
        self.reactor = reactor
        home = os.path.abspath(os.path.expanduser(home))
        os.makedirs(home, mode=0o700, exist_ok=True)
        self.settings: NodeSettings = load_settings({k.replace("-", "_"): v for k, v in options.items()},
                                                    environ={}, home=home)
        if not os.path.exists(self.settings.identity):
            Identity.generate().save(self.settings.identity)
        self.service = NodeService(self.settings, reactor)
        self.service.setServiceParent(self)

    def stopService(self) -> Deferred[None]:
        """Stop the node; its port forwards (``api.forward``/``expose``) end with it."""
        self.service.api.forwards.close_all()
        d: Deferred[None] = super().stopService()
        return d

    @property
    def api(self) -> NodeAPIImpl:
        """What ``pilotctl`` asks the daemon, as Deferreds: ``info``, ``handshake``, ``approve``, ..."""
        return self.service.api

    @property
    def address(self) -> Address:
        return self.service.node.identity.address

    def client_endpoint(self, target: str, port: int) -> EmbeddedClientEndpoint:
        """A stream to ``target`` (hostname, node id or address) on Pilot ``port`` (the dial gives up after 30 s)."""
        return EmbeddedClientEndpoint(self.service.api, target, port)

    def server_endpoint(self, port: int) -> EmbeddedServerEndpoint:
        """Pilot ``port`` of this node, for streams from trusted peers."""
        return EmbeddedServerEndpoint(self.service.api, port)


@implementer(IStreamClientEndpoint)
class EmbeddedClientEndpoint:
    """A Pilot stream to ``target:port`` from an embedded node; cancelling the connect abandons the dial."""

    def __init__(self, api: NodeAPIImpl, target: str, port: int) -> None:
        self.api = api
        self.target = target
        self.port = port

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        d: Deferred[Any] = maybeDeferred(self.api.node.peers.node_id, self.target)
        return d.addCallback(self._dial, factory)

    def _dial(self, node_id: int, factory: IProtocolFactory) -> Deferred[IProtocol]:
        peer = PilotAddress(Address(0, node_id), self.port)
        protocol = factory.buildProtocol(peer)
        if protocol is None:
            raise ConnectionFailed(f"the factory {factory!r} built no protocol for {peer}")
        d: Deferred[Any] = self.api.connect(str(peer.address), self.port, protocol)
        return d.addCallback(lambda _: protocol)

    def __repr__(self) -> str:
        return f"EmbeddedClientEndpoint({self.target!r}, {self.port})"


@implementer(IStreamServerEndpoint)
class EmbeddedServerEndpoint:
    """Pilot port ``port`` of an embedded node; the port is an ``IListeningPort``."""

    def __init__(self, api: NodeAPIImpl, port: int) -> None:
        self.api = api
        self.port = port

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        d: Deferred[Any] = self.api.listen(self.port, factory)
        return d

    def __repr__(self) -> str:
        return f"EmbeddedServerEndpoint({self.port})"
