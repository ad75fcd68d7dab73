# -*- test-case-name: tests.server.test_applier -*-
"""
A store journal's record applied to a live :class:`RegistryState` (a
standby of ours following its primary, ``docs/deploy.md``): what
:func:`pilot.server.journal.apply_record` does to a store's JSON, done to the
state itself, costing what the record holds, not the store's size.

After :func:`apply_to_state` the state answers as if the store with the
record replayed had been loaded whole (``RegistryState.from_json``): the same
nodes, keys, replay state, trust and queues, and the indexes the loader
rebuilds (``hostnames``, ``id_keys``, a node's key in ``key_index``) kept
right for what changed.  One difference, in stores no registry of ours
writes: where several keys of ``pub_key_idx`` name one node id that has no
node, the loader keeps the last of them in ``id_keys``, this keeps the one it
had (or the record's).

The record is checked first, whole, by the store's own loader (its values
made into a small state of their own); only then is the state changed, in
place (the containers a journal tracks are never replaced, so the store's
writer of the standby records the same changes, not a snapshot).  A record
that does not load raises (``ValueError`` and the loader's other errors) and
leaves the state as it was.
"""

from __future__ import annotations

from typing import Any

from pilot.identity import b64decode
from pilot.server.fields import checked_id, id_text
from pilot.server.journal import LISTS, MAPS, JournalError
from pilot.server.state import RegistryState

#: the store's objects whose keys are node ids (``pub_key_idx``'s are keys, in base64)
_BY_ID = tuple(name for name in MAPS if name != "pub_key_idx")


def _parts(record: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    out = []
    for part, names, kind in (("set", MAPS, dict), ("del", MAPS, list), ("add", LISTS, list),
                              ("drop", LISTS, list)):
        sections = record.get(part, {})
        if not isinstance(sections, dict) or not set(sections) <= set(names):
            raise JournalError(f"{part!r} is not an object of {', '.join(names)}")
        for name, items in sections.items():
            if not isinstance(items, kind):
                raise JournalError(f"{part}.{name} is not a {kind.__name__}")
        out.append(sections)
    return tuple(out)


def apply_to_state(state: RegistryState, record: dict[str, Any]) -> set[int]:
    """
    Apply ``record`` (a journal record's ``set``/``del``/``add``/``drop``) to
    ``state`` in place; the node ids whose ``auth_ts`` it set or removed (a
    registry's replay floor follows them).
    """
    sets, dels, adds, drops = _parts(record)
    # checked, whole, before anything changes: by the loader, as a store of their own
    got = RegistryState.from_json({"nodes": sets.get("nodes", {})})
    rest = RegistryState.from_json({**{k: v for k, v in sets.items() if k != "nodes"}, **adds})
    dropped = RegistryState.from_json(drops)
    gone_ids = {name: [checked_id(id_text(t, f"del.{name}"), f"del.{name}") for t in dels.get(name, ())]
                for name in _BY_ID}
    gone_keys = [b64decode(t, 32, "del.pub_key_idx") for t in dels.get("pub_key_idx", ())]

    touched: set[int] = set()  # ids whose id_keys entry may change
    keys, id_keys = state.key_index, state.id_keys
    unindexed = []
    for key in gone_keys:
        holder = keys.pop(key, None)
        state.drop_key_text(key)
        if holder is not None:
            touched.add(holder)
            unindexed.append((key, holder))
    for key, node_id in rest.key_index.items():
        holder = keys.get(key)
        if holder is not None:
            touched.add(holder)
        keys[key] = node_id
        touched.add(node_id)

    nodes, hostnames = state.nodes, state.hostnames
    for node_id in gone_ids["nodes"] + list(got.nodes):
        old = nodes.get(node_id)
        if old is not None and old.hostname and hostnames.get(old.hostname) == node_id:
            del hostnames[old.hostname]
    for node_id in gone_ids["nodes"]:
        if nodes.pop(node_id, None) is not None:
            touched.add(node_id)
    for node_id, node in got.nodes.items():
        nodes[node_id] = node
        if keys.get(node.public_key) is None:
            keys[node.public_key] = node_id  # as the loader's index rebuild does
        touched.add(node_id)
    for key, holder in unindexed:  # a key its node still has stays indexed, as after the loader's rebuild
        kept = nodes.get(holder)
        if kept is not None and kept.public_key == key and keys.get(key) is None:
            keys[key] = holder
    for node in sorted(got.nodes.values(), key=lambda n: n.id):
        name = node.hostname
        holder = hostnames.get(name) if name else None
        if holder is None or holder == node.id:
            if name:
                hostnames[name] = node.id
        elif node.id < holder:  # a damaged store: the lowest id keeps the name, as the loader's rule
            nodes[holder].hostname = ""
            hostnames[name] = node.id
        else:
            node.hostname = ""

    by_id = {node_id: key for key, node_id in rest.key_index.items()}
    for node_id in touched:
        held = nodes.get(node_id)
        if held is not None:
            id_keys[node_id] = held.public_key
            continue
        had = id_keys.get(node_id)
        if had is not None and keys.get(had) == node_id:
            continue
        given = by_id.get(node_id)
        if given is not None and keys.get(given) == node_id:
            id_keys[node_id] = given
        else:
            id_keys.pop(node_id, None)

    maps: tuple[tuple[str, dict[int, Any], dict[int, Any]], ...] = (
        ("auth_ts", state.auth_ts, rest.auth_ts), ("keys_gone", state.gone, rest.gone),
        ("handshake_inbox", state.inbox, rest.inbox),
        ("handshake_responses", state.responses, rest.responses),
        ("trust_statements", state.statements, rest.statements))
    for name, mine, theirs in maps:
        for node_id in gone_ids[name]:
            mine.pop(node_id, None)
        mine.update(theirs)
    lists: tuple[tuple[set[Any], set[Any], set[Any]], ...] = (
        (state.trust, dropped.trust, rest.trust), (state.proven, dropped.proven, rest.proven),
        (state.asked, dropped.asked, rest.asked))
    for items, out, into in lists:
        items.difference_update(out)
        items.update(into)
    return set(gone_ids["auth_ts"]) | set(rest.auth_ts)
