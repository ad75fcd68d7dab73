"""
The NAT matrix: two real nodes for every pair of network kinds, each test
one cell.

Kinds: ``public`` (a host on the public segment, no NAT) and the router
kinds of ``tests.natlab.topology`` (``one_to_one``, ``port_restricted``,
``symmetric``, ``firewall``, ``udp_blocked``), every unordered pair
including a kind with itself (two routers of that kind), plus
``shared_lan``: two hosts on one LAN behind the same port-restricted NAT.

One lab serves the module (built at the first cell, removed at exit): the
rendezvous, a router of each kind twice (``-a``, ``-b``) with one host each,
two public hosts and the shared LAN.  Each cell starts two fresh nodes
(new identities) on the cell's hosts, and:

1. trusts them (A: ``pilotctl handshake B``; B: ``pilotctl approve A``);
2. measures the time from A's first ping to B's first answer (one echo per
   try, 2 s each, up to ``NATLAB_PING_DEADLINE`` s, default 20);
3. echoes 1 MiB of random bytes through B's port 7 and compares;
4. reads the path each side reports (``pilotctl --json peers``: ``path``);
5. asserts: answered, byte-exact, and the path: ``relay`` where no direct
   path can exist (:func:`relay_reason`), else ``direct`` or ``punched``.

Each cell prints one line of figures and appends a JSON record to
``$NATLAB_RESULTS`` (default ``/tmp/natlab-results-<PID>.jsonl``).
``python3 -m tests.natlab.test_matrix --write-doc RESULTS`` writes the
table under "## NAT lab matrix" in ``docs/nat.md`` from such a file;
``NATLAB_WRITE_DOC=1`` does it at the end of the run.  ``NATLAB_PING_DEADLINE``
and ``NATLAB_TRANSFER_TIMEOUT`` (seconds) bound the waits.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import textwrap
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.procs import REPO
from tests.natlab.nodes import (
    Node, Rendezvous, echo_transfer, first_ping, module_lab, start_nodes, stop_nodes, trust_pair,
)
from tests.natlab.topology import KINDS, Host, Lab

PING_DEADLINE = float(os.environ.get("NATLAB_PING_DEADLINE", "20"))
TRANSFER_SIZE = 1 << 20
TRANSFER_TIMEOUT = float(os.environ.get("NATLAB_TRANSFER_TIMEOUT", "60"))
#: After the transfer, the path must have settled for this long (s) at most.
PATH_SETTLE = 5.0
#: A pair relayed by a conntrack collision (two open-INPUT routers on one segment) must reach direct
#: within this long (s) of the trust that starts it (issue 10's 40 s after the collision, plus the
#: handshake and the first punch): the recovery rounds' first one (docs/nat.md, "Recovery").
RECOVERY_BAR = 45.0

ALL_KINDS = ("public", *KINDS)
CELLS: list[tuple[str, str]] = [(a, b) for i, a in enumerate(ALL_KINDS) for b in ALL_KINDS[i:]]
CELLS.append(("shared_lan", "shared_lan"))

#: Router kinds whose own INPUT chain matters: with it open (no INPUT filter, as on Docker,
#: Podman and libvirt hosts and cloud NAT instances) a peer's datagram that arrives before our
#: host sent to it is delivered to the router and can move our mapping (docs/nat.md, "The
#: conntrack collision").  ``one_to_one`` forwards everything to its host and ``firewall``
#: routes the host's own address, so neither has a router-local port to collide on.
OPEN_INPUT_KINDS = ("port_restricted", "symmetric", "udp_blocked")
#: The same cells again with every such router's INPUT open: each pair with at least one of them.
OPEN_CELLS: list[tuple[str, str]] = [(a, b) for a, b in CELLS[:-1]
                                     if a in OPEN_INPUT_KINDS or b in OPEN_INPUT_KINDS]
DROP, OPEN, SEGMENT = "drop", "open_input", "open_one_segment"
#: In the open style, A's open-INPUT router sits behind a transit router (one hop between the two
#: NATs, as on every internet path).  This cell runs the open EIM pair once more with both routers on
#: the public segment itself, as two hosts of one cloud subnet are: no hop between them.
SEGMENT_CELLS: list[tuple[str, str]] = [("port_restricted", "port_restricted")]

SHORT = {"public": "pub", "one_to_one": "one", "port_restricted": "prc", "symmetric": "sym",
         "firewall": "fwl", "udp_blocked": "udp", "shared_lan": "lan"}

DIRECT_PATHS = ("direct", "punched")


def relay_reason(a: str, b: str) -> str | None:
    """Why the pair can only be relayed (None: a direct or punched path exists)."""
    kinds = {a, b}
    if "udp_blocked" in kinds:
        return "UDP to anything but the rendezvous is blocked"
    if a == b == "symmetric":
        return "both mappings depend on the destination: neither side can learn the other's port"
    if "symmetric" in kinds and kinds & {"port_restricted", "firewall"}:
        # The other side filters by address and port; the symmetric side's port towards it
        # is not the one the beacon saw, so the other side never opens its filter for it.
        return "symmetric mapping against port-restricted filtering"
    return None


def expected_paths(a: str, b: str) -> tuple[str, ...]:
    return ("relay",) if relay_reason(a, b) else DIRECT_PATHS


# --- the module's lab --------------------------------------------------------------------------------

class MatrixLab:
    def __init__(self) -> None:
        self.lab = Lab()
        try:
            lab = self.lab
            self.rv_host = lab.add_rendezvous_host()
            self.hosts: dict[tuple[str, str, str], Host] = {}
            far = lab.add_transit("far")
            for side in "ab":
                self.hosts[("public", side, DROP)] = self.hosts[("public", side, OPEN)] = \
                    lab.add_public_host(f"pub-{side}")
                for kind in KINDS:
                    router = lab.add_router(f"{SHORT[kind]}-{side}", kind)
                    self.hosts[(kind, side, DROP)] = lab.add_host(router, f"{SHORT[kind]}-{side}-h")
                    if kind in OPEN_INPUT_KINDS:
                        router = lab.add_router(f"{SHORT[kind]}-o{side}", kind, drop_wan_input=False,
                                                transit=far if side == "a" else None)
                        self.hosts[(kind, side, OPEN)] = lab.add_host(router, f"{SHORT[kind]}-o{side}-h")
                        self.hosts[(kind, side, SEGMENT)] = self.hosts[(kind, side, OPEN)]
                    else:
                        self.hosts[(kind, side, OPEN)] = self.hosts[(kind, side, DROP)]
            for kind, _ in SEGMENT_CELLS:
                router = lab.add_router(f"{SHORT[kind]}-sa", kind, drop_wan_input=False)
                self.hosts[(kind, "a", SEGMENT)] = lab.add_host(router, f"{SHORT[kind]}-sa-h")
            shared = lab.add_router("lan", "port_restricted")
            for side in "ab":
                self.hosts[("shared_lan", side, DROP)] = lab.add_host(shared, f"lan-{side}-h")
            self.rendezvous = Rendezvous(lab, self.rv_host).start()
        except BaseException:
            self.lab.close()
            raise
        self.cells_run = 0

    def pair(self, a: str, b: str, style: str = DROP) -> tuple[Host, Host]:
        return self.hosts[(a, "a", style)], self.hosts[(b, "b", style)]


_lab: list[MatrixLab] = []


def matrix_lab() -> MatrixLab:
    lab: MatrixLab = module_lab(_lab, MatrixLab)
    return lab


# --- results -------------------------------------------------------------------------------------------

def results_path() -> str:
    default = os.path.join(tempfile.gettempdir(), f"natlab-results-{os.getpid()}.jsonl")
    return os.path.abspath(os.environ.get("NATLAB_RESULTS") or default)


_run_results: list[dict[str, Any]] = []


def record(result: dict[str, Any]) -> None:
    _run_results.append(result)
    with open(results_path(), "a") as f:
        f.write(json.dumps(result, sort_keys=True) + "\n")
    print("\n" + summary_line(result), flush=True)


def _secs(value: Any) -> str:
    return "-" if value is None else f"{value:.2f} s"


def summary_line(r: dict[str, Any]) -> str:
    transfer = r.get("transfer") or {}
    if transfer.get("exact"):
        moved = f"1 MiB echo byte-exact in {transfer['seconds']:.2f} s"
    elif transfer:
        moved = f"1 MiB echo FAILED ({transfer.get('received')} bytes back, {transfer.get('error')})"
    else:
        moved = "no transfer (no ping)"
    style = {DROP: "", OPEN: " (router INPUT open)", SEGMENT: " (router INPUT open, one segment)"}.get(
        r.get("style", DROP), "")
    return (f"[natlab] {r['a']} x {r['b']}{style}: trust {_secs(r.get('trust_s'))}, first ping "
            f"{_secs(r.get('first_ping_s'))} ({r.get('ping_tries')} tries), {moved}, path "
            f"A {r.get('path_a')} / B {r.get('path_b')} (expected {'|'.join(r['expected'])}): "
            f"{'PASS' if r.get('passed') else 'FAIL'}")


class NATMatrixTests(SynchronousTestCase):
    """One test per cell; the methods are generated below from CELLS."""

    def run_cell(self, index: int, a: str, b: str, style: str = DROP) -> None:
        env = matrix_lab()
        lab, rv = env.lab, env.rendezvous
        host_a, host_b = env.pair(a, b, style)
        tag = f"m{index:02d}"
        na = Node(lab, host_a, f"{tag}-{SHORT[a]}-a", rv)
        nb = Node(lab, host_b, f"{tag}-{SHORT[b]}-b", rv)
        self.addCleanup(stop_nodes, [na, nb])
        started = time.monotonic()
        start_nodes([na, nb])
        result: dict[str, Any] = {"cell": tag, "a": a, "b": b, "style": style,
                                  "expected": list(expected_paths(a, b)),
                                  "relay_reason": relay_reason(a, b), "host_a": host_a.ip,
                                  "host_b": host_b.ip,
                                  "started_s": round(time.monotonic() - started, 2)}
        failures: list[str] = []
        transfer = None
        try:
            trusting = time.monotonic()
            result["trust_s"] = round(trust_pair(na, nb), 3)
            ping = first_ping(na, nb.name, deadline=PING_DEADLINE)
            result.update(first_ping_s=None if ping.seconds is None else round(ping.seconds, 3),
                          ping_tries=ping.tries, ping_errors=sorted(set(ping.errors))[:5])
            if not ping.ok:
                failures.append(f"no ping from A to B answered within {PING_DEADLINE:g} s "
                                f"({ping.tries} tries: {sorted(set(ping.errors))[:3]})")
            else:
                user_view = na.ctl("ping", nb.name, "--count", "2", "--timeout", "2")
                rtts = [r.get("rtt_ms") for r in (user_view.data or {}).get("results", [])]
                result["pilotctl_ping"] = {"rc": user_view.rc, "rtt_ms": rtts if user_view.ok else None,
                                           "error": user_view.error or None}
                transfer = echo_transfer(na, nb.name, TRANSFER_SIZE, TRANSFER_TIMEOUT)
                result["transfer"] = {"exact": transfer.exact, "seconds": round(transfer.seconds or 0, 3),
                                      "received": transfer.received, "error": transfer.error,
                                      "mib_per_s": transfer.mib_per_s and round(transfer.mib_per_s, 2)}
                if not transfer.exact:
                    failures.append(f"1 MiB echo not byte-exact: {transfer!r}")
                back = first_ping(nb, na.name, deadline=5.0)
                result["ping_back_s"] = None if back.seconds is None else round(back.seconds, 3)
            settle_end = time.monotonic() + PATH_SETTLE
            while True:
                row_a, row_b = na.peer_row(nb) or {}, nb.peer_row(na) or {}
                settled = row_a.get("path") != "trying" and row_b.get("path") != "trying"
                if settled or time.monotonic() > settle_end:
                    break
                time.sleep(0.2)
            if expected_paths(a, b) == DIRECT_PATHS and "relay" in (row_a.get("path"), row_b.get("path")):
                # relayed by a collision: the recovery's first round brings the pair direct
                result["relayed_reasons"] = [row_a.get("path_reason"), row_b.get("path_reason")]
                while time.monotonic() - trusting < RECOVERY_BAR:
                    row_a, row_b = na.peer_row(nb) or {}, nb.peer_row(na) or {}
                    if row_a.get("path") in DIRECT_PATHS and row_b.get("path") in DIRECT_PATHS:
                        result["direct_after_s"] = round(time.monotonic() - trusting, 1)
                        break
                    time.sleep(0.25)
            result.update(path_a=row_a.get("path"), path_b=row_b.get("path"),
                          reason_a=row_a.get("path_reason"), reason_b=row_b.get("path_reason"),
                          tunnel_a=row_a.get("tunnel"),
                          tunnel_b=row_b.get("tunnel"), endpoint_a_sees=row_a.get("endpoint"),
                          endpoint_b_sees=row_b.get("endpoint"))
            expected = expected_paths(a, b)
            for side, path in (("A", result["path_a"]), ("B", result["path_b"])):
                if path not in expected:
                    failures.append(f"{side}'s path to its peer is {path!r}, expected {' or '.join(expected)}"
                                    + (f" ({relay_reason(a, b)})" if relay_reason(a, b) else ""))
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
            result["error"] = str(e)[:2000]
        result["counters_a"] = na.counters()
        result["counters_b"] = nb.counters()
        result["passed"] = not failures
        result["failures"] = failures
        result["cell_s"] = round(time.monotonic() - started, 2)
        record(result)
        if failures:
            self.fail(f"{a} x {b} ({style}): " + "; ".join(failures) + "\n"
                      + na.evidence(nb) + "\n" + nb.evidence(na)
                      + "\n--- rendezvous (last lines)\n" + rv.log_tail(15))


def _make_test(index: int, a: str, b: str, style: str = DROP) -> Any:
    def test(self: NATMatrixTests) -> None:
        self.run_cell(index, a, b, style)
    test.__name__ = f"test_{index:02d}_{a}__{b}" + ("" if style == DROP else f"__{style}")
    test.__doc__ = f"{a} x {b} ({style}): expected path {' or '.join(expected_paths(a, b))}"
    return test


for _i, (_a, _b) in enumerate(CELLS, 1):
    setattr(NATMatrixTests, f"test_{_i:02d}_{_a}__{_b}", _make_test(_i, _a, _b))
for _i, (_a, _b) in enumerate(OPEN_CELLS, len(CELLS) + 1):
    setattr(NATMatrixTests, f"test_{_i:02d}_{_a}__{_b}__{OPEN}", _make_test(_i, _a, _b, OPEN))
for _i, (_a, _b) in enumerate(SEGMENT_CELLS, len(CELLS) + len(OPEN_CELLS) + 1):
    setattr(NATMatrixTests, f"test_{_i:02d}_{_a}__{_b}__{SEGMENT}", _make_test(_i, _a, _b, SEGMENT))


# --- the docs/nat.md section ----------------------------------------------------------------------------

HEADING = "## NAT lab matrix"
DOC = os.path.join(REPO, "docs", "nat.md")


def load_results(path: str) -> list[dict[str, Any]]:
    """The last record of each cell in a results file."""
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                cells[(r["a"], r["b"], r.get("style", DROP))] = r
    return sorted(cells.values(), key=_order)


def _order(r: dict[str, Any]) -> int:
    """Where a record's cell comes in the table: the drop style's cells, then the open-input ones."""
    cells = ([(a, b, DROP) for a, b in CELLS] + [(a, b, OPEN) for a, b in OPEN_CELLS]
             + [(a, b, SEGMENT) for a, b in SEGMENT_CELLS])
    key = (r["a"], r["b"], r.get("style", DROP))
    return cells.index(key) if key in cells else 999


def _wrap(text: str) -> list[str]:
    """Fill at 78 columns, never inside a `code span`."""
    glued = re.sub(r"`[^`]*`", lambda m: m.group(0).replace(" ", "\0"), text)
    lines = textwrap.wrap(glued, 78, break_on_hyphens=False, break_long_words=False)
    return [line.replace("\0", " ") for line in lines] + [""]


def _time(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def render_section(results: list[dict[str, Any]], when: str | None = None) -> str:
    when = when or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    passed = sum(1 for r in results if r.get("passed"))
    lines = [HEADING, ""]
    lines += _wrap(
        "Generated by `tests/natlab/test_matrix.py` from a run of the lab, real "
        "`pilotctl rendezvous start` and `pilotctl daemon start` processes in Linux "
        f"network namespaces ({when}, Linux {platform.release()}, {os.cpu_count()} CPUs): "
        f"{passed} of {len(results)} cells passed. Run it as root with "
        "`python3 -m twisted.trial tests.natlab` (the matrix alone: `tests.natlab.test_matrix`); "
        "`NATLAB_WRITE_DOC=1` rewrites this section at the end of the run, and "
        "`python3 -m tests.natlab.test_matrix --write-doc RESULTS.jsonl` from a saved run.")
    lines += _wrap(
        "Each cell: two fresh nodes, A on the first kind and B on the second; A runs "
        "`pilotctl handshake B` and B `pilotctl approve A`; *first ping* is the time from "
        "A's first ping to B's first answer (one echo per try, 2 s per try, so a relayed "
        "cell shows its first try timing out); *1 MiB echo* sends 1 MiB of random bytes "
        "through B's port 7 and compares what comes back; *path* is what `pilotctl --json "
        "peers` says on A / on B afterwards. Expected: `relay` only where no direct path "
        "can exist (either side `udp_blocked`; `symmetric` against `symmetric`, "
        "`port_restricted` or `firewall`, which filters the same way), else `direct` or "
        "`punched`. Both are right: a first contact with a public endpoint is a punch "
        "through the beacon (`punched`); a side with no NAT acts on its command 0.1 s "
        "later, so the peer's key exchange may reach it first (`direct` on that side). "
        "A pair relayed by a collision (the `open, one segment` cell) must reach `direct` "
        "or `punched` within 45 s of the handshake; the path column says after how long.")
    lines += _wrap(
        "Kinds: `public` no NAT; `one_to_one` 1:1 NAT, no filtering; `port_restricted` "
        "endpoint-independent mapping (MASQUERADE), address-and-port-dependent filtering; "
        "`symmetric` `MASQUERADE --random-fully`, same filtering; `firewall` routed public "
        "address, same filtering; `udp_blocked` NAT with UDP allowed only to the rendezvous; "
        "`shared_lan` two hosts behind one port-restricted NAT that does not hairpin: they "
        "meet directly on their LAN, because the registry gives a node's LAN endpoint "
        "(`local_addr`) to a requester with the same public address. Style `drop`: every NAT "
        "router drops unsolicited WAN input to itself, as home routers do. Style `open`: the "
        "`port_restricted`, `symmetric` and `udp_blocked` routers have no INPUT filter (Docker, "
        "Podman and libvirt hosts, cloud NAT instances), so a peer's datagram that arrives "
        "before the host sent to it is delivered to the router and can move the host's mapping "
        "(the conntrack collision above); every pair with at least one such router runs again "
        "in that style, with A's router behind a transit router (one hop between the NATs, as "
        "on internet paths). Style `open, one segment`: the EIM pair once more with both open "
        "routers on the public segment, as two hosts of one cloud subnet are.")
    lines += [
        "| A | B | style | expected | path A / B | first ping | 1 MiB echo | result |",
        "|---|---|---|---|---|---:|---|---|",
    ]
    for r in results:
        transfer = r.get("transfer") or {}
        if transfer.get("exact"):
            echo = f"exact, {_time(transfer['seconds'])}"
        elif transfer:
            echo = f"**failed** ({transfer.get('received')} B back)"
        else:
            echo = "not run"
        verdict = "pass" if r.get("passed") else "**FAIL**: " + "; ".join(r.get("failures") or [])[:160]
        style = {OPEN: "open", SEGMENT: "open, one segment"}.get(r.get("style", DROP), "drop")
        lines.append(f"| {r['a']} | {r['b']} | {style} | {' or '.join(r['expected'])} | "
                     f"{r.get('path_a') or '-'} / {r.get('path_b') or '-'}"
                     + (f" (relay until {r['direct_after_s']:.1f} s)" if r.get("direct_after_s") else "")
                     + " | "
                     f"{_time(r.get('first_ping_s'))} | {echo} | {verdict.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write_doc(section: str, path: str = DOC) -> None:
    """Replace (or add) the "## NAT lab matrix" section of ``path``; the rest is untouched."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == HEADING), None)
    if start is None:
        body = text.rstrip("\n")
        text = (body + "\n\n" if body else "") + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        after = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + after if after else "")
    tmp = path + ".natlab.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_doc_at_exit() -> None:
    if _run_results and os.environ.get("NATLAB_WRITE_DOC", "").strip() not in ("", "0"):
        write_doc(render_section(sorted(_run_results, key=_order)))
        print(f"natlab: wrote the matrix to {DOC}", file=sys.stderr)


def _print_table_at_exit() -> None:
    if _run_results:
        print("\nNAT lab matrix (this run):")
        for r in _run_results:
            print("  " + summary_line(r))
        print(f"records: {results_path()}")


atexit.register(_write_doc_at_exit)
atexit.register(_print_table_at_exit)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--write-doc":
        write_doc(render_section(load_results(argv[1])))
        print(f"wrote {HEADING!r} in {DOC}")
        return 0
    print("usage: python3 -m tests.natlab.test_matrix --write-doc RESULTS.jsonl", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
