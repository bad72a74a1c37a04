"""Issue 5's acceptance, end to end: pods in network namespaces, each with its init rules and a real `meshctl
sidecar` (HAProxy), SVIDs from the control plane's CA over the Workload API, configuration over NATS.

One mesh serves the whole module (tests/support/mesh.py); every test leaves it as it found it. Namespace `demo`:

    client pods      a-1 (service account a), c-1 (c), outsider (no sidecar, no init rules)
    b      80 -> b-1:8080 http, 9000 tcp-echo          strict mTLS (the mesh's default here)
    p      80 -> p-1:8080 http                         permissive (its pod's mtls-mode annotation)
    web    80 -> v1-1, v2-1 (web-v1, web-v2: the split's legs)
    rl     80 -> r-1 (rate limited)
    flaky  80 -> f-1 (answers /fail with 500), fallback 80 -> fb-1 (answers everything with 200)

Traffic goes only to the addresses of the test's own /24 (pods, and the Services' virtual addresses, which only ever
exist inside a client pod's iptables rules). Every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from actions.ca import pem
from actions.clock import SystemClock
from engine import views
from sidecar.haproxy import ACCESS_DENIED_STATUS, CLIENT_ID_HEADER, RATE_LIMITED_STATUS
from tests.support.mesh import ECHO_APP, PYTHON, LocalMesh, MeshPod, state_directory
from tests.support.netns import make_host_network
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

NS = "demo"
HTTP = [{"name": "http", "containerPort": 8080}]
SERVICE_HTTP = [{"name": "http", "port": 80, "targetPort": 8080}]
SPLIT = "split.smi-spec.io/v1alpha3"
ACCESS = "access.smi-spec.io/v1alpha2"
SPECS = "specs.smi-spec.io/v1alpha3"
NGINX2 = "specs.smi.nginx.com/v1alpha2"
NGINX1 = "specs.smi.nginx.com/v1alpha1"
CAPTURE_LIMIT = 30.0  # seconds a packet capture may run at the most
CAPTURE_BYTES = 8 * 1024 * 1024


def policy(api: str, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": api, "kind": kind, "metadata": {"namespace": NS, "name": name}, "spec": spec}


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    with make_host_network() as net, state_directory() as state:
        local = LocalMesh(net, state, mesh_config={"mtlsMode": "strict", "accessControlMode": "allow"})
        with local:
            local.add_service(NS, "b", {"app": "b"}, [*SERVICE_HTTP, {"name": "tcp-echo", "port": 9000}])
            local.add_service(NS, "p", {"app": "p"}, SERVICE_HTTP)
            local.add_service(NS, "web", {"app": "web"}, SERVICE_HTTP)
            local.add_service(NS, "web-v1", {"app": "web", "version": "v1"}, SERVICE_HTTP)
            local.add_service(NS, "web-v2", {"app": "web", "version": "v2"}, SERVICE_HTTP)
            local.add_service(NS, "rl", {"app": "rl"}, SERVICE_HTTP)
            local.add_service(NS, "flaky", {"app": "flaky"}, SERVICE_HTTP)
            local.add_service(NS, "fallback", {"app": "fallback"}, SERVICE_HTTP)
            local.add_pod(NS, "b-1", "b", {"app": "b"}, [*HTTP, {"name": "tcp-echo", "containerPort": 9000}])
            local.add_pod(NS, "p-1", "p", {"app": "p"}, HTTP, annotations={"config.nsm.nginx.com/mtls-mode":
                                                                          "permissive"})
            local.add_pod(NS, "v1-1", "web", {"app": "web", "version": "v1"}, HTTP)
            local.add_pod(NS, "v2-1", "web", {"app": "web", "version": "v2"}, HTTP)
            local.add_pod(NS, "r-1", "rl", {"app": "rl"}, HTTP)
            local.add_pod(NS, "f-1", "flaky", {"app": "flaky"}, HTTP)
            local.add_pod(NS, "fb-1", "fallback", {"app": "fallback"}, HTTP,
                          app_argv=[PYTHON, str(ECHO_APP), "serve", "--pod", f"{NS}/fb-1", "--http", "8080",
                                    "--no-fail"])
            local.add_pod(NS, "a-1", "a", {"app": "a"})
            local.add_pod(NS, "c-1", "c", {"app": "c"})
            local.add_pod(NS, "outsider", "default", {"app": "outsider"}, meshed=False)
            yield local


def pod(mesh: LocalMesh, name: str) -> MeshPod:
    return mesh.pod(f"{NS}/{name}")


def url(mesh: LocalMesh, service: str, path: str = "/", port: int = 80) -> str:
    return f"http://{mesh.services[f'{NS}/{service}']}:{port}{path}"


def served(results: list[dict[str, Any]]) -> list[str]:
    """Which pod answered each request (its status 200), or what went wrong."""
    return [r["body"]["pod"] if r.get("status") == 200 else f"{r.get('status') or r.get('error')}" for r in results]


# ---- packets on the wire ---------------------------------------------------------------------------------------------
class Capture:
    """TCP payloads between two addresses, read from a host interface with a raw AF_PACKET socket, bounded in time
    and bytes; `with Capture(...) as cap:` captures while the block runs."""

    def __init__(self, interface: str, a: str, b: str) -> None:
        self.interface = interface
        self.pair = {socket.inet_aton(a), socket.inet_aton(b)}
        self.payloads: list[tuple[int, int, bytes]] = []  # (source port, destination port, payload)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
        self._sock.bind((interface, 0))
        self._sock.settimeout(0.1)

    def __enter__(self) -> Capture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # the last segments of the exchange are still on their way through the bridge
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _run(self) -> None:
        deadline = time.monotonic() + CAPTURE_LIMIT
        total = 0
        while not self._stop.is_set() and time.monotonic() < deadline and total < CAPTURE_BYTES:
            try:
                frame = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            total += len(frame)
            if len(frame) < 34 or frame[12:14] != b"\x08\x00":  # IPv4 only
                continue
            ip = frame[14:]
            header = (ip[0] & 0x0F) * 4
            if ip[9] != 6 or {ip[12:16], ip[16:20]} != self.pair:  # TCP between the two pods only
                continue
            length = struct.unpack("!H", ip[2:4])[0]
            tcp = ip[header:length]
            if len(tcp) < 20:
                continue
            sport, dport = struct.unpack("!HH", tcp[:4])
            payload = tcp[(tcp[12] >> 4) * 4:]
            if payload:
                self.payloads.append((sport, dport, bytes(payload)))


def probe_context(mesh: LocalMesh, folder: Path) -> ssl.SSLContext:
    """A TLS client context with an SVID of the mesh's CA (for a probe identity) trusting the mesh's bundle."""
    folder.mkdir(exist_ok=True)
    issued = mesh.plane.ca.sign_svid(f"spiffe://{mesh.trust_domain}/ns/{NS}/sa/probe", (f"probe.{NS}.sa",), 600)
    (folder / "probe.pem").write_bytes(pem([issued.certificate, *issued.chain]))
    (folder / "probe.key").write_bytes(issued.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    nats = mesh.plane.nats
    assert nats is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(nats.bundle)
    context.load_cert_chain(folder / "probe.pem", folder / "probe.key")
    return context


def presented_serial(context: ssl.SSLContext, ip: str, port: int) -> str:
    """The serial (hex, as the certificate rows show it) of the certificate a sidecar presents on a new mutual TLS
    connection to `ip:port` (its inbound redirect), from the host."""
    with socket.create_connection((ip, port), timeout=10) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def newest_cert(mesh: LocalMesh, owner: MeshPod) -> views.CertView:
    """The pod's newest certificate, whatever its state (during a rotation, the successor is requested, issued,
    delivered, then active once the workload picked it up)."""
    certs = [c for c in views.certs(mesh.store, SystemClock().now()) if c.owner == owner.key]
    assert certs, f"{owner.key} has no certificate"
    return max(certs, key=lambda c: int(c.cert.rsplit("/", 1)[1]))


def serving_cert(mesh: LocalMesh, owner: MeshPod) -> views.CertView:
    """The newest certificate of the pod, once its workload picked it up (active)."""
    eventually(lambda: newest_cert(mesh, owner).state == "active",
               lambda: f"{owner.key}'s newest certificate never became active: {newest_cert(mesh, owner)}")
    return newest_cert(mesh, owner)


# ---- the tests -------------------------------------------------------------------------------------------------------
def test_a_request_from_a_to_b_travels_both_sidecars_over_mutual_tls_and_b_learns_a_spiffe_id(mesh):
    a, b = pod(mesh, "a-1"), pod(mesh, "b-1")
    marker = f"/marker-{secrets.token_hex(8)}"
    echo = f"echo-{secrets.token_hex(8)}"
    with Capture(b.net.host_veth, a.ip, b.ip) as capture:
        [answer] = a.request(url(mesh, "b", marker))
        session = a.session(mesh.services[f"{NS}/b"], 9000, tcp=True)  # a new connection, so a new handshake
        try:
            assert session.step(echo) == {"echo": echo}
        finally:
            session.close()

    # B's application was reached by B's sidecar (on loopback), which told it A's identity.
    assert answer["status"] == 200, answer
    body = answer["body"]
    assert body["pod"] == b.key and body["path"] == marker
    assert body["headers"][CLIENT_ID_HEADER] == a.spiffe_id == f"spiffe://example.org/ns/{NS}/sa/a"
    assert body["peer"].startswith("127.0.0.1:")

    # Between the pods: TLS records only -- a handshake, application data -- and never the request in clear.
    assert capture.payloads, "no packet between the pods was captured"
    on_wire = b"".join(p for _, _, p in capture.payloads)
    assert marker.encode() not in on_wire and echo.encode() not in on_wire and b"HTTP/1.1" not in on_wire
    assert any(p.startswith(b"\x16\x03") for _, _, p in capture.payloads), "no TLS handshake record seen"
    assert any(d == 8080 for _, d, _ in capture.payloads), "nothing went to B's application port"
    assert any(p[:1] == b"\x17" and p[1:2] == b"\x03" for _, d, p in capture.payloads if d == 8080), \
        "no TLS application data towards B's application port"


def test_a_pod_calling_a_service_it_backs_itself_reaches_its_own_application_through_its_inbound_side(mesh):
    # b's only endpoint is b-1: b-1's outbound proxy opens mutual TLS to its own address, which the init rules
    # turn back into its inbound side (it would otherwise reach the application as TLS).
    b = pod(mesh, "b-1")
    answers = b.request(url(mesh, "b", "/self"), 3)
    assert [a["status"] for a in answers] == [200, 200, 200], answers
    assert {a["body"]["pod"] for a in answers} == {b.key}
    assert answers[0]["body"]["headers"][CLIENT_ID_HEADER] == b.spiffe_id


def test_strict_refuses_a_plain_client_outside_the_mesh_and_permissive_serves_it(mesh):
    outsider, a = pod(mesh, "outsider"), pod(mesh, "a-1")
    b, p = pod(mesh, "b-1"), pod(mesh, "p-1")

    # strict (b): the outsider's plain text never reaches the application.
    [refused] = outsider.request(f"http://{b.ip}:8080/plain")
    assert "error" in refused, refused
    session = None
    with contextlib.suppress(Exception):
        session = outsider.session(b.ip, 9000, tcp=True)
    if session is not None:
        try:
            assert "error" in session.step("plain"), "a plain TCP client reached a strict port"
        finally:
            session.close()

    # permissive (p): the outsider is served in plain text (no identity); a mesh client over mutual TLS.
    [plain] = outsider.request(f"http://{p.ip}:8080/plain")
    assert plain["status"] == 200 and plain["body"]["pod"] == p.key
    assert CLIENT_ID_HEADER not in plain["body"]["headers"]
    [meshed] = a.request(url(mesh, "p", "/meshed"))
    assert meshed["status"] == 200 and meshed["body"]["headers"][CLIENT_ID_HEADER] == a.spiffe_id


def test_deny_mode_serves_an_authorised_service_account_on_its_routes_only(mesh):
    a, c = pod(mesh, "a-1"), pod(mesh, "c-1")
    mesh.apply([
        policy(SPECS, "HTTPRouteGroup", "b-routes", {"matches": [
            {"name": "read", "methods": ["GET"], "pathRegex": "/api/.*"}]}),
        policy(ACCESS, "TrafficTarget", "a-reads-b", {
            "destination": {"kind": "ServiceAccount", "name": "b", "namespace": NS},
            "sources": [{"kind": "ServiceAccount", "name": "a", "namespace": NS}],
            "rules": [{"kind": "HTTPRouteGroup", "name": "b-routes", "matches": ["read"]}]}),
    ])
    mesh.set_mesh_config(accessControlMode="deny")
    try:
        [allowed] = a.request(url(mesh, "b", "/api/items"))
        assert allowed["status"] == 200 and allowed["body"]["headers"][CLIENT_ID_HEADER] == a.spiffe_id
        [wrong_method] = a.request(url(mesh, "b", "/api/items"), method="POST")
        [wrong_path] = a.request(url(mesh, "b", "/admin"))
        [unauthorised] = c.request(url(mesh, "b", "/api/items"))
        assert [wrong_method["status"], wrong_path["status"], unauthorised["status"]] == [ACCESS_DENIED_STATUS] * 3
        # A layer 4 port that no TCPRoute opens is closed to A as well.
        session = a.session(mesh.services[f"{NS}/b"], 9000, tcp=True)
        try:
            assert "error" in session.step("denied"), "a layer 4 port without a TCPRoute let A in"
        finally:
            session.close()
    finally:
        mesh.set_mesh_config(accessControlMode="allow")
    [again] = c.request(url(mesh, "b", "/api/items"))
    assert again["status"] == 200


def test_a_traffic_split_of_80_20_over_1000_requests_lands_within_5_points_of_its_weights(mesh):
    a = pod(mesh, "a-1")
    mesh.apply([policy(SPLIT, "TrafficSplit", "web-canary", {
        "service": "web", "backends": [{"service": "web-v1", "weight": 80}, {"service": "web-v2", "weight": 20}]})])
    counts = Counter(served(a.request(url(mesh, "web", "/split"), 1000)))
    assert set(counts) == {f"{NS}/v1-1", f"{NS}/v2-1"}, counts
    assert abs(counts[f"{NS}/v1-1"] / 10 - 80) <= 5, counts
    assert abs(counts[f"{NS}/v2-1"] / 10 - 20) <= 5, counts


def test_a_rate_limit_of_10_per_second_refuses_the_excess_with_its_documented_status(mesh):
    a = pod(mesh, "a-1")
    mesh.apply([policy(NGINX2, "RateLimit", "rl-10rs", {
        "destination": {"kind": "Service", "name": "rl", "namespace": NS},
        "name": "10rs", "rate": "10r/s", "burst": 0, "delay": "nodelay"})])
    results = a.request(url(mesh, "rl", "/limited"), 40)
    statuses = [r.get("status") for r in results]
    assert set(statuses) <= {200, RATE_LIMITED_STATUS}, statuses
    assert statuses[:10] == [200] * 10, statuses
    assert RATE_LIMITED_STATUS in statuses, statuses
    # However fast or slow the client was, no more than 10 passed in any second.
    elapsed = results[-1]["t"]
    assert statuses.count(200) <= 10 * (1 + int(elapsed) + 1), (elapsed, statuses)


def test_a_circuit_breaker_opens_after_its_error_count_and_sends_traffic_to_the_fallback(mesh):
    a = pod(mesh, "a-1")
    before = served(a.request(url(mesh, "flaky", "/ok"), 3))
    assert before == [f"{NS}/f-1"] * 3
    mesh.apply([policy(NGINX1, "CircuitBreaker", "flaky-breaker", {
        "destination": {"kind": "Service", "name": "flaky", "namespace": NS},
        "errors": 3, "timeoutSeconds": 60, "fallback": {"service": f"{NS}/fallback", "port": 80}})])
    # The breaker closes again on a passing health check, every timeoutSeconds (sidecar/haproxy.py): 60 s makes
    # one falling inside these few milliseconds of requests most unlikely.
    results = a.request(url(mesh, "flaky", "/fail"), 10)
    answers = [(r.get("status"), r.get("body", {}).get("pod")) for r in results]
    assert answers[:3] == [(500, f"{NS}/f-1")] * 3, answers
    assert answers[3:] == [(200, f"{NS}/fb-1")] * 7, answers


def test_a_certificate_rotation_keeps_a_long_lived_connection_and_new_connections_see_the_new_serial(
        mesh, tmp_path):
    a, b = pod(mesh, "a-1"), pod(mesh, "b-1")
    vip = mesh.services[f"{NS}/b"]
    tcp = a.session(vip, 9000, tcp=True)
    http = a.session(vip, 80)
    try:
        assert tcp.step("before") == {"echo": "before"}
        first = http.step("GET /before")
        assert first["status"] == 200
        status = {p.key: p.status() for p in (a, b)}
        certs = {p.key: serving_cert(mesh, p) for p in (a, b)}
        probe = probe_context(mesh, tmp_path)
        assert presented_serial(probe, b.ip, 8080) == certs[b.key].serial

        for p in (a, b):
            mesh.plane.engine.fire("cert", certs[p.key].cert, "rotate", actor="test")
        for p in (a, b):
            eventually(lambda p=p: newest_cert(mesh, p).cert != certs[p.key].cert,
                       f"{p.key}'s certificate was never rotated")
            new = serving_cert(mesh, p)
            eventually(lambda p=p, new=new: p.status()["serial"] == new.serial,
                       f"{p.key}'s sidecar never took its new certificate")

        # The connections opened before the rotation still carry traffic, on the same connection.
        assert tcp.step("after") == {"echo": "after"}
        second = http.step("GET /after")
        assert second["status"] == 200 and second["body"]["pod"] == b.key
        # A new connection sees B's new certificate (the agent's /status says it has it a moment before HAProxy
        # presents it); HAProxy took it at run time: same processes, no reload.
        serial = serving_cert(mesh, b).serial
        eventually(lambda: presented_serial(probe, b.ip, 8080) == serial, "B never presented its new certificate")
        for p in (a, b):
            now = p.status()
            assert now["proxy_pid"] == status[p.key]["proxy_pid"]
            assert now["worker_pids"] == status[p.key]["worker_pids"]
            assert now["reloads"] == status[p.key]["reloads"] and now["proxy_starts"] == status[p.key]["proxy_starts"]
        [fresh] = a.request(url(mesh, "b", "/fresh"), close=True)
        assert fresh["status"] == 200
    finally:
        tcp.close()
        http.close()


def test_a_sidecar_killed_and_restarted_comes_back_synced_with_its_certificate_and_only_its_connections_broke(
        mesh):
    a, b = pod(mesh, "a-1"), pod(mesh, "b-1")
    elsewhere = a.session(mesh.services[f"{NS}/p"], 80)  # to another pod: the kill must not touch it
    to_b = a.session(mesh.services[f"{NS}/b"], 9000, tcp=True)
    try:
        assert elsewhere.step("GET /before")["status"] == 200
        assert to_b.step("before") == {"echo": "before"}
        killed = b.kill_sidecar()

        assert "error" in to_b.step("during"), "a connection through the killed sidecar still carried traffic"
        assert all(r.get("status") != 200 for r in a.request(url(mesh, "b", "/during"), close=True))
        # A change of B's own document while it is away (an inbound policy: no other sidecar changes, so none
        # reloads): B's rollout is no longer in sync.
        synced = b.rollout()
        assert synced is not None
        mesh.apply([policy(NGINX2, "RateLimit", "b-generous", {
            "destination": {"kind": "Service", "name": "b", "namespace": NS},
            "name": "1000rs", "rate": "1000r/s", "burst": 1000, "delay": "nodelay"})])
        eventually(lambda: (row := b.rollout()) is not None and row.desired > synced.desired,
                   "the change made while B was away never reached its rollout")
        row = b.rollout()
        assert row is not None and row.status != "SYNCED" and row.acked < row.desired

        b.start_sidecar()
        b.wait_ready()
        eventually(b.synced, "the restarted sidecar never came back SYNCED")
        assert b.status()["serial"] == serving_cert(mesh, b).serial
        assert not set(b.haproxy_pids()) & set(killed)
        [after] = a.request(url(mesh, "b", "/after"))
        assert after["status"] == 200 and after["body"]["headers"][CLIENT_ID_HEADER] == a.spiffe_id
        assert elsewhere.step("GET /after")["status"] == 200  # same connection, untouched by the kill
    finally:
        elsewhere.close()
        to_b.close()
