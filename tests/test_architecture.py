"""
The architecture, checked from the code (the standard library's ``ast``; no
import is executed):

- no import cycle among pilot's modules (imports under ``if TYPE_CHECKING:``
  do not count: they never run);
- no import from a lower floor to a higher one (the floors are below);
- no module in ``pilot/`` over 500 lines;
- every ``test-case-name`` header names a test module that exists.

The floors, lowest first.  A module may import from its own floor and the
floors below it.  Every top-level module of ``pilot/`` is given a floor here;
a new one fails :meth:`ArchitectureTests.test_every_module_has_a_floor` until
it is given one.

0. base: ``errors``, ``address``, ``identity``, ``persist``, ``names``,
   ``endpoint``: values and pure functions with no I/O but atomic files.
   The wire codecs are built on them (``MalformedFrame``, ``Address``,
   ``verify``), so they sit under ``pilot.wire``.
1. wire: ``pilot.wire``, bytes <-> values, pure.
2. foundation: ``trust`` (the trust store), ``ratelimit``, ``options``,
   ``interfaces``, ``log``, ``tls``, ``nodeapi`` (the interface the control
   socket serves): helpers every layer above may use.
3. machines: ``pilot.machines`` and ``pilot.server`` (the rendezvous' sans-I/O
   cores): logic, time only through an injected clock.
4. stack: ``pilot.stack``.
5. node: ``pilot.node``, and ``nodeconfig`` (the node's settings; they carry
   the trust machine's ``AutoApprove`` policy, so they sit above the machines).
6. protocols: ``pilot.protocols``.
7. services: ``pilot.services``.
8. edges: ``pilot`` itself (``__init__``: public names), ``__main__``,
   ``cli`` and ``cli_*``, ``tap``, ``nodetap``, the control client
   (``control*``), ``endpoints``, ``aio``, ``api`` (the embedded node), ``testing``.

``docs/architecture.md`` (issue 8) draws these floors and a packet's way up; keep the two in step.
"""

from __future__ import annotations

import ast
import os
import re
from typing import Iterator

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "pilot")
MAX_LINES = 500

FLOOR_NAMES = ("base", "wire", "foundation", "machines", "stack", "node", "protocols", "services", "edges")

#: A top-level module or package (below ``pilot.``) to its floor; packages cover their submodules.
FLOORS: dict[str, int] = {
    **{name: 0 for name in ("errors", "address", "identity", "persist", "names", "endpoint")},
    "wire": 1,
    **{name: 2 for name in ("trust", "ratelimit", "options", "interfaces", "log", "tls", "nodeapi", "memory")},
    "machines": 3, "server": 3, "apps": 3,
    "stack": 4,
    "node": 5, "nodeconfig": 5, "search": 5, "details": 5,
    "protocols": 6, "web": 6,
    "services": 7,
    **{name: 8 for name in ("__init__", "__main__", "cli", "tap", "nodetap", "control", "endpoints", "aio", "api",
                            "testing", "startup", "entry")},
}
#: Top-level modules whose name starts with one of these take its floor (``cli_node``, ``control_client``).
FLOOR_PREFIXES: dict[str, int] = {"cli_": 8, "control_": 8}

TEST_CASE_NAME = re.compile(r"-\*-.*test-case-name:\s*([^\s;,]+(?:\s*,\s*[^\s;,]+)*)\s*;?.*-\*-")


def modules() -> dict[str, str]:
    """Every module of ``pilot/`` by dotted name (a package by its own name) to its path."""
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def floor_of(module: str) -> int | None:
    """The floor of ``pilot.x...`` (``pilot`` itself is ``__init__``); None if ``x`` has none."""
    top = module.split(".")[1] if "." in module else "__init__"
    if top in FLOORS:
        return FLOORS[top]
    for prefix, floor in FLOOR_PREFIXES.items():
        if top.startswith(prefix):
            return floor
    return None


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement except those under ``if TYPE_CHECKING:`` (its ``else:`` does run)."""
    if isinstance(tree, ast.If) and _type_checking_only(tree):
        for child in tree.orelse:
            yield from _runtime_imports(child)
        return
    if isinstance(tree, (ast.Import, ast.ImportFrom)):
        yield tree
    for child in ast.iter_child_nodes(tree):
        yield from _runtime_imports(child)


def imports_of(module: str, path: str, known: dict[str, str]) -> set[str]:
    """
    The pilot modules ``module`` imports when it runs.  ``from a import b``
    counts as an import of ``a.b`` when that is a module, else of ``a``; the
    parent packages Python initialises on the way are not counted.
    """
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out: set[str] = set()
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                while parts and ".".join(parts) not in known:
                    parts.pop()
                if parts:
                    out.add(".".join(parts))
            continue
        base = node.module or ""
        if node.level:
            package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        for alias in node.names:
            if f"{base}.{alias.name}" in known:
                out.add(f"{base}.{alias.name}")
            elif base in known:
                out.add(base)
    out.discard(module)
    return out


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = counter
                    counter += 1
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def _own_submodules_only(component: list[str]) -> bool:
    """A package and its own submodules (``pilot.stack`` re-exporting ``pilot.stack.ports``)."""
    package = min(component, key=len)
    return all(m == package or m.startswith(package + ".") for m in component)


def test_modules() -> dict[str, str]:
    """``tests.x.y`` for every test file (and test package) under ``tests/``."""
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(os.path.join(ROOT, "tests")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found[os.path.relpath(path[:-3], ROOT).replace(os.sep, ".").removesuffix(".__init__")] = path
    return found


def headers() -> Iterator[tuple[str, str]]:
    """``(path, test module name)`` for every ``test-case-name`` header of pilot's sources and plugins."""
    paths = list(modules().values())
    plugins = os.path.join(ROOT, "twisted", "plugins")
    if os.path.isdir(plugins):
        paths += [os.path.join(plugins, n) for n in sorted(os.listdir(plugins)) if n.endswith(".py")]
    for path in paths:
        with open(path, encoding="utf-8") as f:
            head = [f.readline() for _ in range(2)]
        for line in head:
            match = TEST_CASE_NAME.search(line)
            if match:
                for name in match.group(1).split(","):
                    yield os.path.relpath(path, ROOT), name.strip()


class ArchitectureTests(SynchronousTestCase):
    def test_every_module_has_a_floor(self) -> None:
        missing = sorted(m for m in modules() if floor_of(m) is None)
        self.assertEqual(missing, [], "give these modules a floor in tests/test_architecture.py FLOORS "
                                      "(and docs/architecture.md): " + ", ".join(missing))

    def test_no_import_cycle(self) -> None:
        found = [c for c in cycles(import_graph()) if not _own_submodules_only(c)]
        self.assertEqual(found, [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found))

    def test_no_import_up_the_floors(self) -> None:
        problems = []
        for module, imported in sorted(import_graph().items()):
            floor = floor_of(module)
            for target in sorted(imported):
                target_floor = floor_of(target)
                if floor is not None and target_floor is not None and target_floor > floor:
                    problems.append(f"{module} ({FLOOR_NAMES[floor]}) imports {target} "
                                    f"({FLOOR_NAMES[target_floor]})")
        self.assertEqual(problems, [], "imports up the floors:\n" + "\n".join(problems))

    def test_module_size(self) -> None:
        problems = []
        for module, path in sorted(modules().items()):
            with open(path, encoding="utf-8") as f:
                lines = sum(1 for _ in f)
            if lines > MAX_LINES:
                problems.append(f"{os.path.relpath(path, ROOT)}: {lines} lines")
        self.assertEqual(problems, [], f"modules over {MAX_LINES} lines:\n" + "\n".join(problems))

    def test_test_case_names_exist(self) -> None:
        known = test_modules()
        problems = [f"{path} names {name}" for path, name in headers() if name not in known]
        self.assertEqual(problems, [], "test-case-name headers naming no test module:\n" + "\n".join(problems))


class CheckerTests(SynchronousTestCase):
    """The checks themselves, on small made-up inputs."""

    def test_cycles(self) -> None:
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set(), "f": {"f"}}
        self.assertEqual(cycles(graph), [["a", "b", "c"]])
        self.assertTrue(_own_submodules_only(["pilot.stack", "pilot.stack.ports"]))
        self.assertFalse(_own_submodules_only(["pilot.stack.ports", "pilot.stack.demux"]))

    def test_floors(self) -> None:
        self.assertEqual(floor_of("pilot"), FLOORS["__init__"])
        self.assertEqual(floor_of("pilot.wire.beacon"), FLOORS["wire"])
        self.assertEqual(floor_of("pilot.cli_node"), FLOORS["cli"])
        self.assertIsNone(floor_of("pilot.somewhere_new"))
        self.assertLess(FLOORS["errors"], FLOORS["wire"])
        self.assertLess(FLOORS["wire"], FLOORS["machines"])
        self.assertLess(FLOORS["services"], FLOORS["tap"])

    def test_imports(self) -> None:
        """``if TYPE_CHECKING:`` imports do not count, their ``else:`` does; ``from a import b`` means a.b."""
        path = os.path.join(self.mktemp())
        with open(path, "w") as f:
            f.write("from typing import TYPE_CHECKING\n"
                    "from pilot import log\n"
                    "from pilot.errors import MalformedFrame\n"
                    "import pilot.wire.beacon as bw\n"
                    "from . import tls\n"
                    "if TYPE_CHECKING:\n"
                    "    from pilot.services import rendezvous\n"
                    "else:\n"
                    "    from pilot.server import state\n"
                    "def late():\n"
                    "    from pilot.protocols import beacon\n")
        known = dict.fromkeys(["pilot", "pilot.log", "pilot.errors", "pilot.wire", "pilot.wire.beacon",
                               "pilot.tls", "pilot.services", "pilot.services.rendezvous", "pilot.server",
                               "pilot.server.state", "pilot.protocols", "pilot.protocols.beacon",
                               "pilot.options"], "")
        self.assertEqual(imports_of("pilot.options", path, known),
                         {"pilot.log", "pilot.errors", "pilot.wire.beacon", "pilot.tls", "pilot.server.state",
                          "pilot.protocols.beacon"})

    def test_headers(self) -> None:
        line = "# -*- test-case-name: tests.a.test_b, tests.test_c -*-"
        match = TEST_CASE_NAME.search(line)
        assert match is not None
        self.assertEqual([n.strip() for n in match.group(1).split(",")], ["tests.a.test_b", "tests.test_c"])
