"""Benchmark of configuration propagation: a new generation for every sidecar, until every sidecar's ack is back.

Run from the repository root: `python -m bench.propagation [--quick] [--out DIR] [--sizes 10,100,1000]
[--only publisher|engine]`.

What is measured
----------------
Two measurements, each for N = 10, 100, 1,000 sidecars (--quick: 10). In both, the sidecars are N
`sidecar.config.ConfigClient`s, each with its OWN client certificate and connection, spread over up to 4 worker
processes, each running its share on one asyncio event loop, against a nats-server on loopback with TLS and
`verify_and_map` (actions.nats.NatsServer: one NATS user per identity with only its own sidecars' subjects,
JetStream KV `meshloom-config` with history 1). `apply` does nothing but note, in the engine measurement, which
policy the document carried: the figures are the propagation path, not the proxy's reload.

publisher  The publish step alone: `NatsConfigPublisher` driven directly, with its own PKI
           (tests/support/natspki.py), one SPIFFE ID per sidecar (spiffe://example.org/ns/bench/sa/s<i>).
  warm-up  generation 1 is published before the workers start; each sidecar connects, direct-gets it, applies and
           acks it. `connect_all_seconds` is the time from starting the workers to the last of these N acks.
  rounds   then, per round, generation g for all N sidecars (a ~1.1 KB JSON document each, different every
           round). The clock starts when the publish step starts and each sidecar's latency ends when its ack for
           g reaches the publisher's `on_ack`, in the publisher's process: one clock, no cross-process skew.
           p50 / p99 / max over all acks of all rounds. Two publish steps, swappable (`PUBLISH_STEPS`):
           batch       `NatsConfigPublisher.publish_many`: all N puts in flight at once, one wait for all.
           sequential  `NatsConfigPublisher.publish` once per sidecar, each blocking on its confirmation.

engine     The whole path, from a policy change to the acknowledgements: `engine.plane.ControlPlane` as
           `meshctl up` runs it (PlaneConfig defaults: SQLite in a temporary state directory, tick 1 s, world
           poll 0.1 s, the mesh CA, the node agent, NATS through actions.meshnats.MeshNats).
  world    namespace `bench` labelled for auto-injection, one Service `app` (http 80 -> 8080) selecting N pods
           `bench/p<i>` (distinct IPs, 4 service accounts, so 4 SPIFFE IDs and NATS users), and the RateLimit
           `bench/app-limit` on that Service. Its rate is the policy change: every pod's document carries it on
           its inbound http port, so each change gives every sidecar a new document (checked with `catalog` before
           the run) and leaves the one outbound shard alone.
  warm-up  the world is applied (`engine.world.apply`, in parts: see APPLY_CHUNK); every sidecar gets an SVID
           signed by the plane's CA, written to files the workers read, and is registered (`sidecar` rollout,
           `register`); once every rollout is published (each first publish adds the sidecar to NATS's
           permissions: `first_publish_seconds`), the workers start and every sidecar connects, applies and acks
           (`connect_all_seconds`); the rounds start only when every rollout is `synced`.
  rounds   ONE `engine.world.apply` of the RateLimit with a new rate. The clock starts just before the apply
           (time.time(): the parent and the workers read the same wall clock of one machine). Two figures per
           sidecar: `acked`, when its ConfigClient counts the new generation acknowledged (the ack handed to NATS,
           right after `apply` returned), timed in the worker and sent back to the parent with the rate of the
           document it applied (a wrong rate is counted); `synced`, when the plane's journal shows its rollout
           moving to `synced` on the ack of the new generation (the journal's time is taken just before that
           commit; the store's rows are then checked: every rollout synced at exactly one generation more).
           p50 / p99 / max over all sidecars of all rounds.
  stages   where the time goes, from the same journal: for each sidecar, when the world watcher told its
           rollout (`change`), when the coalescing window closed (`window_closed`: the tick committed the publish
           effect), when the effect's outcome was committed (`published`); with `acked` and `synced`, each as
           offsets from the apply (p50 / p99 / max over all sidecars and rounds), the earliest (`first`) and the
           time from the first sidecar to the last (`first_to_last`), both medians over rounds.
  costs    the apply's own time; `change_each`, the change stage's first_to_last over N - 1 (at 1,000 the
           world watcher's changes run alongside the tick and the publishes); and, each alone with the plane idle
           after the rounds, the world watcher's load and render of the world and the parts of one PublishConfig
           effect (`publish_costs`).

Target: p99 under 1 s at N = 1,000 (the issue: "from a policy change to acknowledgement by N sidecars"). The
publisher measurement marks it for both publish steps, the engine measurement for `acked` and `synced`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import logging
import multiprocessing
import queue
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import catalog
from actions.ca import pem
from actions.meshnats import SERVER_NAME
from actions.nats import NatsConfigPublisher, NatsServer, check_shard, inbox_prefix
from bench.facts import machine, version, write_results
from engine import world
from engine.executor import shard_key
from engine.plane import ControlPlane, PlaneConfig
from machines.rollout import RolloutReason
from sidecar.config import ConfigClient, tls_context
from store import JournalEntry, Store, migrate, sqlite_url
from tests.catalog.topology import HTTP_8080, INJECT, NGINX2, namespace, pod, policy, service
from tests.support.natspki import TestPki

TARGET_P99_MS = 1000.0  # at 1,000 sidecars
TARGET_AT = 1000
MAX_WORKERS = 4
WAIT = 120.0  # seconds: the longest a round (or the warm-up) may take before the bench gives up
MEASUREMENTS = ("publisher", "engine")
Item = tuple[str, int, bytes]
PublishStep = Callable[[NatsConfigPublisher, Sequence[Item]], None]


def publish_batch(publisher: NatsConfigPublisher, items: Sequence[Item]) -> None:
    publisher.publish_many(items)


def publish_sequential(publisher: NatsConfigPublisher, items: Sequence[Item]) -> None:
    for sidecar, generation, document in items:
        publisher.publish(sidecar, generation, document)


PUBLISH_STEPS: dict[str, PublishStep] = {"batch": publish_batch, "sequential": publish_sequential}


@dataclass(frozen=True)
class Sizes:
    sidecars: tuple[int, ...]
    rounds: int  # generations published to all sidecars per N and publish step
    steps: tuple[str, ...]
    engine_rounds: int  # policy changes per N through the control plane


FULL = Sizes(sidecars=(10, 100, 1000), rounds=10, steps=("batch", "sequential"), engine_rounds=5)
QUICK = Sizes(sidecars=(10,), rounds=3, steps=("batch", "sequential"), engine_rounds=2)


# ---- helpers -----------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


def figure(value: float, unit: str, target: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"value": round(value, 3), "unit": unit}
    if target is not None:
        out["target"] = target
        out["met"] = value < target
    return out


def spread(seconds: list[float], target: float | None = None) -> dict[str, Any]:
    """p50 / p99 / max of latencies in seconds, as figures in ms; the target (if any) is on the p99."""
    ms = [s * 1000 for s in seconds]
    return {"p50": figure(percentile(ms, 0.50), "ms"), "p99": figure(percentile(ms, 0.99), "ms", target),
            "max": figure(max(ms), "ms")}


def median(values: list[float]) -> float:
    return statistics.median(values)


def eventually(what: Callable[[], bool], timeout: float, message: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} within {timeout:.0f} s")
        time.sleep(every)


def document(sidecar: str, generation: int) -> bytes:
    """A stand-in for the catalog's document: about 1.1 KB of routes and endpoints."""
    endpoints = [{"ip": f"10.1.{generation % 250}.{i}", "port": 8080, "weight": 100} for i in range(20)]
    return json.dumps({"sidecar": sidecar, "generation": generation, "mtls": "strict",
                       "routes": [{"service": "web.default", "endpoints": endpoints}]}).encode()


class Acks:
    """The publisher's on_ack: when each (sidecar, generation) ack arrived, and a wait for a whole generation."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.at: dict[int, dict[str, float]] = {}

    def __call__(self, sidecar: str, generation: int) -> None:
        now = time.perf_counter()
        with self._cond:
            self.at.setdefault(generation, {}).setdefault(sidecar, now)
            self._cond.notify_all()

    def wait(self, generation: int, n: int, timeout: float = WAIT) -> dict[str, float]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.at.get(generation, {})) >= n, timeout):
                got = len(self.at.get(generation, {}))
                raise TimeoutError(f"only {got} of {n} sidecars acknowledged generation {generation} in {timeout} s")
            return dict(self.at[generation])


# ---- the worker processes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientSpec:
    sidecar: str
    cert: str
    key: str
    ca: str
    inbox: str
    tls_hostname: str | None = None  # the mesh's NATS is verified by its DNS SAN `localhost`


# What a worker reports of each first acknowledgement: sidecar, generation, the bench rate of the document it
# applied (None: none in it), and when (time.time()).
AckReport = tuple[str, int, str | None, float]
REPORT_EVERY = 0.02  # seconds between a worker's batches of reports: the parent's timing does not depend on it


def bench_rate(doc: Mapping[str, Any]) -> str | None:
    """The rate of the bench's RateLimit in a sidecar's document, as the catalog rendered it."""
    for port in doc.get("inbound", ()):
        for limit in port.get("rateLimits", ()):
            if limit.get("policy") == f"{ENGINE_NS}/{ENGINE_POLICY}":
                return str(limit.get("rate"))
    return None


class TimedClient(ConfigClient):
    """A ConfigClient that reports the moment it counts a generation acknowledged.

    The client has no hook for that moment, but it records it in the public `acked_generation` right after it
    handed the ack to NATS (and `apply` ran just before, for the same generation): the property below notes the
    time when the number goes up. A repeated ack of the same generation does not move it, so each generation is
    reported once.
    """

    def __init__(self, url: str, spec: ClientSpec, reports: list[AckReport]) -> None:
        self._reports, self._acked = reports, 0
        self._rate: str | None = None
        super().__init__(url, spec.sidecar, tls_context(spec.cert, spec.key, spec.ca), self._note,
                         spec.inbox, resync_interval=3600.0, tls_hostname=spec.tls_hostname)

    def _note(self, document: dict[str, Any], shards: dict[str, dict[str, Any]]) -> None:
        self._rate = bench_rate(document)

    @property
    def acked_generation(self) -> int:
        return self._acked

    @acked_generation.setter
    def acked_generation(self, value: int) -> None:
        if value > self._acked:
            self._reports.append((self.sidecar, value, self._rate, time.time()))
        self._acked = value


def _worker(url: str, specs: list[ClientSpec], stop: Any, reports: Any = None) -> None:
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_run_clients(url, specs, stop, reports))


async def _run_clients(url: str, specs: list[ClientSpec], stop: Any, reports: Any) -> None:
    def apply(document: dict[str, Any], shards: dict[str, dict[str, Any]]) -> None:
        pass  # the publisher measurement's documents name no outbound shards: `shards` is always {}

    pending: list[AckReport] = []
    clients: list[ConfigClient]
    if reports is None:
        clients = [ConfigClient(url, s.sidecar, tls_context(s.cert, s.key, s.ca), apply, s.inbox,
                                resync_interval=3600.0, tls_hostname=s.tls_hostname) for s in specs]
    else:
        clients = [TimedClient(url, s, pending) for s in specs]
    tasks = []
    for i, client in enumerate(clients):
        tasks.append(asyncio.create_task(client.run()))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # spread the TLS handshakes a little: a real mesh never starts all at once
    stopped = asyncio.get_running_loop().run_in_executor(None, stop.wait)
    if reports is None:
        await stopped
    while not stopped.done():
        await asyncio.wait({stopped}, timeout=REPORT_EVERY)
        if pending:
            reports.put(list(pending))
            pending.clear()
    for client in clients:
        client.stop()
    await asyncio.gather(*tasks, return_exceptions=True)


def start_workers(ctx: Any, url: str, specs: list[ClientSpec], stop: Any, reports: Any = None) -> list[Any]:
    n_workers = min(MAX_WORKERS, len(specs))
    workers = []
    for w in range(n_workers):
        proc = ctx.Process(target=_worker, args=(url, specs[w::n_workers], stop, reports), daemon=True)
        proc.start()
        workers.append(proc)
    return workers


def stop_workers(workers: list[Any], stop: Any, reports: Any = None) -> None:
    stop.set()
    deadline = time.monotonic() + 30
    while reports is not None and any(p.is_alive() for p in workers) and time.monotonic() < deadline:
        try:  # a worker exits only once what it put on the queue is read
            reports.get(timeout=0.1)
        except queue.Empty:
            pass
    for proc in workers:
        proc.join(max(0.1, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5)


# ---- the publisher measurement ---------------------------------------------------------------------------------
def run_size(n: int, sizes: Sizes, tmp: Path) -> dict[str, Any]:
    pki = TestPki(tmp / f"pki-{n}")
    server_pair = pki.server()
    control = pki.svid("meshloom", "controller")
    svids = {f"bench/s{i}.pod": pki.svid("bench", f"s{i}") for i in range(n)}
    server = NatsServer(tmp / f"nats-{n}", cert=server_pair.cert, key=server_pair.key, ca=pki.ca,
                        control_plane=control.spiffe_id)
    server.set_sidecars({key: svid.spiffe_id for key, svid in svids.items()})
    server.start()
    acks = Acks()
    publisher = NatsConfigPublisher(server.url, control.context(), acks, timeout=30.0,
                                    inbox=inbox_prefix(control.spiffe_id))
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    workers: list[Any] = []
    try:
        keys = sorted(svids)
        publish_batch(publisher, [(key, 1, document(key, 1)) for key in keys])
        specs = [ClientSpec(key, str(svids[key].cert), str(svids[key].key), str(pki.ca),
                            inbox_prefix(svids[key].spiffe_id)) for key in keys]
        t0 = time.perf_counter()
        workers = start_workers(ctx, server.url, specs, stop)
        acks.wait(1, n, timeout=WAIT + n * 0.1)
        connect_all = time.perf_counter() - t0
        print(f"  N={n}: {n} sidecars in {len(workers)} processes connected and acknowledged generation 1 in "
              f"{connect_all:.2f} s", flush=True)

        generation = 1
        modes: dict[str, Any] = {}
        for step_name in sizes.steps:
            step = PUBLISH_STEPS[step_name]
            latencies: list[float] = []
            publish_times: list[float] = []
            for _ in range(sizes.rounds):
                generation += 1
                items = [(key, generation, document(key, generation)) for key in keys]
                start = time.perf_counter()
                step(publisher, items)
                publish_times.append(time.perf_counter() - start)
                arrived = acks.wait(generation, n)
                latencies += [t - start for t in arrived.values()]
            modes[step_name] = {
                "rounds": sizes.rounds,
                "acks": len(latencies),
                **spread(latencies, TARGET_P99_MS if n >= TARGET_AT else None),
                "publish_step_p50": figure(percentile(publish_times, 0.5) * 1000, "ms"),
            }
            print(f"  N={n} {step_name:<10} p50 {modes[step_name]['p50']['value']:8.1f} ms   "
                  f"p99 {modes[step_name]['p99']['value']:8.1f} ms   max {modes[step_name]['max']['value']:8.1f} ms"
                  f"   (publishing took {modes[step_name]['publish_step_p50']['value']:.1f} ms)", flush=True)
        return {"sidecars": n, "worker_processes": len(workers), "connect_all_seconds": round(connect_all, 3),
                "document_bytes": len(document(keys[0], 2)), "steps": modes}
    finally:
        stop_workers(workers, stop)
        publisher.close()
        server.stop()


# ---- the engine measurement ------------------------------------------------------------------------------------
ENGINE_NS, ENGINE_SERVICE, ENGINE_POLICY = "bench", "app", "app-limit"
ENGINE_ACCOUNTS = 4
FIRST_RATE = 100  # requests per second in the first world; each round adds one
SVID_TTL = 3600.0  # seconds: longer than any run, so no SVID is renewed meanwhile
# The world is applied in parts: on SQLite, one apply of more than 996 resources fails ("Expression tree is too
# large"), as `Store.resources_named` asks for all of them in one OR of (kind, namespace, name) conditions.
APPLY_CHUNK = 500
COST_REPEATS = 5
PROBE_KEY = f"{ENGINE_NS}/probe"  # no pod of that name: its key is read by no sidecar
# The journal's view of one sidecar's rollout in a round, in the order they happen, and the sidecar's own ack.
JOURNAL_STAGES = ("change", "window_closed", "published", "synced")
STAGES = ("change", "window_closed", "published", "acked", "synced")
ACKED_NOW = (RolloutReason.ACKNOWLEDGED.value, RolloutReason.FIRST_ACK.value)


def engine_key(i: int) -> str:
    return f"{ENGINE_NS}/p{i}"


def rate_limit(rate: int) -> dict[str, Any]:
    return policy(NGINX2, "RateLimit", ENGINE_NS, ENGINE_POLICY, {
        "destination": {"kind": "Service", "name": ENGINE_SERVICE, "namespace": ENGINE_NS},
        "name": "bench", "rate": f"{rate}r/s"})


def engine_world(n: int, rate: int) -> list[dict[str, Any]]:
    """N meshed pods behind one Service, and the RateLimit on it (see the module header)."""
    return [
        {"apiVersion": "meshloom.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
         "spec": {"mtlsMode": "strict", "accessControlMode": "allow"}},
        namespace(ENGINE_NS, INJECT),
        service(ENGINE_NS, ENGINE_SERVICE, {"app": ENGINE_SERVICE},
                [{"name": "http", "port": 80, "targetPort": 8080}], "10.96.0.10"),
        *(pod(ENGINE_NS, f"p{i}", {"app": ENGINE_SERVICE}, f"sa{i % ENGINE_ACCOUNTS}",
              f"10.1.{i // 250}.{i % 250 + 1}", HTTP_8080) for i in range(n)),
        rate_limit(rate),
    ]


def check_the_change(n: int, trust_domain: str) -> None:
    """The rounds' policy change must give every pod a new document, and leave the outbound shards as they are."""
    before = catalog.render(catalog.World(catalog.parse_all(engine_world(n, FIRST_RATE))), trust_domain)
    after = catalog.render(catalog.World(catalog.parse_all(engine_world(n, FIRST_RATE + 1))), trust_domain)
    keys = {engine_key(i) for i in range(n)}
    if set(before.sidecars) != keys or catalog.changed(before.sidecars, after.sidecars) != keys:
        raise RuntimeError("the bench's policy change does not give every pod a new document")
    if before.shared != after.shared:
        raise RuntimeError("the bench's policy change changes an outbound shard too")


def write_svids(plane: ControlPlane, keys: Iterable[str], folder: Path) -> list[ClientSpec]:
    """Each sidecar's SVID, signed by the plane's CA for its pod's identity, as files its worker reads."""
    from cryptography.hazmat.primitives import serialization

    assert plane.nats is not None
    folder.mkdir(parents=True)
    bundle = folder / "bundle.pem"
    bundle.write_bytes(plane.nats.bundle.read_bytes())
    specs = []
    for key in keys:
        doc = plane.store.document(key)
        assert doc is not None
        spiffe_id = str(json.loads(doc.body)["spiffeId"])
        issued = plane.ca.sign_svid(spiffe_id, (f"{key.replace('/', '.')}.pod",), SVID_TTL)
        cert, private = folder / f"{key.replace('/', '_')}.pem", folder / f"{key.replace('/', '_')}.key"
        cert.write_bytes(pem([issued.certificate, *issued.chain]))
        private.write_bytes(issued.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        specs.append(ClientSpec(key, str(cert), str(private), str(bundle), inbox_prefix(spiffe_id), SERVER_NAME))
    return specs


class AckLog:
    """The workers' reports in the parent: sidecar -> generation -> (time of its first ack, rate it applied)."""

    def __init__(self, reports: Any) -> None:
        self.reports = reports
        self.at: dict[str, dict[int, tuple[float, str | None]]] = {}

    def wait(self, want: Mapping[str, int], timeout: float) -> dict[str, tuple[int, float, str | None]]:
        """Each sidecar's first ack of generation want[sidecar] or later: (generation, time, rate)."""
        def acked(sidecar: str) -> bool:
            return any(g >= want[sidecar] for g in self.at.get(sidecar, {}))

        missing = {s for s in want if not acked(s)}
        deadline = time.monotonic() + timeout
        while missing:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(missing)} of {len(want)} sidecars did not acknowledge within "
                                   f"{timeout:.0f} s, such as {sorted(missing)[:3]}")
            try:
                batch = self.reports.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            for sidecar, generation, rate, at in batch:
                self.at.setdefault(sidecar, {}).setdefault(generation, (at, rate))
                if sidecar in missing and generation >= want[sidecar]:
                    missing.discard(sidecar)
        out = {}
        for sidecar, g in want.items():
            first = min(x for x in self.at[sidecar] if x >= g)
            out[sidecar] = (first, *self.at[sidecar][first])
        return out


def rollouts_settled(store: Store, want: Mapping[str, int]) -> bool:
    """Every rollout synced at (at least) the wanted generation, and no publish effect left in the outbox: the
    outcome of a publish may be committed after the ack it led to, and must be in this round's journal."""
    if store.counts().get("sidecar", {}).get("synced", 0) < len(want) or store.pending_effects("sidecar"):
        return False
    rows = {e.key: e for e in store.list("sidecar")}
    return all((r := rows.get(key)) is not None and r.state == "synced"
               and int(r.data["acked"]) == int(r.data["desired"]) >= g for key, g in want.items())


def journal_after(store: Store, after_id: int) -> list[JournalEntry]:
    out: list[JournalEntry] = []
    for _ in range(1000):  # pages of 10,000: far more than any run writes
        page = store.journal_all(after_id, limit=10_000)
        if not page:
            break
        out += page
        after_id = page[-1].id
    return out


def journal_stages(entries: Iterable[JournalEntry], t0: float) -> dict[str, dict[str, float]]:
    """stage -> sidecar -> seconds from t0 to the first journal row of that stage (JOURNAL_STAGES)."""
    out: dict[str, dict[str, float]] = {stage: {} for stage in JOURNAL_STAGES}
    for j in entries:
        if j.kind != "sidecar":
            continue
        if j.trigger == "change":
            stage = "change"
        elif j.trigger == "tick" and j.to_state == "publishing":
            stage = "window_closed"
        elif j.trigger == "published":
            stage = "published"
        elif j.trigger == "ack" and j.to_state == "synced" and j.reason in ACKED_NOW:
            stage = "synced"
        else:
            continue
        out[stage].setdefault(j.key, j.at.timestamp() - t0)
    return out


def publish_costs(plane: ControlPlane, key: str) -> dict[str, Any]:
    """What one PublishConfig effect does, part by part, each timed alone with the plane idle (median of
    COST_REPEATS): read the sidecar's document; read the outbound shard it names, and check and digest it as the
    publisher does before it skips a shard it stored already; one put with its JetStream confirmation (to a key no
    sidecar reads, on the plane's own connection)."""
    assert plane.nats is not None
    publisher = plane.nats.publisher
    reads, shards, puts = [], [], []
    for i in range(COST_REPEATS):
        t = time.perf_counter()
        doc = plane.store.document(key)
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        shard = plane.store.document(shard_key(ENGINE_NS))
        assert doc is not None and shard is not None
        body = shard.body.encode()
        check_shard(ENGINE_NS, body)
        hashlib.sha256(body).hexdigest()
        shards.append(time.perf_counter() - t)
        t = time.perf_counter()
        publisher.publish(PROBE_KEY, i + 1, doc.body.encode())
        puts.append(time.perf_counter() - t)
    return {"document_read": figure(median(reads) * 1000, "ms"),
            "shard_read_check_digest": figure(median(shards) * 1000, "ms"),
            "nats_put_confirmed": figure(median(puts) * 1000, "ms")}


def run_engine_size(n: int, sizes: Sizes, tmp: Path) -> dict[str, Any]:
    state = tmp / f"plane-{n}"
    state.mkdir()
    url = sqlite_url(state)
    migrate.upgrade(url)
    store = Store(url)
    plane = ControlPlane(store, PlaneConfig(state))  # as `meshctl up` runs it: tick 1 s, world poll 0.1 s
    check_the_change(n, plane.trust_domain)
    keys = [engine_key(i) for i in range(n)]
    ctx = multiprocessing.get_context("spawn")
    stop, reports = ctx.Event(), ctx.Queue()
    workers: list[Any] = []
    # At 1,000 sidecars the tick and the world watcher outlast their intervals, and APScheduler says so for every
    # run it skips: the stages below measure that, so the warnings are kept off the report.
    scheduler_log = logging.getLogger("apscheduler.scheduler")
    scheduler_level = scheduler_log.level
    scheduler_log.setLevel(logging.ERROR)
    try:
        plane.start()
        assert plane.nats is not None
        rate = FIRST_RATE
        manifests = engine_world(n, rate)
        for i in range(0, len(manifests), APPLY_CHUNK):
            world.apply(store, manifests[i:i + APPLY_CHUNK], actor="bench", now=plane.clock.now())
        eventually(lambda: set(keys) <= store.document_digests().keys(), WAIT, "the world was never rendered")
        eventually(lambda: plane.ca.active is not None, WAIT, "the mesh CA never started signing")
        specs = write_svids(plane, keys, tmp / f"svids-{n}")

        t = time.perf_counter()
        for key in keys:
            plane.engine.fire("sidecar", key, "register", {"owner": key}, actor="bench")
        registered = time.perf_counter() - t

        def all_published() -> bool:
            states = store.counts().get("sidecar", {})
            if states.get("failed"):
                raise RuntimeError(f"{states['failed']} rollouts failed to publish")
            return sum(states.values()) == n and not (states.get("pending") or states.get("publishing"))

        # Each first publish adds a sidecar to NATS's permissions (a reload); the clients connect after that.
        eventually(all_published, WAIT + n * 0.5, "the first documents were not all published")
        first_publish = time.perf_counter() - t
        t = time.perf_counter()
        workers = start_workers(ctx, plane.nats.url, specs, stop, reports)
        acks = AckLog(reports)
        acks.wait({key: 1 for key in keys}, WAIT + n * 0.1)
        eventually(lambda: rollouts_settled(store, {key: 1 for key in keys}), WAIT, "the rollouts never synced")
        connect_all = time.perf_counter() - t
        print(f"  N={n} engine: registered in {registered:.2f} s, first documents published in {first_publish:.2f} s,"
              f" {n} sidecars in {len(workers)} processes connected and synced in {connect_all:.2f} s", flush=True)

        cursor = max((j.id for j in journal_after(store, 0)), default=0)
        samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
        firsts: dict[str, list[float]] = {stage: [] for stage in STAGES}
        first_to_last: dict[str, list[float]] = {stage: [] for stage in STAGES}
        applies: list[float] = []
        wrong = extra = republished = 0
        target = TARGET_P99_MS if n >= TARGET_AT else None
        for r in range(sizes.engine_rounds):
            rows = {e.key: e for e in store.list("sidecar")}
            want = {key: int(rows[key].data["desired"]) + 1 for key in keys}
            rate += 1
            t0 = time.time()
            world.apply(store, [rate_limit(rate)], actor="bench", now=plane.clock.now())
            applies.append(time.time() - t0)
            got = acks.wait(want, WAIT)
            eventually(functools.partial(rollouts_settled, store, want), WAIT, "the rollouts did not all settle",
                       every=0.02)

            entries = journal_after(store, cursor)
            cursor = max((j.id for j in entries), default=cursor)
            republished += sum(1 for j in entries if j.kind == "sidecar" and j.reason == RolloutReason.ACK_TIMED_OUT)
            round_times = journal_stages(entries, t0)
            round_times["acked"] = {key: at - t0 for key, (_, at, _) in got.items()}
            wrong += sum(1 for _, _, applied in got.values() if applied != f"{rate}r/s")
            extra += sum(1 for key, (generation, _, _) in got.items() if generation != want[key])
            extra += sum(1 for e in store.list("sidecar") if int(e.data["desired"]) != want[e.key])
            for stage in STAGES:
                found = round_times[stage]
                if set(found) != set(keys):
                    raise RuntimeError(f"round {r + 1}: the journal shows stage {stage} for {len(found)} of {n} "
                                       "sidecars")
                samples[stage] += found.values()
                firsts[stage].append(min(found.values()))
                first_to_last[stage].append(max(found.values()) - min(found.values()))
            print(f"  N={n} engine round {r + 1}: apply {applies[-1] * 1000:7.1f} ms   last change "
                  f"{max(round_times['change'].values()) * 1000:7.1f} ms   last published "
                  f"{max(round_times['published'].values()) * 1000:7.1f} ms   acked p99 "
                  f"{percentile(list(round_times['acked'].values()), 0.99) * 1000:7.1f} ms   synced p99 "
                  f"{percentile(list(round_times['synced'].values()), 0.99) * 1000:7.1f} ms", flush=True)

        loads, renders = [], []
        for _ in range(COST_REPEATS):  # with the plane idle: what the world watcher does on every change, alone
            t = time.perf_counter()
            loaded = world.load_world(store)
            loads.append(time.perf_counter() - t)
            t = time.perf_counter()
            catalog.render(loaded, plane.trust_domain)
            renders.append(time.perf_counter() - t)
        doc, shard = store.document(keys[0]), store.document(shard_key(ENGINE_NS))
        return {
            "sidecars": n, "worker_processes": len(workers), "service_accounts": min(n, ENGINE_ACCOUNTS),
            "document_bytes": len(doc.body) if doc else None, "shard_bytes": len(shard.body) if shard else None,
            "register_seconds": round(registered, 3), "first_publish_seconds": round(first_publish, 3),
            "connect_all_seconds": round(connect_all, 3),
            "rounds": sizes.engine_rounds, "acks": len(samples["acked"]), "wrong_documents": wrong,
            "extra_generations": extra, "republished": republished,
            "acked": spread(samples["acked"], target),
            "synced": spread(samples["synced"], target),
            "stages": {stage: spread(samples[stage])
                       | {"first": figure(median(firsts[stage]) * 1000, "ms"),
                          "first_to_last": figure(median(first_to_last[stage]) * 1000, "ms")} for stage in STAGES},
            "apply": spread(applies),
            "costs": {
                "world_load": figure(median(loads) * 1000, "ms"),
                "render": figure(median(renders) * 1000, "ms"),
                # the world watcher fires `change` on one rollout after the other, a transaction each
                "change_each": figure(median(first_to_last["change"]) * 1000 / max(1, n - 1), "ms"),
                **publish_costs(plane, keys[0]),
            },
        }
    finally:
        stop_workers(workers, stop, reports)
        plane.stop()
        store.close()
        scheduler_log.setLevel(scheduler_level)


# ---- machine facts and reporting -----------------------------------------------------------------------------------
def _nats_server_version(server_binary: str) -> str | None:
    try:
        out = subprocess.run([server_binary, "--version"], check=False, capture_output=True, text=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_facts() -> dict[str, Any]:
    from actions.nats import find_binary

    return machine(nats_server=_nats_server_version(find_binary()), nats_py=version("nats-py"))


def _p99(p99: dict[str, Any]) -> str:
    mark = "" if "met" not in p99 else ("  ok" if p99["met"] else "  MISSED")
    target = f" (target < {p99['target']:.0f})" if "target" in p99 else ""
    return f"p99 {p99['value']:8.1f} ms{target}{mark}"


def summary(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"Meshloom configuration propagation benchmark ({doc['mode']}), {m['date']}",
             f"  {m['cores']} cores ({m['cpu']}), Python {m['python']}, {m['nats_server']}, nats-py {m['nats_py']}",
             ""]
    measurements = doc["measurements"]
    if "publisher" in measurements:
        lines += ["publisher: NatsConfigPublisher driven directly, publish to ack", ""]
        for res in measurements["publisher"]["results"]:
            lines.append(f"N = {res['sidecars']} sidecars ({res['worker_processes']} worker processes, "
                         f"all connected in {res['connect_all_seconds']:.2f} s)")
            for name, s in res["steps"].items():
                lines.append(f"  {name:<10} p50 {s['p50']['value']:8.1f} ms   {_p99(s['p99'])}   "
                             f"max {s['max']['value']:8.1f} ms   ({s['rounds']} rounds, {s['acks']} acks)")
            lines.append("")
    if "engine" in measurements:
        lines += ["engine: ControlPlane, from a policy change (engine.world.apply) to the acks", ""]
        for res in measurements["engine"]["results"]:
            lines.append(f"N = {res['sidecars']} sidecars ({res['worker_processes']} worker processes, "
                         f"connected and synced in {res['connect_all_seconds']:.2f} s; {res['rounds']} rounds, "
                         f"{res['acks']} acks, {res['wrong_documents']} wrong documents, "
                         f"{res['extra_generations']} extra generations, {res['republished']} republished)")
            for name in ("acked", "synced"):
                s = res[name]
                lines.append(f"  {name:<10} p50 {s['p50']['value']:8.1f} ms   {_p99(s['p99'])}   "
                             f"max {s['max']['value']:8.1f} ms")
            lines.append("  stages, ms after the apply:  first    p50    max   (first sidecar to last)")
            for name, s in res["stages"].items():
                lines.append(f"    {name:<14} {s['first']['value']:8.1f} {s['p50']['value']:8.1f} "
                             f"{s['max']['value']:8.1f}   ({s['first_to_last']['value']:.1f})")
            costs = ", ".join(f"{name} {c['value']:.2f}" for name, c in res["costs"].items())
            lines.append(f"  costs, ms: apply p50 {res['apply']['p50']['value']:.1f}, {costs}")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.propagation", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 sidecars (seconds); writes propagation-quick.json")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON results")
    parser.add_argument("--sizes", help="comma-separated sidecar counts, instead of 10,100,1000")
    parser.add_argument("--only", choices=MEASUREMENTS, help="run one of the two measurements")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.sizes:
        sizes = Sizes(tuple(int(x) for x in args.sizes.split(",")), sizes.rounds, sizes.steps, sizes.engine_rounds)
    chosen = (args.only,) if args.only else MEASUREMENTS
    runs = {"publisher": run_size, "engine": run_engine_size}

    measurements: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="meshloom-bench-") as tmp:
        for name in chosen:
            results = []
            for n in sizes.sidecars:
                print(f"[{name} N={n}] ...", flush=True)
                results.append(runs[name](n, sizes, Path(tmp)))
            measurements[name] = {"results": results}

    doc = {
        "benchmark": "propagation",
        "mode": "quick" if args.quick else "full",
        "machine": machine_facts(),
        "sizes": {"sidecars": list(sizes.sidecars), "rounds": sizes.rounds, "steps": list(sizes.steps),
                  "engine_rounds": sizes.engine_rounds},
        "targets": {"p99": figure(TARGET_P99_MS, "ms") | {"at_sidecars": TARGET_AT}},
        "method": __doc__.split("What is measured", 1)[1].strip(),
        "measurements": measurements,
    }
    write_results(doc, args.out / ("propagation-quick.json" if args.quick else "propagation.json"), summary(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
