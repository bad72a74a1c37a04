"""The sidecar proxy in network namespaces with the init's real iptables REDIRECTs: outbound connections are routed
by their original destination (a Service address, a pod address, or somewhere outside the mesh), inbound ones
reach the application on their original port, with mutual TLS between the two sidecars.

    pod a (client, sidecar A)  ---REDIRECT :15001--> A --mTLS--> pod b :8080 ---REDIRECT :15006--> B --> app :8080
    pod c (no sidecar): a plain listener outside the mesh, and a client that is not in the mesh

The Services' addresses are pod b's own address on ports nothing listens on (80, 5432), so no packet can leave the
test's pods even if a rule were missing. HAProxy runs as uid 2102 inside the pods, as in a real one.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actions.iptables import InitSettings, install
from actions.netns import HostNetwork, PodNet, pod_command, run, spawn
from catalog.documents import Grant
from sidecar.haproxy import ProxyPaths, ProxyPorts, render
from sidecar.proxy import Proxy
from tests.sidecar.support import (
    bundle,
    document,
    endpoint,
    inbound_port,
    make_svid,
    route,
    run_dir,
    service,
    shard,
    shards_of,
    sid,
)
from tests.support.netns import make_host_network, start_listener
from tests.support.pki import Authority

pytestmark = pytest.mark.integration

ECHO = str(Path(__file__).resolve().parents[2] / "apps" / "echo.py")
A_ID, B_ID = sid("shop", "web"), sid("shop", "api")
SIDECAR_UID = 2102


class Mesh:
    def __init__(self, net: HostNetwork, root: Authority, certs: Path) -> None:
        self.net, self.root, self.certs = net, root, certs
        self.a, self.b, self.c = net.add_pod("a"), net.add_pod("b"), net.add_pod("c")
        self.processes: list[subprocess.Popen[Any]] = []
        self.proxies: list[Proxy] = []
        self._files = contextlib.ExitStack()  # run directories and logs, removed and closed in close()

    def shards(self) -> list[dict[str, Any]]:
        b = str(self.b.ip)
        return [shard("shop",
                      service("api", b, [("http", 80, "http", [endpoint(b, 8080, B_ID)])]),
                      service("db", b, [("tcp", 5432, "tcp", [endpoint(b, 9000, B_ID)])]))]

    def sidecar(self, pod: PodNet, spiffe_id: str, doc: dict[str, Any]) -> Proxy:
        install(InitSettings(), netns=pod.netns)
        paths = ProxyPaths(self._files.enter_context(run_dir()))
        log = self._files.enter_context(open(Path(paths.run_dir) / "haproxy.log", "ab"))
        prefix = pod_command(pod, ["-"], uid=SIDECAR_UID)[:-1]
        proxy = Proxy(paths, uid=SIDECAR_UID, gid=SIDECAR_UID, output=log, prefix=prefix)
        self.proxies.append(proxy)
        svid = make_svid(self.root, spiffe_id, self.certs / pod.name)
        proxy.start(render(doc, shards_of(*self.shards()), paths, ProxyPorts()), svid.pem, bundle(self.root))
        return proxy

    def app(self, pod: PodNet) -> None:
        proc = spawn(pod, [sys.executable, ECHO, "serve", "--pod", f"shop/{pod.name}-1", "--http", "8080",
                           "--tcp", "9000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.processes.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready"), proc.stderr.read() if proc.stderr else ""

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.stop(drain_seconds=0)
        for proc in self.processes:
            proc.kill()
            proc.communicate(timeout=10)
        self._files.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with make_host_network() as net:
        m = Mesh(net, Authority.root(), tmp_path_factory.mktemp("certs"))
        try:
            m.app(m.b)
            read = route("read", ["GET"], "/allowed.*")
            m.sidecar(m.a, A_ID, document(shards=m.shards(), mtls="strict", access="deny", spiffe_id=A_ID))
            m.sidecar(m.b, B_ID, document(
                inbound=[inbound_port(8080, sources=[Grant(A_ID, (read,))]),
                         inbound_port(9000, "tcp", sources=[Grant(A_ID, None)])],
                shards=m.shards(), mtls="strict", access="deny", spiffe_id=B_ID))
            yield m
        finally:
            m.close()


def _get(pod: PodNet, url: str, *headers: str) -> dict[str, Any]:
    args = [sys.executable, ECHO, "request", url, "--timeout", "10"]
    for h in headers:
        args += ["--header", h]
    result = json.loads(run(pod, args).stdout)["results"][0]
    assert isinstance(result, dict)
    return result


def test_a_request_to_a_service_address_goes_through_both_sidecars_with_the_clients_identity(mesh: Mesh) -> None:
    answer = _get(mesh.a, f"http://{mesh.b.ip}:80/allowed/x", f"x-meshloom-client-id: {sid('shop', 'forged')}")
    assert answer["status"] == 200
    body = answer["body"]
    assert body["pod"] == "shop/b-1" and body["port"] == 8080 and body["path"] == "/allowed/x"
    assert body["headers"]["x-meshloom-client-id"] == A_ID
    assert body["peer"].startswith("127.0.0.1:")  # handed over by b's sidecar on loopback
    assert _sessions(mesh.proxies[0], "http:shop.api:80") >= 1


def test_a_request_to_a_pod_address_is_sent_there_with_mutual_tls(mesh: Mesh) -> None:
    before = _sessions(mesh.proxies[0], "outbound-pod")
    answer = _get(mesh.a, f"http://{mesh.b.ip}:8080/allowed/direct")
    assert answer["status"] == 200
    assert answer["body"]["headers"]["x-meshloom-client-id"] == A_ID
    assert _sessions(mesh.proxies[0], "outbound-pod") == before + 1


def _sessions(proxy: Proxy, backend: str) -> int:
    return next(int(r["stot"]) for r in proxy.stats() if r["pxname"] == backend and r["svname"] == "BACKEND")


def test_the_destinations_access_rules_apply_to_each_request(mesh: Mesh) -> None:
    assert _get(mesh.a, f"http://{mesh.b.ip}:80/forbidden")["status"] == 403


def test_a_tcp_service_is_proxied_at_layer_4_to_the_original_port(mesh: Mesh) -> None:
    code = ("import socket,sys; s=socket.create_connection((sys.argv[1],5432),timeout=10); "
            "s.sendall(b'hello tcp\\n'); print(s.recv(100).decode().strip())")
    assert run(mesh.a, [sys.executable, "-c", code, str(mesh.b.ip)]).stdout.strip() == "hello tcp"


def test_a_plain_client_outside_the_mesh_is_refused_by_a_strict_sidecar(mesh: Mesh) -> None:
    answer = _get(mesh.c, f"http://{mesh.b.ip}:8080/allowed/x")
    assert "error" in answer


def test_traffic_to_a_destination_outside_the_mesh_passes_through_to_its_original_address(mesh: Mesh) -> None:
    listener = start_listener(mesh.c, 7000)
    try:
        code = ("import socket,sys; s=socket.create_connection((sys.argv[1],7000),timeout=10); "
                "print(s.makefile().readline().strip())")
        line = run(mesh.a, [sys.executable, "-c", code, str(mesh.c.ip)]).stdout.strip()
        assert line.startswith(f"{mesh.c.ip}:7000")
    finally:
        listener.kill()
        listener.communicate(timeout=10)


def test_the_sidecar_runs_as_its_own_user_inside_the_pod(mesh: Mesh) -> None:
    for proxy in mesh.proxies:
        for pid in [proxy.pid, *proxy.worker_pids()]:
            status = Path(f"/proc/{pid}/status").read_text()
            assert next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1] == "2102"
