"""The single-host mesh file (`meshctl up -f mesh.yaml`): its model, its validation with locations, its world.

Theory of operation
-------------------
A mesh file is a list of documents (YAML is read at the edge, in the CLI). Exactly one is `kind: Mesh`: the
workloads (each becomes `replicas` pods named `<workload>-<i>`) and the Services. Every other document is a policy
the catalog knows, kept as given. A file is refused before anything starts, so every problem is reported at once, and
each names *where* it is: the document's index and the field path inside it, which the CLI turns into a line number.

    documents
        -> read        the Mesh document's fields, names, ports, selectors; the policies' own fields
        -> check       the world the file describes (placeholder addresses) through catalog.check and warnings
        -> allocate    the real pod and Service addresses, keeping those the stored world already gives
        -> render      that world as Kubernetes-style manifests, what the engine applies

`check` treats the catalog's warnings as problems. In a cluster, objects arrive in any order, so a TrafficSplit
naming a Service that does not exist yet is tolerated; a mesh file is the whole world at once, nothing comes later,
so the same dangling reference is a mistake in the file.

Pure: no YAML, no I/O, no logging.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from catalog.check import check as check_world
from catalog.check import warnings as world_warnings
from catalog.fields import EMPTY, FrozenMap, Problem, Reader, describe, dns_label, dns_subdomain, join
from catalog.inject import IGNORE_INCOMING_ANNOTATION, IGNORE_OUTGOING_ANNOTATION, InjectError, parse_ports
from catalog.kube import AUTO_INJECT_LABEL, _port_name, _unique_ports
from catalog.parse import read as read_manifest
from catalog.policy import CircuitBreaker, HTTPRouteGroup, MeshConfig, RateLimit, TCPRoute, TrafficSplit, TrafficTarget
from catalog.resource import Resource, Transport, check_transport, read_transport
from catalog.world import World

POD_NODE = "local"
API_VERSION = "meshloom.io/v1alpha1"
MESH_KIND = "Mesh"
MAX_REPLICAS = 100  # a single host: more would only exhaust its memory, not test anything more

POLICY_KINDS: Mapping[str, type[Resource]] = {
    cls.kind: cls for cls in (TrafficSplit, TrafficTarget, HTTPRouteGroup, TCPRoute, RateLimit, CircuitBreaker,
                              MeshConfig)
}
# Kinds that the Mesh document replaces: written as documents of their own they would bypass its checks.
_WORLD_KINDS = frozenset({"Pod", "Service", "Namespace", "Endpoints"})

_MESH_FIELDS = ("apiVersion", "kind", "metadata", "spec")
_METADATA_FIELDS = ("name", "labels", "annotations")
_SPEC_FIELDS = ("workloads", "services")
_WORKLOAD_FIELDS = ("name", "namespace", "serviceAccount", "labels", "annotations", "command", "env", "ports",
                    "replicas", "meshed")
_CONTAINER_PORT_FIELDS = ("name", "containerPort", "protocol")
_SERVICE_FIELDS = ("name", "namespace", "selector", "ports")
_SERVICE_PORT_FIELDS = ("name", "port", "targetPort", "protocol")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

Pairs = tuple[tuple[str, str], ...]


# ------------------------------------------------------------------------------------------------- problems ---
@dataclass(frozen=True, slots=True)
class Located:
    """One problem and where it is: the document (0-based, empty documents dropped) and the field path in it."""

    document: int
    path: str  # "spec.workloads[1].ports[0].containerPort"; "" for the whole document
    message: str
    resource: str = ""  # "workload demo/frontend", "trafficsplit demo/backend" when known

    def __str__(self) -> str:
        where = f"document {self.document + 1}" + (f": {self.path}" if self.path else "")
        return f"{where}: {self.message}"


class MeshfileError(ValueError):
    """A mesh file that cannot be run; `problems` holds every reason, each with its location."""

    def __init__(self, problems: Sequence[Located]) -> None:
        self.problems: tuple[Located, ...] = tuple(problems)
        super().__init__(str(self.problems[0]) if self.problems else "invalid mesh file")


# ---------------------------------------------------------------------------------------------------- model ---
@dataclass(frozen=True, slots=True)
class LocalPod:
    """One replica of a workload."""

    namespace: str
    name: str
    workload: str
    index: int
    service_account: str
    labels: Pairs
    annotations: Pairs
    command: tuple[str, ...]
    env: Pairs
    ports: tuple[int, ...]  # the containerPort numbers
    container_ports: tuple[Mapping[str, Any], ...]  # as Kubernetes containers[].ports entries
    meshed: bool
    path: str = ""  # where its workload is in the Mesh document: "spec.workloads[1]"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    namespace: str
    name: str
    selector: Pairs
    ports: tuple[Mapping[str, Any], ...]  # as Kubernetes Service spec.ports entries
    path: str = ""  # "spec.services[0]"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class MeshSpec:
    name: str
    pods: tuple[LocalPod, ...]
    services: tuple[ServiceSpec, ...]
    policies: tuple[Mapping[str, Any], ...]  # the other documents, as given
    namespaces: tuple[str, ...]  # sorted: every namespace a workload, service or policy uses
    document: int = 0  # the Mesh document's index, for locating problems found later
    policy_documents: tuple[int, ...] = ()  # the index of each policy's document


# ----------------------------------------------------------------------------------------------------- read ---
def read(docs: Sequence[Mapping[str, Any]]) -> MeshSpec:
    """The mesh a file describes; raises `MeshfileError` with every problem found, not only the first."""
    problems: list[Located] = []
    mesh_at: int | None = None
    policies: list[tuple[int, Mapping[str, Any], Resource]] = []
    seen_policies: dict[str, int] = {}
    for i, doc in enumerate(docs):
        if not isinstance(doc, Mapping):
            problems.append(Located(i, "", f"must be a mapping (a manifest), got {describe(doc)}"))
            continue
        kind = doc.get("kind")
        if kind is None or kind == "":
            problems.append(Located(i, "kind", "is required"))
        elif kind == MESH_KIND:
            if mesh_at is None:
                mesh_at = i
            else:
                problems.append(Located(i, "kind", f"a second Mesh document (the first is document {mesh_at + 1}):"
                                                   " one Mesh per file"))
        elif kind in POLICY_KINDS:
            resource, found = read_manifest(doc, f"document {i + 1}")
            problems.extend(_locate_policy(i, p, doc) for p in found)
            if resource is None:
                continue
            if resource.key in seen_policies:
                problems.append(Located(i, "metadata.name", f"{resource.label} is defined twice (also document "
                                                            f"{seen_policies[resource.key] + 1})", _name(resource)))
                continue
            seen_policies[resource.key] = i
            policies.append((i, doc, resource))
        elif kind in _WORLD_KINDS:
            problems.append(Located(i, "kind", f"kind {kind}: workloads and services belong in the Mesh document's "
                                               "spec"))
        else:
            problems.append(Located(i, "kind", f"unknown kind {describe(kind)} (known here: "
                                               f"{', '.join([MESH_KIND, *sorted(POLICY_KINDS)])})"))
    if mesh_at is None:
        problems.append(Located(0, "", f"no Mesh document: a mesh file needs one document of kind {MESH_KIND} "
                                       f"(apiVersion {API_VERSION})"))
        raise MeshfileError(problems)
    mesh = _read_mesh(mesh_at, docs[mesh_at], problems)
    if problems:
        raise MeshfileError(problems)
    assert mesh is not None
    name, pods, services = mesh
    namespaces = {p.namespace for p in pods} | {s.namespace for s in services}
    namespaces |= {r.namespace for _, _, r in policies if not r.cluster_scoped}
    return MeshSpec(name, pods, services, tuple(doc for _, doc, _ in policies), tuple(sorted(namespaces)), mesh_at,
                    tuple(i for i, _, _ in policies))


def _name(resource: Resource) -> str:
    """How a Located names a resource: `trafficsplit demo/backend`."""
    return f"{resource.kind.lower()} {resource.ref}"


def _locate_policy(document: int, problem: Problem, doc: Mapping[str, Any]) -> Located:
    kind = doc.get("kind")
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name, ns = meta.get("name"), meta.get("namespace") or "default"
    resource = ""
    if isinstance(kind, str) and isinstance(name, str) and name:
        cls = POLICY_KINDS.get(kind)
        resource = f"{kind.lower()} {name if cls is not None and cls.cluster_scoped else f'{ns}/{name}'}"
    return Located(document, problem.field, problem.message, resource)


class _Problems:
    """Collects Reader problems as Located ones of one document, each naming the resource it was read for."""

    def __init__(self, document: int, out: list[Located]) -> None:
        self.document = document
        self.out = out

    def take(self, r: Reader) -> None:
        self.out.extend(Located(self.document, p.field, p.message, p.resource) for p in r.problems)
        r.problems.clear()


def _raw_name(m: Mapping[str, Any] | None, default_ns: str = "default") -> str:
    """`demo/frontend` even from a broken entry, to name it in problems."""
    if m is None:
        return "<no name>"
    ns, name = m.get("namespace"), m.get("name")
    shown = name if isinstance(name, str) and name else "<no name>"
    return f"{ns if isinstance(ns, str) and ns else default_ns}/{shown}"


def _read_mesh(document: int, doc: Mapping[str, Any],
               problems: list[Located]) -> tuple[str, tuple[LocalPod, ...], tuple[ServiceSpec, ...]] | None:
    sink = _Problems(document, problems)
    meta = doc.get("metadata")
    raw = meta.get("name") if isinstance(meta, Mapping) else None
    r = Reader(f"mesh {raw if isinstance(raw, str) and raw else '<no name>'}")
    if doc.get("apiVersion") != API_VERSION:
        got = "none" if doc.get("apiVersion") is None else describe(doc.get("apiVersion"))
        r.add("apiVersion", f"Mesh is read as {API_VERSION!r}, got {got}")
        sink.take(r)
        return None
    r.only(doc, "", _MESH_FIELDS)
    metadata = r.mapping(doc, "metadata", "", required=True)
    r.only(metadata, "metadata", _METADATA_FIELDS)
    name = r.string(metadata, "name", "metadata", check=dns_label)
    r.string_map(metadata, "labels", "metadata")
    r.string_map(metadata, "annotations", "metadata")
    spec = r.mapping(doc, "spec", "", required=True)
    r.only(spec, "spec", _SPEC_FIELDS)
    workload_items = r.elements(spec, "workloads", "spec", nonempty=True)
    service_items = r.elements(spec, "services", "spec")
    sink.take(r)

    pods: list[LocalPod] = []
    workloads: list[tuple[str, list[LocalPod], FrozenMap, str]] = []  # (namespace, its pods, labels, path)
    named_ports: dict[str, set[str]] = {}  # path of workload -> its port names
    pod_names: dict[str, str] = {}
    workload_at: dict[str, str] = {}
    for where, item in workload_items:
        wr = Reader(f"workload {_raw_name(item if isinstance(item, Mapping) else None)}")
        read = _read_workload(wr, where, item)
        if read is not None:
            made, labels, names = read
            clash = next((p for p in made if p.key in pod_names), None)
            workload = f"{_namespace_of(item)}/{item.get('name')}" if isinstance(item, Mapping) else ""
            if clash is not None:
                wr.add(f"{where}.name", f"duplicate pod name {clash.key} (also {pod_names[clash.key]})")
            elif workload in workload_at:  # with no replicas there is no pod name to collide
                wr.add(f"{where}.name", f"duplicate workload {workload} (also {workload_at[workload]})")
            else:
                pod_names.update((p.key, where) for p in made)
                pods.extend(made)
            workload_at.setdefault(workload, where)
            namespace = made[0].namespace if made else _namespace_of(item)
            workloads.append((namespace, made, labels, where))
            named_ports[where] = names
        sink.take(wr)

    services: list[ServiceSpec] = []
    service_at: dict[str, str] = {}
    for where, item in service_items:
        sr = Reader(f"service {_raw_name(item if isinstance(item, Mapping) else None)}")
        svc = _read_service(sr, where, item, workloads, named_ports)
        if svc is not None:
            if svc.key in service_at:
                sr.add(f"{where}.name", f"duplicate service {svc.key} (also {service_at[svc.key]})")
            else:
                service_at[svc.key] = where
                services.append(svc)
        sink.take(sr)
    return name, tuple(pods), tuple(services)


def _namespace_of(item: Mapping[str, Any]) -> str:
    ns = item.get("namespace")
    return ns if isinstance(ns, str) and ns else "default"


def _read_workload(r: Reader, where: str, item: object) -> tuple[list[LocalPod], FrozenMap, set[str]] | None:
    """The pods of one workload, its labels and its port names; None when the entry is not a mapping."""
    w = r.as_mapping(item, where)
    if w is None:
        return None
    r.only(w, where, _WORKLOAD_FIELDS)
    name = r.string(w, "name", where, check=dns_label)
    namespace = r.string(w, "namespace", where, required=False, default="default", check=dns_label)
    account = r.string(w, "serviceAccount", where, required=False, default="default", check=dns_subdomain)
    labels = r.string_map(w, "labels", where)
    if AUTO_INJECT_LABEL in labels:
        # The runner starts a sidecar by `meshed`; a label saying otherwise would make the catalog disagree.
        r.add(join(join(where, "labels"), AUTO_INJECT_LABEL), "set meshed: true or false instead of this label")
    annotations = r.string_map(w, "annotations", where)
    for annotation in (IGNORE_INCOMING_ANNOTATION, IGNORE_OUTGOING_ANNOTATION):  # the init rules take them as is
        try:
            parse_ports(annotations.get(annotation, ""))
        except InjectError as exc:
            r.add(join(join(where, "annotations"), annotation), exc.message)
    command = tuple(r.as_string(value, cwhere) for cwhere, value in r.elements(w, "command", where, nonempty=True))
    env = r.string_map(w, "env", where)
    for key in env:
        if not _ENV_NAME.match(key):
            r.add(join(join(where, "env"), key), f"must be an environment variable name (letters, digits and '_', "
                                                 f"not starting with a digit), got {key!r}")
    replicas = r.integer(w, "replicas", where, required=False, default=1, low=0, high=MAX_REPLICAS)
    meshed = r.boolean(w, "meshed", where, default=True)
    entries: list[Mapping[str, Any]] = []
    numbers: list[int] = []
    names: set[str] = set()
    seen: list[tuple[str, str, int, Transport]] = []
    for pwhere, pitem in r.elements(w, "ports", where):
        pm = r.as_mapping(pitem, pwhere)
        r.only(pm, pwhere, _CONTAINER_PORT_FIELDS)
        pname = r.string(pm, "name", pwhere, required=False, check=_port_name)
        number = r.port(pm, "containerPort", pwhere)
        transport = read_transport(r, pm, pwhere)
        check_transport(r, pwhere, pname, transport)
        entry: dict[str, Any] = {"containerPort": number, "protocol": transport.value}
        if pname:
            entry["name"] = pname
            names.add(pname)
        entries.append(MappingProxyType(entry))
        numbers.append(number)
        seen.append((pwhere, pname, number, transport))
    _unique_ports(r, join(where, "ports"), seen)
    if not name:
        return [], labels, names
    made = [
        LocalPod(namespace, f"{name}-{i}", name, i, account, tuple(labels.items()), tuple(annotations.items()),
                 command, tuple(env.items()), tuple(numbers), tuple(entries), meshed, where)
        for i in range(replicas)
    ]
    return made, labels, names


def _read_service(r: Reader, where: str, item: object, workloads: Sequence[tuple[str, list[LocalPod], FrozenMap, str]],
                  named_ports: Mapping[str, set[str]]) -> ServiceSpec | None:
    s = r.as_mapping(item, where)
    if s is None:
        return None
    r.only(s, where, _SERVICE_FIELDS)
    name = r.string(s, "name", where, check=dns_label)
    namespace = r.string(s, "namespace", where, required=False, default="default", check=dns_label)
    selector: FrozenMap = EMPTY
    raw = s.get("selector")
    if raw is None or raw == "":
        r.add(join(where, "selector"), "is required")
    elif isinstance(raw, Mapping) and not raw:
        r.add(join(where, "selector"), "must name at least one label (a Service without one selects nothing)")
    else:
        selector = r.string_map(s, "selector", where)
    chosen = [(path, labels) for ns, _, labels, path in workloads
              if ns == namespace and selector and all(labels.get(k) == v for k, v in selector.items())]
    if selector and not chosen:
        r.add(join(where, "selector"), f"selects no workload in namespace {namespace}")
    items = r.elements(s, "ports", where, nonempty=True)
    entries: list[Mapping[str, Any]] = []
    seen: list[tuple[str, str, int, Transport]] = []
    for pwhere, pitem in items:
        pm = r.as_mapping(pitem, pwhere)
        r.only(pm, pwhere, _SERVICE_PORT_FIELDS)
        pname = r.string(pm, "name", pwhere, required=len(items) > 1, check=dns_label)
        number = r.port(pm, "port", pwhere)
        transport = read_transport(r, pm, pwhere)
        check_transport(r, pwhere, pname, transport)
        target: int | str = number
        raw_target = pm.get("targetPort") if pm is not None else None
        twhere = join(pwhere, "targetPort")
        if isinstance(raw_target, str) and raw_target:
            target = r.as_string(raw_target, twhere, dns_label)
            if chosen and not any(target in named_ports.get(path, set()) for path, _ in chosen):
                r.add(twhere, f"no selected workload has a port named {target!r} "
                              f"(selected: {', '.join(path for path, _ in chosen)})")
        elif raw_target is not None and raw_target != "":
            target = r.as_integer(raw_target, twhere, low=1, high=65535, default=number)
        entry: dict[str, Any] = {"port": number, "targetPort": target, "protocol": transport.value}
        if pname:
            entry["name"] = pname
        entries.append(MappingProxyType(entry))
        seen.append((pwhere, pname, number, transport))
    _unique_ports(r, join(where, "ports"), seen)
    if not name:
        return None
    return ServiceSpec(namespace, name, tuple(selector.items()), tuple(entries), where)


# ------------------------------------------------------------------------------------------------- allocate ---
def allocate(spec: MeshSpec, pods: ipaddress.IPv4Network, services: ipaddress.IPv4Network,
             taken: Mapping[str, str]) -> dict[str, str]:
    """An address for every pod ("pod/<ns>/<name>") and Service ("service/<ns>/<name>").

    Addresses that `taken` (the stored world) already gives are kept while their pod or Service is still in the spec
    and inside its range, so a re-run of `meshctl up` moves nothing that is running. New ones get the lowest free host
    address of their range; an address anything in `taken` holds is never reused, not even one of a pod that is
    going away, since that pod may still be running until it is torn down.
    """
    wanted = [(f"pod/{p.key}", pods, p.path, f"workload {p.namespace}/{p.workload}") for p in spec.pods]
    wanted += [(f"service/{s.key}", services, s.path, f"service {s.key}") for s in spec.services]
    used = set()
    for value in taken.values():
        try:
            used.add(ipaddress.IPv4Address(value))
        except ValueError:
            continue  # not an IPv4 address: it holds nothing in our ranges
    out: dict[str, str] = {}
    for key, network, _, _ in wanted:
        old = taken.get(key)
        if old is not None and _inside(old, network):
            out[key] = old
    free: dict[ipaddress.IPv4Network, Iterator[ipaddress.IPv4Address]] = {}
    problems: list[Located] = []
    full: set[ipaddress.IPv4Network] = set()
    for key, network, path, resource in wanted:
        if key in out or network in full:
            continue
        hosts = free.setdefault(network, iter(network.hosts()))
        # Lowest free first: the iterator only moves forward, since an address once given stays used.
        address = next((a for a in hosts if a not in used), None)
        if address is None:
            full.add(network)
            problems.append(Located(spec.document, path, f"no free address left in {network} for {key}", resource))
            continue
        used.add(address)
        out[key] = str(address)
    if problems:
        raise MeshfileError(problems)
    return out


def _inside(address: str, network: ipaddress.IPv4Network) -> bool:
    try:
        return ipaddress.IPv4Address(address) in network
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------- render ---
def render(spec: MeshSpec, addresses: Mapping[str, str]) -> list[dict[str, Any]]:
    """The world's manifests: Namespaces, Pods, Services, then the policies as given; the same spec and addresses
    always give the same list. A pod or Service without an address in `addresses` is rendered without one."""
    out: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {AUTO_INJECT_LABEL: "enabled"}}}
        for ns in spec.namespaces
    ]
    for pod in spec.pods:
        out.append(_pod_manifest(pod, addresses.get(f"pod/{pod.key}")))
    for svc in spec.services:
        sspec: dict[str, Any] = {"selector": dict(svc.selector), "ports": [dict(p) for p in svc.ports]}
        if (ip := addresses.get(f"service/{svc.key}")) is not None:
            sspec["clusterIP"] = ip
        out.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": svc.name, "namespace": svc.namespace},
                    "spec": sspec})
    out.extend(copy.deepcopy(dict(p)) for p in spec.policies)
    return out


def _pod_manifest(pod: LocalPod, ip: str | None) -> dict[str, Any]:
    labels = dict(pod.labels)
    if not pod.meshed:
        labels[AUTO_INJECT_LABEL] = "disabled"  # the namespace says enabled: the pod label wins
    meta: dict[str, Any] = {"name": pod.name, "namespace": pod.namespace}
    if labels:
        meta["labels"] = labels
    if pod.annotations:
        meta["annotations"] = dict(pod.annotations)
    status: dict[str, Any] = {"phase": "Running"}
    if ip is not None:
        status["podIP"] = ip
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {"serviceAccountName": pod.service_account, "nodeName": POD_NODE,
                 "containers": [{"name": "app", "ports": [dict(p) for p in pod.container_ports]}]},
        "status": status,
    }


# ---------------------------------------------------------------------------------------------------- check ---
# Where a field of a rendered Pod or Service comes from in its workload or service entry.
_POD_FIELDS = (("metadata.labels", "labels"), ("metadata.annotations", "annotations"),
               ("spec.serviceAccountName", "serviceAccount"), ("spec.containers[0].ports", "ports"),
               ("spec.containers", "ports"), ("metadata.name", "name"), ("metadata.namespace", "namespace"))
_SERVICE_FIELDS_FROM = (("spec.selector", "selector"), ("spec.ports", "ports"), ("metadata.name", "name"),
                        ("metadata.namespace", "namespace"))

_PLACEHOLDER_PODS = ipaddress.IPv4Network("10.0.0.0/16")
_PLACEHOLDER_SERVICES = ipaddress.IPv4Network("10.1.0.0/16")


def check(spec: MeshSpec) -> None:
    """Judge the world the spec describes, as the catalog would; raises `MeshfileError` naming each problem's place."""
    addresses = allocate(spec, _PLACEHOLDER_PODS, _PLACEHOLDER_SERVICES, {})
    manifests = render(spec, addresses)
    # label ("Pod demo/frontend-0") -> (document, how a catalog field maps to a path there, Located resource)
    origin: dict[str, tuple[int, Callable[[str], str], str]] = {}
    for pod in spec.pods:
        origin[f"Pod {pod.key}"] = (spec.document, _mapper(pod.path, _POD_FIELDS),
                                    f"workload {pod.namespace}/{pod.workload}")
    for svc in spec.services:
        origin[f"Service {svc.key}"] = (spec.document, _mapper(svc.path, _SERVICE_FIELDS_FROM), f"service {svc.key}")
    problems: list[Located] = []
    resources: list[Resource] = []
    policy_at = iter(spec.policy_documents)
    for manifest in manifests:
        resource, found = read_manifest(manifest)
        if manifest.get("kind") in POLICY_KINDS:
            document = next(policy_at, spec.document)
            if resource is not None:
                origin[resource.label] = (document, _same, _name(resource))
        for p in found:  # a policy's own problems were reported by read; this is for the rendered kinds
            document, where, name = origin.get(p.resource, (spec.document, _root, ""))
            problems.append(Located(document, where(p.field), p.message, name))
        if resource is not None:
            resources.append(resource)
    world = World(resources)
    for p in (*check_world(world), *world_warnings(world)):
        document, where, name = origin.get(p.resource, (spec.document, _root, ""))
        problems.append(Located(document, where(p.field), p.message, name))
    if problems:  # a pod's problem is its workload's: said once, not once per replica
        raise MeshfileError(list(dict.fromkeys(problems)))


def _same(field: str) -> str:
    return field


def _root(field: str) -> str:
    return ""


def _mapper(path: str, table: tuple[tuple[str, str], ...]) -> Callable[[str], str]:
    def where(field: str) -> str:
        for prefix, ours in table:
            if field == prefix or field.startswith((prefix + ".", prefix + "[")):
                return join(path, ours) + field[len(prefix):]
        return path
    return where
