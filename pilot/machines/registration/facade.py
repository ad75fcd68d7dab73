# -*- test-case-name: tests.machines.test_registration -*-
"""
:class:`Registration`, the node's session with the registry as its owner
sees it: build it, start it, feed it what the owner learns, ask it things.
It checks the owner's arguments and feeds the machine of
:mod:`pilot.machines.registration.machine`, whose behaviours do the work.
"""

from __future__ import annotations

import os
import random as _random
from typing import Any, Callable, Optional, Sequence

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.address import Address
from pilot.errors import InvalidArgument, MalformedFrame
from pilot.identity import Identity
from pilot.machines.registration.machine import RegistrationMachine, not_registered, watch
from pilot.machines.registration.requests import Outbox
from pilot.machines.registration.servers import Servers, check_names
from pilot.machines.registration.session import Session
from pilot.machines.registration.settings import Settings
from pilot.machines.registration.values import (
    BACKOFF_INITIAL, BACKOFF_MAX, CONNECT_TIMEOUT, CONNECTING, HEARTBEAT_INTERVAL, IDLE, REGISTERED, REGISTERING,
    REQUEST_TIMEOUT, STOP_TIMEOUT, WAITING, Jitter, RegistryClient, Reply, reason,
)
from pilot.names import hostname_problem, normalise_tags


class Registration:
    """
    This node's registry session.  Create it, :meth:`start` it, feed it
    :meth:`connection_lost`, :meth:`event_received` and
    :meth:`endpoint_changed`; :meth:`stop` it.

    :param connect: ``() -> Deferred[client]``; a client has
        ``request(msg) -> Deferred[dict]`` and ``close()``.
    :param identity: our key; every request is signed with it.
    :param clock: time (``task.Clock`` in tests).
    :param endpoint: ``() -> "ip:port"``, our tunnel socket as the beacon
        observed it (or the local one); read at every register.
    :param register_extra: ``() -> dict``: more fields for ``register``
        (ours: ``local_addr``, the tunnel socket on our LAN).
    :param registered: ``(node_id, address)`` after every successful
        registration; the id is the registry's.
    :param unregistered: ``(reason)`` once when a registration is lost
        (connection lost, registry unreachable, stopped).
    :param event: ``(event)`` for every registry event, pushed or polled:
        ``{"type": "event", "event": "handshake_request" | ..., ...}``.
    :param heartbeat_ok: optional ``(time, reply)`` after every acknowledged
        heartbeat, with the ``heartbeat_ok`` reply: ours names the endpoint
        the beacon holds for us (``endpoint``), and the owner proves its
        endpoint to the beacon again only when that is missing or not what
        the beacon last told it (``docs/registration.md``).
    :param servers: the rendezvous entries, in order (``host:port`` texts,
        for the status and to match a standby's ``primary``); ``connect()``
        connects to the entry at :attr:`server_index`.  One entry (the
        default) is a single server.
    :param server_changed: ``(index)`` when the session moves to another
        entry (after a failed session, a ``not_primary`` refusal or a stale
        term): the owner switches its beacon to the paired entry.
    :param random: jitter source with ``uniform(a, b)``.
    :param random_bytes: nonce source (``os.urandom``).
    """

    log = Logger()

    def __init__(self, *, connect: Callable[[], "Deferred[RegistryClient]"], identity: Identity,
                 clock: IReactorTime, endpoint: Callable[[], str],
                 register_extra: Callable[[], dict[str, Any]] = lambda: {},
                 registered: Callable[[int, Address], object] = lambda node_id, address: None,
                 unregistered: Callable[[str], object] = lambda reason: None,
                 event: Callable[[dict[str, Any]], object] = lambda event: None,
                 heartbeat_ok: Optional[Callable[[float, dict[str, Any]], object]] = None,
                 servers: Sequence[str] = ("",),
                 server_changed: Callable[[int], object] = lambda index: None,
                 hostname: Optional[str] = None, public: bool = False, tags: Optional[list[str]] = None,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL, backoff_initial: float = BACKOFF_INITIAL,
                 backoff_max: float = BACKOFF_MAX, request_timeout: float = REQUEST_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT, stop_timeout: float = STOP_TIMEOUT,
                 random: Optional[Jitter] = None, random_bytes: Callable[[int], bytes] = os.urandom,
                 log: Optional[Logger] = None) -> None:
        if hostname is not None and not isinstance(hostname, str):
            raise InvalidArgument("hostname must be text or None")
        if not isinstance(public, bool):
            raise InvalidArgument("public must be true or false")
        for value, what in ((heartbeat_interval, "heartbeat_interval"), (backoff_initial, "backoff_initial"),
                            (request_timeout, "request_timeout"), (connect_timeout, "connect_timeout"),
                            (stop_timeout, "stop_timeout")):
            if not value > 0:
                raise InvalidArgument(f"{what} must be positive")
        if backoff_max < backoff_initial:
            raise InvalidArgument("backoff_max must be at least backoff_initial")
        rendezvous = Servers(check_names(servers))
        self._session = Session(
            connect=connect, identity=identity, clock=clock,
            outbox=Outbox(identity, clock, random_bytes, request_timeout, screen=rendezvous.screen),
            settings=Settings(hostname, public, self._tags(tags or [])), endpoint=endpoint,
            register_extra=register_extra, on_registered=registered, on_unregistered=unregistered,
            on_event=event, on_heartbeat=heartbeat_ok,
            jitter=random if random is not None else _random.Random(),
            heartbeat_interval=heartbeat_interval, backoff_initial=backoff_initial, backoff_max=backoff_max,
            connect_timeout=connect_timeout, stop_timeout=stop_timeout,
            log=log if log is not None else self.log, servers=rendezvous, on_server_changed=server_changed,
            backoff=backoff_initial)
        self._machine = RegistrationMachine(self._session)

    @staticmethod
    def _tags(tags: Any) -> list[str]:
        if not isinstance(tags, (list, tuple)):
            raise InvalidArgument("tags must be a list of strings")
        try:
            return normalise_tags(list(tags))
        except ValueError as e:
            raise InvalidArgument(str(e)) from None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Connect and register; reconnects by itself until :meth:`stop`."""
        self._machine.started()

    def stop(self) -> "Deferred[None]":
        """
        Deregister (signed, if connected; at most ``stop_timeout``), close the
        connection and cancel every timer.  Never fails.
        """
        done: Deferred[None] = Deferred()
        self._machine.stopped(done)
        return done

    # --- inputs from the owner ----------------------------------------------------------

    def connection_lost(self, reason: Any = "connection lost",
                        client: Optional[RegistryClient] = None) -> None:
        """
        The registry connection closed.  Pass the ``client`` it belongs to:
        a report about a connection this machine already replaced is ignored.
        """
        if client is not None and client is not self._session.client:
            return
        self._machine.connection_lost(_text(reason))

    def event_received(self, event: dict[str, Any]) -> None:
        """A pushed registry event (``RegistryClientProtocol.on_event``)."""
        self._machine.event_received(event)

    def endpoint_changed(self) -> None:
        """The beacon observed a new endpoint; ``endpoint()`` already returns it."""
        self._machine.endpoint_changed()

    def check_now(self) -> None:
        """
        The owner doubts the connection (the rendezvous's beacon stopped
        answering): when registered, heartbeat now instead of at the next
        period, so a registry that died without closing the connection is
        found within the request timeout (``docs/registration.md``).
        Otherwise nothing: an outage is already being handled.
        """
        if self._session.state == REGISTERED:
            self._machine.heartbeat_due()

    def server_seen(self) -> None:
        """The rendezvous's beacon answered: while waiting out a backoff, reconnect soon."""
        self._machine.server_seen()

    def is_waiting(self) -> bool:
        """True while waiting out a backoff after the registry was lost or refused us."""
        return self._session.state == WAITING

    def is_lost(self) -> bool:
        """True from a failed attempt (or a lost session) until registered again: an outage."""
        return self._session.failures > 0 and self._session.state in (WAITING, CONNECTING, REGISTERING)

    # --- settings --------------------------------------------------------------------------

    def set_hostname(self, name: str) -> "Deferred[Reply]":
        """Set (``""``: clear) our hostname; the ``set_hostname_ok`` reply."""
        if not isinstance(name, str):
            return fail(InvalidArgument("a hostname is text"))
        problem = hostname_problem(name) if name else None
        if problem is not None:
            return fail(InvalidArgument(problem))
        return self._setting("hostname", name)

    def set_public(self, flag: bool) -> "Deferred[Reply]":
        """Make the node public or private; the ``set_visibility_ok`` reply."""
        if not isinstance(flag, bool):
            return fail(InvalidArgument("visibility is true (public) or false (private)"))
        return self._setting("public", flag)

    def set_tags(self, tags: list[str]) -> "Deferred[Reply]":
        """Replace our tags; the ``set_tags_ok`` reply."""
        try:
            normalised = self._tags(tags)
        except InvalidArgument as e:
            return fail(e)
        return self._setting("tags", normalised)

    def _setting(self, name: str, value: Any) -> "Deferred[Reply]":
        self._session.settings.remember(name, value)
        done: Deferred[Reply] = Deferred()
        self._machine.settings_changed(name, done)
        return done

    # --- other requests -----------------------------------------------------------------

    def request(self, msg: dict[str, Any], signed_field: Optional[str] = None) -> "Deferred[Reply]":
        """
        Send any request on the current connection; the reply or its error.

        With ``signed_field`` (``"requester_id"``, ``"node_id"``,
        ``"from_node_id"``...) that field is set to our node id unless present,
        and the request is signed.  Fails at once with RegistryUnavailable
        when there is no connection: it never waits for a reconnect.
        """
        s = self._session
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            return fail(InvalidArgument("a registry request is an object with a string 'type'"))
        if s.client is None or s.state not in (REGISTERING, REGISTERED):
            return fail(not_registered(s))
        out = dict(msg)
        if signed_field is not None:
            if s.node_id is None:
                return fail(not_registered(s))
            out.setdefault(signed_field, s.node_id)
            try:
                out = s.outbox.sign(out)
            except (MalformedFrame, TypeError, ValueError) as e:
                return fail(InvalidArgument(f"cannot sign this {msg['type']} request: {e}"))
        d = s.outbox.send(out, s.client)
        d.addErrback(watch(self._machine, s, s.client))
        return d

    # --- queries ---------------------------------------------------------------------------

    def is_idle(self) -> bool:
        """True until :meth:`start` (and never again)."""
        return self._session.state == IDLE

    def is_registered(self) -> bool:
        """True while the registry knows us: registered, heartbeats running."""
        return self._session.state == REGISTERED

    @property
    def state(self) -> str:
        """The state's name, for ``status()`` and logs; decide with the ``is_*`` queries instead."""
        return self._session.state

    @property
    def server_index(self) -> int:
        """The entry of ``servers`` in use (or to be tried next)."""
        return self._session.servers.index

    @property
    def node_id(self) -> Optional[int]:
        return self._session.node_id

    @property
    def address(self) -> Optional[Address]:
        return self._session.address

    def status(self) -> dict[str, Any]:
        """A snapshot for ``pilotctl info``; times are the clock's seconds."""
        s = self._session
        settings = s.settings
        return {
            "state": s.state,
            "node_id": s.node_id,
            "address": str(s.address) if s.address is not None else None,
            "registry_connected": s.client is not None,
            "registered_at": s.registered_at,
            "last_heartbeat_ok": s.last_heartbeat_ok,
            "consecutive_failures": s.failures,
            "next_retry_at": s.next_retry_at,
            "backoff": s.backoff,
            "last_error": s.last_error,
            "events": None if s.subscribed is None else ("pushed" if s.subscribed else "polled"),
            "hostname": settings.hostname,
            "public": settings.public,
            "tags": list(settings.tags),
            "hostname_error": s.hostname_error,
            "setting_errors": dict(settings.errors),
            "unsynced_settings": sorted(settings.changes),
            **s.servers.status(),
        }


def _text(why: Any) -> str:
    return reason(why) if isinstance(why, Failure) else str(why)
