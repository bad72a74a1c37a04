"""The single-host mesh's files in the state directory: its network, its desired pods, the platform's status.

    <state>/local/network.json   the bridge's prefix and subnet, and the port NATS listens on for the sidecars (kept
                                 so that a restarted control plane listens where they dial)
    <state>/local/mesh.json      the desired pods (command, environment, address, ...) and Services' addresses, as
                                 `meshctl up -f` wrote them from the manifest; the local platform reads it whenever
                                 it changes (a kubelet's static pod manifests)
    <state>/local/status.json    what the local platform saw at its last pass, per pod: machine state, processes,
                                 the problem in words (`meshctl up` explains a stuck pod with it)

Each file is replaced atomically (written aside, then renamed), so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCAL_DIR = "local"
NETWORK_FILE = "network.json"
DESIRED_FILE = "mesh.json"
STATUS_FILE = "status.json"
DEFAULT_SUBNET = "10.213.0.0/16"
DEFAULT_PREFIX = "mesh-"
RUNTIME_ROOT = Path("/run/meshloom")


@dataclass(frozen=True, slots=True)
class LocalNetwork:
    """The bridge's prefix and subnet, and the NATS port (0 until the first control plane chose one)."""

    prefix: str = DEFAULT_PREFIX
    subnet: str = DEFAULT_SUBNET
    nats_port: int = 0

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return next(self.network.hosts())

    def ranges(self) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Network]:
        """Pods in the lower half of the subnet (after the gateway), Services' virtual addresses in the upper."""
        low, high = self.network.subnets(prefixlen_diff=1)
        return low, high

    @property
    def runtime_dir(self) -> Path:
        return RUNTIME_ROOT / self.prefix.rstrip("-")


def local_dir(state_dir: Path) -> Path:
    return state_dir / LOCAL_DIR


def load_network(state_dir: Path) -> LocalNetwork | None:
    """The mesh's network, if `meshctl up -f` ever ran on this state directory."""
    try:
        raw = json.loads((local_dir(state_dir) / NETWORK_FILE).read_text())
    except FileNotFoundError:
        return None
    return LocalNetwork(str(raw["prefix"]), str(raw["subnet"]), int(raw.get("nats_port", 0)))


def save_network(state_dir: Path, net: LocalNetwork) -> None:
    _write_json(local_dir(state_dir) / NETWORK_FILE,
                {"prefix": net.prefix, "subnet": net.subnet, "nats_port": net.nats_port})


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    temporary.replace(path)


# ---- the desired pods ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DesiredPod:
    key: str
    service_account: str
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    annotations: tuple[tuple[str, str], ...]
    labels: tuple[tuple[str, str], ...]
    meshed: bool
    ip: str
    ports: tuple[int, ...] = ()  # the workload's container ports: it is ready once it listens on each

    @property
    def namespace(self) -> str:
        return self.key.partition("/")[0]

    @property
    def name(self) -> str:
        return self.key.partition("/")[2]

    @property
    def uid(self) -> str:
        """Names this incarnation of the pod, as Kubernetes' metadata.uid does: a pod whose manifest entry changes
        is a new pod (the old one is terminated, the new one admitted), as a Deployment's change makes new pods."""
        spec = [self.key, self.service_account, self.command, self.env, self.annotations, self.labels, self.meshed,
                self.ip, self.ports]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Desired:
    mesh: str = ""
    pods: tuple[DesiredPod, ...] = ()
    services: tuple[tuple[str, str], ...] = ()  # ("namespace/name", virtual address)
    resources: tuple[tuple[str, str, str], ...] = ()  # what `up` stored in the world: (kind, namespace, name)

    def hosts(self, namespace: str) -> dict[str, str]:
        """The names of every Service for a pod in `namespace`: `<svc>.<ns>.svc.cluster.local`, `<svc>.<ns>.svc`,
        `<svc>.<ns>`, and `<svc>` alone for its own namespace, as Kubernetes' DNS search path resolves them."""
        out: dict[str, str] = {}
        for key, address in self.services:
            ns, _, name = key.partition("/")
            for host in (f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc", f"{name}.{ns}"):
                out[host] = address
            if ns == namespace:
                out[name] = address
        return out


def save_desired(state_dir: Path, desired: Desired) -> None:
    _write_json(local_dir(state_dir) / DESIRED_FILE, {
        "mesh": desired.mesh,
        "pods": [{"key": p.key, "serviceAccount": p.service_account, "command": list(p.command), "env": dict(p.env),
                  "annotations": dict(p.annotations), "labels": dict(p.labels), "meshed": p.meshed, "ip": p.ip,
                  "ports": list(p.ports)}
                 for p in desired.pods],
        "services": dict(desired.services),
        "resources": [list(r) for r in desired.resources],
    })


def load_desired(state_dir: Path) -> Desired:
    try:
        raw = json.loads((local_dir(state_dir) / DESIRED_FILE).read_text())
    except FileNotFoundError:
        return Desired()
    pods = tuple(DesiredPod(p["key"], p["serviceAccount"], tuple(p["command"]), tuple(sorted(p["env"].items())),
                            tuple(sorted(p["annotations"].items())), tuple(sorted(p["labels"].items())),
                            bool(p["meshed"]), p["ip"], tuple(p.get("ports", ()))) for p in raw.get("pods", ()))
    return Desired(raw.get("mesh", ""), pods, tuple(sorted(raw.get("services", {}).items())),
                   tuple((str(k), str(n), str(m)) for k, n, m in raw.get("resources", ())))


def load_status(state_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((local_dir(state_dir) / STATUS_FILE).read_text()))
    except (FileNotFoundError, ValueError):
        return {}


def status_time(state_dir: Path) -> float:
    """When the local platform last wrote its status (seconds since the epoch; 0 if never)."""
    try:
        return os.stat(local_dir(state_dir) / STATUS_FILE).st_mtime
    except FileNotFoundError:
        return 0.0




def save_status(state_dir: Path, status: dict[str, Any]) -> None:
    _write_json(local_dir(state_dir) / STATUS_FILE, status)


def desired_stamp(state_dir: Path) -> tuple[int, int, int] | None:
    """Changes whenever mesh.json is replaced (a new inode, as it is renamed into place; its time and size);
    None when there is none."""
    try:
        info = os.stat(local_dir(state_dir) / DESIRED_FILE)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size
