# -*- test-case-name: tests.machines.test_connection -*-
"""
Declaring an Automat machine's transitions as decorated behaviours.

Each of our machines writes its table as ``@on(old_state, Inputs.event,
new_state)`` over a behaviour function ``(inputs, core, *args)``.  The
decorator registers the transition (``upon(...).to(...)``, or ``loop()``
when the state stays), records which (state, input) pairs are declared, so a
test can check that every state takes every input, and calls the machine's
hooks around the behaviour (to record the state's name, log, time a change).
"""

from __future__ import annotations

from typing import Any, Callable

Behaviour = Callable[..., None]
#: ``hook(core, old_name, new_name, input_name)``
Hook = Callable[[Any, str, str, str], None]


def _nothing(core: Any, old: str, new: str, event: str) -> None:
    return None


def transition_table(declared: set[tuple[str, str]], before: Hook = _nothing,
                     after: Hook = _nothing) -> Callable[[Any, Callable[..., None], Any],
                                                         Callable[[Behaviour], Behaviour]]:
    """The ``on(old, event, new)`` decorator of one machine."""

    def on(old: Any, event: Callable[..., None], new: Any) -> Callable[[Behaviour], Behaviour]:
        def register(behaviour: Behaviour) -> Behaviour:
            names = (old.name, new.name, event.__name__)

            def output(inputs: Any, core: Any, *args: Any) -> None:
                before(core, *names)
                behaviour(inputs, core, *args)
                after(core, *names)

            output.__name__ = behaviour.__name__
            if old is new:
                old.upon(event).loop()(output)
            else:
                old.upon(event).to(new)(output)
            declared.add((old.name, event.__name__))
            return behaviour

        return register

    return on
