"""Benchmarks of the lifecycle engine's commit path and scheduler tick, on SQLite and on PostgreSQL.

Run from the repository root: `python -m bench.engine [--quick] [--out DIR] [--no-postgres]`.

What is measured
----------------
fire    Persisted transitions per second through `Engine.fire(..., drain=False)`. Every counted call loads the
        entity (`Store.get`), runs its machine, and commits in ONE transaction (`Store.apply`) the entity row, its
        journal row and at least one outbox row. Effects are not run (drain=False): only the commit path is timed.
        Three workloads, one after the other on a fresh database per round:
          create   `cert request` on a new key: INSERT entity + journal + outbox (SignSvid)
          outcome  `cert issued` answering that SignSvid (consumes=its outbox id), as the engine feeds an effect's
                   outcome back: DELETE the answered outbox row + version-guarded UPDATE + journal + 2 outbox rows
          update   `cert fail`, then `cert retry`, on the same keys: version-guarded UPDATE + journal + outbox
                   (`fail` emits Fire(pod, fail): it is the pod's first certificate; `retry` emits SignSvid)
        Throughput is calls / wall time of the loop (median of the rounds); latency is each call's own wall time.
        After each workload the bench counts journal and outbox rows against what the transitions must have left.

tick    The wall time of one `Engine.tick()` with 10,000 certificates in the store, all `delivered`, their
        half-life rotation times (`rotate_at`, with the machine's own jitter) spread as in a steady state: each was
        issued at a uniformly random moment of the last half-life (SVID TTL 1 h, so 30 min). "Now" is placed with
        `FakeClock` so that exactly k certificates are due:
          none    k = 0: the tick is the scheduler's two queries (due entities, due effects)
          steady  k = 10,000 / 1,800 s ~ 6: what a 1 s tick finds in that steady state (0.06 %)
          burst   k = 1 % = 100 (a node restart or CA rotation bunches rotations together)
        The tick commits the due certificates' `tick` (one commit for all of them: tick -> rotation-due) and hands
        the effects to `dispatch`, which in the runtime gives them to its workers; so the tick's time is the
        queries and that commit. The rotations themselves (successor requested, signed by the fake CA, issued,
        delivered, old one superseded: 4 more transitions and a signature each) run after the tick and are timed
        apart (`effects_after_the_tick`), with no signing rate limit so that all of them run. Also timed apart: the
        scheduler's queries alone (`due_entities` + `due_effects`, `scheduler_query`), and the part of the tick spent
        firing `tick` on the due certificates (`firing_due`).

The PostgreSQL server is private (tests/support/postgres.py: initdb in a temporary folder, loopback, fsync on),
started here and stopped at the end. SQLite is a file in a temporary folder, configured by the store (WAL,
synchronous=NORMAL).
"""

from __future__ import annotations

import argparse
import gc
import random
import re
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from actions import fake_actions
from actions.clock import FakeClock
from bench.facts import machine, version, write_results
from engine import Engine, ensure_ca
from machines.base import Context
from machines.certificate import CERT_SPEC, CertState
from store import PendingEffect, Store, Transition, migrate

TARGET_FIRE_SQLITE = 2000.0  # transitions/s
TARGET_FIRE_POSTGRES = 1000.0  # transitions/s
TARGET_TICK_MS = 100.0  # one tick over 10,000 certificates
SVID_TTL = 3600.0
HALF_LIFE = SVID_TTL / 2
TICK_SECONDS = 1.0  # engine.runtime.DEFAULT_TICK_SECONDS
START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Sizes:
    creates: int  # certificates per round: `create` and `outcome` fire once on each, `update` twice
    warmup: int
    certs: int  # certificates in the store for the tick
    tick_repeats: int  # ticks per scenario (a due scenario moves "now" to the next k certificates each time)
    fire_rounds: int  # rounds of the fire workloads, each on a fresh database; the median round is reported


FULL = Sizes(creates=5000, warmup=300, certs=10_000, tick_repeats=10, fire_rounds=3)
QUICK = Sizes(creates=500, warmup=50, certs=2_000, tick_repeats=3, fire_rounds=1)


# ---- helpers -----------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


def figure(value: float, unit: str, target: float | None = None, *, higher_is_better: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"value": round(value, 3), "unit": unit}
    if target is not None:
        out["target"] = target
        out["met"] = value >= target if higher_is_better else value < target
    return out


def new_engine(store: Store, clock: FakeClock, seed: int = 1, **settings: Any) -> Engine:
    return Engine(store, fake_actions(clock), clock, jitter=random.Random(seed).random, settings=settings)


def count_journal(store: Store) -> int:
    n, after = 0, 0
    while True:
        page = store.journal_all(after_id=after, limit=10_000)
        if not page:
            return n
        n += len(page)
        after = page[-1].id


@contextmanager
def collected() -> Iterator[None]:
    """Start a timed run with no garbage left over from the setup; collections during the run count, as they would."""
    gc.collect()
    yield


# ---- databases -----------------------------------------------------------------------------------------------------
class Databases:
    """Fresh, migrated databases on demand, for one backend."""

    def __init__(self, backend: str, tmp: Path, pg: Any = None) -> None:
        self.backend, self.tmp, self.pg = backend, tmp, pg
        self.n = 0

    def fresh(self) -> Store:
        self.n += 1
        if self.backend == "sqlite":
            url = f"sqlite:///{self.tmp / f'bench{self.n}.db'}"
        else:
            url = self.pg.create_database(f"bench{self.n}")
        migrate.upgrade(url)
        return Store(url)

    def analyze(self) -> None:
        """PostgreSQL: gather planner statistics on the newest database, as autovacuum does in a running system.

        Without them a table filled a moment ago has none, and the entity lookup of every `fire` costs about 130 us
        more (measured): a fresh-database artefact, not the steady state. SQLite gathers none unless told to, and
        the store never tells it, so it is left as the store leaves it.
        """
        if self.backend == "sqlite":
            return
        subprocess.run([str(self.pg.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.pg.port), "-U", "postgres",
                        "-d", f"bench{self.n}", "-q", "-c", "ANALYZE"], check=True, capture_output=True, timeout=120)


# ---- (a) fire ------------------------------------------------------------------------------------------------------
def _request_payload(i: int) -> dict[str, Any]:
    """A pod's first certificate, as the engine's RequestIdentity handler asks for it."""
    return {"owner": f"bench/p{i}", "spiffe_id": f"spiffe://mesh.local/ns/bench/sa/p{i}",
            "dns_names": [f"p{i}.bench.svc"], "index": 1, "notify_owner": True}


def _timed_loop(calls: Sequence[Callable[[], object]]) -> tuple[float, list[float]]:
    latencies = []
    perf = time.perf_counter
    with collected():
        t0 = perf()
        for call in calls:
            c0 = perf()
            call()
            latencies.append(perf() - c0)
        wall = perf() - t0
    return wall, latencies


WORKLOADS = {
    "create": "Engine.fire(cert, <new key>, 'request', drain=False): get (miss); commit INSERT entity + INSERT journal"
              " + INSERT outbox (SignSvid)",
    "outcome": "Engine.fire(cert, <key>, 'issued', <signed cert>, consumes=<its SignSvid outbox id>, drain=False), "
               "as run_effect feeds an effect's outcome back (the signing itself is not run): get; commit DELETE "
               "the answered outbox row + UPDATE entity WHERE version = expected + INSERT journal + INSERT outbox "
               "(DeliverSvid, Fire pod identity_issued)",
    "update": "Engine.fire(cert, <key>, 'fail', then 'retry', drain=False): get; commit UPDATE entity WHERE version "
              "= expected + INSERT journal + INSERT outbox (Fire pod fail / SignSvid)",
}


def _issued_payload(i: int) -> dict[str, Any]:
    return {"serial": format(i, "x"), "generation": "1", "not_before": START.isoformat(),
            "not_after": (START + timedelta(seconds=SVID_TTL)).isoformat()}


def _fire_round(dbs: Databases, sizes: Sizes) -> dict[str, Any]:
    """One round on a fresh database: `create`, then `outcome` and `update` on the certificates it made."""
    store = dbs.fresh()
    engine = new_engine(store, FakeClock(START))
    for i in range(sizes.warmup):
        engine.fire("cert", f"warm/p{i}/1", "request", _request_payload(i), drain=False)
    engine.discard_work()  # the effects are never run here (drain=False)
    keys = [f"bench/p{i}/1" for i in range(sizes.creates)]
    transitions, rows, consumed = sizes.warmup, sizes.warmup, 0
    out: dict[str, Any] = {}

    def run(name: str, calls: Sequence[Callable[[], object]], answered: int = 0) -> list[PendingEffect]:
        nonlocal transitions, rows, consumed
        dbs.analyze()
        wall, lat = _timed_loop(calls)
        left = engine.discard_work()
        emitted = len(left)
        transitions += len(calls)
        rows += emitted - answered
        out[name] = {"wall": wall, "latencies": lat, "effects_per_transition": emitted / len(calls),
                     "rows": {"journal": count_journal(store), "journal_expected": transitions,
                              "outbox": len(store.pending_effects()), "outbox_expected": rows}}
        return left

    fire = engine.fire
    signs = run("create", [partial(fire, "cert", k, "request", _request_payload(i), drain=False)
                           for i, k in enumerate(keys)])
    assert [p.key for p in signs] == keys and {p.effect for p in signs} == {"SignSvid"}
    run("outcome", [partial(fire, "cert", p.key, "issued", _issued_payload(i), drain=False, consumes=p.id)
                    for i, p in enumerate(signs)], answered=len(signs))
    calls = [partial(fire, "cert", k, "fail", {"reason": "bench"}, drain=False) for k in keys]
    calls += [partial(fire, "cert", k, "retry", drain=False) for k in keys]
    run("update", calls)
    out["states"] = store.counts().get("cert", {})
    store.close()
    return out


def bench_fire(dbs: Databases, sizes: Sizes, target: float) -> list[dict[str, Any]]:
    rounds = [_fire_round(dbs, sizes) for _ in range(sizes.fire_rounds)]
    results = []
    for name, what in WORKLOADS.items():
        runs = [r[name] for r in rounds]
        rates = [len(x["latencies"]) / x["wall"] for x in runs]
        latencies = [v for x in runs for v in x["latencies"]]
        ok = all(x["rows"]["journal"] == x["rows"]["journal_expected"] and
                 x["rows"]["outbox"] == x["rows"]["outbox_expected"] and x["effects_per_transition"] >= 1
                 for x in runs)
        results.append({
            "workload": name,
            "what": what,
            "rounds": len(runs),
            "transitions_per_round": len(runs[0]["latencies"]),
            # The median round: the machine is shared, and one round can be slowed by a neighbour.
            "throughput": figure(percentile(rates, 0.5), "transitions/s", target),
            "throughput_rounds": [round(x, 1) for x in rates],
            "latency_p50": figure(percentile(latencies, 0.50) * 1000, "ms"),
            "latency_p99": figure(percentile(latencies, 0.99) * 1000, "ms"),
            "latency_max": figure(max(latencies) * 1000, "ms"),
            "effects_per_transition": runs[0]["effects_per_transition"],
            "checks": {
                "what": "after the workload: journal rows = transitions fired so far (warm-up included); outbox rows "
                        "= effects emitted - effects answered; every transition emitted at least one effect",
                "rows": [x["rows"] for x in runs],
                "ok": ok,
            },
        })
    results[-1]["states_after"] = rounds[-1]["states"]
    return results


# ---- (b) tick ------------------------------------------------------------------------------------------------------
def _seed_transition(i: int, now: datetime, rng: random.Random) -> Transition:
    """A delivered certificate as the machine itself would make it: request -> issued -> delivered, run purely."""
    key = f"bench/p{i}/1"
    jitter = rng.random() * 2 - 1
    issued_at = now - timedelta(seconds=rng.random() * HALF_LIFE)
    ctx = Context(key=key, data={}, payload={**_request_payload(i), "ttl_seconds": SVID_TTL}, now=issued_at,
                  jitter=jitter)
    requested = CERT_SPEC.step(None, "request", ctx)
    assert requested is not None
    not_after = issued_at + timedelta(seconds=SVID_TTL)
    ctx = Context(key=key, data=requested.data, now=issued_at, jitter=jitter,
                  payload={"serial": format(i, "x"), "generation": "1", "not_before": issued_at.isoformat(),
                           "not_after": not_after.isoformat()})
    issued = CERT_SPEC.step(CertState.requested, "issued", ctx)
    assert issued is not None
    ctx = Context(key=key, data=issued.data, payload={}, now=issued_at, jitter=jitter, due_at=issued.due_at)
    delivered = CERT_SPEC.step(CertState.issued, "delivered", ctx)
    assert delivered is not None and delivered.due_at is not None
    return Transition(kind="cert", key=key, expected_version=0, from_state=None, to_state=delivered.dest.value,
                      trigger="seed", reason="bench-seed", actor="bench", at=issued_at, data=delivered.data,
                      due_at=delivered.due_at)


def seed_certificates(store: Store, n: int, now: datetime) -> tuple[list[datetime], float]:
    rng = random.Random(42)
    transitions = [_seed_transition(i, now, rng) for i in range(n)]
    t0 = time.perf_counter()
    for t in transitions:
        store.apply(t)
    seconds = time.perf_counter() - t0
    return sorted(t.due_at for t in transitions if t.due_at is not None), seconds


def _time_tick(engine: Engine, k: int) -> tuple[float, float, float, Any]:
    """The tick's wall time, the part of it spent firing `tick` on the k due entities, and the time the effects it
    handed out take afterwards.

    `Engine.tick` fires every due entity (a commit per kind), then hands the effects to `dispatch`, which in the
    runtime gives them to its workers; here they are collected, and run after the tick (timed apart), as a worker
    would run them.
    """
    commits: list[float] = []
    handed: list[PendingEffect] = []
    engine.on_commit = lambda entity, pending: commits.append(time.perf_counter())
    engine.dispatch = handed.extend
    try:
        with collected():
            t0 = time.perf_counter()
            report = engine.tick()
            seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            engine.run_all(handed)
            work = time.perf_counter() - t1
    finally:
        engine.on_commit = None
        engine.dispatch = engine.run_all
    return seconds, (commits[k - 1] - t0 if k else 0.0), work, report


def _time_queries(store: Store, now: datetime, batch: int) -> float:
    t0 = time.perf_counter()
    store.due_entities(now, batch)
    store.due_effects(now, batch)
    return time.perf_counter() - t0


def bench_tick(dbs: Databases, sizes: Sizes) -> dict[str, Any]:
    store = dbs.fresh()
    clock = FakeClock(START - timedelta(days=1))
    # No signing rate limit here: the rotations' work is timed in full, after the tick, instead of spread out.
    engine = new_engine(store, clock, signing_rate=0)
    ensure_ca(engine)  # the fake CA must have an active generation to sign the successors
    assert [c.state for c in store.list("ca")] == ["active"], store.list("ca")
    now = START
    clock.set(now)
    due, seed_seconds = seed_certificates(store, sizes.certs, now)
    dbs.analyze()
    batch = engine.policy.tick_batch
    steady_k = max(1, round(sizes.certs / HALF_LIFE * TICK_SECONDS))
    burst_k = max(1, sizes.certs // 100)
    out: dict[str, Any] = {
        "certificates": sizes.certs,
        "seed": {"how": "Store.apply of one Transition per certificate (row as the machine makes it after "
                        "request -> issued -> delivered; one journal row)", "seconds": round(seed_seconds, 2)},
        "scenarios": [],
    }

    offset = 0  # how many of the sorted due times earlier scenarios have used up

    def scenario(name: str, k: int, describe: str) -> None:
        nonlocal offset
        ticks, firing, works, queries, handled, transitions = [], [], [], [], [], []
        for _ in range(sizes.tick_repeats):
            if k == 0:
                moment = due[0] - timedelta(seconds=1)
            else:
                moment = due[offset + k - 1]
                offset += k
            clock.set(moment)
            queries.append(_time_queries(store, moment, batch))
            before = engine.stats.transitions
            seconds, fired, work, report = _time_tick(engine, k)
            ticks.append(seconds)
            firing.append(fired)
            works.append(work)
            handled.append(report.entities)
            transitions.append(engine.stats.transitions - before)
            left = store.pending_effects()
            assert not left, f"effects left in the outbox after a tick: {left[:3]}"
        assert all(h == k for h in handled), (name, handled)
        med = percentile(ticks, 0.5) * 1000
        entry = {
            "scenario": name,
            "what": describe,
            "due_certificates": k,
            "due_share_percent": round(100 * k / sizes.certs, 3),
            "ticks": len(ticks),
            "tick_p50": figure(med, "ms", TARGET_TICK_MS, higher_is_better=False),
            "tick_max": figure(max(ticks) * 1000, "ms", TARGET_TICK_MS, higher_is_better=False),
            "scheduler_query_p50": figure(percentile(queries, 0.5) * 1000, "ms"),
            "firing_due_p50": figure(percentile(firing, 0.5) * 1000, "ms"),
            "effects_after_the_tick_p50": figure(percentile(works, 0.5) * 1000, "ms"),
            "transitions_per_tick": percentile([float(t) for t in transitions], 0.5),
        }
        if k:
            entry["per_due_cert_ms"] = figure(med / k, "ms")
        out["scenarios"].append(entry)

    scenario("none", 0, "no certificate due: the tick's due-entities and due-effects queries")
    scenario("steady", steady_k, f"{steady_k} due: a 1 s tick in the steady state of {sizes.certs} certificates "
                                 "rotating every ~30 min; the tick commits, the rotations run after it")
    scenario("burst", burst_k, f"1 % due ({burst_k}); the tick commits, the rotations run after it")
    out["states_after"] = store.counts().get("cert", {})
    store.close()
    return out


# ---- machine facts and reporting -----------------------------------------------------------------------------------
def machine_facts(pg_version: str | None) -> dict[str, Any]:
    return machine(sqlite=sqlite3.sqlite_version, postgresql=pg_version, sqlalchemy=version("sqlalchemy"),
                   psycopg=version("psycopg"))


def _pg_version(server: Any) -> str | None:
    try:
        out = subprocess.run([str(server.bindir / "postgres"), "-V"], check=False, capture_output=True, text=True,
                             timeout=30)
        found = re.search(r"\d+(\.\d+)+", out.stdout)  # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        return found.group(0) if found else None
    except OSError:
        return None


def summary(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"Meshloom engine benchmark ({doc['mode']}), {m['date']}",
             f"  {m['cores']} cores ({m['cpu']}), Python {m['python']}, SQLite {m['sqlite']}, "
             f"PostgreSQL {m['postgresql'] or '-'}, SQLAlchemy {m['sqlalchemy']}", ""]

    def mark(f: dict[str, Any]) -> str:
        return "" if "met" not in f else ("  ok" if f["met"] else "  MISSED")

    for backend, res in doc["results"].items():
        if "skipped" in res:
            lines.append(f"{backend}: skipped ({res['skipped']})")
            continue
        lines.append(f"{backend}")
        for w in res["fire"]:
            t = w["throughput"]
            lines.append(f"  fire {w['workload']:<7} {t['value']:>8.0f} transitions/s (target >= {t['target']:.0f})"
                         f"{mark(t)}   p50 {w['latency_p50']['value']:.3f} ms   p99 {w['latency_p99']['value']:.3f} ms"
                         f"   ({w['rounds']} x {w['transitions_per_round']} transitions, "
                         f"rows checked: {'ok' if w['checks']['ok'] else 'BAD'})")
        tick = res["tick"]
        for s in tick["scenarios"]:
            f = s["tick_p50"]
            extra = (f", firing them {s['firing_due_p50']['value']:.2f} ms; their rotations after the tick "
                     f"{s['effects_after_the_tick_p50']['value']:.1f} ms") if s["due_certificates"] else ""
            lines.append(f"  tick {s['scenario']:<7} {f['value']:>8.2f} ms p50, {s['tick_max']['value']:.2f} ms max "
                         f"(target < {f['target']:.0f}){mark(f)}   {s['due_certificates']} of {tick['certificates']} "
                         f"due ({s['due_share_percent']} %)")
            lines.append(f"  {'':<13}scheduler query {s['scheduler_query_p50']['value']:.2f} ms{extra}")
        lines.append("")
    return "\n".join(lines)


def run_backend(backend: str, sizes: Sizes, tmp: Path, pg: Any = None) -> dict[str, Any]:
    dbs = Databases(backend, tmp, pg)
    target = TARGET_FIRE_SQLITE if backend == "sqlite" else TARGET_FIRE_POSTGRES
    print(f"[{backend}] fire ...", flush=True)
    fire = bench_fire(dbs, sizes, target)
    print(f"[{backend}] tick over {sizes.certs} certificates ...", flush=True)
    tick = bench_tick(dbs, sizes)
    return {"fire": fire, "tick": tick}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (seconds); writes engine-quick.json")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON results")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL

    results: dict[str, Any] = {}
    pg_version = None
    with tempfile.TemporaryDirectory(prefix="meshloom-bench-") as tmp:
        results["sqlite"] = run_backend("sqlite", sizes, Path(tmp))
        if args.no_postgres:
            results["postgresql"] = {"skipped": "--no-postgres"}
        else:
            from tests.support.postgres import PostgresUnavailable, start_postgres

            try:
                server = start_postgres()
            except PostgresUnavailable as exc:
                results["postgresql"] = {"skipped": str(exc)}
            else:
                try:
                    pg_version = _pg_version(server)
                    results["postgresql"] = run_backend("postgresql", sizes, Path(tmp), server)
                finally:
                    server.stop()

    doc = {
        "benchmark": "engine",
        "mode": "quick" if args.quick else "full",
        "machine": machine_facts(pg_version),
        "sizes": sizes.__dict__,
        "targets": {"fire_sqlite": figure(TARGET_FIRE_SQLITE, "transitions/s"),
                    "fire_postgresql": figure(TARGET_FIRE_POSTGRES, "transitions/s"),
                    "tick": figure(TARGET_TICK_MS, "ms", None) | {"for_certificates": 10_000}},
        "method": __doc__.split("What is measured", 1)[1].strip(),
        "results": results,
    }
    write_results(doc, args.out / ("engine-quick.json" if args.quick else "engine.json"), summary(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
