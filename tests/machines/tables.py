"""The shape of the expected tables the machine tests write out by hand, and the one check that runs them.

Each lifecycle's test module spells out, for every state, the triggers it takes and what each does (`Moves` to a
state with its reason, effects, data and next tick, or `Nothing` when the guards say "not yet"), one `Case` per side
of every guard. A (state, trigger) pair the table does not list must raise `IllegalTrigger`. The expectations are
written by hand on purpose: reading them from `spec.rules` would test the table against itself.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from machines import Context, Effect, IllegalTrigger, Spec, Step

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass(frozen=True)
class Moves:
    dest: enum.Enum
    reason: str
    effects: tuple[Effect, ...] = ()
    due: datetime | None = None
    data: Mapping[str, Any] = field(default_factory=dict)  # the keys that must hold these values afterwards


@dataclass(frozen=True)
class _Nothing:
    """The trigger is allowed here, but its guards say there is nothing to do (yet)."""


@dataclass(frozen=True)
class _Illegal:
    """The trigger is not allowed from this state."""


Nothing = _Nothing()
ILLEGAL = _Illegal()
Outcome = Moves | _Nothing | _Illegal


@dataclass(frozen=True)
class Case:
    when: str  # reads after the pair in the test id: "admitted-tick-after the deadline"
    outcome: Outcome
    now: datetime = T0
    due_at: datetime | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)  # merged over the state's usual data
    jitter: float = 0.0
    settings: Mapping[str, Any] = field(default_factory=dict)


Table = Mapping[tuple[enum.Enum, str], tuple[Case, ...]]


def product_params(states: Iterable[enum.Enum], triggers: Iterable[str], table: Table) -> list[Any]:
    """One pytest param per case of every (state, trigger) pair; pairs the table leaves out must be illegal."""
    params = []
    for state in states:
        for trigger in triggers:
            cases = table.get((state, trigger), (Case("is illegal", ILLEGAL),))
            for case in cases:
                params.append(pytest.param(state, trigger, case, id=f"{state.value}-{trigger}-{case.when}"))
    return params


def context(key: str, base: Mapping[str, Any], case: Case) -> Context:
    return Context(key=key, data={**base, **case.data}, payload=case.payload, now=case.now, jitter=case.jitter,
                   settings=case.settings, due_at=case.due_at)


def check(spec: Spec, state: enum.Enum | None, trigger: str, ctx: Context, outcome: Outcome) -> Step | None:
    """Run one trigger and hold it to the expected outcome; `step` must never touch what it was given."""
    before = copy.deepcopy((dict(ctx.data), dict(ctx.payload)))
    if isinstance(outcome, _Illegal):
        with pytest.raises(IllegalTrigger) as raised:
            spec.step(state, trigger, ctx)
        assert raised.value.trigger == trigger
        assert raised.value.state == (state.value if state is not None else None)
        assert (dict(ctx.data), dict(ctx.payload)) == before
        return None
    step = spec.step(state, trigger, ctx)
    assert (dict(ctx.data), dict(ctx.payload)) == before
    if isinstance(outcome, _Nothing):
        assert step is None
        return None
    assert step is not None, f"{trigger} from {state} did nothing; expected {outcome.dest}"
    assert (step.source, step.dest, step.trigger) == (state, outcome.dest, trigger)
    assert step.reason == outcome.reason
    assert step.effects == outcome.effects
    assert step.due_at == outcome.due
    for name, value in outcome.data.items():
        assert step.data[name] == value, name
    return step


class Entity:
    """A pure stand-in for the engine in scenario tests: keeps state, data and due_at between steps."""

    def __init__(self, spec: Spec, key: str, payload: Mapping[str, Any], now: datetime, jitter: float = 0.0,
                 settings: Mapping[str, Any] | None = None) -> None:
        self.spec, self.key, self.settings = spec, key, dict(settings or {})
        step = spec.step(None, spec.create, Context(key, {}, payload, now, jitter, self.settings))
        assert step is not None
        self.state, self.data, self.due_at = step.dest, step.data, step.due_at
        self.effects = step.effects

    def fire(self, trigger: str, now: datetime, payload: Mapping[str, Any] | None = None,
             jitter: float = 0.0) -> Step | None:
        ctx = Context(self.key, self.data, payload or {}, now, jitter, self.settings, self.due_at)
        step = self.spec.step(self.state, trigger, ctx)
        if step is not None:
            self.state, self.data, self.due_at, self.effects = step.dest, step.data, step.due_at, step.effects
        return step
