"""`meshctl controller`'s flags reach the controller's configuration, and one that cannot work is one line and exit
code 2, before anything connects to a cluster. (The controller itself runs against a real API server in
tests/integration/test_kube_controller.py.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import meshctl.controller as controller_module
from actions.kube import FakeKube
from catalog.inject import NATS_PORT, NATS_SERVER_NAME
from meshctl.cli import main
from meshctl.controller import Controller, ControllerConfig
from store import Store
from tests.meshctl.support import refused


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[ControllerConfig]:
    """What the command would run, captured instead of connecting to a cluster."""
    seen: list[ControllerConfig] = []

    def run(*, config: ControllerConfig, **kw: Any) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(controller_module, "run", run)
    return seen


def test_the_mesh_nats_listens_on_every_address_on_4222_by_default_for_the_services_names(
        started: list[ControllerConfig], tmp_path: Path) -> None:
    assert main(["controller", "--state-dir", str(tmp_path), "--no-leader-elect"]) == 0
    config = started[-1]
    assert (config.nats, config.nats_host, config.nats_port) == (True, "0.0.0.0", 4222)
    assert NATS_PORT == 4222  # the port the injector's NATS_URL names
    # The name an injected sidecar verifies (`--nats-server-name`) is the first its certificate carries.
    assert config.nats_dns_names == ("meshloom-nats.meshloom.svc", "meshloom-nats.meshloom.svc.cluster.local",
                                     "meshloom-nats.meshloom", "meshloom-nats")
    assert config.nats_dns_names[0] == NATS_SERVER_NAME


def test_the_nats_flags_and_the_namespace_reach_the_controller(started: list[ControllerConfig],
                                                                   tmp_path: Path) -> None:
    assert main(["controller", "--state-dir", str(tmp_path), "--namespace", "mesh-system", "--nats-port", "4300",
                 "--nats-host", "127.0.0.1", "--nats-url", "tls://meshloom-nats.mesh-system.svc:4300"]) == 0
    config = started[-1]
    assert (config.nats_host, config.nats_port) == ("127.0.0.1", 4300)
    assert config.nats_dns_names[0] == "meshloom-nats.mesh-system.svc"


@pytest.mark.parametrize(("argv", "message"), [
    (("--nats-port", "70000"), "--nats-port"),
    (("--nats-port", "nats"), "--nats-port"),
    (("--nats-port", "8443"), "--webhook-port, --metrics-port and --nats-port must differ"),
    (("--metrics-port", "4222"), "--webhook-port, --metrics-port and --nats-port must differ"),
    (("--nats-secret", "meshloom-nats"), "--nats-secret"),  # gone: the controller's NATS needs no Secret
])
def test_a_nats_flag_that_cannot_work_is_one_line_and_exit_code_2(
        capsys: pytest.CaptureFixture[str], started: list[ControllerConfig], tmp_path: Path,
        argv: tuple[str, ...], message: str) -> None:
    assert message in refused(capsys, "controller", "--state-dir", str(tmp_path), *argv)
    assert started == []


def test_the_webhook_reads_a_namespace_its_watch_has_not_delivered_yet_from_the_api_server(
        sqlite_url: str, tmp_path: Path) -> None:
    kube = FakeKube()
    kube.docs["/api/v1/namespaces/fresh"] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": "fresh", "labels": {"injector.nsm.nginx.com/auto-inject": "enabled"}}}
    store = Store(sqlite_url)
    try:
        controller = Controller(kube, store, ControllerConfig(tmp_path, leader_elect=False))
        # The wiring has listed namespaces, but the new one's event is still in its batch window.
        controller.wiring = SimpleNamespace(namespaces_listed=True,  # type: ignore[assignment]
                                            namespaces={"old": {"team": "a"}})
        assert controller._namespace_labels("old") == {"team": "a"}
        assert kube.requests == []  # what the watch knows is not asked again
        assert controller._namespace_labels("fresh") == {"injector.nsm.nginx.com/auto-inject": "enabled"}
        assert kube.requests == [("GET", "/api/v1/namespaces/fresh")]
        assert controller._namespace_labels("nowhere") is None
        kube.unreachable = True
        assert controller._namespace_labels("fresh") is None  # unknown, not an error the webhook answers with
    finally:
        store.close()
