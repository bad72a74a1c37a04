"""A small mesh that uses every kind the catalog reads, as plain manifests (what the CLI hands over after YAML).

    namespace shop (auto-inject)                                namespace pay (auto-inject)
      web      app=web        80->8080 http   web-1 web-2 web-3*   payments  app=payments  http 80->8080  payments-1
      api      app=api        http-api 8080, grpc 9090           namespace legacy (no injection)
      api-v1   app=api,v1     (split backend)  api-v1-1           old       app=old       80              old-1
      api-v2   app=api,v2     (split backend)  api-v2-1
      db       app=db         tcp-pg 5432 (Endpoints written)      db-0
      fallback app=fallback   80->8080                             fallback-1
      debug pod: auto-inject disabled (no sidecar); web-3: pending, no address yet

    MeshConfig: deny, strict mTLS, least_conn
    web -> api: read only (HTTPRouteGroup api-routes, match read); payments -> api on 8080: every api route
    api -> db: TCPRoute db-port (5432)
    TrafficSplit api-canary: api -> api-v1 90 / api-v2 10 for canary users (HTTPRouteGroup canary-users)
    RateLimit api-writes: web's writes to api 10r/s burst 5 nodelay; RateLimit api-default: everyone else 600r/m
    CircuitBreaker web-breaker: 3 errors in 30 s on web -> fallback:80
"""

from __future__ import annotations

from typing import Any

INJECT = {"injector.nsm.nginx.com/auto-inject": "enabled"}


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def service(ns: str, name: str, selector: dict[str, str], ports: list[dict[str, Any]],
            cluster_ip: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": selector, "ports": ports}
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name}, "spec": spec}


def pod(ns: str, name: str, labels: dict[str, str], account: str, ip: str | None,
        ports: list[dict[str, Any]], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": ns, "name": name, "labels": labels}
    if annotations:
        meta["annotations"] = annotations
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                           "spec": {"serviceAccountName": account, "containers": [{"name": "app", "ports": ports}]}}
    if ip:
        doc["status"] = {"podIP": ip, "phase": "Running"}
    return doc


def policy(api: str, kind: str, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": api, "kind": kind, "metadata": {"namespace": ns, "name": name}, "spec": spec}


HTTP_8080 = [{"name": "http", "containerPort": 8080}]
SPLIT = "split.smi-spec.io/v1alpha3"
ACCESS = "access.smi-spec.io/v1alpha2"
SPECS = "specs.smi-spec.io/v1alpha3"
NGINX2 = "specs.smi.nginx.com/v1alpha2"
NGINX1 = "specs.smi.nginx.com/v1alpha1"


def manifests() -> list[dict[str, Any]]:
    return [
        {"apiVersion": "meshloom.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
         "spec": {"mtlsMode": "strict", "accessControlMode": "deny", "loadBalancingMethod": "least_conn"}},
        namespace("shop", INJECT),
        namespace("pay", INJECT),
        namespace("legacy"),
        # ---- shop
        service("shop", "web", {"app": "web"}, [{"name": "http", "port": 80, "targetPort": 8080}], "10.96.0.10"),
        pod("shop", "web-1", {"app": "web"}, "web", "10.0.1.1", HTTP_8080),
        pod("shop", "web-2", {"app": "web"}, "web", "10.0.1.2", HTTP_8080),
        pod("shop", "web-3", {"app": "web"}, "web", None, HTTP_8080),
        service("shop", "api", {"app": "api"},
                [{"name": "http-api", "port": 8080, "targetPort": "http"}, {"name": "grpc", "port": 9090}],
                "10.96.0.11"),
        service("shop", "api-v1", {"app": "api", "version": "v1"},
                [{"name": "http-api", "port": 8080, "targetPort": "http"}, {"name": "grpc", "port": 9090}],
                "10.96.0.12"),
        service("shop", "api-v2", {"app": "api", "version": "v2"},
                [{"name": "http-api", "port": 8080, "targetPort": "http"}], "10.96.0.13"),
        pod("shop", "api-v1-1", {"app": "api", "version": "v1"}, "api", "10.0.2.1",
            [{"name": "http", "containerPort": 8000}, {"name": "grpc", "containerPort": 9090}]),
        pod("shop", "api-v2-1", {"app": "api", "version": "v2"}, "api", "10.0.2.2",
            [{"name": "http", "containerPort": 8001}, {"name": "grpc", "containerPort": 9090}]),
        service("shop", "db", {"app": "db"}, [{"name": "tcp-pg", "port": 5432}], "10.96.0.14"),
        pod("shop", "db-0", {"app": "db"}, "db", "10.0.3.1", [{"name": "tcp-pg", "containerPort": 5432}],
            annotations={"config.nsm.nginx.com/mtls-mode": "permissive"}),
        {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"namespace": "shop", "name": "db"},
         "subsets": [{"addresses": [{"ip": "10.0.3.1", "targetRef": {"kind": "Pod", "name": "db-0"}}],
                      "notReadyAddresses": [{"ip": "10.0.3.9"}],
                      "ports": [{"name": "tcp-pg", "port": 5432, "protocol": "TCP"}]}]},
        service("shop", "fallback", {"app": "fallback"}, [{"name": "http", "port": 80, "targetPort": 8080}],
                "10.96.0.15"),
        pod("shop", "fallback-1", {"app": "fallback"}, "default", "10.0.4.1", HTTP_8080),
        pod("shop", "debug", {"app": "debug", "injector.nsm.nginx.com/auto-inject": "disabled"}, "default",
            "10.0.9.9", []),
        # ---- pay
        service("pay", "payments", {"app": "payments"}, [{"name": "http", "port": 80, "targetPort": 8080}],
                "10.96.1.10"),
        pod("pay", "payments-1", {"app": "payments"}, "payments", "10.0.5.1", HTTP_8080),
        # ---- legacy (no sidecars)
        service("legacy", "old", {"app": "old"}, [{"port": 80}], "10.96.2.10"),
        pod("legacy", "old-1", {"app": "old"}, "default", "10.0.6.1", [{"containerPort": 80}]),
        # ---- policies
        policy(SPECS, "HTTPRouteGroup", "shop", "api-routes", {"matches": [
            {"name": "read", "methods": ["GET", "HEAD"], "pathRegex": "/api/.*"},
            {"name": "write", "methods": ["POST", "PUT"], "pathRegex": "/api/.*"},
        ]}),
        policy(SPECS, "HTTPRouteGroup", "shop", "canary-users", {"matches": [
            {"name": "canary", "headers": {"x-canary": "^true$"}},
        ]}),
        policy(SPECS, "TCPRoute", "shop", "db-port", {"matches": {"ports": [5432]}}),
        policy(ACCESS, "TrafficTarget", "shop", "web-to-api", {
            "destination": {"kind": "ServiceAccount", "name": "api", "namespace": "shop"},
            "sources": [{"kind": "ServiceAccount", "name": "web", "namespace": "shop"}],
            "rules": [{"kind": "HTTPRouteGroup", "name": "api-routes", "matches": ["read"]}]}),
        policy(ACCESS, "TrafficTarget", "shop", "payments-to-api", {
            "destination": {"kind": "ServiceAccount", "name": "api", "namespace": "shop", "port": 8000},
            "sources": [{"kind": "ServiceAccount", "name": "payments", "namespace": "pay"}],
            "rules": [{"kind": "HTTPRouteGroup", "name": "api-routes"}]}),
        policy(ACCESS, "TrafficTarget", "shop", "api-to-db", {
            "destination": {"kind": "ServiceAccount", "name": "db", "namespace": "shop"},
            "sources": [{"kind": "ServiceAccount", "name": "api", "namespace": "shop"}],
            "rules": [{"kind": "TCPRoute", "name": "db-port"}]}),
        policy(SPLIT, "TrafficSplit", "shop", "api-canary", {
            "service": "api", "backends": [{"service": "api-v1", "weight": 90}, {"service": "api-v2", "weight": 10}],
            "matches": [{"kind": "HTTPRouteGroup", "name": "canary-users"}]}),
        policy(NGINX2, "RateLimit", "shop", "api-writes", {
            "destination": {"kind": "Service", "name": "api", "namespace": "shop"},
            "sources": [{"kind": "Service", "name": "web", "namespace": "shop"}],
            "name": "10rs", "rate": "10r/s", "burst": 5, "delay": "nodelay",
            "rules": [{"kind": "HTTPRouteGroup", "name": "api-routes", "matches": ["write"]}]}),
        policy(NGINX2, "RateLimit", "shop", "api-default", {
            "destination": {"kind": "Service", "name": "api", "namespace": "shop"},
            "name": "600rm", "rate": "600r/m"}),
        policy(NGINX1, "CircuitBreaker", "shop", "web-breaker", {
            "destination": {"kind": "Service", "name": "web", "namespace": "shop"},
            "errors": 3, "timeoutSeconds": 30, "fallback": {"service": "shop/fallback", "port": 80}}),
    ]
