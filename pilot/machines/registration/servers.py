# -*- test-case-name: tests.machines.test_registration_failover -*-
"""
The rendezvous servers a node may use, in the order it was given them
(``--registry a:9000,b:9000``), which one is in use, and the highest term
any of them has shown (``docs/registration.md``, "A list of servers").

Plain bookkeeping for the registry session: it screens every reply and
event (:meth:`Servers.screen`) and, after a failed session, says where to
go next and whether the whole list has failed (:meth:`Servers.failed`).
A server of a pair adds ``"term": N`` to everything it sends; a reply with a
lower term than one already seen comes from a stale server and is never
applied.  A standby refuses writes with ``code`` ``"not_primary"`` and
``primary`` ``"HOST:PORT"``: when that names one of our entries we go there
next, otherwise to the next entry; we never connect anywhere outside the list.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import attr

from pilot.endpoint import format_endpoint, parse_host_port
from pilot.errors import InvalidArgument

#: The most rendezvous servers one node may be given.
MAX_SERVERS = 8
#: Terms above this are not believed (a hostile server could otherwise lock every later one out).
MAX_TERM = 2 ** 53
#: While a standby refuses us (``not_primary``), the backoff window grows no larger (s):
#: it is alive and may be promoted any moment (issue 14: every node registered within
#: seconds of a promotion).
STANDBY_RETRY = 3.0
#: A ``primary`` field longer than this is not even parsed.
MAX_PRIMARY_TEXT = 300
NOT_PRIMARY = "not_primary"


def server_key(text: Any) -> Optional[str]:
    """``text`` as a normal ``host:port`` to compare entries by; None when it is not one."""
    if not isinstance(text, str) or not text or len(text) > MAX_PRIMARY_TEXT:
        return None
    try:
        host, port = parse_host_port(text)
    except InvalidArgument:
        return None
    return format_endpoint(host.lower(), port)


@attr.s(frozen=True, auto_attribs=True)
class Next:
    """What to do after a failed session: back off first (how long: ``standby``), or go at once."""

    back_off: bool
    #: a server answered in this round (a standby waiting for its promotion): a short wait
    standby: bool


@attr.s(auto_attribs=True, eq=False)
class Servers:
    """The configured entries, the one in use, the term seen, and where a redirect points."""

    names: tuple[str, ...]
    index: int = 0
    #: the highest term seen from any entry (0: none of them ever sent one)
    term: int = 0
    #: failures in the current round through the list; a full round means back off
    round_failures: int = 0
    #: where the last ``not_primary`` pointed (an index of ours), to be used by the next move
    redirect: Optional[int] = None
    #: times the session moved to another entry
    moves: int = 0

    def __attrs_post_init__(self) -> None:
        if not self.names:
            raise InvalidArgument("at least one rendezvous server is needed")
        if len(self.names) > MAX_SERVERS:
            raise InvalidArgument(f"{len(self.names)} rendezvous servers given; at most {MAX_SERVERS}")
        self._keys = [server_key(name) for name in self.names]
        #: the current entry's last failure was a standby's refusal (it answered)
        self._refused = False
        #: a server answered (refused) in this round
        self._answered = False
        #: entries that failed without an answer in this round
        self._dead: set[int] = set()

    @property
    def current(self) -> str:
        return self.names[self.index]

    def screen(self, message: Any) -> Optional[str]:
        """
        Why ``message`` (a reply, an error reply or an event) must not be
        applied, or None.  Records a higher term, and where a ``not_primary``
        refusal points.
        """
        if not isinstance(message, dict):
            return None
        if "term" in message:
            term = message["term"]
            if not isinstance(term, int) or isinstance(term, bool) or not 1 <= term <= MAX_TERM:
                return f"the rendezvous at {self.current} sent a malformed term {str(term)[:20]!r}"
            if term < self.term:
                return (f"the rendezvous at {self.current} is stale (term {term}, "
                        f"but term {self.term} was seen)")
            self.term = term
        if message.get("code") == NOT_PRIMARY:
            primary = message.get("primary")
            self.redirect = self._find(primary)
            self._refused = True
            shown = "".join(ch for ch in primary[:64] if ch.isprintable()) if isinstance(primary, str) else ""
            named = f"; the primary is {shown}" if shown else ""
            return f"the rendezvous at {self.current} is a standby{named}"
        return None

    def _find(self, primary: Any) -> Optional[int]:
        key = server_key(primary)
        if key is None:
            return None
        for i, known in enumerate(self._keys):
            if known == key and i != self.index:
                return i
        return None

    def failed(self) -> "Next":
        """
        The session on the current entry failed: choose the entry to try
        next, and whether to back off first (``docs/registration.md``, "A
        list of servers"):

        * to where a ``not_primary`` pointed, unless that entry failed
          without an answer in this round (a dead primary a standby still
          names);
        * else to the next entry not known dead in this round;
        * else, after a standby's refusal, to the same entry again (it is
          alive and may be promoted any moment), else round robin.

        Back off when the whole list has failed in this round, or when
        staying on a refusing standby; the wait is short (``standby``) when
        a server answered in this round.
        """
        n = len(self.names)
        refused, self._refused = self._refused, False
        redirect, self.redirect = self.redirect, None
        if refused:
            self._dead.discard(self.index)
            self._answered = True
        else:
            self._dead.add(self.index)
        if redirect is not None and redirect not in self._dead:
            target = redirect
        else:
            alive = [(self.index + k) % n for k in range(1, n) if (self.index + k) % n not in self._dead]
            target = alive[0] if alive else (self.index if refused else (self.index + 1) % n)
        if target != self.index:
            self.moves += 1
        stay = target == self.index and n > 1
        self.index = target
        self.round_failures += 1
        if self.round_failures < n and not stay:
            return Next(back_off=False, standby=False)
        answered = self._answered
        self.round_failures = 0
        self._answered = False
        self._dead.clear()  # the next round tries every entry again
        return Next(back_off=True, standby=answered)

    def succeeded(self) -> None:
        """Registered on the current entry: the next failure starts a new round."""
        self.round_failures = 0
        self.redirect = None
        self._refused = self._answered = False
        self._dead.clear()

    def status(self) -> dict[str, Any]:
        return {"server": self.current, "server_index": self.index, "servers": list(self.names),
                "term": self.term or None, "server_moves": self.moves}


def check_names(names: Sequence[str]) -> tuple[str, ...]:
    """The entries as given, checked (text, at most MAX_SERVERS); InvalidArgument otherwise."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise InvalidArgument("servers is a list of HOST:PORT texts")
    return tuple(names)
