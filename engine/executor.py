"""Running effects: each effect type to the action (or engine-internal step) that carries it out.

Every action error is translated here, once, into an outcome: `Ok(payload)`, `Retry(after, reason)` or
`Fail(reason)`. The engine turns those into triggers (or, for Retry, into retry bookkeeping in the outbox row).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from actions import Actions
from actions.ca import der_certificates, svid_der
from actions.errors import PermanentError, TemporaryError
from actions.nodeagent import SvidMaterial
from engine.errors import UnknownEntity
from machines import BadPayload, IllegalTrigger
from machines.base import Effect, Fire, iso
from machines.effects import (
    ActivateCa,
    CountOutstandingLeaves,
    DeleteConfig,
    DeliverSvid,
    GenerateCa,
    InjectSidecar,
    JoinBundle,
    PublishBundle,
    PublishConfig,
    ReissueLeaves,
    ReleaseIdentity,
    RequestIdentity,
    SignSvid,
    TeardownPod,
    WithdrawSvid,
)

if TYPE_CHECKING:
    from engine.core import Engine
    from store import Store

log = logging.getLogger("meshloom.engine")


@dataclass(frozen=True, slots=True)
class Ok:
    payload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Retry:
    reason: str
    after: float | None = None  # seconds; None: the engine's backoff decides
    counted: bool = True  # False: not a failed attempt, only a wait (a rate limit); it never makes the effect fail


class Deferred(Exception):
    """Raised by a handler that must wait its turn: not an error, not an attempt."""

    def __init__(self, reason: str, after: float) -> None:
        super().__init__(reason)
        self.reason, self.after = reason, after


@dataclass(frozen=True, slots=True)
class Fail:
    reason: str


Outcome: TypeAlias = Ok | Retry | Fail
Handler: TypeAlias = Callable[["Engine", Any, str], Mapping[str, Any] | None]

# Certificates that still stand for their generation: not yet replaced, not yet expired or revoked.
OUTSTANDING = ("issued", "delivered", "active", "rotation-due")
SERVING = ("delivered", "active")
BUNDLED = ("prepared", "active", "retiring")


def bundled_generations(store: Store) -> tuple[str, ...]:
    """The CA generations whose roots make up the trust bundle now, in order."""
    return tuple(sorted(c.key for c in store.list("ca", states=BUNDLED)))


def run(engine: Engine, effect: Effect, origin: str) -> Outcome:
    """Run one effect; `origin` is the entity that emitted it, the actor of any trigger it fires."""
    handler = HANDLERS.get(type(effect))
    if handler is None:
        return Fail(f"no handler for effect {type(effect).__name__}")
    try:
        return Ok(handler(engine, effect, origin) or {})
    except Deferred as exc:
        return Retry(exc.reason, exc.after, counted=False)
    except TemporaryError as exc:
        return Retry(exc.reason, exc.retry_after)
    except PermanentError as exc:
        return Fail(exc.reason)
    except Exception as exc:  # an error the action did not classify: retried, and failed for good after the last try
        log.exception("effect %s raised an unclassified error", type(effect).__name__)
        return Retry(f"{type(exc).__name__}: {exc}")


# ---- actions -------------------------------------------------------------------------------------------------
def _actions(engine: Engine) -> Actions:
    if engine.actions is None:  # an engine that only commits (meshctl fire) leaves effects to the control plane
        raise TemporaryError("this process runs no effects")
    return engine.actions


def _sign(engine: Engine, e: SignSvid, origin: str) -> Mapping[str, Any]:
    cert = engine.store.get("cert", e.cert)
    if cert is None or cert.state != "requested":  # revoked while it waited its turn: no key is made for nobody
        raise PermanentError(f"no longer requested ({cert.state if cert else 'gone'})")
    schedule = engine.signing
    if schedule is not None:
        if e.rotation:
            wait = schedule.wait(e.cert)
            if wait > 0:
                raise Deferred("waiting for the signing rate limit", wait)
        else:
            schedule.take_now()
    actions = _actions(engine)
    issued = actions.ca.sign_svid(e.spiffe_id, e.dns_names, e.ttl_seconds)
    _, key = svid_der(issued)
    owner = e.cert.rpartition("/")[0]
    actions.vault.put(owner, SvidMaterial(e.cert, e.spiffe_id, der_certificates((issued.certificate, *issued.chain)),
                                          key, issued.not_after))
    return {"serial": issued.serial, "generation": issued.generation, "not_before": iso(issued.not_before),
            "not_after": iso(issued.not_after)}


def _generate(engine: Engine, e: GenerateCa, origin: str) -> Mapping[str, Any]:
    gen = _actions(engine).ca.generate(e.generation, e.ttl_seconds)
    return {"not_before": iso(gen.not_before), "not_after": iso(gen.not_after)}


def _deliver(engine: Engine, e: DeliverSvid, origin: str) -> None:
    actions = _actions(engine)
    material = actions.vault.get(e.owner, e.cert)
    if material is None:  # signed by a process that died before it kept the key: the certificate is signed anew
        raise PermanentError("the signed SVID was lost before delivery")
    actions.delivery.deliver(e.owner, material)
    actions.vault.keep_only(e.owner, e.cert)


def _withdraw(engine: Engine, e: WithdrawSvid, origin: str) -> None:
    actions = _actions(engine)
    actions.delivery.withdraw(e.owner, e.cert)
    if not engine.store.list("cert", states=(*OUTSTANDING, "requested"), key_prefix=f"{e.owner}/"):
        actions.vault.forget(e.owner)


def trust_domain(engine: Engine) -> str:
    return str(engine.settings.get("trust_domain", "example.org"))


def _publish_bundle(engine: Engine, e: PublishBundle | JoinBundle, origin: str) -> None:
    actions = _actions(engine)
    gens = bundled_generations(engine.store)
    actions.delivery.publish_bundle(trust_domain(engine), der_certificates(actions.ca.trust_anchors(gens)))


def _publish_config(engine: Engine, e: PublishConfig, origin: str) -> Mapping[str, Any]:
    actions = _actions(engine)
    doc = engine.store.document(e.sidecar)
    if doc is None:
        raise TemporaryError("no configuration document for this sidecar yet (is its pod in the world?)")
    publish_shards(engine, [doc.body])
    actions.publisher.publish(e.sidecar, e.generation, doc.body.encode())
    return {"generation": e.generation}


# Shards are stored beside the sidecars' documents under a key no pod can have (":" is not in Kubernetes names).
SHARD_KEY_PREFIX = "shard:"


def shard_key(namespace: str) -> str:
    return f"{SHARD_KEY_PREFIX}{namespace}"


def _shards_of(body: str) -> dict[str, str]:
    outbound = json.loads(body).get("outbound")
    shards = outbound.get("shards", {}) if isinstance(outbound, dict) else {}
    return {str(ns): str(digest) for ns, digest in shards.items()}


def publish_shards(engine: Engine, documents: list[str]) -> None:
    """The outbound shards these documents name go first, so a sidecar never reads a document whose shards are
    not there; a shard the publisher knows it stored with that digest is not even read."""
    publisher = _actions(engine).publisher
    wanted: dict[str, str] = {}
    for body in documents:
        wanted.update(_shards_of(body))
    for namespace, digest in sorted(wanted.items()):
        if publisher.has_shard(namespace, digest):
            continue
        shard = engine.store.document(shard_key(namespace))
        if shard is not None:
            publisher.publish_shard(namespace, shard.body.encode())


# ---- steps on other entities (through the engine, so they are journaled like any other) ---------------------
def _fire(engine: Engine, e: Fire, origin: str) -> None:
    try:
        engine.fire(e.kind, e.key, e.trigger, dict(e.payload), actor=origin, drain=False)
    except (IllegalTrigger, UnknownEntity, BadPayload) as exc:
        # The target has moved on or is gone (a late notification, a repeated one after a crash): nothing to do.
        log.info("dropped %s/%s %s: %s", e.kind, e.key, e.trigger, exc)


def _request_identity(engine: Engine, e: RequestIdentity, origin: str) -> Mapping[str, Any] | None:
    certs = engine.store.list("cert", key_prefix=f"{e.pod}/")
    live = [c for c in certs if c.state in (*OUTSTANDING, "requested", "failed")]
    serving = [c for c in live if c.state in OUTSTANDING]
    if serving:
        return {"issued": max(serving, key=lambda c: int(c.data.get("index", 0))).key}
    if live:
        newest = max(live, key=lambda c: int(c.data.get("index", 0)))
        if newest.state == "failed":
            _fire(engine, Fire("cert", newest.key, "retry"), origin)
        return None  # the certificate in flight tells the pod when it is issued
    index = 1 + max((int(c.data.get("index", 0)) for c in certs), default=0)
    payload = {"owner": e.pod, "spiffe_id": e.spiffe_id, "dns_names": list(e.dns_names), "index": index,
               "notify_owner": True}
    engine.fire("cert", f"{e.pod}/{index}", "request", payload, actor=origin, drain=False)
    return None


def _release_identity(engine: Engine, e: ReleaseIdentity, origin: str) -> None:
    for cert in engine.store.list("cert", states=(*OUTSTANDING, "requested", "superseded", "failed"),
                                  key_prefix=f"{e.pod}/"):
        _fire(engine, Fire("cert", cert.key, "revoke"), origin)


def _reissue(engine: Engine, e: ReissueLeaves, origin: str) -> None:
    for cert in engine.store.list("cert", states=SERVING):
        if cert.data.get("generation") != e.generation:
            _fire(engine, Fire("cert", cert.key, "rotate"), origin)


def _count_outstanding(engine: Engine, e: CountOutstandingLeaves, origin: str) -> Mapping[str, Any]:
    certs = engine.store.list("cert", states=OUTSTANDING)
    return {"outstanding": sum(1 for c in certs if c.data.get("generation") == e.generation)}


HANDLERS: dict[type[Effect], Handler] = {
    InjectSidecar: lambda engine, e, origin: _actions(engine).platform.inject(e.pod),
    TeardownPod: lambda engine, e, origin: _actions(engine).platform.teardown(e.pod),
    RequestIdentity: _request_identity,
    ReleaseIdentity: _release_identity,
    SignSvid: _sign,
    DeliverSvid: _deliver,
    WithdrawSvid: _withdraw,
    GenerateCa: _generate,
    ActivateCa: lambda engine, e, origin: _actions(engine).ca.activate(e.generation),
    PublishBundle: _publish_bundle,
    JoinBundle: _publish_bundle,
    ReissueLeaves: _reissue,
    CountOutstandingLeaves: _count_outstanding,
    PublishConfig: _publish_config,
    DeleteConfig: lambda engine, e, origin: _actions(engine).publisher.delete(e.sidecar),
    Fire: _fire,
}
