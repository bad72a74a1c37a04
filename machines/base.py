"""The shared shape of every lifecycle: a literal transition table run by `transitions`.

Theory of operation
-------------------
A lifecycle is a `Spec`: an enum of states, a tuple of `Rule`s and the trigger that creates an entity. `step()` is
the only way to move: given the saved state, a trigger and a `Context` (the entity's data, the trigger's payload,
`now`, a jitter draw and the settings), it returns a `Step` -- the new state, the new data, the effects to run and
when the entity next wants a `tick`. Nothing here reads a clock, a database or a socket, so the engine can commit the
`Step` and its effects in one SQL transaction and a crash can never leave half a transition behind.

Rules for one trigger are tried in table order and the first whose guard holds wins, as `transitions` does. A
trigger that no rule allows from the current state raises `IllegalTrigger`; a trigger that is allowed but whose
guards all fail returns `None` (nothing to do: a tick that came early, an acknowledgement of an old generation).

`transitions` keeps the new state even when a callback fails, so the callbacks here only record which rule fired;
the effects and the data are computed after the library has chosen the rule.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from datetime import datetime, timedelta
from typing import Any, ClassVar, TypeAlias

from transitions import Machine, MachineError

Data: TypeAlias = Mapping[str, Any]


class IllegalTrigger(Exception):
    """The trigger is not allowed from the entity's current state (or does not exist for this kind)."""

    def __init__(self, kind: str, state: str | None, trigger: str) -> None:
        where = f"from state {state}" if state else "on an entity that does not exist yet"
        super().__init__(f"{kind}: trigger '{trigger}' is not allowed {where}")
        self.kind, self.state, self.trigger = kind, state, trigger


class BadPayload(Exception):
    """The trigger's payload lacks a field its rule reads, or holds one of the wrong type."""

    def __init__(self, kind: str, trigger: str, exc: Exception) -> None:
        detail = f"'{exc.args[0]}' is missing" if isinstance(exc, KeyError) and exc.args else str(exc)
        super().__init__(f"{kind}: the payload of trigger '{trigger}' is not usable: {detail}")
        self.kind, self.trigger = kind, trigger


# --------------------------------------------------------------------------------------------------- effects ---
@dataclass(frozen=True, slots=True)
class Effect:
    """Something the engine must do in the outside world after the transition is committed.

    `on_ok` names the trigger fed back to the originating entity when the effect succeeds (None: nothing to
    report), `on_fail` the one fed back when it fails for good. Every effect must be idempotent: after a crash
    the engine runs it again.
    """

    on_ok: ClassVar[str | None] = None
    on_fail: ClassVar[str | None] = "fail"


_EFFECT_TYPES: dict[str, type[Effect]] = {}


def effect(cls: type[Effect]) -> type[Effect]:
    """Register an effect class so that the outbox can store it by name and rebuild it."""
    _EFFECT_TYPES[cls.__name__] = cls
    return cls


def effect_to_dict(eff: Effect) -> dict[str, Any]:
    assert is_dataclass(eff)
    return {f.name: _plain(getattr(eff, f.name)) for f in fields(eff)}


def effect_from_dict(name: str, payload: Mapping[str, Any]) -> Effect:
    try:
        cls = _EFFECT_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown effect type '{name}'") from None
    kwargs = {f.name: _unplain(payload[f.name]) for f in fields(cls) if f.name in payload}
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _unplain(value: Any) -> Any:
    return tuple(_unplain(v) for v in value) if isinstance(value, list) else value


@effect
@dataclass(frozen=True, slots=True)
class Fire(Effect):
    """Fire a trigger on another entity (the engine does it through the outbox, so it survives a crash)."""

    kind: str
    key: str
    trigger: str
    payload: Mapping[str, Any] = field(default_factory=dict)

    on_fail: ClassVar[str | None] = None


# ------------------------------------------------------------------------------------------------ the tables ---
@dataclass(frozen=True, slots=True)
class Context:
    """Everything a guard or an effect may look at. Time and randomness come in; nothing is read."""

    key: str
    data: Data
    payload: Data
    now: datetime
    jitter: float = 0.0  # a draw from [-1, 1]
    settings: Data = field(default_factory=dict)
    due_at: datetime | None = None  # when the entity asked to be ticked, as saved with its row
    state: str | None = None  # filled in by `Spec.step`

    def setting(self, name: str, default: Any) -> Any:
        return self.settings.get(name, default)


Guard: TypeAlias = Callable[[Context], bool]
Effects: TypeAlias = Callable[[Context], tuple[Effect, ...]]
Update: TypeAlias = Callable[[Context], Mapping[str, Any]]
Due: TypeAlias = Callable[[Context, Data], datetime | None]


def _no_effects(ctx: Context) -> tuple[Effect, ...]:
    return ()


def _no_update(ctx: Context) -> Mapping[str, Any]:
    return {}


def _not_due(ctx: Context, data: Data) -> datetime | None:
    return None


@dataclass(frozen=True, slots=True)
class Rule:
    trigger: str
    source: tuple[enum.Enum, ...]
    dest: enum.Enum
    reason: str
    guard: Guard | None = None
    effects: Effects = _no_effects
    update: Update = _no_update  # merged into the entity's data
    due: Due = _not_due  # when the entity next wants a tick, given the context and the updated data


@dataclass(frozen=True, slots=True)
class Step:
    source: enum.Enum | None
    dest: enum.Enum
    trigger: str
    reason: str
    data: Data
    effects: tuple[Effect, ...]
    due_at: datetime | None


class _Model:
    """The throwaway object `transitions` moves; `fired` records which rule it took."""

    state: enum.Enum
    fired: Rule | None
    trigger: Callable[..., bool]  # added by `Machine.add_model`


class Spec:
    """A lifecycle: its states, its literal table, and the trigger that brings an entity into being."""

    def __init__(
        self,
        kind: str,
        states: type[enum.Enum],
        create: str,
        initial: enum.Enum,
        rules: tuple[Rule, ...],
        reasons: Mapping[str, str],
        terminal: frozenset[enum.Enum] = frozenset(),
    ) -> None:
        self.kind, self.states, self.create, self.initial, self.rules = kind, states, create, initial, rules
        self.reasons, self.terminal = reasons, terminal
        self.triggers: frozenset[str] = frozenset(r.trigger for r in rules) | {create}
        for r in rules:
            if r.reason not in reasons:
                raise ValueError(f"{kind}: rule {r.trigger} has reason '{r.reason}' with no text")
        self._lock = threading.Lock()
        self._machine = Machine(
            model=None,
            states=states,
            transitions=[
                {
                    "trigger": r.trigger,
                    "source": list(r.source),
                    "dest": r.dest,
                    "conditions": [_guard_adapter(r.guard)] if r.guard else [],
                    "after": [_recorder(r)],
                }
                for r in rules
                if r.source
            ],
            initial=initial,
            auto_transitions=False,
            send_event=True,
            ignore_invalid_triggers=False,
        )
        self._model = _Model()
        self._machine.add_model(self._model, initial=initial)

    def state(self, name: str) -> enum.Enum:
        try:
            return self.states(name)
        except ValueError:
            raise ValueError(f"{self.kind}: unknown state '{name}'") from None

    def allowed(self, state: enum.Enum) -> list[str]:
        return sorted(self._machine.get_triggers(state))

    def step(self, state: enum.Enum | None, trigger: str, ctx: Context) -> Step | None:
        """Run one trigger. `state=None` means the entity does not exist and `trigger` must create it."""
        ctx = replace(ctx, state=state.value if state is not None else None)
        if state is None:
            if trigger != self.create:
                raise IllegalTrigger(self.kind, None, trigger)
            return self._finish(None, self.initial, trigger, self._create_rule(), ctx)
        if trigger not in self.triggers or trigger == self.create and trigger not in self._machine.events:
            raise IllegalTrigger(self.kind, state.value, trigger)
        with self._lock:  # one model per table, put in the saved state for each step
            model = self._model
            self._machine.set_state(state, model=model)
            model.fired = None
            try:
                moved = model.trigger(trigger, ctx=ctx)
            except MachineError:
                raise IllegalTrigger(self.kind, state.value, trigger) from None
            except (KeyError, ValueError, TypeError) as exc:  # raised by a guard reading the payload
                raise BadPayload(self.kind, trigger, exc) from None
            rule = model.fired
        if not moved:
            return None
        assert rule is not None
        return self._finish(state, rule.dest, trigger, rule, ctx)

    def _create_rule(self) -> Rule:
        for r in self.rules:
            if r.trigger == self.create and r.source == ():
                return r
        raise ValueError(f"{self.kind}: no creation rule for '{self.create}'")

    def _finish(self, source: enum.Enum | None, dest: enum.Enum, trigger: str, rule: Rule, ctx: Context) -> Step:
        try:
            data = {**ctx.data, **rule.update(ctx)}
            after = replace(ctx, data=data)
            return Step(source, dest, trigger, rule.reason, data, rule.effects(after), rule.due(after, data))
        except (KeyError, ValueError, TypeError) as exc:
            raise BadPayload(self.kind, trigger, exc) from None

    def reason_text(self, code: str) -> str:
        return self.reasons.get(code, code)


def _guard_adapter(guard: Guard) -> Callable[[Any], bool]:
    return lambda event: guard(event.kwargs["ctx"])


def _recorder(rule: Rule) -> Callable[[Any], None]:
    def record(event: Any) -> None:
        event.model.fired = rule

    return record


# ----------------------------------------------------------------------------------------- small pure helpers ---
def is_due(ctx: Context) -> bool:
    """A tick only counts once the time the entity asked for has come (a tick may come early or twice)."""
    return ctx.due_at is not None and ctx.now >= ctx.due_at


def after(ctx: Context, setting: str, default_seconds: float) -> datetime:
    return ctx.now + timedelta(seconds=float(ctx.setting(setting, default_seconds)))


def iso(moment: datetime) -> str:
    return moment.isoformat()


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)
