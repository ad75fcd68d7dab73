"""
The NAT lab's harness: topologies of Linux network namespaces.

::

    with Lab() as lab:                      # or lab = Lab(); ...; lab.close()
        rv = lab.add_public_host("rv")      # 198.51.100.2 on the public segment
        r = lab.add_router("home", "port_restricted")
        h = lab.add_host(r, "laptop")       # 10.K.0.2 behind the router
        lab.spawn(h, [...], "node")         # a process inside h's namespace

Layout.  One namespace (``core``) holds the public segment: a bridge ``br0``
with 198.51.100.1/24, forwarding, the "internet".  Every other public-segment
namespace (the rendezvous host, hosts with no NAT, each router's WAN side) has
a veth on that bridge and a default route through 198.51.100.1.  A router is a
namespace with ``wan`` (198.51.100.100+) on the public bridge and a LAN bridge
``brlan``; each host behind it is a namespace whose ``eth0`` is plugged into
``brlan``.  Private LANs are 10.K.0.0/24 and exist only inside the lab's
namespaces; the ``firewall`` kind routes public addresses (a /28 of
203.0.113.0/24).  Nothing is ever added to the namespace the tests run in:
veths are created with both ends directly inside lab namespaces, so deleting
the namespaces deletes them, and no address outside the lab is a target.

A transit router (``add_transit``) is a hop between NATs, as every internet
path has: a namespace with ``pub`` on the public bridge (198.51.100.90+) and a
bridge ``brdown`` for its region, a /28 of 192.0.2.0/24; a router added with
``transit=`` has its WAN there, so its datagrams to a router on the public
segment cross one router more (two the other way, through ``core``).  Two
NATs on the public segment itself are what two hosts of one cloud subnet
have: no hop between them.

Router kinds (``KINDS``):

``one_to_one``
    1:1 NAT: every host gets its own public address (198.51.100.150+) on the
    router's WAN; DNAT of that whole address to the host and SNAT of the host
    to it.  No filtering: unsolicited inbound reaches the host.
``port_restricted``
    endpoint-independent mapping (plain MASQUERADE keeps the source port while
    it is free), address-and-port-dependent filtering (FORWARD accepts inbound
    only for ESTABLISHED,RELATED conntrack entries and drops the rest).
``symmetric``
    ``MASQUERADE --random-fully``: a new external port per destination, the
    same filtering.
``firewall``
    no NAT: routed public addresses, the same stateful filtering.
``udp_blocked``
    NAT as ``port_restricted``, but UDP may leave only towards the rendezvous
    host (its beacon); TCP leaves freely.

Every name the lab makes in a shared place starts with the run's prefix
(``nl<PID>-<N>``: namespaces, the work folder); interface names live only
inside the lab's own namespaces.  :meth:`Lab.close` (also run at exit, on
SIGTERM, SIGHUP and SIGINT, and by ``with``) kills the processes the lab
started (by PID, checking the PID is still inside one of the lab's
namespaces), then every process left inside the lab's namespaces, deletes
the veths and namespaces and the work folder (kept with ``NATLAB_KEEP=1``,
for the node logs).  ``python -m tests.natlab.topology [--sweep]`` lists
(and removes) namespaces left by a run that was SIGKILLed.

If this machine cannot run the lab, :func:`require_lab` raises a
``SkipTest`` naming what is missing (with ``NATLAB_REQUIRE=1`` in the
environment it fails instead, for CI where the lab must run).
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Iterable, Mapping, Sequence
from unittest import SkipTest

from tests.integration.procs import REPO, Process, python_env

#: The public segment (documentation range) and its fixed addresses.
PUBLIC_NET = ipaddress.ip_network("198.51.100.0/24")
CORE_IP = "198.51.100.1"
RENDEZVOUS_IP = "198.51.100.2"   # the rendezvous host (add_rendezvous_host)
FIRST_PUBLIC_HOST = 10       # 198.51.100.10.. hosts with no NAT
FIRST_ROUTER_WAN = 100       # 198.51.100.100.. router WAN addresses
FIRST_ONE_TO_ONE = 150       # 198.51.100.150.. 1:1 NAT public addresses
FIRST_TRANSIT = 90           # 198.51.100.90..99 transit routers' public legs
#: Routed public LANs for the ``firewall`` kind: /28s of this range.
ROUTED_NET = ipaddress.ip_network("203.0.113.0/24")
#: Regions behind transit routers: /28s of this range.
TRANSIT_NET = ipaddress.ip_network("192.0.2.0/24")

KINDS = ("one_to_one", "port_restricted", "symmetric", "firewall", "udp_blocked")

COMMAND_TIMEOUT = 20.0
STOP_GRACE = 3.0


class LabError(RuntimeError):
    """A lab command failed: the message has the command and its output."""


# --- capability check ------------------------------------------------------------------------------

def _missing(what: str) -> Exception:
    if os.environ.get("NATLAB_REQUIRE", "").strip() not in ("", "0"):
        return LabError(f"NAT lab required (NATLAB_REQUIRE) but unavailable: {what}")
    return SkipTest(f"NAT lab unavailable: {what}")


_checked: list[str | None] = []
_labs_made: list[int] = []


def require_lab() -> None:
    """Raise SkipTest (or LabError with NATLAB_REQUIRE=1) naming the first missing capability."""
    if _checked:
        if _checked[0] is not None:
            raise _missing(_checked[0])
        return
    problem = _probe()
    _checked.append(problem)
    if problem is not None:
        raise _missing(problem)


def _probe() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"needs Linux network namespaces (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"needs root for network namespaces and iptables (running as uid {os.geteuid()})"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables"), ("sysctl", "procps")):
        if shutil.which(tool) is None:
            return f"no `{tool}` command (apt-get install -y {package})"
    ns = f"nl{os.getpid()}-probe"
    steps = [
        (["ip", "netns", "add", ns], "`ip netns add` failed"),
        (["ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"], "no veth support"),
        (["ip", "-n", ns, "link", "add", "b0", "type", "bridge"], "no bridge support"),
        (["ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "p0",
          "-j", "MASQUERADE", "--random-fully"],
         "iptables cannot use the nat table (MASQUERADE) in a namespace"),
        (["ip", "netns", "exec", ns, "iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate",
          "ESTABLISHED,RELATED", "-j", "ACCEPT"], "iptables has no conntrack match in a namespace"),
        (["ip", "netns", "exec", ns, "iptables", "-A", "FORWARD", "-m", "statistic", "--mode", "random",
          "--probability", "0.05", "-j", "DROP"], "iptables has no statistic match"),
    ]
    try:
        for argv, what in steps:
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
            except OSError as e:
                return f"{what}: {e}"
            if r.returncode != 0:
                return f"{what}: {' '.join(argv)}: {(r.stderr or r.stdout).strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=COMMAND_TIMEOUT)
    return None


def has_conntrack_tool() -> bool:
    return shutil.which("conntrack") is not None


# --- the pieces --------------------------------------------------------------------------------------

class Host:
    """A namespace with one address: on the public segment (``router`` None) or behind a router."""

    def __init__(self, lab: "Lab", name: str, ns: str, ip: str, router: "Router | None") -> None:
        self.lab = lab
        self.name = name
        self.ns = ns
        self.ip = ip
        self.router = router
        self.public_ip: str | None = ip if router is None else None   # 1:1 and firewall hosts set it
        self.link_index = 0          # bumps at each move (for the peer interface's name)
        self.moves: list[str] = []   # the routers it was moved away from

    @property
    def kind(self) -> str:
        return "public" if self.router is None else self.router.kind

    def __repr__(self) -> str:
        where = "public" if self.router is None else f"behind {self.router.name} ({self.router.kind})"
        return f"<Host {self.name} {self.ip} {where}>"


class Router:
    """A NAT router (or firewall) namespace: ``wan`` on the public bridge, ``brlan`` for its hosts."""

    def __init__(self, lab: "Lab", name: str, kind: str, ns: str, index: int, wan_ip: str,
                 lan: ipaddress.IPv4Network) -> None:
        self.lab = lab
        self.name = name
        self.kind = kind
        self.ns = ns
        self.index = index
        self.wan_ip = wan_ip
        self.lan = lan
        self.gateway = str(lan.network_address + 1)
        self.hosts: list[Host] = []
        self.one_to_one: dict[str, str] = {}   # host LAN IP -> its public IP
        self._next_host = 2
        self.blocked: set[str] = set()         # routers UDP is blocked with
        self.drop_wan_input = True
        self.loss: float | None = None

    @property
    def public_addresses(self) -> list[str]:
        """What the world sees of this router and its hosts (for blocking)."""
        out = [self.wan_ip, *self.one_to_one.values()]
        if self.kind == "firewall":
            out.append(str(self.lan))
        return out

    def __repr__(self) -> str:
        return f"<Router {self.name} {self.kind} wan {self.wan_ip} lan {self.lan}>"


class Transit:
    """A router between the public segment (``up_ip``) and a region (``net``) of NAT routers' WANs."""

    def __init__(self, name: str, ns: str, up_ip: str, net: ipaddress.IPv4Network,
                 mtu: int | None = None) -> None:
        self.name = name
        self.ns = ns
        self.up_ip = up_ip
        self.net = net
        self.mtu = mtu
        self.drop_too_big = False
        self.gateway = str(net.network_address + 1)
        self._next = 2

    def next_address(self) -> str:
        ip = self.net.network_address + self._next
        if ip >= self.net.broadcast_address:
            raise LabError(f"transit {self.name}'s region is full")
        self._next += 1
        return str(ip)

    def __repr__(self) -> str:
        return f"<Transit {self.name} up {self.up_ip} region {self.net}>"


# --- the lab -----------------------------------------------------------------------------------------

class Lab:
    """
    One topology.  Names start with ``prefix`` (default ``nl<PID>-<N>``, the
    N-th lab of this process); ``close``
    undoes everything and is safe to call more than once and from a signal
    handler.
    """

    def __init__(self, prefix: str | None = None, workdir: str | None = None,
                 keep_files: bool | None = None) -> None:
        require_lab()
        _labs_made.append(1)
        self.prefix = prefix or f"nl{os.getpid()}-{len(_labs_made)}"
        if not re.fullmatch(r"[a-z0-9-]{1,20}", self.prefix):
            raise ValueError(f"bad prefix {self.prefix!r}")
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"{self.prefix}-", dir="/tmp")
        os.makedirs(self.workdir, exist_ok=True)
        if keep_files is None:
            keep_files = os.environ.get("NATLAB_KEEP", "").strip() not in ("", "0")
        self.keep_files = keep_files
        self.namespaces: list[str] = []
        self.veths: list[tuple[str, str]] = []   # (namespace, interface) of one end
        self.processes: list[Process] = []
        self.adopted: list[tuple[int, str, str]] = []   # (pid, namespace, name): started by our commands
        self.hosts: dict[str, Host] = {}
        self.routers: dict[str, Router] = {}
        self.transits: dict[str, Transit] = {}
        self.commands = 0
        self._lock = threading.RLock()
        self._closed = False
        self._public_index = FIRST_PUBLIC_HOST
        self._router_index = 0
        self._one_to_one_index = FIRST_ONE_TO_ONE
        self._routed_index = 0
        self._core_ports = 0
        self._previous_handlers: dict[int, Any] = {}
        self._install_handlers()
        atexit.register(self.close)
        try:
            self.core = self._namespace("core")
            self._sysctl(self.core, "net.ipv4.ip_forward", "1")
            self._sysctl(self.core, "net.ipv4.conf.all.send_redirects", "0")
            self._no_bridge_netfilter(self.core)
            self.ip(self.core, "link", "add", "br0", "type", "bridge")
            self.ip(self.core, "addr", "add", f"{CORE_IP}/{PUBLIC_NET.prefixlen}", "dev", "br0")
            self.ip(self.core, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    # --- running commands ----------------------------------------------------------------------

    def ns_name(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = COMMAND_TIMEOUT,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        self.commands += 1
        try:
            r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
        except subprocess.TimeoutExpired:
            raise LabError(f"timed out after {timeout:g} s: {' '.join(argv)}") from None
        if check and r.returncode != 0:
            raise LabError(f"exit {r.returncode}: {' '.join(argv)}\n{(r.stderr + r.stdout).strip()}")
        return r

    def ip(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["ip", "-n", ns, *args], check=check)

    def exec(self, ns: str, *argv: str, check: bool = True,
             timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """``ip netns exec NS ARGV`` (short commands: iptables, sysctl, conntrack)."""
        return self.run(["ip", "netns", "exec", ns, *argv], check=check, timeout=timeout)

    def iptables(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.exec(ns, "iptables", "-w", "5", *args, check=check)

    def _sysctl(self, ns: str, key: str, value: str) -> None:
        self.exec(ns, "sysctl", "-q", "-w", f"{key}={value}")

    def _no_bridge_netfilter(self, ns: str) -> None:
        """Frames bridged inside ``ns`` (a LAN, the public segment) skip iptables, as on a switch."""
        for family in ("iptables", "ip6tables", "arptables"):
            self.exec(ns, "sysctl", "-q", "-w", f"net.bridge.bridge-nf-call-{family}=0", check=False)

    def _namespace(self, short: str) -> str:
        ns = self.ns_name(short)
        with self._lock:
            if self._closed:
                raise LabError("the lab is closed")
            self.run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
        self.ip(ns, "link", "set", "lo", "up")
        return ns

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        """A veth pair created directly inside two lab namespaces (never in ours)."""
        self.run(["ip", "link", "add", if_a, "netns", ns_a, "type", "veth",
                  "peer", "name", if_b, "netns", ns_b])
        self.veths.append((ns_a, if_a))

    def _plug_public(self, ns: str, ifname: str) -> None:
        """A veth from ``ns`` (``ifname``) to the public bridge."""
        self._core_ports += 1
        port = f"p{self._core_ports}"
        self._veth(ns, ifname, self.core, port)
        self.ip(self.core, "link", "set", port, "master", "br0")
        self.ip(self.core, "link", "set", port, "up")

    # --- building ------------------------------------------------------------------------------

    def add_rendezvous_host(self, name: str = "rv") -> Host:
        """The rendezvous host: on the public segment at RENDEZVOUS_IP (udp_blocked routers let UDP to it)."""
        if any(h.ip == RENDEZVOUS_IP for h in self.hosts.values()):
            raise LabError("the rendezvous host exists")
        return self.add_public_host(name, ip=RENDEZVOUS_IP)

    def add_public_host(self, name: str, ip: str | None = None) -> Host:
        """A host on the public segment with no NAT (198.51.100.10, .11, ...)."""
        self._check_name(name)
        if ip is None:
            ip = str(PUBLIC_NET.network_address + self._public_index)
            self._public_index += 1
            if self._public_index >= FIRST_TRANSIT:
                raise LabError("too many public hosts")
        ns = self._namespace(f"h-{name}")
        self._plug_public(ns, "eth0")
        self.ip(ns, "addr", "add", f"{ip}/{PUBLIC_NET.prefixlen}", "dev", "eth0")
        self.ip(ns, "link", "set", "eth0", "up")
        self.ip(ns, "route", "add", "default", "via", CORE_IP)
        host = Host(self, name, ns, ip, None)
        self.hosts[name] = host
        return host

    def add_transit(self, name: str, mtu: int | None = None, drop_fragments: bool = False,
                    drop_too_big: bool = False) -> Transit:
        """
        A transit router: a hop between the public segment and a region of NAT routers (``transit=``).
        Paths people have: ``mtu`` the region's link MTU (a PPPoE, VPN or tunnelled uplink; the
        routers in it get the same WAN MTU), ``drop_fragments`` drops IP fragments crossing it (as
        many firewalls and cloud NATs do), ``drop_too_big`` drops the ICMP "fragmentation needed"
        messages it and the region's routers would send (a path MTU black hole).
        """
        self._check_name(name)
        index = len(self.transits)
        if index >= 10:
            raise LabError("too many transit routers")
        up_ip = str(PUBLIC_NET.network_address + FIRST_TRANSIT + index)
        net = ipaddress.IPv4Network(f"{TRANSIT_NET.network_address + 16 * index}/28")
        ns = self._namespace(f"t-{name}")
        self._sysctl(ns, "net.ipv4.ip_forward", "1")
        self._sysctl(ns, "net.ipv4.conf.all.send_redirects", "0")
        self._no_bridge_netfilter(ns)
        self._plug_public(ns, "pub")
        self.ip(ns, "addr", "add", f"{up_ip}/{PUBLIC_NET.prefixlen}", "dev", "pub")
        self.ip(ns, "link", "set", "pub", "up")
        self.ip(ns, "route", "add", "default", "via", CORE_IP)
        transit = Transit(name, ns, up_ip, net, mtu)
        transit.drop_too_big = drop_too_big
        self.ip(ns, "link", "add", "brdown", "type", "bridge")
        if mtu is not None:
            self.ip(ns, "link", "set", "brdown", "mtu", str(mtu))
        if drop_fragments:
            self.iptables(ns, "-A", "FORWARD", "-f", "-j", "DROP")
        if drop_too_big:
            self.iptables(ns, "-A", "OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP")
        self.ip(ns, "addr", "add", f"{transit.gateway}/{net.prefixlen}", "dev", "brdown")
        self.ip(ns, "link", "set", "brdown", "up")
        self.ip(self.core, "route", "add", str(net), "via", up_ip)
        self.transits[name] = transit
        return transit

    def add_router(self, name: str, kind: str, drop_wan_input: bool = True,
                   upstream: Router | None = None, transit: Transit | None = None) -> Router:
        """
        A router of ``kind`` (one of KINDS) with an empty LAN.  ``drop_wan_input``
        (the default) drops unsolicited datagrams to the router's own WAN address;
        False models a Linux box with an open INPUT chain (see ``_rules``).
        ``upstream``: the router's WAN is a host on that router's LAN instead of
        the public segment (double NAT: a home router behind a carrier-grade NAT).
        ``transit``: the router's WAN is in that transit router's region, one hop
        from the public segment.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown router kind {kind!r}: one of {', '.join(KINDS)}")
        if (upstream is not None or transit is not None) and kind in ("firewall", "one_to_one"):
            raise ValueError(f"a {kind} router needs a WAN on the public segment")
        if upstream is not None and transit is not None:
            raise ValueError("a router has one WAN: upstream or transit, not both")
        self._check_name(name)
        self._router_index += 1
        index = self._router_index
        if index > FIRST_ONE_TO_ONE - FIRST_ROUTER_WAN:
            raise LabError("too many routers")
        wan_ip = str(PUBLIC_NET.network_address + FIRST_ROUTER_WAN + index - 1)
        if upstream is not None:
            wan_ip = str(upstream.lan.network_address + upstream._next_host)
            upstream._next_host += 1
        elif transit is not None:
            wan_ip = transit.next_address()
        if kind == "firewall":
            self._routed_index += 1
            if self._routed_index > 15:
                raise LabError("too many firewall LANs")
            lan = ipaddress.IPv4Network(f"{ROUTED_NET.network_address + 16 * self._routed_index}/28")
        else:
            if index > 250:
                raise LabError("too many routers")
            lan = ipaddress.IPv4Network(f"10.{index}.0.0/24")
        ns = self._namespace(f"r-{name}")
        router = Router(self, name, kind, ns, index, wan_ip, lan)
        router.drop_wan_input = drop_wan_input and kind != "one_to_one"
        self._sysctl(ns, "net.ipv4.ip_forward", "1")
        self._no_bridge_netfilter(ns)
        if transit is not None:
            port = f"t{index}-{len(self.veths)}"
            self._veth(ns, "wan", transit.ns, port)
            if transit.mtu is not None:
                self.ip(ns, "link", "set", "wan", "mtu", str(transit.mtu))
                self.ip(transit.ns, "link", "set", port, "mtu", str(transit.mtu))
            self.ip(transit.ns, "link", "set", port, "master", "brdown")
            self.ip(transit.ns, "link", "set", port, "up")
            self.ip(ns, "addr", "add", f"{wan_ip}/{transit.net.prefixlen}", "dev", "wan")
            self.ip(ns, "link", "set", "wan", "up")
            self.ip(ns, "route", "add", "default", "via", transit.gateway)
        elif upstream is None:
            self._plug_public(ns, "wan")
            self.ip(ns, "addr", "add", f"{wan_ip}/{PUBLIC_NET.prefixlen}", "dev", "wan")
            self.ip(ns, "link", "set", "wan", "up")
            self.ip(ns, "route", "add", "default", "via", CORE_IP)
        else:
            port = f"r{index}-{len(self.veths)}"
            self._veth(ns, "wan", upstream.ns, port)
            self.ip(upstream.ns, "link", "set", port, "master", "brlan")
            self.ip(upstream.ns, "link", "set", port, "up")
            self.ip(ns, "addr", "add", f"{wan_ip}/{upstream.lan.prefixlen}", "dev", "wan")
            self.ip(ns, "link", "set", "wan", "up")
            self.ip(ns, "route", "add", "default", "via", upstream.gateway)
        self.ip(ns, "link", "add", "brlan", "type", "bridge")
        self.ip(ns, "addr", "add", f"{router.gateway}/{lan.prefixlen}", "dev", "brlan")
        self.ip(ns, "link", "set", "brlan", "up")
        if kind == "firewall":
            self.ip(self.core, "route", "add", str(lan), "via", wan_ip)
        self._rules(router)
        if transit is not None and transit.drop_too_big:
            self.iptables(ns, "-A", "OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP")
        self.routers[name] = router
        return router

    def _rules(self, r: Router) -> None:
        ns, ipt = r.ns, self.iptables
        established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
        if r.kind == "one_to_one":
            return  # per-host SNAT/DNAT in _attach; no filtering
        if r.kind in ("port_restricted", "udp_blocked"):
            ipt(ns, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE")
        elif r.kind == "symmetric":
            ipt(ns, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE", "--random-fully")
        ipt(ns, "-A", "FORWARD", "-i", "wan", *established)
        ipt(ns, "-A", "FORWARD", "-i", "wan", "-j", "DROP")
        if r.drop_wan_input:
            # The router itself takes nothing unsolicited from the WAN, as a home router's
            # firewall.  Without this, a peer's datagram that reaches WAN:PORT before our host
            # has sent to that peer is delivered locally and leaves a conntrack entry
            # (peer -> WAN:PORT); the host's own packet to the peer then clashes with it and
            # MASQUERADE picks another port: the mapping is no longer endpoint-independent
            # and punching fails (test_topology shows both behaviours).  Dropped in filter
            # INPUT, the packet's conntrack entry is never confirmed.
            ipt(ns, "-A", "INPUT", "-i", "wan", *established)
            ipt(ns, "-A", "INPUT", "-i", "wan", "-j", "DROP")
        if r.kind == "udp_blocked":
            rendezvous = self.rendezvous_ip()
            ipt(ns, "-A", "FORWARD", "-o", "wan", "-p", "udp", "-d", rendezvous, "-j", "ACCEPT")
            ipt(ns, "-A", "FORWARD", "-o", "wan", "-p", "udp", "-j", "DROP")

    def rendezvous_ip(self) -> str:
        return RENDEZVOUS_IP

    def add_host(self, router: Router, name: str) -> Host:
        """A host on ``router``'s LAN (10.K.0.2, .3, ... or the firewall's routed /28)."""
        self._check_name(name)
        ns = self._namespace(f"h-{name}")
        host = Host(self, name, ns, "", router)
        self._attach(host, router)
        self.hosts[name] = host
        return host

    def _attach(self, host: Host, router: Router) -> None:
        ip = str(router.lan.network_address + router._next_host)
        router._next_host += 1
        if ipaddress.ip_address(ip) not in router.lan or ip == str(router.lan.broadcast_address):
            raise LabError(f"{router.name}'s LAN is full")
        host.link_index += 1
        port = f"h{host.link_index}-{len(self.veths)}"
        self._veth(host.ns, "eth0", router.ns, port)
        self.ip(router.ns, "link", "set", port, "master", "brlan")
        self.ip(router.ns, "link", "set", port, "up")
        self.ip(host.ns, "addr", "add", f"{ip}/{router.lan.prefixlen}", "dev", "eth0")
        self.ip(host.ns, "link", "set", "eth0", "up")
        self.ip(host.ns, "route", "add", "default", "via", router.gateway)
        host.ip, host.router = ip, router
        host.public_ip = ip if router.kind == "firewall" else None
        if router.kind == "one_to_one":
            public = str(PUBLIC_NET.network_address + self._one_to_one_index)
            self._one_to_one_index += 1
            if self._one_to_one_index > 250:
                raise LabError("too many 1:1 addresses")
            self.ip(router.ns, "addr", "add", f"{public}/32", "dev", "wan")
            self.iptables(router.ns, "-t", "nat", "-A", "PREROUTING", "-i", "wan", "-d", public,
                          "-j", "DNAT", "--to-destination", ip)
            self.iptables(router.ns, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-s", ip,
                          "-j", "SNAT", "--to-source", public)
            router.one_to_one[ip] = public
            host.public_ip = public
        router.hosts.append(host)

    def _detach(self, host: Host) -> None:
        router = host.router
        assert router is not None
        self.ip(host.ns, "link", "del", "eth0", check=False)
        public = router.one_to_one.pop(host.ip, None)
        if public is not None:
            self.iptables(router.ns, "-t", "nat", "-D", "PREROUTING", "-i", "wan", "-d", public,
                          "-j", "DNAT", "--to-destination", host.ip, check=False)
            self.iptables(router.ns, "-t", "nat", "-D", "POSTROUTING", "-o", "wan", "-s", host.ip,
                          "-j", "SNAT", "--to-source", public, check=False)
            self.ip(router.ns, "addr", "del", f"{public}/32", "dev", "wan", check=False)
        if host in router.hosts:
            router.hosts.remove(host)

    def move_host(self, host: Host, router: Router) -> str:
        """
        Move a running host to ``router``'s LAN: its ``eth0`` is deleted and a
        new one plugged into the new LAN with a new address (an IP change
        under the processes running in it, as a laptop changing networks).
        Returns the new address.
        """
        if host.router is None:
            raise LabError(f"{host.name} is on the public segment; only LAN hosts move")
        host.moves.append(host.router.name)
        self._detach(host)
        self._attach(host, router)
        return host.ip

    def _check_name(self, name: str) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,24}", name):
            raise ValueError(f"bad lab name {name!r}")
        if name in self.hosts or name in self.routers or name in self.transits:
            raise ValueError(f"{name!r} exists")

    # --- router knobs --------------------------------------------------------------------------------

    def set_udp_timeout(self, router: Router, seconds: int, stream: bool = True) -> None:
        """
        The router's UDP conntrack timeout (its NAT mapping and filter lifetime).
        ``nf_conntrack_udp_timeout`` covers flows seen one way; a flow with
        replies becomes "assured" and uses ``nf_conntrack_udp_timeout_stream``
        (120 s by default), so ``stream`` sets that one too, or an idle tunnel
        would keep its mapping for two minutes whatever this says.
        """
        self._sysctl(router.ns, "net.netfilter.nf_conntrack_udp_timeout", str(int(seconds)))
        if stream:
            self._sysctl(router.ns, "net.netfilter.nf_conntrack_udp_timeout_stream", str(int(seconds)))

    def udp_timeouts(self, router: Router) -> dict[str, int]:
        out = {}
        for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
            r = self.exec(router.ns, "sysctl", "-n", f"net.netfilter.{key}")
            out[key] = int(r.stdout.strip())
        return out

    _LOSS = ["-m", "comment", "--comment", "natlab-loss", "-m", "statistic", "--mode", "random"]

    def add_loss(self, router: Router, probability: float = 0.05) -> None:
        """
        Drop ``probability`` of what the router forwards through its WAN, each
        way: ``-m statistic --mode random --probability P -j DROP`` for ``-i
        wan`` and for ``-o wan``, first in FORWARD (before the conntrack
        ACCEPT, so inbound packets are dropped too, not only outbound ones).
        """
        self.clear_loss(router)
        for way in ("-i", "-o"):
            self.iptables(router.ns, "-I", "FORWARD", "1", way, "wan", *self._LOSS,
                          "--probability", f"{probability:g}", "-j", "DROP")
        router.loss = probability

    def clear_loss(self, router: Router) -> None:
        if router.loss is not None:
            for way in ("-i", "-o"):
                self.iptables(router.ns, "-D", "FORWARD", way, "wan", *self._LOSS,
                              "--probability", f"{router.loss:g}", "-j", "DROP", check=False)
            router.loss = None

    def _block_rules(self, here: Router, there: Router) -> list[list[str]]:
        rules = []
        for address in there.public_addresses:
            rules.append(["-o", "wan", "-p", "udp", "-d", address, "-m", "comment", "--comment",
                          f"natlab-block-{there.name}", "-j", "DROP"])
            rules.append(["-i", "wan", "-p", "udp", "-s", address, "-m", "comment", "--comment",
                          f"natlab-block-{there.name}", "-j", "DROP"])
        return rules

    def block_udp(self, a: Router, b: Router) -> None:
        """Drop UDP between the two routers (and their hosts), both ways, on both routers."""
        for here, there in ((a, b), (b, a)):
            if there.name in here.blocked:
                continue
            for rule in self._block_rules(here, there):
                self.iptables(here.ns, "-I", "FORWARD", "1", *rule)
            here.blocked.add(there.name)

    def unblock_udp(self, a: Router, b: Router) -> None:
        for here, there in ((a, b), (b, a)):
            if there.name not in here.blocked:
                continue
            for rule in self._block_rules(here, there):
                self.iptables(here.ns, "-D", "FORWARD", *rule, check=False)
            here.blocked.discard(there.name)

    def conntrack(self, router: Router, *args: str) -> str:
        """``conntrack ARGS`` in the router (``-L -p udp`` by default); "" without the tool."""
        if not has_conntrack_tool():
            return ""
        r = self.exec(router.ns, "conntrack", *(args or ("-L", "-p", "udp")), check=False)
        return r.stdout

    def udp_mappings(self, router: Router) -> list[dict[str, Any]]:
        """The router's UDP conntrack entries, parsed (src, sport, dst, dport, reply, timeout, flags)."""
        out = []
        for line in self.conntrack(router).splitlines():
            fields = re.findall(r"(\w+)=(\S+)", line)
            if not fields:
                continue
            first: dict[str, str] = {}
            reply: dict[str, str] = {}
            for key, value in fields:
                (first if key not in first else reply)[key] = value
            words = line.split()
            out.append({"src": first.get("src", ""), "sport": first.get("sport", ""),
                        "dst": first.get("dst", ""), "dport": first.get("dport", ""),
                        "reply_src": reply.get("src", ""), "reply_dport": reply.get("dport", ""),
                        "timeout": words[2] if len(words) > 2 else "",
                        "assured": "[ASSURED]" in line, "unreplied": "[UNREPLIED]" in line, "line": line})
        return out

    def forward_counters(self, router: Router) -> str:
        """``iptables -L FORWARD -v -n``: how many packets each rule took (evidence)."""
        return self.iptables(router.ns, "-L", "FORWARD", "-v", "-n", "-x", check=False).stdout

    # --- raw UDP probes (checking the lab itself) -------------------------------------------------

    def udp_reflector(self, host: Host, ports: Sequence[int], seconds: float = 30.0,
                      alt: bool = False) -> Process:
        """
        A UDP reflector on ``host``: each datagram to one of ``ports`` is
        answered with the sender's ``IP:PORT`` as seen here, from the same
        port, and with ``alt`` also from port+1000 (a filtering check).
        """
        args = {"mode": "reflect", "ports": list(ports), "seconds": seconds, "alt": alt}
        proc = self.spawn(host, [sys.executable, "-c", UDP_TOOL, _json(args)],
                          f"reflector-{host.name}-{ports[0]}")
        proc.wait_for_output(r"^ready", 10)
        return proc

    def udp_probe(self, host: Host, local_port: int, targets: Sequence[tuple[str, int]],
                  wait: float = 1.0) -> list[dict[str, Any]]:
        """
        From ``host``'s UDP ``local_port``, one datagram to each target; every
        datagram that comes back within ``wait`` s: ``{"from": "IP:PORT", "said": TEXT}``.
        """
        args = {"mode": "probe", "port": local_port, "targets": [list(t) for t in targets], "wait": wait}
        r = self.exec(host.ns, sys.executable, "-c", UDP_TOOL, _json(args), timeout=wait + 20)
        return _loads(r.stdout)

    def udp_poke(self, host: Host, local_port: int, target: tuple[str, int], wait: float = 3.0) -> Process:
        """
        In the background: one datagram from ``host``'s ``local_port`` to
        ``target``, then whatever arrives for ``wait`` s (``results(proc)``).
        """
        args = {"mode": "probe", "port": local_port, "targets": [list(target)], "wait": wait}
        proc = self.spawn(host, [sys.executable, "-c", UDP_TOOL, _json(args)],
                          f"poke-{host.name}-{local_port}")
        proc.wait_for_output(r"^sent", 10)
        return proc

    # --- processes -------------------------------------------------------------------------------------

    def spawn(self, host: Host, argv: Sequence[str], name: str, env: Mapping[str, str] | None = None,
              folder: str | None = None) -> Process:
        """``argv`` inside ``host``'s namespace; killed at close.  Output in the work folder."""
        with self._lock:
            if self._closed:
                raise LabError("the lab is closed")
            proc = Process(["ip", "netns", "exec", host.ns, *argv], folder or self.workdir, name, cwd=REPO,
                           env=python_env(env))
            self.processes.append(proc)
        return proc

    def adopt(self, pid: int, host: Host, name: str) -> None:
        """A process one of our commands started in the background (a daemon): killed at close."""
        with self._lock:
            self.adopted.append((pid, host.ns, name))

    def namespace_of(self, pid: int) -> str | None:
        """Which of the lab's namespaces ``pid`` lives in (None: gone, or not in one of ours)."""
        key = _ns_key(f"/proc/{pid}/ns/net")
        if key is None:
            return None
        for ns in self.namespaces:
            if _ns_key(f"/run/netns/{ns}") == key:
                return ns
        return None

    def kill_adopted(self, pid: int, sig: int = signal.SIGTERM) -> bool:
        """Signal an adopted PID if it is still inside its lab namespace (never a reused PID)."""
        for known, ns, _ in self.adopted:
            if known == pid:
                if self.namespace_of(pid) != ns:
                    return False
                try:
                    os.kill(pid, sig)
                    return True
                except ProcessLookupError:
                    return False
        raise LabError(f"pid {pid} was not started by this lab")

    def pids_in(self, ns: str) -> list[int]:
        """Live processes inside namespace ``ns`` (what ``ip netns pids`` says, without a subprocess)."""
        return _pids_in(ns)

    # --- cleanup ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill our processes, delete our veths and namespaces, remove the work folder.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: list[str] = []
        for proc in self.processes:
            proc.send_signal(signal.SIGTERM)
        for pid, ns, _ in self.adopted:
            if self.namespace_of(pid) == ns:
                _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline:
            if not any(p.running for p in self.processes) and not _pids_by_ns(self.namespaces):
                break
            time.sleep(0.05)
        for proc in self.processes:
            proc.kill()
        # Anything still inside our namespaces was started there by us (directly, or by a
        # `daemon start` we ran): nothing else enters a namespace this run created.
        for pid in _pids_by_ns(self.namespaces):
            _signal(pid, signal.SIGKILL)
        for ns, ifname in reversed(self.veths):
            subprocess.run(["ip", "-n", ns, "link", "del", ifname], capture_output=True,
                           timeout=COMMAND_TIMEOUT)
        for ns in reversed(self.namespaces):
            r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True,
                               timeout=COMMAND_TIMEOUT)
            if r.returncode != 0 and ns in _list_namespaces():
                errors.append(f"ip netns del {ns}: {r.stderr.strip()}")
        if not self.keep_files:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._restore_handlers()
        try:
            atexit.unregister(self.close)
        except Exception:
            pass
        if errors:
            print("natlab cleanup problems:\n  " + "\n  ".join(errors), file=sys.stderr)

    @property
    def closed(self) -> bool:
        return self._closed

    def leftovers(self) -> list[str]:
        """Namespaces with our prefix that still exist (empty after close)."""
        return [ns for ns in _list_namespaces() if ns.startswith(self.prefix + "-")]

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            try:
                if signal.getsignal(signum) == signal.SIG_IGN:
                    continue  # ignored by whoever started us (a background job): keep it so
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except (ValueError, OSError):
                pass

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            try:
                if signal.getsignal(signum) == self._on_signal:
                    signal.signal(signum, handler)
            except (ValueError, OSError, TypeError):
                pass
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        """
        Clean up first, then do what the signal did before: SIGTERM and SIGHUP
        end the process; SIGINT raises KeyboardInterrupt (trial records it in
        the running test and goes on, so the lab's remaining tests skip: the
        lab is closed).
        """
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        print(f"\nnatlab: {signal.Signals(signum).name}: removing lab {self.prefix}", file=sys.stderr,
              flush=True)
        self.close()
        if callable(previous):
            previous(signum, frame)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def describe(self) -> str:
        lines = [f"lab {self.prefix} (work folder {self.workdir})"]
        for t in self.transits.values():
            lines.append(f"  transit {t.name:<11} up {t.up_ip:<15} region {t.net}")
        for r in self.routers.values():
            lines.append(f"  router {r.name:<12} {r.kind:<16} wan {r.wan_ip:<15} lan {r.lan}")
            for h in r.hosts:
                lines.append(f"    host {h.name:<12} {h.ip:<15} public {h.public_ip or '(NAT)'}")
        for h in self.hosts.values():
            if h.router is None:
                lines.append(f"  host {h.name:<14} {h.ip:<15} (public segment)")
        return "\n".join(lines)


UDP_TOOL = r'''
import json, select, socket, sys, time
args = json.loads(sys.argv[1])
if args["mode"] == "reflect":
    socks = {}
    for port in args["ports"]:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        socks[s] = port
        if args["alt"]:
            a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            a.bind(("0.0.0.0", port + 1000))
            socks[a] = None
    print("ready", flush=True)
    end = time.monotonic() + args["seconds"]
    while time.monotonic() < end:
        ready, _, _ = select.select(list(socks), [], [], 0.2)
        for s in ready:
            data, addr = s.recvfrom(2048)
            text = ("%s:%d" % addr).encode()
            s.sendto(text, addr)
            if args["alt"]:
                alt = [x for x, p in socks.items() if p is None and x.getsockname()[1] == socks[s] + 1000]
                if alt:
                    alt[0].sendto(text, addr)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", args["port"]))
    for host, port in args["targets"]:
        s.sendto(b"probe", (host, port))
    print("sent", flush=True)
    got = []
    end = time.monotonic() + args["wait"]
    while time.monotonic() < end:
        ready, _, _ = select.select([s], [], [], max(0.0, end - time.monotonic()))
        if ready:
            data, addr = s.recvfrom(2048)
            got.append({"from": "%s:%d" % addr, "said": data.decode("ascii", "replace")})
    print(json.dumps(got), flush=True)
'''


def _json(value: Any) -> str:
    import json
    return json.dumps(value)


def _loads(stdout: str) -> list[dict[str, Any]]:
    import json
    for line in reversed(stdout.splitlines()):
        if line.startswith("["):
            return list(json.loads(line))
    return []


def probe_results(proc: Process, timeout: float = 15.0) -> list[dict[str, Any]]:
    """What a background :meth:`Lab.udp_poke` received (waits for it to finish)."""
    proc.wait(timeout)
    return _loads(proc.stdout())


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _ns_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _pids_in(ns: str) -> list[int]:
    key = _ns_key(f"/run/netns/{ns}")
    if key is None:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ns_key(f"/proc/{entry}/ns/net") == key:
            out.append(int(entry))
    return out


def _pids_by_ns(namespaces: Iterable[str]) -> list[int]:
    """Live processes inside any of ``namespaces`` (one pass over /proc)."""
    keys = {k for k in (_ns_key(f"/run/netns/{ns}") for ns in namespaces) if k is not None}
    if not keys:
        return []
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _ns_key(f"/proc/{e}/ns/net") in keys]


def _list_namespaces() -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def stale_namespaces() -> list[str]:
    """Lab namespaces (``nl<PID>-...``) whose process is gone (a SIGKILLed run leaves them)."""
    out = []
    for ns in _list_namespaces():
        m = re.match(r"nl(\d+)-", ns)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            out.append(ns)
    return out


def main(argv: Iterable[str] = ()) -> int:
    """``python -m tests.natlab.topology --sweep``: list (and with --sweep delete) stale lab namespaces."""
    args = list(argv)
    stale = stale_namespaces()
    for ns in stale:
        print(ns)
        if "--sweep" in args:
            for pid in _pids_in(ns):
                _signal(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
