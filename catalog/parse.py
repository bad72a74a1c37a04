"""From plain manifests (YAML or JSON already loaded by the caller) to typed resources, with every problem named."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from catalog.fields import Problem, Reader, ValidationError, describe, dns_label
from catalog.kube import Endpoints, Namespace, Pod, Service
from catalog.policy import CircuitBreaker, HTTPRouteGroup, MeshConfig, RateLimit, TCPRoute, TrafficSplit, TrafficTarget
from catalog.resource import Resource

_CLASSES: tuple[type[Resource], ...] = (
    Service, Endpoints, Pod, Namespace, MeshConfig,
    TrafficSplit, TrafficTarget, HTTPRouteGroup, TCPRoute, RateLimit, CircuitBreaker,
)
KINDS: Mapping[str, type[Resource]] = {cls.kind.lower(): cls for cls in _CLASSES}
"""Lower-case kind name -> kind class: what `meshctl get <kind>` looks up."""

_BY_KIND = {cls.kind: cls for cls in _CLASSES}


def _label(kind: object, namespace: str, name: object, cls: type[Resource] | None, where: str) -> str:
    """How problems name a manifest, even a broken one: `TrafficSplit default/web`, else `document 3`."""
    if not isinstance(kind, str) or not kind:
        return where
    shown = name if isinstance(name, str) and name else "<no name>"
    if cls is not None and cls.cluster_scoped:
        return f"{kind} {shown}"
    return f"{kind} {namespace}/{shown}"


def read(doc: object, where: str = "document") -> tuple[Resource | None, list[Problem]]:
    """One manifest: the resource (None when it cannot be built) and its problems (none: the resource is good)."""
    if not isinstance(doc, Mapping):
        return None, [Problem(where, "", f"must be a mapping (a Kubernetes-style manifest), got {describe(doc)}")]
    kind, version = doc.get("kind"), doc.get("apiVersion")
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name, raw_ns = meta.get("name"), meta.get("namespace")
    namespace = raw_ns if isinstance(raw_ns, str) and raw_ns else "default"
    cls = _BY_KIND.get(kind) if isinstance(kind, str) else None
    r = Reader(_label(kind, namespace, name, cls, where))
    if kind is None or kind == "":
        r.add("kind", "is required")
        return None, r.problems
    if cls is None:
        r.add("kind", f"unknown kind {describe(kind)} (known: {', '.join(sorted(_BY_KIND))})")
        return None, r.problems
    if version != cls.api_version:
        # Another version's fields may mean other things: read no further.
        got = "none" if version is None else describe(version)
        r.add("apiVersion", f"{cls.kind} is read as {cls.api_version!r}, got {got}")
        return None, r.problems
    if cls.strict:
        r.only(doc, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    metadata = r.mapping(doc, "metadata", "", required=True)
    name_text = r.string(metadata, "name", "metadata", check=cls.check_name)
    ns = ""
    if not cls.cluster_scoped:
        ns = r.string(metadata, "namespace", "metadata", required=False, default="default", check=dns_label)
    resource = cls.read(r, doc, ns, name_text)
    return (None if r.problems else resource), r.problems


def parse(doc: Mapping[str, Any]) -> Resource:
    """One manifest -> its resource; raises `ValidationError` listing every problem."""
    resource, problems = read(doc)
    if problems or resource is None:
        raise ValidationError(problems)
    return resource


def parse_all(docs: Sequence[Mapping[str, Any]]) -> list[Resource]:
    """Many manifests (one apply) -> their resources, in order; raises `ValidationError` with the problems of all.

    A resource defined twice in one batch is a problem too: which one should win would depend on the order.
    """
    out: list[Resource] = []
    problems: list[Problem] = []
    first: dict[str, int] = {}
    for i, doc in enumerate(docs, start=1):
        resource, found = read(doc, f"document {i}")
        problems.extend(found)
        if resource is None:
            continue
        if resource.key in first:
            problems.append(Problem(resource.label, "", f"defined twice in one apply (documents {first[resource.key]}"
                                                        f" and {i})"))
            continue
        first[resource.key] = i
        out.append(resource)
    if problems:
        raise ValidationError(problems)
    return out
