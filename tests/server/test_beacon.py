"""
Tests for L{pilot.server.beacon}: the beacon's rules, driven against a real
L{pilot.server.registry.Registry} on a L{task.Clock}.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from pilot.identity import Identity
from pilot.server import beacon as beacon_module
from pilot.server.beacon import Beacon, BeaconConfig
from pilot.server.registry import Peer, Registry, RegistryConfig
from pilot.server.state import RegistryState
from pilot.wire.beacon import (
    Discover, DiscoverReply, PunchCommand, PunchRequest, Relay, RelayDeliver, Sync, decode, with_proof,
)
from pilot.wire.registry import legacy_challenge, sign_request

T0 = 1_700_000_000.0
# go-session-2: agent-a's tunnel at 24101, agent-b's at 24102 (docs/reference-wire.md §0, §3)
A_ADDR = ("127.0.0.1", 24101)
B_ADDR = ("127.0.0.1", 24102)
ATTACKER = ("192.0.2.66", 40000)
FRAME = b"PILS" + b"\x00\x00\x00\x01" + b"n" * 12 + b"c" * 40


def ident(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


class World:
    """A registry and a beacon on one clock, with helpers that act as nodes."""

    def __init__(self, config: BeaconConfig | None = None) -> None:
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.registry = Registry(self.clock,
                                 RegistryConfig(registrations_per_minute=0, requests_per_second=0))
        self.beacon = Beacon(self.registry, self.clock, config)
        self._nonces = itertools.count(1)

    @property
    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def nonce(self, size: int) -> bytes:
        return next(self._nonces).to_bytes(size, "big")

    def register(self, who: Identity, addr: tuple[str, int], proven: bool = False) -> int:
        """Register from ``addr``'s IP (TCP), announcing ``addr``'s port as the tunnel port."""
        msg: dict[str, Any] = {"type": "register", "public_key": who.public_key_b64,
                               "listen_addr": f"{addr[0]}:{addr[1]}"}
        if proven:
            msg = sign_request(msg, who.sign, self.now_ms, self.nonce(16))
        reply = self.registry.handle(msg, Peer(addr[0], 51000))
        assert reply["type"] == "register_ok", reply
        return int(reply["node_id"])

    def request(self, who: Identity, msg: dict[str, Any]) -> dict[str, Any]:
        """A signed request: replay-proof if the node is proven, else the reference's signature."""
        signer = msg.get("node_id")
        if signer in self.registry.state.proven:
            msg = sign_request(msg, who.sign, self.now_ms, self.nonce(16))
        else:
            challenge = legacy_challenge(msg)
            assert challenge is not None
            msg = {**msg, "signature": who.sign_b64(challenge)}
        reply = self.registry.handle(msg, Peer("127.0.0.1", 51000))
        assert not reply["type"] == "error", reply
        return reply

    def trust(self, who: Identity, node_id: int, peer_id: int) -> None:
        """``node_id`` reports that it trusts ``peer_id``."""
        self.request(who, {"type": "report_trust", "node_id": node_id, "peer_id": peer_id})

    def deregister(self, who: Identity, node_id: int) -> None:
        self.request(who, {"type": "deregister", "node_id": node_id})

    def proof(self, base: bytes, who: Identity, ts_ms: int | None = None,
              nonce: bytes | None = None) -> bytes:
        return with_proof(base, who.sign, self.now_ms if ts_ms is None else ts_ms,
                          self.nonce(8) if nonce is None else nonce)

    def send(self, data: bytes, addr: Any) -> list[tuple[bytes, tuple[str, int]]]:
        return self.beacon.datagram_received(data, addr)

    def discover(self, node_id: int, addr: Any, who: Identity | None = None,
                 ts_ms: int | None = None) -> list[Any]:
        base = Discover(node_id).encode()
        return self.send(self.proof(base, who, ts_ms) if who else base, addr)

    def count(self, name: str) -> int:
        return self.beacon.counters.get(name, 0)


def reply_to(addr: tuple[str, int]) -> list[tuple[bytes, tuple[str, int]]]:
    return [(DiscoverReply(*addr).encode(), addr)]


class DiscoverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.w = World()
        self.a, self.b = ident(1), ident(2)

    def test_vector_exchange(self) -> None:
        """go-session-2's beacon exchange, with our node ids, gives the captured bytes."""
        w = self.w
        a = w.register(self.a, A_ADDR)
        b = w.register(self.b, B_ADDR)
        self.assertEqual(w.discover(0, A_ADDR), [(bytes.fromhex("02047f0000015e25"), A_ADDR)])
        self.assertIsNone(w.beacon.endpoint_of(a))
        self.assertEqual(w.discover(a, A_ADDR), [(bytes.fromhex("02047f0000015e25"), A_ADDR)])
        self.assertEqual(w.discover(0, B_ADDR), [(bytes.fromhex("02047f0000015e26"), B_ADDR)])
        self.assertEqual(w.discover(b, B_ADDR), [(bytes.fromhex("02047f0000015e26"), B_ADDR)])
        self.assertEqual((w.beacon.endpoint_of(a), w.beacon.endpoint_of(b)), (A_ADDR, B_ADDR))
        w.trust(self.b, b, a)  # session 2: the handshake made the pair trusted
        out = w.send(PunchRequest(a, b).encode(), A_ADDR)
        # t=60.963: 04047f0000015e26 to node A, 04047f0000015e25 to node B
        self.assertEqual(out, [(bytes.fromhex("04047f0000015e26"), A_ADDR),
                               (bytes.fromhex("04047f0000015e25"), B_ADDR)])
        self.assertEqual((w.count("discover"), w.count("discover.recorded"), w.count("punch")), (4, 2, 1))

    def test_probe_answered_to_the_reported_address_itself(self) -> None:
        """The unsigned probe (the common datagram) is answered as its decoding would be, to the
        very address tuple the socket reported (``pilot.protocols.beacon`` relies on it)."""
        source = ("192.0.2.44", 4044)
        out = self.w.beacon.datagram_received(Discover(0).base, source)
        self.assertEqual(out, reply_to(source))
        self.assertIs(out[0][1], source)
        v6 = ("2001:db8::7", 7, 0, 0)
        self.assertEqual(self.w.beacon.datagram_received(Discover(0).base, v6),
                         [(DiscoverReply("2001:db8::7", 7).encode(), ("2001:db8::7", 7))])
        self.assertEqual(self.w.count("discover"), 2)

    def test_id_zero_records_nothing(self) -> None:
        self.assertEqual(self.w.discover(0, ATTACKER), reply_to(ATTACKER))
        self.assertEqual(len(self.w.beacon), 0)

    def test_unregistered_id_answered_not_recorded(self) -> None:
        self.assertEqual(self.w.discover(12345, ATTACKER), reply_to(ATTACKER))
        self.assertEqual(self.w.discover(12345, ATTACKER, self.a), reply_to(ATTACKER))
        self.assertEqual(len(self.w.beacon), 0)
        self.assertEqual(self.w.count("discover.unrecorded.unknown_node"), 2)

    def test_unsigned_discover_from_another_ip(self) -> None:
        w = self.w
        a = w.register(self.a, ("198.51.100.7", 4000))
        self.assertEqual(w.discover(a, ATTACKER), reply_to(ATTACKER))
        self.assertIsNone(w.beacon.endpoint_of(a))
        self.assertEqual(w.count("discover.unrecorded.unauthorized"), 1)
        self.assertEqual(w.beacon.last_refusal and w.beacon.last_refusal[0],
                         "discover.unrecorded.unauthorized")
        # the NAT may give the tunnel socket another port than the registry connection
        w.discover(a, ("198.51.100.7", 61000))
        self.assertEqual(w.beacon.endpoint_of(a), ("198.51.100.7", 61000))

    def test_unsigned_discover_for_proven_node(self) -> None:
        w = self.w
        a = w.register(self.a, ("198.51.100.7", 4000), proven=True)
        self.assertIn(a, w.registry.state.proven)
        w.discover(a, ("198.51.100.7", 4000), self.a)
        # another host behind the same NAT, unsigned: answered, not recorded
        self.assertEqual(w.discover(a, ("198.51.100.7", 5555)), reply_to(("198.51.100.7", 5555)))
        self.assertEqual(w.beacon.endpoint_of(a), ("198.51.100.7", 4000))
        self.assertEqual(w.count("discover.unrecorded.unauthorized"), 1)

    def test_proof_moves_a_proven_endpoint(self) -> None:
        w = self.w
        a = w.register(self.a, ("198.51.100.7", 4000), proven=True)
        self.assertEqual(w.discover(a, ATTACKER, self.a), reply_to(ATTACKER))  # roaming: any IP, with proof
        self.assertEqual(w.beacon.endpoint_of(a), ATTACKER)

    def test_replayed_proof(self) -> None:
        w = self.w
        a = w.register(self.a, A_ADDR, proven=True)
        datagram = w.proof(Discover(a).encode(), self.a)
        self.assertEqual(w.send(datagram, A_ADDR), reply_to(A_ADDR))
        self.assertEqual(w.send(datagram, ATTACKER), [])
        self.assertEqual(w.beacon.endpoint_of(a), A_ADDR)
        self.assertEqual(w.count("dropped.unauthorized"), 1)
        self.assertIn("replayed", w.beacon.last_refusal[1])  # type: ignore[index]

    def test_proof_replayed_after_a_restart(self) -> None:
        """
        A Discover proof captured before the registry restarts and replayed
        after it (the nonce memory is gone) is refused: its timestamp is not
        newer than the newest the store remembers for the key (issue 12).
        """
        w = self.w
        a = w.register(self.a, A_ADDR, proven=True)
        captured = w.proof(Discover(a).encode(), self.a)
        self.assertEqual(w.send(captured, A_ADDR), reply_to(A_ADDR))
        self.assertEqual(w.registry.state.auth_ts[a], w.now_ms)  # saved with the store
        punch_proof = w.proof(PunchRequest(a, a + 1).encode(), self.a)
        # the restart: a new registry and beacon over the store's content
        saved = RegistryState.from_json(json.loads(w.registry.state.to_bytes()))
        w.clock.advance(15)
        w.registry = Registry(w.clock, RegistryConfig(registrations_per_minute=0, requests_per_second=0),
                              saved)
        w.beacon = Beacon(w.registry, w.clock)
        w.beacon._record(a, A_ADDR)
        self.assertEqual(w.send(captured, ATTACKER), [])
        self.assertEqual(w.beacon.endpoint_of(a), A_ADDR)
        self.assertIn("restarted", w.beacon.last_refusal[1])  # type: ignore[index]
        self.assertEqual(w.send(punch_proof, ATTACKER), [])
        self.assertIn("restarted", w.beacon.last_refusal[1])  # type: ignore[index]
        # the node's own fresh proof is taken
        self.assertEqual(w.discover(a, ATTACKER, self.a), reply_to(ATTACKER))
        self.assertEqual(w.beacon.endpoint_of(a), ATTACKER)

    def test_accepted_proof_is_replay_state_to_save(self) -> None:
        touched: list[int] = []
        w = self.w
        a = w.register(self.a, A_ADDR, proven=True)
        w.registry.on_touch = lambda: touched.append(1)
        w.clock.advance(1)
        w.discover(a, A_ADDR, self.a)
        self.assertEqual((w.registry.state.auth_ts[a], len(touched)), (w.now_ms, 1))
        w.discover(a, A_ADDR, self.a, ts_ms=w.now_ms - 500)  # older than the newest: taken, not saved again
        self.assertEqual((w.registry.state.auth_ts[a], len(touched)), (w.now_ms, 1))

    def test_stale_and_future_proofs(self) -> None:
        w = self.w
        a = w.register(self.a, A_ADDR, proven=True)
        for skew in (-121.0, 121.0, -3600.0):
            data = w.proof(Discover(a).encode(), self.a, ts_ms=w.now_ms + int(skew * 1000))
            self.assertEqual(w.send(data, ATTACKER), [])
        self.assertEqual(w.count("dropped.unauthorized"), 3)
        data = w.proof(Discover(a).encode(), self.a, ts_ms=w.now_ms - 119_000)
        self.assertEqual(w.send(data, A_ADDR), reply_to(A_ADDR))
        self.assertEqual(w.beacon.endpoint_of(a), A_ADDR)

    def test_forged_proofs(self) -> None:
        w = self.w
        a = w.register(self.a, A_ADDR, proven=True)
        b = w.register(self.b, B_ADDR, proven=True)
        forged = w.proof(Discover(a).encode(), self.b)  # signed by the wrong key
        self.assertEqual(w.send(forged, ATTACKER), [])
        borrowed = bytearray(w.proof(Discover(b).encode(), self.b))  # B's proof, relabelled for A
        borrowed[1:5] = a.to_bytes(4, "big")
        self.assertEqual(w.send(bytes(borrowed), ATTACKER), [])
        flipped = bytearray(w.proof(Discover(a).encode(), self.a))
        flipped[-1] ^= 1
        self.assertEqual(w.send(bytes(flipped), ATTACKER), [])
        self.assertIsNone(w.beacon.endpoint_of(a))
        self.assertEqual(w.count("dropped.unauthorized"), 3)

    def test_unproven_node_may_sign(self) -> None:
        w = self.w
        a = w.register(self.a, ("198.51.100.7", 4000))
        w.discover(a, ATTACKER, self.a)
        self.assertEqual(w.beacon.endpoint_of(a), ATTACKER)

    def test_ipv6_and_mapped_sources(self) -> None:
        w = self.w
        a = w.register(self.a, A_ADDR)
        out = w.discover(0, ("2001:db8::5", 4000))
        reply = bytes.fromhex("0210" "20010db8000000000000000000000005" "0fa0")
        self.assertEqual(out, [(reply, ("2001:db8::5", 4000))])
        mapped = ("::ffff:127.0.0.1", 24101)
        self.assertEqual(w.discover(a, mapped), [(bytes.fromhex("02047f0000015e25"), mapped)])
        self.assertEqual(w.beacon.endpoint_of(a), mapped)
        self.assertEqual(w.discover(a, ("2001:db8::5", 4000, 0, 0)), reply_to(("2001:db8::5", 4000)))


class HeartbeatEndpointTests(SynchronousTestCase):
    """
    ``heartbeat_ok`` carries what the beacon holds for the node (``endpoint``,
    as the beacon's DiscoverReply shows it), and nothing when it holds none:
    the node proves its endpoint again only then (docs/registration.md).
    """

    def setUp(self) -> None:
        self.w = World()
        self.w.registry.beacon_endpoint = self.w.beacon.endpoint_text  # as the rendezvous wires it
        self.ia = ident(1)
        self.a = self.w.register(self.ia, A_ADDR, proven=True)

    def heartbeat(self) -> dict[str, Any]:
        return self.w.request(self.ia, {"type": "heartbeat", "node_id": self.a})

    def test_no_record_no_field(self) -> None:
        reply = self.heartbeat()
        self.assertEqual(reply, {"type": "heartbeat_ok", "time": int(T0)})
        self.assertIsNone(self.w.beacon.endpoint_text(self.a))

    def test_recorded_endpoint_in_the_reply(self) -> None:
        self.w.discover(self.a, ("198.51.100.7", 40001), self.ia)
        self.assertEqual(self.heartbeat(),
                         {"type": "heartbeat_ok", "time": int(T0), "endpoint": "198.51.100.7:40001"})
        self.w.discover(self.a, ("198.51.100.8", 40002), self.ia)  # moved, with a proof
        self.assertEqual(self.heartbeat()["endpoint"], "198.51.100.8:40002")

    def test_unrecorded_discover_changes_nothing(self) -> None:
        """An unsigned Discover (or a failed proof) does not move the endpoint the reply names."""
        self.w.discover(self.a, A_ADDR, self.ia)
        self.w.discover(self.a, ATTACKER)
        self.w.discover(self.a, ATTACKER, ident(9))
        self.assertEqual(self.heartbeat()["endpoint"], "127.0.0.1:24101")

    def test_as_the_discover_reply_shows_it(self) -> None:
        """IPv6 in brackets; an IPv4-mapped source as IPv4, as the DiscoverReply says it."""
        for source, text in ((("2001:db8::7", 4000, 0, 0), "[2001:db8::7]:4000"),
                             (("::ffff:198.51.100.9", 4001, 0, 0), "198.51.100.9:4001")):
            reply = self.w.discover(self.a, source, self.ia)
            shown = DiscoverReply.decode(reply[0][0])
            self.assertEqual(self.w.beacon.endpoint_text(self.a), text)
            self.assertEqual(text, f"[{shown.host}]:{shown.port}" if ":" in shown.host
                             else f"{shown.host}:{shown.port}")
            self.assertEqual(self.heartbeat()["endpoint"], text)

    def test_after_a_restart_no_field(self) -> None:
        """A restarted rendezvous's beacon holds no endpoint: the reply says none, the node proves it again."""
        self.w.discover(self.a, A_ADDR, self.ia)
        restarted = Beacon(self.w.registry, self.w.clock)
        self.w.registry.beacon_endpoint = restarted.endpoint_text
        self.assertNotIn("endpoint", self.heartbeat())

    def test_gone_node_no_field(self) -> None:
        self.w.discover(self.a, A_ADDR, self.ia)
        self.w.registry.remove(self.a)
        self.assertIsNone(self.w.beacon.endpoint_text(self.a))


class PunchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.w = World()
        self.ia, self.ib = ident(1), ident(2)
        self.a = self.w.register(self.ia, A_ADDR)
        self.b = self.w.register(self.ib, B_ADDR)
        self.w.discover(self.a, A_ADDR)
        self.w.discover(self.b, B_ADDR)

    def expected(self, r_addr: tuple[str, int], t_addr: tuple[str, int]) -> list[Any]:
        return [(PunchCommand(*t_addr).encode(), r_addr), (PunchCommand(*r_addr).encode(), t_addr)]

    def test_private_target_refused_until_it_trusts(self) -> None:
        w = self.w
        self.assertEqual(w.send(PunchRequest(self.a, self.b).encode(), A_ADDR), [])
        self.assertEqual(w.count("dropped.not_trusted"), 1)
        w.trust(self.ia, self.a, self.b)  # A trusting B lets B see A, not A see B
        self.assertEqual(w.send(PunchRequest(self.a, self.b).encode(), A_ADDR), [])
        self.assertEqual(w.send(PunchRequest(self.b, self.a).encode(), B_ADDR), self.expected(B_ADDR, A_ADDR))
        w.trust(self.ib, self.b, self.a)
        out = w.send(PunchRequest(self.a, self.b).encode(), A_ADDR)
        self.assertEqual(out, self.expected(A_ADDR, B_ADDR))
        self.assertEqual([decode(d) for d, _ in out],
                         [PunchCommand("127.0.0.1", 24102), PunchCommand("127.0.0.1", 24101)])

    def test_public_target(self) -> None:
        self.w.request(self.ib, {"type": "set_visibility", "node_id": self.b, "public": True})
        self.assertEqual(self.w.send(PunchRequest(self.a, self.b).encode(), A_ADDR),
                         self.expected(A_ADDR, B_ADDR))

    def test_unsigned_from_another_address(self) -> None:
        w = self.w
        w.request(self.ib, {"type": "set_visibility", "node_id": self.b, "public": True})
        for source in (ATTACKER, ("127.0.0.1", 9999)):
            self.assertEqual(w.send(PunchRequest(self.a, self.b).encode(), source), [])
        self.assertEqual(w.count("dropped.unauthorized"), 2)
        self.assertEqual(w.beacon.endpoint_of(self.a), A_ADDR)

    def test_with_proof_moves_the_requester(self) -> None:
        w = self.w
        w.trust(self.ib, self.b, self.a)
        moved = ("203.0.113.9", 7000)
        out = w.send(w.proof(PunchRequest(self.a, self.b).encode(), self.ia), moved)
        self.assertEqual(out, self.expected(moved, B_ADDR))
        self.assertEqual(w.beacon.endpoint_of(self.a), moved)

    def test_proven_requester_needs_proof(self) -> None:
        w = self.w
        c_ident = ident(3)
        c = w.register(c_ident, ("127.0.0.1", 24103), proven=True)
        w.discover(c, ("127.0.0.1", 24103), c_ident)
        w.trust(self.ib, self.b, c)
        self.assertEqual(w.send(PunchRequest(c, self.b).encode(), ("127.0.0.1", 24103)), [])
        self.assertEqual(w.count("dropped.unauthorized"), 1)
        out = w.send(w.proof(PunchRequest(c, self.b).encode(), c_ident), ("127.0.0.1", 24103))
        self.assertEqual(out, self.expected(("127.0.0.1", 24103), B_ADDR))
        forged = w.proof(PunchRequest(c, self.b).encode(), self.ia)
        self.assertEqual(w.send(forged, ("127.0.0.1", 24103)), [])
        self.assertEqual(w.count("dropped.unauthorized"), 2)

    def test_unknown_nodes_and_missing_endpoints(self) -> None:
        w = self.w
        w.request(self.ib, {"type": "set_visibility", "node_id": self.b, "public": True})
        self.assertEqual(w.send(PunchRequest(999, self.b).encode(), A_ADDR), [])
        self.assertEqual(w.send(PunchRequest(self.a, 999).encode(), A_ADDR), [])
        self.assertEqual(w.count("dropped.unknown_node"), 2)
        c_ident = ident(3)
        c = w.register(c_ident, ("127.0.0.1", 24103))
        w.request(c_ident, {"type": "set_visibility", "node_id": c, "public": True})
        self.assertEqual(w.send(PunchRequest(self.a, c).encode(), A_ADDR), [])
        self.assertEqual(w.count("dropped.no_endpoint"), 1)
        self.assertEqual(w.send(PunchRequest(self.a, self.a).encode(), A_ADDR), [])
        self.assertEqual(w.count("dropped.invalid"), 1)
        self.assertEqual(w.count("punch"), 0)


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.w = World()
        self.ia, self.ib = ident(1), ident(2)
        self.a = self.w.register(self.ia, A_ADDR)
        self.b = self.w.register(self.ib, B_ADDR)
        self.w.discover(self.a, A_ADDR)
        self.w.discover(self.b, B_ADDR)

    def relay(self, sender: int, dest: int, source: tuple[str, int]) -> list[Any]:
        return self.w.send(Relay(sender, dest, FRAME).encode(), source)

    def test_allowed_both_ways_once_trusted(self) -> None:
        w = self.w
        self.assertEqual(self.relay(self.a, self.b, A_ADDR), [])
        self.assertEqual(w.count("dropped.not_trusted"), 1)
        w.trust(self.ib, self.b, self.a)
        w.trust(self.ia, self.a, self.b)
        self.assertEqual(self.relay(self.a, self.b, A_ADDR), [(RelayDeliver(self.a, FRAME).encode(), B_ADDR)])
        self.assertEqual(self.relay(self.b, self.a, B_ADDR), [(RelayDeliver(self.b, FRAME).encode(), A_ADDR)])
        self.assertEqual((w.count("relayed"), w.count("relay_bytes")), (2, 2 * len(FRAME)))

    def test_one_sided_trust_grants_no_relay(self) -> None:
        """A node's own report_trust for a victim gives it no relay into the victim, nor out of it."""
        w = self.w
        w.trust(self.ia, self.a, self.b)  # A says it trusts B; B never said so of A
        self.assertEqual(self.relay(self.a, self.b, A_ADDR), [])
        self.assertEqual(self.relay(self.b, self.a, B_ADDR), [])
        self.assertEqual(w.count("dropped.not_trusted"), 2)
        self.assertEqual(w.count("relayed"), 0)

    def test_public_destination_still_relays_for_a_trusted_sender(self) -> None:
        w = self.w
        w.request(self.ib, {"type": "set_visibility", "node_id": self.b, "public": True})
        self.assertEqual(self.relay(self.a, self.b, A_ADDR), [])  # A is private and does not trust B
        w.trust(self.ia, self.a, self.b)
        self.assertEqual(self.relay(self.a, self.b, A_ADDR), [(RelayDeliver(self.a, FRAME).encode(), B_ADDR)])

    def test_spoofed_source(self) -> None:
        w = self.w
        w.trust(self.ib, self.b, self.a)
        for source in (ATTACKER, ("127.0.0.1", 9999), B_ADDR):
            self.assertEqual(self.relay(self.a, self.b, source), [])
        self.assertEqual(w.count("dropped.unauthorized"), 3)

    def test_unregistered_sender_and_destination(self) -> None:
        w = self.w
        w.request(self.ib, {"type": "set_visibility", "node_id": self.b, "public": True})
        self.assertEqual(self.relay(999, self.b, ATTACKER), [])
        self.assertEqual(self.relay(0, self.b, ATTACKER), [])
        self.assertEqual(self.relay(self.a, 999, A_ADDR), [])
        self.assertEqual(w.count("dropped.unknown_node"), 3)
        self.assertEqual(self.relay(self.a, self.a, A_ADDR), [])
        self.assertEqual(w.count("dropped.invalid"), 1)

    def test_destination_without_endpoint(self) -> None:
        w = self.w
        c_ident = ident(3)
        c = w.register(c_ident, ("127.0.0.1", 24103))
        w.trust(c_ident, c, self.a)
        self.assertEqual(self.relay(self.a, c, A_ADDR), [])
        self.assertEqual(w.count("dropped.no_endpoint"), 1)

    def test_deregistered_destination(self) -> None:
        w = self.w
        w.trust(self.ib, self.b, self.a)
        w.deregister(self.ib, self.b)
        self.assertEqual(self.relay(self.a, self.b, A_ADDR), [])
        self.assertEqual(w.count("dropped.unknown_node"), 1)
        self.assertEqual(len(w.beacon), 1)  # B's entry went when met

    def test_relay_budget(self) -> None:
        w = World(BeaconConfig(relay_bytes_per_second=100, relay_burst_bytes=250))
        a = w.register(self.ia, A_ADDR)
        b = w.register(self.ib, B_ADDR)
        w.discover(a, A_ADDR)
        w.discover(b, B_ADDR)
        w.trust(self.ib, b, a)
        w.trust(self.ia, a, b)
        frame = b"x" * 100
        sent = [len(w.send(Relay(a, b, frame).encode(), A_ADDR)) for _ in range(3)]
        self.assertEqual(sent, [1, 1, 0])
        self.assertEqual(w.count("dropped.relay_budget"), 1)
        self.assertEqual(len(w.send(Relay(b, a, frame).encode(), B_ADDR)), 1)  # per sender
        w.clock.advance(1)
        self.assertEqual(len(w.send(Relay(a, b, frame).encode(), A_ADDR)), 1)


class LimitTests(SynchronousTestCase):
    def test_per_source_ip(self) -> None:
        w = World(BeaconConfig(datagrams_per_second=1, burst=3))
        answered = [len(w.discover(0, ("192.0.2.1", 1000 + i))) for i in range(4)]
        self.assertEqual(answered, [1, 1, 1, 0])
        self.assertEqual(w.count("dropped.rate_limited"), 1)
        self.assertEqual(len(w.discover(0, ("192.0.2.2", 1000))), 1)
        self.assertEqual(w.send(b"garbage", ("192.0.2.1", 1)), [])
        self.assertEqual(w.count("dropped.rate_limited"), 2)  # counted before decoding
        w.clock.advance(1)
        self.assertEqual(len(w.discover(0, ("192.0.2.1", 1000))), 1)

    def test_ipv6_sources_share_their_64(self) -> None:
        w = World(BeaconConfig(datagrams_per_second=1, burst=2))
        answered = [len(w.discover(0, (f"2001:db8:0:1::{i}", 1000))) for i in range(1, 4)]
        self.assertEqual(answered, [1, 1, 0])
        self.assertEqual(len(w.discover(0, ("2001:db8:0:2::1", 1000))), 1)

    def test_zero_disables(self) -> None:
        w = World(BeaconConfig(datagrams_per_second=0, relay_bytes_per_second=0))
        self.assertTrue(all(w.discover(0, ATTACKER) for _ in range(5000)))
        a = w.register(ident(1), A_ADDR)
        b = w.register(ident(2), B_ADDR)
        w.discover(a, A_ADDR)
        w.discover(b, B_ADDR)
        w.trust(ident(2), b, a)
        w.trust(ident(1), a, b)
        frame = b"x" * 60000
        self.assertTrue(all(w.send(Relay(a, b, frame).encode(), A_ADDR) for _ in range(200)))


class TableTests(SynchronousTestCase):
    def test_prune(self) -> None:
        w = World()
        ids = [w.register(ident(n), ("127.0.0.1", 24100 + n)) for n in (1, 2, 3)]
        for n, node_id in zip((1, 2, 3), ids):
            w.discover(node_id, ("127.0.0.1", 24100 + n))
        self.assertEqual(len(w.beacon), 3)
        w.deregister(ident(2), ids[1])
        self.assertEqual(w.beacon.prune(), [ids[1]])
        self.assertEqual(len(w.beacon), 2)
        self.assertEqual(w.count("pruned"), 1)
        w.clock.advance(w.registry.config.stale_after + 1)
        w.registry.reap()
        self.assertEqual(sorted(w.beacon.prune()), sorted([ids[0], ids[2]]))
        self.assertEqual(len(w.beacon), 0)

    def test_endpoint_of_drops_unregistered(self) -> None:
        w = World()
        a = w.register(ident(1), A_ADDR)
        w.discover(a, A_ADDR)
        self.assertEqual(w.beacon.endpoint_of(a), A_ADDR)
        w.deregister(ident(1), a)
        self.assertIsNone(w.beacon.endpoint_of(a))
        self.assertEqual(len(w.beacon), 0)
        self.assertIsNone(w.beacon.endpoint_of(0))

    def test_cap(self) -> None:
        w = World(BeaconConfig(max_endpoints=2))
        ids = [w.register(ident(n), ("127.0.0.1", 24100 + n)) for n in (1, 2, 3)]
        for n, node_id in zip((1, 2, 3), ids):
            w.discover(node_id, ("127.0.0.1", 24100 + n))
        w.discover(ids[1], ("127.0.0.1", 24102))  # refreshed: now the most recent
        self.assertEqual(len(w.beacon), 2)
        self.assertIsNone(w.beacon.endpoint_of(ids[0]))
        w.discover(ids[0], ("127.0.0.1", 24101))
        self.assertEqual([w.beacon.endpoint_of(i) is not None for i in ids], [True, True, False])
        self.assertEqual(w.count("evicted"), 2)


class InputTests(SynchronousTestCase):
    def test_other_types(self) -> None:
        w = World()
        self.assertEqual(w.send(Sync(7, (1, 2, 3)).encode(), ("192.0.2.9", 9001)), [])
        self.assertEqual(w.count("sync"), 1)
        for msg in (DiscoverReply("203.0.113.4", 5), PunchCommand("203.0.113.4", 5), RelayDeliver(1, b"x")):
            self.assertEqual(w.send(msg.encode(), ATTACKER), [])
        self.assertEqual(w.count("dropped.unexpected"), 3)
        self.assertEqual(w.send(b"\x01\x00", ATTACKER), [])
        self.assertEqual(w.count("dropped.malformed"), 1)
        self.assertEqual(w.beacon.last_refusal and w.beacon.last_refusal[0], "dropped.malformed")
        self.assertEqual(w.count("received"), 5)

    def test_bad_source_addresses(self) -> None:
        w = World()
        for addr in [("example.com", 1), ("203.0.113.4", 0), ("203.0.113.4", 70000), ("203.0.113.4", "80"),
                     ("203.0.113.4", True), (), ("203.0.113.4",), None, "203.0.113.4:5", (b"203.0.113.4", 5)]:
            self.assertEqual(w.send(Discover(0).encode(), addr), [])
        self.assertEqual(w.count("dropped.malformed"), 10)

    def test_bad_source_refused_again(self) -> None:
        # the host memo remembers a bad host as bad, and forgets everything once full
        self.patch(beacon_module, "MEMO_LIMIT", 2)
        w = World()
        for _ in range(3):
            self.assertEqual(w.send(Discover(0).encode(), ("example.com", 1)), [])
        for n in range(1, 6):
            host = f"203.0.113.{n}"
            self.assertEqual(w.send(Discover(0).encode(), (host, 7)),
                             [(DiscoverReply(host, 7).encode(), (host, 7))])
        self.assertEqual(w.send(Discover(0).encode(), ("example.com", 1)), [])
        self.assertEqual(w.count("dropped.malformed"), 4)
        self.assertLessEqual(len(w.beacon._hosts), 2)
        self.assertLessEqual(len(w.beacon._replies), 2)

    def test_ipv4_fast_path_is_the_slow_one(self) -> None:
        # a source the memo has not met (a fleet past MEMO_LIMIT) gets the reply and the rate-limit key
        # the ipaddress path gives; only a canonical dotted IPv4 takes the C path
        self.patch(beacon_module, "MEMO_LIMIT", 1)
        for host in ["0.0.0.0", "1.2.3.4", "127.0.0.1", "203.0.113.255", "255.255.255.255"]:
            self.assertEqual(beacon_module._ipv4(host), bytes(int(x) for x in host.split(".")))
            self.assertEqual(beacon_module._ip_key(host), host)
            for port in (1, 4000, 65535):
                w = World()
                self.assertEqual(w.send(Discover(0).encode(), (host, port)),
                                 [(DiscoverReply(host, port).encode(), (host, port))])
        for host in ["01.2.3.4", "1.2.3", "::ffff:1.2.3.4", "::1", "1.2.3.4 ", "1.2.3.4\x00", "example.com",
                     ""]:
            self.assertIsNone(beacon_module._ipv4(host))
        w = World()
        self.assertEqual(w.send(Discover(0).encode(), ("01.2.3.4", 5)), [])
        self.assertEqual(w.count("dropped.malformed"), 1)

    def test_replies_follow_the_source(self) -> None:
        # a remembered reply is the one for that very endpoint (host and port)
        w = World()
        for addr in [("203.0.113.4", 5), ("203.0.113.4", 6), ("203.0.113.4", 5), ("::1", 5),
                     ("::ffff:1.2.3.4", 9)]:
            self.assertEqual(w.send(Discover(0).encode(), addr), [(DiscoverReply(*addr).encode(), addr)])

    def test_never_raises(self) -> None:
        w = World(BeaconConfig(datagrams_per_second=0))
        keys = [ident(n) for n in (1, 2, 3)]
        ids = [w.register(k, ("127.0.0.1", 24100 + n), proven=n == 3) for n, k in enumerate(keys)]
        w.trust(keys[0], ids[0], ids[1])
        rng = random.Random(86)
        pool = ids + [0, 1, 999, 0xFFFFFFFF]
        sources = [("127.0.0.1", 24100), ("127.0.0.1", 24101), ("127.0.0.1", 24102), ATTACKER, ("::1", 5)]
        for i in range(3000):
            choice = i % 5
            if choice == 0:
                data = bytes([rng.randrange(0, 9)]) + rng.randbytes(rng.randrange(0, 100))
            elif choice == 1:
                data = Discover(rng.choice(pool)).encode()
            elif choice == 2:
                data = w.proof(PunchRequest(rng.choice(pool), rng.choice(pool)).encode(), rng.choice(keys))
            elif choice == 3:
                data = Relay(rng.choice(pool), rng.choice(pool), rng.randbytes(rng.randrange(1, 64))).encode()
            else:
                data = w.proof(Discover(rng.choice(pool)).encode(), rng.choice(keys))
            out = w.send(data, rng.choice(sources))
            for payload, addr in out:
                decode(payload)
                self.assertIsInstance(addr, tuple)
            if i % 500 == 0:
                w.beacon.prune()
        self.assertEqual(w.count("received"), 3000)
