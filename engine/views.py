"""Read views for operators, computed from the rows every time (never stored twice)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from actions.ca import read_status
from engine.executor import OUTSTANDING
from machines import spec_for
from machines.base import parse_time
from machines.pod import WAITING_FOR, PodState
from machines.rollout import sync_status
from store import Entity, JournalEntry, Store


def _age(now: datetime, since: datetime) -> float:
    return max(0.0, (now - since).total_seconds())


def _left(now: datetime, data: Any) -> float | None:
    return (parse_time(data["not_after"]) - now).total_seconds() if data.get("not_after") else None


@dataclass(frozen=True, slots=True)
class PodView:
    pod: str
    state: str
    waiting_for: str
    node: str | None
    ip: str | None
    seconds_in_state: float
    retries: int
    failure: str | None


@dataclass(frozen=True, slots=True)
class CertView:
    cert: str
    owner: str
    state: str
    spiffe_id: str
    serial: str | None
    generation: str | None
    not_after: str | None
    seconds_left: float | None
    rotate_at: str | None
    retries: int


@dataclass(frozen=True, slots=True)
class SidecarView:
    sidecar: str
    status: str
    state: str
    desired: int
    sent: int
    acked: int
    seconds_in_state: float
    retries: int


@dataclass(frozen=True, slots=True)
class CaView:
    generation: str
    state: str
    not_after: str | None
    seconds_left: float | None


@dataclass(frozen=True, slots=True)
class AuditRow:
    version: int
    at: str
    from_state: str | None
    to_state: str
    trigger: str
    reason: str
    reason_text: str
    detail: str | None
    actor: str


def pods(store: Store, now: datetime) -> list[PodView]:
    def view(e: Entity) -> PodView:
        d = e.data
        waiting = WAITING_FOR[PodState(e.state)]
        if e.retry_count:
            waiting = f"{waiting} (retry {e.retry_count})"
        return PodView(e.key, e.state, waiting, d.get("node"), d.get("ip"), _age(now, e.updated_at), e.retry_count,
                       d.get("failure") if e.state == PodState.failed.value else None)

    return [view(e) for e in store.list("pod")]


def certs(store: Store, now: datetime) -> list[CertView]:
    return [
        CertView(e.key, e.data.get("owner", ""), e.state, e.data.get("spiffe_id", ""), e.data.get("serial"),
                 e.data.get("generation"), e.data.get("not_after"), _left(now, e.data), e.data.get("rotate_at"),
                 e.retry_count)
        for e in store.list("cert")
    ]


def sidecars(store: Store, now: datetime) -> list[SidecarView]:
    return [
        SidecarView(e.key, str(sync_status(e.state)), e.state, int(e.data.get("desired", 0)),
                    int(e.data.get("sent", 0)), int(e.data.get("acked", 0)), _age(now, e.updated_at), e.retry_count)
        for e in store.list("sidecar")
    ]


def cas(store: Store, now: datetime) -> list[CaView]:
    return [CaView(e.key, e.state, e.data.get("not_after"), _left(now, e.data)) for e in store.list("ca")]


def audit(store: Store, kind: str, key: str) -> list[AuditRow]:
    spec = spec_for(kind)
    return [_audit_row(spec.reason_text(j.reason), j) for j in store.journal(kind, key)]


def _audit_row(text: str, j: JournalEntry) -> AuditRow:
    return AuditRow(j.version, j.at.isoformat(), j.from_state, j.to_state, j.trigger, j.reason, text, j.detail,
                    j.actor)


def as_dicts(rows: list[Any]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


@dataclass(frozen=True, slots=True)
class CaStatusView:
    generation: str
    state: str
    role: str  # root | intermediate | ? (no keys in this state directory)
    active: bool
    subject: str
    key_type: str
    not_after: str | None
    seconds_left: float | None
    leaves: int  # live leaves it signed


def ca_status(store: Store, ca_dir: Path, now: datetime) -> list[CaStatusView]:
    """The CA machine's generations joined with what the CA's directory holds for each."""
    on_disk = {g.generation: g for g in read_status(ca_dir)}
    live = Counter(c.data.get("generation") for c in store.list("cert", states=OUTSTANDING))
    rows = []
    for e in sorted(store.list("ca"), key=lambda e: int(e.key) if e.key.isdigit() else 0):
        g = on_disk.get(e.key)
        rows.append(CaStatusView(e.key, e.state, g.kind if g else "?", bool(g and g.active), g.subject if g else "-",
                                 g.key_type if g else "-", e.data.get("not_after"), _left(now, e.data),
                                 live.get(e.key, 0)))
    return rows
