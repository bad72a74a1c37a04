"""The sidecar agent (`meshctl sidecar`): one workload's identity, configuration and HAProxy, side by side.

Theory of operation
-------------------
Two feeds drive one proxy:

    Workload API --X.509 context--> SVID + bundle --files, Proxy.update_svid--> HAProxy (runtime API, no reload)
                                                  --TLS context-------------> NATS (next connection; at once on a
                                                                               new bundle)
    NATS (ConfigClient) --document, shards--> render (pure) --> Proxy.start | Proxy.apply --> ack

1. **The SVID first.** The agent follows the Workload API with py-spiffe's `WorkloadApiClient.stream_x509_contexts`
   rather than an `X509Source`: a source blocks in its constructor until the first SVID and closes for good on an
   unretryable error, where the agent must answer its readiness probe meanwhile and must come back after any error
   (it opens a new stream after a pause). Each context becomes `svid.pem` (leaf, intermediates, PKCS#8 key: HAProxy's
   crt format) and `bundle.pem` (the trust domain's roots, sorted so that equal bundles are equal bytes) in the run
   directory, written atomically and owned by the proxy's uid (the key 0600), and the NATS client's TLS context is
   built from those files. The same SVID arriving again (a stream reopened) changes nothing.
2. **Then the configuration.** The `ConfigClient` starts once the first SVID is there, since the SVID is its client
   certificate. Its `apply(document, shards)` renders HAProxy's configuration (`sidecar.haproxy.render`); the first
   document starts HAProxy, later ones go through `Proxy.apply`, which changes servers, weights and maps through the
   runtime API and reloads (without dropping connections) only when the structure changed. Both return only once
   HAProxy runs the configuration and raise otherwise, and `ConfigClient` acknowledges a generation only after
   `apply` returned: an acknowledged generation is one HAProxy runs.
3. **Rotations.** A new SVID or bundle while HAProxy runs goes to `Proxy.update_svid` (`set ssl cert` / `set ssl
   ca-file` and their commits: same worker, no reload), and to NATS as a fresh TLS context for its next connection.
   A changed bundle also reconnects NATS at once, so that the connection is authenticated again under the new trust
   and a session made under a retired root does not outlive it.
4. **Readiness** (USERS #1), `GET /ready` on the admin port, names each of the three facts that is missing (codes
   `svid`, `config`, `proxy`, with what each waits for in words), and `draining` once a stop began:

        SVID present and unexpired | first configuration applied | HAProxy running | not draining -> /ready
        yes                        | yes                         | yes             | yes          -> 200
        any "no"                                                                                 -> 503, each
                                                                                                    missing one named
5. **Supervision.** Every `supervise_interval` the agent starts HAProxy again (with the last configuration and the
   current SVID) if it died, and retries an `update_svid` that failed, so that no rotation is lost to one bad call.
6. **Stopping** (USERS #2 and #10): `POST /shutdown` (a Job's workload is done) and SIGTERM both drain: readiness
   turns 503, the configuration feed stops, `Proxy.stop(drain_seconds)` stops accepting and lets connections in
   flight finish, then the Workload API stream and the admin server close and `wait()` returns. `POST /shutdown`
   is served only from loopback (the workload, inside the pod); any other client gets 403, since the admin port is
   never redirected and so no mTLS guards it.
7. **A restart** (the agent killed and started again) begins from nothing: the SVID from the Workload API, the
   current document from NATS (not a replay), a fresh HAProxy. HAProxy runs in a session of its own, so a SIGKILL
   of the agent leaves it serving (with the configuration it had) until the agent is back. The new agent finds it
   by its pid file and command line at start and soft-stops it at once (SIGUSR1: it stops accepting, connections
   in flight go on); right before its own HAProxy starts, whatever is left of it is killed, so the two never
   share a port or an abstract socket. The control plane sees the current generation acknowledged again; only
   connections still open at that moment are lost.

**The app's HTTP probes in strict mode.** The kubelet has no SVID, so once inbound traffic must be mutual TLS it
cannot reach the app's `httpGet` probes any more; the injector points them at this agent's admin port instead, at
`/app-health/<container>/<livez|readyz|startupz>`, and hands the originals over (`--app-probes`, from the env
MESHLOOM_APP_PROBES: that path -> `{port, path, scheme, httpHeaders}`). A GET there is the kubelet's probe made
from inside the pod: to 127.0.0.1:<port><path> with the headers (and the kubelet's User-Agent and Accept unless
they name their own), within `app_probe_timeout`, answered with the app's status code and the start of its body;
an https probe does not verify the app's certificate, as the kubelet does not. An app that does not answer is a
503 naming why; a path the injector did not write is a 404.

Metrics: HAProxy's own Prometheus exporter serves the proxy's series on the metrics port (15090); the agent's own
series (`meshloom_sidecar_*`: configuration generation, applies by outcome, reloads, runtime updates, proxy starts,
SVID rotations, seconds to SVID expiry, readiness) are on the admin port at `GET /metrics`, from a registry of its
own. `GET /status` gives the same facts as JSON (`serial`: the SVID held; `proxy_serial`: the one HAProxy was
given), `GET /live` answers 200 while the agent serves.
"""

from __future__ import annotations

import contextlib
import enum
import http.client
import ipaddress
import json
import logging
import os
import shutil
import signal
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from spiffe import WorkloadApiClient
from spiffe.workloadapi.x509_context import X509Context

from catalog.inject import APP_HEALTH_PREFIX
from catalog.subjects import inbox_prefix
from sidecar.config import Apply, ConfigClient, tls_context
from sidecar.haproxy import ProxyConfig, ProxyPaths, ProxyPorts, render

log = logging.getLogger("meshloom.sidecar.agent")

ADMIN_PORT = 15021
SIDECAR_UID = 2102  # as NGINX Service Mesh; the init step's iptables rules exclude this uid's own traffic
# Seconds before a Workload API stream that ended with an error is opened again: long enough not to spin on a
# broken agent, short next to an SVID's life (py-spiffe itself retries unavailable sockets with its own backoff).
SVID_RETRY = 1.0
# Seconds an app's probe may take: the kubelet's own timeout (1 s unless the probe says more) ends its wait first;
# this only bounds the thread that waits for an app that hangs.
APP_PROBE_TIMEOUT = 5.0
APP_PROBE_BODY = 10 * 1024  # bytes of the app's answer passed on, as much as the kubelet reads of it
PROBE_USER_AGENT = "kube-probe/meshloom"  # the kubelet's is kube-probe/<version>: apps that look for it find it


class SidecarError(RuntimeError):
    """The agent cannot run as asked (its admin port is taken, its run directory unusable); one line."""


class Missing(enum.StrEnum):
    """What readiness can miss: stable codes, in the order the probe lists them."""

    SVID = "svid"
    CONFIG = "config"
    PROXY = "proxy"
    DRAINING = "draining"


class AppProbesError(ValueError):
    """The app's probes as handed over cannot be used (one line, naming the probe and the field)."""


@dataclass(frozen=True, slots=True)
class AppProbe:
    """One of the app's httpGet probes as the pod declared it (port resolved to its number by the injector)."""

    port: int
    path: str = "/"
    scheme: str = "HTTP"  # HTTP | HTTPS
    headers: tuple[tuple[str, str], ...] = ()


def parse_app_probes(text: str) -> dict[str, AppProbe]:
    """The injector's MESHLOOM_APP_PROBES (catalog.inject): a JSON object, rewritten path -> the original probe's
    `{port, path, scheme, httpHeaders: [{name, value}]}`. AppProbesError names what is wrong."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise AppProbesError(f"not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise AppProbesError("must be a JSON object: /app-health/<container>/<probe> -> the original probe")
    probes: dict[str, AppProbe] = {}
    for key, value in raw.items():
        if not key.startswith(APP_HEALTH_PREFIX) or len(key) == len(APP_HEALTH_PREFIX):
            raise AppProbesError(f"{key!r} is not a path under {APP_HEALTH_PREFIX}")
        if not isinstance(value, dict):
            raise AppProbesError(f"{key}: must be an object with port, path, scheme and httpHeaders")
        port = value.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise AppProbesError(f"{key}: port {port!r} is not a number from 1 to 65535 (a named port that is not "
                                 "among the container's ports?)")
        path = value.get("path", "/")
        if not isinstance(path, str) or any(c in path for c in "\r\n "):
            raise AppProbesError(f"{key}: path {path!r} is not a URL path")
        scheme = value.get("scheme", "HTTP")
        if not isinstance(scheme, str) or scheme.upper() not in ("HTTP", "HTTPS"):
            raise AppProbesError(f"{key}: scheme {scheme!r} is neither HTTP nor HTTPS")
        headers = value.get("httpHeaders") or []
        if not isinstance(headers, list) or not all(
                isinstance(h, dict) and isinstance(h.get("name"), str) and h["name"]
                and isinstance(h.get("value", ""), str) for h in headers):
            raise AppProbesError(f"{key}: httpHeaders must be a list of {{name, value}} strings")
        probes[key] = AppProbe(port, path if path.startswith("/") else f"/{path}", scheme.upper(),
                               tuple((h["name"], h.get("value", "")) for h in headers))
    return probes


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    sidecar: str  # "<namespace>/<pod>", the key of the sidecar's document
    workload_socket: str  # "unix:///path": the SPIFFE Workload API
    nats_url: str  # "tls://host:port"
    run_dir: Path  # everything HAProxy reads and its sockets; owned by `uid`
    nats_server_name: str = "localhost"  # the name the NATS server's certificate carries (actions.meshnats)
    ports: ProxyPorts = field(default_factory=ProxyPorts)
    admin_port: int = ADMIN_PORT  # 0: any free port (tests)
    admin_host: str = "0.0.0.0"  # the kubelet and the host probe it from outside the pod's loopback
    uid: int | None = None  # HAProxy runs as this user (None: as the agent)
    gid: int | None = None
    drain_seconds: float = 20.0
    resync_interval: float = 30.0
    supervise_interval: float = 1.0
    app_probes: Mapping[str, AppProbe] = field(default_factory=dict)  # strict mode: /app-health/... -> the original
    app_probe_timeout: float = APP_PROBE_TIMEOUT

    def __post_init__(self) -> None:
        namespace, _, name = self.sidecar.partition("/")
        if not namespace or not name or "/" in name:
            raise ValueError(f"sidecar {self.sidecar!r} is not NAMESPACE/NAME")
        if not self.workload_socket.startswith("unix:///"):
            raise ValueError(f"workload socket {self.workload_socket!r} is not unix:///ABSOLUTE/PATH")
        if not self.nats_url.startswith(("tls://", "nats://")):
            raise ValueError(f"NATS url {self.nats_url!r} is not tls://HOST:PORT")
        if self.drain_seconds < 0:
            raise ValueError(f"drain seconds {self.drain_seconds!r} is negative")


@dataclass(frozen=True, slots=True)
class SvidMaterial:
    """One X.509 context from the Workload API, as HAProxy and the NATS client take it."""

    spiffe_id: str
    serial: int
    not_after: datetime
    cert_pem: bytes  # leaf, intermediates, PKCS#8 private key
    ca_pem: bytes  # the trust domain's roots

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")  # as the control plane's certificate rows show it


def material(context: X509Context) -> SvidMaterial:
    """The default SVID of a context and its own trust domain's bundle; ValueError when the bundle is missing."""
    svid = context.default_svid
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    if bundle is None or not bundle.x509_authorities:
        raise ValueError(f"no trust bundle for {svid.spiffe_id.trust_domain}")
    pem = serialization.Encoding.PEM
    key = svid.private_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    roots = sorted(bundle.x509_authorities, key=lambda c: c.public_bytes(serialization.Encoding.DER))
    return SvidMaterial(
        spiffe_id=str(svid.spiffe_id), serial=svid.leaf.serial_number, not_after=svid.leaf.not_valid_after_utc,
        cert_pem=b"".join(c.public_bytes(pem) for c in svid.cert_chain) + key,
        ca_pem=b"".join(r.public_bytes(pem) for r in roots))


# ---- what the agent drives: HAProxy and the configuration feed (Protocols, so that unit tests can fake them) ----
class ProxyLike(Protocol):
    @property
    def pid(self) -> int | None: ...

    @property
    def running(self) -> bool: ...

    def worker_pids(self) -> list[int]: ...

    def start(self, config: ProxyConfig, cert_pem: bytes, ca_pem: bytes) -> None: ...

    def apply(self, config: ProxyConfig) -> str: ...

    def update_svid(self, cert_pem: bytes, ca_pem: bytes) -> None: ...

    def stop(self, drain_seconds: float = 20.0) -> None: ...


class ConfigFeed(Protocol):
    applied_generation: int
    acked_generation: int
    pending_generation: int
    removed: bool
    connected: threading.Event

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def use_tls(self, ssl_context: ssl.SSLContext, *, reconnect: bool = False) -> None: ...


ProxyFactory = Callable[[ProxyPaths, int | None, int | None], ProxyLike]
Render = Callable[[dict[str, Any], dict[str, dict[str, Any]], ProxyPaths, ProxyPorts], ProxyConfig]


class ConfigFactory(Protocol):
    def __call__(self, url: str, sidecar: str, ssl_context: ssl.SSLContext, apply: Apply, inbox_prefix: str, *,
                 resync_interval: float, tls_hostname: str | None,
                 on_error: Callable[[Exception], None] | None) -> ConfigFeed: ...


def _haproxy(paths: ProxyPaths, uid: int | None, gid: int | None) -> ProxyLike:
    """HAProxy as `uid`/`gid`, switched by `setpriv` rather than by `subprocess` itself. Why: asked to change the
    user, `subprocess` must fork() instead of vfork(), and a fork() in a process whose gRPC channel is busy (the
    Workload API stream is always open) runs gRPC's fork handlers, which kill the child with SIGSEGV or SIGABRT
    more often than not (seen here: 9 starts out of 15). With the switch in `setpriv`, nothing forks."""
    from sidecar.proxy import Proxy  # HAProxy's process: imported only by an agent that runs one

    setpriv = shutil.which("setpriv")
    if (uid is None and gid is None) or os.geteuid() != 0 or setpriv is None:
        return Proxy(paths, uid=uid, gid=gid)
    switch = [setpriv, *([f"--reuid={uid}"] if uid is not None else []),
              *([f"--regid={gid}"] if gid is not None else []), "--clear-groups"]
    return Proxy(paths, uid=uid, gid=gid, prefix=switch)


def _config_client(url: str, sidecar: str, ssl_context: ssl.SSLContext, apply: Apply, inbox_prefix: str, *,
                   resync_interval: float, tls_hostname: str | None,
                   on_error: Callable[[Exception], None] | None) -> ConfigFeed:
    return ConfigClient(url, sidecar, ssl_context, apply, inbox_prefix, resync_interval=resync_interval,
                        tls_hostname=tls_hostname, on_error=on_error)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    missing: tuple[Missing, ...]  # in the order of `Missing`
    detail: dict[str, str]  # each missing code -> what it waits for, in words


class _Metrics:
    def __init__(self, agent: SidecarAgent) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.generation = Gauge("meshloom_sidecar_config_generation", "configuration generation HAProxy runs",
                                registry=r)
        self.generation.set_function(lambda: agent.applied_generation)
        self.applies = Counter("meshloom_sidecar_config_applies", "configurations applied, by outcome "
                               "(start, unchanged, runtime, reload)", ["outcome"], registry=r)
        self.apply_failures = Counter("meshloom_sidecar_config_apply_failures",
                                      "configurations HAProxy did not take (not acknowledged)", registry=r)
        self.reloads = Counter("meshloom_sidecar_proxy_reloads", "HAProxy reloads (structural changes)", registry=r)
        self.runtime_updates = Counter("meshloom_sidecar_proxy_runtime_updates",
                                       "changes applied through HAProxy's runtime API without a reload: "
                                       "configurations and SVID rotations", registry=r)
        self.starts = Counter("meshloom_sidecar_proxy_starts", "HAProxy starts (the first and after a crash)",
                              registry=r)
        self.rotations = Counter("meshloom_sidecar_svid_rotations", "new SVIDs or bundles received after the first",
                                 registry=r)
        self.expiry = Gauge("meshloom_sidecar_svid_expiry_seconds", "seconds until the current SVID expires",
                            registry=r)
        self.expiry.set_function(agent.svid_seconds_left)
        self.ready = Gauge("meshloom_sidecar_ready", "1 when the readiness probe answers 200", registry=r)
        self.ready.set_function(lambda: 1.0 if agent.readiness().ready else 0.0)


class SidecarAgent:
    """See the module header. `start()` returns at once (the SVID and the configuration arrive in the background);
    `stop()` drains and closes everything, from any thread; `wait()` blocks until it has."""

    def __init__(self, settings: SidecarSettings, *, proxy_factory: ProxyFactory = _haproxy,
                 render_config: Render = render, config_factory: ConfigFactory = _config_client,
                 clock: Callable[[], datetime] = _utcnow) -> None:
        self.settings = settings
        self.paths = ProxyPaths(str(settings.run_dir))
        self._proxy_factory = proxy_factory
        self._render = render_config
        self._config_factory = config_factory
        self._clock = clock
        self._lock = threading.RLock()  # one change of the proxy at a time: applies, rotations, supervision, stop
        self._svid: SvidMaterial | None = None
        self._proxy: ProxyLike | None = None
        self._proxy_svid: SvidMaterial | None = None  # what HAProxy was last given
        self._config: ProxyConfig | None = None  # what HAProxy runs
        self._feed: ConfigFeed | None = None
        self._first_applied = False
        self._nats_error: str | None = None
        self._proxy_error: str | None = None  # why the last start or apply failed, for the readiness probe
        self._orphan: int | None = None  # the master pid of a HAProxy left by a killed agent, soft-stopped
        self.reloads = 0
        self.runtime_updates = 0
        self.proxy_starts = 0
        self.svid_rotations = 0
        self._closing = threading.Event()  # stop() began: drain
        self._stopped = threading.Event()  # stop() finished
        self._stream_ended = threading.Event()
        self._stop_lock = threading.Lock()  # not `_lock`: a stop is requested while an apply holds that one
        self._stop_begun = False
        self._stop_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._admin: _AdminServer | None = None
        self.metrics = _Metrics(self)

    # ---- life ----------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Prepare the run directory, open the admin port, follow the Workload API; SidecarError when it cannot."""
        self._prepare_run_dir()
        self._orphan = _soft_stop_orphan(self.paths)
        try:
            self._admin = _AdminServer((self.settings.admin_host, self.settings.admin_port), self)
        except OSError as exc:
            raise SidecarError(f"cannot listen on admin port {self.settings.admin_host}:{self.settings.admin_port}: "
                               f"{exc.strerror or exc}") from exc
        for name, target in (("admin", self._admin_serve), ("svid", self._follow_workload_api),
                             ("supervise", self._supervise)):
            thread = threading.Thread(target=target, name=f"sidecar-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("%s: admin on %s:%d, Workload API %s, NATS %s", self.settings.sidecar, self.settings.admin_host,
                 self.admin_port, self.settings.workload_socket, self.settings.nats_url)

    def _admin_serve(self) -> None:
        assert self._admin is not None
        self._admin.serve_forever(poll_interval=0.1)  # how long a stop waits for the server to notice

    @property
    def admin_port(self) -> int:
        return self._admin.server_address[1] if self._admin is not None else self.settings.admin_port

    def request_stop(self) -> None:
        """Drain and stop in the background (a signal handler, the shutdown endpoint); returns at once."""
        self._closing.set()  # readiness turns 503 now, not once the stopper thread runs
        with self._stop_lock:
            if self._stop_thread is not None or self._stop_begun:
                return
            self._stop_thread = threading.Thread(target=self.stop, name="sidecar-stop", daemon=True)
            self._stop_thread.start()

    def stop(self) -> None:
        """Drain, then close everything; a second call waits for the first. Readiness is 503 from the first moment."""
        self._closing.set()
        with self._stop_lock:
            first, self._stop_begun = not self._stop_begun, True
        if not first:
            self._stopped.wait()
            return
        log.info("%s: draining for up to %gs", self.settings.sidecar, self.settings.drain_seconds)
        feed = self._feed
        if feed is not None:
            feed.stop()  # no configuration is applied (or acknowledged) while the proxy drains
        with self._lock:
            proxy = self._proxy
            if proxy is not None:
                try:
                    proxy.stop(self.settings.drain_seconds)
                except Exception:  # the agent must still exit: the container's end kills what is left
                    log.exception("%s: HAProxy did not stop cleanly", self.settings.sidecar)
        self._stream_ended.set()
        if self._admin is not None:
            self._admin.shutdown()
            self._admin.server_close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        log.info("%s: stopped", self.settings.sidecar)
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the agent stopped (SIGTERM, `POST /shutdown`, `stop()`); True when it has."""
        return self._stopped.wait(timeout)

    # ---- what the probes and /status read --------------------------------------------------------------------------
    @property
    def svid(self) -> SvidMaterial | None:
        return self._svid

    @property
    def applied_generation(self) -> int:
        feed = self._feed
        return feed.applied_generation if feed is not None else 0

    @property
    def proxy(self) -> ProxyLike | None:
        return self._proxy

    def svid_seconds_left(self) -> float:
        svid = self._svid
        return (svid.not_after - self._clock()).total_seconds() if svid is not None else 0.0

    def readiness(self) -> Readiness:
        """See the truth table in the module header."""
        detail: dict[Missing, str] = {}
        svid = self._svid
        if svid is None:
            detail[Missing.SVID] = f"no SVID from the Workload API at {self.settings.workload_socket} yet"
        elif svid.not_after <= self._clock():
            detail[Missing.SVID] = f"the SVID (serial {svid.serial_hex}) expired at {svid.not_after.isoformat()}"
        feed = self._feed
        if not self._first_applied:
            if feed is None:
                detail[Missing.CONFIG] = "waiting for the SVID before connecting to NATS"
            elif feed.pending_generation:
                detail[Missing.CONFIG] = f"generation {feed.pending_generation} waits for its outbound shards"
            elif not feed.connected.is_set():
                detail[Missing.CONFIG] = f"not connected to NATS at {self.settings.nats_url}" + (
                    f" ({self._nats_error})" if self._nats_error else "")
            else:
                detail[Missing.CONFIG] = "no configuration applied yet"
        proxy = self._proxy
        if proxy is None or not proxy.running:
            detail[Missing.PROXY] = ("HAProxy has not started" if proxy is None else "HAProxy is not running") + (
                f" ({self._proxy_error})" if self._proxy_error else "")
        if self._closing.is_set():
            detail[Missing.DRAINING] = "draining: the sidecar is shutting down"
        missing = tuple(code for code in Missing if code in detail)
        return Readiness(not missing, missing, {str(code): text for code, text in detail.items()})

    def status(self) -> dict[str, Any]:
        svid, feed, proxy, ready = self._svid, self._feed, self._proxy, self.readiness()
        return {
            "sidecar": self.settings.sidecar,
            "ready": ready.ready,
            "missing": list(ready.missing),
            "spiffe_id": svid.spiffe_id if svid else None,
            "serial": svid.serial_hex if svid else None,
            "not_after": svid.not_after.isoformat() if svid else None,
            "proxy_serial": self._proxy_svid.serial_hex if self._proxy_svid and proxy and proxy.running else None,
            "generation": feed.applied_generation if feed else 0,
            "acked": feed.acked_generation if feed else 0,
            "pending": feed.pending_generation if feed else 0,
            "removed": feed.removed if feed else False,
            "nats_connected": bool(feed and feed.connected.is_set()),
            "proxy_pid": proxy.pid if proxy is not None and proxy.running else None,
            "worker_pids": self._worker_pids(proxy),
            "proxy_starts": self.proxy_starts,
            "reloads": self.reloads,
            "runtime_updates": self.runtime_updates,
            "svid_rotations": self.svid_rotations,
            "draining": self._closing.is_set(),
        }

    def app_probe(self, path: str) -> tuple[int, bytes, str]:
        """The app's probe behind `path`, made from inside the pod: (status, body, content type). See the header."""
        probe = self.settings.app_probes.get(path)
        if probe is None:
            return 404, _json_bytes({"error": f"no app probe {path}"}), "application/json"
        where = f"{probe.scheme.lower()}://127.0.0.1:{probe.port}{probe.path}"
        try:
            return _call_app(probe, self.settings.app_probe_timeout)
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, not HTTP at all
            return 503, _json_bytes({"error": f"{path}: the app did not answer at {where}: "
                                              f"{exc or type(exc).__name__}"}), "application/json"

    @staticmethod
    def _worker_pids(proxy: ProxyLike | None) -> list[int]:
        if proxy is None or not proxy.running:
            return []
        try:
            return proxy.worker_pids()
        except Exception:  # a status page must not fail because HAProxy is between two workers
            return []

    # ---- the SVID ------------------------------------------------------------------------------------------------
    def _follow_workload_api(self) -> None:
        """One stream at a time, opened again after any error until the agent stops (see the module header)."""
        while not self._closing.is_set():
            self._stream_ended.clear()
            try:
                client = WorkloadApiClient(self.settings.workload_socket)
            except Exception as exc:  # py-spiffe refuses the address: say so, and keep answering the probes
                log.warning("%s: cannot use the Workload API at %s: %s", self.settings.sidecar,
                            self.settings.workload_socket, exc)
                self._closing.wait(SVID_RETRY)
                continue
            handler = client.stream_x509_contexts(self._on_context, self._on_stream_error)
            self._stream_ended.wait()
            handler.cancel()
            with contextlib.suppress(Exception):
                client.close()
            self._closing.wait(SVID_RETRY)

    def _on_stream_error(self, exc: Exception) -> None:
        if not self._closing.is_set():
            log.warning("%s: the Workload API stream ended: %s; opening another", self.settings.sidecar, exc)
        self._stream_ended.set()

    def _on_context(self, context: X509Context) -> None:
        try:
            new = material(context)
        except ValueError as exc:
            log.warning("%s: ignored an X.509 context: %s", self.settings.sidecar, exc)
            return
        self.take_svid(new)

    def take_svid(self, new: SvidMaterial) -> None:
        """A new SVID or bundle: files, HAProxy (no reload), NATS. The Workload API's stream calls it."""
        with self._lock:
            old = self._svid
            if old is not None and old.cert_pem == new.cert_pem and old.ca_pem == new.ca_pem:
                return
            if self._closing.is_set():
                return
            self._write_svid(new)
            self._svid = new
            bundle_changed = old is not None and old.ca_pem != new.ca_pem
            if old is not None:
                self.svid_rotations += 1
                self.metrics.rotations.inc()
                log.info("%s: new %s (serial %s, until %s)", self.settings.sidecar,
                         "SVID and bundle" if bundle_changed and old.cert_pem != new.cert_pem
                         else "bundle" if bundle_changed else "SVID", new.serial_hex, new.not_after.isoformat())
            else:
                log.info("%s: SVID %s (serial %s, until %s)", self.settings.sidecar, new.spiffe_id, new.serial_hex,
                         new.not_after.isoformat())
            self._push_svid_to_proxy()
            context = tls_context(self.paths.cert, self.paths.cert, self.paths.ca)
            if self._feed is None:
                self._start_feed(new, context)
            else:
                self._feed.use_tls(context, reconnect=bundle_changed)

    def _push_svid_to_proxy(self) -> None:
        """Hand HAProxy the current SVID if it runs another; a failure is retried by the supervisor. Holds the lock."""
        proxy, svid = self._proxy, self._svid
        if proxy is None or svid is None or not proxy.running or self._proxy_svid == svid:
            return
        try:
            proxy.update_svid(svid.cert_pem, svid.ca_pem)
        except Exception as exc:
            log.warning("%s: HAProxy did not take SVID %s: %s; trying again", self.settings.sidecar,
                        svid.serial_hex, exc)
            return
        self._proxy_svid = svid
        self.runtime_updates += 1
        self.metrics.runtime_updates.inc()

    def _start_feed(self, svid: SvidMaterial, context: ssl.SSLContext) -> None:
        self._feed = self._config_factory(
            self.settings.nats_url, self.settings.sidecar, context, self._apply, inbox_prefix(svid.spiffe_id),
            resync_interval=self.settings.resync_interval, tls_hostname=self.settings.nats_server_name,
            on_error=self._on_nats_error)
        self._feed.start()

    def _on_nats_error(self, exc: Exception) -> None:
        self._nats_error = str(exc) or type(exc).__name__

    # ---- the configuration ---------------------------------------------------------------------------------------
    def _apply(self, document: dict[str, Any], shards: dict[str, dict[str, Any]]) -> None:
        """ConfigClient's apply: returns only once HAProxy runs the document's configuration, raises otherwise (the
        generation is then not acknowledged, and tried again at the next read)."""
        try:
            config = self._render(document, shards, self.paths, self.settings.ports)
            with self._lock:
                if self._closing.is_set():
                    raise SidecarError("draining: no new configuration")
                svid = self._svid
                if svid is None:  # the feed starts only after the first SVID
                    raise SidecarError("no SVID yet")
                proxy = self._proxy
                if proxy is None or not proxy.running:
                    self._start_proxy(config, svid)
                    outcome = "start"
                else:
                    outcome = proxy.apply(config)
                self._config = config
                self._first_applied = True
                self._proxy_error = None
        except Exception as exc:
            self.metrics.apply_failures.inc()
            self._proxy_error = str(exc) or type(exc).__name__
            raise
        self.metrics.applies.labels(outcome).inc()
        if outcome == "reload":
            self.reloads += 1
            self.metrics.reloads.inc()
        elif outcome == "runtime":
            self.runtime_updates += 1
            self.metrics.runtime_updates.inc()
        log.info("%s: configuration applied (%s)", self.settings.sidecar, outcome)

    def _start_proxy(self, config: ProxyConfig, svid: SvidMaterial) -> None:
        """A fresh HAProxy with `config` and `svid`; holds the lock."""
        if self._orphan is not None:
            _kill_group(self._orphan)
            self._orphan = None
        proxy = self._proxy_factory(self.paths, self.settings.uid, self.settings.gid)
        self._proxy = proxy  # a failed start still shows as a proxy that does not run
        proxy.start(config, svid.cert_pem, svid.ca_pem)
        self._proxy_svid = svid
        self.proxy_starts += 1
        self.metrics.starts.inc()
        log.info("%s: HAProxy started (pid %s)", self.settings.sidecar, proxy.pid)

    def _supervise(self) -> None:
        while not self._closing.wait(self.settings.supervise_interval):
            with self._lock:
                if self._closing.is_set():
                    return
                proxy, config, svid = self._proxy, self._config, self._svid
                if proxy is not None and config is not None and svid is not None and not proxy.running:
                    log.warning("%s: HAProxy is not running; starting it again", self.settings.sidecar)
                    try:
                        self._start_proxy(config, svid)
                    except Exception as exc:
                        log.warning("%s: HAProxy did not start: %s", self.settings.sidecar, exc)
                    continue
                self._push_svid_to_proxy()

    # ---- files ---------------------------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        run_dir = self.settings.run_dir
        try:
            run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            if run_dir.stat().st_uid == os.geteuid():  # a volume mounted for us (an emptyDir) keeps its own mode
                os.chmod(run_dir, 0o750)
                self._give(run_dir)
            if not os.access(run_dir, os.W_OK | os.X_OK):
                raise PermissionError(13, "not writable by the agent")
        except OSError as exc:
            raise SidecarError(f"cannot prepare the run directory {run_dir}: {exc.strerror or exc}") from exc

    def _give(self, path: Path | int) -> None:
        """Make `path` (or an open descriptor) the proxy user's, when the agent may and the proxy runs as another."""
        uid, gid = self.settings.uid, self.settings.gid
        if (uid is None and gid is None) or os.geteuid() != 0:
            return
        owner, group = -1 if uid is None else uid, -1 if gid is None else gid
        if isinstance(path, int):
            os.fchown(path, owner, group)
        else:
            os.chown(path, owner, group)

    def _write_svid(self, svid: SvidMaterial) -> None:
        _write(Path(self.paths.cert), svid.cert_pem, 0o600, self._give)
        _write(Path(self.paths.ca), svid.ca_pem, 0o644, self._give)


def _call_app(probe: AppProbe, timeout: float) -> tuple[int, bytes, str]:
    """GET the app's probe on loopback, as the kubelet would on the pod's address."""
    conn: http.client.HTTPConnection
    if probe.scheme == "HTTPS":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # the kubelet does not verify a probe's certificate either
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", probe.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", probe.port, timeout=timeout)
    try:
        named = {name.lower() for name, _ in probe.headers}
        conn.putrequest("GET", probe.path, skip_host="host" in named, skip_accept_encoding=True)
        for name, value in probe.headers:  # in order, a name given twice sent twice, as the kubelet does
            conn.putheader(name, value)
        if "user-agent" not in named:
            conn.putheader("User-Agent", PROBE_USER_AGENT)
        if "accept" not in named:
            conn.putheader("Accept", "*/*")
        conn.endheaders()
        response = conn.getresponse()
        # A redirect's Location is not passed on: it would send the kubelet to the admin port. Without it the
        # kubelet takes the 3xx as it is, a success, as it would a redirect it could not follow.
        return response.status, response.read(APP_PROBE_BODY), response.getheader("Content-Type") or "text/plain"
    finally:
        conn.close()


def _json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True).encode() + b"\n"


def _soft_stop_orphan(paths: ProxyPaths) -> int | None:
    """The master pid of a HAProxy that a killed agent left running in this run directory, soft-stopped (SIGUSR1);
    None when there is none. It is recognised by the pid file HAProxy writes and by its command line naming this
    directory's configuration (a pid reused by another process is left alone)."""
    try:
        pid = int(Path(paths.pid).read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    if os.fsencode(paths.config) not in cmdline or pid == os.getpid():
        return None
    log.warning("HAProxy %d left running by an earlier agent: soft-stopped, it finishes its connections until "
                "this agent's HAProxy starts", pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGUSR1)
    return pid


def _kill_group(pid: int, timeout: float = 10.0) -> None:
    """Kill what is left of the HAProxy whose master is `pid` (its own session and process group, as
    `sidecar.proxy` starts it: the workers too), and wait until none of it remains."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of process group `pgid` remains."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _write(path: Path, data: bytes, mode: int, give: Callable[[int], None]) -> None:
    """Write beside `path`, then rename into place: HAProxy and the NATS client never read half a key."""
    temporary = path.with_name(f".{path.name}.agent.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, mode)
        give(fd)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


# ---- the admin port --------------------------------------------------------------------------------------------
class _AdminServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], agent: SidecarAgent) -> None:
        self.agent = agent
        super().__init__(address, _AdminHandler)

    def server_bind(self) -> None:
        # Not HTTPServer's own: it looks the address up in DNS (getfqdn), which stalls the admin port, probes
        # included, for the resolver's timeouts in a pod whose DNS is unreachable.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


def from_inside_pod(host: str) -> bool:
    """Whether an admin client address is the pod's loopback (an IPv4-mapped IPv6 form included)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class _AdminHandler(BaseHTTPRequestHandler):
    server: _AdminServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        agent = self.server.agent
        path = self.path.split("?", 1)[0]
        if path == "/ready":
            ready = agent.readiness()
            self._json(200 if ready.ready else 503, {"ready": ready.ready, "missing": list(ready.missing),
                                                     "detail": ready.detail})
        elif path == "/live":
            self._json(200, {"live": True})
        elif path == "/status":
            self._json(200, agent.status())
        elif path == "/metrics":
            self._send(200, generate_latest(agent.metrics.registry), CONTENT_TYPE_LATEST)
        elif path.startswith(APP_HEALTH_PREFIX):
            self._send(*agent.app_probe(path))
        else:
            self._json(404, {"error": f"no such endpoint {path}"})

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 65536))
        if path in ("/shutdown", "/quitquitquit"):  # the second as Istio and Linkerd name it, for wrappers
            if not from_inside_pod(self.client_address[0]):
                # The admin port is never redirected, so no mTLS guards it: anyone reaching the pod could stop its
                # proxy. The workload calls from inside the pod (loopback); the kubelet only needs GET.
                self._json(403, {"error": f"{path} is served only from inside the pod (loopback), not to "
                                          f"{self.client_address[0]}"})
                return
            self._json(202, {"shutting_down": True, "drain_seconds": self.server.agent.settings.drain_seconds})
            self.server.agent.request_stop()
        else:
            self._json(404, {"error": f"no such endpoint {path}"})

    def _json(self, code: int, body: dict[str, Any]) -> None:
        self._send(code, json.dumps(body, sort_keys=True).encode() + b"\n", "application/json")

    def _send(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class's signature
        log.debug("admin: " + format, *args)
