# -*- test-case-name: tests.machines.test_registration -*-
"""
The node's session with the registry (``docs/reference-wire.md`` §2):
connect, register, keep the registration alive, and reconnect when the
registry goes away (``docs/registration.md``).

Pure: no sockets, no reactor import.  Time comes from the injected
``IReactorTime``, the connection from an injected ``connect()`` returning a
Deferred client (``request(msg) -> Deferred[dict]``, ``close()``), jitter from
an injected ``random``; everything the machine decides leaves through the
owner's callbacks (``registered``, ``unregistered``, ``event``).

States (an Automat ``TypeMachineBuilder`` machine, its table listed by
:func:`transitions`):
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

Where this differs from the reference daemon (``docs/reference-wire.md`` §9):

* every request is signed with a timestamp and nonce (#2, #3): ``register``
  too, so a registry can refuse anyone else moving our endpoint;
* trust events are pushed (``subscribe_events``) instead of polled every
  30 s (#13); with a registry that refuses ``subscribe_events`` (the
  reference) we poll after every heartbeat, as it does;
* heartbeat every 50 s to a registry that pushes events (ours), every 25 s
  to one we poll, rather than 30 s (#16, ``docs/registration.md``);
* reconnects spread with full jitter rather than in lock step;
* a list of rendezvous servers (``servers``): a failed session moves to the
  next, a standby's ``not_primary`` to the primary it names, a reply with a
  lower term than seen is never applied (issue 14, ``docs/registration.md``,
  "A list of servers").

The package, one job a module:

* :mod:`~pilot.machines.registration.facade`: :class:`Registration`, what
  the owner calls;
* :mod:`~pilot.machines.registration.machine`: the inputs, the states and
  the behaviours that do the work;
* :mod:`~pilot.machines.registration.session`: what the session knows, the
  one object the behaviours act on;
* :mod:`~pilot.machines.registration.steps`: the requests of one
  registration, and the events of a poll reply;
* :mod:`~pilot.machines.registration.settings`: hostname, visibility, tags
  and which changes the registry has not confirmed;
* :mod:`~pilot.machines.registration.requests`: signed requests with a
  timeout on one connection, every reply screened;
* :mod:`~pilot.machines.registration.servers`: the list of rendezvous
  servers, the one in use, the highest term seen;
* :mod:`~pilot.machines.registration.values`: timings, state names and the
  collaborators' shapes.
"""

from pilot.machines.registration.machine import RegistrationInputs, table, transitions
from pilot.machines.registration.facade import Registration
from pilot.machines.registration.servers import MAX_SERVERS, Servers
from pilot.machines.registration.values import (
    BACKOFF_INITIAL, BACKOFF_MAX, CONNECT_TIMEOUT, CONNECTING, HEARTBEAT_INTERVAL, IDLE, POLL_INTERVAL,
    REGISTERED, REGISTERING, REQUEST_TIMEOUT, SEEN_SPREAD, SETTING_REQUESTS, STOP_TIMEOUT, STOPPED, WAITING,
    Jitter, RegistryClient, Reply,
)

__all__ = [
    "BACKOFF_INITIAL", "BACKOFF_MAX", "MAX_SERVERS", "Servers", "CONNECT_TIMEOUT", "CONNECTING", "HEARTBEAT_INTERVAL", "IDLE",
    "POLL_INTERVAL", "REGISTERED", "REGISTERING", "REQUEST_TIMEOUT", "SEEN_SPREAD", "SETTING_REQUESTS",
    "STOP_TIMEOUT", "STOPPED", "WAITING", "Jitter", "Registration", "RegistrationInputs", "RegistryClient", "Reply", "table",
    "transitions",
]
