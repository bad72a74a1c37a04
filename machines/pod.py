"""The pod lifecycle: from admission to a ready, meshed workload, and out again.

Theory of operation
-------------------
A pod enters when the platform admits it into the mesh and leaves when the platform says it is gone. In between it
walks one path, each step waiting for one fact:

    admitted --injected--> injected --schedule--> scheduled --identity_requested--> identity-requested
      --identity_issued--> identity-issued --sidecar_connected--> sidecar-connected
      --config_synced--> config-synced --ready--> ready --terminate--> terminating --gone--> gone

so the state alone says what a pod that is not ready is still missing: its certificate (identity-requested), its
sidecar's start (identity-issued), its first configuration (sidecar-connected) or its proxy (config-synced).
The steps the mesh itself drives (everything from admission to config-synced, except waiting for the platform to
schedule the pod and to start its sidecar, which on Kubernetes comes after the images are pulled) carry a
deadline; a tick after it moves the pod to `failed` with `step-timed-out`, so no pod stays stuck unnoticed.
`failed` keeps the reason; `reset` starts the pod over, `terminate` takes it out.

`gone` is not the end: a pod deleted and created again under the same name (a StatefulSet's `web-0`, or any pod a
user re-creates) is the same entity, and `admit` from `gone` starts its life again (reason `readmitted`). Its data is
the new payload's: the previous incarnation's facts (node, address, certificate, failure) are cleared, since the
table merges an update into the data. Nothing of the previous incarnation is left to take over: `terminate` revoked
its certificates and removed its sidecar's rollout, so the new incarnation asks for a certificate of its own when
it is scheduled (the next index, under a service account that may have changed) and registers its sidecar again.
"""

from __future__ import annotations

import enum
from datetime import datetime

from machines.base import Context, Data, Effect, Fire, Rule, Spec, after, is_due
from machines.effects import InjectSidecar, ReleaseIdentity, RequestIdentity, TeardownPod

KIND = "pod"
DEFAULT_STEP_TIMEOUT = 300.0  # seconds; generous next to a 1 h SVID and a 10 s config window, short next to a page


class PodState(enum.Enum):
    admitted = "admitted"
    injected = "injected"
    scheduled = "scheduled"
    identity_requested = "identity-requested"
    identity_issued = "identity-issued"
    sidecar_connected = "sidecar-connected"
    config_synced = "config-synced"
    ready = "ready"
    terminating = "terminating"
    gone = "gone"
    failed = "failed"


class PodReason(enum.StrEnum):
    ADMITTED = "admitted"
    INJECTED = "injected"
    SCHEDULED = "scheduled"
    IDENTITY_REQUESTED = "identity-requested"
    IDENTITY_ISSUED = "identity-issued"
    IDENTITY_ALREADY_ISSUED = "identity-already-issued"
    SIDECAR_CONNECTED = "sidecar-connected"
    CONFIG_SYNCED = "config-synced"
    READY = "ready"
    TERMINATING = "terminating"
    GONE = "gone"
    STEP_TIMED_OUT = "step-timed-out"
    FAILED = "failed"
    RESET = "reset"
    READMITTED = "readmitted"


REASONS: dict[str, str] = {
    PodReason.ADMITTED: "admitted into the mesh",
    PodReason.INJECTED: "init step and sidecar injected",
    PodReason.SCHEDULED: "placed on a node with an address",
    PodReason.IDENTITY_REQUESTED: "certificate requested from the mesh CA",
    PodReason.IDENTITY_ISSUED: "certificate issued",
    PodReason.IDENTITY_ALREADY_ISSUED: "its certificate was already issued (the pod was started over)",
    PodReason.SIDECAR_CONNECTED: "sidecar started (the platform saw it run)",
    PodReason.CONFIG_SYNCED: "sidecar acknowledged its first configuration",
    PodReason.READY: "proxy up: certificate, configuration and proxy all present",
    PodReason.TERMINATING: "termination started",
    PodReason.GONE: "removed from the platform",
    PodReason.STEP_TIMED_OUT: "a step the mesh drives did not finish before its deadline",
    PodReason.FAILED: "an effect failed for good",
    PodReason.RESET: "started over by an operator",
    PodReason.READMITTED: "created again under the same name after it was gone: its life starts over",
}

# What a pod in each state is still waiting for: `meshctl state pods` says it (users' complaint #1).
WAITING_FOR = {
    PodState.admitted: "sidecar injection",
    PodState.injected: "the platform to schedule it",
    PodState.scheduled: "its certificate request",
    PodState.identity_requested: "its certificate",
    PodState.identity_issued: "its sidecar to start",
    PodState.sidecar_connected: "its first configuration to be acknowledged",
    PodState.config_synced: "its proxy and its workload to be ready",
    PodState.ready: "",
    PodState.terminating: "teardown",
    PodState.gone: "",
    PodState.failed: "an operator (reset or terminate)",
}

S = PodState
LIVE = (S.admitted, S.injected, S.scheduled, S.identity_requested, S.identity_issued, S.sidecar_connected,
        S.config_synced, S.ready)
# The steps whose next fact the mesh produces; waiting to be scheduled, and for the sidecar to start (a kubelet pulls
# the images first), is the platform's business.
DRIVEN = (S.admitted, S.scheduled, S.identity_requested, S.sidecar_connected, S.config_synced)


def spiffe_id(ctx: Context) -> str:
    domain = ctx.setting("trust_domain", "example.org")
    return f"spiffe://{domain}/ns/{ctx.data['namespace']}/sa/{ctx.data['service_account']}"


def _deadline(ctx: Context, data: Data) -> datetime | None:
    return after(ctx, "pod_step_timeout", DEFAULT_STEP_TIMEOUT)


def _admit(ctx: Context) -> dict[str, object]:
    namespace, _, name = ctx.key.partition("/")
    return {
        "namespace": ctx.payload.get("namespace", namespace),
        "name": ctx.payload.get("name", name),
        "service_account": ctx.payload.get("service_account", "default"),
        "labels": dict(ctx.payload.get("labels", {})),
        # The platform's uid of this incarnation, when it has one: a pod created again under the name is told apart.
        **({"uid": str(ctx.payload["uid"])} if ctx.payload.get("uid") else {}),
    }


def _readmit(ctx: Context) -> dict[str, object]:
    """The new incarnation's data only: every key of the previous one cleared, then the admission's."""
    return {**dict.fromkeys(ctx.data), **_admit(ctx)}


def _request_identity(ctx: Context) -> tuple[Effect, ...]:
    # The pod's own name first (it becomes the CN), then its service account's: HAProxy 2.8 cannot match a URI SAN,
    # so a client sidecar pins the server's identity with `verifyhost <sa>.<ns>.sa`.
    ns = ctx.data["namespace"]
    dns = [f"{ctx.data['name']}.{ns}.pod", f"{ctx.data['service_account']}.{ns}.sa"]
    return (RequestIdentity(ctx.key, spiffe_id(ctx), tuple(dns)),)


def _already_issued(ctx: Context) -> bool:
    return bool(ctx.payload.get("issued"))


def _terminate(ctx: Context) -> tuple[Effect, ...]:
    return (ReleaseIdentity(ctx.key), Fire("sidecar", ctx.key, "remove"), TeardownPod(ctx.key))


def _failure(ctx: Context) -> dict[str, object]:
    return {"failure": ctx.payload.get("reason", "unknown")}


def _timed_out(ctx: Context) -> dict[str, object]:
    return {"failure": f"step-timed-out in {ctx.state}"}


R = PodReason
RULES: tuple[Rule, ...] = (
    Rule("admit", (), S.admitted, R.ADMITTED, update=_admit,
         effects=lambda ctx: (InjectSidecar(ctx.key),), due=_deadline),
    Rule("admit", (S.gone,), S.admitted, R.READMITTED, update=_readmit,
         effects=lambda ctx: (InjectSidecar(ctx.key),), due=_deadline),
    Rule("injected", (S.admitted,), S.injected, R.INJECTED),
    Rule("schedule", (S.injected,), S.scheduled, R.SCHEDULED,
         update=lambda ctx: {"node": ctx.payload.get("node"), "ip": ctx.payload.get("ip")},
         effects=_request_identity, due=_deadline),
    Rule("identity_requested", (S.scheduled,), S.identity_issued, R.IDENTITY_ALREADY_ISSUED,
         guard=_already_issued, update=lambda ctx: {"cert": ctx.payload["issued"]}),
    Rule("identity_requested", (S.scheduled,), S.identity_requested, R.IDENTITY_REQUESTED,
         due=_deadline),
    Rule("identity_issued", (S.identity_requested,), S.identity_issued, R.IDENTITY_ISSUED,
         update=lambda ctx: {"cert": ctx.payload.get("cert")}),
    Rule("sidecar_connected", (S.identity_issued,), S.sidecar_connected, R.SIDECAR_CONNECTED,
         effects=lambda ctx: (Fire("sidecar", ctx.key, "register", {"owner": ctx.key}),),
         due=_deadline),
    Rule("config_synced", (S.sidecar_connected,), S.config_synced, R.CONFIG_SYNCED,
         due=_deadline),
    Rule("ready", (S.config_synced,), S.ready, R.READY),
    Rule("tick", DRIVEN, S.failed, R.STEP_TIMED_OUT, guard=is_due, update=_timed_out),
    Rule("terminate", (*LIVE, S.failed), S.terminating, R.TERMINATING, effects=_terminate),
    Rule("gone", (S.terminating,), S.gone, R.GONE),
    Rule("fail", (*LIVE, S.terminating), S.failed, R.FAILED, update=_failure),
    Rule("reset", (S.failed,), S.admitted, R.RESET, effects=lambda ctx: (InjectSidecar(ctx.key),),
         due=_deadline),
)

# No terminal state: a pod that is gone may be created again under its name (`admit` from `gone`).
SPEC = Spec(KIND, PodState, create="admit", initial=S.admitted, rules=RULES, reasons=REASONS)
