"""Kubernetes as the controller sees it: watches that lose no event, a Lease to elect one leader, the pod platform,
and the one object the controller writes (the injector's caBundle).

Theory of operation
-------------------
**Watches.** A `Reflector` follows one resource the way client-go's does. It lists (in pages, so 10,000 pods never
sit in one response) and hands its consumer a SNAPSHOT of everything there is, then watches from the list's
resourceVersion with bookmarks on, remembering the resourceVersion of every event and bookmark it passes on:

    list (pages) --SNAPSHOT--> watch from rv --ADDED/MODIFIED/DELETED, BOOKMARK--> ... the server ends the watch
        ^                         ^                                                      |
        |                         +------ watch again from the last rv ------------------+  (nothing is lost: the
        |                         +------ connection broke: back off, watch again -------+   server replays from rv)
        |                         +------ ended with no event at all: back off too ------+
        +------ 410 Gone (an HTTP status or an ERROR event): the history is gone --------+

After a 410 the server cannot replay what happened since the last resourceVersion, so the reflector lists again and
the consumer converges on the fresh snapshot -- deletions it never saw included. Other failures (the server away, a
connection cut, a 5xx) back off exponentially with jitter, 0.8 s doubling to 30 s as client-go does, and start over
from the last resourceVersion. Objects stay plain dicts, the JSON the server sent, optionally trimmed by the consumer
(`transform`): the client's models would cost ten times the memory for the few fields the mesh reads.

All requests go through the official client's `ApiClient` (kubeconfig or in-cluster credentials, TLS), as raw JSON:
`KubeApi` is that small seam, and `FakeKube` behaves like an API server for the unit tests (resourceVersions,
paged lists, watches that replay, compaction that answers 410, connections that can be cut).

**Leader election.** Replicas compete for a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does: a
replica takes the Lease when nobody holds it or when the holder has not renewed it for `lease_duration` *as this
replica observed it* (its own clock, never the holder's timestamps, so clock skew between nodes cannot elect two
leaders); every write carries the resourceVersion it read, so two replicas racing for an expired Lease cannot both
win. The leader renews every `retry_period`, also while its start (`on_started_leading`, in a thread of its own)
is still running; if it cannot renew for `renew_deadline` (shorter than the lease duration, so it stops acting
before anyone else may start) it gives up leadership. A leader that stops releases the
Lease, so the next one takes over at its next try instead of after the lease duration.

**The platform.** On Kubernetes the admission webhook injects the sidecar before the pod exists, so `inject` only
confirms the pod carries it, and there is nothing of the mesh's to tear down on a node: the kubelet removes the
pod's containers.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import random
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from actions.clock import Clock, SystemClock
from actions.errors import PermanentError, TemporaryError

log = logging.getLogger("meshloom.kube")

INJECTED_MARKER = "meshloom.io/injected"  # label (and annotation) the injector puts on every pod it injects
SIDECAR_CONTAINER = "meshloom-sidecar"
WEBHOOK_CONFIGURATION = "meshloom-injector"


# ---- what is watched ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Watched:
    """One resource the controller follows, by the version the catalog reads."""

    kind: str
    group: str  # "" for the core API
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        """The collection across every namespace."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{base}/{self.plural}"


POD = Watched("Pod", "", "v1", "pods")
SERVICE = Watched("Service", "", "v1", "services")
ENDPOINTS = Watched("Endpoints", "", "v1", "endpoints")
NAMESPACE = Watched("Namespace", "", "v1", "namespaces", namespaced=False)
WATCHED: tuple[Watched, ...] = (
    NAMESPACE, SERVICE, ENDPOINTS, POD,
    Watched("MeshConfig", "meshloom.io", "v1alpha1", "meshconfigs", namespaced=False),
    Watched("TrafficSplit", "split.smi-spec.io", "v1alpha3", "trafficsplits"),
    Watched("TrafficTarget", "access.smi-spec.io", "v1alpha2", "traffictargets"),
    Watched("HTTPRouteGroup", "specs.smi-spec.io", "v1alpha3", "httproutegroups"),
    Watched("TCPRoute", "specs.smi-spec.io", "v1alpha3", "tcproutes"),
    Watched("RateLimit", "specs.smi.nginx.com", "v1alpha2", "ratelimits"),
    Watched("CircuitBreaker", "specs.smi.nginx.com", "v1alpha1", "circuitbreakers"),
)
"""Pods, Services, Endpoints, Namespaces, the SMI and NGINX Service Mesh policies, and MeshConfig."""


class EventType(enum.StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    SNAPSHOT = "SNAPSHOT"  # every object of the kind, as one list saw it: what is not in it is gone


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    kind: str
    namespace: str = ""
    name: str = ""
    object: Mapping[str, Any] = field(default_factory=dict)
    items: tuple[Mapping[str, Any], ...] = ()  # SNAPSHOT only
    resource_version: str = ""


def meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    m = obj.get("metadata")
    return m if isinstance(m, Mapping) else {}


def _rv(obj: Mapping[str, Any]) -> str:
    return str(meta(obj).get("resourceVersion") or "")


# ---- errors ---------------------------------------------------------------------------------------------------------
class KubeError(Exception):
    """Talking to the API server failed."""


class Unreachable(KubeError):
    """No answer: the server is away, the connection broke, a read timed out."""


class ApiError(KubeError):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message

    @property
    def gone(self) -> bool:
        return self.status == 410

    @property
    def temporary(self) -> bool:
        return self.status in (409, 429) or self.status >= 500


def as_action_error(exc: KubeError, what: str) -> TemporaryError | PermanentError:
    """The one translation of API trouble into the engine's terms."""
    if isinstance(exc, ApiError) and not exc.temporary:
        return PermanentError(f"{what}: {exc}")
    return TemporaryError(f"{what}: {exc}")


# ---- the seam: raw JSON requests --------------------------------------------------------------------------------
class WatchStream(Protocol):
    def __iter__(self) -> Iterator[Mapping[str, Any]]: ...

    def close(self) -> None: ...


class KubeApi(Protocol):
    """What the controller asks of the API server: JSON in, JSON out, and watch streams of raw events."""

    def request(self, method: str, path: str, *, query: Sequence[tuple[str, str]] = (),
                body: Mapping[str, Any] | Sequence[Any] | None = None,
                content_type: str = "application/json", timeout: float | None = None) -> Any: ...

    def watch(self, path: str, query: Sequence[tuple[str, str]], timeout: float) -> WatchStream: ...


class ClientApi:
    """`KubeApi` over the official client's `ApiClient`: its configuration (kubeconfig, in-cluster), its TLS and
    authentication, its connection pool; no model classes."""

    def __init__(self, api_client: Any, *, timeout: float = 30.0) -> None:
        self.client = api_client
        self.timeout = timeout

    @classmethod
    def connect(cls, kubeconfig: Path | None = None, *, context: str | None = None) -> ClientApi:
        """From a kubeconfig file, or from the pod's service account when there is none (in-cluster)."""
        from kubernetes import client
        from kubernetes import config as kube_config

        config: Any = kube_config  # untyped
        configuration = client.Configuration()
        try:
            if kubeconfig is not None:
                config.load_kube_config(config_file=str(kubeconfig), context=context,
                                        client_configuration=configuration)
            else:
                config.load_incluster_config(client_configuration=configuration)
        except (config.ConfigException, OSError, ValueError) as exc:
            source = str(kubeconfig) if kubeconfig is not None else "in-cluster service account"
            raise KubeError(f"{source}: cannot load the Kubernetes configuration: {exc}") from None
        # Eleven watches, the Lease and the controller's own requests share one pool.
        configuration.connection_pool_maxsize = 32
        return cls(client.ApiClient(configuration))

    def _send(self, method: str, path: str, query: Sequence[tuple[str, str]], body: Any, content_type: str,
              timeout: Any) -> Any:
        import urllib3

        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            params = self.client.param_serialize(method, path, query_params=list(query), header_params=headers,
                                                 body=body, auth_settings=["BearerToken"])
            response = self.client.call_api(*params, _request_timeout=timeout)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unreachable(f"{method} {path}: {exc}") from None
        except Exception as exc:  # the client wraps SSL trouble in its own exception type, with status 0
            if getattr(exc, "status", None) == 0:
                raise Unreachable(f"{method} {path}: {exc}") from None
            raise
        return response.response  # urllib3's response, not yet read

    def request(self, method: str, path: str, *, query: Sequence[tuple[str, str]] = (),
                body: Mapping[str, Any] | Sequence[Any] | None = None,
                content_type: str = "application/json", timeout: float | None = None) -> Any:
        import urllib3

        raw = self._send(method, path, query, body, content_type, self.timeout if timeout is None else timeout)
        try:
            data = raw.data
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unreachable(f"{method} {path}: {exc}") from None
        finally:
            raw.release_conn()
        if not 200 <= raw.status <= 299:
            raise ApiError(raw.status, _status_message(data, raw.reason))
        try:
            return json.loads(data) if data else {}
        except ValueError as exc:
            raise Unreachable(f"{method} {path}: the answer is not JSON ({exc})") from None

    def watch(self, path: str, query: Sequence[tuple[str, str]], timeout: float) -> WatchStream:
        # The read timeout outlasts the server's own watch timeout: a connection silent for longer is dead.
        raw = self._send("GET", path, query, None, "", (10.0, timeout + 30.0))
        if not 200 <= raw.status <= 299:
            try:
                data = raw.data
            finally:
                raw.release_conn()
            raise ApiError(raw.status, _status_message(data, raw.reason))
        return _HttpStream(raw, path)


def _status_message(data: bytes, fallback: str | None) -> str:
    try:
        status = json.loads(data)
    except (ValueError, TypeError):
        return fallback or "no reason given"
    if isinstance(status, Mapping):
        return str(status.get("message") or status.get("reason") or fallback or "no reason given")
    return fallback or "no reason given"


class _HttpStream:
    """The lines of a chunked watch response, one JSON event each; `close` from another thread ends the read."""

    def __init__(self, raw: Any, path: str) -> None:
        self._raw, self._path = raw, path
        self._closed = False

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        import urllib3

        buffer = b""
        try:
            for chunk in self._raw.stream(amt=None, decode_content=False):
                buffer += chunk
                while (end := buffer.find(b"\n")) >= 0:
                    line, buffer = buffer[:end], buffer[end + 1:]
                    if line.strip():
                        yield json.loads(line)
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            if not self._closed:
                raise Unreachable(f"watch {self._path}: {exc}") from None
        finally:
            self._release()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._raw.shutdown()  # unblocks a read waiting in another thread
        except (OSError, RuntimeError):  # RuntimeError: the read had ended and the connection went back to the pool
            pass

    def _release(self) -> None:
        self._closed = True
        try:
            self._raw.release_conn()
        except OSError:
            pass


# ---- the reflector ------------------------------------------------------------------------------------------------
class Expired(KubeError):
    """410 Gone: the server no longer has the history from the resourceVersion asked for."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Seconds to wait before retry number `attempt` (0-based): exponential, capped, with jitter so that a
    restarted API server is not met by every client at once."""

    base: float = 0.8
    cap: float = 30.0
    jitter: float = 0.5  # the wait is stretched by up to this fraction

    def delay(self, attempt: int, draw: float) -> float:
        return float(min(self.cap, self.base * 2.0 ** min(attempt, 30)) * (1.0 + self.jitter * draw))


def _wait(seconds: float, stop: threading.Event) -> None:
    stop.wait(seconds)


Sink = Callable[[WatchEvent], None]
Transform = Callable[[dict[str, Any]], dict[str, Any]]


class Reflector:
    """List, then watch, one resource; every change goes to `sink` in order, from the reflector's thread."""

    def __init__(self, api: KubeApi, what: Watched, sink: Sink, *, transform: Transform | None = None,
                 page_size: int = 500, watch_timeout: float = 300.0, backoff: Backoff | None = None,
                 rand: random.Random | None = None, sleep: Callable[[float, threading.Event], None] | None = None,
                 ) -> None:
        self.api, self.what, self.sink = api, what, sink
        self.transform = transform
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()
        self._rand = rand or random.Random()
        self._sleep = sleep or _wait
        self.resource_version: str | None = None  # None: list first
        self.synced = threading.Event()  # set once the first snapshot went out
        self.lists = 0  # snapshots handed over (the first, and one per 410 or relist)
        self.reconnects = 0  # watches that broke and were started again
        self._stop = threading.Event()
        self._stream: WatchStream | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- life ------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name=f"meshloom-watch-{self.what.plural}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                    attempt = 0
                if self._watch():
                    attempt = 0
                elif not self._stop.is_set():
                    # Ended without a single event (not even a bookmark): a proxy that closes watches at once
                    # would make every reflector spin on the API server, so the next watch waits, as after an error.
                    delay = self.backoff.delay(attempt, self._rand.random())
                    attempt += 1
                    log.info("%s: the watch ended without an event; watching again in %.1f s", self.what.plural,
                             delay)
                    self._sleep(delay, self._stop)
            except Expired as exc:
                # The history is gone: only a fresh list tells what the world is now. No wait: the server is fine.
                log.info("%s: %s; listing again", self.what.plural, exc)
                self.resource_version = None
            except KubeError as exc:
                if self._stop.is_set():
                    break
                delay = self.backoff.delay(attempt, self._rand.random())
                attempt += 1
                self.reconnects += 1
                log.warning("%s: %s; watching again in %.1f s from resourceVersion %s", self.what.plural, exc, delay,
                            self.resource_version or "(a new list)")
                self._sleep(delay, self._stop)
            except Exception:  # a bug must not end the watch for good: it is logged and the loop goes on
                if self._stop.is_set():
                    break
                log.exception("%s: the watch failed unexpectedly; listing again", self.what.plural)
                self.resource_version = None
                delay = self.backoff.delay(attempt, self._rand.random())
                attempt += 1
                self._sleep(delay, self._stop)

    # -- inside -----------------------------------------------------------------------------------------------------
    def _object(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        obj = dict(raw)
        # Items of a core list carry no kind or apiVersion; the catalog reads both.
        obj.setdefault("apiVersion", self.what.api_version)
        obj.setdefault("kind", self.what.kind)
        return self.transform(obj) if self.transform is not None else obj

    def _list(self) -> None:
        items: list[Mapping[str, Any]] = []
        cont: str | None = None
        while True:
            query = [("limit", str(self.page_size))]
            if cont:
                query.append(("continue", cont))
            try:
                page = self.api.request("GET", self.what.path, query=query)
            except ApiError as exc:
                if exc.gone:  # the continue token expired: a consistent list starts over
                    raise Expired(f"list continuation expired ({exc.message})") from None
                raise
            items.extend(self._object(item) for item in page.get("items") or ())
            cont = str(meta(page).get("continue") or "")
            if not cont:
                break
        rv = str(meta(page).get("resourceVersion") or "")
        if self._stop.is_set():
            return
        self.sink(WatchEvent(EventType.SNAPSHOT, self.what.kind, items=tuple(items), resource_version=rv))
        self.lists += 1
        self.resource_version = rv
        self.synced.set()

    def _watch(self) -> bool:
        """One watch request, until the server ends it; True if it delivered anything (the connection is good)."""
        assert self.resource_version is not None
        # Spread over [timeout, 2 timeout) as client-go does, so that watches do not all end together.
        timeout = int(self.watch_timeout * (1 + self._rand.random()))
        query = [("watch", "true"), ("allowWatchBookmarks", "true"), ("resourceVersion", self.resource_version),
                 ("timeoutSeconds", str(max(1, timeout)))]
        try:
            stream = self.api.watch(self.what.path, query, timeout)
        except ApiError as exc:
            if exc.gone:
                raise Expired(exc.message) from None
            raise
        with self._lock:
            self._stream = stream
        if self._stop.is_set():
            stream.close()
        delivered = False
        try:
            for event in stream:
                if self._stop.is_set():
                    break
                delivered = True
                self._handle(event)
        finally:
            with self._lock:
                self._stream = None
            stream.close()
        return delivered

    def _handle(self, event: Mapping[str, Any]) -> None:
        kind = str(event.get("type") or "")
        obj = event.get("object")
        obj = obj if isinstance(obj, Mapping) else {}
        if kind == "BOOKMARK":
            self.resource_version = _rv(obj) or self.resource_version
            return
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            message = str(obj.get("message") or obj.get("reason") or "an error event")
            if code == 410:
                raise Expired(message)
            raise ApiError(code, message)
        try:
            etype = EventType(kind)
        except ValueError:
            log.warning("%s: unknown watch event type %r skipped", self.what.plural, kind)
            return
        m = meta(obj)
        self.sink(WatchEvent(etype, self.what.kind, str(m.get("namespace") or ""), str(m.get("name") or ""),
                             self._object(obj)))
        # Recorded after the hand-over: a crash in between replays the event rather than losing it.
        self.resource_version = _rv(obj) or self.resource_version


# ---- leader election ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LeaseRecord:
    holder: str | None
    lease_duration: int  # seconds
    acquire_time: datetime | None = None
    renew_time: datetime | None = None
    transitions: int = 0
    resource_version: str = ""


class LeaseConflict(KubeError):
    """Someone else wrote the Lease since it was read (or created it first)."""


class LeaseStore(Protocol):
    def get(self) -> LeaseRecord | None: ...

    def create(self, record: LeaseRecord) -> LeaseRecord: ...

    def update(self, record: LeaseRecord) -> LeaseRecord: ...


def _micro_time(moment: datetime | None) -> str | None:
    # MicroTime: RFC 3339 with exactly six fractional digits, which the API server insists on.
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if moment is not None else None


def _parse_time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class KubeLease:
    """A `coordination.k8s.io/v1` Lease; every write carries the resourceVersion it read."""

    def __init__(self, api: KubeApi, namespace: str, name: str) -> None:
        self.api, self.namespace, self.name = api, namespace, name
        self._collection = f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace)}/leases"

    def get(self) -> LeaseRecord | None:
        try:
            obj = self.api.request("GET", f"{self._collection}/{quote(self.name)}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return self._record(obj)

    def create(self, record: LeaseRecord) -> LeaseRecord:
        try:
            return self._record(self.api.request("POST", self._collection, body=self._body(record)))
        except ApiError as exc:
            if exc.status == 409:
                raise LeaseConflict(exc.message) from None
            raise

    def update(self, record: LeaseRecord) -> LeaseRecord:
        try:
            return self._record(self.api.request("PUT", f"{self._collection}/{quote(self.name)}",
                                                 body=self._body(record)))
        except ApiError as exc:
            if exc.status == 409:
                raise LeaseConflict(exc.message) from None
            raise

    def _body(self, r: LeaseRecord) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if r.resource_version:
            metadata["resourceVersion"] = r.resource_version
        spec = {"holderIdentity": r.holder, "leaseDurationSeconds": r.lease_duration,
                "acquireTime": _micro_time(r.acquire_time), "renewTime": _micro_time(r.renew_time),
                "leaseTransitions": r.transitions}
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
                "spec": {k: v for k, v in spec.items() if v is not None}}

    @staticmethod
    def _record(obj: Mapping[str, Any]) -> LeaseRecord:
        spec = obj.get("spec") or {}
        return LeaseRecord(holder=spec.get("holderIdentity") or None,
                           lease_duration=int(spec.get("leaseDurationSeconds") or 0),
                           acquire_time=_parse_time(spec.get("acquireTime")),
                           renew_time=_parse_time(spec.get("renewTime")),
                           transitions=int(spec.get("leaseTransitions") or 0), resource_version=_rv(obj))


class FakeLease:
    """A Lease held in memory with a resourceVersion, as the API server keeps it; `fail` makes calls unreachable."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.record: LeaseRecord | None = None
        self._version = 0
        self.fail = False

    def get(self) -> LeaseRecord | None:
        with self._lock:
            self._check()
            return self.record

    def create(self, record: LeaseRecord) -> LeaseRecord:
        with self._lock:
            self._check()
            if self.record is not None:
                raise LeaseConflict("leases already exists")
            return self._store(record)

    def update(self, record: LeaseRecord) -> LeaseRecord:
        with self._lock:
            self._check()
            if self.record is None or record.resource_version != self.record.resource_version:
                raise LeaseConflict("the object has been modified")
            return self._store(record)

    def _check(self) -> None:
        if self.fail:
            raise Unreachable("the fake API server is away")

    def _store(self, record: LeaseRecord) -> LeaseRecord:
        self._version += 1
        self.record = replace(record, resource_version=str(self._version))
        return self.record


class LeaderElector:
    """Compete for a Lease. `on_stopped_leading` runs in the elector's thread; `on_started_leading` in a thread of
    its own, for the Lease to be renewed while a slow start (the control plane's CA, NATS, outbox recovery) runs:
    a start that outlasted the lease duration would otherwise let another replica lead while this one still acts.
    `leading` turns False as soon as the Lease is lost, so a start can check it and give up; `on_stopped_leading`
    runs only once the start has returned, to stop whatever it started."""

    def __init__(self, lease: LeaseStore, identity: str, *, clock: Clock | None = None,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0, retry_period: float = 2.0,
                 on_started_leading: Callable[[], None] = lambda: None,
                 on_stopped_leading: Callable[[], None] = lambda: None,
                 sleep: Callable[[float, threading.Event], None] | None = None) -> None:
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("leader election needs retry_period < renew_deadline < lease_duration")
        self.lease, self.identity = lease, identity
        self.clock = clock or SystemClock()
        self.lease_duration, self.renew_deadline, self.retry_period = lease_duration, renew_deadline, retry_period
        self.on_started_leading, self.on_stopped_leading = on_started_leading, on_stopped_leading
        self._sleep = sleep or _wait
        self.leading = False
        self._observed: LeaseRecord | None = None
        self._observed_at: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life ------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="meshloom-leader-election", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop competing; a leader stops leading (`on_stopped_leading`) and releases the Lease."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def request_stop(self) -> None:
        """Ask `run` to end at its next wait, without waiting for it (from a callback, say)."""
        self._stop.set()

    @property
    def holder(self) -> str | None:
        return self._observed.holder if self._observed is not None else None

    def run(self) -> None:
        while not self._stop.is_set():
            if not self.try_acquire_or_renew():
                self._sleep(self.retry_period, self._stop)
                continue
            self.leading = True
            log.info("%s leads (lease held until renewal fails for %.0f s)", self.identity, self.renew_deadline)
            starting = threading.Thread(target=self._call, args=(self.on_started_leading, "on_started_leading"),
                                        name="meshloom-leader-start", daemon=True)
            starting.start()
            renewed = self.clock.now()
            while not self._stop.is_set():
                self._sleep(self.retry_period, self._stop)
                if self._stop.is_set():
                    break
                if self.try_acquire_or_renew():
                    renewed = self.clock.now()
                elif self.holder not in (None, self.identity) or \
                        self.clock.now() - renewed >= timedelta(seconds=self.renew_deadline):
                    log.warning("%s lost the lease (now held by %s)", self.identity, self.holder or "nobody")
                    break
            self.leading = False
            starting.join()  # what the start brought up is stopped only once it is all up
            self._call(self.on_stopped_leading, "on_stopped_leading")
            if self._stop.is_set():
                self.release()

    # -- one attempt --------------------------------------------------------------------------------------------------
    def try_acquire_or_renew(self) -> bool:
        now = self.clock.now()
        try:
            current = self.lease.get()
            if current is None:
                record = LeaseRecord(self.identity, int(self.lease_duration), now, now, 0)
                self._see(self.lease.create(record), now)
                return True
            if current != self._observed:
                self._see(current, now)
            if not self._may_take(current, now):
                return False
            taking_over = current.holder != self.identity
            record = replace(current, holder=self.identity, lease_duration=int(self.lease_duration), renew_time=now,
                             acquire_time=now if taking_over else current.acquire_time,
                             transitions=current.transitions + (1 if taking_over else 0))
            self._see(self.lease.update(record), now)
            return True
        except LeaseConflict:
            return False  # another replica wrote first: it is read again at the next try
        except KubeError as exc:
            log.warning("%s: the lease cannot be read or written: %s", self.identity, exc)
            return False

    def _may_take(self, current: LeaseRecord, now: datetime) -> bool:
        """Free, ours, or not renewed for a lease duration of our own clock since we saw it change."""
        if current.holder in (None, self.identity):
            return True
        assert self._observed_at is not None
        duration = current.lease_duration or self.lease_duration
        return self._observed_at + timedelta(seconds=duration) <= now

    def _see(self, record: LeaseRecord, now: datetime) -> None:
        self._observed, self._observed_at = record, now

    def release(self) -> None:
        """Give the Lease up so that another replica takes over at once."""
        try:
            current = self.lease.get()
            if current is None or current.holder != self.identity:
                return
            self.lease.update(replace(current, holder=None, lease_duration=1, renew_time=self.clock.now()))
            log.info("%s released the lease", self.identity)
        except KubeError as exc:
            log.warning("%s: releasing the lease failed (it expires by itself): %s", self.identity, exc)

    def _call(self, callback: Callable[[], None], name: str) -> None:
        try:
            callback()
        except Exception:  # the elector must keep its own loop whatever the controller does
            log.exception("%s raised", name)


# ---- the platform ---------------------------------------------------------------------------------------------------
def carries_sidecar(pod: Mapping[str, Any]) -> bool:
    """Whether the injector went over this pod: its marker, or its sidecar container."""
    m = meta(pod)
    for where in ("labels", "annotations"):
        marks = m.get(where)
        if isinstance(marks, Mapping) and marks.get(INJECTED_MARKER) == "true":
            return True
    spec = pod.get("spec")
    containers = spec.get("containers") if isinstance(spec, Mapping) else None
    return any(isinstance(c, Mapping) and c.get("name") == SIDECAR_CONTAINER for c in containers or ())


class KubePlatform:
    """`PodPlatform` on Kubernetes. The webhook injected the pod at admission; `inject` confirms it, from what the
    watch already knows (`known`) when it can, else by reading the pod."""

    def __init__(self, api: KubeApi | None, known: Callable[[str], bool | None] | None = None) -> None:
        self.api = api
        self.known = known or (lambda pod: None)

    def inject(self, pod: str) -> None:
        seen = self.known(pod)
        if seen:
            return
        namespace, _, name = pod.partition("/")
        if self.api is None:
            raise TemporaryError(f"pod {pod}: not seen by the watch yet")
        try:
            obj = self.api.request("GET", f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}")
        except ApiError as exc:
            if exc.status == 404:
                raise PermanentError(f"pod {pod} no longer exists") from None
            raise as_action_error(exc, f"pod {pod}") from None
        except KubeError as exc:
            raise as_action_error(exc, f"pod {pod}") from None
        if not carries_sidecar(obj):
            raise PermanentError(f"pod {pod} runs without its sidecar (created while the injector was not "
                                 "answering?): re-create it to have it injected")

    def teardown(self, pod: str) -> None:
        """Nothing of the mesh's lives on the node for a pod: the kubelet removes its containers."""


def namespace_labels(api: KubeApi, name: str, timeout: float = 2.0) -> dict[str, str] | None:
    """A Namespace's labels read from the API server (the webhook's fallback for a namespace its watch has not
    delivered yet); None when it does not exist or cannot be read within `timeout` seconds."""
    try:
        obj = api.request("GET", f"/api/v1/namespaces/{quote(name)}", timeout=timeout)
    except ApiError as exc:
        if exc.status != 404:
            log.warning("namespace %s: its labels cannot be read: %s", name, exc)
        return None
    except KubeError as exc:
        log.warning("namespace %s: its labels cannot be read: %s", name, exc)
        return None
    labels = meta(obj).get("labels")
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}


# ---- what the controller writes ----------------------------------------------------------------------------------
WEBHOOK_CONFIGURATIONS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


def patch_webhook_ca_bundle(api: KubeApi, ca_pem: bytes, name: str = WEBHOOK_CONFIGURATION,
                            attempts: int = 3) -> int:
    """Make every webhook of the MutatingWebhookConfiguration trust `ca_pem`; returns how many changed (0: all
    were current). A read-modify-write under the configuration's resourceVersion, tried again on a conflict."""
    bundle = base64.b64encode(ca_pem).decode()
    path = f"{WEBHOOK_CONFIGURATIONS}/{quote(name)}"
    for attempt in range(attempts):
        try:
            obj = api.request("GET", path)
            changed = 0
            for hook in obj.get("webhooks") or ():
                client = hook.setdefault("clientConfig", {})
                if client.get("caBundle") != bundle:
                    client["caBundle"] = bundle
                    changed += 1
            if changed:
                api.request("PUT", path, body=obj)
            return changed
        except ApiError as exc:
            if exc.status == 409 and attempt + 1 < attempts:
                continue
            if exc.status == 404:
                raise PermanentError(f"MutatingWebhookConfiguration {name} does not exist (is the chart "
                                     "installed?)") from None
            raise as_action_error(exc, f"MutatingWebhookConfiguration {name}") from None
        except KubeError as exc:
            raise as_action_error(exc, f"MutatingWebhookConfiguration {name}") from None
    raise TemporaryError(f"MutatingWebhookConfiguration {name}: changed by others {attempts} times in a row")


# ---- the fake API server ---------------------------------------------------------------------------------------------
class _FakeStream:
    def __init__(self, kube: FakeKube, what: Watched, after: int) -> None:
        self._kube, self._what, self._after = kube, what, after
        self._closed = False
        self._broken = False
        self._ended = False

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        kube = self._kube
        try:
            while True:
                with kube._cond:
                    while True:
                        if self._closed:
                            return
                        if self._broken:
                            raise Unreachable(f"watch {self._what.path}: connection reset by the fake")
                        if self._after < kube._compacted:
                            self._after = kube._version  # a real server ends the watch after the error, too
                            self._ended = True
                            event: Mapping[str, Any] = {
                                "type": "ERROR",
                                "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                           "message": f"too old resource version: {self._after}"}}
                            break
                        pending = [e for e in kube._history if e[0] > self._after and e[1] == self._what.kind]
                        if pending:
                            rv, _, etype, obj = pending[0]
                            self._after = rv
                            event = {"type": etype, "object": json.loads(json.dumps(obj))}
                            break
                        if kube._bookmark_due.get(id(self)):
                            kube._bookmark_due.pop(id(self))
                            self._after = kube._version
                            event = {"type": "BOOKMARK", "object": {
                                "kind": self._what.kind, "apiVersion": self._what.api_version,
                                "metadata": {"resourceVersion": str(kube._version)}}}
                            break
                        if self._ended:
                            return
                        kube._cond.wait(0.5)
                yield event
        finally:
            with kube._cond:
                kube._streams.discard(self)

    def close(self) -> None:
        with self._kube._cond:
            self._closed = True
            self._kube._cond.notify_all()


class FakeKube:
    """Behaves like an API server for the kinds it is given: objects with resourceVersions, paged lists, watches
    that replay from a resourceVersion, a compacted history that answers 410, connections the test can cut."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._history: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, kind, type, object)
        self._version = 100
        self._compacted = 0  # events at or below this resourceVersion are forgotten
        self._streams: set[_FakeStream] = set()
        self._bookmark_due: dict[int, bool] = {}
        self._by_path = {w.path: w for w in WATCHED}
        self.unreachable = False  # every request fails as if the server were away
        self.lists = 0
        self.watches = 0
        self.requests: list[tuple[str, str]] = []
        self.docs: dict[str, dict[str, Any]] = {}  # single objects by path (a pod, a Secret, a webhook configuration)

    # -- the test's side ---------------------------------------------------------------------------------------------
    def put(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create or update an object (kind from the object); returns it with its new resourceVersion."""
        with self._cond:
            self._version += 1
            stored: dict[str, Any] = json.loads(json.dumps(obj))
            m = stored.setdefault("metadata", {})
            m["resourceVersion"] = str(self._version)
            key = (str(stored["kind"]), str(m.get("namespace") or ""), str(m["name"]))
            etype = "MODIFIED" if key in self._objects else "ADDED"
            self._objects[key] = stored
            self._history.append((self._version, key[0], etype, stored))
            self._cond.notify_all()
            return stored

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._cond:
            stored = self._objects.pop((kind, namespace, name))
            self._version += 1
            gone = dict(stored, metadata={**stored["metadata"], "resourceVersion": str(self._version)})
            self._history.append((self._version, kind, "DELETED", gone))
            self._cond.notify_all()

    def compact(self) -> None:
        """Forget the history up to now: a watch from an older resourceVersion gets 410 Gone."""
        with self._cond:
            self._compacted = self._version
            self._history.clear()
            self._cond.notify_all()

    def cut(self) -> int:
        """Break every open watch connection mid-stream; returns how many."""
        with self._cond:
            for s in self._streams:
                s._broken = True
            self._cond.notify_all()
            return len(self._streams)

    def end_watches(self) -> None:
        """End every open watch cleanly, as the server does when a watch's timeout passes."""
        with self._cond:
            for s in self._streams:
                s._ended = True
            self._cond.notify_all()

    def bookmark(self) -> None:
        with self._cond:
            for s in self._streams:
                self._bookmark_due[id(s)] = True
            self._cond.notify_all()

    @property
    def open_watches(self) -> int:
        with self._cond:
            return len(self._streams)

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._version)

    # -- KubeApi -----------------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, query: Sequence[tuple[str, str]] = (),
                body: Mapping[str, Any] | Sequence[Any] | None = None,
                content_type: str = "application/json", timeout: float | None = None) -> Any:
        self.requests.append((method, path))
        if self.unreachable:
            raise Unreachable(f"{method} {path}: connection refused by the fake")
        what = self._by_path.get(path)
        if method == "GET" and what is not None:
            return self._list(what, dict(query))
        with self._cond:
            if method == "GET":
                if path not in self.docs:
                    raise ApiError(404, f"{path} not found")
                return json.loads(json.dumps(self.docs[path]))
            doc: dict[str, Any] = json.loads(json.dumps(body))
            if method == "POST":
                path = f"{path}/{doc['metadata']['name']}"
                if path in self.docs:
                    raise ApiError(409, f"{path} already exists")
            elif method == "PUT":
                if path not in self.docs:
                    raise ApiError(404, f"{path} not found")
                asked = _rv(doc)
                if asked and asked != _rv(self.docs[path]):
                    raise ApiError(409, "the object has been modified; please apply your changes to the latest "
                                        "version and try again")
            else:
                raise ApiError(405, f"{method} is not supported by the fake")
            self._version += 1
            doc.setdefault("metadata", {})["resourceVersion"] = str(self._version)
            self.docs[path] = doc
            return json.loads(json.dumps(doc))

    def _list(self, what: Watched, query: Mapping[str, str]) -> dict[str, Any]:
        with self._cond:
            self.lists += 1
            keys = sorted(k for k in self._objects if k[0] == what.kind)
            start = int(query.get("continue") or 0)
            limit = int(query.get("limit") or len(keys) or 1)
            page = keys[start:start + limit]
            items = []
            for k in page:
                obj = json.loads(json.dumps(self._objects[k]))
                obj.pop("kind", None)  # as core lists do
                obj.pop("apiVersion", None)
                items.append(obj)
            more = start + limit < len(keys)
            return {"kind": f"{what.kind}List", "apiVersion": what.api_version, "items": items,
                    "metadata": {"resourceVersion": str(self._version),
                                 **({"continue": str(start + limit)} if more else {})}}

    def watch(self, path: str, query: Sequence[tuple[str, str]], timeout: float) -> WatchStream:
        if self.unreachable:
            raise Unreachable(f"watch {path}: connection refused by the fake")
        what = self._by_path[path]
        after = int(dict(query).get("resourceVersion") or 0)
        with self._cond:
            self.watches += 1
            stream = _FakeStream(self, what, after)
            self._streams.add(stream)
            return stream


def pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}"
