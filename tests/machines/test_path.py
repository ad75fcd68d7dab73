"""
Tests for pilot.machines.path.

``PathMachineTests`` drive one :class:`Paths` against recording fakes on a
``task.Clock``.  The NAT tests run two real nodes (``Tunnels`` + ``Paths``
behind the NAT boxes of ``tests.natmodel``) with a real registry and beacon,
all in model time.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Optional

from automat import NoTransition
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.endpoint import Endpoint
from pilot.identity import Identity
from pilot.machines.path import (
    COLLISION_QUIET, COLLISION_QUIET_MAX, DIRECT_SILENCE, DIRECT_TIMEOUT, KEEPALIVE, KEEPER_INTERVAL,
    PUNCH_TIMEOUT, RELAY_IDLE, PathConfig, PathCore, Paths, PeerPath, transitions,
)
from pilot.machines.path.peer import table
from pilot.wire import beacon as bw
from pilot.wire.tunnel import PILP
from tests.natmodel import (
    FIREWALL, FULL_CONE, KINDS, LATENCY, PORT_RESTRICTED, PUBLIC, SYMMETRIC, UDP_BLOCKED, ModelNode, World,
)

BEACON: Endpoint = ("198.51.100.1", 9001)
E1: Endpoint = ("203.0.113.2", 4002)
E2: Endpoint = ("203.0.113.2", 5002)
E3: Endpoint = ("203.0.113.3", 4003)
LOWER: Endpoint = ("198.51.100.50", 4000)
HIGHER: Endpoint = ("203.0.113.200", 4000)
OWN = 7
PEER = 2


class FakeTunnels:
    """Records what the paths ask of the tunnel layer."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.events: list[tuple[Any, ...]] = []
        self.established: set[int] = set()
        self.active = True              # traffic "now" on every peer
        self.last_tx: Optional[float] = None

    def set_path(self, node_id: int, direct_endpoint: Optional[Endpoint], relay: bool,
                 hold: bool = False) -> None:
        self.events.append(("set_path", node_id, direct_endpoint, relay) + (("hold",) if hold else ()))

    def send_key_exchange(self, node_id: int, endpoint: Optional[Endpoint] = None) -> None:
        self.events.append(("pila", node_id, endpoint))

    def key_exchange_frame(self) -> bytes:
        return b"PILA-frame"

    def is_established(self, node_id: int) -> bool:
        return node_id in self.established

    def last_sent(self, node_id: int) -> Optional[float]:
        if self.last_tx is not None:
            return self.last_tx
        return self.clock.seconds() if self.active else None


class PathsFixture(SynchronousTestCase):
    """One :class:`Paths` against recording fakes, and helpers."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.tunnels = FakeTunnels(self.clock)
        self.identity = Identity.from_seed(b"\x07" * 32)
        self.sent: list[tuple[bytes, Endpoint]] = []
        self.limited: list[tuple[bytes, Endpoint, int]] = []
        self.own_endpoint: Optional[Endpoint] = LOWER  # we punch first toward E1, E2, E3
        self.changes: list[tuple[int, str, Optional[Endpoint]]] = []
        self.jitter = 0.0
        self.beacon: Optional[Endpoint] = BEACON
        self.paths = self.make()

    def make(self, config: PathConfig = PathConfig(punch_first=False)) -> Paths:
        """The direct-first rules (a LAN endpoint's, or ``punch_first=False``); ``PunchFirstTests``
        has the public endpoint's first contact."""
        return Paths(tunnels=self.tunnels, send_datagram=lambda data, to: self.sent.append((data, to)),
                     beacon=lambda: self.beacon, node_id=lambda: OWN, sign=self.identity.sign,
                     clock=self.clock, config=config, random=lambda: self.jitter,
                     random_bytes=lambda n: b"\x01" * n,
                     path_changed=lambda node, state, endpoint: self.changes.append((node, state, endpoint)),
                     send_limited=lambda data, to, ttl: self.limited.append((data, to, ttl)),
                     public_endpoint=lambda: self.own_endpoint)

    def take(self) -> list[tuple[Any, ...]]:
        events, self.tunnels.events = self.tunnels.events, []
        return events

    def datagrams(self) -> list[tuple[bytes, Endpoint]]:
        sent, self.sent = self.sent, []
        return sent

    def assertPunchRequest(self, datagram: tuple[bytes, Endpoint]) -> None:
        data, to = datagram
        self.assertEqual(to, BEACON)
        msg = bw.decode(data)
        assert isinstance(msg, bw.PunchRequest)
        self.assertEqual((msg.requester, msg.target), (OWN, PEER))
        assert msg.proof is not None
        self.assertTrue(msg.proof.verify(self.identity.public_key, msg.base))
        self.assertEqual(msg.proof.ts_ms, int(self.clock.seconds() * 1000))

    def status(self) -> dict[str, Any]:
        status = self.paths.status(PEER)
        assert status is not None
        return status

    def go_direct(self, endpoint: Endpoint = E1) -> None:
        self.paths.endpoint_learned(PEER, endpoint)
        self.paths.sending(PEER)
        self.paths.direct_frame(PEER, endpoint)
        self.tunnels.established.add(PEER)
        self.assertEqual(self.paths.state(PEER), "direct")
        self.take()
        self.datagrams()

    def go_relayed(self) -> None:
        self.paths.relayed_frame(PEER)
        self.tunnels.established.add(PEER)
        self.assertEqual(self.paths.state(PEER), "relayed")
        self.take()


class PathMachineTests(PathsFixture):
    # -- first contact --

    def test_learning_an_endpoint_starts_nothing(self) -> None:
        self.paths.endpoint_learned(PEER, E1)
        self.assertEqual((self.take(), self.sent, self.clock.getDelayedCalls()), ([], [], []))
        self.assertEqual(self.status()["path"], None)

    def test_first_send_tries_the_registered_endpoint(self) -> None:
        self.paths.endpoint_learned(PEER, E1)
        self.paths.sending(PEER)
        self.assertEqual(self.take(), [("set_path", PEER, E1, False)])  # the tunnel's PILA goes there
        self.assertEqual(self.status(), {"path": "trying", "state": "direct_trying", "endpoint": E1,
                                         "rtt_ms": None, "path_changed_at": 1000,
                                         "reason": None})
        self.paths.sending(PEER)
        self.assertEqual((self.take(), self.sent), ([], []))

    def test_endpoint_given_with_the_first_send(self) -> None:
        self.paths.sending(PEER, E1)
        self.assertEqual(self.take(), [("set_path", PEER, E1, False)])

    def test_direct_timeout_asks_the_beacon_then_relays(self) -> None:
        self.paths.sending(PEER, E1)
        self.take()
        self.clock.advance(DIRECT_TIMEOUT - 0.001)
        self.assertEqual(self.sent, [])
        self.clock.advance(0.001)
        [request] = self.datagrams()
        self.assertPunchRequest(request)
        self.assertEqual(self.paths.state(PEER), "punching")
        self.clock.advance(PUNCH_TIMEOUT - 0.001)
        self.assertEqual(self.take(), [])
        self.clock.advance(0.001)
        # relayed at once, and our PILA goes through the beacon now, not at the tunnel's next retry
        self.assertEqual(self.take(), [("set_path", PEER, E1, True), ("pila", PEER, None)])
        self.assertEqual(self.status()["path"], "relay")
        self.assertEqual(self.paths.counters["relay_fallbacks"], 1)
        self.assertEqual([state for _, state, _ in self.changes], ["direct_trying", "punching", "relayed"])

    def keep_sending(self, seconds: float, every: float = 0.5) -> None:
        for _ in range(int(seconds / every)):
            self.paths.sending(PEER)
            self.clock.advance(every)
        self.paths.sending(PEER)

    def test_relay_with_an_established_tunnel_sends_no_pila(self) -> None:
        self.go_direct()
        self.keep_sending(DIRECT_SILENCE)
        self.clock.advance(DIRECT_TIMEOUT)
        self.clock.advance(PUNCH_TIMEOUT)
        self.assertEqual(self.paths.state(PEER), "relayed")
        self.assertNotIn(("pila", PEER, None), self.take())

    def test_no_beacon(self) -> None:
        self.beacon = None
        self.paths.sending(PEER, E1)
        self.clock.advance(DIRECT_TIMEOUT)
        self.assertEqual(self.sent, [])
        self.assertEqual(self.paths.counters["punch_impossible"], 1)

    # -- direct --

    def test_direct_frame_while_trying(self) -> None:
        self.paths.sending(PEER, E1)
        self.take()
        self.clock.advance(0.2)
        self.paths.direct_frame(PEER, E1)
        self.assertEqual(self.take(), [("set_path", PEER, E1, False)])
        self.assertEqual(self.status(), {"path": "direct", "state": "direct", "endpoint": E1,
                                         "rtt_ms": None, "path_changed_at": 1000.2,
                                         "reason": None})
        self.clock.advance(DIRECT_TIMEOUT + PUNCH_TIMEOUT)
        self.assertEqual((self.sent, self.paths.state(PEER)), ([], "direct"))

    def test_peer_that_reached_us_directly(self) -> None:
        self.paths.direct_frame(PEER, E1)
        self.assertEqual(self.paths.state(PEER), "direct")

    def test_keepalive_after_silence(self) -> None:
        self.tunnels.last_tx = 1000.0
        self.go_direct()
        self.clock.advance(KEEPALIVE - 0.001)
        self.assertEqual(self.sent, [])
        self.clock.advance(0.001)
        self.assertEqual(self.datagrams(), [(PILP, E1)])
        self.assertEqual(len(PILP), 4)
        self.clock.advance(KEEPALIVE)
        self.assertEqual(self.datagrams(), [(PILP, E1)])
        self.assertEqual(self.paths.counters["keepalives"], 2)

    def test_no_keepalive_while_sending(self) -> None:
        self.tunnels.last_tx = 1000.0
        self.go_direct()
        self.clock.advance(KEEPALIVE / 2)
        self.tunnels.last_tx = self.clock.seconds()  # we sent: the keepalive waits a full interval from here
        self.clock.advance(KEEPALIVE / 2 + 0.001)
        self.assertEqual(self.sent, [])
        self.clock.advance(KEEPALIVE / 2)
        self.assertEqual(self.datagrams(), [(PILP, E1)])

    def test_roaming(self) -> None:
        self.go_direct()
        self.clock.advance(5)
        self.paths.direct_frame(PEER, E2)
        self.assertEqual(self.take(), [("set_path", PEER, E2, False)])
        self.assertEqual((self.status()["endpoint"], self.status()["path_changed_at"]), (E2, 1005))
        self.assertEqual(self.changes[-1], (PEER, "direct", E2))

    def test_silence_tries_again(self) -> None:
        self.go_direct()
        self.keep_sending(DIRECT_SILENCE - 0.5)
        self.paths.direct_frame(PEER, E1)  # an answer: the clock starts again
        self.keep_sending(DIRECT_SILENCE - 0.5)
        self.assertEqual(self.paths.state(PEER), "direct")
        self.clock.advance(0.5)
        self.paths.sending(PEER)
        self.assertEqual(self.paths.state(PEER), "direct_trying")
        self.assertEqual(self.take(), [("set_path", PEER, E1, False), ("pila", PEER, E1)])
        self.paths.direct_frame(PEER, E1)
        self.assertEqual(self.paths.state(PEER), "direct")

    def test_a_direct_paths_per_packet_loops_run_undispatched(self) -> None:
        """sending and direct_frame on a direct path run their loops without the input's dispatch;
        silence is still found (its input then goes through the machine)."""
        self.go_direct()
        machine = self.paths._peers[PEER].machine
        fed: list[str] = []
        for name in ("packet_sent", "direct_frame_received"):
            original = getattr(machine, name)
            self.patch(machine, name, lambda *a, _o=original, _n=name: (fed.append(_n), _o(*a))[1])
        self.keep_sending(DIRECT_SILENCE - 0.5)
        self.paths.direct_frame(PEER, E1)
        self.assertEqual((fed, self.paths.state(PEER)), ([], "direct"))
        self.keep_sending(DIRECT_SILENCE + 0.5)
        self.assertEqual(self.paths.state(PEER), "direct_trying")
        self.paths.direct_frame(PEER, E1)
        # direct_trying's inputs (the sends after the silence, the answer) went through the machine
        self.assertEqual((set(fed[:-1]), fed[-1], self.paths.state(PEER)),
                         ({"packet_sent"}, "direct_frame_received", "direct"))

    def test_a_pause_in_sending_is_not_silence(self) -> None:
        self.go_direct()
        self.paths.sending(PEER)  # a datagram nobody answers
        self.clock.advance(600)
        self.keep_sending(DIRECT_SILENCE - 0.5)
        self.assertEqual((self.paths.state(PEER), self.take()), ("direct", []))

    def test_registered_endpoint_moves(self) -> None:
        self.go_direct()
        self.paths.endpoint_learned(PEER, E1)  # the same: nothing
        self.assertEqual(self.take(), [])
        self.paths.endpoint_learned(PEER, E2)
        self.assertEqual(self.paths.state(PEER), "direct_trying")
        self.assertEqual(self.take(), [("set_path", PEER, E2, False), ("pila", PEER, E2)])

    def test_first_registered_endpoint_keeps_a_working_path(self) -> None:
        # a peer behind a symmetric NAT reached us from another port than it registered
        self.paths.direct_frame(PEER, E2)
        self.paths.endpoint_learned(PEER, E1)
        self.assertEqual((self.paths.state(PEER), self.status()["endpoint"]), ("direct", E2))

    def test_direct_answers_a_punch(self) -> None:
        self.go_direct()
        self.paths.punch_commanded(E1)
        self.assertEqual(self.take(), [("pila", PEER, E1)])
        self.assertEqual(self.paths.state(PEER), "direct")

    # -- punching --

    def test_punch_command_for_a_known_endpoint(self) -> None:
        self.paths.sending(PEER, E1)
        self.clock.advance(DIRECT_TIMEOUT)
        self.take()
        self.paths.punch_commanded(E1)
        self.assertEqual(self.take(), [("set_path", PEER, E1, False), ("pila", PEER, E1)])
        self.paths.direct_frame(PEER, E1)
        self.assertEqual(self.status()["path"], "punched")
        self.clock.advance(PUNCH_TIMEOUT)
        self.assertEqual(self.paths.state(PEER), "punched")

    def test_punch_command_answering_our_only_request(self) -> None:
        self.paths.sending(PEER, E1)
        self.clock.advance(DIRECT_TIMEOUT)
        self.take()
        self.paths.punch_commanded(E2)  # the beacon sees the peer elsewhere
        self.assertEqual(self.take(), [("set_path", PEER, E2, False), ("pila", PEER, E2)])
        self.paths.direct_frame(PEER, E2)
        self.assertEqual((self.status()["path"], self.status()["endpoint"]), ("punched", E2))

    def test_peer_punches_toward_us_while_we_try(self) -> None:
        self.paths.sending(PEER, E1)
        self.take()
        self.paths.punch_commanded(E1)
        self.assertEqual(self.paths.state(PEER), "punching")
        self.assertEqual(self.take(), [("set_path", PEER, E1, False), ("pila", PEER, E1)])
        self.clock.advance(PUNCH_TIMEOUT)
        self.assertEqual(self.paths.state(PEER), "relayed")

    def test_unknown_punch_command(self) -> None:
        self.paths.punch_commanded(E3)
        # our PILA follows the PILPs, once per endpoint per PUNCH_TIMEOUT
        self.assertEqual(self.datagrams(), [(b"PILA-frame", E3)])
        self.paths.punch_commanded(E3)
        self.assertEqual(self.sent, [])
        self.clock.advance(PUNCH_TIMEOUT)
        self.paths.punch_commanded(E3)
        self.assertEqual(self.datagrams(), [(b"PILA-frame", E3)])
        self.assertEqual(self.paths.peers(), [])
        # the peer that wanted us comes through the hole: punched, not direct
        self.paths.direct_frame(5, E3)
        self.assertEqual(self.paths.status(5)["path"], "punched")  # type: ignore[index]
        self.paths.direct_frame(6, E1)
        self.assertEqual(self.paths.status(6)["path"], "direct")  # type: ignore[index]

    def test_ambiguous_punch_command_is_not_guessed(self) -> None:
        for peer in (PEER, 3):
            self.paths.sending(peer)
        self.clock.advance(DIRECT_TIMEOUT)
        self.take()
        self.paths.punch_commanded(E3)
        self.assertEqual(self.take(), [])
        self.assertEqual(self.datagrams()[-1], (b"PILA-frame", E3))

    # -- relayed --

    def test_relayed_peer(self) -> None:
        self.paths.relayed_frame(PEER)
        self.assertEqual(self.take(), [("set_path", PEER, None, True), ("pila", PEER, None)])
        self.assertEqual(self.status()["path"], "relay")

    def test_relayed_frame_while_trying(self) -> None:
        self.paths.sending(PEER, E1)
        self.paths.relayed_frame(PEER)
        self.assertEqual(self.paths.state(PEER), "relayed")

    def test_relayed_frame_while_direct_changes_nothing(self) -> None:
        self.go_direct()
        self.paths.relayed_frame(PEER)
        self.assertEqual((self.paths.state(PEER), self.take()), ("direct", []))

    def advance_to_next_call(self) -> float:
        call = min(self.clock.getDelayedCalls(), key=lambda c: c.getTime())
        self.clock.advance(call.getTime() - self.clock.seconds())
        return self.clock.seconds()

    def recover(self, until: float) -> list[tuple[float, str]]:
        """Run the recovery (the pair in use) until ``until`` s after now; what went to the peer and when."""
        start, seen = self.clock.seconds(), []
        while self.clock.seconds() - start < until:
            call = min(self.clock.getDelayedCalls(), key=lambda c: c.getTime())
            self.clock.advance(min(call.getTime() - self.clock.seconds(), 10.0))
            self.paths.sending(PEER)  # the pair is in use
            t = round(self.clock.seconds() - start, 3)
            seen += [(t, "keeper") for _ in self.limited] + [(t, e[0]) for e in self.take() if e[0] == "pila"]
            self.assertEqual([to for _, to, _ in self.limited], [E1] * len(self.limited))
            self.assertEqual({ttl for _, _, ttl in self.limited} - {1}, set())
            self.assertEqual(self.datagrams(), [])  # no punch request: the beacon is not asked
            self.limited = []
        return seen

    def test_recovery_first_side_holds(self) -> None:
        """We punched first: keepers (TTL 1) every 5 s, nothing else direct; the peer sends after the quiet
        period; without an answer our PILA goes too, and the roles swap, the quiet period from now."""
        self.paths.endpoint_learned(PEER, E1)
        self.go_relayed()
        self.assertEqual(self.status()["reason"], "collision_recovering")
        seen = self.recover(COLLISION_QUIET + PUNCH_TIMEOUT + COLLISION_QUIET + PUNCH_TIMEOUT)
        end0 = COLLISION_QUIET + PUNCH_TIMEOUT
        keepers = [t for t, what in seen if what == "keeper"]
        self.assertEqual(keepers, [KEEPER_INTERVAL * i for i in range(1, int(end0 // KEEPER_INTERVAL))])
        self.assertEqual([t for t, what in seen if what == "pila"], [end0, end0 + COLLISION_QUIET])
        self.assertEqual((self.paths.counters["counter_attempts"], self.paths.counters["recovery_attempts"]),
                         (1, 1))
        self.assertEqual(self.paths.counters["keepers"], len(keepers))

    def test_recovery_second_side_sends_first(self) -> None:
        self.own_endpoint = HIGHER
        self.paths.endpoint_learned(PEER, E1)
        self.go_relayed()
        seen = self.recover(COLLISION_QUIET + 0.001)
        self.assertEqual(seen, [(COLLISION_QUIET, "pila")])
        self.paths.direct_frame(PEER, E1)  # the peer's answer
        self.assertEqual(self.take(), [("set_path", PEER, E1, False), ("pila", PEER, E1)])
        self.assertEqual(self.status()["path"], "punched")

    def test_later_rounds_back_off(self) -> None:
        self.paths.endpoint_learned(PEER, E1)
        self.go_relayed()
        seen = self.recover(1000)
        pilas = [t for t, what in seen if what == "pila"]
        gaps = [round(b - a, 3) for a, b in zip(pilas, pilas[1:])]
        q, p, top = COLLISION_QUIET, PUNCH_TIMEOUT, COLLISION_QUIET_MAX
        # our counter-attempt ends each round we hold; our first send follows the next round's quiet
        self.assertEqual(gaps[:5], [q, 2 * p + 2 * q, 4 * q, 2 * p + min(8 * q, top), top])
        self.assertEqual(gaps[5:], [2 * p + top, top] * (len(gaps[5:]) // 2) + [2 * p + top] * (len(gaps[5:]) % 2))
        self.assertGreater(COLLISION_QUIET, 30 + 2)  # nf_conntrack_udp_timeout, and the punch's last datagrams

    def test_a_punch_command_restarts_the_recovery(self) -> None:
        self.own_endpoint = HIGHER
        self.paths.endpoint_learned(PEER, E1)
        self.go_relayed()
        self.clock.advance(20)
        self.paths.punch_commanded(E1)  # the peer punches
        self.assertEqual(self.take(), [("set_path", PEER, E1, True), ("pila", PEER, E1)])
        self.clock.advance(COLLISION_QUIET - 0.001)
        self.assertEqual(self.take(), [])
        self.clock.advance(0.001)
        self.assertEqual(self.take(), [("set_path", PEER, E1, True), ("pila", PEER, E1)])

    def test_no_endpoint_asks_the_beacon(self) -> None:
        self.go_relayed()
        self.assertEqual(self.status()["reason"], "peer_relays")
        self.paths.sending(PEER)
        self.clock.advance(COLLISION_QUIET)
        self.assertPunchRequest(self.datagrams()[0])
        self.paths.sending(PEER)
        self.paths.punch_commanded(E1)  # the answer: aims there and starts the rounds again
        self.assertEqual(self.take(), [("set_path", PEER, E1, True), ("pila", PEER, E1)])

    def test_punch_command_while_relayed(self) -> None:
        self.paths.endpoint_learned(PEER, E1)
        self.go_relayed()
        self.paths.punch_commanded(E1)
        self.assertEqual(self.take(), [("set_path", PEER, E1, True), ("pila", PEER, E1)])
        self.paths.direct_frame(PEER, E1)
        # our PILA through the hole at once: the peer may still be relayed (docs/nat.md)
        self.assertEqual(self.take(), [("set_path", PEER, E1, False), ("pila", PEER, E1)])
        self.assertEqual(self.status()["path"], "punched")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the keepalive; no keeper, no round

    def test_idle_relay_parks_and_resumes(self) -> None:
        self.paths.endpoint_learned(PEER, E1)
        self.go_relayed()  # a relayed frame: the last traffic
        while self.clock.getDelayedCalls():
            self.advance_to_next_call()
        self.assertGreaterEqual(self.clock.seconds() - 1000, RELAY_IDLE)
        self.assertEqual(self.status()["reason"], "idle")
        self.limited = []
        self.take()
        self.paths.relayed_frame(PEER)  # traffic again: punch at once
        self.assertPunchRequest(self.datagrams()[0])
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # a new round: its end and a keeper

    def test_relayed_peer_moves(self) -> None:
        self.paths.endpoint_learned(PEER, E1)
        self.go_relayed()
        self.paths.endpoint_learned(PEER, E2)
        self.assertEqual(self.paths.state(PEER), "relayed")
        self.assertEqual(self.take(), [("set_path", PEER, E2, True), ("pila", PEER, E2)])
        self.assertPunchRequest(self.datagrams()[0])

    def test_exchange_gave_up(self) -> None:
        self.paths.sending(PEER, E1)
        self.clock.advance(DIRECT_TIMEOUT + PUNCH_TIMEOUT)
        self.take()
        self.paths.unreachable(PEER)
        self.assertEqual(self.take(), [("set_path", PEER, E1, False)])
        self.assertEqual((self.paths.state(PEER), self.clock.getDelayedCalls()), ("idle", []))
        self.paths.sending(PEER)
        self.assertEqual(self.paths.state(PEER), "direct_trying")

    def test_stop(self) -> None:
        self.go_direct()
        self.paths.sending(3, E2)
        self.paths.relayed_frame(4)
        self.paths.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_transition_table(self) -> None:
        rows = {(old, event, new) for old, event, new, _ in transitions()}
        self.assertIn(("idle", "packet_sent", "direct_trying"), rows)
        self.assertIn(("direct_trying", "direct_timed_out", "punching"), rows)
        self.assertIn(("punching", "punch_timed_out", "relayed"), rows)
        self.assertIn(("relayed", "direct_frame_received", "punched"), rows)
        self.assertIn(("direct", "direct_went_silent", "direct_trying"), rows)
        self.assertEqual({old for old, _, _ in rows},
                         {"idle", "direct_trying", "punching", "relayed", "direct", "punched"})

    def test_only_impossible_inputs_are_undeclared(self) -> None:
        # Timers are cancelled on leaving their state, a punched frame comes only for a peer
        # just met, silence only from a direct path, a move never before the first send.
        undeclared: dict[str, set[str]] = {}
        for state, event in table.undeclared([n for n in vars(PeerPath) if not n.startswith("_")]):
            undeclared.setdefault(event, set()).add(state)
        states = {"idle", "direct_trying", "punching", "relayed", "direct", "punched"}
        self.assertEqual(undeclared, {
            "endpoint_moved": {"idle"},
            "direct_timed_out": states - {"direct_trying"},
            "punch_timed_out": states - {"punching"},
            "retry_timer_fired": states - {"relayed"},
            "keepalive_timer_fired": states - {"direct", "punched", "relayed"},
            "direct_went_silent": states - {"direct", "punched"},
            "punched_frame_received": states - {"idle"},
            "punch_first": states - {"idle"},
        })
        ignored = {(row.state, row.input) for row in transitions(ignored=True)} - \
            {(row.state, row.input) for row in transitions()}
        self.assertEqual(ignored, set(table.reasons))
        self.assertEqual(ignored, {
            ("direct_trying", "packet_sent"), ("punching", "packet_sent"), ("idle", "exchange_gave_up"),
            ("direct", "relayed_frame_received"), ("punched", "relayed_frame_received")})

    def test_undeclared_input_raises(self) -> None:
        self.go_direct()
        core = PathCore(node_id=9, owner=self.paths, tunnels=self.tunnels, clock=self.clock,
                        config=PathConfig(), random=lambda: 0.0, send_datagram=lambda d, e: None,
                        send_limited=lambda d, e, t: None, path_changed=lambda n, s, e: None)
        timers = self.clock.getDelayedCalls()
        self.assertRaises(NoTransition, core.machine.direct_timed_out)
        self.assertRaises(NoTransition, core.machine.keepalive_timer_fired)
        self.assertEqual((core.state, self.take(), self.clock.getDelayedCalls()), ("idle", [], timers))

    def test_ignored_inputs_change_nothing(self) -> None:
        self.paths.sending(PEER, E1)
        self.take()
        self.paths.sending(PEER)  # direct_trying: the attempt under way carries it
        self.assertEqual((self.paths.state(PEER), self.take(), self.sent), ("direct_trying", [], []))
        self.paths.unreachable(PEER)
        self.take()
        self.paths.unreachable(PEER)  # idle now: a second give-up is harmless
        self.assertEqual(self.paths.state(PEER), "idle")
        self.assertEqual((self.take(), self.clock.getDelayedCalls()), ([], []))

    def test_docs_list_every_transition(self) -> None:
        with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "nat.md")) as f:
            doc = f.read()
        for row in transitions():
            self.assertIn("| `%s` | `%s` | `%s` | `%s` |" % row, doc)


class PunchFirstTests(PathsFixture):
    """A first contact with a public endpoint: a punch at once, nothing sent there before its command."""

    def first(self, endpoint: Endpoint = E1) -> None:
        self.paths = self.make(PathConfig())
        self.paths.sending(PEER, endpoint)

    def test_public_endpoint_punches_at_once(self) -> None:
        self.first()
        self.assertEqual(self.take(), [("set_path", PEER, E1, False, "hold")])  # the tunnel's PILA waits
        [request] = self.datagrams()
        self.assertPunchRequest(request)
        self.assertEqual((self.status()["state"], self.status()["path"]), ("punching", "trying"))
        self.paths.punch_commanded(E1)
        self.assertEqual(self.take(), [("set_path", PEER, E1, False), ("pila", PEER, E1)])
        self.paths.direct_frame(PEER, E1)
        self.assertEqual(self.status()["path"], "punched")
        self.assertIsNone(self.status()["reason"])

    def test_unanswered_punch_relays(self) -> None:
        self.first()
        self.take()
        self.clock.advance(PUNCH_TIMEOUT)
        self.assertEqual(self.take(), [("set_path", PEER, E1, True), ("pila", PEER, None)])
        self.assertEqual((self.status()["path"], self.status()["reason"]), ("relay", "collision_recovering"))

    def test_lan_endpoint_goes_straight(self) -> None:
        lan: Endpoint = ("192.168.1.20", 4000)
        self.first(lan)
        self.assertEqual(self.take(), [("set_path", PEER, lan, False)])
        self.assertEqual((self.datagrams(), self.paths.state(PEER)), ([], "direct_trying"))

    def test_without_a_beacon_we_go_straight(self) -> None:
        self.beacon = None
        self.first()
        self.assertEqual(self.paths.state(PEER), "direct_trying")

    def test_established_session_is_relayed_meanwhile(self) -> None:
        self.tunnels.established.add(PEER)
        self.first()
        self.assertEqual(self.take(), [("set_path", PEER, E1, True)])

    def test_punch_first_only_from_idle(self) -> None:
        self.first()
        core = PathCore(node_id=9, owner=self.paths, tunnels=self.tunnels, clock=self.clock,
                        config=PathConfig(), random=lambda: 0.0, send_datagram=lambda d, e: None,
                        send_limited=lambda d, e, t: None, path_changed=lambda n, s, e: None)
        core.machine.punch_first()
        self.assertRaises(NoTransition, core.machine.punch_first)


# -- the NAT model -------------------------------------------------------------------------------

#: First delivery targets (s) per path: a first contact with a public endpoint
#: punches at once (``docs/nat.md``), so "punched" is a beacon round trip and a
#: peer round trip, and the relay takes over after PUNCH_TIMEOUT.
TARGET = {"direct": 1.0, "punched": 0.5, "relayed": PUNCH_TIMEOUT + 0.5}
RESTRICTIVE = (PORT_RESTRICTED, SYMMETRIC, FIREWALL)


def expected_path(a: str, b: str) -> str:
    """What ``a`` reaches ``b`` by, and why (docs/nat.md)."""
    if UDP_BLOCKED in (a, b):
        return "relayed"
    if SYMMETRIC in (a, b) and a in RESTRICTIVE and b in RESTRICTIVE:
        return "relayed"  # the symmetric side's port for the peer is unknown and filtered
    return "punched"      # nothing goes to a public endpoint before the beacon's command


def expected_back(a: str, b: str) -> str:
    """What ``b`` reaches ``a`` by: ``direct`` where ``a``'s PILA arrives before ``b`` acted on its
    command: ``b`` has no NAT and waits NO_NAT_PUNCH_DELAY (``a`` does not; a firewall's filter is
    open by then, its openers went first, and ``a``'s PILA follows its ramp), or a symmetric ``a``'s
    PILA comes from a port no command named."""
    if expected_path(a, b) == "punched" and (b in (PUBLIC, FIREWALL) and a not in (PUBLIC, FIREWALL)
                                             or a == SYMMETRIC and b == FULL_CONE):
        return "direct"
    return expected_path(a, b)


def start(a_kind: str, b_kind: str, **world: Any) -> tuple[World, ModelNode, ModelNode]:
    w = World(**world)
    a, b = w.node(a_kind), w.node(b_kind)
    w.start()
    return w, a, b


def pinger(w: World, a: ModelNode, b: ModelNode, every: float = 1.0) -> None:
    """``a`` sends ``b`` a packet every ``every`` s (sequence 1000, 1001, ...); ``b`` echoes."""
    b.echo = True
    seq = itertools.count(1000)

    def tick() -> None:
        a.send(b, next(seq))
        w.clock.callLater(every, tick)

    tick()


def echoes_after(a: ModelNode, t: float) -> list[float]:
    return [when for when, p, _ in a.delivered if when > t and p.payload == b"echo"]


class MatrixTests(SynchronousTestCase):
    """One packet from ``a`` to ``b`` for every pair of NAT kinds."""

    def check(self, a_kind: str, b_kind: str) -> None:
        w, a, b = start(a_kind, b_kind, hops=1)  # a router between the NATs, as on internet paths
        t0 = w.now()
        a.send(b, 1)
        self.assertTrue(w.run_until(t0 + 10, lambda: bool(b.received(1))), "never delivered")
        took = b.received(1)[0] - t0
        w.run(1)
        path = expected_path(a_kind, b_kind)
        self.assertEqual((a.state(b), b.state(a)), (path, expected_back(a_kind, b_kind)))
        self.assertLess(took, TARGET[path])
        self.assertEqual(len(b.received(1)), 1)
        self.assertEqual(a.paths.counters["punch_requests"], 1)
        if path == "punched" and not {SYMMETRIC, FIREWALL} & {a_kind, b_kind}:
            # nothing reached a router unasked: no NAT was left an entry to collide with (a
            # firewall drops what comes before its host sends, by design; it has no port to move)
            self.assertEqual(a.box.counters["filtered"] + b.box.counters["filtered"], 0)


for _a, _b in itertools.product(KINDS, KINDS):
    def _test(self: MatrixTests, a_kind: str = _a, b_kind: str = _b) -> None:
        self.check(a_kind, b_kind)
    _test.__name__ = f"test_{_a}_to_{_b}".replace("-", "_")
    setattr(MatrixTests, _test.__name__, _test)
del _a, _b, _test


class NatScenarioTests(SynchronousTestCase):
    def test_upgrade_when_a_block_is_lifted(self) -> None:
        w, a, b = start(PORT_RESTRICTED, PORT_RESTRICTED)
        a.box.blocked.add(b.box.public_ip)  # a firewall rule between the two
        pinger(w, a, b)
        w.run(40)
        self.assertEqual((a.state(b), b.state(a)), ("relayed", "relayed"))
        self.assertTrue(echoes_after(a, w.now() - 1))  # traffic flows through the beacon
        a.box.blocked.clear()
        lifted = w.now()
        # the recovery rounds: the next round's attempt (after COLLISION_QUIET at most) finds it (docs/nat.md)
        upgraded = w.run_until(lifted + COLLISION_QUIET + 1, lambda: a.state(b) == b.state(a) == "punched")
        self.assertTrue(upgraded, (a.state(b), b.state(a), w.now() - lifted))
        relayed_before = w.beacon.counters.get("relayed", 0)
        w.run(10)
        self.assertEqual(w.beacon.counters.get("relayed", 0), relayed_before)  # nothing relayed any more
        self.assertTrue(echoes_after(a, w.now() - 1))

    def test_the_upgraded_side_tells_the_other_at_once(self) -> None:
        """After a lifted block, the side whose retry finds the hole first upgrades the other side
        too, without traffic and without waiting for that side's quiet-period retry."""
        w, a, b = start(PORT_RESTRICTED, PORT_RESTRICTED)
        a.box.blocked.add(b.box.public_ip)
        pinger(w, a, b)
        w.run(10)
        self.assertEqual((a.state(b), b.state(a)), ("relayed", "relayed"))
        a.box.blocked.clear()
        # no traffic from here: only the path machines run
        for call in w.clock.getDelayedCalls():
            if getattr(call.func, "__name__", "") == "tick":
                call.cancel()
        lifted = w.now()
        either = w.run_until(lifted + COLLISION_QUIET + 1, lambda: "punched" in (a.state(b), b.state(a)))
        self.assertTrue(either)
        first = w.now()
        self.assertTrue(w.run_until(first + 0.5, lambda: a.state(b) == b.state(a) == "punched"),
                        (a.state(b), b.state(a)))

    def test_keepalive_holds_a_short_nat_mapping(self) -> None:
        w = World(discover_interval=10.0)
        a, b = w.node(PORT_RESTRICTED, timeout=20.0), w.node(PORT_RESTRICTED, timeout=20.0)
        w.start()
        a.send(b, 1)
        w.run(5)
        self.assertEqual((a.state(b), b.state(a)), ("punched", "punched"))
        requests = a.paths.counters["punch_requests"] + b.paths.counters["punch_requests"]
        filtered = a.box.counters["filtered"] + b.box.counters["filtered"]  # the first direct tries
        w.run(300)  # five idle minutes: only PILPs
        self.assertGreaterEqual(a.paths.counters["keepalives"], 300 // KEEPALIVE - 1)
        probes = [d for _, s, _, d in w.internet.sent if s[0] == a.box.public_ip and d == PILP]
        self.assertGreater(len(probes), 10)
        t = w.now()
        a.send(b, 2)
        w.run(0.5)
        self.assertEqual(b.received(2), [t + LATENCY])  # straight through, no punch
        self.assertEqual((a.state(b), b.state(a)), ("punched", "punched"))
        self.assertEqual(a.paths.counters["punch_requests"] + b.paths.counters["punch_requests"], requests)
        self.assertEqual(a.box.counters["filtered"] + b.box.counters["filtered"], filtered)

    def test_without_keepalive_the_mapping_closes(self) -> None:
        """The model's control: the same five minutes without PILPs, and the first packet is filtered."""
        w = World(discover_interval=10.0)
        quiet = PathConfig(keepalive=1e9)
        a, b = w.node(PORT_RESTRICTED, timeout=20.0, config=quiet), w.node(PORT_RESTRICTED, timeout=20.0, config=quiet)
        w.start()
        a.send(b, 1)
        w.run(5)
        w.run(300)
        a.send(b, 2)
        w.run(0.5)
        self.assertEqual(b.received(2), [])
        self.assertGreater(b.box.counters["filtered"], 0)

    def test_nat_rebind_with_registry_push(self) -> None:
        """``a``'s NAT reboots; its next Discover sees the new port, the registry tells ``b``."""
        w, a, b = start(PORT_RESTRICTED, PORT_RESTRICTED)
        pinger(w, a, b)
        w.run(5)
        self.assertEqual(a.state(b), "punched")
        a.box.rebind()
        a.discover()  # as after a heartbeat
        t = w.now()
        w.run(5)
        self.assertLess(echoes_after(a, t)[0] - t, 2.0)
        self.assertEqual(b.paths.status(a.node_id)["endpoint"], a.box.public_endpoint())  # type: ignore
        self.assertIn(b.state(a), ("direct", "punched"))

    def test_nat_rebind_found_by_silence(self) -> None:
        """No push (or not yet): ``a``'s unanswered sends make it try again, and ``b`` follows its frames."""
        w, a, b = start(PORT_RESTRICTED, PORT_RESTRICTED, push_endpoint_changes=False)
        pinger(w, a, b)
        w.run(5)
        a.box.rebind()
        t = w.now()
        w.run(DIRECT_SILENCE + 5)
        self.assertLess(echoes_after(a, t)[0] - t, DIRECT_SILENCE + DIRECT_TIMEOUT + PUNCH_TIMEOUT)
        self.assertEqual(b.paths.status(a.node_id)["endpoint"][1], a.box.public_endpoint()[1])  # type: ignore
        self.assertIn(b.state(a), ("direct", "punched"))
        self.assertIn(a.state(b), ("direct", "punched"))

    def test_peer_restarts_elsewhere_without_telling(self) -> None:
        """``b`` restarts on a new port and registers anew (no push): ``a``'s unanswered pings find it."""
        w, a, b = start(PORT_RESTRICTED, PORT_RESTRICTED, push_endpoint_changes=False)
        pinger(w, a, b)
        w.run(5)
        b.restart()
        t = w.now()
        b.echo = True
        w.run(10)
        self.assertLess(echoes_after(a, t)[0] - t, DIRECT_SILENCE + DIRECT_TIMEOUT + PUNCH_TIMEOUT)
        self.assertEqual(a.paths.status(b.node_id)["endpoint"], b.box.public_endpoint())  # type: ignore
        self.assertEqual((a.state(b), b.state(a)), ("punched", "punched"))

    def test_peer_frames_from_a_new_address_switch_at_once(self) -> None:
        w, a, b = start(PUBLIC, FULL_CONE)
        pinger(w, b, a)  # b sends, a echoes
        w.run(3)
        self.assertEqual(a.state(b), "direct")  # b's PILA came before a acted on the command
        b.box.rebind()
        t = w.now()
        w.run(2)
        self.assertLess(echoes_after(b, t)[0] - t, 1.0 + 2 * LATENCY + 0.001)
        self.assertEqual(a.paths.status(b.node_id)["endpoint"], b.box.public_endpoint())  # type: ignore
        self.assertEqual(a.state(b), "direct")  # b's PILA came before a acted on the command

    def test_idle_relay_stops_punching(self) -> None:
        w, a, b = start(SYMMETRIC, SYMMETRIC)
        a.send(b, 1)
        w.run(RELAY_IDLE + 30)
        asked = a.paths.counters["punch_requests"], b.paths.counters["punch_requests"]
        w.run(300)
        self.assertEqual((a.paths.counters["punch_requests"], b.paths.counters["punch_requests"]), asked)
        a.send(b, 2)
        w.run(1)
        self.assertEqual(a.paths.counters["punch_requests"], asked[0] + 1)
        self.assertEqual(len(b.received(2)), 1)
