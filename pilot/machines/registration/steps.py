# -*- test-case-name: tests.machines.test_registration -*-
"""
The requests of one registration (``docs/registration.md``, "One
registration"): ``register``, what its ``register_ok`` tells us,
``subscribe_events`` and the settings; and the events a ``poll_handshakes``
reply holds.  The machine runs them; their outcome is its input.
"""

from __future__ import annotations

from typing import Any, Generator

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from pilot.address import Address, node_id_for_key
from pilot.errors import MalformedFrame, PilotError, RegistryUnavailable
from pilot.machines.registration.session import Session
from pilot.machines.registration.values import SETTING_REQUESTS, Reply, Stale
from pilot.wire.registry import get_int


def accept_register_reply(c: Session, reply: Reply) -> None:
    node_id = get_int(reply, "node_id")
    if node_id == 0:
        raise MalformedFrame("register_ok carries node id 0")
    echoed = reply.get("public_key")
    if echoed is not None and echoed != c.identity.public_key_b64:
        raise MalformedFrame("register_ok echoes a different public key")
    address = Address(get_int(reply, "network_id", 16, default=0), node_id)
    text = reply.get("address")
    try:
        if Address.parse(text if isinstance(text, str) else "") != address:
            c.log.warn("registration: register_ok address {text!r} does not match node id {node_id}; "
                       "using {address}", text=str(text)[:64], node_id=node_id, address=str(address))
    except MalformedFrame:
        c.log.warn("registration: register_ok has no valid address ({text!r}); using {address}",
                   text=str(text)[:64], address=str(address))
    expected = node_id_for_key(c.identity.public_key)
    if node_id != expected:
        c.log.warn("registration: the registry gave node id {node_id}, not {expected} (our key's id): "
                   "an id collision, or a registry that numbers nodes in order; its id is used",
                   node_id=node_id, expected=expected)
    if c.node_id is not None and node_id != c.node_id:
        c.log.warn("registration: our node id changed from {old} to {node_id}",
                   old=c.node_id, node_id=node_id)
    c.node_id, c.address = node_id, address
    error = reply.get("hostname_error")
    c.hostname_error = error[:256] if isinstance(error, str) and error else None
    if c.hostname_error is not None:
        c.log.warn("registration: the registry refused hostname {hostname!r}: {why}",
                   hostname=c.settings.hostname, why=c.hostname_error)


@inlineCallbacks
def register(c: Session, epoch: int) -> Generator["Deferred[Any]", Any, Reply]:
    """register, subscribe_events, then the settings; the register_ok."""

    def check_current() -> None:
        if epoch != c.epoch:
            raise Stale()

    listen = c.listen_addr()
    msg: dict[str, Any] = {"type": "register", "public_key": c.identity.public_key_b64, "listen_addr": listen}
    if c.settings.hostname:
        msg["hostname"] = c.settings.hostname
    try:
        msg.update({k: v for k, v in c.register_extra().items() if k not in msg})
    except Exception:
        c.log.failure("registration: the register_extra provider failed")
    c.sent_listen_addr = listen
    c.settings.step_sent = {}
    reply = yield c.send(msg)
    check_current()
    accept_register_reply(c, reply)
    try:
        yield c.send({"type": "subscribe_events", "node_id": c.node_id})
    except RegistryUnavailable:
        raise
    except PilotError as e:
        check_current()
        c.subscribed = False
        c.log.info("registration: the registry refused subscribe_events ({why}); polling for "
                   "handshakes after each heartbeat", why=e.message)
    else:
        check_current()
        c.subscribed = True
    assert c.node_id is not None
    for name in c.settings.after_register(reply):
        serial = c.settings.changes.get(name)
        c.settings.step_sent[name] = serial if serial is not None else 0
        try:
            yield c.send(c.settings.message(name, c.node_id))
        except RegistryUnavailable:
            raise
        except PilotError as e:
            check_current()
            c.settings.errors[name] = e.message
            c.log.warn("registration: {request} failed: {why}", request=SETTING_REQUESTS[name], why=e.message)
        else:
            check_current()
            c.settings.confirmed(name, serial)
    return reply


def poll_events(reply: Reply, log: Logger) -> list[dict[str, Any]]:
    """The registry events a ``poll_handshakes`` reply stands for; malformed items are logged and dropped."""
    events: list[dict[str, Any]] = []
    for kind, key, fields in (("handshake_request", "requests", ("justification",)),
                              ("handshake_response", "responses", ("accept",))):
        items = reply.get(key)
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict) or not isinstance(item.get("from_node_id"), int):
                log.warn("registration: dropped a malformed {key} item from poll_handshakes", key=key)
                continue
            event = {"type": "event", "event": kind, "from_node_id": item["from_node_id"],
                     "timestamp": item.get("timestamp", 0)}
            for field in fields:
                event[field] = item.get(field, "" if field == "justification" else False)
            events.append(event)
    return events
