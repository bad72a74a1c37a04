"""The sidecar's side of configuration propagation: receive its own document over NATS, apply it, acknowledge it.

Theory of operation
-------------------
The control plane keeps each sidecar's last document in the JetStream KV bucket `meshloom-config` (one key per
sidecar, history 1). The sidecar may read only its own key, so it cannot use a KV watcher (which needs the stream
API): instead it

1. core-subscribes to its key's subject, `$KV.meshloom-config.<token>`, and flushes, so the server holds the
   subscription before step 2 reads, and nothing published in between is missed;
2. direct-gets the key's last value (`$JS.API.DIRECT.GET.KV_meshloom-config.$KV.meshloom-config.<token>`, no
   payload), on connect and again on every reconnect: a sidecar that was away gets the current document, not a
   replay of what it missed;
3. direct-gets again every `resync_interval` seconds, a safety net for a message lost in between (and the retry of
   a document whose `apply` failed).

Each value is the envelope `{"sidecar": key, "generation": n, "document": {...}}`. It is applied only when it is
valid JSON, names this sidecar, and is newer than the generation applied last; `apply(document, shards)` raising
means "not applied" (no ack; the next resync or publication tries again). After a successful apply the sidecar
publishes `{"generation": n, "sidecar": key}` on `meshloom.ack.<token>`.

Outbound shards. A document names the outbound shards it needs, `"outbound": {"shards": {namespace: digest}}`
(the digest is `catalog.documents.digest` of the shard's bytes; a document without "outbound" needs none). The
shards are shared by all sidecars and every sidecar may read them all: the client also core-subscribes to
`$KV.meshloom-config.shard.>`, and before applying a document it resolves each shard it names, in this order:

1. the shard it holds, if it holds that digest (held shards were verified once, and are kept while referenced);
2. the last value that arrived live on the shard subscription, if its bytes have that digest (the control plane
   normally stores the shards before the documents that name them, so they are usually here already);
3. a direct get of `shard.<token of the namespace>`, if its bytes have that digest.

A shard missing, or with other bytes (the control plane may store the shard a moment after the document, or
already hold a newer one), makes the document not ready: it is neither applied nor acknowledged but kept as
pending (`pending_generation`), and tried again when a shard arrives live with a digest it waits for (from the
held and arrived shards only), on the next resync, or when a newer document arrives. Once every shard resolved,
shards no longer referenced are dropped and `apply(document, shards)` gets namespace -> parsed shard.

The acknowledgement of a generation already applied is sent again when that generation arrives live (the control
plane republishes a sidecar whose ack it did not get) and after a reconnect (the ack may have been lost with the
connection), but not on the periodic resync, which would otherwise flood the control plane's journal.

`apply` runs in a worker thread (`asyncio.to_thread`), one call at a time per client, so a slow apply (rendering
the proxy config, talking to its runtime API) never stalls the connection's pings; shards are parsed there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from catalog.documents import digest
from catalog.subjects import (
    SHARD_WILDCARD,
    BadToken,
    ack_subject,
    config_subject,
    direct_get_subject,
    namespace_from_shard_subject,
    shard_direct_get_subject,
)

log = logging.getLogger("meshloom.sidecar.config")

# apply(document, shards): the document, and namespace -> parsed outbound shard for every shard it names. Both are
# the client's own objects, to be read, not changed: an unchanged shard is handed over again in the next call.
Apply = Callable[[dict[str, Any], dict[str, dict[str, Any]]], None]
StrPath = str | os.PathLike[str]
KV_OPERATION = "KV-Operation"  # header of a KV delete or purge marker
RETRY_FIRST = 0.5  # seconds before a failed or refused read is tried again; doubles up to the resync interval
REMOVED_OPERATIONS = frozenset({"DEL", "PURGE"})


def tls_context(cert_file: StrPath, key_file: StrPath, ca_file: StrPath) -> ssl.SSLContext:
    """A client context presenting the sidecar's SVID and trusting only the mesh CA."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class BadEnvelope(ValueError):
    pass


def parse_envelope(data: bytes, sidecar: str) -> tuple[int, dict[str, Any]]:
    """(generation, document) of a KV value meant for `sidecar`; BadEnvelope otherwise."""
    value = parse_json_object(data)
    if value.get("sidecar") != sidecar:
        raise BadEnvelope(f"meant for {value.get('sidecar')!r}")
    generation, document = value.get("generation"), value.get("document")
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
        raise BadEnvelope(f"bad generation {generation!r}")
    if not isinstance(document, dict):
        raise BadEnvelope("the document is not a JSON object")
    return generation, document


def wanted_shards(document: dict[str, Any]) -> dict[str, str]:
    """namespace -> digest of every outbound shard the document names; {} without "outbound"; BadEnvelope for a
    malformed list (the document can never be applied)."""
    if "outbound" not in document:
        return {}
    outbound = document["outbound"]
    shards = outbound.get("shards") if isinstance(outbound, dict) else None
    if not isinstance(shards, dict):
        raise BadEnvelope('"outbound" must be {"shards": {namespace: digest}}')
    for namespace, want in shards.items():
        if not namespace or not isinstance(want, str) or not want.startswith("sha256:"):
            raise BadEnvelope(f"bad shard {namespace!r}: {want!r}")
    return dict(shards)


def parse_json_object(data: bytes) -> dict[str, Any]:
    """A KV value (an envelope or a shard) as JSON; BadEnvelope when it is not a JSON object."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadEnvelope(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise BadEnvelope("not a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class _Pending:
    """A document received but not applied: some shard it names has not arrived with its digest yet."""

    generation: int
    document: dict[str, Any]
    wanted: dict[str, str]  # namespace -> digest


class ConfigClient:
    """One sidecar's configuration subscription (see the module header).

    Use `await run()` on an event loop of your own (it returns after `stop()`), or `start()` to run it on a thread
    of its own. `on_error` (optional, called on the client's loop) sees every error the connection reports, such as
    a permissions violation.
    """

    def __init__(self, url: str, sidecar: str, ssl_context: ssl.SSLContext, apply: Apply, inbox_prefix: str, *,
                 resync_interval: float = 30.0, request_timeout: float = 5.0, tls_hostname: str | None = None,
                 name: str | None = None, on_error: Callable[[Exception], None] | None = None) -> None:
        self.url = url
        self.sidecar = sidecar
        self._ssl = ssl_context
        self._apply = apply
        self.inbox_prefix = inbox_prefix
        self.resync_interval = resync_interval
        self.request_timeout = request_timeout
        self._tls_hostname = tls_hostname
        self._name = name or f"sidecar {sidecar}"
        self._on_error = on_error
        self._subject = config_subject(sidecar)
        self._get_subject = direct_get_subject(sidecar)
        self._ack_subject = ack_subject(sidecar)
        self.applied_generation = 0
        self.acked_generation = 0
        self.pending_generation = 0  # received, not applied: waiting for a shard (0: none)
        self.removed = False  # the control plane deleted this sidecar's document
        self._pending: _Pending | None = None
        self._held: dict[str, tuple[str, dict[str, Any]]] = {}  # namespace -> (digest, parsed), verified
        self._arrived: dict[str, tuple[str, bytes]] = {}  # namespace -> (digest, bytes): last live value, unused
        self._nc: NatsClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._stop_requested = threading.Event()
        self._reack = False
        self._lock: asyncio.Lock | None = None
        self._thread: threading.Thread | None = None
        self._subs: list[Any] = []
        self._refused = False  # the server refused a subscription or a read of ours: make them again
        self.connected = threading.Event()  # set while connected and subscribed
        self.synced = threading.Event()  # set once the current document was read since the last (re)connect

    # -- running --
    async def run(self) -> None:
        """Connect (retrying until the server takes us), follow the document until `stop()`, then disconnect."""
        self._loop = asyncio.get_running_loop()
        self._wake, self._stopping, self._lock = asyncio.Event(), asyncio.Event(), asyncio.Lock()
        if self._stop_requested.is_set():
            return
        nc = NatsClient()
        self._nc = nc
        try:
            connecting = asyncio.ensure_future(nc.connect(
                self.url, tls=self._ssl, tls_hostname=self._tls_hostname, name=self._name,
                inbox_prefix=self.inbox_prefix, allow_reconnect=True, max_reconnect_attempts=-1,
                reconnect_time_wait=1, error_cb=self._error, disconnected_cb=self._disconnected,
                reconnected_cb=self._reconnected))
            stopping = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError, nats.errors.Error, OSError):
                    await connecting
                return
            connecting.result()
            await self._subscribe()
            self.connected.set()
            # nothing was acknowledged on this connection's behalf yet
            delay = self._next_delay(await self._sync(reack=False), self.resync_interval)
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                self._wake.clear()
                if self._stopping.is_set():
                    break
                if self._refused:
                    self._refused = False
                    await self._subscribe()
                reack, self._reack = self._reack, False
                delay = self._next_delay(await self._sync(reack=reack), delay)
        finally:
            self.connected.clear()
            self.synced.clear()
            with contextlib.suppress(asyncio.TimeoutError, nats.errors.Error, OSError):
                await asyncio.wait_for(nc.close(), self.request_timeout)

    async def _subscribe(self) -> None:
        """(Re)make both subscriptions. The server drops a subscription it refuses and does not revive it when the
        permission comes later, so after a refusal they are made again (see `_error`)."""
        nc = self._nc
        assert nc is not None
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()
        self._subs = [await nc.subscribe(self._subject, cb=self._on_message),
                      await nc.subscribe(SHARD_WILDCARD, cb=self._on_shard)]
        with contextlib.suppress(nats.errors.TimeoutError):  # the read that follows gets the document anyway
            await nc.flush(timeout=max(1, int(self.request_timeout)))

    def _next_delay(self, read: bool, delay: float) -> float:
        """Until the next read: the resync interval once a read succeeded and nothing was refused; else a retry
        that backs off from RETRY_FIRST, doubling, up to the resync interval."""
        if read and not self._refused:
            return self.resync_interval
        if delay >= self.resync_interval:  # the first failure after a good read
            return RETRY_FIRST
        return min(self.resync_interval, delay * 2)

    def start(self) -> None:
        """Run on a thread of its own."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=lambda: asyncio.run(self.run()), name=f"config {self.sidecar}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask `run()` to return; from any thread. Waits for the thread `start()` made, if any."""
        self._stop_requested.set()
        loop, stopping, wake = self._loop, self._stopping, self._wake
        if loop is not None and stopping is not None and wake is not None and not loop.is_closed():
            def _set() -> None:
                stopping.set()
                wake.set()
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: run() has returned
                loop.call_soon_threadsafe(_set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def use_tls(self, ssl_context: ssl.SSLContext, *, reconnect: bool = False) -> None:
        """Present and trust what `ssl_context` holds from the next connection on (a rotated SVID, a new trust
        bundle); from any thread. The open connection keeps its session, unless `reconnect`: then it is replaced at
        once, so that it is authenticated again under the new trust (nats-py retries until the server takes it, and
        the document is read and acknowledged again as after any reconnection)."""
        self._ssl = ssl_context  # read by run() for a connection not made yet
        loop, nc = self._loop, self._nc
        if loop is None or nc is None:
            return

        async def switch() -> None:
            nc.options["tls"] = ssl_context  # what nats-py's reconnections handshake with
            if reconnect and nc.is_connected:
                await nc.force_reconnect()

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: run() has returned
            asyncio.run_coroutine_threadsafe(switch(), loop)

    def resync(self) -> None:
        """Read the current document now rather than at the next periodic resync; from any thread."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)

    # -- receiving --
    async def _sync(self, *, reack: bool) -> bool:
        """Read the document; False when the read failed (to be tried again soon)."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return False
        try:
            msg = await nc.request(self._get_subject, b"", timeout=self.request_timeout)
        except nats.errors.NoRespondersError:
            self.synced.set()  # no bucket yet: nothing was ever published
            return True
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            log.warning("%s: could not read its document: %s", self.sidecar, type(exc).__name__)
            return False
        status = (msg.headers or {}).get("Status")
        if status is not None and status != "404" and not msg.data:
            log.warning("%s: the document read answered %s %s", self.sidecar, status,
                        (msg.headers or {}).get("Description", ""))
            return False
        if status != "404":  # 404: nothing published for this sidecar yet
            await self._receive(msg, reack=reack)
        self.synced.set()
        return True

    async def _on_message(self, msg: Msg) -> None:
        await self._receive(msg, reack=True)

    async def _receive(self, msg: Msg, *, reack: bool) -> None:
        assert self._lock is not None
        if (msg.headers or {}).get(KV_OPERATION) in REMOVED_OPERATIONS:
            if not self.removed:
                log.info("%s: its document was deleted: the sidecar left the mesh", self.sidecar)
            self.removed = True
            return
        try:
            generation, document = parse_envelope(msg.data, self.sidecar)
        except BadEnvelope as exc:
            log.warning("%s: ignored a document: %s", self.sidecar, exc)
            return
        try:
            wanted = wanted_shards(document)
        except BadEnvelope as exc:
            log.warning("%s: ignored generation %d: %s", self.sidecar, generation, exc)
            return
        async with self._lock:  # one apply at a time, in order; a stale arrival sees the newer generation
            self.removed = False
            if generation < self.applied_generation:
                return
            if generation == self.applied_generation:
                if reack or self.acked_generation < generation:
                    await self._ack(generation)
                return
            if self._pending is not None and generation < self._pending.generation:
                return  # a newer document is already waiting for its shards
            await self._try_apply(_Pending(generation, document, wanted), fetch=True)

    async def _on_shard(self, msg: Msg) -> None:
        """A shard stored (or deleted) by the control plane: keep its bytes for the document that will name them,
        and retry the pending document if it waits for exactly these bytes."""
        assert self._lock is not None
        try:
            namespace = namespace_from_shard_subject(msg.subject)
        except BadToken:
            log.warning("%s: ignored a message on %s", self.sidecar, msg.subject)
            return
        if (msg.headers or {}).get(KV_OPERATION) in REMOVED_OPERATIONS:
            self._arrived.pop(namespace, None)  # a held copy stays valid: it is verified by its digest
            return
        got = digest(msg.data)
        held = self._held.get(namespace)
        if held is not None and held[0] == got:
            self._arrived.pop(namespace, None)  # the same bytes again (a control plane that restarted)
            return
        self._arrived[namespace] = (got, msg.data)
        async with self._lock:  # after a resolution in progress, which may be about to make its document pending
            pending = self._pending
            if pending is not None and pending.wanted.get(namespace) == got:
                await self._try_apply(pending, fetch=False)  # live arrivals and resyncs bring the others

    async def _try_apply(self, candidate: _Pending, *, fetch: bool) -> None:
        """Apply and acknowledge `candidate` if every shard it names resolves, else keep it pending. Holds the lock."""
        shards = await self._resolve(candidate.wanted, fetch=fetch)
        if shards is None:
            if self._pending is None or self._pending.generation <= candidate.generation:
                self._pending = candidate
                self.pending_generation = candidate.generation
            return
        for namespace in self._held.keys() - candidate.wanted.keys():
            del self._held[namespace]  # no document names it any more
        if self._pending is not None and self._pending.generation <= candidate.generation:
            self._pending, self.pending_generation = None, 0
        try:
            await asyncio.to_thread(self._apply, candidate.document, shards)
        except Exception:  # the user's apply failed: not applied, not acknowledged; tried again later
            log.exception("%s: applying generation %d failed", self.sidecar, candidate.generation)
            return
        self.applied_generation = candidate.generation
        await self._ack(candidate.generation)

    async def _resolve(self, wanted: dict[str, str], *, fetch: bool) -> dict[str, dict[str, Any]] | None:
        """namespace -> parsed shard for every shard `wanted` names, or None while one has not arrived with its
        digest (the module header gives the order: held, arrived live, direct get). Every shard that does resolve
        is kept, so that a retry needs only the missing ones."""
        out: dict[str, dict[str, Any]] = {}
        missing: list[str] = []
        for namespace, want in sorted(wanted.items()):
            held = self._held.get(namespace)
            if held is not None and held[0] == want:
                out[namespace] = held[1]
                continue
            arrived = self._arrived.get(namespace)
            if arrived is not None and arrived[0] == want:
                del self._arrived[namespace]
                if (parsed := await self._verified(namespace, want, arrived[1])) is not None:
                    out[namespace] = parsed
                    continue
            missing.append(namespace)
        if missing and fetch:
            fetched = await asyncio.gather(*(self._fetch_shard(namespace) for namespace in missing))
            for namespace, data in zip(missing, fetched, strict=True):
                if data is None:
                    continue
                if digest(data) != wanted[namespace]:
                    log.info("%s: the stored shard of namespace %s is not the one its document names yet",
                             self.sidecar, namespace)
                    continue
                if (parsed := await self._verified(namespace, wanted[namespace], data)) is not None:
                    out[namespace] = parsed
        return out if len(out) == len(wanted) else None

    async def _verified(self, namespace: str, want: str, data: bytes) -> dict[str, Any] | None:
        """Parse bytes whose digest is `want` (checked by the caller) and hold them."""
        try:
            parsed = await asyncio.to_thread(parse_json_object, data)
        except BadEnvelope as exc:  # the digest matched: the control plane published a broken shard
            log.warning("%s: the shard of namespace %s is unusable: %s", self.sidecar, namespace, exc)
            return None
        self._held[namespace] = (want, parsed)
        return parsed

    async def _fetch_shard(self, namespace: str) -> bytes | None:
        """The stored bytes of a namespace's shard, or None (not stored, or the read failed)."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return None
        try:
            msg = await nc.request(shard_direct_get_subject(namespace), b"", timeout=self.request_timeout)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            log.warning("%s: could not read the shard of namespace %s: %s", self.sidecar, namespace,
                        type(exc).__name__)
            return None
        status = (msg.headers or {}).get("Status")
        if status is not None and not msg.data:
            if status != "404":  # 404: not stored yet
                log.warning("%s: the read of shard %s answered %s %s", self.sidecar, namespace, status,
                            (msg.headers or {}).get("Description", ""))
            return None
        if (msg.headers or {}).get(KV_OPERATION) in REMOVED_OPERATIONS:
            return None
        return bytes(msg.data)

    async def _ack(self, generation: int) -> None:
        nc = self._nc
        if nc is None:
            return
        body = json.dumps({"generation": generation, "sidecar": self.sidecar}, separators=(",", ":")).encode()
        try:
            await nc.publish(self._ack_subject, body)
        except (nats.errors.Error, OSError) as exc:
            log.warning("%s: could not acknowledge generation %d: %s", self.sidecar, generation,
                        type(exc).__name__)
            return
        self.acked_generation = max(self.acked_generation, generation)

    # -- connection events --
    async def _error(self, exc: Exception) -> None:
        log.warning("%s: NATS: %s", self.sidecar, str(exc) or type(exc).__name__)
        # A sidecar's permissions come with its first document: one that connects before that (the second pod of
        # a service account, whose identity NATS already knows) is refused its subscription and its read. Make
        # them again, backing off, rather than wait for the next resync with a subscription that stays dead.
        if "permissions violation" in str(exc).lower():
            self._refused = True
            if self._wake is not None:
                self._wake.set()
        if self._on_error is not None:
            self._on_error(exc)

    async def _disconnected(self) -> None:
        self.connected.clear()
        self.synced.clear()

    async def _reconnected(self) -> None:
        # nats-py has subscribed again; read the document anew and send its ack again
        self.connected.set()
        self._reack = True
        if self._wake is not None:
            self._wake.set()
