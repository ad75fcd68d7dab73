# -*- test-case-name: tests.protocols.test_control_server -*-
"""
The control socket's subscriptions: ``listen`` and ``recv`` (``docs/control.md``).

A :class:`Subscription` holds the event frames of one ``listen`` or ``recv``
until the request's reply is written, then passes them to its control
connection (an :class:`IEventWriter`, in practice
:class:`~pilot.protocols.control_server.ControlProtocol`).  :class:`AcceptFactory`
is what ``listen`` gives the node: each accepted stream is held for an
``attach`` (:class:`~pilot.protocols.bridge.HeldStreams`) and announced as an
``accepted`` event.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import Interface

from pilot.nodeapi import Listening
from pilot.protocols.bridge import HeldStreams, StreamBridge

#: Event frames kept for a subscription whose reply is still queued behind earlier replies.
MAX_EARLY_EVENTS = 1024


class IEventWriter(Interface):
    """The control connection a subscription writes its events to."""

    def write_event(event: dict[str, Any], droppable: bool) -> None:
        """Write one event frame; a ``droppable`` one may be dropped when the client does not read."""


class Subscription:
    """Event frames for one ``listen`` or ``recv``; held back until the request's reply is written."""

    log = Logger()

    def __init__(self, writer: IEventWriter) -> None:
        self.writer = writer
        self.live = False
        self.closed = False
        self.listening: Listening | None = None
        self._early: list[tuple[dict[str, Any], bool]] = []

    def send(self, event: dict[str, Any], droppable: bool) -> None:
        if self.closed:
            return
        if not self.live:
            if len(self._early) < MAX_EARLY_EVENTS or not droppable:
                self._early.append((event, droppable))
            return
        self.writer.write_event(event, droppable)

    def go_live(self) -> None:
        """The request's reply is written: send what came early, then every event as it comes."""
        self.live = True
        early, self._early = self._early, []
        for event, droppable in early:
            self.send(event, droppable)

    def close(self) -> None:
        self.closed = True
        self._early = []
        listening, self.listening = self.listening, None
        if listening is not None:
            try:
                listening.close()
            except Exception:
                self.log.failure("closing a control subscription's port failed")


class AcceptFactory(Factory):
    """What ``listen`` gives the node: each accepted stream is held for an ``attach`` and announced."""

    noisy = False

    def __init__(self, held: HeldStreams, subscription: Subscription, port: int) -> None:
        self.held = held
        self.subscription = subscription
        self.port = port

    def buildProtocol(self, addr: IAddress | None) -> StreamBridge:
        bridge = StreamBridge(addr)
        bridge.made = self._made
        return bridge

    def _made(self, bridge: StreamBridge) -> None:
        if self.subscription.closed:
            bridge.close()
            return
        conn_id = self.held.hold(bridge)
        self.subscription.send({"event": "accepted", "conn_id": conn_id, "from": bridge.peer,
                                "port": bridge.peer_port}, droppable=False)
