"""The admission webhook's HTTPS server: AdmissionReview in, AdmissionReview out, with a certificate that can be
swapped while it serves.

Theory of operation
-------------------
What to answer is not decided here: the caller hands the server a `handler`, a function from the request's parsed
JSON body to the AdmissionReview to send back (for injection, `catalog.inject.admission_response` with the chart's
values and a namespace-labels lookup bound in). This module only speaks HTTPS:

    POST <path>    body read (Content-Length, at most `max_body` bytes, in chunks as it arrives), parsed as JSON,
                   given to the handler; 200 with its answer. Not JSON, or a handler's ValueError (a review that
                   cannot be answered, such as one without request.uid): 400 with a Kubernetes Status naming the
                   problem. Any other exception of the handler: 500, logged; the server goes on. Not all of the
                   body within the request deadline: 408, and the connection is closed. The query string is
                   ignored (the API server adds `?timeout=5s`).
    GET /healthz   200 "ok" (the controller's probes).
    anything else  404 / 405 / 411 (no Content-Length) / 413 (too large), with a Status.

Threads: `ThreadingHTTPServer`, one thread per connection, at most `max_connections` of them: a connection beyond
the cap is closed as soon as it is accepted (the API server retries, or applies the webhook's failurePolicy), so a
flood of connections costs a bounded number of threads and buffers, not the controller's memory (the same process
serves NATS). The TLS handshake runs in the connection's thread, not in the accept loop, so a client that connects
and says nothing delays nobody else. Two clocks bound what a connection may hold:
  - `io_timeout`, the socket timeout: how long a connection may stay silent, idle between two requests included;
  - `request_deadline`, absolute: from a request's first byte, its request line, headers and body must all have
    arrived within it (the handshake too, which `ssl` bounds as a whole by the socket timeout). A per-recv timeout
    alone would let a client trickle one byte every little while against a large Content-Length and keep a thread
    and a growing buffer for ever. Headers late: the connection is closed; body late: 408, then closed.
The body is read in chunks as it arrives, so a request costs the memory of what was sent, not of what Content-Length
announces. HTTP/1.1 keep-alive lets
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

import io
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
REQUEST_DEADLINE = 10.0  # seconds from a request's first byte to its last (the API server gives a review 10 s at most)
MAX_CONNECTIONS = 256  # connections served at once; more are closed when accepted
CHUNK = 64 * 1024  # bytes of body read at a time
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

    def process_request(self, request: Any, client_address: Any) -> None:
        # In the accept loop: a thread only for a connection within the cap; the others are closed at once.
        if not self.owner._enter():
            log.debug("webhook: %s refused, %d connections open", client_address, self.owner.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start (serve_forever logs it and closes the socket)
            self.owner._leave()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner._leave()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # In the connection's own thread: the handshake, then the HTTP exchange, on the context of this moment.
        owner = self.owner
        # `ssl` bounds the whole handshake by this timeout (not each read of it), so it is a deadline too.
        request.settimeout(min(owner.io_timeout, owner.request_deadline))
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


class _DeadlineReader(io.RawIOBase):
    """The connection's bytes as http.server reads them, each read given what is left of the request's deadline.

    Between requests (`rest`) a read waits `idle` seconds, the socket timeout; the first bytes of a request start
    its clock, and from then on every read waits at most what is left of `allowed`, TimeoutError once none is."""

    def __init__(self, sock: ssl.SSLSocket, idle: float, allowed: float) -> None:
        super().__init__()
        self.sock, self.idle, self.allowed = sock, idle, allowed
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is None:
            self.sock.settimeout(self.idle)
        else:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the request did not arrive within {self.allowed:g} s")
            self.sock.settimeout(min(self.idle, left))
        count = self.sock.recv_into(buffer)
        if count and self.deadline is None:
            self.deadline = time.monotonic() + self.allowed
        return count

    def rest(self) -> None:
        """The request is read (or the next one awaited): no deadline, the idle timeout for what follows."""
        self.deadline = None
        self.sock.settimeout(self.idle)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "meshloom-webhook"
    sys_version = ""
    server: _Server
    reader: _DeadlineReader

    def setup(self) -> None:
        super().setup()
        owner = self.server.owner
        # The buffered file http.server made reads with the socket timeout alone: replaced (closed first, or the
        # socket's reference to it would keep the descriptor open after `close`).
        self.rfile.close()
        self.reader = _DeadlineReader(self.connection, owner.io_timeout, owner.request_deadline)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        self.reader.rest()  # the wait for the next request is idle time; its clock starts with its first byte
        super().handle_one_request()

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
        self.reader.rest()
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
        # In chunks as they arrive: a buffer as large as what was sent, not as what Content-Length promises.
        body = bytearray()
        try:
            while len(body) < length:
                chunk = self.rfile.read1(min(CHUNK, length - len(body)))
                if not chunk:
                    self.close_connection = True  # the peer closed early: nobody to answer
                    return
                body += chunk
        except TimeoutError:
            self.reader.rest()  # the answer is written with the idle timeout, not with the expired deadline
            self._fail(started, 408, f"body: {len(body)} of {length} bytes arrived within "
                                     f"{owner.request_deadline:g} s", close=True)
            return
        self.reader.rest()
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
                 request_deadline: float = REQUEST_DEADLINE, max_connections: int = MAX_CONNECTIONS,
                 on_request: Callable[[Served], None] | None = None) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections: must be at least 1, not {max_connections}")
        if io_timeout <= 0 or request_deadline <= 0:
            raise ValueError("io_timeout, request_deadline: must be positive")
        self.handler = handler
        self.host = host
        self.requested_port = port
        self.path = path
        self.max_body = max_body
        self.io_timeout = io_timeout
        self.request_deadline = request_deadline
        self.max_connections = max_connections
        self.on_request = on_request
        self.context = make_context(cert_pem, key_pem)
        self._lock = threading.Lock()
        self._open: set[ssl.SSLSocket] = set()
        self._connections = 0  # being served (handshake included): a semaphore that can be read
        self._full = False  # the cap was reached and not yet left: warned once per episode
        self.refused = 0  # connections closed at accept because `max_connections` were open
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

    @property
    def connections(self) -> int:
        """Connections being served now (a handshake in progress included)."""
        with self._lock:
            return self._connections

    def _enter(self) -> bool:
        with self._lock:
            if self._connections >= self.max_connections:
                self.refused += 1
                warn, self._full = not self._full, True
            else:
                self._connections += 1
                self._full = False
                return True
        if warn:
            log.warning("webhook: %d connections open, the most allowed: new ones are closed until some end",
                        self.max_connections)
        return False

    def _leave(self) -> None:
        with self._lock:
            self._connections -= 1

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

