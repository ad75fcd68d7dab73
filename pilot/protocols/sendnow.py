# -*- test-case-name: tests.protocols.test_sendnow -*-
"""
Writing a reply in the reactor pass that read its request.

Twisted's ``FileDescriptor.write`` never sends: it queues the bytes, asks
the reactor to watch the socket for writability, and sends in the next
reactor pass (``doWrite``), which then stops the watching again.  For a
request/reply protocol with one request in flight (a node waiting for its
``lookup``) that is two more ``epoll_ctl`` calls, one more ``epoll_wait`` and
one more reactor pass per request, on the path the client waits on.

:func:`write_now` sends at once when the transport is a plain TCP
connection (``twisted.internet.tcp.Connection``, without ``startTLS``) with
nothing already queued, neither closing nor aborted, with one ``send`` on
the transport's socket (what its ``writeSomeData`` does).
Whatever the socket does not take, and every write to any other transport
(TLS, test transports) or behind queued bytes, goes through
``transport.write`` as before, so order, flow control (the producer is
paused by the queued bytes, as ever) and the reporting of a lost connection
(by the reactor, from ``doWrite``) stay Twisted's.
"""

from __future__ import annotations

import sys
from typing import Protocol

#: not imported here: ``twisted.internet.tcp`` loads pyOpenSSL when it can, which a rendezvous
#: without TLS avoids (``pilot.tap.install_reactor_without_tls``); a TCP transport means it is loaded
_TCP = "twisted.internet.tcp"


class Writable(Protocol):
    def write(self, data: bytes) -> None: ...


def write_now(transport: Writable, data: bytes) -> None:
    """Write ``data`` to ``transport``: sent now if the socket can take it, queued otherwise."""
    tcp = sys.modules.get(_TCP)
    if tcp is not None and isinstance(transport, tcp.Connection):
        try:
            idle = (transport.connected and not transport.disconnecting
                    and not transport._aborting and not transport.TLS and not transport._writeDisconnected
                    and not transport._tempDataLen and transport.offset == len(transport.dataBuffer))
        except AttributeError:  # another Twisted's private names: its own write, as before
            idle = False
        if idle:
            try:
                sent = transport.socket.send(data)  # what writeSomeData does, without its three calls
            except OSError:
                sent = 0  # full (EAGAIN, ENOBUFS) or broken: queued below, and doWrite finds out
            if sent >= len(data):
                return
            data = data[sent:]
    transport.write(data)
