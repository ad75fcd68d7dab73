# -*- test-case-name: tests.node.test_core -*-
"""
The interfaces the node's parts are wired through (``zope.interface``, as
Twisted and magic-wormhole use them): a provider swapped for another fails
at once (``verifyObject`` in the tests), and the wiring reads as a list of
named collaborators instead of callables.

On the foundation floor: this module imports only zope, typing and
``pilot.endpoint``, so every floor above may name these interfaces
(docs/architecture.md).

Injected I/O (the sans-I/O :class:`pilot.node.Node` never touches a socket):

* :class:`IDatagramSender`: the tunnel socket, as the node sends on it;
* :class:`IRegistryConnector`: opens the TCP (or TLS) session to the registry;
* :class:`IRouteProber`: which local address the kernel would send from.

What the datagram protocol hands decoded values to:

* :class:`IFrameReceiver`: tunnel frames (``pilot.machines.tunnel.Tunnels``);
* :class:`IBeaconListener`: beacon replies and punch commands (the node).

What a registry connection reports: :class:`IRegistryLink`.
"""

from __future__ import annotations

from typing import Any, Optional

from zope.interface import Interface

from pilot.endpoint import Endpoint


class DatagramTooBig(Exception):
    """
    The kernel refused a datagram as larger than the path allows (EMSGSIZE
    with don't-fragment set): a "too big" signal for path MTU discovery.
    """


class IDatagramSender(Interface):
    """The node's one UDP socket, seen from the sending side."""

    def send(data: bytes, endpoint: Endpoint) -> None:
        """Send one datagram; a network error is counted and dropped, never raised, except
        :class:`DatagramTooBig` for a datagram larger than the path allows."""

    def send_limited(data: bytes, endpoint: Endpoint, ttl: int) -> None:
        """Send one datagram with at most ``ttl`` hops (IP TTL) to live, errors as :meth:`send`;
        the socket's next datagrams go out with its normal TTL again."""

    def local_port() -> int:
        """The socket's local port (0 before it is bound)."""


class IRouteProber(Interface):
    """Asks the kernel, without sending anything, which local address reaches a destination."""

    def source_for(destination: Endpoint) -> Optional[str]:
        """The local address the kernel would send from to ``destination``; None without a route."""


class IRegistryLink(Interface):
    """What one registry connection reports to the node."""

    def event_received(event: dict[str, Any]) -> None:
        """The registry pushed ``event`` (``handshake_request``, ``endpoint_changed``, ...)."""

    def connection_lost(client: Any, reason: Any) -> None:
        """The connection of ``client`` closed (``reason``: text or a Failure)."""

    def lan_address_learned(host: str) -> None:
        """Our local address on the connection to the registry (our address on the LAN)."""


class IRegistryConnector(Interface):
    """Opens registry sessions (``pilot.protocols.registry_client``) for the node's registration."""

    def connect(link: IRegistryLink) -> Any:
        """A Deferred of a client with ``request(msg) -> Deferred[dict]`` and ``close()``."""


class IFrameReceiver(Interface):
    """Takes tunnel frames off the socket (``pilot.machines.tunnel.Tunnels``)."""

    def frame_received(data: Any, source: Endpoint, via_relay: bool = False,
                       relay_sender: Optional[int] = None) -> None:
        """
        One tunnel frame from ``source`` (unwrapped from a RelayDeliver if ``via_relay``, whose
        sender id is ``relay_sender``: a frame naming another sender is dropped).
        """


class IBeaconListener(Interface):
    """Takes the beacon's messages off the socket (the node)."""

    def is_beacon(source: Endpoint) -> bool:
        """Only our beacon may steer us: True if ``source`` is it."""

    def discovered(observed: Endpoint) -> None:
        """The beacon saw our tunnel socket at ``observed`` (a DiscoverReply)."""

    def punch_commanded(peer: Endpoint) -> None:
        """The beacon asks us to punch toward ``peer`` (a PunchCommand)."""


class IPathEvents(Interface):
    """
    What the path layer (``pilot.machines.path.Paths``) hears: from the tunnel
    layer, how an authenticated frame came; from the peer directory, where a
    peer is now.
    """

    def endpoint_learned(node_id: int, endpoint: Endpoint) -> None:
        """The registry (a resolve, or a pushed ``endpoint_changed``) says the peer is at ``endpoint``."""

    def direct_frame(node_id: int, endpoint: Endpoint) -> None:
        """An authenticated frame from the peer's endpoint, not through the relay."""

    def relayed_frame(node_id: int) -> None:
        """An authenticated frame from the peer through the beacon."""
