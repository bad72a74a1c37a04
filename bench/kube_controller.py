"""The controller's memory with a large cluster fed through its watches (the `controller` section of bench.webhook).

What is measured
----------------
A real kube-apiserver 1.20 (etcd on loopback) with the chart's CRDs, and `meshctl controller`'s composition
(`meshctl.controller.Controller`: the reflectors of every watched kind, the wiring, the engine and its scheduler on
SQLite, the mesh CA; no election, no webhook, no NATS, which is a process of its own) in a process of its own,
started on an empty cluster. Then the cluster is filled while the controller watches: NAMESPACES namespaces,
SERVICES Services (each selecting its pods) with their Endpoints, PODS pods marked as injected (so each is a meshed
pod: a lifecycle in the engine, a document in the catalog), created by 16 client threads in the benchmark's process.
Nothing is scheduled, so each pod's machine stops at `injected` (admit, then the injection confirmed).

The controller has converged when its world holds every pod and service, every pod's machine is `injected` and every
pod has its document. Recorded: the time from the first create to convergence, and the controller process's
resident memory (VmRSS) once converged, with its peak (VmHWM). Target: < 500 MB with 10,000 pods and 1,000 services.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TARGET_RSS_MB = 500.0
PODS, SERVICES, NAMESPACES = 10_000, 1_000, 10
QUICK = (200, 20, 2)
CLIENT_THREADS = 16
CONVERGE_BOUND = 1800.0  # seconds: a bound on waiting, far above what 10,000 pods take


def _memory() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # kB -> MB
    return out


def _controller_child(url: str, token: str, ca_file: str, state: str, pods: int, services: int, out: Any,
                      ready: Any) -> None:
    """The controller, in a process of its own: runs until converged, then reports and waits to be stopped."""
    import logging

    from kubernetes import client

    from actions.kube import ClientApi
    from meshctl.controller import Controller, ControllerConfig
    from store import Store, migrate, sqlite_url

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # skipped world recomputations: expected under load
    configuration = client.Configuration()
    configuration.host = url
    configuration.ssl_ca_cert = ca_file
    configuration.api_key = {"authorization": token}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    configuration.connection_pool_maxsize = 32
    db = sqlite_url(Path(state))
    migrate.upgrade(db)
    store = Store(db)
    controller = Controller(ClientApi(client.ApiClient(configuration)), store,
                            ControllerConfig(state_dir=Path(state), nats=False, leader_elect=False, identity="bench"))
    controller.start()
    ready.send(_memory())
    started = time.monotonic()
    converged = None
    while time.monotonic() - started < CONVERGE_BOUND:
        wiring = controller.wiring
        counts = store.counts().get("pod", {})
        if (wiring is not None and len(wiring.pods) == pods and counts.get("injected", 0) == pods
                and len(store.resources(kind="service")) >= services
                and sum(1 for k in store.document_digests() if not k.startswith("shard:")) == pods):
            converged = time.monotonic()
            break
        time.sleep(1.0)  # the benchmark's own poll, not a test waiting for a timer
    report = {"converged": converged is not None, "memory": _memory(),
              "pods_in_wiring": len(controller.wiring.pods) if controller.wiring else 0,
              "pod_states": store.counts().get("pod", {}), "rejected": len(controller.wiring.rejected)
              if controller.wiring else 0, "world_revisions": store.world_revision(),
              "batches": controller.wiring.batches if controller.wiring else 0,
              "events": controller.wiring.events if controller.wiring else 0,
              "converged_at_monotonic": converged}
    out.send(report)
    out.recv()  # stop
    controller.stop()
    store.close()


def _fill(kube: Any, pods: int, services: int, namespaces: int) -> tuple[float, list[str]]:
    """Namespaces, services with endpoints, meshed pods; returns the seconds it took and the errors."""
    from actions.kube import ApiError, ClientApi
    from bench.webhook import _client

    api = ClientApi(_client(kube, CLIENT_THREADS + 4))
    names = [kube.unique_namespace("bench-ctl") for _ in range(namespaces)]
    per_service = pods // services
    errors: list[str] = []
    lock = threading.Lock()

    def post(path: str, body: dict[str, Any]) -> None:
        try:
            api.request("POST", path, body=body)
        except ApiError as exc:
            with lock:
                errors.append(f"{path}: {exc}")

    def service(i: int) -> None:
        ns = names[i % namespaces]
        app = f"svc-{i:04}"
        post(f"/api/v1/namespaces/{ns}/services", {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": app, "namespace": ns},
            "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                                          "protocol": "TCP"}]}})
        post(f"/api/v1/namespaces/{ns}/endpoints", {
            "apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": app, "namespace": ns},
            "subsets": [{"addresses": [{"ip": _ip(i * per_service + j), "targetRef": {
                "kind": "Pod", "namespace": ns, "name": f"{app}-{j}"}} for j in range(per_service)],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}]})

    def pod(n: int) -> None:
        i, j = divmod(n, per_service)
        ns = names[i % namespaces]
        app = f"svc-{i:04}"
        post(f"/api/v1/namespaces/{ns}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{app}-{j}", "namespace": ns,
                         "labels": {"app": app, "meshloom.io/injected": "true"},
                         "annotations": {"meshloom.io/injected": "true", "meshloom.io/inject-status": "injected"}},
            "spec": {"serviceAccountName": app, "containers": [
                {"name": "app", "image": "app:1", "ports": [{"name": "http", "containerPort": 8080}]},
                {"name": "meshloom-sidecar", "image": "ghcr.io/meshloom/sidecar:0.1.0"}]}})

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENT_THREADS, thread_name_prefix="bench-fill") as pool:
        list(pool.map(service, range(services)))
        list(pool.map(pod, range(pods)))
    return time.monotonic() - started, errors


def _ip(n: int) -> str:
    return f"10.{64 + n // 65536}.{n // 256 % 256}.{n % 256}"


def measure(pods: int = PODS, services: int = SERVICES, namespaces: int = NAMESPACES) -> dict[str, Any]:
    from bench.engine import figure
    from tests.support.kube import KubeUnavailable, start_kube_api

    date = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        kube = start_kube_api()
    except KubeUnavailable as exc:
        return {"date": date, "skipped": str(exc)}
    try:
        kube.kubectl_run("apply", "-f", str(Path(__file__).resolve().parents[1] / "charts" / "meshloom" / "crds"))
        ctx = multiprocessing.get_context("spawn")
        receive, send = ctx.Pipe()
        ready_r, ready_s = ctx.Pipe(duplex=False)
        with tempfile.TemporaryDirectory(prefix="meshloom-bench-ctl-") as state:
            child = ctx.Process(target=_controller_child, name="bench-controller",
                                args=(kube.url, kube.token, str(kube.ca_file), state, pods, services, send, ready_s))
            child.start()
            try:
                if not ready_r.poll(120):
                    raise RuntimeError("the controller did not start within 120 s")
                idle = ready_r.recv()
                print(f"[controller] filling the cluster: {namespaces} namespaces, {services} services with "
                      f"endpoints, {pods} meshed pods ...", flush=True)
                t0 = time.monotonic()
                filled, errors = _fill(kube, pods, services, namespaces)
                print(f"[controller] created in {filled:.1f} s; waiting for the controller to converge ...",
                      flush=True)
                if not receive.poll(CONVERGE_BOUND + 60):
                    raise RuntimeError("the controller gave no report")
                report = receive.recv()
                converged_s = time.monotonic() - t0  # the report comes as soon as it converged
                receive.send("stop")
            finally:
                child.join(timeout=120)
                if child.is_alive():
                    child.kill()
                    child.join()
    finally:
        kube.stop()
    rss = report["memory"]["VmRSS"]
    ok = report["converged"] and not errors and report["rejected"] == 0
    return {
        "date": date,
        "pods": pods, "services": services, "namespaces": namespaces,
        "create_seconds": figure(filled, "s"),
        "converged_seconds": figure(converged_s, "s"),
        "rss": figure(rss, "MB", TARGET_RSS_MB, higher_is_better=False),
        "rss_peak": figure(report["memory"]["VmHWM"], "MB"),
        "rss_idle": figure(idle["VmRSS"], "MB"),
        "checks": {"what": "the controller converged: every pod and service in its world, every pod's machine "
                           "injected, every pod's document computed; no create failed; nothing rejected",
                   "converged": report["converged"], "pods_in_wiring": report["pods_in_wiring"],
                   "pod_states": report["pod_states"], "rejected": report["rejected"],
                   "world_revisions": report["world_revisions"], "batches": report["batches"],
                   "events": report["events"], "errors": errors[:10], "ok": ok},
    }


def summary_lines(r: dict[str, Any]) -> list[str]:
    if "skipped" in r:
        return [f"  controller: skipped ({r['skipped']})"]
    rss = r["rss"]
    return [f"  controller with {r['pods']} pods, {r['services']} services through the watch: RSS "
            f"{rss['value']:.0f} MB (target < {rss['target']:.0f})  {'ok' if rss['met'] else 'MISSED'}   peak "
            f"{r['rss_peak']['value']:.0f} MB, idle {r['rss_idle']['value']:.0f} MB",
            f"            created in {r['create_seconds']['value']:.0f} s, converged after "
            f"{r['converged_seconds']['value']:.0f} s ({r['checks']['batches']} batches, "
            f"{r['checks']['world_revisions']} world revisions)   checks {'ok' if r['checks']['ok'] else 'BAD'}"]
