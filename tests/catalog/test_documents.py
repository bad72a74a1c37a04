"""Per-sidecar documents and outbound shards: golden copies, determinism, and which documents a change touches.

The golden files are the rendered topology, one per document, pretty-printed for review; MESHLOOM_UPDATE_GOLDEN=1
rewrites them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

import catalog
from tests.catalog.topology import manifests, pod, policy

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("MESHLOOM_UPDATE_GOLDEN") == "1"
TD = "example.org"
MESHED = {"pay/payments-1", "shop/api-v1-1", "shop/api-v2-1", "shop/db-0", "shop/fallback-1", "shop/web-1",
          "shop/web-2", "shop/web-3"}


def _world(*extra: dict[str, Any], drop: tuple[str, ...] = ()) -> catalog.World:
    return catalog.World(catalog.parse_all(manifests())).with_applied(catalog.parse_all(list(extra))).without(drop)


def _golden_name(key: str) -> str:
    return key.replace("/", ".") + ".json"


def _rendered() -> dict[str, bytes]:
    out = catalog.render(_world(), TD)
    return {**out.sidecars, **out.shared}


def _docs(world: catalog.World) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in catalog.compute(world, TD).items()}


# --------------------------------------------------------------------------------------------------- golden ---
@pytest.mark.parametrize("key", sorted(_rendered()))
def test_the_committed_golden_document_is_what_the_topology_renders_to(key: str) -> None:
    path = GOLDEN / _golden_name(key)
    want = json.dumps(json.loads(_rendered()[key]), indent=2, sort_keys=True) + "\n"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != want:
            path.write_text(want, encoding="utf-8")
    assert path.exists(), f"{path} is missing: run MESHLOOM_UPDATE_GOLDEN=1 pytest tests/catalog"
    assert path.read_text(encoding="utf-8") == want, (
        f"{path} is stale: run MESHLOOM_UPDATE_GOLDEN=1 pytest tests/catalog and review the difference")


def test_no_golden_document_is_committed_for_a_sidecar_or_shard_that_does_not_exist() -> None:
    assert {p.name for p in GOLDEN.glob("*.json")} <= {_golden_name(k) for k in _rendered()}


def test_every_meshed_pod_gets_a_document_and_no_other_pod_does() -> None:
    rendered = catalog.render(_world(), TD)
    assert set(rendered.sidecars) == MESHED  # not shop/debug (opted out), not legacy/old-1 (not injected)
    assert set(rendered.shared) == {"outbound/shop", "outbound/pay", "outbound/legacy"}


# --------------------------------------------------------------------------------------------- determinism ---
def test_the_same_world_in_any_order_renders_to_the_same_bytes() -> None:
    want = catalog.render(_world(), TD)
    docs = manifests()
    rng = random.Random(20260101)
    for _ in range(25):
        rng.shuffle(docs)
        got = catalog.render(catalog.World(catalog.parse_all(docs)), TD)
        assert got == want


def test_documents_are_canonical_json_with_no_generation_and_nothing_time_dependent() -> None:
    rendered = catalog.render(_world(), TD)
    for key, data in {**rendered.sidecars, **rendered.shared}.items():
        parsed = json.loads(data)
        assert catalog.canonical(parsed) == data, key
        assert b" " not in data and b"\n" not in data
        assert not {"generation", "time", "now", "timestamp"} & set(parsed)


def test_the_fast_rendering_is_the_typed_document_serialized() -> None:
    world = _world()
    typed = catalog.documents(world, TD)
    fast = catalog.compute(world, TD)
    assert set(typed) == set(fast)
    for key, document in typed.items():
        assert catalog.canonical(document.to_json()) == fast[key], key
    assert {catalog.SHARD_PREFIX + k: catalog.canonical(s.to_json()) for k, s in
            ((s.namespace, s) for s in catalog.shards(world, TD).values())} == catalog.render(world, TD).shared


def test_a_document_refers_to_every_shard_by_its_digest() -> None:
    rendered = catalog.render(_world(), TD)
    for data in rendered.sidecars.values():
        shards = json.loads(data)["outbound"]["shards"]
        assert {catalog.SHARD_PREFIX + ns for ns in shards} == set(rendered.shared)
        for ns, digest in shards.items():
            assert digest == "sha256:" + hashlib.sha256(rendered.shared[catalog.SHARD_PREFIX + ns]).hexdigest()


def test_a_trust_domain_that_spiffe_does_not_allow_is_refused() -> None:
    with pytest.raises(ValueError, match="trust domain"):
        catalog.compute(_world(), "Example.ORG/x")


# ----------------------------------------------------------------------------------------------- changes ---
def _changed(before: catalog.World, after: catalog.World) -> tuple[set[str], set[str]]:
    a, b = catalog.render(before, TD), catalog.render(after, TD)
    return catalog.changed(a.sidecars, b.sidecars), catalog.changed(a.shared, b.shared)


def test_changing_one_traffic_split_changes_its_shard_and_the_sidecars_that_call_through_it() -> None:
    # Every sidecar may call every Service (access is enforced inbound), so every meshed sidecar uses the split:
    # each one's document changes through the digest of the one shard that changed, and nothing else does.
    before = _world()
    after = before.with_applied([catalog.parse(policy(
        "split.smi-spec.io/v1alpha3", "TrafficSplit", "shop", "api-canary",
        {"service": "api", "backends": [{"service": "api-v1", "weight": 50}, {"service": "api-v2", "weight": 50}],
         "matches": [{"kind": "HTTPRouteGroup", "name": "canary-users"}]}))])
    sidecars, shards = _changed(before, after)
    assert sidecars == MESHED
    assert shards == {"outbound/shop"}
    old, new = _docs(before), _docs(after)
    for key in MESHED:
        assert {k: v for k, v in old[key].items() if k != "outbound"} == \
            {k: v for k, v in new[key].items() if k != "outbound"}, "only the shard digest moved"
        assert old[key]["outbound"]["shards"]["pay"] == new[key]["outbound"]["shards"]["pay"]


def test_changing_an_access_rule_changes_only_the_documents_of_its_destination_pods() -> None:
    before = _world()
    after = before.with_applied([catalog.parse(policy(
        "access.smi-spec.io/v1alpha2", "TrafficTarget", "shop", "web-to-api", {
            "destination": {"kind": "ServiceAccount", "name": "api"},
            "sources": [{"kind": "ServiceAccount", "name": "web"}],
            "rules": [{"kind": "HTTPRouteGroup", "name": "api-routes"}]}))])
    assert _changed(before, after) == ({"shop/api-v1-1", "shop/api-v2-1"}, set())


def test_changing_a_rate_limit_changes_only_the_documents_of_the_pods_it_limits() -> None:
    before = _world()
    after = before.with_applied([catalog.parse(policy(
        "specs.smi.nginx.com/v1alpha2", "RateLimit", "shop", "api-default",
        {"destination": {"kind": "Service", "name": "api"}, "name": "600rm", "rate": "300r/m"}))])
    assert _changed(before, after) == ({"shop/api-v1-1", "shop/api-v2-1"}, set())


def test_a_new_pod_appears_and_a_deleted_one_disappears_from_the_changed_set() -> None:
    before = _world()
    after = _world(pod("pay", "payments-2", {"app": "payments"}, "payments", "10.0.5.2",
                       [{"name": "http", "containerPort": 8080}]), drop=("Pod/shop/web-3",))
    sidecars, shards = _changed(before, after)
    assert {"pay/payments-2", "shop/web-3"} <= sidecars
    assert shards == {"outbound/pay"}  # web-3 had no address: shop's endpoints did not move
    assert "shop/web-3" not in catalog.compute(after, TD)


def test_changed_names_the_keys_that_differ_appear_or_disappear() -> None:
    assert catalog.changed({"a": b"1", "b": b"2", "c": b"3"}, {"a": b"1", "b": b"x", "d": b"4"}) == {"b", "c", "d"}
    assert catalog.changed({}, {}) == set()


# ---------------------------------------------------------------------------------------------- semantics ---
def _port(doc: dict[str, Any], number: int) -> dict[str, Any]:
    return next(p for p in doc["inbound"] if p["port"] == number)


def _service(shards: dict[str, catalog.OutboundShard], ns: str, name: str) -> catalog.OutboundService:
    return next(s for s in shards[catalog.SHARD_PREFIX + ns].services if s.name == name)


def test_in_deny_mode_a_port_lists_the_identities_allowed_and_the_routes_each_may_use() -> None:
    api = _docs(_world())["shop/api-v1-1"]
    assert api["spiffeId"] == "spiffe://example.org/ns/shop/sa/api"
    http = _port(api, 8000)
    assert (http["protocol"], http["allowAll"], http["services"]) == ("http", False, ["shop/api", "shop/api-v1"])
    allowed = {g["spiffeId"]: [m["name"] for m in g["routes"]] for g in http["sources"]}
    assert allowed == {"spiffe://example.org/ns/shop/sa/web": ["read"],  # web-to-api: read only
                       "spiffe://example.org/ns/pay/sa/payments": ["read", "write"]}  # every route, port 8000 only
    grpc = _port(api, 9090)
    assert [g["spiffeId"] for g in grpc["sources"]] == ["spiffe://example.org/ns/shop/sa/web"]
    db = _port(_docs(_world())["shop/db-0"], 5432)
    assert (db["protocol"], db["sources"]) == ("tcp", [{"spiffeId": "spiffe://example.org/ns/shop/sa/api",
                                                        "routes": None}])


def test_in_allow_mode_every_source_may_reach_every_port() -> None:
    world = _world({"apiVersion": "meshloom.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
                    "spec": {"accessControlMode": "allow"}})
    for doc in _docs(world).values():
        assert all(p["allowAll"] and p["sources"] == [] for p in doc["inbound"])


def test_a_missing_route_group_in_a_world_kubernetes_let_through_grants_nothing() -> None:
    # check() rejects this world; a Kubernetes API server does not, and the documents must then fail closed.
    world = _world(drop=("HTTPRouteGroup/shop/api-routes",))
    http = _port(_docs(world)["shop/api-v1-1"], 8000)
    assert http["sources"] == []
    writes = next(rl for rl in http["rateLimits"] if rl["policy"] == "shop/api-writes")
    assert writes["routes"] == []  # limits no request rather than every request


def test_rate_limits_land_on_the_http_ports_of_the_destination_pods_with_their_sources_resolved() -> None:
    http = _port(_docs(_world())["shop/api-v2-1"], 8001)
    limits = {rl["policy"]: rl for rl in http["rateLimits"]}
    assert limits["shop/api-default"] | {"routes": None} == {
        "policy": "shop/api-default", "name": "600rm", "rate": "600r/m", "burst": 0, "delay": 0, "sources": None,
        "routes": None}
    writes = limits["shop/api-writes"]
    assert (writes["sources"], writes["delay"], writes["burst"]) == (["spiffe://example.org/ns/shop/sa/web"],
                                                                     "nodelay", 5)
    assert [m["name"] for m in writes["routes"]] == ["write"]
    assert _port(_docs(_world())["shop/web-1"], 8080)["rateLimits"] == []


def test_endpoints_come_from_endpoints_when_written_else_from_the_selector_over_pods_with_an_address() -> None:
    shards = catalog.shards(_world(), TD)
    db = _service(shards, "shop", "db")
    assert [(e.ip, e.port, e.spiffe_id) for e in db.ports[0].endpoints] == [
        ("10.0.3.1", 5432, "spiffe://example.org/ns/shop/sa/db")]  # the not-ready address is left out
    web = _service(shards, "shop", "web")
    assert [(e.ip, e.port) for e in web.ports[0].endpoints] == [("10.0.1.1", 8080), ("10.0.1.2", 8080)]  # not web-3
    api = _service(shards, "shop", "api")
    assert [(e.ip, e.port) for e in api.ports[0].endpoints] == [("10.0.2.1", 8000), ("10.0.2.2", 8001)]  # named
    old = _service(shards, "legacy", "old")
    assert [(e.ip, e.spiffe_id) for e in old.ports[0].endpoints] == [("10.0.6.1", None)]  # no sidecar: plain
    assert old.ports[0].protocol == "http"  # unnamed, port 80


def test_a_split_carries_each_backend_endpoints_on_the_root_ports_it_shares() -> None:
    api = _service(catalog.shards(_world(), TD), "shop", "api")
    assert api.split is not None and api.split.policy == "shop/api-canary"
    assert [m.name for m in api.split.matches or ()] == ["canary"]
    v1, v2 = api.split.backends
    assert (v1.service, v1.weight, [p.port for p in v1.ports]) == ("api-v1", 90, [8080, 9090])
    assert (v2.service, v2.weight, [p.port for p in v2.ports]) == ("api-v2", 10, [8080])  # no 9090 on api-v2
    assert [(e.ip, e.port) for e in v2.ports[0].endpoints] == [("10.0.2.2", 8001)]


def test_a_circuit_breaker_carries_its_fallback_address_and_endpoints() -> None:
    web = _service(catalog.shards(_world(), TD), "shop", "web")
    cb = web.circuit_breaker
    assert cb is not None and (cb.policy, cb.errors, cb.timeout_seconds) == ("shop/web-breaker", 3, 30)
    assert cb.fallback is not None
    assert (cb.fallback.service, cb.fallback.port, cb.fallback.address) == ("shop/fallback", 80, "10.96.0.15")
    assert [(e.ip, e.port) for e in cb.fallback.endpoints] == [("10.0.4.1", 8080)]


def test_mesh_settings_reach_every_document_and_a_pod_annotation_overrides_them() -> None:
    docs = _docs(_world())
    web, db = docs["shop/web-1"], docs["shop/db-0"]
    assert (web["mtlsMode"], web["accessControlMode"], web["loadBalancingMethod"], web["enableUDP"]) == \
        ("strict", "deny", "least_conn", False)
    assert db["mtlsMode"] == "permissive"  # config.nsm.nginx.com/mtls-mode on the pod
    assert docs["shop/fallback-1"]["spiffeId"] == "spiffe://example.org/ns/shop/sa/default"


def test_a_pod_without_an_address_still_gets_its_inbound_configuration() -> None:
    docs = _docs(_world())
    assert docs["shop/web-3"]["inbound"] == docs["shop/web-1"]["inbound"]


def test_any_part_of_the_world_renders_the_same_in_any_order_and_as_its_typed_documents() -> None:
    # Worlds with pieces missing (a route group, a backend, the Endpoints...) are what a Kubernetes watch can show.
    resources = catalog.parse_all(manifests())
    rng = random.Random(11)
    for _ in range(60):
        part = [r for r in resources if rng.random() < 0.6]
        shuffled = rng.sample(part, len(part))
        rendered = catalog.render(catalog.World(part), TD)
        assert catalog.render(catalog.World(shuffled), TD) == rendered
        typed = catalog.documents(catalog.World(shuffled), TD)
        assert {k: catalog.canonical(d.to_json()) for k, d in typed.items()} == rendered.sidecars
