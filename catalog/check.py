"""Cross-references across a world: what rejects an apply (`check`) and what is only worth saying (`warnings`).

Which is which
--------------
Kubernetes accepts objects in any order, and a Service, its pods and its Endpoints are created by other people and
other controllers, at other times, than the policies that name them. A policy that names a workload which does not
exist *yet* is normal (SMI's own TrafficSplit workflow creates the split before the new backend Service), so those
references are **tolerated**: the policy waits, contributing nothing, until the workload appears, and `warnings()`
says so.

References from one policy to another are different: a TrafficTarget's HTTPRouteGroup, a RateLimit's rules, a
TrafficSplit's matches are written by the same author, usually in the same file, and are applied together -- `check`
judges the world *after* the whole apply, so their order inside one apply does not matter. If such a reference
dangles, the policy means something other than what its author wrote (a route group that is not there would have the
TrafficTarget allow nothing, or, read leniently, everything), so it is **rejected**. Deleting a route group that a
policy still uses is rejected the same way. Also rejected, because two policies would fight over one thing: two
TrafficSplits of one root Service, two CircuitBreakers of one Service, and two RateLimits of one destination that
share a source (NGINX Service Mesh's admission webhook rejects that one too).

    reference                                               | missing / conflicting | why
    --------------------------------------------------------+-----------------------+------------------------------
    TrafficTarget rule -> HTTPRouteGroup / TCPRoute (+match) | rejected              | policy to policy
    TrafficSplit matches -> HTTPRouteGroup                   | rejected              | policy to policy
    RateLimit rules -> HTTPRouteGroup (+match)               | rejected              | policy to policy
    two TrafficSplits, one root Service                      | rejected              | ambiguous
    two CircuitBreakers, one Service                         | rejected              | ambiguous
    two RateLimits, one destination, a source in common      | rejected              | ambiguous (as NSM)
    TrafficSplit -> root or backend Service                  | tolerated             | workloads come in any order
    TrafficSplit backend without the root Service's port     | tolerated             | SMI: backend gets no traffic
    RateLimit -> destination / source Service or Pod         | tolerated             | workloads come in any order
    CircuitBreaker -> destination / fallback Service         | tolerated             | workloads come in any order
    TrafficTarget -> ServiceAccount no pod runs as           | tolerated             | identities come with pods
    Endpoints without their Service                          | tolerated             | controllers race

To judge one apply (or delete) in a world that Kubernetes may already have made inconsistent, reject only the
problems that are new: `set(check(after)) - set(check(before))`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from catalog.fields import Problem
from catalog.policy import RuleRef
from catalog.resource import Resource
from catalog.world import Index, World

T = TypeVar("T", bound=Resource)


def check(world: World) -> tuple[Problem, ...]:
    """The problems that reject a world: dangling policy-to-policy references and conflicting policies."""
    ix = Index(world)
    out: list[Problem] = []
    for tt in ix.targets:
        out.extend(_rules(ix, tt, tt.rules))
    for split in ix.splits:
        for i, match in enumerate(split.matches):
            if f"{split.namespace}/{match.name}" not in ix.route_groups:
                out.append(Problem(split.label, f"spec.matches[{i}].name",
                                   f"HTTPRouteGroup {split.namespace}/{match.name} does not exist"))
    for rl in ix.rate_limits:
        out.extend(_rules(ix, rl, rl.rules))

    out.extend(_conflicts(ix.splits, lambda s: f"{s.namespace}/{s.service}", "spec.service",
                          "root Service {key} is also split by {others}: one split per Service"))
    out.extend(_conflicts(ix.breakers, lambda c: f"{c.destination.namespace}/{c.destination.name}",
                          "spec.destination", "Service {key} also has {others}: one circuit breaker per Service"))
    for rls in ix.limits_for.values():
        for i, a in enumerate(rls):
            for b in rls[i + 1:]:
                # No sources means "everyone else": a default next to specific limits is allowed; two defaults, or
                # two limits naming one source, leave it unclear which rate applies.
                common = set(a.sources) & set(b.sources)
                if common or not (a.sources or b.sources):
                    shared = ", ".join(sorted(s.show() for s in common)) or "every source"
                    for mine, theirs in ((a, b), (b, a)):
                        out.append(Problem(mine.label, "spec.sources",
                                           f"RateLimit {theirs.ref} limits {shared} to {mine.destination.show()} "
                                           f"too: one rate limit per source and destination"))
    return tuple(out)


def warnings(world: World) -> tuple[Problem, ...]:
    """References that are tolerated but not (yet) satisfied: worth showing, never a reason to reject."""
    ix = Index(world)
    out: list[Problem] = []
    for split in ix.splits:
        root = ix.services.get(f"{split.namespace}/{split.service}")
        if root is None:
            out.append(Problem(split.label, "spec.service", f"Service {split.namespace}/{split.service} does not "
                                                            "exist yet: the split applies once it does"))
        for i, backend in enumerate(split.backends):
            svc = ix.services.get(f"{split.namespace}/{backend.service}")
            if svc is None:
                out.append(Problem(split.label, f"spec.backends[{i}].service",
                                   f"Service {split.namespace}/{backend.service} does not exist yet: no traffic "
                                   "reaches it until it does"))
            elif root is not None:
                theirs = {p.port for p in svc.ports}
                missing = [p.port for p in root.ports if p.port not in theirs]
                if missing:
                    out.append(Problem(split.label, f"spec.backends[{i}].service",
                                       f"Service {svc.ref} has no port {', '.join(map(str, missing))} of the root "
                                       "Service: it gets no traffic on those ports"))
    accounts = {(p.namespace, p.service_account_name) for p in ix.pods.values()}
    for tt in ix.targets:
        if (tt.destination.namespace, tt.destination.name) not in accounts:
            out.append(Problem(tt.label, "spec.destination", f"no pod runs as ServiceAccount "
                                                             f"{tt.destination.namespace}/{tt.destination.name} yet"))
    for rl in ix.rate_limits:
        for where, ref in (("spec.destination", rl.destination),
                           *((f"spec.sources[{i}]", s) for i, s in enumerate(rl.sources))):
            table = ix.services if ref.kind == "Service" else ix.pods
            if f"{ref.namespace}/{ref.name}" not in table:
                out.append(Problem(rl.label, where, f"{ref.kind} {ref.namespace}/{ref.name} does not exist yet"))
    for cb in ix.breakers:
        dest = f"{cb.destination.namespace}/{cb.destination.name}"
        if dest not in ix.services:
            out.append(Problem(cb.label, "spec.destination", f"Service {dest} does not exist yet"))
        if cb.fallback is not None:
            fb = ix.services.get(f"{cb.fallback.namespace}/{cb.fallback.service}")
            if fb is None:
                out.append(Problem(cb.label, "spec.fallback.service",
                                   f"Service {cb.fallback.namespace}/{cb.fallback.service} does not exist yet: "
                                   "a tripped breaker returns errors until it does"))
            elif all(p.port != cb.fallback.port for p in fb.ports):
                out.append(Problem(cb.label, "spec.fallback.port",
                                   f"Service {fb.ref} has no port {cb.fallback.port}"))
    for key, eps in ix.endpoints.items():
        if key not in ix.services:
            out.append(Problem(eps.label, "", f"Service {key} does not exist: these endpoints are not used"))
    return tuple(out)


def _rules(ix: Index, policy: Resource, rules: Iterable[RuleRef]) -> list[Problem]:
    out = []
    for i, rule in enumerate(rules):
        key = f"{policy.namespace}/{rule.name}"
        if rule.kind == "TCPRoute":
            if key not in ix.tcp_routes:
                out.append(Problem(policy.label, f"spec.rules[{i}].name", f"TCPRoute {key} does not exist"))
            continue
        group = ix.route_groups.get(key)
        if group is None:
            out.append(Problem(policy.label, f"spec.rules[{i}].name", f"HTTPRouteGroup {key} does not exist"))
            continue
        for j, name in enumerate(rule.matches):
            if group.match(name) is None:
                out.append(Problem(policy.label, f"spec.rules[{i}].matches[{j}]",
                                   f"HTTPRouteGroup {key} has no match named {name!r} (it has: "
                                   f"{', '.join(m.name for m in group.matches)})"))
    return out


def _conflicts(items: Iterable[T], key_of: Callable[[T], str], field: str, message: str) -> list[Problem]:
    """Every policy that shares its key (root Service, destination) with another names the others."""
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(key_of(item), []).append(item)
    out = []
    for key, group in groups.items():
        if len(group) > 1:
            for item in group:
                others = ", ".join(f"{o.kind} {o.ref}" for o in group if o is not item)
                out.append(Problem(item.label, field, message.format(key=key, others=others)))
    return out
