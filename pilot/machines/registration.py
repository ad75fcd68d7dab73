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
from typing import Any, Callable, Generator, Optional, Protocol

import attr
from automat import TypeMachineBuilder
from twisted.internet.defer import (
    CancelledError, Deferred, TimeoutError as DeferredTimeout, fail, inlineCallbacks, maybeDeferred,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.address import Address, node_id_for_key
from pilot.errors import Internal, InvalidArgument, MalformedFrame, PilotError, RegistryUnavailable
from pilot.identity import Identity
from pilot.names import hostname_problem, normalise_tags
from pilot.wire.registry import NONCE_LEN, get_int, sign_request

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


class RegistrationInputs(Protocol):
    """What happens to the registry session.  Every input returns None, so any may arrive reentrantly."""

    def started(self) -> None:
        "The owner started the session."

    def connected(self, client: RegistryClient) -> None:
        "``connect()`` gave a client."

    def connect_failed(self, reason: Failure) -> None:
        "``connect()`` failed or timed out."

    def registration_succeeded(self, reply: Reply) -> None:
        "register and its follow-up requests went through; ``reply`` is the register_ok."

    def registration_failed(self, reason: Failure) -> None:
        "register failed, or a follow-up found the connection dead."

    def heartbeat_due(self) -> None:
        "The heartbeat timer fired."

    def heartbeat_failed(self, reason: Failure) -> None:
        "A heartbeat got an error reply or none in time."

    def connection_lost(self, reason: str) -> None:
        "The connection closed, or a request on it went unanswered."

    def backoff_elapsed(self) -> None:
        "The reconnect wait is over."

    def endpoint_changed(self) -> None:
        "The beacon observed a new public endpoint for our tunnel socket."

    def settings_changed(self, name: str, done: "Deferred[Reply]") -> None:
        "The owner changed ``name`` (hostname, public, tags); ``done`` gets the outcome."

    def event_received(self, event: dict[str, Any]) -> None:
        "The registry pushed an event."

    def stopped(self, done: "Deferred[None]") -> None:
        "The owner stops the session; ``done`` fires when it is over."


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


# --- the table ------------------------------------------------------------------------------

_builder = TypeMachineBuilder(RegistrationInputs, _Core)
idle = _builder.state(IDLE)
connecting = _builder.state(CONNECTING)
registering = _builder.state(REGISTERING)
registered = _builder.state(REGISTERED)
waiting = _builder.state(WAITING)
stopped = _builder.state(STOPPED)
_STATES = (idle, connecting, registering, registered, waiting, stopped)
_defined: set[tuple[str, str]] = set()

I = RegistrationInputs  # noqa: E741
_Behaviour = Callable[..., None]


def _on(old: Any, event: Callable[..., None], new: Any) -> Callable[[_Behaviour], _Behaviour]:
    """Register a transition whose behaviour first records the new state's name."""

    def register(behaviour: _Behaviour) -> _Behaviour:
        def output(inputs: RegistrationInputs, core: _Core, *args: Any) -> None:
            if old.name != new.name:
                core.log.debug("registration: {old} --{input}--> {new}", old=old.name,
                               input=event.__name__, new=new.name)
            core.state = new.name
            behaviour(inputs, core, *args)

        output.__name__ = behaviour.__name__
        if old is new:
            old.upon(event).loop()(output)
        else:
            old.upon(event).to(new)(output)
        _defined.add((old.name, event.__name__))
        return behaviour

    return register


@_on(idle, I.started, connecting)
@_on(waiting, I.backoff_elapsed, connecting)
def _connect(m: RegistrationInputs, c: _Core) -> None:
    c.retry_call = None
    c.next_retry_at = None
    epoch = c.new_epoch()
    d: Deferred[RegistryClient] = maybeDeferred(c.connect)
    d.addTimeout(c.connect_timeout, c.clock)
    c.connecting = d

    def done(client: RegistryClient) -> None:
        if epoch != c.epoch:  # stopped meanwhile: nobody wants this connection
            try:
                client.close()
            except Exception:
                c.log.failure("registration: closing an unwanted registry connection failed")
            return
        c.connecting = None
        m.connected(client)

    def failed(failure: Failure) -> None:
        if epoch == c.epoch:
            c.connecting = None
            m.connect_failed(failure)

    d.addCallbacks(done, failed)


@_on(connecting, I.connected, registering)
def _begin_registration(m: RegistrationInputs, c: _Core, client: RegistryClient) -> None:
    c.client = client
    c.subscribed = None
    c.start_registration()


def _back_off(m: RegistrationInputs, c: _Core, reason: str) -> None:
    c.failures += 1
    c.last_error = reason
    c.cancel_heartbeat()
    c.cancel_retry()
    c.close_client()
    window = c.backoff
    delay = min(max(float(c.jitter.uniform(0.0, window)), 0.0), window)
    c.backoff = min(window * 2, c.backoff_max)
    c.next_retry_at = c.now() + delay
    c.retry_call = c.clock.callLater(delay, m.backoff_elapsed)
    c.log.info("registration: registry unavailable ({why}); retrying in {delay:.2f} s (failure {failures})",
               why=reason, delay=delay, failures=c.failures)
    c.unannounce(reason)


@_on(connecting, I.connect_failed, waiting)
@_on(registering, I.registration_failed, waiting)
def _failed(m: RegistrationInputs, c: _Core, reason: Failure) -> None:
    _back_off(m, c, _reason(reason))


@_on(registering, I.connection_lost, waiting)
@_on(registered, I.connection_lost, waiting)
def _lost(m: RegistrationInputs, c: _Core, reason: str) -> None:
    _back_off(m, c, reason)


@_on(registering, I.registration_succeeded, registered)
def _announce(m: RegistrationInputs, c: _Core, reply: Reply) -> None:
    assert c.node_id is not None and c.address is not None
    c.failures = 0
    c.backoff = c.backoff_initial
    c.next_retry_at = None
    c.last_error = None
    c.registered_at = c.now()
    c.schedule_heartbeat()
    c.log.info("registration: registered as {address} (node {node_id}), events {events}",
               address=str(c.address), node_id=c.node_id, events="pushed" if c.subscribed else "polled")
    c.announced = True
    c.call_out("registered", c.on_registered, c.node_id, c.address)
    if c.listen_addr() != c.sent_listen_addr:
        # it moved while we were registering: this connection is about to be
        # replaced, and a poll on it could empty our queue into a reply we lose;
        # the new connection's registration polls and sends the settings
        m.endpoint_changed()
        return
    c.poll()
    c.flush_changes()


@_on(registered, I.heartbeat_due, registered)
def _heartbeat(m: RegistrationInputs, c: _Core) -> None:
    c.heartbeat_call = None
    c.schedule_heartbeat()
    epoch = c.epoch
    d = c.send(c.sign({"type": "heartbeat", "node_id": c.node_id}))
    d.addCallbacks(lambda reply: c.heartbeat_ok(epoch, reply),
                   lambda f: c.if_current(epoch, m.heartbeat_failed, f))


@_on(registered, I.heartbeat_failed, registering)
def _heartbeat_failed(m: RegistrationInputs, c: _Core, reason: Failure) -> None:
    c.failures += 1
    c.last_error = _reason(reason)
    if reason.check(RegistryUnavailable):
        # no answer, or the connection went away: registering again on it would
        # only wait out another timeout; reconnect instead
        c.log.warn("registration: heartbeat failed ({why}); reconnecting", why=c.last_error)
        c.close_client()
        m.connection_lost(c.last_error)
        return
    c.log.warn("registration: heartbeat failed ({why}); registering again", why=c.last_error)
    c.start_registration()


@_on(registered, I.endpoint_changed, waiting)
def _moved(m: RegistrationInputs, c: _Core) -> None:
    # a new public endpoint usually means a new IP: the registry connection was
    # made from the old one and may be dead without knowing it; reconnect at once
    # (our own move, not a registry outage: no backoff)
    c.log.info("registration: our endpoint is now {endpoint!r}; reconnecting to register it",
               endpoint=c.listen_addr())
    c.cancel_heartbeat()
    c.cancel_retry()
    c.close_client()
    c.next_retry_at = c.now()
    c.retry_call = c.clock.callLater(0, m.backoff_elapsed)


@_on(registered, I.settings_changed, registered)
def _apply_setting(m: RegistrationInputs, c: _Core, name: str, done: "Deferred[Reply]") -> None:
    c.push_setting(name).chainDeferred(done)


def _not_registered(c: _Core, then: str = "") -> RegistryUnavailable:
    if c.state == WAITING and c.next_retry_at is not None:
        why = f"waiting to reconnect (next attempt in {max(c.next_retry_at - c.now(), 0.0):.1f} s)"
    else:
        why = {IDLE: "not started", CONNECTING: "connecting", REGISTERING: "registering",
               STOPPED: "stopped", WAITING: "waiting to reconnect"}.get(c.state, c.state)
    detail = f": {c.last_error}" if c.last_error and c.state in (WAITING, CONNECTING) else ""
    return RegistryUnavailable(f"not registered with the registry ({why}{detail}){then}")


def _refuse_setting(m: RegistrationInputs, c: _Core, name: str, done: "Deferred[Reply]") -> None:
    then = "" if c.state == STOPPED else f"; the {name} setting is kept and applied at the next registration"
    done.errback(_not_registered(c, then))


for _state in (idle, connecting, registering, waiting, stopped):
    _on(_state, I.settings_changed, _state)(_refuse_setting)


def _forward_event(m: RegistrationInputs, c: _Core, event: dict[str, Any]) -> None:
    if not isinstance(event, dict) or event.get("type") != "event" or not isinstance(event.get("event"), str):
        c.log.warn("registration: dropped a malformed registry event")
        return
    c.call_out("event", c.on_event, dict(event))


for _state in (idle, connecting, registering, registered, waiting):
    _on(_state, I.event_received, _state)(_forward_event)


def _stop(m: RegistrationInputs, c: _Core, done: "Deferred[None]") -> None:
    c.cancel_heartbeat()
    c.cancel_retry()
    connecting_d, c.connecting = c.connecting, None
    c.new_epoch()
    if connecting_d is not None:
        connecting_d.cancel()
    c.unannounce("stopped")
    client, c.client = c.client, None
    c.subscribed = None
    if client is None:
        c.finish_stop(done)
        return

    def close(_: object) -> None:
        try:
            client.close()
        except Exception:
            c.log.failure("registration: closing the registry connection failed")
        c.abandon(client)
        c.finish_stop(done)

    if c.node_id is None:
        close(None)
        return
    d = c.send(c.sign({"type": "deregister", "node_id": c.node_id}), client=client, timeout=c.stop_timeout)
    d.addErrback(lambda f: c.log.info("registration: deregister failed: {why}", why=_reason(f)))
    d.addBoth(close)


for _state in (idle, connecting, registering, registered, waiting):
    _on(_state, I.stopped, stopped)(_stop)


@_on(stopped, I.stopped, stopped)
def _stopped_again(m: RegistrationInputs, c: _Core, done: "Deferred[None]") -> None:
    if c.stop_finished:
        done.callback(None)
    else:
        c.stop_waiters.append(done)


# Everything else is ignored: inputs that lost a race with a transition (a
# late connection_lost for a connection we closed ourselves, an endpoint
# change while not registered, which the next register picks up anyway).
for _state in _STATES:
    for _name in ("started", "connected", "connect_failed", "registration_succeeded", "registration_failed",
                  "heartbeat_due", "heartbeat_failed", "connection_lost", "backoff_elapsed",
                  "endpoint_changed", "event_received"):
        if (_state.name, _name) not in _defined:
            _state.upon(getattr(I, _name)).loop().returns(None)

_machine = _builder.build()


def transitions() -> list[tuple[str, str, str, str]]:
    """Every transition that does something: (state, input, next state, behaviour), for docs and tests."""
    rows = [(old.name, event, new.name, outputs[-1].name)
            for old, event, new, outputs in _machine.__automat_automaton__._transitions
            if outputs[-1].name != "returns(None)"]
    order = [state.name for state in _STATES]
    return sorted(rows, key=lambda row: (order.index(row[0]), row[1]))


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
