"""The world, and the cross-references that reject it (`check`) or are only worth a warning (`warnings`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import catalog
from catalog.world import ServiceRoute, service_routes
from tests.catalog import topology
from tests.catalog.topology import manifests, pod, policy, service


def _world(*extra: dict[str, Any], drop: tuple[str, ...] = ()) -> catalog.World:
    return catalog.World(catalog.parse_all(manifests())).with_applied(catalog.parse_all(list(extra))).without(drop)


def _lines(problems: tuple[catalog.Problem, ...]) -> list[str]:
    return [str(p) for p in problems]


def test_the_topology_passes_the_check() -> None:
    assert catalog.check(_world()) == ()


def test_a_world_is_frozen_and_keyed_by_kind_namespace_and_name() -> None:
    world = _world()
    with pytest.raises(dataclasses.FrozenInstanceError):
        world._items = {}  # type: ignore[misc]
    assert "TrafficSplit/shop/api-canary" in world and "MeshConfig//mesh" in world
    assert [r.key for r in world] == sorted(r.key for r in world)
    assert len(world.of(catalog.Pod)) == 10


def test_an_apply_replaces_a_resource_of_the_same_key_and_a_delete_ignores_unknown_keys() -> None:
    world = _world()
    moved = catalog.parse(policy("split.smi-spec.io/v1alpha3", "TrafficSplit", "shop", "api-canary",
                                 {"service": "api", "backends": [{"service": "api-v2", "weight": 1}]}))
    after = world.with_applied([moved])
    assert len(after) == len(world) and after.get(moved.key) == moved and world.get(moved.key) != moved
    assert after.without(["TrafficSplit/shop/nothing"]) == after
    assert moved.key not in after.without([moved.key])


def test_the_order_resources_come_in_does_not_change_the_world() -> None:
    resources = catalog.parse_all(manifests())
    assert catalog.World(resources) == catalog.World(reversed(resources))


def test_a_world_without_a_mesh_config_has_the_defaults() -> None:
    world = _world(drop=("MeshConfig//mesh",))
    assert world.mesh_config == catalog.MeshConfig()
    assert (world.mesh_config.mtls_mode, world.mesh_config.access_control_mode) == ("permissive", "allow")


# -------------------------------------------------------------------------------------- rejected references ---
REJECTED = {
    "a TrafficTarget pointing at a missing HTTPRouteGroup": (
        {"drop": ("HTTPRouteGroup/shop/api-routes",)},
        ["TrafficTarget shop/payments-to-api: spec.rules[0].name: HTTPRouteGroup shop/api-routes does not exist",
         "TrafficTarget shop/web-to-api: spec.rules[0].name: HTTPRouteGroup shop/api-routes does not exist",
         "RateLimit shop/api-writes: spec.rules[0].name: HTTPRouteGroup shop/api-routes does not exist"]),
    "a TrafficTarget naming a match its route group does not have": (
        {"extra": [policy("access.smi-spec.io/v1alpha2", "TrafficTarget", "shop", "web-to-db", {
            "destination": {"kind": "ServiceAccount", "name": "db"},
            "sources": [{"kind": "ServiceAccount", "name": "web"}],
            "rules": [{"kind": "HTTPRouteGroup", "name": "api-routes", "matches": ["read", "delete"]}]})]},
        ["TrafficTarget shop/web-to-db: spec.rules[0].matches[1]: HTTPRouteGroup shop/api-routes has no match named "
         "'delete' (it has: read, write)"]),
    "a TrafficTarget pointing at a missing TCPRoute": (
        {"drop": ("TCPRoute/shop/db-port",)},
        ["TrafficTarget shop/api-to-db: spec.rules[0].name: TCPRoute shop/db-port does not exist"]),
    "a TrafficSplit matching a missing HTTPRouteGroup": (
        {"drop": ("HTTPRouteGroup/shop/canary-users",)},
        ["TrafficSplit shop/api-canary: spec.matches[0].name: HTTPRouteGroup shop/canary-users does not exist"]),
    "two TrafficSplits of one root Service": (
        {"extra": [policy("split.smi-spec.io/v1alpha3", "TrafficSplit", "shop", "api-blue-green",
                          {"service": "api", "backends": [{"service": "api-v2", "weight": 1}]})]},
        ["TrafficSplit shop/api-blue-green: spec.service: root Service shop/api is also split by "
         "TrafficSplit shop/api-canary: one split per Service",
         "TrafficSplit shop/api-canary: spec.service: root Service shop/api is also split by "
         "TrafficSplit shop/api-blue-green: one split per Service"]),
    "two CircuitBreakers of one Service": (
        {"extra": [policy("specs.smi.nginx.com/v1alpha1", "CircuitBreaker", "shop", "web-breaker-2",
                          {"destination": {"kind": "Service", "name": "web"}, "errors": 1, "timeoutSeconds": 5})]},
        ["CircuitBreaker shop/web-breaker: spec.destination: Service shop/web also has CircuitBreaker "
         "shop/web-breaker-2: one circuit breaker per Service",
         "CircuitBreaker shop/web-breaker-2: spec.destination: Service shop/web also has CircuitBreaker "
         "shop/web-breaker: one circuit breaker per Service"]),
    "two default RateLimits of one destination": (
        {"extra": [policy("specs.smi.nginx.com/v1alpha2", "RateLimit", "shop", "api-default-2", {
            "destination": {"kind": "Service", "name": "api"}, "name": "1rs", "rate": "1r/s"})]},
        ["RateLimit shop/api-default: spec.sources: RateLimit shop/api-default-2 limits every source to "
         "Service/shop/api too: one rate limit per source and destination",
         "RateLimit shop/api-default-2: spec.sources: RateLimit shop/api-default limits every source to "
         "Service/shop/api too: one rate limit per source and destination"]),
}


@pytest.mark.parametrize("change, expected", REJECTED.values(), ids=REJECTED.keys())
def test_a_dangling_or_conflicting_policy_reference_rejects_the_world(change: dict[str, Any],
                                                                       expected: list[str]) -> None:
    world = _world(*change.get("extra", ()), drop=change.get("drop", ()))
    assert sorted(_lines(catalog.check(world))) == sorted(expected)


def test_deleting_a_route_group_that_a_policy_uses_is_a_new_problem_and_is_rejected() -> None:
    before = _world()
    after = before.without(["HTTPRouteGroup/shop/canary-users"])
    assert set(catalog.check(after)) - set(catalog.check(before)) == {catalog.Problem(
        "TrafficSplit shop/api-canary", "spec.matches[0].name", "HTTPRouteGroup shop/canary-users does not exist")}


def test_a_default_rate_limit_beside_one_for_named_sources_is_allowed() -> None:
    # api-default (no sources) and api-writes (sources: web) share the destination: that is how NSM layers them.
    assert catalog.check(_world()) == ()


# ------------------------------------------------------------------------------------- tolerated references ---
TOLERATED = {
    "a split to a backend Service not created yet": (
        {"extra": [policy("split.smi-spec.io/v1alpha3", "TrafficSplit", "pay", "payments-rollout", {
            "service": "payments", "backends": [{"service": "payments", "weight": 100},
                                                {"service": "payments-v2", "weight": 0}]})]},
        "TrafficSplit pay/payments-rollout: spec.backends[1].service: Service pay/payments-v2 does not exist yet"),
    "a rate limit on a Service not created yet": (
        {"extra": [policy("specs.smi.nginx.com/v1alpha2", "RateLimit", "pay", "limit", {
            "destination": {"kind": "Service", "name": "refunds"}, "name": "1rs", "rate": "1r/s"})]},
        "RateLimit pay/limit: spec.destination: Service pay/refunds does not exist yet"),
    "a circuit breaker whose fallback is not created yet": (
        {"drop": ("Service/shop/fallback",)},
        "CircuitBreaker shop/web-breaker: spec.fallback.service: Service shop/fallback does not exist yet"),
    "an access rule for an account no pod runs as yet": (
        {"drop": ("Pod/shop/db-0",)},
        "TrafficTarget shop/api-to-db: spec.destination: no pod runs as ServiceAccount shop/db yet"),
    "endpoints whose Service is gone": (
        {"drop": ("Service/shop/db",)},
        "Endpoints shop/db: Service shop/db does not exist: these endpoints are not used"),
}


@pytest.mark.parametrize("change, expected", TOLERATED.values(), ids=TOLERATED.keys())
def test_a_reference_to_a_workload_that_does_not_exist_yet_is_tolerated_with_a_warning(change: dict[str, Any],
                                                                                        expected: str) -> None:
    world = _world(*change.get("extra", ()), drop=change.get("drop", ()))
    assert catalog.check(world) == ()
    assert any(line.startswith(expected) for line in _lines(catalog.warnings(world))), catalog.warnings(world)


def test_a_split_backend_without_the_root_port_is_worth_a_warning() -> None:
    assert _lines(catalog.warnings(_world())) == [
        "TrafficSplit shop/api-canary: spec.backends[1].service: Service shop/api-v2 has no port 9090 of the root "
        "Service: it gets no traffic on those ports"]


# -------------------------------------------------------------------------------------------- meshed or not ---
MESHED = [
    # (pod annotations, pod labels, namespace labels) -> meshed
    ({"meshloom.io/injected": "true"}, {}, {}, True),
    ({"meshloom.io/injected": "true"}, {"injector.nsm.nginx.com/auto-inject": "disabled"}, {}, True),
    ({}, {"injector.nsm.nginx.com/auto-inject": "enabled"}, {}, True),
    ({}, {"injector.nsm.nginx.com/auto-inject": "disabled"}, {"injector.nsm.nginx.com/auto-inject": "enabled"}, False),
    ({}, {}, {"injector.nsm.nginx.com/auto-inject": "enabled"}, True),
    ({}, {}, {"injector.nsm.nginx.com/auto-inject": "disabled"}, False),
    ({}, {}, {}, False),
]


@pytest.mark.parametrize("annotations, labels, ns_labels, meshed", MESHED)
def test_a_pod_is_meshed_when_injected_or_opted_in_and_the_pod_label_wins(annotations: dict[str, str],
                                                                          labels: dict[str, str],
                                                                          ns_labels: dict[str, str],
                                                                          meshed: bool) -> None:
    p = catalog.parse(pod("shop", "web-1", {"app": "web", **labels}, "web", None, [], annotations or None))
    ns = catalog.parse({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": ns_labels}})
    assert isinstance(p, catalog.Pod) and isinstance(ns, catalog.Namespace)
    assert catalog.is_meshed(p, ns) is meshed


def test_a_pod_in_a_namespace_the_world_does_not_know_is_meshed_only_by_its_own_say() -> None:
    p = catalog.parse(pod("nowhere", "a", {"app": "a"}, "a", None, []))
    assert isinstance(p, catalog.Pod) and catalog.is_meshed(p, None) is False
    assert catalog.parse(service("nowhere", "a", {"app": "a"}, [{"port": 80}])).namespace == "nowhere"


def test_service_routes_lead_each_virtual_port_to_every_endpoint_and_skip_what_has_none() -> None:
    w = catalog.World(catalog.parse_all([
        topology.pod("shop", "web-0", {"app": "web"}, "web", "10.0.0.2", [{"name": "http", "containerPort": 8080}]),
        topology.pod("shop", "web-1", {"app": "web"}, "web", "10.0.0.1", [{"name": "http", "containerPort": 8080}]),
        topology.pod("shop", "dns-0", {"app": "dns"}, "dns", "10.0.0.3", [{"containerPort": 53, "protocol": "UDP"}]),
        topology.service("shop", "web", {"app": "web"}, [{"name": "http", "port": 80, "targetPort": "http"}],
                         "10.0.1.1"),
        topology.service("shop", "dns", {"app": "dns"}, [{"port": 53, "protocol": "UDP"}], "10.0.1.2"),
        topology.service("shop", "headless", {"app": "web"}, [{"port": 80}], "None"),
        topology.service("shop", "nobody", {"app": "nobody"}, [{"port": 80}], "10.0.1.3"),
    ]))

    assert service_routes(w) == (
        ServiceRoute("10.0.1.2", 53, "udp", (("10.0.0.3", 53),)),
        ServiceRoute("10.0.1.1", 80, "tcp", (("10.0.0.1", 8080), ("10.0.0.2", 8080))),
    )
