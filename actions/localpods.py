"""The single-host platform's hands: pods as network namespaces, the processes in them, and the sweep of `down`.

Theory of operation
-------------------
What a kubelet and a CNI plugin do on a Kubernetes node, `LocalPods` does on one Linux host, for the engine's local
platform (engine/local.py), which decides when:

    create(pod, ip)      the pod's network namespace on the mesh's bridge at `ip` (HostNetwork), a resolv.conf
                         whose lookups fail at once (names come from the hosts file; no query leaves the host), the
                         hosts file, and for a meshed pod the init rules (actions.iptables.install). Idempotent: an
                         existing namespace at the same address is kept (a restarted control plane adopts it).
    start(pod, role)     the workload (as uid 65534, without capabilities, in `/`) or its sidecar (`meshctl
                         sidecar` as uid 2102), each in a session of its own with its output appended to
                         `logs/<namespace>_<name>.<role>.log`, so a control plane that dies (even by SIGKILL)
                         takes none of them with it: the data plane keeps running on its last configuration.
    running(key, role)   whether that process still runs. A pid file `<pod dir>/<role>.pid` holds the pid and the
                         process's start time (field 22 of /proc/<pid>/stat): a pid the kernel gave to another
                         process since is not mistaken for ours, and a new control plane finds the processes an
                         earlier one started.
    probe(ip, path)      the sidecar's admin port (15021, never redirected), as a kubelet's probe: the status code,
                         or 0 when nothing answers.
    remove(key)          stop the pod's processes (SIGTERM, then SIGKILL), delete its namespace, veth pair and
                         /etc/netns files, and its directory.
    sweep()              everything of this mesh on the host: every recorded process, every namespace, veth and the
                         bridge under the prefix (also what a crashed run left), the runtime directory.

The runtime directory (`/run/meshloom/<prefix>` by default) holds what the pods' unprivileged users must reach:
the sidecars' run directories (owned by uid 2102) and the node agent's Workload API sockets. It is not the state
directory, which is private to root (a default under /root cannot be traversed by uid 2102).

`PodRuntime` is what the local platform uses of all this; `FakeLocalPods` plays it in memory for the platform's unit
tests (namespaces, processes with fake pids that die on `kill`, probe answers from a table).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from actions.errors import MissingPrivilege, MissingTool, PermanentError
from actions.iptables import InitSettings, install, install_services
from actions.netns import NETNS_ETC_DIR, HostNetwork, PodNet, check_host, spawn
from actions.netns import run as run_in_netns
from catalog.world import ServiceRoute

APP_UID = 65534  # nobody: the workload is an unprivileged user, as in a pod
SIDECAR_UID = 2102
ADMIN_PORT = 15021
ROLES = ("app", "sidecar")
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL when a pod's processes are stopped
_PROBE_TIMEOUT = 1.0
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True, slots=True)
class PodProcess:
    """What starts in a pod: the workload, or the sidecar beside it."""

    argv: tuple[str, ...]
    uid: int
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Exited:
    """A process of ours that ended: its exit code when it was our child (None when an earlier control plane
    started it), and the last line of its log."""

    code: int | None
    last_line: str


def pod_dir_name(key: str) -> str:
    """`namespace/name` -> `namespace_name`: a namespace and a pod name never contain "_"."""
    return key.replace("/", "_", 1)


class LocalPods:
    """See the module's docstring. One object per mesh (prefix) at a time."""

    def __init__(self, network: HostNetwork, runtime_dir: Path, logs_dir: Path, *,
                 bin_dir: Path | None = None) -> None:
        self.network = network
        self.runtime_dir = runtime_dir
        self.logs_dir = logs_dir
        self.bin_dir = bin_dir  # where meshctl and the venv's python live: first on the workloads' PATH
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._children_lock = threading.Lock()  # effects (teardowns) and the reconcile pass run on several threads

    # ---- the host ------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """The bridge (adopting the pods already there) and the directories; MissingPrivilege / MissingTool when
        this host or user cannot run pods."""
        check_host()
        for tool in ("iptables-restore", "setpriv"):
            if shutil.which(tool) is None:
                raise MissingTool(f"the '{tool}' command is not installed (scripts/setup installs it)")
        self.network.ensure()
        self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        os.chmod(self.runtime_dir, 0o711)
        blocked = unreachable_ancestor(self.runtime_dir)
        if blocked is not None:
            raise PermanentError(f"runtime directory {self.runtime_dir}: {blocked} cannot be traversed by the pods' "
                                 f"users (uid {SIDECAR_UID}, {APP_UID}); choose a runtime directory under /run")
        (self.runtime_dir / "pods").mkdir(exist_ok=True, mode=0o711)
        self.logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def pod_dir(self, key: str) -> Path:
        return self.runtime_dir / "pods" / pod_dir_name(key)

    # ---- a pod's network ---------------------------------------------------------------------------------------
    def netns_name(self, key: str) -> str:
        return self.network.netns_name(pod_dir_name(key))

    def net(self, key: str) -> PodNet | None:
        """The pod's network, if its namespace exists."""
        with contextlib.suppress(PermanentError):
            return self.network.pod(pod_dir_name(key))
        return None

    def create(self, key: str, ip: str, hosts: Mapping[str, str], *, init: InitSettings | None,
               uid: str = "") -> PodNet:
        """The pod's namespace at `ip`, its resolv.conf and hosts file, (when `init` is given) its redirect rules,
        and its directory, which records `uid` (the incarnation it was made for) last: a pod whose uid file is
        missing or different was not finished, or is another pod. Idempotent; a namespace found at another address
        is made again."""
        name = pod_dir_name(key)
        net = self.net(key)
        if net is not None and str(net.ip) != ip:
            self.network.remove_pod(name)
            net = None
        if net is None:
            net = self.network.add_pod(name, ip)
        directory = NETNS_ETC_DIR / net.netns
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        resolv = directory / "resolv.conf"
        # A resolver inside the pod that is not there: lookups of names outside the hosts file fail at once
        # instead of waiting out timeouts against a host resolver that no pod can reach.
        resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        resolv.chmod(0o644)
        self.network.hosts_file(net, hosts)
        if init is not None:
            install(init, netns=net.netns)
        pod_dir = self.pod_dir(key)
        pod_dir.mkdir(exist_ok=True, mode=0o711)
        run_dir = pod_dir / "sidecar"
        run_dir.mkdir(exist_ok=True, mode=0o750)
        os.chown(run_dir, SIDECAR_UID, SIDECAR_UID)
        (pod_dir / "uid").write_text(uid + "\n")
        return net

    def uid_of(self, key: str) -> str | None:
        """The uid `create` last finished the pod for; None when it never finished."""
        try:
            return (self.pod_dir(key) / "uid").read_text().strip()
        except OSError:
            return None

    def write_hosts(self, key: str, hosts: Mapping[str, str]) -> None:
        net = self.net(key)
        if net is not None:
            self.network.hosts_file(net, hosts)

    def route_services(self, key: str, routes: Sequence[ServiceRoute]) -> None:
        """For a pod without a sidecar: its connections to Service addresses go to their endpoints, as kube-proxy
        sends them (a meshed pod's sidecar does this itself)."""
        net = self.net(key)
        if net is None:
            raise PermanentError(f"pod {key}: its network namespace does not exist")
        install_services(routes, netns=net.netns)

    # ---- a pod's processes ---------------------------------------------------------------------------------------
    def start(self, key: str, role: str, process: PodProcess) -> int:
        """Start the pod's workload or sidecar (see the module's docstring); returns its pid."""
        net = self.net(key)
        if net is None:
            raise PermanentError(f"pod {key}: its network namespace does not exist")
        env = {**self._env(), **dict(process.env)}
        self.logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.log_path(key, role), "ab") as log:
            try:
                proc = spawn(net, list(process.argv), uid=process.uid, env=env, cwd="/", stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                raise PermanentError(f"pod {key}: cannot start its {role}: {exc}") from None
        with self._children_lock:
            self._children[proc.pid] = proc
        _write_pid(self.pod_dir(key) / f"{role}.pid", proc.pid)
        return proc.pid

    def started_before(self, key: str, role: str) -> bool:
        """Whether the pod's `role` process was started since the pod was created (its pid file is there)."""
        return (self.pod_dir(key) / f"{role}.pid").exists()

    def running(self, key: str, role: str) -> int | None:
        """The pid of the pod's `role` process if it runs (ours, by its start time), else None."""
        pid, started = _read_pid(self.pod_dir(key) / f"{role}.pid")
        if pid is None:
            return None
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            return None  # reaped: a child of ours that ended (its zombie is gone now)
        return pid if _start_time(pid) == started else None

    def exited(self, key: str, role: str) -> Exited:
        """How the pod's `role` process ended (call when `running` says None)."""
        pid, _ = _read_pid(self.pod_dir(key) / f"{role}.pid")
        child = self._children.get(pid) if pid is not None else None
        code = child.poll() if child is not None else None
        return Exited(code, last_line(self.log_path(key, role)))

    def log_path(self, key: str, role: str) -> Path:
        return self.logs_dir / f"{pod_dir_name(key)}.{role}.log"

    def stop(self, key: str, role: str, grace: float = STOP_GRACE) -> None:
        pid = self.running(key, role)
        if pid is not None:
            _terminate([pid], grace)
        self._reap()

    def remove(self, key: str, grace: float = STOP_GRACE) -> None:
        """The pod's processes stopped, its namespace, veths, /etc/netns files and directory removed. Idempotent."""
        pids = [pid for role in ROLES if (pid := self.running(key, role)) is not None]
        _terminate(pids, grace)
        self.network.remove_pod(pod_dir_name(key))  # kills whatever else still runs inside
        shutil.rmtree(self.pod_dir(key), ignore_errors=True)
        self._reap()

    def listening(self, key: str, ports: Sequence[int]) -> bool:
        """Whether the pod's workload runs and something listens on each of `ports` in the pod (a kubelet's TCP
        readiness probe, read from /proc/<pid>/net/tcp* of the pod's network namespace instead of connecting)."""
        pid = self.running(key, "app")
        if pid is None:
            return False
        found: set[int] = set()
        for table in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                    found.add(int(fields[1].rsplit(":", 1)[1], 16))
        return set(ports) <= found

    def probe(self, ip: str, path: str) -> int:
        """GET the sidecar's admin `path` at `ip`: the status code, or 0 when nothing answers in time."""
        conn = http.client.HTTPConnection(ip, ADMIN_PORT, timeout=_PROBE_TIMEOUT)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            return 0
        finally:
            conn.close()

    def run(self, key: str, argv: Sequence[str], *, uid: int = APP_UID,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """A short command in the pod as its workload's user (so its traffic goes through the sidecar)."""
        net = self.net(key)
        if net is None:
            raise PermanentError(f"pod {key}: its network namespace does not exist")
        return run_in_netns(net, argv, uid=uid, timeout=timeout, check=False, cwd="/", env=self._env())

    def _env(self) -> dict[str, str]:
        """What every process in a pod starts with: the venv's bin first on PATH (meshctl, its python)."""
        path = f"{self.bin_dir}:{_SYSTEM_PATH}" if self.bin_dir else _SYSTEM_PATH
        return {"PATH": path, "HOME": "/", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}

    def sweep(self, grace: float = STOP_GRACE) -> None:
        """Everything of this mesh on the host (see the module's docstring). Idempotent."""
        pods = self.runtime_dir / "pods"
        pids: list[int] = []
        if pods.is_dir():
            for directory in pods.iterdir():
                for role in ROLES:
                    pid, started = _read_pid(directory / f"{role}.pid")
                    if pid is not None and _start_time(pid) == started:
                        pids.append(pid)
        _terminate(pids, grace)
        self.network.destroy()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the parent (/run/meshloom) is ours too once no other mesh uses it
            self.runtime_dir.parent.rmdir()
        self._reap()

    def _reap(self) -> None:
        with self._children_lock:
            for pid, child in list(self._children.items()):
                if child.poll() is not None:
                    self._children.pop(pid, None)


# ---- processes by pid -------------------------------------------------------------------------------------------
def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot); None if the process is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def process_args(pid: int) -> list[str] | None:
    """The command line a running process was started with; None when it is gone or not ours to read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]] or None


def _write_pid(path: Path, pid: int) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(f"{pid} {_start_time(pid) or 0}\n")
    temporary.replace(path)


def _read_pid(path: Path) -> tuple[int | None, int | None]:
    try:
        pid, started = path.read_text().split()
        return int(pid), int(started)
    except (OSError, ValueError):
        return None, None


def process_alive(pid: int) -> bool:
    return _start_time(pid) is not None


def _terminate(pids: Sequence[int], grace: float) -> None:
    """SIGTERM each process, then after `grace` SIGKILL its session's group: what it started (the sidecar's HAProxy)
    goes with it. Only the process itself is asked to stop, so that a sidecar drains and stops its own HAProxy
    instead of seeing it die under it."""
    started = {pid: _start_time(pid) for pid in pids}
    live = [pid for pid, t in started.items() if t is not None]
    leaders = [pid for pid in live if _leads_session(pid)]
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        time.sleep(0.05)
        live = [pid for pid in live if _start_time(pid) == started[pid]]
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in leaders:  # whatever of its session outlived it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _leads_session(pid: int) -> bool:
    try:
        return os.getsid(pid) == pid
    except (ProcessLookupError, PermissionError):
        return False


def stop_process(pid: int, grace: float = 10.0) -> bool:
    """SIGTERM a process, SIGKILL it after `grace`; True if it ran."""
    if not process_alive(pid):
        return False
    _terminate([pid], grace)
    return True


def spawn_detached(argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> int:
    """Start a process in a session of its own, its output appended to `log`, not waited for: the control plane
    that `meshctl up -f` leaves running. Returns its pid."""
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=dict(env) if env is not None else None)
        except OSError as exc:
            raise PermanentError(f"cannot start {argv[0]}: {exc}") from None
    return proc.pid


def unreachable_ancestor(path: Path) -> Path | None:
    """The first directory above `path` that other users cannot traverse (the pods' users need to reach it)."""
    return next((d for d in path.parents if d != Path("/") and not os.stat(d).st_mode & 0o001), None)


def last_line(path: Path) -> str:
    """The last non-empty line of a log file (its last 4 KiB read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# ---- what the local platform needs of a pod runtime, and a fake of it --------------------------------------------
class PodNetworks(Protocol):
    def pods(self) -> list[PodNet]: ...


class PodRuntime(Protocol):
    """What engine/local.py's LocalPlatform uses of LocalPods (FakeLocalPods plays it in unit tests)."""

    @property
    def network(self) -> PodNetworks: ...

    def pod_dir(self, key: str) -> Path: ...

    def log_path(self, key: str, role: str) -> Path: ...

    def net(self, key: str) -> PodNet | None: ...

    def create(self, key: str, ip: str, hosts: Mapping[str, str], *, init: InitSettings | None,
               uid: str = "") -> PodNet: ...

    def uid_of(self, key: str) -> str | None: ...

    def write_hosts(self, key: str, hosts: Mapping[str, str]) -> None: ...

    def route_services(self, key: str, routes: Sequence[ServiceRoute]) -> None: ...

    def start(self, key: str, role: str, process: PodProcess) -> int: ...

    def started_before(self, key: str, role: str) -> bool: ...

    def running(self, key: str, role: str) -> int | None: ...

    def exited(self, key: str, role: str) -> Exited: ...

    def listening(self, key: str, ports: Sequence[int]) -> bool: ...

    def probe(self, ip: str, path: str) -> int: ...

    def remove(self, key: str, grace: float = STOP_GRACE) -> None: ...


class FakePodNetwork:
    """The pods' namespaces of a FakeLocalPods, by name (`namespace_pod`), as HostNetwork lists them."""

    def __init__(self, subnet: str) -> None:
        self.subnet = ipaddress.IPv4Network(subnet)
        self.nets: dict[str, PodNet] = {}

    def pods(self) -> list[PodNet]:
        return sorted(self.nets.values(), key=lambda n: n.name)


@dataclass
class FakePod:
    """A pod's namespace as FakeLocalPods made it: its address, hosts file, init rules (None: unmeshed) and, for
    a pod without a sidecar, its Service routes."""

    net: PodNet
    hosts: dict[str, str]
    init: InitSettings | None
    uid: str = ""
    routes: tuple[ServiceRoute, ...] = ()


@dataclass
class FakeProcess:
    """A started process: it runs while `code` is None."""

    pid: int
    process: PodProcess
    code: int | None = None
    last_line: str = ""

    @property
    def env(self) -> dict[str, str]:
        return dict(self.process.env)


@dataclass
class _FakeSlot:
    pod: FakePod
    procs: dict[str, FakeProcess] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)


class FakeLocalPods:
    """LocalPods in memory, behaving: namespaces exist from `create` to `remove`, processes run from `start` until
    `kill`, `running` / `exited` / `started_before` answer as the real ones do. The sidecar's admin port answers
    /live and /ready with 200 while the pod's sidecar runs (0 otherwise), unless `probes[(key, path)]` says another
    code; the workload listens once it runs, unless its pod is in `deaf`. `started` keeps every start in order;
    `removed` every removal; `created` every namespace made (a kept one is not made again). While `route_error`
    is set, installing Service routes fails with it, as a refused iptables-restore would."""

    def __init__(self, root: Path, subnet: str = "10.213.0.0/16", prefix: str = "fake-") -> None:
        self.root = root
        self.prefix = prefix
        self.network = FakePodNetwork(subnet)
        self.probes: dict[tuple[str, str], int] = {}
        self.deaf: set[str] = set()
        self.started: list[tuple[str, str, PodProcess]] = []
        self.created: list[str] = []
        self.removed: list[str] = []
        self.route_error = ""
        self._pods: dict[str, _FakeSlot] = {}
        self._pids = itertools.count(1000)
        self._lock = threading.Lock()

    # ---- for tests
    def pod(self, key: str) -> FakePod | None:
        slot = self._pods.get(key)
        return slot.pod if slot is not None else None

    def process(self, key: str, role: str) -> FakeProcess | None:
        slot = self._pods.get(key)
        return slot.procs.get(role) if slot is not None else None

    def kill(self, key: str, role: str, code: int = 1, last_line: str = "") -> None:
        """The pod's `role` process ends with `code`, its log's last line `last_line`."""
        proc = self.process(key, role)
        if proc is None or proc.code is not None:
            raise KeyError(f"pod {key}: no {role} process runs")
        proc.code, proc.last_line = code, last_line

    # ---- PodRuntime
    def pod_dir(self, key: str) -> Path:
        return self.root / "pods" / pod_dir_name(key)

    def log_path(self, key: str, role: str) -> Path:
        return self.root / "logs" / f"{pod_dir_name(key)}.{role}.log"

    def net(self, key: str) -> PodNet | None:
        return self.network.nets.get(pod_dir_name(key))

    def create(self, key: str, ip: str, hosts: Mapping[str, str], *, init: InitSettings | None,
               uid: str = "") -> PodNet:
        with self._lock:
            name = pod_dir_name(key)
            slot = self._pods.get(key)
            if slot is not None and str(slot.pod.net.ip) == ip:
                slot.pod.hosts, slot.pod.init, slot.pod.uid = dict(hosts), init, uid
                return slot.pod.net
            address = ipaddress.IPv4Address(ip)
            if address not in self.network.subnet:
                raise PermanentError(f"pod {key}: {ip} is outside {self.network.subnet}")
            net = PodNet(name, f"{self.prefix}{name}", address, next(self.network.subnet.hosts()),
                         self.network.subnet.prefixlen, f"{self.prefix}h{len(self.created)}")
            self.network.nets[name] = net
            self._pods[key] = _FakeSlot(FakePod(net, dict(hosts), init, uid))  # at another address: made again
            self.created.append(key)
            return net

    def uid_of(self, key: str) -> str | None:
        slot = self._pods.get(key)
        return slot.pod.uid if slot is not None else None

    def write_hosts(self, key: str, hosts: Mapping[str, str]) -> None:
        slot = self._pods.get(key)
        if slot is not None:
            slot.pod.hosts = dict(hosts)

    def route_services(self, key: str, routes: Sequence[ServiceRoute]) -> None:
        slot = self._pods.get(key)
        if slot is None:
            raise PermanentError(f"pod {key}: its network namespace does not exist")
        if self.route_error:
            raise PermanentError(self.route_error)
        slot.pod.routes = tuple(routes)

    def start(self, key: str, role: str, process: PodProcess) -> int:
        with self._lock:
            slot = self._pods.get(key)
            if slot is None:
                raise PermanentError(f"pod {key}: its network namespace does not exist")
            pid = next(self._pids)
            slot.procs[role] = FakeProcess(pid, process)
            slot.started.add(role)
            self.started.append((key, role, process))
            return pid

    def started_before(self, key: str, role: str) -> bool:
        slot = self._pods.get(key)
        return slot is not None and role in slot.started

    def running(self, key: str, role: str) -> int | None:
        proc = self.process(key, role)
        return proc.pid if proc is not None and proc.code is None else None

    def exited(self, key: str, role: str) -> Exited:
        proc = self.process(key, role)
        return Exited(proc.code, proc.last_line) if proc is not None else Exited(None, "")

    def listening(self, key: str, ports: Sequence[int]) -> bool:
        return self.running(key, "app") is not None and key not in self.deaf

    def probe(self, ip: str, path: str) -> int:
        key = next((k for k, s in self._pods.items() if str(s.pod.net.ip) == ip), None)
        if key is None:
            return 0
        if (key, path) in self.probes:
            return self.probes[(key, path)]
        return 200 if path in ("/live", "/ready") and self.running(key, "sidecar") is not None else 0

    def remove(self, key: str, grace: float = STOP_GRACE) -> None:
        with self._lock:
            if self._pods.pop(key, None) is not None:
                self.removed.append(key)
            self.network.nets.pop(pod_dir_name(key), None)


__all__ = ["APP_UID", "SIDECAR_UID", "Exited", "FakeLocalPods", "FakePod", "FakeProcess", "LocalPods",
           "MissingPrivilege", "PodProcess", "PodRuntime", "process_alive", "spawn_detached", "stop_process"]
