"""
The node's floors (docs/architecture.md): ``pilot.node`` imports nothing
from the protocols, services or edges above it, and ``pilot.interfaces``
only zope, typing and the wire codecs.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

import pilot

PILOT = os.path.dirname(os.path.abspath(pilot.__file__))
ABOVE_THE_NODE = ("pilot.protocols", "pilot.services", "pilot.cli", "pilot.tap", "pilot.nodetap",
                  "pilot.control", "pilot.options")


def imported(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


class FloorTests(SynchronousTestCase):
    def test_the_node_imports_nothing_above_it(self) -> None:
        folder = os.path.join(PILOT, "node")
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                bad = {m for m in imported(os.path.join(folder, name)) if m.startswith(ABOVE_THE_NODE)}
                self.assertEqual(bad, set(), f"pilot/node/{name}")

    def test_interfaces_are_the_lowest_floor(self) -> None:
        allowed = ("__future__", "typing", "zope.interface", "pilot.wire", "pilot.address")
        found = imported(os.path.join(PILOT, "interfaces.py"))
        self.assertEqual({m for m in found if not m.startswith(allowed)}, set())
