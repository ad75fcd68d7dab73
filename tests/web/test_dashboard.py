"""
Tests for L{pilot.web.dashboard} and L{pilot.web.page}: the resources one at
a time (C{DummyRequest}), then whole requests, hostile ones included,
through a L{twisted.web.server.Site} on a C{StringTransport}.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.test.requesthelper import DummyRequest

from pilot.web import page
from pilot.web.dashboard import LoopbackOnly, is_loopback, rendezvous_root
from pilot.web.stats import RendezvousStats
from tests.web.scene import Fleet


class FakeMetrics(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"pilot_nodes_total 1\n"


def render(root: Resource, path: bytes, method: bytes = b"GET", host: str = "127.0.0.1") -> DummyRequest:
    request = DummyRequest(path.split(b"/")[1:])
    request.method = method
    request.client = IPv6Address("TCP", host, 40000) if ":" in host else IPv4Address("TCP", host, 40000)
    resource = getChildForRequest(root, request)
    result = resource.render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    if request.responseCode is None:
        request.responseCode = 200  # DummyRequest leaves the default unset
    return request


def body(request: DummyRequest) -> bytes:
    return b"".join(request.written)


def header(request: DummyRequest, name: bytes) -> bytes | None:
    values = request.responseHeaders.getRawHeaders(name)
    return values[0] if values else None


class ResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fleet = Fleet()
        self.stats = RendezvousStats(self.fleet.registry, self.fleet.beacon, self.fleet.clock)
        self.root = rendezvous_root(self.stats, FakeMetrics())

    def test_page(self) -> None:
        request = render(self.root, b"/")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(body(request), page.PAGE)
        self.assertEqual(header(request, b"content-type"), b"text/html; charset=utf-8")
        self.assertEqual(header(request, b"content-security-policy"), page.CONTENT_SECURITY_POLICY)
        self.assertEqual(header(request, b"x-frame-options"), b"DENY")

    def test_page_is_self_contained(self) -> None:
        """Nothing fetched from elsewhere: no URL to another host, no src or href but a data: icon."""
        text = page.PAGE.decode()
        self.assertNotRegex(text, r"(?i)(src|href)=\"(?!data:)")
        self.assertNotIn("//cdn", text)
        urls = set(re.findall(r"https?://[^'\"\s)]+", text))
        self.assertEqual(urls, {"http://www.w3.org/2000/svg"})  # the SVG namespace, not fetched

    def test_stats(self) -> None:
        self.fleet.add(1)
        request = render(self.root, b"/api/stats")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(header(request, b"content-type"), b"application/json")
        self.assertEqual(header(request, b"cache-control"), b"no-store")
        doc = json.loads(body(request))
        for field in ("total_nodes", "active_nodes", "total_trust_links", "total_requests", "unique_tags",
                      "uptime_secs", "task_executors"):
            self.assertIn(field, doc)
        self.assertEqual(doc["total_nodes"], 1)

    def test_role_card(self) -> None:
        """The page shows the pair's role and term from ``/api/stats`` ("unpaired" when it is null)."""
        self.assertIn(b'id="role"', page.PAGE)
        self.assertIn(b"set('role',role(d.replication))", page.PAGE)
        self.assertIsNone(json.loads(body(render(self.root, b"/api/stats")))["replication"])

    def test_stats_encoded_once_per_reading(self) -> None:
        first = body(render(self.root, b"/api/stats"))
        self.fleet.add(1)
        self.assertIs(body(render(self.root, b"/api/stats")), first)
        self.fleet.clock.advance(1.0)
        self.assertIn(b'"total_nodes":1', body(render(self.root, b"/api/stats")))

    def test_not_found(self) -> None:
        for path in (b"/api", b"/api/", b"/api/stats/", b"/api/stats/x", b"/x", b"//", b"/index.html",
                     b"/metrics/x", b"/api/../metrics"):
            self.assertEqual(render(self.root, path).responseCode, 404, path)

    def test_other_methods(self) -> None:
        for path in (b"/", b"/api/stats", b"/metrics"):
            for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"):
                try:
                    request = render(self.root, path, method)
                except Exception as e:  # twisted.web.error.UnsupportedMethod: the Site answers 405
                    self.assertEqual(type(e).__name__, "UnsupportedMethod", (path, method))
                else:
                    self.assertEqual(request.responseCode, 405, (path, method))

    def test_metrics_to_loopback_only(self) -> None:
        for host in ("127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"):
            request = render(self.root, b"/metrics", host=host)
            self.assertEqual((request.responseCode, body(request)), (200, b"pilot_nodes_total 1\n"), host)
        for host in ("192.0.2.7", "::ffff:192.0.2.7", "2001:db8::1", "10.0.0.1"):
            request = render(self.root, b"/metrics", host=host)
            self.assertEqual(request.responseCode, 403, host)
            self.assertNotIn(b"pilot_", body(request))

    def test_metrics_public(self) -> None:
        root = rendezvous_root(self.stats, FakeMetrics(), metrics_public=True)
        self.assertEqual(render(root, b"/metrics", host="192.0.2.7").responseCode, 200)

    def test_no_metrics(self) -> None:
        root = rendezvous_root(self.stats, None)
        self.assertEqual(render(root, b"/metrics").responseCode, 404)

    def test_is_loopback(self) -> None:
        self.assertTrue(is_loopback("127.0.0.1"))
        self.assertFalse(is_loopback("localhost"))  # a name is not an address
        self.assertFalse(is_loopback(""))
        self.assertFalse(LoopbackOnly(FakeMetrics()).allow("0.0.0.0"))


def http(root: Resource, raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Feed ``raw`` to a Site; the status, headers and body of the reply."""
    site = Site(root)
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 40000))
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    reply = transport.value()
    protocol.connectionLost(None)  # type: ignore[arg-type]
    head, _, rest = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0] else 0
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    return status, headers, rest


class WholeRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fleet = Fleet()
        self.fleet.add(1)
        self.root = rendezvous_root(RendezvousStats(self.fleet.registry, self.fleet.beacon, self.fleet.clock),
                                    FakeMetrics())

    def get(self, target: bytes, method: bytes = b"GET") -> tuple[int, dict[bytes, bytes], bytes]:
        return http(self.root, method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    def test_query_strings_ignored(self) -> None:
        for target in (b"/api/stats?x=1", b"/api/stats?" + b"a=%00&" * 200, b"/api/stats?%ff%fe=<script>",
                       b"/?callback=alert(1)"):
            status, headers, _ = self.get(target)
            self.assertEqual(status, 200, target)

    def test_hostile_paths(self) -> None:
        for target in (b"/../../etc/passwd", b"/api/%2e%2e/metrics", b"/api%2fstats", b"/%00", b"/api/stats%00",
                       b"/" + b"a/" * 500, b"/api/stats/..", b"/metrics/../api/stats"):
            status, _, body = self.get(target)
            self.assertIn(status, (400, 404), target)
            self.assertNotIn(b"pilot_nodes_total", body)

    def test_methods(self) -> None:
        self.assertEqual(self.get(b"/api/stats", b"POST")[0], 405)
        self.assertIn(self.get(b"/", b"DELETE")[0], (405, 501))  # 501: a method twisted.web does not know
        status, headers, rest = self.get(b"/api/stats", b"HEAD")
        self.assertEqual((status, rest), (200, b""))

    def test_metrics_refused_to_a_remote_peer(self) -> None:
        status, _, body = self.get(b"/metrics")
        self.assertEqual(status, 403)
        self.assertNotIn(b"pilot_", body)
