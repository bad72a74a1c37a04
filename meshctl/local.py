"""`meshctl up -f mesh.yaml` and `meshctl down`: the mesh on one Linux host (engine/local.py says how it works).

`up -f` checks everything before it starts anything: the manifest (every problem with its file and line), the
privilege, the tools, then stores the mesh's world as one change and writes the desired pods. It starts the control
plane in the background when none runs on the state directory (`meshctl up --state-dir D`, its output in
`logs/control-plane.log`), and follows the pods until every one is ready, or says which pod is stuck, in which state,
and why. `down` ends every pod's life through its machine while the control plane runs, stops the control plane,
then sweeps whatever is left of the mesh on the host; `--purge` also removes the state directory.
"""

from __future__ import annotations

import fcntl
import getpass
import ipaddress
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from actions import localstate
from actions.clock import SystemClock
from actions.errors import HostUnsupported, PermanentError
from actions.localpods import (
    LocalPods,
    last_line,
    process_alive,
    process_args,
    spawn_detached,
    stop_process,
    unreachable_ancestor,
)
from actions.nats import stop_leftover
from actions.netns import HostNetwork, check_host
from catalog import meshfile as model
from catalog.meshfile import MeshfileError
from engine import local, views
from meshctl import meshfile
from meshctl.context import LOCK_FILE, Paths
from store import Entity, Store, migrate, redact

# A terminal's own width; piped into a file or a CI log, wide enough for the demo's table on one line per edge.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
CONTROL_PLANE_LOG = "control-plane.log"
DOWN_WAIT = 30.0  # seconds `down` gives the pods' machines to reach `gone` before it sweeps regardless ...
DOWN_WAIT_PER_POD = 1.0  # ... and this much more per pod (a sidecar drains for 2 s; teardowns run 8 at a time)
MIN_PREFIXLEN = 28  # a /28 at the least: its lower half leaves the gateway and six pods


class MeshProblem(Exception):
    """The mesh did not come up (a pod stuck or failed, the control plane gone): one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__(problems[0] if problems else "the mesh did not come up")
        self.problems = list(problems)


class HostProblem(Exception):
    """This host or user cannot run the mesh (privilege, a tool): one line."""


def meshctl_path() -> Path:
    return Path(sys.executable).with_name("meshctl")


def _check_reachable(path: Path) -> None:
    """The sidecars (uid 2102) and workloads (uid 65534) run the venv's python and meshctl: every directory above
    them must be traversable by other users (a checkout under /root is not)."""
    blocked = unreachable_ancestor(path)
    if blocked is not None:
        raise HostProblem(f"{path} is not reachable by the pods' users (uid 2102 and 65534): {blocked} is not "
                          f"traversable by others; install Meshloom under a directory they can reach or "
                          f"'chmod o+x {blocked}'")


def control_plane_pid(state_dir: Path) -> int | None:
    """The pid of the control plane running on this state directory (it holds the lock), or None."""
    path = state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_host_for_pods() -> None:
    try:
        check_host()
    except HostUnsupported as exc:
        raise HostProblem(f"meshctl up -f runs pods as network namespaces with iptables rules: {exc}") from None
    if os.geteuid() != 0:
        raise HostProblem("meshctl up -f runs pods as other users (uid 2102, 65534) in network namespaces: it needs "
                          f"root (running as uid {os.geteuid()})")
    for tool in ("iptables-restore", "setpriv"):
        if shutil.which(tool) is None:
            raise HostProblem(f"the '{tool}' command is not installed: run scripts/setup")
    _check_reachable(meshctl_path())


def _network(state_dir: Path, subnet: str | None, prefix: str | None) -> localstate.LocalNetwork:
    saved = localstate.load_network(state_dir)
    if saved is not None:
        for flag, given, kept in (("--subnet", subnet, saved.subnet), ("--prefix", prefix, saved.prefix)):
            if given is not None and given != kept:
                raise HostProblem(f"{flag} {given}: the mesh in {state_dir} uses {kept}; 'meshctl down' it first "
                                  f"to change it")
        return saved
    net = localstate.LocalNetwork(prefix or localstate.DEFAULT_PREFIX, subnet or localstate.DEFAULT_SUBNET)
    try:
        network = ipaddress.IPv4Network(net.subnet)
    except ValueError as exc:
        raise HostProblem(f"--subnet {net.subnet}: not an IPv4 network such as 10.213.0.0/16 ({exc})") from None
    if network.prefixlen > MIN_PREFIXLEN:
        raise HostProblem(f"--subnet {net.subnet}: too small; a /{MIN_PREFIXLEN} at the least")
    try:
        HostNetwork(net.prefix, net.subnet)  # checks the prefix
    except PermanentError as exc:
        raise HostProblem(f"--prefix {net.prefix}: {exc}") from None
    return net


@dataclass(frozen=True, slots=True)
class UpResult:
    pods: int
    seconds: float
    started_control_plane: bool


def up(paths: Paths, source: str, *, subnet: str | None, prefix: str | None, timeout: float,
       plane_args: Sequence[str] = (), quiet: bool = False) -> UpResult:
    """See the module's docstring."""
    begun = time.monotonic()
    spec = meshfile.read(source)  # the manifest first: a broken one is refused before anything starts
    check_host_for_pods()
    paths.ensure_state_dir()
    running = control_plane_pid(paths.state_dir)
    if running is not None and localstate.load_network(paths.state_dir) is None:
        raise HostProblem(f"a control plane without pods on this host already runs on {paths.state_dir} (pid "
                          f"{running}): stop it, then 'meshctl up -f' starts one with them")
    net = _network(paths.state_dir, subnet, prefix)
    migrate.upgrade(paths.url)
    store = Store(paths.url)
    try:
        previous = localstate.load_desired(paths.state_dir)
        pod_range, service_range = net.ranges()
        # The gateway is the pod range's first address: pods take the next ones.
        taken = {**local.stored_addresses(store), "gateway": str(net.gateway)}
        for row in store.list("pod"):  # a pod still terminating keeps its address until it is gone
            if row.state != "gone" and row.data.get("ip"):
                taken.setdefault(f"pod/{row.key}", str(row.data["ip"]))
        try:
            addresses = model.allocate(spec, pod_range, service_range, taken)
        except MeshfileError as exc:
            raise meshfile.ManifestProblems([f"{source}: {p}" for p in exc.problems]) from None
        manifests = model.render(spec, addresses)
        refs = local.store_world(store, manifests, previous, actor=f"cli:{getpass.getuser()}",
                                 now=SystemClock().now())
        localstate.save_network(paths.state_dir, net)
        desired = localstate.Desired(spec.name, tuple(
            localstate.DesiredPod(p.key, p.service_account, p.command, p.env, p.annotations, p.labels, p.meshed,
                             addresses[f"pod/{p.key}"], p.ports) for p in spec.pods),
            tuple(sorted((s.key, addresses[f"service/{s.key}"]) for s in spec.services)), refs)
        localstate.save_desired(paths.state_dir, desired)
        spawned: int | None = None
        running = control_plane_pid(paths.state_dir)
        if running is None:
            log = paths.state_dir / "logs" / CONTROL_PLANE_LOG
            spawned = spawn_detached([str(meshctl_path()), "up", "--state-dir", str(paths.state_dir.absolute()),
                                      *plane_args], log)
        elif changed := kept_flags(process_args(running) or [], plane_args):
            print(f"meshctl: the control plane (pid {running}) already runs and keeps {', '.join(changed)}; "
                  f"'meshctl down', then 'meshctl up -f' starts one with the new values", file=sys.stderr)
        _follow(paths.state_dir, store, desired, timeout, spawned=spawned, quiet=quiet)
        return UpResult(len(desired.pods), time.monotonic() - begun, spawned is not None)
    finally:
        store.close()


OPTIONAL_PLANE_FLAGS = ("--upstream-cert", "--upstream-key", "--upstream-bundle", "--db")  # absent: not used


def kept_flags(running: Sequence[str], asked: Sequence[str]) -> list[str]:
    """The control plane flags a running one (its command line) keeps against those asked for now, each as
    `--flag VALUE (asked: OTHER)`. `up -f` spells out every setting but the optional ones, whose absence means
    "none"; another setting missing from a running plane's command line (one started by hand) is not judged."""
    def pairs(args: Sequence[str]) -> dict[str, str]:
        return {flag: value for flag, value in zip(args, args[1:], strict=False) if flag.startswith("--")}

    def shown(flag: str, value: str | None) -> str:
        return "(none)" if value is None else redact(value) if flag == "--db" else value

    was, now = pairs(running), pairs(asked)
    flags = [*now, *(f for f in OPTIONAL_PLANE_FLAGS if f in was and f not in now)]
    return [f"{flag} {shown(flag, was.get(flag))} (asked: {shown(flag, now.get(flag))})" for flag in flags
            if was.get(flag) != now.get(flag) and (flag in was or flag in OPTIONAL_PLANE_FLAGS)]


def _ready(pod: localstate.DesiredPod, row: Entity | None, status: dict[str, object]) -> bool:
    """Ready, and this incarnation: the pod an earlier manifest described may still be ready, about to go."""
    if pod.meshed:
        return row is not None and row.state == "ready" and row.data.get("uid") == pod.uid
    return status.get("ready") is True


def _follow(state_dir: Path, store: Store, desired: localstate.Desired, timeout: float, *, spawned: int | None,
            quiet: bool) -> None:
    """Show the pods coming up; return when all are ready, raise MeshProblem saying which is stuck and why."""
    deadline = time.monotonic() + timeout
    since = time.time()
    total = len(desired.pods)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False, disable=quiet) as progress:
        task = progress.add_task("pods ready", total=total)
        while True:
            rows = {v.pod: v for v in views.pods(store, SystemClock().now())}
            entities = {e.key: e for e in store.list("pod")}
            status = localstate.load_status(state_dir)
            ready = [p for p in desired.pods if _ready(p, entities.get(p.key), status.get(p.key) or {})]
            behind = [p for p in desired.pods if p not in ready]
            lagging = min(behind, key=lambda p: _rank(rows.get(p.key)), default=None)
            shown = f"pods ready; {lagging.key} {rows[lagging.key].state}" if lagging and lagging.key in rows \
                else "pods ready"
            progress.update(task, completed=len(ready), description=shown)
            # Ready as the store says, and seen so by a control plane that runs now and has read this manifest
            # (a pass of its local platform since this `up` began): a restarted one has adopted the pods.
            if not behind and control_plane_pid(state_dir) is not None and localstate.status_time(state_dir) > since:
                return
            failed = [p for p in behind if p.key in rows and rows[p.key].state == "failed"]
            if failed:
                raise MeshProblem([_why(p, rows, status) for p in failed])
            if not (process_alive(spawned) if spawned is not None else control_plane_pid(state_dir) is not None):
                tail = last_line(state_dir / "logs" / CONTROL_PLANE_LOG)
                raise MeshProblem([f"the control plane exited: {tail or 'see ' + CONTROL_PLANE_LOG}"])
            if time.monotonic() > deadline:
                raise MeshProblem([_why(p, rows, status) for p in behind])
            time.sleep(0.25)


def _rank(view: views.PodView | None) -> int:
    return local.LIVE.index(view.state) if view is not None and view.state in local.LIVE else -1


def _why(pod: localstate.DesiredPod, rows: dict[str, views.PodView], status: dict[str, dict[str, object]]) -> str:
    view = rows.get(pod.key)
    mine = status.get(pod.key) or {}
    problem = str(mine.get("problem") or "")
    procs = mine.get("processes")
    if not problem and isinstance(procs, dict):
        for role in ("sidecar", "app"):
            info = procs.get(role) or {}
            if isinstance(info, dict) and info.get("last_exit"):
                problem = f"its {role} {info['last_exit']} ({info.get('restarts', 0)} restart(s))"
                break
    if view is None:
        where = "not admitted yet" if pod.meshed else "not started"
    elif view.state == "failed":
        where = f"failed: {view.failure}"
    else:
        where = f"stuck in {view.state} for {view.seconds_in_state:.0f}s, waiting for {view.waiting_for}"
    return f"pod {pod.key}: {where}{'; ' + problem if problem else ''}"


def down(paths: Paths, *, purge: bool, quiet: bool = False) -> list[str]:
    """See the module's docstring; returns what it did, a line each."""
    done: list[str] = []
    state_dir = paths.state_dir
    net = localstate.load_network(state_dir)
    if net is None and not state_dir.exists():
        return ["nothing to stop: no mesh in " + str(state_dir)]
    check_host_for_pods()
    pid = control_plane_pid(state_dir)
    previous = localstate.load_desired(state_dir)
    store = Store(paths.url) if (state_dir / "meshloom.db").exists() or not paths.url.startswith("sqlite") else None
    if pid is not None and net is not None and previous.pods and store is not None:
        # While the control plane runs, each pod's life ends through its machine (terminating, then gone: the
        # journal shows it), and the mesh's world is taken out, before anything is swept.
        localstate.save_desired(state_dir, localstate.Desired(previous.mesh, (), previous.services, previous.resources))
        keys = {p.key for p in previous.pods if p.meshed}
        deadline = time.monotonic() + DOWN_WAIT + DOWN_WAIT_PER_POD * len(keys)
        left = keys
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = {r.key for r in store.list("pod") if r.key in keys and r.state != "gone"}
        done.append(f"ended the life of {len(keys) - len(left)} pod(s) through their machines"
                    + (f"; {len(left)} still terminating were swept" if left else ""))
    if store is not None:
        try:
            if previous.resources:  # the mesh's world goes too, control plane or not (database work only)
                local.store_world(store, [], previous, actor=f"cli:{getpass.getuser()}", now=SystemClock().now())
        finally:
            store.close()
    if pid is not None and pid > 0 and stop_process(pid):
        done.append(f"stopped the control plane (pid {pid})")
    if net is not None:
        pods = LocalPods(HostNetwork(net.prefix, net.subnet), net.runtime_dir, state_dir / "logs")
        pods.sweep()
        done.append(f"removed the pods' namespaces, veths, bridge {net.prefix}br and {net.runtime_dir}")
        localstate.save_desired(state_dir, localstate.Desired())
    if (stopped := stop_leftover(state_dir.absolute() / "nats")) is not None:
        done.append(f"stopped NATS (pid {stopped})")
    if purge:
        shutil.rmtree(state_dir, ignore_errors=True)
        done.append(f"removed the state directory {state_dir}")
    return done


# ---- meshctl demo -------------------------------------------------------------------------------------------------
DEMO_REQUESTS = {"client -> frontend": 400, "intruder -> frontend": 20, "client -> frontend /limited": 30}
ROTATION_WAIT = 180.0  # seconds a live CA rotation may take on two busy cores before the demo says it is stuck


@dataclass(frozen=True, slots=True)
class RotationResult:
    old: str
    new: str
    certificates: int
    seconds: float


def demo(paths: Paths, *, subnet: str | None, prefix: str | None, timeout: float,
         plane_args: Sequence[str] = ()) -> None:
    """`meshctl demo`: the demo mesh up, traffic and its summary, a live CA rotation under traffic; the mesh stays
    up afterwards."""
    from meshctl import demo as topology

    paths.ensure_state_dir()
    manifest = paths.state_dir / "demo" / "mesh.yaml"
    manifest.parent.mkdir(exist_ok=True, mode=0o700)
    manifest.write_text(topology.manifest(["meshctl", "app"]))
    console.print(f"[bold]meshctl demo[/bold]: the mesh of {manifest}")
    result = up(paths, str(manifest), subnet=subnet, prefix=prefix, timeout=timeout, plane_args=plane_args)
    console.print(f"{result.pods} pods ready in {result.seconds:.1f}s\n")

    net = localstate.load_network(paths.state_dir)
    assert net is not None
    pods = LocalPods(HostNetwork(net.prefix, net.subnet), net.runtime_dir, paths.state_dir / "logs",
                     bin_dir=meshctl_path().parent)
    pods.network.ensure()

    def send(label: str, count: int, interval: float = 0.0) -> list[dict[str, object]]:
        source, service, path = topology.TRAFFIC[label]
        url = f"http://{service}.{topology.NAMESPACE}.svc{path}"
        argv = ["meshctl", "app", "request", url, "--count", str(count), "--timeout", "5"]
        if interval:
            argv += ["--interval", f"{interval:g}"]
        done = pods.run(f"{topology.NAMESPACE}/{source}-0", argv, timeout=60.0 + count)
        if done.returncode != 0:
            raise MeshProblem([f"{label}: the requests failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"])
        return list(json.loads(done.stdout)["results"])

    trust_domain = _plane_flag(plane_args, "--trust-domain", "example.org")
    console.print("[bold]Traffic[/bold] (from inside the pods, through their sidecars)")
    calls = {label: send(label, n) for label, n in DEMO_REQUESTS.items()}
    console.print(topology.table(topology.summarize(calls, trust_domain)))

    console.print("\n[bold]Certificate rotation, live[/bold]: a new CA generation, every SVID re-issued under it, "
                  "while the client keeps calling")
    results: list[dict[str, object]] = []
    stop = threading.Event()
    batch = 20  # requests, one every 50 ms: a second of traffic per batch

    trouble: list[BaseException] = []

    def keep_calling() -> None:
        try:
            while not stop.is_set():
                results.extend(send("client -> frontend", batch, interval=0.05))
        except BaseException as exc:  # said after the rotation: the traffic must not stop unnoticed
            trouble.append(exc)

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 60
        while len(results) < n and caller.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    caller = threading.Thread(target=keep_calling, name="demo-traffic", daemon=True)
    caller.start()
    try:
        wait_for(batch)  # traffic flows before the rotation starts ...
        rotation = _rotate(paths)
        wait_for(len(results) + 2 * batch)  # ... and after every sidecar took its new certificate
    finally:
        stop.set()
        caller.join(timeout=60)
    if trouble:
        raise trouble[0]
    failed = sum(1 for r in results if r.get("status") != 200)
    console.print(f"  CA generation {rotation.old} -> {rotation.new} in {rotation.seconds:.1f}s: "
                  f"{rotation.certificates} SVIDs re-issued and picked up by their sidecars without a restart")
    console.print(f"  {len(results)} requests before, during and after it: {failed} failed")
    console.print(f"\nThe mesh stays up. Look at it with 'meshctl state pods|certs|sidecars|cas', "
                  f"'meshctl audit pod/{topology.NAMESPACE}/frontend-0', 'meshctl top', 'meshctl ca status'; "
                  f"stop it with 'meshctl down' (--purge also removes {paths.state_dir}).")
    if failed:
        raise MeshProblem([f"{failed} of {len(results)} requests failed during the certificate rotation"])


def _plane_flag(args: Sequence[str], flag: str, default: str) -> str:
    items = list(args)
    return items[items.index(flag) + 1] if flag in items else default


def _rotate(paths: Paths) -> RotationResult:
    """Start a CA rotation and wait until every pod's SVID comes from the new generation."""
    from engine import Engine, Policy, start_ca_rotation

    store = Store(paths.url)
    try:
        engine = Engine(store, None, SystemClock(), policy=Policy(effect_lease=0), actor=f"cli:{getpass.getuser()}")
        begun = time.monotonic()
        new, old = start_ca_rotation(engine)
        deadline = begun + ROTATION_WAIT
        while True:
            pods = {v.pod for v in views.pods(store, SystemClock().now()) if v.state == "ready"}
            # `active`: the node agent served it to the pod's sidecar (picked up by the workload).
            owners_on_new = {c.owner for c in views.certs(store, SystemClock().now())
                             if c.owner in pods and c.generation == new and c.state == "active"}
            if pods and owners_on_new == pods:
                return RotationResult(old, new, len(owners_on_new), time.monotonic() - begun)
            if time.monotonic() > deadline:
                behind = sorted(pods - owners_on_new)
                raise MeshProblem([f"the CA rotation to generation {new} did not reach pod {p} within "
                                   f"{ROTATION_WAIT:g}s; see 'meshctl audit ca/{new}'" for p in behind])
            time.sleep(0.25)
    finally:
        store.close()
