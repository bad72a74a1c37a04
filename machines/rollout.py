"""The configuration rollout of one sidecar: desired, sent and acknowledged generations.

Theory of operation
-------------------
Each sidecar has three numbers: `desired` (bumped by every change of its document), `sent` (the last generation
published) and `acked` (the last generation the sidecar said it runs). The state is what they mean together:

    state       desired / sent / acked        shown as
    pending     desired > sent, waiting        NOT SENT   changes are being coalesced
    publishing  desired > sent, publishing     NOT SENT   the publish effect is in the outbox
    sent        sent = desired > acked         SENT       waiting for the acknowledgement, within ack_timeout
    stale       sent = desired > acked         STALE      not acknowledged in time: republished with backoff
    synced      acked = desired                SYNCED
    failed      publishing failed for good     NOT SENT   tried again after rollout_retry_after
    removed     the sidecar left (until it registers again)

Changes are coalesced as Istio does: a change waits for a quiet window (100 ms) after the last change, but never
more than the maximum window (10 s) after the first one, so a burst of changes makes one publish and a steady
trickle cannot postpone a publish forever. A stale sidecar is republished at ack_timeout * 2^n, capped at 60 s: an
offline sidecar costs little, and a reconnecting one reads the current document from the last-value store anyway.
The first acknowledgement tells the pod its configuration is synced.
"""

from __future__ import annotations

import enum
from datetime import datetime, timedelta

from machines.base import Context, Data, Effect, Fire, Rule, Spec, after, is_due, iso, parse_time
from machines.effects import DeleteConfig, PublishConfig

KIND = "sidecar"
QUIET_WINDOW = 0.1  # seconds after the last change
MAX_WINDOW = 10.0  # seconds after the first change of a burst
ACK_TIMEOUT = 5.0
STALE_BACKOFF_CAP = 60.0
RETRY_AFTER = 30.0


class RolloutState(enum.Enum):
    pending = "pending"
    publishing = "publishing"
    sent = "sent"
    synced = "synced"
    stale = "stale"
    failed = "failed"
    removed = "removed"


class RolloutReason(enum.StrEnum):
    REGISTERED = "registered"
    REREGISTERED = "registered-again"
    CHANGED = "changed"
    WINDOW_CLOSED = "window-closed"
    PUBLISHED = "published"
    OVERTAKEN = "overtaken"
    FIRST_ACK = "first-acknowledged"
    ACKNOWLEDGED = "acknowledged"
    OLD_ACK = "old-generation-acknowledged"
    ACK_TIMED_OUT = "ack-timed-out"
    REPUBLISHED = "republished"
    FAILED = "failed"
    RETRY = "retry"
    REMOVED = "removed"


REASONS: dict[str, str] = {
    RolloutReason.REGISTERED: "sidecar joined: its first document is on the way",
    RolloutReason.REREGISTERED: "sidecar connected again: its document is sent anew",
    RolloutReason.CHANGED: "its document changed",
    RolloutReason.WINDOW_CLOSED: "the coalescing window closed: publishing the desired generation",
    RolloutReason.PUBLISHED: "the desired generation was published",
    RolloutReason.OVERTAKEN: "published, but a newer change arrived meanwhile",
    RolloutReason.FIRST_ACK: "the sidecar runs its first document: its pod is told",
    RolloutReason.ACKNOWLEDGED: "the sidecar runs the desired generation",
    RolloutReason.OLD_ACK: "the sidecar acknowledged an older generation",
    RolloutReason.ACK_TIMED_OUT: "no acknowledgement in time: republishing",
    RolloutReason.REPUBLISHED: "republished while stale",
    RolloutReason.FAILED: "publishing failed for good",
    RolloutReason.RETRY: "publishing tried again",
    RolloutReason.REMOVED: "the sidecar left the mesh",
}

S = RolloutState
R = RolloutReason
LIVE = (S.pending, S.publishing, S.sent, S.synced, S.stale, S.failed)


# ---- the numbers ---------------------------------------------------------------------------------------------
def _gen(ctx: Context) -> int:
    return int(ctx.payload.get("generation", 0))


def _acked_all(ctx: Context) -> bool:
    return _gen(ctx) >= int(ctx.data["desired"])


def _first_ack(ctx: Context) -> bool:
    return _acked_all(ctx) and not bool(ctx.data["owner_notified"])


def _published_current(ctx: Context) -> bool:
    return _gen(ctx) >= int(ctx.data["desired"])


def _register(ctx: Context) -> dict[str, object]:
    return {"owner": ctx.payload.get("owner", ctx.key), "desired": 1, "sent": 0, "acked": 0,
            "window_start": iso(ctx.now), "republishes": 0, "owner_notified": False}


def _reregister(ctx: Context) -> dict[str, object]:
    return {"owner": ctx.payload.get("owner", ctx.data.get("owner", ctx.key)), "desired": ctx.data["desired"] + 1,
            "window_start": iso(ctx.now), "republishes": 0, "owner_notified": False}


def _bump(ctx: Context) -> dict[str, object]:
    return {"desired": ctx.data["desired"] + 1, "window_start": iso(ctx.now)}


def _bump_in_window(ctx: Context) -> dict[str, object]:
    return {"desired": ctx.data["desired"] + 1}


def _sent(ctx: Context) -> dict[str, object]:
    return {"sent": max(ctx.data["sent"], _gen(ctx))}


def _acked(ctx: Context) -> dict[str, object]:
    return {"acked": max(ctx.data["acked"], _gen(ctx)), "republishes": 0, "owner_notified": True}


def _old_ack(ctx: Context) -> dict[str, object]:
    return {"acked": max(ctx.data["acked"], _gen(ctx))}


# ---- times ---------------------------------------------------------------------------------------------------
def _window(ctx: Context, data: Data) -> datetime | None:
    """Quiet window after this change, but never past the maximum window after the burst's first change."""
    quiet = after(ctx, "rollout_quiet_window", QUIET_WINDOW)
    cap = parse_time(data["window_start"]) + timedelta(seconds=float(ctx.setting("rollout_max_window", MAX_WINDOW)))
    return min(quiet, cap)


def _ack_deadline(ctx: Context, data: Data) -> datetime | None:
    return after(ctx, "rollout_ack_timeout", ACK_TIMEOUT)


def _backoff(ctx: Context, data: Data) -> datetime | None:
    base = float(ctx.setting("rollout_ack_timeout", ACK_TIMEOUT))
    cap = float(ctx.setting("rollout_stale_cap", STALE_BACKOFF_CAP))
    return ctx.now + timedelta(seconds=min(cap, base * 2 ** min(int(data["republishes"]), 16)))


def _retry_later(ctx: Context, data: Data) -> datetime | None:
    return after(ctx, "rollout_retry_after", RETRY_AFTER)


def _keep_due(ctx: Context, data: Data) -> datetime | None:
    return ctx.due_at


# ---- effects -------------------------------------------------------------------------------------------------
def _publish(ctx: Context) -> tuple[Effect, ...]:
    return (PublishConfig(ctx.key, int(ctx.data["desired"])),)




RULES: tuple[Rule, ...] = (
    Rule("register", (), S.pending, R.REGISTERED, update=_register, due=_window),
    # A sidecar that connects again (its pod was started over, or it came back after leaving) gets its document
    # anew, and its first acknowledgement tells the pod again.
    Rule("register", (*LIVE, S.removed), S.pending, R.REREGISTERED, update=_reregister, due=_window),
    Rule("change", (S.pending,), S.pending, R.CHANGED, update=_bump_in_window, due=_window),
    Rule("change", (S.sent, S.synced, S.stale, S.failed), S.pending, R.CHANGED, update=_bump, due=_window),
    Rule("change", (S.publishing,), S.publishing, R.CHANGED, update=_bump),
    Rule("tick", (S.pending,), S.publishing, R.WINDOW_CLOSED, guard=is_due, effects=_publish),
    Rule("published", (S.publishing,), S.sent, R.PUBLISHED, guard=_published_current, update=_sent,
         due=_ack_deadline),
    Rule("published", (S.publishing,), S.pending, R.OVERTAKEN, update=_sent, due=_window),
    Rule("published", (S.synced,), S.synced, R.PUBLISHED, update=_sent),
    Rule("published", (S.stale,), S.stale, R.REPUBLISHED, update=_sent, due=_backoff),
    Rule("ack", LIVE, S.synced, R.FIRST_ACK, guard=_first_ack, update=_acked,
         effects=lambda ctx: (Fire("pod", ctx.data["owner"], "config_synced"),)),
    Rule("ack", LIVE, S.synced, R.ACKNOWLEDGED, guard=_acked_all, update=_acked),
    *(Rule("ack", (s,), s, R.OLD_ACK, update=_old_ack, due=_keep_due) for s in LIVE),
    Rule("tick", (S.sent, S.stale), S.stale, R.ACK_TIMED_OUT, guard=is_due,
         update=lambda ctx: {"republishes": int(ctx.data["republishes"]) + 1}, effects=_publish),
    Rule("fail", (S.publishing, S.stale), S.failed, R.FAILED,
         update=lambda ctx: {"failure": ctx.payload.get("reason", "unknown")}, due=_retry_later),
    Rule("tick", (S.failed,), S.publishing, R.RETRY, guard=is_due, effects=_publish),
    Rule("remove", LIVE, S.removed, R.REMOVED, effects=lambda ctx: (DeleteConfig(ctx.key),)),
)

SPEC = Spec(KIND, RolloutState, create="register", initial=S.pending, rules=RULES, reasons=REASONS)


class SyncStatus(enum.StrEnum):
    SYNCED = "SYNCED"
    SENT = "SENT"
    STALE = "STALE"
    NOT_SENT = "NOT SENT"
    REMOVED = "REMOVED"


def sync_status(state: str) -> SyncStatus:
    """What `meshctl state sidecars` shows, as `istioctl proxy-status` does; derived, never stored."""
    return {
        S.synced.value: SyncStatus.SYNCED,
        S.sent.value: SyncStatus.SENT,
        S.stale.value: SyncStatus.STALE,
        S.removed.value: SyncStatus.REMOVED,
    }.get(state, SyncStatus.NOT_SENT)
