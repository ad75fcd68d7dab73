# -*- test-case-name: tests.test_stack -*-
"""
The node's transport layer, above the tunnel and below the node service
(``docs/stack.md``).

* :mod:`pilot.stack.demux`: :class:`Stack`, the demultiplexer, the trust
  gate, datagrams, the control-port ping, and the API.
* :mod:`pilot.stack.streams`: the connection table, :class:`StreamTable` of
  :class:`Stream` entries, to which each connection's transport reports.
* :mod:`pilot.stack.transport`: :class:`StreamTransport` (``ITransport`` over
  one connection) and :class:`PilotAddress`.
* :mod:`pilot.stack.ports`: limits, ephemeral ports, :class:`Listening`.
* :mod:`pilot.stack.services`: the echo service (port 7) and the ping client.
"""

from pilot.stack.demux import CONN_LIST_FIELDS, Stack
from pilot.stack.ports import MAX_DATAGRAM, EphemeralPorts, Listening
from pilot.stack.streams import Stream, StreamTable
from pilot.stack.transport import PilotAddress, StreamTransport

__all__ = [
    "CONN_LIST_FIELDS", "MAX_DATAGRAM", "EphemeralPorts", "Listening", "PilotAddress", "Stack",
    "Stream", "StreamTable", "StreamTransport",
]
