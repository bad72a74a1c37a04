"""The chart's CRDs and the catalog agree: one CRD per policy kind the catalog reads, with its group, version and
scope; structural schemas; the world of policies the catalog tests use is accepted; and what the catalog refuses
the schema refuses too, except the few rules a schema cannot express (listed, with why, in tests/charts/crds.py).
The same agreement against the real API server is in test_cluster.py."""

from __future__ import annotations

from typing import Any

import pytest

import catalog
from catalog import KINDS
from tests.catalog.test_parse import BAD
from tests.catalog.topology import manifests
from tests.charts.crds import SCHEMA_CANNOT, SERVER_ONLY, load_crds, schema_errors, schema_nodes

POLICY_KINDS = {cls.kind: cls for cls in KINDS.values() if cls.api_version != "v1"}
POLICIES = [doc for doc in manifests() if doc["kind"] in POLICY_KINDS]
BAD_POLICIES = {name: doc for name, (doc, _) in BAD.items()
                if isinstance(doc, dict) and doc.get("kind") in POLICY_KINDS}


def test_there_is_one_crd_for_every_policy_kind_the_catalog_reads_at_its_version_and_scope() -> None:
    crds = {crd.kind: crd for crd in load_crds()}
    assert set(crds) == set(POLICY_KINDS) == {"TrafficSplit", "TrafficTarget", "HTTPRouteGroup", "TCPRoute",
                                              "RateLimit", "CircuitBreaker", "MeshConfig"}
    for kind, cls in POLICY_KINDS.items():
        crd = crds[kind]
        assert crd.api_version == cls.api_version, kind
        assert crd.namespaced is not cls.cluster_scoped, kind
        assert crd.manifest["metadata"]["name"] == f"{crd.plural}.{crd.group}"
        assert crd.version["served"] and crd.version["storage"]


@pytest.mark.parametrize("crd", load_crds(), ids=lambda crd: crd.kind)
def test_every_crd_schema_is_structural(crd: Any) -> None:
    for path, node in schema_nodes(crd.schema):
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
            continue
        assert node.get("type") in ("object", "array", "string", "integer", "boolean", "number"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node["type"] == "array":
            assert isinstance(node.get("items"), dict), path
    assert "spec" in crd.schema["properties"]


@pytest.mark.parametrize("doc", POLICIES, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_the_catalog_world_of_policies_is_accepted_by_the_crd_schemas(doc: dict[str, Any]) -> None:
    catalog.parse(doc)  # the catalog reads it (its own tests say so; here it anchors the agreement)
    assert schema_errors(doc) == []


# Edge cases the catalog accepts on purpose; the schema must not be stricter.
EDGE_GOOD = {
    "lower-case HTTP methods": ("specs.smi-spec.io/v1alpha3", "HTTPRouteGroup",
                                {"matches": [{"name": "r", "methods": ["get", "*"]}]}),
    "a delay as a string of digits": ("specs.smi.nginx.com/v1alpha2", "RateLimit",
                                      {"destination": {"kind": "Pod", "name": "api-1"}, "name": "a_b.c", "rate":
                                       " 600 r/m ", "delay": "3"}),
    "a body size of 0 as a number": ("meshloom.io/v1alpha1", "MeshConfig", {"clientMaxBodySize": 0}),
    "a TCPRoute with an empty spec": ("specs.smi-spec.io/v1alpha3", "TCPRoute", {}),
    "a split by DNS name": ("split.smi-spec.io/v1alpha3", "TrafficSplit",
                            {"service": "web.shop.svc.cluster.local", "backends": [{"service": "v1.shop", "weight": 0},
                                                                                   {"service": "v2", "weight": 1}]}),
    "a target on one port": ("access.smi-spec.io/v1alpha2", "TrafficTarget",
                             {"destination": {"kind": "ServiceAccount", "name": "api", "port": 8080},
                              "sources": [{"kind": "ServiceAccount", "name": "web", "namespace": "pay"}],
                              "rules": [{"kind": "TCPRoute", "name": "all"}]}),
    "a breaker with a bare fallback name": ("specs.smi.nginx.com/v1alpha1", "CircuitBreaker",
                                            {"destination": {"kind": "Service", "name": "web"}, "errors": 1,
                                             "timeoutSeconds": 1, "fallback": {"service": "fallback"}}),
}


def edge_doc(api: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    meta = {"name": "mesh"} if kind == "MeshConfig" else {"name": "edge", "namespace": "shop"}
    return {"apiVersion": api, "kind": kind, "metadata": meta, "spec": spec}


@pytest.mark.parametrize("api, kind, spec", EDGE_GOOD.values(), ids=EDGE_GOOD.keys())
def test_edge_cases_the_catalog_accepts_are_accepted_by_the_schema_too(api: str, kind: str,
                                                                        spec: dict[str, Any]) -> None:
    doc = edge_doc(api, kind, spec)
    catalog.parse(doc)
    assert schema_errors(doc) == []


def test_every_exception_to_the_agreement_names_a_bad_policy_of_the_catalog_tests() -> None:
    assert set(SCHEMA_CANNOT) | set(SERVER_ONLY) <= set(BAD_POLICIES)
    assert len(BAD_POLICIES) >= 15


@pytest.mark.parametrize("name", sorted(set(BAD_POLICIES) - set(SCHEMA_CANNOT) - set(SERVER_ONLY)))
def test_a_policy_the_catalog_refuses_is_refused_by_the_crd_schema(name: str) -> None:
    doc = BAD_POLICIES[name]
    with pytest.raises(catalog.ValidationError):
        catalog.parse(doc)
    assert schema_errors(doc), f"{name}: the CRD schema accepts what the catalog refuses"


@pytest.mark.parametrize("name", sorted(SCHEMA_CANNOT))
def test_what_a_schema_cannot_express_is_left_to_the_catalog(name: str) -> None:
    """Documents the gap: the schema lets these through, the catalog (and so the controller) refuses them."""
    doc = BAD_POLICIES[name]
    assert schema_errors(doc) == []
    with pytest.raises(catalog.ValidationError):
        catalog.parse(doc)
