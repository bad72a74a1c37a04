"""Running apps/echo.py as a real process on loopback: a free port, a bounded wait for it to listen, a clean stop."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tests.support.wait import eventually

ECHO = str(Path(__file__).resolve().parents[2] / "apps" / "echo.py")
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


@contextlib.contextmanager
def echo(*args: str, env: Mapping[str, str] | None = None) -> Iterator[int]:
    """`apps/echo.py serve --host 127.0.0.1 --http <free port> *args` until the block ends; yields the port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, ECHO, "serve", "--host", HOST, "--http", str(port), *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        eventually(lambda: proc.poll() is not None or _listening(port), f"echo on port {port} listening")
        assert proc.poll() is None, proc.communicate()[0]
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def get(port: int, path: str, method: str = "GET") -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=15)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()
