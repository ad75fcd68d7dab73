"""
Tests for L{pilot.machines.registration} with a list of rendezvous servers
(L{pilot.machines.registration.servers}): round robin on a failed session,
back off once the whole list failed, a standby's C{not_primary} refusal, a
stale term, hostile fields; on a L{Clock} against scripted fake clients
(the fakes of L{tests.machines.test_registration}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import ConnectionFailed, InvalidArgument, RegistryUnavailable
from pilot.machines.registration import BACKOFF_INITIAL, HEARTBEAT_INTERVAL, Registration
from pilot.machines.registration.servers import MAX_SERVERS, MAX_TERM, STANDBY_RETRY, Servers, server_key
from pilot.protocols.registry_client import reply_error
from tests.machines.test_registration import (
    HANG, US, FakeClient, FixedJitter, World, default_reply, failure_of, run_until,
)

A, B, C = "192.0.2.1:9000", "192.0.2.2:9000", "192.0.2.3:9000"


def not_primary(primary: Any = None, term: int = 2) -> Exception:
    reply: dict[str, Any] = {"type": "error", "code": "not_primary", "term": term,
                             "error": f"this rendezvous is a standby; the primary is {primary}"}
    if primary is not None:
        reply["primary"] = primary
    return reply_error(reply)


class ListWorld(World):
    """A World whose connect() goes to the entry the registration names; each entry scripted apart."""

    def __init__(self, servers: tuple[str, ...] = (A, B), **kw: Any) -> None:
        self.servers = servers
        self.moved: list[int] = []
        self.connected_to: list[str] = []
        self.down: set[str] = set()
        #: entry -> extra fields every reply of that entry carries (a pair's term)
        self.extra: dict[str, dict[str, Any]] = {}
        #: entry -> type -> scripted answers
        self.by_server: dict[str, dict[str, list[Any]]] = {}
        settings = dict(kw.pop("settings", {}))
        settings.update(servers=servers, server_changed=self.moved.append)
        super().__init__(settings=settings, **kw)

    def connect(self) -> Deferred[Any]:
        server = self.servers[self.reg.server_index]
        self.connected_to.append(server)
        if server in self.down:
            self.connects.append(self.clock.seconds())
            return fail(ConnectionFailed(f"connection refused by {server}"))
        return super().connect()

    def answer(self, msg: dict[str, Any]) -> Any:
        server = self.connected_to[-1]
        queue = self.by_server.get(server, {}).get(msg["type"])
        if queue:
            item = queue.pop(0)
            answer = item(msg) if callable(item) else item
        else:
            answer = super().answer(msg)
        if isinstance(answer, dict):
            answer = {**answer, **self.extra.get(server, {})}
        return answer


class RoundRobinTests(SynchronousTestCase):
    def test_one_entry_never_moves(self) -> None:
        w = ListWorld(servers=(A,))
        w.down.add(A)
        w.started()
        run_until(w.clock, w.clock.seconds() + 60)
        self.assertEqual(set(w.connected_to), {A})
        self.assertEqual(w.moved, [])
        self.assertEqual(w.reg.status()["server"], A)

    def test_refused_moves_to_the_next_at_once(self) -> None:
        w = ListWorld()
        w.down.add(A)
        w.started()
        self.assertEqual(w.connected_to, [A])
        self.assertEqual(w.moved, [1])
        w.clock.advance(BACKOFF_INITIAL)  # a move waits at most the first backoff window
        self.assertEqual(w.connected_to, [A, B])
        self.assertTrue(w.reg.is_registered())
        status = w.reg.status()
        self.assertEqual((status["server"], status["server_index"], status["servers"]), (B, 1, [A, B]))
        self.assertIsNone(status["term"])

    def test_lost_session_moves_and_reregisters_with_settings(self) -> None:
        w = ListWorld(settings={"hostname": "alpha", "public": True, "tags": ["gpu"]})
        w.started()
        self.assertTrue(w.reg.is_registered())
        self.assertEqual(w.connected_to, [A])
        since = len(w.sent)
        w.reg.connection_lost("connection reset", w.client)
        w.clock.advance(BACKOFF_INITIAL)
        self.assertEqual(w.connected_to, [A, B])
        self.assertEqual(w.moved, [1])
        self.assertTrue(w.reg.is_registered())
        # a fresh server: register (signed), subscribe, every setting again
        self.assertEqual(w.types(since)[:5], ["register", "subscribe_events", "set_visibility", "set_tags",
                                             "poll_handshakes"])
        self.assertEqual(w.client.requests[0]["hostname"], "alpha")
        self.assertIn("auth", w.client.requests[0])

    def test_whole_list_down_backs_off_per_round(self) -> None:
        w = ListWorld(servers=(A, B, C), rng=FixedJitter(1.0))
        w.down.update((A, B, C))
        w.started()
        run_until(w.clock, w.clock.seconds() + 40)
        self.assertEqual(w.connected_to[:9], [A, B, C] * 3)
        gaps = [round(b - a, 3) for a, b in zip(w.connects, w.connects[1:])]
        # within a round: the move window (0.5 s); between rounds: 0.5, 1, 2, 4... (full jitter at 1.0)
        self.assertEqual(gaps[:8], [0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 0.5, 0.5])
        self.assertTrue(set(w.connected_to) <= {A, B, C})
        self.assertFalse(w.reg.is_registered())
        self.assertTrue(w.reg.is_lost())

    def test_back_after_a_full_outage(self) -> None:
        w = ListWorld()
        w.down.update((A, B))
        w.started()
        run_until(w.clock, w.clock.seconds() + 10)
        w.down.discard(A)
        run_until(w.clock, w.clock.seconds() + 40)
        self.assertTrue(w.reg.is_registered())
        self.assertEqual(w.reg.status()["server"], A)
        self.assertEqual(w.reg.status()["consecutive_failures"], 0)

    def test_only_configured_entries_are_dialled(self) -> None:
        w = ListWorld(servers=(A, B))
        w.by_server[A] = {"register": [not_primary("203.0.113.66:9000")] * 50}
        w.by_server[B] = {"register": [not_primary("evil.example:1")] * 50}
        w.started()
        run_until(w.clock, w.clock.seconds() + 120)
        self.assertEqual(set(w.connected_to), {A, B})


class NotPrimaryTests(SynchronousTestCase):
    def test_moves_to_the_named_primary_at_once(self) -> None:
        w = ListWorld(servers=(A, B, C))
        w.by_server[A] = {"register": [not_primary(C)]}
        w.started()
        self.assertEqual(w.moved, [2])
        w.clock.advance(BACKOFF_INITIAL)
        self.assertEqual(w.connected_to, [A, C])
        self.assertTrue(w.reg.is_registered())
        self.assertEqual(w.reg.status()["term"], 2)
        self.assertIn("standby", w.reg.status()["last_error"] or "standby")

    def test_primary_compared_after_parsing(self) -> None:
        w = ListWorld(servers=("rv-a.example:9000", "rv-b.example:9000"))
        w.by_server["rv-a.example:9000"] = {"register": [not_primary("RV-B.example:09000")]}
        w.started()
        w.clock.advance(BACKOFF_INITIAL)
        self.assertEqual(w.connected_to, ["rv-a.example:9000", "rv-b.example:9000"])

    def test_no_primary_goes_to_the_next(self) -> None:
        w = ListWorld(servers=(A, B, C))
        w.by_server[A] = {"register": [not_primary(None)]}
        w.started()
        w.clock.advance(BACKOFF_INITIAL)
        self.assertEqual(w.connected_to, [A, B])

    def test_hostile_primary_fields_go_to_the_next(self) -> None:
        for primary in ["x" * 100_000, 9000, ["192.0.2.3:9000"], {"host": C}, "", "192.0.2.3",
                        "192.0.2.3:0", "192.0.2.3:99999", "[::1", "\x00:9000", A, True]:
            w = ListWorld(servers=(A, B, C))
            w.by_server[A] = {"register": [not_primary(primary)]}
            w.started()
            w.clock.advance(BACKOFF_INITIAL)
            self.assertEqual(w.connected_to, [A, B], repr(primary)[:40])

    def test_redirect_loop_backs_off(self) -> None:
        w = ListWorld(rng=FixedJitter(1.0))
        w.by_server[A] = {"register": [not_primary(B)] * 10}
        w.by_server[B] = {"register": [not_primary(A)] * 10}
        w.started()
        run_until(w.clock, w.clock.seconds() + 3.6)
        gaps = [round(b - a, 3) for a, b in zip(w.connects, w.connects[1:])]
        self.assertEqual(gaps[:4], [0.5, 0.5, 0.5, 1.0])

    def test_standby_waiting_for_its_promotion(self) -> None:
        """The primary dies; the standby refuses (naming the dead primary) until promoted 10 s later."""
        w = ListWorld(rng=FixedJitter(1.0))
        w.started()
        w.down.add(A)
        promoted = [False]

        def register(msg: dict[str, Any]) -> Any:
            return default_reply(msg) if promoted[0] else not_primary(A)

        w.by_server[B] = {"register": [register] * 100}
        killed = w.clock.seconds()
        w.reg.connection_lost("connection reset", w.client)
        run_until(w.clock, killed + 10.0)
        after = w.connected_to[1:]
        self.assertEqual(after[:3], [B, B, A])  # the named primary is dead: stay on the standby first
        self.assertNotIn([A, A], [after[i:i + 2] for i in range(len(after) - 1)])
        gaps = [b - a for a, b in zip(w.connects, w.connects[1:])]
        self.assertLessEqual(max(gaps), STANDBY_RETRY + BACKOFF_INITIAL)  # never the 30 s backoff
        promoted[0] = True
        run_until(w.clock, killed + 10.0 + STANDBY_RETRY + 2 * BACKOFF_INITIAL)
        self.assertTrue(w.reg.is_registered())
        self.assertEqual(w.reg.status()["server"], B)

    def test_lone_standby_is_retried_briefly(self) -> None:
        w = ListWorld(servers=(A,), rng=FixedJitter(1.0))
        w.by_server[A] = {"register": [not_primary("192.0.2.99:9000")] * 100}
        w.started()
        run_until(w.clock, w.clock.seconds() + 60)
        gaps = [b - a for a, b in zip(w.connects, w.connects[1:])]
        self.assertEqual(max(gaps), STANDBY_RETRY)
        self.assertEqual(set(w.connected_to), {A})

    def test_not_primary_on_a_setting_moves(self) -> None:
        w = ListWorld()
        w.started()
        w.by_server[A] = {"set_hostname": [not_primary(B)]}
        d = w.reg.set_hostname("alpha")
        self.assertTrue(failure_of(d).check(RegistryUnavailable))
        self.assertFalse(w.reg.is_registered())
        w.clock.advance(BACKOFF_INITIAL)
        self.assertEqual(w.connected_to, [A, B])
        self.assertTrue(w.reg.is_registered())
        self.assertEqual(w.reg.status()["hostname"], "alpha")
        self.assertIn("set_hostname", w.types())


class TermTests(SynchronousTestCase):
    def test_term_is_remembered(self) -> None:
        w = ListWorld()
        w.extra[A] = {"term": 3}
        w.started()
        self.assertEqual(w.reg.status()["term"], 3)
        w.extra[A] = {"term": 4}
        run_until(w.clock, w.clock.seconds() + HEARTBEAT_INTERVAL)
        self.assertEqual(w.reg.status()["term"], 4)
        self.assertTrue(w.reg.is_registered())

    def test_lower_term_reply_drops_the_session(self) -> None:
        w = ListWorld()
        w.extra[A] = {"term": 5}
        w.extra[B] = {"term": 5}
        w.started()
        client = w.client
        w.extra[A] = {"term": 4}  # A is an old primary now
        run_until(w.clock, w.clock.seconds() + HEARTBEAT_INTERVAL)
        self.assertTrue(client.closed)
        self.assertEqual(w.moved, [1])
        self.assertIn("stale", w.reg.status()["last_error"])
        w.clock.advance(BACKOFF_INITIAL)
        self.assertEqual(w.connected_to, [A, B])
        self.assertTrue(w.reg.is_registered())
        self.assertEqual(w.reg.status()["term"], 5)

    def test_lower_term_register_reply_is_never_applied(self) -> None:
        w = ListWorld(servers=(A, B))
        w.extra[B] = {"term": 7}
        w.down.add(A)
        w.started()
        w.clock.advance(BACKOFF_INITIAL)
        self.assertEqual(w.reg.status()["server"], B)
        w.down.discard(A)
        w.extra[A] = {"term": 6}
        w.by_server[A] = {"register": [lambda msg: {**default_reply(msg, node_id=12345)}]}
        w.reg.connection_lost("reset", w.client)
        w.clock.advance(BACKOFF_INITIAL)
        self.assertEqual(w.connected_to[-1], A)
        self.assertNotEqual(w.reg.node_id, 12345)  # the stale register_ok was not applied
        self.assertEqual(w.moved[-1], 1)

    def test_lower_term_event_is_dropped(self) -> None:
        w = ListWorld()
        w.extra[A] = {"term": 2}
        w.started()
        w.reg.event_received({"type": "event", "event": "handshake_request", "from_node_id": 9,
                              "justification": "", "timestamp": 0, "term": 1})
        self.assertEqual(w.events, [])
        self.assertFalse(w.reg.is_registered())
        self.assertEqual(w.moved, [1])
        w.reg.event_received({"type": "event", "event": "trust_revoked", "node_id": 9, "term": 2})
        self.assertEqual(len(w.events), 1)

    def test_malformed_terms_drop_the_session(self) -> None:
        for term in ["3", -1, 0, True, 1.5, MAX_TERM + 1, None, [1]]:
            w = ListWorld()
            w.extra[A] = {"term": term}
            w.started()
            self.assertFalse(w.reg.is_registered(), repr(term))
            self.assertEqual(w.moved, [1], repr(term))

    def test_stale_reply_to_a_trust_request(self) -> None:
        w = ListWorld()
        w.extra[A] = {"term": 3}
        w.started()
        w.extra[A] = {}
        w.by_server[A] = {"resolve": [{"type": "resolve_ok", "term": 2}]}
        d = w.reg.request({"type": "resolve", "node_id": 9}, "requester_id")
        self.assertTrue(failure_of(d).check(RegistryUnavailable))
        self.assertEqual(w.moved, [1])

    def test_single_server_without_terms_unchanged(self) -> None:
        w = ListWorld(servers=(A,))
        w.started()
        self.assertIsNone(w.reg.status()["term"])
        self.assertEqual(w.reg.status()["server_moves"], 0)


class ServersTests(SynchronousTestCase):
    def test_oversized_lists_are_refused(self) -> None:
        names = tuple(f"192.0.2.{i}:9000" for i in range(MAX_SERVERS + 1))
        self.assertRaises(InvalidArgument, Servers, names)
        self.assertRaises(InvalidArgument, Servers, ())
        self.assertRaises(InvalidArgument, ListWorld, servers=names)
        self.assertRaises(InvalidArgument, ListWorld, servers="192.0.2.1:9000")
        Servers(names[:MAX_SERVERS])

    def test_server_key(self) -> None:
        self.assertEqual(server_key("RV.example:09000"), "rv.example:9000")
        self.assertEqual(server_key("[::1]:9000"), "[::1]:9000")
        for bad in [None, 1, "", "a" * 400, "host", "host:0", "[x]:1"]:
            self.assertIsNone(server_key(bad), repr(bad))

    def test_screen_ignores_non_objects(self) -> None:
        servers = Servers((A, B))
        self.assertIsNone(servers.screen(["term", 1]))
        self.assertIsNone(servers.screen({"type": "heartbeat_ok"}))
        self.assertIsNotNone(servers.screen({"type": "error", "code": "not_primary", "primary": B}))
        self.assertEqual(servers.redirect, 1)

    def test_registration_keeps_its_arguments(self) -> None:
        reg = Registration(connect=lambda: succeed(FakeClient(ListWorld())), identity=US,
                           clock=ListWorld().clock, endpoint=lambda: "", servers=(A, B, C))
        self.assertEqual(reg.server_index, 0)
        self.assertEqual(reg.status()["servers"], [A, B, C])

    def test_hanging_connect_times_out_and_moves(self) -> None:
        w = ListWorld()
        w.connect_script.append(HANG)
        w.started()
        run_until(w.clock, w.clock.seconds() + 10.0 + BACKOFF_INITIAL)
        self.assertEqual(w.connected_to, [A, B])
        self.assertTrue(w.reg.is_registered())
