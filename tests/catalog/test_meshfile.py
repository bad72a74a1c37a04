"""The mesh file: every rule of `read` located by document and path, address allocation, the rendered world, and the
catalog's judgement of that world placed back in the file."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest

import catalog
from catalog.meshfile import POD_NODE, Located, MeshfileError, MeshSpec, allocate, check, read, render

AUTO_INJECT = "injector.nsm.nginx.com/auto-inject"


def _mesh(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "workloads": [
            {"name": "frontend", "namespace": "demo", "serviceAccount": "frontend", "labels": {"app": "frontend"},
             "command": ["meshctl", "app", "serve", "--http", "8080"], "env": {"GREETING": "hi"},
             "ports": [{"name": "http", "containerPort": 8080}], "replicas": 2},
            {"name": "backend", "namespace": "demo", "labels": {"app": "backend"}, "command": ["backend"],
             "ports": [{"name": "http", "containerPort": 9090}]},
        ],
        "services": [
            {"name": "frontend", "namespace": "demo", "selector": {"app": "frontend"},
             "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
            {"name": "backend", "namespace": "demo", "selector": {"app": "backend"},
             "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        ],
    }
    return {"apiVersion": "meshloom.io/v1alpha1", "kind": "Mesh", "metadata": {"name": "demo"}, "spec": base | spec}


def _split(service: str = "backend", backends: tuple[str, ...] = ("backend",)) -> dict[str, Any]:
    return {"apiVersion": "split.smi-spec.io/v1alpha3", "kind": "TrafficSplit",
            "metadata": {"name": "backend-split", "namespace": "demo"},
            "spec": {"service": service, "backends": [{"service": b, "weight": 1} for b in backends]}}


def _problems(docs: list[Any]) -> list[Located]:
    with pytest.raises(MeshfileError) as caught:
        read(docs)
    assert caught.value.problems, "a MeshfileError always says why"
    assert str(caught.value) == str(caught.value.problems[0])
    return list(caught.value.problems)


def _with(edit: Any) -> list[Located]:
    doc = _mesh()
    edit(doc)
    return _problems([doc])


def _only(found: list[Located]) -> Located:
    assert len(found) == 1, found
    return found[0]


# ------------------------------------------------------------------------------------------------------- read ---
def test_a_good_mesh_file_becomes_one_pod_per_replica_and_its_services() -> None:
    spec = read([_mesh(), _split()])
    assert [p.key for p in spec.pods] == ["demo/frontend-0", "demo/frontend-1", "demo/backend-0"]
    first = spec.pods[0]
    assert (first.workload, first.index, first.service_account, first.meshed) == ("frontend", 0, "frontend", True)
    assert first.command == ("meshctl", "app", "serve", "--http", "8080")
    assert first.env == (("GREETING", "hi"),)
    assert first.ports == (8080,)
    assert first.container_ports == ({"name": "http", "containerPort": 8080, "protocol": "TCP"},)
    assert spec.pods[2].service_account == "default"
    assert [s.key for s in spec.services] == ["demo/frontend", "demo/backend"]
    assert spec.services[1].ports == ({"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},)
    assert spec.policies == (_split(),)
    assert spec.namespaces == ("demo",)
    assert spec.name == "demo"


def test_defaults_put_a_workload_in_the_default_namespace_with_one_meshed_replica() -> None:
    spec = read([_mesh(workloads=[{"name": "solo", "labels": {"app": "solo"}, "command": ["run"]}], services=[])])
    (pod,) = spec.pods
    assert (pod.key, pod.service_account, pod.meshed, pod.ports) == ("default/solo-0", "default", True, ())
    assert spec.namespaces == ("default",)


def test_the_namespaces_include_those_of_policies() -> None:
    split = _split()
    split["metadata"]["namespace"] = "other"
    assert read([_mesh(), split]).namespaces == ("demo", "other")


def test_every_problem_of_a_file_is_reported_at_once_with_its_document() -> None:
    mesh = _mesh()
    mesh["spec"]["workloads"][1]["ports"][0]["containerPort"] = 70000
    mesh["spec"]["services"][0]["selector"] = {"app": "nobody"}
    found = _problems([_split() | {"spec": {"service": "backend"}}, mesh])
    assert [(p.document, p.path) for p in found] == [
        (0, "spec.backends"),
        (1, "spec.workloads[1].ports[0].containerPort"),
        (1, "spec.services[0].selector"),
    ]


def test_a_port_out_of_range_is_located_at_its_field() -> None:
    found = _only(_with(lambda d: d["spec"]["workloads"][1]["ports"][0].update(containerPort=70000)))
    assert found == Located(0, "spec.workloads[1].ports[0].containerPort",
                            "must be a whole number from 1 to 65535, got 70000", "workload demo/backend")


@pytest.mark.parametrize(("field", "value"), [("port", 0), ("targetPort", 65536)])
def test_a_service_port_out_of_range_is_refused(field: str, value: int) -> None:
    found = _only(_with(lambda d: d["spec"]["services"][0]["ports"][0].update({field: value})))
    assert found.path == f"spec.services[0].ports[0].{field}"
    assert found.message == f"must be a whole number from 1 to 65535, got {value}"
    assert found.resource == "service demo/frontend"


@pytest.mark.parametrize(("where", "path"), [
    (lambda d: d, "bogus"),
    (lambda d: d["metadata"], "metadata.bogus"),
    (lambda d: d["spec"], "spec.bogus"),
    (lambda d: d["spec"]["workloads"][0], "spec.workloads[0].bogus"),
    (lambda d: d["spec"]["workloads"][0]["ports"][0], "spec.workloads[0].ports[0].bogus"),
    (lambda d: d["spec"]["services"][1], "spec.services[1].bogus"),
    (lambda d: d["spec"]["services"][1]["ports"][0], "spec.services[1].ports[0].bogus"),
])
def test_an_unknown_field_anywhere_in_the_mesh_document_is_refused(where: Any, path: str) -> None:
    found = _only(_with(lambda d: where(d).update(bogus=1)))
    assert found.path == path
    assert found.message.startswith("unknown field (known here: ")


@pytest.mark.parametrize(("edit", "path", "message"), [
    (lambda d: d["metadata"].pop("name"), "metadata.name", "is required"),
    (lambda d: d.pop("spec"), "spec", "is required"),
    (lambda d: d["spec"].pop("workloads"), "spec.workloads", "is required"),
    (lambda d: d["spec"]["workloads"][0].pop("name"), "spec.workloads[0].name", "is required"),
    (lambda d: d["spec"]["workloads"][0].pop("command"), "spec.workloads[0].command", "is required"),
    (lambda d: d["spec"]["services"][0].pop("selector"), "spec.services[0].selector", "is required"),
    (lambda d: d["spec"]["services"][0].pop("ports"), "spec.services[0].ports", "is required"),
    (lambda d: d["spec"]["services"][0]["ports"][0].pop("port"), "spec.services[0].ports[0].port", "is required"),
])
def test_a_missing_required_field_is_named(edit: Any, path: str, message: str) -> None:
    found = _with(edit)
    assert (found[0].path, found[0].message) == (path, message)


@pytest.mark.parametrize(("edit", "path", "message"), [
    (lambda d: d["spec"]["workloads"][0].update(name="Front_End"), "spec.workloads[0].name",
     "must be a DNS-1123 label"),
    (lambda d: d["spec"]["workloads"][0].update(namespace="Demo"), "spec.workloads[0].namespace",
     "must be a DNS-1123 label"),
    (lambda d: d["spec"]["services"][0].update(name="a.b"), "spec.services[0].name", "must be a DNS-1123 label"),
    (lambda d: d["metadata"].update(name="-x"), "metadata.name", "must be a DNS-1123 label"),
    (lambda d: d["spec"]["workloads"][0].update(labels={"app": 3}), 'spec.workloads[0].labels.app',
     "must be a string, got 3 (quote it in YAML)"),
    (lambda d: d["spec"]["workloads"][0].update(annotations=["a"]), "spec.workloads[0].annotations",
     "must be a mapping, got a list"),
    (lambda d: d["spec"]["workloads"][0].update(replicas=101), "spec.workloads[0].replicas",
     "must be a whole number from 0 to 100, got 101"),
    (lambda d: d["spec"]["workloads"][0].update(replicas="2"), "spec.workloads[0].replicas",
     "must be a whole number from 0 to 100, got '2'"),
    (lambda d: d["spec"]["workloads"][0].update(meshed="yes"), "spec.workloads[0].meshed",
     "must be true or false, got 'yes'"),
    (lambda d: d["spec"]["workloads"][0].update(command=[]), "spec.workloads[0].command",
     "must list at least one item"),
    (lambda d: d["spec"]["workloads"][0].update(command="run"), "spec.workloads[0].command",
     "must be a list, got 'run'"),
    (lambda d: d["spec"]["workloads"][0].update(command=["run", ""]), "spec.workloads[0].command[1]",
     "must not be empty"),
    (lambda d: d["spec"]["workloads"][0].update(command=["run", 3]), "spec.workloads[0].command[1]",
     "must be a string, got 3"),
    (lambda d: d["spec"]["workloads"][0].update(env={"1X": "a"}), 'spec.workloads[0].env["1X"]',
     "must be an environment variable name"),
    (lambda d: d["spec"]["workloads"][0].update(labels={AUTO_INJECT: "disabled", "app": "frontend"}),
     f'spec.workloads[0].labels["{AUTO_INJECT}"]', "set meshed: true or false instead of this label"),
    (lambda d: d["spec"]["services"][0].update(selector={}), "spec.services[0].selector",
     "must name at least one label"),
    (lambda d: d["spec"]["workloads"][0]["ports"][0].update(name="http_x"), "spec.workloads[0].ports[0].name",
     "must be at most 15 lowercase letters"),
    (lambda d: d["spec"]["workloads"][0]["ports"][0].update(protocol="SCTP"),
     "spec.workloads[0].ports[0].protocol", "SCTP is not supported"),
])
def test_a_field_of_the_wrong_shape_is_named_with_why(edit: Any, path: str, message: str) -> None:
    found = _with(edit)
    assert found[0].path == path
    assert found[0].message.startswith(message), found[0].message


def test_the_same_workload_twice_in_a_namespace_is_a_duplicate_pod_name_on_the_later_one() -> None:
    def twice(d: dict[str, Any]) -> None:
        d["spec"]["workloads"].append(copy.deepcopy(d["spec"]["workloads"][0]))
    found = _only(_with(twice))
    assert found == Located(0, "spec.workloads[2].name", "duplicate pod name demo/frontend-0 (also spec.workloads[0])",
                            "workload demo/frontend")


def test_the_same_workload_twice_without_replicas_is_a_duplicate_workload() -> None:
    def twice(d: dict[str, Any]) -> None:
        d["spec"]["workloads"][0]["replicas"] = 0
        d["spec"]["workloads"].append(copy.deepcopy(d["spec"]["workloads"][0]))
    found = _only(_with(twice))
    assert (found.path, found.message) == ("spec.workloads[2].name", "duplicate workload demo/frontend (also "
                                                                     "spec.workloads[0])")


def test_the_same_workload_name_in_two_namespaces_is_fine() -> None:
    mesh = _mesh()
    other = copy.deepcopy(mesh["spec"]["workloads"][1]) | {"namespace": "other"}
    mesh["spec"]["workloads"].append(other)
    assert "other/backend-0" in [p.key for p in read([mesh]).pods]


def test_a_duplicate_service_is_refused_on_the_later_one() -> None:
    found = _only(_with(lambda d: d["spec"]["services"].append(copy.deepcopy(d["spec"]["services"][0]))))
    assert (found.path, found.message) == ("spec.services[2].name", "duplicate service demo/frontend (also "
                                                                    "spec.services[0])")


def test_a_port_number_twice_in_a_workload_is_refused() -> None:
    found = _only(_with(lambda d: d["spec"]["workloads"][0]["ports"].append({"containerPort": 8080})))
    assert found.path == "spec.workloads[0].ports[1]"
    assert found.message == "duplicate port number 8080/TCP (also spec.workloads[0].ports[0])"


def test_a_selector_that_matches_no_workload_of_its_namespace_is_refused() -> None:
    found = _only(_with(lambda d: d["spec"]["services"][0].update(namespace="other")))
    assert found == Located(0, "spec.services[0].selector", "selects no workload in namespace other",
                            "service other/frontend")


def test_a_named_target_port_that_no_selected_workload_has_is_refused() -> None:
    found = _only(_with(lambda d: d["spec"]["services"][1]["ports"][0].update(targetPort="grpc")))
    assert found.path == "spec.services[1].ports[0].targetPort"
    assert found.message == "no selected workload has a port named 'grpc' (selected: spec.workloads[1])"


@pytest.mark.parametrize(("kind", "message"), [
    ("Pod", "kind Pod: workloads and services belong in the Mesh document's spec"),
    ("Service", "kind Service: workloads and services belong in the Mesh document's spec"),
    ("Deployment", "unknown kind 'Deployment' (known here: Mesh, CircuitBreaker, HTTPRouteGroup, MeshConfig, "
                   "RateLimit, TCPRoute, TrafficSplit, TrafficTarget)"),
])
def test_a_document_of_another_kind_is_refused(kind: str, message: str) -> None:
    found = _only(_problems([_mesh(), {"apiVersion": "v1", "kind": kind, "metadata": {"name": "x"}}]))
    assert found == Located(1, "kind", message)


def test_a_file_without_a_mesh_document_is_refused() -> None:
    found = _only(_problems([_split()]))
    assert (found.document, found.path) == (0, "")
    assert found.message.startswith("no Mesh document")


def test_a_second_mesh_document_is_refused() -> None:
    found = _only(_problems([_mesh(), _mesh()]))
    assert (found.document, found.path) == (1, "kind")
    assert "the first is document 1" in found.message


def test_a_mesh_of_another_version_is_not_read_further() -> None:
    found = _only(_problems([_mesh() | {"apiVersion": "meshloom.io/v2", "bogus": 1}]))
    assert found == Located(0, "apiVersion", "Mesh is read as 'meshloom.io/v1alpha1', got 'meshloom.io/v2'",
                            "mesh demo")


def test_a_policy_documents_own_problems_are_located_in_it() -> None:
    split = _split()
    split["spec"]["backends"][0]["weigth"] = 3
    found = _only(_problems([_mesh(), split]))
    assert (found.document, found.path, found.resource) == (1, "spec.backends[0].weigth",
                                                            "trafficsplit demo/backend-split")
    assert found.message.startswith("unknown field")


def test_a_policy_defined_twice_is_refused_on_the_later_document() -> None:
    found = _only(_problems([_mesh(), _split(), _split()]))
    assert (found.document, found.path) == (2, "metadata.name")
    assert "also document 2" in found.message


# ---------------------------------------------------------------------------------------------------- allocate ---
PODS = ipaddress.IPv4Network("10.20.0.0/24")
SERVICES = ipaddress.IPv4Network("10.21.0.0/24")


def test_new_pods_and_services_get_the_lowest_free_addresses_in_order() -> None:
    spec = read([_mesh()])
    assert allocate(spec, PODS, SERVICES, {}) == {
        "pod/demo/frontend-0": "10.20.0.1", "pod/demo/frontend-1": "10.20.0.2", "pod/demo/backend-0": "10.20.0.3",
        "service/demo/frontend": "10.21.0.1", "service/demo/backend": "10.21.0.2",
    }


def test_addresses_the_stored_world_gives_are_kept_and_never_given_twice() -> None:
    spec = read([_mesh()])
    taken = {"pod/demo/frontend-1": "10.20.0.1", "pod/demo/gone-0": "10.20.0.2", "service/demo/backend": "10.21.0.9"}
    assert allocate(spec, PODS, SERVICES, taken) == {
        "pod/demo/frontend-1": "10.20.0.1", "pod/demo/frontend-0": "10.20.0.3", "pod/demo/backend-0": "10.20.0.4",
        "service/demo/backend": "10.21.0.9", "service/demo/frontend": "10.21.0.1",
    }


def test_a_kept_address_outside_its_range_is_replaced() -> None:
    spec = read([_mesh()])
    got = allocate(spec, PODS, SERVICES, {"pod/demo/frontend-0": "192.168.1.1"})
    assert got["pod/demo/frontend-0"] == "10.20.0.1"


def test_a_full_range_is_refused_at_the_workload_that_did_not_fit() -> None:
    spec = read([_mesh()])
    with pytest.raises(MeshfileError) as caught:
        allocate(spec, ipaddress.IPv4Network("10.20.0.0/30"), SERVICES, {})  # two host addresses for three pods
    (found,) = caught.value.problems
    assert found == Located(0, "spec.workloads[1]", "no free address left in 10.20.0.0/30 for pod/demo/backend-0",
                            "workload demo/backend")


# ------------------------------------------------------------------------------------------------------ render ---
def test_the_rendered_world_is_namespaces_pods_services_then_policies() -> None:
    mesh = _mesh()
    mesh["spec"]["workloads"][0]["replicas"] = 1
    mesh["spec"]["workloads"][1] |= {"meshed": False, "annotations": {"config.nsm.nginx.com/mtls-mode": "off"}}
    spec = read([mesh, _split()])
    world = render(spec, allocate(spec, PODS, SERVICES, {}))
    assert world == [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": {AUTO_INJECT: "enabled"}}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "frontend-0", "namespace": "demo", "labels": {"app": "frontend"}},
         "spec": {"serviceAccountName": "frontend", "nodeName": POD_NODE,
                  "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080,
                                                            "protocol": "TCP"}]}]},
         "status": {"phase": "Running", "podIP": "10.20.0.1"}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "backend-0", "namespace": "demo", "labels": {"app": "backend", AUTO_INJECT: "disabled"},
                      "annotations": {"config.nsm.nginx.com/mtls-mode": "off"}},
         "spec": {"serviceAccountName": "default", "nodeName": POD_NODE,
                  "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 9090,
                                                            "protocol": "TCP"}]}]},
         "status": {"phase": "Running", "podIP": "10.20.0.2"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "frontend", "namespace": "demo"},
         "spec": {"selector": {"app": "frontend"}, "clusterIP": "10.21.0.1",
                  "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend", "namespace": "demo"},
         "spec": {"selector": {"app": "backend"}, "clusterIP": "10.21.0.2",
                  "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}},
        _split(),
    ]


def test_the_rendered_world_is_one_the_catalog_accepts_with_the_unmeshed_pod_outside_the_mesh() -> None:
    mesh = _mesh()
    mesh["spec"]["workloads"][1]["meshed"] = False
    spec = read([mesh, _split()])
    world = catalog.World(catalog.parse_all(render(spec, allocate(spec, PODS, SERVICES, {}))))
    meshed = {p.ref: catalog.is_meshed(p, world.get("Namespace//demo")) for p in world.of(catalog.Pod)}  # type: ignore[arg-type]
    assert meshed == {"demo/backend-0": False, "demo/frontend-0": True, "demo/frontend-1": True}


def test_rendering_does_not_share_the_policies_with_the_spec() -> None:
    spec = read([_mesh(), _split()])
    render(spec, {})[-1]["spec"]["service"] = "changed"
    assert spec.policies[0]["spec"]["service"] == "backend"


# ------------------------------------------------------------------------------------------------------- check ---
def test_a_good_mesh_file_passes_the_catalogs_check() -> None:
    check(read([_mesh(), _split()]))


def test_a_traffic_split_naming_an_unknown_service_is_located_in_its_policy_document() -> None:
    spec = read([_split(backends=("backend", "backend-v9")), _mesh()])
    with pytest.raises(MeshfileError) as caught:
        check(spec)
    (found,) = caught.value.problems
    assert (found.document, found.path, found.resource) == (0, "spec.backends[1].service",
                                                            "trafficsplit demo/backend-split")
    assert found.message.startswith("Service demo/backend-v9 does not exist")


def test_a_problem_of_a_rendered_pod_is_located_at_its_workload_once_for_all_its_replicas() -> None:
    mesh = _mesh()
    mesh["spec"]["workloads"][0]["annotations"] = {"config.nsm.nginx.com/mtls-mode": "sometimes"}
    mesh["spec"]["workloads"][0]["replicas"] = 3
    spec = read([mesh])
    with pytest.raises(MeshfileError) as caught:
        check(spec)
    paths = [(p.document, p.path, p.resource) for p in caught.value.problems]
    assert paths == [(0, 'spec.workloads[0].annotations["config.nsm.nginx.com/mtls-mode"]', "workload demo/frontend")]


def test_ignored_ports_the_init_rules_cannot_take_are_refused_at_their_annotation() -> None:
    mesh = _mesh()
    mesh["spec"]["workloads"][0]["annotations"] = {"config.nsm.nginx.com/ignore-incoming-ports": "abc,99999",
                                                   "config.nsm.nginx.com/ignore-outgoing-ports": "6379, 5432"}
    found = _problems([mesh])
    assert [(p.path, p.message) for p in found] == [
        ('spec.workloads[0].annotations["config.nsm.nginx.com/ignore-incoming-ports"]',
         "must be port numbers (1-65535) separated by commas, got 'abc,99999'")]


def test_two_splits_of_one_service_are_located_in_both_documents() -> None:
    other = _split() | {"metadata": {"name": "second", "namespace": "demo"}}
    with pytest.raises(MeshfileError) as caught:
        check(read([_mesh(), _split(), other]))
    assert sorted((p.document, p.path) for p in caught.value.problems) == [(1, "spec.service"), (2, "spec.service")]


def test_a_mesh_spec_is_plain_data() -> None:
    spec = read([_mesh()])
    assert isinstance(spec, MeshSpec)
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]
