"""Benchmark of the catalog: per-sidecar documents for 1,000 Services and 10,000 pods.

Run from the repository root: `python -m bench.catalog [--quick] [--out DIR]`.

What is measured
----------------
The world is generated, not read: N namespaces (auto-inject on), each with S Services of P pods (one service
account per Service, pods labelled `app=<service>`, one `http` port 80 -> 8080, every fifth Service also a `grpc`
port 9090). Half the namespaces carry Endpoints written as Kubernetes' endpoints controller would (the other half
resolve endpoints from selectors, as a single host does). The MeshConfig is in deny mode, so every pod's inbound
carries its access rules. Per namespace: one HTTPRouteGroup (3 matches), one TCPRoute, a TrafficTarget per Service
(its two neighbours and one Service of the next namespace may call it: the read route, or the TCPRoute for every
tenth), 5 TrafficSplits (root -> two backends, 90/10, every other one with matches), 5 RateLimits and
5 CircuitBreakers with fallbacks.

parse     `catalog.parse_all` over all manifests (plain dicts, as the CLI hands them over after reading YAML).
check     `catalog.check` over the world.
render    `catalog.render`: every meshed pod's document plus the outbound shards, as canonical JSON bytes; the
          median of R runs is compared with the target (under 1 s for 1,000 Services and 10,000 pods). `compute`
          is `render` without returning the shards: the same work.
sizes     Bytes of the sidecar documents (total, mean, largest) and of the shards (total, largest).
change    One TrafficSplit's weights changed: the render of the new world, and `catalog.changed` between the two
          renders (which sidecars and which shards changed).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import catalog
from bench.facts import machine, write_results

T = TypeVar("T")
TARGET_RENDER_S = 1.0  # for 1,000 Services and 10,000 pods
TRUST_DOMAIN = "example.org"
INJECT = {"injector.nsm.nginx.com/auto-inject": "enabled"}


@dataclass(frozen=True)
class Sizes:
    namespaces: int
    services_per_namespace: int
    pods_per_service: int
    runs: int  # renders timed; the median is reported


FULL = Sizes(namespaces=20, services_per_namespace=50, pods_per_service=10, runs=5)
QUICK = Sizes(namespaces=4, services_per_namespace=10, pods_per_service=5, runs=2)


# ---- the world ------------------------------------------------------------------------------------------------
def _ip(prefix: int, i: int) -> str:
    return f"10.{prefix + i // 65536}.{(i // 256) % 256}.{i % 256}"


def _meta(ns: str, name: str) -> dict[str, Any]:
    return {"namespace": ns, "name": name}


def manifests(sizes: Sizes) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "meshloom.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
         "spec": {"accessControlMode": "deny", "mtlsMode": "strict"}}]
    pod_no, svc_no = 0, 0
    n_ns, n_svc = sizes.namespaces, sizes.services_per_namespace
    for n in range(n_ns):
        ns, next_ns = f"ns{n}", f"ns{(n + 1) % n_ns}"
        docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": INJECT}})
        for s in range(n_svc):
            name = f"svc{s}"
            ports = [{"name": "http", "port": 80, "targetPort": 8080}]
            container_ports = [{"name": "http", "containerPort": 8080}]
            if s % 5 == 0:
                ports.append({"name": "grpc", "port": 9090})
                container_ports.append({"name": "grpc", "containerPort": 9090})
            docs.append({"apiVersion": "v1", "kind": "Service", "metadata": _meta(ns, name),
                         "spec": {"clusterIP": _ip(96, svc_no), "selector": {"app": name}, "ports": ports}})
            svc_no += 1
            addresses = []
            for p in range(sizes.pods_per_service):
                pod, ip = f"{name}-{p}", _ip(1, pod_no)
                pod_no += 1
                docs.append({"apiVersion": "v1", "kind": "Pod",
                             "metadata": {**_meta(ns, pod), "labels": {"app": name}},
                             "spec": {"serviceAccountName": name,
                                      "containers": [{"name": "app", "ports": container_ports}]},
                             "status": {"podIP": ip}})
                addresses.append({"ip": ip, "targetRef": {"kind": "Pod", "name": pod, "namespace": ns}})
            if n % 2 == 0:
                docs.append({"apiVersion": "v1", "kind": "Endpoints", "metadata": _meta(ns, name), "subsets": [
                    {"addresses": addresses,
                     "ports": [{"name": p["name"], "port": p.get("targetPort", p["port"])} for p in ports]}]})
            sources = [{"kind": "ServiceAccount", "namespace": ns, "name": f"svc{(s + d) % n_svc}"} for d in (-1, 1)]
            sources.append({"kind": "ServiceAccount", "namespace": next_ns, "name": name})
            rule = {"kind": "TCPRoute", "name": "tcp"} if s % 10 == 0 else \
                {"kind": "HTTPRouteGroup", "name": "routes", "matches": ["read"]}
            docs.append({"apiVersion": "access.smi-spec.io/v1alpha2", "kind": "TrafficTarget",
                         "metadata": _meta(ns, f"to-{name}"),
                         "spec": {"destination": {"kind": "ServiceAccount", "namespace": ns, "name": name},
                                  "sources": sources, "rules": [rule]}})
        docs.append({"apiVersion": "specs.smi-spec.io/v1alpha3", "kind": "HTTPRouteGroup",
                     "metadata": _meta(ns, "routes"), "spec": {"matches": [
                         {"name": "read", "methods": ["GET"], "pathRegex": "/api/.*"},
                         {"name": "write", "methods": ["POST", "PUT"], "pathRegex": "/api/.*"},
                         {"name": "canary", "headers": {"x-canary": "^true$"}}]}})
        docs.append({"apiVersion": "specs.smi-spec.io/v1alpha3", "kind": "TCPRoute", "metadata": _meta(ns, "tcp"),
                     "spec": {}})
        for k in range(min(5, n_svc // 3)):
            root, a, b = (f"svc{3 * k + d}" for d in range(3))
            split: dict[str, Any] = {"service": root, "backends": [{"service": a, "weight": 90},
                                                                    {"service": b, "weight": 10}]}
            if k % 2:
                split["matches"] = [{"kind": "HTTPRouteGroup", "name": "routes"}]
            docs.append({"apiVersion": "split.smi-spec.io/v1alpha3", "kind": "TrafficSplit",
                         "metadata": _meta(ns, f"split{k}"), "spec": split})
            docs.append({"apiVersion": "specs.smi.nginx.com/v1alpha2", "kind": "RateLimit",
                         "metadata": _meta(ns, f"limit{k}"),
                         "spec": {"destination": {"kind": "Service", "namespace": ns, "name": a},
                                  "sources": [{"kind": "Service", "namespace": ns, "name": b}],
                                  "name": "10rs", "rate": "10r/s", "burst": 5, "delay": "nodelay",
                                  "rules": [{"kind": "HTTPRouteGroup", "name": "routes", "matches": ["write"]}]}})
            docs.append({"apiVersion": "specs.smi.nginx.com/v1alpha1", "kind": "CircuitBreaker",
                         "metadata": _meta(ns, f"breaker{k}"),
                         "spec": {"destination": {"kind": "Service", "namespace": ns, "name": b},
                                  "errors": 5, "timeoutSeconds": 30,
                                  "fallback": {"service": f"{ns}/{a}", "port": 80}}})
    return docs


# ---- timing ---------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], T]) -> tuple[float, T]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def figure(value: float, unit: str, target: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"value": round(value, 4), "unit": unit}
    if target is not None:
        out["target"] = target
        out["met"] = value < target
    return out


def run(sizes: Sizes) -> dict[str, Any]:
    docs = manifests(sizes)
    parse_s, resources = timed(lambda: catalog.parse_all(docs))
    world = catalog.World(resources)
    check_s, problems = timed(lambda: catalog.check(world))
    assert not problems, problems[:3]
    renders = []
    rendered = catalog.render(world, TRUST_DOMAIN)
    for _ in range(sizes.runs):
        seconds, rendered = timed(lambda: catalog.render(world, TRUST_DOMAIN))
        renders.append(seconds)
    n_services = sizes.namespaces * sizes.services_per_namespace
    n_pods = n_services * sizes.pods_per_service
    assert len(rendered.sidecars) == n_pods and len(rendered.shared) == sizes.namespaces
    doc_sizes = [len(b) for b in rendered.sidecars.values()]
    shard_sizes = [len(b) for b in rendered.shared.values()]
    # Compared with the target only at full size; the quick run is far smaller.
    target = TARGET_RENDER_S if sizes == FULL else None

    split = next(r for r in resources if isinstance(r, catalog.TrafficSplit))
    moved = catalog.parse({**split.to_manifest(), "spec": {**split.to_manifest()["spec"], "backends": [
        {"service": b.service, "weight": 100 - b.weight} for b in split.backends]}})
    after_s, after = timed(lambda: catalog.render(world.with_applied([moved]), TRUST_DOMAIN))
    diff_s, changed = timed(lambda: catalog.changed(rendered.sidecars, after.sidecars))
    changed_shards = catalog.changed(rendered.shared, after.shared)

    return {
        "world": {"services": n_services, "pods": n_pods, "namespaces": sizes.namespaces,
                  "manifests": len(docs), "resources": len(world)},
        "parse": figure(parse_s, "s"),
        "check": figure(check_s, "s"),
        "render_median": figure(statistics.median(renders), "s", target),
        "render_runs": [round(x, 4) for x in renders],
        "sizes": {
            "sidecar_documents": len(doc_sizes),
            "sidecar_total": figure(sum(doc_sizes) / 1e6, "MB"),
            "sidecar_mean": figure(statistics.mean(doc_sizes), "bytes"),
            "sidecar_max": figure(max(doc_sizes), "bytes"),
            "shards": len(shard_sizes),
            "shard_total": figure(sum(shard_sizes) / 1e6, "MB"),
            "shard_max": figure(max(shard_sizes), "bytes"),
        },
        "change": {
            "what": f"TrafficSplit {split.ref}: weights swapped",
            "render": figure(after_s, "s"),
            "changed": figure(diff_s, "s"),
            "sidecars_changed": len(changed),
            "shards_changed": sorted(changed_shards),
        },
    }


# ---- reporting ------------------------------------------------------------------------------------------------
def summary(doc: dict[str, Any]) -> str:
    r, m = doc["results"], doc["machine"]
    s, c = r["sizes"], r["change"]
    f = r["render_median"]
    mark = "" if "met" not in f else ("  ok" if f["met"] else "  MISSED")
    return "\n".join([
        f"Meshloom catalog benchmark ({doc['mode']}), {m['date']}",
        f"  {m['cores']} cores ({m['cpu']}), Python {m['python']}", "",
        f"world   {r['world']['services']} Services, {r['world']['pods']} pods, {r['world']['namespaces']} "
        f"namespaces, {r['world']['resources']} resources",
        f"parse   {r['parse']['value']:.3f} s    check {r['check']['value']:.3f} s",
        f"render  {f['value']:.3f} s median of {len(r['render_runs'])} "
        f"({', '.join(f'{x:.3f}' for x in r['render_runs'])})"
        + (f" (target < {f['target']:.1f} s){mark}" if "target" in f else ""),
        f"sizes   {s['sidecar_documents']} documents, {s['sidecar_total']['value']:.1f} MB in all, "
        f"{s['sidecar_mean']['value']:.0f} bytes mean, {s['sidecar_max']['value']:.0f} max; "
        f"{s['shards']} shards, {s['shard_total']['value']:.2f} MB in all, {s['shard_max']['value']:.0f} bytes max",
        f"change  {c['what']}: render {c['render']['value']:.3f} s, changed() {c['changed']['value'] * 1000:.1f} "
        f"ms, {c['sidecars_changed']} sidecars and shards {', '.join(c['shards_changed'])} changed",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.catalog", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small world (a second); writes catalog-quick.json")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON results")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    print(f"rendering {sizes.namespaces * sizes.services_per_namespace} Services ...", flush=True)
    results = run(sizes)
    doc = {
        "benchmark": "catalog",
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
        "sizes": asdict(sizes),
        "targets": {"render": figure(TARGET_RENDER_S, "s") | {"for": "1,000 Services and 10,000 pods"}},
        "method": __doc__.split("What is measured", 1)[1].strip(),
        "results": results,
    }
    write_results(doc, args.out / ("catalog-quick.json" if args.quick else "catalog.json"), summary(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
