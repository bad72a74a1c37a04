"""Rotation through the one periodic tick: SVIDs at half-life, CA generations prepare -> activate -> retire."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from actions import fake_actions
from actions.clock import FakeClock
from actions.errors import TemporaryError
from engine import Engine
from tests.engine.conftest import POLICY
from tests.engine.support import POD, Mesh
from tests.support.documents import DocumentedStore

CERT1, CERT2 = f"{POD}/1", f"{POD}/2"


@pytest.fixture
def jittered(sqlite_url: str):
    """A mesh whose jitter source draws 0.75, i.e. +0.5 in [-1, 1]: rotation at 55% of the lifetime."""
    clock = FakeClock()
    actions = fake_actions(clock)
    store = DocumentedStore(sqlite_url)
    yield Mesh(Engine(store, actions, clock, policy=POLICY, jitter=lambda: 0.75), store, clock, actions)
    store.close()


def _time(mesh: Mesh, kind: str, key: str, field: str) -> datetime:
    return datetime.fromisoformat(mesh.row(kind, key).data[field])


def test_a_certificate_rotates_at_half_its_life_plus_jitter_and_its_predecessor_expires_at_not_after(jittered):
    mesh = jittered
    mesh.ca_ready()
    mesh.ready_pod()
    issued = mesh.row("cert", CERT1)
    not_before, not_after = _time(mesh, "cert", CERT1, "not_before"), _time(mesh, "cert", CERT1, "not_after")
    assert not_after - not_before == timedelta(hours=1)
    rotate_at = not_before + timedelta(seconds=1800 * 1.05)
    assert _time(mesh, "cert", CERT1, "rotate_at") == rotate_at
    assert issued.due_at == rotate_at

    # A tick before rotate_at changes nothing.
    mesh.advance_to(rotate_at - timedelta(seconds=1))
    assert mesh.engine.tick().entities == 0
    assert mesh.state("cert", CERT1) == "delivered" and mesh.store.get("cert", CERT2) is None

    mesh.advance_to(rotate_at)
    assert mesh.engine.tick().entities == 1
    assert mesh.path("cert", CERT1) == ["requested", "issued", "delivered", "rotation-due", "superseded"]
    assert [(j.to_state, j.actor) for j in mesh.journal("cert", CERT1)[-2:]] == [
        ("rotation-due", "scheduler"), ("superseded", f"cert/{CERT2}")]
    assert mesh.journal("cert", CERT1)[-2].reason == "half-life-reached"
    assert mesh.path("cert", CERT2) == ["requested", "issued", "delivered"]
    successor = mesh.row("cert", CERT2)
    assert successor.data["supersedes"] == CERT1 and successor.data["index"] == 2
    assert mesh.journal("cert", CERT2)[0].actor == f"cert/{CERT1}"
    assert mesh.delivery.current == {POD: CERT2}
    assert mesh.row("cert", CERT1).due_at == not_after
    assert mesh.state("pod", POD) == "ready"  # a rotation does not bother the pod
    assert [j.trigger for j in mesh.journal("pod", POD)].count("identity_issued") == 1

    mesh.advance_to(not_after - timedelta(microseconds=1))
    mesh.engine.tick()
    assert mesh.state("cert", CERT1) == "superseded"
    mesh.advance_to(not_after)
    mesh.engine.tick()
    assert mesh.state("cert", CERT1) == "expired"
    assert mesh.journal("cert", CERT1)[-1].reason == "expired"  # replaced first: no alarm
    assert mesh.row("cert", CERT1).due_at is None
    assert mesh.state("cert", CERT2) == "delivered"  # its own half-life is further on
    assert mesh.delivery.current == {POD: CERT2}


def test_a_certificate_whose_successor_never_arrives_expires_in_use(mesh: Mesh):
    mesh.ca_ready()
    mesh.ready_pod()
    not_after = _time(mesh, "cert", CERT1, "not_after")
    mesh.engine.settings = {"cert_retry_after": 600}  # a failed successor tries again every ten minutes
    mesh.ca.fail_next.extend(TemporaryError("CA unreachable") for _ in range(3))
    mesh.delivery.down = True
    mesh.advance_to(mesh.row("cert", CERT1).due_at)
    mesh.engine.tick()
    assert mesh.state("cert", CERT1) == "rotation-due"
    for _ in range(100):
        if mesh.clock.now() >= not_after:
            break
        mesh.advance_to(min(mesh.store.next_due() or not_after, not_after))
        mesh.engine.tick()
        assert mesh.delivery.current == {POD: CERT1}
    assert mesh.state("cert", CERT1) == "expired"
    assert mesh.journal("cert", CERT1)[-1].reason == "expired-in-use"


def test_a_ca_rotation_keeps_both_generations_trusted_until_the_old_ones_leaves_are_replaced(mesh: Mesh):
    e = mesh.engine
    mesh.ca_ready()
    mesh.ready_pod()
    assert mesh.row("cert", CERT1).data["generation"] == "1"
    assert mesh.bundle() == ("1",)

    # Prepare: the new generation joins the bundle before it signs anything.
    e.fire("ca", "2", "prepare", {"previous": "1"}, actor="cli:operator")
    assert mesh.path("ca", "2") == ["preparing", "prepared", "prepared"]
    assert mesh.journal("ca", "2")[-1].reason == "bundled"
    assert mesh.bundle() == ("1", "2")
    assert mesh.state("ca", "1") == "active"

    # Activate, with the node agent down so that the old leaf cannot be replaced yet.
    mesh.delivery.down = True
    e.fire("ca", "2", "activate", actor="cli:operator")
    assert mesh.state("ca", "2") == "active"
    assert mesh.state("ca", "1") == "retiring"
    assert mesh.journal("ca", "1")[-1].actor == "ca/2"
    assert mesh.state("cert", CERT1) == "rotation-due"
    assert mesh.journal("cert", CERT1)[-1].reason == "rotation-forced"
    assert mesh.state("cert", CERT2) == "issued"
    assert mesh.row("cert", CERT2).data["generation"] == "2"  # signed by the new generation

    # The retiring generation checks its leaves each interval and stays in the bundle while one is outstanding.
    check_at = mesh.row("ca", "1").due_at
    assert check_at == mesh.clock.now() + timedelta(seconds=60)
    mesh.advance_to(check_at)
    mesh.engine.tick()
    assert mesh.state("ca", "1") == "retiring"
    assert mesh.journal("ca", "1")[-1].reason == "leaves-outstanding"
    assert mesh.bundle() == ("1", "2")

    # The node agent is back: the new leaf is delivered, the old one superseded.
    mesh.delivery.down = False
    mesh.advance_to(mesh.outbox("cert", CERT2)[0].run_at)
    mesh.engine.tick()
    assert mesh.state("cert", CERT1) == "superseded"
    assert mesh.delivery.current == {POD: CERT2}
    assert mesh.state("ca", "1") == "retiring"  # not before its next check

    mesh.advance_to(mesh.row("ca", "1").due_at)
    mesh.engine.tick()
    assert mesh.state("ca", "1") == "retired"
    assert mesh.bundle() == ("2",)
    assert mesh.row("ca", "1").due_at is None
    assert mesh.path("ca", "1") == ["preparing", "prepared", "prepared", "active", "active", "retiring", "retiring",
                                    "retiring", "retiring", "retired"]
    assert [j.reason for j in mesh.journal("ca", "1")[5:]] == ["retiring", "retiring", "leaves-outstanding",
                                                               "retiring", "retired"]
    assert [j.actor for j in mesh.journal("ca", "1")[5:]] == [
        "ca/2", "scheduler", "effect:CountOutstandingLeaves", "scheduler", "effect:CountOutstandingLeaves"]


def test_a_ca_generation_whose_leaves_expire_unreplaced_retires_once_they_have(mesh: Mesh):
    e = mesh.engine
    mesh.ca_ready()
    e.fire("cert", "svc/1", "request", {"owner": "svc", "spiffe_id": "spiffe://example.org/svc", "index": 1,
                                        "ttl_seconds": 330})
    not_after = _time(mesh, "cert", "svc/1", "not_after")  # halfway between two of the old generation's checks
    # The node agent is down for the rest of the leaf's life: its successor is signed but never delivered.
    mesh.delivery.down = True
    e.fire("ca", "2", "prepare", {"previous": "1", "auto_activate": True})
    assert mesh.state("ca", "1") == "retiring"
    assert mesh.state("cert", "svc/1") == "rotation-due"
    for _ in range(100):
        if mesh.clock.now() >= not_after:
            break
        mesh.advance_to(min(mesh.store.next_due() or not_after, not_after))
        mesh.engine.tick()
        if mesh.clock.now() < not_after:
            assert mesh.state("ca", "1") == "retiring"
            assert mesh.bundle() == ("1", "2")
    assert mesh.state("cert", "svc/1") == "expired"
    assert mesh.journal("cert", "svc/1")[-1].reason == "expired-in-use"
    assert mesh.state("cert", "svc/2") in ("failed", "requested", "issued")  # still trying, never delivered
    assert mesh.state("ca", "1") == "retiring"
    mesh.advance_to(mesh.row("ca", "1").due_at)
    assert mesh.clock.now() == not_after + timedelta(seconds=30)
    mesh.engine.tick()
    assert mesh.state("ca", "1") == "retired"
    assert mesh.bundle() == ("2",)
