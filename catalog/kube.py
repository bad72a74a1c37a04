"""Kubernetes' own kinds, as far as the mesh reads them: Service, Endpoints, Pod and Namespace.

Only the fields the mesh uses are kept; a manifest from the API server carries many more (status, managedFields,
...), which are ignored rather than rejected. Names follow Kubernetes' validation, so a manifest the mesh accepts is
one the API server would accept too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from catalog.fields import EMPTY, FrozenMap, Reader, dns_label, dns_subdomain, ip_address, join
from catalog.policy import MtlsMode, body_size
from catalog.resource import (
    Protocol,
    Resource,
    Transport,
    check_transport,
    columns,
    head,
    port_protocol,
    read_transport,
)

# Pod annotations that override MeshConfig for one pod, and the injection label: NGINX Service Mesh's own names, so
# manifests written for it mean the same here.
MTLS_MODE_ANNOTATION = "config.nsm.nginx.com/mtls-mode"
CLIENT_MAX_BODY_SIZE_ANNOTATION = "config.nsm.nginx.com/client-max-body-size"
# Whether a pod has a sidecar: see `catalog.world.is_meshed`.
INJECTED_ANNOTATION = "meshloom.io/injected"
AUTO_INJECT_LABEL = "injector.nsm.nginx.com/auto-inject"


def _unique_ports(r: Reader, path: str, ports: list[tuple[str, str, int, Transport]]) -> None:
    """(element path, name, number, transport): names unique, and one number per transport."""
    seen_names: dict[str, str] = {}
    seen_numbers: dict[tuple[int, Transport], str] = {}
    for where, name, number, transport in ports:
        if name:
            if name in seen_names:
                r.add(f"{where}.name", f"duplicate port name {name!r} (also {seen_names[name]})")
            seen_names.setdefault(name, where)
        if number:
            if (number, transport) in seen_numbers:
                r.add(where, f"duplicate port number {number}/{transport} (also {seen_numbers[number, transport]})")
            seen_numbers.setdefault((number, transport), where)


# --------------------------------------------------------------------------------------------------- Service ---
@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str  # "" only when the Service has a single port
    port: int
    target_port: int | str  # a number, or the name of a container port
    transport: Transport  # the manifest's `protocol`
    protocol: Protocol  # by NGINX Service Mesh's rules (`port_protocol`)

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"port": self.port, "targetPort": self.target_port, "protocol": self.transport.value}
        if self.name:
            out["name"] = self.name
        return out

    def show(self) -> str:
        target = "" if self.target_port == self.port else f"->{self.target_port}"
        return f"{self.name + ':' if self.name else ''}{self.port}{target}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class Service(Resource):
    kind: ClassVar[str] = "Service"
    api_version: ClassVar[str] = "v1"

    namespace: str
    name: str
    cluster_ip: str  # the virtual address; "" not allocated yet, "None" headless
    selector: FrozenMap
    ports: tuple[ServicePort, ...]

    @classmethod
    def check_name(cls, name: str) -> str | None:
        return dns_label(name)

    @property
    def address(self) -> str | None:
        return None if self.cluster_ip in ("", "None") else self.cluster_ip

    def port_named(self, name: str) -> ServicePort | None:
        return next((p for p in self.ports if p.name == name), None)

    def to_manifest(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"ports": [p.to_manifest() for p in self.ports]}
        if self.cluster_ip:
            spec["clusterIP"] = self.cluster_ip
        if self.selector:
            spec["selector"] = self.selector.to_dict()
        return head(Service, self) | {"spec": spec}

    def summary(self) -> dict[str, str]:
        return columns(self, address=self.cluster_ip or "-", ports=",".join(p.show() for p in self.ports),
                       selector=self.selector.show() or "-")

    @classmethod
    def read(cls, r: Reader, doc: Mapping[str, Any], namespace: str, name: str) -> Self:
        spec = r.mapping(doc, "spec", "", required=True)
        cluster_ip = r.string(spec, "clusterIP", "spec", required=False,
                              check=lambda v: None if v == "None" else ip_address(v))
        selector = r.string_map(spec, "selector", "spec")
        items = r.elements(spec, "ports", "spec", nonempty=True)
        ports, seen = [], []
        for where, item in items:
            m = r.as_mapping(item, where)
            pname = r.string(m, "name", where, required=len(items) > 1, check=dns_label)
            number = r.port(m, "port", where)
            transport = read_transport(r, m, where)
            check_transport(r, where, pname, transport)
            target: int | str = number
            raw_target = m.get("targetPort") if m is not None else None
            if isinstance(raw_target, str) and raw_target:
                target = r.as_string(raw_target, f"{where}.targetPort", dns_label)
            elif raw_target is not None:
                target = r.as_integer(raw_target, f"{where}.targetPort", low=1, high=65535, default=number)
            ports.append(ServicePort(pname, number, target, transport, port_protocol(pname, number, transport)))
            seen.append((where, pname, number, transport))
        _unique_ports(r, "spec.ports", seen)
        return cls(namespace, name, cluster_ip, selector, tuple(ports))


# ------------------------------------------------------------------------------------------------- Endpoints ---
@dataclass(frozen=True, slots=True)
class EndpointAddress:
    ip: str
    pod: str  # "namespace/name" of the targetRef Pod; "" when the address is not a pod's

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ip": self.ip}
        if self.pod:
            ns, name = self.pod.split("/", 1)
            out["targetRef"] = {"kind": "Pod", "namespace": ns, "name": name}
        return out


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    port: int
    transport: Transport

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"port": self.port, "protocol": self.transport.value}
        if self.name:
            out["name"] = self.name
        return out


@dataclass(frozen=True, slots=True)
class EndpointSubset:
    addresses: tuple[EndpointAddress, ...]  # ready: these receive traffic
    not_ready_addresses: tuple[EndpointAddress, ...]  # kept for `meshctl get`, never routed to
    ports: tuple[EndpointPort, ...]

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ports": [p.to_manifest() for p in self.ports]}
        if self.addresses:
            out["addresses"] = [a.to_manifest() for a in self.addresses]
        if self.not_ready_addresses:
            out["notReadyAddresses"] = [a.to_manifest() for a in self.not_ready_addresses]
        return out


@dataclass(frozen=True, slots=True)
class Endpoints(Resource):
    """The addresses behind the Service of the same name, as Kubernetes' endpoints controller writes them."""

    kind: ClassVar[str] = "Endpoints"
    api_version: ClassVar[str] = "v1"

    namespace: str
    name: str
    subsets: tuple[EndpointSubset, ...]

    def to_manifest(self) -> dict[str, Any]:
        return head(Endpoints, self) | {"subsets": [s.to_manifest() for s in self.subsets]}

    def summary(self) -> dict[str, str]:
        ready = [f"{a.ip}:{p.port}" for s in self.subsets for a in s.addresses for p in s.ports]
        waiting = sum(len(s.not_ready_addresses) for s in self.subsets)
        shown = ",".join(ready[:3]) + (f" + {len(ready) - 3} more" if len(ready) > 3 else "")
        return columns(self, endpoints=shown or "-", not_ready=str(waiting))

    @classmethod
    def read(cls, r: Reader, doc: Mapping[str, Any], namespace: str, name: str) -> Self:
        subsets = []
        for where, item in r.elements(doc, "subsets", ""):
            m = r.as_mapping(item, where)
            ready = _addresses(r, m, "addresses", where, namespace)
            waiting = _addresses(r, m, "notReadyAddresses", where, namespace)
            ports, seen = [], []
            for pwhere, pitem in r.elements(m, "ports", where, nonempty=True):
                pm = r.as_mapping(pitem, pwhere)
                pname = r.string(pm, "name", pwhere, required=False)
                number = r.port(pm, "port", pwhere)
                transport = read_transport(r, pm, pwhere)
                ports.append(EndpointPort(pname, number, transport))
                seen.append((pwhere, pname, 0, transport))  # numbers may repeat here: names must not
            _unique_ports(r, f"{where}.ports", seen)
            subsets.append(EndpointSubset(ready, waiting, tuple(ports)))
        return cls(namespace, name, tuple(subsets))


def _addresses(r: Reader, m: Mapping[str, Any] | None, key: str, path: str,
               namespace: str) -> tuple[EndpointAddress, ...]:
    out = []
    for where, item in r.elements(m, key, path):
        am = r.as_mapping(item, where)
        ip = r.string(am, "ip", where, check=ip_address)
        pod = ""
        ref = r.mapping(am, "targetRef", where)
        if ref is not None:
            rwhere = join(where, "targetRef")
            kind = r.string(ref, "kind", rwhere, required=False, default="Pod")
            ref_name = r.string(ref, "name", rwhere, check=dns_subdomain)
            ref_ns = r.string(ref, "namespace", rwhere, required=False, default=namespace, check=dns_label)
            if kind == "Pod":
                pod = f"{ref_ns}/{ref_name}"
        out.append(EndpointAddress(ip, pod))
    return tuple(out)


# ------------------------------------------------------------------------------------------------------- Pod ---
@dataclass(frozen=True, slots=True)
class ContainerPort:
    container: str  # the container's name
    name: str
    container_port: int
    transport: Transport
    protocol: Protocol

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"containerPort": self.container_port, "protocol": self.transport.value}
        if self.name:
            out["name"] = self.name
        return out


@dataclass(frozen=True, slots=True)
class Pod(Resource):
    kind: ClassVar[str] = "Pod"
    api_version: ClassVar[str] = "v1"

    namespace: str
    name: str
    labels: FrozenMap
    annotations: FrozenMap
    service_account_name: str  # "default" when the manifest names none, as Kubernetes does
    pod_ip: str  # "" until the pod has an address
    container_ports: tuple[ContainerPort, ...]

    def port_named(self, name: str) -> ContainerPort | None:
        return next((p for p in self.container_ports if p.name == name), None)

    def to_manifest(self) -> dict[str, Any]:
        meta = self.metadata()
        if self.labels:
            meta["labels"] = self.labels.to_dict()
        if self.annotations:
            meta["annotations"] = self.annotations.to_dict()
        containers: dict[str, list[dict[str, Any]]] = {}
        for p in self.container_ports:
            containers.setdefault(p.container, []).append(p.to_manifest())
        spec: dict[str, Any] = {
            "serviceAccountName": self.service_account_name,
            "containers": [{"name": c, "ports": ports} if c else {"ports": ports} for c, ports in containers.items()],
        }
        out: dict[str, Any] = {"apiVersion": self.api_version, "kind": self.kind, "metadata": meta, "spec": spec}
        if self.pod_ip:
            out["status"] = {"podIP": self.pod_ip}
        return out

    def summary(self) -> dict[str, str]:
        ports = ",".join(f"{p.container_port}/{p.protocol}" for p in self.container_ports)
        return columns(self, ip=self.pod_ip or "-", service_account=self.service_account_name, ports=ports or "-",
                       labels=self.labels.show() or "-")

    @classmethod
    def read(cls, r: Reader, doc: Mapping[str, Any], namespace: str, name: str) -> Self:
        meta = r.mapping(doc, "metadata", "")
        labels = r.string_map(meta, "labels", "metadata")
        annotations = r.string_map(meta, "annotations", "metadata")
        if (mode := annotations.get(MTLS_MODE_ANNOTATION)) is not None and mode not in set(MtlsMode):
            r.add(join("metadata.annotations", MTLS_MODE_ANNOTATION),
                  f"must be one of {', '.join(MtlsMode)}, got {mode!r}")
        if (size := annotations.get(CLIENT_MAX_BODY_SIZE_ANNOTATION)) is not None and \
                (msg := body_size(size)) is not None:
            r.add(join("metadata.annotations", CLIENT_MAX_BODY_SIZE_ANNOTATION), msg)
        spec = r.mapping(doc, "spec", "", required=True)
        account = r.string(spec, "serviceAccountName", "spec", required=False, check=dns_subdomain)
        if not account:  # the deprecated alias, still written by old tools
            account = r.string(spec, "serviceAccount", "spec", required=False, default="default", check=dns_subdomain)
        status = r.mapping(doc, "status", "")
        pod_ip = r.string(status, "podIP", "status", required=False, check=ip_address)
        ports: list[ContainerPort] = []
        seen = []
        for cwhere, citem in r.elements(spec, "containers", "spec"):
            cm = r.as_mapping(citem, cwhere)
            container = r.string(cm, "name", cwhere, required=False, check=dns_label)
            for pwhere, pitem in r.elements(cm, "ports", cwhere):
                pm = r.as_mapping(pitem, pwhere)
                pname = r.string(pm, "name", pwhere, required=False, check=_port_name)
                number = r.port(pm, "containerPort", pwhere)
                transport = read_transport(r, pm, pwhere)
                check_transport(r, pwhere, pname, transport)
                ports.append(ContainerPort(container, pname, number, transport,
                                           port_protocol(pname, number, transport)))
                seen.append((pwhere, pname, number, transport))
        # NGINX Service Mesh refuses to inject a pod that declares one port number twice (TCP and UDP aside).
        _unique_ports(r, "spec.containers", seen)
        return cls(namespace, name, labels, annotations, account, pod_ip, tuple(ports))


def _port_name(value: str) -> str | None:
    """Container port names are IANA service names: at most 15 characters, and a letter among them."""
    if len(value) <= 15 and dns_label(value) is None and any(c.isalpha() for c in value):
        return None
    return f"must be at most 15 lowercase letters, digits and '-', with at least one letter, got {value!r}"


# ------------------------------------------------------------------------------------------------- Namespace ---
@dataclass(frozen=True, slots=True)
class Namespace(Resource):
    kind: ClassVar[str] = "Namespace"
    api_version: ClassVar[str] = "v1"
    cluster_scoped: ClassVar[bool] = True

    namespace: str
    name: str
    labels: FrozenMap = EMPTY

    @classmethod
    def check_name(cls, name: str) -> str | None:
        return dns_label(name)

    def to_manifest(self) -> dict[str, Any]:
        meta = self.metadata()
        if self.labels:
            meta["labels"] = self.labels.to_dict()
        return {"apiVersion": self.api_version, "kind": self.kind, "metadata": meta}

    def summary(self) -> dict[str, str]:
        return columns(self, labels=self.labels.show() or "-")

    @classmethod
    def read(cls, r: Reader, doc: Mapping[str, Any], namespace: str, name: str) -> Self:
        return cls("", name, r.string_map(r.mapping(doc, "metadata", ""), "labels", "metadata"))
