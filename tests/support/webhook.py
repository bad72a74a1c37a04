"""The injection webhook wired to a real API server, for the integration tests and bench/webhook.py.

`running_injector(api, ...)` starts `actions.webhook.WebhookServer` on 127.0.0.1 with `catalog.inject.admit` as
its handler, registers the chart's own MutatingWebhookConfiguration (rendered by `helm template`, so the test runs
what `helm install` installs) with `clientConfig.url` pointing at it and the test CA in `caBundle`, waits until the
API server calls it, and removes the configuration at the end.

Two things differ from the cluster, each for a reason:
- the configuration is renamed (unique per run: cluster-scoped objects outlive a test in the session's API server)
  and its namespaceSelector also requires a label unique to the run, so that only the caller's namespaces reach
  this webhook, whatever other tests create meanwhile;
- the serving certificate comes from a throwaway CA with an IP SAN 127.0.0.1 (the API server checks the URL's
  host; the mesh CA issues DNS SANs only, which is what the in-cluster Service name needs).
The namespace labels come from `NamespaceLabels`, a cache filled from the API server on first use: what the
controller's watch cache answers, without the watch.
"""

from __future__ import annotations

import base64
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from actions.webhook import Served, WebhookServer
from catalog.inject import SIDECAR_NAME, Admission, InjectionValues, admit
from tests.support.kube import serving_certificate, unique_name

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "meshloom"
GOLDEN_VALUES = REPO / "tests" / "catalog" / "golden" / "inject" / "values.yaml"
RUN_LABEL = "meshloom.io/test-webhook"  # on the namespaces whose pods this run's webhook may see


def contract_values() -> InjectionValues:
    return InjectionValues.from_values(yaml.safe_load(GOLDEN_VALUES.read_text()))


def chart_webhook_configuration(helm: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """The chart's MutatingWebhookConfiguration, as `helm template` renders it with the chart's defaults."""
    done = subprocess.run([str(helm), "template", "meshloom", str(CHART), "--namespace", "meshloom",
                           "--show-only", "templates/webhook.yaml"], env=dict(env), capture_output=True, text=True,
                          check=True, timeout=120)
    doc: dict[str, Any] = yaml.safe_load(done.stdout)
    assert doc["kind"] == "MutatingWebhookConfiguration", doc
    return doc


def for_test(chart: Mapping[str, Any], *, name: str, url: str, ca_pem: bytes, run: str) -> dict[str, Any]:
    """The chart's configuration pointed at `url`, renamed, and narrowed to namespaces labelled for this run."""
    doc = yaml.safe_load(yaml.safe_dump(chart))  # a deep copy
    doc["metadata"] = {"name": name}
    for hook in doc["webhooks"]:
        hook["clientConfig"] = {"url": url, "caBundle": base64.b64encode(ca_pem).decode()}
        selector = hook.setdefault("namespaceSelector", {})
        selector.setdefault("matchExpressions", []).append(
            {"key": RUN_LABEL, "operator": "In", "values": [run]})
    return doc


class NamespaceLabels:
    """Namespace -> labels, read from the API server once per namespace (None: no such namespace)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api_client)
        self._cache: dict[str, Mapping[str, str] | None] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str) -> Mapping[str, str] | None:
        from kubernetes.client.rest import ApiException

        with self._lock:
            if name in self._cache:
                return self._cache[name]
        try:
            labels: Mapping[str, str] | None = self._core.read_namespace(name).metadata.labels or {}
        except ApiException as exc:
            if exc.status != 404:
                raise
            labels = None
        with self._lock:
            self._cache[name] = labels
        return labels


@dataclass(frozen=True)
class Seen:
    """One review the webhook answered: for which pod (a generateName pod has no name yet: its prefix), and how."""

    namespace: str
    name: str
    admission: Admission

    @property
    def verdict(self) -> str:
        """`inject: <reason>` or `skip: <reason>`; `refused: <message>` for an error answer."""
        d = self.admission.decision
        if d is None:
            return f"refused: {self.admission.error}"
        return f"{'inject' if d.inject else 'skip'}: {d.reason.value}"


@dataclass
class Injector:
    server: WebhookServer
    run: str  # the value of RUN_LABEL that lets a namespace's pods reach this webhook
    configuration: str  # the MutatingWebhookConfiguration's name
    namespaces: NamespaceLabels  # the handler's namespace lookup
    seen: list[Seen] = field(default_factory=list)  # every review answered, in order
    served: list[Served] = field(default_factory=list)  # every request, as the server timed it

    def namespace_labels(self, **labels: str) -> dict[str, str]:
        """Labels for a namespace whose pods this webhook sees: the run's label plus `labels`."""
        return {RUN_LABEL: self.run, **labels}

    def verdicts(self, namespace: str, name: str) -> list[str]:
        return [s.verdict for s in list(self.seen) if (s.namespace, s.name) == (namespace, name)]


@contextmanager
def running_injector(kube: Any, *, values: InjectionValues | None = None, name_prefix: str = "meshloom-test-injector",
                     io_timeout: float = 30.0) -> Iterator[Injector]:
    """The webhook server and its registration; see the module docstring. `kube` is a `tests.support.kube.KubeAPI`."""
    from kubernetes import client

    values = values or contract_values()
    serving = serving_certificate("meshloom-controller")
    run = unique_name("run")
    name = unique_name(name_prefix)
    with kube.api_client() as api:
        lookup = NamespaceLabels(api)
        seen: list[Seen] = []
        served: list[Served] = []

        def handler(body: Any) -> Mapping[str, Any]:
            outcome = admit(body, values, lookup)
            request = body.get("request") if isinstance(body, dict) else None
            request = request if isinstance(request, dict) else {}
            obj = request.get("object") if isinstance(request.get("object"), dict) else {}
            meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
            seen.append(Seen(str(request.get("namespace") or ""),
                             str(meta.get("name") or meta.get("generateName") or ""), outcome))
            return outcome.review

        server = WebhookServer(handler, serving.cert_pem, serving.key_pem, host="127.0.0.1", port=0,
                               io_timeout=io_timeout, on_request=served.append)
        server.start()
        admission = client.AdmissionregistrationV1Api(api)
        try:
            chart = chart_webhook_configuration(kube.helm, kube.env())
            admission.create_mutating_webhook_configuration(
                for_test(chart, name=name, url=server.url, ca_pem=serving.ca_pem, run=run))
            injector = Injector(server, run, name, lookup, seen, served)
            _wait_until_called(api, kube, injector)
            seen.clear()  # list.append and list.clear are atomic: the handler's threads need no lock
            served.clear()
            yield injector
        finally:
            try:
                admission.delete_mutating_webhook_configuration(name)
            finally:
                server.stop()


def _wait_until_called(api: Any, kube: Any, injector: Injector, timeout: float = 60.0) -> None:
    """The API server loads webhook configurations through an informer: poll with a dry-run pod until ours runs."""
    from kubernetes import client

    namespace = kube.unique_namespace("webhook-warmup", labels=injector.namespace_labels(
        **{"injector.nsm.nginx.com/auto-inject": "enabled"}))
    core = client.CoreV1Api(api)
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "warmup"},
            "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "busybox"}]}}
    deadline = time.monotonic() + timeout
    while True:
        created = core.create_namespaced_pod(namespace, body, dry_run="All")
        if any(c.name == SIDECAR_NAME for c in created.spec.containers):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the API server did not call the webhook within {timeout:.0f} s")
        time.sleep(0.2)
