"""The certificate lifecycles: one machine per X.509-SVID, one per CA generation.

Theory of operation: SVIDs
--------------------------
Every issuance is its own entity, keyed `<owner>/<n>`, so a rotation is visible as two certificates whose lives
overlap: the new one (n+1) is requested while the old one still serves, and the old one becomes `superseded` only
once the new one has been delivered.

    requested --issued--> issued --delivered--> delivered --activate--> active
    delivered|active --tick at rotate_at--> rotation-due --superseded--> superseded --tick at not_after--> expired

`rotate_at` is half the lifetime, moved by up to +/-10% with the engine's jitter draw, so that certificates issued
together (a node restart, a CA rotation) do not all come due in the same second. Half, because the other half is the
budget for the new certificate to be signed, delivered and picked up, retried if the CA or the agent is down, before
anything expires. A certificate that reaches not_after while still in use expires loudly (reason
`expired-in-use`). `revoke` (the owner left) withdraws it from the node agent. A failed issuance retries itself
after `cert_retry_after`, so nothing stays failed unattended.

Theory of operation: CA generations
-----------------------------------
    preparing --prepared--> prepared --bundled--> prepared --activate--> active --activated--> active
      --retire--> retiring --checked(0 left)--> retired

A new generation joins the trust bundle as soon as it is prepared, and `activate` is refused until the bundle with it
has been published (`bundled`), so it signs nothing that a peer cannot yet trust; once the CA signs with it
(`activated`), every live leaf of other generations is asked to rotate and the previous generation starts retiring.
A failed activation fails the generation: it is made again, and waits to be activated. The old generation leaves the
bundle only when it has no unexpired, unreplaced leaf left (it asks each tick; the answer comes back as `checked`).
"""

from __future__ import annotations

import enum
from datetime import datetime

from machines.base import Context, Data, Effect, Fire, Rule, Spec, after, is_due, iso, parse_time
from machines.effects import (
    ActivateCa,
    CountOutstandingLeaves,
    DeliverSvid,
    GenerateCa,
    JoinBundle,
    PublishBundle,
    ReissueLeaves,
    SignSvid,
    WithdrawSvid,
)

KIND = "cert"
CA_KIND = "ca"
DEFAULT_SVID_TTL = 3600.0  # 1 h, as NGINX Service Mesh
DEFAULT_CA_TTL = 720 * 3600.0  # 720 h, as NGINX Service Mesh
ROTATION_JITTER = 0.10  # +/-10% of the half-life
DEFAULT_RETRY_AFTER = 60.0
DEFAULT_RETIRE_CHECK = 60.0


class CertState(enum.Enum):
    requested = "requested"
    issued = "issued"
    delivered = "delivered"
    active = "active"
    rotation_due = "rotation-due"
    superseded = "superseded"
    expired = "expired"
    revoked = "revoked"
    failed = "failed"


class CertReason(enum.StrEnum):
    REQUESTED = "requested"
    ISSUED = "issued"
    DELIVERED = "delivered"
    ACTIVATED = "activated"
    PICKED_UP_EARLY = "picked-up-before-delivery"
    HALF_LIFE = "half-life-reached"
    ROTATION_FORCED = "rotation-forced"
    SUPERSEDED = "superseded"
    EXPIRED = "expired"
    EXPIRED_IN_USE = "expired-in-use"
    REVOKED = "revoked"
    FAILED = "failed"
    RETRY = "retry"


CERT_REASONS: dict[str, str] = {
    CertReason.REQUESTED: "signature requested from the mesh CA",
    CertReason.ISSUED: "signed by the mesh CA",
    CertReason.DELIVERED: "handed to the node agent",
    CertReason.ACTIVATED: "picked up by the workload",
    CertReason.PICKED_UP_EARLY: "the workload picked it up before its delivery was recorded; active once it is",
    CertReason.HALF_LIFE: "half its lifetime (with jitter) has passed: a successor is requested",
    CertReason.ROTATION_FORCED: "rotation asked for (CA rotation or operator)",
    CertReason.SUPERSEDED: "its successor was delivered",
    CertReason.EXPIRED: "reached not-after after it was replaced",
    CertReason.EXPIRED_IN_USE: "reached not-after while still in use: rotation did not complete in time",
    CertReason.REVOKED: "its owner left the mesh",
    CertReason.FAILED: "signing or delivery failed for good",
    CertReason.RETRY: "issuance tried again",
}

C = CertState
LIVE = (C.requested, C.issued, C.delivered, C.active, C.rotation_due)
SERVING = (C.delivered, C.active)


def _expired(ctx: Context) -> bool:
    return "not_after" in ctx.data and ctx.now >= parse_time(ctx.data["not_after"])


def _request(ctx: Context) -> dict[str, object]:
    p = ctx.payload
    return {
        "owner": p["owner"],
        "spiffe_id": p["spiffe_id"],
        "dns_names": list(p.get("dns_names", ())),
        "index": int(p.get("index", 1)),
        "supersedes": p.get("supersedes"),
        # Only the certificate a pod waits for tells it; its successors rotate silently.
        "notify_owner": bool(p.get("notify_owner")),
        "ttl_seconds": float(p.get("ttl_seconds", ctx.setting("svid_ttl", DEFAULT_SVID_TTL))),
    }


def _sign(ctx: Context) -> tuple[Effect, ...]:
    d = ctx.data
    return (SignSvid(ctx.key, d["spiffe_id"], tuple(d["dns_names"]), d["ttl_seconds"], bool(d.get("supersedes"))),)


def _issued(ctx: Context) -> dict[str, object]:
    p = ctx.payload
    not_before, not_after = parse_time(p["not_before"]), parse_time(p["not_after"])
    half = (not_after - not_before) / 2
    rotate_at = not_before + half * (1 + ROTATION_JITTER * max(-1.0, min(1.0, ctx.jitter)))
    return {"serial": p["serial"], "generation": p.get("generation"), "not_before": iso(not_before),
            "not_after": iso(not_after), "rotate_at": iso(rotate_at)}


def _on_issued(ctx: Context) -> tuple[Effect, ...]:
    effects: list[Effect] = [DeliverSvid(ctx.key, ctx.data["owner"])]
    if ctx.data.get("notify_owner"):
        effects.append(Fire("pod", ctx.data["owner"], "identity_issued", {"cert": ctx.key}))
    return tuple(effects)


def _on_delivered(ctx: Context) -> tuple[Effect, ...]:
    old = ctx.data.get("supersedes")
    return (Fire(KIND, old, "superseded"),) if old else ()


def _successor(ctx: Context) -> tuple[Effect, ...]:
    d = ctx.data
    n = d["index"] + 1
    key = f"{d['owner']}/{n}"
    payload = {"owner": d["owner"], "spiffe_id": d["spiffe_id"], "dns_names": d["dns_names"], "index": n,
               "supersedes": ctx.key}
    return (Fire(KIND, key, "request", payload),)


def _failed(ctx: Context) -> tuple[Effect, ...]:
    if ctx.data.get("notify_owner"):
        reason = ctx.payload.get("reason", "unknown")
        return (Fire("pod", ctx.data["owner"], "fail", {"reason": f"identity: {reason}"}),)
    return ()


def _at_rotation(ctx: Context, data: Data) -> datetime | None:
    return parse_time(data["rotate_at"])


def _at_expiry(ctx: Context, data: Data) -> datetime | None:
    return parse_time(data["not_after"]) if "not_after" in data else None


def _retry_later(ctx: Context, data: Data) -> datetime | None:
    return after(ctx, "cert_retry_after", DEFAULT_RETRY_AFTER)


R = CertReason
CERT_RULES: tuple[Rule, ...] = (
    Rule("request", (), C.requested, R.REQUESTED, update=_request, effects=_sign),
    Rule("issued", (C.requested,), C.issued, R.ISSUED, update=_issued, effects=_on_issued, due=_at_expiry),
    # The node agent may tell that the workload picked the SVID up before the delivery's own outcome is committed
    # (the push and the commit race): the news is kept, and the delivery then makes it active at once.
    Rule("activate", (C.issued,), C.issued, R.PICKED_UP_EARLY, update=lambda ctx: {"picked_up": True},
         due=_at_expiry),
    Rule("delivered", (C.issued,), C.active, R.ACTIVATED, guard=lambda ctx: bool(ctx.data.get("picked_up")),
         effects=_on_delivered, due=_at_rotation),
    Rule("delivered", (C.issued,), C.delivered, R.DELIVERED, effects=_on_delivered, due=_at_rotation),
    Rule("activate", (C.delivered,), C.active, R.ACTIVATED, due=_at_rotation),
    # Expiry is listed before rotation: a certificate past not-after must not ask for a successor as if all was well.
    Rule("tick", (C.issued, C.delivered, C.active, C.rotation_due), C.expired, R.EXPIRED_IN_USE, guard=_expired),
    Rule("tick", (C.superseded,), C.expired, R.EXPIRED, guard=_expired),
    Rule("tick", SERVING, C.rotation_due, R.HALF_LIFE, guard=is_due, effects=_successor, due=_at_expiry),
    Rule("tick", (C.failed,), C.requested, R.RETRY, guard=is_due, effects=_sign),
    Rule("rotate", SERVING, C.rotation_due, R.ROTATION_FORCED, effects=_successor, due=_at_expiry),
    Rule("superseded", (C.rotation_due, *SERVING), C.superseded, R.SUPERSEDED, due=_at_expiry),
    # A failed certificate is revoked too: otherwise its own retry would sign it again for an owner that left.
    Rule("revoke", (*LIVE, C.superseded, C.failed), C.revoked, R.REVOKED,
         effects=lambda ctx: (WithdrawSvid(ctx.key, ctx.data["owner"]),)),
    Rule("fail", (C.requested, C.issued), C.failed, R.FAILED,
         update=lambda ctx: {"failure": ctx.payload.get("reason", "unknown")}, effects=_failed, due=_retry_later),
    Rule("retry", (C.failed,), C.requested, R.RETRY, effects=_sign),
)

CERT_SPEC = Spec(KIND, CertState, create="request", initial=C.requested, rules=CERT_RULES, reasons=CERT_REASONS,
                 terminal=frozenset({C.expired, C.revoked}))


# ---------------------------------------------------------------------------------------------- CA generations ---
class CaState(enum.Enum):
    preparing = "preparing"
    prepared = "prepared"
    active = "active"
    retiring = "retiring"
    retired = "retired"
    failed = "failed"


class CaReason(enum.StrEnum):
    PREPARING = "preparing"
    PREPARED = "prepared"
    BUNDLED = "bundled"
    ACTIVATED = "activated"
    SIGNING = "signing"
    RETIRING = "retiring"
    LEAVES_OUTSTANDING = "leaves-outstanding"
    RETIRED = "retired"
    FAILED = "failed"
    RETRY = "retry"


CA_REASONS: dict[str, str] = {
    CaReason.PREPARING: "keys and certificate being made",
    CaReason.PREPARED: "keys and certificate made; joining the trust bundle",
    CaReason.BUNDLED: "in the trust bundle: it may now be activated",
    CaReason.ACTIVATED: "activation asked of the CA",
    CaReason.SIGNING: "now signs new leaves; leaves of other generations asked to rotate",
    CaReason.RETIRING: "no longer signs; stays in the bundle while its leaves live",
    CaReason.LEAVES_OUTSTANDING: "leaves it signed are still valid and not replaced",
    CaReason.RETIRED: "no leaf of it is left: removed from the trust bundle",
    CaReason.FAILED: "the generation could not be made or activated",
    CaReason.RETRY: "making the generation tried again",
}

A = CaState
_R = CaReason


def _retire_check(ctx: Context, data: Data) -> datetime | None:
    return after(ctx, "ca_retire_check", DEFAULT_RETIRE_CHECK)


def _ca_retry_later(ctx: Context, data: Data) -> datetime | None:
    return after(ctx, "ca_retry_after", DEFAULT_RETRY_AFTER)


def _none_left(ctx: Context) -> bool:
    return int(ctx.payload.get("outstanding", 1)) == 0


def _prepare(ctx: Context) -> dict[str, object]:
    return {"previous": ctx.payload.get("previous"), "auto_activate": bool(ctx.payload.get("auto_activate"))}


def _on_bundled(ctx: Context) -> tuple[Effect, ...]:
    return (Fire(CA_KIND, ctx.key, "activate"),) if ctx.data.get("auto_activate") else ()


def _in_bundle(ctx: Context) -> bool:
    """A generation signs nothing before every peer can trust what it signs."""
    return bool(ctx.data.get("in_bundle"))


def _on_signing(ctx: Context) -> tuple[Effect, ...]:
    # Only once the CA signs with the new generation: leaves re-issued before that would still be old ones.
    effects: list[Effect] = [ReissueLeaves(ctx.key)]
    if ctx.data.get("previous"):
        effects.append(Fire(CA_KIND, ctx.data["previous"], "retire"))
    return tuple(effects)


def _generate(ctx: Context) -> tuple[Effect, ...]:
    return (GenerateCa(ctx.key, float(ctx.setting("ca_ttl", DEFAULT_CA_TTL))),)


CA_RULES: tuple[Rule, ...] = (
    Rule("prepare", (), A.preparing, _R.PREPARING, update=_prepare, effects=_generate),
    Rule("prepared", (A.preparing,), A.prepared, _R.PREPARED,
         update=lambda ctx: {**{k: ctx.payload[k] for k in ("not_before", "not_after") if k in ctx.payload},
                             "in_bundle": False},
         effects=lambda ctx: (JoinBundle(ctx.key),)),
    Rule("bundled", (A.prepared,), A.prepared, _R.BUNDLED, update=lambda ctx: {"in_bundle": True},
         effects=_on_bundled),
    Rule("activate", (A.prepared,), A.active, _R.ACTIVATED, guard=_in_bundle,
         effects=lambda ctx: (ActivateCa(ctx.key),)),
    Rule("activated", (A.active,), A.active, _R.SIGNING, effects=_on_signing),
    Rule("retire", (A.active,), A.retiring, _R.RETIRING, due=_retire_check),
    Rule("tick", (A.retiring,), A.retiring, _R.RETIRING, guard=is_due,
         effects=lambda ctx: (CountOutstandingLeaves(ctx.key),), due=_retire_check),
    Rule("checked", (A.retiring,), A.retired, _R.RETIRED, guard=_none_left,
         effects=lambda ctx: (PublishBundle(),)),
    Rule("checked", (A.retiring,), A.retiring, _R.LEAVES_OUTSTANDING, due=_retire_check),
    Rule("fail", (A.preparing, A.active), A.failed, _R.FAILED,
         update=lambda ctx: {"failure": ctx.payload.get("reason", "unknown")}, due=_ca_retry_later),
    Rule("tick", (A.failed,), A.preparing, _R.RETRY, guard=is_due, effects=_generate),
)

CA_SPEC = Spec(CA_KIND, CaState, create="prepare", initial=A.preparing, rules=CA_RULES, reasons=CA_REASONS,
               terminal=frozenset({A.retired}))
