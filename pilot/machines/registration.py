# -*- test-case-name: tests.machines.test_registration -*-
"""
The node's session with the registry (facts §2): connect, register, keep the
registration alive, and reconnect when the registry goes away
(``docs/registration.md``).

Pure: no sockets, no reactor import.  Time comes from the injected
``IReactorTime``, the connection from an injected ``connect()`` returning a
Deferred client (``request(msg) -> Deferred[dict]``, ``close()``), jitter from
an injected ``random``; everything the machine decides leaves through the
owner's callbacks (``registered``, ``unregistered``, ``event``).

States (an Automat ``TypeMachineBuilder`` table, :func:`transitions`):
``idle`` -started-> ``connecting`` -connected-> ``registering``
-registration_succeeded-> ``registered``; ``registered`` -heartbeat_failed->
``registering`` (same connection; a heartbeat that found the connection dead
goes on at once with connection_lost to ``waiting``); ``registered``
-endpoint_changed-> ``waiting`` (reconnect at once); connect_failed,
registration_failed and connection_lost -> ``waiting`` -backoff_elapsed->
``connecting``; any state -stopped-> ``stopped`` (final).

On each connection: ``register`` (signed with our replay-proof ``auth``), then
``subscribe_events``, ``set_visibility`` / ``set_tags`` / ``set_hostname`` as
needed, then the owner hears ``registered(node_id, address)`` and one
``poll_handshakes`` fetches whatever was queued while we were away.  A
heartbeat every 25 s; a heartbeat that gets an error reply (usually: the
registry forgot us) re-registers on the same connection once; a heartbeat
left unanswered for 10 s (or whose connection is gone), a second failure, a
lost connection or any other request left unanswered for 10 s closes the
connection and reconnects after a full-jitter backoff (0.5 s doubling to
30 s, each wait uniform in ``[0, backoff)``).  A new public endpoint (usually
a new IP, so the connection may be dead) closes the connection and reconnects
at once, without backoff, to register the new ``listen_addr``.

Where this differs from the reference daemon (facts §9):

* every request is signed with a timestamp and nonce (#2, #3): ``register``
  too, so a registry can refuse anyone else moving our endpoint;
* trust events are pushed (``subscribe_events``) instead of polled every
  30 s (#13); with a registry that refuses ``subscribe_events`` (the
  reference) we poll after every heartbeat, as it does;
* heartbeat every 25 s rather than 30 s (#16, ``docs/registration.md``);
* reconnects spread with full jitter rather than in lock step.
"""

from __future__ import annotations

import os
import random as _random
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.address import Address
from pilot.errors import InvalidArgument, MalformedFrame
from pilot.identity import Identity
from pilot.machines.registration_core import (
    CONNECTING, IDLE, REGISTERED, REGISTERING, SETTING_REQUESTS, STOPPED, WAITING, Jitter, RegistryClient,
    Reply, _Core, _reason,
)
from pilot.machines.registration_table import RegistrationInputs, _machine, _not_registered, transitions
from pilot.names import hostname_problem, normalise_tags

__all__ = [
    "BACKOFF_INITIAL", "BACKOFF_MAX", "CONNECT_TIMEOUT", "CONNECTING", "HEARTBEAT_INTERVAL", "IDLE",
    "REGISTERED", "REGISTERING", "REQUEST_TIMEOUT", "SETTING_REQUESTS", "STOP_TIMEOUT", "STOPPED", "WAITING",
    "Jitter", "Registration", "RegistrationInputs", "RegistryClient", "Reply", "transitions",
]

#: Seconds between heartbeats.  The registry forgets a node silent for 180 s
#: (checked every 60 s); 25 s leaves room for six lost heartbeats, and keeps
#: the Discover the owner sends after each heartbeat under the common 30 s
#: UDP NAT mapping timeout, which the reference's 30 s merely touches.
HEARTBEAT_INTERVAL = 25.0
#: First reconnect window (s); doubles per failure up to BACKOFF_MAX.
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
#: A request unanswered this long (s) means the connection is dead.
REQUEST_TIMEOUT = 10.0
#: A connection attempt is abandoned after this long (s).
CONNECT_TIMEOUT = 10.0
#: ``stop()`` waits at most this long (s) for ``deregister``.
STOP_TIMEOUT = 2.0


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
    :param heartbeat_ok: optional ``(time)`` after every acknowledged
        heartbeat (the owner sends its beacon Discover then, facts §3).
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
                 heartbeat_ok: Optional[Callable[[float], object]] = None,
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
        tag_list = self._tags(tags or [])
        self._core = _Core(
            connect=connect, identity=identity, clock=clock, endpoint=endpoint, register_extra=register_extra, on_registered=registered,
            on_unregistered=unregistered, on_event=event, on_heartbeat=heartbeat_ok,
            jitter=random if random is not None else _random.Random(), random_bytes=random_bytes,
            hostname=hostname, public=public, tags=tag_list, heartbeat_interval=heartbeat_interval,
            backoff_initial=backoff_initial, backoff_max=backoff_max, request_timeout=request_timeout,
            connect_timeout=connect_timeout, stop_timeout=stop_timeout,
            log=log if log is not None else self.log, backoff=backoff_initial)
        self._machine = _machine(self._core)
        self._core.machine = self._machine

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
        if client is not None and client is not self._core.client:
            return
        text = _reason(reason) if isinstance(reason, Failure) else str(reason)
        self._machine.connection_lost(text)

    def event_received(self, event: dict[str, Any]) -> None:
        """A pushed registry event (``RegistryClientProtocol.on_event``)."""
        self._machine.event_received(event)

    def endpoint_changed(self) -> None:
        """The beacon observed a new endpoint; ``endpoint()`` already returns it."""
        self._machine.endpoint_changed()

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
        self._core.remember(name, value)
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
        c = self._core
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            return fail(InvalidArgument("a registry request is an object with a string 'type'"))
        if c.client is None or c.state not in (REGISTERING, REGISTERED):
            return fail(_not_registered(c))
        out = dict(msg)
        if signed_field is not None:
            if c.node_id is None:
                return fail(_not_registered(c))
            out.setdefault(signed_field, c.node_id)
            try:
                out = c.sign(out)
            except (MalformedFrame, TypeError, ValueError) as e:
                return fail(InvalidArgument(f"cannot sign this {msg['type']} request: {e}"))
        d = c.send(out)
        d.addErrback(c.watch(c.client))
        return d

    # --- queries ---------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._core.state

    def is_idle(self) -> bool:
        """True before :meth:`start` (nothing to stop, nothing to re-register)."""
        return self.state == "idle"

    def is_registered(self) -> bool:
        """True while the registry holds our current registration."""
        return self.state == "registered"

    @property
    def node_id(self) -> Optional[int]:
        return self._core.node_id

    @property
    def address(self) -> Optional[Address]:
        return self._core.address

    def status(self) -> dict[str, Any]:
        """A snapshot for ``pilotctl info``; times are the clock's seconds."""
        c = self._core
        return {
            "state": c.state,
            "node_id": c.node_id,
            "address": str(c.address) if c.address is not None else None,
            "registry_connected": c.client is not None,
            "registered_at": c.registered_at,
            "last_heartbeat_ok": c.last_heartbeat_ok,
            "consecutive_failures": c.failures,
            "next_retry_at": c.next_retry_at,
            "backoff": c.backoff,
            "last_error": c.last_error,
            "events": None if c.subscribed is None else ("pushed" if c.subscribed else "polled"),
            "hostname": c.hostname,
            "public": c.public,
            "tags": list(c.tags),
            "hostname_error": c.hostname_error,
            "setting_errors": dict(c.setting_errors),
            "unsynced_settings": sorted(c.changes),
        }
