"""What a sidecar's traffic looks like, read from its proxy's Prometheus metrics. Pure: no I/O.

Theory of operation
-------------------
HAProxy counts per frontend and per backend, and `sidecar/haproxy.py` names the backends so that each one is one
edge of the pod's traffic:

    <protocol>:<namespace>.<service>:<port>          outbound, to a Service port
    <protocol>:<namespace>.<service>:<port>:<leg>    outbound, to one leg of that port's TrafficSplit
    outbound-pod                                     outbound, to a meshed pod by its address
    outbound-passthrough                             outbound, out of the mesh
    inbound:<port>                                   inbound, to the application's port
    inbound-app                                      inbound, to a port of the pod no Service names

and the requests the mesh refused on the way in (access control, rate limit, body size) are the inbound frontends'
denied counters: they never reach a backend. (A client whose certificate fails the TLS handshake is counted
nowhere: the handshake ends before any rule.) Backends that carried nothing
are left out, as are the proxy's internal ones (rate-limit tables, the permissive loop).

An edge's requests are HTTP requests at layer 7 and connections at layer 4. Success at layer 7 is the share of
responses below 400 (a 403 from an access policy is not a success for the caller who got it); at layer 4, the share of
connections that neither failed to connect nor broke while reading. HAProxy's times are averages over the last 1,024
requests, and maxima since the proxy started.

The counters start at zero with each proxy process (a reload starts a new one), so a rate between two readings of
different processes (the process's start time tells) counts every edge from zero, as it does an edge whose counter
went down.
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from sidecar.haproxy import APP_BACKEND, INBOUND_BACKEND, L7, PASSTHROUGH_BACKEND, POD_BACKEND

# The exporter's scopes that hold every series read here: a tenth of the whole page.
SCRAPE_PATH = "/metrics?scope=global&scope=frontend&scope=backend"
_STARTED = "haproxy_process_start_time_seconds"

_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
_INTERNAL = ("ratelimit:", "inbound-mtls")
_DENIED = ("haproxy_frontend_requests_denied_total", "haproxy_frontend_denied_connections_total",
           "haproxy_frontend_denied_sessions_total")


class Direction(enum.StrEnum):
    inbound = "inbound"
    outbound = "outbound"


class BadMetrics(ValueError):
    """The text is not a Prometheus exposition."""


@dataclass(frozen=True, slots=True)
class Edge:
    direction: Direction
    peer: str  # "shop/web:80", "shop/web:80 > web-v2", ":8080", or what the proxy does with it in words
    protocol: str  # http, grpc or tcp
    requests: int  # HTTP requests at layer 7, connections at layer 4
    responses: Mapping[str, int]  # HTTP responses by class ("2xx", ...); empty at layer 4
    errors: int  # connections that failed or broke
    avg_seconds: float | None
    max_seconds: float | None

    @property
    def key(self) -> tuple[str, str]:
        return (self.direction.value, self.peer)

    @property
    def success(self) -> float | None:
        """The share of successes, 0 to 1; None before anything was answered."""
        if self.protocol in L7:
            answered = sum(self.responses.values())
            good = sum(self.responses.get(c, 0) for c in ("1xx", "2xx", "3xx"))
            return good / answered if answered else None
        # HAProxy counts a connection error per attempt: a retried connection can fail more than once.
        return max(0, self.requests - self.errors) / self.requests if self.requests else None


@dataclass(frozen=True, slots=True)
class Traffic:
    """One pod's traffic since its proxy started."""

    edges: tuple[Edge, ...]
    refused: int  # inbound requests and connections the mesh refused
    started: float | None = None  # when the proxy process that counted them started (seconds since the epoch)

    def edge(self, direction: Direction, peer: str) -> Edge | None:
        return next((e for e in self.edges if e.direction is direction and e.peer == peer), None)

    def total(self, direction: Direction) -> int:
        return sum(e.requests for e in self.edges if e.direction is direction)

    def success(self, direction: Direction) -> float | None:
        """Successes over everything answered in that direction, all edges together."""
        good = answered = 0.0
        for e in self.edges:
            if e.direction is direction and (share := e.success) is not None:
                weight = sum(e.responses.values()) if e.protocol in L7 else e.requests
                good += share * weight
                answered += weight
        return good / answered if answered else None


def describe(backend: str) -> tuple[Direction, str, str] | None:
    """A backend's edge as (direction, peer, protocol); None for the proxy's internal backends."""
    if backend.startswith(_INTERNAL):
        return None
    if backend == POD_BACKEND:
        return Direction.outbound, "(pods by address)", "tcp"
    if backend == PASSTHROUGH_BACKEND:
        return Direction.outbound, "(outside the mesh)", "tcp"
    if backend == APP_BACKEND:
        return Direction.inbound, "(ports without a Service)", "tcp"
    if backend.startswith(INBOUND_BACKEND):
        return Direction.inbound, ":" + backend.removeprefix(INBOUND_BACKEND), ""
    protocol, sep, rest = backend.partition(":")
    parts = rest.split(":")
    if not sep or len(parts) not in (2, 3) or "." not in parts[0]:
        return None
    namespace, _, service = parts[0].partition(".")
    peer = f"{namespace}/{service}:{parts[1]}" + (f" > {parts[2]}" if len(parts) == 3 else "")
    return Direction.outbound, peer, protocol


def read(text: str) -> Traffic:
    """A pod's traffic from its proxy's exposition (the page at SCRAPE_PATH, or the whole of /metrics)."""
    backends: dict[str, dict[str, float]] = defaultdict(dict)
    responses: dict[str, dict[str, int]] = defaultdict(dict)
    refused = 0.0
    started: float | None = None
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if not math.isfinite(s.value):  # NaN for what HAProxy cannot say (a downtime never measured)
                    continue
                proxy = s.labels.get("proxy", "")
                if s.name in _DENIED and proxy.startswith("inbound"):
                    refused += s.value
                elif s.name == "haproxy_backend_http_responses_total":
                    responses[proxy][s.labels.get("code", "other")] = int(s.value)
                elif s.name.startswith("haproxy_backend_"):
                    backends[proxy][s.name.removeprefix("haproxy_backend_")] = s.value
                elif s.name == _STARTED:
                    started = s.value
    except ValueError as exc:
        raise BadMetrics(f"not a Prometheus exposition: {exc}") from None
    edges = []
    for name, series in backends.items():
        described = describe(name)
        if described is None:
            continue
        direction, peer, protocol = described
        layer7 = "http_requests_total" in series
        if not protocol:  # inbound:<port>: the mode tells
            protocol = "http" if layer7 else "tcp"
        requests = int(series.get("http_requests_total" if layer7 else "sessions_total", 0))
        if requests == 0:
            continue
        errors = int(series.get("connection_errors_total", 0) + series.get("response_errors_total", 0))
        codes = {c: n for c, n in responses.get(name, {}).items() if c in _CLASSES and n} if layer7 else {}
        edges.append(Edge(direction, peer, protocol, requests, codes, errors, series.get("total_time_average_seconds"),
                          series.get("max_total_time_seconds")))
    edges.sort(key=lambda e: (e.direction.value, e.peer))
    return Traffic(tuple(edges), int(refused), started)


def rates(before: Traffic, after: Traffic, seconds: float) -> dict[tuple[str, str], float]:
    """Requests per second of each edge of `after` between the two readings; across a new proxy process (another
    start time, or a counter that went down) an edge counts from zero."""
    if seconds <= 0:
        raise ValueError("the readings must be apart in time")
    restarted = before.started is not None and after.started is not None and before.started != after.started
    earlier = {} if restarted else {e.key: e.requests for e in before.edges}
    out = {}
    for e in after.edges:
        previous = earlier.get(e.key, 0)
        out[e.key] = (e.requests - previous if e.requests >= previous else e.requests) / seconds
    return out
