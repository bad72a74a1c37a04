"""The chart without a cluster: helm lint, the rendered manifests against Kubernetes' schemas, a golden file, the
values contract the injector relies on, least-privilege RBAC, and values.schema.json refusing bad values.

The golden file is the whole `helm template --include-crds` output with the default values; refresh it with
MESHLOOM_UPDATE_GOLDEN=1 after a deliberate change, and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from actions.helm import Helm, HelmError, HelmFailure

GOLDEN = Path(__file__).parent / "golden" / "meshloom.yaml"
UPDATE = os.environ.get("MESHLOOM_UPDATE_GOLDEN") == "1"
# The oldest Kubernetes whose schemas kubernetes-validate ships; the API server the tests run is 1.20, whose API
# versions the chart is also held to below.
VALIDATE_VERSION = "1.25"
API_VERSIONS_IN_1_20 = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1", "admissionregistration.k8s.io/v1",
                        "apiextensions.k8s.io/v1", "coordination.k8s.io/v1"}

# The injector's contract (/tmp/brief/values.md): these keys and defaults, exactly.
INJECTOR_VALUES: dict[str, Any] = {
    "trustDomain": "example.org",
    "mtls": {"mode": "permissive", "svidTTL": "1h", "caTTL": "720h", "keyType": "ec-p256"},
    "nodeAgent": {"socketDir": "/run/meshloom/agent"},
    "sidecar": {"image": {"repository": "ghcr.io/meshloom/sidecar", "tag": "0.1.0", "pullPolicy": "IfNotPresent"},
                "uid": 2102, "ports": {"inbound": 15006, "outbound": 15001, "admin": 15021, "metrics": 15090},
                "resources": {"requests": {"cpu": "50m", "memory": "48Mi"}, "limits": {"memory": "128Mi"}},
                "drainSeconds": 20},
    "init": {"image": {"repository": "ghcr.io/meshloom/init", "tag": "0.1.0", "pullPolicy": "IfNotPresent"},
             "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}}},
    "injection": {"ignoreIncomingPorts": [], "ignoreOutgoingPorts": [], "failurePolicy": "Ignore",
                  "timeoutSeconds": 5},
}


def _render(helm: Helm, chart: Path, *set_values: str, include_crds: bool = False) -> list[dict[str, Any]]:
    text = helm.template(chart, set_values=set_values, include_crds=include_crds)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def test_the_chart_passes_helm_lint_strict(helm: Helm, chart: Path) -> None:
    out = helm.lint(chart, strict=True)
    assert "0 chart(s) failed" in out


def test_every_rendered_manifest_is_a_valid_kubernetes_object_with_no_unknown_field(helm: Helm, chart: Path) -> None:
    docs = _render(helm, chart, include_crds=True)
    assert {d["kind"] for d in docs} >= {"Deployment", "DaemonSet", "Service", "ConfigMap", "ServiceAccount",
                                         "ClusterRole", "Role", "MutatingWebhookConfiguration",
                                         "CustomResourceDefinition"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, VALIDATE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_the_rendered_chart_matches_its_golden_file(helm: Helm, chart: Path) -> None:
    text = helm.template(chart, include_crds=True)
    if UPDATE:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert GOLDEN.exists(), f"{GOLDEN} is missing: run MESHLOOM_UPDATE_GOLDEN=1 pytest tests/charts"
    assert text == GOLDEN.read_text(), "the chart renders differently: review, then MESHLOOM_UPDATE_GOLDEN=1"


def test_every_object_uses_an_api_version_that_kubernetes_1_20_serves(helm: Helm, chart: Path) -> None:
    for doc in _render(helm, chart, include_crds=True):
        assert doc["apiVersion"] in API_VERSIONS_IN_1_20, f"{doc['kind']}: {doc['apiVersion']}"


def test_every_service_port_names_its_protocol_as_server_side_apply_on_1_20_needs(helm: Helm, chart: Path) -> None:
    services = [d for d in _render(helm, chart) if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"meshloom-controller", "meshloom-nats"}
    for service in services:
        for port in service["spec"]["ports"]:
            assert port.get("protocol") == "TCP", f"{service['metadata']['name']}: {port}"
    webhook = next(p for p in _one(services, "Service", "meshloom-controller")["spec"]["ports"] if p["port"] == 443)
    assert webhook["targetPort"] == "webhook"


def test_values_yaml_holds_the_injector_values_exactly_as_agreed(chart: Path) -> None:
    values = yaml.safe_load((chart / "values.yaml").read_text())
    assert {key: values[key] for key in INJECTOR_VALUES} == INJECTOR_VALUES


def test_the_injection_configmap_carries_exactly_the_injector_values(helm: Helm, chart: Path) -> None:
    docs = _render(helm, chart, "mtls.mode=strict", "injection.ignoreOutgoingPorts={5432}")
    config = _one(docs, "ConfigMap", "meshloom-injection")
    assert config["metadata"]["namespace"] == "meshloom"
    carried = yaml.safe_load(config["data"]["values.yaml"])
    expected = INJECTOR_VALUES | {"mtls": INJECTOR_VALUES["mtls"] | {"mode": "strict"},
                                  "injection": INJECTOR_VALUES["injection"] | {"ignoreOutgoingPorts": [5432]}}
    assert carried == expected


def test_the_controller_mounts_the_injection_values_and_serves_the_webhook_on_8443(helm: Helm, chart: Path) -> None:
    deployment = _one(_render(helm, chart), "Deployment", "meshloom-controller")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["args"][0] == "controller"
    assert "--injection-values=/etc/meshloom/injection/values.yaml" in container["args"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "injection")
    assert mount["mountPath"] == "/etc/meshloom/injection"
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "injection")
    assert volume["configMap"]["name"] == "meshloom-injection"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"webhook": 8443, "metrics": 9090,
                                                                           "nats": 4222}
    assert pod["metadata"]["labels"]["injector.nsm.nginx.com/auto-inject"] == "disabled"


def test_the_node_agent_serves_sockets_in_the_host_socket_dir(helm: Helm, chart: Path) -> None:
    daemonset = _one(_render(helm, chart, "nodeAgent.socketDir=/run/agent"), "DaemonSet", "meshloom-node-agent")
    spec = daemonset["spec"]["template"]["spec"]
    assert "--socket-dir=/run/agent" in spec["containers"][0]["args"]
    sockets = next(v for v in spec["volumes"] if v["name"] == "sockets")
    assert sockets["hostPath"] == {"path": "/run/agent", "type": "DirectoryOrCreate"}
    assert spec["automountServiceAccountToken"] is False


def test_the_webhook_takes_its_failure_policy_and_timeout_from_the_values(helm: Helm, chart: Path) -> None:
    docs = _render(helm, chart, "injection.failurePolicy=Fail", "injection.timeoutSeconds=9")
    webhook = _one(docs, "MutatingWebhookConfiguration", "meshloom-injector")["webhooks"][0]
    assert webhook["failurePolicy"] == "Fail" and webhook["timeoutSeconds"] == 9
    assert webhook["clientConfig"]["service"] == {"name": "meshloom-controller", "namespace": "meshloom",
                                                  "path": "/inject", "port": 443}
    assert "caBundle" not in webhook["clientConfig"], "the controller keeps caBundle current, not the chart"
    assert webhook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                 "resources": ["pods"], "scope": "Namespaced"}]
    skipped = {e["key"]: e["values"] for e in webhook["objectSelector"]["matchExpressions"]}
    assert skipped == {"injector.nsm.nginx.com/auto-inject": ["disabled"], "meshloom.io/injected": ["true"]}
    namespaces = {e["key"]: e["values"] for e in webhook["namespaceSelector"]["matchExpressions"]}
    assert "meshloom" in namespaces["kubernetes.io/metadata.name"]


def test_the_controller_may_change_only_its_own_webhook_configuration_and_nothing_everywhere(
        helm: Helm, chart: Path) -> None:
    docs = _render(helm, chart)
    rules = _one(docs, "ClusterRole", "meshloom-controller")["rules"]
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert "secrets" not in rule["resources"], "secrets only in the release namespace (the Role)"
    webhooks = [r for r in rules if "mutatingwebhookconfigurations" in r["resources"]]
    assert webhooks == [{"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
                         "resourceNames": ["meshloom-injector"], "verbs": ["get", "update"]}]
    writes = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
              if set(rule["verbs"]) - {"get", "list", "watch"}}
    # Pods are injected at admission, never patched afterwards, and the controller writes no Event.
    assert writes == {("admissionregistration.k8s.io", "mutatingwebhookconfigurations")}
    assert not {r for rule in rules for r in rule["resources"]} & {"events"}
    role = _one(docs, "Role", "meshloom-controller")
    assert role["metadata"]["namespace"] == "meshloom"
    assert {r for rule in role["rules"] for r in rule["resources"]} == {"leases"}  # no Secret read or written
    # Only the controller talks to the API server.
    assert _one(docs, "ServiceAccount", "meshloom-node-agent")["automountServiceAccountToken"] is False
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"} == {"meshloom-controller",
                                                                                     "meshloom-node-agent"}


@pytest.mark.parametrize("port", [4222, 4300])
def test_the_mesh_nats_is_the_controllers_own_server_behind_the_meshloom_nats_service(helm: Helm, chart: Path,
                                                                                       port: int) -> None:
    from catalog.inject import NATS_SERVER_NAME, NATS_URL
    from meshctl.controller import ControllerConfig

    docs = _render(helm, chart, f"nats.port={port}")
    deployment = _one(docs, "Deployment", "meshloom-controller")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert f"--nats-port={port}" in container["args"]
    assert f"--nats-url=tls://meshloom-nats.meshloom.svc:{port}" in container["args"]
    assert not any(a.startswith("--nats-secret") for a in container["args"])
    assert {"name": "nats", "containerPort": port, "protocol": "TCP"} in container["ports"]
    service = _one(docs, "Service", "meshloom-nats")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"name": "tls-nats", "port": port, "targetPort": "nats", "protocol": "TCP"}]
    # Followers never get a sidecar: readiness is the webhook's port, which only the leader opens (after NATS).
    assert container["readinessProbe"]["tcpSocket"] == {"port": "webhook"}
    # No NATS of its own: no pod, configuration or Secret.
    assert [d["kind"] for d in docs if "nats" in d["metadata"]["name"]] == ["Service"]
    # What injected sidecars dial and verify is what the Service is and the controller's certificate names.
    assert NATS_SERVER_NAME == "meshloom-nats.meshloom.svc"
    assert NATS_SERVER_NAME == ControllerConfig(Path("/x"), namespace="meshloom").nats_dns_names[0]
    if port == 4222:
        assert NATS_URL == f"tls://{NATS_SERVER_NAME}:{port}"


def test_the_release_namespace_is_where_every_namespaced_object_goes(helm: Helm, chart: Path) -> None:
    text = helm.template(chart, namespace="mesh-system")
    docs = [d for d in yaml.safe_load_all(text) if d]
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"}
    for doc in docs:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"]["namespace"] == "mesh-system", doc["kind"]
    webhook = _one(docs, "MutatingWebhookConfiguration", "meshloom-injector")["webhooks"][0]
    assert webhook["clientConfig"]["service"]["namespace"] == "mesh-system"


# One bad value per class of key: each must be refused by values.schema.json before anything reaches a cluster.
BAD_VALUES = {
    "an mTLS mode that does not exist": ("mtls.mode=paranoid", "mtls.mode"),
    "a key type the CA cannot make": ("mtls.keyType=rsa-1024", "mtls.keyType"),
    "a TTL that is not a duration": ("mtls.svidTTL=1day", "mtls.svidTTL"),
    "a trust domain in capitals": ("trustDomain=Example.ORG", "trustDomain"),
    "a failure policy Kubernetes does not know": ("injection.failurePolicy=Sometimes", "injection.failurePolicy"),
    "a webhook timeout above Kubernetes' 30 s": ("injection.timeoutSeconds=31", "injection.timeoutSeconds"),
    "an ignored port out of range": ("injection.ignoreIncomingPorts={0}", "injection.ignoreIncomingPorts"),
    "a sidecar running as root": ("sidecar.uid=0", "sidecar.uid"),
    "a sidecar port out of range": ("sidecar.ports.inbound=70000", "sidecar.ports.inbound"),
    "an image pull policy that does not exist": ("init.image.pullPolicy=Sometimes", "init.image.pullPolicy"),
    "an empty image tag": ("sidecar.image.tag=", "sidecar.image.tag"),
    "a resource quantity in words": ("sidecar.resources.limits.memory=lots", "sidecar.resources.limits.memory"),
    "a relative socket directory": ("nodeAgent.socketDir=run/agent", "nodeAgent.socketDir"),
    "a misspelt key": ("injection.failurePolicyy=Fail", "failurePolicyy"),
    "an unknown top-level key": ("meshh.mode=strict", "meshh"),
    "two controllers sharing one SQLite file": ("controller.replicas=2", "controller.replicas"),
    "a NATS port out of range": ("nats.port=0", "nats.port"),
    "a setting of the separate NATS pod there is no more": ("nats.reloadSeconds=10", "reloadSeconds"),
    "a lease duration that is not a duration": ("controller.leaderElection.leaseDuration=soon",
                                                "controller.leaderElection.leaseDuration"),
}


@pytest.mark.parametrize("setting, named", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_values_schema_refuses_a_bad_value_naming_its_key(helm: Helm, chart: Path, setting: str, named: str) -> None:
    with pytest.raises(HelmError) as caught:
        helm.template(chart, set_values=[setting])
    assert caught.value.kind is HelmFailure.INVALID
    message = str(caught.value)
    assert "values.schema.json rejects" in message and named in message
    assert "\n" not in message


@pytest.mark.parametrize("settings", [
    ["mtls.mode=off"], ["mtls.mode=strict", "mtls.keyType=rsa-4096", "mtls.svidTTL=1h30m"],
    ["injection.failurePolicy=Fail", "injection.timeoutSeconds=30", "injection.ignoreOutgoingPorts={5432,6379}"],
    ["controller.replicas=3", "controller.database.existingSecret=meshloom-db"],
    ["controller.leaderElection.enabled=false"],
], ids=["mtls off", "strict rsa", "fail closed", "ha with postgres", "no leader election"])
def test_values_schema_accepts_good_values(helm: Helm, chart: Path, settings: list[str]) -> None:
    docs = _render(helm, chart, *settings)
    assert _one(docs, "Deployment", "meshloom-controller")


@pytest.mark.parametrize("settings", [[], ["controller.leaderElection.enabled=false",
                                           "controller.database.existingSecret=meshloom-db"]],
                         ids=["defaults", "no election, postgres"])
def test_every_flag_the_chart_passes_is_one_the_meshctl_command_takes(helm: Helm, chart: Path,
                                                                      settings: list[str]) -> None:
    import typer

    from meshctl.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    docs = _render(helm, chart, *settings)
    for kind, name in (("Deployment", "meshloom-controller"), ("DaemonSet", "meshloom-node-agent")):
        args = _one(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]["args"]
        command = commands[args[0]]
        known = {flag for param in command.params for flag in (*param.opts, *param.secondary_opts)}
        for arg in args[1:]:
            assert arg.partition("=")[0] in known, f"{name}: meshctl {args[0]} has no {arg}"


@pytest.mark.parametrize("settings", [[], ["mtls.mode=strict", "mtls.keyType=rsa-2048", "sidecar.uid=3000",
                                           "injection.ignoreIncomingPorts={8081}"]], ids=["defaults", "changed"])
def test_the_controller_reads_the_injection_values_the_chart_renders(helm: Helm, chart: Path, tmp_path: Path,
                                                                     settings: list[str]) -> None:
    from meshctl.controller import load_values

    config = _one(_render(helm, chart, *settings), "ConfigMap", "meshloom-injection")
    path = tmp_path / "values.yaml"
    path.write_text(config["data"]["values.yaml"])
    values, ca = load_values(path)
    rendered = yaml.safe_load(path.read_text())
    assert values.trust_domain == ca.trust_domain == rendered["trustDomain"]
    assert str(ca.key_type) == rendered["mtls"]["keyType"]
