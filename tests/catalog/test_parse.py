"""Parsing: every manifest becomes a typed resource or a list of problems that each name the resource and field."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest

import catalog
from catalog import Protocol, Transport
from tests.catalog.topology import manifests, policy, service


def _problems(doc: Any) -> list[str]:
    with pytest.raises(catalog.ValidationError) as caught:
        catalog.parse(doc)
    assert caught.value.problems, "a ValidationError always says why"
    return [str(p) for p in caught.value.problems]


def _split(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"service": "web", "backends": [{"service": "web-v1", "weight": 90},
                                                           {"service": "web-v2", "weight": 10}]}
    return policy("split.smi-spec.io/v1alpha3", "TrafficSplit", "default", "web-split", base | spec)


def _rate_limit(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"destination": {"kind": "Service", "name": "api", "namespace": "shop"}, "name": "10rs",
                            "rate": "10r/s"}
    return policy("specs.smi.nginx.com/v1alpha2", "RateLimit", "shop", "api-limit", base | spec)


def _pod(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "shop", "name": "web-1"},
                           "spec": {"containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]}}
    for path, value in extra.items():
        section, key = path.split("__")
        doc.setdefault(section, {})[key] = value
    return doc


def _target(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "destination": {"kind": "ServiceAccount", "name": "api", "namespace": "shop"},
        "sources": [{"kind": "ServiceAccount", "name": "web", "namespace": "shop"}],
        "rules": [{"kind": "HTTPRouteGroup", "name": "api-routes", "matches": ["read"]}]}
    return policy("access.smi-spec.io/v1alpha2", "TrafficTarget", "shop", "web-to-api", base | spec)


# (bad manifest, the exact problem line or a part of it that names resource, field and reason)
BAD = {
    "an unknown kind": (
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"}},
        "Deployment shop/web: kind: unknown kind 'Deployment'"),
    "a version the catalog does not read": (
        _split() | {"apiVersion": "split.smi-spec.io/v1alpha4"},
        "TrafficSplit default/web-split: apiVersion: TrafficSplit is read as 'split.smi-spec.io/v1alpha3', "
        "got 'split.smi-spec.io/v1alpha4'"),
    "no apiVersion at all": (
        {"kind": "Service", "metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}},
        "Service default/web: apiVersion: Service is read as 'v1', got none"),
    "no kind": ({"apiVersion": "v1", "metadata": {"name": "web"}}, "document: kind: is required"),
    "a list instead of a manifest": ([{"kind": "Service"}], "document: must be a mapping"),
    "a missing required field": (
        _split(service=None), "TrafficSplit default/web-split: spec.service: is required"),
    "a missing name": (
        {**_split(), "metadata": {"namespace": "default"}},
        "TrafficSplit default/<no name>: metadata.name: is required"),
    "a weight below zero": (
        _split(backends=[{"service": "web-v1", "weight": 90}, {"service": "web-v2", "weight": -5}]),
        "TrafficSplit default/web-split: spec.backends[1].weight: must be a whole number >= 0, got -5"),
    "a weight in words": (
        _split(backends=[{"service": "web-v1", "weight": "ten"}]),
        "TrafficSplit default/web-split: spec.backends[0].weight: must be a whole number >= 0, got 'ten'"),
    "weights that add up to nothing": (
        _split(backends=[{"service": "web-v1", "weight": 0}]),
        "TrafficSplit default/web-split: spec.backends: the weights add up to 0"),
    "a misspelt field": (
        _split(backends=[{"service": "web-v1", "weigth": 1}]),
        "TrafficSplit default/web-split: spec.backends[0].weigth: unknown field"),
    "a misspelt top-level field": (
        {**_split(), "sepc": {}}, "TrafficSplit default/web-split: sepc: unknown field"),
    "a backend in another namespace": (
        _split(backends=[{"service": "web-v1.other", "weight": 1}]),
        "TrafficSplit default/web-split: spec.backends[0].service: must be a Service of namespace 'default'"),
    "a rate like `ten per second`": (
        _rate_limit(rate="ten per second"),
        "RateLimit shop/api-limit: spec.rate: must be requests per second or minute, such as 10r/s or 600r/m, "
        "got 'ten per second'"),
    "a rate per hour": (_rate_limit(rate="10r/h"), "RateLimit shop/api-limit: spec.rate: must be requests per"),
    "a delay that is neither a number nor nodelay": (
        _rate_limit(delay="later"), "RateLimit shop/api-limit: spec.delay: must be a whole number >= 0 or \"nodelay\""),
    "a rate limit on a Deployment": (
        _rate_limit(destination={"kind": "Deployment", "name": "api", "namespace": "shop"}),
        "RateLimit shop/api-limit: spec.destination.kind: Deployment is not supported yet"),
    "an unknown mtlsMode": (
        {"apiVersion": "meshloom.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
         "spec": {"mtlsMode": "paranoid"}},
        "MeshConfig mesh: spec.mtlsMode: must be one of off, permissive, strict, got 'paranoid'"),
    "a MeshConfig with another name": (
        {"apiVersion": "meshloom.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "prod"}},
        "MeshConfig prod: metadata.name: the mesh has one MeshConfig and it is named 'mesh'"),
    "a body size NGINX would not read": (
        {"apiVersion": "meshloom.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
         "spec": {"clientMaxBodySize": "1 megabyte"}},
        "MeshConfig mesh: spec.clientMaxBodySize: must be a size such as 1m"),
    "duplicate port numbers": (
        service("shop", "web", {"app": "web"}, [{"name": "http", "port": 80}, {"name": "http-alt", "port": 80}]),
        "Service shop/web: spec.ports[1]: duplicate port number 80/TCP"),
    "duplicate container port numbers": (
        _pod(spec__containers=[{"name": "a", "ports": [{"containerPort": 80}]},
                               {"name": "b", "ports": [{"containerPort": 80}]}]),
        "Pod shop/web-1: spec.containers[1].ports[0]: duplicate port number 80/TCP"),
    "unnamed ports on a Service with two": (
        service("shop", "web", {"app": "web"}, [{"port": 80}, {"name": "grpc", "port": 9090}]),
        "Service shop/web: spec.ports[0].name: is required"),
    "a port out of range": (
        service("shop", "web", {"app": "web"}, [{"port": 70000}]),
        "Service shop/web: spec.ports[0].port: must be a whole number from 1 to 65535, got 70000"),
    "an SCTP port": (
        service("shop", "web", {"app": "web"}, [{"port": 80, "protocol": "SCTP"}]),
        "Service shop/web: spec.ports[0].protocol: SCTP is not supported by the mesh"),
    "an http port over UDP": (
        service("shop", "web", {"app": "web"}, [{"name": "http", "port": 80, "protocol": "UDP"}]),
        "Service shop/web: spec.ports[0].protocol: the port is named 'http' (http, over TCP) but its protocol is UDP"),
    "a Service name that is not DNS-1123": (
        service("shop", "Web_Front", {"app": "web"}, [{"port": 80}]),
        "Service shop/Web_Front: metadata.name: must be a DNS-1123 label"),
    "a namespace that is not DNS-1123": (
        service("Shop", "web", {"app": "web"}, [{"port": 80}]),
        "Service Shop/web: metadata.namespace: must be a DNS-1123 label"),
    "a cluster IP that is not an address": (
        service("shop", "web", {"app": "web"}, [{"port": 80}], cluster_ip="10.96.0.300"),
        "Service shop/web: spec.clusterIP: must be an IPv4 or IPv6 address, got '10.96.0.300'"),
    "a pod address that is not an address": (
        _pod(status__podIP="here"), "Pod shop/web-1: status.podIP: must be an IPv4 or IPv6 address, got 'here'"),
    "a pod annotation with an unknown mTLS mode": (
        {**_pod(), "metadata": {"namespace": "shop", "name": "web-1",
                                "annotations": {"config.nsm.nginx.com/mtls-mode": "maybe"}}},
        'Pod shop/web-1: metadata.annotations["config.nsm.nginx.com/mtls-mode"]: must be one of off, permissive'),
    "a label value that is not a string": (
        {**_pod(), "metadata": {"namespace": "shop", "name": "web-1", "labels": {"version": 2}}},
        "Pod shop/web-1: metadata.labels.version: must be a string, got 2 (quote it in YAML)"),
    "an endpoint address that is not an address": (
        {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"namespace": "shop", "name": "db"},
         "subsets": [{"addresses": [{"ip": "db-0"}], "ports": [{"port": 5432}]}]},
        "Endpoints shop/db: subsets[0].addresses[0].ip: must be an IPv4 or IPv6 address"),
    "a TrafficTarget for another namespace's account": (
        _target(destination={"kind": "ServiceAccount", "name": "api", "namespace": "pay"}),
        "TrafficTarget shop/web-to-api: spec.destination.namespace: must be the TrafficTarget's own namespace"),
    "a TrafficTarget source that is not a ServiceAccount": (
        _target(sources=[{"kind": "User", "name": "alice"}]),
        "TrafficTarget shop/web-to-api: spec.sources[0].kind: must be ServiceAccount, got 'User'"),
    "a TrafficTarget without rules": (
        _target(rules=[]), "TrafficTarget shop/web-to-api: spec.rules: must list at least one item"),
    "matches on a TCPRoute rule": (
        _target(rules=[{"kind": "TCPRoute", "name": "db", "matches": ["x"]}]),
        "TrafficTarget shop/web-to-api: spec.rules[0].matches: a TCPRoute rule covers the whole route"),
    "a path that is not a regular expression": (
        policy("specs.smi-spec.io/v1alpha3", "HTTPRouteGroup", "shop", "routes",
               {"matches": [{"name": "bad", "pathRegex": "/api/("}]}),
        "HTTPRouteGroup shop/routes: spec.matches[0].pathRegex: must be a valid regular expression"),
    "an HTTP method that does not exist": (
        policy("specs.smi-spec.io/v1alpha3", "HTTPRouteGroup", "shop", "routes",
               {"matches": [{"name": "fetch", "methods": ["FETCH"]}]}),
        "HTTPRouteGroup shop/routes: spec.matches[0].methods[0]: must be an HTTP method"),
    "two matches with one name": (
        policy("specs.smi-spec.io/v1alpha3", "HTTPRouteGroup", "shop", "routes",
               {"matches": [{"name": "read", "methods": ["GET"]}, {"name": "read", "methods": ["HEAD"]}]}),
        "HTTPRouteGroup shop/routes: spec.matches[1].name: match name 'read' is used twice"),
    "a circuit breaker with a zero threshold": (
        policy("specs.smi.nginx.com/v1alpha1", "CircuitBreaker", "shop", "cb",
               {"destination": {"kind": "Service", "name": "web"}, "errors": 0, "timeoutSeconds": 30}),
        "CircuitBreaker shop/cb: spec.errors: must be a whole number >= 1, got 0"),
    "a fallback in another namespace": (
        policy("specs.smi.nginx.com/v1alpha1", "CircuitBreaker", "shop", "cb",
               {"destination": {"kind": "Service", "name": "web"}, "errors": 3, "timeoutSeconds": 30,
                "fallback": {"service": "other/fallback"}}),
        "CircuitBreaker shop/cb: spec.fallback.service: must be in the destination's namespace 'shop'"),
}


@pytest.mark.parametrize("doc, expected", BAD.values(), ids=BAD.keys())
def test_a_bad_manifest_is_rejected_with_a_problem_naming_its_resource_and_field(doc: Any, expected: str) -> None:
    problems = _problems(doc)
    assert any(expected in line for line in problems), problems


def test_a_problem_is_one_line_of_resource_field_and_reason() -> None:
    problem = catalog.Problem("TrafficSplit default/web-split", "spec.backends[1].weight",
                              "must be a whole number >= 0, got -5")
    assert str(problem) == ("TrafficSplit default/web-split: spec.backends[1].weight: "
                            "must be a whole number >= 0, got -5")
    assert str(catalog.Problem("document 3", "", "must be a mapping")) == "document 3: must be a mapping"


def test_one_manifest_reports_all_its_problems_at_once() -> None:
    doc = _split(backends=[{"service": "web-v1", "weight": -1}, {"service": "Web V2", "weight": "x"}], color="red")
    problems = _problems(doc)
    assert len(problems) == 4, problems
    assert {p.split(": ")[1] for p in problems} == {"spec.backends[0].weight", "spec.backends[1].service",
                                                    "spec.backends[1].weight", "spec.color"}


def test_an_apply_reports_the_problems_of_every_manifest_and_accepts_none_of_them() -> None:
    docs = [_split(service=None), _rate_limit(rate="fast"), *manifests()[:3], "not a manifest"]
    with pytest.raises(catalog.ValidationError) as caught:
        catalog.parse_all(docs)
    lines = [str(p) for p in caught.value.problems]
    assert lines[0] == "TrafficSplit default/web-split: spec.service: is required"
    assert lines[1].startswith("RateLimit shop/api-limit: spec.rate: ")
    assert lines[2].startswith("document 6: must be a mapping")
    assert str(caught.value).splitlines() == lines


def test_one_resource_defined_twice_in_one_apply_is_a_problem() -> None:
    with pytest.raises(catalog.ValidationError) as caught:
        catalog.parse_all([_split(), _split()])
    assert [str(p) for p in caught.value.problems] == [
        "TrafficSplit default/web-split: defined twice in one apply (documents 1 and 2)"]


def test_every_kind_round_trips_through_its_normalized_manifest() -> None:
    resources = catalog.parse_all(manifests())
    assert {r.kind for r in resources} == {cls.kind for cls in catalog.KINDS.values()}
    for resource in resources:
        manifest = resource.to_manifest()
        assert json.loads(json.dumps(manifest)) == manifest, "a manifest is plain JSON"
        assert catalog.parse(copy.deepcopy(manifest)) == resource, resource.key
        assert catalog.parse(manifest).to_manifest() == manifest


def test_the_normalized_manifest_fills_in_the_defaults() -> None:
    config = catalog.parse({"apiVersion": "meshloom.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"}})
    assert config.to_manifest()["spec"] == {
        "mtlsMode": "permissive", "accessControlMode": "allow", "loadBalancingMethod": "round_robin",
        "clientMaxBodySize": "1m", "enableUDP": False, "logLevel": "warning", "logFormat": "default"}
    svc = catalog.parse(service("shop", "web", {"app": "web"}, [{"port": 80}]))
    assert svc.to_manifest()["spec"]["ports"] == [{"port": 80, "targetPort": 80, "protocol": "TCP"}]
    limit = catalog.parse(_rate_limit())
    assert (limit.to_manifest()["spec"]["burst"], limit.to_manifest()["spec"]["delay"]) == (0, 0)


def test_a_namespace_left_out_is_default_and_a_cluster_scoped_kind_has_none() -> None:
    svc = catalog.parse({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                         "spec": {"ports": [{"port": 80}]}})
    assert (svc.namespace, svc.key, svc.label) == ("default", "Service/default/web", "Service default/web")
    ns = catalog.parse({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "namespace": "x"}})
    assert (ns.namespace, ns.key, ns.label) == ("", "Namespace//shop", "Namespace shop")


def test_the_dns_names_clients_use_for_a_service_name_the_service() -> None:
    split = catalog.parse(_split(service="web.default.svc.cluster.local",
                                 backends=[{"service": "web-v1.default", "weight": 1}]))
    assert isinstance(split, catalog.TrafficSplit)
    assert (split.service, split.backends[0].service) == ("web", "web-v1")


def test_yaml_numbers_where_kubernetes_takes_strings_are_read_as_kubernetes_does() -> None:
    config = catalog.parse({"apiVersion": "meshloom.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
                            "spec": {"clientMaxBodySize": 0}})
    assert isinstance(config, catalog.MeshConfig) and config.client_max_body_size == "0"
    limit = catalog.parse(_rate_limit(delay="3"))
    assert isinstance(limit, catalog.RateLimit) and limit.delay == 3


PROTOCOLS = [
    # (port name, number, transport) -> protocol, by NGINX Service Mesh's identification rules
    (("http", 8080, Transport.TCP), Protocol.HTTP),
    (("http-web", 8080, Transport.TCP), Protocol.HTTP),
    (("grpc", 9090, Transport.TCP), Protocol.GRPC),
    (("grpc-health", 80, Transport.TCP), Protocol.GRPC),  # the name comes first, then the number
    (("tcp-pg", 80, Transport.TCP), Protocol.TCP),
    (("udp-dns", 53, Transport.UDP), Protocol.UDP),
    (("", 80, Transport.TCP), Protocol.HTTP),  # well-known port
    (("web", 80, Transport.TCP), Protocol.HTTP),  # a name that says nothing, a number that does
    (("", 53, Transport.UDP), Protocol.UDP),
    (("", 80, Transport.UDP), Protocol.UDP),  # a UDP port is never http
    (("", 443, Transport.TCP), Protocol.TCP),  # TLS the application originates passes through
    (("httpx", 8080, Transport.TCP), Protocol.TCP),  # a prefix is cut at the first dash only
    (("mysql", 3306, Transport.TCP), Protocol.TCP),
]


@pytest.mark.parametrize("port, protocol", PROTOCOLS, ids=[f"{n or '-'}:{p}/{t}" for (n, p, t), _ in PROTOCOLS])
def test_a_port_protocol_follows_the_name_then_the_well_known_number_else_tcp(port: tuple[str, int, Transport],
                                                                              protocol: Protocol) -> None:
    assert catalog.port_protocol(*port) is protocol


def test_kinds_are_looked_up_by_their_lower_case_name() -> None:
    assert catalog.KINDS["trafficsplit"] is catalog.TrafficSplit
    assert catalog.KINDS["meshconfig"] is catalog.MeshConfig
    assert set(catalog.KINDS) == {"service", "endpoints", "pod", "namespace", "meshconfig", "trafficsplit",
                                  "traffictarget", "httproutegroup", "tcproute", "ratelimit", "circuitbreaker"}


def test_every_resource_has_a_summary_row_of_strings() -> None:
    for resource in catalog.parse_all(manifests()):
        row = resource.summary()
        assert row["name"] == resource.name
        assert ("namespace" in row) is not resource.cluster_scoped
        assert all(isinstance(v, str) and v for v in row.values()), row
    split = next(r for r in catalog.parse_all(manifests()) if isinstance(r, catalog.TrafficSplit))
    assert split.summary() == {"namespace": "shop", "name": "api-canary", "service": "api",
                               "backends": "api-v1=90,api-v2=10", "matches": "canary-users"}


JUNK: list[Any] = [None, "", "x", "Ten", -1, 0, 70000, 1.5, True, [], [1], {}, {"a": 1}, "10r/s", "nodelay"]


def _paths(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a manifest."""
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*path, i))
    return out


def test_any_value_anywhere_gives_a_resource_or_problems_and_never_a_crash() -> None:
    rng = random.Random(7)
    for doc in manifests():
        paths = _paths(doc)[1:]
        for _ in range(40):
            bad = copy.deepcopy(doc)
            *parents, last = rng.choice(paths)
            target = bad
            for step in parents:
                target = target[step]
            target[last] = copy.deepcopy(rng.choice(JUNK))
            try:
                resource = catalog.parse(bad)
            except catalog.ValidationError as exc:
                assert all(p.resource and p.message for p in exc.problems)
            else:
                assert catalog.parse(resource.to_manifest()) == resource
