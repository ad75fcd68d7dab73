# -*- test-case-name: tests.services.test_replication -*-
"""
The settings of a rendezvous pair (``docs/deploy.md``), apart from
:mod:`pilot.services.replication`: a rendezvous without a pair builds its
settings from these and never imports the replication service (nor its
state machine), which a restart's first answer does not wait for
(``docs/performance.md``, issue 16).
"""

from __future__ import annotations

import attr

from pilot.server.pair_defaults import READ_DEADLINE, SYNC_TIMEOUT

#: Seconds between a failed or lost subscription and the next attempt (the reference's).
RECONNECT_DELAY = 3.0
TAKEOVER_AFTER = 10.0


@attr.s(auto_attribs=True, frozen=True)
class ReplicationSettings:
    #: The shared replication token (from a file or PILOT_REPLICATION_TOKEN; never a flag).
    token: bytes | None = None
    #: ``HOST:PORT`` of the primary this server is a standby of.
    standby_of: str | None = None
    takeover_after: float = TAKEOVER_AFTER
    #: Acknowledge a registration, hostname or trust change once a standby holds it.
    sync: bool = False
    sync_timeout: float = SYNC_TIMEOUT
    reconnect_delay: float = RECONNECT_DELAY
    read_deadline: float = READ_DEADLINE
    #: Subscribe over TLS, pinning the primary's certificate by this SHA-256 (hex).
    primary_fingerprint: str | None = None

    @property
    def paired(self) -> bool:
        return self.token is not None or self.standby_of is not None
