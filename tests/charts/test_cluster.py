"""The chart against a real kube-apiserver (1.20, the session's `kube_api`): helm installs it, the CRDs' schemas
judge policies as the catalog does, and helm uninstall takes away everything it installed but the CRDs.

The release goes into a namespace of its own; its cluster-scoped objects (the ClusterRole, the webhook
configuration) have fixed names, so the module installs once and the last test uninstalls.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

import catalog
from actions.helm import Helm, HelmError, default_chart
from tests.catalog.test_parse import BAD
from tests.catalog.topology import manifests
from tests.charts.crds import SCHEMA_CANNOT, by_api_kind, copy_into, load_crds
from tests.support.kube import KubeAPI, unique_name

pytestmark = pytest.mark.integration

POLICY_KINDS = {crd.kind for crd in load_crds()}
BAD_POLICIES = {name: doc for name, (doc, _) in BAD.items()
                if isinstance(doc, dict) and doc.get("kind") in POLICY_KINDS}


class Release:
    def __init__(self, kube: KubeAPI) -> None:
        self.kube = kube
        self.namespace = unique_name("meshloom")
        self.helm = Helm(binary=str(kube.helm), kubeconfig=str(kube.kubeconfig), env=kube.env(), timeout=180)
        self.installed = False

    def install(self, *set_values: str) -> None:
        self.helm.install(default_chart(), namespace=self.namespace, set_values=set_values)
        self.installed = True

    def uninstall(self) -> None:
        self.helm.uninstall(namespace=self.namespace)
        self.installed = False


@pytest.fixture(scope="module")
def release(kube_api: KubeAPI) -> Iterator[Release]:
    release = Release(kube_api)
    release.install()
    try:
        yield release
    finally:
        if release.installed:
            release.uninstall()


@pytest.fixture
def api(kube_api: KubeAPI) -> Iterator[Any]:
    with kube_api.api_client() as api_client:
        yield api_client


def _create(api: Any, doc: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
    """Creates a custom resource through the API server (dryRun=All: judged in full, stored nowhere)."""
    group, version = doc["apiVersion"].split("/")
    crd = by_api_kind().get((doc["apiVersion"], doc["kind"]))
    plural = crd.plural if crd else doc["kind"].lower() + "s"
    custom = client.CustomObjectsApi(api)
    extra = {"dry_run": "All"} if dry_run else {}
    if crd is not None and not crd.namespaced:
        return dict(custom.create_cluster_custom_object(group, version, plural, doc, **extra))
    namespace = doc["metadata"].get("namespace", "default")
    return dict(custom.create_namespaced_custom_object(group, version, namespace, plural, doc, **extra))


def _refusal(call: Callable[[], object]) -> tuple[int, str]:
    with pytest.raises(ApiException) as caught:
        call()
    body = caught.value.body or ""
    try:
        message = str(json.loads(body).get("message", ""))
    except ValueError:
        message = body  # "404 page not found": no such API at all
    return int(caught.value.status), message


def test_helm_install_creates_the_control_plane_and_the_crds(release: Release, api: Any) -> None:
    ns = release.namespace
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    assert apps.read_namespaced_deployment("meshloom-controller", ns).spec.replicas == 1
    assert apps.read_namespaced_daemon_set("meshloom-node-agent", ns)
    nats = core.read_namespaced_service("meshloom-nats", ns)  # the controller's own NATS, no pod of its own
    assert nats.spec.selector["app.kubernetes.io/component"] == "controller"
    assert [(p.port, p.target_port, p.protocol) for p in nats.spec.ports] == [(4222, "nats", "TCP")]
    assert _refusal(lambda: apps.read_namespaced_deployment("meshloom-nats", ns))[0] == 404
    service = core.read_namespaced_service("meshloom-controller", ns)
    assert service.spec.cluster_ip.startswith("10.96.")
    assert {(p.port, p.protocol) for p in service.spec.ports} == {(443, "TCP"), (9090, "TCP")}
    assert "values.yaml" in core.read_namespaced_config_map("meshloom-injection", ns).data
    webhook = client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration("meshloom-injector")
    assert webhook.webhooks[0].client_config.service.namespace == ns
    assert webhook.webhooks[0].failure_policy == "Ignore"
    extensions = client.ApiextensionsV1Api(api)
    for crd in load_crds():
        live = extensions.read_custom_resource_definition(crd.manifest["metadata"]["name"])
        conditions = {c.type: c.status for c in live.status.conditions or []}
        assert conditions.get("Established") == "True", crd.kind
        assert conditions.get("NonStructuralSchema") is None, crd.kind


def test_the_controller_may_update_its_own_webhook_configuration_and_no_other(release: Release,
                                                                              kube_api: KubeAPI) -> None:
    who = f"--as=system:serviceaccount:{release.namespace}:meshloom-controller"

    def can(*args: str) -> bool:
        return kube_api.kubectl_run("auth", "can-i", *args, who, check=False).stdout.strip() == "yes"

    assert can("update", "mutatingwebhookconfigurations/meshloom-injector")
    assert not can("update", "mutatingwebhookconfigurations/someone-elses")
    assert not can("delete", "mutatingwebhookconfigurations/meshloom-injector")
    assert can("watch", "pods", "-A") and can("watch", "trafficsplits.split.smi-spec.io", "-A")
    assert not can("patch", "pods", "-n", "default") and not can("delete", "pods", "-n", "default")
    assert not can("create", "events", "-n", "default") and not can("patch", "events", "-n", "default")
    assert not can("create", "events.events.k8s.io", "-n", "default")
    assert can("update", "leases/meshloom-controller", "-n", release.namespace)
    assert not can("create", "secrets", "-n", release.namespace) and not can("get", "secrets", "-n", "default")
    node_agent = f"--as=system:serviceaccount:{release.namespace}:meshloom-node-agent"
    assert kube_api.kubectl_run("auth", "can-i", "list", "pods", node_agent, check=False).stdout.strip() == "no"


def test_a_valid_traffic_split_is_stored(release: Release, kube_api: KubeAPI, api: Any) -> None:
    ns = kube_api.unique_namespace("split")
    doc = {"apiVersion": "split.smi-spec.io/v1alpha3", "kind": "TrafficSplit",
           "metadata": {"name": "web-split", "namespace": ns},
           "spec": {"service": "web", "backends": [{"service": "web-v1", "weight": 90},
                                                   {"service": "web-v2", "weight": 10}]}}
    stored = _create(api, doc)
    assert stored["spec"] == doc["spec"]
    assert catalog.parse(stored)  # what the API server stores, the catalog reads


def test_a_traffic_split_with_a_weight_in_words_is_refused_with_422_naming_the_field(
        release: Release, kube_api: KubeAPI, api: Any) -> None:
    ns = kube_api.unique_namespace("split")
    doc = {"apiVersion": "split.smi-spec.io/v1alpha3", "kind": "TrafficSplit",
           "metadata": {"name": "web-split", "namespace": ns},
           "spec": {"service": "web", "backends": [{"service": "web-v1", "weight": "x"}]}}
    status, message = _refusal(lambda: _create(api, doc))
    assert status == 422 and "weight" in message


def test_an_unknown_field_is_dropped_by_the_api_server_so_the_catalog_never_reads_it(
        release: Release, kube_api: KubeAPI, api: Any) -> None:
    """Kubernetes 1.20 prunes what a structural schema does not name (it cannot refuse it); kubectl's client-side
    validation refuses it before it is sent, and `meshctl apply` refuses it in the catalog."""
    ns = kube_api.unique_namespace("split")
    doc = {"apiVersion": "split.smi-spec.io/v1alpha3", "kind": "TrafficSplit",
           "metadata": {"name": "web-split", "namespace": ns},
           "spec": {"service": "web", "backends": [{"service": "web-v1", "weight": 1, "weigth": 2}]}}
    stored = _create(api, doc)
    assert stored["spec"]["backends"] == [{"service": "web-v1", "weight": 1}]


def test_the_catalog_world_of_policies_is_accepted_by_the_api_server(release: Release, kube_api: KubeAPI,
                                                                     api: Any) -> None:
    renamed = {ns: kube_api.unique_namespace(ns) for ns in ("shop", "pay", "legacy")}
    for doc in manifests():
        if doc["kind"] in POLICY_KINDS:
            _create(api, copy_into(doc, renamed), dry_run=True)


@pytest.mark.parametrize("name", sorted(set(BAD_POLICIES) - set(SCHEMA_CANNOT)))
def test_a_policy_the_catalog_refuses_is_refused_by_the_api_server(release: Release, api: Any, name: str) -> None:
    doc = copy_into(BAD_POLICIES[name], {"shop": "default"})
    status, message = _refusal(lambda: _create(api, doc, dry_run=True))
    assert status in (422, 404), message  # 404: a version the CRD does not serve


def test_helm_uninstall_removes_everything_it_installed_but_the_crds(release: Release, api: Any) -> None:
    ns = release.namespace
    release.uninstall()
    checks: dict[str, Callable[[], object]] = {
        "Deployment meshloom-controller": lambda: client.AppsV1Api(api).read_namespaced_deployment(
            "meshloom-controller", ns),
        "Service meshloom-nats": lambda: client.CoreV1Api(api).read_namespaced_service("meshloom-nats", ns),
        "DaemonSet meshloom-node-agent": lambda: client.AppsV1Api(api).read_namespaced_daemon_set(
            "meshloom-node-agent", ns),
        "Service meshloom-controller": lambda: client.CoreV1Api(api).read_namespaced_service(
            "meshloom-controller", ns),
        "ConfigMap meshloom-injection": lambda: client.CoreV1Api(api).read_namespaced_config_map(
            "meshloom-injection", ns),
        "ServiceAccount meshloom-controller": lambda: client.CoreV1Api(api).read_namespaced_service_account(
            "meshloom-controller", ns),
        "ClusterRole meshloom-controller": lambda: client.RbacAuthorizationV1Api(api).read_cluster_role(
            "meshloom-controller"),
        "ClusterRoleBinding meshloom-controller": lambda: client.RbacAuthorizationV1Api(
            api).read_cluster_role_binding("meshloom-controller"),
        "Role meshloom-controller": lambda: client.RbacAuthorizationV1Api(api).read_namespaced_role(
            "meshloom-controller", ns),
        "MutatingWebhookConfiguration meshloom-injector": lambda: client.AdmissionregistrationV1Api(
            api).read_mutating_webhook_configuration("meshloom-injector"),
    }
    for what, read in checks.items():
        status, _ = _refusal(read)
        assert status == 404, f"{what} is still there"
    extensions = client.ApiextensionsV1Api(api)
    for crd in load_crds():  # Helm never deletes CRDs: the policies in them survive a reinstall
        assert extensions.read_custom_resource_definition(crd.manifest["metadata"]["name"])
    with pytest.raises(HelmError):
        release.uninstall()
