"""The real HAProxy on loopback: mutual TLS on the inbound side, the client's SPIFFE ID, certificate rotation without
a reload, and the two pitfalls of TESTBED.md (a leaf without DNS SAN or CN, TLS session resumption)."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from actions.ca import CaSettings, Issued, MeshCa, pem, svid_spiffe_id
from actions.clock import SystemClock
from sidecar.proxy import Proxy
from sidecar.runtime import RuntimeApi, RuntimeApiError
from tests.sidecar.support import (
    App,
    Proxies,
    Svid,
    bare_svid,
    bundle,
    client_context,
    custom_svid,
    document,
    free_port,
    inbound_port,
    inbound_ports,
    make_svid,
    refused,
    request,
    send,
    sid,
)
from tests.support.pki import Authority, Leaf
from tests.support.wait import eventually as wait_for

pytestmark = pytest.mark.integration

SERVER = sid("shop", "app")
CLIENT = sid("shop", "web")


@pytest.fixture
def app_port() -> Iterator[int]:
    yield free_port("127.0.0.1", "127.0.0.2")


@pytest.fixture
def app(app_port: int) -> Iterator[App]:
    """The application on 127.0.0.1:app_port, its sidecar's inbound side being 127.0.0.2:app_port."""
    application = App("app", "127.0.0.1", app_port)
    yield application
    application.close()


def _strict(proxies: Proxies, root: Authority, certs: Path, port: int) -> tuple[Svid, Proxy]:
    """An application on 127.0.0.1:port behind a strict sidecar whose inbound side is 127.0.0.2:port, allow mode."""
    svid = make_svid(root, SERVER, certs)
    doc = document(inbound=[inbound_port(port, allow_all=True)], mtls="strict", access="allow")
    proxy, _ = proxies.start(doc, [], svid, bundle(root), inbound_ports(port))
    return svid, proxy


def test_strict_mode_serves_a_client_with_an_svid_and_hands_its_spiffe_id_to_the_application(
        proxies: Proxies, root: Authority, certs: Path, app_port: int, app: App) -> None:
    _strict(proxies, root, certs, app_port)
    client = make_svid(root, CLIENT, certs)
    answer = request("127.0.0.2", app_port, "/hello", context=client_context(client, bundle(root)),
                     headers={"x-meshloom-client-id": "spiffe://example.org/ns/shop/sa/forged"})
    assert answer.status == 200
    assert answer.body["headers"]["x-meshloom-client-id"] == CLIENT  # the forged header was replaced
    assert answer.body["peer"] == "127.0.0.1" and answer.body["port"] == app_port


def test_strict_mode_refuses_a_plain_client_and_a_tls_client_without_a_certificate(
        proxies: Proxies, root: Authority, certs: Path, app_port: int, app: App) -> None:
    _strict(proxies, root, certs, app_port)
    assert refused("127.0.0.2", app_port) is not None
    assert refused("127.0.0.2", app_port, context=client_context(None, bundle(root))) is not None
    other = Authority.root("another mesh")
    stranger = make_svid(other, CLIENT, certs / "other")
    assert refused("127.0.0.2", app_port, context=client_context(stranger, bundle(root))) is not None
    assert app.requests == 0


def test_the_lua_fetch_reads_the_spiffe_id_of_an_svid_signed_by_the_mesh_ca(
        proxies: Proxies, tmp_path: Path, app_port: int, app: App) -> None:
    ca = MeshCa(tmp_path / "ca", CaSettings(), SystemClock())
    ca.generate("g1", timedelta(days=1).total_seconds())
    roots = pem(ca.trust_anchors(("g1",)))
    server_issued = ca.sign_svid(SERVER, ("app.shop.sa", "app-1.shop.pod"), 3600)
    client_issued = ca.sign_svid(CLIENT, ("web.shop.sa", "web-1.shop.pod"), 3600)
    folder = tmp_path / "svids"
    server = _issued_files(server_issued, folder, "server")
    client = _issued_files(client_issued, folder, "client")
    doc = document(inbound=[inbound_port(app_port, allow_all=True)], mtls="strict", access="allow")
    proxies.start(doc, [], server, roots, inbound_ports(app_port))
    answer = request("127.0.0.2", app_port, context=client_context(client, roots))
    assert answer.body["headers"]["x-meshloom-client-id"] == CLIENT


def _issued_files(issued: Issued, folder: Path, name: str) -> Svid:
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / f"{name}.crt", folder / f"{name}.key"
    cert_file.write_bytes(pem((issued.certificate, *issued.chain)))
    key_file.write_bytes(issued.private_key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in (issued.certificate, *issued.chain))
    assert isinstance(issued.private_key, ec.EllipticCurvePrivateKey)  # the mesh's default key type
    leaf = Leaf(issued.certificate, issued.private_key, chain)
    return Svid(svid_spiffe_id(issued.certificate), leaf, cert_file, key_file)


@pytest.mark.parametrize("uris", [
    [CLIENT, sid("shop", "other")],  # an X.509-SVID has exactly one URI SAN: two are no identity at all
    [],
    ["https://example.org/not-spiffe"],
])
def test_a_client_certificate_without_exactly_one_spiffe_uri_gets_no_identity(
        proxies: Proxies, root: Authority, certs: Path, app_port: int, app: App, uris: list[str]) -> None:
    _strict(proxies, root, certs, app_port)
    odd = custom_svid(root, certs / "odd", uris, dns=["web.shop.sa"])
    answer = request("127.0.0.2", app_port, context=client_context(odd, bundle(root)))
    assert answer.status == 200 and "x-meshloom-client-id" not in answer.body["headers"]


def _peer_serial(sock: ssl.SSLSocket) -> int:
    from cryptography import x509

    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _tls(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    return context.wrap_socket(socket.create_connection(("127.0.0.2", port), timeout=10))


def test_a_rotated_svid_is_served_to_new_connections_by_the_same_process_while_an_old_connection_stays_open(
        proxies: Proxies, root: Authority, certs: Path, app_port: int, app: App) -> None:
    first, proxy = _strict(proxies, root, certs, app_port)
    client_ctx = client_context(make_svid(root, CLIENT, certs), bundle(root))
    old = http.client.HTTPSConnection("127.0.0.2", app_port, timeout=10, context=client_ctx)
    assert send(old, "/before").status == 200
    assert old.sock is not None
    assert _peer_serial(old.sock) == first.serial
    master, workers = proxy.pid, proxy.worker_pids()

    second = make_svid(root, SERVER, certs)
    proxy.update_svid(second.pem, bundle(root))

    with _tls(app_port, client_ctx) as fresh:
        assert _peer_serial(fresh) == second.serial
    assert send(old, "/after").status == 200  # the old connection survived, on its old session
    assert _peer_serial(old.sock) == first.serial
    assert (proxy.pid, proxy.worker_pids()) == (master, workers)
    assert int(proxy.runtime.ssl_cert_serial(proxy.paths.cert), 16) == second.serial
    assert Path(proxy.paths.cert).read_bytes() == second.pem  # a later reload keeps the new SVID
    old.close()


def test_a_trust_bundle_rotation_through_a_second_root_needs_no_reload(
        proxies: Proxies, root: Authority, certs: Path, app_port: int, app: App) -> None:
    _, proxy = _strict(proxies, root, certs, app_port)
    pid = proxy.pid
    new_root = Authority.root("next root")
    old_client = make_svid(root, CLIENT, certs / "old")
    new_client = make_svid(new_root, CLIENT, certs / "new")
    both = bundle(root, new_root)

    # prepare: both roots trusted, the proxy still on its old-root SVID
    proxy.update_svid(make_svid(root, SERVER, certs / "s1").pem, both)
    assert request("127.0.0.2", app_port, context=client_context(new_client, both)).status == 200
    assert request("127.0.0.2", app_port, context=client_context(old_client, both)).status == 200
    # retire: only the new root, the proxy on a new-root SVID
    proxy.update_svid(make_svid(new_root, SERVER, certs / "s2").pem, bundle(new_root))
    assert request("127.0.0.2", app_port, context=client_context(new_client, bundle(new_root))).status == 200
    assert refused("127.0.0.2", app_port, context=client_context(old_client, both)) is not None
    assert proxy.pid == pid


def test_the_fail_closed_rule_refuses_clients_without_a_certificate_after_a_leaf_without_dns_san_or_cn(
        proxies: Proxies, root: Authority, certs: Path, app_port: int, app: App) -> None:
    """TESTBED.md: `commit ssl cert` of such a leaf silently turns `verify required` off on the bind."""
    _, proxy = _strict(proxies, root, certs, app_port)
    proxy.update_svid(bare_svid(root, SERVER, certs / "bare").pem, bundle(root))

    # The bind no longer asks for client certificates; the rule closes every connection instead of serving
    # clients it cannot identify: fail closed, for clients with an SVID too.
    client = make_svid(root, CLIENT, certs)
    assert refused("127.0.0.2", app_port, context=client_context(None, bundle(root))) is not None
    assert refused("127.0.0.2", app_port) is not None
    assert refused("127.0.0.2", app_port, context=client_context(client, bundle(root))) is not None
    assert app.requests == 0
    # a proper SVID restores service
    proxy.update_svid(make_svid(root, SERVER, certs / "good").pem, bundle(root))
    assert request("127.0.0.2", app_port, context=client_context(client, bundle(root))).status == 200
    assert refused("127.0.0.2", app_port, context=client_context(None, bundle(root))) is not None


def test_the_hole_the_fail_closed_rule_covers_is_real_here(root: Authority, certs: Path, app_port: int,
                                                             tmp_path: Path) -> None:
    """Without the rule, the same rotation lets a client without a certificate through: the rule is not dead code."""
    import subprocess

    from sidecar.proxy import find_haproxy
    from tests.sidecar.support import run_dir

    app = App("app", "127.0.0.1", app_port)
    with run_dir() as directory:
        svid = make_svid(root, SERVER, certs)
        Path(directory, "svid.pem").write_bytes(svid.pem)
        Path(directory, "bundle.pem").write_bytes(bundle(root))
        cfg = Path(directory, "h.cfg")
        cfg.write_text(f"""global
    stats socket {directory}/h.sock mode 600 level admin
    tune.ssl.cachesize 0
    ssl-default-bind-options no-tls-tickets
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend inbound
    bind 127.0.0.2:{app_port} ssl crt {directory}/svid.pem ca-file {directory}/bundle.pem verify required
    default_backend app
backend app
    server app 127.0.0.1:{app_port}
""")
        process = subprocess.Popen([find_haproxy(), "-W", "-S", f"{directory}/m.sock", "-f", str(cfg)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            runtime = RuntimeApi(f"{directory}/h.sock")
            wait_for(lambda: _answers(runtime), what="haproxy up")
            assert refused("127.0.0.2", app_port, context=client_context(None, bundle(root))) is not None
            runtime.update_certificate(f"{directory}/svid.pem", bare_svid(root, SERVER, certs / "bare").pem.decode())
            hole = refused("127.0.0.2", app_port, context=client_context(None, bundle(root)))
        finally:
            process.terminate()
            process.wait(timeout=10)
            app.close()
    if hole is not None:
        pytest.skip(f"this HAProxy build keeps `verify required` after the rotation ({hole}): nothing to cover")
    assert hole is None


def _answers(runtime: RuntimeApi) -> bool:
    try:
        runtime.show_info()
    except (RuntimeApiError, OSError):
        return False
    return True


def test_tls_session_resumption_is_off_so_no_session_outlives_a_trust_change(
        proxies: Proxies, root: Authority, certs: Path, app_port: int, app: App) -> None:
    _, proxy = _strict(proxies, root, certs, app_port)
    client_svid = make_svid(root, CLIENT, certs)
    new_root = Authority.root("new root")
    # TLS 1.2, where Python exposes the session to offer again; the client trusts both roots throughout
    ctx = client_context(client_svid, bundle(root, new_root))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with _tls(app_port, ctx) as first:
        session = first.session
        assert session is not None
    with ctx.wrap_socket(socket.create_connection(("127.0.0.2", app_port), timeout=10),
                         session=session) as second:
        assert not second.session_reused  # no resumption, even with the trust unchanged

    # the proxy now trusts only the new root: the client's old-root SVID must not get in on its old session
    proxy.update_svid(make_svid(new_root, SERVER, certs / "new").pem, bundle(new_root))
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        with ctx.wrap_socket(socket.create_connection(("127.0.0.2", app_port), timeout=10),
                             session=session) as third:
            third.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if not third.recv(1):
                raise ConnectionResetError("closed without an answer")
    assert app.requests == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="running HAProxy as another user needs root")
def test_the_proxy_runs_as_the_sidecar_user_and_owns_its_files(
        proxies: Proxies, root: Authority, certs: Path, app_port: int, app: App) -> None:
    svid = make_svid(root, SERVER, certs)
    doc = document(inbound=[inbound_port(app_port, allow_all=True)], mtls="strict", access="allow")
    proxy, _ = proxies.start(doc, [], svid, bundle(root), inbound_ports(app_port), uid=2102, gid=2102)
    workers = proxy.worker_pids()
    assert workers
    for pid in [proxy.pid, *workers]:
        status = Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == ["2102"] * 4
    assert os.stat(proxy.paths.cert).st_uid == 2102 and os.stat(proxy.paths.cert).st_mode & 0o077 == 0
    client = make_svid(root, CLIENT, certs)
    assert request("127.0.0.2", app_port, context=client_context(client, bundle(root))).status == 200
    proxy.update_svid(make_svid(root, SERVER, certs / "next").pem, bundle(root))
    assert os.stat(proxy.paths.cert).st_uid == 2102
