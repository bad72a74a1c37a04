"""`meshctl deploy` and `meshctl remove`: the chart into the session's real API server and out again, settings
converging on a second deploy, and one-line errors with their exit codes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from meshctl.cli import main
from tests.support.kube import KubeAPI, unique_name


@pytest.fixture
def helm_env(kube_api: KubeAPI, monkeypatch: pytest.MonkeyPatch) -> Iterator[KubeAPI]:
    """The session's server as meshctl's default cluster, and the cached helm as its helm."""
    for key, value in kube_api.env().items():
        if key.startswith("HELM_") or key == "KUBECONFIG":
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("MESHLOOM_HELM", str(kube_api.helm))
    yield kube_api


@pytest.mark.integration
def test_deploy_installs_the_mesh_then_converges_it_and_remove_takes_it_away(
        helm_env: KubeAPI, capsys: pytest.CaptureFixture[str]) -> None:
    ns = unique_name("meshloom")
    kubeconfig = str(helm_env.kubeconfig)
    try:
        assert main(["deploy", "--namespace", ns, "--kubeconfig", kubeconfig,
                     "--set", "injection.failurePolicy=Fail"]) == 0
        assert capsys.readouterr().out.strip() == f"meshloom deployed in namespace {ns} (helm release meshloom)"
        with helm_env.api_client() as api:
            webhook = client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration("meshloom-injector")
            assert webhook.webhooks[0].failure_policy == "Fail"

            assert main(["deploy", "-n", ns, "--set", "mtls.mode=strict"]) == 0  # $KUBECONFIG this time
            assert capsys.readouterr().out.strip() == f"meshloom upgraded in namespace {ns} (helm release meshloom)"
            config = client.CoreV1Api(api).read_namespaced_config_map("meshloom-injection", ns)
            assert yaml.safe_load(config.data["values.yaml"])["mtls"]["mode"] == "strict"

            assert main(["remove", "--namespace", ns, "--kubeconfig", kubeconfig]) == 0
            assert "meshloom removed from namespace" in capsys.readouterr().out
            with pytest.raises(ApiException) as caught:
                client.AppsV1Api(api).read_namespaced_deployment("meshloom-controller", ns)
            assert caught.value.status == 404
    finally:
        main(["remove", "--namespace", ns])
        capsys.readouterr()


@pytest.mark.integration
def test_remove_where_nothing_is_deployed_says_so_and_exits_3(helm_env: KubeAPI,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    ns = unique_name("nothing")
    assert main(["remove", "--namespace", ns]) == 3
    err = capsys.readouterr().err
    assert err == f"meshctl: meshloom is not deployed in namespace {ns} (no helm release 'meshloom')\n"


@pytest.mark.integration
def test_deploy_with_values_the_schema_refuses_changes_nothing_and_exits_7(
        helm_env: KubeAPI, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ns = unique_name("meshloom")
    values = tmp_path / "values.yaml"
    values.write_text("mtls:\n  mode: paranoid\n")
    assert main(["deploy", "--namespace", ns, "--values", str(values)]) == 7
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mtls.mode" in err and "values.schema.json rejects" in err
    assert main(["remove", "--namespace", ns]) == 3  # no release was made
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["deploy", "--set", "mtls.mode"], "meshctl: --set: 'mtls.mode' is not KEY=VALUE"),
    (["deploy", "--values", "/nonexistent/values.yaml"], "meshctl: --values: /nonexistent/values.yaml does not exist"),
    (["deploy", "--kubeconfig", "/nonexistent/kubeconfig"], "meshctl: --kubeconfig: /nonexistent/kubeconfig does not"),
    (["remove", "--kubeconfig", "/nonexistent/kubeconfig"], "meshctl: --kubeconfig: /nonexistent/kubeconfig does not"),
    (["deploy", "--chart", "/nonexistent"], "meshctl: --chart: /nonexistent is not a Helm chart"),
], ids=["set without =", "missing values file", "missing kubeconfig", "remove, missing kubeconfig", "no chart"])
def test_a_mistaken_flag_is_one_line_and_exit_code_2(args: list[str], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_without_helm_deploy_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MESHLOOM_HELM", raising=False)
    monkeypatch.setenv("MESHLOOM_KUBE_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["deploy", "--dry-run"]) == 2
    assert "helm is not installed: run scripts/kube" in capsys.readouterr().err


def test_a_dry_run_prints_the_manifests_and_touches_no_cluster(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from actions.helm import HelmNotFound, find_helm

    try:
        find_helm()
    except HelmNotFound as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc} (CI=true: the deploy tests must run)", pytrace=False)
        pytest.skip(str(exc))
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    assert main(["deploy", "--dry-run", "-n", "mesh-system", "--set", "mtls.mode=off"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "MutatingWebhookConfiguration"} <= kinds
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["metadata"]["namespace"] == "mesh-system"
    assert yaml.safe_load(config["data"]["values.yaml"])["mtls"]["mode"] == "off"
