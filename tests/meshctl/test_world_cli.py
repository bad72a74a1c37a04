"""meshctl apply / get / delete, and the CA commands, as a user meets them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from actions import Actions
from actions.ca import CaSettings, MeshCa
from actions.clock import SystemClock
from actions.nats import FakeConfigPublisher
from actions.nodeagent import FakeSvidDelivery
from actions.platform import FakePodPlatform
from actions.vault import MemoryVault
from engine import Engine, ensure_ca
from store import Store, migrate, sqlite_url
from tests.catalog import topology
from tests.meshctl.support import MESHCTL, meshctl, one_line


@pytest.fixture(autouse=True)
def default_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLOOM_STATE_DIR", str(tmp_path / "default-state"))


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    migrate.upgrade(sqlite_url(state))
    return state


def write(tmp_path: Path, docs: list[dict], name: str = "mesh.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return str(path)


def stored(state_dir: Path) -> list[tuple[str, str, str]]:
    store = Store(sqlite_url(state_dir))
    try:
        return [r.ref for r in store.resources()]
    finally:
        store.close()


def test_apply_stores_every_kind_and_a_second_apply_reports_them_unchanged(capsys, tmp_path, state_dir):
    path = write(tmp_path, topology.manifests())
    code, out, err = meshctl(capsys, "apply", "-f", path, "--state-dir", str(state_dir))
    assert code == 0, err
    assert "trafficsplit/shop/api-canary created" in out and "meshconfig/mesh created" in out
    count = len(stored(state_dir))
    assert count == len(topology.manifests())
    code, out, _ = meshctl(capsys, "apply", "-f", path, "--state-dir", str(state_dir))
    assert code == 0 and out.count(" unchanged") == count and "created" not in out


def test_get_lists_a_kind_as_a_table_and_shows_one_as_json_or_yaml(capsys, tmp_path, state_dir):
    meshctl(capsys, "apply", "-f", write(tmp_path, topology.manifests()), "--state-dir", str(state_dir))
    code, out, _ = meshctl(capsys, "get", "trafficsplit", "--state-dir", str(state_dir))
    assert code == 0 and "api-canary" in out
    code, out, _ = meshctl(capsys, "get", "trafficsplit", "shop/api-canary", "-o", "json",
                           "--state-dir", str(state_dir))
    doc = json.loads(out)
    assert (doc["kind"], doc["metadata"]["name"]) == ("TrafficSplit", "api-canary")
    code, out, _ = meshctl(capsys, "get", "service", "api", "-n", "shop", "-o", "yaml", "--state-dir", str(state_dir))
    assert yaml.safe_load(out)["metadata"] == {"name": "api", "namespace": "shop"}


@pytest.mark.parametrize("broken, fragment", [
    ({"apiVersion": "split.smi-spec.io/v9", "kind": "TrafficSplit", "metadata": {"name": "x", "namespace": "shop"},
      "spec": {"service": "api", "backends": [{"service": "api-v1", "weight": 1}]}}, "apiVersion"),
    ({"apiVersion": "specs.smi.nginx.com/v1alpha2", "kind": "RateLimit", "metadata": {"name": "r", "namespace": "shop"},
      "spec": {"destination": {"kind": "Service", "name": "api", "namespace": "shop"}, "name": "r",
               "rate": "ten per second"}}, "spec.rate"),
    ({"apiVersion": "split.smi-spec.io/v1alpha3", "kind": "TrafficSplit",
      "metadata": {"name": "neg", "namespace": "shop"},
      "spec": {"service": "web", "backends": [{"service": "web", "weight": -5}]}}, "spec.backends[0].weight"),
])
def test_a_bad_document_rejects_the_whole_apply_and_what_was_stored_stays(capsys, tmp_path, state_dir, broken,
                                                                          fragment):
    meshctl(capsys, "apply", "-f", write(tmp_path, topology.manifests()), "--state-dir", str(state_dir))
    before = stored(state_dir)
    good = topology.service("shop", "extra", {"app": "extra"}, [{"name": "http", "port": 80}])
    code, out, err = meshctl(capsys, "apply", "-f", write(tmp_path, [good, broken], "bad.yaml"),
                         "--state-dir", str(state_dir))
    assert code == 7 and out == ""
    assert fragment in one_line(err)
    assert stored(state_dir) == before


def test_unreadable_yaml_names_the_file_and_line(capsys, tmp_path, state_dir):
    path = tmp_path / "broken.yaml"
    path.write_text("kind: Service\nmetadata: [unclosed\n")
    code, _, err = meshctl(capsys, "apply", "-f", str(path), "--state-dir", str(state_dir))
    assert code == 2 and f"{path}: line" in one_line(err)


def test_delete_removes_one_resource_and_refuses_one_a_policy_still_uses(capsys, tmp_path, state_dir):
    meshctl(capsys, "apply", "-f", write(tmp_path, topology.manifests()), "--state-dir", str(state_dir))
    code, _, err = meshctl(capsys, "delete", "httproutegroup", "shop/api-routes", "--state-dir", str(state_dir))
    assert code == 7 and "api-routes" in err
    assert ("httproutegroup", "shop", "api-routes") in stored(state_dir)
    code, out, _ = meshctl(capsys, "delete", "trafficsplit", "api-canary", "-n", "shop", "--state-dir", str(state_dir))
    assert code == 0 and "deleted" in out
    assert ("trafficsplit", "shop", "api-canary") not in stored(state_dir)
    code, _, err = meshctl(capsys, "delete", "trafficsplit", "shop/api-canary", "--state-dir", str(state_dir))
    assert code == 3 and "no such resource" in one_line(err)
    code, _, err = meshctl(capsys, "get", "gadget", "--state-dir", str(state_dir))
    assert code == 2 and "unknown kind 'gadget'" in one_line(err)


def test_ca_rotate_starts_a_rotation_the_control_plane_carries_out_and_ca_status_shows_both(capsys, state_dir):
    clock = SystemClock()
    store = Store(sqlite_url(state_dir))
    ca = MeshCa(state_dir / "ca", CaSettings(), clock)
    engine = Engine(store, Actions(ca, FakeSvidDelivery(), FakeConfigPublisher(), FakePodPlatform(), MemoryVault()),
                    clock)
    ensure_ca(engine)
    code, out, err = meshctl(capsys, "ca", "rotate", "--state-dir", str(state_dir))
    assert code == 0 and "ca/2: preparing" in out
    code, _, err = meshctl(capsys, "ca", "rotate", "--state-dir", str(state_dir))
    assert code == 6 and "already under way" in one_line(err)
    engine.tick()  # the control plane runs what the CLI committed
    code, out, _ = meshctl(capsys, "ca", "status", "-o", "json", "--state-dir", str(state_dir))
    rows = {r["generation"]: r for r in json.loads(out)}
    assert (rows["1"]["state"], rows["2"]["state"]) == ("retiring", "active")
    assert rows["2"]["active"] and rows["1"]["role"] == "root"
    code, out, _ = meshctl(capsys, "ca", "status", "--state-dir", str(state_dir))
    assert "retiring" in out and "GENERATION" in out
    store.close()


def test_a_bad_ca_flag_is_one_line_naming_it(capsys, state_dir):
    code, _, err = meshctl(capsys, "up", "--key-type", "ed448", "--state-dir", str(state_dir))
    assert code == 2 and "--key-type" in one_line(err)
    code, _, err = meshctl(capsys, "up", "--svid-ttl", "30s", "--state-dir", str(state_dir))
    assert code == 2 and "--svid-ttl" in one_line(err)


def test_node_agent_in_its_own_process_serves_what_the_control_plane_delivers_into_its_feed(tmp_path):
    import subprocess
    import time

    from spiffe import WorkloadApiClient

    from actions.ca import der_certificates, svid_der
    from actions.nodeagent import DirectoryDelivery, SvidMaterial, endpoint_socket, socket_path

    clock = SystemClock()
    ca = MeshCa(tmp_path / "ca", CaSettings(), clock)
    ca.generate("1", 720 * 3600.0)
    issued = ca.sign_svid("spiffe://example.org/ns/shop/sa/web", ("web.shop.svc",), 3600)
    feed, sockets = tmp_path / "feed", tmp_path / "sockets"
    delivery = DirectoryDelivery(feed)
    delivery.publish_bundle("example.org", der_certificates(ca.trust_anchors(("1",))))
    delivery.deliver("shop/web-1", SvidMaterial("shop/web-1/1", "spiffe://example.org/ns/shop/sa/web",
                                                der_certificates((issued.certificate, *issued.chain)),
                                                svid_der(issued)[1], issued.not_after))
    log = (tmp_path / "agent.log").open("wb")  # a file, not a pipe nobody reads: a full pipe would block the agent
    agent = subprocess.Popen([MESHCTL, "node-agent", "--socket-dir", str(sockets), "--feed-dir", str(feed),
                              "--for", "60"], stderr=log)
    try:
        path = socket_path(sockets, "shop/web-1")
        deadline = time.monotonic() + 30
        while not path.exists():
            assert agent.poll() is None and time.monotonic() < deadline, "the node agent never opened the socket"
            time.sleep(0.05)
        with WorkloadApiClient(endpoint_socket(path)) as client:
            svid = client.fetch_x509_svid()
        assert svid.leaf.serial_number == issued.certificate.serial_number
    finally:
        agent.terminate()
        assert agent.wait(timeout=30) == 0, (tmp_path / "agent.log").read_text()
        log.close()
