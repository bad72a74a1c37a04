"""Injection against a real kube-apiserver: the API server calls the webhook (registered with the chart's own
MutatingWebhookConfiguration) and stores what it answers; and `meshctl inject`'s output is accepted as it is."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from catalog.inject import INIT_NAME, SIDECAR_NAME, inject
from tests.meshctl.support import MESHCTL
from tests.support.webhook import Injector, contract_values, running_injector

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).resolve().parents[1] / "catalog" / "golden" / "inject"
LABEL = "injector.nsm.nginx.com/auto-inject"
VALUES = contract_values()


@pytest.fixture(scope="module")
def injector(kube_api: Any) -> Iterator[Injector]:
    with running_injector(kube_api, values=VALUES) as running:
        yield running


@pytest.fixture(scope="module")
def core(kube_api: Any) -> Iterator[Any]:
    from kubernetes import client

    with kube_api.api_client() as api:
        yield client.CoreV1Api(api)


def manifest(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "nginx:1.25",
                                                                   "ports": [{"containerPort": 8080}]}], **spec}}


def stored(core: Any, namespace: str, name: str) -> dict[str, Any]:
    response = core.read_namespaced_pod(name, namespace, _preload_content=False)
    loaded: dict[str, Any] = json.loads(response.data)
    return loaded


def contains(expected: Any, actual: Any, where: str = "") -> None:
    """Everything in `expected` is in `actual` (which may hold more: the API server fills in defaults)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r} is not a mapping"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key}: dropped by the API server"
            contains(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r} vs {expected!r}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            contains(e, a, f"{where}[{i}]")
    else:
        assert expected == actual, f"{where}: stored {actual!r}, sent {expected!r}"


def names(pod: dict[str, Any], key: str = "containers") -> list[str]:
    return [c["name"] for c in pod["spec"].get(key) or []]


# ------------------------------------------------------------------------------------------ the webhook ---
def test_a_pod_in_a_labelled_namespace_is_stored_with_the_init_container_and_sidecar(
        kube_api: Any, injector: Injector, core: Any) -> None:
    ns = kube_api.unique_namespace("inject-on", labels=injector.namespace_labels(**{LABEL: "enabled"}))
    body = manifest("web-1", {"app": "web"})
    core.create_namespaced_pod(ns, body)
    pod = stored(core, ns, "web-1")
    assert names(pod) == ["app", SIDECAR_NAME] and names(pod, "initContainers") == [INIT_NAME]
    assert pod["metadata"]["labels"]["meshloom.io/injected"] == "true"
    assert pod["metadata"]["annotations"]["meshloom.io/inject-status"] == "injected"
    # Nothing of the patch was lost or changed on the way: the stored pod holds all that `inject` makes of it.
    contains(inject({**body, "metadata": {**body["metadata"], "namespace": ns}}, VALUES)["spec"], pod["spec"],
             "spec")
    assert injector.verdicts(ns, "web-1") == ["inject: namespace-enabled"]


def test_a_pod_in_an_unlabelled_namespace_is_untouched(kube_api: Any, injector: Injector, core: Any) -> None:
    ns = kube_api.unique_namespace("inject-off", labels=injector.namespace_labels())
    core.create_namespaced_pod(ns, manifest("web-1"))
    pod = stored(core, ns, "web-1")
    assert names(pod) == ["app"] and "initContainers" not in pod["spec"]
    assert "meshloom.io/inject-status" not in (pod["metadata"].get("annotations") or {})
    assert injector.verdicts(ns, "web-1") == ["skip: namespace-not-enabled"]


def test_a_pod_labelled_out_is_skipped(kube_api: Any, injector: Injector, core: Any) -> None:
    ns = kube_api.unique_namespace("inject-out", labels=injector.namespace_labels(**{LABEL: "enabled"}))
    core.create_namespaced_pod(ns, manifest("debug", {LABEL: "disabled"}))
    pod = stored(core, ns, "debug")
    assert names(pod) == ["app"] and "initContainers" not in pod["spec"]
    # The chart's objectSelector keeps such a pod from the webhook altogether; had it come, the answer would be
    # `skip: pod-disabled` (tests/catalog/test_inject.py).
    assert injector.verdicts(ns, "debug") in ([], ["skip: pod-disabled"])


def test_a_pod_labelled_in_is_injected_in_an_unlabelled_namespace(kube_api: Any, injector: Injector,
                                                                  core: Any) -> None:
    ns = kube_api.unique_namespace("inject-pod", labels=injector.namespace_labels())
    core.create_namespaced_pod(ns, manifest("web-1", {LABEL: "enabled"}))
    assert names(stored(core, ns, "web-1")) == ["app", SIDECAR_NAME]
    assert injector.verdicts(ns, "web-1") == ["inject: pod-enabled"]


def test_a_pod_labelled_in_is_injected_even_in_a_namespace_labelled_out(kube_api: Any, injector: Injector,
                                                                          core: Any) -> None:
    """The pod's label wins, both ways, as `catalog.world.is_meshed` says: the control plane expects a sidecar."""
    ns = kube_api.unique_namespace("inject-pod-wins", labels=injector.namespace_labels(**{LABEL: "disabled"}))
    core.create_namespaced_pod(ns, manifest("web-1", {LABEL: "enabled"}))
    assert names(stored(core, ns, "web-1")) == ["app", SIDECAR_NAME]
    assert injector.verdicts(ns, "web-1") == ["inject: pod-enabled"]


def test_a_pod_that_cannot_be_meshed_is_created_as_it_is_and_the_user_is_warned(
        kube_api: Any, injector: Injector, core: Any) -> None:
    ns = kube_api.unique_namespace("inject-host", labels=injector.namespace_labels(**{LABEL: "enabled"}))
    response = core.create_namespaced_pod(ns, manifest("node-tool", hostNetwork=True), _preload_content=False)
    assert "meshloom: pod not injected: the pod uses the host's network" in response.headers.get("Warning", "")
    assert names(stored(core, ns, "node-tool")) == ["app"]
    assert injector.verdicts(ns, "node-tool") == ["skip: host-network"]


def test_a_pod_with_a_bad_mesh_annotation_is_refused_with_the_field_named(kube_api: Any, injector: Injector,
                                                                          core: Any) -> None:
    from kubernetes.client.rest import ApiException

    ns = kube_api.unique_namespace("inject-bad", labels=injector.namespace_labels(**{LABEL: "enabled"}))
    body = manifest("web-1")
    body["metadata"]["annotations"] = {"config.nsm.nginx.com/ignore-incoming-ports": "http"}
    with pytest.raises(ApiException) as caught:
        core.create_namespaced_pod(ns, body)
    assert caught.value.status == 400
    assert 'config.nsm.nginx.com/ignore-incoming-ports' in json.loads(caught.value.body)["message"]


def test_a_generate_name_pod_is_injected_before_it_has_a_name(kube_api: Any, injector: Injector,
                                                              core: Any) -> None:
    ns = kube_api.unique_namespace("inject-gen", labels=injector.namespace_labels(**{LABEL: "enabled"}))
    body = manifest("unused")
    body["metadata"] = {"generateName": "web-"}
    created = core.create_namespaced_pod(ns, body)
    pod = stored(core, ns, created.metadata.name)
    mount = next(m for m in pod["spec"]["containers"][1]["volumeMounts"] if m["mountPath"] == "/run/spiffe")
    assert mount["subPathExpr"] == "$(POD_NAMESPACE)_$(POD_NAME)"  # resolved by the kubelet, once named
    assert injector.verdicts(ns, "web-") == ["inject: namespace-enabled"]


# --------------------------------------------------------------------------------------------- round trip ---
def _documents_for(namespace: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(GOLDEN.glob("*.out.*")):
        text = path.read_text()
        docs = [json.loads(text)] if path.suffix == ".json" else [d for d in yaml.safe_load_all(text) if d]
        for doc in docs:
            for item in (doc["items"] if doc["kind"] == "List" else [doc]):
                item["metadata"]["namespace"] = namespace
                out.append((path.name, item))
    return out


def test_every_kind_meshctl_injects_is_stored_as_printed(kube_api: Any, injector: Injector) -> None:
    """The golden output of every kind, created for real: accepted, and nothing of it dropped or changed."""
    ns = kube_api.unique_namespace("round-trip", labels=injector.namespace_labels())
    docs = _documents_for(ns)
    for source, doc in docs:
        done = kube_api.kubectl_run("create", "-o", "json", "-f", "-", input=json.dumps(doc), check=False)
        assert done.returncode == 0, f"{source}: {doc['kind']}/{doc['metadata']['name']}: {done.stderr}"
        created = json.loads(done.stdout)
        contains(doc.get("spec"), created.get("spec"), f"{source}: {doc['kind']}.spec")
        contains(doc["metadata"].get("annotations") or {}, created["metadata"].get("annotations") or {},
                 f"{source}: annotations")
    assert {d["kind"] for _, d in docs} >= {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet",
                                            "ReplicationController", "Job", "CronJob"}


def test_meshctl_inject_output_is_applied_as_it_comes(kube_api: Any, injector: Injector) -> None:
    ns = kube_api.unique_namespace("pipe", labels=injector.namespace_labels())
    source = yaml.safe_load((GOLDEN / "deployment.in.yaml").read_text())
    source["metadata"]["namespace"] = ns
    injected = subprocess.run([MESHCTL, "inject", "-f", "-", "--values", str(GOLDEN / "values.yaml")],
                              input=yaml.safe_dump(source), capture_output=True, text=True, check=True, timeout=60)
    dry = kube_api.kubectl_run("apply", "--dry-run=server", "-o", "json", "-f", "-", input=injected.stdout)
    template = json.loads(dry.stdout)["spec"]["template"]
    assert names(template) == ["api", SIDECAR_NAME] and names(template, "initContainers") == ["migrate", INIT_NAME]
    applied = kube_api.kubectl_run("apply", "-f", "-", input=injected.stdout)
    assert "deployment.apps/api created" in applied.stdout
