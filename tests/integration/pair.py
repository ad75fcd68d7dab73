"""
A primary and a standby rendezvous as real processes on 127.0.0.1 (``python
-m pilot rendezvous start``, the token in ``PILOT_REPLICATION_TOKEN``), for
the replication integration tests.
"""

from __future__ import annotations

import os

from tests.integration.procs import Rendezvous, RendezvousTestMixin, rendezvous_args, wait_for_rendezvous

TOKEN = "integration-token-0123456789"
TAKEOVER = 2.0
OPTIONS = ["--flush-delay", "0.02", "--registrations-per-minute", "0", "--requests-per-second", "0",
           "--takeover-after", str(TAKEOVER)]


class PairMixin(RendezvousTestMixin):
    primary_store = ""

    def start_pair(self, primary_extra: list[str] | None = None) -> tuple[Rendezvous, Rendezvous]:
        """A primary and its standby, once the standby holds the primary's store."""
        env = {"PILOT_REPLICATION_TOKEN": TOKEN}
        folder = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(folder)
        self.primary_store = os.path.join(folder, "primary.json")
        primary = self.start_pair_member(self.primary_store, [*OPTIONS, *(primary_extra or [])], "primary", env)
        standby = self.start_pair_member(os.path.join(folder, "standby.json"),
                                         [*OPTIONS, "--standby", f"127.0.0.1:{primary.registry_port}"],
                                         "standby", env)
        standby.proc.wait_for_output(r"holding the store of", stream="stderr")
        primary.proc.wait_for_output(r"Replication: primary \(term 1\)")
        standby.proc.wait_for_output(rf"Replication: standby of 127\.0\.0\.1:{primary.registry_port} \(term 1\)")
        return primary, standby

    def start_pair_member(self, store: str, extra: list[str], name: str,
                          env: dict[str, str] | None = None) -> Rendezvous:
        proc = self.spawn_python(["-m", "pilot", "rendezvous", "start", *rendezvous_args(store, extra)], name,
                                 env=env if env is not None else {"PILOT_REPLICATION_TOKEN": TOKEN})
        return wait_for_rendezvous(proc, store)
