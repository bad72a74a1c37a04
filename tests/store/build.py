"""Small builders for the store's inputs, so each test spells out only what it is about."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from store import NewEffect, Transition

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def transition(
    key: str = "shop/web",
    *,
    kind: str = "pod",
    expected: int = 0,
    from_state: str | None = None,
    to: str = "admitted",
    trigger: str = "admit",
    when: datetime = T0,
    data: Mapping[str, Any] | None = None,
    due_at: datetime | None = None,
    effects: Iterable[NewEffect] = (),
    consumes: int | None = None,
) -> Transition:
    return Transition(kind=kind, key=key, expected_version=expected, from_state=from_state, to_state=to,
                      trigger=trigger, reason=trigger, actor="test", at=when, data=dict(data or {}),
                      due_at=due_at, effects=tuple(effects), consumes=consumes)


def effect(name: str = "InjectSidecar", run_at: datetime = T0, **payload: Any) -> NewEffect:
    return NewEffect(name, payload, run_at)
