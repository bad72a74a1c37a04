"""The Kubernetes wiring with the real engine and store, fed watch events by hand: events into the world, batches
into one change, pods through their lifecycle, snapshots reconciled, rejected objects skipped."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import catalog
from actions import fake_actions
from actions.clock import FakeClock
from actions.kube import EventType, KubePlatform, WatchEvent
from engine import Engine, ensure_ca
from engine.kube import KubeWiring, PodFacts, ahead_of_machine, pod_facts, pod_trigger, trim
from store import Store
from tests.catalog import topology as t
from tests.support.documents import DocumentedStore

KEY = "shop/web-1"


@dataclasses.dataclass
class Rig:
    wiring: KubeWiring
    engine: Engine
    store: Store
    clock: FakeClock

    def state(self, key: str = KEY) -> str | None:
        row = self.store.get("pod", key)
        return row.state if row is not None else None

    def path(self, key: str = KEY) -> list[str]:
        return [j.to_state for j in self.store.journal("pod", key)]

    def world(self, kind: str) -> list[str]:
        return sorted(f"{r.namespace}/{r.name}" if r.namespace else r.name for r in self.store.resources(kind=kind))

    def connect_and_sync(self, key: str = KEY) -> None:
        """What the sidecar does once it has its certificate: connect, then acknowledge its first document."""
        self.engine.fire("pod", key, "sidecar_connected", actor="sidecar")
        self.clock.advance(0.1)
        self.engine.tick()
        self.engine.fire("sidecar", key, "ack", {"generation": 1}, actor="sidecar")


@pytest.fixture
def rig(sqlite_url: str) -> Iterator[Rig]:
    clock = FakeClock()
    platform = KubePlatform(None)
    actions = dataclasses.replace(fake_actions(clock), platform=platform)
    store = DocumentedStore(sqlite_url)
    engine = Engine(store, actions, clock, jitter=lambda: 0.5)
    ensure_ca(engine)
    wiring = KubeWiring(engine)
    platform.known = wiring.knows
    yield Rig(wiring, engine, store, clock)
    store.close()


def meshed_pod(name: str = "web-1", ns: str = "shop", *, node: str = "", ip: str = "", ready: bool | None = None,
               deleting: bool = False, account: str = "web", uid: str = "", sidecar: bool = False) -> dict[str, Any]:
    doc = t.pod(ns, name, {"app": "web", "meshloom.io/injected": "true"}, account, ip or None, t.HTTP_8080)
    if uid:
        doc["metadata"]["uid"] = uid
    doc["metadata"]["annotations"] = {"meshloom.io/injected": "true"}
    doc["metadata"]["resourceVersion"] = "7"
    doc["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    if node:
        doc["spec"]["nodeName"] = node
    if ready is not None:
        doc.setdefault("status", {})["conditions"] = [
            {"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "True" if ready else "False"}]
    if deleting:
        doc["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    if sidecar:  # as a kubelet reports a started container
        doc.setdefault("status", {})["containerStatuses"] = [
            {"name": "app", "ready": False, "started": False, "state": {"waiting": {"reason": "ContainerCreating"}}},
            {"name": "meshloom-sidecar", "ready": False, "started": True, "restartCount": 0,
             "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]
    return doc


def event(kind: EventType, obj: dict[str, Any]) -> WatchEvent:
    m = obj["metadata"]
    return WatchEvent(kind, obj["kind"], m.get("namespace", ""), m["name"], trim(obj))


def snapshot(kind: str, *objs: dict[str, Any]) -> WatchEvent:
    return WatchEvent(EventType.SNAPSHOT, kind, items=tuple(trim(o) for o in objs))


def listed(rig: Rig, *pods: dict[str, Any]) -> None:
    """The first list of pods (the wiring judges no pod missing before it)."""
    rig.wiring.process([snapshot("Pod", *pods)])


# ---- events into the world ---------------------------------------------------------------------------------------
def test_snapshots_and_events_become_the_stored_world(rig):
    docs = t.manifests()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    written = rig.wiring.process([snapshot(kind, *items) for kind, items in by_kind.items()])
    assert written.revision == rig.store.world_revision()
    stored = world_keys(rig)
    assert stored == sorted(catalog.parse(d).key for d in docs)
    assert rig.wiring.rejected == {}

    rig.wiring.process([event(EventType.DELETED, t.service("shop", "fallback", {}, [{"port": 80}])),
                        event(EventType.ADDED, t.service("shop", "cart", {"app": "cart"}, [{"port": 80}]))])
    assert "shop/cart" in rig.world("service") and "shop/fallback" not in rig.world("service")
    change = rig.store.world_changes()[-1]
    assert change.actor == "kube"
    assert change.summary == "created service/shop/cart; deleted service/shop/fallback"


def world_keys(rig: Rig) -> list[str]:
    return sorted(r.key for r in catalog.parse_all([dict(r.body) for r in rig.store.resources()]))


def test_a_batch_of_many_events_is_one_change_of_the_world_with_the_last_word_on_each_object(rig):
    before = rig.store.world_revision()
    events = [event(EventType.ADDED, t.service("shop", f"s{i}", {"app": f"a{i}"}, [{"port": 80}]))
              for i in range(50)]
    events.append(event(EventType.MODIFIED, t.service("shop", "s7", {"app": "changed"}, [{"port": 81}])))
    events.append(event(EventType.DELETED, t.service("shop", "s9", {}, [{"port": 80}])))
    rig.wiring.process(events)
    assert rig.store.world_revision() == before + 1
    assert len(rig.world("service")) == 49
    [s7] = rig.store.resources_named([("service", "shop", "s7")])
    assert s7.body["spec"]["selector"] == {"app": "changed"}


def test_events_queued_together_are_coalesced_by_the_consumer_loop_into_one_batch(rig):
    for i in range(30):
        rig.wiring.submit(event(EventType.ADDED, t.service("shop", f"s{i}", {"app": "x"}, [{"port": 80}])))
    before = rig.store.world_revision()
    stop = threading.Event()
    loop = threading.Thread(target=rig.wiring.run, args=(stop,))
    loop.start()
    try:
        assert rig.wiring.idle.wait(5)
    finally:
        stop.set()
        loop.join(5)
    assert rig.wiring.batches == 1 and rig.wiring.events == 30
    assert rig.store.world_revision() == before + 1


def test_a_batch_closes_at_its_size_limit(rig):
    wiring = KubeWiring(rig.engine, max_batch=4)
    for i in range(10):
        wiring.submit(event(EventType.ADDED, t.service("shop", f"s{i}", {"app": "x"}, [{"port": 80}])))
    assert [len(wiring.collect(timeout=1)) for _ in range(3)] == [4, 4, 2]


def test_an_event_that_changes_nothing_the_mesh_reads_does_not_change_the_world(rig):
    listed(rig, meshed_pod())
    before = rig.store.world_revision()
    touched = meshed_pod()
    touched["metadata"]["resourceVersion"] = "8"
    touched["status"] = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False"}]}
    assert rig.wiring.process([event(EventType.MODIFIED, touched)]).revision == 0
    assert rig.store.world_revision() == before


def test_a_snapshot_deletes_what_is_stored_of_its_kind_and_missing_from_it(rig):
    rig.wiring.process([snapshot("Service", *(t.service("shop", n, {"app": n}, [{"port": 80}]) for n in "abc"))])
    rig.wiring.process([snapshot("Service", t.service("shop", "b", {"app": "b"}, [{"port": 80}]),
                                 t.service("shop", "d", {"app": "d"}, [{"port": 80}]))])
    assert rig.world("service") == ["shop/b", "shop/d"]


# ---- objects the catalog rejects -------------------------------------------------------------------------------------
BAD_SPLIT = t.policy(t.SPLIT, "TrafficSplit", "shop", "broken", {"service": "api", "backends": [
    {"service": "api-v1", "weight": -5}]})


def test_an_object_the_catalog_rejects_is_skipped_with_its_reason_and_the_rest_of_the_batch_is_written(rig):
    rig.wiring.process([event(EventType.ADDED, BAD_SPLIT),
                        event(EventType.ADDED, t.service("shop", "api", {"app": "api"}, [{"port": 80}]))])
    assert rig.world("service") == ["shop/api"]
    assert rig.world("trafficsplit") == []
    reason = rig.wiring.rejected["trafficsplit/shop/broken"]
    assert "spec.backends[0].weight" in reason


def test_a_rejected_change_keeps_the_version_stored_before(rig):
    good = t.policy(t.SPLIT, "TrafficSplit", "shop", "broken", {"service": "api", "backends": [
        {"service": "api-v1", "weight": 5}]})
    rig.wiring.process([event(EventType.ADDED, good)])
    rig.wiring.process([event(EventType.MODIFIED, BAD_SPLIT)])
    [stored] = rig.store.resources(kind="trafficsplit")
    assert stored.body["spec"]["backends"][0]["weight"] == 5
    rig.wiring.process([event(EventType.DELETED, BAD_SPLIT)])  # deleting it needs no valid body
    assert rig.world("trafficsplit") == [] and rig.wiring.rejected == {}


def test_a_rejected_object_does_not_stop_the_consumer_loop(rig):
    rig.wiring.submit(event(EventType.ADDED, BAD_SPLIT))
    rig.wiring.submit(WatchEvent(EventType.ADDED, "Service", "shop", "odd", {"kind": "Service"}))  # no metadata
    stop = threading.Event()
    loop = threading.Thread(target=rig.wiring.run, args=(stop,))
    loop.start()
    try:
        assert rig.wiring.idle.wait(5)
        rig.wiring.submit(event(EventType.ADDED, t.service("shop", "after", {"app": "x"}, [{"port": 80}])))
        assert _wait(lambda: rig.world("service") == ["shop/after"])
    finally:
        stop.set()
        loop.join(5)
    assert loop.is_alive() is False
    assert set(rig.wiring.rejected) == {"trafficsplit/shop/broken", "service/shop/odd"}


def test_a_batch_the_database_refuses_is_kept_and_written_with_the_next_one(rig, monkeypatch):
    calls = {"n": 0}
    real = rig.store.change_world

    def flaky(*args: Any, **kwargs: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(rig.store, "change_world", flaky)
    with pytest.raises(RuntimeError):
        rig.wiring.process([event(EventType.ADDED, t.service("shop", "a", {"app": "a"}, [{"port": 80}]))])
    rig.wiring.process([event(EventType.ADDED, t.service("shop", "b", {"app": "b"}, [{"port": 80}]))])
    assert rig.world("service") == ["shop/a", "shop/b"]


def test_a_policy_that_names_a_policy_not_seen_yet_waits_for_it(rig):
    target = t.policy(t.ACCESS, "TrafficTarget", "shop", "web-to-api", {
        "destination": {"kind": "ServiceAccount", "name": "api", "namespace": "shop"},
        "sources": [{"kind": "ServiceAccount", "name": "web", "namespace": "shop"}],
        "rules": [{"kind": "HTTPRouteGroup", "name": "api-routes", "matches": ["read"]}]})
    routes = t.policy(t.SPECS, "HTTPRouteGroup", "shop", "api-routes", {"matches": [
        {"name": "read", "methods": ["GET"], "pathRegex": "/api/.*"}]})
    rig.wiring.process([snapshot("TrafficTarget", target)])
    assert rig.world("traffictarget") == []
    assert rig.wiring.deferred == ("traffictarget/shop/web-to-api",)
    assert rig.wiring.rejected["traffictarget/shop/web-to-api"].startswith("waiting: ")
    rig.wiring.process([snapshot("HTTPRouteGroup", routes)])
    assert rig.world("traffictarget") == ["shop/web-to-api"]
    assert rig.wiring.deferred == () and rig.wiring.rejected == {}

    # Deleting the route group while the target still names it waits until the target goes too.
    rig.wiring.process([event(EventType.DELETED, routes)])
    assert rig.world("httproutegroup") == ["shop/api-routes"]
    assert rig.wiring.deferred == ("httproutegroup/shop/api-routes",)
    rig.wiring.process([event(EventType.DELETED, target)])
    assert rig.world("httproutegroup") == [] and rig.world("traffictarget") == []


def test_trimming_keeps_everything_the_catalog_reads_of_a_pod():
    doc = meshed_pod(node="node-1", ip="10.0.1.1", ready=True)
    doc["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = "{...}"
    doc["metadata"]["annotations"]["config.nsm.nginx.com/mtls-mode"] = "strict"
    doc["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    doc["status"]["containerStatuses"] = [{"name": "app", "ready": True}]
    small = trim(doc)
    assert catalog.parse(small) == catalog.parse(doc) or _same_but_annotation(small, doc)
    assert pod_facts(small) == pod_facts(doc)
    assert "managedFields" not in small["metadata"] and "volumes" not in small["spec"]


def _same_but_annotation(small: dict[str, Any], doc: dict[str, Any]) -> bool:
    without = {**doc, "metadata": {**doc["metadata"], "annotations": {
        k: v for k, v in doc["metadata"]["annotations"].items()
        if k != "kubectl.kubernetes.io/last-applied-configuration"}}}
    return catalog.parse(small) == catalog.parse(without)


# ---- the pods --------------------------------------------------------------------------------------------------------
FACTS = PodFacts("web", (("app", "web"),), "", "", False, False)
PLACED = dataclasses.replace(FACTS, node="node-1", ip="10.0.1.1")
READY = dataclasses.replace(PLACED, ready=True)
DELETING = dataclasses.replace(READY, deleting=True)
STARTED = dataclasses.replace(PLACED, sidecar_started=True)


@pytest.mark.parametrize(("state", "facts", "expected"), [
    (None, FACTS, ("admit", {"namespace": "shop", "name": "web-1", "service_account": "web",
                             "labels": {"app": "web"}})),
    (None, READY, "admit"),
    (None, DELETING, None),
    (None, None, None),
    ("admitted", PLACED, None),  # the InjectSidecar effect says `injected`, not the platform
    ("injected", FACTS, None),
    ("injected", PLACED, ("schedule", {"node": "node-1", "ip": "10.0.1.1"})),
    ("scheduled", READY, None),
    ("identity-issued", READY, None),
    ("identity-issued", STARTED, ("sidecar_connected", {})),  # the kubelet started the sidecar container
    ("identity-requested", STARTED, None),  # its certificate first
    ("sidecar-connected", STARTED, None),
    ("config-synced", PLACED, None),
    ("config-synced", READY, ("ready", {})),
    ("ready", READY, None),
    ("ready", DELETING, "terminate"),
    ("identity-requested", DELETING, "terminate"),
    ("failed", DELETING, "terminate"),
    ("ready", None, "terminate"),
    ("admitted", None, "terminate"),
    ("terminating", DELETING, None),
    ("terminating", None, ("gone", {"reason": "the pod was deleted"})),
    ("gone", None, None),
    ("gone", FACTS, ("admit", {"namespace": "shop", "name": "web-1", "service_account": "web",
                               "labels": {"app": "web"}})),  # created again under its name
    ("gone", DELETING, None),
])
def test_the_trigger_a_pod_gets_follows_from_its_state_and_what_the_platform_says(state, facts, expected):
    got = pod_trigger(KEY, state, facts)
    if isinstance(expected, str):
        assert got is not None and got[0] == expected
    else:
        assert got == expected


NEW = dataclasses.replace(READY, uid="uid-2")


@pytest.mark.parametrize(("state", "facts", "admitted_uid", "expected"), [
    ("ready", NEW, "uid-1", "terminate"),  # another incarnation under the name: the old one is taken out first
    ("injected", dataclasses.replace(PLACED, uid="uid-2"), "uid-1", "terminate"),
    ("failed", NEW, "uid-1", "terminate"),
    ("ready", NEW, "uid-2", None),
    ("ready", NEW, "", None),  # admitted before uids were kept: not judged by it
    ("ready", READY, "uid-1", None),  # a pod without a uid (hand-made): not judged by it
    ("terminating", NEW, "uid-1", None),  # already going
    ("gone", NEW, "uid-1", ("admit", {"namespace": "shop", "name": "web-1", "service_account": "web",
                                      "labels": {"app": "web"}, "uid": "uid-2"})),
])
def test_a_pod_of_another_uid_than_its_machine_was_admitted_with_is_terminated_then_admitted_again(
        state, facts, admitted_uid, expected):
    got = pod_trigger(KEY, state, facts, admitted_uid)
    if isinstance(expected, str):
        assert got is not None and got[0] == expected
    else:
        assert got == expected


@pytest.mark.parametrize(("state", "facts", "ahead"), [
    ("admitted", PLACED, True), ("admitted", FACTS, False), ("identity-issued", READY, True),
    ("sidecar-connected", READY, True), ("identity-issued", PLACED, False), ("config-synced", READY, False),
    ("ready", DELETING, False), ("scheduled", None, False),
    ("identity-requested", STARTED, True), ("scheduled", STARTED, True), ("identity-issued", STARTED, False),
    ("sidecar-connected", STARTED, False),
    ("terminating", FACTS, True), ("terminating", None, False), ("terminating", DELETING, False),
    ("gone", FACTS, True), ("gone", None, False), ("gone", DELETING, False),
])
def test_a_pod_is_looked_at_again_when_the_platform_is_ahead_of_its_machine(state, facts, ahead):
    assert ahead_of_machine(state, facts) is ahead


def test_facts_are_read_only_from_pods_the_injector_went_over():
    assert pod_facts(t.pod("shop", "plain", {"app": "x"}, "web", "10.0.0.1", [])) is None
    facts = pod_facts(meshed_pod(node="n", ip="10.0.0.2", ready=True))
    assert facts == PodFacts("web", (("app", "web"), ("meshloom.io/injected", "true")), "n", "10.0.0.2", True, False)
    assert pod_facts(meshed_pod(account=""))  is not None
    started = pod_facts(trim(meshed_pod(node="n", ip="10.0.0.2", sidecar=True)))  # what the reflector keeps
    assert started is not None and started.sidecar_started
    running = meshed_pod(sidecar=True)
    del running["status"]["containerStatuses"][1]["started"]  # a kubelet older than the field: its state says it
    assert pod_facts(running).sidecar_started  # type: ignore[union-attr]
    assert not pod_facts(meshed_pod(ready=False)).sidecar_started  # type: ignore[union-attr]
    probing = meshed_pod(sidecar=True)
    probing["status"]["containerStatuses"][1]["started"] = False  # running, its startup probe not passed yet
    assert not pod_facts(probing).sidecar_started  # type: ignore[union-attr]
    assert pod_facts(meshed_pod(account="")).service_account == "default"  # type: ignore[union-attr]


def test_a_meshed_pod_walks_its_lifecycle_as_the_scheduler_the_kubelet_and_the_sidecar_report_it(rig):
    listed(rig)
    rig.wiring.process([event(EventType.ADDED, meshed_pod())])
    assert rig.path() == ["admitted", "injected"]  # its injection confirmed from the watch's facts
    rig.wiring.process([event(EventType.MODIFIED, meshed_pod(node="node-1"))])
    assert rig.state() == "injected"  # placed on a node, but no address yet
    rig.wiring.process([event(EventType.MODIFIED, meshed_pod(node="node-1", ip="10.0.1.1", ready=False))])
    assert rig.state() == "identity-issued"
    rig.wiring.process([event(EventType.MODIFIED, meshed_pod(node="node-1", ip="10.0.1.1", ready=False,
                                                             sidecar=True))])
    assert rig.state() == "sidecar-connected"  # the kubelet started its sidecar container
    rig.clock.advance(0.1)
    rig.engine.tick()
    rig.engine.fire("sidecar", KEY, "ack", {"generation": 1}, actor="sidecar")  # its first document, acknowledged
    assert rig.state() == "config-synced"
    rig.wiring.process([event(EventType.MODIFIED, meshed_pod(node="node-1", ip="10.0.1.1", ready=True))])
    assert rig.state() == "ready"
    rig.wiring.process([event(EventType.MODIFIED, meshed_pod(node="node-1", ip="10.0.1.1", ready=True,
                                                             deleting=True))])
    rig.wiring.process([event(EventType.DELETED, meshed_pod(node="node-1", ip="10.0.1.1", deleting=True))])
    journal = rig.store.journal("pod", KEY)
    assert [(j.to_state, j.trigger, j.actor) for j in journal] == [
        ("admitted", "admit", "kube"),
        ("injected", "injected", "effect:InjectSidecar"),
        ("scheduled", "schedule", "kube"),
        ("identity-requested", "identity_requested", "effect:RequestIdentity"),
        ("identity-issued", "identity_issued", f"cert/{KEY}/1"),
        ("sidecar-connected", "sidecar_connected", "kube"),
        ("config-synced", "config_synced", f"sidecar/{KEY}"),
        ("ready", "ready", "kube"),
        ("terminating", "terminate", "kube"),
        ("gone", "gone", "effect:TeardownPod"),
    ]
    assert journal[8].detail == "the pod's deletion was requested"
    pod = rig.store.get("pod", KEY)
    assert pod is not None and pod.data["node"] == "node-1" and pod.data["ip"] == "10.0.1.1"
    assert pod.data["service_account"] == "web"
    assert rig.world("pod") == []
    assert rig.store.get("cert", f"{KEY}/1").state == "revoked"  # type: ignore[union-attr]


def test_a_pod_deleted_then_created_again_under_its_name_walks_its_lifecycle_again(rig):
    listed(rig)
    rig.wiring.process([event(EventType.ADDED, meshed_pod(node="node-1", ip="10.0.1.1"))])
    rig.connect_and_sync()
    rig.wiring.process([event(EventType.MODIFIED, meshed_pod(node="node-1", ip="10.0.1.1", ready=True))])
    assert rig.state() == "ready"
    rig.wiring.process([event(EventType.DELETED, meshed_pod(node="node-1", ip="10.0.1.1", ready=True))])
    assert rig.state() == "gone"
    assert rig.store.get("sidecar", KEY).state == "removed"  # type: ignore[union-attr]
    first = len(rig.path())

    # The StatefulSet controller makes it again: same name, another service account, node and address.
    rig.wiring.process([event(EventType.ADDED, meshed_pod(account="web-v2"))])
    rig.wiring.process([event(EventType.MODIFIED, meshed_pod(account="web-v2", node="node-2", ip="10.0.2.2"))])
    assert rig.state() == "identity-issued"
    rig.engine.fire("pod", KEY, "sidecar_connected", actor="sidecar")
    rig.clock.advance(0.1)
    rig.engine.tick()
    rollout = rig.store.get("sidecar", KEY)
    assert rollout is not None and rollout.state == "sent"
    rig.engine.fire("sidecar", KEY, "ack", {"generation": rollout.data["desired"]}, actor="sidecar")
    rig.wiring.process([event(EventType.MODIFIED, meshed_pod(account="web-v2", node="node-2", ip="10.0.2.2",
                                                             ready=True))])
    assert rig.state() == "ready"
    journal = rig.store.journal("pod", KEY)[first - 1:]
    assert [(j.from_state, j.to_state, j.reason) for j in journal[:2]] == [
        ("terminating", "gone", "gone"), ("gone", "admitted", "readmitted")]
    assert [j.to_state for j in journal[1:]] == [
        "admitted", "injected", "scheduled", "identity-requested", "identity-issued", "sidecar-connected",
        "config-synced", "ready"]
    pod = rig.store.get("pod", KEY)
    assert pod is not None
    assert (pod.data["service_account"], pod.data["node"], pod.data["ip"]) == ("web-v2", "node-2", "10.0.2.2")
    # The first incarnation's certificate stays revoked; the second has one of its own, for its own identity.
    certs = {c.key: c for c in rig.store.list("cert", key_prefix=f"{KEY}/")}
    assert certs[f"{KEY}/1"].state == "revoked"
    assert certs[f"{KEY}/2"].data["spiffe_id"] == "spiffe://example.org/ns/shop/sa/web-v2"
    assert pod.data["cert"] == f"{KEY}/2"


def test_a_pod_placed_before_it_is_seen_is_admitted_and_scheduled_in_one_pass(rig):
    listed(rig, meshed_pod(node="node-1", ip="10.0.1.1"))
    assert rig.path()[:3] == ["admitted", "injected", "scheduled"]


def test_ready_reported_before_the_first_configuration_is_acknowledged_is_not_lost(rig):
    listed(rig, meshed_pod(node="node-1", ip="10.0.1.1"))
    rig.wiring.process([event(EventType.MODIFIED, meshed_pod(node="node-1", ip="10.0.1.1", ready=True))])
    assert rig.state() == "identity-issued"
    assert rig.wiring.retry_waiting() == 0  # still not the machine's turn
    rig.connect_and_sync()
    assert rig.wiring.retry_waiting() == 1
    assert rig.state() == "ready"
    assert rig.wiring.retry_waiting() == 0


def test_a_pod_placed_and_ready_in_one_update_is_made_ready_once_its_configuration_is_synced(rig):
    listed(rig, meshed_pod())
    rig.wiring.process([event(EventType.MODIFIED, meshed_pod(node="node-1", ip="10.0.1.1", ready=True))])
    assert rig.state() == "identity-issued"
    rig.connect_and_sync()
    assert rig.wiring.retry_waiting() == 1
    assert rig.state() == "ready"


def test_pods_outside_the_mesh_reach_the_world_but_get_no_lifecycle(rig):
    plain = t.pod("shop", "plain", {"app": "x"}, "web", "10.0.0.1", [])
    listed(rig, plain)
    assert rig.world("pod") == ["shop/plain"]
    assert rig.store.list("pod") == []


def test_a_pod_snapshot_reconciles_pods_the_engine_knows_and_the_platform_no_longer_has(rig):
    listed(rig, meshed_pod("a", node="n", ip="10.0.0.1"), meshed_pod("b"), meshed_pod("c"))
    assert {e.key for e in rig.store.list("pod")} == {"shop/a", "shop/b", "shop/c"}
    # A 410 later: the new list has b only, and d, created while the watch was away.
    listed(rig, meshed_pod("b"), meshed_pod("d"))
    states = {e.key: e.state for e in rig.store.list("pod")}
    assert states == {"shop/a": "gone", "shop/b": "injected", "shop/c": "gone", "shop/d": "injected"}
    assert rig.store.journal("pod", "shop/a")[-2].detail == "the pod was deleted"
    assert rig.world("pod") == ["shop/b", "shop/d"]


def test_no_pod_is_judged_gone_before_the_first_list_of_pods(rig):
    rig.engine.fire("pod", "shop/old", "admit", {"service_account": "web"}, actor="platform")
    rig.wiring.process([event(EventType.ADDED, meshed_pod("new"))])  # an event, but no list yet
    assert rig.state("shop/old") == "admitted"  # its injection is not confirmed: the watch never saw it
    assert rig.wiring.reconcile_pods() == 0
    listed(rig, meshed_pod("new"))
    assert rig.state("shop/old") == "gone"


def test_the_platform_confirms_injection_only_of_pods_the_watch_saw_injected(rig):
    listed(rig)
    assert rig.wiring.knows("shop/web-1") is None
    rig.wiring.process([event(EventType.ADDED, meshed_pod())])
    assert rig.wiring.knows("shop/web-1") is True


def test_a_pod_deleted_and_created_again_in_one_batch_is_readmitted_with_its_new_uid_and_its_old_cert_revoked(rig):
    listed(rig)
    first = meshed_pod(node="node-1", ip="10.0.1.1", uid="uid-1")
    rig.wiring.process([event(EventType.ADDED, first)])
    rig.connect_and_sync()
    rig.wiring.process([event(EventType.MODIFIED, meshed_pod(node="node-1", ip="10.0.1.1", ready=True, uid="uid-1"))])
    assert rig.state() == "ready"
    assert rig.store.get("pod", KEY).data["uid"] == "uid-1"  # type: ignore[union-attr]

    # DELETED and the new ADDED in one batch: the last word on the pod is the new incarnation, on another node.
    rig.wiring.process([event(EventType.DELETED, meshed_pod(node="node-1", ip="10.0.1.1", ready=True, uid="uid-1")),
                        event(EventType.ADDED, meshed_pod(node="node-2", ip="10.0.2.2", uid="uid-2"))])
    assert rig.state() == "gone"  # the old incarnation taken out at once; the new one waits for the next look
    rig.wiring.retry_waiting()  # what the consumer loop does every second
    assert rig.state() == "identity-issued"
    pod = rig.store.get("pod", KEY)
    assert pod is not None
    assert (pod.data["uid"], pod.data["node"], pod.data["ip"]) == ("uid-2", "node-2", "10.0.2.2")
    assert ("ready", "terminating") in [(j.from_state, j.to_state) for j in rig.store.journal("pod", KEY)]
    certs = {c.key: c for c in rig.store.list("cert", key_prefix=f"{KEY}/")}
    assert certs[f"{KEY}/1"].state == "revoked"
    assert pod.data["cert"] == f"{KEY}/2"


def test_a_namespace_relist_never_shows_the_webhook_an_empty_or_partial_map(rig, monkeypatch):
    import engine.kube as kube_module

    namespace = {"apiVersion": "v1", "kind": "Namespace"}
    rig.wiring.process([snapshot("Namespace", *({**namespace, "metadata": {"name": n, "labels": {"n": n}}}
                                                for n in ("a", "b", "c")))])
    assert rig.wiring.namespaces == {"a": {"n": "a"}, "b": {"n": "b"}, "c": {"n": "c"}}
    seen: list[dict[str, dict[str, str]]] = []
    labels = kube_module._labels

    def reading(obj: Any) -> dict[str, str]:
        seen.append(dict(rig.wiring.namespaces))  # what a webhook thread would read while the relist is built
        return labels(obj)

    monkeypatch.setattr(kube_module, "_labels", reading)
    rig.wiring.process([snapshot("Namespace", *({**namespace, "metadata": {"name": n, "labels": {"n": n + "2"}}}
                                                for n in ("a", "b", "d")))])
    assert seen and all(s == {"a": {"n": "a"}, "b": {"n": "b"}, "c": {"n": "c"}} for s in seen)
    assert rig.wiring.namespaces == {"a": {"n": "a2"}, "b": {"n": "b2"}, "d": {"n": "d2"}}


def _wait(condition: Any, bound: float = 5.0) -> bool:
    pause = threading.Event()
    for _ in range(int(bound / 0.01)):
        if condition():
            return True
        pause.wait(0.01)
    return False
