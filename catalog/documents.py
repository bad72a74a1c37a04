"""Each sidecar's configuration document, computed from the world; and the outbound shards the documents share.

Theory of operation
-------------------
A sidecar needs two kinds of knowledge. **Inbound** is its own: which ports its pod serves and with what protocol,
who may reach each port (in deny mode: the SPIFFE IDs of TrafficTarget sources and their allowed routes), the rate
limits on it. **Outbound** is everybody's: every Service of the mesh, its virtual address, ports, endpoints (with the
SPIFFE ID each endpoint's sidecar must present), TrafficSplit and CircuitBreaker -- NGINX Service Mesh lets every
sidecar reach every Service and enforces access on the inbound side, so this part is the same for all sidecars.

Putting the outbound part into every document would make each document as large as the mesh (10,000 pods behind
1,000 Services: 10,000 endpoints in each of 10,000 documents, about 10 GB to compute and send for every change).
So the outbound part is computed **once**, cut into one **shard per namespace** (`outbound/<namespace>`: the
Services of that namespace with everything about them), and each sidecar document carries only the SHA-256 digest
(hex) of every shard. The documents stay small (their own inbound plus one digest per namespace); a shard stays well
under NATS's default 1 MB payload unless one namespace alone holds thousands of endpoints; a sidecar fetches only
the shards whose digest changed.

Because the digests are in the document, a change anywhere in a shard changes the document of every sidecar: every
sidecar gets a new generation and acknowledges it only once it has fetched the shard, so "is my sidecar in sync?"
covers its endpoints and splits too, not only its own inbound rules. A change that only touches inbound policy (a
TrafficTarget, a RateLimit) changes only the documents of the pods it applies to.

Cost. One pass indexes the world (`Index`: pods by namespace and label, so a selector costs about the pods it
selects, never all pods). Shards are built once per world. Inbound depends on a pod only through its namespace,
service account, the Services that select it, its container ports, the rate limits that name it and its override
annotations: pods sharing all of these (the replicas of one Deployment) share one inbound computation and one
serialization, and each pod's document is that serialization with its own key spliced in. So the work is linear in
the size of the world, with a small constant per pod.

Documents are canonical JSON (sorted keys, no whitespace, ASCII): the same world gives the same bytes, whatever
the order its resources came in. They hold no generation (the rollout numbers them) and nothing time-dependent.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from catalog.fields import FrozenMap
from catalog.kube import CLIENT_MAX_BODY_SIZE_ANNOTATION, MTLS_MODE_ANNOTATION, Pod, Service, ServicePort
from catalog.policy import (
    AccessControlMode,
    CircuitBreaker,
    HTTPMatch,
    HTTPRouteGroup,
    MtlsMode,
    RateLimit,
    RuleRef,
    TrafficSplit,
)
from catalog.resource import Protocol, Transport
from catalog.world import Index, World, spiffe_id

SIDECAR_SCHEMA = "meshloom.io/sidecar/v1alpha1"
SHARD_SCHEMA = "meshloom.io/outbound-shard/v1alpha1"
SHARD_PREFIX = "outbound/"
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+\Z")  # SPIFFE: lowercase letters, digits, '.', '-', '_'


def canonical(obj: Any) -> bytes:
    """The one serialization of a document: sorted keys, no whitespace, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def digest(data: bytes) -> str:
    """How a document names a shard: `sha256:` and the SHA-256 of its bytes in lowercase hex."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------- shared pieces ---
@dataclass(frozen=True, slots=True)
class RouteMatch:
    """One HTTPRouteGroup match, resolved: a request matches when its method, path and headers all do."""

    group: str  # "namespace/name" of the HTTPRouteGroup
    name: str
    methods: tuple[str, ...]  # () or ("*",): any method
    path_regex: str  # "": any path; else anchored at the start of the path
    headers: FrozenMap  # header -> value regex

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "name": self.name, "methods": list(self.methods), "pathRegex": self.path_regex,
                "headers": self.headers.to_dict()}


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str
    port: int
    spiffe_id: str | None  # what the server's certificate must say; None: no sidecar there, plain traffic

    def to_json(self) -> dict[str, Any]:
        return {"ip": self.ip, "port": self.port, "spiffeId": self.spiffe_id}


def _endpoints_json(endpoints: Iterable[Endpoint]) -> list[dict[str, Any]]:
    return [e.to_json() for e in endpoints]


# ------------------------------------------------------------------------------------------------ outbound ---
@dataclass(frozen=True, slots=True)
class OutboundPort:
    name: str
    port: int  # the Service port clients connect to (on the virtual address)
    protocol: Protocol
    endpoints: tuple[Endpoint, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "port": self.port, "protocol": self.protocol.value,
                "endpoints": _endpoints_json(self.endpoints)}


@dataclass(frozen=True, slots=True)
class BackendPort:
    port: int  # the root Service's port
    endpoints: tuple[Endpoint, ...]  # the backend's endpoints for its port of the same number

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "endpoints": _endpoints_json(self.endpoints)}


@dataclass(frozen=True, slots=True)
class SplitBackend:
    service: str  # a Service of the root's namespace
    weight: int
    ports: tuple[BackendPort, ...]  # only the root's ports the backend also has (SMI); () if it does not exist

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "weight": self.weight, "ports": [p.to_json() for p in self.ports]}


@dataclass(frozen=True, slots=True)
class SplitEntry:
    policy: str  # "namespace/name" of the TrafficSplit
    matches: tuple[RouteMatch, ...] | None  # None: every request; else only matching ones (ORed), () none at all
    backends: tuple[SplitBackend, ...]

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "matches": None if self.matches is None else [m.to_json() for m in self.matches],
                "backends": [b.to_json() for b in self.backends]}


@dataclass(frozen=True, slots=True)
class FallbackEntry:
    service: str  # "namespace/name"
    port: int
    address: str | None
    endpoints: tuple[Endpoint, ...]  # () while the fallback Service or its port does not exist

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "port": self.port, "address": self.address,
                "endpoints": _endpoints_json(self.endpoints)}


@dataclass(frozen=True, slots=True)
class CircuitBreakerEntry:
    policy: str
    errors: int
    timeout_seconds: int
    fallback: FallbackEntry | None

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "errors": self.errors, "timeoutSeconds": self.timeout_seconds,
                "fallback": None if self.fallback is None else self.fallback.to_json()}


@dataclass(frozen=True, slots=True)
class OutboundService:
    name: str
    address: str | None  # the virtual address; None: headless or not allocated (clients dial endpoints directly)
    ports: tuple[OutboundPort, ...]
    split: SplitEntry | None
    circuit_breaker: CircuitBreakerEntry | None

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "ports": [p.to_json() for p in self.ports],
                "split": None if self.split is None else self.split.to_json(),
                "circuitBreaker": None if self.circuit_breaker is None else self.circuit_breaker.to_json()}


@dataclass(frozen=True, slots=True)
class OutboundShard:
    """Every Service of one namespace, as any sidecar calling them needs to know them."""

    namespace: str
    services: tuple[OutboundService, ...]

    def to_json(self) -> dict[str, Any]:
        return {"schema": SHARD_SCHEMA, "namespace": self.namespace,
                "services": {s.name: s.to_json() for s in self.services}}


# ------------------------------------------------------------------------------------------------- inbound ---
@dataclass(frozen=True, slots=True)
class Grant:
    """One source identity allowed on a port: for any request (`routes` None), or for matching requests only."""

    spiffe_id: str
    routes: tuple[RouteMatch, ...] | None

    def to_json(self) -> dict[str, Any]:
        return {"spiffeId": self.spiffe_id,
                "routes": None if self.routes is None else [m.to_json() for m in self.routes]}


@dataclass(frozen=True, slots=True)
class InboundRateLimit:
    policy: str  # "namespace/name" of the RateLimit
    name: str  # its spec.name
    rate: str  # "10r/s"
    burst: int
    delay: int | str  # or "nodelay"
    # None: every source (the default limit, for sources no other limit of this port names); else these identities,
    # sharing the rate evenly as NGINX Service Mesh does; () none (its sources do not exist yet)
    sources: tuple[str, ...] | None
    routes: tuple[RouteMatch, ...] | None  # None: every request; else matching ones

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "name": self.name, "rate": self.rate, "burst": self.burst, "delay": self.delay,
                "sources": None if self.sources is None else list(self.sources),
                "routes": None if self.routes is None else [m.to_json() for m in self.routes]}


@dataclass(frozen=True, slots=True)
class InboundPort:
    port: int  # the pod's port
    transport: Transport
    protocol: Protocol
    services: tuple[str, ...]  # "namespace/name" of the Services that reach this port
    allow_all: bool  # allow mode: every source may connect, `sources` is empty
    sources: tuple[Grant, ...]  # deny mode: who may, sorted by identity
    rate_limits: tuple[InboundRateLimit, ...]  # http and grpc ports only

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "transport": self.transport.value, "protocol": self.protocol.value,
                "services": list(self.services), "allowAll": self.allow_all,
                "sources": [g.to_json() for g in self.sources],
                "rateLimits": [rl.to_json() for rl in self.rate_limits]}


@dataclass(frozen=True, slots=True)
class SidecarDocument:
    sidecar: str  # "namespace/name" of the pod: the sidecar's key
    spiffe_id: str
    mtls_mode: MtlsMode
    access_control_mode: AccessControlMode
    load_balancing_method: str
    client_max_body_size: str
    enable_udp: bool
    log_level: str
    log_format: str
    inbound: tuple[InboundPort, ...]
    outbound: FrozenMap  # namespace -> digest of its shard (`outbound/<namespace>`)

    def to_json(self) -> dict[str, Any]:
        return {"sidecar": self.sidecar, **self._body()}

    def _body(self) -> dict[str, Any]:
        return {"schema": SIDECAR_SCHEMA, "spiffeId": self.spiffe_id, "mtlsMode": self.mtls_mode.value,
                "accessControlMode": self.access_control_mode.value,
                "loadBalancingMethod": self.load_balancing_method, "clientMaxBodySize": self.client_max_body_size,
                "enableUDP": self.enable_udp, "logLevel": self.log_level, "logFormat": self.log_format,
                "inbound": [p.to_json() for p in self.inbound], "outbound": {"shards": self.outbound.to_dict()}}


# ------------------------------------------------------------------------------------------------- results ---
@dataclass(frozen=True, slots=True)
class Rendered:
    """One world rendered: the sidecar documents (by sidecar key) and the shards they reference (by shard key)."""

    sidecars: dict[str, bytes]
    shared: dict[str, bytes]


def render(world: World, trust_domain: str) -> Rendered:
    """Both halves at once, consistently: what the engine publishes."""
    build = _Build(world, trust_domain)
    return Rendered(build.sidecar_bytes(), dict(build.shard_bytes))


def compute(world: World, trust_domain: str) -> dict[str, bytes]:
    """Each meshed pod's document ("<namespace>/<name>" -> canonical JSON); the shards are in `render()`."""
    return _Build(world, trust_domain).sidecar_bytes()


def documents(world: World, trust_domain: str) -> dict[str, SidecarDocument]:
    """The documents of `compute`, typed."""
    build = _Build(world, trust_domain)
    return {key: build.document(pod) for key, pod in build.meshed_pods()}


def shards(world: World, trust_domain: str) -> dict[str, OutboundShard]:
    """The outbound shards, typed, by shard key (`outbound/<namespace>`)."""
    return {SHARD_PREFIX + s.namespace: s for s in _Build(world, trust_domain).shards}


def changed(old: Mapping[str, bytes], new: Mapping[str, bytes]) -> set[str]:
    """The keys whose document changed, appeared or disappeared."""
    return {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}


# ------------------------------------------------------------------------------------------------ building ---
_RANK = {Protocol.GRPC: 3, Protocol.HTTP: 2, Protocol.TCP: 1, Protocol.UDP: 1}
_L7 = (Protocol.HTTP, Protocol.GRPC)


class _Build:
    """One world rendered for one trust domain; every piece computed at most once."""

    def __init__(self, world: World, trust_domain: str) -> None:
        if not _TRUST_DOMAIN.match(trust_domain):
            raise ValueError(f"trust domain must be lowercase letters, digits, '.', '-' and '_', got {trust_domain!r}")
        self.td = trust_domain
        self.ix = Index(world)
        self.config = self.ix.config
        self._matches: dict[tuple[str, str], tuple[RouteMatch, ...]] = {}
        self._limits: dict[str, InboundRateLimit] = {}
        self._inbounds: dict[tuple[Any, ...], tuple[InboundPort, ...]] = {}
        self.shards = self._shards()
        self.shard_bytes = {SHARD_PREFIX + s.namespace: canonical(s.to_json()) for s in self.shards}
        self.shard_digests = FrozenMap((k[len(SHARD_PREFIX):], digest(v)) for k, v in self.shard_bytes.items())

    # ---- identities and routes
    def spiffe(self, pod_key: str) -> str | None:
        pod = self.ix.pods.get(pod_key)
        if pod is None or not self.ix.meshed[pod_key]:
            return None
        return spiffe_id(self.td, pod.namespace, pod.service_account_name)

    def endpoints(self, svc: Service, port: ServicePort) -> tuple[Endpoint, ...]:
        return tuple(Endpoint(ip, number, self.spiffe(pod) if pod else None)
                     for ip, number, pod in self.ix.addresses(svc, port))

    def route_matches(self, namespace: str, rule: RuleRef) -> tuple[RouteMatch, ...]:
        """The matches a rule names, resolved; () when its route group is missing (fail closed)."""
        cache_key = (namespace, rule.show())
        if cache_key not in self._matches:
            group = self.ix.route_groups.get(f"{namespace}/{rule.name}")
            found: tuple[RouteMatch, ...] = ()
            if group is not None:
                found = tuple(_route(group, m) for m in group.matches if not rule.matches or m.name in rule.matches)
            self._matches[cache_key] = found
        return self._matches[cache_key]

    # ---- outbound
    def _shards(self) -> list[OutboundShard]:
        by_ns: dict[str, list[OutboundService]] = {}
        for key, svc in self.ix.services.items():
            split, cb = self.ix.split_for.get(key), self.ix.breaker_for.get(key)
            by_ns.setdefault(svc.namespace, []).append(OutboundService(
                svc.name, svc.address,
                tuple(OutboundPort(p.name, p.port, p.protocol, self.endpoints(svc, p)) for p in svc.ports),
                self._split(split, svc) if split is not None else None,
                self._breaker(cb) if cb is not None else None))
        return [OutboundShard(ns, tuple(services)) for ns, services in sorted(by_ns.items())]

    def _breaker(self, cb: CircuitBreaker) -> CircuitBreakerEntry:
        fallback = None
        if cb.fallback is not None:
            key = f"{cb.fallback.namespace}/{cb.fallback.service}"
            svc = self.ix.services.get(key)
            port = next((p for p in svc.ports if p.port == cb.fallback.port), None) if svc is not None else None
            fallback = FallbackEntry(key, cb.fallback.port, svc.address if svc is not None else None,
                                     self.endpoints(svc, port) if svc is not None and port is not None else ())
        return CircuitBreakerEntry(cb.ref, cb.errors, cb.timeout_seconds, fallback)

    def _split(self, split: TrafficSplit, root: Service) -> SplitEntry:
        matches: tuple[RouteMatch, ...] | None = None
        if split.matches:
            matches = tuple(m for rule in split.matches for m in self.route_matches(split.namespace, rule))
        backends = []
        for b in split.backends:
            svc = self.ix.services.get(f"{split.namespace}/{b.service}")
            ports = []
            if svc is not None:
                for root_port in root.ports:
                    same = next((p for p in svc.ports if p.port == root_port.port), None)
                    if same is not None:  # SMI: a backend without the root's port gets none of its traffic
                        ports.append(BackendPort(root_port.port, self.endpoints(svc, same)))
            backends.append(SplitBackend(b.service, b.weight, tuple(ports)))
        return SplitEntry(split.ref, matches, tuple(backends))

    # ---- inbound
    def meshed_pods(self) -> list[tuple[str, Pod]]:
        return [(key, pod) for key, pod in self.ix.pods.items() if self.ix.meshed[key]]

    def _group(self, pod: Pod) -> tuple[Any, ...]:
        """What a pod's document depends on besides its key: pods with equal groups share one body."""
        services = tuple(s.ref for s in self.ix.services_of.get(pod.ref, ()))
        own_limits = tuple(rl.ref for rl in self.ix.limits_for.get(f"Pod/{pod.ref}", ()))
        return (pod.namespace, pod.service_account_name, services, pod.container_ports, own_limits,
                pod.annotations.get(MTLS_MODE_ANNOTATION), pod.annotations.get(CLIENT_MAX_BODY_SIZE_ANNOTATION))

    def document(self, pod: Pod) -> SidecarDocument:
        cfg = self.config
        mtls = pod.annotations.get(MTLS_MODE_ANNOTATION)
        return SidecarDocument(
            sidecar=pod.ref,
            spiffe_id=spiffe_id(self.td, pod.namespace, pod.service_account_name),
            mtls_mode=MtlsMode(mtls) if mtls else cfg.mtls_mode,
            access_control_mode=cfg.access_control_mode,
            load_balancing_method=cfg.load_balancing_method.value,
            client_max_body_size=pod.annotations.get(CLIENT_MAX_BODY_SIZE_ANNOTATION, cfg.client_max_body_size),
            enable_udp=cfg.enable_udp,
            log_level=cfg.log_level.value,
            log_format=cfg.log_format.value,
            inbound=self._inbound_of(pod),
            outbound=self.shard_digests,
        )

    def _inbound_of(self, pod: Pod) -> tuple[InboundPort, ...]:
        group = self._group(pod)
        found = self._inbounds.get(group)
        if found is None:
            found = self._inbounds[group] = self._inbound(pod)
        return found

    def _inbound(self, pod: Pod) -> tuple[InboundPort, ...]:
        ports: dict[tuple[int, Transport], tuple[Protocol, set[str]]] = {}
        for svc in self.ix.services_of.get(pod.ref, ()):
            for sp in svc.ports:
                target = self.ix.target_port(sp, pod)
                if target is None:
                    continue
                key = (target, sp.transport)
                protocol, names = ports.get(key, (sp.protocol, set()))
                if _RANK[sp.protocol] > _RANK[protocol]:  # two Services disagree: the more specific protocol wins
                    protocol = sp.protocol
                names.add(svc.ref)
                ports[key] = (protocol, names)
        for cp in pod.container_ports:
            ports.setdefault((cp.container_port, cp.transport), (cp.protocol, set()))

        deny = self.config.access_control_mode is AccessControlMode.DENY
        own_limits = self.ix.limits_for.get(f"Pod/{pod.ref}", [])
        out = []
        for (number, transport), (protocol, names) in sorted(ports.items()):
            grants = self._grants(pod, number, transport, protocol) if deny else ()
            limits: list[RateLimit] = []
            if protocol in _L7:
                limits = [rl for svc in sorted(names) for rl in self.ix.limits_for.get(f"Service/{svc}", ())]
                limits += own_limits
            out.append(InboundPort(number, transport, protocol, tuple(sorted(names)), not deny, grants,
                                   tuple(sorted({self._limit(rl) for rl in limits}, key=lambda x: x.policy))))
        return tuple(out)

    def _grants(self, pod: Pod, port: int, transport: Transport, protocol: Protocol) -> tuple[Grant, ...]:
        """Deny mode: who may reach this port, from the TrafficTargets of the pod's service account.

        HTTPRouteGroup rules grant matching requests on http and grpc ports (a layer 4 port cannot be matched on
        paths). TCPRoute rules grant every connection on the ports they cover. UDP carries no identity to check,
        so no rule opens a UDP port in deny mode.
        """
        anything: set[str] = set()
        routes: dict[str, set[RouteMatch]] = {}
        if transport is Transport.UDP:
            return ()
        for tt in self.ix.targets_for.get((pod.namespace, pod.service_account_name), ()):
            if tt.destination_port is not None and tt.destination_port != port:
                continue
            sources = [spiffe_id(self.td, s.namespace, s.name) for s in tt.sources]
            for rule in tt.rules:
                if rule.kind == "TCPRoute":
                    route = self.ix.tcp_routes.get(f"{tt.namespace}/{rule.name}")
                    if route is not None and (not route.ports or port in route.ports):
                        anything.update(sources)
                elif protocol in _L7:
                    found = self.route_matches(tt.namespace, rule)
                    for source in sources:
                        routes.setdefault(source, set()).update(found)
        out = [Grant(s, None) for s in anything]
        out += [Grant(s, tuple(sorted(found, key=_order)))
                for s, found in routes.items() if s not in anything and found]
        return tuple(sorted(out, key=lambda g: g.spiffe_id))

    def _limit(self, rl: RateLimit) -> InboundRateLimit:
        if rl.key not in self._limits:
            sources: tuple[str, ...] | None = None
            if rl.sources:
                found: set[str] = set()
                for ref in rl.sources:
                    key = f"{ref.namespace}/{ref.name}"
                    pods = self.ix.selected.get(key, []) if ref.kind == "Service" else \
                        [p for p in (self.ix.pods.get(key),) if p is not None]
                    found.update(s for p in pods if (s := self.spiffe(p.ref)) is not None)
                sources = tuple(sorted(found))
            routes = None
            if rl.rules:
                routes = tuple(m for rule in rl.rules for m in self.route_matches(rl.namespace, rule))
            self._limits[rl.key] = InboundRateLimit(rl.ref, rl.limit_name, str(rl.rate), rl.burst, rl.delay,
                                                    sources, routes)
        return self._limits[rl.key]

    # ---- serialization
    def sidecar_bytes(self) -> dict[str, bytes]:
        """Every meshed pod's document. Pods of one group share one serialization; each gets its key spliced in
        where `canonical` would put it (keys sort, so "sidecar" has a fixed place among the body's keys)."""
        out: dict[str, bytes] = {}
        cache: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}
        for key, pod in self.meshed_pods():
            group = self._group(pod)
            parts = cache.get(group)
            if parts is None:
                parts = cache[group] = _split_body(self.document(pod)._body())
            # A key is a namespace and a pod name, both DNS-1123: nothing in it needs escaping in JSON.
            out[key] = parts[0] + b'"' + key.encode("ascii") + b'"' + parts[1]
        return out


def _split_body(body: dict[str, Any]) -> tuple[bytes, bytes]:
    before = canonical({k: v for k, v in body.items() if k < "sidecar"})[1:-1]
    after = canonical({k: v for k, v in body.items() if k > "sidecar"})[1:-1]
    return (b"{" + before + (b"," if before else b"") + b'"sidecar":', (b"," + after if after else b"") + b"}")


def _route(group: HTTPRouteGroup, m: HTTPMatch) -> RouteMatch:
    return RouteMatch(group.ref, m.name, m.methods, m.path_regex, m.headers)


def _order(m: RouteMatch) -> tuple[str, str]:
    return (m.group, m.name)
