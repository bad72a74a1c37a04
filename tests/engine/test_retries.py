"""A failed effect is an event: retried with backoff kept in the rows, failed for good after the last try."""

from __future__ import annotations

from datetime import timedelta

from actions.errors import PermanentError, TemporaryError
from engine import Policy, backoff
from tests.engine.conftest import POLICY
from tests.engine.support import POD, Mesh


def _publishing_sidecar(mesh: Mesh) -> None:
    mesh.engine.fire("sidecar", POD, "register", {"owner": POD})
    mesh.clock.advance(0.1)
    mesh.engine.tick()


def test_backoff_doubles_from_one_second_and_stops_at_its_cap():
    policy = Policy()
    assert [backoff(n, policy) for n in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert backoff(3, Policy(backoff_base=0.5, backoff_cap=1.5)) == 1.5


def test_a_failing_publish_is_retried_with_exponential_backoff_kept_in_the_outbox_and_the_row(mesh: Mesh):
    mesh.publisher.down = True
    _publishing_sidecar(mesh)
    t0 = mesh.clock.now()

    (effect,) = mesh.outbox("sidecar", POD)
    assert (effect.effect, effect.attempts, effect.last_error) == ("PublishConfig", 1, "NATS unreachable")
    assert effect.run_at == t0 + timedelta(seconds=1)
    row = mesh.row("sidecar", POD)
    assert (row.state, row.retry_count, row.retry_at) == ("publishing", 1, t0 + timedelta(seconds=1))

    # Nothing runs before run_at, however often the scheduler ticks.
    mesh.clock.advance(0.999)
    assert mesh.engine.tick().effects == 0
    assert mesh.outbox("sidecar", POD)[0].attempts == 1

    mesh.advance_to(t0 + timedelta(seconds=1))
    assert mesh.engine.tick().effects == 1
    (effect,) = mesh.outbox("sidecar", POD)
    assert effect.attempts == 2 and effect.run_at == t0 + timedelta(seconds=1 + 2)
    row = mesh.row("sidecar", POD)
    assert (row.retry_count, row.retry_at) == (2, effect.run_at)

    # The failed attempts are not transitions: the journal does not grow while the effect is retried.
    assert mesh.path("sidecar", POD) == ["pending", "publishing"]

    # Back up before the last try: the next one succeeds, the outcome is fed back, the retry columns clear.
    mesh.publisher.down = False
    mesh.advance_to(effect.run_at)
    assert mesh.engine.tick().effects == 1
    row = mesh.row("sidecar", POD)
    assert (row.state, row.retry_count, row.retry_at) == ("sent", 0, None)
    assert mesh.outbox() == []
    assert mesh.publisher.history == [(POD, 1)]


def test_an_effect_that_keeps_failing_fails_its_entity_after_max_attempts_with_the_reason_journaled(mesh: Mesh):
    mesh.publisher.down = True
    _publishing_sidecar(mesh)
    t = mesh.clock.now()
    for attempt in range(1, POLICY.max_attempts):
        (effect,) = mesh.outbox("sidecar", POD)
        assert effect.attempts == attempt
        t += timedelta(seconds=backoff(attempt, POLICY))
        assert effect.run_at == t
        mesh.advance_to(t)
        mesh.engine.tick()
    assert mesh.outbox() == []
    row = mesh.row("sidecar", POD)
    assert (row.state, row.retry_count, row.retry_at) == ("failed", 0, None)
    last = mesh.journal("sidecar", POD)[-1]
    assert (last.trigger, last.to_state, last.reason, last.actor) == ("fail", "failed", "failed",
                                                                     "effect:PublishConfig")
    assert last.detail == f"gave up after {POLICY.max_attempts} attempts: NATS unreachable"
    assert row.data["failure"] == last.detail


def test_a_failed_rollout_publishes_again_on_its_own_after_its_retry_time(mesh: Mesh):
    mesh.engine.settings = {"rollout_retry_after": 30}
    mesh.publisher.down = True
    _publishing_sidecar(mesh)
    for _ in range(POLICY.max_attempts - 1):
        mesh.advance_to(mesh.outbox()[0].run_at)
        mesh.engine.tick()
    failed_at = mesh.clock.now()
    assert mesh.row("sidecar", POD).due_at == failed_at + timedelta(seconds=30)

    mesh.publisher.down = False
    mesh.clock.advance(29)
    mesh.engine.tick()
    assert mesh.state("sidecar", POD) == "failed"
    mesh.clock.advance(1)
    mesh.engine.tick()
    assert mesh.path("sidecar", POD)[-3:] == ["failed", "publishing", "sent"]
    assert mesh.journal("sidecar", POD)[-2].reason == "retry"


def test_a_temporary_error_may_name_its_own_retry_time(mesh: Mesh):
    mesh.ca_ready()
    mesh.ca.fail_next.append(TemporaryError("CA busy", retry_after=42))
    mesh.engine.fire("pod", POD, "admit")
    mesh.engine.fire("pod", POD, "schedule")
    (sign,) = mesh.outbox("cert", f"{POD}/1")
    assert (sign.effect, sign.attempts, sign.run_at) == ("SignSvid", 1, mesh.clock.now() + timedelta(seconds=42))
    mesh.clock.advance(42)
    mesh.engine.tick()
    assert mesh.state("pod", POD) == "identity-issued"


def test_a_permanent_error_fails_at_once_and_the_first_certificate_fails_its_pod(mesh: Mesh):
    mesh.ca_ready()
    mesh.ca.fail_next.append(PermanentError("identity refused"))
    mesh.engine.fire("pod", POD, "admit")
    mesh.engine.fire("pod", POD, "schedule")
    cert = f"{POD}/1"
    assert mesh.path("cert", cert) == ["requested", "failed"]
    failed = mesh.journal("cert", cert)[-1]
    assert (failed.actor, failed.detail) == ("effect:SignSvid", "identity refused")
    assert mesh.row("cert", cert).retry_count == 0  # no retry was spent on it
    assert mesh.state("pod", POD) == "failed"
    assert mesh.journal("pod", POD)[-1].detail == "identity: identity refused"
    assert mesh.journal("pod", POD)[-1].actor == f"cert/{cert}"


def test_a_failed_certificate_is_signed_again_on_its_own_after_its_retry_time(mesh: Mesh):
    mesh.ca_ready()
    mesh.ca.fail_next.append(PermanentError("HSM offline"))
    mesh.engine.fire("cert", "svc/1", "request", {"owner": "svc", "spiffe_id": "spiffe://example.org/svc",
                                                  "index": 2})
    assert mesh.state("cert", "svc/1") == "failed"
    retry_at = mesh.row("cert", "svc/1").due_at
    assert retry_at == mesh.clock.now() + timedelta(seconds=60)
    mesh.clock.advance(59)
    mesh.engine.tick()
    assert mesh.state("cert", "svc/1") == "failed"
    mesh.advance_to(retry_at)
    mesh.engine.tick()
    assert mesh.path("cert", "svc/1") == ["requested", "failed", "requested", "issued", "delivered"]
    assert mesh.delivery.current == {"svc": "svc/1"}


def test_a_delivery_that_keeps_failing_fails_the_certificate_which_then_retries_from_signing(mesh: Mesh):
    mesh.ca_ready()
    mesh.delivery.down = True
    mesh.engine.fire("cert", "svc/1", "request", {"owner": "svc", "spiffe_id": "spiffe://example.org/svc",
                                                  "index": 2})
    while mesh.outbox("cert", "svc/1"):
        mesh.advance_to(mesh.outbox("cert", "svc/1")[0].run_at)
        mesh.engine.tick()
    assert mesh.path("cert", "svc/1") == ["requested", "issued", "failed"]
    assert mesh.journal("cert", "svc/1")[-1].detail == (
        f"gave up after {POLICY.max_attempts} attempts: node agent unreachable")
    mesh.delivery.down = False
    mesh.clock.advance(60)
    mesh.engine.tick()
    assert mesh.path("cert", "svc/1")[-3:] == ["requested", "issued", "delivered"]
    assert len(mesh.ca.issued) == 2  # signed again: the first signature may be close to its half-life by now


def test_a_failed_pod_is_started_over_by_reset(mesh: Mesh):
    mesh.platform.refuse.add(POD)
    mesh.engine.fire("pod", POD, "admit")
    assert mesh.path("pod", POD) == ["admitted", "failed"]
    assert mesh.journal("pod", POD)[-1].detail == f"pod {POD}: injection refused"
    assert mesh.row("pod", POD).data["failure"] == f"pod {POD}: injection refused"

    mesh.platform.refuse.clear()
    mesh.engine.fire("pod", POD, "reset", actor="cli:operator")
    assert mesh.path("pod", POD) == ["admitted", "failed", "admitted", "injected"]
    reset = mesh.journal("pod", POD)[2]
    assert (reset.trigger, reset.reason, reset.actor) == ("reset", "reset", "cli:operator")
    assert mesh.platform.injected == {POD}


def test_a_pod_whose_step_does_not_finish_in_time_fails_on_a_tick(mesh: Mesh):
    """No CA yet: the certificate cannot be signed, and the pod must not wait for it unnoticed."""
    mesh.engine.fire("pod", POD, "admit")
    mesh.engine.fire("pod", POD, "schedule")
    assert mesh.state("pod", POD) == "identity-requested"
    deadline = mesh.row("pod", POD).due_at
    assert deadline == mesh.clock.now() + timedelta(seconds=300)
    mesh.advance_to(deadline)
    mesh.engine.tick()
    assert mesh.state("pod", POD) == "failed"
    last = mesh.journal("pod", POD)[-1]
    assert (last.reason, last.actor) == ("step-timed-out", "scheduler")
    assert mesh.row("pod", POD).data["failure"] == "step-timed-out in identity-requested"


def test_a_ca_generation_that_could_not_be_made_is_made_again_on_its_own_after_its_retry_time(mesh: Mesh):
    mesh.ca.fail_next.append(PermanentError("key store locked"))
    mesh.engine.fire("ca", "1", "prepare", {"auto_activate": True}, actor="bootstrap")
    assert mesh.path("ca", "1") == ["preparing", "failed"]
    assert mesh.journal("ca", "1")[-1].detail == "key store locked"
    retry_at = mesh.row("ca", "1").due_at
    assert retry_at == mesh.clock.now() + timedelta(seconds=60)
    mesh.advance_to(retry_at)
    mesh.engine.tick()
    assert mesh.path("ca", "1") == ["preparing", "failed", "preparing", "prepared", "prepared", "active", "active"]
    assert mesh.bundle() == ("1",)


def test_a_reset_pod_whose_certificate_healed_while_it_was_failed_takes_that_certificate(mesh: Mesh):
    mesh.ca_ready()
    mesh.ca.fail_next.append(PermanentError("HSM offline"))
    mesh.engine.fire("pod", POD, "admit")
    mesh.engine.fire("pod", POD, "schedule")
    assert mesh.state("pod", POD) == "failed"
    mesh.clock.advance(60)
    mesh.engine.tick()  # the certificate signs again on its own; its notice to the failed pod is dropped
    assert mesh.state("cert", f"{POD}/1") == "delivered"

    mesh.engine.fire("pod", POD, "reset")
    mesh.engine.fire("pod", POD, "schedule")
    assert mesh.state("pod", POD) == "identity-issued"
    assert mesh.journal("pod", POD)[-1].reason == "identity-already-issued"
    assert mesh.row("pod", POD).data["cert"] == f"{POD}/1"
    assert len(mesh.ca.issued) == 1


def test_a_reset_pod_whose_certificate_was_revoked_gets_a_new_one(mesh: Mesh):
    mesh.ca_ready()
    mesh.engine.fire("pod", POD, "admit")
    mesh.engine.fire("pod", POD, "schedule")
    mesh.engine.fire("pod", POD, "fail", {"reason": "sidecar crashed"})
    mesh.engine.fire("cert", f"{POD}/1", "revoke", actor="cli:operator")
    mesh.engine.fire("pod", POD, "reset")
    mesh.engine.fire("pod", POD, "schedule")
    assert mesh.state("pod", POD) == "identity-issued"
    assert mesh.row("pod", POD).data["cert"] == f"{POD}/2"
    assert mesh.delivery.current == {POD: f"{POD}/2"}
