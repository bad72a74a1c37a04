"""The local platform (engine/local.py) with a behaving fake of its pods (FakeLocalPods) and a real engine on SQLite:
the pod machine's effects reach the platform through the engine, as in `meshctl up`, and each pass is driven by an
explicit `reconcile()`, the engine's `drain()` / `tick()` and fake clocks (no process, namespace or timer is real)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from actions import Actions
from actions.ca import FakeCertificateAuthority
from actions.clock import FakeClock, SystemClock
from actions.localpods import APP_UID, SIDECAR_UID, FakeLocalPods, pod_dir_name
from actions.localstate import Desired, DesiredPod, load_desired, load_status, save_desired
from actions.nats import FakeConfigPublisher
from actions.nodeagent import FakeSvidDelivery
from actions.vault import MemoryVault
from catalog import ValidationError
from engine import Engine, Policy, ensure_ca
from engine.local import BACKOFF_FIRST, NODE, ROUTES_RETRY, LocalPlatform, store_world, stored_addresses
from store import Store
from tests.catalog import topology
from tests.support.documents import DocumentedStore

WEB = "shop/web-0"
WEB_IP = "10.213.0.10"
MESHCTL = "/opt/meshloom/bin/meshctl"


@dataclass
class FakeAgent:
    """The node agent as the platform uses it: a Workload API socket per meshed pod."""

    root: Path
    sockets: dict[str, int | None] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    def add_workload(self, owner: str, uid: int | None = None) -> Path:
        self.sockets[owner] = uid
        return self.root / "agent" / f"{pod_dir_name(owner)}.sock"

    def remove_workload(self, owner: str, grace: float = 0.5) -> None:
        self.sockets.pop(owner, None)
        self.removed.append(owner)


@dataclass
class Host:
    """One host's local platform bound to a real engine on SQLite with fake CA, delivery and publisher."""

    platform: LocalPlatform
    pods: FakeLocalPods
    agent: FakeAgent
    engine: Engine
    store: Store
    clock: FakeClock
    state_dir: Path
    seconds: list[float]  # the platform's monotonic clock

    def want(self, *pods: DesiredPod, services: tuple[tuple[str, str], ...] = ()) -> None:
        save_desired(self.state_dir, Desired("test", pods, services))

    def settle(self) -> None:
        """One pass of the platform, then the effects its triggers committed (as the plane's tick would run them)."""
        self.platform.reconcile()
        self.engine.drain()

    def state(self, key: str) -> str | None:
        row = self.store.get("pod", key)
        return row.state if row is not None else None

    def status(self) -> dict[str, Any]:
        return load_status(self.state_dir)

    def sync_sidecar(self, key: str) -> None:
        """The sidecar's first configuration published and acknowledged, as the sidecar would."""
        self.clock.advance(0.1)  # the coalescing window of a sidecar's first document
        self.engine.tick()
        self.engine.fire("sidecar", key, "ack", {"generation": 1}, actor="sidecar")


def meshed(key: str = WEB, ip: str = WEB_IP, **changes: Any) -> DesiredPod:
    values: dict[str, Any] = {
        "key": key, "service_account": "web", "command": ("meshctl", "app", "serve", "--http", "8080"),
        "env": (("GREETING", "hi"),), "annotations": (), "labels": (("app", "web"),), "meshed": True, "ip": ip,
        "ports": (8080,)}
    values.update(changes)
    return DesiredPod(**values)


@pytest.fixture
def host(sqlite_url: str, tmp_path: Path) -> Iterator[Host]:
    clock = FakeClock()
    seconds = [1000.0]
    pods = FakeLocalPods(tmp_path / "run")
    state_dir = tmp_path / "state"
    platform = LocalPlatform(pods, state_dir, MESHCTL, monotonic=lambda: seconds[0])
    store = DocumentedStore(sqlite_url)
    actions = Actions(FakeCertificateAuthority(clock), FakeSvidDelivery(), FakeConfigPublisher(), platform,
                      MemoryVault())
    engine = Engine(store, actions, clock, policy=Policy(max_attempts=4), jitter=lambda: 0.5)
    agent = FakeAgent(tmp_path / "run")
    platform.bind(engine, agent, lambda: "tls://10.213.0.1:4222")
    ensure_ca(engine)
    yield Host(platform, pods, agent, engine, store, clock, state_dir, seconds)
    store.close()


# ---- a meshed pod's life ------------------------------------------------------------------------------------------
def test_a_desired_meshed_pod_is_admitted_and_injected_through_the_machines_effect(host: Host) -> None:
    host.want(meshed(annotations=(("config.nsm.nginx.com/ignore-outgoing-ports", "6379"),)),
              services=(("shop/web", "10.213.128.5"),))

    host.settle()

    assert host.state(WEB) == "injected"
    made = host.pods.pod(WEB)
    assert made is not None and str(made.net.ip) == WEB_IP
    assert made.init is not None and 6379 in made.init.ignore_outgoing_ports and 53 in made.init.ignore_outgoing_ports
    assert made.hosts["web"] == "10.213.128.5"
    assert host.agent.sockets == {WEB: SIDECAR_UID}
    app, sidecar = host.pods.process(WEB, "app"), host.pods.process(WEB, "sidecar")
    assert app is not None and sidecar is not None
    assert app.process.argv == ("meshctl", "app", "serve", "--http", "8080") and app.process.uid == APP_UID
    assert {k: app.env[k] for k in ("POD_NAME", "POD_NAMESPACE", "POD_IP", "SERVICE_ACCOUNT", "GREETING")} == {
        "POD_NAME": "web-0", "POD_NAMESPACE": "shop", "POD_IP": WEB_IP, "SERVICE_ACCOUNT": "web", "GREETING": "hi"}
    assert sidecar.process.uid == SIDECAR_UID
    assert sidecar.process.argv[:4] == (MESHCTL, "sidecar", "--sidecar", WEB)
    assert "tls://10.213.0.1:4222" in sidecar.process.argv


def test_an_injected_pod_is_scheduled_on_the_local_node_at_its_address_and_gets_its_identity(host: Host) -> None:
    host.want(meshed())
    host.settle()

    host.settle()

    row = host.store.get("pod", WEB)
    assert row is not None and row.state == "identity-issued"
    assert row.data["node"] == NODE and row.data["ip"] == WEB_IP
    assert len(host.pods.created) == 1  # the namespace made at injection is kept, not made again


def test_the_sidecar_connects_on_its_liveness_probe_and_the_pod_is_ready_only_when_ready_and_listening(
        host: Host) -> None:
    host.want(meshed())
    host.settle()
    host.settle()
    host.pods.probes[(WEB, "/live")] = 0  # the sidecar runs but its admin port does not answer yet

    host.settle()
    assert host.state(WEB) == "identity-issued"

    del host.pods.probes[(WEB, "/live")]
    host.settle()
    assert host.state(WEB) == "sidecar-connected"

    host.sync_sidecar(WEB)
    assert host.state(WEB) == "config-synced"
    host.pods.probes[(WEB, "/ready")] = 503
    host.settle()
    assert host.state(WEB) == "config-synced"

    del host.pods.probes[(WEB, "/ready")]
    host.pods.deaf.add(WEB)  # the proxy is ready, the workload does not listen yet
    host.settle()
    assert host.state(WEB) == "config-synced"
    assert host.status()[WEB]["ready"] is False

    host.pods.deaf.clear()
    host.settle()
    assert host.state(WEB) == "ready"
    host.settle()  # a pass writes the states it started from: the next one reports ready
    assert host.status()[WEB]["ready"] is True


def test_a_pod_outside_the_mesh_gets_its_namespace_and_workload_and_no_machine(host: Host) -> None:
    host.want(meshed(meshed=False))

    host.settle()

    made = host.pods.pod(WEB)
    assert made is not None and made.init is None
    assert host.pods.running(WEB, "app") is not None
    assert host.pods.process(WEB, "sidecar") is None
    assert host.state(WEB) is None
    assert host.agent.sockets == {}
    assert host.status()[WEB]["state"] == "unmeshed"
    assert host.status()[WEB]["ready"] is True


def test_a_pod_outside_the_mesh_routes_service_addresses_to_their_endpoints_and_again_when_they_change(
        host: Host) -> None:
    client = meshed("shop/client-0", "10.213.0.12", meshed=False)
    store_world(host.store, _world(with_api=False), Desired(), actor="test", now=SystemClock().now())
    host.want(meshed(), client)
    host.settle()

    made = host.pods.pod("shop/client-0")
    assert made is not None
    assert [(r.address, r.port, r.transport, r.endpoints) for r in made.routes] == [
        ("10.213.128.5", 80, "tcp", ((WEB_IP, 8080),))]
    web = host.pods.pod(WEB)
    assert web is not None and web.routes == ()  # its sidecar routes Service addresses itself

    store_world(host.store, _world(), Desired(), actor="test", now=SystemClock().now())  # `up -f` of a new manifest:
    host.want(meshed(), client, meshed("shop/api-0", "10.213.0.11"))  # its world first, then its pods
    host.settle()

    assert [(r.address, r.endpoints) for r in made.routes] == [("10.213.128.6", (("10.213.0.11", 8080),)),
                                                             ("10.213.128.5", ((WEB_IP, 8080),))]


# ---- processes that die --------------------------------------------------------------------------------------------
def test_a_process_that_dies_is_started_again_and_the_second_death_waits_for_the_backoff(host: Host) -> None:
    host.want(meshed(meshed=False))
    host.settle()
    first = host.pods.running(WEB, "app")

    host.pods.kill(WEB, "app", 3, "listen: address in use")
    host.settle()
    second = host.pods.running(WEB, "app")
    assert second is not None and second != first
    app = host.status()[WEB]["processes"]["app"]
    assert app["restarts"] == 1 and app["last_exit"] == "exited with 3: listen: address in use"

    host.pods.kill(WEB, "app", 3)
    host.settle()
    assert host.pods.running(WEB, "app") is None
    assert "starting it again in" in host.status()[WEB]["problem"]

    host.seconds[0] += BACKOFF_FIRST
    host.settle()
    assert host.pods.running(WEB, "app") is not None
    assert host.status()[WEB]["processes"]["app"]["restarts"] == 2
    assert host.status()[WEB]["problem"] == ""


def test_a_meshed_pods_dead_sidecar_is_started_again_without_disturbing_the_machine(host: Host) -> None:
    host.want(meshed())
    host.settle()
    host.settle()
    host.settle()
    assert host.state(WEB) == "sidecar-connected"

    host.pods.kill(WEB, "sidecar", 1)
    host.settle()

    assert host.pods.running(WEB, "sidecar") is not None
    assert host.status()[WEB]["processes"]["sidecar"]["restarts"] == 1
    assert host.state(WEB) == "sidecar-connected"


# ---- pods that leave ------------------------------------------------------------------------------------------------
def test_a_pod_removed_from_the_desired_file_is_terminated_and_torn_down(host: Host) -> None:
    other = meshed("shop/web-1", "10.213.0.11")
    host.want(meshed(), other)
    host.settle()
    host.settle()

    host.want(other)
    host.settle()

    assert host.state(WEB) == "gone"
    assert host.pods.pod(WEB) is None and host.pods.net(WEB) is None
    assert WEB in host.pods.removed and WEB in host.agent.removed
    assert host.pods.pod("shop/web-1") is not None
    assert WEB not in host.status()


def test_a_pod_whose_manifest_entry_changes_is_replaced_by_a_new_incarnation(host: Host) -> None:
    host.want(meshed())
    host.settle()
    host.settle()
    first = host.pods.process(WEB, "app")
    assert first is not None

    host.want(meshed(command=("meshctl", "app", "serve", "--http", "8080", "--upstream", "http://api.shop.svc/")))
    host.settle()  # terminate, torn down, gone
    host.settle()  # admitted again, injected with the new command

    life = [e.to_state for e in host.store.journal("pod", WEB)]
    assert life[-4:] == ["terminating", "gone", "admitted", "injected"]
    app = host.pods.process(WEB, "app")
    assert app is not None and app.pid != first.pid and "--upstream" in app.process.argv


def test_a_pod_outside_the_mesh_whose_entry_changes_is_made_again_with_it(host: Host) -> None:
    host.want(meshed(meshed=False))
    host.settle()
    first = host.pods.process(WEB, "app")
    assert first is not None

    host.want(meshed(meshed=False, env=(("GREETING", "hello"),)))
    host.settle()

    app = host.pods.process(WEB, "app")
    assert app is not None and app.pid != first.pid and app.env["GREETING"] == "hello"
    assert WEB in host.pods.removed


def test_a_meshed_pod_taken_out_of_the_mesh_ends_its_life_and_comes_back_without_a_sidecar(host: Host) -> None:
    host.want(meshed())
    host.settle()
    host.settle()

    host.want(meshed(meshed=False))
    host.settle()  # terminate, torn down
    host.settle()  # the pod outside the mesh

    assert host.state(WEB) == "gone"
    made = host.pods.pod(WEB)
    assert made is not None and made.init is None
    assert host.pods.running(WEB, "sidecar") is None and host.pods.running(WEB, "app") is not None


def test_a_pod_that_joins_the_mesh_is_made_again_without_the_old_workload_or_its_service_routes(
        host: Host) -> None:
    store_world(host.store, _world(with_api=False), Desired(), actor="test", now=SystemClock().now())
    host.want(meshed(meshed=False))
    host.settle()
    old = host.pods.process(WEB, "app")
    before = host.pods.pod(WEB)
    assert old is not None and before is not None and before.routes

    host.want(meshed())
    host.settle()  # admitted, and injected by the effect

    made = host.pods.pod(WEB)
    assert host.pods.removed == [WEB] and made is not None and made is not before
    assert made.init is not None and made.routes == ()  # its sidecar routes Service addresses now
    app = host.pods.process(WEB, "app")
    assert app is not None and app.pid != old.pid  # the old workload went with its namespace


def test_a_pods_service_routes_are_in_place_before_its_workload_starts_and_a_failed_install_waits_to_retry(
        host: Host) -> None:
    store_world(host.store, _world(with_api=False), Desired(), actor="test", now=SystemClock().now())
    routes_at_start = []
    start = host.pods.start

    def recording_start(key: str, role: str, process: Any) -> int:
        made = host.pods.pod(key)
        routes_at_start.append(made.routes if made is not None else None)
        return start(key, role, process)

    host.pods.start = recording_start  # type: ignore[method-assign]
    host.pods.route_error = "iptables-nft-restore failed at line 3 of the rules: No chain/target/match"
    host.want(meshed(meshed=False))
    host.settle()

    assert host.pods.running(WEB, "app") is not None  # the workload runs all the same
    assert host.status()[WEB]["problem"] == f"its Service routes: {host.pods.route_error}"
    host.pods.route_error = ""
    host.seconds[0] += ROUTES_RETRY - 1
    host.settle()
    made = host.pods.pod(WEB)
    assert made is not None and made.routes == ()  # not tried again before its time
    assert host.status()[WEB]["problem"].startswith("its Service routes")
    host.seconds[0] += 1
    host.settle()
    assert made.routes and host.status()[WEB]["problem"] == ""

    host.want(meshed(meshed=False, env=(("GREETING", "hello"),)))  # a new incarnation, routes and all
    host.settle()
    assert routes_at_start[-1] and host.pods.process(WEB, "app").env["GREETING"] == "hello"  # type: ignore[union-attr]


def test_an_injection_a_killed_control_plane_left_half_done_is_finished(host: Host) -> None:
    host.want(meshed())
    host.settle()
    made = host.pods.pod(WEB)
    assert made is not None
    made.init, made.uid = None, ""  # the namespace was made, the rules and the pod's record were not

    host.settle()  # scheduled
    host.settle()  # the pass that keeps it finds its record missing

    made = host.pods.pod(WEB)
    assert made is not None and made.init is not None and made.uid == meshed().uid


def test_a_service_added_to_the_manifest_gets_its_name_in_every_running_pod(host: Host) -> None:
    host.want(meshed(), services=(("shop/web", "10.213.128.5"),))
    host.settle()

    host.want(meshed(), services=(("shop/web", "10.213.128.5"), ("shop/api", "10.213.128.6")))
    host.settle()

    made = host.pods.pod(WEB)
    assert made is not None and made.hosts["api"] == "10.213.128.6" and made.hosts["api.shop.svc"] == "10.213.128.6"


def test_an_unmeshed_pod_removed_from_the_desired_file_loses_its_namespace(host: Host) -> None:
    host.want(meshed(meshed=False))
    host.settle()

    host.want()
    host.settle()

    assert host.pods.pod(WEB) is None and host.pods.removed == [WEB]


# ---- status.json ----------------------------------------------------------------------------------------------------
def test_status_says_the_state_the_processes_and_the_problem(host: Host) -> None:
    host.want(meshed())
    host.settle()
    host.settle()
    host.pods.kill(WEB, "app", 2, "Traceback: boom")
    host.settle()
    host.pods.kill(WEB, "app", 2, "Traceback: boom")
    host.settle()

    raw = json.loads((host.state_dir / "local" / "status.json").read_text())
    pod = raw[WEB]
    assert pod["state"] == "sidecar-connected" and pod["ready"] is False and pod["ip"] == WEB_IP
    assert pod["processes"]["app"] == {"pid": None, "restarts": 1, "last_exit": "exited with 2: Traceback: boom"}
    assert pod["processes"]["sidecar"]["pid"] == host.pods.running(WEB, "sidecar")
    assert pod["problem"] == "its app exited with 2: Traceback: boom; starting it again in 1s"


def test_a_pod_whose_injection_fails_says_why_in_its_status(host: Host) -> None:
    host.want(meshed(ip="192.0.2.10"))  # outside the fake network's subnet: the namespace cannot be made

    host.settle()
    host.settle()

    assert host.state(WEB) == "failed"
    assert "192.0.2.10" in host.status()[WEB]["problem"]


# ---- the desired file ---------------------------------------------------------------------------------------------
def test_desired_pods_and_services_survive_a_save_and_load(tmp_path: Path) -> None:
    desired = Desired("demo", (meshed(annotations=(("a", "1"), ("b", "2")), env=(("A", "x"), ("B", "y"))),
                               meshed("demo/client-0", "10.213.0.12", meshed=False, ports=())),
                      (("shop/web", "10.213.128.5"), ("demo/api", "10.213.128.6")),
                      (("pod", "shop", "web-0"), ("meshconfig", "", "mesh")))

    save_desired(tmp_path, desired)

    loaded = load_desired(tmp_path)
    assert loaded.mesh == desired.mesh and loaded.pods == desired.pods and loaded.resources == desired.resources
    assert dict(loaded.services) == dict(desired.services)


def test_a_state_directory_without_a_desired_file_wants_nothing(tmp_path: Path) -> None:
    assert load_desired(tmp_path) == Desired()


def test_service_names_resolve_as_kubernetes_dns_does_with_the_short_name_only_in_its_own_namespace() -> None:
    desired = Desired(services=(("shop/web", "10.213.128.5"), ("pay/api", "10.213.128.6")))

    hosts = desired.hosts("shop")

    assert hosts == {
        "web.shop.svc.cluster.local": "10.213.128.5", "web.shop.svc": "10.213.128.5", "web.shop": "10.213.128.5",
        "web": "10.213.128.5",
        "api.pay.svc.cluster.local": "10.213.128.6", "api.pay.svc": "10.213.128.6", "api.pay": "10.213.128.6"}
    assert "api" in desired.hosts("pay") and "web" not in desired.hosts("pay")


# ---- the stored world ---------------------------------------------------------------------------------------------
def _world(*, with_api: bool = True) -> list[dict[str, Any]]:
    docs = [topology.namespace("shop", topology.INJECT),
            topology.pod("shop", "web-0", {"app": "web"}, "web", WEB_IP, [{"containerPort": 8080}]),
            topology.service("shop", "web", {"app": "web"}, [{"port": 80, "targetPort": 8080}], "10.213.128.5")]
    if with_api:
        docs += [topology.pod("shop", "api-0", {"app": "api"}, "api", "10.213.0.11", [{"containerPort": 8080}]),
                 topology.service("shop", "api", {"app": "api"}, [{"port": 80, "targetPort": 8080}], "10.213.128.6")]
    return docs


def _refs(store: Store) -> set[tuple[str, str, str]]:
    return {(r.kind, r.namespace, r.name) for r in store.resources()}


def test_stored_addresses_name_each_pods_and_services_address(sqlite_url: str) -> None:
    store = DocumentedStore(sqlite_url)
    try:
        store_world(store, _world(), Desired(), actor="test", now=SystemClock().now())

        assert stored_addresses(store) == {
            "pod/shop/web-0": WEB_IP, "pod/shop/api-0": "10.213.0.11",
            "service/shop/web": "10.213.128.5", "service/shop/api": "10.213.128.6"}
    finally:
        store.close()


def test_storing_a_new_world_removes_what_the_previous_manifest_stored_and_keeps_what_others_applied(
        sqlite_url: str) -> None:
    store = DocumentedStore(sqlite_url)
    try:
        now = SystemClock().now()
        stored = store_world(store, _world(), Desired(), actor="test", now=now)
        assert ("pod", "shop", "api-0") in stored and ("service", "shop", "api") in stored
        mesh_config = topology.manifests()[0]  # as `meshctl apply -f` would store it, outside the manifest
        store_world(store, [mesh_config], Desired(), actor="operator", now=now)

        again = store_world(store, _world(with_api=False), Desired(resources=stored), actor="test", now=now)

        refs = _refs(store)
        assert ("pod", "shop", "api-0") not in refs and ("service", "shop", "api") not in refs
        assert {("pod", "shop", "web-0"), ("service", "shop", "web"), ("namespace", "", "shop")} <= refs
        assert ("meshconfig", "", "mesh") in refs
        assert set(again) == {("namespace", "", "shop"), ("pod", "shop", "web-0"), ("service", "shop", "web")}
    finally:
        store.close()


def test_a_rejected_world_leaves_the_stored_one_unchanged(sqlite_url: str) -> None:
    store = DocumentedStore(sqlite_url)
    try:
        now = SystemClock().now()
        stored = store_world(store, _world(), Desired(), actor="test", now=now)
        before = {(r.kind, r.namespace, r.name): dict(r.body) for r in store.resources()}
        broken = _world(with_api=False)
        broken[2]["spec"]["ports"][0]["port"] = 70000

        with pytest.raises(ValidationError, match="70000|port"):
            store_world(store, broken, Desired(resources=stored), actor="test", now=now)

        assert {(r.kind, r.namespace, r.name): dict(r.body) for r in store.resources()} == before
    finally:
        store.close()
