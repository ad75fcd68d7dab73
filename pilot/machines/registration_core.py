# -*- test-case-name: tests.machines.test_registration -*-
"""
The registry session's state and its helpers, behind the machine in
:mod:`pilot.machines.registration_table` (the session is described in
:mod:`pilot.machines.registration`): signed requests with timeouts, the
heartbeat and retry timers, settings bookkeeping, the register/subscribe/
settings sequence and handshake polling.

Pure: no sockets, no reactor import; time comes from the injected
``IReactorTime``.  The helpers feed the machine's inputs through ``machine``.
"""

from __future__ import annotations

from typing import Any, Callable, Generator, Optional, Protocol

import attr
from twisted.internet.defer import (
    CancelledError, Deferred, TimeoutError as DeferredTimeout, fail, inlineCallbacks, maybeDeferred,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.address import Address, node_id_for_key
from pilot.errors import Internal, MalformedFrame, PilotError, RegistryUnavailable
from pilot.identity import Identity
from pilot.wire.registry import NONCE_LEN, get_int, sign_request

IDLE = "idle"
CONNECTING = "connecting"
REGISTERING = "registering"
REGISTERED = "registered"
WAITING = "waiting"
STOPPED = "stopped"

#: Setting name -> the request that carries it.
SETTING_REQUESTS = {"public": "set_visibility", "tags": "set_tags", "hostname": "set_hostname"}

Reply = dict[str, Any]


class RegistryClient(Protocol):
    """One connection to the registry (``RegistryClientProtocol`` is one)."""

    def request(self, msg: dict[str, Any]) -> "Deferred[Reply]":
        "Send ``msg``; the reply, or a PilotError (RegistryUnavailable when the connection is gone)."

    def close(self) -> None:
        "Close the connection."


class Jitter(Protocol):
    def uniform(self, a: float, b: float) -> float:
        "A number in ``[a, b]`` (``random.Random`` is one)."



class _Stale(Exception):
    """The connection or registration attempt this work belonged to is gone."""


def _reason(failure: Failure) -> str:
    return failure.getErrorMessage() or failure.type.__name__


@attr.s(auto_attribs=True, eq=False)
class _Core:
    connect: Callable[[], "Deferred[RegistryClient]"]
    identity: Identity
    clock: IReactorTime
    endpoint: Callable[[], str]
    register_extra: Callable[[], dict[str, Any]]
    on_registered: Callable[[int, Address], object]
    on_unregistered: Callable[[str], object]
    on_event: Callable[[dict[str, Any]], object]
    on_heartbeat: Optional[Callable[[float], object]]
    jitter: Jitter
    random_bytes: Callable[[int], bytes]
    hostname: Optional[str]
    public: bool
    tags: list[str]
    heartbeat_interval: float
    backoff_initial: float
    backoff_max: float
    request_timeout: float
    connect_timeout: float
    stop_timeout: float
    log: Logger

    state: str = IDLE
    machine: Any = None
    client: Optional[RegistryClient] = None
    connecting: Optional["Deferred[Any]"] = None
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
    setting_errors: dict[str, str] = attr.Factory(dict)
    last_error: Optional[str] = None
    # setting name -> serial of its latest change the registry has not confirmed
    changes: dict[str, int] = attr.Factory(dict)
    serial: int = 0
    # setting name -> serial sent by the current registration's settings step
    step_sent: dict[str, int] = attr.Factory(dict)
    sent_listen_addr: Optional[str] = None
    inflight: list[tuple[RegistryClient, "Deferred[Reply]"]] = attr.Factory(list)
    heartbeat_call: Optional[IDelayedCall] = None
    retry_call: Optional[IDelayedCall] = None
    stop_finished: bool = False
    stop_waiters: list["Deferred[None]"] = attr.Factory(list)

    # --- small helpers -----------------------------------------------------------------

    def now(self) -> float:
        return self.clock.seconds()

    def new_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def check_current(self, epoch: int) -> None:
        if epoch != self.epoch:
            raise _Stale()

    def if_current(self, epoch: int, feed: Callable[..., None], *args: Any) -> None:
        if epoch == self.epoch:
            feed(*args)

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

    def sign(self, msg: dict[str, Any]) -> dict[str, Any]:
        ts_ms = int(round(self.now() * 1000))
        return sign_request(msg, self.identity.sign, ts_ms, self.random_bytes(NONCE_LEN))

    def send(self, msg: dict[str, Any], client: Optional[RegistryClient] = None,
             timeout: Optional[float] = None) -> "Deferred[Reply]":
        """
        Send on ``client`` (the current one by default) with a timeout.  Fails
        with a PilotError only: RegistryUnavailable for no connection, a lost
        one or no answer in time; the reply's error otherwise.
        """
        client = client if client is not None else self.client
        kind = str(msg.get("type"))
        if client is None:
            return fail(RegistryUnavailable(f"cannot send {kind}: not connected to the registry"))
        limit = self.request_timeout if timeout is None else timeout
        d: Deferred[Reply] = maybeDeferred(client.request, msg)
        d.addTimeout(limit, self.clock)
        entry = (client, d)
        self.inflight.append(entry)

        def settled(result: Any) -> Any:
            if entry in self.inflight:
                self.inflight.remove(entry)
            return result

        def normalise(failure: Failure) -> Failure:
            if failure.check(DeferredTimeout):
                return Failure(RegistryUnavailable(
                    f"the registry did not answer {kind} within {limit:g} s; the connection is dead"))
            if failure.check(CancelledError):
                return Failure(RegistryUnavailable(f"{kind} abandoned: the registry connection was closed"))
            if failure.check(PilotError):
                return failure
            return Failure(Internal(f"registry request {kind} failed: {_reason(failure)}"))

        d.addBoth(settled)
        d.addErrback(normalise)
        return d

    def abandon(self, client: RegistryClient) -> None:
        """Cancel what is still outstanding on ``client`` (closed by us): no timer outlives it."""
        for entry in [e for e in self.inflight if e[0] is client]:
            entry[1].cancel()

    def watch(self, client: Optional[RegistryClient]) -> Callable[[Failure], Failure]:
        """An errback: a RegistryUnavailable on the current client ends the connection."""

        def check(failure: Failure) -> Failure:
            if failure.check(RegistryUnavailable) and client is not None and client is self.client:
                self.machine.connection_lost(_reason(failure))
            return failure

        return check

    def cancel_heartbeat(self) -> None:
        if self.heartbeat_call is not None and self.heartbeat_call.active():
            self.heartbeat_call.cancel()
        self.heartbeat_call = None

    def cancel_retry(self) -> None:
        if self.retry_call is not None and self.retry_call.active():
            self.retry_call.cancel()
        self.retry_call = None
        self.next_retry_at = None

    def schedule_heartbeat(self) -> None:
        self.cancel_heartbeat()
        self.heartbeat_call = self.clock.callLater(self.heartbeat_interval, self.machine.heartbeat_due)

    def close_client(self) -> None:
        client, self.client = self.client, None
        self.subscribed = None
        self.new_epoch()
        if client is not None:
            try:
                client.close()
            except Exception:
                self.log.failure("registration: closing the registry connection failed")
            self.abandon(client)

    def unannounce(self, reason: str) -> None:
        if self.announced:
            self.announced = False
            self.call_out("unregistered", self.on_unregistered, reason)

    # --- settings ------------------------------------------------------------------------

    def remember(self, name: str, value: Any) -> None:
        setattr(self, name, value)
        self.serial += 1
        self.changes[name] = self.serial

    def confirmed(self, name: str, serial: Optional[int]) -> None:
        self.setting_errors.pop(name, None)
        if serial is not None and self.changes.get(name) == serial:
            del self.changes[name]

    def setting_message(self, name: str) -> dict[str, Any]:
        assert self.node_id is not None
        if name == "public":
            return {"type": "set_visibility", "node_id": self.node_id, "public": self.public}
        if name == "tags":
            return {"type": "set_tags", "node_id": self.node_id, "tags": list(self.tags)}
        return {"type": "set_hostname", "node_id": self.node_id, "hostname": self.hostname or ""}

    def push_setting(self, name: str) -> "Deferred[Reply]":
        """Send the signed request for ``name`` now; the reply, or its error (recorded)."""
        serial = self.changes.get(name)
        client = self.client
        d = self.send(self.sign(self.setting_message(name)))

        def ok(reply: Reply) -> Reply:
            self.confirmed(name, serial)
            self.log.info("registration: {request} applied", request=SETTING_REQUESTS[name])
            return reply

        def failed(failure: Failure) -> Failure:
            self.setting_errors[name] = _reason(failure)
            self.log.warn("registration: {request} failed: {why}", request=SETTING_REQUESTS[name],
                          why=_reason(failure))
            return failure

        d.addCallbacks(ok, failed)
        d.addErrback(self.watch(client))
        return d

    def settings_to_send(self, reply: Reply) -> list[str]:
        names = []
        if self.public or "public" in self.changes:
            names.append("public")
        if self.tags or "tags" in self.changes:
            names.append("tags")
        if self.hostname is not None:
            have = reply.get("hostname")
            have = have if isinstance(have, str) else ""
            if have != self.hostname:
                names.append("hostname")
            else:
                self.confirmed("hostname", self.changes.get("hostname"))
        return names

    # --- registration ----------------------------------------------------------------

    def accept_register_reply(self, reply: Reply) -> None:
        node_id = get_int(reply, "node_id")
        if node_id == 0:
            raise MalformedFrame("register_ok carries node id 0")
        echoed = reply.get("public_key")
        if echoed is not None and echoed != self.identity.public_key_b64:
            raise MalformedFrame("register_ok echoes a different public key")
        network = get_int(reply, "network_id", 16, default=0)
        address = Address(network, node_id)
        text = reply.get("address")
        try:
            if Address.parse(text if isinstance(text, str) else "") != address:
                self.log.warn("registration: register_ok address {text!r} does not match node id {node_id}; "
                              "using {address}", text=str(text)[:64], node_id=node_id, address=str(address))
        except MalformedFrame:
            self.log.warn("registration: register_ok has no valid address ({text!r}); using {address}",
                          text=str(text)[:64], address=str(address))
        expected = node_id_for_key(self.identity.public_key)
        if node_id != expected:
            self.log.warn("registration: the registry gave node id {node_id}, not {expected} (our key's id): "
                          "an id collision, or a registry that numbers nodes in order; its id is used",
                          node_id=node_id, expected=expected)
        if self.node_id is not None and node_id != self.node_id:
            self.log.warn("registration: our node id changed from {old} to {node_id}",
                          old=self.node_id, node_id=node_id)
        self.node_id, self.address = node_id, address
        error = reply.get("hostname_error")
        self.hostname_error = error[:256] if isinstance(error, str) and error else None
        if self.hostname_error is not None:
            self.log.warn("registration: the registry refused hostname {hostname!r}: {why}",
                          hostname=self.hostname, why=self.hostname_error)

    @inlineCallbacks
    def registration(self, epoch: int) -> Generator["Deferred[Any]", Any, Reply]:
        """register, subscribe_events, then the settings; the register_ok."""
        listen = self.listen_addr()
        msg: dict[str, Any] = {"type": "register", "public_key": self.identity.public_key_b64,
                               "listen_addr": listen}
        if self.hostname:
            msg["hostname"] = self.hostname
        try:
            msg.update({k: v for k, v in self.register_extra().items() if k not in msg})
        except Exception:
            self.log.failure("registration: the register_extra provider failed")
        self.sent_listen_addr = listen
        self.step_sent = {}
        reply = yield self.send(self.sign(msg))
        self.check_current(epoch)
        self.accept_register_reply(reply)
        try:
            yield self.send(self.sign({"type": "subscribe_events", "node_id": self.node_id}))
        except RegistryUnavailable:
            raise
        except PilotError as e:
            self.check_current(epoch)
            self.subscribed = False
            self.log.info("registration: the registry refused subscribe_events ({why}); polling for "
                          "handshakes after each heartbeat", why=e.message)
        else:
            self.check_current(epoch)
            self.subscribed = True
        for name in self.settings_to_send(reply):
            serial = self.changes.get(name)
            self.step_sent[name] = serial if serial is not None else 0
            try:
                yield self.send(self.sign(self.setting_message(name)))
            except RegistryUnavailable:
                raise
            except PilotError as e:
                self.check_current(epoch)
                self.setting_errors[name] = e.message
                self.log.warn("registration: {request} failed: {why}", request=SETTING_REQUESTS[name],
                              why=e.message)
            else:
                self.check_current(epoch)
                self.confirmed(name, serial)
        return reply

    def start_registration(self) -> None:
        self.cancel_heartbeat()
        epoch = self.new_epoch()
        m = self.machine
        d = self.registration(epoch)
        d.addCallbacks(lambda reply: self.if_current(epoch, m.registration_succeeded, reply),
                       lambda f: self.if_current(epoch, m.registration_failed, f))

    def flush_changes(self) -> None:
        """Settings changed after this registration's settings step: send them now."""
        for name, serial in sorted(self.changes.items()):
            if self.step_sent.get(name) != serial:
                self.push_setting(name).addErrback(lambda f: None)  # logged by push_setting

    # --- polling -------------------------------------------------------------------------

    def poll(self) -> None:
        if self.node_id is None:
            return
        client = self.client
        d = self.send(self.sign({"type": "poll_handshakes", "node_id": self.node_id}))
        d.addCallback(self.forward_poll)
        d.addErrback(self.watch(client))
        d.addErrback(lambda f: self.log.warn("registration: poll_handshakes failed: {why}", why=_reason(f)))

    def forward_poll(self, reply: Reply) -> None:
        # The registry has emptied its queues: forward whatever came, whatever our state.
        events: list[dict[str, Any]] = []
        for kind, key, fields in (("handshake_request", "requests", ("justification",)),
                                  ("handshake_response", "responses", ("accept",))):
            items = reply.get(key)
            for item in items if isinstance(items, list) else []:
                if not isinstance(item, dict) or not isinstance(item.get("from_node_id"), int):
                    self.log.warn("registration: dropped a malformed {key} item from poll_handshakes",
                                  key=key)
                    continue
                event = {"type": "event", "event": kind, "from_node_id": item["from_node_id"],
                         "timestamp": item.get("timestamp", 0)}
                for field in fields:
                    event[field] = item.get(field, "" if field == "justification" else False)
                events.append(event)
        if self.state == STOPPED and events:
            self.log.warn("registration: stopped; {count} polled handshake items dropped", count=len(events))
            return
        for event in events:
            self.call_out("event", self.on_event, event)

    # --- heartbeats --------------------------------------------------------------------

    def heartbeat_ok(self, epoch: int, reply: Reply) -> None:
        if epoch != self.epoch:
            return
        self.last_heartbeat_ok = self.now()
        self.failures = 0
        if self.on_heartbeat is not None:
            self.call_out("heartbeat", self.on_heartbeat, self.last_heartbeat_ok)
        if not self.subscribed:
            self.poll()

    # --- stopping ------------------------------------------------------------------------

    def finish_stop(self, done: "Deferred[None]") -> None:
        self.stop_finished = True
        done.callback(None)
        waiters, self.stop_waiters = self.stop_waiters, []
        for waiter in waiters:
            waiter.callback(None)
