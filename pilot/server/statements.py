# -*- test-case-name: tests.server.test_statements -*-
"""
Ours: keeping each node's signed trust statements (``docs/trust.md``,
"Trust carried by the key"), so that a node that lost its trust store but
kept its key gets its trust back.

``put_trust_statements`` (signed by ``node_id``, our ``auth`` form only: the
reference has no challenge for it) deposits up to :data:`MAX_PER_REQUEST`
statements; each must decode, be the node's own (its id and its registered
key) with a good signature, and name another node.  Per (node, peer) only
the statement with the highest ``seq`` is kept, so an old grant replayed
after a revoke changes nothing.  A node keeps at most
:data:`MAX_PER_NODE` peers' statements.

``get_trust_statements`` (signed by ``node_id``) returns the node's
statements made under its current key; nobody else may read them.

The registry can withhold statements but not forge or widen them: the node
checks its own signature on each before restoring anything.  Statements
outlive the node's registration (a deregistered or reaped node comes back
for them); they are persisted as ``trust_statements``, an extra key a
reference registry ignores (``pilot.server.state``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pilot.errors import ErrorCode, MalformedFrame
from pilot.server.requests import Message, Peer, RequestError, Session
from pilot.wire.registry import get_int
from pilot.wire.statement import MAX_PER_REQUEST, MAX_STATEMENT, TrustStatement, decode

if TYPE_CHECKING:
    from pilot.server.registry import Registry

__all__ = ["MAX_PER_NODE", "MAX_PER_REQUEST", "HANDLERS"]

MAX_PER_NODE = 1024


def _statement_texts(msg: Message) -> list[str]:
    texts = msg.get("statements")
    if not isinstance(texts, list):
        raise RequestError(ErrorCode.invalid_argument, "'statements' must be a list")
    if len(texts) > MAX_PER_REQUEST:
        raise RequestError(ErrorCode.invalid_argument,
                           f"at most {MAX_PER_REQUEST} statements a request, not {len(texts)}")
    if not all(isinstance(t, str) and len(t) <= MAX_STATEMENT for t in texts):
        raise RequestError(ErrorCode.invalid_argument,
                           f"each statement is text of at most {MAX_STATEMENT} characters")
    return texts


def put_trust_statements(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node = registry.need(get_int(msg, "node_id"))
    if "auth" not in msg:
        raise RequestError(ErrorCode.unauthorized, "put_trust_statements needs an 'auth' signature")
    registry.authenticate(msg, node)
    statements: list[TrustStatement] = []
    for i, text in enumerate(_statement_texts(msg)):
        try:
            s = decode(text)
        except MalformedFrame as e:
            raise RequestError(ErrorCode.invalid_argument, f"statement {i}: {e.reason}") from None
        if not s.is_by(node.id, node.public_key):
            raise RequestError(ErrorCode.unauthorized,
                               f"statement {i} is not signed by node {node.id} with its registered key")
        statements.append(s)
    kept = registry.state.statements.setdefault(node.id, {})
    new_peers = {s.peer for s in statements} - set(kept)
    if len(kept) + len(new_peers) > MAX_PER_NODE:
        if not kept:
            del registry.state.statements[node.id]
        raise RequestError(ErrorCode.rate_limited,
                           f"a node keeps statements about at most {MAX_PER_NODE} peers")
    stored = stale = 0
    for s in statements:
        old = kept.get(s.peer)
        if old is not None and old.seq >= s.seq and old.granter_key == s.granter_key:
            stale += 1  # an older (or the same) statement: the newest wins
            continue
        kept[s.peer] = s
        stored += 1
    if not kept:
        del registry.state.statements[node.id]
    if stored:
        registry.on_change()
    return {"type": "put_trust_statements_ok", "stored": stored, "stale": stale}


def get_trust_statements(registry: Registry, msg: Message, peer: Peer, session: Session | None) -> Message:
    node = registry.need(get_int(msg, "node_id"))
    if "auth" not in msg:
        raise RequestError(ErrorCode.unauthorized, "get_trust_statements needs an 'auth' signature")
    registry.authenticate(msg, node)
    kept = registry.state.statements.get(node.id, {})
    mine = [s.encode() for _, s in sorted(kept.items()) if s.granter_key == node.public_key]
    return {"type": "get_trust_statements_ok", "node_id": node.id, "statements": mine}


HANDLERS = {f.__name__: f for f in (put_trust_statements, get_trust_statements)}
