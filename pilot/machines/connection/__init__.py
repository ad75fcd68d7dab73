# -*- test-case-name: tests.machines.test_connection -*-
"""
One stream connection over the v0.5 packet header, as one machine: the
public :class:`Connection` (:mod:`.stream`), its lifecycle machine
(:mod:`.machine`), the data path its states share (:mod:`.transfer`), its
constants (:mod:`.config`), and the data-transfer arithmetic
(:mod:`.sendbuffer`, :mod:`.recvbuffer`, :mod:`.rtt`, :mod:`.sequence`).
``docs/connection.md`` describes it.
"""

from pilot.machines.connection.config import ConnectionConfig
from pilot.machines.connection.machine import transitions
from pilot.machines.connection.sequence import SEQ_MASK, unwrap, wire
from pilot.machines.connection.stream import REFERENCE_STATE, Connection, ConnectionStats
from pilot.machines.connection.transfer import ConnectionInputs

__all__ = [
    "Connection", "ConnectionConfig", "ConnectionInputs", "ConnectionStats", "REFERENCE_STATE",
    "SEQ_MASK", "transitions", "unwrap", "wire",
]
