"""Sidecar injection: whether a pod joins the mesh, and the JSON patch that makes it join. One code path for the
admission webhook and `meshctl inject`.

Theory of operation
-------------------
Both callers go through the same three steps, and nothing else in the mesh builds an injected pod:

    decide(metadata, spec, namespace_labels)   -> Decision(inject, reason)      a stable reason code either way
    patch(pod, values, ignore_incoming, ...)   -> [JSON patch operations]       RFC 6902, relative to the pod
    inject(pod, values, ...)                   -> the pod with the patch applied (the same operations, applied here)

The webhook answers an AdmissionReview with `admit` (`admission_response` is its AdmissionReview alone), which
runs `decide` and `patch` and puts the operations, base64-encoded, into the response; `meshctl inject` finds the pod
template of each workload document (`template_path`) and applies the same operations with `inject_document`. What
the containers look like comes only from `InjectionValues`, which is read from the chart's values
(`charts/meshloom/values.yaml`, or the `meshloom-injection` ConfigMap the chart renders from them), so the chart and
the injector cannot drift.

What injection adds to a pod
----------------------------
- `meshloom-init`, appended after the pod's own init containers: `meshctl init` as root with NET_ADMIN and NET_RAW
  installs the REDIRECT rules and exits. Last rather than first, so that the pod's own init containers still reach
  the network directly: before the sidecar runs, a redirected connection would have nowhere to go.
- `meshloom-sidecar`, appended after the pod's containers (the first container stays `kubectl logs`' default):
  `meshctl sidecar` as uid 2102, no capabilities, readiness `/ready` and liveness `/live` on the admin port, the
  admin and metrics ports declared and named, POD_NAME / POD_NAMESPACE / POD_IP / POD_SERVICE_ACCOUNT from the
  downward API.
- An emptyDir in memory at /var/run/meshloom for the sidecar's proxy files (its SVID's key among them: kept off
  the node's disk).
- The Workload API socket: the node agent serves one socket per pod, `<socketDir>/<namespace>_<pod>/agent.sock` on
  the node (`actions.nodeagent.socket_path` of the owner `namespace/pod`). The pod mounts the hostPath `socketDir`
  read-only at /run/spiffe with `subPathExpr: $(POD_NAMESPACE)_$(POD_NAME)`, so it sees its own directory and no
  other, and SPIFFE_ENDPOINT_SOCKET is `unix:///run/spiffe/agent.sock`. A subPathExpr rather than a per-pod
  hostPath because the webhook runs before the API server has given a `generateName` pod its name. (A connect
  needs no write access, so the read-only mount is enough.) Known limit: the node agent cuts a directory name that
  would not fit a unix socket address (about 76 characters of `<namespace>_<pod>` under /run/meshloom/agent) and
  ends it with a hash, which a subPathExpr cannot compute; such a pod finds no socket.
- The sidecar finds NATS at MESHLOOM_NATS_URL, the chart's Service `meshloom-nats` in the control plane's namespace.
- `terminationGracePeriodSeconds` raised to at least drainSeconds + 5 (the sidecar drains on SIGTERM for
  drainSeconds; the 5 s let it stop its proxy and exit before the kubelet's SIGKILL).
- The annotation `meshloom.io/inject-status: injected` (what marks a pod as done: a second injection is a no-op),
  and `meshloom.io/injected: "true"` as a label (selectable) and as an annotation (what `catalog.world.is_meshed`
  reads).

Ports the init step leaves alone: DNS (53) both ways, the sidecar's admin and metrics ports inbound, the chart's
`injection.ignore*Ports`, the pod's `config.nsm.nginx.com/ignore-incoming-ports` / `ignore-outgoing-ports`
annotations and the CLI's flags, all together.

mTLS mode: the pod's `config.nsm.nginx.com/mtls-mode` annotation, else the chart's `mtls.mode`. In strict mode the
kubelet, which has no SVID, could no longer reach the app's HTTP probes through the inbound redirect; so each
`httpGet` probe of an app container is rewritten to `/app-health/<container>/<livez|readyz|startupz>` on the
sidecar's admin port, and the original (port resolved to a number, path, scheme, headers) is handed to the sidecar
in the env MESHLOOM_APP_PROBES (JSON: rewritten path -> original), for it to forward from inside the pod. Probes with
a `host` go elsewhere than the pod and are kept; TCP and exec probes are kept (a TCP probe then reaches the sidecar).

Pure: no I/O, no YAML, no logging (import-linter keeps it so).
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from catalog.fields import Problem, Reader, ValidationError, describe, join
from catalog.kube import AUTO_INJECT_LABEL, INJECTED_ANNOTATION, MTLS_MODE_ANNOTATION
from catalog.policy import MtlsMode

# --------------------------------------------------------------------------------------------------- names ---
INJECT_STATUS_ANNOTATION = "meshloom.io/inject-status"
INJECTED_LABEL = INJECTED_ANNOTATION  # the same key, "true", as a label too
IGNORE_INCOMING_ANNOTATION = "config.nsm.nginx.com/ignore-incoming-ports"
IGNORE_OUTGOING_ANNOTATION = "config.nsm.nginx.com/ignore-outgoing-ports"
SIDECAR_NAME = "meshloom-sidecar"
INIT_NAME = "meshloom-init"
SPIFFE_VOLUME = "meshloom-spiffe"
SPIFFE_MOUNT = "/run/spiffe"
RUN_VOLUME = "meshloom-run"
RUN_MOUNT = "/var/run/meshloom"  # meshctl sidecar's --run-dir default: HAProxy's config, sockets, SVID and key
# Where sidecars find the control plane's NATS: the chart's Service `meshloom-nats` in the control plane's namespace
# (`meshloom`), port nats.port (4222), in front of the leading controller's own NATS server, whose certificate
# carries that name (`meshctl controller` signs it for `<NATS_SERVICE>.<its namespace>.svc`). Not among the values
# the injector reads.
NATS_SERVICE = "meshloom-nats"
NATS_PORT = 4222
NATS_SERVER_NAME = f"{NATS_SERVICE}.meshloom.svc"
NATS_URL = f"tls://{NATS_SERVER_NAME}:{NATS_PORT}"
SOCKET_NAME = "agent.sock"  # actions.nodeagent.SOCKET_NAME
SOCKET_SUBPATH = "$(POD_NAMESPACE)_$(POD_NAME)"  # actions.nodeagent.escape_owner("<ns>/<pod>") for DNS names
ADMIN_PORT_NAME = "mesh-admin"  # container port names: at most 15 characters
METRICS_PORT_NAME = "mesh-metrics"
PROBES_ENV = "MESHLOOM_APP_PROBES"
APP_HEALTH_PREFIX = "/app-health/"
DEFAULT_IGNORED_PORTS = (53,)  # DNS, both ways
DEFAULT_GRACE_SECONDS = 30  # Kubernetes' own default terminationGracePeriodSeconds
GRACE_MARGIN_SECONDS = 5  # after draining, the sidecar stops its proxy and exits

_PROBES = (("livenessProbe", "livez"), ("readinessProbe", "readyz"), ("startupProbe", "startupz"))
_WORKLOAD_TEMPLATES: Mapping[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


# ------------------------------------------------------------------------------------------------- reasons ---
class InjectReason(StrEnum):
    # inject
    POD_ENABLED = "pod-enabled"
    NAMESPACE_ENABLED = "namespace-enabled"
    REQUESTED = "requested"
    # skip: nobody asked
    POD_DISABLED = "pod-disabled"
    POD_LABEL_INVALID = "pod-label-invalid"
    NAMESPACE_NOT_ENABLED = "namespace-not-enabled"
    NAMESPACE_UNKNOWN = "namespace-unknown"
    ALREADY_INJECTED = "already-injected"
    NOT_A_WORKLOAD = "not-a-workload"
    NOT_A_CREATE = "not-a-create"
    # skip: asked for, but the pod cannot be meshed
    HOST_NETWORK = "host-network"
    SCTP_PORT = "sctp-port"
    DUPLICATE_PORT = "duplicate-port"
    PORT_CONFLICT = "port-conflict"
    NAME_CONFLICT = "name-conflict"


REASON_TEXT: Mapping[InjectReason, str] = {
    InjectReason.POD_ENABLED: f"the pod is labelled {AUTO_INJECT_LABEL}=enabled",
    InjectReason.NAMESPACE_ENABLED: f"the namespace is labelled {AUTO_INJECT_LABEL}=enabled",
    InjectReason.REQUESTED: "injection was asked for by hand (meshctl inject)",
    InjectReason.POD_DISABLED: f"the pod is labelled {AUTO_INJECT_LABEL}=disabled",
    InjectReason.POD_LABEL_INVALID: f"the pod's {AUTO_INJECT_LABEL} label is neither enabled nor disabled",
    InjectReason.NAMESPACE_NOT_ENABLED: f"neither the pod nor its namespace is labelled {AUTO_INJECT_LABEL}=enabled",
    InjectReason.NAMESPACE_UNKNOWN: "the namespace's labels are not known",
    InjectReason.ALREADY_INJECTED: "the pod already has the mesh's init container and sidecar",
    InjectReason.NOT_A_WORKLOAD: "not a pod, nor a workload with a pod template",
    InjectReason.NOT_A_CREATE: "only pod creations are injected",
    InjectReason.HOST_NETWORK: "the pod uses the host's network, which the mesh's redirect rules would change",
    InjectReason.SCTP_PORT: "the pod declares an SCTP port, which the sidecar cannot proxy",
    InjectReason.DUPLICATE_PORT: "the pod declares one port number twice for one protocol",
    InjectReason.PORT_CONFLICT: "a container of the pod uses a port the sidecar needs",
    InjectReason.NAME_CONFLICT: "the pod already has a container, port or volume named as one the mesh adds",
}

# Skips of a pod that asked to be meshed: the user should hear of these (an admission warning), unlike the others.
BLOCKED = frozenset({InjectReason.HOST_NETWORK, InjectReason.SCTP_PORT, InjectReason.DUPLICATE_PORT,
                     InjectReason.PORT_CONFLICT, InjectReason.NAME_CONFLICT})


@dataclass(frozen=True, slots=True)
class Decision:
    inject: bool
    reason: InjectReason
    detail: str = ""  # which port, which container: for people, not for matching

    @property
    def text(self) -> str:
        return REASON_TEXT[self.reason] + (f" ({self.detail})" if self.detail else "")


# ------------------------------------------------------------------------------------------------- values ---
class InjectionValuesError(ValueError):
    """The chart's values cannot drive injection: one line naming every wrong key."""


class FailurePolicy(StrEnum):
    IGNORE = "Ignore"
    FAIL = "Fail"


class PullPolicy(StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


@dataclass(frozen=True, slots=True)
class Image:
    repository: str
    tag: str
    pull_policy: PullPolicy

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


@dataclass(frozen=True, slots=True)
class SidecarPorts:
    inbound: int = 15006
    outbound: int = 15001
    admin: int = 15021
    metrics: int = 15090


DEFAULT_PORTS = SidecarPorts()

Resources = tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # (("requests", (("cpu", "50m"), ...)), ...)


@dataclass(frozen=True, slots=True)
class InjectionValues:
    """The part of the chart's values that injection reads (/tmp/brief/values.md: `trustDomain`, `mtls`, `nodeAgent`,
    `sidecar`, `init`, `injection`)."""

    trust_domain: str
    mtls_mode: MtlsMode
    socket_dir: str
    sidecar_image: Image
    sidecar_uid: int
    ports: SidecarPorts
    sidecar_resources: Resources
    drain_seconds: int
    init_image: Image
    init_resources: Resources
    ignore_incoming_ports: tuple[int, ...]
    ignore_outgoing_ports: tuple[int, ...]
    failure_policy: FailurePolicy
    timeout_seconds: int

    @classmethod
    def from_values(cls, values: object, source: str = "values") -> InjectionValues:
        """The chart's values (all of them, or the ConfigMap's subset); `InjectionValuesError` names every bad key,
        on one line that starts with `source` (the file they came from)."""
        r = Reader(source)
        root = values if isinstance(values, Mapping) else None
        if root is None:
            raise InjectionValuesError(f"{source}: must be a mapping (the chart's values), got {describe(values)}")
        mtls = r.mapping(root, "mtls", "", required=True)
        agent = r.mapping(root, "nodeAgent", "", required=True)
        sidecar = r.mapping(root, "sidecar", "", required=True)
        init = r.mapping(root, "init", "", required=True)
        injection = r.mapping(root, "injection", "", required=True)
        ports_m = r.mapping(sidecar, "ports", "sidecar", required=True)
        before = len(r.problems)
        ports = SidecarPorts(*(r.port(ports_m, k, "sidecar.ports") for k in ("inbound", "outbound", "admin",
                                                                             "metrics")))
        if ports_m is not None and len(r.problems) == before and \
                len({ports.inbound, ports.outbound, ports.admin, ports.metrics}) < 4:
            r.add("sidecar.ports", "inbound, outbound, admin and metrics must be four different ports")
        socket_dir = r.string(agent, "socketDir", "nodeAgent",
                              check=lambda v: None if v.startswith("/") and "%" not in v else
                              f"must be an absolute path without '%', got {v!r}")
        uid = r.integer(sidecar, "uid", "sidecar", low=1, high=2**31 - 1)
        out = cls(
            trust_domain=r.string(root, "trustDomain", "", check=_trust_domain),
            mtls_mode=_required_choice(r, mtls, "mode", "mtls", MtlsMode, MtlsMode.PERMISSIVE),
            socket_dir=socket_dir.rstrip("/") or "/",
            sidecar_image=_image(r, sidecar, "sidecar"),
            sidecar_uid=uid,
            ports=ports,
            sidecar_resources=_resources(r, sidecar, "sidecar"),
            drain_seconds=r.integer(sidecar, "drainSeconds", "sidecar", low=0, high=3600),
            init_image=_image(r, init, "init"),
            init_resources=_resources(r, init, "init"),
            ignore_incoming_ports=_port_list(r, injection, "ignoreIncomingPorts", "injection"),
            ignore_outgoing_ports=_port_list(r, injection, "ignoreOutgoingPorts", "injection"),
            failure_policy=_required_choice(r, injection, "failurePolicy", "injection", FailurePolicy,
                                            FailurePolicy.IGNORE),
            # The API server refuses a webhook timeout outside 1..30 s.
            timeout_seconds=r.integer(injection, "timeoutSeconds", "injection", low=1, high=30),
        )
        if r.problems:
            raise InjectionValuesError(f"{source}: " + "; ".join(f"{p.field}: {p.message}" for p in r.problems))
        return out


def _trust_domain(value: str) -> str | None:
    if re.fullmatch(r"[a-z0-9._-]+", value):
        return None
    return f"must be a trust domain (lowercase letters, digits, '.', '-', '_'), got {value!r}"


def _required_choice(r: Reader, m: Mapping[str, Any] | None, key: str, path: str, enum: type[Any],
                     default: Any) -> Any:
    if m is not None and m.get(key) in (None, ""):
        r.add(join(path, key), "is required")
        return default
    return r.choice(m, key, path, enum, default)


def _image(r: Reader, section: Mapping[str, Any] | None, path: str) -> Image:
    where = join(path, "image")
    m = r.mapping(section, "image", path, required=True)
    repository = r.string(m, "repository", where,
                          check=lambda v: None if re.fullmatch(r"[^\s:@]+(:[0-9]+)?[^\s:@]*", v) else
                          f"must be an image repository (no spaces, tag or digest), got {v!r}")
    tag = r.string(m, "tag", where, check=lambda v: None if re.fullmatch(r"[\w][\w.-]{0,127}", v) else
                   f"must be an image tag (letters, digits, '_', '.', '-'), got {v!r}")
    policy = _required_choice(r, m, "pullPolicy", where, PullPolicy, PullPolicy.IF_NOT_PRESENT)
    return Image(repository, tag, policy)


_QUANTITY = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?\Z")


def _resources(r: Reader, section: Mapping[str, Any] | None, path: str) -> Resources:
    where = join(path, "resources")
    m = r.mapping(section, "resources", path)
    if m is None:
        return ()
    out = []
    for part in ("limits", "requests"):
        pm = r.mapping(m, part, where)
        if pm is None:
            continue
        items = []
        for name, raw in sorted(pm.items(), key=lambda kv: str(kv[0])):
            at = join(join(where, part), str(name))
            text = str(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else raw
            if not isinstance(text, str) or not _QUANTITY.match(text):
                r.add(at, f"must be a Kubernetes quantity (e.g. 50m, 128Mi), got {describe(raw)}")
                continue
            items.append((str(name), text))
        out.append((part, tuple(items)))
    for key in m:
        if key not in ("limits", "requests"):
            r.add(join(where, str(key)), "unknown field (known here: limits, requests)")
    return tuple(out)


def _port_list(r: Reader, m: Mapping[str, Any] | None, key: str, path: str) -> tuple[int, ...]:
    ports = [r.as_integer(item, where, low=1, high=65535) for where, item in r.elements(m, key, path)]
    return tuple(sorted(set(p for p in ports if p)))


def _resources_manifest(resources: Resources) -> dict[str, dict[str, str]]:
    return {part: dict(items) for part, items in resources}


# ------------------------------------------------------------------------------------------------- decide ---
class InjectError(ValueError):
    """A pod that asked for injection cannot be injected as written: `field` (relative to the pod) and `message`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _containers(spec: Mapping[str, Any], key: str = "containers") -> list[Mapping[str, Any]]:
    return [c for c in _list(spec.get(key)) if isinstance(c, Mapping)]


def already_injected(metadata: Mapping[str, Any], spec: Mapping[str, Any]) -> bool:
    if INJECT_STATUS_ANNOTATION in _mapping(metadata.get("annotations")):
        return True
    return any(c.get("name") == SIDECAR_NAME for c in _containers(spec)) or \
        any(c.get("name") == INIT_NAME for c in _containers(spec, "initContainers"))


def decide(metadata: Mapping[str, Any], spec: Mapping[str, Any], namespace_labels: Mapping[str, str] | None, *,
           manual: bool = False, ports: SidecarPorts = DEFAULT_PORTS) -> Decision:
    """Whether to inject a pod (or a pod template), and why.

    The labels first; the pod's own label wins, as in NGINX Service Mesh (and `catalog.world.is_meshed`):

        pod label    | namespace label     | manual (CLI) | decision
        enabled      | any                 | any          | inject  pod-enabled
        disabled     | any                 | any          | skip    pod-disabled
        other value  | any                 | any          | skip    pod-label-invalid
        absent       | any                 | yes          | inject  requested
        absent       | enabled             | no           | inject  namespace-enabled
        absent       | unknown (None)      | no           | skip    namespace-unknown
        absent       | absent or other     | no           | skip    namespace-not-enabled

    Before them, a pod that has been injected already is skipped (injecting twice is injecting once). After them, a
    pod that would be injected is skipped if the mesh cannot carry it: host network, an SCTP port, a port number
    declared twice for one protocol, a port or a name the sidecar needs.
    """
    if already_injected(metadata, spec):
        return Decision(False, InjectReason.ALREADY_INJECTED)
    label = _mapping(metadata.get("labels")).get(AUTO_INJECT_LABEL)
    if label == "enabled":
        wanted = InjectReason.POD_ENABLED
    elif label == "disabled":
        return Decision(False, InjectReason.POD_DISABLED)
    elif label is not None:
        return Decision(False, InjectReason.POD_LABEL_INVALID, f"got {describe(label)}")
    elif manual:
        wanted = InjectReason.REQUESTED
    elif namespace_labels is None:
        return Decision(False, InjectReason.NAMESPACE_UNKNOWN)
    elif namespace_labels.get(AUTO_INJECT_LABEL) == "enabled":
        wanted = InjectReason.NAMESPACE_ENABLED
    else:
        return Decision(False, InjectReason.NAMESPACE_NOT_ENABLED)
    blocked = _blocker(spec, ports)
    return blocked if blocked is not None else Decision(True, wanted)


def _blocker(spec: Mapping[str, Any], ports: SidecarPorts) -> Decision | None:
    if spec.get("hostNetwork") is True:
        return Decision(False, InjectReason.HOST_NETWORK)
    ours = {ports.inbound, ports.outbound, ports.admin, ports.metrics}
    seen: dict[tuple[int, str], str] = {}
    for container in _containers(spec):
        cname = str(container.get("name", ""))
        for port in _list(container.get("ports")):
            if not isinstance(port, Mapping):
                continue
            number, protocol = port.get("containerPort"), str(port.get("protocol") or "TCP")
            if protocol == "SCTP":
                return Decision(False, InjectReason.SCTP_PORT, f"{number}/SCTP in container {cname}")
            if port.get("name") in (ADMIN_PORT_NAME, METRICS_PORT_NAME):
                return Decision(False, InjectReason.NAME_CONFLICT, f"port name {port.get('name')} in container "
                                                                   f"{cname}")
            if not isinstance(number, int):
                continue
            if number in ours and protocol == "TCP":
                return Decision(False, InjectReason.PORT_CONFLICT, f"{number}/TCP in container {cname}")
            if (number, protocol) in seen:
                return Decision(False, InjectReason.DUPLICATE_PORT,
                                f"{number}/{protocol} in containers {seen[number, protocol]} and {cname}")
            seen[number, protocol] = cname
    for volume in _list(spec.get("volumes")):
        if isinstance(volume, Mapping) and volume.get("name") in (SPIFFE_VOLUME, RUN_VOLUME):
            return Decision(False, InjectReason.NAME_CONFLICT, f"volume {volume['name']}")
    return None


# -------------------------------------------------------------------------------------------------- patch ---
def parse_ports(text: str, where: str = "ports") -> tuple[int, ...]:
    """`"8080, 9090"` -> (8080, 9090); "" -> (). InjectError naming `where` for anything else."""
    out = set()
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise InjectError(where, f"must be port numbers (1-65535) separated by commas, got {describe(text)}")
        out.add(int(item))
    return tuple(sorted(out))


def mtls_mode(metadata: Mapping[str, Any], values: InjectionValues) -> MtlsMode:
    """The pod's annotation, else the chart's mesh-wide mode."""
    raw = _mapping(metadata.get("annotations")).get(MTLS_MODE_ANNOTATION)
    if raw is None:
        return values.mtls_mode
    try:
        return MtlsMode(raw)
    except ValueError:
        raise InjectError(join("metadata.annotations", MTLS_MODE_ANNOTATION),
                          f"must be one of {', '.join(MtlsMode)}, got {describe(raw)}") from None


def _annotation_ports(metadata: Mapping[str, Any], key: str) -> tuple[int, ...]:
    raw = _mapping(metadata.get("annotations")).get(key)
    where = join("metadata.annotations", key)
    if raw is None:
        return ()
    if not isinstance(raw, str):
        raise InjectError(where, f"must be a string, got {describe(raw)}")
    return parse_ports(raw, where)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _ptr(base: str, *parts: str | int) -> str:
    return base + "".join(f"/{_escape(str(p))}" for p in parts)


class _Ops:
    """Builds RFC 6902 operations that create what is missing on the way (a pod may have no labels, no volumes)."""

    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []

    def add(self, path: str, value: Any) -> None:
        self.ops.append({"op": "add", "path": path, "value": value})

    def replace(self, path: str, value: Any) -> None:
        self.ops.append({"op": "replace", "path": path, "value": value})

    def set_keys(self, parent: object, path: str, items: Mapping[str, Any]) -> None:
        if not isinstance(parent, Mapping):
            self.add(path, dict(items))
            return
        for key, value in items.items():
            self.add(f"{path}/{_escape(key)}", value)

    def append(self, parent: object, path: str, items: Sequence[Any]) -> None:
        if not isinstance(parent, list):
            self.add(path, list(items))
            return
        for item in items:
            self.add(f"{path}/-", item)


def patch(pod: Mapping[str, Any], values: InjectionValues, *, ignore_incoming: Iterable[int] = (),
          ignore_outgoing: Iterable[int] = (), base: str = "") -> list[dict[str, Any]]:
    """The JSON patch that injects `pod` ({metadata, spec}: a Pod or a pod template); [] if it is injected already.

    `base` prefixes every path (`/spec/template` for a Deployment). Raises `InjectError` for an annotation that
    cannot be honoured. It does not decide: call `decide` first.
    """
    metadata = _mapping(pod.get("metadata"))
    spec = _mapping(pod.get("spec"))
    if already_injected(metadata, spec):
        return []
    mode = mtls_mode(metadata, values)
    incoming = sorted({*DEFAULT_IGNORED_PORTS, *values.ignore_incoming_ports,
                       *_annotation_ports(metadata, IGNORE_INCOMING_ANNOTATION), *ignore_incoming,
                       values.ports.admin, values.ports.metrics})
    outgoing = sorted({*DEFAULT_IGNORED_PORTS, *values.ignore_outgoing_ports,
                       *_annotation_ports(metadata, IGNORE_OUTGOING_ANNOTATION), *ignore_outgoing})
    ops = _Ops()
    probes: dict[str, dict[str, Any]] = {}
    if mode is MtlsMode.STRICT:
        probes = _rewrite_probes(ops, spec, values, base)

    labels = {INJECTED_LABEL: "true"}
    annotations = {INJECT_STATUS_ANNOTATION: "injected", INJECTED_ANNOTATION: "true"}
    if not isinstance(pod.get("metadata"), Mapping):
        ops.add(_ptr(base, "metadata"), {"labels": labels, "annotations": annotations})
    else:
        ops.set_keys(metadata.get("labels"), _ptr(base, "metadata", "labels"), labels)
        ops.set_keys(metadata.get("annotations"), _ptr(base, "metadata", "annotations"), annotations)
    ops.append(spec.get("initContainers"), _ptr(base, "spec", "initContainers"),
               [init_container(values, incoming, outgoing)])
    ops.append(spec.get("containers"), _ptr(base, "spec", "containers"), [sidecar_container(values, probes)])
    ops.append(spec.get("volumes"), _ptr(base, "spec", "volumes"), volumes(values))
    grace = spec.get("terminationGracePeriodSeconds")
    wanted = values.drain_seconds + GRACE_MARGIN_SECONDS
    current = grace if isinstance(grace, int) and not isinstance(grace, bool) else DEFAULT_GRACE_SECONDS
    if current < wanted:
        where = _ptr(base, "spec", "terminationGracePeriodSeconds")
        (ops.replace if "terminationGracePeriodSeconds" in spec else ops.add)(where, wanted)
    return ops.ops


def _rewrite_probes(ops: _Ops, spec: Mapping[str, Any], values: InjectionValues,
                    base: str) -> dict[str, dict[str, Any]]:
    originals: dict[str, dict[str, Any]] = {}
    for i, container in enumerate(_list(spec.get("containers"))):
        if not isinstance(container, Mapping):
            continue
        cname = str(container.get("name", i))
        for key, short in _PROBES:
            probe = container.get(key)
            http = _mapping(probe).get("httpGet") if isinstance(probe, Mapping) else None
            if not isinstance(http, Mapping) or http.get("host"):
                continue
            path = f"{APP_HEALTH_PREFIX}{cname}/{short}"
            original: dict[str, Any] = {"port": _probe_port(container, http.get("port")),
                                        "path": http.get("path") or "/", "scheme": http.get("scheme") or "HTTP"}
            if http.get("httpHeaders"):
                original["httpHeaders"] = copy.deepcopy(http["httpHeaders"])
            originals[path] = original
            ops.replace(_ptr(base, "spec", "containers", i, key, "httpGet"),
                        {"path": path, "port": values.ports.admin, "scheme": "HTTP"})
    return originals


def _probe_port(container: Mapping[str, Any], port: object) -> object:
    """A named probe port, resolved to its number: the sidecar cannot read the container's port names."""
    if isinstance(port, str) and not port.isdigit():
        for p in _list(container.get("ports")):
            if isinstance(p, Mapping) and p.get("name") == port and isinstance(p.get("containerPort"), int):
                return p["containerPort"]
    elif isinstance(port, str):
        return int(port)
    return port


def _ports_arg(ports: Iterable[int]) -> str:
    return ",".join(str(p) for p in ports)


def init_container(values: InjectionValues, incoming: Iterable[int], outgoing: Iterable[int]) -> dict[str, Any]:
    p = values.ports
    out: dict[str, Any] = {
        "name": INIT_NAME,
        "image": values.init_image.ref,
        "imagePullPolicy": values.init_image.pull_policy.value,
        "command": ["meshctl"],
        "args": ["init", "--inbound-port", str(p.inbound), "--outbound-port", str(p.outbound),
                 "--proxy-uid", str(values.sidecar_uid), "--ignore-incoming-ports", _ports_arg(incoming),
                 "--ignore-outgoing-ports", _ports_arg(outgoing)],
        # iptables needs root with NET_ADMIN and NET_RAW; runAsNonRoot false in case the pod asks it of everyone.
        "securityContext": {"runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "privileged": False,
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}},
    }
    if values.init_resources:
        out["resources"] = _resources_manifest(values.init_resources)
    return out


def sidecar_container(values: InjectionValues, probes: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    p = values.ports
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
        {"name": "SPIFFE_ENDPOINT_SOCKET", "value": f"unix://{SPIFFE_MOUNT}/{SOCKET_NAME}"},
        {"name": "MESHLOOM_NATS_URL", "value": NATS_URL},
    ]
    if probes:
        env.append({"name": PROBES_ENV, "value": json.dumps(probes, sort_keys=True, separators=(",", ":"))})
    out: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": values.sidecar_image.ref,
        "imagePullPolicy": values.sidecar_image.pull_policy.value,
        "command": ["meshctl"],
        "args": ["sidecar", "--inbound-port", str(p.inbound), "--outbound-port", str(p.outbound),
                 "--admin-port", str(p.admin), "--metrics-port", str(p.metrics),
                 "--drain-seconds", str(values.drain_seconds), "--nats-server-name", NATS_SERVER_NAME,
                 "--run-dir", RUN_MOUNT],
        "env": env,
        "ports": [{"name": ADMIN_PORT_NAME, "containerPort": p.admin, "protocol": "TCP"},
                  {"name": METRICS_PORT_NAME, "containerPort": p.metrics, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": p.admin, "scheme": "HTTP"},
                           "periodSeconds": 2, "failureThreshold": 3, "timeoutSeconds": 1},
        "livenessProbe": {"httpGet": {"path": "/live", "port": p.admin, "scheme": "HTTP"},
                          "periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 1},
        "volumeMounts": [{"name": SPIFFE_VOLUME, "mountPath": SPIFFE_MOUNT, "readOnly": True,
                          "subPathExpr": SOCKET_SUBPATH},
                         {"name": RUN_VOLUME, "mountPath": RUN_MOUNT}],
        "securityContext": {"runAsUser": values.sidecar_uid, "runAsGroup": values.sidecar_uid, "runAsNonRoot": True,
                            "allowPrivilegeEscalation": False, "privileged": False,
                            "capabilities": {"drop": ["ALL"]}},
    }
    if values.sidecar_resources:
        out["resources"] = _resources_manifest(values.sidecar_resources)
    return out


def volumes(values: InjectionValues) -> list[dict[str, Any]]:
    return [{"name": SPIFFE_VOLUME, "hostPath": {"path": values.socket_dir, "type": "DirectoryOrCreate"}},
            {"name": RUN_VOLUME, "emptyDir": {"medium": "Memory"}}]


# ------------------------------------------------------------------------------------------- apply a patch ---
class PatchError(ValueError):
    """An operation that does not fit the document (a bug of the caller's: our own patches always fit)."""


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_patch(doc: Any, ops: Iterable[Mapping[str, Any]]) -> Any:
    """RFC 6902 `add`, `replace` and `remove`, on a deep copy of `doc`."""
    out = copy.deepcopy(doc)
    for op in ops:
        tokens = [_unescape(t) for t in str(op["path"]).split("/")[1:]]
        if not tokens:
            if op["op"] in ("add", "replace"):
                out = copy.deepcopy(op["value"])
                continue
            raise PatchError("cannot remove the whole document")
        parent = out
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        kind = op["op"]
        if isinstance(parent, list):
            if kind == "add":
                index = len(parent) if last == "-" else int(last)
                if not 0 <= index <= len(parent):
                    raise PatchError(f"{op['path']}: index out of range")
                parent.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[int(last)] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[int(last)]
            else:
                raise PatchError(f"unsupported operation {kind!r}")
        elif isinstance(parent, dict):
            if kind in ("replace", "remove") and last not in parent:
                raise PatchError(f"{op['path']}: no such member")
            if kind in ("add", "replace"):
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[last]
            else:
                raise PatchError(f"unsupported operation {kind!r}")
        else:
            raise PatchError(f"{op['path']}: the parent is neither an object nor an array")
    return out


def inject(pod: Mapping[str, Any], values: InjectionValues, *, ignore_incoming: Iterable[int] = (),
           ignore_outgoing: Iterable[int] = ()) -> dict[str, Any]:
    """`pod` with `patch(pod)` applied: what the webhook's patch makes of it. No decision is taken here."""
    result: dict[str, Any] = apply_patch(dict(pod), patch(pod, values, ignore_incoming=ignore_incoming,
                                                           ignore_outgoing=ignore_outgoing))
    return result


# ---------------------------------------------------------------------------------------- workload documents ---
def template_path(doc: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Where a workload keeps its pod template ((): the document is a Pod); None for any other kind."""
    kind = doc.get("kind")
    return _WORKLOAD_TEMPLATES.get(kind) if isinstance(kind, str) else None


def document_name(doc: Mapping[str, Any]) -> str:
    """`Deployment/web`, as `meshctl inject` names a document on stderr."""
    meta = _mapping(doc.get("metadata"))
    name = meta.get("name") or meta.get("generateName") or "<no name>"
    return f"{doc.get('kind') or '<no kind>'}/{name}"


@dataclass(frozen=True, slots=True)
class Outcome:
    name: str  # `Deployment/web`
    decision: Decision


@dataclass(frozen=True, slots=True)
class Injected:
    document: Any  # the document, injected or as it came
    outcomes: tuple[Outcome, ...] = field(default=())  # one per workload (a List has one per item)


def inject_document(doc: Any, values: InjectionValues, *, ignore_incoming: Iterable[int] = (),
                    ignore_outgoing: Iterable[int] = (), namespace_labels: Mapping[str, str] | None = None,
                    manual: bool = True) -> Injected:
    """One manifest as `meshctl inject` reads it: a workload (injected unless its pod is labelled out or cannot be
    meshed), a List (each item so), or anything else (passed through, `not-a-workload`).

    Raises `ValidationError` naming the document and the field when a workload asks for what cannot be done.
    """
    incoming, outgoing = tuple(ignore_incoming), tuple(ignore_outgoing)
    if isinstance(doc, Mapping) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        items: list[Any] = []
        outcomes: list[Outcome] = []
        for item in doc["items"]:
            result = inject_document(item, values, ignore_incoming=incoming, ignore_outgoing=outgoing,
                                     namespace_labels=namespace_labels, manual=manual)
            items.append(result.document)
            outcomes.extend(result.outcomes)
        return Injected({**doc, "items": items}, tuple(outcomes))
    path = template_path(doc) if isinstance(doc, Mapping) else None
    if path is None:
        name = document_name(doc) if isinstance(doc, Mapping) else "<not a manifest>"
        return Injected(doc, (Outcome(name, Decision(False, InjectReason.NOT_A_WORKLOAD)),))
    name = document_name(doc)
    template: Any = doc
    for step in path:
        template = _mapping(template).get(step)
    template = _mapping(template)
    decision = decide(_mapping(template.get("metadata")), _mapping(template.get("spec")), namespace_labels,
                      manual=manual, ports=values.ports)
    if not decision.inject:
        return Injected(doc, (Outcome(name, decision),))
    base = _ptr("", *path)
    try:
        ops = patch(template, values, ignore_incoming=incoming, ignore_outgoing=outgoing, base=base)
    except InjectError as exc:
        where = ".".join(path)
        meta = _mapping(doc.get("metadata"))
        ns = meta.get("namespace") or "default"
        label = f"{doc.get('kind')} {ns}/{meta.get('name') or meta.get('generateName') or '<no name>'}"
        raise ValidationError([Problem(label, f"{where}.{exc.field}" if where else exc.field, exc.message)]) \
            from None
    return Injected(apply_patch(dict(doc), ops), (Outcome(name, decision),))


# ----------------------------------------------------------------------------------------------- admission ---
ADMISSION_VERSION = "admission.k8s.io/v1"
DECISION_AUDIT_KEY = "decision"  # the API server prefixes it with the webhook's name in its audit log

NamespaceLabels = Callable[[str], Mapping[str, str] | None] | Mapping[str, Mapping[str, str]]


class BadReview(ValueError):
    """An AdmissionReview that cannot be answered at all (no uid to answer to): one line naming the field."""


@dataclass(frozen=True, slots=True)
class Admission:
    """What the webhook answers, and why: `review` is the AdmissionReview to send back."""

    review: dict[str, Any]
    decision: Decision | None  # None: the request was malformed, or the pod cannot be injected as written
    error: str = ""


def _answer(uid: str, response: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": ADMISSION_VERSION, "kind": "AdmissionReview", "response": {"uid": uid, **response}}


def _denied(uid: str, message: str) -> Admission:
    return Admission(_answer(uid, {"allowed": False, "status": {"code": 400, "message": message}}), None, message)


def admit(review: object, values: InjectionValues, namespace_labels: NamespaceLabels) -> Admission:
    """The answer to one AdmissionReview (v1) for a pod: a JSON patch that injects it, or allowed with no patch.

    A review without a `request.uid` cannot be answered: `BadReview`. Any other malformed request, and a pod that
    asks for what cannot be done (a bad mesh annotation), is refused (allowed false, status 400) with a message
    naming the field. Skips say why in the audit annotation `decision`, and, when the pod asked for injection but
    cannot be meshed, in a warning the user sees.
    """
    if not isinstance(review, Mapping):
        raise BadReview(f"the body must be a JSON object (an AdmissionReview), got {describe(review)}")
    if review.get("apiVersion") != ADMISSION_VERSION or review.get("kind") != "AdmissionReview":
        raise BadReview(f"apiVersion/kind: must be {ADMISSION_VERSION} AdmissionReview, got "
                        f"{describe(review.get('apiVersion'))} {describe(review.get('kind'))}")
    request = review.get("request")
    if not isinstance(request, Mapping):
        raise BadReview(f"request: must be an object, got {describe(request)}")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview(f"request.uid: must be a non-empty string, got {describe(uid)}")

    kind = _mapping(request.get("kind"))
    if (kind.get("group"), kind.get("kind")) != ("", "Pod") or request.get("subResource"):
        what = str(kind.get("kind") or "no kind")
        if request.get("subResource"):
            what += f"/{request['subResource']}"
        return _allowed(uid, Decision(False, InjectReason.NOT_A_WORKLOAD, what), ())
    if request.get("operation") != "CREATE":
        return _allowed(uid, Decision(False, InjectReason.NOT_A_CREATE, str(request.get("operation"))), ())
    pod = request.get("object")
    if not isinstance(pod, Mapping):
        return _denied(uid, f"request.object: must be the pod, got {describe(pod)}")
    spec = pod.get("spec")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("containers"), list):
        return _denied(uid, "request.object.spec.containers: must be a list")
    metadata = _mapping(pod.get("metadata"))
    namespace = request.get("namespace") or metadata.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        return _denied(uid, "request.namespace: must be the pod's namespace")
    lookup = namespace_labels.get if isinstance(namespace_labels, Mapping) else namespace_labels
    labels = lookup(namespace)
    decision = decide(metadata, spec, labels, ports=values.ports)
    if not decision.inject:
        return _allowed(uid, decision, ())
    try:
        ops = patch(pod, values)
    except InjectError as exc:
        return _denied(uid, f"pod not injected: {exc.field}: {exc.message}")
    return _allowed(uid, decision, ops)


def _allowed(uid: str, decision: Decision, ops: Sequence[Mapping[str, Any]]) -> Admission:
    verdict = "inject" if decision.inject else "skip"
    response: dict[str, Any] = {"allowed": True,
                                "auditAnnotations": {DECISION_AUDIT_KEY: f"{verdict}: {decision.reason.value}"}}
    if ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(list(ops), separators=(",", ":")).encode()).decode()
    if decision.reason in BLOCKED:
        response["warnings"] = [f"meshloom: pod not injected: {decision.text}"]
    return Admission(_answer(uid, response), decision)


def admission_response(review: object, values: InjectionValues, namespace_labels: NamespaceLabels) -> dict[str, Any]:
    """`admit(...).review`: the AdmissionReview to send back (raises `BadReview` when there is no uid to answer)."""
    return admit(review, values, namespace_labels).review
