"""Benchmarks of the admission path: the injection webhook under a burst of pod creations on a real API server.

Run from the repository root: `python -m bench.webhook [--quick] [--out DIR] [--section NAME ...]`.
Needs kube-apiserver and etcd (scripts/kube builds and caches them); without them the section is recorded as skipped.

What is measured
----------------
admission  100 pods created at once against a real kube-apiserver 1.20 (etcd on loopback), which calls the webhook
           for each of them: `actions.webhook.WebhookServer` on 127.0.0.1 with TLS, answering with
           `catalog.inject.admit` (the chart's values; namespace labels from a cache, filled before each burst as
           the controller's watch cache would be), registered with the chart's own MutatingWebhookConfiguration
           (tests/support/webhook.py: `helm template`, pointed at the server by `clientConfig.url`).
           100 client threads, one pod each, wait on a barrier and then all POST their pod at once (the kubernetes
           client, a connection pool of 100), in a process of their own (in the webhook's, their turns at the GIL
           would be counted as the webhook's latency). A warm-up burst runs first and is not counted (the API
           server's first calls open its connections to the webhook and warm its caches); then ROUNDS bursts
           (--quick: 1), each in a new namespace labelled for injection.
           Two latencies per pod:
             webhook     measured in the webhook server, from the request's headers read to its response written
                         (body read, JSON decode, the decision and the patch, JSON encode, write): `Served.seconds`.
                         The target is on this one: p99 < 50 ms.
             end to end  measured in the client: the whole create call, API server and etcd included (the
                         webhook's round trip is one part of it).
           p50 / p99 / max over all pods of all counted bursts. Checks: every review answered 200 with an
           `inject` verdict, and every pod stored with the sidecar and the init container.
           Everything (etcd, kube-apiserver, the webhook, the 100 clients) shares the machine's cores, so the
           end-to-end figure is mostly the API server's and etcd's, and the webhook's also counts the time its
           threads wait for a core.

Each section is a function in SECTIONS, from the parsed arguments to a JSON-able dict; `main` runs the chosen ones
and writes them under "sections" in bench/results/webhook.json (webhook-quick.json with --quick). Running only some
sections keeps the other sections already in the file, each of which records its own date.
"""

from __future__ import annotations

import argparse
import multiprocessing
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from bench.engine import figure, percentile
from bench.facts import machine, section_main, version

TARGET_P99_MS = 50.0  # the issue: webhook admission latency p99 under 100 concurrent pod creations
CONCURRENCY = 100
ROUNDS = 5
LABEL = "injector.nsm.nginx.com/auto-inject"


def machine_facts() -> dict[str, Any]:
    return machine(kubernetes_client=version("kubernetes"))


def spread(values_s: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values_s]
    return {"p50": figure(percentile(ms, 0.50), "ms"), "p99": figure(percentile(ms, 0.99), "ms"),
            "max": figure(max(ms), "ms")}


# ---- admission ---------------------------------------------------------------------------------------------------
def _client(kube: Any, pool: int) -> Any:
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = kube.url
    configuration.ssl_ca_cert = str(kube.ca_file)
    configuration.api_key = {"authorization": kube.token}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    configuration.connection_pool_maxsize = pool  # one connection per client thread: no thread waits for another
    return client.ApiClient(configuration)


def _burst_in_child(url: str, token: str, ca_file: str, namespace: str, n: int, out: Any) -> None:
    """In a process of its own (`_burst`): n threads, one pod each, released together by a barrier."""
    from types import SimpleNamespace

    from kubernetes import client

    kube = SimpleNamespace(url=url, token=token, ca_file=ca_file)
    with _client(kube, n) as api:
        core = client.CoreV1Api(api)
        barrier = threading.Barrier(n)
        latencies: list[float] = []
        errors: list[str] = []

        def create(i: int) -> None:
            body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i:03}", "labels": {"app": "bench"}},
                    "spec": {"serviceAccountName": "bench",
                             "containers": [{"name": "app", "image": "nginx:1.25",
                                             "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                                             "readinessProbe": {"httpGet": {"path": "/", "port": 8080}}}]}}
            try:
                barrier.wait(timeout=60)
                t0 = time.perf_counter()
                core.create_namespaced_pod(namespace, body, _preload_content=False)
                latencies.append(time.perf_counter() - t0)
            except Exception as exc:  # counted and reported: a failed creation must not hide the others' figures
                errors.append(f"p{i:03}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")

        threads = [threading.Thread(target=create, args=(i,), name=f"create-{i}") for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    out.send((latencies, errors))
    out.close()


def _burst(kube: Any, namespace: str, n: int) -> tuple[list[float], list[str]]:
    """n pods created at once; each one's create-call time, and the errors.

    The clients run in a process of their own: 100 client threads in the webhook's process would hold its GIL
    (each runnable thread gets a 5 ms turn), and the webhook's latency would be theirs.
    """
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_burst_in_child, args=(kube.url, kube.token, str(kube.ca_file), namespace, n, send),
                        name="bench-webhook-clients")
    child.start()
    send.close()
    try:
        if not receive.poll(600):
            raise RuntimeError("the client process gave no result within 600 s")
        latencies, errors = receive.recv()
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
            child.join()
    return latencies, errors


def bench_admission(rounds: int, concurrency: int = CONCURRENCY) -> dict[str, Any]:
    from kubernetes import client

    from catalog.inject import INIT_NAME, SIDECAR_NAME
    from tests.support.kube import KubeUnavailable, start_kube_api
    from tests.support.webhook import running_injector

    try:
        kube = start_kube_api()
    except KubeUnavailable as exc:
        return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "skipped": str(exc)}
    try:
        with running_injector(kube) as injector, _client(kube, 4) as api:
            core = client.CoreV1Api(api)
            labels = injector.namespace_labels(**{LABEL: "enabled"})
            print(f"[admission] warm-up burst of {concurrency} pods ...", flush=True)
            _burst(kube, kube.unique_namespace("bench-warmup", labels=labels), concurrency)
            end_to_end: list[float] = []
            errors: list[str] = []
            namespaces = []
            injector.served.clear()
            injector.seen.clear()
            for r in range(rounds):
                print(f"[admission] burst {r + 1}/{rounds}: {concurrency} pods at once ...", flush=True)
                ns = kube.unique_namespace("bench", labels=labels)
                namespaces.append(ns)
                injector.namespaces(ns)  # as the controller's watch would have seen it before its pods come
                lat, errs = _burst(kube, ns, concurrency)
                end_to_end += lat
                errors += errs
            served = [s for s in injector.served if s.method == "POST" and s.path == injector.server.path]
            webhook = [s.seconds for s in served if s.status == 200]
            verdicts = [s.verdict for s in injector.seen]
            stored = injected = 0
            for ns in namespaces:
                for pod in core.list_namespaced_pod(ns).items:
                    stored += 1
                    injected += ({c.name for c in pod.spec.containers} >= {"app", SIDECAR_NAME}
                                 and [c.name for c in pod.spec.init_containers or []] == [INIT_NAME])
    finally:
        kube.stop()
    expected = rounds * concurrency
    ok = (len(webhook) == expected and not errors and stored == injected == expected
          and verdicts.count("inject: namespace-enabled") == expected)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "concurrency": concurrency,
        "rounds": rounds,
        "pods": expected,
        "webhook": spread(webhook) if webhook else {},
        "webhook_p99": figure(percentile(webhook, 0.99) * 1000 if webhook else float("inf"), "ms", TARGET_P99_MS,
                              higher_is_better=False),
        "end_to_end": spread(end_to_end) if end_to_end else {},
        "checks": {"what": "every review answered 200 with `inject: namespace-enabled`; every pod stored with the "
                           "sidecar and the init container; no creation failed",
                   "reviews_answered_200": len(webhook), "reviews_other": len(served) - len(webhook),
                   "verdicts": {v: verdicts.count(v) for v in sorted(set(verdicts))},
                   "pods_stored": stored, "pods_injected": injected, "errors": errors[:10], "ok": ok},
    }


def section_admission(args: argparse.Namespace) -> dict[str, Any]:
    return bench_admission(1 if args.quick else ROUNDS)


def section_controller(args: argparse.Namespace) -> dict[str, Any]:
    """The controller's memory with 10,000 pods and 1,000 services fed through its watches (bench.kube_controller)."""
    from bench.kube_controller import QUICK, measure

    return measure(*QUICK) if args.quick else measure()


# Sections, in the order they run: name -> function of the parsed arguments returning the section's results.
SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "admission": section_admission,
    "controller": section_controller,
}


# ---- reporting -----------------------------------------------------------------------------------------------------
def _summary_admission(r: dict[str, Any]) -> list[str]:
    if "skipped" in r:
        return [f"  admission: skipped ({r['skipped']})"]
    w, e, target = r["webhook"], r["end_to_end"], r["webhook_p99"]
    verdict = "ok" if target["met"] else "MISSED"
    return [f"  admission {r['pods']} pods in bursts of {r['concurrency']}: webhook p50 {w['p50']['value']:.1f} ms"
            f"  p99 {w['p99']['value']:.1f} ms (target < {target['target']:.0f})  {verdict}   max "
            f"{w['max']['value']:.1f} ms",
            f"            end to end (create call) p50 {e['p50']['value']:.1f} ms  p99 {e['p99']['value']:.1f} ms"
            f"  max {e['max']['value']:.1f} ms   checks {'ok' if r['checks']['ok'] else 'BAD'}"]


def _summary_controller(r: dict[str, Any]) -> list[str]:
    from bench.kube_controller import summary_lines

    return summary_lines(r)


SUMMARIES: dict[str, Callable[[dict[str, Any]], list[str]]] = {"admission": _summary_admission,
                                                                "controller": _summary_controller}


def summary(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"Meshloom webhook benchmark ({doc['mode']}), {m['date']}",
             f"  {m['cores']} cores ({m['cpu']}), Python {m['python']}", ""]
    for name, result in doc["sections"].items():
        lines += SUMMARIES[name](result) if name in SUMMARIES else [f"  {name}: see the JSON"]
    return "\n".join(lines)


def targets() -> dict[str, Any]:
    return {"admission_webhook_p99": figure(TARGET_P99_MS, "ms") | {"at": f"{CONCURRENCY} concurrent pod creations"}}


def main(argv: list[str] | None = None) -> int:
    return section_main(argv, name="webhook", doc=__doc__, sections=SECTIONS, facts=machine_facts,
                        targets=targets(), summary=summary)


if __name__ == "__main__":
    raise SystemExit(main())
