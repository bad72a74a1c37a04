"""Effects as data: what a transition asks the engine to do once it is committed.

Each effect names the trigger its outcome feeds back to the entity that emitted it (`on_ok`, `on_fail`). Effects are
idempotent, because after a crash the engine runs whatever is left in the outbox again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from machines.base import Effect, effect


# ----------------------------------------------------------------------------------------------------- pods ---
@effect
@dataclass(frozen=True, slots=True)
class InjectSidecar(Effect):
    """Give the pod its init step and sidecar (Kubernetes: confirm the admitted pod carries them)."""

    pod: str
    on_ok: ClassVar[str | None] = "injected"


@effect
@dataclass(frozen=True, slots=True)
class RequestIdentity(Effect):
    """Make sure the pod has a live certificate: keep one in flight, retry a failed one, or request a new one.

    The outcome carries `issued` (the certificate's key) when the pod's certificate is already issued, as after a
    reset, so that the pod does not wait for a notification that was sent while it was failed.
    """

    pod: str
    spiffe_id: str
    dns_names: tuple[str, ...]
    on_ok: ClassVar[str | None] = "identity_requested"


@effect
@dataclass(frozen=True, slots=True)
class ReleaseIdentity(Effect):
    """Revoke every live certificate the pod owns."""

    pod: str
    on_fail: ClassVar[str | None] = None


@effect
@dataclass(frozen=True, slots=True)
class TeardownPod(Effect):
    """Remove what the mesh set up for the pod (namespace, rules, processes); a no-op where the platform does it."""

    pod: str
    on_ok: ClassVar[str | None] = "gone"


# -------------------------------------------------------------------------------------------- certificates ---
@effect
@dataclass(frozen=True, slots=True)
class SignSvid(Effect):
    """Sign an X.509-SVID; the outcome carries serial, generation, not_before and not_after.

    `rotation` marks the successor of a serving certificate: those wait for the signing rate limit, so that a mass
    rotation cannot starve a new pod of its first certificate.
    """

    cert: str
    spiffe_id: str
    dns_names: tuple[str, ...]
    ttl_seconds: float
    rotation: bool = False
    on_ok: ClassVar[str | None] = "issued"


@effect
@dataclass(frozen=True, slots=True)
class DeliverSvid(Effect):
    """Hand the signed SVID to the node agent that serves the owner."""

    cert: str
    owner: str
    on_ok: ClassVar[str | None] = "delivered"


@effect
@dataclass(frozen=True, slots=True)
class WithdrawSvid(Effect):
    """Take a revoked SVID away from the node agent."""

    cert: str
    owner: str
    on_fail: ClassVar[str | None] = None


@effect
@dataclass(frozen=True, slots=True)
class GenerateCa(Effect):
    """Make (or import) the keys and certificates of a CA generation."""

    generation: str
    ttl_seconds: float
    on_ok: ClassVar[str | None] = "prepared"


@effect
@dataclass(frozen=True, slots=True)
class ActivateCa(Effect):
    """Make `generation` the one that signs new leaves; `activated` says it does."""

    generation: str
    on_ok: ClassVar[str | None] = "activated"


@effect
@dataclass(frozen=True, slots=True)
class PublishBundle(Effect):
    """Publish the trust bundle as the CA generations now make it up (a generation left it)."""

    on_fail: ClassVar[str | None] = None


@effect
@dataclass(frozen=True, slots=True)
class JoinBundle(Effect):
    """Publish the trust bundle with a prepared generation in it; `bundled` says it is there, so it may sign."""

    generation: str
    on_ok: ClassVar[str | None] = "bundled"
    on_fail: ClassVar[str | None] = None  # retried with backoff; the generation waits in `prepared` meanwhile


@effect
@dataclass(frozen=True, slots=True)
class ReissueLeaves(Effect):
    """Ask every live leaf not signed by `generation` to rotate."""

    generation: str
    on_fail: ClassVar[str | None] = None


@effect
@dataclass(frozen=True, slots=True)
class CountOutstandingLeaves(Effect):
    """Count the unexpired, unreplaced leaves a retiring generation signed; the outcome carries `outstanding`."""

    generation: str
    on_ok: ClassVar[str | None] = "checked"
    on_fail: ClassVar[str | None] = None


# ------------------------------------------------------------------------------------------ config rollout ---
@effect
@dataclass(frozen=True, slots=True)
class PublishConfig(Effect):
    """Publish the sidecar's configuration document at `generation`; the outcome carries `generation`."""

    sidecar: str
    generation: int
    on_ok: ClassVar[str | None] = "published"


@effect
@dataclass(frozen=True, slots=True)
class DeleteConfig(Effect):
    """Remove a departed sidecar's configuration and permissions."""

    sidecar: str
    on_fail: ClassVar[str | None] = None
