"""The webhook's HTTPS server, for real on 127.0.0.1 with a certificate from the mesh CA: reviews answered,
malformed requests answered with errors (never a crash, never a hang), and certificates swapped while it serves."""

from __future__ import annotations

import base64
import http.client
import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from actions.ca import CaSettings, MeshCa, pem
from actions.clock import SystemClock
from actions.errors import PermanentError
from actions.webhook import Served, WebhookServer
from catalog.inject import InjectionValues, admission_response, apply_patch, inject
from tests.support.wait import eventually as wait_until

GOLDEN_VALUES = Path(__file__).resolve().parents[1] / "catalog" / "golden" / "inject" / "values.yaml"
VALUES = InjectionValues.from_values(yaml.safe_load(GOLDEN_VALUES.read_text()))
NAMES = ("meshloom-controller.meshloom.svc", "localhost")
ENABLED = {"injector.nsm.nginx.com/auto-inject": "enabled"}


class Pki:
    """A mesh CA in a folder, and the webhook's serving certificate from it (as the controller gets it)."""

    def __init__(self, folder: Path) -> None:
        self.ca = MeshCa(folder, CaSettings(), SystemClock())
        self.ca.generate("1", 3600.0)

    def serving(self) -> tuple[bytes, bytes]:
        issued = self.ca.sign_svid("spiffe://example.org/ns/meshloom/sa/meshloom-controller", NAMES, 600.0)
        key = issued.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption())
        return pem((issued.certificate, *issued.chain)), key

    def client(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=pem(self.ca.trust_anchors(("1",))).decode())
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "ca")


def review(obj: Any, uid: str = "uid-1") -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"}, "namespace": "shop",
        "operation": "CREATE", "object": obj}}


POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "shop"},
       "spec": {"containers": [{"name": "web", "image": "nginx"}]}}


@pytest.fixture
def served() -> list[Served]:
    return []


@pytest.fixture
def server(pki: Pki, served: list[Served]) -> Iterator[WebhookServer]:
    cert, key = pki.serving()
    handler = partial(admission_response, values=VALUES, namespace_labels={"shop": ENABLED})
    with WebhookServer(handler, cert, key, port=0, io_timeout=5.0, on_request=served.append) as running:
        yield running


def connect(server: WebhookServer, ctx: ssl.SSLContext) -> http.client.HTTPSConnection:
    # The certificate names `localhost`; the connection goes to 127.0.0.1 all the same.
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=10)
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10),
                                server_hostname="localhost")
    return conn


def post(conn: http.client.HTTPSConnection, body: bytes, path: str = "/inject",
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    return response.status, json.loads(data) if data.startswith(b"{") else data


# ------------------------------------------------------------------------------------------------ reviews ---
def test_a_valid_review_is_answered_with_the_patch_that_injects_the_pod(server: WebhookServer, pki: Pki,
                                                                         served: list[Served]) -> None:
    status, answer = post(connect(server, pki.client()), json.dumps(review(POD)).encode())
    assert status == 200
    response = answer["response"]
    assert response["uid"] == "uid-1" and response["allowed"] is True and response["patchType"] == "JSONPatch"
    assert apply_patch(POD, json.loads(base64.b64decode(response["patch"]))) == inject(POD, VALUES)
    assert served[-1].status == 200 and served[-1].path == "/inject" and served[-1].seconds > 0


def test_one_connection_carries_many_reviews(server: WebhookServer, pki: Pki) -> None:
    conn = connect(server, pki.client())
    for i in range(5):
        status, answer = post(conn, json.dumps(review(POD, uid=f"uid-{i}")).encode())
        assert status == 200 and answer["response"]["uid"] == f"uid-{i}"


# ------------------------------------------------------------------------------------------ bad requests ---
@pytest.mark.parametrize(("body", "status", "message"), [
    (b"this is not json", 400, "body: not JSON"),
    (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}', 400,
     "request.uid: must be a non-empty string"),
    (b'{"apiVersion": "v1", "kind": "Pod"}', 400, "apiVersion/kind: must be admission.k8s.io/v1 AdmissionReview"),
    (b"[1, 2, 3]", 400, "the body must be a JSON object"),
    (b"[" * 100_000, 400, "body: not JSON"),
])
def test_a_review_that_cannot_be_answered_gets_a_400_naming_the_problem(server: WebhookServer, pki: Pki,
                                                                         body: bytes, status: int,
                                                                         message: str) -> None:
    conn = connect(server, pki.client())
    got, answer = post(conn, body)
    assert got == status
    assert answer["kind"] == "Status" and answer["code"] == status and message in answer["message"]
    got, _ = post(conn, json.dumps(review(POD)).encode())  # the connection, and the server, carry on
    assert got == 200


def test_a_review_of_a_malformed_pod_is_refused_with_the_field_named(server: WebhookServer, pki: Pki) -> None:
    status, answer = post(connect(server, pki.client()), json.dumps(review({"spec": {}}, uid="u-9")).encode())
    assert status == 200
    assert answer["response"] == {"uid": "u-9", "allowed": False, "status": {
        "code": 400, "message": "request.object.spec.containers: must be a list"}}


@pytest.mark.parametrize(("method", "path", "headers", "status"), [
    ("GET", "/inject", {}, 405),
    ("GET", "/elsewhere", {}, 404),
    ("POST", "/elsewhere", {"Content-Length": "2"}, 404),
    ("POST", "/inject", {"Content-Length": "100000000"}, 413),
    ("POST", "/inject", {"Content-Length": "-3"}, 400),
    ("POST", "/inject", {}, 411),
])
def test_other_requests_get_an_http_error(server: WebhookServer, pki: Pki, method: str, path: str,
                                          headers: dict[str, str], status: int) -> None:
    conn = connect(server, pki.client())
    conn.putrequest(method, path, skip_accept_encoding=True)
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == status and body["code"] == status and body["message"]


def test_health_is_served(server: WebhookServer, pki: Pki) -> None:
    conn = connect(server, pki.client())
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b"ok"


def test_a_failing_handler_costs_one_request_not_the_server(pki: Pki) -> None:
    calls: list[int] = []

    def handler(body: Any) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return admission_response(body, VALUES, {"shop": ENABLED})

    cert, key = pki.serving()
    with WebhookServer(handler, cert, key, port=0) as server:
        conn = connect(server, pki.client())
        assert post(conn, json.dumps(review(POD)).encode())[0] == 500
        assert post(conn, json.dumps(review(POD)).encode())[0] == 200


def test_a_silent_client_blocks_nobody_and_is_dropped_after_the_timeout(pki: Pki) -> None:
    cert, key = pki.serving()
    handler = partial(admission_response, values=VALUES, namespace_labels={})
    with WebhookServer(handler, cert, key, port=0, io_timeout=0.5) as server:
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            status, _ = post(connect(server, pki.client()), json.dumps(review(POD)).encode())
            assert status == 200
            assert silent.recv(1) == b""  # the server hung up on it (recv waits at most the socket's 10 s)
        finally:
            silent.close()


def test_connections_beyond_the_cap_are_closed_at_once_and_served_again_once_others_end(pki: Pki) -> None:
    cert, key = pki.serving()
    handler = partial(admission_response, values=VALUES, namespace_labels={"shop": ENABLED})
    # An hour of both timeouts: only the cap can make the server let go of the third connection.
    with WebhookServer(handler, cert, key, port=0, io_timeout=3600.0, request_deadline=3600.0,
                       max_connections=2) as server:
        stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
        try:
            wait_until(lambda: server.connections == 2, "both stalled connections being served")
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as third:
                assert third.recv(1) == b""  # hung up on, not queued (a queued one would time out after 10 s)
            assert server.refused == 1 and server.connections == 2
        finally:
            for sock in stalled:
                sock.close()
        wait_until(lambda: server.connections == 0, "the stalled connections ending")
        status, answer = post(connect(server, pki.client()), json.dumps(review(POD)).encode())
        assert status == 200 and answer["response"]["allowed"] is True


def trickle(sock: ssl.SSLSocket, data: bytes, bound: float = 30.0) -> None:
    """Send `data` a byte at a time, 50 ms apart, until the server answers or hangs up (within `bound` s)."""
    ends = time.monotonic() + bound
    for byte in data:
        assert time.monotonic() < ends, f"the server still waits after {bound} s of trickling"
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # it hung up
            return
        if select.select([sock], [], [], 0.05)[0]:  # it answered, or hung up: the wait between two bytes
            return
    pytest.fail(f"all {len(data)} bytes sent and no answer")


def test_a_body_trickled_past_the_request_deadline_is_cut_off_with_a_408(pki: Pki, served: list[Served]) -> None:
    cert, key = pki.serving()
    handler = partial(admission_response, values=VALUES, namespace_labels={})
    # Each byte comes well within io_timeout: only the request's deadline, counted as a whole, can end this.
    with WebhookServer(handler, cert, key, port=0, io_timeout=3600.0, request_deadline=0.5,
                       on_request=served.append) as server:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        with pki.client().wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"POST /inject HTTP/1.1\r\nHost: webhook\r\nContent-Length: 8000000\r\n\r\n")
            trickle(tls, b"{" * 100_000)
            response = http.client.HTTPResponse(tls)
            response.begin()
            body = json.loads(response.read())
            assert response.status == 408 and body["code"] == 408
            assert "of 8000000 bytes arrived within 0.5 s" in body["message"]
            assert response.getheader("Connection") == "close"
            assert tls.recv(1) == b""
        assert served[-1].status == 408
        status, _ = post(connect(server, pki.client()), json.dumps(review(POD)).encode())  # the server carries on
        assert status == 200


def test_headers_trickled_past_the_request_deadline_end_the_connection(pki: Pki) -> None:
    cert, key = pki.serving()
    handler = partial(admission_response, values=VALUES, namespace_labels={})
    with WebhookServer(handler, cert, key, port=0, io_timeout=3600.0, request_deadline=0.5) as server:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        with pki.client().wrap_socket(raw, server_hostname="localhost") as tls:
            trickle(tls, b"POST /inject HTTP/1.1\r\n" + b"X-Slow: a\r\n" * 10_000)
            try:
                assert tls.recv(1) == b""
            except (ConnectionResetError, ssl.SSLError):  # a byte the server never read: a reset
                pass
        wait_until(lambda: server.connections == 0, "the trickling connection being let go")


def test_stop_ends_open_connections_at_once(pki: Pki) -> None:
    cert, key = pki.serving()
    # An hour of io_timeout: a stop that waited for idle connections to time out would not end within the bound.
    server = WebhookServer(partial(admission_response, values=VALUES, namespace_labels={}), cert, key, port=0,
                           io_timeout=3600.0)
    server.start()
    conn = connect(server, pki.client())
    assert post(conn, json.dumps(review(POD)).encode())[0] == 200
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(timeout=20)
    assert not stopper.is_alive()
    with pytest.raises((OSError, http.client.HTTPException)):
        post(conn, json.dumps(review(POD)).encode())


def test_a_port_in_use_is_one_line(server: WebhookServer, pki: Pki) -> None:
    cert, key = pki.serving()
    other = WebhookServer(lambda body: {}, cert, key, port=server.port)
    with pytest.raises(PermanentError, match=rf"webhook: cannot listen on 127\.0\.0\.1:{server.port}: "):
        other.start()


# ------------------------------------------------------------------------------------------- certificates ---
def handshake(server: WebhookServer, ctx: ssl.SSLContext) -> Callable[[], None]:
    def go() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost"):
            pass
    return go


def test_a_new_certificate_is_served_to_new_connections_while_open_ones_finish(server: WebhookServer, pki: Pki,
                                                                                tmp_path: Path) -> None:
    old_client = pki.client()
    before = connect(server, old_client)
    assert post(before, json.dumps(review(POD)).encode())[0] == 200

    other = Pki(tmp_path / "other-ca")  # a rotation to a new root, so that the old one cannot verify the new leaf
    server.set_certificate(*other.serving())

    handshake(server, other.client())()
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, old_client)()
    assert post(before, json.dumps(review(POD)).encode())[0] == 200  # the open connection keeps its session
    status, _ = post(connect(server, other.client()), json.dumps(review(POD)).encode())
    assert status == 200


def test_an_unusable_certificate_is_refused_and_the_old_one_stays(server: WebhookServer, pki: Pki) -> None:
    cert, _ = pki.serving()
    _, other_key = pki.serving()
    with pytest.raises(PermanentError, match="webhook certificate: cannot be used"):
        server.set_certificate(cert, other_key)  # a key that is not the certificate's
    with pytest.raises(PermanentError, match="webhook certificate: cannot be used"):
        server.set_certificate(b"not a certificate", b"not a key")
    handshake(server, pki.client())()
