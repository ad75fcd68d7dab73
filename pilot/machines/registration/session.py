# -*- test-case-name: tests.machines.test_registration -*-
"""
What the registry session knows and whom it talks to: the one object the
machine's behaviours (:mod:`pilot.machines.registration.machine`) act on.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from pilot.address import Address
from pilot.identity import Identity
from pilot.machines.registration.requests import Outbox
from pilot.machines.registration.servers import Servers
from pilot.machines.registration.settings import Settings
from pilot.machines.registration.values import IDLE, POLL_INTERVAL, Jitter, RegistryClient, Reply


@attr.s(auto_attribs=True, eq=False)
class Session:
    """The session's collaborators and what it knows; the machine's behaviours change it."""

    connect: Callable[[], "Deferred[RegistryClient]"]
    identity: Identity
    clock: IReactorTime
    outbox: Outbox
    settings: Settings
    endpoint: Callable[[], str]
    register_extra: Callable[[], dict[str, Any]]
    on_registered: Callable[[int, Address], object]
    on_unregistered: Callable[[str], object]
    on_event: Callable[[dict[str, Any]], object]
    on_heartbeat: Optional[Callable[[float, dict[str, Any]], object]]
    jitter: Jitter
    heartbeat_interval: float
    backoff_initial: float
    backoff_max: float
    connect_timeout: float
    stop_timeout: float
    log: Logger
    servers: Servers = attr.Factory(lambda: Servers(("",)))
    #: ``(index)`` when the session moves to another entry of ``servers`` (the owner moves its beacon)
    on_server_changed: Callable[[int], object] = lambda index: None

    state: str = IDLE
    client: Optional[RegistryClient] = None
    connecting: Optional["Deferred[Any]"] = None
    #: bumped on every connection and registration attempt; late results of older ones are dropped
    epoch: int = 0
    node_id: Optional[int] = None
    address: Optional[Address] = None
    announced: bool = False
    backoff: float = 0.0
    failures: int = 0
    next_retry_at: Optional[float] = None
    registered_at: Optional[float] = None
    last_heartbeat_ok: Optional[float] = None
    subscribed: Optional[bool] = None
    hostname_error: Optional[str] = None
    last_error: Optional[str] = None
    sent_listen_addr: Optional[str] = None
    heartbeat_call: Optional[IDelayedCall] = None
    retry_call: Optional[IDelayedCall] = None
    #: None until stopping is over; then every later stop() fires at once
    stop_waiters: Optional[list["Deferred[None]"]] = attr.Factory(list)

    def now(self) -> float:
        return self.clock.seconds()

    def heartbeat_every(self) -> float:
        """Seconds to the next heartbeat: polled events (a registry that does not push) want it sooner."""
        return self.heartbeat_interval if self.subscribed else min(self.heartbeat_interval, POLL_INTERVAL)

    def new_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def call_out(self, what: str, fn: Callable[..., object], *args: Any) -> None:
        """Call an owner's callback; its exceptions are logged, never raised into the machine."""
        try:
            fn(*args)
        except Exception:
            self.log.failure("registration: the owner's {what} callback failed", what=what)

    def listen_addr(self) -> str:
        try:
            value = self.endpoint()
        except Exception:
            self.log.failure("registration: the endpoint provider failed")
            return ""
        return value if isinstance(value, str) else ""

    def send(self, msg: dict[str, Any]) -> "Deferred[Reply]":
        """Sign ``msg`` and send it on the current connection."""
        return self.outbox.send(self.outbox.sign(msg), self.client)
