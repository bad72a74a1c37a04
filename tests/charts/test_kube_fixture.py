"""The test API server itself (tests/support/kube.py): what it says when its binaries are missing, and the parts of
a cluster it plays (a Node, the scheduler's binding, the kubelet's status) do what the controller will read."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from tests.support.kube import BUILD_HINT, KubeAPI, KubeUnavailable, find_binaries, start_kube_api


def test_without_the_binaries_the_server_says_to_run_scripts_kube(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("MESHLOOM_KUBE_CACHE", str(tmp_path))
    with pytest.raises(KubeUnavailable) as caught:
        find_binaries()
    assert BUILD_HINT in str(caught.value) and str(tmp_path) in str(caught.value)
    with pytest.raises(KubeUnavailable):
        start_kube_api()


@pytest.mark.integration
def test_a_pod_can_be_scheduled_and_reported_running_as_a_scheduler_and_kubelet_would(kube_api: KubeAPI) -> None:
    ns = kube_api.unique_namespace("fixture", labels={"injector.nsm.nginx.com/auto-inject": "enabled"})
    node = kube_api.create_node()
    with kube_api.api_client() as api:
        core = client.CoreV1Api(api)
        assert core.read_node(node).status.conditions[0].type == "Ready"
        core.create_namespaced_pod(ns, {"metadata": {"name": "web-1", "labels": {"app": "web"}},
                                        "spec": {"serviceAccountName": "web",
                                                 "containers": [{"name": "app", "image": "example/web"}]}})
        kube_api.bind_pod(ns, "web-1", node)
        kube_api.set_pod_running(ns, "web-1", "10.0.1.1")
        pod = core.read_namespaced_pod("web-1", ns)
        assert (pod.spec.node_name, pod.status.phase, pod.status.pod_ip) == (node, "Running", "10.0.1.1")
        assert pod.spec.service_account_name == "web"
        ready = {c.type: c.status for c in pod.status.conditions}
        assert ready["Ready"] == "True"
        assert core.read_namespace(ns).metadata.labels["injector.nsm.nginx.com/auto-inject"] == "enabled"
    out = kube_api.kubectl_run("get", "pod", "web-1", "-n", ns, "-o", "jsonpath={.status.podIP}").stdout
    assert out == "10.0.1.1"
