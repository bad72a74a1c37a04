"""What the store hands out and takes in: plain frozen dataclasses, never ORM rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

KEY_LENGTH = 255  # the longest entity key the tables hold


@dataclass(frozen=True, slots=True)
class Entity:
    kind: str
    key: str
    state: str
    version: int
    retry_count: int
    retry_at: datetime | None
    due_at: datetime | None
    data: Mapping[str, Any]
    created_at: datetime
    updated_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.key}"


@dataclass(frozen=True, slots=True)
class PendingEffect:
    id: int
    kind: str
    key: str
    effect: str
    payload: Mapping[str, Any]
    attempts: int
    run_at: datetime
    last_error: str | None


@dataclass(frozen=True, slots=True)
class JournalEntry:
    id: int
    kind: str
    key: str
    version: int
    from_state: str | None
    to_state: str
    trigger: str
    reason: str
    detail: str | None
    actor: str
    at: datetime


@dataclass(frozen=True, slots=True)
class NewEffect:
    effect: str
    payload: Mapping[str, Any]
    run_at: datetime


@dataclass(frozen=True, slots=True)
class Transition:
    """One committed change: the entity's new row, its journal row, its new effects, the effect it answers."""

    kind: str
    key: str
    expected_version: int  # 0: the entity must not exist yet
    from_state: str | None
    to_state: str
    trigger: str
    reason: str
    actor: str
    at: datetime
    data: Mapping[str, Any]
    due_at: datetime | None
    detail: str | None = None
    effects: tuple[NewEffect, ...] = field(default_factory=tuple)
    consumes: int | None = None  # the outbox row whose outcome this transition is; deleted in the same commit


@dataclass(frozen=True, slots=True)
class Resource:
    """One stored resource of the world (a Service, a Pod, a TrafficSplit...), as its manifest."""

    kind: str
    namespace: str
    name: str
    api_version: str
    body: Mapping[str, Any]
    revision: int = 0
    updated_at: datetime | None = None

    @property
    def ref(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class WorldChange:
    revision: int
    actor: str
    summary: str
    at: datetime


@dataclass(frozen=True, slots=True)
class Document:
    """A sidecar's configuration document as the catalog computed it."""

    sidecar: str
    digest: str
    body: str
    revision: int
    updated_at: datetime
