"""A pod's whole way in through the engine: every change of state committed, journaled, and its effects run."""

from __future__ import annotations

from tests.engine.support import POD, Mesh


def test_a_pod_is_admitted_scheduled_connected_synced_and_ready_with_every_step_journaled(mesh: Mesh):
    mesh.ca_ready()
    mesh.ready_pod()

    journal = mesh.journal("pod", POD)
    assert [j.to_state for j in journal] == ["admitted", "injected", "scheduled", "identity-requested",
                                             "identity-issued", "sidecar-connected", "config-synced", "ready"]
    assert [j.version for j in journal] == list(range(1, len(journal) + 1))
    assert [j.from_state for j in journal] == [None] + [j.to_state for j in journal[:-1]]
    assert [(j.trigger, j.actor) for j in journal] == [
        ("admit", "platform"),
        ("injected", "effect:InjectSidecar"),
        ("schedule", "platform"),
        ("identity_requested", "effect:RequestIdentity"),
        ("identity_issued", f"cert/{POD}/1"),  # the certificate told its pod
        ("sidecar_connected", "sidecar"),
        ("config_synced", f"sidecar/{POD}"),  # the sidecar's first acknowledgement told its pod
        ("ready", "sidecar"),
    ]
    assert [j.reason for j in journal] == ["admitted", "injected", "scheduled", "identity-requested",
                                           "identity-issued", "sidecar-connected", "config-synced", "ready"]
    pod = mesh.row("pod", POD)
    assert pod.version == len(journal)
    assert pod.due_at is None  # a ready pod waits for nothing
    assert pod.data["node"] == "node-a" and pod.data["cert"] == f"{POD}/1"

    cert = mesh.journal("cert", f"{POD}/1")
    assert [(j.to_state, j.actor) for j in cert] == [
        ("requested", f"pod/{POD}"),
        ("issued", "effect:SignSvid"),
        ("delivered", "effect:DeliverSvid"),
    ]
    assert [j.version for j in cert] == [1, 2, 3]

    sidecar = mesh.journal("sidecar", POD)
    assert [(j.to_state, j.actor) for j in sidecar] == [
        ("pending", f"pod/{POD}"),
        ("publishing", "scheduler"),
        ("sent", "effect:PublishConfig"),
        ("synced", "sidecar"),
    ]

    assert mesh.outbox() == []  # every effect ran and its outcome was fed back
    assert mesh.platform.injected == {POD}
    assert mesh.delivery.current == {POD: f"{POD}/1"}
    assert mesh.publisher.published == {POD: 1}
    assert mesh.ca.issued[0].generation == "1"
    assert mesh.row("cert", f"{POD}/1").data["generation"] == "1"


def test_the_first_ca_generation_is_prepared_published_and_activated_at_bootstrap(mesh: Mesh):
    mesh.ca_ready()
    assert [(j.to_state, j.actor) for j in mesh.journal("ca", "1")] == [
        ("preparing", "bootstrap"),
        ("prepared", "effect:GenerateCa"),
        ("prepared", "effect:JoinBundle"),  # in the bundle before it signs anything
        ("active", "ca/1"),
        ("active", "effect:ActivateCa"),  # the CA signs with it
    ]
    assert mesh.bundle() == ("1",)


def test_a_pod_terminated_when_ready_releases_its_identity_and_is_gone(mesh: Mesh):
    mesh.ca_ready()
    mesh.ready_pod()
    mesh.engine.fire("pod", POD, "terminate", actor="platform")
    assert mesh.path("pod", POD)[-2:] == ["terminating", "gone"]
    assert mesh.state("cert", f"{POD}/1") == "revoked"
    assert mesh.state("sidecar", POD) == "removed"
    assert mesh.delivery.current == {} and mesh.publisher.published == {}
    assert POD in mesh.platform.torn_down
    assert mesh.outbox() == []


def test_a_pod_terminated_before_its_sidecar_registered_is_still_torn_down(mesh: Mesh):
    """The notice to a sidecar that never existed is moot, not an error that stops the rest."""
    mesh.engine.fire("pod", POD, "admit")
    mesh.engine.fire("pod", POD, "terminate")
    assert mesh.path("pod", POD) == ["admitted", "injected", "terminating", "gone"]
    assert mesh.store.get("sidecar", POD) is None
    assert mesh.outbox() == []


def test_a_sidecar_change_is_published_once_per_window_and_acknowledged(mesh: Mesh):
    e = mesh.engine
    e.fire("sidecar", POD, "register", {"owner": POD})
    for _ in range(3):
        mesh.clock.advance(0.05)
        e.fire("sidecar", POD, "change")
    assert e.tick().entities == 0  # 50 ms after the last change: the window is still open
    mesh.clock.advance(0.1)
    report = e.tick()
    assert report.entities == 1
    assert mesh.publisher.history == [(POD, 4)]
    assert mesh.state("sidecar", POD) == "sent"
    e.fire("sidecar", POD, "ack", {"generation": 4})
    assert mesh.state("sidecar", POD) == "synced"
