# -*- test-case-name: tests.machines.test_table -*-
"""
One machine's Automat transitions, declared as decorated behaviours and
recorded so that docs and tests can read the table without Automat's
private internals.

Each machine writes::

    table = TransitionTable(states, before=..., after=...)

    @table.on(idle, Inputs.packet_sent, trying)
    def _first_send(inputs, core, *args) -> None: ...

    table.ignore((idle, trying), Inputs.late_timer, why="each timer is cancelled on leaving its state")

``on`` registers the transition (``upon(...).to(...)``, or ``loop()`` when
the state stays) and, when the state changes, calls the machine's hooks
around the behaviour (to record the state's name, log, time the change); a
loop runs its behaviour alone.  ``ignore`` is the explicit
list of harmless inputs: every (state, input) pair that is neither declared
nor ignored raises Automat's ``NoTransition``, so an impossible input shows
in tests instead of vanishing.  :meth:`TransitionTable.transitions` lists the
table for docs and tests.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, NamedTuple, Sequence, TypeVar

from automat import NoTransition

Behaviour = Callable[..., Any]
M = TypeVar("M")
#: ``hook(core, old_name, new_name, input_name)``
Hook = Callable[[Any, str, str, str], None]

#: The behaviour name recorded for an explicitly ignored input.
IGNORED = "ignored"


class Transition(NamedTuple):
    state: str
    input: str
    next: str
    behaviour: str


def _nothing(core: Any, old: str, new: str, event: str) -> None:
    return None


class TransitionTable:
    """The declared transitions of one machine, in the order of its states."""

    def __init__(self, states: Sequence[Any], before: Hook = _nothing, after: Hook = _nothing) -> None:
        self.states = tuple(states)
        self.before = before
        self.after = after
        self.rows: list[Transition] = []
        self.reasons: dict[tuple[str, str], str] = {}

    def on(self, old: Any, event: Callable[..., Any], new: Any) -> Callable[[Behaviour], Behaviour]:
        """Decorate a behaviour ``(inputs, core, *args)`` as the transition ``old --event--> new``."""
        before, after = self.before, self.after

        def register(behaviour: Behaviour) -> Behaviour:
            names = (old.name, new.name, event.__name__)

            def output(inputs: Any, core: Any, *args: Any) -> Any:
                before(core, *names)
                result = behaviour(inputs, core, *args)  # an input may return a value (Automat allows it)
                after(core, *names)
                return result

            output.__name__ = behaviour.__name__
            if old is new:
                # the hooks mark changes of state: a loop runs the behaviour alone
                # (one call less on the hot paths, where packets loop in a state)
                old.upon(event).loop()(behaviour)
            else:
                old.upon(event).to(new)(output)
            self.rows.append(Transition(old.name, event.__name__, new.name, behaviour.__name__))
            return behaviour

        return register

    def ignore(self, states: Iterable[Any], *events: Callable[..., Any], why: str) -> None:
        """Declare ``events`` harmless in ``states``: the state stays and nothing runs."""
        for state in states:
            for event in events:
                if (state.name, event.__name__) in self.declared():
                    continue  # a real transition wins over a blanket "harmless"
                state.upon(event).loop().returns(None)
                self.rows.append(Transition(state.name, event.__name__, state.name, IGNORED))
                self.reasons[(state.name, event.__name__)] = why

    def declared(self) -> set[tuple[str, str]]:
        """Every (state, input) pair the machine takes, ignored ones included."""
        return {(row.state, row.input) for row in self.rows}

    def transitions(self, ignored: bool = False) -> list[Transition]:
        """The table sorted by state then input; without ``ignored``, only rows that do something."""
        order = [state.name for state in self.states]
        rows = [row for row in self.rows if ignored or row.behaviour != IGNORED]
        return sorted(rows, key=lambda row: (order.index(row.state), row.input))

    def undeclared(self, inputs: Iterable[str]) -> list[tuple[str, str]]:
        """The (state, input) pairs among ``inputs`` that raise ``NoTransition``."""
        declared = self.declared()
        return [(state.name, name) for state in self.states for name in inputs
                if (state.name, name) not in declared]



def indexed(machine: M) -> M:
    """
    ``machine`` (a built ``TypeMachine``), its transition lookup made a dict.

    Automat 25.4.16 finds the transition for an input by scanning every
    (state, input) pair of its automaton (``Automaton.outputForInput``): O(transitions)
    per input, 10-34 us for the stream's ``segment_received`` where a dict takes
    0.2 us (docs/performance.md).  The automaton is complete once built, so this
    indexes it once and shadows the scan on that automaton only; an undeclared
    pair still raises ``NoTransition`` before any behaviour runs.
    """
    automaton: Any = getattr(machine, "__automat_automaton__")
    index = {(old, event): (new, tuple(outputs))
             for old, event, new, outputs in automaton.allTransitions()}

    def output_for_input(state: Any, event: Any) -> tuple[Any, Sequence[Any]]:
        try:
            return index[state, event]
        except KeyError:
            raise NoTransition(state=state, symbol=event) from None

    automaton.outputForInput = output_for_input
    _fast_inputs(machine, index)
    return machine


def running(machine: Any) -> bool:
    """
    Is a behaviour of ``machine`` (an indexed machine's inputs) under way?  An
    input now would be queued to run after it.  A caller that runs a loop's
    behaviour itself, without the input's dispatch, does so only when not.
    """
    return machine.__automat_postponed__ is not None


def _fast_inputs(machine: Any, index: dict[tuple[Any, str], tuple[Any, tuple[Any, ...]]]) -> None:
    """
    Replace each input method of the machine's runtime class with one that
    does what Automat's does (look the transition up, raise ``NoTransition``
    before anything runs, set the new state, run the behaviour, then any
    inputs it queued reentrantly) in fewer steps: about a third of the
    4-9 us each input cost on the stream's data path (docs/performance.md).
    A reentrant call is queued as Automat queues it (run in order once the
    behaviour under way returns), and runs through this method too.
    Whatever it does not cover goes to Automat's own method: a trace set, a
    state carrying data, an input that returns a value (Automat refuses it
    reentrantly).
    """
    runtime: Any = getattr(machine, "__automat_type__")
    fast: dict[str, dict[int, tuple[Any, Callable[..., Any]]]] = {}
    for (old, event), (new, outputs) in index.items():
        if (len(outputs) == 1 and type(outputs[0]).__name__ == "MethodOutput"
                and not outputs[0].requiresData):
            fast.setdefault(event, {})[id(old)] = (new, outputs[0].method)
    for name in {event for _, event in index}:
        setattr(runtime, name, _fast_input(name, getattr(runtime, name), fast.get(name, {})))


def _fast_input(name: str, automat: Callable[..., Any],
                fast: dict[int, tuple[Any, Callable[..., Any]]]) -> Callable[..., Any]:
    # Automat's implementation knows whether the input returns None (then it may be queued)
    # and which protocol method it implements (its parameters name ours)
    nonlocals = inspect.getclosurevars(automat).nonlocals
    queueable = nonlocals.get("returnsNone") is True
    params = _plain_parameters(nonlocals.get("method"))
    if params is not None and name not in params:
        return _compiled_input(name, automat, fast, queueable, params)

    def implementation(self: Any, *args: Any, **kwargs: Any) -> Any:
        postponed = self.__automat_postponed__
        if postponed is not None and queueable:
            # reentrant: after the behaviour under way, in order (Automat's rule), and through here
            postponed.append(lambda: implementation(self, *args, **kwargs))
            return None
        transitioner = self.__automat_transitioner__
        found = fast.get(id(transitioner._state))
        if found is None or postponed is not None or transitioner._tracer is not None:
            return automat(self, *args, **kwargs)
        transitioner._state = found[0]
        postponed = self.__automat_postponed__ = []
        try:
            result = found[1](self, self.__automat_core__, *args, **kwargs)
        finally:
            self.__automat_postponed__ = None
        while postponed:
            postponed.pop(0)()
        return result

    implementation.__name__ = implementation.__qualname__ = name
    return implementation


def _plain_parameters(method: Any) -> list[str] | None:
    """The protocol method's parameters after ``self`` if all are plain (positional or keyword,
    no default), else None."""
    if method is None:
        return None
    try:
        parameters = list(inspect.signature(method).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if any(p.kind is not p.POSITIONAL_OR_KEYWORD or p.default is not p.empty or not p.name.isidentifier()
           or p.name.startswith("_") or p.name in _TEMPLATE_NAMES for p in parameters):
        return None
    return [p.name for p in parameters]


#: The input method of :func:`_fast_input` written out for the input's own parameters: without
#: ``*args`` and ``**kwargs`` (a tuple and a dict made and unpacked per call), one lookup
#: keyed by the state alone.  Same steps, same order.
_TEMPLATE = """
def {name}(self{params}):
    postponed = self.__automat_postponed__
    if postponed is not None:
        if queueable:
            postponed.append(lambda: {name}(self{params}))
            return None
        return automat(self{params})
    transitioner = self.__automat_transitioner__
    found = fast_get(id(transitioner._state))
    if found is None or transitioner._tracer is not None:
        return automat(self{params})
    transitioner._state, behaviour = found
    postponed = self.__automat_postponed__ = []
    try:
        result = behaviour(self, self.__automat_core__{params})
    finally:
        self.__automat_postponed__ = None
    while postponed:
        postponed.pop(0)()
    return result
"""

#: The names the template uses itself: a parameter spelled like one takes the general dispatch.
_TEMPLATE_NAMES = frozenset(("self", "postponed", "transitioner", "found", "behaviour", "result", "automat",
                             "fast_get", "queueable", "id"))


def _compiled_input(name: str, automat: Callable[..., Any], fast: dict[int, tuple[Any, Callable[..., Any]]],
                    queueable: bool, params: list[str]) -> Callable[..., Any]:
    namespace: dict[str, Any] = {"automat": automat, "fast_get": fast.get, "queueable": queueable}
    code = _TEMPLATE.format(name=name, params="".join(", " + p for p in params))
    exec(compile(code, f"<pilot.machines.table input {name}>", "exec"), namespace)
    implementation: Callable[..., Any] = namespace[name]
    implementation.__qualname__ = name
    return implementation
