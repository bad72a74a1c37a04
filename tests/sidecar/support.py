"""Helpers for the proxy tests: sidecar documents and shards built from the catalog's own types, SVIDs, a loopback
HTTP application, TLS clients, and running proxies that are always stopped.

Loopback layout used by the integration tests (no namespaces needed where the original destination does not
matter): an application listens on 127.0.0.1:P, its sidecar's inbound frontend binds 127.0.0.2:P (with
`ProxyPorts.inbound = P`, so `dst_port` is the application's port as it would be after a REDIRECT), and a client's
outbound frontend binds 127.0.0.1:Q with a Service whose address is 127.0.0.1 and port Q.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from catalog.documents import (
    BackendPort,
    CircuitBreakerEntry,
    Endpoint,
    FallbackEntry,
    Grant,
    InboundPort,
    InboundRateLimit,
    OutboundPort,
    OutboundService,
    OutboundShard,
    RouteMatch,
    SidecarDocument,
    SplitBackend,
    SplitEntry,
    digest,
)
from catalog.fields import FrozenMap
from catalog.policy import AccessControlMode, MtlsMode
from catalog.resource import Protocol, Transport
from sidecar.haproxy import ProxyConfig, ProxyPaths, ProxyPorts, render
from sidecar.proxy import Proxy
from tests.support.pki import Authority, Leaf

TD = "example.org"


def sid(ns: str, sa: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{sa}"


# ------------------------------------------------------------------------------------------------ documents ---
def route(name: str, methods: Sequence[str] = (), path: str = "", headers: dict[str, str] | None = None,
          group: str = "shop/routes") -> RouteMatch:
    return RouteMatch(group, name, tuple(methods), path, FrozenMap(headers or {}))


def inbound_port(number: int, protocol: str = "http", *, sources: Sequence[Grant] = (), allow_all: bool = False,
                 rate_limits: Sequence[InboundRateLimit] = (), transport: str = "TCP") -> InboundPort:
    return InboundPort(number, Transport(transport), Protocol(protocol), ("shop/app",), allow_all, tuple(sources),
                       tuple(rate_limits))


def rate_limit(name: str, rate: str, *, burst: int = 0, delay: int | str = "nodelay",
               sources: Sequence[str] | None = None, routes: Sequence[RouteMatch] | None = None) -> InboundRateLimit:
    return InboundRateLimit(f"shop/{name}", name, rate, burst, delay,
                            None if sources is None else tuple(sources), None if routes is None else tuple(routes))


def endpoint(ip: str, port: int, spiffe_id: str | None = None) -> Endpoint:
    return Endpoint(ip, port, spiffe_id)


def service(name: str, address: str | None, ports: Sequence[tuple[str, int, str, Sequence[Endpoint]]], *,
            split: SplitEntry | None = None, breaker: CircuitBreakerEntry | None = None) -> OutboundService:
    """ports: (name, number, protocol, endpoints)."""
    return OutboundService(name, address, tuple(OutboundPort(n, num, Protocol(p), tuple(e)) for n, num, p, e in ports),
                           split, breaker)


def split(policy: str, legs: Sequence[tuple[str, int, dict[int, Sequence[Endpoint]]]],
          matches: Sequence[RouteMatch] | None = None) -> SplitEntry:
    """legs: (service, weight, {root port: endpoints})."""
    return SplitEntry(policy, None if matches is None else tuple(matches),
                      tuple(SplitBackend(s, w, tuple(BackendPort(p, tuple(e)) for p, e in ports.items()))
                            for s, w, ports in legs))


def breaker(errors: int, timeout: int, fallback: tuple[str, int, Sequence[Endpoint]] | None = None
            ) -> CircuitBreakerEntry:
    fb = None if fallback is None else FallbackEntry(fallback[0], fallback[1], None, tuple(fallback[2]))
    return CircuitBreakerEntry("shop/breaker", errors, timeout, fb)


def shard(namespace: str, *services: OutboundService) -> dict[str, Any]:
    return OutboundShard(namespace, tuple(services)).to_json()


def document(*, inbound: Sequence[InboundPort] = (), shards: Sequence[dict[str, Any]] = (), mtls: str = "strict",
             access: str = "deny", lb: str = "round_robin", body: str = "1m", log_level: str = "info",
             log_format: str = "default", me: str = "shop/app-1", spiffe_id: str | None = None) -> dict[str, Any]:
    shard_digests = FrozenMap({s["namespace"]: digest(json.dumps(s, sort_keys=True).encode()) for s in shards})
    doc = SidecarDocument(me, spiffe_id or sid("shop", "app"), MtlsMode(mtls), AccessControlMode(access), lb, body,
                          False, log_level, log_format, tuple(inbound), shard_digests)
    return doc.to_json()


def shards_of(*shards: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["namespace"]: s for s in shards}


def rendered(doc: dict[str, Any], shards: Sequence[dict[str, Any]], run_dir: str,
             ports: ProxyPorts | None = None) -> ProxyConfig:
    return render(doc, shards_of(*shards), ProxyPaths(run_dir), ports or ProxyPorts())


# ---------------------------------------------------------------------------------------------------- SVIDs ---
@dataclass(frozen=True)
class Svid:
    """A workload's SVID as files a Python client loads, and as the PEM blob HAProxy takes."""

    spiffe_id: str
    leaf: Leaf
    cert_file: Path  # leaf + chain
    key_file: Path

    @property
    def pem(self) -> bytes:
        """Leaf, chain and PKCS#8 key: HAProxy's `crt` format (cert_pem of the proxy API)."""
        return self.cert_file.read_bytes() + self.key_file.read_bytes()

    @property
    def serial(self) -> int:
        return self.leaf.serial


def make_svid(authority: Authority, spiffe_id: str, folder: Path, *, dns: str | None = None) -> Svid:
    """An SVID with the mesh's DNS SAN `<sa>.<ns>.sa` (or `dns`)."""
    parts = spiffe_id.split("/")
    leaf = authority.leaf(spiffe_id, dns or f"{parts[-1]}.{parts[-3]}.sa")
    return _files(spiffe_id, leaf, folder)


def bare_svid(authority: Authority, spiffe_id: str, folder: Path) -> Svid:
    """An SVID with only its URI SAN: no DNS SAN and no CN (the certificate TESTBED.md's pitfall needs)."""
    return custom_svid(authority, folder, [spiffe_id])


def custom_svid(authority: Authority, folder: Path, uris: Sequence[str], dns: Sequence[str] = ()) -> Svid:
    """A leaf with exactly these URI and DNS SANs and an empty subject, signed by `authority`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC) - timedelta(minutes=1)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(authority.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(authority.cert.not_valid_after_utc)
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(authority.key, hashes.SHA256()))
    leaf = Leaf(cert, key, (cert.public_bytes(serialization.Encoding.DER), *authority.chain))
    return _files(uris[0] if uris else "none", leaf, folder)


def _files(spiffe_id: str, leaf: Leaf, folder: Path) -> Svid:
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{spiffe_id.rsplit('/', 1)[-1]}-{leaf.serial:x}"
    cert_file, key_file = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_file.write_bytes(b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
                                   for d in leaf.chain))
    key_file.write_bytes(leaf.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return Svid(spiffe_id, leaf, cert_file, key_file)


def bundle(*authorities: Authority) -> bytes:
    return b"".join(a.cert.public_bytes(serialization.Encoding.PEM) for a in authorities)


# ----------------------------------------------------------------------------------------------- processes ---
@contextlib.contextmanager
def run_dir() -> Iterator[str]:
    """A short directory under /tmp: unix socket paths must stay under 108 bytes, which pytest's tmp_path may not."""
    path = tempfile.mkdtemp(prefix="mlp-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def free_port(*hosts: str) -> int:
    """A TCP port free on every host given (127.0.0.1 by default)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no free port")


def inbound_ports(port: int) -> ProxyPorts:
    """A sidecar whose inbound side is 127.0.0.2:port, in front of an application on 127.0.0.1:port."""
    return ProxyPorts(inbound=port, inbound_address="127.0.0.2", outbound=free_port(), metrics=free_port())


def outbound_ports(port: int) -> ProxyPorts:
    """A sidecar whose outbound side is 127.0.0.1:port (a Service at 127.0.0.1:port)."""
    return ProxyPorts(outbound=port, inbound=free_port(), metrics=free_port(), inbound_address="127.0.0.1")


class Proxies:
    """Proxies started by one test; all stopped at its end. Each logs to `<run_dir>/haproxy.log`."""

    def __init__(self) -> None:
        self.started: list[Proxy] = []
        self._dirs = contextlib.ExitStack()
        self._logs: list[Any] = []

    def start(self, doc: dict[str, Any], shards: Sequence[dict[str, Any]], svid: Svid, ca: bytes,
              ports: ProxyPorts, **kwargs: Any) -> tuple[Proxy, ProxyConfig]:
        directory = self._dirs.enter_context(run_dir())
        config = rendered(doc, shards, directory, ports)
        logfile = open(Path(directory) / "haproxy.log", "ab")  # noqa: SIM115 -- closed in close()
        self._logs.append(logfile)
        proxy = Proxy(ProxyPaths(directory), output=logfile, **kwargs)
        self.started.append(proxy)
        proxy.start(config, svid.pem, ca)
        return proxy, config

    def close(self) -> None:
        for proxy in self.started:
            proxy.stop(drain_seconds=0)
        for f in self._logs:
            f.close()
        self._dirs.close()


def log_of(proxy: Proxy) -> str:
    path = Path(proxy.paths.run_dir) / "haproxy.log"
    return path.read_text(errors="replace") if path.exists() else ""


# ------------------------------------------------------------------------------------------- application ---
class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: App

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        status = 500 if self.path.startswith("/fail") else 200
        self.server.requests += 1
        payload = json.dumps({"app": self.server.name, "port": self.server.server_address[1], "path": self.path,
                              "method": self.command, "peer": f"{self.client_address[0]}",
                              "headers": {k.lower(): v for k, v in self.headers.items()},
                              "body": len(body)}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class App(http.server.ThreadingHTTPServer):
    """An HTTP/1.1 application on loopback that answers JSON saying who it is and what it got (`/fail`: 500)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        self.requests = 0
        super().__init__((host, port), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class TcpEcho:
    """A TCP application on loopback that echoes what it receives."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_server((host, port))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


# ------------------------------------------------------------------------------------------------- clients ---
def client_context(svid: Svid | None, ca: bytes, *, alpn: Sequence[str] = ("meshloom",)) -> ssl.SSLContext:
    """A mesh client: presents `svid` (if any), trusts `ca`, checks the chain but not a host name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca.decode())
    if svid is not None:
        ctx.load_cert_chain(svid.cert_file, svid.key_file)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


@dataclass
class Answer:
    status: int
    body: dict[str, Any]


def request(host: str, port: int, path: str = "/", *, method: str = "GET", headers: dict[str, str] | None = None,
            context: ssl.SSLContext | None = None, body: bytes | None = None, timeout: float = 10.0) -> Answer:
    """One request on a new connection (TLS with `context`)."""
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        return send(conn, path, method=method, headers=headers, body=body)
    finally:
        conn.close()


def send(conn: http.client.HTTPConnection, path: str = "/", *, method: str = "GET",
         headers: dict[str, str] | None = None, body: bytes | None = None) -> Answer:
    """One request on an open (keep-alive) connection."""
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    try:
        parsed = json.loads(data) if data else {}
    except ValueError:
        parsed = {"text": data.decode(errors="replace")}
    return Answer(response.status, parsed if isinstance(parsed, dict) else {"value": parsed})


def refused(host: str, port: int, *, context: ssl.SSLContext | None = None, timeout: float = 10.0) -> str | None:
    """None when an HTTP request gets an answer; else how it failed ("closed", "reset", "tls: ...")."""
    try:
        request(host, port, context=context, timeout=timeout)
    except ssl.SSLError as exc:
        return f"tls: {exc.reason or exc}"
    except (http.client.RemoteDisconnected, http.client.BadStatusLine, ConnectionResetError, BrokenPipeError):
        return "closed"
    except ConnectionRefusedError:
        return "refused"
    return None
