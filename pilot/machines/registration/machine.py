# -*- test-case-name: tests.machines.test_registration -*-
"""
The registry session's machine (the session is described in
:mod:`pilot.machines.registration` and ``docs/registration.md``): its
inputs, its states, and one behaviour per transition that does the work.

Harmless inputs are listed with :meth:`TransitionTable.ignore` and a reason;
every other (state, input) pair raises ``NoTransition``: an input that cannot
happen (a connect result outside ``connecting``, a heartbeat timer outside
``registered``) shows in tests instead of vanishing.  Inputs fed by our own
timers and Deferreds carry the epoch of the work they belong to and are
dropped when it is over, so they only arrive in the state that started them.

Pure: no sockets, no reactor import; time comes from the injected
``IReactorTime`` of the :class:`~pilot.machines.registration.session.Session`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from pilot.errors import RegistryUnavailable
from pilot.machines.registration.servers import STANDBY_RETRY
from pilot.machines.registration.session import Session
from pilot.machines.registration.steps import poll_events, register
from pilot.machines.registration.values import (
    CONNECTING, IDLE, REGISTERED, REGISTERING, SEEN_SPREAD, SETTING_REQUESTS, STOPPED, WAITING, RegistryClient,
    Reply, reason,
)
from pilot.machines.table import Transition, TransitionTable


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

    def server_seen(self) -> None:
        "The rendezvous answered on another channel (its beacon): it is up again."

    def endpoint_changed(self) -> None:
        "The beacon observed a new public endpoint for our tunnel socket."

    def settings_changed(self, name: str, done: "Deferred[Reply]") -> None:
        "The owner changed ``name`` (hostname, public, tags); ``done`` gets the outcome."

    def event_received(self, event: dict[str, Any]) -> None:
        "The registry pushed an event."

    def stopped(self, done: "Deferred[None]") -> None:
        "The owner stops the session; ``done`` fires when it is over."


def _enter(core: Session, old: str, new: str, event: str) -> None:
    if old != new:
        core.log.debug("registration: {old} --{input}--> {new}", old=old, input=event, new=new)
    core.state = new


_builder = TypeMachineBuilder(RegistrationInputs, Session)
idle = _builder.state(IDLE)
connecting = _builder.state(CONNECTING)
registering = _builder.state(REGISTERING)
registered = _builder.state(REGISTERED)
waiting = _builder.state(WAITING)
stopped = _builder.state(STOPPED)
table = TransitionTable((idle, connecting, registering, registered, waiting, stopped), before=_enter)
I = RegistrationInputs  # noqa: E741
_LIVE = (idle, connecting, registering, registered, waiting)


# --- connecting ------------------------------------------------------------------------------

@table.on(idle, I.started, connecting)
@table.on(waiting, I.backoff_elapsed, connecting)
def _connect(m: RegistrationInputs, c: Session) -> None:
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


@table.on(connecting, I.connected, registering)
def _begin_registration(m: RegistrationInputs, c: Session, client: RegistryClient) -> None:
    c.client = client
    c.subscribed = None
    _start_registration(m, c)


# --- losing the registry -----------------------------------------------------------------------

def _cancel_timers(c: Session) -> None:
    for call in (c.heartbeat_call, c.retry_call):
        if call is not None and call.active():
            call.cancel()
    c.heartbeat_call = c.retry_call = None
    c.next_retry_at = None


def _close_client(c: Session) -> None:
    client, c.client = c.client, None
    c.subscribed = None
    c.new_epoch()
    if client is not None:
        try:
            client.close()
        except Exception:
            c.log.failure("registration: closing the registry connection failed")
        c.outbox.abandon(client)


def _unannounce(c: Session, why: str) -> None:
    if c.announced:
        c.announced = False
        c.call_out("unregistered", c.on_unregistered, why)


def _back_off(m: RegistrationInputs, c: Session, why: str) -> None:
    c.failures += 1
    c.last_error = why
    _cancel_timers(c)
    _close_client(c)
    left, before = c.servers.current, c.servers.index
    then = c.servers.failed()
    if then.back_off:
        # the whole list failed in this round (always, with one server), or a
        # standby refused us: back off (briefly while a standby answers)
        window = min(c.backoff, STANDBY_RETRY) if then.standby else c.backoff
        delay = min(max(float(c.jitter.uniform(0.0, window)), 0.0), window)
        c.backoff = min(c.backoff * 2, c.backoff_max)
        c.log.info("registration: registry unavailable ({why}); retrying in {delay:.2f} s (failure {failures})",
                   why=why, delay=delay, failures=c.failures)
    else:
        # another entry is left in this round: go there at once, spread a little
        # so that a fleet does not arrive in one instant
        window = c.backoff_initial
        delay = min(max(float(c.jitter.uniform(0.0, window)), 0.0), window)
        c.log.info("registration: the rendezvous at {left} is unavailable ({why}); moving to {server} in "
                   "{delay:.2f} s", left=left, why=why, server=c.servers.current, delay=delay)
    c.next_retry_at = c.now() + delay
    c.retry_call = c.clock.callLater(delay, m.backoff_elapsed)
    if c.servers.index != before:
        c.call_out("server_changed", c.on_server_changed, c.servers.index)
    _unannounce(c, why)


@table.on(connecting, I.connect_failed, waiting)
@table.on(registering, I.registration_failed, waiting)
def _failed(m: RegistrationInputs, c: Session, failure: Failure) -> None:
    _back_off(m, c, reason(failure))


@table.on(registering, I.connection_lost, waiting)
@table.on(registered, I.connection_lost, waiting)
def _lost(m: RegistrationInputs, c: Session, why: str) -> None:
    _back_off(m, c, why)


def watch(m: RegistrationInputs, c: Session,
          client: Optional[RegistryClient]) -> Callable[[Failure], Failure]:
    """An errback: a RegistryUnavailable on the current client ends the connection."""

    def check(failure: Failure) -> Failure:
        if failure.check(RegistryUnavailable) and client is not None and client is c.client:
            m.connection_lost(reason(failure))
        return failure

    return check


# --- registering -----------------------------------------------------------------------------

def _start_registration(m: RegistrationInputs, c: Session) -> None:
    if c.heartbeat_call is not None and c.heartbeat_call.active():
        c.heartbeat_call.cancel()
    c.heartbeat_call = None
    epoch = c.new_epoch()

    def succeeded(reply: Reply) -> None:
        if epoch == c.epoch:
            m.registration_succeeded(reply)

    def failed(failure: Failure) -> None:
        if epoch == c.epoch:
            m.registration_failed(failure)

    register(c, epoch).addCallbacks(succeeded, failed)


@table.on(registering, I.registration_succeeded, registered)
def _announce(m: RegistrationInputs, c: Session, reply: Reply) -> None:
    assert c.node_id is not None and c.address is not None
    c.failures = 0
    c.backoff = c.backoff_initial
    c.servers.succeeded()
    c.next_retry_at = None
    c.last_error = None
    c.registered_at = c.now()
    c.heartbeat_call = c.clock.callLater(c.heartbeat_every(), m.heartbeat_due)
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
    _poll(m, c)
    for name in c.settings.changed_since_step():
        push_setting(m, c, name).addErrback(lambda f: None)  # logged by push_setting


# --- registered --------------------------------------------------------------------------------

@table.on(registered, I.heartbeat_due, registered)
def _heartbeat(m: RegistrationInputs, c: Session) -> None:
    if c.heartbeat_call is not None and c.heartbeat_call.active():
        c.heartbeat_call.cancel()  # the owner asked for one now (``check_now``): the cadence restarts
    c.heartbeat_call = c.clock.callLater(c.heartbeat_every(), m.heartbeat_due)
    epoch = c.epoch

    def answered(reply: Reply) -> None:
        if epoch != c.epoch:
            return
        c.last_heartbeat_ok = c.now()
        c.failures = 0
        if c.on_heartbeat is not None:
            c.call_out("heartbeat", c.on_heartbeat, c.last_heartbeat_ok, reply)
        if not c.subscribed:
            _poll(m, c)

    def failed(failure: Failure) -> None:
        if epoch == c.epoch:
            m.heartbeat_failed(failure)

    c.send({"type": "heartbeat", "node_id": c.node_id}).addCallbacks(answered, failed)


@table.on(registered, I.heartbeat_failed, registering)
def _heartbeat_failed(m: RegistrationInputs, c: Session, failure: Failure) -> None:
    c.failures += 1
    c.last_error = reason(failure)
    if failure.check(RegistryUnavailable):
        # no answer, or the connection went away: registering again on it would
        # only wait out another timeout; reconnect instead
        c.log.warn("registration: heartbeat failed ({why}); reconnecting", why=c.last_error)
        _close_client(c)
        m.connection_lost(c.last_error)
        return
    c.log.warn("registration: heartbeat failed ({why}); registering again", why=c.last_error)
    _start_registration(m, c)


@table.on(registered, I.endpoint_changed, waiting)
def _moved(m: RegistrationInputs, c: Session) -> None:
    # a new public endpoint usually means a new IP: the registry connection was
    # made from the old one and may be dead without knowing it; reconnect at once
    # (our own move, not a registry outage: no backoff)
    c.log.info("registration: our endpoint is now {endpoint!r}; reconnecting to register it",
               endpoint=c.listen_addr())
    _cancel_timers(c)
    _close_client(c)
    c.next_retry_at = c.now()
    c.retry_call = c.clock.callLater(0, m.backoff_elapsed)


@table.on(waiting, I.server_seen, waiting)
def _server_back(m: RegistrationInputs, c: Session) -> None:
    # The beacon (the same process) answered: the rendezvous is back, so the
    # wait need not run out.  Spread the reconnects over SEEN_SPREAD seconds,
    # never later than the backoff had planned (docs/registration.md).
    delay = min(max(float(c.jitter.uniform(0.0, SEEN_SPREAD)), 0.0), SEEN_SPREAD)
    if c.next_retry_at is not None and c.now() + delay >= c.next_retry_at:
        return
    _cancel_timers(c)
    c.next_retry_at = c.now() + delay
    c.retry_call = c.clock.callLater(delay, m.backoff_elapsed)
    c.log.info("registration: the rendezvous answers again; reconnecting in {delay:.2f} s", delay=delay)


# --- settings and events --------------------------------------------------------------------

def push_setting(m: RegistrationInputs, c: Session, name: str) -> "Deferred[Reply]":
    """Send the signed request for ``name`` now; the reply, or its error (recorded)."""
    assert c.node_id is not None
    serial = c.settings.changes.get(name)
    client = c.client
    d = c.send(c.settings.message(name, c.node_id))

    def ok(reply: Reply) -> Reply:
        c.settings.confirmed(name, serial)
        c.log.info("registration: {request} applied", request=SETTING_REQUESTS[name])
        return reply

    def failed(failure: Failure) -> Failure:
        c.settings.errors[name] = reason(failure)
        c.log.warn("registration: {request} failed: {why}", request=SETTING_REQUESTS[name],
                   why=reason(failure))
        return failure

    d.addCallbacks(ok, failed)
    d.addErrback(watch(m, c, client))
    return d


@table.on(registered, I.settings_changed, registered)
def _apply_setting(m: RegistrationInputs, c: Session, name: str, done: "Deferred[Reply]") -> None:
    push_setting(m, c, name).chainDeferred(done)


def not_registered(c: Session, then: str = "") -> RegistryUnavailable:
    """The error for a request or setting that needs a registration we do not have."""
    if c.state == WAITING and c.next_retry_at is not None:
        why = f"waiting to reconnect (next attempt in {max(c.next_retry_at - c.now(), 0.0):.1f} s)"
    else:
        why = {IDLE: "not started", CONNECTING: "connecting", REGISTERING: "registering",
               STOPPED: "stopped", WAITING: "waiting to reconnect"}.get(c.state, c.state)
    detail = f": {c.last_error}" if c.last_error and c.state in (WAITING, CONNECTING) else ""
    return RegistryUnavailable(f"not registered with the registry ({why}{detail}){then}")


def _refuse_setting(m: RegistrationInputs, c: Session, name: str, done: "Deferred[Reply]") -> None:
    then = "" if c.state == STOPPED else f"; the {name} setting is kept and applied at the next registration"
    done.errback(not_registered(c, then))


for _state in (idle, connecting, registering, waiting, stopped):
    table.on(_state, I.settings_changed, _state)(_refuse_setting)


def _forward_event(m: RegistrationInputs, c: Session, event: dict[str, Any]) -> None:
    if not isinstance(event, dict) or event.get("type") != "event" or not isinstance(event.get("event"), str):
        c.log.warn("registration: dropped a malformed registry event")
        return
    why = c.servers.screen(event)
    if why is not None:
        # never applied; the session that carried it is left (connection_lost is
        # ignored in the states that have no connection)
        c.log.warn("registration: dropped a registry event: {why}", why=why)
        m.connection_lost(why)
        return
    c.call_out("event", c.on_event, dict(event))


for _state in _LIVE:
    table.on(_state, I.event_received, _state)(_forward_event)


def _poll(m: RegistrationInputs, c: Session) -> None:
    """poll_handshakes; what the registry kept for us goes to the owner as events."""
    if c.node_id is None:
        return
    client = c.client

    def forward(reply: Reply) -> None:
        events = poll_events(reply, c.log)
        if c.state == STOPPED and events:
            c.log.warn("registration: stopped; {count} polled handshake items dropped", count=len(events))
            return
        for event in events:
            c.call_out("event", c.on_event, event)

    d = c.send({"type": "poll_handshakes", "node_id": c.node_id})
    d.addCallback(forward)
    d.addErrback(watch(m, c, client))
    d.addErrback(lambda f: c.log.warn("registration: poll_handshakes failed: {why}", why=reason(f)))


# --- stopping --------------------------------------------------------------------------------

def _finish_stop(c: Session, done: "Deferred[None]") -> None:
    waiters, c.stop_waiters = c.stop_waiters or [], None
    done.callback(None)
    for waiter in waiters:
        waiter.callback(None)


@table.on(idle, I.stopped, stopped)
@table.on(connecting, I.stopped, stopped)
@table.on(registering, I.stopped, stopped)
@table.on(registered, I.stopped, stopped)
@table.on(waiting, I.stopped, stopped)
def _stop(m: RegistrationInputs, c: Session, done: "Deferred[None]") -> None:
    _cancel_timers(c)
    connecting_d, c.connecting = c.connecting, None
    c.new_epoch()
    if connecting_d is not None:
        connecting_d.cancel()
    _unannounce(c, "stopped")
    client, c.client = c.client, None
    c.subscribed = None
    if client is None:
        _finish_stop(c, done)
        return

    def close(_: object) -> None:
        try:
            client.close()
        except Exception:
            c.log.failure("registration: closing the registry connection failed")
        c.outbox.abandon(client)
        _finish_stop(c, done)

    if c.node_id is None:
        close(None)
        return
    d = c.outbox.send(c.outbox.sign({"type": "deregister", "node_id": c.node_id}), client,
                      timeout=c.stop_timeout)
    d.addErrback(lambda f: c.log.info("registration: deregister failed: {why}", why=reason(f)))
    d.addBoth(close)


@table.on(stopped, I.stopped, stopped)
def _stopped_again(m: RegistrationInputs, c: Session, done: "Deferred[None]") -> None:
    if c.stop_waiters is None:
        done.callback(None)
    else:
        c.stop_waiters.append(done)


# --- harmless inputs -------------------------------------------------------------------------

table.ignore((connecting, registering, registered, waiting, stopped), I.started,
             why="start() once started changes nothing, and a stopped session stays stopped")
table.ignore((idle, connecting, waiting, stopped), I.connection_lost,
             why="a loss reported for a connection we already closed, or before one was made")
table.ignore((idle, connecting, registering, waiting, stopped), I.endpoint_changed,
             why="the next register reads endpoint(); registering checks it again when it succeeds")
table.ignore((stopped,), I.event_received, why="a registry event after stop(): nobody listens any more")
table.ignore((idle, connecting, registering, registered, stopped), I.server_seen,
             why="only a session waiting out a backoff has a wait to cut short")

RegistrationMachine = _builder.build()


def transitions(ignored: bool = False) -> list[Transition]:
    """Every transition that does something (with ``ignored``, the harmless ones too), for docs and tests."""
    return table.transitions(ignored)
