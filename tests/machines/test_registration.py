"""
Tests for L{pilot.machines.registration}: the node's registry session driven
on a L{Clock} against a scripted fake client, and once against a real
L{pilot.server.registry.Registry} through a synchronous fake connection.
"""

from __future__ import annotations

import base64
import os
import random
from collections import Counter
from typing import Any, Callable

import attr
from automat import NoTransition
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pilot.address import Address, node_id_for_key
from pilot.errors import (
    AlreadyExists, ConnectionFailed, InvalidArgument, NotFound, RateLimited, RegistryUnavailable,
)
from pilot.identity import Identity, verify
from pilot.machines.registration import (
    BACKOFF_MAX, HEARTBEAT_INTERVAL, POLL_INTERVAL, REQUEST_TIMEOUT, SEEN_SPREAD, STOP_TIMEOUT, Registration, table,
    transitions,
)
from pilot.machines.registration.machine import RegistrationMachine
from pilot.machines.registration.session import Session
from pilot.machines.registration.requests import Outbox
from pilot.machines.registration.settings import Settings
from pilot.protocols.registry_client import reply_error
from pilot.server.auth import Authenticator
from pilot.server.registry import Peer, Registry, RegistryConfig
from pilot.wire.registry import auth_message, decode_body, encode_frame, legacy_challenge, sign_request

US = Identity.from_seed(b"u" * 32)
THEM = Identity.from_seed(b"t" * 32)
OUR_ID = node_id_for_key(US.public_key)
OUR_ADDRESS = Address(0, OUR_ID)
T0 = 1_795_300_000.0
HANG = object()  # a scripted reply that never comes
TAKEN = "hostname 'alpha' is taken by another node"


class FakeClient:
    """Records requests; answers from the world's script, else a default success."""

    def __init__(self, world: "World") -> None:
        self.world = world
        self.requests: list[dict[str, Any]] = []
        self.closed = False
        self.hanging: list[Deferred[dict[str, Any]]] = []

    def request(self, msg: dict[str, Any]) -> Deferred[dict[str, Any]]:
        self.requests.append(msg)
        self.world.sent.append((self.world.clock.seconds(), self, msg))
        if self.closed:
            return fail(RegistryUnavailable("lost the connection to the registry"))
        answer = self.world.answer(msg)
        if answer is HANG:
            d: Deferred[dict[str, Any]] = Deferred()
            self.hanging.append(d)
            return d
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def close(self) -> None:
        self.closed = True

    @property
    def types(self) -> list[str]:
        return [m["type"] for m in self.requests]


def default_reply(msg: dict[str, Any], node_id: int = OUR_ID) -> dict[str, Any]:
    kind = msg["type"]
    if kind == "register":
        reply = {"type": "register_ok", "node_id": node_id, "network_id": 0,
                 "address": str(Address(0, node_id)), "public_key": msg["public_key"]}
        if msg.get("hostname"):
            reply["hostname"] = msg["hostname"]
        return reply
    if kind == "poll_handshakes":
        return {"type": "poll_handshakes_ok", "requests": [], "responses": []}
    if kind == "heartbeat":
        return {"type": "heartbeat_ok", "time": 0}
    return {"type": kind + "_ok"}


@attr.s(auto_attribs=True, eq=False)
class World:
    """One Registration with recording fakes for every collaborator."""

    clock: Clock = attr.Factory(Clock)
    rng: Any = attr.Factory(lambda: random.Random(7))
    settings: dict[str, Any] = attr.Factory(dict)
    endpoint_value: str = "203.0.113.5:4000"
    # type -> list of scripted answers (dict, exception or HANG), used before the defaults
    script: dict[str, list[Any]] = attr.Factory(dict)
    # what the next connect() calls give: None = a new client, an exception, or HANG
    connect_script: list[Any] = attr.Factory(list)
    connect_default: Any = None
    clients: list[FakeClient] = attr.Factory(list)
    connects: list[float] = attr.Factory(list)
    sent: list[tuple[float, FakeClient, dict[str, Any]]] = attr.Factory(list)
    outputs: list[tuple[Any, ...]] = attr.Factory(list)
    events: list[dict[str, Any]] = attr.Factory(list)
    heartbeat_replies: list[dict[str, Any]] = attr.Factory(list)
    logged: list[dict[str, Any]] = attr.Factory(list)
    pending_connects: list[Deferred[Any]] = attr.Factory(list)
    reg: Registration = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        if self.clock.seconds() == 0:
            self.clock.advance(T0)
        self.reg = Registration(
            connect=self.connect, identity=US, clock=self.clock, endpoint=lambda: self.endpoint_value,
            registered=lambda node_id, address: self.outputs.append(("registered", node_id, address)),
            unregistered=lambda reason: self.outputs.append(("unregistered", reason)),
            event=self.events.append,
            heartbeat_ok=lambda when, reply: (self.outputs.append(("heartbeat_ok", when)),
                                              self.heartbeat_replies.append(reply)),
            random=self.rng, log=Logger(observer=self.logged.append), **self.settings)

    def connect(self) -> Deferred[Any]:
        self.connects.append(self.clock.seconds())
        what = self.connect_script.pop(0) if self.connect_script else self.connect_default
        if what is HANG:
            d: Deferred[Any] = Deferred()
            self.pending_connects.append(d)
            return d
        if isinstance(what, Exception):
            return fail(what)
        client = FakeClient(self)
        self.clients.append(client)
        return succeed(client)

    def answer(self, msg: dict[str, Any]) -> Any:
        queue = self.script.get(msg["type"])
        if queue:
            item = queue.pop(0)
            return item(msg) if callable(item) else item
        return default_reply(msg)

    @property
    def client(self) -> FakeClient:
        return self.clients[-1]

    def types(self, since: int = 0) -> list[str]:
        return [m["type"] for _, _, m in self.sent[since:]]

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.logged if e["log_level"] >= LogLevel.warn]

    def started(self) -> "World":
        self.reg.start()
        return self


def run_until(clock: Clock, end: float) -> None:
    """Advance to ``end`` one delayed call at a time, so each runs at exactly its own time."""
    while True:
        due = [c.getTime() for c in clock.getDelayedCalls()]
        if not due or min(due) > end:
            clock.advance(max(0.0, end - clock.seconds()))
            return
        clock.advance(max(0.0, min(due) - clock.seconds()))


def failure_of(d: Deferred[Any]) -> Failure:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the Deferred has not failed"
    return failures[0]


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class FirstRegistrationTests(SynchronousTestCase):
    def test_sequence_minimal(self) -> None:
        """A private node without hostname or tags: register, subscribe_events, poll_handshakes."""
        w = World().started()
        self.assertEqual(w.types(), ["register", "subscribe_events", "poll_handshakes"])
        self.assertEqual(w.outputs, [("registered", OUR_ID, OUR_ADDRESS)])
        self.assertEqual(w.reg.state, "registered")
        self.assertEqual((w.reg.node_id, w.reg.address), (OUR_ID, OUR_ADDRESS))
        self.assertEqual(w.connects, [T0])
        register = w.sent[0][2]
        self.assertEqual(register["public_key"], US.public_key_b64)
        self.assertEqual(register["listen_addr"], "203.0.113.5:4000")
        self.assertNotIn("hostname", register)
        self.assertEqual(register["auth"]["ts"], int(T0 * 1000))
        self.assertEqual(len(base64.b64decode(register["auth"]["nonce"])), 16)
        self.assertEqual(w.sent[1][2]["node_id"], OUR_ID)

    def test_sequence_with_settings(self) -> None:
        """Hostname (accepted in register), public and tags: the exact sequence."""
        w = World(settings={"hostname": "alpha", "public": True, "tags": ["#gpu", "eu"]}).started()
        self.assertEqual(w.types(), ["register", "subscribe_events", "set_visibility", "set_tags",
                                     "poll_handshakes"])
        msgs = [m for _, _, m in w.sent]
        self.assertEqual(msgs[0]["hostname"], "alpha")
        self.assertEqual((msgs[2]["node_id"], msgs[2]["public"]), (OUR_ID, True))
        self.assertEqual((msgs[3]["node_id"], msgs[3]["tags"]), (OUR_ID, ["gpu", "eu"]))
        self.assertEqual(w.outputs, [("registered", OUR_ID, OUR_ADDRESS)])
        status = w.reg.status()
        self.assertEqual(status["hostname_error"], None)
        self.assertEqual(status["setting_errors"], {})
        self.assertEqual(status["unsynced_settings"], [])

    def test_hostname_error_then_set_hostname(self) -> None:
        """register_ok with hostname_error: set_hostname is tried, its error kept; still registered."""
        refusal = {"type": "register_ok", "node_id": OUR_ID, "network_id": 0, "address": str(OUR_ADDRESS),
                   "hostname_error": "'localhost' is reserved"}
        w = World(settings={"hostname": "localhost"},
                  script={"register": [refusal],
                          "set_hostname": [InvalidArgument("'localhost' is reserved")]}).started()
        self.assertEqual(w.types(), ["register", "subscribe_events", "set_hostname", "poll_handshakes"])
        self.assertEqual(w.sent[2][2]["hostname"], "localhost")
        self.assertEqual(w.reg.state, "registered")
        status = w.reg.status()
        self.assertEqual(status["hostname_error"], "'localhost' is reserved")
        self.assertEqual(status["setting_errors"], {"hostname": "'localhost' is reserved"})
        self.assertTrue(any("refused hostname" in text for text in w.warnings()))

    def test_hostname_taken(self) -> None:
        """A taken hostname is silently skipped by register; set_hostname gives the reason."""
        skipped = {"type": "register_ok", "node_id": OUR_ID, "network_id": 0, "address": str(OUR_ADDRESS)}
        w = World(settings={"hostname": "alpha"},
                  script={"register": [skipped], "set_hostname": [AlreadyExists(TAKEN)]}).started()
        self.assertEqual(w.types(), ["register", "subscribe_events", "set_hostname", "poll_handshakes"])
        self.assertEqual(w.reg.status()["setting_errors"], {"hostname": TAKEN})
        self.assertEqual(w.reg.state, "registered")

    def test_node_id_from_registry_is_authoritative(self) -> None:
        """A different id (collision, or a reference registry) is used, and logged."""
        w = World(script={"register": [lambda msg: default_reply(msg, node_id=7)]}).started()
        self.assertEqual(w.outputs, [("registered", 7, Address(0, 7))])
        self.assertEqual(w.sent[1][2]["node_id"], 7)
        self.assertTrue(any("gave node id 7" in text for text in w.warnings()), w.warnings())

    def test_malformed_register_reply(self) -> None:
        """A register_ok without a node id is a failed registration: back off."""
        w = World(script={"register": [{"type": "register_ok"}]}, rng=FixedJitter(1.0)).started()
        self.assertEqual(w.reg.state, "waiting")
        self.assertTrue(w.client.closed)
        self.assertEqual(w.outputs, [])
        self.assertIn("node_id", w.reg.status()["last_error"])

    def test_other_key_echoed(self) -> None:
        w = World(script={"register": [lambda msg: dict(default_reply(msg),
                                                        public_key=THEM.public_key_b64)]}).started()
        self.assertEqual(w.reg.state, "waiting")

    def test_register_error_backs_off(self) -> None:
        w = World(script={"register": [RateLimited("too many registrations from this address")]},
                  rng=FixedJitter(1.0)).started()
        self.assertEqual(w.reg.state, "waiting")
        w.clock.advance(0.5)
        self.assertEqual(w.reg.state, "registered")
        self.assertEqual(len(w.clients), 2)

    def test_subscribe_refused_means_polling(self) -> None:
        """A registry without subscribe_events (the reference): poll after every heartbeat."""
        w = World(script={"subscribe_events": [InvalidArgument("unknown request type")]}).started()
        self.assertEqual(w.reg.state, "registered")
        self.assertEqual(w.reg.status()["events"], "polled")
        mark = len(w.sent)
        w.clock.advance(HEARTBEAT_INTERVAL)
        self.assertEqual(w.types(mark), ["heartbeat", "poll_handshakes"])

    def test_pushed_events_mean_no_polling_after_heartbeats(self) -> None:
        w = World().started()
        self.assertEqual(w.reg.status()["events"], "pushed")
        mark = len(w.sent)
        w.clock.advance(HEARTBEAT_INTERVAL)
        self.assertEqual(w.types(mark), ["heartbeat"])

    def test_owner_callback_failure_is_contained(self) -> None:
        """An owner's callback that raises is logged; the machine carries on."""
        logged: list[dict[str, Any]] = []

        def boom(*args: Any) -> None:
            raise RuntimeError("owner bug")

        w = World()
        reg = Registration(connect=w.connect, identity=US, clock=w.clock, endpoint=lambda: "203.0.113.4:5",
                           registered=boom, event=boom, log=Logger(observer=logged.append))
        reg.start()
        reg.event_received({"type": "event", "event": "trust_granted", "node_id": 5})
        self.assertEqual(reg.state, "registered")
        self.assertEqual(len([e for e in logged if e.get("log_failure") is not None]), 2)
        w.clock.advance(HEARTBEAT_INTERVAL)
        self.assertEqual(w.client.types[-1], "heartbeat")


class SignatureTests(SynchronousTestCase):
    def test_every_request_verifies(self) -> None:
        """Every request (register included) carries a fresh auth that the registry's check accepts."""
        w = World(settings={"hostname": "alpha", "public": True, "tags": ["gpu"]}).started()
        w.clock.advance(HEARTBEAT_INTERVAL)
        result_of(w.reg.set_hostname("beta"))
        result_of(w.reg.request({"type": "resolve", "node_id": 99}, signed_field="requester_id"))
        w.reg.stop()
        kinds = w.types()
        self.assertEqual(kinds, ["register", "subscribe_events", "set_visibility", "set_tags",
                                 "poll_handshakes", "heartbeat", "set_hostname", "resolve", "deregister"])
        auth = Authenticator()
        nonces = set()
        for when, _, msg in w.sent:
            self.assertTrue(auth.check(msg, US.public_key, True, when), msg["type"])
            self.assertEqual(msg["auth"]["ts"], int(round(when * 1000)))
            nonces.add(msg["auth"]["nonce"])
            a = msg["auth"]
            self.assertTrue(verify(US.public_key,
                                   auth_message(msg, a["ts"], base64.b64decode(a["nonce"])),
                                   base64.b64decode(a["sig"])))
        self.assertEqual(len(nonces), len(w.sent))

    def test_legacy_signatures_for_the_reference(self) -> None:
        """Requests the reference signs also carry its fixed-challenge signature."""
        w = World().started()
        w.clock.advance(HEARTBEAT_INTERVAL)
        heartbeat = w.sent[-1][2]
        challenge = legacy_challenge(heartbeat)
        self.assertEqual(challenge, f"heartbeat:{OUR_ID}".encode())
        assert challenge is not None
        self.assertTrue(verify(US.public_key, challenge, base64.b64decode(heartbeat["signature"])))
        self.assertIs(Authenticator().check({k: v for k, v in heartbeat.items() if k != "auth"},
                                            US.public_key, False, w.clock.seconds()), False)


class HeartbeatTests(SynchronousTestCase):
    def test_cadence(self) -> None:
        w = World().started()
        for _ in range(4):
            w.clock.advance(HEARTBEAT_INTERVAL)
        times = [t - T0 for t, _, m in w.sent if m["type"] == "heartbeat"]
        self.assertEqual(times, [50.0, 100.0, 150.0, 200.0])
        self.assertEqual(w.reg.status()["last_heartbeat_ok"], T0 + 200)
        self.assertEqual([o for o in w.outputs if o[0] == "heartbeat_ok"],
                         [("heartbeat_ok", T0 + 50.0 * i) for i in range(1, 5)])
        self.assertEqual(len(w.clients), 1)
        self.assertEqual(HEARTBEAT_INTERVAL, 50.0)

    def test_polled_registry_cadence(self) -> None:
        """A registry that does not push events (a reference one) is polled after each heartbeat: 25 s."""
        w = World(script={"subscribe_events": [InvalidArgument("unknown request type")]}).started()
        for _ in range(4):
            w.clock.advance(POLL_INTERVAL)
        times = [t - T0 for t, _, m in w.sent if m["type"] == "heartbeat"]
        self.assertEqual(times, [25.0, 50.0, 75.0, 100.0])
        self.assertEqual(POLL_INTERVAL, 25.0)
        self.assertEqual(w.reg.status()["events"], "polled")

    def test_check_now(self) -> None:
        """The owner doubts the connection: a heartbeat now, and the period counts from it."""
        w = World().started()
        w.clock.advance(10)
        w.reg.check_now()
        w.clock.advance(HEARTBEAT_INTERVAL)
        times = [t - T0 for t, _, m in w.sent if m["type"] == "heartbeat"]
        self.assertEqual(times, [10.0, 10.0 + HEARTBEAT_INTERVAL])
        self.assertEqual(len(w.clock.getDelayedCalls()), 1)  # one heartbeat timer, not two

    def test_check_now_finds_a_dead_registry(self) -> None:
        """No answer to the heartbeat it asked for: reconnect within the request timeout."""
        w = World(script={"heartbeat": [HANG]}).started()
        first = w.client
        w.clock.advance(5)
        w.reg.check_now()
        w.clock.advance(REQUEST_TIMEOUT)
        self.assertTrue(first.closed)
        self.assertEqual(w.reg.state, "waiting")

    def test_check_now_when_not_registered(self) -> None:
        w = World(script={"register": [HANG]}).started()
        w.reg.check_now()  # registering: nothing
        self.assertEqual(w.types(), ["register"])
        self.assertIsNone(result_of(w.reg.stop()))
        w.reg.check_now()  # stopped: nothing

    def test_owner_gets_the_reply(self) -> None:
        """The owner sees the heartbeat_ok reply (ours names the beacon's endpoint for us)."""
        w = World().started()
        w.clock.advance(HEARTBEAT_INTERVAL)
        self.assertEqual(w.heartbeat_replies, [{"type": "heartbeat_ok", "time": 0}])

    def test_heartbeat_error_reregisters_on_the_same_connection(self) -> None:
        """The registry forgot us (reaped, restarted with no state): register again on the same connection."""
        w = World(settings={"public": True},
                  script={"heartbeat": [NotFound("node is not registered")]}).started()
        mark = len(w.sent)
        w.clock.advance(HEARTBEAT_INTERVAL)
        self.assertEqual(w.types(mark), ["heartbeat", "register", "subscribe_events", "set_visibility",
                                         "poll_handshakes"])
        self.assertEqual(len(w.clients), 1)
        self.assertFalse(w.client.closed)
        self.assertEqual(w.connects, [T0])
        self.assertEqual(w.outputs, [("registered", OUR_ID, OUR_ADDRESS)] * 2)  # never unregistered
        self.assertEqual(w.reg.status()["consecutive_failures"], 0)
        mark = len(w.sent)
        w.clock.advance(HEARTBEAT_INTERVAL)
        self.assertEqual(w.types(mark), ["heartbeat"])

    def test_two_failures_in_a_row_reconnect(self) -> None:
        """
        A heartbeat error reply re-registers on the same connection; that
        register unanswered for 10 s (a second failure in a row): close, back
        off, reconnect.
        """
        w = World(script={"heartbeat": [NotFound("node is not registered")],
                          "register": [default_reply, HANG]}, rng=FixedJitter(0.5)).started()
        first = w.client
        w.clock.advance(HEARTBEAT_INTERVAL)
        self.assertEqual(first.types[-2:], ["heartbeat", "register"])
        self.assertEqual(w.reg.state, "registering")
        self.assertFalse(first.closed)
        self.assertEqual(w.reg.status()["consecutive_failures"], 1)
        w.clock.advance(REQUEST_TIMEOUT)
        self.assertTrue(first.closed)
        self.assertEqual(w.reg.state, "waiting")
        self.assertEqual([o for o in w.outputs if o[0] == "unregistered"],
                         [("unregistered", w.reg.status()["last_error"])])
        self.assertIn("did not answer register within 10 s", w.reg.status()["last_error"])
        self.assertEqual(w.reg.status()["consecutive_failures"], 2)
        w.clock.advance(0.25)
        self.assertEqual(len(w.clients), 2)
        self.assertEqual(w.reg.state, "registered")
        self.assertEqual(w.reg.status()["consecutive_failures"], 0)

    def test_dead_heartbeat_reconnects_without_a_second_wait(self) -> None:
        """
        A heartbeat unanswered for 10 s means the connection is dead: close it
        and reconnect after the jittered backoff, instead of registering again
        on it (and waiting out another 10 s).
        """
        jitter = FixedJitter(0.5)
        w = World(script={"heartbeat": [HANG]}, rng=jitter).started()
        first = w.client
        w.clock.advance(HEARTBEAT_INTERVAL)
        self.assertEqual(first.types[-1], "heartbeat")
        w.clock.advance(REQUEST_TIMEOUT - 0.001)
        self.assertEqual(w.reg.state, "registered")
        self.assertFalse(first.closed)
        w.clock.advance(0.001)
        self.assertTrue(first.closed)
        self.assertEqual(first.types, ["register", "subscribe_events", "poll_handshakes", "heartbeat"])
        self.assertEqual(w.reg.state, "waiting")
        status = w.reg.status()
        self.assertIn("did not answer heartbeat within 10 s", status["last_error"])
        self.assertEqual([o for o in w.outputs if o[0] == "unregistered"],
                         [("unregistered", status["last_error"])])
        # the failed heartbeat and the connection it found dead
        self.assertEqual(status["consecutive_failures"], 2)
        self.assertFalse(status["registry_connected"])
        self.assertEqual(jitter.windows, [0.5])
        self.assertEqual(status["next_retry_at"], T0 + HEARTBEAT_INTERVAL + 10.25)
        self.assertEqual([c.getTime() for c in w.clock.getDelayedCalls()],
                         [T0 + HEARTBEAT_INTERVAL + 10.25])  # only the reconnect
        self.assertTrue(any("heartbeat failed" in text and "reconnecting" in text for text in w.warnings()),
                        w.warnings())
        w.clock.advance(0.249)
        self.assertEqual(w.connects, [T0])
        run_until(w.clock, T0 + HEARTBEAT_INTERVAL + 10.25)
        self.assertEqual(w.connects, [T0, T0 + HEARTBEAT_INTERVAL + 10.25])
        self.assertEqual(w.client.types, ["register", "subscribe_events", "poll_handshakes"])
        self.assertEqual(w.reg.state, "registered")
        self.assertEqual(w.outputs[-1], ("registered", OUR_ID, OUR_ADDRESS))
        self.assertEqual(w.reg.status()["consecutive_failures"], 0)


class FixedJitter:
    """``uniform(a, b)`` gives the point at ``fraction`` of the way; records the windows asked for."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.windows: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        self.windows.append(b)
        return a + (b - a) * self.fraction


class BackoffTests(SynchronousTestCase):
    def test_connection_loss_reconnects_after_jitter(self) -> None:
        jitter = FixedJitter(0.3)
        w = World(rng=jitter).started()
        first = w.client
        w.clock.advance(5)
        w.reg.connection_lost("connection reset", client=first)
        self.assertEqual(w.reg.state, "waiting")
        self.assertTrue(first.closed)
        self.assertEqual(w.outputs[-1], ("unregistered", "connection reset"))
        self.assertEqual(jitter.windows, [0.5])
        retry_at = w.reg.status()["next_retry_at"]
        self.assertAlmostEqual(retry_at, T0 + 5 + 0.15, places=5)
        self.assertFalse(w.reg.status()["registry_connected"])
        w.clock.advance(0.149)
        self.assertEqual(len(w.connects), 1)
        run_until(w.clock, retry_at)
        self.assertEqual(w.connects[-1], retry_at)
        self.assertEqual(w.reg.state, "registered")
        self.assertEqual(w.outputs[-1], ("registered", OUR_ID, OUR_ADDRESS))

    def test_growth_and_cap(self) -> None:
        jitter = FixedJitter(1.0)
        w = World(rng=jitter, connect_default=ConnectionFailed("connection refused")).started()
        run_until(w.clock, T0 + 12 * BACKOFF_MAX)
        gaps = [round(b - a, 6) for a, b in zip(w.connects, w.connects[1:])]
        self.assertEqual(gaps[:8], [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
        self.assertEqual(set(gaps[6:]), {30.0})
        status = w.reg.status()
        self.assertEqual(status["state"], "waiting")
        self.assertEqual(status["consecutive_failures"], len(w.connects))
        self.assertEqual(status["backoff"], BACKOFF_MAX)
        self.assertIn("connection refused", status["last_error"])
        self.assertEqual(w.outputs, [])  # never registered, so never unregistered

    def test_server_seen_cuts_a_long_wait_short(self) -> None:
        # six refusals: the next window is 16 s; the beacon answers, so we reconnect within SEEN_SPREAD
        jitter = FixedJitter(1.0)
        w = World(rng=jitter, connect_script=[ConnectionFailed("down")] * 6).started()
        run_until(w.clock, T0 + 0.5 + 1 + 2 + 4 + 8)
        self.assertTrue(w.reg.is_waiting())
        planned = w.reg.status()["next_retry_at"]
        self.assertAlmostEqual(planned - w.clock.seconds(), 16.0, places=5)
        w.reg.server_seen()
        self.assertAlmostEqual(w.reg.status()["next_retry_at"] - w.clock.seconds(), SEEN_SPREAD, places=5)
        w.clock.advance(SEEN_SPREAD)
        self.assertEqual(w.reg.state, "registered")

    def test_server_seen_never_delays_a_retry(self) -> None:
        jitter = FixedJitter(1.0)
        w = World(rng=jitter, connect_script=[ConnectionFailed("down")]).started()
        planned = w.reg.status()["next_retry_at"]  # 0.5 s: sooner than SEEN_SPREAD
        w.reg.server_seen()
        self.assertEqual(w.reg.status()["next_retry_at"], planned)
        run_until(w.clock, planned)
        self.assertEqual(w.reg.state, "registered")

    def test_server_seen_ignored_unless_waiting(self) -> None:
        w = World().started()
        self.assertEqual(w.reg.state, "registered")
        w.reg.server_seen()
        self.assertEqual(w.reg.state, "registered")
        self.assertFalse(w.reg.is_waiting())

    def test_reset_after_success(self) -> None:
        jitter = FixedJitter(1.0)
        w = World(rng=jitter, connect_script=[ConnectionFailed("down")] * 4).started()
        run_until(w.clock, T0 + 0.5 + 1 + 2 + 4)
        self.assertEqual(w.reg.state, "registered")
        self.assertEqual(jitter.windows, [0.5, 1.0, 2.0, 4.0])
        self.assertEqual(w.reg.status()["consecutive_failures"], 0)
        self.assertEqual(w.reg.status()["backoff"], 0.5)
        w.reg.connection_lost("gone")
        self.assertEqual(jitter.windows[-1], 0.5)

    def test_connect_timeout(self) -> None:
        w = World(connect_script=[HANG], rng=FixedJitter(0.0)).started()
        self.assertEqual(w.reg.state, "connecting")
        w.clock.advance(10)
        self.assertEqual(len(w.connects), 2)
        self.assertEqual(w.reg.state, "registered")

    def test_full_jitter_spreads_a_thousand_nodes(self) -> None:
        """
        A rendezvous restart drops 1000 nodes at once: their first reconnects
        spread evenly over the 0.5 s window instead of arriving together.
        """
        clock = Clock()
        clock.advance(T0)
        rng = random.Random(2024)
        worlds = [World(clock=clock, rng=rng).started() for _ in range(1000)]
        self.assertTrue(all(w.reg.state == "registered" for w in worlds))
        for w in worlds:
            w.connect_default = ConnectionFailed("connection refused")  # still restarting
        clock.advance(10)
        down = clock.seconds()
        for w in worlds:
            w.reg.connection_lost("connection reset by peer")
        run_until(clock, down + 0.6)
        first = [w.connects[1] - down for w in worlds]
        self.assertTrue(all(0 <= t <= 0.5 for t in first))
        bins = Counter(min(int(t / 0.05), 9) for t in first)
        self.assertEqual(sorted(bins), list(range(10)))
        self.assertTrue(all(60 <= n <= 140 for n in bins.values()), bins)
        self.assertGreaterEqual(len(set(first)), 995)
        at_once = Counter(round(t, 2) for t in first).most_common(1)[0][1]
        self.assertLess(at_once, 40)  # the busiest 10 ms carries ~2%, not 100%

    def test_long_outage_stays_spread(self) -> None:
        """
        After minutes of outage 300 nodes still spread their attempts (about
        300/15 per second once the window is capped at 30 s), and all are back
        within one window of the registry's return.
        """
        clock = Clock()
        clock.advance(T0)
        rng = random.Random(99)
        worlds = [World(clock=clock, rng=rng).started() for _ in range(300)]
        for w in worlds:
            w.connect_default = ConnectionFailed("connection refused")
            w.reg.connection_lost("registry restarted")
        start = clock.seconds()
        while clock.seconds() < start + 300:
            clock.advance(0.5)
        late = Counter(int(t - start) for w in worlds for t in w.connects if t - start >= 200)
        self.assertLess(max(late.values()), 60)
        for w in worlds:
            w.connect_default = None
        back = clock.seconds()
        while clock.seconds() < back + BACKOFF_MAX + 1:
            clock.advance(0.5)
        self.assertTrue(all(w.reg.state == "registered" for w in worlds))


class EndpointTests(SynchronousTestCase):
    def test_change_reregisters_at_once(self) -> None:
        """
        Our endpoint moved (usually a new IP): close the connection made from
        the old one and reconnect at once, without backoff, to register the
        new listen_addr.
        """
        jitter = FixedJitter(0.5)
        w = World(rng=jitter).started()
        first = w.client
        w.clock.advance(3)
        w.endpoint_value = "198.51.100.7:4100"
        mark = len(w.sent)
        w.reg.endpoint_changed()
        self.assertTrue(first.closed)
        self.assertEqual(w.reg.state, "waiting")
        self.assertEqual(w.types(mark), [])  # nothing more on the old connection
        self.assertEqual(len(w.clients), 1)
        status = w.reg.status()
        self.assertFalse(status["registry_connected"])
        self.assertEqual(status["next_retry_at"], T0 + 3)
        self.assertEqual([c.getTime() for c in w.clock.getDelayedCalls()], [T0 + 3])  # no heartbeat timer
        self.assertEqual(jitter.windows, [])  # our own move, not an outage: no jitter
        self.assertEqual(w.outputs, [("registered", OUR_ID, OUR_ADDRESS)])  # not unregistered
        w.clock.advance(0)
        self.assertEqual(w.connects, [T0, T0 + 3])
        self.assertEqual(len(w.clients), 2)
        self.assertIsNot(w.client, first)
        self.assertEqual(w.types(mark), ["register", "subscribe_events", "poll_handshakes"])
        self.assertEqual(w.client.types, ["register", "subscribe_events", "poll_handshakes"])
        self.assertEqual(first.types, ["register", "subscribe_events", "poll_handshakes"])
        self.assertEqual(w.sent[mark][0], T0 + 3)
        self.assertEqual(w.sent[mark][2]["listen_addr"], "198.51.100.7:4100")
        self.assertTrue(Authenticator().check(w.sent[mark][2], US.public_key, True, T0 + 3))
        self.assertEqual(w.reg.state, "registered")
        self.assertEqual(w.outputs, [("registered", OUR_ID, OUR_ADDRESS)] * 2)
        status = w.reg.status()
        self.assertEqual((status["consecutive_failures"], status["backoff"], status["next_retry_at"]),
                         (0, 0.5, None))
        # the heartbeat timer restarted from the re-registration
        mark = len(w.sent)
        w.clock.advance(HEARTBEAT_INTERVAL)
        self.assertEqual([t - T0 for t, _, m in w.sent[mark:]], [3.0 + HEARTBEAT_INTERVAL])
        self.assertIs(w.sent[-1][1], w.client)

    def test_change_fails_what_waits_on_the_old_connection(self) -> None:
        w = World(script={"lookup": [HANG]}).started()
        d = w.reg.request({"type": "lookup", "node_id": 5})
        w.endpoint_value = "198.51.100.7:4100"
        w.reg.endpoint_changed()
        f = failure_of(d)
        self.assertTrue(f.check(RegistryUnavailable))
        self.assertIn("closed", f.value.message)
        self.assertEqual(len(w.clock.getDelayedCalls()), 1)  # only the reconnect

    def test_change_then_reconnect_fails(self) -> None:
        """The reconnect after a move fails like any other: unregistered, then the jittered backoff."""
        jitter = FixedJitter(1.0)
        w = World(rng=jitter, connect_script=[None, ConnectionFailed("network unreachable")]).started()
        w.endpoint_value = "198.51.100.7:4100"
        w.reg.endpoint_changed()
        w.clock.advance(0)
        self.assertEqual(w.reg.state, "waiting")
        self.assertEqual(w.connects, [T0, T0])
        self.assertEqual(w.outputs[-1], ("unregistered", "network unreachable"))
        self.assertEqual(w.reg.status()["consecutive_failures"], 1)
        self.assertEqual(jitter.windows, [0.5])
        w.clock.advance(0.5)
        self.assertEqual(w.reg.state, "registered")
        self.assertEqual(w.client.requests[0]["listen_addr"], "198.51.100.7:4100")

    def test_change_while_disconnected_is_picked_up(self) -> None:
        w = World(connect_script=[ConnectionFailed("down")], rng=FixedJitter(1.0)).started()
        w.endpoint_value = "198.51.100.7:4100"
        w.reg.endpoint_changed()
        self.assertEqual(w.sent, [])
        w.clock.advance(0.5)
        self.assertEqual(w.sent[0][2]["listen_addr"], "198.51.100.7:4100")

    def test_change_while_registering(self) -> None:
        """The endpoint moved after register went out: once registered, reconnect at once to register it."""
        w = World(script={"register": [HANG]}).started()
        first = w.client
        w.endpoint_value = "198.51.100.7:4100"
        w.reg.endpoint_changed()
        self.assertEqual(w.types(), ["register"])
        self.assertEqual(w.reg.state, "registering")
        first.hanging[0].callback(default_reply(w.sent[0][2]))
        self.assertTrue(first.closed)
        self.assertEqual(w.reg.state, "waiting")
        self.assertEqual(len(w.clients), 1)
        w.clock.advance(0)
        self.assertEqual(len(w.clients), 2)
        registers = [(c, m["listen_addr"]) for _, c, m in w.sent if m["type"] == "register"]
        self.assertEqual(registers, [(first, "203.0.113.5:4000"), (w.client, "198.51.100.7:4100")])
        self.assertEqual(w.client.types, ["register", "subscribe_events", "poll_handshakes"])
        self.assertEqual(w.reg.state, "registered")
        self.assertEqual(w.outputs, [("registered", OUR_ID, OUR_ADDRESS)] * 2)


class SettingsTests(SynchronousTestCase):
    def test_while_registered(self) -> None:
        w = World().started()
        mark = len(w.sent)
        reply = result_of(w.reg.set_hostname("alpha"))
        self.assertEqual(reply, {"type": "set_hostname_ok"})
        self.assertEqual(w.types(mark), ["set_hostname"])
        self.assertEqual((w.sent[-1][2]["hostname"], w.sent[-1][2]["node_id"]), ("alpha", OUR_ID))
        result_of(w.reg.set_public(True))
        result_of(w.reg.set_tags(["#GPU".lower(), "eu"]))
        self.assertEqual(w.types(mark), ["set_hostname", "set_visibility", "set_tags"])
        self.assertEqual(w.sent[-1][2]["tags"], ["gpu", "eu"])
        status = w.reg.status()
        self.assertEqual((status["hostname"], status["public"], status["tags"]),
                         ("alpha", True, ["gpu", "eu"]))
        self.assertEqual(status["unsynced_settings"], [])
        # remembered for the next registration
        w.reg.connection_lost("reset")
        w.clock.advance(1)
        register = [m for _, _, m in w.sent if m["type"] == "register"][-1]
        self.assertEqual(register["hostname"], "alpha")
        self.assertEqual(w.client.types, ["register", "subscribe_events", "set_visibility", "set_tags",
                                          "poll_handshakes"])

    def test_refused_while_registered(self) -> None:
        w = World(script={"set_hostname": [AlreadyExists(TAKEN)]}).started()
        f = failure_of(w.reg.set_hostname("alpha"))
        self.assertTrue(f.check(AlreadyExists))
        self.assertEqual(w.reg.status()["setting_errors"], {"hostname": TAKEN})
        self.assertEqual(w.reg.state, "registered")

    def test_while_disconnected(self) -> None:
        w = World(connect_script=[ConnectionFailed("down")], rng=FixedJitter(1.0)).started()
        self.assertEqual(w.reg.state, "waiting")
        f = failure_of(w.reg.set_public(True))
        self.assertTrue(f.check(RegistryUnavailable))
        self.assertIn("applied at the next registration", f.value.message)
        self.assertTrue(f.value.hint)
        failure_of(w.reg.set_tags(["gpu"]))
        failure_of(w.reg.set_hostname("alpha"))
        self.assertEqual(w.reg.status()["unsynced_settings"], ["hostname", "public", "tags"])
        self.assertEqual(w.sent, [])
        w.clock.advance(0.5)
        self.assertEqual(w.types(), ["register", "subscribe_events", "set_visibility", "set_tags",
                                     "poll_handshakes"])
        self.assertEqual(w.sent[0][2]["hostname"], "alpha")
        self.assertEqual(w.reg.status()["unsynced_settings"], [])

    def test_cleared_while_disconnected(self) -> None:
        """Going private or dropping tags and hostname while away is sent at the next registration, once."""
        w = World(settings={"public": True, "tags": ["gpu"], "hostname": "alpha"},
                  rng=FixedJitter(1.0)).started()
        w.reg.connection_lost("reset")
        failure_of(w.reg.set_public(False))
        failure_of(w.reg.set_tags([]))
        failure_of(w.reg.set_hostname(""))
        w.script["register"] = [lambda msg: dict(default_reply(msg), hostname="alpha")]  # still has it
        w.clock.advance(0.5)
        msgs = w.client.requests
        self.assertEqual(w.client.types, ["register", "subscribe_events", "set_visibility", "set_tags",
                                          "set_hostname", "poll_handshakes"])
        self.assertNotIn("hostname", msgs[0])
        self.assertEqual((msgs[2]["public"], msgs[3]["tags"], msgs[4]["hostname"]), (False, [], ""))
        w.reg.connection_lost("reset")
        w.clock.advance(0.5)
        self.assertEqual(w.client.types, ["register", "subscribe_events", "poll_handshakes"])

    def test_changed_while_registering(self) -> None:
        """A change refused during registration (after its settings step) is still sent once registered."""
        w = World(script={"subscribe_events": [HANG]}).started()
        f = failure_of(w.reg.set_public(True))
        self.assertTrue(f.check(RegistryUnavailable))
        self.assertIn("registering", f.value.message)
        w.client.hanging[0].callback({"type": "subscribe_events_ok"})
        self.assertEqual(w.types(), ["register", "subscribe_events", "set_visibility", "poll_handshakes"])
        self.assertEqual(w.reg.status()["unsynced_settings"], [])

    def test_changed_after_the_settings_step(self) -> None:
        w = World(script={"set_tags": [HANG]}, settings={"tags": ["a"]}).started()
        failure_of(w.reg.set_public(True))
        w.client.hanging[0].callback({"type": "set_tags_ok"})
        self.assertEqual(w.types(), ["register", "subscribe_events", "set_tags", "poll_handshakes",
                                     "set_visibility"])
        self.assertEqual(w.reg.status()["unsynced_settings"], [])

    def test_invalid_values_refused_locally(self) -> None:
        w = World().started()
        mark = len(w.sent)
        self.assertTrue(failure_of(w.reg.set_hostname("Not A Name")).check(InvalidArgument))
        self.assertTrue(failure_of(w.reg.set_tags(["ok", "no spaces"])).check(InvalidArgument))
        self.assertTrue(failure_of(w.reg.set_public("yes")).check(InvalidArgument))  # type: ignore[arg-type]
        self.assertEqual(w.sent[mark:], [])
        self.assertEqual(w.reg.status()["hostname"], None)
        self.assertRaises(InvalidArgument, Registration, connect=lambda: fail(Exception()), identity=US,
                          clock=Clock(), endpoint=lambda: "", tags=["bad tag"])


class RequestTests(SynchronousTestCase):
    def test_fails_fast_without_a_connection(self) -> None:
        w = World(connect_default=ConnectionFailed("connection refused"), rng=FixedJitter(1.0))
        f = failure_of(w.reg.request({"type": "lookup", "node_id": 5}))
        self.assertTrue(f.check(RegistryUnavailable))
        self.assertIn("not started", f.value.message)
        w.reg.start()
        f = failure_of(w.reg.request({"type": "lookup", "node_id": 5}))
        self.assertTrue(f.check(RegistryUnavailable))
        self.assertIn("waiting to reconnect (next attempt in 0.5 s): connection refused", f.value.message)
        self.assertEqual(f.value.hint, "the rendezvous cannot be reached; established tunnels keep working")
        self.assertEqual(len(w.connects), 1)  # asking did not trigger a connection
        self.assertEqual(w.sent, [])
        w.reg.stop()
        f = failure_of(w.reg.request({"type": "lookup", "node_id": 5}))
        self.assertTrue(f.check(RegistryUnavailable))

    def test_unsigned_passthrough(self) -> None:
        w = World(script={"lookup": [{"type": "lookup_ok", "node_id": 5}]}).started()
        reply = result_of(w.reg.request({"type": "lookup", "node_id": 5}))
        self.assertEqual(reply, {"type": "lookup_ok", "node_id": 5})
        self.assertEqual(w.sent[-1][2], {"type": "lookup", "node_id": 5})

    def test_signed_passthrough(self) -> None:
        w = World().started()
        result_of(w.reg.request({"type": "resolve", "node_id": 99}, signed_field="requester_id"))
        msg = w.sent[-1][2]
        self.assertEqual(msg["requester_id"], OUR_ID)
        self.assertTrue(Authenticator().check(msg, US.public_key, True, w.clock.seconds()))
        self.assertTrue(verify(US.public_key, f"resolve:{OUR_ID}:99".encode(),
                               base64.b64decode(msg["signature"])))

    def test_error_reply(self) -> None:
        w = World(script={"resolve": [NotFound("node 99 is not registered")]}).started()
        f = failure_of(w.reg.request({"type": "resolve", "node_id": 99}, signed_field="requester_id"))
        self.assertTrue(f.check(NotFound))
        self.assertEqual(w.reg.state, "registered")

    def test_unanswered_request_kills_the_connection(self) -> None:
        w = World(script={"lookup": [HANG]}, rng=FixedJitter(1.0)).started()
        d = w.reg.request({"type": "lookup", "node_id": 5})
        w.clock.advance(REQUEST_TIMEOUT)
        f = failure_of(d)
        self.assertTrue(f.check(RegistryUnavailable))
        self.assertIn("did not answer lookup within 10 s", f.value.message)
        self.assertTrue(w.clients[0].closed)
        self.assertEqual(w.reg.state, "waiting")
        self.assertEqual(w.outputs[-1][0], "unregistered")

    def test_malformed_request_refused(self) -> None:
        w = World().started()
        self.assertTrue(failure_of(w.reg.request({"node_id": 5})).check(InvalidArgument))
        self.assertTrue(failure_of(w.reg.request({"type": "punch"}, signed_field="requester_id"))
                        .check(InvalidArgument))


class EventTests(SynchronousTestCase):
    def test_pushed_events_forwarded(self) -> None:
        w = World().started()
        event = {"type": "event", "event": "handshake_request", "from_node_id": 9, "justification": "hi",
                 "timestamp": 1}
        w.reg.event_received(event)
        w.reg.event_received({"type": "event", "event": "trust_revoked", "node_id": 9})
        w.reg.event_received({"type": "heartbeat_ok"})  # not an event
        w.reg.event_received("junk")  # type: ignore[arg-type]
        self.assertEqual(w.events, [event, {"type": "event", "event": "trust_revoked", "node_id": 9}])
        self.assertEqual(len(w.warnings()), 2)
        w.reg.stop()
        w.reg.event_received(event)
        self.assertEqual(len(w.events), 2)

    def test_poll_after_registration_forwards_queued_items(self) -> None:
        queued = {"type": "poll_handshakes_ok",
                  "requests": [{"from_node_id": 9, "justification": "let me in", "timestamp": 1795299000}],
                  "responses": [{"from_node_id": 11, "accept": True, "timestamp": 1795299100},
                                {"accept": True}]}
        w = World(script={"poll_handshakes": [queued]}).started()
        self.assertEqual(w.events, [
            {"type": "event", "event": "handshake_request", "from_node_id": 9, "justification": "let me in",
             "timestamp": 1795299000},
            {"type": "event", "event": "handshake_response", "from_node_id": 11, "accept": True,
             "timestamp": 1795299100},
        ])
        self.assertTrue(w.sent[-1][2]["type"] == "poll_handshakes")
        self.assertTrue(Authenticator().check(w.sent[-1][2], US.public_key, True, w.clock.seconds()))

    def test_poll_after_every_reregistration(self) -> None:
        w = World().started()
        w.reg.connection_lost("reset")
        w.clock.advance(1)
        w.reg.endpoint_changed()
        w.clock.advance(0)
        self.assertEqual(w.types().count("poll_handshakes"), 3)
        self.assertEqual(len(w.clients), 3)
        self.assertEqual([c.types.count("poll_handshakes") for c in w.clients], [1, 1, 1])


class StopTests(SynchronousTestCase):
    def test_stop_deregisters(self) -> None:
        w = World().started()
        w.clock.advance(30)
        d = w.reg.stop()
        self.assertIsNone(result_of(d))
        msg = w.sent[-1][2]
        self.assertEqual(msg["type"], "deregister")
        self.assertEqual(msg["node_id"], OUR_ID)
        self.assertTrue(Authenticator().check(msg, US.public_key, True, w.clock.seconds()))
        self.assertTrue(w.client.closed)
        self.assertEqual(w.outputs[-1], ("unregistered", "stopped"))
        self.assertEqual(w.clock.getDelayedCalls(), [])
        self.assertEqual(w.reg.state, "stopped")
        self.assertIsNone(result_of(w.reg.stop()))
        w.reg.start()  # stopped is final
        self.assertEqual(w.reg.state, "stopped")
        self.assertEqual(w.clock.getDelayedCalls(), [])

    def test_deregister_unanswered(self) -> None:
        w = World(script={"deregister": [HANG]}).started()
        d = w.reg.stop()
        again = w.reg.stop()
        self.assertNoResult(d)
        self.assertNoResult(again)
        self.assertFalse(w.client.closed)
        w.clock.advance(STOP_TIMEOUT)
        self.assertIsNone(result_of(d))
        self.assertIsNone(result_of(again))
        self.assertTrue(w.client.closed)
        self.assertEqual(w.clock.getDelayedCalls(), [])

    def test_deregister_refused(self) -> None:
        w = World(script={"deregister": [NotFound("gone")]}).started()
        self.assertIsNone(result_of(w.reg.stop()))
        self.assertEqual(w.clock.getDelayedCalls(), [])

    def test_stop_while_waiting(self) -> None:
        w = World(connect_default=ConnectionFailed("down")).started()
        self.assertEqual(len(w.clock.getDelayedCalls()), 1)
        self.assertIsNone(result_of(w.reg.stop()))
        self.assertEqual(w.clock.getDelayedCalls(), [])
        self.assertEqual(w.sent, [])
        self.assertEqual(w.outputs, [])

    def test_stop_while_connecting(self) -> None:
        w = World(connect_script=[HANG]).started()
        self.assertIsNone(result_of(w.reg.stop()))
        self.assertEqual(w.clock.getDelayedCalls(), [])
        self.assertTrue(w.pending_connects[0].called)  # cancelled

    def test_outstanding_requests_fail_when_we_close(self) -> None:
        """Closing the connection fails what is still waiting on it at once, timers and all."""
        w = World(script={"lookup": [HANG], "deregister": [HANG]}).started()
        lookup = w.reg.request({"type": "lookup", "node_id": 5})
        stopping = w.reg.stop()
        self.assertNoResult(lookup)
        w.clock.advance(STOP_TIMEOUT)
        self.assertIsNone(result_of(stopping))
        f = failure_of(lookup)
        self.assertTrue(f.check(RegistryUnavailable))
        self.assertIn("closed", f.value.message)
        self.assertEqual(w.clock.getDelayedCalls(), [])

    def test_stop_while_registering(self) -> None:
        w = World(script={"register": [HANG]}).started()
        self.assertIsNone(result_of(w.reg.stop()))
        self.assertEqual(w.types(), ["register"])  # no node id yet: nothing to deregister
        self.assertTrue(w.client.closed)
        self.assertEqual(w.clock.getDelayedCalls(), [])


class StatusTests(SynchronousTestCase):
    def test_snapshots(self) -> None:
        w = World(rng=FixedJitter(1.0), settings={"hostname": "alpha"}).started()
        w.clock.advance(HEARTBEAT_INTERVAL)
        status = w.reg.status()
        self.assertEqual({k: status[k] for k in ("state", "node_id", "address", "registry_connected",
                                                 "registered_at", "last_heartbeat_ok", "consecutive_failures",
                                                 "next_retry_at", "events", "hostname", "last_error")},
                         {"state": "registered", "node_id": OUR_ID, "address": str(OUR_ADDRESS),
                          "registry_connected": True, "registered_at": T0,
                          "last_heartbeat_ok": T0 + HEARTBEAT_INTERVAL,
                          "consecutive_failures": 0, "next_retry_at": None, "events": "pushed",
                          "hostname": "alpha", "last_error": None})
        w.connect_default = ConnectionFailed("connection refused")
        w.reg.connection_lost("connection reset")
        run_until(w.clock, T0 + HEARTBEAT_INTERVAL + 0.5)
        status = w.reg.status()
        self.assertEqual({k: status[k] for k in ("state", "node_id", "registry_connected",
                                                 "last_heartbeat_ok", "consecutive_failures",
                                                 "next_retry_at", "events")},
                         {"state": "waiting", "node_id": OUR_ID, "registry_connected": False,
                          "last_heartbeat_ok": T0 + HEARTBEAT_INTERVAL, "consecutive_failures": 2,
                          "next_retry_at": T0 + HEARTBEAT_INTERVAL + 0.5 + 1.0, "events": None})
        self.assertIn("connection refused", status["last_error"])


class RobustnessTests(SynchronousTestCase):
    def test_loss_fails_outstanding_requests_at_once(self) -> None:
        w = World(script={"lookup": [HANG]}).started()
        d = w.reg.request({"type": "lookup", "node_id": 5})
        w.reg.connection_lost("connection reset")
        self.assertTrue(failure_of(d).check(RegistryUnavailable))
        self.assertEqual(len(w.clock.getDelayedCalls()), 1)  # only the reconnect


    def test_stale_connection_lost_ignored(self) -> None:
        w = World(rng=FixedJitter(0.0)).started()
        old = w.client
        w.reg.connection_lost("reset", client=old)
        w.clock.advance(0)
        self.assertEqual(w.reg.state, "registered")
        w.reg.connection_lost("reset", client=old)  # the protocol's late report
        self.assertEqual(w.reg.state, "registered")
        self.assertEqual(len(w.clients), 2)

    def test_connection_lost_while_connecting_ignored(self) -> None:
        w = World(connect_script=[HANG]).started()
        w.reg.connection_lost("old connection")
        self.assertEqual(w.reg.state, "connecting")

    def test_closed_connection_found_by_heartbeat(self) -> None:
        """An owner that never reports the loss: the next heartbeat finds out."""
        w = World(rng=FixedJitter(0.0)).started()
        w.client.closed = True
        w.clock.advance(HEARTBEAT_INTERVAL)
        self.assertEqual(w.reg.state, "registered")
        self.assertEqual(len(w.clients), 2)
        # reconnected at once, not registered again on the closed connection
        self.assertEqual(w.connects, [T0, T0 + HEARTBEAT_INTERVAL])
        self.assertEqual(w.clients[0].types, ["register", "subscribe_events", "poll_handshakes", "heartbeat"])

    def test_harmless_inputs_listed_the_rest_raise(self) -> None:
        """
        Inputs that may lose a race are listed as harmless, with a reason; an
        input that cannot happen (a connect result outside ``connecting``, a
        timer outside the state that set it) raises instead of vanishing.
        """
        states = ["idle", "connecting", "registering", "registered", "waiting", "stopped"]
        everywhere = ["started", "connection_lost", "endpoint_changed", "settings_changed", "event_received",
                      "stopped", "server_seen"]
        own_state = {"connected": "connecting", "connect_failed": "connecting",
                     "registration_succeeded": "registering", "registration_failed": "registering",
                     "heartbeat_due": "registered", "heartbeat_failed": "registered",
                     "backoff_elapsed": "waiting"}
        declared = table.declared()
        self.assertEqual(declared, {(s, i) for s in states for i in everywhere}
                         | {(state, event) for event, state in own_state.items()})
        self.assertEqual(set(table.undeclared(list(own_state))),
                         {(s, event) for event, state in own_state.items() for s in states if s != state})
        for state, event in table.declared() - {(r.state, r.input) for r in transitions()}:
            self.assertTrue(table.reasons[(state, event)])
        moves = {(old, event, new) for old, event, new, _ in transitions() if old != new}
        self.assertIn(("registered", "heartbeat_failed", "registering"), moves)
        self.assertIn(("registered", "endpoint_changed", "waiting"), moves)
        self.assertIn(("waiting", "backoff_elapsed", "connecting"), moves)

    def test_impossible_input_raises(self) -> None:
        """A heartbeat timer firing while not registered is a bug in the machine: it raises."""
        clock = Clock()
        session = Session(connect=lambda: Deferred(), identity=US, clock=clock,
                          outbox=Outbox(US, clock, os.urandom, REQUEST_TIMEOUT),
                          settings=Settings(None, False, []), endpoint=lambda: "203.0.113.4:5",
                          register_extra=dict, on_registered=lambda node_id, address: None,
                          on_unregistered=lambda why: None, on_event=lambda event: None, on_heartbeat=None,
                          jitter=random.Random(0), heartbeat_interval=HEARTBEAT_INTERVAL, backoff_initial=0.5,
                          backoff_max=BACKOFF_MAX, connect_timeout=10.0, stop_timeout=STOP_TIMEOUT,
                          log=Logger(observer=lambda event: None))
        machine = RegistrationMachine(session)
        machine.started()
        self.assertEqual(session.state, "connecting")
        self.assertRaises(NoTransition, machine.heartbeat_due)
        self.assertRaises(NoTransition, machine.registration_succeeded, {})
        self.assertEqual(session.state, "connecting")

    def test_is_idle_and_is_registered(self) -> None:
        w = World()
        self.assertTrue(w.reg.is_idle())
        self.assertFalse(w.reg.is_registered())
        w.started()
        self.assertFalse(w.reg.is_idle())
        self.assertTrue(w.reg.is_registered())
        w.reg.stop()
        self.assertFalse(w.reg.is_idle())
        self.assertFalse(w.reg.is_registered())


class FakeLink:
    """A client connected to a real Registry, synchronously; pushes go to the Registration."""

    def __init__(self, registry: Registry, on_event: Callable[[dict[str, Any]], None]) -> None:
        self.registry = registry
        self.on_event = on_event
        self.closed = False
        self.requests: list[dict[str, Any]] = []

    def request(self, msg: dict[str, Any]) -> Deferred[dict[str, Any]]:
        if self.closed:
            return fail(RegistryUnavailable("lost the connection to the registry"))
        wire = decode_body(encode_frame(msg)[4:])  # exactly what would cross TCP
        self.requests.append(wire)
        reply = self.registry.handle(wire, Peer("127.0.0.1", 40000), self)
        error = reply_error(reply)
        return fail(error) if error is not None else succeed(reply)

    def push(self, message: dict[str, Any]) -> None:
        if not self.closed:
            self.on_event(message)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.registry.session_closed(self)


class RealRegistryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.registry = Registry(self.clock, RegistryConfig())
        self.links: list[FakeLink] = []
        self.events: list[dict[str, Any]] = []
        self.registered: list[tuple[int, Address]] = []
        self.endpoint = "203.0.113.5:4000"
        self.reg = Registration(
            connect=self.connect, identity=US, clock=self.clock, endpoint=lambda: self.endpoint,
            registered=lambda n, a: self.registered.append((n, a)), event=self.events.append,
            hostname="alpha", public=True, tags=["gpu"], random=random.Random(1))

    def connect(self) -> Deferred[Any]:
        link = FakeLink(self.registry, self.reg.event_received)
        self.links.append(link)
        return succeed(link)

    def errors(self) -> list[str]:
        return [k for k in self.registry.counters if k.startswith("error.")]

    def them(self, msg: dict[str, Any]) -> dict[str, Any]:
        signed = sign_request(msg, THEM.sign, int(self.clock.seconds() * 1000), os.urandom(16))
        return self.registry.handle(signed, Peer("127.0.0.1", 40001), None)

    def test_signed_session_accepted_and_proven(self) -> None:
        self.reg.start()
        self.assertEqual(self.reg.state, "registered")
        node = self.registry.node(OUR_ID)
        assert node is not None
        self.assertEqual(self.registered, [(OUR_ID, OUR_ADDRESS)])
        self.assertIn(OUR_ID, self.registry.state.proven)
        self.assertEqual(node.real_addr, "127.0.0.1:4000")
        self.assertEqual((node.hostname, node.public, node.tags), ("alpha", True, ["gpu"]))
        self.assertIn(OUR_ID, self.registry.subscribers)
        self.assertEqual(self.reg.status()["events"], "pushed")
        self.assertEqual(self.links[0].requests[0]["type"], "register")
        self.assertEqual(self.errors(), [])

        # heartbeats accepted (fresh nonces, current timestamps)
        for _ in range(3):
            self.clock.advance(HEARTBEAT_INTERVAL)
        self.assertEqual(self.reg.status()["last_heartbeat_ok"], self.clock.seconds())
        self.assertEqual(node.last_seen, self.clock.seconds())

        # a pushed handshake request reaches the owner
        self.assertEqual(self.them({"type": "register", "public_key": THEM.public_key_b64,
                                    "listen_addr": "0.0.0.0:5000"})["type"], "register_ok")
        their_id = node_id_for_key(THEM.public_key)
        reply = self.them({"type": "request_handshake", "from_node_id": their_id, "to_node_id": OUR_ID,
                           "justification": "hello"})
        self.assertEqual(reply["type"], "request_handshake_ok")
        self.assertEqual([e["event"] for e in self.events], ["handshake_request"])
        self.assertEqual(self.events[0]["from_node_id"], their_id)

        # the endpoint moved: the old connection is closed, a new one made at once,
        # registered again on it; real_addr follows
        self.endpoint = "198.51.100.7:4100"
        self.reg.endpoint_changed()
        self.assertTrue(self.links[0].closed)
        self.assertEqual(self.reg.state, "waiting")
        self.clock.advance(0)
        self.assertEqual(len(self.links), 2)
        self.assertEqual(self.reg.state, "registered")
        self.assertEqual([m["type"] for m in self.links[1].requests],
                         ["register", "subscribe_events", "set_visibility", "set_tags", "poll_handshakes"])
        self.assertEqual(self.links[1].requests[0]["listen_addr"], "198.51.100.7:4100")
        node = self.registry.node(OUR_ID)
        assert node is not None
        self.assertEqual(node.real_addr, "127.0.0.1:4100")
        self.assertIn(OUR_ID, self.registry.state.proven)
        self.assertIn(OUR_ID, self.registry.subscribers)
        self.assertEqual(self.registered[-1], (OUR_ID, OUR_ADDRESS))
        self.assertEqual(len(self.registered), 2)

        # settings and passthrough requests are accepted
        result_of(self.reg.set_hostname("beta"))
        self.assertEqual(node.hostname, "beta")
        self.assertEqual(self.them({"type": "set_visibility", "node_id": their_id, "public": True})["type"],
                         "set_visibility_ok")
        reply = result_of(self.reg.request({"type": "resolve", "node_id": their_id},
                                           signed_field="requester_id"))
        self.assertEqual(reply["real_addr"], "127.0.0.1:5000")

        # a request queued while we are away is fetched by the poll after reconnecting
        self.links[-1].close()
        self.reg.connection_lost("connection closed", client=self.links[-1])
        self.assertEqual(self.reg.state, "waiting")
        self.them({"type": "request_handshake", "from_node_id": their_id, "to_node_id": OUR_ID,
                   "justification": "still there?"})
        self.clock.advance(0.5)
        self.assertEqual(self.reg.state, "registered")
        self.assertEqual(len(self.links), 3)
        # at least once: a pushed request stays queued until polled, so the poll after the
        # endpoint change delivered "hello" again (the trust machine takes repeats)
        self.assertEqual([e.get("justification") for e in self.events], ["hello", "hello", "still there?"])
        self.assertEqual({e["event"] for e in self.events}, {"handshake_request"})
        self.assertEqual(self.errors(), [])

        # stop: deregistered, nothing left scheduled
        result_of(self.reg.stop())
        self.assertIsNone(self.registry.node(OUR_ID))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertNotIn(OUR_ID, self.registry.subscribers)

    def test_reaped_node_registers_again(self) -> None:
        """The registry forgot us (reaped after a long stall): the heartbeat's not_found re-registers."""
        self.reg.start()
        self.registry.remove(OUR_ID)
        self.clock.advance(HEARTBEAT_INTERVAL)
        node = self.registry.node(OUR_ID)
        assert node is not None
        self.assertEqual((node.hostname, node.public, node.tags), ("alpha", True, ["gpu"]))
        self.assertEqual(len(self.links), 1)
        self.assertEqual(self.reg.state, "registered")
        self.assertEqual(len(self.registered), 2)
