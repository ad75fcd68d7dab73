#!/usr/bin/env python3
"""
Throughput of one stream across the NAT lab's plain path (root only).

Builds the topology of ``tests/natlab/test_paths.py``'s ``plain`` case in its
own network namespaces (a rendezvous host and B on the public segment; A
behind a ``port_restricted`` router in a transit router's region; veths,
bridges and iptables NAT, no shaping), starts the real rendezvous and two
real node daemons in them, makes A and B trust each other and measures:

* ``sink``: one direction, A -> B, into a sink on B (``listen`` + ``attach``
  on B's control socket, drained by a thread here), as
  ``benchmarks/tunnel.py`` does on 127.0.0.1;
* ``echo``: the test's echo through B's port 7 (both directions at once),
  with ``tests.natlab.nodes.echo_transfer``.

For each: MiB/s, the daemons' CPU seconds and CPU per packet sent or
received (``/proc/PID/stat``; ``info`` counters), the stream's state sampled
every 0.2 s on the sender (``info`` -> ``conn_list``: ``cong_win``,
``srtt_ms``, ``in_flight``, ``peer_recv_win``, ``retransmits``), the
discovered datagram size (``peers`` -> ``mtu``), and the drops the kernel
counted in every namespace on the way (``/proc/net/snmp``'s UDP errors,
``ip -s link`` drops).  The load average is printed with the figures.

    sudo python3 benchmarks/natlab_throughput.py
    sudo python3 benchmarks/natlab_throughput.py --mib 50 --modes sink,echo --repeat 2

Addresses are the lab's (documentation ranges inside namespaces this script
creates); every transfer is bounded by ``--time-limit``; the namespaces and
processes are removed at the end, on error and on SIGINT/SIGTERM too.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from procstat import cpu_seconds, run_stoppable  # noqa: E402

from pilot.control_client import ControlClient  # noqa: E402
from tests.natlab.nodes import (  # noqa: E402
    Node, Rendezvous, echo_transfer, first_ping, start_nodes, stop_nodes, trust_pair,
)
from tests.natlab.topology import Lab, has_conntrack_tool  # noqa: E402

CHUNK = 64 * 1024
SAMPLE_EVERY = 0.2


def user_system(pid: int) -> tuple[float, float]:
    """The process's user and system CPU seconds so far (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --- kernel counters ---------------------------------------------------------------------------

def snmp_udp(lab: Lab, ns: str) -> dict[str, int]:
    """``/proc/net/snmp``'s Udp line inside ``ns``."""
    text = lab.exec(ns, "cat", "/proc/net/snmp").stdout
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    if len(rows) < 2:
        return {}
    return {k: int(v) for k, v in zip(rows[0], rows[1])}


def link_drops(lab: Lab, ns: str) -> dict[str, int]:
    """Every interface's rx/tx drops and errors inside ``ns`` (``ip -s -j link``)."""
    out: dict[str, int] = {}
    for link in json.loads(lab.ip(ns, "-s", "-j", "link").stdout or "[]"):
        stats = link.get("stats64") or link.get("stats") or {}
        for way in ("rx", "tx"):
            s = stats.get(way) or {}
            for key in ("dropped", "errors", "over_errors", "missed"):
                if s.get(key):
                    out[f"{link['ifname']}.{way}.{key}"] = int(s[key])
    return out


def conntrack_stats(lab: Lab, ns: str) -> dict[str, int]:
    """``conntrack -S`` inside ``ns``: drops, failed inserts and invalid packets, summed over the CPUs."""
    if not has_conntrack_tool():
        return {}
    out: dict[str, int] = {}
    for line in lab.exec(ns, "conntrack", "-S", check=False).stdout.splitlines():
        for field in line.split():
            key, _, value = field.partition("=")
            if key in ("drop", "early_drop", "insert_failed", "invalid", "error") and value.isdigit():
                out[f"conntrack.{key}"] = out.get(f"conntrack.{key}", 0) + int(value)
    return out


UDP_COUNTERS = ("InDatagrams", "OutDatagrams", "InErrors", "RcvbufErrors", "SndbufErrors", "NoPorts")


def kernel(lab: Lab) -> dict[str, dict[str, int]]:
    """Per namespace: its UDP counters, its links' drops and errors, its conntrack's drops."""
    out: dict[str, dict[str, int]] = {}
    for ns in lab.namespaces:
        udp = snmp_udp(lab, ns)
        row: dict[str, int] = {k: udp[k] for k in UDP_COUNTERS if k in udp}
        row.update(link_drops(lab, ns))
        row.update(conntrack_stats(lab, ns))
        out[ns] = row
    return out


Counters = dict[str, dict[str, int]]


def kernel_delta(before: Counters, after: Counters) -> Counters:
    out: dict[str, dict[str, int]] = {}
    for ns, row in after.items():
        d = {k: v - before.get(ns, {}).get(k, 0) for k, v in row.items()}
        d = {k: v for k, v in d.items() if v}
        if d:
            out[ns] = d
    return out


# --- the daemons' view ---------------------------------------------------------------------------

def stack_counters(node: Node) -> dict[str, int]:
    return dict((node.counters() or {}).get("stack") or {})


class ConnSampler(threading.Thread):
    """The sender's ``conn_list`` rows every SAMPLE_EVERY s (the connections to ``port``)."""

    def __init__(self, node: Node, port: int, until: float) -> None:
        super().__init__(daemon=True)
        self.node, self.port, self.until = node, port, until
        self.rows: list[dict[str, Any]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        client = ControlClient(self.node.socket, 5.0)
        try:
            while not self.halt.is_set() and time.monotonic() < self.until:
                try:
                    info = client.request("info", {}, timeout=5.0)
                except Exception:
                    break
                for c in info.get("conn_list") or []:
                    if c.get("remote_port") == self.port and c.get("state") == "ESTABLISHED":
                        c = dict(c)
                        c["t"] = time.monotonic()
                        self.rows.append(c)
                self.halt.wait(SAMPLE_EVERY)
        finally:
            client.close()

    def summary(self) -> dict[str, Any]:
        if not self.rows:
            return {}

        def series(key: str) -> list[float]:
            return [float(r[key]) for r in self.rows if r.get(key) is not None]

        def spread(key: str) -> str:
            v = sorted(series(key))
            if not v:
                return "-"
            return f"{v[0]:g}/{v[len(v) // 2]:g}/{v[-1]:g}"

        last = self.rows[-1]
        return {"samples": len(self.rows),
                "cong_win min/med/max": spread("cong_win"), "in_flight": spread("in_flight"),
                "srtt_ms": spread("srtt_ms"), "peer_recv_win": spread("peer_recv_win"),
                "unacked": spread("unacked"),
                "retransmits": last.get("retransmits"), "fast_retx": last.get("fast_retx"),
                "sack_recv": last.get("sack_recv"), "dup_acks": last.get("dup_acks"),
                "segs_sent": last.get("segs_sent"), "in_recovery": last.get("in_recovery")}


class Sink(threading.Thread):
    """``listen`` on ``node``'s ``port``; attach the first stream and read it to its end or the deadline."""

    def __init__(self, node: Node, port: int, deadline: float) -> None:
        super().__init__(daemon=True)
        self.client = ControlClient(node.socket, 30.0)
        self.subscription = self.client.subscribe("listen", deadline, port=port)
        self.deadline = deadline
        self.received = 0
        self.last_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event in self.subscription:
                if event.get("event") == "accepted":
                    self.drain(self.client.attach(int(event["conn_id"])))
                    return
        except BaseException as e:  # reported by the main thread
            self.error = e
        finally:
            self.subscription.close()
            self.client.close()

    def drain(self, sock: socket.socket) -> None:
        buf = bytearray(256 * 1024)
        with sock:
            while time.monotonic() < self.deadline:
                sock.settimeout(0.5)
                try:
                    n = sock.recv_into(buf)
                except socket.timeout:
                    continue
                if n == 0:
                    return
                self.received += n
                self.last_at = time.monotonic()


def drops(delta: dict[str, dict[str, int]]) -> dict[str, int]:
    """The non-zero drop and error counters of a kernel delta, by namespace and name."""
    return {f"{ns}:{k}": v for ns, row in delta.items() for k, v in row.items()
            if k not in ("InDatagrams", "OutDatagrams") and v}


# --- the runs ---------------------------------------------------------------------------------------

def measure(lab: Lab, a: Node, b: Node, mode: str, size: int, limit: float, port: int) -> dict[str, Any]:
    assert a.pid is not None and b.pid is not None
    k0 = kernel(lab)
    s0a, s0b = stack_counters(a), stack_counters(b)
    c0 = {"a": cpu_seconds(a.pid), "b": cpu_seconds(b.pid)}
    us0 = {"a": user_system(a.pid), "b": user_system(b.pid)}
    own0 = os.times()
    load = loadavg()
    sampler = ConnSampler(a, 7 if mode == "echo" else port, time.monotonic() + limit + 5)
    result: dict[str, Any] = {"mode": mode, "mib": size / (1 << 20), "load_before": load}
    if mode == "echo":
        sampler.start()
        t = echo_transfer(a, b.name, size, limit)
        seconds, moved, ok, error = t.seconds or float("nan"), t.received, t.exact, t.error
    else:
        sink = Sink(b, port, time.monotonic() + limit + 10)
        sink.start()
        sock = a.client(30.0).open_stream(b.name, port, timeout=30.0)
        sampler.start()
        block = os.urandom(CHUNK)
        sent = 0
        start = time.monotonic()
        deadline = start + limit
        sock.settimeout(0.5)
        try:
            while sent < size and time.monotonic() < deadline:
                try:
                    sent += sock.send(block[:min(CHUNK, size - sent)])
                except socket.timeout:
                    continue
            sock.shutdown(socket.SHUT_WR)
            while sink.is_alive() and sink.received < sent and time.monotonic() < deadline + 10:
                time.sleep(0.005)
        finally:
            sock.close()
        sink.join(15)
        seconds = (sink.last_at or time.monotonic()) - start
        moved, ok = sink.received, sink.received == size and sink.error is None
        error = None if sink.error is None else str(sink.error)
    sampler.halt.set()
    sampler.join(5)
    own1 = os.times()
    c1 = {"a": cpu_seconds(a.pid), "b": cpu_seconds(b.pid)}
    us1 = {"a": user_system(a.pid), "b": user_system(b.pid)}
    s1a, s1b = stack_counters(a), stack_counters(b)

    def d(s1: dict[str, int], s0: dict[str, int], key: str) -> int:
        return int(s1.get(key, 0)) - int(s0.get(key, 0))

    pk = {"a_sent": d(s1a, s0a, "packets.sent"), "a_recv": d(s1a, s0a, "packets.received"),
          "b_sent": d(s1b, s0b, "packets.sent"), "b_recv": d(s1b, s0b, "packets.received")}
    cpu = {k: c1[k] - c0[k] for k in c0}
    result.update({
        "ok": ok, "error": error, "bytes": moved, "seconds": round(seconds, 2),
        "mib_per_s": round(moved / seconds / (1 << 20), 2) if seconds > 0 else None,
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "system_s": {k: round(us1[k][1] - us0[k][1], 2) for k in us0},
        "cpu_ms_per_mib": round(sum(cpu.values()) * 1000 / max(1e-9, moved / (1 << 20)), 1),
        "client_cpu_s": round((own1.user - own0.user) + (own1.system - own0.system), 2),
        "packets": pk,
        "us_per_packet": {k: round(cpu[k] * 1e6 / max(1, pk[f"{k}_sent"] + pk[f"{k}_recv"]), 1)
                          for k in ("a", "b")},
        "stack_delta_a": {k: d(s1a, s0a, k) for k in s1a if d(s1a, s0a, k)},
        "stack_delta_b": {k: d(s1b, s0b, k) for k in s1b if d(s1b, s0b, k)},
        "sender_conn": sampler.summary(),
        "kernel": kernel_delta(k0, kernel(lab)),
        "load_after": loadavg(),
    })
    return result


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("natlab_throughput: needs root (network namespaces)", file=sys.stderr)
        return 2
    lab = Lab()
    nodes: list[Node] = []
    try:
        rendezvous = Rendezvous(lab, lab.add_rendezvous_host()).start()
        if args.topology == "local":
            # both daemons and the rendezvous in one namespace, on its address: the datagrams
            # go through that namespace's loopback, no veth, no bridge, no NAT
            host = lab.hosts["rv"]
            local = [*args.node_args, "--listen", f"{host.ip}:0"]
            a = Node(lab, host, "tp-a", rendezvous, extra=local)
            b = Node(lab, host, "tp-b", rendezvous, extra=local)
        else:
            public = lab.add_public_host("tp-pub")
            transit = lab.add_transit("t-plain")
            router = lab.add_router("r-plain", "port_restricted", transit=transit)
            private = lab.add_host(router, "h-plain")
            a = Node(lab, private, "tp-a", rendezvous, extra=args.node_args)
            b = Node(lab, public, "tp-b", rendezvous, extra=args.node_args)
        nodes = [a, b]
        start_nodes(nodes)
        trust_pair(a, b)
        ping = first_ping(a, b.name, deadline=20.0)
        if not ping.ok:
            print(f"no ping: {ping.errors}", file=sys.stderr)
            return 1
        end = time.monotonic() + 15
        while time.monotonic() < end:
            ra, rb = a.peer_row(b) or {}, b.peer_row(a) or {}
            if ra.get("mtu_state") == "complete" and rb.get("mtu_state") == "complete":
                break
            time.sleep(0.25)
        ra, rb = a.peer_row(b) or {}, b.peer_row(a) or {}
        print(json.dumps({"cores": os.cpu_count(), "ping_rtt_ms": ping.rtt_ms, "path": ra.get("path"),
                          "mtu_a": ra.get("mtu"), "mtu_b": rb.get("mtu"), "mss_a": ra.get("mss")}),
              flush=True)
        size = int(args.mib * (1 << 20))
        for i in range(args.repeat):
            for mode in args.modes.split(","):
                r = measure(lab, a, b, mode, size, args.time_limit, 5000 + i)
                print(json.dumps(r), flush=True)
                conn = r["sender_conn"]
                exact = "exact" if r["ok"] else "NOT exact"
                print(f"# {args.topology} {mode}: {r['mib_per_s']} MiB/s ({exact}), "
                      f"daemons' CPU {r['cpu_ms_per_mib']} ms/MiB, {r['us_per_packet']} us/packet, "
                      f"sender cwnd {conn.get('cong_win min/med/max')} B, "
                      f"in flight {conn.get('in_flight')} B, "
                      f"srtt {conn.get('srtt_ms')} ms, retransmits {conn.get('retransmits')}, "
                      f"kernel drops/errors {drops(r['kernel']) or 'none'}; "
                      f"load {r['load_before']} -> {r['load_after']}", flush=True)
        return 0
    finally:
        stop_nodes(nodes)
        lab.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=float, default=30.0, help="MiB per transfer (default 30)")
    p.add_argument("--modes", default="sink,echo", help="comma-separated: sink, echo (default both)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--topology", choices=("plain", "local"), default="plain",
                   help="plain: the lab's path (default); local: both daemons in the rendezvous "
                        "host's namespace, datagrams through its loopback (the same programs without "
                        "the lab's path)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per transfer (default 60)")
    p.add_argument("--node-arg", dest="node_args", action="append", default=[],
                   help="an extra argument for both daemons' 'daemon start' (repeatable)")
    run_stoppable(run, p.parse_args())


if __name__ == "__main__":
    main()
