"""Properties every lifecycle table must have, checked by running its rules rather than by reading them."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest

from machines import SPECS, Context, Spec
from tests.machines.tables import T0, at

# A payload carrying every field some rule of the kind reads, so that any rule can run from any state it allows.
PAYLOADS: dict[str, Mapping[str, Any]] = {
    "pod": {"namespace": "default", "name": "web-1", "service_account": "web", "node": "node-a", "ip": "10.0.0.7",
            "cert": "default/web-1/1", "issued": "default/web-1/1", "reason": "r"},
    "cert": {"owner": "default/web-1", "spiffe_id": "spiffe://example.org/ns/default/sa/web", "dns_names": ["w"],
             "index": 1, "serial": "1f", "generation": "1", "not_before": T0.isoformat(),
             "not_after": at(3600).isoformat(), "reason": "r"},
    "ca": {"previous": "1", "auto_activate": True, "not_before": T0.isoformat(), "not_after": at(3600).isoformat(),
           "outstanding": 0, "reason": "r"},
    "sidecar": {"owner": "default/web-1", "generation": 1, "reason": "r"},
}


def reachable_with_a_tick_pending(spec: Spec) -> dict[enum.Enum, str]:
    """Every state an entity can be in while it has asked for a tick, with the rule that got it there.

    Guards are ignored (any rule allowed from a state may fire), so this over-approximates what can happen; the
    rules' own `update` and `due` functions are run, so a `due` that keeps the previous tick (or returns None when
    data is missing) is judged by what it really returns.
    """
    payload = PAYLOADS[spec.kind]
    create = spec.step(None, spec.create, Context("k", {}, payload, T0))
    assert create is not None
    seen: set[tuple[enum.Enum, bool]] = set()
    found: dict[enum.Enum, str] = {}
    todo = [(create.dest, dict(create.data), create.due_at, f"{spec.create} (creation)")]
    while todo:
        state, data, due_at, how = todo.pop()
        if (state, due_at is not None) in seen:
            continue
        seen.add((state, due_at is not None))
        if due_at is not None:
            found.setdefault(state, how)
        for rule in spec.rules:
            if state not in rule.source:
                continue
            ctx = Context("k", data, payload, at(1), due_at=due_at, state=state.value)
            new = {**data, **rule.update(ctx)}
            nxt = rule.due(replace(ctx, data=new), new)
            todo.append((rule.dest, new, nxt, f"{rule.trigger} from {state.value}"))
    return found


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_every_state_an_entity_can_wait_for_a_tick_in_takes_the_tick(kind):
    """Otherwise the scheduler would find the entity due, be refused, and find it due again, forever."""
    spec = SPECS[kind]
    waiting = reachable_with_a_tick_pending(spec)
    assert waiting, f"{kind}: no rule ever asks for a tick"
    refused = {state.value: how for state, how in waiting.items() if "tick" not in spec.allowed(state)}
    assert refused == {}, f"{kind}: these states can hold a due tick they refuse (reached by): {refused}"


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_terminal_states_take_no_trigger_and_every_other_state_has_a_way_on(kind):
    spec = SPECS[kind]
    for state in spec.states:
        allowed = spec.allowed(state)
        if state in spec.terminal:
            assert allowed == [], f"{kind}: terminal state {state.value} takes {allowed}"
        else:
            assert allowed, f"{kind}: {state.value} is a dead end but not marked terminal"


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_every_lifecycle_has_a_failed_state_with_a_way_out(kind):
    spec = SPECS[kind]
    failed = spec.state("failed")
    assert failed not in spec.terminal and spec.allowed(failed)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_every_state_can_be_reached_from_creation(kind):
    spec = SPECS[kind]
    reached = {spec.initial}
    grew = True
    while grew:
        grew = False
        for rule in spec.rules:
            if rule.dest not in reached and any(s in reached for s in rule.source):
                reached.add(rule.dest)
                grew = True
    assert reached == set(spec.states)
