"""Injection: the decision and its reasons, the patch, the values it is built from, and the admission answer.

The golden files under golden/inject/ are `meshctl inject`'s output for one input per kind; they are compared here
as data (what `inject_document` makes of each input) and in tests/meshctl/test_inject_cli.py as text.
MESHLOOM_UPDATE_GOLDEN=1 rewrites them from the CLI.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from catalog import ValidationError, is_meshed, parse
from catalog.inject import (
    BLOCKED,
    INIT_NAME,
    INJECT_STATUS_ANNOTATION,
    PROBES_ENV,
    REASON_TEXT,
    SIDECAR_NAME,
    SOCKET_NAME,
    SOCKET_SUBPATH,
    BadReview,
    Decision,
    FailurePolicy,
    InjectError,
    InjectionValues,
    InjectionValuesError,
    InjectReason,
    admission_response,
    admit,
    apply_patch,
    decide,
    inject,
    inject_document,
    patch,
)
from catalog.policy import MtlsMode

GOLDEN = Path(__file__).resolve().parent / "golden" / "inject"
CHART_VALUES = Path(__file__).resolve().parents[2] / "charts" / "meshloom" / "values.yaml"
LABEL = "injector.nsm.nginx.com/auto-inject"


def contract() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((GOLDEN / "values.yaml").read_text())
    return loaded


VALUES = InjectionValues.from_values(contract())


def values_with(**changes: Any) -> InjectionValues:
    """The contract's values with dotted keys changed: values_with(**{"mtls.mode": "strict"})."""
    raw = contract()
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = raw
        for key in parents:
            node = node[key]
        node[last] = value
    return InjectionValues.from_values(raw)


def pod(*, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
        containers: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "web-1", "namespace": "shop"}
    if labels is not None:
        meta["labels"] = labels
    if annotations is not None:
        meta["annotations"] = annotations
    body = {"containers": containers or [{"name": "web", "image": "nginx",
                                          "ports": [{"containerPort": 8080, "protocol": "TCP"}]}], **spec}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": body}


def decision(p: dict[str, Any], ns_labels: dict[str, str] | None = None, *, manual: bool = False) -> Decision:
    return decide(p["metadata"], p["spec"], ns_labels, manual=manual)


def container(p: dict[str, Any], name: str, key: str = "containers") -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in p["spec"][key] if c["name"] == name)
    return found


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


ENABLED = {LABEL: "enabled"}


# ---------------------------------------------------------------------------------------------- reasons ---
def test_every_reason_has_a_text_for_people() -> None:
    assert set(REASON_TEXT) == set(InjectReason)
    assert all(text and "\n" not in text for text in REASON_TEXT.values())


@pytest.mark.parametrize(("case", "ns_labels", "manual", "expected"), [
    (pod(labels=ENABLED), None, False, Decision(True, InjectReason.POD_ENABLED)),
    (pod(), ENABLED, False, Decision(True, InjectReason.NAMESPACE_ENABLED)),
    (pod(), None, True, Decision(True, InjectReason.REQUESTED)),
    (pod(labels={LABEL: "disabled"}), ENABLED, False, Decision(False, InjectReason.POD_DISABLED)),
    (pod(labels={LABEL: "yes"}), ENABLED, False, Decision(False, InjectReason.POD_LABEL_INVALID, "got 'yes'")),
    (pod(), {}, False, Decision(False, InjectReason.NAMESPACE_NOT_ENABLED)),
    (pod(), None, False, Decision(False, InjectReason.NAMESPACE_UNKNOWN)),
    (pod(annotations={INJECT_STATUS_ANNOTATION: "injected"}), ENABLED, False,
     Decision(False, InjectReason.ALREADY_INJECTED)),
    (pod(hostNetwork=True), ENABLED, False, Decision(False, InjectReason.HOST_NETWORK)),
    (pod(containers=[{"name": "sig", "ports": [{"containerPort": 3868, "protocol": "SCTP"}]}]), ENABLED, False,
     Decision(False, InjectReason.SCTP_PORT, "3868/SCTP in container sig")),
    (pod(containers=[{"name": "a", "ports": [{"containerPort": 80}]}, {"name": "b", "ports": [{"containerPort": 80}]}]),
     ENABLED, False, Decision(False, InjectReason.DUPLICATE_PORT, "80/TCP in containers a and b")),
    (pod(containers=[{"name": "a", "ports": [{"containerPort": 15021}]}]), ENABLED, False,
     Decision(False, InjectReason.PORT_CONFLICT, "15021/TCP in container a")),
    (pod(containers=[{"name": "a", "ports": [{"name": "mesh-admin", "containerPort": 80}]}]), ENABLED, False,
     Decision(False, InjectReason.NAME_CONFLICT, "port name mesh-admin in container a")),
    (pod(volumes=[{"name": "meshloom-run", "emptyDir": {}}]), ENABLED, False,
     Decision(False, InjectReason.NAME_CONFLICT, "volume meshloom-run")),
], ids=lambda v: v.reason.value if isinstance(v, Decision) else None)
def test_each_reason_is_given_where_it_applies(case: dict[str, Any], ns_labels: dict[str, str] | None,
                                                manual: bool, expected: Decision) -> None:
    assert decision(case, ns_labels, manual=manual) == expected


def test_the_reasons_left_are_given_by_the_admission_and_the_cli_paths() -> None:
    review = admission_review(pod(), operation="UPDATE")
    assert admit(review, VALUES, {"shop": ENABLED}).decision == Decision(False, InjectReason.NOT_A_CREATE, "UPDATE")
    review = admission_review(pod(), kind="Service")
    assert admit(review, VALUES, {}).decision.reason is InjectReason.NOT_A_WORKLOAD  # type: ignore[union-attr]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {}}
    result = inject_document(service, VALUES)
    assert result.document == service and result.outcomes[0].decision.reason is InjectReason.NOT_A_WORKLOAD
    assert result.outcomes[0].name == "Service/web"


def test_udp_and_tcp_may_share_a_port_number_and_another_sctp_free_pod_is_injected() -> None:
    p = pod(containers=[{"name": "dns", "ports": [{"containerPort": 53, "protocol": "UDP"},
                                                  {"containerPort": 53, "protocol": "TCP"}]}])
    assert decision(p, ENABLED) == Decision(True, InjectReason.NAMESPACE_ENABLED)


# ------------------------------------------------------------------------------------- label precedence ---
@pytest.mark.parametrize(("pod_label", "ns_label", "inject_it"), [
    ("enabled", "enabled", True),
    ("enabled", "disabled", True),
    ("enabled", None, True),
    ("disabled", "enabled", False),
    ("disabled", "disabled", False),
    ("disabled", None, False),
    (None, "enabled", True),
    (None, "disabled", False),
    (None, None, False),
])
def test_the_pods_label_wins_over_its_namespaces_as_the_catalog_says(pod_label: str | None, ns_label: str | None,
                                                                      inject_it: bool) -> None:
    p = pod(labels={LABEL: pod_label} if pod_label else {})
    ns = {LABEL: ns_label} if ns_label else {}
    assert decision(p, ns).inject is inject_it
    # The catalog's own view of which pods are meshed agrees, before injection and after it.
    namespace = parse({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": ns}})
    assert is_meshed(parse(p), namespace) is inject_it  # type: ignore[arg-type]
    if inject_it:
        assert is_meshed(parse(inject(p, VALUES)), namespace)  # type: ignore[arg-type]


def test_by_hand_everything_is_injected_but_a_pod_labelled_out() -> None:
    assert decision(pod(), {LABEL: "disabled"}, manual=True).inject
    assert decision(pod(labels={LABEL: "disabled"}), None, manual=True).reason is InjectReason.POD_DISABLED


# ----------------------------------------------------------------------------------------------- patch ---
def test_the_init_container_redirects_with_the_ports_from_every_source() -> None:
    values = values_with(**{"injection.ignoreIncomingPorts": [7000], "injection.ignoreOutgoingPorts": [6379]})
    p = pod(annotations={"config.nsm.nginx.com/ignore-incoming-ports": "8081, 9000",
                         "config.nsm.nginx.com/ignore-outgoing-ports": "5432"})
    init = container(inject(p, values, ignore_incoming=[9100], ignore_outgoing=[27017]), INIT_NAME, "initContainers")
    args = init["args"]
    assert init["command"] == ["meshctl"] and args[0] == "init"
    assert arg(args, "--ignore-incoming-ports") == "53,7000,8081,9000,9100,15021,15090"
    assert arg(args, "--ignore-outgoing-ports") == "53,5432,6379,27017"
    assert (arg(args, "--inbound-port"), arg(args, "--outbound-port"), arg(args, "--proxy-uid")) == \
        ("15006", "15001", "2102")
    security = init["securityContext"]
    assert security["runAsUser"] == 0 and security["runAsNonRoot"] is False
    assert set(security["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}


def test_the_sidecar_runs_unprivileged_with_its_probes_ports_and_workload_api_socket() -> None:
    injected = inject(pod(), VALUES)
    side = container(injected, SIDECAR_NAME)
    assert side["image"] == "ghcr.io/meshloom/sidecar:0.1.0" and side["args"][0] == "sidecar"
    assert side["securityContext"]["runAsUser"] == 2102 and side["securityContext"]["runAsNonRoot"] is True
    assert side["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert side["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15021, "scheme": "HTTP"}
    assert {p["name"]: p["containerPort"] for p in side["ports"]} == {"mesh-admin": 15021, "mesh-metrics": 15090}
    env = {e["name"]: e for e in side["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["SPIFFE_ENDPOINT_SOCKET"]["value"] == "unix:///run/spiffe/agent.sock"
    mount = next(m for m in side["volumeMounts"] if m["mountPath"] == "/run/spiffe")
    assert mount["readOnly"] is True and mount["subPathExpr"] == "$(POD_NAMESPACE)_$(POD_NAME)"
    volume = next(v for v in injected["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"]["path"] == "/run/meshloom/agent"
    assert side["resources"] == {"limits": {"memory": "128Mi"}, "requests": {"cpu": "50m", "memory": "48Mi"}}
    assert injected["spec"]["containers"][0]["name"] == "web"  # the app stays the default container


def test_the_socket_path_the_pod_mounts_is_where_the_node_agent_serves_it(tmp_path: Path) -> None:
    from actions.nodeagent import SOCKET_NAME as AGENT_SOCKET
    from actions.nodeagent import socket_path

    assert SOCKET_NAME == AGENT_SOCKET
    served = socket_path(tmp_path, "shop/web-7d9f8-x2x4k")
    mounted = SOCKET_SUBPATH.replace("$(POD_NAMESPACE)", "shop").replace("$(POD_NAME)", "web-7d9f8-x2x4k")
    assert served == tmp_path / mounted / SOCKET_NAME


def test_the_pod_is_marked_injected_by_annotation_and_label() -> None:
    meta = inject(pod(labels={"app": "web"}), VALUES)["metadata"]
    assert meta["labels"] == {"app": "web", "meshloom.io/injected": "true"}
    assert meta["annotations"] == {INJECT_STATUS_ANNOTATION: "injected", "meshloom.io/injected": "true"}


def test_the_patch_creates_what_the_pod_lacks_and_appends_to_what_it_has() -> None:
    bare = {"spec": {"containers": [{"name": "app", "image": "busybox"}]}}
    ops = patch(bare, VALUES)
    assert {op["path"] for op in ops} == {"/metadata", "/spec/initContainers", "/spec/containers/-", "/spec/volumes"}
    full = pod(labels={"a": "b"}, annotations={"c": "d"}, initContainers=[{"name": "setup", "image": "busybox"}],
               volumes=[{"name": "data", "emptyDir": {}}])
    paths = [op["path"] for op in patch(full, VALUES)]
    assert "/metadata/labels/meshloom.io~1injected" in paths and "/spec/initContainers/-" in paths
    injected = inject(full, VALUES)
    assert [c["name"] for c in injected["spec"]["initContainers"]] == ["setup", INIT_NAME]  # ours runs last
    assert [v["name"] for v in injected["spec"]["volumes"]] == ["data", "meshloom-spiffe", "meshloom-run"]


def test_a_short_grace_period_is_raised_to_cover_the_drain() -> None:
    assert inject(pod(terminationGracePeriodSeconds=3), VALUES)["spec"]["terminationGracePeriodSeconds"] == 25
    assert inject(pod(terminationGracePeriodSeconds=60), VALUES)["spec"]["terminationGracePeriodSeconds"] == 60
    assert "terminationGracePeriodSeconds" not in inject(pod(), VALUES)["spec"]  # the default 30 covers 20 + 5
    long_drain = values_with(**{"sidecar.drainSeconds": 40})
    assert inject(pod(), long_drain)["spec"]["terminationGracePeriodSeconds"] == 45
    assert arg(container(inject(pod(), long_drain), SIDECAR_NAME)["args"], "--drain-seconds") == "40"


def test_injecting_twice_is_injecting_once() -> None:
    once = inject(pod(annotations={"config.nsm.nginx.com/mtls-mode": "strict"},
                      containers=[{"name": "web", "readinessProbe": {"httpGet": {"path": "/", "port": 80}}}]),
                  VALUES)
    assert inject(once, VALUES) == once
    assert patch(once, VALUES) == []
    assert decision(once, ENABLED) == Decision(False, InjectReason.ALREADY_INJECTED)


def test_the_input_pod_is_left_as_it_was() -> None:
    p = pod()
    before = copy.deepcopy(p)
    inject(p, VALUES)
    assert p == before


# ------------------------------------------------------------------------------------------ mTLS, probes ---
def probed(**annotations: str) -> dict[str, Any]:
    return pod(annotations=annotations or None, containers=[{
        "name": "web", "image": "nginx",
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http",
                                       "httpHeaders": [{"name": "X", "value": "1"}]}, "periodSeconds": 3},
        "livenessProbe": {"httpGet": {"path": "/live", "port": 8080, "scheme": "HTTPS"}},
        "startupProbe": {"httpGet": {"path": "/s", "port": 8080, "host": "10.0.0.9"}},
    }, {"name": "worker", "image": "busybox", "livenessProbe": {"tcpSocket": {"port": 9000}}}])


def test_in_strict_mode_http_probes_go_through_the_sidecars_admin_port() -> None:
    injected = inject(probed(**{"config.nsm.nginx.com/mtls-mode": "strict"}), VALUES)
    web = container(injected, "web")
    assert web["readinessProbe"] == {"httpGet": {"path": "/app-health/web/readyz", "port": 15021, "scheme": "HTTP"},
                                     "periodSeconds": 3}
    assert web["livenessProbe"]["httpGet"] == {"path": "/app-health/web/livez", "port": 15021, "scheme": "HTTP"}
    assert web["startupProbe"]["httpGet"]["host"] == "10.0.0.9"  # a probe to another host is not the pod's
    assert container(injected, "worker")["livenessProbe"] == {"tcpSocket": {"port": 9000}}
    env = {e["name"]: e.get("value") for e in container(injected, SIDECAR_NAME)["env"]}
    assert json.loads(env[PROBES_ENV]) == {
        "/app-health/web/readyz": {"port": 8080, "path": "/healthz", "scheme": "HTTP",
                                   "httpHeaders": [{"name": "X", "value": "1"}]},
        "/app-health/web/livez": {"port": 8080, "path": "/live", "scheme": "HTTPS"},
    }


@pytest.mark.parametrize(("chart_mode", "annotation", "rewritten"), [
    ("permissive", None, False),
    ("strict", None, True),
    ("permissive", "strict", True),
    ("strict", "permissive", False),
    ("strict", "off", False),
])
def test_the_pods_mtls_mode_annotation_wins_over_the_charts(chart_mode: str, annotation: str | None,
                                                           rewritten: bool) -> None:
    p = probed(**({"config.nsm.nginx.com/mtls-mode": annotation} if annotation else {}))
    injected = inject(p, values_with(**{"mtls.mode": chart_mode}))
    assert (container(injected, "web")["readinessProbe"]["httpGet"]["port"] == 15021) is rewritten
    assert any(e["name"] == PROBES_ENV for e in container(injected, SIDECAR_NAME)["env"]) is rewritten


@pytest.mark.parametrize(("annotation", "value", "field"), [
    ("config.nsm.nginx.com/mtls-mode", "strictest", 'metadata.annotations["config.nsm.nginx.com/mtls-mode"]'),
    ("config.nsm.nginx.com/ignore-incoming-ports", "80,http",
     'metadata.annotations["config.nsm.nginx.com/ignore-incoming-ports"]'),
    ("config.nsm.nginx.com/ignore-outgoing-ports", "70000",
     'metadata.annotations["config.nsm.nginx.com/ignore-outgoing-ports"]'),
])
def test_an_annotation_that_cannot_be_honoured_is_an_error_naming_it(annotation: str, value: str,
                                                                     field: str) -> None:
    with pytest.raises(InjectError) as caught:
        patch(pod(annotations={annotation: value}), VALUES)
    assert caught.value.field == field and repr(value) in caught.value.message


# ---------------------------------------------------------------------------------------------- values ---
def test_the_charts_own_values_drive_injection() -> None:
    values = InjectionValues.from_values(yaml.safe_load(CHART_VALUES.read_text()))
    assert values.ports.admin == 15021 and values.sidecar_uid == 2102
    assert values.failure_policy in set(FailurePolicy)


def test_the_contracts_values_are_read_exactly() -> None:
    assert VALUES.mtls_mode is MtlsMode.PERMISSIVE and VALUES.socket_dir == "/run/meshloom/agent"
    assert VALUES.sidecar_image.ref == "ghcr.io/meshloom/sidecar:0.1.0" and VALUES.drain_seconds == 20
    assert VALUES.failure_policy is FailurePolicy.IGNORE and VALUES.timeout_seconds == 5


@pytest.mark.parametrize(("dotted", "value", "message"), [
    ("sidecar.ports.admin", "x", "values: sidecar.ports.admin: must be a whole number from 1 to 65535, got 'x'"),
    ("sidecar.ports.admin", 15001, "values: sidecar.ports: inbound, outbound, admin and metrics must be four "
                                   "different ports"),
    ("mtls.mode", "on", "values: mtls.mode: must be one of off, permissive, strict, got 'on'"),
    ("sidecar.image.tag", 0.1, "values: sidecar.image.tag: must be a string, got 0.1"),
    ("init.image.pullPolicy", "Sometimes", "values: init.image.pullPolicy: must be one of Always, IfNotPresent, "
                                           "Never, got 'Sometimes'"),
    ("sidecar.resources.requests.cpu", "lots", "values: sidecar.resources.requests.cpu: must be a Kubernetes "
                                               "quantity (e.g. 50m, 128Mi), got 'lots'"),
    ("injection.ignoreIncomingPorts", [80, 0], "values: injection.ignoreIncomingPorts[1]: must be a whole number "
                                               "from 1 to 65535, got 0"),
    ("injection.failurePolicy", "Maybe", "values: injection.failurePolicy: must be one of Ignore, Fail, got "
                                         "'Maybe'"),
    ("injection.timeoutSeconds", 60, "values: injection.timeoutSeconds: must be a whole number from 1 to 30, "
                                     "got 60"),
    ("nodeAgent.socketDir", "run/agent", "values: nodeAgent.socketDir: must be an absolute path without '%', got "
                                         "'run/agent'"),
    ("sidecar.uid", 0, "values: sidecar.uid: must be a whole number from 1 to 2147483647, got 0"),
])
def test_a_wrong_value_is_one_line_naming_its_key(dotted: str, value: Any, message: str) -> None:
    with pytest.raises(InjectionValuesError) as caught:
        values_with(**{dotted: value})
    assert str(caught.value) == message


def test_missing_sections_are_all_named_at_once() -> None:
    with pytest.raises(InjectionValuesError) as caught:
        InjectionValues.from_values({"trustDomain": "example.org"}, "my-values.yaml")
    text = str(caught.value)
    assert "\n" not in text and text.startswith("my-values.yaml: ")
    assert all(f"{key}: is required" in text for key in ("mtls", "nodeAgent", "sidecar", "init", "injection"))
    with pytest.raises(InjectionValuesError, match="must be a mapping"):
        InjectionValues.from_values(["not", "a", "mapping"])


# ------------------------------------------------------------------------------------------- admission ---
def admission_review(obj: Any, *, uid: str = "e911857d-c318-11e8-bbad-025000000001", kind: str = "Pod",
                     operation: str = "CREATE", namespace: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "kind": {"group": "", "version": "v1", "kind": kind},
        "resource": {"group": "", "version": "v1", "resource": kind.lower() + "s"},
        "namespace": namespace, "operation": operation, "object": obj,
        "userInfo": {"username": "admin"}, "dryRun": False}}


def test_a_pod_in_an_enabled_namespace_is_answered_with_the_patch_that_injects_it() -> None:
    p = pod()
    answer = admission_response(admission_review(p), VALUES, {"shop": ENABLED})
    response = answer["response"]
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert response["uid"] == "e911857d-c318-11e8-bbad-025000000001" and response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    assert apply_patch(p, ops) == inject(p, VALUES)  # the webhook and the CLI: one code path
    assert response["auditAnnotations"] == {"decision": "inject: namespace-enabled"}
    assert "warnings" not in response


def test_a_skipped_pod_is_allowed_unchanged_with_its_reason() -> None:
    answer = admission_response(admission_review(pod(labels={LABEL: "disabled"})), VALUES, {"shop": ENABLED})
    assert answer["response"] == {"uid": "e911857d-c318-11e8-bbad-025000000001", "allowed": True,
                                  "auditAnnotations": {"decision": "skip: pod-disabled"}}
    # Nobody asked for this one: not a word to the user. One that asked but cannot be meshed gets a warning.
    blocked = admission_response(admission_review(pod(hostNetwork=True)), VALUES, {"shop": ENABLED})["response"]
    assert blocked["allowed"] is True and "patch" not in blocked
    assert blocked["warnings"] == [f"meshloom: pod not injected: {REASON_TEXT[InjectReason.HOST_NETWORK]}"]
    assert InjectReason.HOST_NETWORK in BLOCKED


def test_the_namespace_lookup_may_be_a_function_and_an_unknown_namespace_is_skipped() -> None:
    asked: list[str] = []

    def lookup(name: str) -> dict[str, str] | None:
        asked.append(name)
        return None

    outcome = admit(admission_review(pod()), VALUES, lookup)
    assert asked == ["shop"] and outcome.decision == Decision(False, InjectReason.NAMESPACE_UNKNOWN)


def test_a_pod_whose_annotation_cannot_be_honoured_is_refused_naming_it() -> None:
    p = pod(annotations={"config.nsm.nginx.com/mtls-mode": "always"})
    response = admission_response(admission_review(p), VALUES, {"shop": ENABLED})["response"]
    assert response["allowed"] is False and response["status"]["code"] == 400
    assert 'metadata.annotations["config.nsm.nginx.com/mtls-mode"]' in response["status"]["message"]


@pytest.mark.parametrize(("review", "message"), [
    ("not a review", "the body must be a JSON object"),
    ({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "u"}},
     "apiVersion/kind: must be admission.k8s.io/v1 AdmissionReview"),
    ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "request: must be an object"),
    ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"kind": {"kind": "Pod"}}},
     "request.uid: must be a non-empty string"),
])
def test_a_review_with_no_uid_to_answer_is_a_bad_review(review: Any, message: str) -> None:
    with pytest.raises(BadReview, match=message.replace(".", r"\.")):
        admission_response(review, VALUES, {})


@pytest.mark.parametrize(("obj", "message"), [
    (None, "request.object: must be the pod, got NoneType"),
    ({"metadata": {}}, "request.object.spec.containers: must be a list"),
    ({"spec": {"containers": "web"}}, "request.object.spec.containers: must be a list"),
])
def test_a_malformed_pod_is_refused_naming_the_field(obj: Any, message: str) -> None:
    response = admission_response(admission_review(obj), VALUES, {"shop": ENABLED})["response"]
    assert response["allowed"] is False and response["status"] == {"code": 400, "message": message}


def test_a_review_without_namespace_takes_the_pods_own() -> None:
    review = admission_review(pod(), namespace="")
    assert admit(review, VALUES, {"shop": ENABLED}).decision == Decision(True, InjectReason.NAMESPACE_ENABLED)


# ----------------------------------------------------------------------------------- workload documents ---
def golden_inputs() -> list[Path]:
    return sorted(p for p in GOLDEN.iterdir() if ".in." in p.name)


@pytest.mark.parametrize("source", golden_inputs(), ids=lambda p: p.name.split(".")[0])
def test_each_kind_is_injected_as_its_golden_copy_says(source: Path) -> None:
    """The data behind `meshctl inject`'s golden output (tests/meshctl/test_inject_cli.py compares the text)."""
    expected = GOLDEN / source.name.replace(".in.", ".out.")
    assert expected.exists(), f"{expected} is missing: run MESHLOOM_UPDATE_GOLDEN=1 pytest tests/meshctl"
    docs = [d for d in yaml.safe_load_all(source.read_text()) if d is not None]
    got = [inject_document(d, VALUES).document for d in docs]
    want = [d for d in yaml.safe_load_all(expected.read_text()) if d is not None]
    assert got == want


def test_every_workload_kind_is_injected_in_its_pod_template() -> None:
    for source in golden_inputs():
        for doc in yaml.safe_load_all(source.read_text()):
            result = inject_document(doc, VALUES)
            for item in (doc["items"] if doc["kind"] == "List" else [doc]):
                if item["kind"] in ("Service", "ConfigMap"):
                    continue
                template = item if item["kind"] == "Pod" else \
                    item["spec"]["jobTemplate"]["spec"]["template"] if item["kind"] == "CronJob" else \
                    item["spec"]["template"]
                assert decide(template.get("metadata", {}), template["spec"], None, manual=True).inject == \
                    any(o.decision.inject for o in result.outcomes if o.name.endswith(item["metadata"]["name"]))


def test_a_workload_whose_annotation_cannot_be_honoured_names_document_and_field() -> None:
    deployment = yaml.safe_load((GOLDEN / "deployment.in.yaml").read_text())
    deployment["spec"]["template"]["metadata"]["annotations"]["config.nsm.nginx.com/ignore-outgoing-ports"] = "db"
    with pytest.raises(ValidationError) as caught:
        inject_document(deployment, VALUES)
    assert str(caught.value) == (
        'Deployment shop/api: spec.template.metadata.annotations["config.nsm.nginx.com/ignore-outgoing-ports"]: '
        "must be port numbers (1-65535) separated by commas, got 'db'")


def test_a_list_keeps_its_shape_and_reports_each_item() -> None:
    doc = yaml.safe_load((GOLDEN / "list.in.yaml").read_text())
    result = inject_document(doc, VALUES)
    assert result.document["kind"] == "List" and len(result.document["items"]) == 3
    assert [(o.name, o.decision.reason) for o in result.outcomes] == [
        ("Service/front", InjectReason.NOT_A_WORKLOAD), ("Deployment/front", InjectReason.REQUESTED),
        ("Pod/debug", InjectReason.POD_DISABLED)]
    assert result.document["items"][0] == doc["items"][0] and result.document["items"][2] == doc["items"][2]
