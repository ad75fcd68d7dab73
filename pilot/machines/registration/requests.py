# -*- test-case-name: tests.machines.test_registration -*-
"""
Requests on a registry connection: signed with our key (timestamp and
nonce, ``docs/registration.md``), each with a timeout, and every failure
turned into a :class:`~pilot.errors.PilotError` so the registry session
decides on one kind of error.  Knows nothing of the session's states.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import (
    CancelledError, Deferred, TimeoutError as DeferredTimeout, fail, maybeDeferred,
)
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from pilot.errors import Internal, PilotError, RegistryUnavailable
from pilot.identity import Identity
from pilot.machines.registration.values import RegistryClient, Reply, reason
from pilot.wire.registry import NONCE_LEN, sign_request

#: The attribute of a PilotError that holds the error reply it was made from
#: (``pilot.protocols.registry_client.reply_error`` sets it): its ``term`` and
#: ``primary`` fields matter to the session.
REPLY_ATTRIBUTE = "registry_reply"


class Outbox:
    """
    Sends requests with a timeout and remembers which are still out on
    which connection, so that closing a connection leaves no timer behind.
    """

    def __init__(self, identity: Identity, clock: IReactorTime, random_bytes: Callable[[int], bytes],
                 timeout: float, screen: Callable[[Reply], Optional[str]] = lambda reply: None) -> None:
        self.identity = identity
        self.screen = screen
        self.clock = clock
        self.random_bytes = random_bytes
        self.timeout = timeout
        self._inflight: list[tuple[RegistryClient, "Deferred[Reply]"]] = []

    def sign(self, msg: dict[str, Any]) -> dict[str, Any]:
        """``msg`` with our signature, timestamp and nonce."""
        ts_ms = int(round(self.clock.seconds() * 1000))
        return sign_request(msg, self.identity.sign, ts_ms, self.random_bytes(NONCE_LEN))

    def send(self, msg: dict[str, Any], client: Optional[RegistryClient],
             timeout: Optional[float] = None) -> "Deferred[Reply]":
        """
        Send on ``client`` with a timeout.  Fails with a PilotError only:
        RegistryUnavailable for no connection, a lost one, no answer in
        time, or a reply ``screen`` refuses (a stale server's, a standby's
        ``not_primary``: the session must move); the reply's error otherwise.
        """
        kind = str(msg.get("type"))
        if client is None:
            return fail(RegistryUnavailable(f"cannot send {kind}: not connected to the registry"))
        limit = self.timeout if timeout is None else timeout
        d: Deferred[Reply] = maybeDeferred(client.request, msg)
        d.addTimeout(limit, self.clock)
        entry = (client, d)
        self._inflight.append(entry)

        def settled(result: Any) -> Any:
            if entry in self._inflight:
                self._inflight.remove(entry)
            return result

        def screened(reply: Any) -> Any:
            why = self.screen(reply)
            if why is not None:
                raise RegistryUnavailable(why)
            return reply

        def normalise(failure: Failure) -> Failure:
            refused = getattr(failure.value, REPLY_ATTRIBUTE, None)
            if isinstance(refused, dict):
                why = self.screen(refused)
                if why is not None:
                    return Failure(RegistryUnavailable(why))
            if failure.check(DeferredTimeout):
                return Failure(RegistryUnavailable(
                    f"the registry did not answer {kind} within {limit:g} s; the connection is dead"))
            if failure.check(CancelledError):
                return Failure(RegistryUnavailable(f"{kind} abandoned: the registry connection was closed"))
            if failure.check(PilotError):
                return failure
            return Failure(Internal(f"registry request {kind} failed: {reason(failure)}"))

        d.addBoth(settled)
        d.addCallbacks(screened, normalise)
        return d

    def abandon(self, client: RegistryClient) -> None:
        """Cancel what is still outstanding on ``client`` (closed by us): no timer outlives it."""
        for entry in [e for e in self._inflight if e[0] is client]:
            entry[1].cancel()
