"""
Tests for L{pilot.names}: the reference's hostname and tag rules (docs/reference-wire.md §2.6).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pilot.names import MAX_TAGS, RESERVED_HOSTNAMES, hostname_problem, normalise_tags


class HostnameTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for name in ("a", "7", "agent-a", "agent-b", "a1", "1a", "a--b", "x" * 63, "a" + "-" * 61 + "b",
                     "0123456789", "abcdefghijklmnopqrstuvwxyz"):
            self.assertIsNone(hostname_problem(name), name)

    def test_length(self) -> None:
        self.assertIsNotNone(hostname_problem(""))
        self.assertIsNone(hostname_problem("x" * 63))
        self.assertIsNotNone(hostname_problem("x" * 64))
        self.assertIsNotNone(hostname_problem("x" * 10_000))

    def test_characters(self) -> None:
        for name in ("Agent", "AGENT", "agent_a", "agent.a", "agent a", " agent", "agent\n", "agent\x00",
                     "ag\u00e9nt", "\u0661\u0662", "a/b", "a:b", "*", "a@b", "\ud800"):
            self.assertIsNotNone(hostname_problem(name), repr(name))

    def test_ends(self) -> None:
        for name in ("-a", "a-", "-", "--", "-agent-"):
            self.assertIsNotNone(hostname_problem(name), name)

    def test_reserved(self) -> None:
        self.assertEqual(RESERVED_HOSTNAMES, {"localhost", "backbone", "broadcast"})
        for name in RESERVED_HOSTNAMES:
            problem = hostname_problem(name)
            self.assertIsNotNone(problem)
            self.assertIn("reserved", problem)
        # only the exact names are reserved
        for name in ("localhost1", "my-backbone", "broadcasts"):
            self.assertIsNone(hostname_problem(name))

    def test_not_text(self) -> None:
        for value in (None, 1, 1.5, b"agent", ["agent"], {"agent": 1}, True):
            self.assertIsNotNone(hostname_problem(value))  # type: ignore[arg-type]

    def test_problem_is_text(self) -> None:
        for name in ("", "A", "localhost", "-a", "x" * 64):
            self.assertIsInstance(hostname_problem(name), str)


class TagTests(SynchronousTestCase):
    def test_plain(self) -> None:
        self.assertEqual(normalise_tags(["demo", "test"]), ["demo", "test"])
        self.assertEqual(normalise_tags([]), [])

    def test_hash_stripped(self) -> None:
        self.assertEqual(normalise_tags(["#demo", "test"]), ["demo", "test"])

    def test_only_one_hash_stripped(self) -> None:
        self.assertRaises(ValueError, normalise_tags, ["##demo"])
        self.assertRaises(ValueError, normalise_tags, ["#"])

    def test_dedupe_keeps_first_order(self) -> None:
        self.assertEqual(normalise_tags(["b", "a", "#b", "a", "c"]), ["b", "a", "c"])

    def test_count(self) -> None:
        self.assertEqual(MAX_TAGS, 10)
        tags = [f"t{i}" for i in range(10)]
        self.assertEqual(normalise_tags(tags), tags)
        self.assertRaises(ValueError, normalise_tags, [f"t{i}" for i in range(11)])
        # the count is taken before de-duplication
        self.assertRaises(ValueError, normalise_tags, ["a"] * 11)

    def test_length(self) -> None:
        self.assertEqual(normalise_tags(["x" * 32]), ["x" * 32])
        self.assertEqual(normalise_tags(["#" + "x" * 32]), ["x" * 32])
        self.assertRaises(ValueError, normalise_tags, ["x" * 33])
        self.assertRaises(ValueError, normalise_tags, [""])
        self.assertEqual(normalise_tags(["x"]), ["x"])

    def test_characters(self) -> None:
        for tag in ("Demo", "de mo", "de_mo", "de.mo", "-demo", "demo-", "d\u00e9mo", "demo\n", "#-a",
                    "\ud800"):
            self.assertRaises(ValueError, normalise_tags, [tag])
        self.assertEqual(normalise_tags(["a-b", "a--b", "0-9"]), ["a-b", "a--b", "0-9"])

    def test_not_text(self) -> None:
        for value in (None, 1, ["a"], {"a": 1}, b"a", True):
            self.assertRaises(ValueError, normalise_tags, [value])  # type: ignore[list-item]

    def test_reason_given(self) -> None:
        try:
            normalise_tags(["BAD"])
        except ValueError as e:
            self.assertIn("BAD", str(e))
        else:
            self.fail("no ValueError")
