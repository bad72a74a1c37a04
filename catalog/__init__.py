"""The pure mesh model: resources -> per-sidecar configuration; policy validation that names resource and field.

Theory of operation
-------------------
The catalog stores nothing of its own. Everything is computed from a `World`, an immutable set of resources:

    manifests (plain dicts from the CLI or a watch)
        -> parse / parse_all      typed, validated resources; every problem of every manifest at once
        -> World.with_applied     the world after an apply (World.without: after a delete)
        -> check                  cross-references that reject the new world (warnings: those only worth saying)
        -> render / compute       each meshed pod's document, canonical JSON; the outbound shards they reference
        -> changed                which documents differ from what was published

Parsing takes plain mappings (YAML is read at the edge, in the CLI) and never stops at the first problem:
`ValidationError.problems` holds them all, each one line naming the resource and the field. `check` reads a whole
world: a policy naming another policy that is missing is rejected, a policy naming a workload that is missing is
tolerated, because Kubernetes accepts objects in any order (`catalog.check` explains each case).

The per-sidecar document holds the sidecar's identity, the mesh settings, its inbound ports with who may reach them
and their rate limits, and the digests of the outbound shards -- one per namespace, shared by all sidecars, holding
every Service with its endpoints, split and circuit breaker. `catalog.documents` explains why outbound is shared
rather than copied into every document, and what that costs.

No I/O, no clock, no logging: import-linter keeps it so.
"""

from catalog.check import check, warnings
from catalog.documents import (
    SHARD_PREFIX,
    Endpoint,
    Grant,
    InboundPort,
    InboundRateLimit,
    OutboundService,
    OutboundShard,
    Rendered,
    RouteMatch,
    SidecarDocument,
    canonical,
    changed,
    compute,
    documents,
    render,
    shards,
)
from catalog.fields import FrozenMap, Problem, ValidationError
from catalog.inject import (
    Decision,
    InjectionValues,
    InjectionValuesError,
    InjectReason,
    admission_response,
    admit,
    decide,
    inject,
    inject_document,
)
from catalog.kube import (
    AUTO_INJECT_LABEL,
    CLIENT_MAX_BODY_SIZE_ANNOTATION,
    INJECTED_ANNOTATION,
    MTLS_MODE_ANNOTATION,
    ContainerPort,
    EndpointAddress,
    EndpointPort,
    Endpoints,
    EndpointSubset,
    Namespace,
    Pod,
    Service,
    ServicePort,
)
from catalog.parse import KINDS, parse, parse_all
from catalog.policy import (
    AccessControlMode,
    Backend,
    CircuitBreaker,
    Fallback,
    HTTPMatch,
    HTTPRouteGroup,
    LoadBalancingMethod,
    LogFormat,
    LogLevel,
    MeshConfig,
    MtlsMode,
    ObjectRef,
    Rate,
    RateLimit,
    RuleRef,
    TCPRoute,
    TrafficSplit,
    TrafficTarget,
)
from catalog.resource import Protocol, Resource, Transport, port_protocol
from catalog.world import World, is_meshed, spiffe_id

__all__ = [
    "AUTO_INJECT_LABEL", "CLIENT_MAX_BODY_SIZE_ANNOTATION", "INJECTED_ANNOTATION", "KINDS", "MTLS_MODE_ANNOTATION",
    "SHARD_PREFIX", "AccessControlMode", "Backend", "CircuitBreaker", "ContainerPort", "Endpoint", "EndpointAddress",
    "EndpointPort", "EndpointSubset", "Endpoints", "Fallback", "FrozenMap", "Grant", "HTTPMatch", "HTTPRouteGroup",
    "InboundPort", "InboundRateLimit", "LoadBalancingMethod", "LogFormat", "LogLevel", "MeshConfig", "MtlsMode",
    "Namespace", "ObjectRef", "OutboundService", "OutboundShard", "Pod", "Problem", "Protocol", "Rate", "RateLimit",
    "Rendered", "Resource", "RouteMatch", "RuleRef", "Service", "ServicePort", "SidecarDocument", "TCPRoute",
    "TrafficSplit", "TrafficTarget", "Transport", "ValidationError", "World", "canonical", "changed", "check",
    "compute", "documents", "is_meshed", "parse", "parse_all", "port_protocol", "render", "shards", "spiffe_id",
    "warnings",
    "Decision", "InjectReason", "InjectionValues", "InjectionValuesError", "admission_response", "admit", "decide",
    "inject", "inject_document",
]
