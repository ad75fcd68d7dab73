# -*- test-case-name: tests.machines.test_registration -*-
"""
The registry session's Automat table (described in
:mod:`pilot.machines.registration`): the inputs, the states, every
transition and its behaviour, and :func:`transitions` listing them.  The
behaviours act on :class:`pilot.machines.registration_core._Core`.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from pilot.errors import RegistryUnavailable
from pilot.machines.table import transition_table
from pilot.machines.registration_core import (
    CONNECTING, IDLE, REGISTERED, REGISTERING, STOPPED, WAITING, RegistryClient, Reply, _Core, _reason,
)


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


def _enter(core: _Core, old: str, new: str, event: str) -> None:
    if old != new:
        core.log.debug("registration: {old} --{input}--> {new}", old=old, input=event, new=new)
    core.state = new


_on = transition_table(_defined, before=_enter)


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
