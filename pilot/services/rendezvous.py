# -*- test-case-name: tests.services.test_rendezvous -*-
"""
The rendezvous: the registry on TCP (9000) and the beacon on UDP (9001) in
one :class:`~twisted.application.service.MultiService`, sharing one state.

Built as ``RendezvousService(settings, reactor)``.  Construction loads the
store (a store that exists but cannot be used raises :class:`StoreError`
before anything listens); ports are bound in ``privilegedStartService`` (so
twistd can bind low ports before dropping privileges) and closed on stop.
Every ``reap_interval`` seconds stale nodes are reaped and the beacon pruned.
``stopService`` flushes the store, so SIGTERM under twistd saves the state.
"""

from __future__ import annotations

import os
import resource
import socket
from typing import TYPE_CHECKING, Any, Callable

import attr
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.logger import Logger

from pilot.endpoint import format_endpoint, parse_listen
from pilot.errors import InvalidArgument
from pilot.memory import release_free_memory
from pilot.protocols.beacon import BeaconProtocol
from pilot.protocols.registry import (
    IDLE_TIMEOUT, MAX_CONNECTIONS, MAX_PER_ADDRESS, Durability, RegistryServerFactory,
)
from pilot.server.beacon import Beacon, BeaconConfig
from pilot.server.registry import Registry, RegistryConfig
from pilot.services.busypoll import RENDEZVOUS_WINDOW, BusyPollService
from pilot.services.durable import DurableWriter, Runner, WriterThread
from pilot.services.forked import ForkedStoreWriter, StoreWriter, write_in_thread
from pilot.services.pairing import ReplicationSettings
from pilot.services.store import Loaded, load

if TYPE_CHECKING:
    from twisted.internet.ssl import CertificateOptions

    from pilot.services.replication import ReplicationService

    from pilot.services.web import RendezvousHTTP

REGISTRY_PORT = 9000
#: Seconds between returns of freed heap memory to the system (glibc's malloc_trim).
TRIM_INTERVAL = 20.0
#: With --durable, a write starts this long after the first unsaved change when none is
#: under way (the changes of one reactor pass go together); changes made while a write is
#: under way go in the next one, started as soon as it is done (``pilot.services.durable``).
DURABLE_DELAY = 0.0
BEACON_PORT = 9001


@attr.s(auto_attribs=True, frozen=True)
class RendezvousSettings:
    #: The registry's TCP listen address, ``[host]:port``.
    listen: str = f":{REGISTRY_PORT}"
    #: The beacon's UDP listen address, ``[host]:port``.
    beacon_listen: str = f":{BEACON_PORT}"
    #: The store file; None keeps the state in memory only.
    store: str | None = None
    tls: bool = False
    #: Certificate (PEM, leaf first) and key; with TLS on and neither given, a
    #: self-signed pair is made once and kept beside the store.
    tls_cert: str | None = None
    tls_key: str | None = None
    registry: RegistryConfig = attr.Factory(RegistryConfig)
    beacon: BeaconConfig = attr.Factory(BeaconConfig)
    flush_delay: float = 0.25
    reap_interval: float = 60.0
    idle_timeout: float = IDLE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    #: Connections one source address may hold at once (0: no limit).
    max_per_address: int = MAX_PER_ADDRESS
    #: Raise the soft limit of open files to the hard limit at start (each connection is one).
    raise_open_files: bool = True
    #: Acknowledge a change only once the store holding it is on disk (group commit); needs a store.
    durable: bool = False
    #: A primary/standby pair (``docs/deploy.md``): the token, ``--standby``, takeover, sync.
    replication: ReplicationSettings = attr.Factory(ReplicationSettings)
    #: The dashboard, /api/stats and /metrics on TCP, ``[host]:port``; None: no HTTP side.
    http: str | None = None
    #: Serve /metrics to every peer (default: loopback peers only).
    metrics_public: bool = False
    #: Seconds the reactor polls without sleeping after serving requests (0: off;
    #: ``pilot/services/busypoll.py``): lower latency for clients that wait for each answer, at the
    #: price of CPU spent spinning while it pays and the machine is not contended.
    busy_poll: float = RENDEZVOUS_WINDOW


class PortService(Service):
    """Keeps one listening port open while running; :attr:`port` is the bound port."""

    def __init__(self, listen: Callable[[], IListeningPort]) -> None:
        self._listen = listen
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        self.port = self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self.port = self._listen()
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        try:
            return port.stopListening()
        except Exception:
            return fail()


class Every(Service):
    """
    Calls ``call`` every ``interval`` seconds while running, the first time one
    interval after the start (a restarted registry's nodes all have a full
    period ahead: nothing to reap; and Twisted's ``TimerService`` would cost
    the start its import). A call that fails is logged and the next one still
    comes.
    """

    log = Logger()

    def __init__(self, interval: float, call: Callable[[], object], clock: IReactorTime) -> None:
        self.interval = interval
        self.call = call
        self.clock = clock
        self._next: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        self._next = self.clock.callLater(self.interval, self._fire)

    def _fire(self) -> None:
        self._next = None
        try:
            self.call()
        except Exception:
            self.log.failure("{call} failed; again in {interval} s", call=self.call, interval=self.interval)
        if self.running:
            self._next = self.clock.callLater(self.interval, self._fire)

    def stopService(self) -> None:
        super().stopService()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None


class RendezvousService(MultiService):
    log = Logger()

    def __init__(self, settings: RendezvousSettings, reactor: Any, run_writes: Runner | None = None) -> None:
        """``run_writes`` runs the ``--durable`` store's writes (default: a thread of their own)."""
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        clock: IReactorTime = reactor
        self.registry_host, self._registry_port = parse_listen(settings.listen)
        self.beacon_host, self._beacon_port = parse_listen(settings.beacon_listen)

        loaded = load(settings.store) if settings.store else Loaded(None, False)
        state = loaded.state
        self.fresh_store = settings.store is not None and state is None
        self.store: DurableWriter | None = None
        self.writer_thread: WriterThread | None = None
        if settings.durable and not settings.store:
            raise InvalidArgument("durable acknowledgements need a store; drop --no-store or --durable")
        self.durable = settings.durable
        self.registry = Registry(clock, settings.registry, state, on_change=self._changed,
                                 on_touch=self._touched)
        if settings.store:
            # a journal, written and compacted by a thread of its own (both modes: no write stops
            # the reactor); --durable only makes the replies wait for it, and writes at once
            write_store: StoreWriter = write_in_thread
            if run_writes is None:
                self.writer_thread = WriterThread(reactor)
                run_writes = self.writer_thread.run
                write_store = ForkedStoreWriter()  # a compaction never holds the interpreter
            # replay state (``auth_ts``) is written as soon as other changes are: a crash loses no
            # more of it than of them (with --durable, none that a reply went out for)
            self.store = DurableWriter(settings.store, self.registry.state, clock, run_writes,
                                       min(settings.flush_delay, DURABLE_DELAY) if settings.durable
                                       else settings.flush_delay, touch_delay=settings.flush_delay,
                                       sidecar_current=loaded.sidecar_current, write_store=write_store)
        self.beacon = Beacon(self.registry, clock, settings.beacon)
        self.registry.beacon_endpoint = self.beacon.endpoint_text  # told in each heartbeat_ok
        self.replication: ReplicationService | None = None
        durability: Durability | None = self.store if settings.durable else None
        if settings.replication.paired:
            # imported here: a rendezvous without a pair answers sooner without it (docs/performance.md)
            from pilot.services.replication import ReplicationService
            self.replication = ReplicationService(self.registry, settings.replication, reactor,
                                                  settings.flush_delay, self.registry_port, self._replicated,
                                                  tls=settings.tls,
                                                  disconnect_clients=lambda: self.factory.disconnect_all(),
                                                  feed=self.store.feed if self.store is not None else None)
            durability = self.replication.durability(durability)
        self.factory = RegistryServerFactory(self.registry, clock, settings.idle_timeout,
                                             settings.max_connections,
                                             max_per_address=settings.max_per_address,
                                             durability=durability)
        #: set when the store could not be written at shutdown: the process must exit non-zero
        self.unsaved = False
        self.tls_options: CertificateOptions | None = None
        self.tls_fingerprint: str | None = None
        if settings.tls:
            self.tls_options, self.tls_fingerprint = self._tls()
        elif settings.tls_cert or settings.tls_key:
            raise InvalidArgument("a TLS certificate or key was given but TLS is off; turn TLS on or drop them")

        self.registry_listener = PortService(self._listen_registry)
        self.registry_listener.setServiceParent(self)
        self.beacon_listener = PortService(self._listen_beacon)
        self.beacon_listener.setServiceParent(self)
        self.reaper = Every(settings.reap_interval, self._reap, clock)
        self.reaper.setServiceParent(self)
        # buffers of closed connections (slow clients) go back to the system, not just to malloc
        self.trimmer = Every(TRIM_INTERVAL, lambda: release_free_memory(), clock)
        self.trimmer.setServiceParent(self)
        # the epoll reactor's lean pass, and its short poll unless --busy-poll 0 (pilot/services/busypoll.py)
        self.busy_poll = BusyPollService(reactor, window=settings.busy_poll)
        self.busy_poll.setServiceParent(self)
        if self.replication is not None:
            self.replication.setServiceParent(self)  # after the ports: it needs the registry's
        self.http: RendezvousHTTP | None = None
        if settings.http is not None:
            # imported here: twisted.web and prometheus_client only when asked for
            from pilot.services.web import RendezvousHTTP
            self.http = RendezvousHTTP(settings.http, self.registry, self.beacon, reactor, settings.metrics_public,
                                       replication=self.replication)
            self.http.setServiceParent(self)

    def _tls(self) -> tuple[CertificateOptions, str]:
        # imported here: pyOpenSSL costs a node or a TLS-less rendezvous about 6 MB of RSS
        from pilot.tls import ensure_self_signed, fingerprint, self_signed, server_context, server_context_from_pem
        cert, key = self.settings.tls_cert, self.settings.tls_key
        if bool(cert) != bool(key):
            raise InvalidArgument("TLS needs both a certificate file and its key file, or neither "
                                  "(then a self-signed certificate is made)")
        if cert and key:
            return server_context(cert, key), fingerprint(cert)
        if self.settings.store:
            cert, key = ensure_self_signed(os.path.dirname(os.path.abspath(self.settings.store)))
            return server_context(cert, key), fingerprint(cert)
        # No store to keep it beside: a new certificate per start, as the reference does.
        cert_pem, key_pem = self_signed()
        return server_context_from_pem(cert_pem, key_pem), fingerprint(cert_pem)

    def _changed(self) -> None:
        if self.store is not None:
            self.store.changed()
        if self.replication is not None:
            self.replication.changed()

    def _replicated(self, whole: bool) -> None:
        """Replication replaced the state (``whole``) or changed the term: write the store soon."""
        if isinstance(self.store, DurableWriter) and whole:
            self.store.rewrite()
        elif self.store is not None:
            self.store.changed()

    def _touched(self) -> None:
        if self.durable:
            # a signed request's reply waits until its replay state is on disk: after a crash
            # no request that was answered can be replayed (a beacon proof: within one write)
            self._changed()
        elif self.store is not None:
            self.store.touched()

    def _listen_registry(self) -> IListeningPort:
        if self.tls_options is not None:
            port: IListeningPort = self.reactor.listenSSL(self._registry_port, self.factory, self.tls_options,
                                                          interface=self.registry_host)
        else:
            port = self.reactor.listenTCP(self._registry_port, self.factory, interface=self.registry_host)
        return port

    def _listen_beacon(self) -> IListeningPort:
        port: IListeningPort = self.reactor.listenUDP(self._beacon_port, BeaconProtocol(self.beacon, self.reactor),
                                                      interface=self.beacon_host, maxPacketSize=65535)
        _grow_receive_buffer(port)
        _limit_reads(port)
        return port

    # --- lifecycle ---------------------------------------------------------------------

    def startService(self) -> None:
        if self.writer_thread is not None:
            self.writer_thread.start()
        if self.settings.raise_open_files:
            self._raise_open_files()
        try:
            super().startService()
        except BaseException:
            # a port that could not be bound: close what did start, then report
            if self.writer_thread is not None:
                self.writer_thread.stop()
            for child in reversed(list(self)):
                if child.running:
                    try:
                        child.stopService()
                    except Exception:
                        self.log.failure("stopping {child} after a failed start", child=child)
            self.running = 0
            raise
        kind = "TLS" if self.tls_options is not None else "TCP"
        self.log.info("Registry listening on {endpoint} ({kind})",
                      endpoint=format_endpoint(self.registry_host, self.registry_port()), kind=kind)
        if self.tls_fingerprint is not None:
            self.log.info("TLS fingerprint (SHA-256): {fingerprint}", fingerprint=self.tls_fingerprint)
        self.log.info("Beacon listening on {endpoint} (UDP)",
                      endpoint=format_endpoint(self.beacon_host, self.beacon_port()))
        if self.store is not None:
            self.log.info("Persistence: {path}", path=self.store.path)
            if self.fresh_store or self.store.compact_due:
                # write the empty store now: an unwritable path shows at once; or fold the journal a
                # crash left (replayed into the state at load) into the store, in the writer thread
                self.store.changed()
        else:
            self.log.info("Persistence: none (state is kept in memory only)")

    def _raise_open_files(self) -> None:
        try:
            old, new = raise_open_files_limit()
        except (OSError, ValueError) as e:
            self.log.warn("could not raise the open files limit: {error}", error=e)
            return
        if new != old:
            self.log.info("open files limit raised from {old} to {new}", old=old, new=new)
        if new < self.settings.max_connections + 64:
            self.log.warn("the open files limit ({limit}) is below the registry's {connections} connections "
                          "plus a margin: new nodes will be refused before that; raise the hard limit "
                          "(ulimit -Hn, systemd LimitNOFILE=)", limit=new,
                          connections=self.settings.max_connections)

    def stopService(self) -> Deferred[Any]:
        stopped: Deferred[Any] = super().stopService()
        self.factory.disconnect_all()
        if isinstance(self.store, DurableWriter):
            # the write under way (in the writer thread) ends first; then the last one, here
            idle = self.store.idle()
            stopped.addBoth(lambda result: idle.addCallback(lambda _: result))
        else:
            self._flush()

        def flush_again(result: object) -> object:
            if not self._flush() and self.store is not None:
                self.unsaved = True
                self.log.critical("THE REGISTRY STORE COULD NOT BE SAVED at shutdown ({path}): changes "
                                  "acknowledged since its last successful write are LOST; fix the store's "
                                  "folder before starting again (the exit status is non-zero)",
                                  path=self.store.path)
                self.store.abandon_waiters(RuntimeError("the registry store could not be saved"))
            if isinstance(self.store, DurableWriter):
                self.store.close()
            if self.writer_thread is not None:
                self.writer_thread.stop()
            return result

        return stopped.addBoth(flush_again)

    def _flush(self) -> bool:
        """Write what is unsaved; True if the store file is up to date (or there is none)."""
        if self.store is None:
            return True
        before = self.store.writes
        if not self.store.flush():
            return False
        if self.store.writes > before:
            self.log.info("registry store saved to {path}", path=self.store.path)
        return True

    def _reap(self) -> None:
        if self.replication is not None and self.replication.replica.standby:
            self.beacon.prune()
            return  # a standby's nodes are its primary's to reap
        try:
            gone = self.registry.reap()
            pruned = self.beacon.prune()
        except Exception:
            self.log.failure("reaping stale nodes failed")
            return
        if gone:
            self.log.info("removed {count} stale nodes ({ids}); {pruned} beacon endpoints dropped",
                          count=len(gone), ids=gone[:20], pruned=len(pruned))

    # --- where it listens -------------------------------------------------------------------

    def registry_port(self) -> int:
        """The registry's bound TCP port (the real one when configured as 0)."""
        return _bound(self.registry_listener, "registry")

    def beacon_port(self) -> int:
        """The beacon's bound UDP port."""
        return _bound(self.beacon_listener, "beacon")


#: A burst of Discovers after a rendezvous restart (every node at once) must
#: not overflow the kernel's default UDP buffer (~200 KB, a few hundred datagrams).
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024


#: Bytes the beacon's socket may read in one reactor pass (Twisted's default: 256 KiB,
#: some 50,000 five-byte Discovers, during which no registry request is served).  Past
#: it the reactor serves the registry's connections first; unread datagrams wait in the
#: kernel's buffer and, in a flood, are dropped there at no cost to us.
BEACON_READ_BUDGET = 256


def _limit_reads(port: Any) -> None:
    if hasattr(port, "maxThroughput"):
        port.maxThroughput = BEACON_READ_BUDGET


def _grow_receive_buffer(port: Any) -> None:
    sock = getattr(port, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
    except OSError:
        pass  # the kernel caps it at net.core.rmem_max; the default still works


def raise_open_files_limit(getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
                           setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit
                           ) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; the (old, new) soft limits."""
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or (soft != resource.RLIM_INFINITY and soft < hard):
        # an unlimited hard limit is refused by Linux for files: take the kernel's per-process cap
        target = hard if hard != resource.RLIM_INFINITY else _nr_open()
        if soft == resource.RLIM_INFINITY or target <= soft:
            return soft, soft
        setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return soft, target
    return soft, soft




def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1 << 20


def _bound(listener: PortService, what: str) -> int:
    if listener.port is None:
        raise RuntimeError(f"the {what} is not listening (the service is not running)")
    port: int = listener.port.getHost().port  # type: ignore[attr-defined]
    return port
