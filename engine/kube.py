"""The controller's wiring on Kubernetes: watch events into the world, and into the pods' lifecycles.

Theory of operation
-------------------
The reflectors (actions/kube.py) hand over events from their threads; `KubeWiring.submit` only queues them. One
consumer thread takes them in batches -- a sliding window: a batch closes 100 ms after its last event, or 1 s after
its first, whichever comes first -- so that a burst (a Deployment scaled to 500, a relist of 10,000 pods) makes one
change of the world and one recomputation of the documents, while a lone change still reaches the world within
100 ms. For each batch:

1. **The world.** Each object is read by the catalog as it arrives (`catalog.read`: an object the catalog rejects is
   logged with every problem, kept in `rejected`, and skipped; the version stored before stays in force, as with
   `meshctl apply`). The batch becomes one set of writes and deletes, last event per object winning; a SNAPSHOT of a
   kind also deletes what is stored of that kind and missing from it (what happened during a 410). The writes are
   judged as `engine.world.apply` judges an apply -- only the problems the change would add reject -- but per
   object, so one bad policy does not hold up the rest: a policy naming a policy not seen yet (kinds are watched
   separately, so a TrafficTarget may come before its HTTPRouteGroup) waits in `deferred` and is tried again with
   every batch; so does the delete of a route group that a policy still names. Then the batch is written as one
   change of the world (`Store.change_world`); the control plane's world watcher recomputes the documents from it.
   A batch that cannot be written (the database away) is kept and merged into the next one.

2. **The pods.** For each meshed pod (the injector's marker) the wiring keeps a few facts -- service account,
   labels, node, IP, Ready, its sidecar container started, deletion requested -- not the pod object. Which trigger a
   pod's machine gets is a pure function of its state and those facts (`pod_trigger`, table below), so an event
   that arrives before the machine can take it (Ready before the first configuration was acknowledged) is not lost:
   such pods wait in a set that is looked at again every second, and every pod is reconciled after each snapshot of
   pods and every minute.

Only the leader runs a wiring: the controller makes a new one, with empty facts, each time it starts leading, and
the reflectors' first snapshots fill it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import catalog
from actions.kube import EventType, WatchEvent, carries_sidecar, meta
from catalog.inject import SIDECAR_NAME
from catalog.parse import read as read_manifest
from engine import world
from engine.core import Engine
from engine.errors import EngineError
from machines import BadPayload, IllegalTrigger
from store import Resource, Store

log = logging.getLogger("meshloom.kube")

ACTOR = "kube"
QUIET = 0.1  # seconds without an event that close a batch: one object's change reaches the world this fast
MAX_WINDOW = 1.0  # seconds after a batch's first event at the most: a steady stream cannot postpone the world
MAX_BATCH = 20_000  # events in one batch at the most (two snapshots of 10,000 pods)
RETRY_EVERY = 1.0  # seconds between looks at pods whose machine was not ready for the platform's news
RECONCILE_EVERY = 60.0  # seconds between full reconciliations of every pod (a safety net, as informers resync)
SETTLE_ROUNDS = 20  # rounds of taking the objects that a change's new problems blame out of it

Ref = tuple[str, str, str]  # (lower-case kind, namespace, name): how the store names a resource

LIVE = ("admitted", "injected", "scheduled", "identity-requested", "identity-issued", "sidecar-connected",
        "config-synced", "ready")
WAITING_FOR_PLATFORM_NEWS = ("scheduled", "identity-requested", "identity-issued", "sidecar-connected")


# ---- the pods -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PodFacts:
    """What the platform says of a meshed pod, as far as its lifecycle reads it."""

    service_account: str
    labels: tuple[tuple[str, str], ...]
    node: str
    ip: str
    ready: bool
    deleting: bool
    uid: str = ""  # metadata.uid: tells a pod created again under the same name from the one before it
    sidecar_started: bool = False  # the kubelet reports the sidecar container started


def pod_facts(obj: Mapping[str, Any]) -> PodFacts | None:
    """The facts of a pod the injector went over; None for a pod outside the mesh."""
    if not carries_sidecar(obj):
        return None
    m = meta(obj)
    spec = obj.get("spec") if isinstance(obj.get("spec"), Mapping) else {}
    status = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
    assert isinstance(spec, Mapping) and isinstance(status, Mapping)
    labels = m.get("labels") if isinstance(m.get("labels"), Mapping) else {}
    assert isinstance(labels, Mapping)
    ready = any(isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or ())
    return PodFacts(
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        node=str(spec.get("nodeName") or ""),
        ip=str(status.get("podIP") or ""),
        ready=ready,
        deleting=bool(m.get("deletionTimestamp")),
        uid=str(m.get("uid") or ""),
        sidecar_started=sidecar_started(status),
    )


def sidecar_started(status: Mapping[str, Any]) -> bool:
    """Whether the pod's status says its sidecar container started (`started`, or a `running` state from a kubelet
    that predates the field)."""
    for c in status.get("containerStatuses") or ():
        if isinstance(c, Mapping) and c.get("name") == SIDECAR_NAME:
            if "started" in c:  # false while a startup probe has not passed, though the container runs
                return c["started"] is True
            state = c.get("state")
            return isinstance(state, Mapping) and "running" in state
    return False


Trigger = tuple[str, dict[str, Any]]


def pod_trigger(key: str, state: str | None, facts: PodFacts | None, admitted_uid: str = "") -> Trigger | None:
    """The one trigger that brings a pod's machine closer to what the platform says; None: nothing to do now.

        machine state                 | platform says                    | trigger
        ------------------------------+----------------------------------+-----------------------------------------
        none, or gone                 | meshed pod, not being deleted    | admit (namespace, name, account, labels,
                                      |                                  |  uid)
        any live state, or failed     | a pod of another uid than the    | terminate
                                      |  one admitted                    |
        injected                      | placed: node and IP              | schedule (node, ip)
        identity-issued               | its sidecar container started    | sidecar_connected
        config-synced                 | Ready condition True             | ready
        any live state, or failed     | deletion requested, or pod gone  | terminate
        terminating                   | pod gone                         | gone
        anything else                 | anything                         | none (the mesh drives that step, or
                                      |                                  |  the pod has nothing more to do)

    `injected` is not the platform's to say: it is the outcome of the InjectSidecar effect (`KubePlatform.inject`).
    `sidecar_connected` is the sidecar container's start, not its first connection to NATS: the sidecar's NATS
    permissions come with its first document, which the transition publishes, so waiting for the connection would
    wait for itself.
    A meshed pod whose machine is `gone` was created again under the same name (a StatefulSet's pod): it is
    admitted again, and its life starts over. So is one whose DELETED and new ADDED came in one batch (or which a
    new leader's first list shows already re-created): `admitted_uid`, the uid the machine was admitted with, differs
    from the pod's, so the old incarnation is terminated first (its certificate revoked), then it is `gone` and the
    new one is admitted. A machine admitted without a uid (`""`) is not judged by it.
    """
    if facts is None:
        if state in (*LIVE, "failed"):
            return ("terminate", {"reason": "the pod was deleted"})
        if state == "terminating":
            return ("gone", {"reason": "the pod was deleted"})
        return None
    if facts.deleting:
        if state in (*LIVE, "failed"):
            return ("terminate", {"reason": "the pod's deletion was requested"})
        return None
    if state in (*LIVE, "failed") and facts.uid and admitted_uid and facts.uid != admitted_uid:
        return ("terminate", {"reason": "the pod was created again under its name (another uid)"})
    if state is None or state == "gone":
        namespace, _, name = key.partition("/")
        payload: dict[str, Any] = {"namespace": namespace, "name": name, "service_account": facts.service_account,
                                   "labels": dict(facts.labels)}
        if facts.uid:
            payload["uid"] = facts.uid
        return ("admit", payload)
    if state == "injected" and facts.node and facts.ip:
        return ("schedule", {"node": facts.node, "ip": facts.ip})
    if state == "identity-issued" and facts.sidecar_started:
        return ("sidecar_connected", {})
    if state == "config-synced" and facts.ready:
        return ("ready", {})
    return None


def ahead_of_machine(state: str | None, facts: PodFacts | None) -> bool:
    """Whether the platform already said something the machine cannot take yet (it is busy with a step the mesh
    drives): such a pod is looked at again soon, rather than at the next event, which may never come."""
    if facts is None or facts.deleting:
        return False
    if state in ("terminating", "gone"):
        # Created again while the previous incarnation is (or was just) being taken out: a terminate for another
        # uid reaches `gone` in the same pass, and the new incarnation's admission must not wait for the next event.
        return True
    if state == "admitted":
        return bool(facts.node and facts.ip)
    if state in ("scheduled", "identity-requested") and facts.sidecar_started:
        return True  # the sidecar started before its certificate was issued: it is connected once it is
    return state in WAITING_FOR_PLATFORM_NEWS and facts.ready


# ---- the world ------------------------------------------------------------------------------------------------------
def trim(obj: dict[str, Any]) -> dict[str, Any]:
    """What the mesh reads of an object, for the reflectors to keep: pods lose all but a few fields (a pod from the
    API server is several kilobytes, mostly managedFields and status), other kinds their managedFields."""
    m = {k: v for k, v in meta(obj).items() if k != "managedFields"}
    annotations = m.get("annotations")
    if isinstance(annotations, Mapping) and LAST_APPLIED in annotations:
        m["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    if obj.get("kind") != "Pod":
        return {**obj, "metadata": m}
    spec = obj.get("spec") if isinstance(obj.get("spec"), Mapping) else {}
    status = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
    assert isinstance(spec, Mapping) and isinstance(status, Mapping)
    small_meta = {k: v for k, v in m.items() if k in POD_METADATA}
    small_spec: dict[str, Any] = {k: spec[k] for k in ("serviceAccountName", "serviceAccount", "nodeName")
                                  if spec.get(k)}
    small_spec["containers"] = [
        {k: c[k] for k in ("name", "ports") if k in c} for c in spec.get("containers") or () if isinstance(c, Mapping)]
    small_status: dict[str, Any] = {k: status[k] for k in ("podIP", "phase") if status.get(k)}
    ready = [c for c in status.get("conditions") or () if isinstance(c, Mapping) and c.get("type") == "Ready"]
    if ready:
        small_status["conditions"] = [{"type": "Ready", "status": ready[0].get("status")}]
    if sidecar_started(status):
        small_status["containerStatuses"] = [{"name": SIDECAR_NAME, "started": True}]
    return {"apiVersion": obj.get("apiVersion", "v1"), "kind": "Pod", "metadata": small_meta, "spec": small_spec,
            "status": small_status}


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
POD_METADATA = ("name", "namespace", "labels", "annotations", "resourceVersion", "uid", "deletionTimestamp")


def _ref_of(event: WatchEvent, obj: Mapping[str, Any]) -> Ref:
    m = meta(obj)
    return (event.kind.lower(), str(m.get("namespace") or event.namespace), str(m.get("name") or event.name))


def _labels(obj: Mapping[str, Any]) -> dict[str, str]:
    labels = meta(obj).get("labels")
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}


def _shown(ref: Ref) -> str:
    kind, namespace, name = ref
    return f"{kind}/{namespace}/{name}" if namespace else f"{kind}/{name}"


@dataclass
class Change:
    """One batch's worth of the world: the last word on each object, and which kinds were listed whole."""

    ops: dict[Ref, catalog.Resource | None] = field(default_factory=dict)  # None: delete
    listed: dict[str, set[Ref]] = field(default_factory=dict)  # kind -> every object a snapshot named

    def __bool__(self) -> bool:
        return bool(self.ops or self.listed)

    def merge(self, later: Change) -> None:
        """`later` happened after this change: its snapshots replace what this one knew of their kinds."""
        for kind, refs in later.listed.items():
            self.ops = {ref: op for ref, op in self.ops.items() if ref[0] != kind}
            self.listed[kind] = set(refs)
        self.ops.update(later.ops)


@dataclass(frozen=True, slots=True)
class Written:
    revision: int  # 0: the world was already so
    put: tuple[Ref, ...] = ()
    deleted: tuple[Ref, ...] = ()
    deferred: tuple[Ref, ...] = ()


class KubeWiring:
    """Watch events in; world changes and pod triggers out. `run` is the consumer loop; `process` one batch."""

    def __init__(self, engine: Engine, *, actor: str = ACTOR, quiet: float = QUIET, max_window: float = MAX_WINDOW,
                 max_batch: int = MAX_BATCH, retry_every: float = RETRY_EVERY,
                 reconcile_every: float = RECONCILE_EVERY, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.store: Store = engine.store
        self.actor = actor
        self.quiet, self.max_window, self.max_batch = quiet, max_window, max_batch
        self.retry_every, self.reconcile_every = retry_every, reconcile_every
        self._monotonic = monotonic
        self._queue: queue.SimpleQueue[WatchEvent] = queue.SimpleQueue()
        self.pods: dict[str, PodFacts] = {}  # meshed pods the platform has, by key
        self.namespaces: dict[str, dict[str, str]] = {}  # namespace -> labels, for the webhook's decisions
        self.namespaces_listed = False
        self._pods_listed = False  # no pod is judged missing before the first snapshot of pods
        self._waiting: set[str] = set()
        self._change = Change()  # what is not written yet
        self._deferred_puts: dict[Ref, catalog.Resource] = {}
        self._deferred_deletes: set[Ref] = set()
        self.rejected: dict[str, str] = {}  # object ("pod/ns/name") -> why the catalog refused it
        self.batches = 0
        self.events = 0
        self.idle = threading.Event()  # set whenever the queue was found empty after a batch (tests wait on it)

    # ---- intake --------------------------------------------------------------------------------------------------
    def submit(self, event: WatchEvent) -> None:
        """From any thread (the reflectors')."""
        self.idle.clear()
        self._queue.put(event)

    def knows(self, pod: str) -> bool | None:
        """For `KubePlatform.inject`: True when the watch has seen the pod injected."""
        return True if pod in self.pods else None

    @property
    def deferred(self) -> tuple[str, ...]:
        return tuple(sorted(_shown(r) for r in (*self._deferred_puts, *self._deferred_deletes)))

    # ---- the loop --------------------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        next_retry = self._monotonic() + self.retry_every
        next_reconcile = self._monotonic() + self.reconcile_every
        while not stop.is_set():
            batch = self.collect(timeout=min(self.retry_every, 0.5))
            if batch:
                self._guarded("a batch of watch events", self.process, batch)
            elif self._change:  # a batch the database refused: tried again (deferred objects wait for news)
                self._guarded("the world", self._write_world)
            if self._queue.empty():
                self.idle.set()
            now = self._monotonic()
            if now >= next_retry:
                next_retry = now + self.retry_every
                self._guarded("pods waiting for their machine", self.retry_waiting)
            if now >= next_reconcile:
                next_reconcile = now + self.reconcile_every
                self._guarded("the pods' reconciliation", self.reconcile_pods)

    def collect(self, timeout: float) -> list[WatchEvent]:
        """The next batch: waits up to `timeout` for a first event, then takes events until `quiet` passes without
        one, `max_window` after the first, or `max_batch` events."""
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        batch = [first]
        started = self._monotonic()
        while len(batch) < self.max_batch:
            left = min(self.quiet, self.max_window - (self._monotonic() - started))
            if left <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return batch

    @staticmethod
    def _guarded(what: str, work: Callable[..., object], *args: Any) -> None:
        try:
            work(*args)
        except Exception:  # the watch loop outlives any one batch; what was not written is kept for the next
            log.exception("kube: %s failed; trying again with the next batch", what)

    # ---- one batch ---------------------------------------------------------------------------------------------
    def process(self, events: Sequence[WatchEvent]) -> Written:
        self.batches += 1
        self.events += len(events)
        change, touched, pods_listed = self._read(events)
        self._change.merge(change)
        try:
            written = self._write_world()
        finally:  # the pods' news does not wait for the world (kept for the next batch if it failed)
            if pods_listed:
                self._pods_listed = True
                self.reconcile_pods()
            elif touched:
                self.drive(sorted(touched))
        return written

    def _read(self, events: Sequence[WatchEvent]) -> tuple[Change, set[str], bool]:
        change = Change()
        touched: set[str] = set()
        pods_listed = False
        for event in events:
            if event.type is EventType.SNAPSHOT:
                kind = event.kind.lower()
                change.ops = {ref: op for ref, op in change.ops.items() if ref[0] != kind}
                listed = change.listed[kind] = set()
                if event.kind == "Pod":
                    pods_listed = True
                    touched.update(self.pods)
                    self.pods = {}
                # The namespaces' labels are read by the webhook's threads meanwhile: the relisted snapshot is built
                # aside and put in place at once, so that no reader ever sees an empty or half-filled map.
                namespaces: dict[str, dict[str, str]] = {}
                for obj in event.items:
                    ref = _ref_of(event, obj)
                    listed.add(ref)
                    self._take(change, ref, obj)
                    if event.kind == "Pod":
                        self._see_pod(ref, obj, touched)
                    elif event.kind == "Namespace":
                        namespaces[ref[2]] = _labels(obj)
                if event.kind == "Namespace":
                    self.namespaces = namespaces
                    self.namespaces_listed = True
                continue
            ref = _ref_of(event, event.object)
            if event.type is EventType.DELETED:
                change.ops[ref] = None
                self.rejected.pop(_shown(ref), None)
                if event.kind == "Pod":
                    key = f"{ref[1]}/{ref[2]}"
                    self.pods.pop(key, None)
                    touched.add(key)
                elif event.kind == "Namespace":
                    self.namespaces.pop(ref[2], None)
            else:
                self._take(change, ref, event.object)
                if event.kind == "Pod":
                    self._see_pod(ref, event.object, touched)
                elif event.kind == "Namespace":
                    self.namespaces[ref[2]] = _labels(event.object)
        return change, touched, pods_listed

    def _take(self, change: Change, ref: Ref, obj: Mapping[str, Any]) -> None:
        resource, problems = read_manifest(obj, _shown(ref))
        if resource is None or problems:
            # The version stored before, if any, stays in force (as with a rejected `meshctl apply`).
            reason = "; ".join(str(p) for p in problems) or "unreadable"
            if self.rejected.get(_shown(ref)) != reason:
                log.warning("kube: %s rejected by the catalog, skipped: %s", _shown(ref), reason,
                            extra={"kind": ref[0], "key": _shown(ref), "reason": "rejected"})
            self.rejected[_shown(ref)] = reason
            return
        self.rejected.pop(_shown(ref), None)
        change.ops[ref] = resource

    def _see_pod(self, ref: Ref, obj: Mapping[str, Any], touched: set[str]) -> None:
        key = f"{ref[1]}/{ref[2]}"
        facts = pod_facts(obj)
        if facts is None:
            # Outside the mesh (or its marker removed): a pod the mesh admitted keeps its facts until it goes.
            if key in self.pods:
                touched.add(key)
            return
        self.pods[key] = facts
        touched.add(key)

    # ---- writing the world --------------------------------------------------------------------------------------
    def _write_world(self) -> Written:
        change, self._change = self._change, Change()
        try:
            return self._write(change)
        except Exception:
            later, self._change = self._change, change  # kept, and merged with what came since
            self._change.merge(later)
            raise

    def _write(self, change: Change) -> Written:
        ops: dict[Ref, catalog.Resource | None] = {}
        for ref, resource in self._deferred_puts.items():
            listed = change.listed.get(ref[0])
            if listed is None or ref in listed:  # a newer list without it: it is gone, not waiting
                ops[ref] = resource
        for ref in self._deferred_deletes:
            ops[ref] = None
        ops.update(change.ops)
        for kind, listed in change.listed.items():
            for r in self.store.resources(kind=kind):
                if r.ref not in listed and r.ref not in ops:
                    ops[r.ref] = None
        self._deferred_puts.clear()
        self._deferred_deletes.clear()
        if not ops:
            return Written(0)
        stored = {r.ref: r for r in self.store.resources_named(list(ops))}
        puts: dict[Ref, catalog.Resource] = {}
        deletes: set[Ref] = set()
        for ref, op in ops.items():
            if op is None:
                if ref in stored:
                    deletes.add(ref)
            elif ref not in stored or dict(stored[ref].body) != op.to_manifest():
                puts[ref] = op
        if not puts and not deletes:
            return Written(0)
        before = world.load_world(self.store)
        puts, deletes = self._settle(before, puts, deletes)
        if not puts and not deletes:
            return Written(0, deferred=tuple(sorted((*self._deferred_puts, *self._deferred_deletes))))
        put_rows = [Resource(ref[0], ref[1], ref[2], r.api_version, r.to_manifest()) for ref, r in sorted(puts.items())]
        summary = _summary(sorted(puts), sorted(deletes), stored)
        revision = self.store.change_world(put_rows, sorted(deletes), actor=self.actor, summary=summary,
                                           at=self.engine.clock.now())
        for ref in (*puts, *deletes):
            self.rejected.pop(_shown(ref), None)  # no longer waiting
        return Written(revision, tuple(sorted(puts)), tuple(sorted(deletes)),
                       tuple(sorted((*self._deferred_puts, *self._deferred_deletes))))

    def _settle(self, before: catalog.World, puts: dict[Ref, catalog.Resource],
                deletes: set[Ref]) -> tuple[dict[Ref, catalog.Resource], set[Ref]]:
        """Take out of the change what would add problems to the world, until it adds none; what was taken out
        waits in `deferred` for the next batch."""
        old = set(catalog.check(before))
        for _ in range(SETTLE_ROUNDS):
            after = before.with_applied(puts.values()).without(_key(ref) for ref in deletes)
            new = [p for p in catalog.check(after) if p not in old]
            if not new:
                return puts, deletes
            blamed_labels = {p.resource for p in new}
            blamed = [ref for ref, r in puts.items() if r.label in blamed_labels]
            if not blamed:
                # Nothing written is at fault: a delete took away what something else names. Keep the deletes
                # whose return removes a problem (route groups, TCP routes: few, and rarely deleted).
                blamed_deletes = [ref for ref in sorted(deletes)
                                  if self._fixes(before, puts, deletes - {ref}, new, old)]
                if not blamed_deletes:
                    log.warning("kube: the world has new problems no single object explains: %s",
                                "; ".join(str(p) for p in new))
                    return puts, deletes
                for ref in blamed_deletes:
                    deletes.discard(ref)
                    self._deferred_deletes.add(ref)
                    log.info("kube: deleting %s waits: it is still named (%s)", _shown(ref),
                             "; ".join(str(p) for p in new))
                continue
            for ref in blamed:
                resource = puts.pop(ref)
                self._deferred_puts[ref] = resource
                reason = "; ".join(str(p) for p in new if p.resource == resource.label)
                if self.rejected.get(_shown(ref)) != f"waiting: {reason}":
                    log.info("kube: %s waits for what it names: %s", _shown(ref), reason)
                self.rejected[_shown(ref)] = f"waiting: {reason}"
        return puts, deletes

    @staticmethod
    def _fixes(before: catalog.World, puts: Mapping[Ref, catalog.Resource], deletes: set[Ref],
               new: Sequence[catalog.Problem], old: set[catalog.Problem]) -> bool:
        after = before.with_applied(puts.values()).without(_key(ref) for ref in deletes)
        return len([p for p in catalog.check(after) if p not in old]) < len(new)

    # ---- the pods ---------------------------------------------------------------------------------------------------
    def reconcile_pods(self) -> int:
        """Every pod the engine or the platform knows, judged again; returns how many triggers were fired."""
        if not self._pods_listed:
            return 0
        known = {e.key for e in self.store.list("pod", states=(*LIVE, "failed", "terminating"))}
        return self.drive(sorted(known | set(self.pods)))

    def retry_waiting(self) -> int:
        if not self._waiting:
            return 0
        keys, self._waiting = sorted(self._waiting), set()
        return self.drive(keys)

    def drive(self, keys: Iterable[str]) -> int:
        """Fire on each pod what `pod_trigger` says; returns how many transitions were committed.

        Pods admitted here have their injection confirmed at once, in this thread (it only reads the facts,
        `KubePlatform.inject`), and are judged again, so that a pod already placed is scheduled in the same pass.
        Every other effect goes to the engine's workers (`Engine.dispatch`): signing is not the watch's business.
        """
        admits, others = self._steps(list(keys))
        fired = self._fire_others(others)
        admitted: list[str] = []
        for key, payload in admits:
            try:
                self.engine.fire("pod", key, "admit", payload, actor=self.actor, drain=False)
                admitted.append(key)
                fired += 1
            except (IllegalTrigger, BadPayload, EngineError) as exc:
                log.warning("kube: pod/%s admit refused: %s", key, exc)
        if admitted:
            self.engine.run_all(self.engine.discard_work())
            _, again = self._steps(admitted)
            fired += self._fire_others(again)
        if fired:
            # A pod that moved may now be busy with a step the mesh drives while the platform has already said
            # more (placed and Ready in one update): it is looked at again soon.
            moved = [key for key, _ in others] + admitted
            rows = self.store.get_many("pod", moved)
            self._waiting.update(key for key in moved if key in rows and
                                 ahead_of_machine(rows[key].state, self.pods.get(key)))
        return fired

    def _steps(self, keys: Sequence[str]) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, Trigger]]]:
        rows = self.store.get_many("pod", list(keys))
        admits: list[tuple[str, dict[str, Any]]] = []
        others: list[tuple[str, Trigger]] = []
        for key in keys:
            row = rows.get(key)
            state = row.state if row is not None else None
            facts = self.pods.get(key)
            if facts is None and not self._pods_listed:
                continue  # before the first list of pods, a pod not seen yet is not known to be gone
            if ahead_of_machine(state, facts):
                self._waiting.add(key)
            admitted_uid = str(row.data.get("uid") or "") if row is not None else ""
            step = pod_trigger(key, state, facts, admitted_uid)
            if step is None:
                continue
            if step[0] == "admit":
                admits.append((key, step[1]))
            else:
                others.append((key, step))
        return admits, others

    def _fire_others(self, steps: Sequence[tuple[str, Trigger]]) -> int:
        by_trigger: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
        for key, (trigger, payload) in steps:
            by_trigger.setdefault(trigger, []).append((key, payload))
        fired = 0
        for trigger, items in sorted(by_trigger.items()):
            fired += self.engine.fire_many("pod", items, trigger, actor=self.actor)
        self.engine.dispatch(self.engine.discard_work())
        return fired


def _key(ref: Ref) -> str:
    """The catalog's key (`Kind/namespace/name`) of a stored ref."""
    return f"{catalog.KINDS[ref[0]].kind}/{ref[1]}/{ref[2]}"


def _summary(puts: Sequence[Ref], deletes: Sequence[Ref], stored: Mapping[Ref, Resource]) -> str:
    created = [r for r in puts if r not in stored]
    configured = [r for r in puts if r in stored]
    parts = []
    for verb, refs in (("created", created), ("configured", configured), ("deleted", deletes)):
        if refs:
            shown = ", ".join(_shown(r) for r in refs[:5])
            more = f" and {len(refs) - 5} more" if len(refs) > 5 else ""
            parts.append(f"{verb} {shown}{more}")
    return "; ".join(parts)
