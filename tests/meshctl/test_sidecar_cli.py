"""`meshctl sidecar` refuses what cannot work in one line with exit code 2, before anything starts."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshctl.cli import main
from tests.meshctl.support import refused

SOCKET = "unix:///run/meshloom/agent.sock"
NATS = "tls://127.0.0.1:4222"


@pytest.fixture(autouse=True)
def no_pod_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SPIFFE_ENDPOINT_SOCKET", "POD_NAME", "POD_NAMESPACE", "MESHLOOM_NATS_URL", "MESHLOOM_APP_PROBES"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("argv", "message"), [
    ((), "--sidecar NAMESPACE/NAME is required (or POD_NAMESPACE and POD_NAME)"),
    (("--sidecar", "web-1"), "--sidecar 'web-1' is not NAMESPACE/NAME"),
    (("--sidecar", "shop/"), "--sidecar 'shop/' is not NAMESPACE/NAME"),
    (("--sidecar", "shop/web-1"), "--workload-socket unix:///PATH is required (or SPIFFE_ENDPOINT_SOCKET)"),
    (("--sidecar", "shop/web-1", "--workload-socket", "/run/agent.sock"),
     "--workload-socket '/run/agent.sock' is not unix:///ABSOLUTE/PATH"),
    (("--sidecar", "shop/web-1", "--workload-socket", SOCKET),
     "--nats-url tls://HOST:PORT is required (or MESHLOOM_NATS_URL)"),
    (("--sidecar", "shop/web-1", "--workload-socket", SOCKET, "--nats-url", "nats://127.0.0.1:4222"),
     "is not tls://HOST:PORT (the mesh's NATS needs mutual TLS)"),
    (("--sidecar", "shop/web-1", "--workload-socket", SOCKET, "--nats-url", "tls://127.0.0.1"),
     "is not tls://HOST:PORT"),
    (("--sidecar", "shop/web-1", "--workload-socket", SOCKET, "--nats-url", NATS, "--admin-port", "15006"),
     "--admin-port, --inbound-port, --outbound-port and --metrics-port must differ"),
    (("--sidecar", "shop/web-1", "--workload-socket", SOCKET, "--nats-url", NATS, "--drain-seconds", "-1"),
     "--drain-seconds"),
    (("--sidecar", "shop/web-1", "--admin-port", "http"), "--admin-port"),
    (("--sidecar", "shop/web-1", "--no-such-flag"), "--no-such-flag"),
])
def test_a_flag_that_cannot_work_is_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str],
                                                             argv: tuple[str, ...], message: str) -> None:
    assert message in refused(capsys, "sidecar", *argv)


def test_the_pod_environment_stands_in_for_the_flags(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "shop")
    monkeypatch.setenv("POD_NAME", "web-1")
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", SOCKET)
    monkeypatch.setenv("MESHLOOM_NATS_URL", "tls://nowhere")  # all the others were taken: this one is named
    assert "--nats-url 'tls://nowhere' is not tls://HOST:PORT" in refused(capsys, "sidecar")


def test_app_probes_in_the_environment_that_are_not_json_are_one_line_at_start(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESHLOOM_APP_PROBES", '{"/app-health/app/livez": {"port": 8080,')
    line = refused(capsys, "sidecar", "--sidecar", "shop/web-1", "--workload-socket", SOCKET, "--nats-url", NATS,
                   "--run-dir", str(tmp_path / "run"))
    assert line.startswith("meshctl: MESHLOOM_APP_PROBES: not JSON (")
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_app_probes_given_as_a_flag_win_over_the_environment_and_are_checked_too(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLOOM_APP_PROBES", "{")
    line = refused(capsys, "sidecar", "--sidecar", "shop/web-1", "--workload-socket", SOCKET, "--nats-url", NATS,
                   "--app-probes", '{"/app-health/app/readyz": {"port": 0}}')
    assert "--app-probes: /app-health/app/readyz: port 0 is not a number from 1 to 65535" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="as root any --uid is allowed")
def test_another_uid_for_haproxy_needs_root(capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(capsys, "sidecar", "--sidecar", "shop/web-1", "--workload-socket", SOCKET, "--nats-url", NATS,
                   "--uid", str(os.geteuid() + 1))
    assert f"--uid {os.geteuid() + 1} needs root" in line


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_an_admin_port_already_taken_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                 taken_port: int) -> None:
    line = refused(capsys, "sidecar", "--sidecar", "shop/web-1", "--workload-socket", SOCKET, "--nats-url", NATS,
                   "--run-dir", str(tmp_path / "run"), "--admin-host", "127.0.0.1", "--admin-port", str(taken_port))
    assert line.startswith(f"meshctl: cannot listen on admin port 127.0.0.1:{taken_port}")


def test_the_sidecar_command_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sidecar", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--workload-socket" in out and "--drain-seconds" in out
