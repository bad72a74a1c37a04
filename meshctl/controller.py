"""`meshctl controller`: the control plane on Kubernetes.

Theory of operation
-------------------
Every replica competes for the Lease (`--lease-name`, in `--namespace`); only the leader acts. When a replica starts
leading it starts, in order:

1. the control plane of engine/plane.py (engine and scheduler on `--db` or SQLite in the state directory, the mesh
   CA, the node agent's feed, NATS) with the Kubernetes platform (actions/kube.py: injection is confirmed, not done).
   Its NATS server is the mesh's NATS: it listens on `--nats-port` (4222) on every address of the pod, behind the
   chart's Service `meshloom-nats`, with a certificate for that Service's names (the name injected sidecars verify,
   `catalog.inject.NATS_SERVER_NAME`), and it maps each sidecar's SPIFFE ID to its own subjects
   (actions/meshnats.py). Only the leader runs it, and the Service reaches only ready pods: a follower's webhook
   port is closed, so it is never ready (the webhook opens after NATS, so a ready pod serves both);
2. the admission webhook (actions/webhook.py answering with catalog/inject.py, from the chart's values in
   `--injection-values`), with a serving certificate from the mesh CA for `<service>.<namespace>.svc`, and the
   `caBundle` of the MutatingWebhookConfiguration made the mesh's trust bundle. Both are checked every minute: the
   certificate is signed again at half its life, the caBundle written again when the bundle changed (a CA rotation);
3. the wiring (engine/kube.py), and one reflector per watched resource feeding it.

When it stops leading (it could not renew the Lease in time: another replica may lead now) it stops them in the
reverse order -- the reflectors first, so nothing more comes in -- and the command exits with status 1, for
Kubernetes to start it again as a follower, as client-go's controllers do. A stop (SIGTERM) releases the Lease, so
another replica takes over at once.

`Controller` is the composition, usable in a process of its own (`run`) or in tests.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from cryptography.hazmat.primitives import serialization

from actions.ca import CaSettings, pem
from actions.clock import Clock, SystemClock
from actions.errors import ActionError
from actions.kube import (
    WATCHED,
    ClientApi,
    KubeApi,
    KubeError,
    KubeLease,
    KubePlatform,
    LeaderElector,
    Reflector,
    Watched,
    namespace_labels,
    patch_webhook_ca_bundle,
)
from actions.webhook import WebhookServer
from catalog.inject import NATS_PORT, NATS_SERVICE, InjectionValues, admission_response
from engine.executor import bundled_generations
from engine.kube import KubeWiring, trim
from meshctl import logs
from store import Store

if TYPE_CHECKING:
    from engine.plane import ControlPlane

log = logging.getLogger("meshloom.controller")

WEBHOOK_TTL = 24 * 3600.0  # the webhook's serving certificate; signed again at half its life
NAMESPACE_READ_TIMEOUT = 2.0  # seconds for the webhook's read of a namespace it has not seen (its own timeout is 10)
CHECK_EVERY = 60.0  # seconds between looks at the webhook's certificate and the caBundle
LOST_LEADERSHIP = 1  # exit status when the Lease was lost: Kubernetes starts the replica again, as a follower


class ControllerProblem(Exception):
    """A setting or a file the controller cannot start with (one line, naming it)."""


@dataclass
class ControllerConfig:
    state_dir: Path
    namespace: str = "meshloom"
    identity: str = field(default_factory=lambda: os.environ.get("POD_NAME") or os.uname().nodename)
    ca: CaSettings = field(default_factory=CaSettings)
    injection: InjectionValues | None = None  # None: no webhook
    webhook_host: str = "0.0.0.0"
    webhook_port: int = 8443
    webhook_service: str = "meshloom-controller"
    webhook_configuration: str = "meshloom-injector"
    webhook_names: tuple[str, ...] = ()  # more DNS names for the serving certificate (tests: localhost)
    leader_elect: bool = True
    lease_name: str = "meshloom-controller"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    nats: bool = True
    nats_host: str = "0.0.0.0"  # every address of the pod: the Service meshloom-nats sends sidecars here
    nats_port: int = NATS_PORT  # 0: any free port (tests)
    nats_service: str = NATS_SERVICE
    tick_seconds: float = 1.0
    watch_timeout: float = 300.0
    watched: tuple[Watched, ...] = WATCHED

    @property
    def webhook_dns_names(self) -> tuple[str, ...]:
        svc = f"{self.webhook_service}.{self.namespace}"
        return (f"{svc}.svc", f"{svc}.svc.cluster.local", svc, self.webhook_service, *self.webhook_names)

    @property
    def nats_dns_names(self) -> tuple[str, ...]:
        """The names of the NATS server's certificate besides `localhost`: its Service's, the injected sidecars'
        `--nats-server-name` first."""
        svc = f"{self.nats_service}.{self.namespace}"
        return (f"{svc}.svc", f"{svc}.svc.cluster.local", svc, self.nats_service)


class Controller:
    """Leader election around the control plane, the webhook and the watches."""

    def __init__(self, api: KubeApi, store: Store, config: ControllerConfig, *, clock: Clock | None = None,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.api, self.store, self.config = api, store, config
        self.clock = clock or SystemClock()
        self.on_lost = on_lost  # None: a replica that lost the Lease competes again (tests)
        self.platform = KubePlatform(api, known=self._knows)
        self.plane: ControlPlane | None = None
        self.wiring: KubeWiring | None = None
        self.webhook: WebhookServer | None = None
        self.reflectors: list[Reflector] = []
        self.leading = threading.Event()
        self.led = 0  # terms led
        self._webhook_renew_at: datetime | None = None
        self._bundle: bytes = b""
        self._wiring_stop = threading.Event()
        self._wiring_thread: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self.elector: LeaderElector | None = None
        if config.leader_elect:
            self.elector = LeaderElector(
                KubeLease(api, config.namespace, config.lease_name), config.identity, clock=self.clock,
                lease_duration=config.lease_duration, renew_deadline=config.renew_deadline,
                retry_period=config.retry_period, on_started_leading=self._start_leading,
                on_stopped_leading=self._stop_leading)

    # ---- life ----------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        if self.elector is not None:
            self.elector.start()
        else:
            self._start_leading()

    def stop(self) -> None:
        self._stopping = True
        if self.elector is not None:
            self.elector.stop()  # stops leading (on_stopped_leading), then releases the Lease
        else:
            self._stop_leading()

    # ---- a term as leader --------------------------------------------------------------------------------------------
    def _start_leading(self) -> None:
        from engine.plane import ControlPlane, PlaneConfig  # NATS, gRPC: only for a leader

        with self._lock:
            cfg = self.config
            log.info("controller %s: leading; starting the control plane", cfg.identity)
            try:
                plane = ControlPlane(self.store, PlaneConfig(cfg.state_dir, cfg.ca, tick_seconds=cfg.tick_seconds,
                                                             nats_host=cfg.nats_host, nats_port=cfg.nats_port,
                                                             nats_names=cfg.nats_dns_names),
                                     clock=self.clock, platform=self.platform, nats=cfg.nats)
                self.plane = plane
                plane.start()
                if self._lost_while_starting():
                    return
                if cfg.injection is not None:
                    self._start_webhook(plane, cfg.injection)
                self._check_tls()
                plane.runner.scheduler.add_job(self._check_tls, "interval", seconds=CHECK_EVERY,
                                               id="meshloom-webhook-tls", max_instances=1, coalesce=True)
            except Exception:
                # A leader that cannot act must not keep the Lease: it stops competing, and the process exits for
                # Kubernetes to start it again (or, without election, the error reaches the command).
                log.exception("controller %s: the control plane could not start", cfg.identity)
                self._teardown()
                if self.elector is None:
                    raise
                self.elector.request_stop()
                self.on_lost()
                return
            if self._lost_while_starting():
                return
            wiring = KubeWiring(plane.engine)
            self.wiring = wiring
            self._wiring_stop = threading.Event()
            self._wiring_thread = threading.Thread(target=wiring.run, args=(self._wiring_stop,),
                                                   name="meshloom-kube-wiring", daemon=True)
            self._wiring_thread.start()
            self.reflectors = [Reflector(self.api, w, wiring.submit, transform=trim,
                                         watch_timeout=cfg.watch_timeout) for w in cfg.watched]
            for r in self.reflectors:
                r.start()
            self.led += 1
            self.leading.set()

    def _lost_while_starting(self) -> bool:
        """The start runs beside the Lease's renewals (actions/kube.py `LeaderElector`): if the Lease was lost
        meanwhile, nothing more is started; `on_stopped_leading`, which follows this start, stops what was."""
        if self.elector is None or self.elector.leading:
            return False
        log.warning("controller %s: the Lease was lost while the control plane started; stopping",
                    self.config.identity)
        return True

    def _stop_leading(self) -> None:
        with self._lock:
            if self.plane is None:
                return
            log.info("controller %s: no longer leading; stopping", self.config.identity)
            self._teardown()
        if not self._stopping and self.on_lost is not None:
            # As client-go's controllers do: a replica that lost the Lease exits rather than compete again with
            # whatever it may have missed in between.
            if self.elector is not None:
                self.elector.request_stop()
            self.on_lost()

    def _teardown(self) -> None:
        """Stop what a term started, the sources first: nothing more comes in, then nothing more runs."""
        self.leading.clear()
        for r in self.reflectors:
            r.stop()
        self.reflectors = []
        self._wiring_stop.set()
        if self._wiring_thread is not None:
            self._wiring_thread.join(timeout=10)
            self._wiring_thread = None
        self.wiring = None
        if self.webhook is not None:
            self.webhook.stop()
            self.webhook = None
        if self.plane is not None:
            self.plane.stop()
            self.plane = None

    def _knows(self, pod: str) -> bool | None:
        wiring = self.wiring
        return wiring.knows(pod) if wiring is not None else None

    # ---- the webhook -------------------------------------------------------------------------------------------------
    def _start_webhook(self, plane: ControlPlane, values: InjectionValues) -> None:
        cert, key = self._sign_webhook(plane)

        def handler(review: Any) -> Mapping[str, Any]:
            return admission_response(review, values, self._namespace_labels)

        self.webhook = WebhookServer(handler, cert, key, host=self.config.webhook_host, port=self.config.webhook_port)
        self.webhook.start()

    def _sign_webhook(self, plane: ControlPlane) -> tuple[bytes, bytes]:
        cfg = self.config
        spiffe_id = f"spiffe://{cfg.ca.trust_domain}/ns/{cfg.namespace}/sa/{cfg.webhook_service}"
        issued = plane.ca.sign_svid(spiffe_id, cfg.webhook_dns_names, WEBHOOK_TTL)
        self._webhook_renew_at = issued.not_before + (issued.not_after - issued.not_before) / 2
        key = issued.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption())
        return pem([issued.certificate, *issued.chain]), key

    def _check_tls(self) -> None:
        """The webhook's certificate signed again at half its life; the caBundle made current. (NATS keeps its own
        certificate and trust bundle current: engine/plane.py.)"""
        plane = self.plane
        if plane is None:
            return
        try:
            now = self.clock.now()
            if self.webhook is not None and self._webhook_renew_at is not None and now >= self._webhook_renew_at:
                self.webhook.set_certificate(*self._sign_webhook(plane))
            bundle = pem(plane.ca.trust_anchors(bundled_generations(plane.store)))
            if bundle != self._bundle:
                if self.config.injection is not None:
                    changed = patch_webhook_ca_bundle(self.api, bundle, self.config.webhook_configuration)
                    log.info("controller: caBundle of %s is the mesh's trust bundle (%d webhook(s) changed)",
                             self.config.webhook_configuration, changed)
                self._bundle = bundle
        except ActionError as exc:  # tried again at the next check, long before the certificate ends
            log.warning("controller: webhook TLS: %s", exc.reason)

    def _namespace_labels(self, name: str) -> Mapping[str, str] | None:
        """The labels the webhook decides by: the watch's, else (a Namespace created just before its pods, whose
        event is still in the wiring's batch window) read from the API server, briefly; None: unknown."""
        wiring = self.wiring
        if wiring is not None and wiring.namespaces_listed:
            labels = wiring.namespaces.get(name)
            if labels is not None:
                return labels
        return namespace_labels(self.api, name, timeout=NAMESPACE_READ_TIMEOUT)

    # ---- for tests ---------------------------------------------------------------------------------------------------
    def wait_leading(self, timeout: float) -> bool:
        return self.leading.wait(timeout)


# ---- the command --------------------------------------------------------------------------------------------------
def load_values(path: Path) -> tuple[InjectionValues, CaSettings]:
    """The chart's injection values (the ConfigMap's file): what the webhook injects, and the CA's settings."""
    from catalog.inject import InjectionValuesError

    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ControllerProblem(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ControllerProblem(f"{path}: not YAML ({' '.join(str(exc).split())})") from None
    try:
        values = InjectionValues.from_values(raw, str(path))
    except InjectionValuesError as exc:
        raise ControllerProblem(str(exc)) from None
    mtls = raw.get("mtls") if isinstance(raw, dict) else None
    mtls = mtls if isinstance(mtls, dict) else {}
    try:
        ca = CaSettings.from_flags(trust_domain=values.trust_domain, key_type=str(mtls.get("keyType", "ec-p256")),
                                   svid_ttl=str(mtls.get("svidTTL", "1h")), ca_ttl=str(mtls.get("caTTL", "720h")))
    except ValueError as exc:
        raise ControllerProblem(f"{path}: mtls: {exc}") from None
    return values, ca


def run(*, kubeconfig: Path | None, db_url: str, config: ControllerConfig, log_level: str = "info",
        run_for: float | None = None) -> int:
    """The foreground command; returns its exit status."""
    from store import migrate

    logs.setup(meshloom_level=getattr(logging, log_level.upper(), logging.INFO))
    # A world recomputation that outlasts its 100 ms interval is skipped, not queued: worth no warning each time.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    try:
        api = ClientApi.connect(kubeconfig)
    except KubeError as exc:
        raise ControllerProblem(str(exc)) from None
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    migrate.upgrade(db_url)
    store = Store(db_url)
    stop = threading.Event()
    lost = threading.Event()

    def on_lost() -> None:
        lost.set()
        stop.set()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    before = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    controller = Controller(api, store, config, on_lost=on_lost)
    print(f"meshloom controller {config.identity}: namespace {config.namespace}, "
          f"{'competing for Lease ' + config.lease_name if config.leader_elect else 'leading (no election)'}",
          file=sys.stderr)
    try:
        try:
            controller.start()
        except ActionError as exc:  # without election: the control plane could not start (a port taken, ...)
            raise ControllerProblem(exc.reason) from None
        stop.wait(run_for)
    finally:
        controller.stop()
        store.close()
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if lost.is_set():
        print(f"meshloom controller {config.identity}: lost the Lease; exiting to start again as a follower",
              file=sys.stderr)
        return LOST_LEADERSHIP
    return 0


def start_metrics(port: int) -> Callable[[], None]:
    """Prometheus metrics of the process on `port` (0: none); returns how to stop them."""
    if port <= 0:
        return lambda: None
    from prometheus_client import start_http_server

    server, thread = start_http_server(port)

    def stop() -> None:
        server.shutdown()
        thread.join(timeout=5)

    return stop


def parse_seconds(text: str, flag: str) -> float:
    from actions.ca import CaConfigError, parse_duration

    try:
        return parse_duration(text, flag=flag)
    except CaConfigError as exc:
        raise ControllerProblem(str(exc)) from None


def _kubeconfig(flag: Path | None) -> Path | None:
    """--kubeconfig; else in-cluster when running in a pod; else $KUBECONFIG or ~/.kube/config."""
    if flag is not None:
        return flag
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    return Path(os.environ.get("KUBECONFIG") or Path.home() / ".kube" / "config")


def controller_command(
    kubeconfig: Annotated[Path | None, typer.Option(help="kubeconfig of the cluster [default: in-cluster in a pod, "
                                                         "else $KUBECONFIG or ~/.kube/config]",
                                                    show_default=False)] = None,
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="namespace of the control plane (its Lease "
                                                                     "and Services)")] = "meshloom",
    db: Annotated[str | None, typer.Option("--db", help="database URL [default: SQLite in the state directory]",
                                           show_default=False)] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="state directory [default: "
                                                                       "$MESHLOOM_STATE_DIR, else "
                                                                       "~/.local/state/meshloom]",
                                                   show_default=False)] = None,
    injection_values: Annotated[Path | None, typer.Option(help="the chart's injection values (the ConfigMap "
                                                               "meshloom-injection's values.yaml); without it, no "
                                                               "webhook")] = None,
    webhook_port: Annotated[int, typer.Option(help="HTTPS port of the admission webhook", min=0,
                                              max=65535)] = 8443,
    webhook_service: Annotated[str, typer.Option(help="the webhook's Service (its certificate's DNS name is "
                                                      "<service>.<namespace>.svc)")] = "meshloom-controller",
    webhook_configuration: Annotated[str, typer.Option(help="the MutatingWebhookConfiguration whose caBundle is "
                                                            "kept current")] = "meshloom-injector",
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port (0: none)", min=0, max=65535)] = 0,
    leader_elect: Annotated[bool, typer.Option(help="compete for a Lease; only the leader acts")] = True,
    lease_name: Annotated[str, typer.Option(help="the coordination.k8s.io Lease")] = "meshloom-controller",
    lease_duration: Annotated[str, typer.Option(help="how long a Lease not renewed holds")] = "15s",
    renew_deadline: Annotated[str, typer.Option(help="how long a leader tries to renew before it gives up")] = "10s",
    retry_period: Annotated[str, typer.Option(help="time between tries to take or renew the Lease")] = "2s",
    identity: Annotated[str | None, typer.Option("--id", help="this replica's name in the Lease [default: "
                                                              "$POD_NAME, else the host name]",
                                                 show_default=False)] = None,
    nats_port: Annotated[int, typer.Option(help="port of the mesh's NATS server (mutual TLS), on every address, "
                                           "behind the Service meshloom-nats; 0: any free port", min=0,
                                           max=65535)] = NATS_PORT,
    nats_host: Annotated[str, typer.Option(help="address the NATS server listens on (the pod's every address: "
                                                "the Service reaches it there)")] = "0.0.0.0",
    nats_url: Annotated[str | None, typer.Option(help="where sidecars reach NATS (informational)",
                                                 show_default=False)] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
    run_for: Annotated[float | None, typer.Option("--for", help="stop after this many seconds", min=0)] = None,
) -> None:
    """Run the control plane on Kubernetes: leader election on a Lease, then the engine, the mesh CA, the admission
    webhook and the watches of Pods, Services, Endpoints, Namespaces, the SMI and NGINX Service Mesh policies and
    MeshConfig."""
    from meshctl.context import resolve

    try:
        if log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ControllerProblem(f"--log-level: must be debug, info, warning or error, got {log_level!r}")
        values, ca = load_values(injection_values) if injection_values is not None else (None, CaSettings())
        paths = resolve(state_dir, db)
        config = ControllerConfig(
            state_dir=paths.state_dir, namespace=namespace, ca=ca, injection=values, webhook_port=webhook_port,
            webhook_service=webhook_service, webhook_configuration=webhook_configuration,
            leader_elect=leader_elect, lease_name=lease_name,
            lease_duration=parse_seconds(lease_duration, "--lease-duration"),
            renew_deadline=parse_seconds(renew_deadline, "--renew-deadline"),
            retry_period=parse_seconds(retry_period, "--retry-period"), nats_host=nats_host, nats_port=nats_port)
        if identity:
            config.identity = identity
        if not config.retry_period < config.renew_deadline < config.lease_duration:
            raise ControllerProblem("--retry-period < --renew-deadline < --lease-duration must hold")
        ports = [p for p in (webhook_port, metrics_port, nats_port) if p]
        if len(set(ports)) < len(ports):
            raise ControllerProblem("--webhook-port, --metrics-port and --nats-port must differ")
        if nats_url:
            log.info("sidecars reach NATS at %s", nats_url)
        stop_metrics = start_metrics(metrics_port)
        try:
            code = run(kubeconfig=_kubeconfig(kubeconfig), db_url=paths.url, config=config, log_level=log_level,
                       run_for=run_for)
        finally:
            stop_metrics()
    except ControllerProblem as exc:
        print(f"meshctl: {' '.join(str(exc).split())}", file=sys.stderr)
        raise typer.Exit(2) from None
    if code:
        raise typer.Exit(code)
