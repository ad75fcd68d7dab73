# -*- test-case-name: tests.machines.test_connection -*-
"""
One stream connection over the v0.5 packet header, as one machine: the
public :class:`Connection` (:mod:`.stream`), its lifecycle machine
(:mod:`.machine`), the data path its states share (:mod:`.transfer`), its
constants (:mod:`.config`), and the data-transfer arithmetic
(:mod:`.sendbuffer`, :mod:`.recvbuffer`, :mod:`.rtt`, :mod:`.sequence`).
``docs/connection.md`` describes it.
"""

from typing import TYPE_CHECKING, Any

from pilot.machines.connection.config import ConnectionConfig
from pilot.machines.connection.sequence import SEQ_MASK, unwrap, wire

if TYPE_CHECKING:
    from pilot.machines.connection.machine import transitions
    from pilot.machines.connection.stream import REFERENCE_STATE, Connection, ConnectionStats
    from pilot.machines.connection.transfer import ConnectionInputs

#: The machine and its data path, imported with the first connection (``pilot.stack`` asks for
#: ``Connection`` when it opens one): about 0.4 MB that an idle node daemon does without, and
#: 30-50 ms of CPU at import (docs/performance.md, issue 11).  ``config`` and ``sequence`` above
#: load at start: the stack's constants.
_FIRST_CONNECTION = {"transitions": "machine", "REFERENCE_STATE": "stream", "Connection": "stream",
                     "ConnectionStats": "stream", "ConnectionInputs": "transfer"}


def __getattr__(name: str) -> Any:
    module = _FIRST_CONNECTION.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once: later lookups are the module's own
    return value


__all__ = [
    "Connection", "ConnectionConfig", "ConnectionInputs", "ConnectionStats", "REFERENCE_STATE",
    "SEQ_MASK", "transitions", "unwrap", "wire",
]
