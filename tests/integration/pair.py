"""
A primary and a standby rendezvous as real processes on 127.0.0.1 (``python
-m pilot rendezvous start``, the token in ``PILOT_REPLICATION_TOKEN``), for
the replication integration tests.
"""

from __future__ import annotations

import os
import socket
import threading

from tests.integration.procs import LOOPBACK, Rendezvous, RendezvousTestMixin, rendezvous_args, wait_for_rendezvous

TOKEN = "integration-token-0123456789"
TAKEOVER = 2.0
OPTIONS = ["--flush-delay", "0.02", "--registrations-per-minute", "0", "--requests-per-second", "0",
           "--takeover-after", str(TAKEOVER)]


class Forwarder:
    """
    A TCP forwarder on 127.0.0.1: each accepted connection is joined to the
    current target port; :meth:`move` changes the target and drops the joined
    connections, as a service address moved to another machine would; a
    target of None cuts the path (a partition: connections are accepted and
    closed at once).
    """

    def __init__(self, target: int | None) -> None:
        self.target = target
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.joined: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            try:
                if self.target is None:
                    raise OSError("cut")
                upstream = socket.create_connection((LOOPBACK, self.target), timeout=5.0)
            except OSError:
                downstream.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.joined += [downstream, upstream]
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def move(self, target: int | None) -> None:
        self.target = target
        self._drop()

    def _drop(self) -> None:
        with self.lock:
            joined, self.joined = self.joined, []
        for s in joined:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self._drop()


class PairMixin(RendezvousTestMixin):
    primary_store = ""

    def start_pair(self, primary_extra: list[str] | None = None,
                   via: Forwarder | None = None) -> tuple[Rendezvous, Rendezvous]:
        """A primary and its standby, once the standby holds the primary's store; the standby reaches
        the primary through ``via`` if given (pointed at the primary here)."""
        env = {"PILOT_REPLICATION_TOKEN": TOKEN}
        folder = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(folder)
        self.primary_store = os.path.join(folder, "primary.json")
        primary = self.start_pair_member(self.primary_store, [*OPTIONS, *(primary_extra or [])], "primary", env)
        if via is not None:
            via.move(primary.registry_port)
        followed = via.port if via is not None else primary.registry_port
        standby = self.start_pair_member(os.path.join(folder, "standby.json"),
                                         [*OPTIONS, "--standby", f"127.0.0.1:{followed}"], "standby", env)
        standby.proc.wait_for_output(r"holding the store of", stream="stderr")
        primary.proc.wait_for_output(r"Replication: primary \(term 1\)")
        standby.proc.wait_for_output(rf"Replication: standby of 127\.0\.0\.1:{followed} \(term 1\)")
        return primary, standby

    def start_pair_member(self, store: str, extra: list[str], name: str,
                          env: dict[str, str] | None = None) -> Rendezvous:
        proc = self.spawn_python(["-m", "pilot", "rendezvous", "start", *rendezvous_args(store, extra)], name,
                                 env=env if env is not None else {"PILOT_REPLICATION_TOKEN": TOKEN})
        return wait_for_rendezvous(proc, store)
