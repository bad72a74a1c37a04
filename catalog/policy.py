"""The policy kinds: SMI's TrafficSplit, TrafficTarget, HTTPRouteGroup and TCPRoute, NGINX Service Mesh's RateLimit
and CircuitBreaker, and meshloom's own MeshConfig.

Field names and meanings are those of the real CRDs:

- TrafficSplit (split.smi-spec.io/v1alpha3): `service` is the root Service clients call; `backends` are Services of
  the same namespace with whole-number weights (proportions, not percentages); `matches` name HTTPRouteGroups whose
  matches (ORed) select the requests the split applies to -- others go to the root Service.
- TrafficTarget (access.smi-spec.io/v1alpha2): `destination` is a ServiceAccount (with an optional `port`), `sources`
  are ServiceAccounts, `rules` name HTTPRouteGroups (optionally only some of their `matches`) or TCPRoutes. Access is
  additive and enforced on the server side.
- HTTPRouteGroup (specs.smi-spec.io/v1alpha3): `matches`, each with a `name` (how rules refer to it), `methods`
  (or `*`), a `pathRegex` anchored at the start of the path, and `headers` (header name -> value regex, ANDed).
- TCPRoute (specs.smi-spec.io/v1alpha3): L4 traffic. Its v1alpha3 spec is empty (all ports); `matches.ports`, from
  the later SMI version, narrows it to some ports and is accepted here too.
- RateLimit (specs.smi.nginx.com/v1alpha2): `destination` and optional `sources` (object references), `name`,
  `rate` (`10r/s`, `600r/m`), `burst`, `delay` (a number or `nodelay`), `rules` naming HTTPRouteGroups.
- CircuitBreaker (specs.smi.nginx.com/v1alpha1): `destination` (a Service), `errors` within `timeoutSeconds` trip
  it for `timeoutSeconds`; `fallback` {`service`, `port`} receives the traffic while it is tripped.
- MeshConfig (meshloom.io/v1alpha1), one per mesh, named `mesh`: the settings that change at run time.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Self

from catalog.fields import EMPTY, FrozenMap, Reader, describe, dns_label, dns_subdomain, join, regex
from catalog.resource import Resource, columns, head


# ---------------------------------------------------------------------------------------------- MeshConfig ---
class MtlsMode(StrEnum):
    OFF = "off"  # plain traffic between sidecars
    PERMISSIVE = "permissive"  # mTLS between sidecars, plain traffic from outside the mesh still accepted
    STRICT = "strict"  # mTLS only


class AccessControlMode(StrEnum):
    ALLOW = "allow"  # every source may reach every destination
    DENY = "deny"  # only what TrafficTargets allow


class LoadBalancingMethod(StrEnum):
    """Methods HAProxy has (its name in brackets), named as NGINX Service Mesh names its own."""

    ROUND_ROBIN = "round_robin"  # roundrobin
    LEAST_CONN = "least_conn"  # leastconn
    RANDOM = "random"  # random
    RANDOM_TWO_LEAST_CONN = "random_two_least_conn"  # random(2): the less loaded of two random servers
    SOURCE = "source"  # source: a client address always reaches the same server while the set is stable


class LogLevel(StrEnum):
    """HAProxy's (syslog's) levels, most verbose first."""

    DEBUG = "debug"
    INFO = "info"
    NOTICE = "notice"
    WARNING = "warning"
    ERR = "err"
    CRIT = "crit"
    ALERT = "alert"
    EMERG = "emerg"


class LogFormat(StrEnum):
    DEFAULT = "default"
    JSON = "json"


_SIZE = re.compile(r"[0-9]+[kKmMgG]?\Z")


def body_size(value: str) -> str | None:
    """NGINX's size syntax, which NGINX Service Mesh users know: `1m`, `64k`, `0` (no limit)."""
    if _SIZE.match(value):
        return None
    return f"must be a size such as 1m, 64k or 0 (no limit), got {value!r}"


@dataclass(frozen=True, slots=True)
class MeshConfig(Resource):
    """The mesh-wide settings a running mesh can change. Absent, every field has its default."""

    kind: ClassVar[str] = "MeshConfig"
    api_version: ClassVar[str] = "meshloom.io/v1alpha1"
    cluster_scoped: ClassVar[bool] = True
    strict: ClassVar[bool] = True
    NAME: ClassVar[str] = "mesh"
    FIELDS: ClassVar[tuple[str, ...]] = ("mtlsMode", "accessControlMode", "loadBalancingMethod", "clientMaxBodySize",
                                         "enableUDP", "logLevel", "logFormat")

    namespace: str = ""
    name: str = "mesh"
    mtls_mode: MtlsMode = MtlsMode.PERMISSIVE
    access_control_mode: AccessControlMode = AccessControlMode.ALLOW
    load_balancing_method: LoadBalancingMethod = LoadBalancingMethod.ROUND_ROBIN
    client_max_body_size: str = "1m"  # NGINX's default, which NGINX Service Mesh keeps
    enable_udp: bool = False  # UDP needs the eBPF redirection: off until asked for
    log_level: LogLevel = LogLevel.WARNING
    log_format: LogFormat = LogFormat.DEFAULT

    def spec(self) -> dict[str, Any]:
        return {"mtlsMode": self.mtls_mode.value, "accessControlMode": self.access_control_mode.value,
                "loadBalancingMethod": self.load_balancing_method.value,
                "clientMaxBodySize": self.client_max_body_size, "enableUDP": self.enable_udp,
                "logLevel": self.log_level.value, "logFormat": self.log_format.value}

    def to_manifest(self) -> dict[str, Any]:
        return head(MeshConfig, self) | {"spec": self.spec()}

    def summary(self) -> dict[str, str]:
        return columns(self, mtls_mode=self.mtls_mode.value, access_control_mode=self.access_control_mode.value,
                       load_balancing=self.load_balancing_method.value, client_max_body_size=self.client_max_body_size,
                       udp="on" if self.enable_udp else "off", log=f"{self.log_level}/{self.log_format}")

    @classmethod
    def read(cls, r: Reader, doc: Mapping[str, Any], namespace: str, name: str) -> Self:
        if name and name != cls.NAME:
            r.add("metadata.name", f"the mesh has one MeshConfig and it is named {cls.NAME!r}, got {name!r}")
        spec = r.mapping(doc, "spec", "") or {}
        r.only(spec, "spec", cls.FIELDS)
        size = spec.get("clientMaxBodySize")
        if isinstance(size, int) and not isinstance(size, bool):
            size = str(size)  # YAML reads `clientMaxBodySize: 0` as a number
        if size is None or size == "":
            size = "1m"
        elif isinstance(size, str):
            if (msg := body_size(size)) is not None:
                r.add("spec.clientMaxBodySize", msg)
        else:
            r.add("spec.clientMaxBodySize", f"must be a size such as 1m, 64k or 0 (no limit), got {describe(size)}")
            size = "1m"
        return cls(
            "", cls.NAME,
            mtls_mode=r.choice(spec, "mtlsMode", "spec", MtlsMode, MtlsMode.PERMISSIVE),
            access_control_mode=r.choice(spec, "accessControlMode", "spec", AccessControlMode, AccessControlMode.ALLOW),
            load_balancing_method=r.choice(spec, "loadBalancingMethod", "spec", LoadBalancingMethod,
                                           LoadBalancingMethod.ROUND_ROBIN),
            client_max_body_size=size,
            enable_udp=r.boolean(spec, "enableUDP", "spec"),
            log_level=r.choice(spec, "logLevel", "spec", LogLevel, LogLevel.WARNING),
            log_format=r.choice(spec, "logFormat", "spec", LogFormat, LogFormat.DEFAULT),
        )


DEFAULT_MESH_CONFIG = MeshConfig()


# ---------------------------------------------------------------------------------------------- references ---
@dataclass(frozen=True, slots=True)
class ObjectRef:
    """A reference to another object (a Kubernetes ObjectReference, or an SMI identity subject)."""

    kind: str
    namespace: str
    name: str

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "namespace": self.namespace, "name": self.name}

    def show(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class RuleRef:
    """A rule naming a traffic spec (HTTPRouteGroup or TCPRoute) of the policy's namespace, and maybe some of its
    matches (none named: all of them)."""

    kind: str
    name: str
    matches: tuple[str, ...] = ()

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name}
        if self.matches:
            out["matches"] = list(self.matches)
        return out

    def show(self) -> str:
        return f"{self.kind}/{self.name}" + (f"[{','.join(self.matches)}]" if self.matches else "")


def _kind(r: Reader, m: Mapping[str, Any] | None, path: str, kinds: Collection[str], *,
          unsupported: Mapping[str, str] | None = None) -> str:
    kind = r.string(m, "kind", path)
    if kind and kind not in kinds:
        if unsupported and kind in unsupported:
            r.add(join(path, "kind"), unsupported[kind])
        else:
            r.add(join(path, "kind"), f"must be {' or '.join(sorted(kinds))}, got {kind!r}")
    return kind


def _object_ref(r: Reader, m: Mapping[str, Any] | None, path: str, namespace: str, kinds: Collection[str], *,
                unsupported: Mapping[str, str] | None = None) -> ObjectRef:
    kind = _kind(r, m, path, kinds, unsupported=unsupported)
    name = r.string(m, "name", path, check=dns_label if kind in ("Service", "Namespace") else dns_subdomain)
    ns = r.string(m, "namespace", path, required=False, default=namespace, check=dns_label)
    return ObjectRef(kind, ns, name)


def _rules(r: Reader, m: Mapping[str, Any] | None, path: str, kinds: Collection[str], *,
           required: bool = False) -> tuple[RuleRef, ...]:
    out = []
    for where, item in r.elements(m, "rules", path, nonempty=required):
        rm = r.as_mapping(item, where)
        r.only(rm, where, ("kind", "name", "matches"))
        kind = _kind(r, rm, where, kinds)
        name = r.string(rm, "name", where, check=dns_subdomain)
        matches = []
        for mwhere, match in r.elements(rm, "matches", where):
            matches.append(r.as_string(match, mwhere))
        if matches and kind == "TCPRoute":
            r.add(f"{where}.matches", "a TCPRoute rule covers the whole route: matches are for HTTPRouteGroups")
        _no_duplicates(r, f"{where}.matches", matches)
        out.append(RuleRef(kind, name, tuple(matches)))
    return tuple(out)


def _no_duplicates(r: Reader, where: str, names: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name and name in seen:
            r.add(join(where, i), f"{name!r} is listed twice")
        seen.add(name)


def _service_name(r: Reader, value: object, where: str, namespace: str) -> str:
    """A Service of `namespace`, by name or by the DNS names clients use (`web.shop`, `web.shop.svc...`)."""
    text = r.as_string(value, where)
    if not text:
        return ""
    name, _, rest = text.partition(".")
    if rest and rest not in (namespace, f"{namespace}.svc", f"{namespace}.svc.cluster.local"):
        r.add(where, f"must be a Service of namespace {namespace!r} (its name, or name.{namespace}), got {text!r}")
        return text
    if (msg := dns_label(name)) is not None:
        r.add(where, msg)
    return name


def _spec(r: Reader, doc: Mapping[str, Any], allowed: Collection[str]) -> Mapping[str, Any] | None:
    spec = r.mapping(doc, "spec", "", required=True)
    r.only(spec, "spec", allowed)
    return spec


# -------------------------------------------------------------------------------------------- TrafficSplit ---
@dataclass(frozen=True, slots=True)
class Backend:
    service: str
    weight: int

    def to_manifest(self) -> dict[str, Any]:
        return {"service": self.service, "weight": self.weight}


@dataclass(frozen=True, slots=True)
class TrafficSplit(Resource):
    kind: ClassVar[str] = "TrafficSplit"
    api_version: ClassVar[str] = "split.smi-spec.io/v1alpha3"
    strict: ClassVar[bool] = True

    namespace: str
    name: str
    service: str  # the root Service, of this namespace
    backends: tuple[Backend, ...]
    matches: tuple[RuleRef, ...] = ()  # HTTPRouteGroups; none: the split applies to every request

    def to_manifest(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"service": self.service, "backends": [b.to_manifest() for b in self.backends]}
        if self.matches:
            spec["matches"] = [m.to_manifest() for m in self.matches]
        return head(TrafficSplit, self) | {"spec": spec}

    def summary(self) -> dict[str, str]:
        return columns(self, service=self.service,
                       backends=",".join(f"{b.service}={b.weight}" for b in self.backends),
                       matches=",".join(m.name for m in self.matches) or "-")

    @classmethod
    def read(cls, r: Reader, doc: Mapping[str, Any], namespace: str, name: str) -> Self:
        spec = _spec(r, doc, ("service", "backends", "matches"))
        service = ""
        if spec is not None and spec.get("service") not in (None, ""):
            service = _service_name(r, spec["service"], "spec.service", namespace)
        elif spec is not None:
            r.add("spec.service", "is required")
        backends, names = [], []
        for where, item in r.elements(spec, "backends", "spec", nonempty=True):
            bm = r.as_mapping(item, where)
            r.only(bm, where, ("service", "weight"))
            bservice = ""
            if bm is not None and bm.get("service") not in (None, ""):
                bservice = _service_name(r, bm["service"], f"{where}.service", namespace)
            elif bm is not None:
                r.add(f"{where}.service", "is required")
            weight = r.integer(bm, "weight", where, low=0)
            backends.append(Backend(bservice, weight))
            names.append(bservice)
        for i, bservice in enumerate(names):
            if bservice and names.index(bservice) != i:
                r.add(f"spec.backends[{i}].service", f"backend {bservice!r} is listed twice")
        if backends and not r.problems and sum(b.weight for b in backends) == 0:
            r.add("spec.backends", "the weights add up to 0: give at least one backend a weight above 0")
        matches = []
        for where, item in r.elements(spec, "matches", "spec"):
            mm = r.as_mapping(item, where)
            r.only(mm, where, ("kind", "name"))
            matches.append(RuleRef(_kind(r, mm, where, ("HTTPRouteGroup",)),
                                   r.string(mm, "name", where, check=dns_subdomain)))
        return cls(namespace, name, service, tuple(backends), tuple(matches))


# ------------------------------------------------------------------------------------------- TrafficTarget ---
@dataclass(frozen=True, slots=True)
class TrafficTarget(Resource):
    kind: ClassVar[str] = "TrafficTarget"
    api_version: ClassVar[str] = "access.smi-spec.io/v1alpha2"
    strict: ClassVar[bool] = True

    namespace: str
    name: str
    destination: ObjectRef  # a ServiceAccount of this namespace
    destination_port: int | None  # None: every port of the destination
    sources: tuple[ObjectRef, ...]  # ServiceAccounts, of any namespace
    rules: tuple[RuleRef, ...]

    def to_manifest(self) -> dict[str, Any]:
        destination = self.destination.to_manifest()
        if self.destination_port is not None:
            destination["port"] = self.destination_port
        return head(TrafficTarget, self) | {"spec": {
            "destination": destination, "sources": [s.to_manifest() for s in self.sources],
            "rules": [rule.to_manifest() for rule in self.rules]}}

    def summary(self) -> dict[str, str]:
        port = f":{self.destination_port}" if self.destination_port is not None else ""
        return columns(self, destination=f"{self.destination.namespace}/{self.destination.name}{port}",
                       sources=",".join(f"{s.namespace}/{s.name}" for s in self.sources),
                       rules=",".join(rule.show() for rule in self.rules))

    @classmethod
    def read(cls, r: Reader, doc: Mapping[str, Any], namespace: str, name: str) -> Self:
        spec = _spec(r, doc, ("destination", "sources", "rules"))
        dm = r.mapping(spec, "destination", "spec", required=True)
        r.only(dm, "spec.destination", ("kind", "name", "namespace", "port"))
        destination = _object_ref(r, dm, "spec.destination", namespace, ("ServiceAccount",))
        if destination.namespace != namespace:
            # Granting access to a ServiceAccount is its namespace owner's call, not another namespace's.
            r.add("spec.destination.namespace",
                  f"must be the TrafficTarget's own namespace {namespace!r}, got {destination.namespace!r}")
        port = r.port(dm, "port", "spec.destination", required=False) or None
        sources = []
        for where, item in r.elements(spec, "sources", "spec", nonempty=True):
            sm = r.as_mapping(item, where)
            r.only(sm, where, ("kind", "name", "namespace"))
            sources.append(_object_ref(r, sm, where, namespace, ("ServiceAccount",)))
        rules = _rules(r, spec, "spec", ("HTTPRouteGroup", "TCPRoute"), required=True)
        return cls(namespace, name, destination, port, tuple(sources), rules)


# ------------------------------------------------------------------------------------------ HTTPRouteGroup ---
HTTP_METHODS = ("*", "GET", "HEAD", "PUT", "POST", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


@dataclass(frozen=True, slots=True)
class HTTPMatch:
    name: str
    methods: tuple[str, ...] = ()  # () or ("*",): every method
    path_regex: str = ""  # "": every path
    headers: FrozenMap = EMPTY  # header name -> value regex, all of which must match

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.methods:
            out["methods"] = list(self.methods)
        if self.path_regex:
            out["pathRegex"] = self.path_regex
        if self.headers:
            out["headers"] = self.headers.to_dict()
        return out


@dataclass(frozen=True, slots=True)
class HTTPRouteGroup(Resource):
    kind: ClassVar[str] = "HTTPRouteGroup"
    api_version: ClassVar[str] = "specs.smi-spec.io/v1alpha3"
    strict: ClassVar[bool] = True

    namespace: str
    name: str
    matches: tuple[HTTPMatch, ...]

    def match(self, name: str) -> HTTPMatch | None:
        return next((m for m in self.matches if m.name == name), None)

    def to_manifest(self) -> dict[str, Any]:
        return head(HTTPRouteGroup, self) | {"spec": {"matches": [m.to_manifest() for m in self.matches]}}

    def summary(self) -> dict[str, str]:
        return columns(self, matches=",".join(m.name for m in self.matches))

    @classmethod
    def read(cls, r: Reader, doc: Mapping[str, Any], namespace: str, name: str) -> Self:
        spec = _spec(r, doc, ("matches",))
        matches, names = [], []
        for where, item in r.elements(spec, "matches", "spec", nonempty=True):
            mm = r.as_mapping(item, where)
            r.only(mm, where, ("name", "methods", "pathRegex", "headers"))
            mname = r.string(mm, "name", where)
            methods = []
            for mwhere, method in r.elements(mm, "methods", where):
                text = r.as_string(method, mwhere).upper()
                if text and text not in HTTP_METHODS:
                    r.add(mwhere, f"must be an HTTP method ({', '.join(HTTP_METHODS)}), got {method!r}")
                methods.append(text)
            _no_duplicates(r, f"{where}.methods", methods)
            path_regex = r.string(mm, "pathRegex", where, required=False, check=regex)
            headers = r.string_map(mm, "headers", where)
            for header, pattern in headers.items():
                if (msg := regex(pattern)) is not None:
                    r.add(join(f"{where}.headers", header), msg)
            matches.append(HTTPMatch(mname, tuple(methods), path_regex, headers))
            names.append(mname)
        for i, mname in enumerate(names):
            if mname and names.index(mname) != i:
                r.add(f"spec.matches[{i}].name", f"match name {mname!r} is used twice: rules could not tell them apart")
        return cls(namespace, name, tuple(matches))


# ------------------------------------------------------------------------------------------------ TCPRoute ---
@dataclass(frozen=True, slots=True)
class TCPRoute(Resource):
    kind: ClassVar[str] = "TCPRoute"
    api_version: ClassVar[str] = "specs.smi-spec.io/v1alpha3"
    strict: ClassVar[bool] = True

    namespace: str
    name: str
    ports: tuple[int, ...] = ()  # (): every port
    match_name: str = ""

    def to_manifest(self) -> dict[str, Any]:
        if not self.ports and not self.match_name:
            return head(TCPRoute, self) | {"spec": {}}
        matches: dict[str, Any] = {"ports": list(self.ports)}
        if self.match_name:
            matches["name"] = self.match_name
        return head(TCPRoute, self) | {"spec": {"matches": matches}}

    def summary(self) -> dict[str, str]:
        return columns(self, ports=",".join(map(str, self.ports)) or "all")

    @classmethod
    def read(cls, r: Reader, doc: Mapping[str, Any], namespace: str, name: str) -> Self:
        spec = r.mapping(doc, "spec", "")  # `spec: {}` is the whole v1alpha3 TCPRoute
        r.only(spec, "spec", ("matches",))
        mm = r.mapping(spec, "matches", "spec")
        r.only(mm, "spec.matches", ("name", "ports"))
        match_name = r.string(mm, "name", "spec.matches", required=False)
        ports = [r.as_integer(p, where, low=1, high=65535) for where, p in r.elements(mm, "ports", "spec.matches")]
        if len(set(ports)) != len(ports):
            r.add("spec.matches.ports", "a port is listed twice")
        return cls(namespace, name, tuple(sorted(set(ports))), match_name)


# ----------------------------------------------------------------------------------------------- RateLimit ---
_RATE = re.compile(r"\s*([0-9]+)\s*r/(s|m)\s*\Z")
# NGINX Service Mesh also accepts these; meshloom cannot resolve workload kinds to pods yet (pods carry no owners).
_WORKLOADS = {k: f"{k} is not supported yet: name the Service (or the Pod) instead"
              for k in ("Deployment", "DaemonSet", "StatefulSet")}


@dataclass(frozen=True, slots=True)
class Rate:
    count: int
    per: str  # "s" or "m"

    def __str__(self) -> str:
        return f"{self.count}r/{self.per}"


@dataclass(frozen=True, slots=True)
class RateLimit(Resource):
    kind: ClassVar[str] = "RateLimit"
    api_version: ClassVar[str] = "specs.smi.nginx.com/v1alpha2"
    strict: ClassVar[bool] = True
    NODELAY: ClassVar[str] = "nodelay"

    namespace: str
    name: str
    destination: ObjectRef  # a Service or a Pod
    sources: tuple[ObjectRef, ...]  # (): every source
    limit_name: str  # spec.name, "10rs"
    rate: Rate
    burst: int = 0  # requests beyond the rate that are still accepted
    delay: int | str = 0  # of the burst, how many pass without delay; "nodelay": all of them
    rules: tuple[RuleRef, ...] = ()  # HTTPRouteGroups; none: every request

    def to_manifest(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"destination": self.destination.to_manifest(), "name": self.limit_name,
                                "rate": str(self.rate), "burst": self.burst, "delay": self.delay}
        if self.sources:
            spec["sources"] = [s.to_manifest() for s in self.sources]
        if self.rules:
            spec["rules"] = [rule.to_manifest() for rule in self.rules]
        return head(RateLimit, self) | {"spec": spec}

    def summary(self) -> dict[str, str]:
        return columns(self, destination=self.destination.show(),
                       sources=",".join(s.show() for s in self.sources) or "all", rate=str(self.rate),
                       burst=str(self.burst), delay=str(self.delay),
                       rules=",".join(rule.show() for rule in self.rules) or "-")

    @classmethod
    def read(cls, r: Reader, doc: Mapping[str, Any], namespace: str, name: str) -> Self:
        spec = _spec(r, doc, ("destination", "sources", "name", "rate", "burst", "delay", "rules"))
        dm = r.mapping(spec, "destination", "spec", required=True)
        r.only(dm, "spec.destination", ("kind", "name", "namespace"))
        destination = _object_ref(r, dm, "spec.destination", namespace, ("Service", "Pod"), unsupported=_WORKLOADS)
        sources = []
        for where, item in r.elements(spec, "sources", "spec"):
            sm = r.as_mapping(item, where)
            r.only(sm, where, ("kind", "name", "namespace"))
            sources.append(_object_ref(r, sm, where, namespace, ("Service", "Pod"), unsupported=_WORKLOADS))
        if len(set(sources)) != len(sources):
            r.add("spec.sources", "a source is listed twice")
        limit_name = r.string(spec, "name", "spec", check=_zone_name)
        rate = Rate(1, "s")
        raw = spec.get("rate") if spec is not None else None
        if raw is None or raw == "":
            if spec is not None:
                r.add("spec.rate", "is required")
        elif not isinstance(raw, str) or not (found := _RATE.match(raw)) or int(found.group(1)) == 0:
            r.add("spec.rate", f"must be requests per second or minute, such as 10r/s or 600r/m, got {describe(raw)}")
        else:
            rate = Rate(int(found.group(1)), found.group(2))
        burst = r.integer(spec, "burst", "spec", required=False, low=0)
        delay: int | str = 0
        raw_delay = spec.get("delay") if spec is not None else None
        if raw_delay == cls.NODELAY:
            delay = cls.NODELAY
        elif raw_delay is not None:
            if isinstance(raw_delay, str) and raw_delay.isdigit():
                raw_delay = int(raw_delay)  # an IntOrString: "5" is 5
            if not isinstance(raw_delay, int) or isinstance(raw_delay, bool) or raw_delay < 0:
                r.add("spec.delay", f"must be a whole number >= 0 or \"nodelay\", got {describe(raw_delay)}")
            else:
                delay = raw_delay
        rules = _rules(r, spec, "spec", ("HTTPRouteGroup",))
        return cls(namespace, name, destination, tuple(sources), limit_name, rate, burst, delay, rules)


def _zone_name(value: str) -> str | None:
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", value):
        return None
    return f"must be letters, digits, '_', '.' and '-' (at most 63), got {value!r}"


# ------------------------------------------------------------------------------------------ CircuitBreaker ---
@dataclass(frozen=True, slots=True)
class Fallback:
    namespace: str
    service: str
    port: int = 80  # NGINX Service Mesh's default

    def to_manifest(self) -> dict[str, Any]:
        return {"service": f"{self.namespace}/{self.service}", "port": self.port}


@dataclass(frozen=True, slots=True)
class CircuitBreaker(Resource):
    kind: ClassVar[str] = "CircuitBreaker"
    api_version: ClassVar[str] = "specs.smi.nginx.com/v1alpha1"
    strict: ClassVar[bool] = True

    namespace: str
    name: str
    destination: ObjectRef  # a Service
    errors: int  # errors within timeoutSeconds that trip the breaker
    timeout_seconds: int  # the window the errors must fall in, and how long the breaker stays tripped
    fallback: Fallback | None = None  # where traffic goes while tripped; None: clients get the error

    def to_manifest(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"destination": self.destination.to_manifest(), "errors": self.errors,
                                "timeoutSeconds": self.timeout_seconds}
        if self.fallback is not None:
            spec["fallback"] = self.fallback.to_manifest()
        return head(CircuitBreaker, self) | {"spec": spec}

    def summary(self) -> dict[str, str]:
        fallback = f"{self.fallback.namespace}/{self.fallback.service}:{self.fallback.port}" if self.fallback else "-"
        return columns(self, destination=f"{self.destination.namespace}/{self.destination.name}",
                       errors=str(self.errors), timeout_seconds=str(self.timeout_seconds), fallback=fallback)

    @classmethod
    def read(cls, r: Reader, doc: Mapping[str, Any], namespace: str, name: str) -> Self:
        spec = _spec(r, doc, ("destination", "errors", "timeoutSeconds", "fallback"))
        dm = r.mapping(spec, "destination", "spec", required=True)
        r.only(dm, "spec.destination", ("kind", "name", "namespace"))
        destination = _object_ref(r, dm, "spec.destination", namespace, ("Service",))
        errors = r.integer(spec, "errors", "spec", low=1)
        timeout = r.integer(spec, "timeoutSeconds", "spec", low=1)
        fallback = None
        fm = r.mapping(spec, "fallback", "spec")
        if fm is not None:
            r.only(fm, "spec.fallback", ("service", "port"))
            # NGINX Service Mesh defaults a bare name to namespace "default" but also requires the fallback to be in
            # the destination's namespace; defaulting to the destination's namespace keeps both rules.
            text = r.string(fm, "service", "spec.fallback")
            fns, _, fname = text.rpartition("/")
            fns = fns or destination.namespace
            if text:
                if (msg := dns_label(fname)) is not None:
                    r.add("spec.fallback.service", msg)
                elif fns != destination.namespace:
                    r.add("spec.fallback.service", f"must be in the destination's namespace "
                                                   f"{destination.namespace!r}, got {text!r}")
            fallback = Fallback(fns, fname, r.port(fm, "port", "spec.fallback", required=False) or 80)
        return cls(namespace, name, destination, errors, timeout, fallback)
