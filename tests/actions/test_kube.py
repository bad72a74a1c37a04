"""The Kubernetes actions against the behaving fake API server: reflectors that lose nothing, leader election on a
Lease, the pod platform and the objects the controller writes. The same code runs against the real API server in
tests/integration/test_kube_controller.py."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from actions.clock import FakeClock
from actions.errors import PermanentError, TemporaryError
from actions.kube import (
    POD,
    SERVICE,
    Backoff,
    EventType,
    FakeKube,
    FakeLease,
    KubePlatform,
    LeaderElector,
    Reflector,
    WatchEvent,
    carries_sidecar,
    namespace_labels,
    patch_webhook_ca_bundle,
    pod_path,
)
from tests.support.wait import eventually as wait_for

BOUND = 5.0  # seconds any condition may take to hold; never a timing threshold, only a bound on waiting


def pod(name: str, namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"containers": [{"name": "app", "image": "app"}], **spec}}


class Sleeps:
    """The reflector's injected sleep: records each wait and returns at once (a bounded pause, not a timer)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float, stop: threading.Event) -> None:
        self.delays.append(seconds)
        stop.wait(0.01)


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


@pytest.fixture
def watching(kube: FakeKube) -> Iterator[tuple[Reflector, list[WatchEvent], Sleeps]]:
    events: list[WatchEvent] = []
    sleeps = Sleeps()
    reflector = Reflector(kube, POD, events.append, page_size=2, sleep=sleeps, rand=_Fixed(0.5))
    yield reflector, events, sleeps
    reflector.stop()


class _Fixed:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def names(event: WatchEvent) -> list[str]:
    return sorted(str(o["metadata"]["name"]) for o in event.items)


# ---- the reflector -----------------------------------------------------------------------------------------------
def test_a_reflector_hands_over_a_snapshot_of_every_page_then_each_change_in_order(kube, watching):
    reflector, events, _ = watching
    for name in ("a", "b", "c", "d", "e"):
        kube.put(pod(name))
    reflector.start()
    wait_for(reflector.synced.is_set, "the first list")
    snapshot = events[0]
    assert snapshot.type is EventType.SNAPSHOT and snapshot.kind == "Pod"
    assert names(snapshot) == ["a", "b", "c", "d", "e"]  # three pages of two
    assert all(o["kind"] == "Pod" and o["apiVersion"] == "v1" for o in snapshot.items)  # core lists omit them
    assert snapshot.resource_version == kube.resource_version
    wait_for(lambda: kube.open_watches == 1, "the watch")

    kube.put(pod("f"))
    kube.put({**pod("a"), "spec": {"nodeName": "node-1", "containers": []}})
    kube.delete("Pod", "shop", "b")
    wait_for(lambda: len(events) == 4, "three changes")
    assert [(e.type, e.name) for e in events[1:]] == [
        (EventType.ADDED, "f"), (EventType.MODIFIED, "a"), (EventType.DELETED, "b")]
    assert events[2].object["spec"]["nodeName"] == "node-1"
    assert reflector.resource_version == kube.resource_version
    assert kube.lists == 3  # three pages, one list


def test_a_watch_cut_mid_stream_resumes_from_the_last_resource_version_and_loses_nothing(kube, watching):
    reflector, events, sleeps = watching
    kube.put(pod("a"))
    reflector.start()
    wait_for(lambda: kube.open_watches == 1, "the watch")
    kube.put(pod("b"))
    wait_for(lambda: len(events) == 2, "b")

    kube.unreachable = True
    assert kube.cut() == 1
    wait_for(lambda: len(sleeps.delays) >= 3, "retries while the server is away")
    kube.put(pod("c"))  # while the reflector cannot see anything
    kube.delete("Pod", "shop", "a")
    kube.unreachable = False
    wait_for(lambda: len(events) == 4, "what happened meanwhile")

    assert [(e.type, e.name) for e in events[2:]] == [(EventType.ADDED, "c"), (EventType.DELETED, "a")]
    assert kube.lists == 1  # replayed from the resourceVersion, not listed again
    assert reflector.reconnects >= 3
    # Exponential backoff, jitter drawn at 0.5 of 50 %: 0.8 s, 1.6 s, 3.2 s...
    assert sleeps.delays[:3] == [0.8 * 1.25, 1.6 * 1.25, 3.2 * 1.25]


def test_a_410_gone_makes_the_reflector_list_again_and_the_snapshot_lacks_what_was_deleted_meanwhile(kube, watching):
    reflector, events, sleeps = watching
    kube.put(pod("a"))
    kube.put(pod("b"))
    reflector.start()
    wait_for(lambda: kube.open_watches == 1, "the watch")
    kube.unreachable = True
    kube.cut()
    wait_for(lambda: len(sleeps.delays) >= 1, "a retry")
    kube.delete("Pod", "shop", "a")
    kube.put(pod("c"))
    kube.compact()  # the history the reflector would resume from is gone
    kube.unreachable = False
    wait_for(lambda: reflector.lists == 2, "a second list")

    assert [e.type for e in events] == [EventType.SNAPSHOT, EventType.SNAPSHOT]
    assert names(events[1]) == ["b", "c"]
    wait_for(lambda: kube.open_watches == 1, "the watch again")
    kube.put(pod("d"))
    wait_for(lambda: len(events) == 3, "d")
    assert events[2].name == "d"


def test_bookmarks_move_the_resource_version_without_an_event(kube, watching):
    reflector, events, _ = watching
    kube.put(pod("a"))
    reflector.start()
    wait_for(lambda: kube.open_watches == 1, "the watch")
    # An event of another kind moves the server's version, as in a real cluster; a bookmark tells the reflector.
    kube.put({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "shop"}, "spec": {}})
    kube.bookmark()
    wait_for(lambda: reflector.resource_version == kube.resource_version, "the bookmark")
    assert len(events) == 1


def test_a_watch_the_server_ends_after_events_is_started_again_without_a_list_or_a_wait(kube, watching):
    reflector, events, sleeps = watching
    reflector.start()
    wait_for(lambda: kube.open_watches == 1, "the watch")
    kube.put(pod("a"))
    wait_for(lambda: len(events) == 2, "a")
    kube.end_watches()
    wait_for(lambda: kube.watches == 2 and kube.open_watches == 1, "a second watch")
    kube.put(pod("b"))
    wait_for(lambda: len(events) == 3, "b")
    assert kube.lists == 1 and sleeps.delays == []


class ClosingProxy(FakeKube):
    """A proxy in front of the API server that ends every watch at once, before any event, while `closing`."""

    closing = True

    def watch(self, path: str, query: Any, timeout: float) -> Any:
        stream = super().watch(path, query, timeout)
        if self.closing:
            stream.close()
        return stream


def test_watches_that_end_at_once_without_an_event_are_started_again_after_a_growing_wait_reset_by_events():
    kube, events, sleeps = ClosingProxy(), [], Sleeps()
    reflector = Reflector(kube, POD, events.append, sleep=sleeps, rand=_Fixed(0.5))
    try:
        reflector.start()
        wait_for(lambda: len(sleeps.delays) >= 4, "four waits between empty watches")
        assert sleeps.delays[:4] == [0.8 * 1.25, 1.6 * 1.25, 3.2 * 1.25, 6.4 * 1.25]
        kube.closing = False  # the proxy lets a watch through: events flow again
        wait_for(lambda: kube.open_watches == 1, "a watch that stays open")
        kube.put(pod("a"))
        wait_for(lambda: len(events) == 2, "a")
        waited = len(sleeps.delays)
        kube.closing = True
        kube.end_watches()
        wait_for(lambda: len(sleeps.delays) > waited, "a wait after the next empty watch")
        assert sleeps.delays[waited] == 0.8 * 1.25  # counted from the start again
    finally:
        reflector.stop()
    # Every watch that brought nothing was followed by a wait: the only ones without are the one that delivered
    # `a` and, maybe, the last (ended by the stop).
    assert kube.watches <= len(sleeps.delays) + 2
    assert kube.lists == 1


def test_a_server_away_at_start_is_waited_for_with_growing_capped_backoff(kube, watching):
    reflector, events, sleeps = watching
    kube.unreachable = True
    reflector.start()
    wait_for(lambda: len(sleeps.delays) >= 8, "eight retries")
    kube.unreachable = False
    wait_for(reflector.synced.is_set, "the list once the server is back")
    assert sleeps.delays[:8] == sorted(sleeps.delays[:8])
    assert max(sleeps.delays) <= 30.0 * 1.5


def test_objects_are_trimmed_by_the_consumers_transform_before_they_are_kept(kube):
    events: list[WatchEvent] = []
    kube.put(pod("a"))

    def keep_name(obj: dict[str, Any]) -> dict[str, Any]:
        return {"kind": obj["kind"], "metadata": {"name": obj["metadata"]["name"]}}

    reflector = Reflector(kube, POD, events.append, transform=keep_name)
    reflector.start()
    try:
        wait_for(reflector.synced.is_set, "the list")
        assert events[0].items == ({"kind": "Pod", "metadata": {"name": "a"}},)
    finally:
        reflector.stop()


def test_a_reflector_watches_only_its_own_kind(kube):
    events: list[WatchEvent] = []
    reflector = Reflector(kube, SERVICE, events.append)
    reflector.start()
    try:
        wait_for(lambda: kube.open_watches == 1, "the watch")
        kube.put(pod("a"))
        kube.put({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
                  "spec": {"ports": [{"port": 80}]}})
        wait_for(lambda: len(events) == 2, "the service")
        assert [(e.kind, e.name) for e in events[1:]] == [("Service", "web")]
    finally:
        reflector.stop()


def test_backoff_doubles_from_0_8_s_to_a_30_s_cap_stretched_by_its_jitter():
    b = Backoff()
    assert [b.delay(n, 0.0) for n in range(7)] == [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0]
    assert b.delay(100, 0.0) == 30.0
    assert b.delay(0, 1.0) == pytest.approx(1.2)


# ---- leader election ------------------------------------------------------------------------------------------------
def elector(lease: FakeLease, name: str, clock: FakeClock, **kw: Any) -> LeaderElector:
    return LeaderElector(lease, name, clock=clock, lease_duration=15, renew_deadline=10, retry_period=2, **kw)


def test_one_replica_takes_a_free_lease_and_another_waits_while_it_renews():
    lease, clock = FakeLease(), FakeClock()
    a, b = elector(lease, "a", clock), elector(lease, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    for _ in range(20):  # 40 s of renewals every 2 s: b never gets it
        clock.advance(2)
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew()
    record = lease.record
    assert record is not None and record.holder == "a" and record.transitions == 0
    assert record.renew_time == clock.now() and record.lease_duration == 15


def test_a_lease_not_renewed_for_its_duration_as_the_other_replica_saw_it_passes_to_that_replica():
    lease, clock = FakeLease(), FakeClock()
    a, b = elector(lease, "a", clock), elector(lease, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # b sees a's record now
    clock.advance(14.9)
    assert not b.try_acquire_or_renew()
    clock.advance(0.1)
    assert b.try_acquire_or_renew()
    record = lease.record
    assert record is not None and record.holder == "b" and record.transitions == 1
    assert record.acquire_time == clock.now()
    assert not a.try_acquire_or_renew()
    assert a.holder == "b"


def test_two_replicas_racing_for_an_expired_lease_cannot_both_win():
    lease, clock = FakeLease(), FakeClock()
    a, b, c = (elector(lease, n, clock) for n in "abc")
    assert a.try_acquire_or_renew()
    b.try_acquire_or_renew()
    c.try_acquire_or_renew()
    clock.advance(16)
    stale = lease.get()
    assert b.try_acquire_or_renew()
    # c read the lease before b wrote it: its write carries the old resourceVersion and is refused.
    original_get = lease.get
    lease.get = lambda: stale  # type: ignore[method-assign]
    try:
        assert not c.try_acquire_or_renew()
    finally:
        lease.get = original_get  # type: ignore[method-assign]
    assert lease.record is not None and lease.record.holder == "b"


def test_a_leader_that_cannot_renew_within_its_deadline_stops_leading_and_a_stopped_one_releases_the_lease():
    lease, clock = FakeLease(), FakeClock()
    calls: list[str] = []
    naps: list[float] = []

    def sleep(seconds: float, stop: threading.Event) -> None:
        clock.advance(seconds)
        naps.append(seconds)
        if len(naps) == 3:
            lease.fail = True  # the API server goes away after a few renewals
        if calls == ["started", "stopped"]:
            a.request_stop()

    a = elector(lease, "a", clock, sleep=sleep, on_started_leading=lambda: calls.append("started"),
                on_stopped_leading=lambda: calls.append("stopped"))
    start = clock.now()
    a.run()
    assert calls == ["started", "stopped"]
    assert not a.leading
    # It kept trying every 2 s for the 10 s of its renew deadline after the last renewal, then gave up.
    assert (clock.now() - start).total_seconds() >= 10

    lease.fail = False
    b_calls: list[str] = []

    def b_sleep(seconds: float, stop: threading.Event) -> None:
        clock.advance(seconds)
        if b_calls == ["started"]:
            b.request_stop()

    b = elector(lease, "b", clock, sleep=b_sleep, on_started_leading=lambda: b_calls.append("started"),
                on_stopped_leading=lambda: b_calls.append("stopped"))
    b.run()  # a's lease is still within its duration as b sees it: b waits for it to pass, then leads
    assert b_calls == ["started", "stopped"]
    assert lease.record is not None and lease.record.holder is None  # released on the way out
    c = elector(lease, "c", clock)
    assert c.try_acquire_or_renew()  # at once: no lease duration to wait out


def test_the_lease_is_renewed_while_a_slow_start_runs_and_a_start_that_outlived_it_is_stopped_after_it():
    lease, clock = FakeLease(), FakeClock()
    calls: list[str] = []
    renewed_during_start: list[bool] = []
    lost_during_start: list[bool] = []
    acquired = threading.Event()

    def renewed_three_times() -> bool:
        record = lease.record
        return record is not None and record.renew_time is not None and record.acquire_time is not None and \
            (record.renew_time - record.acquire_time).total_seconds() >= 6

    def slow_start() -> None:  # the control plane's start: returns once three renewals happened meanwhile (bounded)
        acquired.set()
        calls.append("started")
        renewed_during_start.append(_holds_within(renewed_three_times))
        lease.fail = True  # then the API server goes away for longer than the renew deadline
        lost_during_start.append(_holds_within(lambda: not a.leading))
        calls.append("start returned")

    def sleep(seconds: float, stop: threading.Event) -> None:
        clock.advance(seconds)
        stop.wait(0.01)

    a = elector(lease, "a", clock, sleep=sleep, on_started_leading=slow_start,
                on_stopped_leading=lambda: (calls.append("stopped"), a.request_stop()))
    a.start()
    try:
        assert acquired.wait(BOUND)
        wait_for(lambda: "stopped" in calls, "the end of the term")
    finally:
        a.stop()
    assert renewed_during_start == [True]
    assert lost_during_start == [True]  # the start can see it and give up
    assert calls == ["started", "start returned", "stopped"]  # what it started is stopped once it is all up


def _holds_within(condition: Callable[[], bool]) -> bool:
    pause = threading.Event()
    for _ in range(int(BOUND / 0.01)):
        if condition():
            return True
        pause.wait(0.01)
    return False


def test_a_namespace_is_read_from_the_server_with_a_short_timeout_and_unknown_on_any_error(kube):
    kube.docs["/api/v1/namespaces/shop"] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": "shop", "labels": {"injector.nsm.nginx.com/auto-inject": "enabled"}}}
    kube.docs["/api/v1/namespaces/bare"] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bare"}}
    assert namespace_labels(kube, "shop") == {"injector.nsm.nginx.com/auto-inject": "enabled"}
    assert namespace_labels(kube, "bare") == {}
    assert namespace_labels(kube, "missing") is None
    kube.unreachable = True
    assert namespace_labels(kube, "shop") is None


def test_leader_election_timings_must_nest():
    with pytest.raises(ValueError):
        LeaderElector(FakeLease(), "a", lease_duration=10, renew_deadline=10, retry_period=2)


# ---- the platform ----------------------------------------------------------------------------------------------------
def injected_pod(name: str) -> dict[str, Any]:
    p = pod(name)
    p["metadata"]["labels"] = {"meshloom.io/injected": "true"}
    return p


def test_injection_is_confirmed_from_what_the_watch_knows_without_asking_the_server(kube):
    platform = KubePlatform(kube, known=lambda key: True if key == "shop/a" else None)
    platform.inject("shop/a")
    assert kube.requests == []


def test_injection_of_a_pod_the_watch_has_not_seen_is_confirmed_by_reading_it(kube):
    platform = KubePlatform(kube)
    kube.docs[pod_path("shop", "a")] = injected_pod("a")
    platform.inject("shop/a")
    kube.docs[pod_path("shop", "b")] = pod("b")
    with pytest.raises(PermanentError, match="runs without its sidecar"):
        platform.inject("shop/b")
    with pytest.raises(PermanentError, match="no longer exists"):
        platform.inject("shop/c")
    kube.unreachable = True
    with pytest.raises(TemporaryError):
        platform.inject("shop/a")
    platform.teardown("shop/a")  # nothing of the mesh's to remove on Kubernetes


def test_a_pod_carries_its_sidecar_by_marker_or_by_container():
    assert carries_sidecar(injected_pod("a"))
    annotated = pod("a")
    annotated["metadata"]["annotations"] = {"meshloom.io/injected": "true"}
    assert carries_sidecar(annotated)
    assert carries_sidecar(pod("a", containers=[{"name": "app"}, {"name": "meshloom-sidecar"}]))
    assert not carries_sidecar(pod("a"))


# ---- what the controller writes ------------------------------------------------------------------------------------
WEBHOOKS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/meshloom-injector"


def test_the_injector_ca_bundle_is_set_on_every_webhook_and_left_alone_when_current(kube):
    kube.docs[WEBHOOKS] = {"metadata": {"name": "meshloom-injector", "resourceVersion": "1"},
                           "webhooks": [{"name": "a", "clientConfig": {"service": {"name": "x"}}},
                                        {"name": "b", "clientConfig": {"caBundle": "b2xk"}}]}
    assert patch_webhook_ca_bundle(kube, b"-----PEM-----\n") == 2
    stored = kube.docs[WEBHOOKS]
    expected = base64.b64encode(b"-----PEM-----\n").decode()
    assert [w["clientConfig"]["caBundle"] for w in stored["webhooks"]] == [expected, expected]
    assert stored["webhooks"][0]["clientConfig"]["service"] == {"name": "x"}
    before = kube.resource_version
    assert patch_webhook_ca_bundle(kube, b"-----PEM-----\n") == 0
    assert kube.resource_version == before  # nothing written


def test_a_missing_injector_configuration_is_a_permanent_error_naming_it(kube):
    with pytest.raises(PermanentError, match="MutatingWebhookConfiguration meshloom-injector does not exist"):
        patch_webhook_ca_bundle(kube, b"pem")


