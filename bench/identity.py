"""Benchmarks of the mesh's identity path: the CA signing X.509-SVIDs.

Run from the repository root: `python -m bench.identity [--quick] [--out DIR] [--section NAME ...]`.

What is measured
----------------
signing   X.509-SVIDs signed per second by `MeshCa.sign_svid` on ONE thread (the process is pinned to one core
          where the OS allows it), each call doing all a real issuance does: check the SPIFFE ID and DNS names,
          generate the leaf's key (ec-p256), build the certificate (one URI SAN, one DNS SAN, CA:false, keyUsage,
          EKU, SKI, AKI, random serial), sign it with the active generation's ec-p256 key. The CA is a real one:
          its generation's key and certificate live on disk in a temporary folder (read once, at start).
          The loop runs for a fixed time (bounded in count too); throughput is calls / wall time, each call's own
          wall time gives the latencies. Key generation alone is timed apart, to show its share. After the loop a
          sample of the leaves is checked: signature by the generation's root, and the SPIFFE ID.
          The target (>= 1,000/s) is for ec-p256, the default; a full run also times ec-p384, rsa-2048 and
          rsa-4096 for information (RSA key generation dominates those, and its time varies widely with the
          prime search, so their key-generation share is rough).

rotation  the end-to-end time to rotate N SVIDs (10,000; 300 with --quick) through the whole control plane: the
          engine on SQLite in a temporary state directory, the real MeshCa, the SVID vault on disk, and the real node
          agent (its Workload API server running, every SVID delivered into its cache). N certificates are issued
          and delivered first (not timed); then an operator's forced rotation of all N (`rotate` on each, as a CA
          rotation does) is timed from the first trigger until every successor is delivered to the node agent:
          each rotation is a signature under the signing rate limit (500/s, burst 50), five journaled
          transitions, the vault write and the delivery. The runtime's scheduler tick and its two effect workers
          do the work, as in `meshctl up`. Target: 10,000 in under 60 s.

Each section is a function in SECTIONS, from the parsed arguments to a JSON-able dict; `main` runs the chosen ones
and writes them under "sections" in bench/results/identity.json (identity-quick.json with --quick). Running only
some sections keeps the other sections already in the file, each of which records its own date.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.backends.openssl import backend as openssl_backend

from actions.ca import CaSettings, KeyType, MeshCa, new_key, svid_spiffe_id
from actions.clock import SystemClock
from bench.engine import figure, percentile
from bench.facts import machine, section_main, version

TARGET_SIGNING = 1000.0  # ec-p256 SVIDs/s on one core, key generation included
MAX_SIGNATURES = 200_000  # the loop's bound in count, whatever the time
SAMPLE_CHECKED = 200
SPIFFE_ID = "spiffe://example.org/ns/bench/sa/web"
DNS_NAMES = ("web.bench.pod",)


# ---- machine facts -------------------------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    return machine(cryptography=version("cryptography"), openssl=openssl_backend.openssl_version_text())


@contextmanager
def one_core() -> Iterator[int | None]:
    """Pin this process to one core for the duration (the core it runs on), so "per core" means one core."""
    if not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    core = min(before)
    os.sched_setaffinity(0, {core})
    try:
        yield core
    finally:
        os.sched_setaffinity(0, before)


# ---- signing -------------------------------------------------------------------------------------------------------
def bench_signing(seconds: float, key_type: KeyType = KeyType.EC_P256) -> dict[str, Any]:
    """SVIDs signed per second on one thread by a real MeshCa with generation and leaves of `key_type`."""
    with tempfile.TemporaryDirectory(prefix="meshloom-bench-ca-") as tmp:
        ca = MeshCa(Path(tmp) / "ca", CaSettings(key_type=key_type), SystemClock())
        ca.generate("1", 720 * 3600.0)
        root = ca.trust_anchors(("1",))[0]
        for _ in range(20):  # warm-up: first calls pay for imports and caches
            ca.sign_svid(SPIFFE_ID, DNS_NAMES, 3600.0)

        with one_core() as core:
            perf = time.perf_counter
            latencies: list[float] = []
            issued = []
            gc.collect()
            t0 = perf()
            deadline = t0 + seconds
            while len(latencies) < MAX_SIGNATURES:
                c0 = perf()
                issued.append(ca.sign_svid(SPIFFE_ID, DNS_NAMES, 3600.0))
                c1 = perf()
                latencies.append(c1 - c0)
                if c1 >= deadline:
                    break
            wall = perf() - t0

            # Key generation alone, for its share of a signature (bounded in time too: RSA-4096 takes ~0.1-1 s).
            keys, k0 = 0, perf()
            while keys < 5000 and (keys < 3 or perf() - k0 < seconds / 4):
                new_key(key_type)
                keys += 1
            keygen = (perf() - k0) / keys

        step = max(1, len(issued) // SAMPLE_CHECKED)
        sample = issued[::step]
        for leaf in sample:
            leaf.certificate.verify_directly_issued_by(root)
            assert svid_spiffe_id(leaf.certificate) == SPIFFE_ID
        serials_unique = len({i.serial for i in issued}) == len(issued)

    rate = len(latencies) / wall
    mean = wall / len(latencies)
    return {
        "what": "MeshCa.sign_svid on one thread: leaf key generation + certificate build + signature",
        "key_type": key_type.value,
        "pinned_to_core": core,
        "seconds": round(wall, 3),
        "signatures": len(latencies),
        "throughput": figure(rate, "SVIDs/s", TARGET_SIGNING if key_type == KeyType.EC_P256 else None),
        "latency_p50": figure(percentile(latencies, 0.50) * 1e6, "us"),
        "latency_p99": figure(percentile(latencies, 0.99) * 1e6, "us"),
        "latency_max": figure(max(latencies) * 1e6, "us"),
        "key_generation": figure(keygen * 1e6, "us"),
        "key_generation_share_percent": round(100 * keygen / mean, 1),
        "checks": {"what": "a sample of the leaves: signed by the generation's root, SPIFFE ID as asked; every "
                           "serial distinct",
                   "sampled": len(sample), "serials_unique": serials_unique, "ok": serials_unique},
    }


def section_signing(args: argparse.Namespace) -> dict[str, Any]:
    """ec-p256 (the default, with the target); a full run adds the other key types, for information."""
    plan = {KeyType.EC_P256: 1.0 if args.quick else 5.0}
    if not args.quick:
        plan |= {KeyType.EC_P384: 2.0, KeyType.RSA_2048: 2.0, KeyType.RSA_4096: 2.0}
    out: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds")}
    for key_type, seconds in plan.items():
        print(f"[signing] {key_type} SVIDs for {seconds:g} s on one thread ...", flush=True)
        out[key_type.value.replace("-", "_")] = bench_signing(seconds, key_type)
    return out


def bench_rotation(n: int) -> dict[str, Any]:
    from actions import Actions
    from actions.nats import FakeConfigPublisher
    from actions.nodeagent import NodeAgent
    from actions.platform import FakePodPlatform
    from actions.vault import FileVault
    from engine import Engine, Runner, ensure_ca
    from store import Store, migrate, sqlite_url

    with tempfile.TemporaryDirectory(prefix="meshloom-bench-rotation-") as tmp:
        state = Path(tmp)
        url = sqlite_url(state)
        migrate.upgrade(url)
        store = Store(url)
        clock = SystemClock()
        ca = MeshCa(state / "ca", CaSettings(), clock)
        agent = NodeAgent(state / "agent")
        agent.start()
        delivered: set[str] = set()
        deliver = agent.deliver

        def counting(owner: str, material: Any) -> None:
            deliver(owner, material)
            delivered.add(material.cert)

        agent.deliver = counting  # type: ignore[method-assign]
        actions = Actions(ca, agent, FakeConfigPublisher(), FakePodPlatform(), FileVault(state / "svids"))
        engine = Engine(store, actions, clock)
        ensure_ca(engine)
        print(f"[rotation] issuing {n} SVIDs ...", flush=True)
        t0 = time.perf_counter()
        for i in range(n):
            owner = f"bench/pod-{i:05}"
            engine.fire("cert", f"{owner}/1", "request",
                        {"owner": owner, "spiffe_id": f"spiffe://example.org/ns/bench/sa/s{i % 50}",
                         "dns_names": [f"pod-{i:05}.bench.pod"], "index": 1})
        issue_seconds = time.perf_counter() - t0
        journal_before = len(store.journal_all(limit=10_000_000))
        runner = Runner(engine, tick_seconds=0.05)
        runner.start()
        print(f"[rotation] rotating {n} SVIDs ...", flush=True)
        t0 = time.perf_counter()
        try:
            for i in range(n):
                engine.fire("cert", f"bench/pod-{i:05}/1", "rotate", actor="bench", drain=False)
            engine.dispatch(engine.discard_work())
            successors = {f"bench/pod-{i:05}/2" for i in range(n)}
            deadline = t0 + 600
            while not successors <= delivered and time.perf_counter() < deadline:
                time.sleep(0.05)
            seconds = time.perf_counter() - t0
            done = len(successors & delivered)
        finally:
            runner.stop()
            agent.stop()
        superseded = len(store.list("cert", states=("superseded",)))
        journal = len(store.journal_all(limit=10_000_000)) - journal_before
        store.close()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "svids": n,
        "issue_first_seconds": round(issue_seconds, 2),
        "rotated": done,
        "seconds": round(seconds, 2),
        "end_to_end": figure(seconds, "s", 60.0 if n >= 10_000 else None, higher_is_better=False),
        "rotations_per_second": round(done / seconds, 1),
        "journaled_transitions": journal,
        "superseded_after": superseded,
        "signing_rate_limit_per_second": 500,
    }


def section_rotation(args: argparse.Namespace) -> dict[str, Any]:
    return bench_rotation(300 if args.quick else 10_000)


# Sections, in the order they run: name -> function of the parsed arguments returning the section's results.
SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "signing": section_signing,
    "rotation": section_rotation,
}


# ---- reporting -----------------------------------------------------------------------------------------------------
def _summary_signing(result: dict[str, Any]) -> list[str]:
    lines = []
    for r in (v for v in result.values() if isinstance(v, dict)):
        t = r["throughput"]
        target = f" (target >= {t['target']:.0f})" + ("  ok" if t["met"] else "  MISSED") if "target" in t else ""
        lines.append(f"  signing {r['key_type']:<8} {t['value']:>8.0f} SVIDs/s on one thread{target}"
                     f"   p50 {r['latency_p50']['value']:.0f} us   p99 {r['latency_p99']['value']:.0f} us"
                     f"   ({r['signatures']} in {r['seconds']} s; key generation {r['key_generation']['value']:.0f} us"
                     f" = {r['key_generation_share_percent']} %; checks {'ok' if r['checks']['ok'] else 'BAD'})")
    return lines


def _summary_rotation(r: dict[str, Any]) -> list[str]:
    e = r["end_to_end"]
    target = (f" (target < {e['target']:.0f} s)" + ("  ok" if e["met"] else "  MISSED")) if "target" in e else ""
    return [f"  rotation {r['rotated']}/{r['svids']} SVIDs in {r['seconds']} s end to end{target}"
            f"   {r['rotations_per_second']}/s   {r['journaled_transitions']} transitions journaled"]


SUMMARIES: dict[str, Callable[[dict[str, Any]], list[str]]] = {"signing": _summary_signing,
                                                                 "rotation": _summary_rotation}


def summary(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"Meshloom identity benchmark ({doc['mode']}), {m['date']}",
             f"  {m['cores']} cores ({m['cpu']}), Python {m['python']}, cryptography {m['cryptography']}, "
             f"{m['openssl']}", ""]
    for name, result in doc["sections"].items():
        lines += SUMMARIES[name](result) if name in SUMMARIES else [f"  {name}: see the JSON"]
    return "\n".join(lines)


def targets() -> dict[str, Any]:
    return {"signing_ec_p256": figure(TARGET_SIGNING, "SVIDs/s") | {"on": "one core, one thread"}}


def main(argv: list[str] | None = None) -> int:
    return section_main(argv, name="identity", doc=__doc__, sections=SECTIONS, facts=machine_facts,
                        targets=targets(), summary=summary)


if __name__ == "__main__":
    raise SystemExit(main())
