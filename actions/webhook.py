"""The admission webhook's HTTPS server: AdmissionReview in, AdmissionReview out, with a certificate that can be
swapped while it serves.

Theory of operation
-------------------
What to answer is not decided here: the caller hands the server a `handler`, a function from the request's parsed
JSON body to the AdmissionReview to send back (for injection, `catalog.inject.admission_response` with the chart's
values and a namespace-labels lookup bound in). This module only speaks HTTPS:

    POST <path>    body read (Content-Length, at most `max_body` bytes), parsed as JSON, given to the handler;
                   200 with its answer. Not JSON, or a handler's ValueError (a review that cannot be answered, such
                   as one without request.uid): 400 with a Kubernetes Status naming the problem. Any other
                   exception of the handler: 500, logged; the server goes on. The query string is ignored (the API
                   server adds `?timeout=5s`).
    GET /healthz   200 "ok" (the controller's probes).
    anything else  404 / 405 / 411 (no Content-Length) / 413 (too large), with a Status.

Threads: `ThreadingHTTPServer`, one thread per connection. The TLS handshake runs in that thread, not in the accept
loop, so a client that connects and says nothing delays nobody else; every socket has a timeout (`io_timeout`),
so such a client, or an idle keep-alive connection, costs a thread for that long at most. HTTP/1.1 keep-alive lets
the API server reuse its connections, so a review costs no handshake once they are warm; TCP_NODELAY, because a
response is written in two pieces (headers, body) and Nagle's algorithm would hold the second one back until the
first is acknowledged (up to the peer's delayed-ACK time, tens of milliseconds). The listen backlog is large
enough for a burst of a few hundred new connections, so none waits for a SYN retransmission (a second).

The certificate: `set_certificate(cert_pem, key_pem)` builds a new `ssl.SSLContext` and swaps it in; each new
connection is wrapped with the context current when its handshake starts, so the next handshake presents the new
certificate while open connections finish with the old one. The controller calls it when the mesh CA issues the
webhook's serving certificate again (and keeps the webhook configuration's caBundle current, which is not done
here). A bad certificate or key is refused with `PermanentError`, and the old one stays.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from actions.errors import PermanentError

log = logging.getLogger("meshloom.webhook")

Handler = Callable[[Any], Mapping[str, Any]]
MAX_BODY = 8 * 1024 * 1024  # an AdmissionReview carries the object (etcd's limit is 1.5 MiB) and perhaps the old one
IO_TIMEOUT = 30.0  # seconds a connection may stay silent: handshake, headers, body, or idle between requests
BACKLOG = 1024


@dataclass(frozen=True, slots=True)
class Served:
    """One request as the server saw it: what `on_request` receives (metrics, benchmarks)."""

    method: str
    path: str
    status: int
    seconds: float  # from the request's headers read to its response written
    error: str = ""  # for a 4xx/5xx: what was wrong


def _status(code: int, message: str) -> bytes:
    """A Kubernetes Status, which is what the API server expects an error body to be."""
    return json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": message, "code": code}).encode()


def make_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server context for `cert_pem` (leaf first, then any intermediates) and `key_pem`; PermanentError if they
    cannot be loaded or do not match."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    # `load_cert_chain` reads files only: a private temporary directory (0700), gone as soon as they are loaded.
    with tempfile.TemporaryDirectory(prefix="meshloom-webhook-") as tmp:
        cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_file.write_bytes(cert_pem)
        key_file.touch(mode=0o600)
        key_file.write_bytes(key_pem)
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise PermanentError(f"webhook certificate: cannot be used ({getattr(exc, 'reason', None) or exc})") \
                from None
    return ctx


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # `stop` closes the connections itself; joining them could wait for a silent client
    request_queue_size = BACKLOG
    owner: WebhookServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        # In the connection's own thread: the handshake, then the HTTP exchange, on the context of this moment.
        owner = self.owner
        request.settimeout(owner.io_timeout)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = owner.context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: a bad handshake, a timeout
            log.debug("webhook: handshake with %s failed: %s", client_address, exc)
            return
        with owner.tracking(tls):
            try:
                _Handler(tls, client_address, self)  # its socket timeout: set above
            except OSError as exc:  # the peer went away mid-request, or `stop` shut the socket
                log.debug("webhook: connection from %s ended: %s", client_address, exc)
            finally:
                tls.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "meshloom-webhook"
    sys_version = ""
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("webhook: %s %s", self.address_string(), format % args)

    def _reply(self, code: int, body: bytes, *, content_type: str = "application/json", close: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _done(self, started: float, code: int, error: str = "") -> None:
        callback = self.server.owner.on_request
        if callback is not None:
            callback(Served(self.command, self.route, code, time.perf_counter() - started, error))

    def _fail(self, started: float, code: int, message: str, *, close: bool = False) -> None:
        self._reply(code, _status(code, message), close=close)
        self._done(started, code, message)

    @property
    def route(self) -> str:
        # The API server adds `?timeout=<the webhook's timeoutSeconds>s` to the configured path.
        return urlsplit(self.path).path

    def do_GET(self) -> None:  # http.server's naming
        started = time.perf_counter()
        if self.route == "/healthz":
            self._reply(200, b"ok", content_type="text/plain")
            self._done(started, 200)
        elif self.route == self.server.owner.path:
            self._fail(started, 405, f"{self.path}: only POST is served")
        else:
            self._fail(started, 404, f"{self.path}: not found (the webhook serves {self.server.owner.path})")

    def do_POST(self) -> None:
        started = time.perf_counter()
        owner = self.server.owner
        if self.route != owner.path:
            # The body is left unread: close rather than read it as the next request.
            self._fail(started, 404, f"{self.path}: not found (the webhook serves {owner.path})", close=True)
            return
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self._fail(started, 411, "Content-Length: is required", close=True)
            return
        try:
            length = int(raw_length)
            if length < 0:
                raise ValueError
        except ValueError:
            self._fail(started, 400, f"Content-Length: not a byte count: {raw_length[:40]!r}", close=True)
            return
        if length > owner.max_body:
            self._fail(started, 413, f"body: {length} bytes, more than the {owner.max_body} accepted", close=True)
            return
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True  # the peer closed early: nobody to answer
            return
        try:
            review = json.loads(body)
        except (ValueError, RecursionError) as exc:
            self._fail(started, 400, f"body: not JSON ({_first_line(exc)})")
            return
        try:
            answer = owner.handler(review)
        except (ValueError, RecursionError) as exc:  # a review that cannot be answered: the handler says why
            self._fail(started, 400, _first_line(exc))
            return
        except Exception:  # a bug in the handler must cost one request, not the server
            log.exception("webhook: the handler failed")
            self._fail(started, 500, "internal error in the webhook's handler")
            return
        self._reply(200, json.dumps(answer, separators=(",", ":")).encode())
        self._done(started, 200)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:500]


class WebhookServer:
    """An HTTPS server for admission reviews on `host:port` (0: any free port; see `port` once started)."""

    def __init__(self, handler: Handler, cert_pem: bytes, key_pem: bytes, *, host: str = "127.0.0.1",
                 port: int = 8443, path: str = "/inject", max_body: int = MAX_BODY, io_timeout: float = IO_TIMEOUT,
                 on_request: Callable[[Served], None] | None = None) -> None:
        self.handler = handler
        self.host = host
        self.requested_port = port
        self.path = path
        self.max_body = max_body
        self.io_timeout = io_timeout
        self.on_request = on_request
        self.context = make_context(cert_pem, key_pem)
        self._lock = threading.Lock()
        self._open: set[ssl.SSLSocket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- the certificate --------------------------------------------------------------------------------------
    def set_certificate(self, cert_pem: bytes, key_pem: bytes) -> None:
        """Serve `cert_pem` / `key_pem` from the next connection on; PermanentError (the old one stays) if unusable."""
        context = make_context(cert_pem, key_pem)
        self.context = context  # one reference assignment: each accept reads whichever is current
        log.info("webhook: serving certificate replaced")

    # -- life ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._server is not None:
            return
        try:
            server = _Server((self.host, self.requested_port), _Handler, bind_and_activate=True)
        except OSError as exc:
            raise PermanentError(f"webhook: cannot listen on {self.host}:{self.requested_port}: "
                                 f"{exc.strerror or exc}") from None
        server.owner = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="webhook-accept", daemon=True)
        self._thread.start()
        log.info("webhook: serving %s", self.url)

    def stop(self) -> None:
        """Stop accepting, then end every open connection (in-flight requests are cut short)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            open_now = list(self._open)
        for sock in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def tracking(self, sock: ssl.SSLSocket) -> _Tracked:
        return _Tracked(self, sock)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the webhook server is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}{self.path}"

    def __enter__(self) -> WebhookServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _Tracked:
    """Keeps a connection in the server's open set while it is served, so that `stop` can end it."""

    def __init__(self, owner: WebhookServer, sock: ssl.SSLSocket) -> None:
        self.owner, self.sock = owner, sock

    def __enter__(self) -> None:
        with self.owner._lock:
            self.owner._open.add(self.sock)

    def __exit__(self, *exc: object) -> None:
        with self.owner._lock:
            self.owner._open.discard(self.sock)

