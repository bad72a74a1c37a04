"""Benchmark of configuration propagation: a new generation for every sidecar, until every sidecar's ack is back.

Run from the repository root: `python -m bench.propagation [--quick] [--out DIR] [--sizes 10,100,1000]`.

What is measured
----------------
For each N (10, 100, 1,000 sidecars; --quick: 10), on a private nats-server (tests/support/natspki.py for the PKI,
actions.nats.NatsServer for the server: TLS on loopback, `verify_and_map`, one NATS user per sidecar identity with
only its own subjects, JetStream KV `meshloom-config` with history 1):

  sidecars  N `sidecar.config.ConfigClient`s, each with its OWN client certificate (SPIFFE ID
            spiffe://example.org/ns/bench/sa/s<i>) and connection, spread over up to 4 worker processes, each running
            its share on one asyncio event loop. `apply` does nothing: the figure is the propagation path (KV put,
            delivery to the sidecar, envelope checks, the apply hand-off to a worker thread, the ack back), not the
            proxy's reload.
  warm-up   generation 1 is published before the workers start; each sidecar connects, direct-gets it, applies and
            acks it. `connect_all_seconds` is the time from starting the workers to the last of these N acks.
  rounds    then, per round, generation g for all N sidecars (a ~1.5 KB JSON document each, different every
            round). The clock starts when the publish step starts (the moment the control plane starts publishing
            the change) and each sidecar's latency ends when its ack for g reaches the publisher's `on_ack`, in the
            publisher's process: one clock, no cross-process skew. p50 / p99 / max over all acks of all rounds.

Two publish steps, swappable functions (`PUBLISH_STEPS`):
  batch       `NatsConfigPublisher.publish_many`: all N puts in flight at once, one wait for all confirmations.
  sequential  `NatsConfigPublisher.publish` once per sidecar, each blocking on its confirmation, as the engine's
              executor runs one PublishConfig effect after the other today.

Target: p99 under 1 s at N = 1,000 (for the batch step; the sequential one is reported against it too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from actions.nats import NatsConfigPublisher, NatsServer, inbox_prefix
from bench.facts import cpu_model, git_state, version
from sidecar.config import ConfigClient, tls_context
from tests.support.natspki import TestPki

TARGET_P99_MS = 1000.0  # at 1,000 sidecars
TARGET_AT = 1000
MAX_WORKERS = 4
WAIT = 120.0  # seconds: the longest a round (or the warm-up) may take before the bench gives up
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


FULL = Sizes(sidecars=(10, 100, 1000), rounds=10, steps=("batch", "sequential"))
QUICK = Sizes(sidecars=(10,), rounds=3, steps=("batch", "sequential"))


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


def document(sidecar: str, generation: int) -> bytes:
    """A stand-in for the catalog's document: about 1.5 KB of routes and endpoints."""
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


def _worker(url: str, specs: list[ClientSpec], stop: Any) -> None:
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_run_clients(url, specs, stop))


async def _run_clients(url: str, specs: list[ClientSpec], stop: Any) -> None:
    def apply(document: dict[str, Any], shards: dict[str, dict[str, Any]]) -> None:
        pass  # the bench's documents name no outbound shards: `shards` is always {}

    clients = [ConfigClient(url, s.sidecar, tls_context(s.cert, s.key, s.ca), apply, s.inbox,
                            resync_interval=3600.0) for s in specs]
    tasks = []
    for i, client in enumerate(clients):
        tasks.append(asyncio.create_task(client.run()))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # spread the TLS handshakes a little: a real mesh never starts all at once
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)
    for client in clients:
        client.stop()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---- one size ------------------------------------------------------------------------------------------------------
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
        n_workers = min(MAX_WORKERS, n)
        t0 = time.perf_counter()
        for w in range(n_workers):
            proc = ctx.Process(target=_worker, args=(server.url, specs[w::n_workers], stop), daemon=True)
            proc.start()
            workers.append(proc)
        acks.wait(1, n, timeout=WAIT + n * 0.1)
        connect_all = time.perf_counter() - t0
        print(f"  N={n}: {n} sidecars in {n_workers} processes connected and acknowledged generation 1 in "
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
                "p50": figure(percentile(latencies, 0.50) * 1000, "ms"),
                "p99": figure(percentile(latencies, 0.99) * 1000, "ms",
                              TARGET_P99_MS if n >= TARGET_AT else None),
                "max": figure(max(latencies) * 1000, "ms"),
                "publish_step_p50": figure(percentile(publish_times, 0.5) * 1000, "ms"),
            }
            print(f"  N={n} {step_name:<10} p50 {modes[step_name]['p50']['value']:8.1f} ms   "
                  f"p99 {modes[step_name]['p99']['value']:8.1f} ms   max {modes[step_name]['max']['value']:8.1f} ms"
                  f"   (publishing took {modes[step_name]['publish_step_p50']['value']:.1f} ms)", flush=True)
        return {"sidecars": n, "worker_processes": n_workers, "connect_all_seconds": round(connect_all, 3),
                "document_bytes": len(document(keys[0], 2)), "steps": modes}
    finally:
        stop.set()
        for proc in workers:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        publisher.close()
        server.stop()


# ---- machine facts and reporting -----------------------------------------------------------------------------------



def _nats_server_version(server_binary: str) -> str | None:
    try:
        out = subprocess.run([server_binary, "--version"], check=False, capture_output=True, text=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_facts() -> dict[str, Any]:
    from actions.nats import find_binary

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "nats_server": _nats_server_version(find_binary()),
        "nats_py": version("nats-py"),
        "git": git_state(),
    }


def summary(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"Meshloom configuration propagation benchmark ({doc['mode']}), {m['date']}",
             f"  {m['cores']} cores ({m['cpu']}), Python {m['python']}, {m['nats_server']}, nats-py {m['nats_py']}",
             ""]
    for res in doc["results"]:
        lines.append(f"N = {res['sidecars']} sidecars ({res['worker_processes']} worker processes, "
                     f"all connected in {res['connect_all_seconds']:.2f} s)")
        for name, s in res["steps"].items():
            p99 = s["p99"]
            mark = "" if "met" not in p99 else ("  ok" if p99["met"] else "  MISSED")
            target = f" (target < {p99['target']:.0f})" if "target" in p99 else ""
            lines.append(f"  {name:<10} p50 {s['p50']['value']:8.1f} ms   p99 {p99['value']:8.1f} ms{target}{mark}   "
                         f"max {s['max']['value']:8.1f} ms   ({s['rounds']} rounds, {s['acks']} acks)")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.propagation", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 sidecars (seconds); writes propagation-quick.json")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON results")
    parser.add_argument("--sizes", help="comma-separated sidecar counts, instead of 10,100,1000")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.sizes:
        sizes = Sizes(tuple(int(x) for x in args.sizes.split(",")), sizes.rounds, sizes.steps)

    results = []
    with tempfile.TemporaryDirectory(prefix="meshloom-bench-") as tmp:
        for n in sizes.sidecars:
            print(f"[N={n}] ...", flush=True)
            results.append(run_size(n, sizes, Path(tmp)))

    doc = {
        "benchmark": "propagation",
        "mode": "quick" if args.quick else "full",
        "machine": machine_facts(),
        "sizes": {"sidecars": list(sizes.sidecars), "rounds": sizes.rounds, "steps": list(sizes.steps)},
        "targets": {"p99": figure(TARGET_P99_MS, "ms") | {"at_sidecars": TARGET_AT}},
        "method": __doc__.split("What is measured", 1)[1].strip(),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("propagation-quick.json" if args.quick else "propagation.json")
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print()
    print(summary(doc))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
