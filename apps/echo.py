"""The mesh's own demo and test application: it says who it is, what it was sent, and what its upstream answered.

Standard library only, so that it runs with any Python 3.11 by path or as `meshctl app ...`:

    python apps/echo.py serve [--pod shop/b-1] --http 8080 [--http 8081 ...] [--tcp 9000 ...] [--upstream URL]
    python apps/echo.py request http://10.x.y.z:80/path [--count N] [--close] [--header 'K: V']
    python apps/echo.py session HOST PORT [--tcp]      # one connection, driven line by line on stdin
    python apps/echo.py load URL --rate 1000 --seconds 10  # a fixed rate, open loop: latency as JSON

`--pod` defaults to `$POD_NAMESPACE/$POD_NAME`, which the local platform sets in every workload's environment (with
POD_IP and SERVICE_ACCOUNT).

HTTP/1.1 on every `--http` port, keep-alive unless the client asks `Connection: close`. Each answer is JSON:

    {"pod": ..., "port": <the port it came in on>, "method": ..., "path": ..., "headers": {lower-case name: value},
     "peer": "<ip>:<port> of the connection", "connection": <n-th connection this process accepted>,
     "request": <n-th request on that connection>, "body": <bytes of request body read>,
     "serviceAccount": <$SERVICE_ACCOUNT, only when set>}

so a test sees which pod answered, which headers the sidecar added (`x-meshloom-client-id`, ...), whether two
requests shared a connection, and who connected (the sidecar on loopback, or a client directly). Paths:

    /fail...          500 (the body as above): a failing backend for circuit breakers; 200 with --no-fail
    /status/<code>    that status code
    anything else     200; with --upstream, also sent on (below)

With `--upstream URL` (a frontend calling its backend), every request on a path of the last kind is sent to URL
as well -- same method and body, its path appended to URL's path -- and the answer gains

    "upstream": {"status": <upstream status, 0 when none came>, "body": <its JSON, or null>, "error": <text or null>}

The answer stays 200 whatever the upstream said (a 403 or 503 from the upstream's sidecar is news for the caller,
not a failure of this hop); only an upstream that gave no answer at all (refused, reset, timed out after
UPSTREAM_TIMEOUT) makes it 502. Upstream connections are kept alive in a small pool, as a real service would keep
them, so that the mesh's mTLS handshakes are not what a demo measures.

Every `--tcp` port echoes whatever it receives until the client closes (a long-lived connection to hold open).

The server is asyncio with `Protocol`s, not `http.server`: benchmarks put it behind the sidecars and compare with it
alone, and a thread per connection would make the application, not the proxies, the thing measured. The parser is
as small as the tests need: request line, headers, a `Content-Length` body (no chunked requests), pipelining.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import http.client
import itertools
import json
import os
import signal
import socket
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from typing import Any

MAX_HEAD = 64 * 1024  # a request head longer than this is answered 431 and the connection closed
UPSTREAM_TIMEOUT = 5.0  # seconds for one whole upstream exchange (connect, send, answer): a hung upstream is a 502
UPSTREAM_IDLE = 32  # idle keep-alive connections kept towards the upstream; more at once are opened and closed
_REASONS = {200: "OK", 400: "Bad Request", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            502: "Bad Gateway"}
_connections = itertools.count(1)
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Answer = tuple[int, dict[str, Any], bool]  # status, JSON body, close the connection after it


class Upstream:
    """Where a frontend sends its requests on: one `http://` URL, with a pool of idle keep-alive connections."""

    def __init__(self, url: str, timeout: float = UPSTREAM_TIMEOUT) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--upstream must be an http:// URL with a host, got {url!r}")
        self.host, self.port, self.netloc = parts.hostname, parts.port or 80, parts.netloc
        self.base = parts.path.rstrip("/")
        self.timeout = timeout
        self.idle: list[Conn] = []

    def target(self, path: str) -> str:
        """The request's path (and query) appended to the upstream URL's path."""
        return self.base + (path if path.startswith("/") else f"/{path}")

    async def call(self, method: str, path: str, body: bytes) -> dict[str, Any]:
        """{"status", "body", "error"}: status 0 and the error when no answer came, body null when not JSON."""
        try:
            status, raw = await asyncio.wait_for(self._exchange(method, self.target(path), body), self.timeout)
        except TimeoutError:
            return {"status": 0, "body": None, "error": f"no answer within {self.timeout:g} s"}
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            return {"status": 0, "body": None, "error": f"{type(exc).__name__}: {exc}"}
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = None  # an HTML error page from a sidecar, say: the status tells the story
        return {"status": status, "body": parsed, "error": None}

    async def _exchange(self, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        while self.idle:
            conn = self.idle.pop()
            if conn[0].at_eof() or conn[1].is_closing():
                conn[1].close()
                continue
            try:
                return await self._once(conn, method, target, body)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                conn[1].close()
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise  # an answer had begun: the upstream really failed, the request is not sent twice
                # else the upstream had closed this idle connection meanwhile: the next one, or a new one
            except BaseException:
                conn[1].close()
                raise
        conn = await asyncio.open_connection(self.host, self.port)
        try:
            return await self._once(conn, method, target, body)
        except BaseException:  # a cancellation (the timeout) included: a half-used connection is never pooled
            conn[1].close()
            raise

    async def _once(self, conn: Conn, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        reader, writer = conn
        head = f"{method} {target} HTTP/1.1\r\nHost: {self.netloc}\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        keep = lines[0].startswith("HTTP/1.1") and "close" not in headers.get("connection", "").lower()
        if method == "HEAD" or status in (204, 304) or status < 200:
            data = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            data = await _chunked(reader)
        elif "content-length" in headers:
            data = await reader.readexactly(int(headers["content-length"]))
        else:
            data, keep = await reader.read(), False  # the body ends with the connection
        if keep and len(self.idle) < UPSTREAM_IDLE:
            self.idle.append(conn)
        else:
            writer.close()
        return status, data


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)


class HttpEcho(asyncio.Protocol):
    """One client connection. Answers go out in request order (HTTP/1.1 pipelining): an answer that waits for the
    upstream holds back the ones behind it, kept in `pending` until their turn."""

    def __init__(self, pod: str, port: int, fail: bool = True, upstream: Upstream | None = None,
                 service_account: str = "") -> None:
        self.pod, self.port, self.fail, self.upstream = pod, port, fail, upstream
        self.service_account = service_account
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.number = next(_connections)
        self.requests = 0
        self.pending: collections.deque[asyncio.Future[Answer]] = collections.deque()
        self.closing = False  # a request asked to close: nothing after it is read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "-"

    def connection_lost(self, exc: Exception | None) -> None:
        for future in self.pending:
            future.cancel()
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and not self.transport.is_closing() and not self.closing:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._reply(431, {"error": "request head too long"}, close=True)
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                self._reply(400, {"error": f"bad request line {lines[0]!r}"}, close=True)
                return
            method, target, version = parts
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    self._reply(400, {"error": f"bad header line {line!r}"}, close=True)
                    return
                key = name.strip().lower()
                headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._reply(400, {"error": "bad content-length"}, close=True)
                return
            if len(self.buffer) < end + 4 + length:
                return  # the body is still on its way
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            self.requests += 1
            connection = headers.get("connection", "").lower()
            close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
            path = target.split("?", 1)[0]
            status = 200
            special = False
            if path.startswith("/fail") and self.fail:
                status, special = 500, True
            elif path.startswith("/status/") and path[8:].isdigit():
                status, special = int(path[8:]), True
            elif path.startswith("/fail"):
                special = True  # --no-fail: a healthy fallback answers on its own
            answer: dict[str, Any] = {"pod": self.pod, "port": self.port, "method": method, "path": target,
                                      "headers": headers, "peer": self.peer, "connection": self.number,
                                      "request": self.requests, "body": length}
            if self.service_account:
                answer["serviceAccount"] = self.service_account
            if self.upstream is not None and not special:
                self._defer(self._forward(self.upstream, answer, method, target, body, close))
            else:
                self._reply(status, answer, close=close)
            if close:
                self.closing = True

    async def _forward(self, upstream: Upstream, answer: dict[str, Any], method: str, target: str, body: bytes,
                       close: bool) -> Answer:
        result = await upstream.call(method, target, body)
        answer["upstream"] = result
        return (502 if result["status"] == 0 else 200), answer, close

    def _defer(self, work: Any) -> None:
        task: asyncio.Task[Answer] = asyncio.get_running_loop().create_task(work)
        self.pending.append(task)
        task.add_done_callback(lambda _: self._flush())

    def _reply(self, status: int, body: dict[str, Any], *, close: bool) -> None:
        if not self.pending:
            self._answer(status, body, close=close)  # the usual case: nothing is waiting ahead of it
            return
        ready: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        ready.set_result((status, body, close))
        self.pending.append(ready)

    def _flush(self) -> None:
        while self.pending and self.pending[0].done():
            future = self.pending.popleft()
            if future.cancelled() or self.transport is None or self.transport.is_closing():
                continue
            if (exc := future.exception()) is not None:  # a bug of ours: said, not a hung client
                self._answer(502, {"pod": self.pod, "error": f"{type(exc).__name__}: {exc}"}, close=True)
                continue
            status, body, close = future.result()
            self._answer(status, body, close=close)

    def _answer(self, status: int, body: dict[str, object], *, close: bool) -> None:
        assert self.transport is not None
        data = json.dumps(body, sort_keys=True).encode() + b"\n"
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n")
        self.transport.write(head.encode("latin-1") + data)
        if close:
            self.transport.close()


class TcpEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(pod: str, http: list[int], tcp: list[int], host: str, fail: bool = True,
                upstream: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    # One pool for every port and connection: the upstream sees a few long-lived connections, whatever the clients do.
    calls = Upstream(upstream) if upstream else None
    for port in http:
        protocol = functools.partial(HttpEcho, pod, port, fail, calls, os.environ.get("SERVICE_ACCOUNT", ""))
        servers.append(await loop.create_server(protocol, host, port, backlog=1024, reuse_address=True))
    for port in tcp:
        servers.append(await loop.create_server(TcpEcho, host, port, backlog=1024, reuse_address=True))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {pod} http={http} tcp={tcp}" + (f" upstream={upstream}" if upstream else ""), flush=True)
    await stop.wait()
    for server in servers:
        server.close()


# ---- the client side: run inside a client pod, so that its connections go through that pod's sidecar -----------
def _one(conn: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    raw = response.read()
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw.decode("utf-8", errors="replace")
    out: dict[str, Any] = {"status": response.status, "body": body}
    if response.will_close:
        conn.close()
    return out


def request(url: str, count: int, *, close: bool, method: str, headers: dict[str, str], timeout: float,
            interval: float) -> list[dict[str, Any]]:
    """`count` requests to `url`: on one keep-alive connection (made again after an error), or a new connection
    each (`close`). Each result is {"status", "body", "t"} or {"error", "t"}, `t` the seconds since the first."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if close:
        headers = {**headers, "Connection": "close"}
    results: list[dict[str, Any]] = []
    conn: http.client.HTTPConnection | None = None
    start = time.monotonic()
    for i in range(count):
        if i and interval:
            time.sleep(interval)  # a paced client, not a wait for a condition
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            results.append(_one(conn, method, path, headers) | {"t": round(time.monotonic() - start, 4)})
        except (OSError, http.client.HTTPException) as exc:
            results.append({"error": f"{type(exc).__name__}: {exc}", "t": round(time.monotonic() - start, 4)})
            conn.close()
            conn = None
            continue
        if close or conn.sock is None:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
    return results


def session(host: str, port: int, *, tcp: bool, timeout: float) -> None:
    """One long-lived connection driven from stdin, one line per step, one JSON line answered per step:
    HTTP: "<METHOD> <path>" -> {"status", "body"} | {"error"}; TCP: any text -> {"echo": what came back} | {"error"}.
    Ends at end of input; the connection is never made again, so an error means this very connection broke."""
    sock: socket.socket | None = None
    conn: http.client.HTTPConnection | None = None
    if tcp:
        sock = socket.create_connection((host, port), timeout=timeout)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.connect()
    print(json.dumps({"connected": True}), flush=True)
    broken = False
    for line in sys.stdin:
        step = line.rstrip("\n")
        out: dict[str, Any]
        try:
            if broken:
                raise ConnectionError("the connection broke at an earlier step")
            if sock is not None:
                data = step.encode() + b"\n"
                sock.sendall(data)
                got = b""
                while len(got) < len(data):
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed by the peer")
                    got += chunk
                out = {"echo": got.decode().rstrip("\n")}
            else:
                assert conn is not None
                method, _, path = step.partition(" ")
                out = _one(conn, method, path or "/", {})
                if conn.sock is None:
                    raise ConnectionError("the server closed the connection")
        except (OSError, http.client.HTTPException) as exc:
            broken = True
            out = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)

# ---- a fixed-rate load: open loop, so that a slow answer does not slow the schedule down ---------------------------
async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    return status


async def fixed_rate(url: str, rate: float, seconds: float, max_connections: int) -> dict[str, Any]:
    """`rate` requests per second for `seconds`, each sent at its scheduled time on an idle keep-alive connection (a
    new one when none is idle, up to `max_connections`); a request's latency runs from its scheduled time, so a
    stall shows in the figures instead of thinning the load (no coordinated omission)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened = 0
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    skipped = 0
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def one(scheduled: float, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
        nonlocal opened
        try:
            if conn is None:
                conn = await asyncio.open_connection(host, port)
            status = await asyncio.wait_for(_exchange(*conn, request), 10.0)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as exc:
            errors[type(exc).__name__] += 1
            if conn is not None:
                conn[1].close()
            opened -= 1
            return
        latencies.append(loop.time() - scheduled)
        if status != 200:
            errors[f"status {status}"] += 1
        idle.append(conn)

    start = loop.time() + 0.05
    total = int(rate * seconds)
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if idle:
            conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = idle.pop()
        elif opened < max_connections:
            conn, opened = None, opened + 1
        else:
            skipped += 1  # every connection is busy: counted, never queued behind the schedule
            continue
        task = asyncio.create_task(one(scheduled, conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=15.0)
    wall = loop.time() - start
    for _, writer in idle:
        writer.close()
    ordered = sorted(latencies)

    def pct(q: float) -> float | None:
        if not ordered:
            return None
        return round(1000 * ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))], 3)

    return {"rate": rate, "seconds": seconds, "sent": total - skipped, "answered": len(latencies),
            "skipped": skipped, "errors": dict(errors), "connections": opened,
            "achieved_rate": round(len(latencies) / wall, 1) if wall > 0 else 0.0,
            "latency_ms": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "p999": pct(0.999),
                           "max": pct(1.0)}}


def own_name(environ: Mapping[str, str]) -> str:
    """`<namespace>/<pod>` from the variables the local platform sets in every workload ("" without POD_NAME)."""
    name = environ.get("POD_NAME", "")
    return f"{environ.get('POD_NAMESPACE') or 'default'}/{name}" if name else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshctl app", description=(__doc__ or "").split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve HTTP and TCP echo ports until SIGTERM")
    serve_cmd.add_argument("--pod", help="the name to answer with, e.g. shop/b-1 (default: $POD_NAMESPACE/$POD_NAME)")
    serve_cmd.add_argument("--http", type=int, action="append", default=[], help="an HTTP port (repeatable)")
    serve_cmd.add_argument("--tcp", type=int, action="append", default=[], help="a TCP echo port (repeatable)")
    serve_cmd.add_argument("--host", default="0.0.0.0")
    serve_cmd.add_argument("--no-fail", action="store_true", help="/fail answers 200: a healthy fallback")
    serve_cmd.add_argument("--upstream", metavar="URL",
                           help="also send each request on to this http:// URL (its path appended), with its answer")
    req = commands.add_parser("request", help="send requests, print {\"results\": [...]} as JSON")
    req.add_argument("url")
    req.add_argument("--count", type=int, default=1)
    req.add_argument("--close", action="store_true", help="a new connection per request (Connection: close)")
    req.add_argument("--method", default="GET")
    req.add_argument("--header", action="append", default=[], help="NAME: VALUE (repeatable)")
    req.add_argument("--timeout", type=float, default=5.0)
    req.add_argument("--interval", type=float, default=0.0, help="seconds between requests")
    ses = commands.add_parser("session", help="one long-lived connection driven from stdin")
    ses.add_argument("host")
    ses.add_argument("port", type=int)
    ses.add_argument("--tcp", action="store_true", help="a TCP echo port rather than HTTP")
    ses.add_argument("--timeout", type=float, default=5.0)
    load = commands.add_parser("load", help="GET at a fixed rate (open loop), print latency percentiles as JSON")
    load.add_argument("url")
    load.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    load.add_argument("--seconds", type=float, default=10.0)
    load.add_argument("--connections", type=int, default=64, help="keep-alive connections at the most")
    args = parser.parse_args(argv)
    if args.command == "serve":
        if not args.http and not args.tcp:
            parser.error("give at least one --http or --tcp port")
        pod = args.pod or own_name(os.environ)
        if not pod:
            parser.error("give --pod, or set POD_NAME (and POD_NAMESPACE) in the environment")
        if args.upstream:
            try:
                Upstream(args.upstream)
            except ValueError as exc:
                parser.error(str(exc))
        asyncio.run(serve(pod, args.http, args.tcp, args.host, not args.no_fail, args.upstream))
    elif args.command == "request":
        headers = dict((k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in args.header))
        results = request(args.url, args.count, close=args.close, method=args.method, headers=headers,
                          timeout=args.timeout, interval=args.interval)
        print(json.dumps({"results": results}))
    elif args.command == "session":
        session(args.host, args.port, tcp=args.tcp, timeout=args.timeout)
    else:
        print(json.dumps(asyncio.run(fixed_rate(args.url, args.rate, args.seconds, args.connections))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
