"""`meshctl demo`'s pure parts: the demo's mesh file, and what its traffic showed, as data and as a table.

Theory of operation
-------------------
The demo is one mesh file (`manifest`) run by `meshctl up`, then traffic sent from inside its pods with the
application's `request` command (apps/echo.py), then a summary (`summarize`, `table`). The topology, namespace
`demo`, every workload one replica of apps/echo.py on port 8080 named http (so the sidecars proxy it at layer 7):

    client ----> frontend ----> backend  (TrafficSplit: backend-v1 80, backend-v2 20)
    intruder --X                                                   (no TrafficTarget: 403 from frontend's sidecar)
    client ----> frontend /limited                                 (RateLimit 10r/s from client: the excess is 503)

MeshConfig: strict mTLS and access control `deny`, so only what the TrafficTargets grant gets through. The frontend
runs `serve --upstream http://backend.demo.svc/`: each answer it gives carries its backend's answer, which is how
the summary sees the inner edge frontend -> backend (the split as observed, the identity the backend saw) without
sending any traffic from the host into the pods.

`summarize` reads, per traffic label ("client -> frontend"), the result list `apps/echo.py request` prints: each
`{"status", "body", "t"}` or `{"error", "t"}`, the body being the echo answer (which pod answered, with which
headers: the sidecar adds `x-meshloom-client-id`, the caller's SPIFFE ID as verified on mutual TLS). Refusals are
told apart by their status and explained with `RefusalReason`: 403 is the access policy (sidecar/haproxy.py), 503
on an edge the caller says is rate limited is the rate limit, 502 is the frontend whose upstream never answered.

Pure: no I/O. The driver that starts the mesh, runs the traffic and rotates certificates lives with the CLI.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import yaml
from rich.table import Table

from catalog import spiffe_id
from sidecar.haproxy import ACCESS_DENIED_STATUS, CLIENT_ID_HEADER, RATE_LIMITED_STATUS

NAMESPACE = "demo"
PORT = 8080  # every workload's port, named http: the sidecars proxy it at layer 7, so splits and limits apply
RATE = "10r/s"
SPLIT = (("backend-v1", 80), ("backend-v2", 20))
UPSTREAM_GATEWAY_STATUS = 502  # apps/echo.py: its upstream gave no answer at all

# The traffic the driver sends, by label: (from workload, to Service, path). The labels key `summarize`'s input.
CLIENT_TO_FRONTEND = "client -> frontend"
INTRUDER_TO_FRONTEND = "intruder -> frontend"
CLIENT_TO_LIMITED = "client -> frontend /limited"
TRAFFIC: Mapping[str, tuple[str, str, str]] = {
    CLIENT_TO_FRONTEND: ("client", "frontend", "/"),
    INTRUDER_TO_FRONTEND: ("intruder", "frontend", "/"),
    CLIENT_TO_LIMITED: ("client", "frontend", "/limited"),
}
# The edge behind each workload that calls another (apps/echo.py --upstream), named for the summary.
UPSTREAMS: Mapping[str, str] = {"frontend": "backend"}
# The edges a RateLimit covers, with its rate: their 503s are the limit's, not an unavailable service's.
RATE_LIMITED: Mapping[str, str] = {CLIENT_TO_LIMITED: RATE}


# --------------------------------------------------------------------------------------------------- manifest ---
def manifest(app: Sequence[str]) -> str:
    """The demo's mesh file (issue 6's format) as YAML; `app` is the argv prefix that runs apps/echo.py."""
    prefix = [str(a) for a in app]
    serve = [*prefix, "serve", "--http", str(PORT)]
    ports = [{"name": "http", "containerPort": PORT}]

    def workload(name: str, account: str, labels: Mapping[str, str], command: list[str]) -> dict[str, Any]:
        return {"name": name, "namespace": NAMESPACE, "serviceAccount": account, "labels": dict(labels),
                "command": command, "ports": ports, "replicas": 1}

    def service(name: str, selector: Mapping[str, str]) -> dict[str, Any]:
        return {"name": name, "namespace": NAMESPACE, "selector": dict(selector),
                "ports": [{"name": "http", "port": 80, "targetPort": PORT}]}

    def policy(api: str, kind: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": dict(spec)}

    def account(name: str) -> dict[str, str]:
        return {"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}

    mesh = {"apiVersion": "meshloom.io/v1alpha1", "kind": "Mesh", "metadata": {"name": "demo"}, "spec": {
        "workloads": [
            # client and intruder only call: their servers exist so that they are ordinary pods to call from.
            workload("client", "client", {"app": "client"}, serve),
            workload("intruder", "intruder", {"app": "intruder"}, serve),
            workload("frontend", "frontend", {"app": "frontend"},
                     [*serve, "--upstream", f"http://backend.{NAMESPACE}.svc/"]),
            workload("backend-v1", "backend", {"app": "backend", "version": "v1"}, serve),
            workload("backend-v2", "backend", {"app": "backend", "version": "v2"}, serve),
        ],
        "services": [
            service("frontend", {"app": "frontend"}),
            service("backend", {"app": "backend"}),
            service("backend-v1", {"app": "backend", "version": "v1"}),
            service("backend-v2", {"app": "backend", "version": "v2"}),
        ],
    }}
    everything = {"kind": "HTTPRouteGroup", "name": "everything"}
    policies = [
        {"apiVersion": "meshloom.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
         "spec": {"mtlsMode": "strict", "accessControlMode": "deny"}},
        policy("split.smi-spec.io/v1alpha3", "TrafficSplit", "backend", {
            "service": "backend", "backends": [{"service": s, "weight": w} for s, w in SPLIT]}),
        policy("specs.smi-spec.io/v1alpha3", "HTTPRouteGroup", "everything", {
            "matches": [{"name": "all", "methods": ["*"]}]}),
        policy("specs.smi-spec.io/v1alpha3", "HTTPRouteGroup", "limited", {
            "matches": [{"name": "limited", "methods": ["*"], "pathRegex": "/limited"}]}),
        # Access control is deny: these two are the only ways in. The intruder has none, so its calls get 403.
        policy("access.smi-spec.io/v1alpha2", "TrafficTarget", "client-to-frontend", {
            "destination": account("frontend"), "sources": [account("client")], "rules": [everything]}),
        policy("access.smi-spec.io/v1alpha2", "TrafficTarget", "frontend-to-backend", {
            "destination": account("backend"), "sources": [account("frontend")], "rules": [everything]}),
        policy("specs.smi.nginx.com/v1alpha2", "RateLimit", "frontend-limited", {
            "destination": {"kind": "Service", "name": "frontend", "namespace": NAMESPACE},
            "sources": [{"kind": "Pod", "name": "client-0", "namespace": NAMESPACE}],
            "name": "limited", "rate": RATE, "burst": 0, "delay": "nodelay",
            "rules": [{"kind": "HTTPRouteGroup", "name": "limited", "matches": ["limited"]}]}),
    ]
    header = ("# meshctl demo: client -> frontend -> backend (split 80/20 between v1 and v2); intruder refused by\n"
              "# the access policy; frontend's /limited rate limited at 10r/s for client. Run: meshctl up -f FILE\n")
    body: str = yaml.dump_all([mesh, *policies], Dumper=_Plain, sort_keys=False, default_flow_style=None,
                              width=120)
    return header + body


class _Plain(yaml.SafeDumper):  # type: ignore[misc]  # yaml ships no types here
    """Writes a value used twice twice: anchors and aliases (`&id001`) would puzzle whoever reads the file."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# ---------------------------------------------------------------------------------------------------- summary ---
class RefusalReason(StrEnum):
    ACCESS_POLICY = "access-policy"
    RATE_LIMIT = "rate-limit"
    UPSTREAM_FAILED = "upstream-failed"
    UNAVAILABLE = "unavailable"
    CLIENT_ERROR = "client-error"
    SERVER_ERROR = "server-error"
    NO_ANSWER = "no-answer"


REFUSAL_TEXT: Mapping[RefusalReason, str] = {
    RefusalReason.ACCESS_POLICY: "by the access policy (no TrafficTarget grants this caller)",
    RefusalReason.RATE_LIMIT: "over the {rate} rate limit",
    RefusalReason.UPSTREAM_FAILED: "the upstream gave no answer",
    RefusalReason.UNAVAILABLE: "service unavailable (no server, or a rate limit)",
    RefusalReason.CLIENT_ERROR: "refused",
    RefusalReason.SERVER_ERROR: "server error",
    RefusalReason.NO_ANSWER: "no answer",
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """Requests of one edge that did not succeed, for one reason: `status` 0 when no HTTP answer came."""

    status: int
    count: int
    reason: RefusalReason
    rate: str = ""  # the rate limit's rate, for RATE_LIMIT

    @property
    def text(self) -> str:
        """"20 x 403 by the access policy ...", "20 x 503 over the 10r/s rate limit"."""
        what = f"{self.count} x {self.status}" if self.status else f"{self.count} x"
        return f"{what} {REFUSAL_TEXT[self.reason].format(rate=self.rate or 'its')}"


@dataclass(frozen=True, slots=True)
class Server:
    """Who answered an edge's successful requests: one pod, how often, and its share of them."""

    pod: str  # "demo/backend-v1-0"
    service_account: str  # "" when the answer did not say
    spiffe_id: str  # derived from the pod's namespace and service account; "" when unknown
    count: int
    percent: float


@dataclass(frozen=True, slots=True)
class Edge:
    label: str  # "client -> frontend", or an inner edge: "frontend -> backend"
    requests: int
    successes: int  # 2xx answers
    statuses: tuple[tuple[int, int], ...]  # (status, count), status 0 for no answer; sorted by status
    client_ids: tuple[str, ...]  # the callers' SPIFFE IDs as the servers saw them (x-meshloom-client-id), sorted
    servers: tuple[Server, ...]  # sorted by pod
    refusals: tuple[Refusal, ...]  # every request that did not succeed, grouped by status and reason
    errors: tuple[tuple[str, int], ...]  # the text of failures without an answer, with their counts
    inner: bool = False  # derived from the upstream answers rather than sent by the driver

    @property
    def success_rate(self) -> float:
        """Successes per request, 0..1; 0 for an edge with no requests."""
        return self.successes / self.requests if self.requests else 0.0

    @property
    def split(self) -> tuple[tuple[str, float], ...]:
        """The observed split: (pod name without namespace, percent of the successes), when several answered."""
        if len(self.servers) < 2:
            return ()
        return tuple((s.pod.rpartition("/")[2], s.percent) for s in self.servers)


@dataclass(frozen=True, slots=True)
class Summary:
    trust_domain: str
    edges: tuple[Edge, ...]  # the driver's edges in its order, then the inner edges their answers revealed

    def edge(self, label: str) -> Edge:
        for e in self.edges:
            if e.label == label:
                return e
        raise KeyError(label)


_REPLICA = re.compile(r"-[0-9]+\Z")


def workload_of(pod: str) -> str:
    """`demo/frontend-0` -> `frontend`: pods are named `<workload>-<i>`."""
    return _REPLICA.sub("", pod.rpartition("/")[2])


def summarize(calls: Mapping[str, Sequence[Mapping[str, Any]]], trust_domain: str, *,
              upstreams: Mapping[str, str] = UPSTREAMS, rate_limited: Mapping[str, str] = RATE_LIMITED) -> Summary:
    """Per edge of `calls` (label -> `apps/echo.py request` results), plus the inner edges their answers reveal:
    a workload named in `upstreams` (workload -> the Service it calls) answered with its upstream's answer, which
    makes the edge "<workload> -> <service>". 503s on an edge of `rate_limited` (label -> rate) are the limit's."""
    edges: list[Edge] = []
    inner: dict[str, list[Mapping[str, Any]]] = {}
    for label, results in calls.items():
        edges.append(_edge(label, results, trust_domain, rate_limited.get(label, "")))
        for r in results:
            body = r.get("body")
            if not isinstance(body, Mapping) or not isinstance(body.get("upstream"), Mapping):
                continue
            caller = workload_of(str(body.get("pod", "")))
            name = f"{caller} -> {upstreams.get(caller, 'upstream')}"
            inner.setdefault(name, []).append(_as_result(body["upstream"]))
    for name in sorted(inner):
        edges.append(_edge(name, inner[name], trust_domain, rate_limited.get(name, ""), inner=True))
    return Summary(trust_domain, tuple(edges))


def _as_result(upstream: Mapping[str, Any]) -> Mapping[str, Any]:
    """An upstream record {"status", "body", "error"} read as a request result."""
    status = upstream.get("status")
    if not status:
        return {"error": upstream.get("error") or "no answer"}
    return {"status": status, "body": upstream.get("body")}


def _edge(label: str, results: Sequence[Mapping[str, Any]], trust_domain: str, rate: str, *,
          inner: bool = False) -> Edge:
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    clients: set[str] = set()
    served: Counter[tuple[str, str]] = Counter()
    for r in results:
        status = r.get("status")
        if not isinstance(status, int) or isinstance(status, bool) or status <= 0:
            statuses[0] += 1
            errors[str(r.get("error") or "no answer")] += 1
            continue
        statuses[status] += 1
        body = r.get("body")
        if not isinstance(body, Mapping):
            continue  # a sidecar's own answer (403, 503): no application saw the request
        headers = body.get("headers")
        if isinstance(headers, Mapping) and headers.get(CLIENT_ID_HEADER):
            clients.add(str(headers[CLIENT_ID_HEADER]))
        if 200 <= status < 300 and body.get("pod"):
            served[(str(body["pod"]), str(body.get("serviceAccount") or ""))] += 1
    successes = sum(n for s, n in statuses.items() if 200 <= s < 300)
    servers = []
    for (pod, account), n in sorted(served.items()):
        namespace = pod.partition("/")[0] if "/" in pod else ""
        sid = spiffe_id(trust_domain, namespace, account) if namespace and account else ""
        servers.append(Server(pod, account, sid, n, round(100 * n / successes, 1) if successes else 0.0))
    refusals = []
    for status, n in sorted(statuses.items()):
        if 200 <= status < 400:
            continue
        reason = _reason(status, bool(rate))
        refusals.append(Refusal(status, n, reason, rate if reason is RefusalReason.RATE_LIMIT else ""))
    return Edge(label, len(results), successes, tuple(sorted(statuses.items())), tuple(sorted(clients)),
                tuple(servers), tuple(refusals), tuple(sorted(errors.items())), inner)


def _reason(status: int, rate_limited: bool) -> RefusalReason:
    if status == 0:
        return RefusalReason.NO_ANSWER
    if status == ACCESS_DENIED_STATUS:
        return RefusalReason.ACCESS_POLICY
    if status == RATE_LIMITED_STATUS:
        # The sidecar answers a rate limit with 503 (as NGINX Service Mesh does), the same status as a Service
        # with no server: only on an edge that a RateLimit covers is it read as the limit.
        return RefusalReason.RATE_LIMIT if rate_limited else RefusalReason.UNAVAILABLE
    if status == UPSTREAM_GATEWAY_STATUS:
        return RefusalReason.UPSTREAM_FAILED
    return RefusalReason.CLIENT_ERROR if status < 500 else RefusalReason.SERVER_ERROR


# ------------------------------------------------------------------------------------------------------ table ---
def identities(edge: Edge) -> str:
    """"spiffe://.../sa/client -> spiffe://.../sa/frontend": who called, as verified, and who answered."""
    clients = ", ".join(edge.client_ids) or "-"
    servers = ", ".join(sorted({s.spiffe_id for s in edge.servers if s.spiffe_id})) or "-"
    return f"{clients} -> {servers}"


def notes(edge: Edge) -> str:
    """The few words a reader needs: the split, the refusals and failures, explained."""
    out = []
    if edge.split:
        out.append("split " + " / ".join(f"{name} {percent:g}%" for name, percent in edge.split))
    elif len(edge.servers) == 1:
        out.append(f"answered by {edge.servers[0].pod}")
    for refusal in edge.refusals:
        if refusal.status:  # no answer at all: said below, with what went wrong
            out.append(("refused " if refusal.reason is RefusalReason.ACCESS_POLICY else "") + refusal.text)
    for text, n in edge.errors:
        out.append(f"{n} x {text}")
    return "; ".join(out) or "-"


def table(summary: Summary) -> Table:
    """One row per edge, readable at a glance: requests, success rate, mTLS identities, notes."""
    t = Table(box=None, pad_edge=False, header_style="bold", title=f"trust domain {summary.trust_domain}",
              title_justify="left")
    for column in ("EDGE", "REQUESTS", "SUCCESS", "mTLS IDENTITIES (client -> server)", "NOTES"):
        t.add_column(column, no_wrap=column != "NOTES")
    for edge in summary.edges:
        label = f"  {edge.label}" if edge.inner else edge.label  # an inner edge sits under the one it came from
        t.add_row(label, str(edge.requests), f"{100 * edge.success_rate:.1f}%", identities(edge), notes(edge))
    return t
