"""Issue 6's acceptance, end to end: `meshctl up -f`, `meshctl down`, a control plane killed and adopted again,
with the real command line, network namespaces, iptables, NATS, the CA and HAProxy sidecars.

Each test makes its own mesh on a prefix and /24 of its own (tests/support/netns.py picks them and records the
owner, so a run killed halfway is swept by the next), in a state directory under /tmp, and takes it down afterwards
even when it fails. Traffic goes only to the mesh's own addresses, from inside its pods.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from actions.netns import HostNetwork
from tests.support.netns import OWNERS, pick_prefix_and_subnet, sweep_abandoned
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

MESHCTL = str(Path(sys.executable).with_name("meshctl"))
PYTHON = sys.executable
RUNTIME_ROOT = Path("/run/meshloom")
MANIFEST = """\
apiVersion: meshloom.io/v1alpha1
kind: Mesh
metadata:
  name: shop
spec:
  workloads:
  - name: web
    namespace: shop
    serviceAccount: web
    labels: {app: web}
    command: [meshctl, app, serve, --http, "8080"]
    ports:
    - {name: http, containerPort: 8080}
    replicas: 2
  - name: client
    namespace: shop
    serviceAccount: client
    labels: {app: client}
    command: [meshctl, app, serve, --http, "8080"]
    ports:
    - {name: http, containerPort: 8080}
  services:
  - name: web
    namespace: shop
    selector: {app: web}
    ports:
    - {name: http, port: 80, targetPort: 8080}
"""
PODS = ("shop/client-0", "shop/web-0", "shop/web-1")
LIFE = ["admitted", "injected", "scheduled", "identity-requested", "identity-issued", "sidecar-connected",
        "config-synced", "ready"]


@dataclass
class Mesh:
    state_dir: Path
    prefix: str
    subnet: str
    manifest: Path

    def meshctl(self, *args: str, check: bool = True, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([MESHCTL, *args, "--state-dir", str(self.state_dir)], capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"meshctl {' '.join(args)} exited with {done.returncode}:\n{done.stdout}\n"
                                 f"{done.stderr}\ncontrol plane log:\n{self.log_tail()}")
        return done

    def up(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.meshctl("up", "-f", str(self.manifest), "--subnet", self.subnet, "--prefix", self.prefix,
                            "--timeout", "180", "--tick", "0.5", *extra)

    def log_tail(self, lines: int = 40) -> str:
        path = self.state_dir / "logs" / "control-plane.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    def json(self, *args: str) -> Any:
        return json.loads(self.meshctl(*args, "-o", "json").stdout)

    def netns(self, pod: str) -> str:
        return self.prefix + pod.replace("/", "_", 1)

    def request(self, pod: str, url: str, count: int = 1, *, close: bool = False) -> list[dict[str, Any]]:
        """`count` requests from the pod's workload user, so through its sidecar (on one keep-alive connection, or
        each on its own with `close`)."""
        done = subprocess.run(["ip", "netns", "exec", self.netns(pod), "setpriv", "--reuid", "65534", "--regid",
                               "65534", "--clear-groups", "--", MESHCTL, "app", "request", url, "--count",
                               str(count), "--timeout", "5", *(["--close"] if close else [])], capture_output=True,
                              text=True, timeout=120, check=True, cwd="/")
        return list(json.loads(done.stdout)["results"])

    def control_plane_pid(self) -> int:
        return int((self.state_dir / "control-plane.lock").read_text().strip())


def _leftovers(prefix: str, state_dir: Path) -> dict[str, list[str]]:
    """Everything of a mesh that can be left on the host, by kind."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split("\n")
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True,
                                      check=True).stdout)
    processes = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if str(state_dir) in cmdline or f"/meshloom/{prefix.rstrip('-')}/" in cmdline:
                    processes.append(f"{entry.name}: {cmdline[:120]}")
    rules = [line for tool in ("iptables-save", "ip6tables-save") if shutil.which(tool)
             for line in subprocess.run([tool], capture_output=True, text=True, check=False).stdout.splitlines()
             if "MESHLOOM" in line.upper()]
    return {
        "namespaces": [n.split()[0] for n in netns if n.startswith(prefix)],
        "interfaces": [link["ifname"] for link in links if link["ifname"].startswith(prefix)],
        "processes": processes,
        "iptables rules": rules,
        "files": [str(p) for p in (RUNTIME_ROOT / prefix.rstrip("-"), state_dir) if p.exists()]
        + [str(p) for p in Path("/etc/netns").glob(f"{prefix}*")],
    }


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    if os.geteuid() != 0:
        pytest.skip(f"pods as network namespaces need root (tests run as uid {os.geteuid()})")
    if shutil.which("ip") is None or shutil.which("iptables-restore") is None:
        reason = "ip or iptables-restore is missing (scripts/setup installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    sweep_abandoned()
    prefix, subnet = pick_prefix_and_subnet()
    OWNERS.mkdir(mode=0o755, exist_ok=True)
    record = OWNERS / f"{prefix}.pid"
    record.write_text(f"{os.getpid()}\n")
    work = Path(tempfile.mkdtemp(prefix="meshloom-up-", dir="/tmp"))
    manifest = work / "mesh.yaml"
    manifest.write_text(MANIFEST)
    m = Mesh(work / "state", prefix, str(subnet), manifest)
    try:
        yield m
    finally:
        m.meshctl("down", "--purge", check=False)
        with contextlib.suppress(OSError, ValueError):  # a control plane that `down` could not stop
            os.kill(m.control_plane_pid(), signal.SIGKILL)
        HostNetwork(prefix, subnet).destroy()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(RUNTIME_ROOT / prefix.rstrip("-"), ignore_errors=True)
        record.unlink(missing_ok=True)


def test_up_brings_every_pod_to_ready_through_its_whole_life_and_down_purge_leaves_nothing(mesh: Mesh) -> None:
    done = mesh.up()
    assert "3 pod(s) ready" in done.stdout

    pods = {p["pod"]: p for p in mesh.json("state", "pods")}
    assert sorted(pods) == list(PODS)
    assert {p["state"] for p in pods.values()} == {"ready"}
    assert all(p["node"] == "local" and p["ip"].startswith(mesh.subnet.rsplit(".", 1)[0]) for p in pods.values())
    for pod in PODS:
        assert [row["to_state"] for row in mesh.json("audit", f"pod/{pod}")] == LIFE

    # Service names resolve in the pods; the call goes through both sidecars with mutual TLS (the server's sidecar
    # tells the application the client's SPIFFE ID), and the Service balances over both replicas.
    results = mesh.request("shop/client-0", "http://web.shop.svc/hello", count=20)
    assert {r["status"] for r in results} == {200}
    assert {r["body"]["headers"]["x-meshloom-client-id"] for r in results} == {
        "spiffe://example.org/ns/shop/sa/client"}
    assert {r["body"]["pod"] for r in results} == {"shop/web-0", "shop/web-1"}

    # Again with another tick: the running control plane keeps its own, and says so.
    again = mesh.up("--tick", "0.25")
    assert "3 pod(s) ready" in again.stdout and "keeps --tick 0.5 (asked: 0.25)" in again.stderr

    before = _leftovers(mesh.prefix, mesh.state_dir)
    assert before["namespaces"] and before["interfaces"] and before["processes"]  # the check sees a live mesh

    done = mesh.meshctl("down", "--purge")
    assert "removed the state directory" in done.stdout
    assert _leftovers(mesh.prefix, mesh.state_dir) == {
        "namespaces": [], "interfaces": [], "processes": [], "iptables rules": [], "files": []}


def test_down_ends_each_pod_through_its_machine_and_a_new_up_starts_their_lives_again(mesh: Mesh) -> None:
    mesh.up()
    mesh.meshctl("down")
    assert {p["state"] for p in mesh.json("state", "pods")} == {"gone"}
    assert _leftovers(mesh.prefix, mesh.state_dir)["namespaces"] == []

    mesh.up()
    life = [row["to_state"] for row in mesh.json("audit", "pod/shop/web-0")]
    assert life == [*LIFE, "terminating", "gone", *LIFE]


def test_a_killed_control_plane_leaves_traffic_flowing_a_new_up_adopts_everything_and_a_policy_reaches_all(
        mesh: Mesh) -> None:
    mesh.up()
    sidecars = {p: _pid_of(mesh, p, "sidecar") for p in PODS}
    apps = {p: _pid_of(mesh, p, "app") for p in PODS}

    os.kill(mesh.control_plane_pid(), signal.SIGKILL)
    results = mesh.request("shop/client-0", "http://web.shop.svc/while-the-control-plane-is-dead", count=10)
    assert {r["status"] for r in results} == {200}  # the sidecars kept their configuration and certificates

    done = mesh.up()
    assert "started the control plane" in done.stdout
    assert {p: _pid_of(mesh, p, "sidecar") for p in PODS} == sidecars  # adopted, not started again
    assert {p: _pid_of(mesh, p, "app") for p in PODS} == apps
    acked = {s["sidecar"]: s["acked"] for s in mesh.json("state", "sidecars")}

    # Deny mode with no TrafficTarget: after it reaches every sidecar, the client is refused.
    policy = mesh.manifest.with_name("deny.yaml")
    policy.write_text("apiVersion: meshloom.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
                      "spec: {accessControlMode: deny}\n")
    mesh.meshctl("apply", "-f", str(policy))

    def every_sidecar_acked_a_newer_generation() -> bool:
        rows = mesh.json("state", "sidecars")
        return all(s["status"] == "SYNCED" and s["acked"] > acked[s["sidecar"]] for s in rows) and len(rows) == 3

    eventually(every_sidecar_acked_a_newer_generation, lambda: f"sidecars: {mesh.json('state', 'sidecars')}", 60)
    assert {r["status"] for r in mesh.request("shop/client-0", "http://web.shop.svc/denied", count=3)} == {403}


def test_a_workload_that_dies_is_started_again_and_its_pod_stays_in_the_mesh(mesh: Mesh) -> None:
    mesh.up()
    first = _pid_of(mesh, "shop/web-0", "app")
    os.kill(first, signal.SIGKILL)

    def restarted() -> bool:
        pid = _status(mesh)["shop/web-0"]["processes"]["app"]["pid"]
        return bool(pid) and pid != first

    eventually(restarted, lambda: f"status: {_status(mesh)['shop/web-0']}", 60)
    status = _status(mesh)["shop/web-0"]
    assert status["processes"]["app"]["restarts"] == 1
    assert "exited" in status["processes"]["app"]["last_exit"] or "not running" in status["processes"]["app"][
        "last_exit"]
    eventually(lambda: {r["body"]["pod"] for r in mesh.request("shop/client-0", "http://web.shop.svc/", 10)} == {
        "shop/web-0", "shop/web-1"}, "the restarted replica never answered again", 60)


def test_pods_outside_the_mesh_reach_services_by_name_as_kube_proxy_would_route_them(mesh: Mesh) -> None:
    mesh.manifest.write_text(MANIFEST.replace("  services:\n", """\
  - name: legacy
    namespace: shop
    labels: {app: legacy}
    command: [meshctl, app, serve, --http, "8080"]
    ports:
    - {name: http, containerPort: 8080}
    meshed: false
  - name: outsider
    namespace: shop
    labels: {app: outsider}
    command: [meshctl, app, serve, --http, "8080"]
    ports:
    - {name: http, containerPort: 8080}
    meshed: false
  services:
  - name: legacy
    namespace: shop
    selector: {app: legacy}
    ports:
    - {name: http, port: 80, targetPort: 8080}
"""))
    mesh.up()

    # Outside the mesh to outside the mesh, and to a meshed Service (permissive by default: served in plain text)
    # at each of its replicas; from inside the mesh to a Service outside it, through the sidecar.
    assert {r["status"] for r in mesh.request("shop/outsider-0", "http://legacy/", 5)} == {200}
    answered = {r["body"]["pod"] for r in mesh.request("shop/outsider-0", "http://web.shop.svc/", 24, close=True)}
    assert answered == {"shop/web-0", "shop/web-1"}  # a replica per connection, at random: 24 on one has odds 2^-23
    assert {r["status"] for r in mesh.request("shop/client-0", "http://legacy.shop/", 5)} == {200}


def _status(mesh: Mesh) -> dict[str, Any]:
    return dict(json.loads((mesh.state_dir / "local" / "status.json").read_text()))


def _pid_of(mesh: Mesh, pod: str, role: str) -> int:
    return int(_status(mesh)[pod]["processes"][role]["pid"])


# ---- refusals before anything starts ------------------------------------------------------------------------------
BROKEN = """\
apiVersion: meshloom.io/v1alpha1
kind: Mesh
metadata:
  name: broken
spec:
  workloads:
  - name: web
    namespace: shop
    labels: {app: web}
    command: [meshctl, app, serve]
    colour: blue
    ports:
    - {name: http, containerPort: 70000}
  - name: web
    namespace: shop
    command: [meshctl, app, serve]
  services:
  - name: api
    namespace: shop
    selector: {app: api}
    ports:
    - {port: 80}
"""


def test_a_broken_manifest_is_refused_before_anything_starts_with_each_error_at_its_line(tmp_path: Path) -> None:
    manifest = tmp_path / "mesh.yaml"
    manifest.write_text(BROKEN)
    state_dir = tmp_path / "state"
    done = subprocess.run([MESHCTL, "up", "-f", str(manifest), "--state-dir", str(state_dir)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 7, done.stderr
    lines = done.stderr.splitlines()
    name = str(manifest)

    def line_of(pattern: str) -> list[str]:
        return [line for line in lines if re.search(pattern, line)]

    assert line_of(rf"^meshctl: {re.escape(name)}:11: spec\.workloads\[0\]\.colour: unknown field")
    assert line_of(rf"^meshctl: {re.escape(name)}:13: spec\.workloads\[0\]\.ports\[0\]\.containerPort: .*70000")
    assert line_of(rf"^meshctl: {re.escape(name)}:14: spec\.workloads\[1\]\.name: .*duplicate")
    assert line_of(rf"^meshctl: {re.escape(name)}:20: spec\.services\[0\]\.selector: .*no workload")
    assert not state_dir.exists()  # nothing started, nothing stored


def test_up_without_the_privilege_it_needs_says_so_in_one_line() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root to become an unprivileged user for the check")
    work = Path(tempfile.mkdtemp(prefix="meshloom-up-", dir="/tmp"))  # readable by the unprivileged user
    try:
        os.chmod(work, 0o755)
        manifest = work / "mesh.yaml"
        manifest.write_text(MANIFEST)
        manifest.chmod(0o644)
        done = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--", MESHCTL,
                               "up", "-f", str(manifest), "--state-dir", str(work / "state")], capture_output=True,
                              text=True, timeout=60, check=False, cwd="/")
        assert done.returncode == 4, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert "root" in done.stderr or "CAP_NET_ADMIN" in done.stderr
        assert not (work / "state").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- the demo -----------------------------------------------------------------------------------------------------
DEMO_PODS = ("demo/backend-v1-0", "demo/backend-v2-0", "demo/client-0", "demo/frontend-0", "demo/intruder-0")


def test_the_demo_shows_the_split_the_refusals_and_the_identities_rotates_live_and_leaves_the_mesh_up(
        mesh: Mesh) -> None:
    done = mesh.meshctl("demo", "--subnet", mesh.subnet, "--prefix", mesh.prefix)
    out = done.stdout
    rows = {line.strip().split("  ")[0]: line for line in out.splitlines() if " -> " in line.strip().split("  ")[0]}
    td = "spiffe://example.org/ns/demo/sa"

    assert f"{td}/client -> {td}/frontend" in rows["client -> frontend"]
    assert "100.0%" in rows["client -> frontend"]
    split = re.search(r"split backend-v1-0 ([\d.]+)% / backend-v2-0 ([\d.]+)%", rows["frontend -> backend"])
    assert split is not None, out
    assert 65 <= float(split.group(1)) <= 95 and 5 <= float(split.group(2)) <= 35  # 80/20 over 400 calls
    assert f"{td}/frontend -> {td}/backend" in rows["frontend -> backend"]
    assert re.search(r"refused 20 x 403 by the access policy", rows["intruder -> frontend"])
    assert re.search(r"\d+ x 503 over the 10r/s rate limit", rows["client -> frontend /limited"])
    rotated = re.search(r"CA generation 1 -> 2 .*: 5 SVIDs re-issued", out)
    assert rotated is not None, out
    assert re.search(r"\d+ requests before, during and after it: 0 failed", out), out

    # It leaves the mesh up, with every pod's whole life to read.
    pods = {p["pod"]: p["state"] for p in mesh.json("state", "pods")}
    assert pods == dict.fromkeys(DEMO_PODS, "ready")
    for pod in DEMO_PODS:
        assert [row["to_state"] for row in mesh.json("audit", f"pod/{pod}")] == LIFE
    assert {c["generation"] for c in mesh.json("state", "certs") if c["state"] == "active"} == {"2"}

    # `meshctl top` reads the same traffic from the sidecars' own counters (the demo never reloads a proxy: its
    # rotation goes through the runtime API, so no counter restarted).
    tops = {t["pod"]: t for t in mesh.json("top", "--window", "0.5")}
    assert set(tops) == set(DEMO_PODS) and all(t["problem"] is None for t in tops.values())
    frontend = {(e["direction"], e["peer"]): e for e in tops["demo/frontend-0"]["edges"]}
    served = frontend[("inbound", ":8080")]["requests"]
    legs = [frontend[("outbound", f"demo/backend:80 > backend-v{v}")]["requests"] for v in (1, 2)]
    assert served >= 400 and sum(legs) == served  # each request the frontend served called the backend once
    assert 0.65 <= legs[0] / served <= 0.95
    limited = re.search(r"(\d+) x 503", rows["client -> frontend /limited"])
    assert limited is not None
    assert tops["demo/frontend-0"]["refused"] == 20 + int(limited.group(1))  # the intruder's 403s, the 503s
    (client,) = tops["demo/client-0"]["edges"]
    assert client["requests"] == served + int(limited.group(1))
    assert client["responses"].get("5xx") == int(limited.group(1))
    (intruder,) = tops["demo/intruder-0"]["edges"]
    assert intruder["responses"] == {"4xx": 20}
    assert "demo/backend:80 > backend-v2" in mesh.meshctl("top", "pod/demo/frontend-0").stdout

    mesh.meshctl("down", "--purge")
    assert _leftovers(mesh.prefix, mesh.state_dir) == {
        "namespaces": [], "interfaces": [], "processes": [], "iptables rules": [], "files": []}


def test_a_pod_that_cannot_start_is_named_with_its_state_and_why(mesh: Mesh) -> None:
    mesh.manifest.write_text((MANIFEST + """\
  - name: broken
    namespace: shop
    selector: {app: broken}
    ports:
    - {name: http, port: 80, targetPort: 8080}
""").replace("  services:\n", """\
  - name: broken
    namespace: shop
    labels: {app: broken}
    command: [sh, -c, "echo cannot read /etc/broken.conf >&2; exit 3"]
    ports:
    - {name: http, containerPort: 8080}
  services:
"""))
    done = subprocess.run([MESHCTL, "up", "-f", str(mesh.manifest), "--state-dir", str(mesh.state_dir), "--subnet",
                           mesh.subnet, "--prefix", mesh.prefix, "--timeout", "20", "--tick", "0.5"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 8, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines  # only the broken pod: the others are ready
    assert re.fullmatch(r"meshctl: pod shop/broken-0: stuck in config-synced for \d+s, waiting for its proxy and "
                        r"its workload to be ready; its app exited with 3: cannot read /etc/broken.conf"
                        r"(; starting it again in \d+s| \(\d+ restart\(s\)\))", lines[0]), lines[0]
