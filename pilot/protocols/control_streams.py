# -*- test-case-name: tests.protocols.test_control_server -*-
"""
The control socket's requests that change what a connection carries
(``docs/control.md``): ``connect`` and ``attach`` make it a raw byte stream
joined to a Pilot stream (:class:`~pilot.protocols.bridge.StreamBridge`, flow
control both ways), ``listen`` and ``recv`` a stream of event frames
(:class:`~pilot.protocols.subscription.Subscription`).

:class:`StreamModes` is that part of
:class:`~pilot.protocols.control_server.ControlProtocol`; the request
handling, the reply order and the command mode's writes stay there.
"""

from __future__ import annotations

import base64
from typing import Any, Callable, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import implementer

from pilot.errors import NotFound
from pilot.nodeapi import Listening, NodeAPI
from pilot.protocols.bridge import IStreamRelay, Pauser, StreamBridge, Throttle
from pilot.protocols.sendnow import write_now
from pilot.protocols.subscription import AcceptFactory, IEventWriter, Subscription
from pilot.wire.control import Arguments
from pilot.wire.registry import FrameDecoder

#: What a control connection carries.
COMMAND, RAW, CLOSED = "command", "raw", "closed"


class Slot:
    """One request's place in the reply order."""

    def __init__(self, request_id: int | None, cmd: str) -> None:
        self.request_id = request_id
        self.cmd = cmd
        self.frame: bytes | None = None
        self.succeeded = False
        self.on_ok: Callable[[], None] | None = None
        self.on_error: Callable[[], None] | None = None


@implementer(IStreamRelay)
class StreamModes:
    """
    ``connect``, ``attach``, ``listen`` and ``recv`` for a control
    connection, and the raw mode's relay (:class:`~pilot.protocols.bridge.IStreamRelay`).
    """

    log = Logger()
    # the connection's state, kept by ControlProtocol
    factory: Any
    api: NodeAPI
    transport: Any
    _mode: str
    _decoder: FrameDecoder
    _pauser: Pauser | None
    _awaiting_stream: bool
    _pending_bridge: StreamBridge | None
    _bridge: StreamBridge | None
    _subscriptions: list[Subscription]
    _read_closed: bool
    _broken: bool
    _close: Callable[[], None]
    #: raw mode: bytes from the Pilot stream in this reactor pass, and the call that sends them at its end
    _raw_out: list[bytes]
    _raw_send: IDelayedCall | None

    def _connect(self, slot: Slot, args: Arguments) -> Deferred[Any]:
        target, port = args.target(), args.port()
        first = args.integer("first", 0, 0xFFFFFFFF, default=0)  # bytes of the stream behind the request
        bridge = StreamBridge()
        self._begin_stream(slot, bridge)
        if first:
            slot.on_error = lambda: self._first_bytes_dropped(bridge)
        try:
            return self.api.connect(target, port, bridge)
        except BaseException:
            self._stream_failed(bridge)
            raise

    def _attach(self, slot: Slot, args: Arguments) -> Deferred[Any]:
        conn_id = args.integer("conn_id", 0, 0xFFFFFFFF)
        bridge = self.factory.streams.take(conn_id)
        if bridge is None:
            raise NotFound(f"no accepted stream {conn_id} is waiting",
                           f"attach within {self.factory.attach_window:g} s of the accepted event, once")
        self._begin_stream(slot, bridge)
        return succeed({"conn_id": conn_id, "from": bridge.peer, "port": bridge.peer_port})

    def _begin_stream(self, slot: Slot, bridge: StreamBridge) -> None:
        self._awaiting_stream = True
        self._pending_bridge = bridge
        if self._pauser is not None:
            self._pauser.pause("stream")
        slot.on_ok = lambda: self._enter_raw(bridge)
        slot.on_error = lambda: self._stream_failed(bridge)

    def _first_bytes_dropped(self, bridge: StreamBridge) -> None:
        """A ``connect`` with ``first`` bytes behind it failed: drop them, close after the error reply."""
        self._stream_failed(bridge)
        self._decoder.take_rest()
        self._broken = True
        self._close()

    def _stream_failed(self, bridge: StreamBridge) -> None:
        bridge.close()
        if self._pending_bridge is bridge:
            self._pending_bridge = None
        self._awaiting_stream = False
        if self._pauser is not None:
            self._pauser.resume("stream")

    def _enter_raw(self, bridge: StreamBridge) -> None:
        self._mode = RAW
        self._pending_bridge = None
        self._bridge = bridge
        self._awaiting_stream = False
        self.transport.unregisterProducer()
        self.transport.registerProducer(Throttle(bridge.pause, bridge.resume), True)
        if self._pauser is not None:
            for reason in ("stream", "inflight", "writes"):
                self._pauser.resume(reason)
        rest = self._decoder.take_rest()
        if rest:
            bridge.write(rest)
        if self._read_closed:
            bridge.close()
        bridge.attach(self)

    def _listen(self, slot: Slot, args: Arguments) -> Deferred[Any]:
        port = args.port()
        subscription = self._subscribe(slot)
        d = self.api.listen(port, AcceptFactory(self.factory.streams, subscription, port))
        return d.addCallback(self._bound, subscription, port)

    def _recv(self, slot: Slot, args: Arguments) -> Deferred[Any]:
        port = args.port()
        subscription = self._subscribe(slot)

        def received(meta: dict[str, Any], data: bytes) -> None:
            try:
                event = {"event": "datagram", "from": meta.get("from"), "src_port": meta.get("src_port"),
                         "data": base64.b64encode(data).decode("ascii")}
                subscription.send(event, droppable=True)
            except Exception:
                self.log.failure("cannot deliver a datagram to a control client")

        return self.api.bind_datagrams(port, received).addCallback(self._bound, subscription, port)

    def _subscribe(self, slot: Slot) -> Subscription:
        subscription = Subscription(cast(IEventWriter, self))
        self._subscriptions.append(subscription)
        slot.on_ok = subscription.go_live

        def failed() -> None:
            subscription.close()
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)

        slot.on_error = failed
        return subscription

    def _bound(self, listening: Listening, subscription: Subscription, port: int) -> dict[str, Any]:
        if subscription.closed or self._mode == CLOSED:
            listening.close()
        else:
            subscription.listening = listening
        return {"port": port}

    # raw mode, from the bridge

    def stream_data(self, data: bytes) -> None:
        """
        Bytes from the Pilot stream: what arrives in one reactor pass leaves
        together at its end (one ``send``, not one per segment delivered), in
        order; an echo still reaches the client in the pass that read it.
        Flow control is the transport's, as for any write: a full socket
        queues the rest and pauses the Pilot side (:class:`Throttle`).
        """
        if self._mode != RAW:
            return
        self._raw_out.append(data)
        if self._raw_send is None:
            self._raw_send = self.factory.clock.callLater(0, self._send_raw)

    def _send_raw(self) -> None:
        self._raw_send = None
        out, self._raw_out = self._raw_out, []
        if out and self._mode == RAW:
            write_now(self.transport, out[0] if len(out) == 1 else b"".join(out))

    def _drop_raw(self) -> None:
        """The connection is gone: nothing more to send."""
        if self._raw_send is not None:
            self._raw_send.cancel()
            self._raw_send = None
        self._raw_out = []

    def stream_lost(self) -> None:
        if self._mode == RAW:
            if self._raw_send is not None:  # the last bytes before the close
                self._raw_send.cancel()
                self._send_raw()
            self._close()

    def pause_reading(self, reason: str) -> None:
        if self._pauser is not None and self._mode != CLOSED:
            self._pauser.pause(reason)

    def resume_reading(self, reason: str) -> None:
        if self._pauser is not None and self._mode != CLOSED:
            self._pauser.resume(reason)
