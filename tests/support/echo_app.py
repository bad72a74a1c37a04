"""A tiny application for the data-plane tests and benchmarks: it says who it is and what it was sent.

Run it with the venv's python (it needs nothing but the standard library):

    python tests/support/echo_app.py serve --pod shop/b-1 --http 8080 [--http 8081 ...] [--tcp 9000 ...]
    python tests/support/echo_app.py request http://10.x.y.z:80/path [--count N] [--close] [--header 'K: V']
    python tests/support/echo_app.py session HOST PORT [--tcp]      # one connection, driven line by line on stdin
    python tests/support/echo_app.py load URL --rate 1000 --seconds 10  # a fixed rate, open loop: latency as JSON

HTTP/1.1 on every `--http` port, keep-alive unless the client asks `Connection: close`. Each answer is JSON:

    {"pod": ..., "port": <the port it came in on>, "method": ..., "path": ..., "headers": {lower-case name: value},
     "peer": "<ip>:<port> of the connection", "connection": <n-th connection this process accepted>,
     "request": <n-th request on that connection>, "body": <bytes of request body read>}

so a test sees which pod answered, which headers the sidecar added (`x-meshloom-client-id`, ...), whether two
requests shared a connection, and who connected (the sidecar on loopback, or a client directly). Paths:

    /fail...          500 (the body as above): a failing backend for circuit breakers; 200 with --no-fail
    /status/<code>    that status code
    anything else     200

Every `--tcp` port echoes whatever it receives until the client closes (a long-lived connection to hold open).

The server is asyncio with `Protocol`s, not `http.server`: benchmarks put it behind the sidecars and compare with it
alone, and a thread per connection would make the application, not the proxies, the thing measured. The parser is
as small as the tests need: request line, headers, a `Content-Length` body (no chunked requests), pipelining.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.client
import itertools
import json
import signal
import socket
import sys
import time
import urllib.parse
from collections import Counter
from typing import Any

MAX_HEAD = 64 * 1024  # a request head longer than this is answered 431 and the connection closed
_REASONS = {200: "OK", 400: "Bad Request", 431: "Request Header Fields Too Large", 500: "Internal Server Error"}
_connections = itertools.count(1)


class HttpEcho(asyncio.Protocol):
    def __init__(self, pod: str, port: int, fail: bool = True) -> None:
        self.pod, self.port, self.fail = pod, port, fail
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.number = next(_connections)
        self.requests = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "-"

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and not self.transport.is_closing():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._answer(431, {"error": "request head too long"}, close=True)
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                self._answer(400, {"error": f"bad request line {lines[0]!r}"}, close=True)
                return
            method, target, version = parts
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    self._answer(400, {"error": f"bad header line {line!r}"}, close=True)
                    return
                key = name.strip().lower()
                headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._answer(400, {"error": "bad content-length"}, close=True)
                return
            if len(self.buffer) < end + 4 + length:
                return  # the body is still on its way
            del self.buffer[:end + 4 + length]
            self.requests += 1
            connection = headers.get("connection", "").lower()
            close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
            path = target.split("?", 1)[0]
            status = 200
            if path.startswith("/fail") and self.fail:
                status = 500
            elif path.startswith("/status/") and path[8:].isdigit():
                status = int(path[8:])
            self._answer(status, {"pod": self.pod, "port": self.port, "method": method, "path": target,
                                  "headers": headers, "peer": self.peer, "connection": self.number,
                                  "request": self.requests, "body": length}, close=close)

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


async def serve(pod: str, http: list[int], tcp: list[int], host: str, fail: bool = True) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for port in http:
        servers.append(await loop.create_server(functools.partial(HttpEcho, pod, port, fail), host, port, backlog=1024,
                                                reuse_address=True))
    for port in tcp:
        servers.append(await loop.create_server(TcpEcho, host, port, backlog=1024, reuse_address=True))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {pod} http={http} tcp={tcp}", flush=True)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve HTTP and TCP echo ports until SIGTERM")
    serve_cmd.add_argument("--pod", required=True, help="the name to answer with, e.g. shop/b-1")
    serve_cmd.add_argument("--http", type=int, action="append", default=[], help="an HTTP port (repeatable)")
    serve_cmd.add_argument("--tcp", type=int, action="append", default=[], help="a TCP echo port (repeatable)")
    serve_cmd.add_argument("--host", default="0.0.0.0")
    serve_cmd.add_argument("--no-fail", action="store_true", help="/fail answers 200: a healthy fallback")
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
        asyncio.run(serve(args.pod, args.http, args.tcp, args.host, not args.no_fail))
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
