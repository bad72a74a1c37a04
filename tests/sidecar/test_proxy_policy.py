"""The real HAProxy on loopback: what the inbound side lets through (access control, mTLS modes, rate limits, body
size) and what the outbound side does (mutual TLS to a peer sidecar, traffic splits, circuit breakers, metrics).

The application's port is the inbound port here (see tests/sidecar/support.py), so `dst_port` is what it would be
after iptables' REDIRECT; the namespace tests do the same through real REDIRECTs.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from catalog.documents import Grant, InboundPort, OutboundService
from sidecar.haproxy import ProxyPorts
from sidecar.proxy import Proxy, find_haproxy
from tests.sidecar.support import (
    App,
    Proxies,
    Svid,
    TcpEcho,
    breaker,
    bundle,
    client_context,
    document,
    endpoint,
    free_port,
    inbound_port,
    inbound_ports,
    make_svid,
    outbound_ports,
    rate_limit,
    refused,
    request,
    route,
    run_dir,
    send,
    service,
    shard,
    sid,
    split,
)
from tests.support.pki import Authority

pytestmark = pytest.mark.integration

SERVER, WEB, PAYMENTS, STRANGER = sid("shop", "app"), sid("shop", "web"), sid("pay", "payments"), sid("shop", "x")


@pytest.fixture
def port() -> Iterator[int]:
    yield free_port("127.0.0.1", "127.0.0.2")


@pytest.fixture
def app(port: int) -> Iterator[App]:
    """The application on 127.0.0.1:port, its sidecar's inbound side being 127.0.0.2:port."""
    application = App("app", "127.0.0.1", port)
    yield application
    application.close()


def _inbound(proxies: Proxies, root: Authority, certs: Path, port: int, ports_doc: list[InboundPort],
             **doc: Any) -> Svid:
    svid = make_svid(root, SERVER, certs / "server")
    proxies.start(document(inbound=ports_doc, **doc), [], svid, bundle(root), inbound_ports(port))
    return svid


def _as(root: Authority, certs: Path, spiffe_id: str) -> ssl.SSLContext:
    return client_context(make_svid(root, spiffe_id, certs / spiffe_id.rsplit("/", 1)[-1]), bundle(root))


# --------------------------------------------------------------------------------------------------- inbound ---
def test_deny_mode_lets_each_source_make_only_the_requests_its_routes_allow(
        proxies: Proxies, root: Authority, certs: Path, port: int, app: App) -> None:
    read = route("read", ["GET", "HEAD"], "/api/.*")
    grants = [Grant(PAYMENTS, None), Grant(WEB, (read,))]
    _inbound(proxies, root, certs, port, [inbound_port(port, sources=grants)])
    web, payments, stranger = (_as(root, certs, s) for s in (WEB, PAYMENTS, STRANGER))
    assert request("127.0.0.2", port, "/api/items", context=web).status == 200
    assert request("127.0.0.2", port, "/api/items", method="POST", context=web).status == 403
    assert request("127.0.0.2", port, "/other", context=web).status == 403  # anchored at the start
    assert request("127.0.0.2", port, "/x/api/items", context=web).status == 403
    assert request("127.0.0.2", port, "/anything", method="DELETE", context=payments).status == 200
    assert request("127.0.0.2", port, "/api/items", context=stranger).status == 403
    assert app.requests == 2


def test_deny_mode_checks_every_request_of_a_kept_alive_connection(
        proxies: Proxies, root: Authority, certs: Path, port: int, app: App) -> None:
    read = route("read", ["GET"], "/api/.*", headers={"x-team": "^blue$"})
    _inbound(proxies, root, certs, port, [inbound_port(port, sources=[Grant(WEB, (read,))])])
    conn = http.client.HTTPSConnection("127.0.0.2", port, timeout=10, context=_as(root, certs, WEB))
    assert send(conn, "/api/a", headers={"x-team": "blue"}).status == 200
    assert send(conn, "/api/a", headers={"x-team": "red"}).status == 403
    assert send(conn, "/api/a").status == 403
    assert send(conn, "/api/b", headers={"x-team": "blue"}).status == 200
    conn.close()


def test_deny_mode_on_a_tcp_port_admits_only_sources_with_a_grant(
        proxies: Proxies, root: Authority, certs: Path, port: int) -> None:
    echo = TcpEcho("127.0.0.1", port)
    try:
        _inbound(proxies, root, certs, port, [inbound_port(port, "tcp", sources=[Grant(WEB, None)])])
        assert _echo(port, _as(root, certs, WEB), b"ping") == b"ping"
        assert _echo(port, _as(root, certs, STRANGER), b"ping") == b""
    finally:
        echo.close()


def _echo(port: int, context: ssl.SSLContext | None, data: bytes) -> bytes:
    sock = socket.create_connection(("127.0.0.2", port), timeout=10)
    try:
        s = context.wrap_socket(sock) if context is not None else sock
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got
    except (ssl.SSLError, ConnectionResetError):
        return b""
    finally:
        sock.close()


def test_permissive_mode_takes_plain_text_and_mesh_tls_and_passes_other_tls_to_the_application(
        proxies: Proxies, root: Authority, certs: Path, port: int, app: App) -> None:
    _inbound(proxies, root, certs, port, [inbound_port(port, allow_all=True)], mtls="permissive", access="allow")
    plain = request("127.0.0.2", port, "/plain")
    assert plain.status == 200 and "x-meshloom-client-id" not in plain.body["headers"]
    mesh = request("127.0.0.2", port, "/mesh", context=_as(root, certs, WEB))
    assert mesh.status == 200 and mesh.body["headers"]["x-meshloom-client-id"] == WEB
    # a mesh client without an SVID is refused: mesh TLS is verified as in strict mode
    assert refused("127.0.0.2", port, context=client_context(None, bundle(root))) is not None

    # TLS that is not the mesh's (no `meshloom` ALPN) reaches the application untouched: its port now serves TLS
    app.close()
    own = Authority.root("the application's own CA")
    app_cert = make_svid(own, sid("shop", "app"), certs / "own", dns="app.example")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(app_cert.cert_file, app_cert.key_file)
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(10)

    def serve() -> None:
        accepted, _ = listener.accept()
        with server_ctx.wrap_socket(accepted, server_side=True) as s:
            s.sendall(s.recv(100).upper())

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        client_ctx = ssl.create_default_context(cadata=bundle(own).decode())
        client_ctx.check_hostname = False
        with client_ctx.wrap_socket(socket.create_connection(("127.0.0.2", port), timeout=10)) as tls:
            tls.sendall(b"own tls")
            assert tls.recv(100) == b"OWN TLS"
    finally:
        server.join(timeout=10)
        listener.close()


def test_permissive_mode_in_deny_mode_refuses_plain_text_which_has_no_identity(
        proxies: Proxies, root: Authority, certs: Path, port: int, app: App) -> None:
    _inbound(proxies, root, certs, port, [inbound_port(port, sources=[Grant(WEB, None)])], mtls="permissive")
    assert request("127.0.0.2", port).status == 403
    assert request("127.0.0.2", port, context=_as(root, certs, WEB)).status == 200


class _OwnTlsApp(App):
    """The application serving HTTPS itself, under a certificate of its own CA (not the mesh's)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        self.context = context
        super().__init__("own-tls", host, port)

    def get_request(self) -> tuple[Any, Any]:
        conn, address = super().get_request()
        conn.settimeout(10)
        return self.context.wrap_socket(conn, server_side=True), address


def _own_tls(certs: Path, port: int) -> tuple[_OwnTlsApp, ssl.SSLContext]:
    """The application with its own TLS, and a client outside the mesh: trusts that CA, no certificate, no
    `meshloom` ALPN."""
    own = Authority.root("the application's own CA")
    cert = make_svid(own, sid("shop", "app"), certs / "own", dns="app.example")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert.cert_file, cert.key_file)
    return _OwnTlsApp("127.0.0.1", port, server_ctx), client_context(None, bundle(own), alpn=("http/1.1",))


def test_permissive_mode_in_deny_mode_refuses_tls_that_is_not_the_meshs_rather_than_pass_it_to_the_application(
        proxies: Proxies, root: Authority, certs: Path, port: int) -> None:
    app, outsider = _own_tls(certs, port)
    try:
        _inbound(proxies, root, certs, port, [inbound_port(port, sources=[Grant(WEB, None)])], mtls="permissive")
        assert refused("127.0.0.2", port, context=outsider) is not None
        assert app.requests == 0  # it never reached the application, whose TLS would have skipped every rule
    finally:
        app.close()


def test_permissive_mode_in_allow_mode_still_passes_the_applications_own_tls_through(
        proxies: Proxies, root: Authority, certs: Path, port: int) -> None:
    app, outsider = _own_tls(certs, port)
    try:
        _inbound(proxies, root, certs, port, [inbound_port(port, allow_all=True)], mtls="permissive", access="allow")
        answer = request("127.0.0.2", port, "/own", context=outsider)
        assert answer.status == 200 and answer.body["app"] == "own-tls" and app.requests == 1
    finally:
        app.close()


def test_mtls_off_serves_plain_text_and_still_accepts_a_peer_that_speaks_mesh_tls(
        proxies: Proxies, root: Authority, certs: Path, port: int, app: App) -> None:
    _inbound(proxies, root, certs, port, [inbound_port(port, allow_all=True)], mtls="off", access="allow")
    assert request("127.0.0.2", port).status == 200
    assert request("127.0.0.2", port, context=_as(root, certs, WEB)).body["headers"]["x-meshloom-client-id"] == WEB


def test_a_rate_limit_answers_503_beyond_rate_plus_burst_and_counts_each_source_apart(
        proxies: Proxies, root: Authority, certs: Path, port: int, app: App) -> None:
    limits = [rate_limit("per-source", "6r/m", burst=1, sources=[WEB, PAYMENTS]),  # 7 per 2 minutes each
              rate_limit("default", "2r/m")]  # everyone else, together
    _inbound(proxies, root, certs, port, [inbound_port(port, allow_all=True, rate_limits=limits)],
             access="allow")
    web, payments, x, y = (_as(root, certs, s) for s in (WEB, PAYMENTS, STRANGER, sid("shop", "y")))
    assert [request("127.0.0.2", port, context=web).status for _ in range(8)] == [200] * 7 + [503]
    assert request("127.0.0.2", port, context=payments).status == 200  # its own counter
    assert [request("127.0.0.2", port, context=c).status for c in (x, y, x)] == [200, 200, 503]


def test_a_rate_limit_with_routes_counts_only_the_matching_requests(
        proxies: Proxies, root: Authority, certs: Path, port: int, app: App) -> None:
    writes = rate_limit("writes", "1r/m", routes=[route("write", ["POST"], "/api/")])
    _inbound(proxies, root, certs, port, [inbound_port(port, allow_all=True, rate_limits=[writes])],
             access="allow")
    web = _as(root, certs, WEB)
    assert [request("127.0.0.2", port, "/api/x", context=web).status for _ in range(3)] == [200] * 3
    assert [request("127.0.0.2", port, "/api/x", method="POST", context=web).status
            for _ in range(2)] == [200, 503]


def test_a_request_body_over_the_client_max_body_size_gets_413(
        proxies: Proxies, root: Authority, certs: Path, port: int, app: App) -> None:
    _inbound(proxies, root, certs, port, [inbound_port(port, allow_all=True)], access="allow", body="1k")
    web = _as(root, certs, WEB)
    assert request("127.0.0.2", port, method="POST", body=b"x" * 1024, context=web).status == 200
    assert request("127.0.0.2", port, method="POST", body=b"x" * 1025, context=web).status == 413


# -------------------------------------------------------------------------------------------------- outbound ---
def _start_client(proxies: Proxies, root: Authority, certs: Path, services: list[OutboundService],
                  **kw: Any) -> tuple[Proxy, ProxyPorts]:
    """A client sidecar whose outbound side binds 127.0.0.1:Q, Q being the first Service's first port; the Services
    have the address 127.0.0.1, so `dst` is their address as it would be after a REDIRECT."""
    svid = make_svid(root, WEB, certs / "client")
    q = services[0].ports[0].port
    ports = outbound_ports(q)
    doc = document(shards=[shard("shop", *services)], access="allow", spiffe_id=WEB, me="shop/web-1", **kw)
    proxy, _ = proxies.start(doc, [shard("shop", *services)], svid, bundle(root), ports)
    return proxy, ports


def test_the_outbound_side_reaches_a_peer_sidecar_with_mutual_tls_and_pins_its_service_account(
        proxies: Proxies, root: Authority, certs: Path, port: int, app: App) -> None:
    _inbound(proxies, root, certs, port, [inbound_port(port, allow_all=True)], access="allow")
    q = free_port()
    good = service("api", "127.0.0.1", [("http", q, "http", [endpoint("127.0.0.2", port, SERVER)])])
    _start_client(proxies, root, certs, [good])
    answer = request("127.0.0.1", q, "/through")
    assert answer.status == 200 and answer.body["path"] == "/through"
    assert answer.body["headers"]["x-meshloom-client-id"] == WEB

    q2 = free_port()
    wrong = service("api", "127.0.0.1", [("http", q2, "http", [endpoint("127.0.0.2", port, STRANGER)])])
    _start_client(proxies, root, certs, [wrong])
    assert request("127.0.0.1", q2).status == 503  # the peer's SVID is not the endpoint's identity
    assert app.requests == 1


def test_a_traffic_split_with_matches_sends_matching_requests_to_its_backends_one_request_at_a_time(
        proxies: Proxies, root: Authority, certs: Path) -> None:
    p1, p2, q = free_port(), free_port(), free_port()
    v1, v2 = App("v1", "127.0.0.1", p1), App("v2", "127.0.0.1", p2)
    try:
        canary = route("canary", headers={"x-canary": "^true$"})
        api = service("api", "127.0.0.1", [("http", q, "http", [endpoint("127.0.0.1", p1)])],
                      split=split("shop/canary", [("api-v1", 0, {q: [endpoint("127.0.0.1", p1)]}),
                                                  ("api-v2", 5, {q: [endpoint("127.0.0.1", p2)]})], [canary]))
        _start_client(proxies, root, certs, [api])
        conn = http.client.HTTPConnection("127.0.0.1", q, timeout=10)
        got = [send(conn, headers=h).body["app"] for h in ({}, {"x-canary": "true"}, {}, {"x-canary": "yes"},
                                                            {"x-canary": "true"})]
        conn.close()
        assert got == ["v1", "v2", "v1", "v1", "v2"]
    finally:
        v1.close()
        v2.close()


def test_a_traffic_split_without_matches_spreads_requests_by_weight(
        proxies: Proxies, root: Authority, certs: Path) -> None:
    p1, p2, q = free_port(), free_port(), free_port()
    v1, v2 = App("v1", "127.0.0.1", p1), App("v2", "127.0.0.1", p2)
    try:
        api = service("api", "127.0.0.1", [("http", q, "http", [endpoint("127.0.0.1", p1)])],
                      split=split("shop/half", [("api-v1", 1, {q: [endpoint("127.0.0.1", p1)]}),
                                                ("api-v2", 1, {q: [endpoint("127.0.0.1", p2)]})]))
        _start_client(proxies, root, certs, [api])
        seen = {request("127.0.0.1", q).body["app"] for _ in range(40)}  # 2 * 2**-40 to miss one
        assert seen == {"v1", "v2"}
    finally:
        v1.close()
        v2.close()


def test_a_circuit_breaker_takes_a_failing_server_out_and_sends_traffic_to_the_fallback(
        proxies: Proxies, root: Authority, certs: Path) -> None:
    p1, pf, q = free_port(), free_port(), free_port()
    web, fallback = App("web", "127.0.0.1", p1), App("fallback", "127.0.0.1", pf)
    try:
        svc = service("web", "127.0.0.1", [("http", q, "http", [endpoint("127.0.0.1", p1)])],
                      breaker=breaker(2, 60, ("shop/fallback", 80, [endpoint("127.0.0.1", pf)])))
        proxy, _ = _start_client(proxies, root, certs, [svc])
        assert request("127.0.0.1", q, "/ok").body["app"] == "web"
        assert [request("127.0.0.1", q, "/fail").status for _ in range(2)] == [500, 500]
        assert request("127.0.0.1", q, "/ok").body["app"] == "fallback"
        rows = {(r["pxname"], r["svname"]): r for r in proxy.stats()}
        server = next(k for k in rows if k[0] == f"http:shop.web:{q}" and rows[k]["addr"] == f"127.0.0.1:{p1}")
        assert rows[server]["status"].startswith("DOWN")
    finally:
        web.close()
        fallback.close()


def test_a_tcp_service_port_is_proxied_at_layer_4(proxies: Proxies, root: Authority, certs: Path) -> None:
    p, q = free_port(), free_port()
    echo = TcpEcho("127.0.0.1", p)
    try:
        _start_client(proxies, root, certs, [service("db", "127.0.0.1", [("tcp", q, "tcp",
                                                                          [endpoint("127.0.0.1", p)])])])
        with socket.create_connection(("127.0.0.1", q), timeout=10) as s:
            s.sendall(b"not http at all\r\n\r\n")
            assert s.recv(100) == b"not http at all\r\n\r\n"
    finally:
        echo.close()


def test_the_metrics_port_serves_prometheus_metrics_per_destination_service(
        proxies: Proxies, root: Authority, certs: Path) -> None:
    p, q = free_port(), free_port()
    app = App("api", "127.0.0.1", p)
    try:
        _, ports = _start_client(proxies, root, certs, [service("api", "127.0.0.1", [("http", q, "http",
                                                                                     [endpoint("127.0.0.1", p)])])])
        assert request("127.0.0.1", q).status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.metrics}/metrics", timeout=10) as r:  # noqa: S310
            text = r.read().decode()
        assert f'haproxy_backend_http_responses_total{{proxy="http:shop.api:{q}",code="2xx"}} 1' in text
    finally:
        app.close()


def test_a_grpc_port_carries_http2_from_the_client_through_both_sidecars_to_the_application(
        proxies: Proxies, root: Authority, certs: Path, port: int) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl (with HTTP/2) is not installed")
    with run_dir() as directory:
        # the application: an HTTP/2 (prior knowledge) server that says which HTTP version it was spoken to in
        cfg = Path(directory) / "app.cfg"
        cfg.write_text(f"""defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend app
    bind 127.0.0.1:{port} proto h2
    http-request set-var(txn.id) req.hdr(x-meshloom-client-id)
    http-request return status 200 content-type text/plain lf-string "version=%[req.ver] id=%[var(txn.id)]"
""")
        app = subprocess.Popen([find_haproxy(), "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _inbound(proxies, root, certs, port, [inbound_port(port, "grpc", allow_all=True)], access="allow")
            q = free_port()
            _start_client(proxies, root, certs, [service("api", "127.0.0.1", [
                ("grpc", q, "grpc", [endpoint("127.0.0.2", port, SERVER)])])])
            out = subprocess.run([curl, "-sS", "--http2-prior-knowledge", f"http://127.0.0.1:{q}/pkg.Svc/Method",
                                  "-w", " client=%{http_version}"], capture_output=True, text=True, timeout=30,
                                 check=False)
            assert out.stdout == f"version=2.0 id={WEB} client=2", out.stderr
        finally:
            app.terminate()
            app.wait(timeout=10)
