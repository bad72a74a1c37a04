"""The node agent: serves each workload its X.509-SVID and the trust bundles over the SPIFFE Workload API.

Theory of operation
-------------------
The engine hands the agent what to serve through `SvidDelivery`: `deliver` an owner's current SVID, `withdraw` it,
`publish_bundle` a trust domain's roots. The agent keeps them in a cache (the engine's store stays the truth: after a
restart the engine delivers again) and pushes every change to the open streams it concerns.

Attestation is by socket: `add_workload(owner, uid)` opens a unix socket for that owner alone, in a directory only
that uid can enter (on Kubernetes, the pod mounts only its own directory). A call is served the SVID of the socket it
came in on, so a workload obtains its own SVID and no other. grpcio does not say which socket a call came in on (on a
unix socket `context.peer()` is just `"unix:"`, and the auth context names no address), so each socket has its own
`grpc.aio` server. All of them share one asyncio event loop on one thread, so a workload costs no thread at all: an
open stream is a coroutine, where a synchronous `grpc.server` per socket would cost a polling thread per socket and
hold a pool thread for each stream's whole life. Measured here with 100 and 300 workloads holding one stream each:
about 50-70 kB per socket and 45-50 kB per open stream, no thread per workload; fixed costs are this loop's thread,
one thread for `on_served`, and gRPC core's own threads (about 7, shared by the process). A bare `SO_PEERCRED` check
would need an accept loop in front of gRPC; a socket per workload also fits Kubernetes, where each pod mounts only its
own socket's directory.

    FetchX509SVID      waits until the owner has an SVID and its trust domain a bundle, sends it, then sends again
                       on every change. A stream that has served an SVID which is then withdrawn ends with
                       PERMISSION_DENIED "no identity issued", as SPIRE ends it; a new stream waits for the next SVID.
    FetchX509Bundles   waits for a bundle, sends every trust domain's roots, then sends again on every change.
    FetchJWT*, ValidateJWTSVID   UNIMPLEMENTED.

Every call without the `workload.spiffe.io: true` header fails with INVALID_ARGUMENT and nothing is sent, as SPIRE
does. When a workload is removed or the agent stops, its streams end at once with UNAVAILABLE, which clients retry
(py-spiffe gives up for good only on INVALID_ARGUMENT and CANCELLED). A server stop alone ends them with the same code,
but only once its grace period is over, which streams that never end by themselves would always use up.

`on_served(owner, cert)` is called once per certificate, the first time it was written to one of the owner's streams,
on a thread of its own so that the engine's work never stalls the event loop.

A node agent in its own process is fed through a directory instead: `DirectoryDelivery` writes what the engine
delivers, `follow_directory` reads it into the agent.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import grpc
from spiffe._proto import workload_pb2, workload_pb2_grpc

from actions.errors import ActionError, PermanentError, TemporaryError

log = logging.getLogger("meshloom.nodeagent")

SECURITY_HEADER = "workload.spiffe.io"
SOCKET_NAME = "agent.sock"
# sun_path holds 108 bytes with the terminating NUL.
_MAX_SOCKET_PATH = 107
# A workload that opens streams without end would hold the agent's memory; two X509Sources and a bundle watcher
# need three, so 64 leaves ample room and still bounds it.
_MAX_CALLS_PER_WORKLOAD = 64
# How long a caller waits for the event loop to open or close a socket before calling it a temporary failure.
_LOOP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class SvidMaterial:
    cert: str                 # the certificate entity's key, "<owner>/<n>"
    spiffe_id: str
    chain: tuple[bytes, ...]  # DER certificates, leaf first, then intermediates (not the root)
    key: bytes                # PKCS#8 DER private key of the leaf
    not_after: datetime


class SvidDelivery(Protocol):
    def deliver(self, owner: str, material: SvidMaterial) -> None: ...

    def withdraw(self, owner: str, cert: str) -> None: ...  # only if `cert` is still the owner's current one

    def publish_bundle(self, trust_domain: str, roots: tuple[bytes, ...]) -> None: ...  # DER trust anchors


class FakeSvidDelivery:
    """Keeps what a node agent would serve: each owner's current certificate and the trust bundle."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current: dict[str, str] = {}  # owner -> certificate key
        self.material: dict[str, SvidMaterial] = {}
        self.delivered: list[tuple[str, str]] = []  # (owner, certificate key), in order
        self.bundle: tuple[bytes, ...] = ()  # the roots last published
        self.bundles: dict[str, tuple[bytes, ...]] = {}  # trust domain -> roots
        self.down = False

    def deliver(self, owner: str, material: SvidMaterial) -> None:
        if self.down:
            raise TemporaryError("node agent unreachable")
        _check_material(material)
        with self._lock:
            self.current[owner] = material.cert
            self.material[owner] = material
            self.delivered.append((owner, material.cert))

    def withdraw(self, owner: str, cert: str) -> None:
        with self._lock:
            if self.current.get(owner) == cert:
                del self.current[owner]
                del self.material[owner]

    def publish_bundle(self, trust_domain: str, roots: tuple[bytes, ...]) -> None:
        domain = _trust_domain(trust_domain)
        _check_roots(roots)
        with self._lock:
            self.bundle = tuple(roots)
            self.bundles[domain] = tuple(roots)


# ---- the Workload API server -----------------------------------------------------------------------------------
@dataclass(eq=False)
class _Stream:
    """One open Fetch* call; `wake` is set (on the loop) whenever what it serves may have changed."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ending: bool = False


@dataclass(eq=False)
class _Workload:
    owner: str
    uid: int | None
    path: Path
    server: Any = None  # grpc.aio.Server
    streams: set[_Stream] = field(default_factory=set)


class NodeAgent:
    """A SPIFFE Workload API server with one unix socket per workload; see the module's theory of operation."""

    def __init__(self, socket_dir: Path, on_served: Callable[[str, str], None] | None = None) -> None:
        self.socket_dir = Path(socket_dir).absolute()
        self.on_served = on_served
        self._lock = threading.Lock()  # guards the cache and the workload table
        self._admin = threading.Lock()  # one start/stop/add/remove at a time
        self._svids: dict[str, SvidMaterial] = {}
        self._bundles: dict[str, tuple[bytes, ...]] = {}
        self._served: dict[str, str] = {}  # owner -> the certificate last reported to on_served
        self._workloads: dict[str, _Workload] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._hooks: concurrent.futures.ThreadPoolExecutor | None = None

    # ---- lifecycle ----
    def start(self) -> None:
        with self._admin:
            if self._loop is not None:
                return
            self.socket_dir.mkdir(parents=True, exist_ok=True)
            # Workloads must traverse the directory to reach their own socket, but not list it.
            os.chmod(self.socket_dir, 0o711)
            loop = asyncio.new_event_loop()
            self._hooks = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meshloom-nodeagent-hook")
            self._thread = threading.Thread(target=_run_loop, args=(loop,), name="meshloom-nodeagent", daemon=True)
            self._thread.start()
            self._loop = loop

    def stop(self, grace: float = 1.0) -> None:
        """Ends every stream, closes every socket (removing it and its directory) and the agent's threads, after
        running the `on_served` calls already queued (so never call it from `on_served`). The cache stays: a later
        `start` serves it again to the workloads then added."""
        with self._admin:
            loop, thread, hooks = self._loop, self._thread, self._hooks
            if loop is None or thread is None or hooks is None:
                return
            with self._lock:
                workloads = list(self._workloads.values())
                self._workloads.clear()
            try:
                self._on_loop(_gather(*(self._close(w, grace) for w in workloads)), grace + _LOOP_TIMEOUT)
            finally:
                for workload in workloads:
                    _remove_socket(workload.path)
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=grace + _LOOP_TIMEOUT)
                if thread.is_alive():  # a server that will not stop must not keep its process from ending
                    log.warning("the node agent's event loop did not stop within %.0f s", grace + _LOOP_TIMEOUT)
                else:
                    loop.close()
                self._loop = self._thread = self._hooks = None
                hooks.shutdown(wait=True)

    def __enter__(self) -> NodeAgent:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---- workloads ----
    def add_workload(self, owner: str, uid: int | None = None) -> Path:
        """Opens `owner`'s own socket and returns its path: reachable only by `uid` when given, else by whoever can
        reach the directory (on Kubernetes, the pod that mounts it)."""
        with self._admin:
            if self._loop is None:
                raise PermanentError("the node agent is not started")
            with self._lock:
                existing = self._workloads.get(owner)
            if existing is not None:
                if existing.uid == uid:
                    return existing.path
                self._remove(owner, grace=0)
            path = socket_path(self.socket_dir, owner)
            _prepare_socket_dir(path)
            workload = _Workload(owner, uid, path)
            try:
                workload.server = self._on_loop(self._open(workload), _LOOP_TIMEOUT)
                with self._lock:
                    self._workloads[owner] = workload
                _give_socket(path, uid)  # only now can the workload reach its socket
            except BaseException:
                with self._lock:
                    self._workloads.pop(owner, None)
                if workload.server is not None:
                    self._on_loop(self._close(workload, 0), _LOOP_TIMEOUT)
                _remove_socket(path)
                raise
            return path

    def remove_workload(self, owner: str, grace: float = 0.5) -> None:
        """Ends the owner's streams and closes its socket; its cached SVID stays until withdrawn."""
        with self._admin:
            self._remove(owner, grace)

    def workloads(self) -> dict[str, Path]:
        """Each workload's socket."""
        with self._lock:
            return {owner: w.path for owner, w in self._workloads.items()}

    def open_streams(self, owner: str) -> int:
        """How many Fetch* streams the owner's workload holds open right now."""
        with self._lock:
            workload = self._workloads.get(owner)
            return len(workload.streams) if workload is not None else 0

    def _remove(self, owner: str, grace: float) -> None:
        with self._lock:
            workload = self._workloads.pop(owner, None)
            self._served.pop(owner, None)
        if workload is None or self._loop is None:
            return
        try:
            self._on_loop(self._close(workload, grace), grace + _LOOP_TIMEOUT)
        finally:
            _remove_socket(workload.path)

    # ---- SvidDelivery ----
    def deliver(self, owner: str, material: SvidMaterial) -> None:
        _check_material(material)
        with self._lock:
            self._svids[owner] = material
        self._wake(owner)

    def withdraw(self, owner: str, cert: str) -> None:
        with self._lock:
            current = self._svids.get(owner)
            if current is None or current.cert != cert:
                return
            del self._svids[owner]
        self._wake(owner)

    def publish_bundle(self, trust_domain: str, roots: tuple[bytes, ...]) -> None:
        domain = _trust_domain(trust_domain)
        _check_roots(roots)
        with self._lock:
            self._bundles[domain] = tuple(roots)
        self._wake(None)

    # ---- what the streams read (any thread) ----
    def _svid_view(self, owner: str) -> tuple[SvidMaterial | None, tuple[bytes, ...] | None]:
        with self._lock:
            material = self._svids.get(owner)
            roots = self._bundles.get(_trust_domain(material.spiffe_id)) if material is not None else None
            return material, roots

    def _bundle_view(self) -> dict[str, tuple[bytes, ...]]:
        with self._lock:
            return dict(self._bundles)

    def _was_served(self, owner: str, cert: str) -> None:
        with self._lock:
            if self._served.get(owner) == cert:
                return
            self._served[owner] = cert
            hooks = self._hooks
        if self.on_served is not None and hooks is not None:
            hooks.submit(self._call_on_served, owner, cert)

    def _call_on_served(self, owner: str, cert: str) -> None:
        assert self.on_served is not None
        try:
            self.on_served(owner, cert)
        except Exception:  # the hook is the caller's code: report it, and keep serving
            log.exception("on_served(%s, %s) raised", owner, cert)

    # ---- the event loop's side ----
    def _on_loop(self, coro: Any, timeout: float) -> Any:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise TemporaryError(f"the node agent's event loop did not answer within {timeout:g}s") from exc

    def _wake(self, owner: str | None) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us: stop() has ended every stream anyway
            loop.call_soon_threadsafe(self._wake_streams, owner)

    def _wake_streams(self, owner: str | None) -> None:
        with self._lock:
            if owner is None:
                workloads = list(self._workloads.values())
            else:
                workloads = [w for w in (self._workloads.get(owner),) if w is not None]
        for workload in workloads:
            for stream in workload.streams:
                stream.wake.set()

    async def _open(self, workload: _Workload) -> Any:
        server = grpc.aio.server(maximum_concurrent_rpcs=_MAX_CALLS_PER_WORKLOAD)
        # The generated registration (untyped) keeps the method table in step with the pinned spiffe release.
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(  # type: ignore[no-untyped-call]
            _WorkloadApi(self, workload), server)
        try:
            server.add_insecure_port(f"unix:{workload.path}")
        except RuntimeError as exc:
            raise PermanentError(f"cannot listen on {workload.path}: {exc}") from exc
        await server.start()
        return server

    async def _close(self, workload: _Workload, grace: float) -> None:
        for stream in workload.streams:
            stream.ending = True
            stream.wake.set()
        if workload.server is not None:
            await workload.server.stop(grace)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


async def _gather(*coros: Any) -> None:
    await asyncio.gather(*coros)


class _WorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """The Workload API as one socket serves it: everything it answers is its one owner's."""

    def __init__(self, agent: NodeAgent, workload: _Workload) -> None:
        self._agent = agent
        self._workload = workload

    async def FetchX509SVID(self, request: Any, context: Any) -> None:
        await _require_header(context)
        owner = self._workload.owner
        last: tuple[SvidMaterial, tuple[bytes, ...]] | None = None
        async with self._stream() as stream:
            while True:
                stream.wake.clear()
                if stream.ending:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "the node agent closed this socket")
                material, roots = self._agent._svid_view(owner)
                if material is None and last is not None:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
                if material is not None and roots is not None and (material, roots) != last:
                    await context.write(_svid_response(material, roots))
                    last = (material, roots)
                    self._agent._was_served(owner, material.cert)
                await stream.wake.wait()

    async def FetchX509Bundles(self, request: Any, context: Any) -> None:
        await _require_header(context)
        last: dict[str, tuple[bytes, ...]] = {}
        async with self._stream() as stream:
            while True:
                stream.wake.clear()
                if stream.ending:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "the node agent closed this socket")
                bundles = self._agent._bundle_view()
                if bundles and bundles != last:
                    await context.write(workload_pb2.X509BundlesResponse(bundles=_wire_bundles(bundles)))
                    last = bundles
                await stream.wake.wait()

    async def FetchJWTSVID(self, request: Any, context: Any) -> None:
        await _unimplemented(context)

    async def FetchJWTBundles(self, request: Any, context: Any) -> None:
        await _unimplemented(context)

    async def ValidateJWTSVID(self, request: Any, context: Any) -> None:
        await _unimplemented(context)

    @contextlib.asynccontextmanager
    async def _stream(self) -> AsyncIterator[_Stream]:
        stream = _Stream()
        self._workload.streams.add(stream)
        try:
            yield stream
        finally:
            self._workload.streams.discard(stream)


async def _require_header(context: Any) -> None:
    metadata = context.invocation_metadata() or ()
    if not any(key == SECURITY_HEADER and value == "true" for key, value in metadata):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")


async def _unimplemented(context: Any) -> None:
    await _require_header(context)
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node agent serves X.509-SVIDs only")


def _svid_response(material: SvidMaterial, roots: tuple[bytes, ...]) -> Any:
    svid = workload_pb2.X509SVID(spiffe_id=material.spiffe_id, x509_svid=b"".join(material.chain),
                                 x509_svid_key=material.key, bundle=b"".join(roots))
    # No federation: the SVID's own trust domain travels in `bundle`, so federated_bundles stays empty.
    return workload_pb2.X509SVIDResponse(svids=[svid], federated_bundles={})


def _wire_bundles(bundles: Mapping[str, tuple[bytes, ...]]) -> dict[str, bytes]:
    # Keyed by the trust domain's SPIFFE ID, as SPIRE keys them.
    return {f"spiffe://{domain}": b"".join(roots) for domain, roots in sorted(bundles.items())}


# ---- sockets on disk -------------------------------------------------------------------------------------------
def escape_owner(owner: str, limit: int = 200) -> str:
    """The owner as one file name: stable, injective, and free of `%` (gRPC percent-decodes `unix:` paths).

    `/` becomes `_`; every other byte outside [A-Za-z0-9.-] becomes `+XX`, and so does a leading `.` (no `.` or `..`).
    A name longer than `limit` is cut and ends with `~` and a hash of the owner; escaping never makes a `~`, so no
    two owners share a name.
    """
    if not owner:
        raise PermanentError("a workload needs a non-empty owner")
    parts = []
    for byte in owner.encode():
        char = chr(byte)
        if char == "/":
            parts.append("_")
        elif char.isascii() and (char.isalnum() or char in ".-"):
            parts.append(char)
        else:
            parts.append(f"+{byte:02X}")
    name = "".join(parts)
    if name.startswith("."):
        name = "+2E" + name[1:]
    if len(name) > limit:
        digest = hashlib.sha256(owner.encode()).hexdigest()[:16]
        name = f"{name[:max(0, limit - 17)]}~{digest}"
    return name


def endpoint_socket(path: Path) -> str:
    """The SPIFFE_ENDPOINT_SOCKET value for a socket: a `unix:` URI, as py-spiffe refuses a bare path."""
    return f"unix://{Path(path).absolute()}"


def socket_path(socket_dir: Path, owner: str) -> Path:
    """`<socket_dir>/<escaped owner>/agent.sock`, with the name cut to fit a unix socket address."""
    room = _MAX_SOCKET_PATH - len(os.fsencode(socket_dir / "x" / SOCKET_NAME)) + 1
    if "%" in str(socket_dir):
        raise PermanentError(f"socket directory {socket_dir} has a '%', which gRPC would decode")
    if room < 24:
        raise PermanentError(f"socket directory {socket_dir} is too long for unix socket addresses")
    return socket_dir / escape_owner(owner, room) / SOCKET_NAME


def _prepare_socket_dir(path: Path) -> None:
    directory = path.parent
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode):  # a symlink planted there must not redirect the socket
            raise PermanentError(f"{directory} exists and is not a directory")
        # Kept across restarts rather than re-made: a running pod may have this very directory mounted.
        os.chown(directory, os.geteuid(), -1)
        os.chmod(directory, 0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket left by an agent that did not stop cleanly
    except OSError as exc:
        raise PermanentError(f"cannot prepare {directory}: {exc}") from exc


def _give_socket(path: Path, uid: int | None) -> None:
    """Hands the socket to its workload: only `uid` may enter the directory; with no uid, the directory's mount is
    the only fence (a pod sees only the directory it mounts)."""
    try:
        if uid is None:
            os.chmod(path, 0o666)
            os.chmod(path.parent, 0o755)
        else:
            os.chown(path, uid, -1)
            os.chmod(path, 0o600)
            os.chown(path.parent, uid, -1)
    except OSError as exc:
        raise PermanentError(f"cannot give {path} to uid {uid}: {exc}") from exc


def _remove_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    # A directory a pod still mounts, or one someone put files in, stays.
    with contextlib.suppress(OSError):
        os.rmdir(path.parent)


# ---- validation ------------------------------------------------------------------------------------------------
def _trust_domain(name_or_id: str) -> str:
    """`example.org` from `example.org`, `spiffe://example.org` or `spiffe://example.org/any/path`."""
    rest = name_or_id[len("spiffe://"):] if name_or_id.lower().startswith("spiffe://") else name_or_id
    domain = rest.split("/", 1)[0].lower()
    if not domain or any(not (c.isascii() and (c.isalnum() or c in ".-_")) for c in domain):
        raise PermanentError(f"not a trust domain: {name_or_id!r}")
    return domain


def _check_material(material: SvidMaterial) -> None:
    if not material.spiffe_id.startswith("spiffe://") or "/" not in material.spiffe_id[len("spiffe://"):]:
        raise PermanentError(f"not a workload SPIFFE ID: {material.spiffe_id!r}")
    _trust_domain(material.spiffe_id)
    if not material.chain or not all(material.chain) or not material.key:
        raise PermanentError(f"SVID {material.cert} has no certificate or no key")


def _check_roots(roots: tuple[bytes, ...]) -> None:
    # An empty bundle would have every workload trust nothing: a caller's mistake, never a state to publish.
    if not roots or not all(roots):
        raise PermanentError("a trust bundle needs at least one root")


# ---- a node agent in another process ---------------------------------------------------------------------------
class DirectoryDelivery:
    """SvidDelivery into a directory that a node agent in another process follows (`follow_directory`).

        <directory>/workloads/<escaped owner>/svid.json   {"owner", "cert", "spiffe_id", "chain": [base64 DER],
                                                           "key": base64 PKCS#8 DER, "not_after": ISO 8601}
        <directory>/bundle.json                           {"<trust domain>": [base64 DER roots]}

    Every file is written whole and renamed into place, so a reader never sees half of one; files are 0600 and
    directories 0700, since they hold private keys.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()

    def deliver(self, owner: str, material: SvidMaterial) -> None:
        _check_material(material)
        document = {"owner": owner, "cert": material.cert, "spiffe_id": material.spiffe_id,
                    "chain": [_b64(der) for der in material.chain], "key": _b64(material.key),
                    "not_after": material.not_after.isoformat()}
        with self._lock:
            _write_json(self._svid_file(owner), document)

    def withdraw(self, owner: str, cert: str) -> None:
        path = self._svid_file(owner)
        with self._lock:
            try:
                current = json.loads(path.read_bytes())
                if current.get("cert") != cert:
                    return
                path.unlink()
            except FileNotFoundError:
                return
            except (OSError, ValueError) as exc:
                raise TemporaryError(f"cannot withdraw {cert} from {path}: {exc}") from exc
            with contextlib.suppress(OSError):
                path.parent.rmdir()

    def publish_bundle(self, trust_domain: str, roots: tuple[bytes, ...]) -> None:
        domain = _trust_domain(trust_domain)
        _check_roots(roots)
        path = self.directory / "bundle.json"
        with self._lock:
            try:
                bundles = json.loads(path.read_bytes())
            except FileNotFoundError:
                bundles = {}
            except (OSError, ValueError) as exc:
                raise TemporaryError(f"cannot read {path}: {exc}") from exc
            bundles[domain] = [_b64(der) for der in roots]
            _write_json(path, bundles)

    def _svid_file(self, owner: str) -> Path:
        return self.directory / "workloads" / escape_owner(owner) / "svid.json"


def follow_directory(agent: NodeAgent, directory: Path, stop: threading.Event, interval: float = 0.5, *,
                     open_sockets: bool = False) -> None:
    """Applies a `DirectoryDelivery` directory to `agent` until `stop` is set: new and changed SVIDs are delivered,
    removed ones withdrawn, bundles published. It starts from nothing, so a restarted agent gets everything again.
    The files say nothing about a workload's uid: with `open_sockets`, each owner found gets its socket with no uid
    (the pod mounting only its own socket's directory is then the fence); otherwise sockets are the caller's."""
    follower = _Follower(agent, Path(directory), open_sockets)
    while True:
        follower.poll()
        if stop.wait(interval):
            return


# inode, mtime, size. The temporary file is made while the file it replaces is still linked, so a rename into place
# always brings another inode than the one it replaces; an inode reused from older writes comes with a later mtime.
_Signature = tuple[int, int, int]


class _Follower:
    def __init__(self, agent: NodeAgent, directory: Path, open_sockets: bool = False) -> None:
        self.agent = agent
        self.directory = directory
        self.open_sockets = open_sockets
        # file -> its signature when last read, and the (owner, cert) last applied from it, if any
        self.svids: dict[Path, tuple[_Signature, tuple[str, str] | None]] = {}
        self.bundle: _Signature | None = None
        self.roots: dict[str, tuple[bytes, ...]] = {}

    def poll(self) -> None:
        seen: set[Path] = set()
        for path in sorted((self.directory / "workloads").glob("*/svid.json")):
            seen.add(path)
            signature = _signature(path)
            known = self.svids.get(path)
            if signature is None or (known is not None and known[0] == signature):
                continue
            try:
                owner, material = _read_svid(path)
                self.agent.deliver(owner, material)
                if self.open_sockets and owner not in self.agent.workloads():
                    self.agent.add_workload(owner)
            except (OSError, ValueError, KeyError, TypeError, ActionError) as exc:
                log.warning("skipped %s: %s", path, exc)
                # Not read again until it changes; what was applied before stays, so its removal still withdraws it.
                self.svids[path] = (signature, known[1] if known is not None else None)
                continue
            self.svids[path] = (signature, (owner, material.cert))
        for path in set(self.svids) - seen:
            _, applied = self.svids.pop(path)
            if applied is not None:
                self.agent.withdraw(*applied)
        self._poll_bundle()

    def _poll_bundle(self) -> None:
        path = self.directory / "bundle.json"
        signature = _signature(path)
        if signature is None or signature == self.bundle:
            return
        self.bundle = signature
        try:
            document = json.loads(path.read_bytes())
            bundles = {str(domain): tuple(_unb64(der) for der in roots) for domain, roots in document.items()}
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            log.warning("skipped %s: %s", path, exc)
            return
        for domain, roots in bundles.items():
            if self.roots.get(domain) != roots:
                try:
                    self.agent.publish_bundle(domain, roots)
                except ActionError as exc:
                    log.warning("skipped the bundle of %s in %s: %s", domain, path, exc)
                    continue
                self.roots[domain] = roots


def _signature(path: Path) -> _Signature | None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def _read_svid(path: Path) -> tuple[str, SvidMaterial]:
    document = json.loads(path.read_bytes())
    material = SvidMaterial(cert=str(document["cert"]), spiffe_id=str(document["spiffe_id"]),
                            chain=tuple(_unb64(der) for der in document["chain"]), key=_unb64(document["key"]),
                            not_after=datetime.fromisoformat(document["not_after"]))
    return str(document["owner"]), material


def _write_json(path: Path, document: object) -> None:
    """Writes `document` to a temporary file beside `path`, then renames it into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(json.dumps(document, sort_keys=True).encode())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise TemporaryError(f"cannot write {path}: {exc}") from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"expected base64 text, got {type(text).__name__}")
    return base64.b64decode(text, validate=True)
