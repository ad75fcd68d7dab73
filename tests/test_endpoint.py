"""Tests for L{pilot.endpoint}."""

from twisted.trial.unittest import SynchronousTestCase

from pilot.endpoint import format_endpoint, parse_endpoint


class EndpointTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        for host, port in (("127.0.0.1", 9000), ("::1", 9001), ("fe80::1", 1)):
            self.assertEqual(parse_endpoint(format_endpoint(host, port)), (host, port))
        self.assertEqual(format_endpoint("::1", 5), "[::1]:5")

    def test_refused(self) -> None:
        for text in (None, 5, "", "1.2.3.4", "1.2.3.4:0", "1.2.3.4:65536", "1.2.3.4:\u00b2", "host:80",
                     "[::1]", "1.2.3.4:80:", "x" * 100 + ":80"):
            self.assertIsNone(parse_endpoint(text), text)
