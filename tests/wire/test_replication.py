"""pilot.wire.replication: the stream's values, hostile frames, and store diffs."""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import MalformedFrame
from pilot.wire import replication as wire


def store(nodes: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    return {"next_node": 1, "next_net": 1, "nodes": nodes or {}, "networks": {}, **top}


class SubscribeTests(SynchronousTestCase):
    def test_reference_subscription_is_the_reference_shape(self) -> None:
        reference = {"type": "subscribe_replication", "token": "t"}
        self.assertEqual(wire.encode_subscribe(wire.Subscribe("t")), reference)
        self.assertEqual(wire.decode_subscribe(reference), wire.Subscribe("t"))

    def test_ours_round_trips(self) -> None:
        sub = wire.Subscribe("t", deltas=True, term=3, heartbeat=2.5, role="primary", port=9000)
        self.assertEqual(wire.decode_subscribe(wire.encode_subscribe(sub)), sub)

    def test_records_round_trip_with_deltas_only(self) -> None:
        sub = wire.Subscribe("t", deltas=True, term=3, heartbeat=2.5, port=9000, records=True)
        self.assertEqual(wire.encode_subscribe(sub)["records"], True)
        self.assertEqual(wire.decode_subscribe(wire.encode_subscribe(sub)), sub)
        self.assertFalse(wire.decode_subscribe({"token": "t", "records": True}).records)  # not without deltas
        self.assertNotIn("records", wire.encode_subscribe(wire.Subscribe("t", deltas=True)))

    def test_bad_fields_refused(self) -> None:
        for bad in ({"token": 5}, {"token": "x" * 5000}, {"token": "t", "term": -1}, {"token": "t", "term": True},
                    {"token": "t", "term": 2 ** 60}, {"token": "t", "heartbeat": "1"},
                    {"token": "t", "heartbeat": 1e9}, {"token": "t", "role": "boss"},
                    {"token": "t", "port": 70000}, {"token": "t", "term": 1.5}):
            self.assertRaises(MalformedFrame, wire.decode_subscribe, {"type": "subscribe_replication", **bad})

    def test_missing_token_is_empty(self) -> None:
        self.assertEqual(wire.decode_subscribe({"type": "subscribe_replication"}).token, "")


class FrameTests(SynchronousTestCase):
    def test_snapshot_bytes_are_the_reference_frame(self) -> None:
        body = wire.encode_snapshot_bytes(b'{"next_node":1}')
        self.assertEqual(body, b'{"type":"replication_snapshot","snapshot":{"next_node":1}}')
        self.assertEqual(json.loads(wire.encode_snapshot_bytes(b"{}", term=4, seq=9)),
                         {"type": "replication_snapshot", "term": 4, "seq": 9, "snapshot": {}})

    def test_decode_each_kind(self) -> None:
        self.assertEqual(wire.decode({"type": "replication_snapshot", "snapshot": store(), "term": 2, "seq": 5}),
                         wire.Snapshot(store(), 2, 5))
        self.assertEqual(wire.decode(wire.encode_delta(wire.Delta(6, {"gone": ["1"]}, 2))),
                         wire.Delta(6, {"gone": ["1"]}, 2))
        self.assertEqual(wire.decode(wire.encode_heartbeat(2, 6)), wire.Heartbeat(2, 6))
        self.assertEqual(wire.decode({"type": "heartbeat"}), wire.Heartbeat())
        self.assertEqual(wire.decode({"type": "subscribe_replication_ok", "seq": 1, "term": 2}), wire.Accepted(2))
        self.assertEqual(wire.decode({"type": "error", "error": "standby", "code": "not_primary",
                                      "primary": "h:1", "term": 3}),
                         wire.Refused("standby", "not_primary", "h:1", 3))

    def test_record_delta_round_trips(self) -> None:
        delta = wire.Delta(7, {}, 2, {"set": {"nodes": {"5": {"id": 5}}}, "drop": {"proven": [5]}},
                           {"pilot_journal_seq": 40})
        message = wire.encode_delta(delta)
        self.assertEqual(message, {"type": "replication_delta", "seq": 7, "term": 2, "record": delta.record,
                                   "scalars": {"pilot_journal_seq": 40}})
        self.assertEqual(wire.decode(json.loads(wire.encode_body(message))), delta)
        self.assertEqual(wire.decode({"type": "replication_delta", "seq": 8, "record": {}}),
                         wire.Delta(8, {}, record={}))

    def test_hostile_record_deltas_refused(self) -> None:
        for bad in ({"record": []}, {"record": {"set": []}}, {"record": {"replace": {}}},
                    {"record": {}, "scalars": []}, {"record": {}, "scalars": {"nodes": 1}},
                    {"record": {}, "scalars": {"pilot_term": -1}},
                    {"record": {}, "scalars": {"pilot_term": "1"}}):
            self.assertRaises(MalformedFrame, wire.decode, {"type": "replication_delta", "seq": 1, **bad})

    def test_hostile_frames_refused(self) -> None:
        for bad in ({"type": "replication_snapshot"}, {"type": "replication_snapshot", "snapshot": []},
                    {"type": "replication_snapshot", "snapshot": {"nodes": []}},
                    {"type": "replication_delta", "seq": 1},
                    {"type": "replication_delta", "seq": 1, "changes": []},
                    {"type": "replication_delta", "seq": 1, "changes": {"evil": {}}},
                    {"type": "replication_delta", "seq": 1, "changes": {"unset": ["nodes"]}},
                    {"type": "replication_delta", "seq": 1, "changes": {"set": {"nodes": {}}}},
                    {"type": "replication_delta", "seq": 1, "changes": {"gone": [1]}},
                    {"type": "replication_delta", "seq": -1, "changes": {}},
                    {"type": "heartbeat", "term": "1"}, {"type": "heartbeat", "seq": 2.5},
                    {"type": "error", "error": 5}, {"type": "register_ok"}, {}):
            self.assertRaises(MalformedFrame, wire.decode, bad)

    def test_ack(self) -> None:
        self.assertEqual(wire.decode_ack(wire.encode_ack(7)), wire.Ack(7))
        self.assertRaises(MalformedFrame, wire.decode_ack, {"type": "replication_ack", "seq": "7"})


class DiffTests(SynchronousTestCase):
    def test_equal_stores_have_no_diff(self) -> None:
        self.assertEqual(wire.diff(store({"1": {"id": 1}}), store({"1": {"id": 1}})), {})

    def test_diff_names_what_changed(self) -> None:
        old = store({"1": {"id": 1}, "2": {"id": 2}}, trust_pairs=["1:2"], pilot_term=1)
        new = store({"1": {"id": 1, "hostname": "a"}, "3": {"id": 3}}, pilot_term=2)
        self.assertEqual(wire.diff(old, new), {"nodes": {"1": {"id": 1, "hostname": "a"}, "3": {"id": 3}},
                                               "gone": ["2"], "set": {"pilot_term": 2}, "unset": ["trust_pairs"]})

    def test_apply_makes_the_new_store(self) -> None:
        rng = random.Random(14)
        for _ in range(200):
            old = self._random(rng)
            new = self._random(rng)
            changes = json.loads(json.dumps(wire.diff(old, new)))  # as it travels
            wire.decode(wire.encode_delta(wire.Delta(1, changes)))  # and is checked
            target = json.loads(json.dumps(old))
            wire.apply(target, changes)
            self.assertEqual(target, new)

    def _random(self, rng: random.Random) -> dict[str, Any]:
        nodes = {str(i): {"id": i, "hostname": rng.choice(["", "a", "b"])} for i in range(8) if rng.random() < 0.6}
        top: dict[str, Any] = {k: rng.randint(0, 2) for k in ("trust_pairs", "pilot_term") if rng.random() < 0.5}
        for name in ("pub_key_idx", "auth_ts"):
            if rng.random() < 0.7:
                top[name] = {f"k{i}": rng.randint(0, 2) for i in range(5) if rng.random() < 0.5}
        out = store(nodes, **top)
        out["networks"] = {"0": {"id": 0, "name": "backbone", "members": sorted(int(k) for k in nodes),
                                 "created": rng.choice(["t1", "t2"])}}
        return out

    def test_maps_travel_by_key(self) -> None:
        old = store(pub_key_idx={f"key{i}": i for i in range(1000)})
        new = store(pub_key_idx={**{f"key{i}": i for i in range(1, 1000)}, "fresh": 5})
        self.assertEqual(wire.diff(old, new), {"maps": {"pub_key_idx": {"set": {"fresh": 5}, "del": ["key0"]}}})

    def test_backbone_members_are_derived(self) -> None:
        def with_nodes(ids: list[int]) -> dict[str, Any]:
            out = store({str(i): {"id": i} for i in ids})
            out["networks"] = {"0": {"id": 0, "name": "backbone", "members": ids, "created": "t"}}
            return out
        changes = wire.diff(with_nodes(list(range(500))), with_nodes(list(range(501))))
        self.assertEqual(changes, {"nodes": {"500": {"id": 500}}})
        target = with_nodes(list(range(500)))
        wire.apply(target, changes)
        self.assertEqual(target, with_nodes(list(range(501))))

    def test_bad_maps_refused(self) -> None:
        for maps in ({"x": []}, {"x": {"put": {}}}, {"x": {"del": [1]}}, {"x": {"set": []}}, {"nodes": {}}):
            self.assertRaises(MalformedFrame, wire.decode,
                              {"type": "replication_delta", "seq": 1, "changes": {"maps": maps}})

    def test_body_has_no_size_cap(self) -> None:
        big = wire.encode_body({"type": "replication_delta", "seq": 1, "changes": {"set": {"x": "y" * (2 << 20)}}})
        self.assertGreater(len(big), 2 << 20)
