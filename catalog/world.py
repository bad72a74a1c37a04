"""The world: every resource the mesh knows, immutable, and the indexes that every view is computed from.

A `World` stores nothing of its own beyond the resources: who selects whom, which pods are meshed, where a Service's
endpoints are, all of it is recomputed from the resources by `Index` (once per view, in one pass over the world,
never by scanning all pods for each service).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import TypeVar

from catalog.kube import AUTO_INJECT_LABEL, INJECTED_ANNOTATION, Endpoints, Namespace, Pod, Service, ServicePort
from catalog.policy import (
    DEFAULT_MESH_CONFIG,
    CircuitBreaker,
    HTTPRouteGroup,
    MeshConfig,
    RateLimit,
    TCPRoute,
    TrafficSplit,
    TrafficTarget,
)
from catalog.resource import Resource

R = TypeVar("R", bound=Resource)


@dataclass(frozen=True, slots=True, init=False, eq=False, repr=False)
class World:
    """An immutable set of resources, one per key; later resources replace earlier ones with the same key."""

    _items: Mapping[str, Resource]

    def __init__(self, resources: Iterable[Resource] = ()) -> None:
        items = {r.key: r for r in resources}
        object.__setattr__(self, "_items", MappingProxyType(dict(sorted(items.items()))))

    def with_applied(self, resources: Iterable[Resource]) -> World:
        """This world with `resources` created or replaced (an apply)."""
        return World([*self._items.values(), *resources])

    def without(self, keys: Iterable[str]) -> World:
        """This world with the resources of these keys removed; keys it does not hold are ignored."""
        gone = set(keys)
        return World(r for k, r in self._items.items() if k not in gone)

    def get(self, key: str) -> Resource | None:
        return self._items.get(key)

    def of(self, cls: type[R]) -> list[R]:
        """The resources of one kind, by key."""
        return [r for r in self._items.values() if isinstance(r, cls)]

    @property
    def mesh_config(self) -> MeshConfig:
        found = self._items.get(f"{MeshConfig.kind}//{MeshConfig.NAME}")
        return found if isinstance(found, MeshConfig) else DEFAULT_MESH_CONFIG

    def __iter__(self) -> Iterator[Resource]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __eq__(self, other: object) -> bool:
        return isinstance(other, World) and self._items == other._items

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"World({len(self._items)} resources)"


def is_meshed(pod: Pod, namespace: Namespace | None) -> bool:
    """Whether the pod runs a sidecar, and so gets a configuration document and an identity.

        injected annotation | pod auto-inject label | namespace auto-inject label | meshed
        "true"              | any                   | any                         | yes (manual or webhook injection)
        absent              | "enabled"             | any                         | yes
        absent              | "disabled"            | any                         | no  (the pod label wins)
        absent              | absent                | "enabled"                   | yes
        absent              | absent                | absent or other             | no
    """
    if pod.annotations.get(INJECTED_ANNOTATION) == "true":
        return True
    label = pod.labels.get(AUTO_INJECT_LABEL)
    if label is not None:
        return label == "enabled"
    return namespace is not None and namespace.labels.get(AUTO_INJECT_LABEL) == "enabled"


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account or 'default'}"


# A resolved endpoint: address, port, and the key ("ns/name") of the pod behind it ("" when there is none).
Address = tuple[str, int, str]


class Index:
    """Lookups over one world, each built once, lazily, in time linear in the world's size."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.config = world.mesh_config
        self.services: dict[str, Service] = {}
        self.endpoints: dict[str, Endpoints] = {}
        self.pods: dict[str, Pod] = {}
        self.namespaces: dict[str, Namespace] = {}
        self.route_groups: dict[str, HTTPRouteGroup] = {}
        self.tcp_routes: dict[str, TCPRoute] = {}
        self.splits: list[TrafficSplit] = []
        self.targets: list[TrafficTarget] = []
        self.rate_limits: list[RateLimit] = []
        self.breakers: list[CircuitBreaker] = []
        for r in world:  # in key order, so every list below is too
            match r:
                case Service():
                    self.services[r.ref] = r
                case Endpoints():
                    self.endpoints[r.ref] = r
                case Pod():
                    self.pods[r.ref] = r
                case Namespace():
                    self.namespaces[r.name] = r
                case HTTPRouteGroup():
                    self.route_groups[r.ref] = r
                case TCPRoute():
                    self.tcp_routes[r.ref] = r
                case TrafficSplit():
                    self.splits.append(r)
                case TrafficTarget():
                    self.targets.append(r)
                case RateLimit():
                    self.rate_limits.append(r)
                case CircuitBreaker():
                    self.breakers.append(r)

    @cached_property
    def meshed(self) -> dict[str, bool]:
        return {key: is_meshed(pod, self.namespaces.get(pod.namespace)) for key, pod in self.pods.items()}

    @cached_property
    def selected(self) -> dict[str, list[Pod]]:
        """Service ("ns/name") -> the pods its selector selects, by key.

        Pods are indexed by (namespace, label, value); a selector intersects its labels' lists starting from the
        shortest, so the cost is about the pods a service selects, not all the pods of the world.
        """
        by_label: dict[tuple[str, str, str], list[Pod]] = {}
        for pod in self.pods.values():
            for label, value in pod.labels.items():
                by_label.setdefault((pod.namespace, label, value), []).append(pod)
        out: dict[str, list[Pod]] = {}
        for key, svc in self.services.items():
            if not svc.selector:  # Kubernetes: a Service without a selector selects nothing
                out[key] = []
                continue
            lists = [by_label.get((svc.namespace, k, v), []) for k, v in svc.selector.items()]
            shortest = min(lists, key=len)
            items = svc.selector.items()
            out[key] = [p for p in shortest if all(p.labels.get(k) == v for k, v in items)]
        return out

    @cached_property
    def services_of(self) -> dict[str, list[Service]]:
        """Pod ("ns/name") -> the Services that select it, by key."""
        out: dict[str, list[Service]] = {}
        for key, pods in self.selected.items():
            svc = self.services[key]
            for pod in pods:
                out.setdefault(pod.ref, []).append(svc)
        return out

    @cached_property
    def targets_for(self) -> dict[tuple[str, str], list[TrafficTarget]]:
        """(namespace, service account) -> the TrafficTargets whose destination it is."""
        out: dict[tuple[str, str], list[TrafficTarget]] = {}
        for tt in self.targets:
            out.setdefault((tt.destination.namespace, tt.destination.name), []).append(tt)
        return out

    @cached_property
    def split_for(self) -> dict[str, TrafficSplit]:
        """Root Service ("ns/name") -> its TrafficSplit (the first by key, should `check` have been bypassed)."""
        out: dict[str, TrafficSplit] = {}
        for split in self.splits:
            out.setdefault(f"{split.namespace}/{split.service}", split)
        return out

    @cached_property
    def breaker_for(self) -> dict[str, CircuitBreaker]:
        out: dict[str, CircuitBreaker] = {}
        for cb in self.breakers:
            out.setdefault(f"{cb.destination.namespace}/{cb.destination.name}", cb)
        return out

    @cached_property
    def limits_for(self) -> dict[str, list[RateLimit]]:
        """"Service/ns/name" or "Pod/ns/name" -> the RateLimits with that destination."""
        out: dict[str, list[RateLimit]] = {}
        for rl in self.rate_limits:
            out.setdefault(rl.destination.show(), []).append(rl)
        return out

    def addresses(self, svc: Service, port: ServicePort) -> list[Address]:
        """Where traffic for one port of a Service goes: its Endpoints when Kubernetes wrote them, else the pods
        its selector selects that have an address (a single host has no endpoints controller)."""
        out: set[Address] = set()
        eps = self.endpoints.get(svc.ref)
        if eps is not None:
            for subset in eps.subsets:
                found = next((p for p in subset.ports if p.name == port.name), None)
                if found is None and len(subset.ports) == 1 and not port.name:
                    found = subset.ports[0]
                if found is not None:
                    out.update((a.ip, found.port, a.pod) for a in subset.addresses)
            return sorted(out)
        for pod in self.selected[svc.ref]:
            if not pod.pod_ip:
                continue
            target = self.target_port(port, pod)
            if target is not None:
                out.add((pod.pod_ip, target, pod.ref))
        return sorted(out)

    @staticmethod
    def target_port(port: ServicePort, pod: Pod) -> int | None:
        """The pod's port behind a Service port; None when a named targetPort names no port of the pod."""
        if isinstance(port.target_port, int):
            return port.target_port
        found = pod.port_named(port.target_port)
        return found.container_port if found is not None else None


@dataclass(frozen=True, slots=True)
class ServiceRoute:
    """Where a connection to one port of a Service's virtual address goes when no sidecar takes it, as kube-proxy
    routes it: to one of the port's endpoints, chosen per connection."""

    address: str
    port: int
    transport: str  # "tcp" or "udp"
    endpoints: tuple[tuple[str, int], ...]


def service_routes(world: World) -> tuple[ServiceRoute, ...]:
    """Every Service port with a virtual address and at least one endpoint, in key order."""
    ix = Index(world)
    out = []
    for svc in ix.services.values():
        if not svc.address:
            continue
        for port in svc.ports:
            endpoints = tuple(sorted({(ip, number) for ip, number, _ in ix.addresses(svc, port)}))
            if endpoints:
                out.append(ServiceRoute(svc.address, port.port, port.transport.value.lower(), endpoints))
    return tuple(out)
