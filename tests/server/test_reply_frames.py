"""
Tests for L{pilot.server.registry.ReplyFrames}: the kept ``lookup`` and
``resolve_hostname`` frames that L{Registry.answer} sends are always the
frame the request's reply encodes to now, whatever changed the node.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.server.registry import ReplyFrames
from pilot.wire.registry import encode_frame
from tests.server.test_registry import OTHER_PEER, PEER, Pair, Peer, World, ident, rotation


class ReplyFramesTests(SynchronousTestCase):
    def setUp(self) -> None:
        p = Pair()
        self.world, self.alice, self.bob, self.a, self.b = p.world, p.alice, p.bob, p.a, p.b
        self.registry = self.world.registry

    def answer(self, msg: dict[str, Any]) -> bytes:
        return self.registry.answer(dict(msg), PEER)

    def fresh(self, msg: dict[str, Any]) -> bytes:
        """The frame of the reply built anew (nothing kept)."""
        self.registry.frames = ReplyFrames()
        return encode_frame(self.registry.handle(dict(msg), PEER))

    def check(self, msg: dict[str, Any]) -> bytes:
        got = self.answer(msg)
        self.assertEqual(got, self.fresh(msg), msg)
        return got

    def legacy(self, who: Any, msg: dict[str, Any]) -> dict[str, Any]:
        reply = self.world.send(self.world.legacy(who, msg))
        self.assertEqual(reply["type"], msg["type"] + "_ok", reply)
        return reply

    def test_kept_and_reused(self) -> None:
        """The second lookup of an unchanged node is the kept frame; every request is still counted."""
        msg = {"type": "lookup", "node_id": self.b}
        first = self.check(msg)
        kept = self.registry.frames.lookups[self.b][3]
        self.assertEqual(self.answer(msg), first)
        self.assertIs(self.answer(msg), kept)
        self.assertEqual(self.registry.counters["request.lookup"], 4)
        self.assertEqual(self.registry.durations.counts["lookup"][-1] + sum(
            self.registry.durations.counts["lookup"][:-1]), 4)

    def test_every_change_shows(self) -> None:
        """Visibility, hostname, tags, task_exec, a new endpoint and a new key all show at once."""
        lookup = {"type": "lookup", "node_id": self.b}
        self.check(lookup)
        steps = [
            lambda: self.legacy(self.bob, {"type": "set_visibility", "node_id": self.b, "public": True}),
            lambda: self.legacy(self.bob, {"type": "set_hostname", "node_id": self.b, "hostname": "bob"}),
            lambda: self.legacy(self.bob, {"type": "set_tags", "node_id": self.b, "tags": ["demo"]}),
            lambda: self.legacy(self.bob, {"type": "set_task_exec", "node_id": self.b, "enabled": True}),
            lambda: self.world.register(self.bob, Peer("192.0.2.5", 1), listen="0.0.0.0:4999"),
            lambda: self.legacy(self.bob, {"type": "set_tags", "node_id": self.b, "tags": []}),
        ]
        seen = {self.answer(lookup)}
        for step in steps:
            step()
            seen.add(self.check(lookup))
        self.assertEqual(len(seen), len(steps) + 1)  # each step changed the frame
        self.assertIn(b'"real_addr":"192.0.2.5:4999"', self.answer(lookup))

    def test_rotated_key(self) -> None:
        lookup = {"type": "lookup", "node_id": self.a}
        self.check(lookup)
        new = ident(9)
        self.legacy(self.alice, rotation(self.a, self.alice, new))
        self.assertIn(new.public_key_b64.encode(), self.check(lookup))

    def test_gone_and_back(self) -> None:
        """A deregistered node is not found; registered again (a new Node) it is answered anew."""
        lookup = {"type": "lookup", "node_id": self.b}
        name = {"type": "resolve_hostname", "hostname": "bob"}
        self.legacy(self.bob, {"type": "set_hostname", "node_id": self.b, "hostname": "bob"})
        self.check(lookup)
        self.check(name)
        self.legacy(self.bob, {"type": "deregister", "node_id": self.b})
        self.assertIn(b'"code":"not_found"', self.answer(lookup))
        self.assertIn(b'"code":"not_found"', self.answer(name))
        self.world.register(self.bob, OTHER_PEER, listen="0.0.0.0:4002")
        self.assertIn(b'"code":"not_found"', self.check(name))  # the hostname left with the node
        self.check(lookup)

    def test_hostname_moves(self) -> None:
        """A name given up and taken by another node resolves to the new holder."""
        name = {"type": "resolve_hostname", "hostname": "shared"}
        self.legacy(self.bob, {"type": "set_hostname", "node_id": self.b, "hostname": "shared"})
        self.assertIn(f'"node_id":{self.b},'.encode(), self.check(name))
        self.legacy(self.bob, {"type": "set_visibility", "node_id": self.b, "public": True})
        self.assertIn(b'"public":true', self.check(name))
        self.legacy(self.bob, {"type": "set_hostname", "node_id": self.b, "hostname": "other"})
        self.assertIn(b'"code":"not_found"', self.check(name))
        self.legacy(self.alice, {"type": "set_hostname", "node_id": self.a, "hostname": "shared"})
        self.assertIn(f'"node_id":{self.a},'.encode(), self.check(name))

    def test_random_changes(self) -> None:
        """Random changes to a few nodes, each followed by every lookup and name: always the fresh frame."""
        rng = random.Random(16)
        world = World()
        registry = world.registry
        who = [ident(20 + i) for i in range(4)]
        ids = [world.join(w, Peer(f"192.0.2.{i + 1}", 1000)) for i, w in enumerate(who)]

        def signed(i: int, msg: dict[str, Any]) -> None:
            world.send(world.legacy(who[i], msg))
        for _ in range(200):
            i = rng.randrange(4)
            choice = rng.randrange(6)
            if choice == 0:
                signed(i, {"type": "set_hostname", "node_id": ids[i], "hostname": rng.choice(["", "x", "y", "z"])})
            elif choice == 1:
                signed(i, {"type": "set_visibility", "node_id": ids[i], "public": rng.random() < 0.5})
            elif choice == 2:
                signed(i, {"type": "set_tags", "node_id": ids[i], "tags": rng.sample(["a", "b", "c"], rng.randrange(3))})
            elif choice == 3:
                world.register(who[i], Peer(f"192.0.2.{rng.randrange(1, 4)}", 1000),
                               listen=f"0.0.0.0:{rng.randrange(4000, 4003)}")
            elif choice == 4:
                signed(i, {"type": "deregister", "node_id": ids[i]})
            else:
                world.advance(rng.random())
            for msg in [{"type": "lookup", "node_id": n} for n in ids] + \
                       [{"type": "resolve_hostname", "hostname": h} for h in ("x", "y", "z")]:
                got = registry.answer(dict(msg), PEER)
                kept = registry.frames
                registry.frames = ReplyFrames()
                self.assertEqual(got, encode_frame(registry.handle(dict(msg), PEER)), msg)
                registry.frames = kept

    def test_full_is_forgotten(self) -> None:
        self.patch(ReplyFrames, "MAX_ENTRIES", 1)
        self.check({"type": "lookup", "node_id": self.a})
        self.answer({"type": "lookup", "node_id": self.b})
        self.assertEqual(list(self.registry.frames.lookups), [self.b])

    def test_paired_server_not_kept(self) -> None:
        """A paired server's replies carry the term: nothing is kept, every reply is built."""
        class Stamp:
            def stamp(self, message: dict[str, Any]) -> dict[str, Any]:
                message["term"] = 3
                return message

            def refusal(self, kind: object) -> None:
                return None
        self.registry.replica = Stamp()  # type: ignore[assignment]
        self.registry.frames = ReplyFrames()
        for _ in range(2):
            self.assertIn(b'"term":3', self.answer({"type": "lookup", "node_id": self.b}))
        self.assertEqual(self.registry.frames.lookups, {})
