"""Tests for L{pilot.endpoint}: one grammar, three contracts (wire text, listen address, server address)."""

from twisted.trial.unittest import SynchronousTestCase

from pilot.endpoint import format_endpoint, parse_endpoint, parse_host_port, parse_listen, parse_port
from pilot.errors import InvalidArgument


class EndpointTests(SynchronousTestCase):
    """Wire text: IP literals only, port 1..65535, None (never an exception) for anything else."""

    def test_round_trip(self) -> None:
        for host, port in (("127.0.0.1", 9000), ("::1", 9001), ("fe80::1", 1)):
            self.assertEqual(parse_endpoint(format_endpoint(host, port)), (host, port))
        self.assertEqual(format_endpoint("::1", 5), "[::1]:5")

    def test_refused(self) -> None:
        for text in (None, 5, "", "1.2.3.4", "1.2.3.4:0", "1.2.3.4:65536", "1.2.3.4:\u00b2", "host:80",
                     "[::1]", "1.2.3.4:80:", "x" * 100 + ":80", "80", "[::1]80", "[::1:80"):
            self.assertIsNone(parse_endpoint(text), text)

    def test_normal_form(self) -> None:
        """The address comes back in its normal form, whatever the peer wrote."""
        self.assertEqual(parse_endpoint("[0:0:0:0:0:0:0:1]:7"), ("::1", 7))


class PortTests(SynchronousTestCase):
    """A listen_addr on the wire: only its port counts (the host is whatever the registry sees)."""

    def test_port(self) -> None:
        for text, port in [(":4000", 4000), ("0.0.0.0:4000", 4000), ("[::]:4000", 4000), ("name:1", 1),
                           ("1.2.3.4:65535", 65535)]:
            self.assertEqual(parse_port(text), port, text)

    def test_none(self) -> None:
        for text in (None, 4000, "", "4000", ":0", ":65536", ":x", ":\u00b2", "[::]4000", "1.2.3.4:"):
            self.assertIsNone(parse_port(text), text)


class ListenParsingTests(SynchronousTestCase):
    def test_good(self) -> None:
        for text, expected in [
            (":9000", ("", 9000)), ("9000", ("", 9000)), ("127.0.0.1:9000", ("127.0.0.1", 9000)),
            ("[::1]:9000", ("::1", 9000)), ("[::]:9001", ("::", 9001)), ("0.0.0.0:0", ("0.0.0.0", 0)),
            ("localhost:9000", ("127.0.0.1", 9000)), (" :9000 ", ("", 9000)), (":0", ("", 0)),
        ]:
            self.assertEqual(parse_listen(text), expected, text)

    def test_bad(self) -> None:
        for text, words in [
            ("", "[host]:port"), (":", "port"), ("9000x", "port"), (":65536", "0 to 65535"), (":-1", "port"),
            ("::1:9000", "brackets"), ("[::1]9000", "[::1]:9000"), ("[::1:9000", "[::1]:9000"),
            ("[127.0.0.1]:9000", "not an IPv6"), ("example.com:9000", "not an IP address"),
            ("300.1.2.3:9000", "not an IP address"), (":\u00b2", "port"),
        ]:
            with self.assertRaises(InvalidArgument, msg=text) as raised:
                parse_listen(text)
            self.assertIn(words, raised.exception.message, text)
            self.assertIn(repr(text), raised.exception.message)

    def test_format(self) -> None:
        self.assertEqual([format_endpoint("", 9000), format_endpoint("192.0.2.1", 1), format_endpoint("::1", 2)],
                         [":9000", "192.0.2.1:1", "[::1]:2"])
        for text in (":9000", "192.0.2.1:1", "[::1]:2"):
            self.assertEqual(format_endpoint(*parse_listen(text)), text)


class HostPortParsingTests(SynchronousTestCase):
    """A server typed by a user: a name or an IP, port 1..65535."""

    def test_good(self) -> None:
        for text, expected in [
            ("127.0.0.1:9000", ("127.0.0.1", 9000)), ("rendezvous.example:9000", ("rendezvous.example", 9000)),
            ("[::1]:9000", ("::1", 9000)), (" localhost:1 ", ("localhost", 1)), ("h:65535", ("h", 65535)),
        ]:
            self.assertEqual(parse_host_port(text), expected, text)

    def test_bad(self) -> None:
        for text, words in [
            ("", "host:port"), ("9000", "HOST:PORT"), (":9000", "HOST:PORT"), ("h:0", "1 to 65535"),
            ("h:65536", "1 to 65535"), ("h:x", "port"), ("::1:9000", "brackets"), ("[h]:9000", "not an IPv6"),
            ("a b:1", "HOST:PORT"), ("[::1]", "[::1]:9000"),
        ]:
            with self.assertRaises(InvalidArgument, msg=text) as raised:
                parse_host_port(text)
            self.assertIn(words, raised.exception.message, text)
            self.assertIn(repr(text), raised.exception.message)
