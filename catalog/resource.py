"""What every kind has in common: identity (kind, namespace, name, key), the manifest round trip, the summary row.

Each kind is a frozen slotted dataclass deriving from `Resource`. Its `read()` classmethod builds it from a manifest
through a `Reader` (collecting problems, never raising), `to_manifest()` gives the normalized manifest back (defaults
filled in, camelCase field names as in the real CRDs), and `parse(r.to_manifest()) == r` for every resource.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar, Self

from catalog.fields import Reader, dns_subdomain


class Resource:
    """Base of every kind. Cluster-scoped kinds (MeshConfig, Namespace) have namespace ""."""

    __slots__ = ()

    kind: ClassVar[str]
    api_version: ClassVar[str]
    cluster_scoped: ClassVar[bool] = False
    # Policy kinds are ours, SMI's or NGINX's, and small: an unknown field there is a typo to reject. Kubernetes'
    # own kinds arrive from the API server with many fields the mesh does not read (managedFields, ...).
    strict: ClassVar[bool] = False
    namespace: str
    name: str

    @property
    def key(self) -> str:
        """`kind/namespace/name`: stable, unique in a world, and what `World.without` takes."""
        return f"{self.kind}/{self.namespace}/{self.name}"

    @property
    def ref(self) -> str:
        """`namespace/name` (`name` for cluster-scoped kinds), as users write it."""
        return self.name if self.cluster_scoped else f"{self.namespace}/{self.name}"

    @property
    def label(self) -> str:
        """`TrafficSplit default/web-split`: how problems name the resource."""
        return f"{self.kind} {self.ref}"

    @classmethod
    def check_name(cls, name: str) -> str | None:
        """Kubernetes names most objects with DNS-1123 subdomains; Services and Namespaces with labels."""
        return dns_subdomain(name)

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name}
        if not self.cluster_scoped:
            meta["namespace"] = self.namespace
        return meta

    def to_manifest(self) -> dict[str, Any]:
        raise NotImplementedError

    def summary(self) -> dict[str, str]:
        """The columns of this resource's row in `meshctl get <kind>`."""
        raise NotImplementedError

    @classmethod
    def read(cls, r: Reader, doc: Mapping[str, Any], namespace: str, name: str) -> Self:
        raise NotImplementedError


def head(cls: type[Resource], resource: Resource) -> dict[str, Any]:
    return {"apiVersion": cls.api_version, "kind": cls.kind, "metadata": resource.metadata()}


def columns(resource: Resource, **more: str) -> dict[str, str]:
    out = {} if resource.cluster_scoped else {"namespace": resource.namespace}
    out["name"] = resource.name
    out.update(more)
    return out


# ----------------------------------------------------------------------------------------- ports, protocols ---
class Transport(StrEnum):
    """The Kubernetes `protocol` of a Service or container port. SCTP is not proxied by the mesh."""

    TCP = "TCP"
    UDP = "UDP"


class Protocol(StrEnum):
    """What the sidecar proxies a port as: L7 for http and grpc, L4 for the rest."""

    HTTP = "http"
    GRPC = "grpc"
    TCP = "tcp"
    UDP = "udp"


# NGINX Service Mesh documents one well-known port: 80 is http. 443 is deliberately absent: it carries TLS that the
# application itself originates, which a proxy that parsed it as HTTP would break; plain TCP passes it through.
WELL_KNOWN_PORTS: Mapping[int, Protocol] = {80: Protocol.HTTP}


def port_protocol(name: str, port: int, transport: Transport) -> Protocol:
    """The protocol of a port by NGINX Service Mesh's identification rules.

    1. The port's name, up to its first dash: `http`, `http-web` -> http; `grpc`, `tcp`, `udp` likewise.
    2. A UDP port (Kubernetes `protocol: UDP`) is udp: the rules below are for TCP ports.
    3. A well-known port number: 80 -> http.
    4. Anything else is tcp (layer 4, no protocol sniffing, no first-byte delay).
    """
    prefix = name.split("-", 1)[0]
    if prefix in _BY_NAME:
        return _BY_NAME[prefix]
    if transport is Transport.UDP:
        return Protocol.UDP
    return WELL_KNOWN_PORTS.get(port, Protocol.TCP)


_BY_NAME = {p.value: p for p in Protocol}


def read_transport(r: Reader, m: Mapping[str, Any] | None, path: str) -> Transport:
    raw = m.get("protocol") if m is not None else None
    if raw == "SCTP":
        r.add(f"{path}.protocol", "SCTP is not supported by the mesh: use TCP or UDP")
        return Transport.TCP
    return r.choice(m, "protocol", path, Transport, Transport.TCP)


def check_transport(r: Reader, path: str, name: str, transport: Transport) -> None:
    """A port whose name says one transport and whose `protocol` says the other cannot be proxied as both."""
    prefix = name.split("-", 1)[0]
    if prefix == "udp" and transport is Transport.TCP:
        r.add(f"{path}.protocol", f"the port is named {name!r} (udp) but its protocol is TCP: set protocol: UDP")
    elif prefix in ("http", "grpc", "tcp") and transport is Transport.UDP:
        r.add(f"{path}.protocol", f"the port is named {name!r} ({prefix}, over TCP) but its protocol is UDP")
