"""
The rendezvous' HTTP side as a real process (``pilotctl rendezvous start
--http 127.0.0.1:0``), with nodes registering over real TCP:

* ``/metrics`` (``prometheus_client``'s Twisted resource, served from a
  thread of the reactor's pool) parses with ``prometheus_client``'s parser
  and its counters move as nodes register;
* ``/api/stats`` holds no address, key or hostname of any node;
* the dashboard in headless Chromium: no console error, the count of 50
  registered nodes, then 60 once 10 more register, and a screenshot
  (``dashboard-*.png`` in the test's folder under ``_trial_temp``).  Skipped
  with the reason when there is no Chromium (CI installs Debian's);
* ``--http`` under twistd's plugin and the tac (``PILOT_HTTP``) as well.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from pilot.identity import Identity
from tests.integration.browser import Chromium, find_chromium
from tests.integration.peers import RegistryClient, register_message, set_hostname_message
from tests.integration.procs import (
    LOOPBACK, TWISTD, RendezvousTestMixin, rendezvous_args, wait_for_rendezvous, wait_until,
)

DASHBOARD_LINE = r"Dashboard on 127\.0\.0\.1:(\d+) "
DASHBOARD_LOG = r"Dashboard listening on 127\.0\.0\.1:(\d+)"


def ident(n: int) -> Identity:
    return Identity.from_seed(b"dash" + n.to_bytes(4, "big") * 7)


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.status, reply.read()


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class DashboardTests(RendezvousTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.rendezvous = self.start_rendezvous(extra=["--http", f"{LOOPBACK}:0", "--registrations-per-minute", "0"])
        self.http = int(self.rendezvous.proc.wait_for_output(DASHBOARD_LINE).group(1))
        self.base = f"http://{LOOPBACK}:{self.http}"
        self.client = RegistryClient(self.rendezvous.registry_port)
        self.addCleanup(self.client.close)
        self.nodes: list[tuple[Identity, int]] = []

    def register(self, first: int, count: int) -> None:
        for n in range(first, first + count):
            who = ident(n)
            reply = self.client.request(register_message(who, f"127.0.0.1:{20000 + n}"))
            self.assertEqual(reply["type"], "register_ok", reply)
            node_id = reply["node_id"]
            reply = self.client.request(set_hostname_message(who, node_id, f"secret-{n}"))
            self.assertEqual(reply["type"], "set_hostname_ok", reply)
            self.nodes.append((who, node_id))

    def test_metrics_move(self) -> None:
        status, before = get(self.base + "/metrics")
        self.assertEqual(status, 200)
        first = samples(before)
        self.assertEqual(first[("pilot_nodes_total", ())], 0)
        self.register(1, 5)
        after = samples(get(self.base + "/metrics")[1])
        self.assertEqual(after[("pilot_nodes_total", ())], 5)
        self.assertEqual(after[("pilot_nodes_online", ())], 5)
        self.assertEqual(after[("pilot_registrations_total", ())], 5)
        self.assertEqual(after[("pilot_requests_total", (("type", "register"),))], 5)
        self.assertEqual(after[("pilot_requests_total", (("type", "set_hostname"),))], 5)
        self.assertEqual(after[("pilot_request_duration_seconds_count", (("type", "register"),))], 5)
        self.assertGreater(after[("pilot_request_duration_seconds_sum", (("type", "register"),))], 0.0)

    def test_api_stats_private_nothing(self) -> None:
        self.register(1, 20)

        def fresh() -> bytes | None:  # a reading is reused for up to a second
            status, body = get(self.base + "/api/stats")
            self.assertEqual(status, 200)
            return body if json.loads(body)["total_nodes"] == 20 else None
        body = wait_until(fresh, 5.0, "/api/stats with 20 nodes")
        text = body.decode()
        self.assertNotIn("127.0.0.1", text)
        for n, (who, node_id) in enumerate(self.nodes, start=1):
            for secret in (who.public_key_b64, who.public_key.hex(), f"secret-{n}", f":{20000 + n}"):
                self.assertNotIn(secret, text)

    def test_in_chromium(self) -> None:
        binary, why = find_chromium()
        if binary is None:
            raise SkipTest(why)
        self.register(1, 50)
        folder = os.path.abspath(self.mktemp())
        browser = Chromium(binary, os.path.join(folder, "profile"))
        self.addCleanup(browser.close)
        browser.open(self.base + "/")
        browser.wait_for_text("total-nodes", "50")
        browser.wait_for_text("active-nodes", "50")
        browser.screenshot(os.path.join(folder, "dashboard-50.png"))
        self.register(51, 10)
        # the page polls every 5 s (pilot.web.page.POLL_SECONDS)
        browser.wait_for_text("total-nodes", "60", timeout=15)
        browser.screenshot(os.path.join(folder, "dashboard-60.png"))
        self.assertEqual(browser.errors(), [])
        self.assertTrue(os.path.getsize(os.path.join(folder, "dashboard-60.png")) > 1000)


class StartMethodTests(RendezvousTestMixin, SynchronousTestCase):
    """``--http`` under twistd's plugin and the tac (``PILOT_HTTP``), as under pilotctl above."""

    def check(self, proc: Any) -> None:
        rendezvous = wait_for_rendezvous(proc, None)
        port = int(proc.wait_for_output(DASHBOARD_LOG).group(1))
        with RegistryClient(rendezvous.registry_port) as client:
            self.assertEqual(client.request(register_message(ident(1)))["type"], "register_ok")
        wait_until(lambda: json.loads(get(f"http://{LOOPBACK}:{port}/api/stats")[1])["total_nodes"] == 1, 5.0,
                   "/api/stats with the node")
        self.assertIn(b"pilot_nodes_total 1.0", get(f"http://{LOOPBACK}:{port}/metrics")[1])

    def test_twistd_plugin(self) -> None:
        self.check(self.spawn(TWISTD + ["-n", "--pidfile=", "pilot-rendezvous",
                                        *rendezvous_args(None, ["--http", f"{LOOPBACK}:0"])], "twistd"))

    def test_tac(self) -> None:
        env = {"PILOT_LISTEN": f"{LOOPBACK}:0", "PILOT_BEACON": f"{LOOPBACK}:0", "PILOT_STORE": "none",
               "PILOT_HTTP": f"{LOOPBACK}:0"}
        self.check(self.spawn_python(TWISTD[1:] + ["-n", "--pidfile=", "-y", "tac/rendezvous.tac"], "tac", env=env))
