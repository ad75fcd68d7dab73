"""
Tests for pilot.machines.tunnel against replayed key exchanges (issue 12,
item 1): a PILA carries no freshness, so an old one replayed, from any
socket, directly or through the beacon, after any idle spell, must never
retire the session a peer is using nor move its endpoint; a genuine restart
must still re-key as fast as before.  Fake network and task.Clock from
tests.machines.test_tunnel; no sockets.
"""

from __future__ import annotations

from nacl.public import PrivateKey

from pilot.machines.tunnel import CANDIDATE_COPIES, CANDIDATES, RETIRED_KEYS, Endpoint
from pilot.machines.tunnel import peer as peer_module
from pilot.wire.beacon import RelayDeliver
from pilot.wire.tunnel import PILA, PILS, AuthKeyExchange, SealedFrame
from pilot.wire.tunnel_crypto import NonceSequence, TunnelSession, derive_key
from tests.machines.test_tunnel import (
    A_ADDR, ATTACKER, B_ADDR, BEACON, Base, Node, identity, packet, x25519,
)

MOVED: Endpoint = ("198.51.100.1", 4111)  # where a restarted A listens when its port changed


def run_secret(run: int) -> PrivateKey:
    """The X25519 key of A's ``run``-th earlier process."""
    return PrivateKey(bytes([0x5A, run % 256, run // 256]) + bytes(29))  # byte 0 is clamped


def old_pila(run: int) -> bytes:
    """A PILA of an earlier run of node 1: its real signature over an old X25519 key."""
    return AuthKeyExchange.build(1, bytes(run_secret(run).public_key), identity(1).public_key,
                                 identity(1).sign).encode()


class ReplayTests(Base):
    """An old PILA of A replayed to B while B holds a session with A."""

    def assertTunnelWorks(self, a: Node | None = None) -> None:
        a = a or self.a
        self.a.delivered.clear()
        self.b.delivered.clear()
        a.tunnels.send(packet(1, 2, seq=70), 2)
        self.b.tunnels.send(packet(2, 1, seq=80), 1)
        self.net.run()
        self.assertEqual([p.seq for p, _ in self.b.delivered], [70])
        self.assertEqual([p.seq for p, _ in a.delivered], [80])

    def assertSessionKept(self, endpoint: Endpoint = A_ADDR) -> None:
        counters = self.b.tunnels.counters
        self.assertGreaterEqual(counters["pila_candidate"], 1)
        self.assertNotIn("peer_rekeyed", counters)
        self.assertNotIn("candidate_promoted", counters)
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], endpoint)  # type: ignore[index]
        self.assertEqual(self.b.endpoints, [(1, A_ADDR)])
        self.assertTunnelWorks()
        # A's own PILA is still its key, not a stale one
        self.b.tunnels.frame_received(self.a.tunnels.key_exchange_frame(), A_ADDR)
        self.assertNotIn("pila_stale_key", counters)
        self.assertTunnelWorks()

    def replay_after(self, idle: float, source: Endpoint) -> None:
        self.establish()
        self.clock.advance(idle)
        self.b.tunnels.frame_received(old_pila(1), source)
        self.net.run()

    def test_after_6_s_idle_from_another_socket(self) -> None:
        self.replay_after(6, ATTACKER)
        self.assertSessionKept()

    def test_after_60_s_idle_from_another_socket(self) -> None:
        self.replay_after(60, ATTACKER)
        self.assertSessionKept()

    def test_after_6_s_idle_from_the_peers_own_endpoint(self) -> None:
        self.replay_after(6, A_ADDR)
        self.assertSessionKept()
        # the copies under the candidate reached A, which could not open them and delivered once
        self.assertGreaterEqual(self.a.tunnels.counters["pils_undecryptable"], 1)

    def test_after_60_s_idle_from_the_peers_own_endpoint(self) -> None:
        self.replay_after(60, A_ADDR)
        self.assertSessionKept()

    def test_while_busy_from_the_peers_own_endpoint(self) -> None:
        self.replay_after(1, A_ADDR)
        self.assertSessionKept()

    def test_through_the_beacon(self) -> None:
        """The off-path attack of issue 12: the old PILA relayed, naming A as its sender."""
        self.establish()
        self.clock.advance(60)
        self.net.in_flight.append((BEACON, B_ADDR, RelayDeliver(1, old_pila(1)).encode()))
        self.net.run()
        self.assertSessionKept()

    def test_through_the_beacon_to_a_relayed_peer(self) -> None:
        self.a.tunnels.set_path(2, None, relay=True)
        self.b.tunnels.set_path(1, None, relay=True)
        self.a.tunnels.send(packet(1, 2, seq=1), 2)
        self.net.run()
        self.clock.advance(60)
        self.net.in_flight.append((BEACON, B_ADDR, RelayDeliver(1, old_pila(1)).encode()))
        self.net.run()
        self.assertEqual(self.b.tunnels.counters["pila_candidate"], 1)
        self.assertNotIn("peer_rekeyed", self.b.tunnels.counters)
        self.assertEqual(self.b.tunnels.stats(1)["path"], "relay")  # type: ignore[index]
        self.a.delivered.clear()
        self.b.delivered.clear()
        self.a.tunnels.send(packet(1, 2, seq=70), 2)
        self.b.tunnels.send(packet(2, 1, seq=80), 1)
        self.net.run()
        self.assertEqual([p.seq for p, _ in self.b.delivered], [70])
        self.assertEqual([p.seq for p, _ in self.a.delivered], [80])

    def test_repeated_replays_keep_the_session_and_need_one_lookup(self) -> None:
        self.establish()
        for _ in range(50):
            self.clock.advance(7)
            self.b.tunnels.frame_received(old_pila(1), ATTACKER)
            self.net.run()
        self.assertEqual(self.b.lookups, [1, 1])  # A's first PILA, then the old one once
        self.assertEqual(len(self.b.tunnels._peers[1].candidates), 1)
        self.assertSessionKept()

    def test_what_goes_out_while_unconfirmed_is_bounded(self) -> None:
        """
        Packets go under the session by the peer's path; a copy under the candidate goes to
        where its PILA came from, CANDIDATE_COPIES per window; our PILA answers the replay
        within the answer budget.  Nothing else goes to the claimed endpoint.
        """
        self.replay_after(60, ATTACKER)
        for seq in range(100, 140):
            self.b.tunnels.send(packet(2, 1, seq=seq), 1)
        self.net.run()
        self.assertEqual([p.seq for p, _ in self.a.delivered], list(range(100, 140)))
        to_attacker = [data[:4] for src, dst, data in self.net.sent if src == B_ADDR and dst == ATTACKER]
        self.assertEqual(to_attacker.count(PILA), 1)
        self.assertEqual(to_attacker.count(PILS), CANDIDATE_COPIES)
        self.assertEqual(len(to_attacker), 1 + CANDIDATE_COPIES)
        self.assertEqual(self.b.tunnels.counters["candidate_copy"], CANDIDATE_COPIES)
        self.clock.advance(30)  # a new window: a few more
        self.b.tunnels.send(packet(2, 1, seq=200), 1)
        self.assertEqual(self.net.sent[-1][1], ATTACKER)

    def test_many_old_pilas_keep_candidates_bounded(self) -> None:
        self.establish()
        for run in range(1, 3 * CANDIDATES):
            self.clock.advance(1)
            self.b.tunnels.frame_received(old_pila(run), ATTACKER)
        self.net.run()
        self.assertEqual(len(self.b.tunnels._peers[1].candidates), CANDIDATES)
        self.assertEqual(self.b.tunnels.counters["candidate_dropped"], 3 * CANDIDATES - 1 - CANDIDATES)
        self.assertSessionKept()

    def test_forged_pils_under_a_candidate_proves_nothing(self) -> None:
        """A frame must decrypt under the candidate's key; the sender id alone is nothing."""
        self.replay_after(6, ATTACKER)
        nobody = derive_key(bytes(x25519(50)), bytes(x25519(2).public_key))
        forged = SealedFrame.seal(TunnelSession(nobody, NonceSequence(b"\x09" * 4)), 1, packet(1, 2, seq=66))
        self.b.tunnels.frame_received(forged.encode(), ATTACKER)
        self.assertEqual(self.b.tunnels.counters["pils_undecryptable"], 1)
        self.assertSessionKept()


class RetiredKeyTests(Base):
    """Keys of A's earlier runs, each proven in its time, replayed much later."""

    def restart_a(self, runs: int) -> Node:
        """A restarts ``runs`` times; each run talks to B, which re-keys after its first frame."""
        self.establish()
        a = self.a
        for run in range(1, runs + 1):
            del self.net.nodes[A_ADDR]
            a = Node(self.net, self.clock, 1, A_ADDR, self.keys, secret=run_secret(run))
            self.clock.advance(1)
            a.tunnels.send(packet(1, 2, seq=run), 2, B_ADDR)
            self.net.run()
        self.assertEqual(self.b.tunnels.counters["peer_rekeyed"], runs)
        self.assertEqual(self.b.tunnels.counters["candidate_promoted"], runs)
        return a

    def test_ninth_and_hundredth_oldest_refused(self) -> None:
        a = self.restart_a(101)  # runs 1..101; run 101 is the live one
        candidates = self.b.tunnels.counters["pila_candidate"]
        for run in (101 - 9, 101 - 100):
            self.clock.advance(60)
            self.b.tunnels.frame_received(old_pila(run), ATTACKER)
        self.assertEqual(self.b.tunnels.counters["pila_stale_key"], 2)
        self.assertEqual(self.b.tunnels.counters["pila_candidate"], candidates)
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], A_ADDR)  # type: ignore[index]
        a.tunnels.send(packet(1, 2, seq=500), 2)
        self.b.tunnels.send(packet(2, 1, seq=600), 1)
        self.net.run()
        self.assertEqual(self.b.delivered[-1][0].seq, 500)
        self.assertEqual([p.seq for p, _ in a.delivered], [600])

    def test_a_key_past_the_bound_only_offers_a_candidate(self) -> None:
        """Even once forgotten (the bound is RETIRED_KEYS), an old key cannot cut the tunnel."""
        self.patch(peer_module, "RETIRED_KEYS", 4)
        a = self.restart_a(10)
        self.assertEqual(len(self.b.tunnels._peers[1].retired_keys), 4)
        candidates = self.b.tunnels.counters["pila_candidate"]
        self.clock.advance(60)
        self.b.tunnels.frame_received(old_pila(2), ATTACKER)  # forgotten: runs 6..9 are remembered
        self.assertNotIn("pila_stale_key", self.b.tunnels.counters)
        self.assertEqual(self.b.tunnels.counters["pila_candidate"], candidates + 1)
        self.b.tunnels.frame_received(old_pila(7), ATTACKER)  # remembered
        self.assertEqual(self.b.tunnels.counters["pila_stale_key"], 1)
        self.assertEqual(self.b.tunnels.counters["peer_rekeyed"], 10)
        a.tunnels.send(packet(1, 2, seq=500), 2)
        self.b.tunnels.send(packet(2, 1, seq=600), 1)
        self.net.run()
        self.assertEqual(self.b.delivered[-1][0].seq, 500)
        self.assertEqual([p.seq for p, _ in a.delivered], [600])

    def test_bound(self) -> None:
        self.assertGreaterEqual(RETIRED_KEYS, 1024)
        self.restart_a(3)
        self.assertEqual(len(self.b.tunnels._peers[1].retired_keys), 3)


class RestartTests(Base):
    """A genuine restart of A still re-keys B as fast as before (no clock advance needed)."""

    def restart(self, idle: float, where: Endpoint) -> Node:
        self.establish()
        del self.net.nodes[A_ADDR]
        self.net.nodes.pop(where, None)
        restarted = Node(self.net, self.clock, 1, where, self.keys, secret=x25519(11))
        self.clock.advance(idle)
        return restarted

    def assertRekeyed(self, restarted: Node, where: Endpoint) -> None:
        self.assertEqual(self.b.tunnels.counters["candidate_promoted"], 1)
        self.assertEqual(self.b.tunnels.counters["peer_rekeyed"], 1)
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], where)  # type: ignore[index]
        self.assertEqual(self.b.tunnels._peers[1].candidates, {})
        restarted.delivered.clear()
        self.b.tunnels.send(packet(2, 1, seq=90), 1)
        self.net.run()
        self.assertEqual([p.seq for p, _ in restarted.delivered], [90])

    def restarted_speaks_first(self, idle: float, where: Endpoint) -> None:
        restarted = self.restart(idle, where)
        restarted.tunnels.send(packet(1, 2, seq=9, payload=b"back"), 2, B_ADDR)
        self.net.run()  # one exchange: its PILA, our answer, its packet (as before)
        self.assertEqual(self.b.delivered[-1][0].payload, b"back")
        self.assertRekeyed(restarted, where)

    def test_restarted_peer_speaks_first_after_6_s(self) -> None:
        self.restarted_speaks_first(6, A_ADDR)

    def test_restarted_peer_speaks_first_after_60_s_from_a_new_port(self) -> None:
        self.restarted_speaks_first(60, MOVED)

    def we_speak_first(self, idle: float, where: Endpoint) -> None:
        """
        B sends to the restarted A, which answers B's undecryptable frame with its PILA; B keeps
        the session but copies its next packet under the candidate, which A opens and answers:
        B's second packet gets through, as it did when B re-keyed at once.
        """
        restarted = self.restart(idle, where)
        self.b.tunnels.send(packet(2, 1, seq=1), 1)
        self.net.run()
        self.assertEqual(restarted.tunnels.counters["pils_no_session"], 1)
        self.assertGreaterEqual(self.b.tunnels.counters["pila_candidate"], 1)  # A's answer, and its repeat
        self.assertEqual(len(self.b.tunnels._peers[1].candidates), 1)
        self.b.tunnels.send(packet(2, 1, seq=2), 1)
        self.net.run()
        self.assertEqual([p.seq for p, _ in restarted.delivered], [2])
        restarted.tunnels.send(packet(1, 2, seq=3), 2)  # its answer proves the key
        self.net.run()
        self.assertEqual(self.b.delivered[-1][0].seq, 3)
        self.assertRekeyed(restarted, where)

    def test_we_speak_first_after_6_s(self) -> None:
        self.we_speak_first(6, A_ADDR)

    def test_we_speak_first_after_60_s(self) -> None:
        self.we_speak_first(60, A_ADDR)

    def test_restart_racing_a_replay(self) -> None:
        """A replayed old PILA between a restarted peer's PILA and its first frame changes nothing."""
        restarted = self.restart(60, MOVED)
        restarted.tunnels.send(packet(1, 2, seq=9), 2, B_ADDR)
        pila = self.net.in_flight.pop()
        self.net.arrive(*pila)  # B: a candidate, answered
        self.b.tunnels.frame_received(old_pila(1), ATTACKER)  # the attacker's, a second candidate
        self.net.run()
        self.assertEqual(self.b.delivered[-1][0].seq, 9)
        self.assertRekeyed(restarted, MOVED)

    def test_restart_candidate_pushed_out_by_replays_comes_back(self) -> None:
        """
        CANDIDATES old PILAs after the restarted peer's push its candidate out; its frames then
        fail to open, and each is answered with our PILA (within the answer budget), to which it
        answers with its own: its candidate is back and its next frame proves it.
        """
        restarted = self.restart(60, MOVED)
        restarted.tunnels.send(packet(1, 2, seq=9), 2, B_ADDR)
        pila = self.net.in_flight.pop()
        self.net.arrive(*pila)  # a candidate, answered; what the peer sends next is lost
        self.net.impair = lambda src, dst, data: [] if src == MOVED else [data]
        self.net.run()
        self.net.impair = lambda src, dst, data: [data]
        self.assertEqual(restarted.tunnels.state(2), "established")
        for run in range(1, CANDIDATES + 1):
            self.b.tunnels.frame_received(old_pila(run), ATTACKER)
        self.net.run()
        self.assertEqual(self.b.tunnels.counters["candidate_dropped"], 1)
        self.assertNotIn(9, [p.seq for p, _ in self.b.delivered])
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], A_ADDR)  # type: ignore[index]
        for seq in (10, 11, 12):
            self.clock.advance(1)
            restarted.tunnels.send(packet(1, 2, seq=seq), 2)
            self.net.run()
            if self.b.tunnels.counters["candidate_promoted"]:
                break
        self.assertRekeyed(restarted, MOVED)
        self.assertEqual(self.b.delivered[-1][0].seq, seq)


class ReferenceStyleTests(Base):
    """
    A peer that behaves like the reference (``docs/reference-wire.md`` §4.3): on every PILA
    it takes it derives a fresh state (new nonce prefix, counter from 1) and flushes its
    queue; its PILS carry no freshness beyond the counter.  Built here from the wire helpers.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ref_secret = run_secret(700)

    def ref_pila(self) -> bytes:
        return AuthKeyExchange.build(1, bytes(self.ref_secret.public_key), identity(1).public_key,
                                     identity(1).sign).encode()

    def ref_pils(self, seq: int, prefix: bytes) -> bytes:
        key = derive_key(bytes(self.ref_secret), bytes(x25519(2).public_key))
        return SealedFrame.seal(TunnelSession(key, NonceSequence(prefix)), 1, packet(1, 2, seq=seq)).encode()

    def test_reference_peer_restart_rekeys(self) -> None:
        self.establish()
        self.clock.advance(60)
        del self.net.nodes[A_ADDR]  # A restarts as a reference daemon with a new key
        self.b.tunnels.frame_received(self.ref_pila(), MOVED)
        self.assertEqual(self.net.sent[-1][1:], (MOVED, self.b.tunnels.key_exchange_frame()))
        self.b.tunnels.frame_received(self.ref_pils(1, b"\x01" * 4), MOVED)  # its queued packet
        self.assertEqual(self.b.delivered[-1][0].seq, 1)
        self.assertEqual(self.b.tunnels.counters["candidate_promoted"], 1)
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], MOVED)  # type: ignore[index]
        # it re-keys on each PILA of ours (new prefix, counter 1 again): still heard
        self.b.tunnels.frame_received(self.ref_pils(2, b"\x02" * 4), MOVED)
        self.assertEqual(self.b.delivered[-1][0].seq, 2)
        # and its PILA replayed later is the session's key: nothing changes
        self.clock.advance(60)
        self.b.tunnels.frame_received(self.ref_pila(), ATTACKER)
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], MOVED)  # type: ignore[index]
        self.assertEqual(self.b.tunnels.counters["peer_rekeyed"], 1)

    def test_reference_pils_replayed_under_a_candidate_is_refused_after_promotion(self) -> None:
        self.establish()
        del self.net.nodes[A_ADDR]
        self.b.tunnels.frame_received(self.ref_pila(), MOVED)
        first = self.ref_pils(1, b"\x01" * 4)
        self.b.tunnels.frame_received(first, MOVED)
        self.b.tunnels.frame_received(first, ATTACKER)
        self.assertEqual(self.b.tunnels.counters["pils_replayed"], 1)
        self.assertEqual(self.b.tunnels.stats(1)["endpoint"], MOVED)  # type: ignore[index]
