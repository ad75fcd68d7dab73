"""
Tests for L{pilot.nodeconfig}: where the node's settings come from (flags,
then ``PILOT_*`` variables, then ``$PILOT_HOME/config.json``, then the
defaults; ``docs/config.md``) and what bad input gives.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.errors import InvalidArgument
from pilot.nodeconfig import (BEACON_PORT, DEFAULT_HEARTBEAT, DEFAULT_REGISTRY, NODE_OPTIONS, config_path,
                              load_settings, parse_bool, read_config)

KEY = base64.b64encode(b"\x07" * 32).decode()


class SettingsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)

    def config(self, **values: Any) -> None:
        with open(config_path(self.home), "w") as f:
            json.dump(values, f)

    def load(self, flags: dict[str, Any] | None = None, **environ: str) -> Any:
        return load_settings(flags or {}, environ, self.home)

    def test_defaults(self) -> None:
        settings = self.load()
        self.assertEqual(settings.home, self.home)
        self.assertEqual(settings.registry, DEFAULT_REGISTRY)
        self.assertEqual(settings.beacon, f"127.0.0.1:{BEACON_PORT}")
        self.assertEqual(settings.listen, ":0")
        self.assertEqual(settings.heartbeat, DEFAULT_HEARTBEAT)
        self.assertFalse(settings.public)
        self.assertEqual(settings.tags, ())
        self.assertIsNone(settings.hostname)
        self.assertEqual(settings.identity, os.path.join(self.home, "identity.json"))
        self.assertEqual(settings.socket, os.path.join(self.home, "pilot.sock"))
        self.assertEqual(settings.trust_path, os.path.join(self.home, "trust.json"))

    def test_home_from_the_environment(self) -> None:
        settings = load_settings({}, {"PILOT_HOME": self.home})
        self.assertEqual(settings.home, self.home)

    def test_precedence(self) -> None:
        """A flag beats a variable, which beats the config file, which beats the default."""
        self.config(registry="10.0.0.3:9000", hostname="from-config", heartbeat=5, tags=["c"])
        env = {"PILOT_REGISTRY": "10.0.0.2:9000", "PILOT_HOSTNAME": "from-env"}
        settings = self.load({"registry": "192.0.2.1:9000"}, **env)
        self.assertEqual(settings.registry, "192.0.2.1:9000")
        self.assertEqual(settings.hostname, "from-env")
        self.assertEqual(settings.heartbeat, 5.0)
        self.assertEqual(settings.tags, ("c",))
        self.assertEqual(settings.listen, ":0")

    def test_unset_flags_do_not_hide_lower_sources(self) -> None:
        """argparse gives None (and False for switches) for a flag not given."""
        self.config(public=True, hostname="kept")
        settings = self.load({"hostname": None, "public": False})
        self.assertEqual(settings.hostname, "kept")
        self.assertTrue(settings.public)

    def test_beacon_follows_the_registry(self) -> None:
        for registry, beacon in [("rendezvous.example:7000", f"rendezvous.example:{BEACON_PORT}"),
                                 ("[::1]:7000", f"[::1]:{BEACON_PORT}")]:
            self.assertEqual(self.load({"registry": registry}).beacon, beacon, registry)
        self.assertEqual(self.load({"registry": "192.0.2.1:7000", "beacon": "192.0.2.9:7001"}).beacon,
                         "192.0.2.9:7001")

    def test_normal_forms(self) -> None:
        settings = self.load({"registry": " 192.0.2.1:09000 ", "listen": "9000", "tags": "a, b c"},
                             PILOT_PUBLIC="yes")
        self.assertEqual(settings.registry, "192.0.2.1:9000")
        self.assertEqual(settings.listen, ":9000")
        self.assertEqual(settings.tags, ("a", "b", "c"))
        self.assertTrue(settings.public)
        self.assertEqual(self.load({"listen": "localhost:5"}).listen, "127.0.0.1:5")

    def test_config_keys_with_hyphens_and_auto_approve(self) -> None:
        self.config(**{"registry-fingerprint": "AB:CD", "auto_approve": {"public_keys": [KEY], "tags": ["ops"]}})
        settings = self.load()
        self.assertEqual(settings.registry_fingerprint, "AB:CD")
        self.assertEqual(settings.auto_approve.public_keys, (b"\x07" * 32,))
        self.assertEqual(settings.auto_approve.tags, ("ops",))

    def test_unknown_config_keys_are_ignored(self) -> None:
        self.config(colour="blue")
        self.assertEqual(self.load().registry, DEFAULT_REGISTRY)

    def test_bad_values(self) -> None:
        """Each bad value is refused with the option at fault and where to look."""
        for flags, env, words in [
            ({"registry": "nonsense"}, {}, "--registry"),
            ({"registry": "192.0.2.1:0"}, {}, "1 to 65535"),
            ({"registry": "::1:9000"}, {}, "brackets"),
            ({"beacon": "h:99999"}, {}, "--beacon"),
            ({"listen": "example.com:0"}, {}, "not an IP address"),
            ({"listen": ":65536"}, {}, "--listen"),
            ({"heartbeat": "0"}, {}, "--heartbeat"),
            ({"heartbeat": "soon"}, {}, "not a number"),
            ({"hostname": "Not A Name!"}, {}, "--hostname"),
            ({"log_format": "xml"}, {}, "--log-format"),
            ({}, {"PILOT_REGISTRY": "x"}, "--registry"),
            ({}, {"PILOT_PUBLIC": "maybe"}, "PILOT_PUBLIC"),
        ]:
            with self.assertRaises(InvalidArgument, msg=repr((flags, env))) as raised:
                self.load(flags, **env)
            self.assertIn(words, raised.exception.message, repr((flags, env)))
            self.assertIn("PILOT_" if env else "flags", raised.exception.hint or "", repr((flags, env)))

    def test_bad_config_values(self) -> None:
        for values, words in [({"public": "maybe"}, "public"), ({"registry": "nowhere"}, "--registry"),
                              ({"auto_approve": {"colours": []}}, "auto_approve"),
                              ({"auto_approve": {"public_keys": ["short"]}}, "public key")]:
            self.config(**values)
            with self.assertRaises(InvalidArgument, msg=repr(values)) as raised:
                self.load()
            self.assertIn(words, raised.exception.message, repr(values))
            self.assertIn(config_path(self.home), raised.exception.hint or "", repr(values))

    def test_broken_config_file(self) -> None:
        for content in (b"{", b"[1, 2]", b"\xff"):
            with open(config_path(self.home), "wb") as f:
                f.write(content)
            with self.assertRaises(InvalidArgument, msg=repr(content)) as raised:
                self.load()
            self.assertIn(config_path(self.home), raised.exception.hint or "")

    def test_missing_config_file(self) -> None:
        self.assertEqual(read_config(self.home), {})


class ParserTests(SynchronousTestCase):
    def test_bool(self) -> None:
        for word in ("1", "true", "Yes", " on "):
            self.assertTrue(parse_bool(word), word)
        for word in ("0", "false", "NO", "off", ""):
            self.assertFalse(parse_bool(word), word)
        self.assertRaises(ValueError, parse_bool, "2")

    def test_every_option_has_a_parser_and_help(self) -> None:
        names = [o.name for o in NODE_OPTIONS]
        self.assertEqual(len(names), len(set(names)))
        for option in NODE_OPTIONS:
            self.assertTrue(option.help, option.name)


class ServerListTests(SynchronousTestCase):
    """``--registry`` / ``--beacon`` as lists (docs/config.md, docs/registration.md)."""

    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)

    def load(self, flags: dict[str, Any] | None = None, **environ: str) -> Any:
        return load_settings(flags or {}, environ, self.home)

    def test_one_entry_is_unchanged(self) -> None:
        settings = self.load({"registry": "192.0.2.1:9000"})
        self.assertEqual((settings.registry, settings.beacon), ("192.0.2.1:9000", f"192.0.2.1:{BEACON_PORT}"))
        self.assertEqual(settings.registries, ("192.0.2.1:9000",))
        self.assertEqual(settings.fingerprints, (None,))

    def test_lists_pair_in_order(self) -> None:
        settings = self.load({}, PILOT_REGISTRY=" 192.0.2.1:9000, rv-b.example:09000 ",
                             PILOT_BEACON="192.0.2.1:9001,rv-b.example:9001")
        self.assertEqual(settings.registries, ("192.0.2.1:9000", "rv-b.example:9000"))
        self.assertEqual(settings.beacons, ("192.0.2.1:9001", "rv-b.example:9001"))
        self.assertEqual(settings.registry, "192.0.2.1:9000,rv-b.example:9000")

    def test_beacons_default_per_registry(self) -> None:
        settings = self.load({"registry": "192.0.2.1:7000,[2001:db8::1]:7000"})
        self.assertEqual(settings.beacons, (f"192.0.2.1:{BEACON_PORT}", f"[2001:db8::1]:{BEACON_PORT}"))

    def test_config_file_list(self) -> None:
        with open(config_path(self.home), "w") as f:
            json.dump({"registry": ["192.0.2.1:9000", "192.0.2.2:9000"]}, f)
        self.assertEqual(self.load().registries, ("192.0.2.1:9000", "192.0.2.2:9000"))

    def test_fingerprints_one_for_all_or_one_each(self) -> None:
        one, two = "a" * 64, "b" * 64
        settings = self.load({"registry": "192.0.2.1:9000,192.0.2.2:9000", "registry_fingerprint": one})
        self.assertEqual(settings.fingerprints, (one, one))
        settings = self.load({"registry": "192.0.2.1:9000,192.0.2.2:9000", "registry_fingerprint": f"{one},{two}"})
        self.assertEqual(settings.fingerprints, (one, two))

    def test_bad_lists(self) -> None:
        nine = ",".join(f"192.0.2.{i}:9000" for i in range(1, 10))
        for flags, words in [
            ({"registry": "192.0.2.1:9000,192.0.2.2:9000", "beacon": "192.0.2.1:9001"}, "2 registry entries but 1"),
            ({"registry": "192.0.2.1:9000", "beacon": "192.0.2.1:9001,192.0.2.2:9001"}, "1 registry entries but 2"),
            ({"registry": "192.0.2.1:9000,,192.0.2.2:9000"}, "empty"),
            ({"registry": "192.0.2.1:9000,"}, "empty"),
            ({"registry": "192.0.2.1:9000,192.0.2.1:09000"}, "twice"),
            ({"registry": "192.0.2.1:9000,nowhere"}, "--registry"),
            ({"registry": nine}, "at most 8"),
            ({"registry": "192.0.2.1:9000,192.0.2.2:9000,192.0.2.3:9000",
              "registry_fingerprint": "a,b"}, "3 registry entries but 2 TLS fingerprints"),
            ({"registry_fingerprint": "a,,b"}, "empty fingerprint"),
        ]:
            with self.assertRaises(InvalidArgument, msg=repr(flags)) as raised:
                self.load(flags)
            self.assertIn(words, raised.exception.message, repr(flags))
            self.assertEqual(raised.exception.code.name, "invalid_argument")
