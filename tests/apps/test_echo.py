"""apps/echo.py as a real process on loopback: its upstream calls, its ordering, its name from the environment."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from apps.echo import Upstream, own_name
from tests.apps.support import ECHO, HOST, echo, free_port, get

pytestmark = pytest.mark.integration


def test_a_frontend_whose_upstream_refuses_connections_answers_502_with_the_error() -> None:
    closed = free_port()  # nothing listens there
    with echo("--pod", "demo/frontend-0", "--upstream", f"http://{HOST}:{closed}/") as port:
        status, body = get(port, "/hello")
    assert status == 502
    assert body["pod"] == "demo/frontend-0"
    assert body["upstream"]["status"] == 0 and body["upstream"]["body"] is None
    assert "Connect" in body["upstream"]["error"] or "refused" in body["upstream"]["error"].lower()


def test_special_paths_are_answered_on_the_spot_without_calling_the_upstream() -> None:
    closed = free_port()
    with echo("--pod", "demo/frontend-0", "--upstream", f"http://{HOST}:{closed}/") as port:
        status, body = get(port, "/status/418")
    assert status == 418 and "upstream" not in body


def test_pipelined_requests_are_answered_in_order_when_the_first_waits_for_the_upstream() -> None:
    with echo("--pod", "demo/backend-0") as backend, \
            echo("--pod", "demo/frontend-0", "--upstream", f"http://{HOST}:{backend}/") as frontend:
        with socket.create_connection((HOST, frontend), timeout=15) as s:
            s.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /status/201 HTTP/1.1\r\nHost: x\r\n"
                      b"Connection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    assert re.findall(rb"HTTP/1\.1 ([0-9]{3}) ", data) == [b"200", b"201"], data
    assert data.index(b'"path": "/first"') < data.index(b'"path": "/status/201"')


def test_the_pod_name_and_service_account_come_from_the_platform_s_environment() -> None:
    env = {"POD_NAME": "backend-v1-0", "POD_NAMESPACE": "demo", "SERVICE_ACCOUNT": "backend"}
    with echo(env=env) as port:
        status, body = get(port, "/")
    assert status == 200
    assert body["pod"] == "demo/backend-v1-0" and body["serviceAccount"] == "backend"


def test_serve_without_a_pod_name_anywhere_is_one_usage_error() -> None:
    done = subprocess.run([sys.executable, ECHO, "serve", "--http", str(free_port())], capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin"}, check=False)
    assert done.returncode == 2
    assert "give --pod, or set POD_NAME" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(("env", "name"), [({"POD_NAME": "a-0", "POD_NAMESPACE": "shop"}, "shop/a-0"),
                                           ({"POD_NAME": "a-0"}, "default/a-0"), ({}, "")])
def test_own_name_is_namespace_slash_pod(env: dict[str, str], name: str) -> None:
    assert own_name(env) == name


def test_an_upstream_path_is_appended_to_the_url_s_path() -> None:
    assert Upstream("http://backend.demo.svc/").target("/x?y=1") == "/x?y=1"
    assert Upstream("http://backend.demo.svc/api/").target("/x") == "/api/x"
    with pytest.raises(ValueError, match="http:// URL"):
        Upstream("https://backend.demo.svc/")
