"""pilot.machines.table: declared, ignored and undeclared transitions of a tiny machine."""

from __future__ import annotations

from typing import Protocol

from automat import NoTransition, TypeMachineBuilder
from twisted.trial.unittest import SynchronousTestCase

from pilot.machines.table import IGNORED, Transition, TransitionTable, indexed, running


class Door(Protocol):
    def opened(self) -> None: ...
    def closed(self) -> None: ...
    def knocked(self) -> None: ...


class Core:
    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []


def build() -> tuple[TransitionTable, object]:
    builder = TypeMachineBuilder(Door, Core)
    shut = builder.state("shut")
    open_ = builder.state("open")

    def before(core: Core, old: str, new: str, event: str) -> None:
        core.log.append(("before", old, new, event))

    table = TransitionTable((shut, open_), before=before)

    @table.on(shut, Door.opened, open_)
    def _open(m: Door, c: Core) -> None:
        c.log.append(("open",))

    @table.on(open_, Door.closed, shut)
    def _close(m: Door, c: Core) -> None:
        c.log.append(("close",))

    table.ignore((shut, open_), Door.knocked, why="nobody answers")
    table.ignore((open_,), Door.closed, why="never replaces a real transition")
    return table, builder.build()


class TransitionTableTests(SynchronousTestCase):
    def test_behaviours_run_with_hooks(self) -> None:
        table, machine = build()
        core = Core()
        door = machine(core)  # type: ignore[operator]
        door.opened()
        self.assertEqual(core.log, [("before", "shut", "open", "opened"), ("open",)])

    def test_ignored_inputs_do_nothing(self) -> None:
        table, machine = build()
        core = Core()
        door = machine(core)  # type: ignore[operator]
        door.knocked()
        self.assertEqual(core.log, [])
        self.assertEqual(table.reasons[("shut", "knocked")], "nobody answers")

    def test_undeclared_inputs_raise(self) -> None:
        table, machine = build()
        door = machine(Core())  # type: ignore[operator]
        self.assertEqual(table.undeclared(["opened", "closed", "knocked"]), [("shut", "closed"), ("open", "opened")])
        self.assertRaises(NoTransition, door.closed)

    def test_transitions_listed_in_state_order(self) -> None:
        table, _ = build()
        self.assertEqual(table.transitions(), [Transition("shut", "opened", "open", "_open"),
                                               Transition("open", "closed", "shut", "_close")])
        self.assertIn(Transition("open", "knocked", "open", IGNORED), table.transitions(ignored=True))
        self.assertNotIn(Transition("open", "closed", "open", IGNORED), table.transitions(ignored=True))


class Counter(Protocol):
    def counted(self) -> int: ...


def counting_machine() -> tuple[TransitionTable, object]:
    builder = TypeMachineBuilder(Counter, Core)
    only = builder.state("only")
    table = TransitionTable((only,))

    @table.on(only, Counter.counted, only)
    def _count(m: Counter, c: Core) -> int:
        c.log.append(("count",))
        return len(c.log)

    return table, builder.build()


class ResultTests(SynchronousTestCase):
    def test_behaviour_result_returned(self) -> None:
        _, machine = counting_machine()
        counter = machine(Core())  # type: ignore[operator]
        self.assertEqual((counter.counted(), counter.counted()), (1, 2))


class LoopTests(SynchronousTestCase):
    def test_a_loop_runs_without_hooks(self) -> None:
        builder = TypeMachineBuilder(Door, Core)
        shut = builder.state("shut")

        def before(core: Core, old: str, new: str, event: str) -> None:
            core.log.append(("before", old, new, event))

        table = TransitionTable((shut,), before=before)

        @table.on(shut, Door.knocked, shut)
        def _knock(m: Door, c: Core) -> None:
            c.log.append(("knock",))

        core = Core()
        builder.build()(core).knocked()
        self.assertEqual(core.log, [("knock",)])


class IndexedTests(SynchronousTestCase):
    """indexed(): the same machine, its lookup a dict."""

    def test_same_behaviour(self) -> None:
        _, machine = build()
        core = Core()
        door = indexed(machine)(core)  # type: ignore[operator]
        door.opened()
        door.knocked()
        door.closed()
        self.assertEqual(core.log, [("before", "shut", "open", "opened"), ("open",),
                                    ("before", "open", "shut", "closed"), ("close",)])

    def test_undeclared_still_raises_before_anything_runs(self) -> None:
        _, machine = build()
        core = Core()
        door = indexed(machine)(core)  # type: ignore[operator]
        self.assertRaises(NoTransition, door.closed)
        self.assertEqual(core.log, [])
        door.opened()  # the state did not change
        self.assertEqual(core.log[-1], ("open",))

    def test_lookup_does_not_scan(self) -> None:
        _, machine = build()
        automaton = getattr(indexed(machine), "__automat_automaton__")
        automaton._transitions = set()  # a scan would now find nothing
        door = machine(Core())  # type: ignore[operator]
        door.opened()


class Bell(Protocol):
    def rung(self) -> None: ...
    def answered(self) -> None: ...


class Chime(Protocol):
    def struck(self, who: str) -> None: ...
    def echoed(self, who: str) -> None: ...


class FastInputTests(SynchronousTestCase):
    """indexed() also shortens each input's dispatch; Automat's rules stay."""

    def machine(self) -> tuple[object, Core]:
        builder = TypeMachineBuilder(Bell, Core)
        quiet = builder.state("quiet")
        ringing = builder.state("ringing")
        table = TransitionTable((quiet, ringing))

        @table.on(quiet, Bell.rung, ringing)
        def _ring(m: Bell, c: Core) -> None:
            c.log.append(("ring",))
            m.answered()  # reentrant: queued until this behaviour returns
            c.log.append(("rang",))

        @table.on(ringing, Bell.answered, quiet)
        def _answer(m: Bell, c: Core) -> None:
            c.log.append(("answer",))

        core = Core()
        return indexed(builder.build())(core), core  # type: ignore[operator]

    def test_reentrant_input_runs_after_the_behaviour(self) -> None:
        bell, core = self.machine()
        bell.rung()  # type: ignore[attr-defined]
        self.assertEqual(core.log, [("ring",), ("rang",), ("answer",)])
        bell.rung()  # type: ignore[attr-defined]
        self.assertEqual(len(core.log), 6)

    def test_reentrant_inputs_keep_automats_order_on_the_fast_path(self) -> None:
        """
        Queued inputs run in the order they were queued, each one's own
        queue right after it (Automat's order), and through the indexed
        dispatch: Automat's own method (its ``transition``) is never called.
        """
        def order(fast: bool) -> tuple[list[tuple[str, ...]], int]:
            builder = TypeMachineBuilder(Chime, Core)
            still = builder.state("still")
            sounding = builder.state("sounding")
            table = TransitionTable((still, sounding))

            @table.on(still, Chime.struck, sounding)
            def _strike(m: Chime, c: Core, who: str) -> None:
                c.log.append(("strike", who))
                m.echoed("first")
                m.echoed("second")

            @table.on(sounding, Chime.echoed, sounding)
            def _echo(m: Chime, c: Core, who: str) -> None:
                c.log.append(("echo", who))
                if who == "first":
                    m.echoed("first's own")

            core = Core()
            machine = builder.build()
            chime = (indexed(machine) if fast else machine)(core)  # type: ignore[operator]
            transitioner = chime.__automat_transitioner__
            slow: list[str] = []
            original = transitioner.transition
            self.patch(transitioner, "transition", lambda *a: (slow.append("x"), original(*a))[1])
            chime.struck("me")
            return core.log, len(slow)

        fast, slow = order(fast=True), order(fast=False)
        self.assertEqual(fast[0], slow[0])
        self.assertEqual(fast[0], [("strike", "me"), ("echo", "first"), ("echo", "first's own"),
                                   ("echo", "second")])
        self.assertEqual((fast[1], slow[1]), (0, 4))

    def test_undeclared_raises_and_the_state_stays(self) -> None:
        bell, core = self.machine()
        self.assertRaises(NoTransition, bell.answered)  # type: ignore[attr-defined]
        bell.rung()  # type: ignore[attr-defined]
        self.assertEqual(core.log[0], ("ring",))

    def test_an_exception_leaves_the_machine_usable(self) -> None:
        builder = TypeMachineBuilder(Bell, Core)
        quiet = builder.state("quiet")
        table = TransitionTable((quiet,))

        @table.on(quiet, Bell.rung, quiet)
        def _ring(m: Bell, c: Core) -> None:
            c.log.append(("ring",))
            if len(c.log) == 1:
                raise ValueError("first")

        core = Core()
        bell = indexed(builder.build())(core)  # type: ignore[operator]
        self.assertRaises(ValueError, bell.rung)
        bell.rung()
        self.assertEqual(core.log, [("ring",), ("ring",)])


class Gong(Protocol):
    def hit(self, who: str, loud: bool) -> None: ...
    def hit_softly(self, who: str, loud: bool = False) -> None: ...
    def found(self, found: str, result: str) -> None: ...


class CompiledInputTests(SynchronousTestCase):
    """indexed() writes each input out for its own parameters; keywords and defaults still work."""

    def machine(self) -> tuple[object, Core]:
        builder = TypeMachineBuilder(Gong, Core)
        still = builder.state("still")
        table = TransitionTable((still,))

        @table.on(still, Gong.hit, still)
        def _hit(m: Gong, c: Core, who: str, loud: bool) -> None:
            c.log.append(("hit", who, str(loud), str(running(m))))

        @table.on(still, Gong.hit_softly, still)
        def _soft(m: Gong, c: Core, who: str, loud: bool = False) -> None:
            c.log.append(("soft", who, str(loud)))

        @table.on(still, Gong.found, still)
        def _found(m: Gong, c: Core, found: str, result: str) -> None:
            c.log.append(("found", found, result))

        core = Core()
        return indexed(builder.build())(core), core  # type: ignore[operator]

    def test_positional_and_keyword_arguments(self) -> None:
        gong, core = self.machine()
        gong.hit("a", True)  # type: ignore[attr-defined]
        gong.hit(who="b", loud=False)  # type: ignore[attr-defined]
        gong.hit("c", loud=True)  # type: ignore[attr-defined]
        self.assertEqual(core.log, [("hit", "a", "True", "True"), ("hit", "b", "False", "True"),
                                    ("hit", "c", "True", "True")])
        self.assertEqual(type(gong).hit.__code__.co_varnames[:3], ("self", "who", "loud"))  # compiled
        self.assertRaises(TypeError, gong.hit, "d")  # type: ignore[attr-defined]

    def test_a_default_takes_the_general_dispatch(self) -> None:
        gong, core = self.machine()
        gong.hit_softly("a")  # type: ignore[attr-defined]
        gong.hit_softly("b", loud=True)  # type: ignore[attr-defined]
        self.assertEqual(core.log, [("soft", "a", "False"), ("soft", "b", "True")])
        self.assertNotEqual(type(gong).hit_softly.__code__.co_varnames[1], "who")  # (self, *args, **kwargs)

    def test_running_only_inside_a_behaviour(self) -> None:
        gong, core = self.machine()
        self.assertFalse(running(gong))
        gong.hit("a", False)  # type: ignore[attr-defined]
        self.assertEqual(core.log[-1][-1], "True")
        self.assertFalse(running(gong))

    def test_parameters_named_like_the_dispatchs_own_take_the_general_one(self) -> None:
        gong, core = self.machine()
        gong.found("a", result="b")  # type: ignore[attr-defined]
        self.assertEqual(core.log, [("found", "a", "b")])
        self.assertNotEqual(type(gong).found.__code__.co_varnames[1], "found")  # (self, *args, **kwargs)
