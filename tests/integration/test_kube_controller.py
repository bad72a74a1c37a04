"""The controller against a real kube-apiserver (tests/support/kube.py): the test plays the scheduler and the kubelet.

A pod injected by the controller's own webhook walks its lifecycle as it is bound, runs and is deleted; a TrafficSplit
created with the client changes the sidecars' documents; a watch cut mid-stream loses nothing; a 410 Gone makes the
controller list again and converge; two controllers on one Lease take turns.

`ApiProxy` sits between the controller and the API server on 127.0.0.1 (TLS on both sides, its own certificate): it
can cut every open connection, refuse new ones for a while, and answer a watch with the ERROR event the API server
sends for a resourceVersion it no longer has (this API server keeps a long history in its watch cache, so a 410 does
not come by itself within a test).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from actions.ca import CaSettings
from actions.kube import NAMESPACE, POD, SERVICE, WATCHED, ClientApi, Reflector
from meshctl.cli import main
from meshctl.controller import Controller, ControllerConfig, load_values
from store import Store, migrate, sqlite_url
from tests.support.kube import KubeAPI, unique_name
from tests.support.wait import eventually as wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "meshloom"
BOUND = 60.0  # seconds any condition may take on two busy cores; a bound on waiting, not a measurement


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- a proxy in front of the API server ---------------------------------------------------------------------------
def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshloom test proxy")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "proxy.crt", folder / "proxy.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class ApiProxy:
    """HTTPS in, HTTPS out, one request per connection; `cut`, `hold` and `gone` for the tests."""

    def __init__(self, kube: KubeAPI, folder: Path) -> None:
        self.upstream = urlsplit(kube.url)
        self.upstream_tls = ssl.create_default_context(cafile=str(kube.ca_file))
        self.cert, key = _self_signed(folder)
        self.held = False
        self.gone_watches: dict[str, int] = {}  # collection path -> how many watches to answer with 410
        self.watches: list[str] = []
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.serve(self)

            do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(self.cert, key)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.cut()

    def cut(self) -> int:
        with self._lock:
            opened = list(self._open)
        for s in opened:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(opened)

    def _track(self, s: socket.socket, on: bool) -> None:
        with self._lock:
            (self._open.add if on else self._open.discard)(s)

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        if self.held:  # the server is "away": the connection drops at once
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        path, _, query = h.path.partition("?")
        watch = "watch=true" in query or "watch=1" in query
        if watch:
            with self._lock:
                self.watches.append(path)
                gone = self.gone_watches.get(path, 0)
                if gone:
                    self.gone_watches[path] = gone - 1
            if gone:
                self._answer_gone(h)
                return
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        up = http.client.HTTPSConnection(self.upstream.hostname, self.upstream.port, context=self.upstream_tls)
        headers = {k: v for k, v in h.headers.items() if k.lower() in ("authorization", "content-type", "accept")}
        self._track(h.connection, True)
        try:
            up.request(h.command, h.path, body=body, headers=headers)
            if up.sock is not None:
                self._track(up.sock, True)
            resp = up.getresponse()
            h.send_response(resp.status)
            h.send_header("Content-Type", resp.getheader("Content-Type") or "application/json")
            h.send_header("Connection", "close")
            if watch and resp.status == 200:
                h.send_header("Transfer-Encoding", "chunked")
                h.end_headers()
                while chunk := resp.read1(65536):
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    h.wfile.flush()
                h.wfile.write(b"0\r\n\r\n")
            else:
                data = resp.read()
                h.send_header("Content-Length", str(len(data)))
                h.end_headers()
                h.wfile.write(data)
        except (OSError, http.client.HTTPException):
            pass  # cut
        finally:
            if up.sock is not None:
                self._track(up.sock, False)
            self._track(h.connection, False)
            up.close()

    @staticmethod
    def _answer_gone(h: BaseHTTPRequestHandler) -> None:
        """What kube-apiserver sends for a watch from a resourceVersion its history no longer holds."""
        event = json.dumps({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version: 1 (99999)", "reason": "Expired", "code": 410}}).encode() + b"\n"
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))


# ---- fixtures -------------------------------------------------------------------------------------------------------
def client_api(kube: KubeAPI, url: str | None = None, ca: Path | None = None) -> ClientApi:
    """The controller's seam on the admin's credentials, to the API server or to the proxy in front of it."""
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = url or kube.url
    configuration.ssl_ca_cert = str(ca or kube.ca_file)
    configuration.api_key = {"authorization": kube.token}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    configuration.connection_pool_maxsize = 32
    return ClientApi(client.ApiClient(configuration))


def install_crds(kube: KubeAPI) -> None:
    """The chart's CRDs (cluster-scoped: shared by the session, so applied, never created twice)."""
    kube.kubectl_run("apply", "-f", str(CHART / "crds"))
    for crd in sorted((CHART / "crds").glob("*.yaml")):
        name = yaml.safe_load(crd.read_text())["metadata"]["name"]
        kube.kubectl_run("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")


class Rig:
    def __init__(self, kube: KubeAPI, tmp: Path) -> None:
        self.kube, self.tmp = kube, tmp
        self.direct = client_api(kube)
        self.controllers: list[tuple[Controller, Store]] = []
        self.proxy: ApiProxy | None = None

    def controller(self, name: str, *, through_proxy: bool = False, webhook: str | None = None,
                   webhook_port: int = 0, **kw: Any) -> Controller:
        state = self.tmp / name
        state.mkdir()
        url = sqlite_url(state)
        migrate.upgrade(url)
        store = Store(url)
        if through_proxy:
            self.proxy = self.proxy or ApiProxy(self.kube, self.tmp)
            api = client_api(self.kube, self.proxy.url, self.proxy.cert)
        else:
            api = client_api(self.kube)
        values, ca = load_values(CHART / "values.yaml")
        settings: dict[str, Any] = {"state_dir": state, "namespace": kw.pop("namespace", "meshloom"), "ca": ca,
                                    "injection": values if webhook else None, "webhook_host": "127.0.0.1",
                                    "webhook_port": webhook_port, "webhook_names": ("localhost",),
                                    "webhook_configuration": webhook or "none", "nats": False,
                                    "leader_elect": False, "identity": name, "watch_timeout": 30.0}
        settings.update(kw)
        c = Controller(api, store, ControllerConfig(**settings))
        self.controllers.append((c, store))
        return c

    def close(self) -> None:
        for c, store in self.controllers:
            c.stop()
            store.close()
        if self.proxy is not None:
            self.proxy.close()


@pytest.fixture
def rig(kube_api: KubeAPI, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(kube_api, tmp_path)
    try:
        yield r
    finally:
        r.close()


def meshed_pod(ns: str, name: str, account: str = "web", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"app": "web", "meshloom.io/injected": "true", **(labels or {})},
                         "annotations": {"meshloom.io/injected": "true"}},
            "spec": {"serviceAccountName": account,
                     "containers": [{"name": "app", "image": "app:1", "ports": [{"name": "http",
                                                                                  "containerPort": 8080}]}]}}


def service(ns: str, name: str, selector: dict[str, str], port: int = 80) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": selector, "ports": [{"name": "http", "port": port, "targetPort": 8080,
                                                      "protocol": "TCP"}]}}


def create(api: ClientApi, obj: dict[str, Any]) -> dict[str, Any]:
    ns = obj["metadata"]["namespace"]
    plural = {"Pod": "pods", "Service": "services"}[obj["kind"]]
    result: dict[str, Any] = api.request("POST", f"/api/v1/namespaces/{ns}/{plural}", body=obj)
    return result


def names_in_world(store: Store, kind: str, ns: str) -> list[str]:
    return sorted(r.name for r in store.resources(kind=kind, namespace=ns))


# ---- (a) a pod's lifecycle, injected by the controller's own webhook ----------------------------------------------
def test_a_pod_injected_by_the_webhook_walks_its_lifecycle_as_it_is_bound_runs_and_is_deleted(rig, capsys):
    kube = rig.kube
    mark = unique_name("mark")
    ns = kube.unique_namespace("life", labels={"injector.nsm.nginx.com/auto-inject": "enabled", "test": mark})
    hook = unique_name("injector")
    port = free_port()
    # The chart's webhook, pointed at this process and at this test's namespace only; no caBundle yet.
    kube.kubectl_run("apply", "-f", "-", input=json.dumps({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": hook},
        "webhooks": [{"name": "injector.meshloom.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                      "failurePolicy": "Fail", "timeoutSeconds": 10,
                      "clientConfig": {"url": f"https://localhost:{port}/inject"},
                      "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                 "resources": ["pods"], "scope": "Namespaced"}],
                      "namespaceSelector": {"matchLabels": {"test": mark}}}]}))
    try:
        controller = rig.controller("life", webhook=hook, webhook_port=port)
        controller.start()
        assert controller.wait_leading(BOUND)
        bundle = wait_for(lambda: rig.direct.request(
            "GET", f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{hook}",
        )["webhooks"][0]["clientConfig"].get("caBundle"), "the caBundle")
        assert b"BEGIN CERTIFICATE" in base64.b64decode(bundle)
        plane = controller.plane
        assert plane is not None

        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": ns,
                                                               "labels": {"app": "web"}},
               "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "app:1"}]}}
        created = create(rig.direct, pod)
        assert created["metadata"]["labels"]["meshloom.io/injected"] == "true"  # injected at admission
        assert "meshloom-sidecar" in [c["name"] for c in created["spec"]["containers"]]
        key = f"{ns}/web-1"

        def state() -> str | None:
            row = plane.store.get("pod", key)
            return row.state if row is not None else None

        wait_for(lambda: state() == "injected", "admitted and injected")
        node = kube.create_node()
        kube.bind_pod(ns, "web-1", node)
        # The kubelet's report: running, Ready, the containers started. The sidecar's start connects the pod
        # (its certificate issued first), and its first document goes out; the sidecar acknowledges it.
        kube.set_pod_running(ns, "web-1", "10.244.1.7", ready=True, containers=("app", "meshloom-sidecar"))
        wait_for(lambda: (plane.store.get("sidecar", key) or _Nothing).state == "sent", "the first document sent")
        plane.engine.fire("sidecar", key, "ack", {"generation": 1}, actor="sidecar")
        wait_for(lambda: state() == "ready", "ready, once the Ready condition meets the synced configuration")

        rig.direct.request("DELETE", f"/api/v1/namespaces/{ns}/pods/web-1")  # graceful: a deletionTimestamp
        wait_for(lambda: state() == "gone", "terminated and gone")
        rig.direct.request("DELETE", f"/api/v1/namespaces/{ns}/pods/web-1", query=[("gracePeriodSeconds", "0")])
        wait_for(lambda: names_in_world(plane.store, "pod", ns) == [], "the pod out of the world")

        capsys.readouterr()
        assert main(["audit", f"pod/{key}", "--db", sqlite_url(rig.tmp / "life"), "-o", "json"]) == 0
        journal = json.loads(capsys.readouterr().out)
        assert [row["to_state"] for row in journal] == [
            "admitted", "injected", "scheduled", "identity-requested", "identity-issued", "sidecar-connected",
            "config-synced", "ready", "terminating", "gone"]
        by_state = {row["to_state"]: row for row in journal}
        assert by_state["admitted"]["actor"] == "kube" and by_state["scheduled"]["actor"] == "kube"
        assert by_state["ready"]["actor"] == "kube" and by_state["terminating"]["actor"] == "kube"
        assert by_state["sidecar-connected"]["actor"] == "kube"
        row = plane.store.get("pod", key)
        assert row is not None and row.data["node"] == node and row.data["ip"] == "10.244.1.7"
    finally:
        kube.kubectl_run("delete", "mutatingwebhookconfiguration", hook, "--ignore-not-found")


class _Nothing:
    state = None


def test_a_pod_deleted_and_created_again_under_its_name_rejoins_the_mesh(rig):
    ns = rig.kube.unique_namespace("again")
    controller = rig.controller("again", watched=(NAMESPACE, SERVICE, POD))
    controller.start()
    assert controller.wait_leading(BOUND)
    store, key = controller.store, f"{ns}/web-0"

    def state() -> str | None:
        return (store.get("pod", key) or _Nothing).state

    create(rig.direct, meshed_pod(ns, "web-0"))
    wait_for(lambda: state() == "injected", "the first web-0 admitted")
    rig.direct.request("DELETE", f"/api/v1/namespaces/{ns}/pods/web-0")  # on no node yet: removed at once
    wait_for(lambda: state() == "gone", "the first web-0 gone")
    create(rig.direct, meshed_pod(ns, "web-0", account="web-v2"))  # as a StatefulSet makes it again
    wait_for(lambda: state() == "injected", "the second web-0 admitted")
    rig.kube.bind_pod(ns, "web-0", rig.kube.create_node())
    rig.kube.set_pod_running(ns, "web-0", "10.244.3.3")
    wait_for(lambda: state() == "identity-issued", "the second web-0 scheduled, with a certificate")
    assert [(j.to_state, j.reason) for j in store.journal("pod", key)] == [
        ("admitted", "admitted"), ("injected", "injected"), ("terminating", "terminating"), ("gone", "gone"),
        ("admitted", "readmitted"), ("injected", "injected"), ("scheduled", "scheduled"),
        ("identity-requested", "identity-requested"), ("identity-issued", "identity-issued")]
    cert = store.get("cert", f"{key}/1")
    assert cert is not None and cert.data["spiffe_id"] == f"spiffe://example.org/ns/{ns}/sa/web-v2"


# ---- (b) a TrafficSplit changes the sidecars' documents ------------------------------------------------------------
def test_a_traffic_split_created_with_the_client_changes_the_affected_sidecars_documents(rig):
    kube = rig.kube
    install_crds(kube)
    ns = kube.unique_namespace("split")
    for svc in (service(ns, "api", {"app": "api"}), service(ns, "api-v1", {"app": "api", "v": "1"}),
                service(ns, "api-v2", {"app": "api", "v": "2"})):
        create(rig.direct, svc)
    create(rig.direct, meshed_pod(ns, "web-1"))
    kube.set_pod_running(ns, "web-1", "10.244.2.1")
    controller = rig.controller("split", tick_seconds=0.2)
    controller.start()
    assert controller.wait_leading(BOUND)
    store = controller.store
    key = f"{ns}/web-1"
    before = wait_for(lambda: store.document_digests().get(key), "web-1's first document")
    shard_before = store.document(f"shard:{ns}")
    assert shard_before is not None and _split_of(shard_before.body) is None

    from kubernetes import client

    with kube.api_client() as api:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            "split.smi-spec.io", "v1alpha3", ns, "trafficsplits",
            {"apiVersion": "split.smi-spec.io/v1alpha3", "kind": "TrafficSplit",
             "metadata": {"name": "api-canary", "namespace": ns},
             "spec": {"service": "api", "backends": [{"service": "api-v1", "weight": 90},
                                                     {"service": "api-v2", "weight": 10}]}})
    after = wait_for(lambda: (d := store.document_digests().get(key)) != before and d, "web-1's new document")
    assert after != before
    shard = store.document(f"shard:{ns}")
    assert shard is not None
    split = _split_of(shard.body)
    assert split is not None and len(split["backends"]) == 2
    assert names_in_world(store, "trafficsplit", ns) == ["api-canary"]
    assert controller.wiring is not None and controller.wiring.rejected.get(f"trafficsplit/{ns}/api-canary") is None


def _split_of(shard: str) -> dict[str, Any] | None:
    """The split of the api Service, as the namespace's outbound shard carries it."""
    split: dict[str, Any] | None = json.loads(shard)["services"]["api"]["split"]
    return split


# ---- (c) a watch cut mid-stream -----------------------------------------------------------------------------------
def test_a_watch_connection_cut_mid_stream_loses_no_event(rig):
    ns = rig.kube.unique_namespace("cut")
    create(rig.direct, service(ns, "before", {"app": "x"}))
    controller = rig.controller("cut", through_proxy=True, watched=(NAMESPACE, SERVICE, POD))
    controller.start()
    assert controller.wait_leading(BOUND)
    store = controller.store
    wait_for(lambda: names_in_world(store, "service", ns) == ["before"], "the first list")
    services = _reflector(controller, "Service")
    proxy = rig.proxy
    assert proxy is not None
    wait_for(lambda: proxy.watches.count(SERVICE.path) >= 1, "the services' watch")

    proxy.held = True
    assert proxy.cut() >= 1  # every watch, mid-stream
    for name in ("during-1", "during-2"):
        create(rig.direct, service(ns, name, {"app": "x"}))
    rig.direct.request("DELETE", f"/api/v1/namespaces/{ns}/services/before")
    create(rig.direct, meshed_pod(ns, "web-1"))
    wait_for(lambda: services.reconnects >= 1, "a failed reconnection")
    proxy.held = False

    wait_for(lambda: names_in_world(store, "service", ns) == ["during-1", "during-2"], "what happened meanwhile")
    wait_for(lambda: names_in_world(store, "pod", ns) == ["web-1"], "the pod created meanwhile")
    assert services.lists == 1  # resumed from its resourceVersion: nothing listed again, nothing lost
    # The world is written before the batch's pods are driven: the pod's machine follows a moment later.
    wait_for(lambda: (store.get("pod", f"{ns}/web-1") or _Nothing).state == "injected", "the pod admitted")


# ---- (d) 410 Gone ----------------------------------------------------------------------------------------------------
def test_a_410_gone_makes_the_controller_list_again_and_converge_deletions_included(rig):
    ns = rig.kube.unique_namespace("gone")
    for name in ("a", "b"):
        create(rig.direct, service(ns, name, {"app": name}))
    controller = rig.controller("gone", through_proxy=True, watched=(SERVICE,))
    controller.start()
    assert controller.wait_leading(BOUND)
    store = controller.store
    wait_for(lambda: names_in_world(store, "service", ns) == ["a", "b"], "the first list")
    services = _reflector(controller, "Service")
    proxy = rig.proxy
    assert proxy is not None

    proxy.held = True
    proxy.cut()
    rig.direct.request("DELETE", f"/api/v1/namespaces/{ns}/services/a")
    create(rig.direct, service(ns, "c", {"app": "c"}))
    proxy.gone_watches[SERVICE.path] = 1  # the history since the last resourceVersion is gone
    proxy.held = False

    wait_for(lambda: names_in_world(store, "service", ns) == ["b", "c"], "the world after a new list")
    assert services.lists == 2
    # And it watches on from the new list.
    create(rig.direct, service(ns, "d", {"app": "d"}))
    wait_for(lambda: names_in_world(store, "service", ns) == ["b", "c", "d"], "d")


def _reflector(controller: Controller, kind: str) -> Reflector:
    return next(r for r in controller.reflectors if r.what.kind == kind)


# ---- (e) leader election --------------------------------------------------------------------------------------------
def test_two_controllers_on_one_lease_take_turns_and_only_the_leader_feeds_its_engine(rig):
    ns = rig.kube.unique_namespace("lead")
    lease = unique_name("lease")
    timings = {"leader_elect": True, "lease_name": lease, "namespace": ns, "lease_duration": 4.0,
               "renew_deadline": 3.0, "retry_period": 0.5, "watched": (SERVICE,)}
    one = rig.controller("one", **timings)
    two = rig.controller("two", **timings)
    one.start()
    assert one.wait_leading(BOUND)
    two.start()
    create(rig.direct, service(ns, "svc", {"app": "svc"}))
    wait_for(lambda: names_in_world(one.store, "service", ns) == ["svc"], "the leader's world")

    def holder() -> str:
        return str(rig.direct.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{lease}")
                   ["spec"].get("holderIdentity"))

    assert holder() == "one"
    assert two.elector is not None and not two.leading.is_set()
    wait_for(lambda: two.elector is not None and two.elector.holder == "one", "the follower seeing the leader")
    assert two.led == 0 and names_in_world(two.store, "service", ns) == []  # the follower does nothing

    one.stop()  # releases the Lease
    assert two.wait_leading(BOUND)
    assert holder() == "two"
    assert not one.leading.is_set()
    wait_for(lambda: names_in_world(two.store, "service", ns) == ["svc"], "the new leader's world")
    record = rig.direct.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{lease}")["spec"]
    assert record["leaseTransitions"] >= 1 and record["leaseDurationSeconds"] == 4


def test_a_leader_whose_lease_is_taken_stops_acting_and_says_so(rig):
    ns = rig.kube.unique_namespace("lost")
    lease = unique_name("lease")
    lost = threading.Event()
    one = rig.controller("one", leader_elect=True, lease_name=lease, namespace=ns, lease_duration=4.0,
                         renew_deadline=3.0, retry_period=0.5, watched=(SERVICE,))
    one.on_lost = lost.set
    one.start()
    assert one.wait_leading(BOUND)
    path = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{lease}"
    taken = rig.direct.request("GET", path)
    taken["spec"]["holderIdentity"] = "someone-else"
    rig.direct.request("PUT", path, body=taken)  # as a replica that judged the lease expired would
    assert lost.wait(BOUND)
    assert not one.leading.is_set() and one.plane is None and one.reflectors == []
    assert rig.direct.request("GET", path)["spec"]["holderIdentity"] == "someone-else"


# ---- (f) the mesh's NATS: the leader's own server ---------------------------------------------------------------
def test_a_leading_controller_serves_the_mesh_nats_on_its_port_under_the_services_name_each_sidecar_its_own(
        rig, tmp_path):
    import nats
    import nats.errors

    from catalog.subjects import config_subject, direct_get_subject, inbox_prefix
    from sidecar.config import ConfigClient, tls_context

    ns = rig.kube.unique_namespace("nats")
    port = free_port()
    controller = rig.controller("nats", namespace=ns, nats=True, nats_host="127.0.0.1", nats_port=port,
                                tick_seconds=0.2, watched=(NAMESPACE, SERVICE, POD))
    controller.start()
    assert controller.wait_leading(BOUND)
    plane = controller.plane
    assert plane is not None and plane.nats is not None
    assert plane.nats.url == f"tls://127.0.0.1:{port}"
    server_name = f"meshloom-nats.{ns}.svc"  # what an injected sidecar verifies (for the namespace `meshloom`)
    store = controller.store
    web, api = f"{ns}/web-1", f"{ns}/api-1"
    create(rig.direct, service(ns, "web", {"app": "web"}))
    create(rig.direct, meshed_pod(ns, "web-1"))
    create(rig.direct, meshed_pod(ns, "api-1", account="api", labels={"app": "api"}))
    for key in (web, api):  # their documents, then their rollouts (the sidecar's connection registers it)
        wait_for(lambda k=key: store.document(k) is not None, f"{key}'s document")
        plane.engine.fire("sidecar", key, "register", {"owner": key}, actor="test")
        wait_for(lambda k=key: (store.get("sidecar", k) or _Nothing).state == "sent", f"{key}'s document published")

    def identity(sa: str) -> str:
        return f"spiffe://example.org/ns/{ns}/sa/{sa}"

    folder = tmp_path / "web-svid"
    folder.mkdir()
    issued = plane.ca.sign_svid(identity("web"), (f"web-1.{ns}.pod", f"web.{ns}.sa"), 3600)
    (folder / "svid.pem").write_bytes(pem_of(issued))
    (folder / "bundle.pem").write_bytes(plane.nats.bundle.read_bytes())

    def context() -> ssl.SSLContext:
        return tls_context(folder / "svid.pem", folder / "svid.pem", folder / "bundle.pem")

    def read_own_document() -> dict[str, Any]:
        """What the sidecar library reads, dialling the port and verifying the Service's name."""
        applied: list[dict[str, Any]] = []
        sidecar = ConfigClient(f"tls://127.0.0.1:{port}", web, context(), lambda doc, shards: applied.append(doc),
                               inbox_prefix(identity("web")), tls_hostname=server_name)
        sidecar.start()
        try:
            assert sidecar.synced.wait(BOUND), "the sidecar never read its document"
            wait_for(lambda: applied, "web-1's document applied")
        finally:
            sidecar.stop()
        return applied[-1]

    assert read_own_document()["spiffeId"] == identity("web")
    wait_for(lambda: (store.get("sidecar", web) or _Nothing).state == "synced", "web-1's acknowledgement")

    async def trespass() -> None:
        errors: asyncio.Queue[Exception] = asyncio.Queue()

        async def on_error(exc: Exception) -> None:
            errors.put_nowait(exc)

        nc = await nats.connect(f"tls://127.0.0.1:{port}", tls=context(), tls_hostname=server_name,
                                allow_reconnect=False, connect_timeout=5, error_cb=on_error,
                                inbox_prefix=inbox_prefix(identity("web")))
        try:
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request(direct_get_subject(api), b"", timeout=1)
            assert "permissions violation for publish" in str(await asyncio.wait_for(errors.get(), BOUND)).lower()
            await nc.subscribe(config_subject(api))
            assert "permissions violation for subscription" in str(
                await asyncio.wait_for(errors.get(), BOUND)).lower()
        finally:
            await nc.close()
        # The certificate is for the Service's names, not for any name: a client that expects another fails.
        with pytest.raises(ssl.SSLCertVerificationError):
            await nats.connect(f"tls://127.0.0.1:{port}", tls=context(), tls_hostname=f"meshloom-nats.{ns}x.svc",
                               allow_reconnect=False, connect_timeout=5, max_reconnect_attempts=0)

    asyncio.run(trespass())

    # A new term (a restart, or this replica leading again): the new server knows the sidecars already published
    # at once, not at their next change.
    desired = store.get("sidecar", web).data["desired"]  # type: ignore[union-attr]
    controller.stop()
    controller.start()
    assert controller.wait_leading(BOUND)
    assert read_own_document()["spiffeId"] == identity("web")
    assert store.get("sidecar", web).data["desired"] == desired  # type: ignore[union-attr]  # nothing republished


def pem_of(issued: Any) -> bytes:
    """An issued SVID as one PEM file: leaf, chain, then its PKCS#8 key."""
    from actions.ca import pem

    key = issued.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
    return bytes(pem([issued.certificate, *issued.chain])) + key


# ---- the command --------------------------------------------------------------------------------------------------
def test_the_controller_command_runs_with_the_charts_flags_and_stops_when_asked(rig, capsys):
    ns = rig.kube.unique_namespace("cmd")
    code = main(["controller", "--kubeconfig", str(rig.kube.kubeconfig), "--namespace", ns,
                 "--state-dir", str(rig.tmp / "cmd"), "--injection-values", str(CHART / "values.yaml"),
                 "--webhook-port", str(free_port()), "--webhook-configuration", unique_name("absent"),
                 "--nats-host", "127.0.0.1", "--nats-port", str(free_port()),
                 "--leader-elect", "--lease-name", "meshloom-controller", "--lease-duration", "15s",
                 "--renew-deadline", "10s", "--retry-period", "2s", "--id", "cmd-1", "--log-level", "info",
                 "--for", "3"])
    assert code == 0
    lease = rig.direct.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/meshloom-controller")
    assert lease["spec"].get("holderIdentity") in (None, "")  # released on the way out
    assert lease["spec"]["leaseTransitions"] == 0


def test_the_controller_command_refuses_bad_values_in_one_line(rig, capsys, tmp_path):
    bad = tmp_path / "values.yaml"
    bad.write_text("trustDomain: Not_Valid!\n")
    assert main(["controller", "--kubeconfig", str(rig.kube.kubeconfig), "--injection-values", str(bad),
                 "--state-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshctl: ") and str(bad) in err and "\n" not in err


def test_the_reflector_reads_every_watched_kind_from_the_real_server(rig):
    install_crds(rig.kube)
    seen: dict[str, int] = {}
    reflectors = [Reflector(rig.direct, w, lambda e: seen.__setitem__(e.kind, len(e.items))) for w in WATCHED]
    for r in reflectors:
        r.start()
    try:
        wait_for(lambda: all(r.synced.is_set() for r in reflectors), "a first list of every kind")
    finally:
        for r in reflectors:
            r.stop()
    assert set(seen) == {w.kind for w in WATCHED}
    assert seen["Namespace"] >= 1


def test_the_ca_settings_come_from_the_charts_values():
    _, ca = load_values(CHART / "values.yaml")
    assert ca == CaSettings.from_flags(trust_domain="example.org", key_type="ec-p256", svid_ttl="1h", ca_ttl="720h")
