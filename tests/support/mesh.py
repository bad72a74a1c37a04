"""A whole mesh on one host, for end-to-end tests and benchmarks: the control plane, and pods as network namespaces,
each with its application, its init rules and a real `meshctl sidecar` (HAProxy) beside it.

Theory of operation
-------------------
`LocalMesh(net, state_dir)` is given a `HostNetwork` (tests/support/netns.py: a bridge and a /24 of its own) and a
state directory. `start()` runs a `ControlPlane` on SQLite in that directory, its NATS listening on the bridge's
gateway address (the one host address every pod can reach), and applies the MeshConfig.

`add_pod` plays the platform for one pod, step by step as the pod machine (machines/pod.py) waits for each fact:

    network namespace + address             (HostNetwork.add_pod)
    Pod manifest with status.podIP          (engine.world.apply: the catalog computes its document)
    the application, as uid 65534           (default: apps/echo.py on the pod's ports)
    admit -> InjectSidecar on the fake platform -> injected
    its own Workload API socket, for uid 2102 (NodeAgent.add_workload)
    init rules                              (actions.iptables.install in the pod's namespace)
    schedule {node, ip} -> the engine requests, signs and delivers the SVID -> identity-issued
    `meshctl sidecar` as uid 2102; once it answers /live: sidecar_connected (registers its rollout, whose first
        publish also lets the sidecar into NATS: it retries until then)
    its first acknowledgement -> config-synced; GET /ready answers 200 -> ready

and returns a `MeshPod` once the pod machine says `ready`, its application listens and every running sidecar runs
the world with the new pod in it. A pod with `meshed=False` gets its namespace, manifest (labelled out of
injection) and application only: a client or server outside the mesh.

`add_service` applies a Service with a virtual address taken from the top of the harness's own /24 (never given
to a pod): a virtual address is only ever rewritten inside a client pod by its iptables rules, and should one leak,
it stays on the test's bridge. Endpoints come from the catalog (pods selected by the Service, with their podIP).

`apply` (and `delete`) change the world and, by default, wait until every running sidecar runs the result: the
documents the catalog computes from the new world are stored, each sidecar whose document changed has a newer
generation, and every running sidecar acknowledged its desired generation (an acknowledged generation is one HAProxy
runs).

`stop()` ends every process (SIGKILL: tests that want a drain ask for it), removes the pods' namespaces and stops
the control plane, also after a failure; the HostNetwork itself belongs to the caller.

Every wait is a poll of a condition with a bound (`wait`, 60 s by default: how long something broken may take to be
noticed, never how long anything should take).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from actions.ca import CaSettings
from actions.clock import SystemClock
from actions.iptables import InitSettings, install
from actions.netns import NETNS_ETC_DIR, HostNetwork, PodNet, run, spawn
from actions.nodeagent import endpoint_socket
from engine import views, world
from engine.plane import ControlPlane, PlaneConfig
from store import Store, migrate, sqlite_url
from tests.support.wait import eventually

SIDECAR_UID = 2102
APP_UID = 65534  # nobody: the application is an unprivileged user, as in a pod
ADMIN_PORT = 15021
WAIT = 60.0
VIRTUAL_ADDRESSES = 32  # the top of the /24, below the broadcast address, is for Services
ECHO_APP = Path(__file__).resolve().parents[2] / "apps" / "echo.py"
MESHCTL = str(Path(sys.executable).with_name("meshctl"))
PYTHON = sys.executable
INJECT_LABEL = "injector.nsm.nginx.com/auto-inject"
NODE = "local"
KEEP_STATE = "MESHLOOM_KEEP_STATE"


class MeshError(AssertionError):
    """Something in the mesh did not happen in time; the message says what, with the sidecar's last log lines."""


@contextlib.contextmanager
def state_directory(prefix: str = "meshloom-mesh-") -> Iterator[Path]:
    """A state directory the sidecars' user can reach (pytest's own temporary directories are private to root) and
    short enough for the Workload API's unix socket paths; removed afterwards, unless MESHLOOM_KEEP_STATE=1 (its
    logs/ then hold every sidecar's and application's output, for a post-mortem)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        if os.environ.get(KEEP_STATE) == "1":
            print(f"kept the mesh's state directory {path} ({KEEP_STATE}=1)", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _reachable_by_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


def _no_dns(net: PodNet) -> None:
    """A resolv.conf for the pod (`ip netns exec` mounts /etc/netns/<netns>/resolv.conf over /etc/resolv.conf)
    whose lookups fail at once inside the pod: the host's resolver is not reachable from a pod (nothing is routed
    out), so a lookup would wait out its timeouts (HTTPServer's `getfqdn` in the sidecar's admin server: 10 s),
    and no query may leave the test's network anyway. Names come from the hosts file (`_write_hosts`)."""
    directory = NETNS_ETC_DIR / net.netns
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    path = directory / "resolv.conf"
    path.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    path.chmod(0o644)


def _netns_inode(path: Path) -> int:
    return os.stat(path).st_ino


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _listening(pid: int, port: int) -> bool:
    """Whether a socket listens on `port` in the network namespace of `pid` (its /proc/<pid>/net/tcp)."""
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            return True
    return False


def _port_number(port: int | Mapping[str, Any]) -> int:
    return port if isinstance(port, int) else int(port["containerPort"])


def _is_tcp_only(port: int | Mapping[str, Any]) -> bool:
    """A port the echo app serves as a raw TCP echo rather than HTTP: one named tcp* (NGINX Service Mesh's rule)."""
    return not isinstance(port, int) and str(port.get("name", "")).startswith("tcp")


# ---- a long-lived connection driven step by step ------------------------------------------------------------------
class Session:
    """`apps/echo.py session` in a client pod: one connection held open, one step per `step()`."""

    def __init__(self, proc: subprocess.Popen[str], what: str) -> None:
        self.proc, self.what = proc, what
        first = self._line(WAIT)
        if first.get("connected") is not True:
            self.close()
            raise MeshError(f"{what}: the session did not connect: {first}")

    def _line(self, wait: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], wait)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""
            raise MeshError(f"{self.what}: no answer within {wait:g}s (exit {self.proc.poll()}) {err[-500:]}")
        return dict(json.loads(line))

    def step(self, line: str, wait: float = 15.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._line(wait)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


# ---- one pod ---------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class MeshPod:
    mesh: LocalMesh = field(repr=False)
    namespace: str
    name: str
    service_account: str
    net: PodNet
    meshed: bool
    ports: tuple[int, ...]
    app: subprocess.Popen[bytes] | None = None
    sidecar: subprocess.Popen[bytes] | None = None
    workload_socket: Path | None = None
    run_dir: Path | None = None
    sidecar_log: Path | None = None
    app_log: Path | None = None
    _logs: list[IO[bytes]] = field(default_factory=list, repr=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ip(self) -> str:
        return str(self.net.ip)

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.mesh.plane.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    # ---- processes in the pod
    def run(self, argv: Sequence[str], *, uid: int | None = APP_UID, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(self.net, argv, uid=uid, timeout=timeout, check=check)

    def spawn(self, argv: Sequence[str], *, uid: int | None = APP_UID, **kwargs: Any) -> subprocess.Popen[Any]:
        return spawn(self.net, argv, uid=uid, **kwargs)

    def request(self, url: str, count: int = 1, *, close: bool = False, method: str = "GET",
                headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
        """`count` HTTP requests from this pod's application user (so through its sidecar, if it has one)."""
        argv = [PYTHON, str(ECHO_APP), "request", url, "--count", str(count), "--method", method,
                "--timeout", str(timeout)]
        if close:
            argv.append("--close")
        for name, value in (headers or {}).items():
            argv += ["--header", f"{name}: {value}"]
        done = self.run(argv, timeout=60.0 + count * 0.5)
        return list(json.loads(done.stdout)["results"])

    def session(self, host: str, port: int, *, tcp: bool = False) -> Session:
        argv = [PYTHON, str(ECHO_APP), "session", host, str(port)] + (["--tcp"] if tcp else [])
        proc = self.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return Session(proc, f"{self.key} -> {host}:{port}")

    def processes(self) -> list[int]:
        """Every process in this pod's network namespace."""
        inode = _netns_inode(self.net.netns_path)
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(entry / "ns" / "net").st_ino == inode:
                        out.append(int(entry.name))
        return sorted(out)

    # ---- the sidecar
    def admin(self, path: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, Any]:
        """The sidecar's admin port, from the host (it is never redirected): (status, JSON) or (0, None)."""
        req = urllib.request.Request(f"http://{self.ip}:{ADMIN_PORT}{path}", method=method,
                                     data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")
        except (OSError, ValueError):
            return 0, None

    def status(self) -> dict[str, Any]:
        code, body = self.admin("/status")
        if code != 200:
            raise MeshError(f"{self.key}: the sidecar's /status answered {code}{self.sidecar_tail()}")
        return dict(body)

    def ready(self) -> bool:
        self.check_sidecar()
        return self.admin("/ready")[0] == 200

    def alive(self) -> bool:
        """Whether the sidecar's liveness probe answers."""
        self.check_sidecar()
        return self.admin("/live")[0] == 200

    def connected(self) -> bool:
        """Whether the sidecar says it is connected to the control plane's NATS."""
        self.check_sidecar()
        code, body = self.admin("/status")
        return code == 200 and bool(body.get("nats_connected"))

    def check_sidecar(self) -> None:
        if self.sidecar is not None and self.sidecar.poll() is not None:
            raise MeshError(f"{self.key}: meshctl sidecar exited with {self.sidecar.returncode}{self.sidecar_tail()}")

    def haproxy_pids(self) -> list[int]:
        """The HAProxy master and workers, as the sidecar reports them."""
        status = self.status()
        return [p for p in [status["proxy_pid"], *status["worker_pids"]] if p]

    def sidecar_tail(self, lines: int = 30) -> str:
        if self.sidecar_log is None or not self.sidecar_log.exists():
            return ""
        text = self.sidecar_log.read_text(errors="replace").splitlines()[-lines:]
        return "\n  sidecar log:\n    " + "\n    ".join(text) if text else ""

    def rollout(self) -> views.SidecarView | None:
        found = [s for s in views.sidecars(self.mesh.store, SystemClock().now()) if s.sidecar == self.key]
        return found[0] if found else None

    def synced(self) -> bool:
        row = self.rollout()
        return row is not None and row.status == "SYNCED" and row.acked == row.desired

    def start_sidecar(self) -> None:
        """Start `meshctl sidecar` as uid 2102 in the pod; returns at once (see `wait_ready`)."""
        assert self.meshed and self.workload_socket is not None and self.run_dir is not None
        assert self.sidecar is None or self.sidecar.poll() is not None, f"{self.key}: its sidecar runs already"
        nats = self.mesh.plane.nats
        assert nats is not None
        argv = [MESHCTL, "sidecar", "--sidecar", self.key, "--workload-socket", endpoint_socket(self.workload_socket),
                "--nats-url", nats.url, "--run-dir", str(self.run_dir), "--admin-port", str(ADMIN_PORT),
                "--drain-seconds", str(self.mesh.drain_seconds)]
        env = {**os.environ, "HOME": str(self.run_dir), "PYTHONDONTWRITEBYTECODE": "1"}
        assert self.sidecar_log is not None
        out = open(self.sidecar_log, "ab")  # noqa: SIM115 -- held for the process's life, closed by stop()
        self._logs.append(out)
        self.sidecar = spawn(self.net, argv, uid=SIDECAR_UID, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, wait: float = WAIT) -> None:
        eventually(self.ready, lambda: f"{self.key}: the sidecar never became ready: "
                   f"{self.admin('/ready')[1]}{self.sidecar_tail()}", wait)

    def kill_sidecar(self, sig: int = signal.SIGKILL) -> list[int]:
        """Signal the agent and its HAProxy processes (SIGKILL: a crash), wait until they are gone; returns their
        pids. Processes of the sidecar's uid in the pod are HAProxy's even when the agent cannot say so any more."""
        pids = []
        if self.sidecar is not None and self.sidecar.poll() is None:
            pids.append(self.sidecar.pid)
        for pid in self.processes():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}").st_uid == SIDECAR_UID and pid not in pids:
                    pids.append(pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if self.sidecar is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.sidecar.wait(WAIT)
        eventually(lambda: not any(_alive(p) for p in pids), f"{self.key}: the sidecar's processes outlived {sig}")
        return pids

    def _end(self) -> None:
        for proc in (self.sidecar, self.app):
            if proc is not None and proc.poll() is None:
                proc.kill()
        for proc in (self.sidecar, self.app):
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        for log in self._logs:
            log.close()
        self._logs.clear()


# ---- the mesh --------------------------------------------------------------------------------------------------------
class LocalMesh:
    def __init__(self, net: HostNetwork, state_dir: Path, *, mesh_config: Mapping[str, Any] | None = None,
                 trust_domain: str = "example.org", drain_seconds: float = 1.0) -> None:
        state_dir = Path(state_dir).absolute()
        if not _reachable_by_others(state_dir):
            raise ValueError(f"state directory {state_dir}: the sidecars (uid {SIDECAR_UID}) cannot reach it; use "
                             "state_directory() or a directory every user may traverse")
        self.net = net
        self.state_dir = state_dir
        self.mesh_config = dict(mesh_config or {})
        self.trust_domain = trust_domain
        self.drain_seconds = drain_seconds
        self.pods: dict[str, MeshPod] = {}
        self.services: dict[str, str] = {}  # "namespace/name" -> virtual address
        self.namespaces: set[str] = set()
        hosts = list(net.subnet.hosts())
        self._virtual = [str(a) for a in hosts[-VIRTUAL_ADDRESSES:]]
        self._store: Store | None = None
        self._plane: ControlPlane | None = None

    # ---- life
    def start(self) -> LocalMesh:
        (self.state_dir / "logs").mkdir(exist_ok=True)
        (self.state_dir / "pods").mkdir(exist_ok=True, mode=0o755)
        url = sqlite_url(self.state_dir)
        migrate.upgrade(url)
        self._store = Store(url)
        self._plane = ControlPlane(self._store, PlaneConfig(
            self.state_dir / "plane", ca=CaSettings(trust_domain=self.trust_domain), tick_seconds=0.05,
            world_poll=0.05, nats_host=str(self.net.gateway)))
        try:
            self._plane.start()
            if self.mesh_config:
                self.apply([{"apiVersion": "meshloom.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
                             "spec": self.mesh_config}])
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Everything this mesh started, ended; safe to call twice and after a failed start."""
        for pod in reversed(list(self.pods.values())):
            with contextlib.suppress(Exception):
                pod._end()
        for pod in reversed(list(self.pods.values())):
            with contextlib.suppress(Exception):
                self.net.remove_pod(pod.net.name)
        self.pods.clear()
        if self._plane is not None:
            with contextlib.suppress(Exception):
                self._plane.stop()
            self._plane = None
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()
            self._store = None

    @property
    def plane(self) -> ControlPlane:
        assert self._plane is not None, "the mesh is not started"
        return self._plane

    @property
    def store(self) -> Store:
        assert self._store is not None, "the mesh is not started"
        return self._store

    # ---- the world
    def apply(self, manifests: Sequence[Mapping[str, Any]], *, wait: bool = True) -> None:
        """Apply manifests as one change; with `wait`, return once every running sidecar runs the new world."""
        before = self._snapshot()
        world.apply(self.store, manifests, actor="test", now=SystemClock().now())
        if wait:
            self.wait_converged(before)

    def delete(self, kind: str, namespace: str, name: str, *, wait: bool = True) -> None:
        """Delete one resource (`kind` in lower case, as the store names it: "trafficsplit", "service", ...)."""
        before = self._snapshot()
        world.delete(self.store, kind, namespace, name, actor="test", now=SystemClock().now())
        if wait:
            self.wait_converged(before)

    def set_mesh_config(self, **spec: Any) -> None:
        """Change MeshConfig fields (e.g. mtlsMode="strict", accessControlMode="deny") and wait for the sidecars."""
        self.mesh_config.update(spec)
        self.apply([{"apiVersion": "meshloom.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
                     "spec": self.mesh_config}])

    def _running(self) -> list[MeshPod]:
        return [p for p in self.pods.values() if p.meshed and p.sidecar is not None and p.sidecar.poll() is None]

    def _snapshot(self) -> tuple[dict[str, str], dict[str, int]]:
        desired = {p.key: row.desired for p in self._running() if (row := p.rollout()) is not None}
        return self.store.document_digests(), desired

    def wait_converged(self, before: tuple[dict[str, str], dict[str, int]] | None = None,
                       wait: float = WAIT) -> None:
        """Wait until the stored documents are those of the current world, every running sidecar whose document
        changed since `before` has a newer generation, and every running sidecar acknowledged its desired one."""
        import catalog

        digests_before, desired_before = before if before is not None else ({}, {})
        rendered = catalog.render(world.load_world(self.store), self.trust_domain)
        expected = {k: world.digest(v) for k, v in rendered.sidecars.items()}
        pods = self._running()

        def done() -> bool:
            stored = self.store.document_digests()
            for pod in pods:
                pod.check_sidecar()
                if stored.get(pod.key) != expected.get(pod.key):
                    return False
                row = pod.rollout()
                if row is None or row.status != "SYNCED" or row.acked != row.desired:
                    return False
                if (pod.key in desired_before and digests_before.get(pod.key) != expected.get(pod.key)
                        and row.desired <= desired_before[pod.key]):
                    return False
            return True

        def why() -> str:
            rows = {p.key: p.rollout() for p in pods}
            return "the sidecars never ran the new world: " + "; ".join(
                f"{k}: {r.status if r else None} desired={r.desired if r else None} acked={r.acked if r else None}"
                for k, r in rows.items())

        eventually(done, why, wait)

    def _ensure_namespace(self, namespace: str) -> None:
        if namespace not in self.namespaces:
            self.apply([{"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": namespace, "labels": {INJECT_LABEL: "enabled"}}}], wait=False)
            self.namespaces.add(namespace)

    def add_service(self, namespace: str, name: str, selector: Mapping[str, str],
                    ports: Sequence[Mapping[str, Any]], cluster_ip: str | None = None, *,
                    wait: bool = True) -> str:
        """Apply a Service with a virtual address of this mesh (the next free one unless given); returns it."""
        key = f"{namespace}/{name}"
        address = cluster_ip or self.services.get(key)
        if address is None:
            taken = set(self.services.values())
            address = next((a for a in reversed(self._virtual) if a not in taken), None)
            if address is None:
                raise ValueError(f"service {key}: all {VIRTUAL_ADDRESSES} virtual addresses are taken")
        if ipaddress.IPv4Address(address) not in self.net.subnet:
            raise ValueError(f"service {key}: virtual address {address} is outside this mesh's {self.net.subnet}")
        self._ensure_namespace(namespace)
        self.services[key] = address
        self.apply([{"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": namespace, "name": name},
                     "spec": {"selector": dict(selector), "ports": [dict(p) for p in ports], "clusterIP": address}}],
                   wait=wait)
        self._write_hosts()
        return address

    def _write_hosts(self) -> None:
        """`<service>.<namespace>.svc` names in every pod, for processes started with spawn/run."""
        entries = {f"{k.split('/')[1]}.{k.split('/')[0]}.svc": a for k, a in self.services.items()}
        for pod in self.pods.values():
            self.net.hosts_file(pod.net, entries)

    # ---- pods
    def add_pod(self, namespace: str, name: str, service_account: str = "default",
                labels: Mapping[str, str] | None = None, ports: Sequence[int | Mapping[str, Any]] = (),
                app_argv: Sequence[str] | None = None, annotations: Mapping[str, str] | None = None, *,
                meshed: bool = True, init: InitSettings | None = None, wait: float = WAIT) -> MeshPod:
        """A pod with its application (and, meshed, its init rules and sidecar), ready; see the module header.
        `app_argv` None runs the echo app on `ports` (HTTP, or a TCP echo for ports named tcp*); [] runs nothing."""
        key = f"{namespace}/{name}"
        if key in self.pods:
            raise ValueError(f"pod {key} exists already")
        before = self._snapshot()
        net = self.net.add_pod(f"{namespace}-{name}")
        if str(net.ip) in self._virtual:
            self.net.remove_pod(net.name)
            raise ValueError(f"pod {key}: no pod address left below the virtual addresses")
        pod = MeshPod(self, namespace, name, service_account, net, meshed, tuple(_port_number(p) for p in ports))
        self.pods[key] = pod
        _no_dns(net)
        logs = self.state_dir / "logs"
        pod.app_log = logs / f"{namespace}-{name}.app.log"
        pod.sidecar_log = logs / f"{namespace}-{name}.sidecar.log"
        self._write_hosts()

        pod_labels = dict(labels or {})
        if not meshed:
            pod_labels[INJECT_LABEL] = "disabled"
        container_ports = [{"containerPort": p} if isinstance(p, int) else dict(p) for p in ports]
        meta: dict[str, Any] = {"namespace": namespace, "name": name, "labels": pod_labels}
        if annotations:
            meta["annotations"] = dict(annotations)
        self._ensure_namespace(namespace)
        self.apply([{"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                     "spec": {"serviceAccountName": service_account, "nodeName": NODE,
                              "containers": [{"name": "app", "ports": container_ports}]},
                     "status": {"phase": "Running", "podIP": pod.ip}}], wait=False)

        if app_argv is None and ports:
            app_argv = [PYTHON, str(ECHO_APP), "serve", "--pod", key]
            for p in ports:
                app_argv += ["--tcp" if _is_tcp_only(p) else "--http", str(_port_number(p))]
        if app_argv:
            out = open(pod.app_log, "ab")  # noqa: SIM115 -- held for the process's life, closed by stop()
            pod._logs.append(out)
            pod.app = spawn(net, list(app_argv), uid=APP_UID, stdout=out, stderr=subprocess.STDOUT)
        if meshed:
            self._mesh_pod(pod, pod_labels, init or InitSettings(), wait)
        if pod.app is not None and app_argv is not None and app_argv[:2] == [PYTHON, str(ECHO_APP)]:
            app = pod.app
            eventually(lambda: app.poll() is None and all(_listening(app.pid, p) for p in pod.ports),
                       lambda: f"{key}: its application never listened on {pod.ports} (exit {app.poll()}): "
                       f"{pod.app_log.read_text(errors='replace')[-500:] if pod.app_log else ''}", wait)
        self.wait_converged(before, wait)  # its address is an endpoint now: every sidecar runs it
        return pod

    def _mesh_pod(self, pod: MeshPod, labels: dict[str, str], init: InitSettings, wait: float) -> None:
        engine, key = self.plane.engine, pod.key
        engine.fire("pod", key, "admit", {"namespace": pod.namespace, "name": pod.name,
                                          "service_account": pod.service_account,
                                          "labels": labels}, actor="platform")
        self._wait_pod(key, ("injected",), wait)
        pod.workload_socket = self.plane.agent.add_workload(key, uid=SIDECAR_UID)
        install(init, netns=pod.net.netns)
        engine.fire("pod", key, "schedule", {"node": NODE, "ip": pod.ip}, actor="platform")
        self._wait_pod(key, ("identity-issued",), wait)

        pod.run_dir = self.state_dir / "pods" / f"{pod.namespace}-{pod.name}"
        pod.run_dir.mkdir(mode=0o750, exist_ok=True)
        os.chown(pod.run_dir, SIDECAR_UID, SIDECAR_UID)
        # As a platform would: the sidecar starts, and once it answers its liveness probe the pod machine hears of
        # it. NATS lets the sidecar in only once its first document is published (actions/meshnats.py grants
        # permissions on publish), which this very step brings about: until then the sidecar is refused (or, when
        # another pod has its identity, connected without its subjects) and tries again by itself.
        pod.start_sidecar()
        eventually(pod.alive, lambda: f"{key}: the sidecar's admin port never answered{pod.sidecar_tail()}", wait)
        engine.fire("pod", key, "sidecar_connected", actor="sidecar")
        self._wait_pod(key, ("config-synced", "ready"), wait)
        pod.wait_ready(wait)
        if self._pod_state(key) == "config-synced":
            engine.fire("pod", key, "ready", actor="platform")
        self._wait_pod(key, ("ready",), wait)

    def _pod_state(self, key: str) -> str | None:
        row = self.store.get("pod", key)
        return row.state if row is not None else None

    def _wait_pod(self, key: str, states: tuple[str, ...], wait: float) -> None:
        pod = self.pods[key]

        def reached() -> bool:
            pod.check_sidecar()
            return self._pod_state(key) in states

        eventually(reached, lambda: f"pod {key} stayed {self._pod_state(key)}, never {' or '.join(states)}"
                   f"{pod.sidecar_tail()}", wait)

    def pod(self, key: str) -> MeshPod:
        return self.pods[key]
