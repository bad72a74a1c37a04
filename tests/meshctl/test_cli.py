"""meshctl as a user meets it: state, audit, fire, db upgrade, version, up, and one-line errors."""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from actions import fake_actions
from actions.clock import SystemClock
from engine import Engine
from store import Store, migrate, sqlite_url
from tests.meshctl.support import MESHCTL, meshctl, one_line


@pytest.fixture(autouse=True)
def default_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches the user's own state directory, whatever it forgets to pass."""
    monkeypatch.setenv("MESHLOOM_STATE_DIR", str(tmp_path / "default-state"))


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def mesh(state_dir: Path) -> Store:
    """A state directory holding one CA generation and a pod that went all the way to ready."""
    url = sqlite_url(state_dir)
    state_dir.mkdir()
    migrate.upgrade(url)
    store = Store(url)
    clock = SystemClock()
    engine = Engine(store, fake_actions(clock), clock)
    engine.fire("ca", "1", "prepare", {"auto_activate": True})
    engine.fire("pod", "default/web-1", "admit", {"service_account": "web"})
    engine.fire("pod", "default/web-1", "schedule", {"node": "node-a", "ip": "10.0.0.7"})
    engine.fire("pod", "default/web-1", "sidecar_connected")
    engine.fire("sidecar", "default/web-1", "tick")  # nothing yet: the coalescing window is still open
    store_row = store.get("sidecar", "default/web-1")
    assert store_row is not None and store_row.state == "pending"
    engine.fire("sidecar", "default/web-1", "ack", {"generation": 1})
    engine.fire("pod", "default/web-1", "ready")
    return store


def test_state_on_a_state_dir_without_a_database_says_so_in_one_line_and_creates_nothing(capsys, state_dir):
    code, _, err = meshctl(capsys, "state", "pods", "--state-dir", str(state_dir))
    assert code == 5
    assert "meshctl db upgrade" in one_line(err)
    assert not (state_dir / "meshloom.db").exists()


def test_db_upgrade_creates_the_schema_and_a_second_run_changes_nothing(capsys, state_dir):
    code, out, _ = meshctl(capsys, "db", "upgrade", "--state-dir", str(state_dir))
    assert code == 0 and f"-> {migrate.head()}" in out
    code, out, _ = meshctl(capsys, "db", "upgrade", "--state-dir", str(state_dir))
    assert code == 0 and "already at schema" in out
    code, out, _ = meshctl(capsys, "state", "pods", "--state-dir", str(state_dir))
    assert code == 0 and "no pods" in out


def test_state_pods_shows_the_ready_pod_with_its_node_and_address(capsys, state_dir, mesh):
    code, out, _ = meshctl(capsys, "state", "pods", "--state-dir", str(state_dir), "-o", "json")
    assert code == 0
    [pod] = json.loads(out)
    assert (pod["pod"], pod["state"], pod["node"], pod["ip"]) == ("default/web-1", "ready", "node-a", "10.0.0.7")
    code, out, _ = meshctl(capsys, "state", "pods", "--state-dir", str(state_dir))
    assert "default/web-1" in out and "ready" in out and "10.0.0.7" in out


def test_state_certs_shows_the_spiffe_id_serial_and_time_left(capsys, state_dir, mesh):
    code, out, _ = meshctl(capsys, "state", "certs", "--state-dir", str(state_dir), "-o", "json")
    assert code == 0
    [cert] = json.loads(out)
    assert cert["spiffe_id"] == "spiffe://example.org/ns/default/sa/web"
    assert cert["state"] == "delivered" and cert["generation"] == "1" and cert["serial"]
    assert 3000 < cert["seconds_left"] <= 3600


def test_state_sidecars_shows_synced_with_its_generations(capsys, state_dir, mesh):
    code, out, _ = meshctl(capsys, "state", "sidecars", "--state-dir", str(state_dir))
    assert code == 0
    assert "SYNCED" in out
    [row] = json.loads(meshctl(capsys, "state", "sidecars", "--state-dir", str(state_dir), "-o", "json")[1])
    assert (row["status"], row["desired"], row["acked"]) == ("SYNCED", 1, 1)


def test_audit_prints_every_transition_of_the_pod_oldest_first_with_reasons(capsys, state_dir, mesh):
    code, out, _ = meshctl(capsys, "audit", "pod/default/web-1", "--state-dir", str(state_dir), "-o", "json")
    assert code == 0
    rows = json.loads(out)
    assert [r["to_state"] for r in rows] == [
        "admitted", "injected", "scheduled", "identity-requested", "identity-issued", "sidecar-connected",
        "config-synced", "ready",
    ]
    assert [r["version"] for r in rows] == list(range(1, 9))
    assert all(r["reason_text"] for r in rows)
    assert rows[1]["actor"] == "effect:InjectSidecar"
    assert rows[4]["actor"] == "cert/default/web-1/1"  # the certificate told the pod
    code, out, _ = meshctl(capsys, "audit", "pod/default/web-1", "--state-dir", str(state_dir))
    assert code == 0
    for state in ("admitted", "identity-issued", "config-synced", "ready"):
        assert state in out


def test_every_state_change_in_the_store_has_its_journal_row(mesh):
    for entity in mesh.list():
        journal = mesh.journal(entity.kind, entity.key)
        assert [j.version for j in journal] == list(range(1, entity.version + 1))
        assert journal[-1].to_state == entity.state


@pytest.mark.parametrize(
    ("argv", "code", "fragment"),
    [
        (["audit", "pod/default/nope"], 3, "pod/default/nope: no such entity"),
        (["audit", "pod"], 2, "is not KIND/KEY"),
        (["audit", "widget/a"], 2, "unknown kind 'widget'"),
        (["state", "widgets"], 2, "'widgets' is not one of"),
        (["state", "pods", "--colour"], 2, "No such option: --colour"),
        (["state", "pods", "-o", "xml"], 2, "Invalid value"),
        (["fire", "pod/default/web-1", "ready", "--payload", "{not json"], 2, "not JSON"),
    ],
)
def test_a_users_mistake_is_one_line_and_an_exit_code(capsys, state_dir, mesh, argv, code, fragment):
    got, _, err = meshctl(capsys, *argv, "--state-dir", str(state_dir))
    assert got == code
    assert fragment in one_line(err)


def snapshot(store: Store) -> tuple[object, ...]:
    entities = tuple(store.list())
    journal = tuple(j for e in entities for j in store.journal(e.kind, e.key))
    return entities, journal, tuple(store.pending_effects())


def test_an_illegal_trigger_is_refused_and_nothing_stored_changes(capsys, state_dir, mesh):
    before = snapshot(mesh)
    code, _, err = meshctl(capsys, "fire", "pod/default/web-1", "schedule", "--state-dir", str(state_dir))
    assert code == 4
    assert one_line(err) == "meshctl: pod: trigger 'schedule' is not allowed from state ready"
    assert snapshot(mesh) == before


def test_an_unknown_trigger_is_refused_and_nothing_stored_changes(capsys, state_dir, mesh):
    before = snapshot(mesh)
    code, _, err = meshctl(capsys, "fire", "pod/default/web-1", "explode", "--state-dir", str(state_dir))
    assert code == 4 and "'explode' is not allowed" in one_line(err)
    assert snapshot(mesh) == before


def test_fire_on_an_unknown_entity_is_refused(capsys, state_dir, mesh):
    before = snapshot(mesh)
    code, _, err = meshctl(capsys, "fire", "pod/default/ghost", "terminate", "--state-dir", str(state_dir))
    assert code == 3 and "no such entity" in one_line(err)
    assert snapshot(mesh) == before


def test_an_operators_trigger_is_journaled_with_the_user_and_leaves_effects_to_the_control_plane(
        capsys, state_dir, mesh):
    code, out, _ = meshctl(capsys, "fire", "pod/default/web-1", "terminate", "--state-dir", str(state_dir))
    assert code == 0 and "ready -> terminating" in out
    last = mesh.journal("pod", "default/web-1")[-1]
    assert (last.trigger, last.to_state, last.actor) == ("terminate", "terminating", f"cli:{getpass.getuser()}")
    pending = mesh.pending_effects("pod", "default/web-1")
    assert {p.effect for p in pending} == {"ReleaseIdentity", "Fire", "TeardownPod"}
    assert all(p.attempts == 0 and p.run_at <= SystemClock().now() for p in pending)  # due for the control plane


def test_an_unreachable_database_is_one_line_without_the_password(capsys, state_dir):
    url = "postgresql://mesh:s3cret@127.0.0.1:1/mesh"
    code, _, err = meshctl(capsys, "state", "pods", "--db", url)
    line = one_line(err)
    assert code == 5 and "cannot reach the database" in line and "s3cret" not in line


def test_a_database_at_an_older_schema_is_refused_and_left_as_it_was(capsys, state_dir):
    url = sqlite_url(state_dir)
    state_dir.mkdir()
    migrate.upgrade(url, "0001")
    code, _, err = meshctl(capsys, "state", "certs", "--db", url)
    assert code == 5 and "is at schema 0001" in one_line(err) and "meshctl db upgrade" in err
    assert migrate.current_at(url) == "0001"
    assert meshctl(capsys, "db", "upgrade", "--db", url)[0] == 0
    assert meshctl(capsys, "state", "certs", "--db", url)[0] == 0


def test_version_names_the_schema_it_needs_and_the_one_it_finds(capsys, state_dir, mesh):
    code, out, _ = meshctl(capsys, "version", "--state-dir", str(state_dir))
    assert code == 0
    assert f"schema needed: {migrate.head()}" in out and f": {migrate.head()}" in out.splitlines()[-1]


@pytest.mark.integration
def test_up_runs_the_engine_bootstraps_the_ca_refuses_a_second_copy_and_stops_on_sigterm(tmp_path):
    env = {**os.environ, "MESHLOOM_STATE_DIR": str(tmp_path / "state")}
    first = subprocess.Popen([MESHCTL, "up", "--tick", "0.1"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        assert first.stdout is not None
        seen = []
        for line in first.stdout:
            seen.append(line)
            if line.startswith("Ready."):
                break
        assert any("schema" in s for s in seen), seen
        second = subprocess.run([MESHCTL, "up", "--for", "0"], env=env, check=False, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 6
        assert "already runs" in second.stdout + second.stderr
        first.send_signal(signal.SIGTERM)
        rest, _ = first.communicate(timeout=60)
        assert first.returncode == 0, rest
        assert "Stopped." in rest
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    cas = subprocess.run([MESHCTL, "state", "cas", "-o", "json"], env=env, check=True, capture_output=True, text=True,
                         timeout=60)
    assert [c["state"] for c in json.loads(cas.stdout)] == ["active"]


def test_a_payload_the_trigger_cannot_use_is_one_line_and_nothing_changes(capsys, state_dir, mesh):
    before = snapshot(mesh)
    code, _, err = meshctl(capsys, "fire", "sidecar/default/web-1", "ack", "--payload", '{"generation": "abc"}',
                       "--state-dir", str(state_dir))
    assert code == 2 and "the payload of trigger 'ack' is not usable" in one_line(err)
    assert snapshot(mesh) == before


@pytest.mark.parametrize("argv", [["db", "upgrade"], ["version"], ["up", "--for", "0"]])
def test_every_command_that_opens_the_database_says_unreachable_in_one_line(capsys, state_dir, argv):
    code, _, err = meshctl(capsys, *argv, "--db", "postgresql://mesh:s3cret@127.0.0.1:1/mesh", "--state-dir",
                       str(state_dir))
    line = one_line(err)
    assert code == 5 and "cannot reach the database" in line and "s3cret" not in line


def test_a_file_that_is_not_a_database_is_one_line(capsys, tmp_path):
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("hello, this is not SQLite\n" * 100)
    code, _, err = meshctl(capsys, "state", "pods", "--db", f"sqlite:///{not_a_db}")
    assert code == 5 and "is not a database" in one_line(err)


def test_version_on_a_new_state_dir_creates_nothing(capsys, tmp_path):
    code, out, _ = meshctl(capsys, "version", "--state-dir", str(tmp_path / "new"))
    assert code == 0 and out.splitlines()[-1].endswith(": (none)")
    assert not (tmp_path / "new").exists()
