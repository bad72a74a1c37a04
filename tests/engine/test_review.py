"""Lives that must end, orders that must hold, and a bad row that must not stop the others."""

from __future__ import annotations

import pytest

from actions.errors import PermanentError, TemporaryError
from machines import BadPayload
from store import NewEffect, Transition
from tests.engine.support import POD, Mesh


def test_a_terminated_pod_whose_certificate_had_failed_gets_no_more_certificates(mesh: Mesh):
    mesh.ca_ready()
    mesh.ca.fail_next.append(PermanentError("HSM offline"))
    mesh.engine.fire("pod", POD, "admit")
    mesh.engine.fire("pod", POD, "schedule")
    assert mesh.state("cert", f"{POD}/1") == "failed"
    mesh.engine.fire("pod", POD, "terminate")
    assert mesh.state("pod", POD) == "gone"
    assert mesh.state("cert", f"{POD}/1") == "revoked"
    for _ in range(12):  # six hours of half-hour ticks
        mesh.clock.advance(1800)
        mesh.engine.tick()
    assert mesh.ca.issued == []
    assert [c.key for c in mesh.store.list("cert")] == [f"{POD}/1"]


def test_a_new_generation_signs_nothing_until_the_bundle_with_it_is_published(mesh: Mesh):
    mesh.ca_ready()
    mesh.ready_pod()
    fail_once = [TemporaryError("node agents unreachable")]
    publish = mesh.delivery.publish_bundle

    def flaky(trust_domain: str, roots: tuple[bytes, ...]) -> None:
        if fail_once:
            raise fail_once.pop()
        publish(trust_domain, roots)

    mesh.delivery.publish_bundle = flaky  # type: ignore[method-assign]
    mesh.engine.fire("ca", "2", "prepare", {"previous": "1", "auto_activate": True}, actor="cli:operator")
    assert mesh.state("ca", "2") == "prepared"
    assert mesh.engine.fire("ca", "2", "activate", actor="cli:operator").state == "prepared"  # refused: not bundled
    assert mesh.state("cert", f"{POD}/1") == "delivered" and len(mesh.ca.issued) == 1

    mesh.advance_to(mesh.outbox("ca", "2")[0].run_at)
    mesh.engine.tick()
    assert mesh.bundle() == ("1", "2")
    assert [j.reason for j in mesh.journal("ca", "2")][-3:] == ["bundled", "activated", "signing"]
    assert mesh.row("cert", f"{POD}/2").data["generation"] == "2"


def test_a_generation_the_ca_could_not_activate_fails_instead_of_claiming_to_sign(mesh: Mesh):
    mesh.ca_ready()
    mesh.engine.fire("ca", "2", "prepare", {"previous": "1"})

    def refuse(generation: str) -> None:
        raise PermanentError("HSM refused")

    mesh.ca.activate = refuse  # type: ignore[method-assign]
    mesh.engine.fire("ca", "2", "activate")
    assert mesh.state("ca", "2") == "failed"
    assert mesh.journal("ca", "2")[-1].detail == "HSM refused"
    assert mesh.state("ca", "1") == "active"  # never asked to retire


def test_an_outbox_row_that_cannot_be_read_does_not_stop_the_other_retries(mesh: Mesh):
    now = mesh.clock.now()
    mesh.store.apply(Transition("sidecar", "default/odd", 0, None, "pending", "register", "registered", "test", now,
                                {"owner": "default/odd", "desired": 1, "sent": 0, "acked": 0,
                                 "window_start": now.isoformat(), "republishes": 0, "owner_notified": False},
                                None, effects=(NewEffect("RenamedEffect", {}, now),)))
    mesh.publisher.down = True
    mesh.engine.fire("sidecar", POD, "register", {"owner": POD})
    mesh.clock.advance(0.1)
    mesh.engine.tick()
    assert mesh.state("sidecar", POD) == "publishing"
    [odd] = mesh.outbox("sidecar", "default/odd")
    assert odd.attempts == 1 and "cannot be read" in (odd.last_error or "")

    mesh.publisher.down = False
    mesh.clock.advance(60)
    mesh.engine.tick()
    assert mesh.state("sidecar", POD) == "sent"


def test_a_pod_started_over_after_its_sidecar_registered_becomes_ready_again(mesh: Mesh):
    mesh.ca_ready()
    mesh.ready_pod()
    e = mesh.engine
    e.fire("pod", POD, "fail", {"reason": "proxy crashed"})
    e.fire("pod", POD, "reset")
    e.fire("pod", POD, "schedule")
    e.fire("pod", POD, "sidecar_connected")
    assert mesh.state("sidecar", POD) == "pending"
    assert mesh.journal("sidecar", POD)[-1].reason == "registered-again"
    mesh.clock.advance(0.1)
    e.tick()
    e.fire("sidecar", POD, "ack", {"generation": mesh.row("sidecar", POD).data["desired"]})
    assert mesh.state("pod", POD) == "config-synced"
    e.fire("pod", POD, "ready")
    assert mesh.state("pod", POD) == "ready"


@pytest.mark.parametrize(("kind", "key", "trigger", "payload", "fragment"), [
    ("sidecar", POD, "ack", {"generation": "abc"}, "invalid literal"),
    ("cert", f"{POD}/1", "request", {}, "'owner' is missing"),
])
def test_a_payload_a_rule_cannot_use_is_refused_by_name_and_nothing_is_written(mesh, kind, key, trigger, payload,
                                                                                fragment):
    mesh.engine.fire("sidecar", POD, "register", {"owner": POD})
    before = mesh.store.list(), mesh.outbox()
    with pytest.raises(BadPayload, match=fragment) as raised:
        mesh.engine.fire(kind, key, trigger, payload)
    assert f"the payload of trigger '{trigger}'" in str(raised.value)
    assert (mesh.store.list(), mesh.outbox()) == before


def test_a_due_entity_whose_tick_fails_does_not_stop_the_others(mesh: Mesh):
    now = mesh.clock.now()
    # A certificate whose data lost the field its tick guard reads: its tick raises, every time.
    mesh.store.apply(Transition("cert", "broken/1", 0, None, "delivered", "request", "requested", "test", now,
                                {"owner": "broken", "rotate_at": "not a time"}, now))
    mesh.engine.fire("sidecar", POD, "register", {"owner": POD})
    mesh.clock.advance(0.1)
    mesh.engine.tick()  # the broken certificate is due first, and raises
    assert mesh.state("sidecar", POD) == "sent"
    assert mesh.state("cert", "broken/1") == "delivered"
