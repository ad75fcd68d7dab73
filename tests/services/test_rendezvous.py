"""
Tests for pilot.services.rendezvous, on a memory reactor.
"""

from __future__ import annotations

import base64
import json
import os
import resource
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import InvalidArgument
from pilot.protocols.beacon import BeaconProtocol
from pilot.protocols.registry import RegistryServerFactory
from pilot.server.registry import Peer
from pilot.services import rendezvous
from pilot.services.busypoll import RENDEZVOUS_WINDOW
from pilot.services.rendezvous import RendezvousService, RendezvousSettings, raise_open_files_limit
from pilot.services.store import StoreError, load_store
from pilot.tls import CERT_NAME, KEY_NAME, fingerprint


class FakePort:
    #: as twisted.internet.udp.Port
    maxThroughput = 256 * 1024

    def __init__(self, address: IPv4Address | IPv6Address) -> None:
        self.address = address
        self.closed = False

    def getHost(self) -> IPv4Address | IPv6Address:
        return self.address

    def stopListening(self) -> None:
        self.closed = True


class FakeReactor(MemoryReactorClock):
    """A memory reactor that also takes UDP ports, picks a number for port 0, and records closing."""

    def __init__(self) -> None:
        super().__init__()
        self.udpServers: list[tuple[int, Any, str, int]] = []
        self.ports: list[FakePort] = []
        self._next = 40000

    def _port(self, kind: str, port: int, interface: str) -> FakePort:
        if port == 0:
            self._next += 1
            port = self._next
        address = IPv6Address(kind, interface, port) if ":" in interface else \
            IPv4Address(kind, interface or "0.0.0.0", port)
        fake = FakePort(address)
        self.ports.append(fake)
        return fake

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> FakePort:  # type: ignore[override]
        self.tcpServers.append((port, factory, backlog, interface))
        return self._port("TCP", port, interface)

    def listenSSL(self, port: int, factory: Any, contextFactory: Any, backlog: int = 50,  # type: ignore[override]
                  interface: str = "") -> FakePort:
        self.sslServers.append((port, factory, contextFactory, backlog, interface))
        return self._port("TCP", port, interface)

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> FakePort:
        self.udpServers.append((port, protocol, interface, maxPacketSize))
        return self._port("UDP", port, interface)


def messages(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events]


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.reactor.advance(1_800_000_000)
        self.folder = self.mktemp()
        os.makedirs(self.folder)
        self.store = os.path.join(self.folder, "registry.json")

    def service(self, **kw: Any) -> RendezvousService:
        kw.setdefault("store", self.store)
        kw.setdefault("raise_open_files", False)  # not this test process's limit
        # --durable's writes run here, at once, instead of in a thread of their own
        return RendezvousService(RendezvousSettings(**kw), self.reactor, run_writes=maybeDeferred)

    def register(self, service: RendezvousService, seed: int = 1) -> int:
        reply = service.registry.handle({"type": "register", "public_key": base64.b64encode(bytes([seed]) * 32).decode(),
                                         "listen_addr": "198.51.100.4:4000"}, Peer("198.51.100.4", 4000))
        self.assertEqual(reply["type"], "register_ok", reply)
        node_id: int = reply["node_id"]
        return node_id

    def test_ports_opened_on_start(self) -> None:
        service = self.service()
        self.assertEqual((self.reactor.tcpServers, self.reactor.udpServers), ([], []))
        with capturedLogs() as events:
            service.startService()
        [(port, factory, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (9000, ""))
        self.assertIsInstance(factory, RegistryServerFactory)
        self.assertIs(factory.registry, service.registry)
        [(uport, protocol, uinterface, _)] = self.reactor.udpServers
        self.assertEqual((uport, uinterface), (9001, ""))
        self.assertIsInstance(protocol, BeaconProtocol)
        self.assertIs(protocol.beacon, service.beacon)
        self.assertEqual((service.registry_port(), service.beacon_port()), (9000, 9001))
        text = messages(events)
        self.assertIn("Registry listening on :9000 (TCP)", text)
        self.assertIn("Beacon listening on :9001 (UDP)", text)
        self.assertIn(f"Persistence: {self.store}", text)

    def test_port_zero_and_interfaces(self) -> None:
        service = self.service(listen="127.0.0.1:0", beacon_listen="[::1]:0")
        with capturedLogs() as events:
            service.startService()
        self.assertEqual(self.reactor.tcpServers[0][3], "127.0.0.1")
        self.assertEqual(self.reactor.udpServers[0][2], "::1")
        tcp, udp = service.registry_port(), service.beacon_port()
        self.assertNotEqual(tcp, 0)
        self.assertNotEqual(udp, 0)
        text = messages(events)
        self.assertIn(f"Registry listening on 127.0.0.1:{tcp} (TCP)", text)
        self.assertIn(f"Beacon listening on [::1]:{udp} (UDP)", text)

    def test_privileged_start_binds_once(self) -> None:
        service = self.service()
        service.privilegedStartService()
        self.assertEqual((len(self.reactor.tcpServers), len(self.reactor.udpServers)), (1, 1))
        service.startService()
        self.assertEqual((len(self.reactor.tcpServers), len(self.reactor.udpServers)), (1, 1))

    def test_ports_closed_on_stop(self) -> None:
        service = self.service()
        service.startService()
        self.assertEqual([p.closed for p in self.reactor.ports], [False, False])
        self.successResultOf(service.stopService())
        self.assertEqual([p.closed for p in self.reactor.ports], [True, True])
        self.assertRaises(RuntimeError, service.registry_port)
        self.assertRaises(RuntimeError, service.beacon_port)
        self.assertFalse(service.reaper.running)

    def test_failed_start_closes_what_started(self) -> None:
        """A beacon port that cannot be bound leaves no registry port open behind it."""
        def refuse(*args: Any, **kw: Any) -> None:
            raise CannotListenError("", 9001, OSError("in use"))
        self.reactor.listenUDP = refuse  # type: ignore[method-assign]
        service = self.service()
        self.assertRaises(CannotListenError, service.startService)
        self.assertEqual([p.closed for p in self.reactor.ports], [True])
        self.assertFalse(service.running)
        self.assertFalse(service.reaper.running)

    def test_busy_poll_window(self) -> None:
        """The reactor's pass gets the window --busy-poll gave (RENDEZVOUS_WINDOW by default; 0: no spins)."""
        self.assertEqual(self.service().busy_poll.window, RENDEZVOUS_WINDOW)
        self.assertEqual(self.service(busy_poll=0.0).busy_poll.window, 0.0)
        self.assertEqual(self.service(busy_poll=0.00025).busy_poll.window, 0.00025)

    def test_open_files_limit_raised_at_start(self) -> None:
        """RLIMIT_NOFILE's soft limit goes to the hard limit at start, and that is logged."""
        self.patch(rendezvous, "raise_open_files_limit", lambda: (1024, 524288))
        service = self.service(raise_open_files=True, max_per_address=7)
        with capturedLogs() as events:
            service.startService()
        self.assertIn("open files limit raised from 1024 to 524288", messages(events))
        self.assertEqual(service.factory.max_per_address, 7)
        self.patch(rendezvous, "raise_open_files_limit", lambda: (4096, 4096))
        with capturedLogs() as events:
            self.service(raise_open_files=True).startService()
        self.assertTrue(any("below the registry's 20000 connections" in m for m in messages(events)))

    def test_free_memory_released_periodically(self) -> None:
        """Freed buffers go back to the system every TRIM_INTERVAL (glibc: malloc_trim)."""
        self.assertIsInstance(rendezvous.release_free_memory(), bool)
        calls: list[None] = []
        self.patch(rendezvous, "release_free_memory", lambda: calls.append(None))
        service = self.service()
        with capturedLogs():
            service.startService()
        self.assertEqual(calls, [])  # not at the start: the first answer comes first
        self.reactor.advance(rendezvous.TRIM_INTERVAL)
        self.assertEqual(len(calls), 1)
        self.reactor.advance(rendezvous.TRIM_INTERVAL)
        self.assertEqual(len(calls), 2)

    def test_beacon_reads_a_budget_per_pass(self) -> None:
        """The beacon's socket reads BEACON_READ_BUDGET bytes per reactor pass, not 256 KiB."""
        service = self.service()
        with capturedLogs():
            service.startService()
        port = service.beacon_listener.port
        self.assertEqual(getattr(port, "maxThroughput"), rendezvous.BEACON_READ_BUDGET)
        self.assertLess(rendezvous.BEACON_READ_BUDGET, FakePort.maxThroughput // 64)

    def test_heartbeat_names_the_beacons_endpoint(self) -> None:
        """The registry's heartbeat_ok says what this rendezvous's beacon holds (docs/registration.md)."""
        service = self.service()
        self.assertEqual(service.registry.beacon_endpoint, service.beacon.endpoint_text)

    def test_raise_open_files_limit(self) -> None:
        calls: list[tuple[int, tuple[int, int]]] = []
        limits = {"now": (1024, 65536)}

        def setrlimit(which: int, value: tuple[int, int]) -> None:
            calls.append((which, value))

        def getrlimit(which: int) -> tuple[int, int]:
            return limits["now"]

        self.assertEqual(raise_open_files_limit(getrlimit, setrlimit), (1024, 65536))
        self.assertEqual(calls, [(resource.RLIMIT_NOFILE, (65536, 65536))])
        limits["now"] = (65536, 65536)
        self.assertEqual(raise_open_files_limit(getrlimit, setrlimit), (65536, 65536))
        self.assertEqual(len(calls), 1)
        limits["now"] = (1024, resource.RLIM_INFINITY)
        old, new = raise_open_files_limit(getrlimit, setrlimit)
        self.assertEqual(old, 1024)
        self.assertGreater(new, 1024)
        self.assertEqual(calls[-1], (resource.RLIMIT_NOFILE, (new, resource.RLIM_INFINITY)))

    def test_store_flushed_on_stop(self) -> None:
        """Stopping writes the pending change at once (not after the delay), and a new service loads it."""
        service = self.service(flush_delay=30.0)
        service.startService()
        node_id = self.register(service)
        self.assertFalse(os.path.exists(self.store))
        with capturedLogs():
            self.successResultOf(service.stopService())
        with open(self.store) as f:
            self.assertIn(str(node_id), json.load(f)["nodes"])
        again = self.service()
        self.assertIn(node_id, again.registry.state.nodes)

    def test_unsaved_store_at_stop_is_loud(self) -> None:
        """A store that cannot be written at shutdown: a critical log, ``unsaved``, waiters failed."""
        service = self.service(flush_delay=30.0, durable=True)
        service.startService()
        self.reactor.advance(1)
        os.rename(self.folder, self.folder + ".moved")
        with open(self.folder, "w") as f:
            f.write("not a folder")
        self.register(service)
        assert service.store is not None
        waiting = service.store.when_saved(service.store.generation)
        with capturedLogs() as events:
            self.successResultOf(service.stopService())
        self.assertTrue(service.unsaved)
        self.assertTrue(any("COULD NOT BE SAVED at shutdown" in m for m in messages(events)))
        self.failureResultOf(waiting, RuntimeError)
        self.flushLoggedErrors()

    def test_durable_needs_a_store(self) -> None:
        with self.assertRaises(InvalidArgument):
            self.service(store=None, durable=True)
        self.assertFalse(self.service().unsaved)
        self.assertIsNotNone(self.service(durable=True).factory.durability)
        self.assertIsNone(self.service().factory.durability)

    def test_empty_store_written_at_start(self) -> None:
        service = self.service()
        with capturedLogs():
            service.startService()
        self.reactor.advance(1)
        state = load_store(self.store)
        assert state is not None
        self.assertEqual(state.nodes, {})

    def test_no_store(self) -> None:
        service = self.service(store=None)
        with capturedLogs() as events:
            service.startService()
            self.register(service)
            self.successResultOf(service.stopService())
        self.assertIn("Persistence: none (state is kept in memory only)", messages(events))
        self.assertEqual(os.listdir(self.folder), [])

    def test_corrupt_store_refuses_construction(self) -> None:
        with open(self.store, "wb") as f:
            f.write(b'{"nodes": 5}')
        with self.assertRaises(StoreError) as raised:
            self.service()
        self.assertIn(self.store, str(raised.exception))
        self.assertEqual((self.reactor.tcpServers, self.reactor.udpServers), ([], []))
        with open(self.store, "rb") as f:
            self.assertEqual(f.read(), b'{"nodes": 5}')

    def test_reaper(self) -> None:
        """Stale nodes are reaped every reap_interval, and the removal is saved."""
        service = self.service(reap_interval=60.0)
        with capturedLogs():
            service.startService()
            node_id = self.register(service)
            self.reactor.advance(1)
            self.reactor.advance(120)
            self.assertIn(node_id, service.registry.state.nodes)
            for _ in range(3):
                self.reactor.advance(60)
            self.assertNotIn(node_id, service.registry.state.nodes)
            self.reactor.advance(1)
        state = load_store(self.store)
        assert state is not None
        self.assertNotIn(node_id, state.nodes)

    def test_first_reap_one_interval_after_the_start(self) -> None:
        """At the start every node has a full period ahead: the reaper waits one interval, then repeats."""
        service = self.service(reap_interval=60.0)
        calls: list[None] = []
        service.registry.reap = lambda: calls.append(None) or []  # type: ignore[method-assign,func-returns-value]
        with capturedLogs():
            service.startService()
            self.reactor.advance(59)
            self.assertEqual(calls, [])
            self.reactor.advance(1)
            self.assertEqual(calls, [None])
            self.reactor.advance(60)
            self.assertEqual(calls, [None, None])
            service.stopService()
        self.reactor.advance(600)
        self.assertEqual(calls, [None, None])

    def test_reap_failure_contained(self) -> None:
        service = self.service()
        service.startService()

        def broken() -> list[int]:
            raise RuntimeError("bug")

        service.registry.reap = broken  # type: ignore[method-assign]
        with capturedLogs():
            self.reactor.advance(60)
            self.reactor.advance(60)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertTrue(service.reaper.running)

    def test_tls_self_signed_beside_store(self) -> None:
        service = self.service(tls=True)
        with capturedLogs() as events:
            service.startService()
        self.assertEqual(self.reactor.tcpServers, [])
        [(port, factory, context, _, _)] = self.reactor.sslServers
        self.assertEqual(port, 9000)
        self.assertIs(factory, service.factory)
        self.assertIs(context, service.tls_options)
        cert = os.path.join(self.folder, CERT_NAME)
        self.assertTrue(os.path.exists(os.path.join(self.folder, KEY_NAME)))
        self.assertEqual(service.tls_fingerprint, fingerprint(cert))
        text = messages(events)
        self.assertIn("Registry listening on :9000 (TLS)", text)
        self.assertIn(f"TLS fingerprint (SHA-256): {fingerprint(cert)}", text)
        self.assertEqual(self.service(tls=True).tls_fingerprint, service.tls_fingerprint)

    def test_tls_without_store_is_ephemeral(self) -> None:
        service = self.service(tls=True, store=None)
        self.assertEqual(len(service.tls_fingerprint or ""), 64)
        self.assertEqual(os.listdir(self.folder), [])

    def test_tls_given_files(self) -> None:
        source = self.service(tls=True)
        cert, key = os.path.join(self.folder, CERT_NAME), os.path.join(self.folder, KEY_NAME)
        other = self.service(tls=True, store=None, tls_cert=cert, tls_key=key)
        self.assertEqual(other.tls_fingerprint, source.tls_fingerprint)

    def test_tls_settings_errors(self) -> None:
        cert = os.path.join(self.folder, CERT_NAME)
        self.assertRaises(InvalidArgument, self.service, tls=True, tls_cert=cert)
        self.assertRaises(InvalidArgument, self.service, tls=False, tls_cert=cert, tls_key=cert)

    def test_bad_listen_refuses_construction(self) -> None:
        self.assertRaises(InvalidArgument, self.service, listen="nonsense")
        self.assertRaises(InvalidArgument, self.service, beacon_listen=":99999")
