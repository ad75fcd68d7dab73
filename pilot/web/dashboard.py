# -*- test-case-name: tests.web.test_dashboard -*-
"""
The rendezvous' HTTP resources: ``/`` (the dashboard page), ``/api/stats``
(JSON) and ``/metrics`` (Prometheus, loopback peers only unless told
otherwise), and nothing else.

Every resource answers GET and HEAD (twisted.web answers HEAD from GET);
another method gets 405, a path below a leaf or anywhere else 404; query
strings are ignored.  Replies carry ``Cache-Control: no-store`` and
``X-Content-Type-Options: nosniff``; the page carries a content security
policy that allows its own script and style only (``pilot.web.page``).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Callable

from twisted.web.iweb import IRequest
from twisted.web.resource import ErrorPage, IResource, NoResource, Resource

from pilot.web import page
from pilot.web.stats import RendezvousStats


def _common(request: IRequest, content_type: bytes) -> None:
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")


class Leaf(Resource):
    """A resource with no children: a longer path is 404 (a trailing slash too)."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        if request.postpath:
            return NoResource().render(request)
        result: bytes = super().render(request)
        return result


class DashboardPage(Leaf):
    def render_GET(self, request: IRequest) -> bytes:
        _common(request, b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", page.CONTENT_SECURITY_POLICY)
        request.setHeader(b"x-frame-options", b"DENY")
        return page.PAGE


class StatsResource(Leaf):
    """``/api/stats``: :meth:`RendezvousStats.public` as JSON, encoded once per reading."""

    def __init__(self, stats: RendezvousStats) -> None:
        super().__init__()
        self.stats = stats
        self._cached: tuple[object, int, bytes] | None = None

    def body(self) -> bytes:
        figures = self.stats.figures()
        key = (figures, len(self.stats.history) and id(self.stats.history[-1]))
        if self._cached is None or self._cached[:2] != key:
            text = json.dumps(self.stats.public(), separators=(",", ":"), sort_keys=True).encode()
            self._cached = (key[0], key[1], text)
        return self._cached[2]

    def render_GET(self, request: IRequest) -> bytes:
        _common(request, b"application/json")
        request.setHeader(b"access-control-allow-origin", b"*")
        return self.body()


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class LoopbackOnly(Resource):
    """Serves ``inner`` (a leaf, e.g. the metrics) to loopback peers; 403 to the others."""

    isLeaf = True

    def __init__(self, inner: IResource, allow: Callable[[str], bool] = is_loopback) -> None:
        super().__init__()
        self.inner = inner
        self.allow = allow

    def render(self, request: IRequest) -> bytes:
        if request.postpath:
            return NoResource().render(request)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return ErrorPage(405, "Method Not Allowed", "GET or HEAD only").render(request)
        client = request.getClientAddress()
        if not self.allow(getattr(client, "host", "")):
            return ErrorPage(403, "Forbidden", "the metrics are served to this host only").render(request)
        result: bytes = self.inner.render(request)
        return result


class Folder(Resource):
    """A path segment that only holds children: 404 by itself."""

    def render(self, request: IRequest) -> bytes:
        result: bytes = NoResource().render(request)
        return result


def rendezvous_root(stats: RendezvousStats, metrics: IResource | None, metrics_public: bool = False) -> Resource:
    """The resource tree: ``/``, ``/api/stats`` and (when given) ``/metrics``."""
    root = Folder()
    root.putChild(b"", DashboardPage())
    api = Folder()
    api.putChild(b"stats", StatsResource(stats))
    root.putChild(b"api", api)
    if metrics is not None:
        root.putChild(b"metrics", metrics if metrics_public else LoopbackOnly(metrics))
    return root


def metrics_root(metrics: IResource, metrics_public: bool = False) -> Resource:
    """A node's tree: ``/metrics`` only."""
    root = Folder()
    root.putChild(b"metrics", metrics if metrics_public else LoopbackOnly(metrics))
    return root
