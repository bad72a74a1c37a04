"""The mesh on one Linux host: the local platform, and the control plane composed with it (`meshctl up`).

Theory of operation
-------------------
On Kubernetes the platform is the API server and its kubelets; on one host it is this module, a small kubelet that
plays it for the pods of a mesh manifest. `meshctl up -f` validates the manifest, stores its world (Namespaces,
Pods with their addresses, Services with their virtual addresses, policies) as one change, and writes the desired
pods to `<state>/local/mesh.json` (`save_desired`): the command of each pod is the local platform's business, not the
catalog's. The control plane (`LocalHost`) reads that file whenever it changes.

The pod lifecycle machine (machines/pod.py) drives every meshed pod; the platform produces the facts it waits for,
each where a kubelet would:

    machine state            what the platform does                                       trigger it fires
    none / gone              -                                                            admit
    admitted                 InjectSidecar (an effect): the namespace at the pod's        (injected: the
                             address with its init rules, its Workload API socket,         effect's outcome)
                             the workload and the sidecar
    injected                 -                                                            schedule (node, ip)
    identity-issued          the sidecar's liveness probe answers                         sidecar_connected
    config-synced            the sidecar's readiness probe answers 200 and the workload   ready
                             listens on its ports
    live, its manifest entry -                                                            terminate
      changed (another uid)
    any live state           keeps the namespace, the socket and both processes; one
                             that died is started again, with a backoff (1 s doubling to
                             30 s) when it keeps dying
    live, not desired        -                                                            terminate
    terminating              TeardownPod (an effect): processes, namespace, socket        (gone: its outcome)

`reconcile` is one pass of that table over every desired pod, run every `RECONCILE_EVERY` seconds by the plane's
scheduler; a pod outside the mesh (`meshed: false`) gets its namespace, its workload, and the rules that send its
connections to Service addresses on to their endpoints (kube-proxy's part; a meshed pod's sidecar does that
itself), installed again when the manifest changes. Each pass also writes
`<state>/local/status.json`: per pod its machine state, its processes (pid, restarts, how the last one ended) and
the problem in words, which `meshctl up` prints for a pod that does not become ready.

A restart adopts what runs: the namespaces are found by name (HostNetwork.ensure), the processes by their pid files
(LocalPods), the node agent gets every socket back at the first pass and every serving SVID from the plane
(`redeliver`), NATS comes back on the same address (the port is kept in `network.json`), and the machines resume
where the store says they are. The sidecars keep serving on their last configuration and certificates meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from actions.ca import CaSettings
from actions.errors import ActionError
from actions.iptables import InitSettings
from actions.localpods import APP_UID, SIDECAR_UID, LocalPods, PodProcess, PodRuntime
from actions.localstate import (
    Desired,
    DesiredPod,
    LocalNetwork,
    desired_stamp,
    load_desired,
    save_network,
    save_status,
)
from actions.netns import HostNetwork
from actions.nodeagent import endpoint_socket
from catalog.inject import IGNORE_INCOMING_ANNOTATION, IGNORE_OUTGOING_ANNOTATION, parse_ports
from catalog.world import ServiceRoute, service_routes
from engine import world
from engine.core import Engine
from engine.plane import ControlPlane, PlaneConfig
from machines import BadPayload, IllegalTrigger
from machines import pod as pod_machine
from store import Store

log = logging.getLogger("meshloom.local")

NODE = "local"
RECONCILE_EVERY = 0.25  # seconds: a probe of the pods still starting and a look at /proc for the others
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0  # seconds before a process that died is started again
DRAIN_SECONDS = 2.0  # a sidecar stopped by `down` drains this long
LIVE = tuple(s.value for s in pod_machine.LIVE)
BACKOFF_RESET = 600.0  # seconds a process must run before its next death starts the backoff over (as a kubelet)
ROUTES_RETRY = 10.0  # seconds before a failed install of a pod's Service routes is tried again (not every pass)
WORKERS = 8  # effect workers: injections and teardowns wait on ip, iptables and processes, not on the CPU


# ---- the world of the mesh
def stored_addresses(store: Store) -> dict[str, str]:
    """The addresses the stored world gives: "pod/<ns>/<name>" -> podIP, "service/<ns>/<name>" -> clusterIP."""
    out: dict[str, str] = {}
    for r in store.resources():
        body = r.body
        if r.kind == "pod" and (ip := (body.get("status") or {}).get("podIP")):
            out[f"pod/{r.namespace}/{r.name}"] = str(ip)
        elif r.kind == "service" and (ip := (body.get("spec") or {}).get("clusterIP")):
            out[f"service/{r.namespace}/{r.name}"] = str(ip)
    return out


def store_world(store: Store, manifests: Sequence[Mapping[str, Any]], previous: Desired, *,
                actor: str, now: Any) -> tuple[tuple[str, str, str], ...]:
    """Store the mesh's world as one change, removing what the previous manifest stored and this one does not;
    returns what it stores now, for the next time."""
    import catalog

    refs = tuple((r.kind.lower(), r.namespace, r.name) for r in catalog.parse_all(list(manifests)))
    gone = [r for r in previous.resources if r not in set(refs)]
    world.apply(store, manifests, actor=actor, now=now, remove=gone)
    return refs


# ---- the platform ---------------------------------------------------------------------------------------------
@dataclass
class _Proc:
    restarts: int = 0
    not_before: float = 0.0
    backoff: float = BACKOFF_FIRST
    last_exit: str = ""
    started_at: float = 0.0


@dataclass
class _PodWatch:
    procs: dict[str, _Proc] = field(default_factory=lambda: {"app": _Proc(), "sidecar": _Proc()})
    problem: str = ""


class Workloads(Protocol):
    """The node agent, as the platform uses it: each meshed pod's Workload API socket."""

    def add_workload(self, owner: str, uid: int | None = None) -> Path: ...

    def remove_workload(self, owner: str, grace: float = 0.5) -> None: ...


class LocalPlatform:
    """The pods of one host: `inject` / `teardown` for the pod machine's effects, `reconcile` for the rest.
    `bind` gives it the engine it fires triggers into, the node agent and where the sidecars find NATS."""

    def __init__(self, pods: PodRuntime, state_dir: Path, meshctl: str, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.pods = pods
        self._monotonic = monotonic  # the restart backoff's clock (a fake one in unit tests)
        self.state_dir = state_dir
        self.meshctl = meshctl
        self.engine: Engine | None = None
        self.agent: Workloads | None = None
        self.nats_url: Callable[[], str] = lambda: ""
        self._desired = Desired()
        self._desired_stamp: tuple[int, int, int] | None = None
        self._hosts_stamp: tuple[int, int, int] | None = None
        self._routes: tuple[ServiceRoute, ...] = ()  # Service addresses to endpoints, for pods without a sidecar
        self._routed: dict[str, tuple[ServiceRoute, ...]] = {}  # what each such pod has installed
        self._route_failures: dict[str, tuple[float, str]] = {}  # pod -> (when to try again, why it failed)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._watch: dict[str, _PodWatch] = {}

    def bind(self, engine: Engine, agent: Workloads, nats_url: Callable[[], str]) -> None:
        self.engine, self.agent, self.nats_url = engine, agent, nats_url

    # ---- what is wanted
    def desired(self) -> Desired:
        stamp = desired_stamp(self.state_dir)
        if stamp != self._desired_stamp:
            self._desired = load_desired(self.state_dir) if stamp is not None else Desired()
            self._desired_stamp = stamp
        return self._desired

    def _pod(self, key: str) -> DesiredPod | None:
        return next((p for p in self.desired().pods if p.key == key), None)

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    # ---- the pod machine's effects
    def inject(self, pod: str) -> None:
        """The pod's namespace, init rules, socket, workload and sidecar (each kept if already there)."""
        with self._lock(pod):
            wanted = self._pod(pod)  # read under the lock: a teardown that held it may have been for a removal
            if wanted is None:
                raise ActionError(f"pod {pod}: not in the mesh manifest any more")
            assert self.engine is not None, "bind() first"
            row = self.engine.store.get("pod", pod)
            if row is not None and row.state != "admitted":
                return  # a late run of the effect (the pod was reset, terminated, or injected already)
            # Everything again, even for a namespace that exists: a control plane killed halfway through an
            # injection left it without its rules or directory, and `create` is idempotent.
            self._ensure(wanted, sidecar=True, finish=True)

    def teardown(self, pod: str) -> None:
        with self._lock(pod):
            self.pods.remove(pod)
            if self.agent is not None:
                self.agent.remove_workload(pod)
            self._watch.pop(pod, None)

    # ---- one pass
    def reconcile(self) -> None:
        assert self.engine is not None, "bind() first"
        desired = self.desired()
        if self._desired_stamp != self._hosts_stamp:  # Services may have come or gone: every pod's names again
            for pod in desired.pods:
                with self._lock(pod.key):
                    self.pods.write_hosts(pod.key, desired.hosts(pod.namespace))
            if any(not pod.meshed for pod in desired.pods):  # only they need the routes: no world read otherwise
                self._routes = service_routes(world.load_world(self.engine.store))
            self._hosts_stamp = self._desired_stamp
        rows = {r.key: r for r in self.engine.store.list("pod")}
        status: dict[str, Any] = {}
        wanted = {p.key for p in desired.pods}
        for pod in desired.pods:
            row = rows.get(pod.key)
            state = row.state if row is not None else None
            lock = self._lock(pod.key)
            if not lock.acquire(blocking=False):  # its injection or teardown runs: the next pass looks again
                status[pod.key] = self._status(pod, state, row.data if row is not None else {})
                continue
            try:
                self._step(pod, state, row.data if row is not None else {})
            except ActionError as exc:
                self._watch.setdefault(pod.key, _PodWatch()).problem = str(exc)
                log.warning("pod %s: %s", pod.key, exc)
            except Exception as exc:  # one pod's trouble must not stop the others' pass
                self._watch.setdefault(pod.key, _PodWatch()).problem = f"{type(exc).__name__}: {exc}"
                log.exception("pod %s: reconciling failed", pod.key)
            finally:
                lock.release()
            status[pod.key] = self._status(pod, state, row.data if row is not None else {})
        for key, row in rows.items():
            if key not in wanted and row.state in (*LIVE, "failed"):
                self._fire(key, "terminate", {"reason": "removed from the mesh manifest"})
        for net in self.pods.network.pods():  # pods outside the mesh that left the manifest
            key = net.name.replace("_", "/", 1)
            if key not in wanted and (key not in rows or rows[key].state == "gone"):
                with self._lock(key):
                    self.pods.remove(key)
                    self._forget_routes(key)
        save_status(self.state_dir, status)

    def _step(self, pod: DesiredPod, state: str | None, data: Mapping[str, Any]) -> None:
        if not pod.meshed:
            if state in (*LIVE, "failed"):  # it was meshed: that pod's life ends first, a new one replaces it
                self._fire(pod.key, "terminate", {"reason": "its entry in the mesh manifest changed: a new pod "
                                                            "replaces it"})
            elif state != "terminating":
                self._ensure(pod, sidecar=False)
            return
        if state in (None, "gone"):
            self._fire(pod.key, "admit", {"namespace": pod.namespace, "name": pod.name, "uid": pod.uid,
                                          "service_account": pod.service_account, "labels": dict(pod.labels)})
            return
        if state != "terminating" and data.get("uid") and data["uid"] != pod.uid:
            self._fire(pod.key, "terminate", {"reason": "its entry in the mesh manifest changed: a new pod replaces "
                                                        "it"})
            return
        if state == "injected":
            self._fire(pod.key, "schedule", {"node": NODE, "ip": pod.ip})
            return
        if state in ("admitted", "terminating", "failed"):
            return  # the injection effect is on its way, the teardown is, or an operator decides
        self._ensure(pod, sidecar=True)
        if state == "identity-issued" and self.pods.probe(pod.ip, "/live") == 200:
            self._fire(pod.key, "sidecar_connected", {}, actor="sidecar")
        elif state == "config-synced" and self._app_ready(pod) and self.pods.probe(pod.ip, "/ready") == 200:
            self._fire(pod.key, "ready", {})

    def _app_ready(self, pod: DesiredPod) -> bool:
        """Ready as Kubernetes means it: every container, the workload too (listening on its ports)."""
        return not pod.command or self.pods.listening(pod.key, pod.ports)

    def _ensure(self, pod: DesiredPod, *, sidecar: bool, finish: bool = False) -> None:
        """The pod's namespace (made, or finished when `finish` or when it was not made for this incarnation),
        its socket and its processes."""
        assert self.agent is not None, "bind() first"
        watch = self._watch.setdefault(pod.key, _PodWatch())
        net = self.pods.net(pod.key)
        made_for = self.pods.uid_of(pod.key)
        if net is not None and made_for not in (None, pod.uid):
            # Made for another incarnation: a pod outside the mesh whose entry changed, or one that joins the mesh
            # (a meshed pod's own entry changes end its machine's life first, whose teardown removes it). A new one
            # replaces it, with nothing of the old one: processes, rules.
            self.pods.remove(pod.key)
            self._forget_routes(pod.key)
            self._watch[pod.key] = watch = _PodWatch()
            net = None
        if finish or net is None or str(net.ip) != pod.ip or made_for != pod.uid:
            self.pods.create(pod.key, pod.ip, self.desired().hosts(pod.namespace),
                             init=_init_settings(pod) if pod.meshed else None, uid=pod.uid)
            self._forget_routes(pod.key)
        socket = self.agent.add_workload(pod.key, uid=SIDECAR_UID) if sidecar else None
        watch.problem = ""
        if not pod.meshed:
            self._route_services(pod, watch)  # before the workload starts: it may call a Service at once
        if pod.command:
            self._keep_running(pod, "app", PodProcess(pod.command, APP_UID, (
                ("POD_NAME", pod.name), ("POD_NAMESPACE", pod.namespace), ("POD_IP", pod.ip),
                ("SERVICE_ACCOUNT", pod.service_account), *pod.env)), watch)
        if socket is not None:
            argv = (self.meshctl, "sidecar", "--sidecar", pod.key, "--workload-socket", endpoint_socket(socket),
                    "--nats-url", self.nats_url(), "--run-dir", str(self.pods.pod_dir(pod.key) / "sidecar"),
                    "--drain-seconds", f"{DRAIN_SECONDS:g}")
            self._keep_running(pod, "sidecar", PodProcess(argv, SIDECAR_UID, (("HOME", "/"),)), watch)

    def _forget_routes(self, key: str) -> None:
        """The pod's namespace is gone or new: its routes (and any failure to install them) are history."""
        self._routed.pop(key, None)
        self._route_failures.pop(key, None)

    def _route_services(self, pod: DesiredPod, watch: _PodWatch) -> None:
        """Service addresses to their endpoints in a pod without a sidecar, when they changed; a failed install is
        tried again after ROUTES_RETRY, its reason kept in the pod's problem meanwhile."""
        if self._routed.get(pod.key) == self._routes:
            return
        failed = self._route_failures.get(pod.key)
        if failed is not None and self._monotonic() < failed[0]:
            watch.problem = failed[1]
            return
        try:
            self.pods.route_services(pod.key, self._routes)
        except ActionError as exc:
            watch.problem = f"its Service routes: {exc}"
            self._route_failures[pod.key] = (self._monotonic() + ROUTES_RETRY, watch.problem)
            log.warning("pod %s: %s", pod.key, watch.problem)
            return
        self._routed[pod.key] = self._routes
        self._route_failures.pop(pod.key, None)

    def _keep_running(self, pod: DesiredPod, role: str, process: PodProcess, watch: _PodWatch) -> None:
        proc = watch.procs[role]
        now = self._monotonic()
        if self.pods.running(pod.key, role) is not None:
            if proc.backoff > BACKOFF_FIRST and now - proc.started_at > BACKOFF_RESET:
                proc.backoff = BACKOFF_FIRST  # it has run long enough: its next death is not a crash loop's
            return
        if self.pods.started_before(pod.key, role):
            ended = self.pods.exited(pod.key, role)
            how = f"exited with {ended.code}" if ended.code is not None else "is not running"
            proc.last_exit = f"{how}{': ' + ended.last_line if ended.last_line else ''}"
            if now < proc.not_before:
                watch.problem = f"its {role} {proc.last_exit}; starting it again in {proc.not_before - now:.0f}s"
                return
            proc.restarts += 1
            log.warning("pod %s: its %s %s; starting it again (restart %d)", pod.key, role, proc.last_exit,
                        proc.restarts)
            proc.not_before = now + proc.backoff
            proc.backoff = min(proc.backoff * 2, BACKOFF_MAX)
        self.pods.start(pod.key, role, process)
        proc.started_at = now

    def _status(self, pod: DesiredPod, state: str | None, data: Mapping[str, Any]) -> dict[str, Any]:
        watch = self._watch.get(pod.key, _PodWatch())
        procs = {role: {"pid": self.pods.running(pod.key, role), "restarts": p.restarts, "last_exit": p.last_exit}
                 for role, p in watch.procs.items()}
        problem = watch.problem or (str(data.get("failure", "")) if state == "failed" else "")
        ready = state == "ready" if pod.meshed else self.pods.net(pod.key) is not None and self._app_ready(pod)
        return {"state": state if pod.meshed else "unmeshed", "ready": ready, "ip": pod.ip, "processes": procs,
                "problem": problem}

    def _fire(self, key: str, trigger: str, payload: dict[str, Any], actor: str = "platform") -> None:
        assert self.engine is not None, "bind() first"
        try:
            self.engine.fire("pod", key, trigger, payload, actor=actor, drain=False)
        except (IllegalTrigger, BadPayload) as exc:  # the machine moved on meanwhile: the next pass sees it
            log.info("pod %s %s ignored: %s", key, trigger, exc)


def _init_settings(pod: DesiredPod) -> InitSettings:
    annotations = dict(pod.annotations)
    incoming = parse_ports(annotations.get(IGNORE_INCOMING_ANNOTATION, ""), IGNORE_INCOMING_ANNOTATION)
    outgoing = parse_ports(annotations.get(IGNORE_OUTGOING_ANNOTATION, ""), IGNORE_OUTGOING_ANNOTATION)
    base = InitSettings()
    return InitSettings(ignore_incoming_ports=(*base.ignore_incoming_ports, *incoming),
                        ignore_outgoing_ports=(*base.ignore_outgoing_ports, *outgoing))


# ---- the control plane with its platform -----------------------------------------------------------------------
class LocalHost:
    """`meshctl up` on a state directory with a local mesh: the bridge first (NATS listens on its address), then
    the control plane, then the reconcile pass on the plane's scheduler."""

    def __init__(self, store: Store, state_dir: Path, ca: CaSettings, net: LocalNetwork, *, meshctl: str,
                 bin_dir: Path | None, tick_seconds: float = 1.0) -> None:
        self.state_dir, self.net = state_dir, net
        network = HostNetwork(net.prefix, net.network)
        self.pods = LocalPods(network, net.runtime_dir, state_dir / "logs", bin_dir=bin_dir)
        self.platform = LocalPlatform(self.pods, state_dir, meshctl)
        self.plane = ControlPlane(store, PlaneConfig(
            state_dir, ca, tick_seconds=tick_seconds, nats_host=str(net.gateway), nats_port=net.nats_port,
            agent_dir=net.runtime_dir / "agent", workers=WORKERS), platform=self.platform)
        plane = self.plane
        self.platform.bind(plane.engine, plane.agent, lambda: plane.nats.url if plane.nats is not None else "")

    def start(self) -> None:
        self.pods.prepare()
        self.plane.start()
        assert self.plane.nats is not None
        port = int(self.plane.nats.url.rsplit(":", 1)[1])
        if port != self.net.nats_port:  # the sidecars dial this address: the next control plane listens there too
            self.net = LocalNetwork(self.net.prefix, self.net.subnet, port)
            save_network(self.state_dir, self.net)
        self.plane.runner.scheduler.add_job(self._pass, "interval", seconds=RECONCILE_EVERY, id="meshloom-local",
                                            max_instances=1, coalesce=True)

    def _pass(self) -> None:
        try:
            self.platform.reconcile()
        except Exception:
            log.exception("the local platform's pass failed; the next one tries again")

    def stop(self) -> None:
        """The control plane stops; the pods keep running (`meshctl down` stops them)."""
        self.plane.stop()
