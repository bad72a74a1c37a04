"""The pod lifecycle, pair by pair: every (state, trigger) against a table written out by hand."""

from __future__ import annotations

import pytest

from machines import SPECS, Context, IllegalTrigger
from machines.base import Fire
from machines.effects import InjectSidecar, ReleaseIdentity, RequestIdentity, TeardownPod
from machines.pod import PodReason as R
from machines.pod import PodState as S
from tests.machines.tables import ILLEGAL, T0, Case, Moves, Nothing, at, check, context, product_params

SPEC = SPECS["pod"]
KEY = "default/web-1"
BASE = {"namespace": "default", "name": "web-1", "service_account": "web", "labels": {"app": "web"}}
DEADLINE = at(300)  # the default step timeout

TRIGGERS = ("admit", "injected", "schedule", "identity_requested", "identity_issued", "sidecar_connected",
            "config_synced", "ready", "tick", "terminate", "gone", "fail", "reset")

TERMINATE = Moves(S.terminating, R.TERMINATING,
                  effects=(ReleaseIdentity(KEY), Fire("sidecar", KEY, "remove"), TeardownPod(KEY)))


def fail_cases() -> tuple[Case, ...]:
    return (
        Case("with a reason", Moves(S.failed, R.FAILED, data={"failure": "identity: CA refused"}),
             payload={"reason": "identity: CA refused"}),
        Case("without a reason", Moves(S.failed, R.FAILED, data={"failure": "unknown"})),
    )


def deadline_cases(state: S) -> tuple[Case, ...]:
    """The steps the mesh drives time out: a tick only counts once the deadline the pod asked for has come."""
    return (
        Case("before the deadline", Nothing, now=at(299), due_at=DEADLINE),
        Case("at the deadline", Moves(S.failed, R.STEP_TIMED_OUT, data={"failure": f"step-timed-out in {state.value}"}),
             now=DEADLINE, due_at=DEADLINE),
        Case("after the deadline", Moves(S.failed, R.STEP_TIMED_OUT), now=at(301), due_at=DEADLINE),
        Case("with no deadline saved", Nothing, now=at(10_000), due_at=None),
    )


ADMITTED = Moves(S.admitted, R.RESET, effects=(InjectSidecar(KEY),), due=DEADLINE)

TABLE: dict[tuple[S, str], tuple[Case, ...]] = {
    (S.admitted, "injected"): (Case("always", Moves(S.injected, R.INJECTED)),),
    (S.admitted, "tick"): deadline_cases(S.admitted),
    (S.admitted, "terminate"): (Case("always", TERMINATE),),
    (S.admitted, "fail"): fail_cases(),

    (S.injected, "schedule"): (
        Case("with a node and an address",
             Moves(S.scheduled, R.SCHEDULED, due=DEADLINE, data={"node": "node-a", "ip": "10.0.0.7"},
                   effects=(RequestIdentity(KEY, "spiffe://example.org/ns/default/sa/web",
                                            ("web-1.default.pod", "web.default.sa")),)),
             payload={"node": "node-a", "ip": "10.0.0.7"}),
        Case("in another trust domain",
             Moves(S.scheduled, R.SCHEDULED, due=DEADLINE,
                   effects=(RequestIdentity(KEY, "spiffe://mesh.test/ns/default/sa/web",
                                            ("web-1.default.pod", "web.default.sa")),)),
             settings={"trust_domain": "mesh.test"}),
    ),
    (S.injected, "terminate"): (Case("always", TERMINATE),),
    (S.injected, "fail"): fail_cases(),

    (S.scheduled, "identity_requested"): (
        Case("always", Moves(S.identity_requested, R.IDENTITY_REQUESTED, due=DEADLINE)),
        Case("when its certificate is already issued (started over)",
             Moves(S.identity_issued, R.IDENTITY_ALREADY_ISSUED, data={"cert": f"{KEY}/1"}),
             payload={"issued": f"{KEY}/1"}),
        Case("with a custom step timeout", Moves(S.identity_requested, R.IDENTITY_REQUESTED, due=at(30)),
             settings={"pod_step_timeout": 30}),
    ),
    (S.scheduled, "tick"): deadline_cases(S.scheduled),
    (S.scheduled, "terminate"): (Case("always", TERMINATE),),
    (S.scheduled, "fail"): fail_cases(),

    (S.identity_requested, "identity_issued"): (
        # No deadline: the sidecar's start is the platform's (a kubelet pulls the images first), as scheduling is.
        Case("always", Moves(S.identity_issued, R.IDENTITY_ISSUED, data={"cert": f"{KEY}/1"}),
             payload={"cert": f"{KEY}/1"}),
    ),
    (S.identity_requested, "tick"): deadline_cases(S.identity_requested),
    (S.identity_requested, "terminate"): (Case("always", TERMINATE),),
    (S.identity_requested, "fail"): fail_cases(),

    (S.identity_issued, "sidecar_connected"): (
        Case("always", Moves(S.sidecar_connected, R.SIDECAR_CONNECTED, due=DEADLINE,
                             effects=(Fire("sidecar", KEY, "register", {"owner": KEY}),))),
    ),
    (S.identity_issued, "terminate"): (Case("always", TERMINATE),),
    (S.identity_issued, "fail"): fail_cases(),

    (S.sidecar_connected, "config_synced"): (Case("always", Moves(S.config_synced, R.CONFIG_SYNCED, due=DEADLINE)),),
    (S.sidecar_connected, "tick"): deadline_cases(S.sidecar_connected),
    (S.sidecar_connected, "terminate"): (Case("always", TERMINATE),),
    (S.sidecar_connected, "fail"): fail_cases(),

    (S.config_synced, "ready"): (Case("always", Moves(S.ready, R.READY, due=None)),),
    (S.config_synced, "tick"): deadline_cases(S.config_synced),
    (S.config_synced, "terminate"): (Case("always", TERMINATE),),
    (S.config_synced, "fail"): fail_cases(),

    (S.ready, "terminate"): (Case("always", TERMINATE),),
    (S.ready, "fail"): fail_cases(),

    (S.terminating, "gone"): (Case("always", Moves(S.gone, R.GONE)),),
    (S.terminating, "fail"): fail_cases(),

    (S.gone, "admit"): (
        Case("created again under its name", Moves(
            S.admitted, R.READMITTED, effects=(InjectSidecar(KEY),), due=DEADLINE,
            data={"service_account": "api", "labels": {"app": "api"}, "node": None, "ip": None, "cert": None}),
             payload={"service_account": "api", "labels": {"app": "api"}},
             data={"node": "node-a", "ip": "10.0.0.7", "cert": f"{KEY}/1"}),
        Case("with a custom step timeout", Moves(S.admitted, R.READMITTED, effects=(InjectSidecar(KEY),),
                                                 due=at(30)), settings={"pod_step_timeout": 30}),
    ),

    (S.failed, "reset"): (Case("always", ADMITTED),),
    (S.failed, "terminate"): (Case("always", TERMINATE),),
}


def test_the_table_names_every_trigger_of_the_pod_lifecycle():
    assert set(TRIGGERS) == SPEC.triggers
    assert {t for _, t in TABLE} <= set(TRIGGERS)


@pytest.mark.parametrize(("state", "trigger", "case"), product_params(S, TRIGGERS, TABLE))
def test_every_state_takes_exactly_the_triggers_in_the_table(state, trigger, case):
    check(SPEC, state, trigger, context(KEY, BASE, case), case.outcome)


def test_admitting_a_pod_creates_it_and_asks_for_its_sidecar_under_a_deadline():
    ctx = Context(KEY, {}, {"service_account": "web", "labels": {"app": "web"}}, T0)
    step = check(SPEC, None, "admit", ctx, Moves(S.admitted, R.ADMITTED, effects=(InjectSidecar(KEY),), due=DEADLINE))
    assert step is not None
    assert step.data == {"namespace": "default", "name": "web-1", "service_account": "web", "labels": {"app": "web"}}


def test_admitting_a_pod_takes_namespace_and_name_from_the_payload_over_the_key():
    ctx = Context("x/y", {}, {"namespace": "prod", "name": "api-0"}, T0)
    step = SPEC.step(None, "admit", ctx)
    assert step is not None
    assert (step.data["namespace"], step.data["name"], step.data["service_account"]) == ("prod", "api-0", "default")


@pytest.mark.parametrize("trigger", [t for t in TRIGGERS if t != "admit"])
def test_a_trigger_other_than_admit_on_a_pod_that_does_not_exist_is_illegal(trigger):
    check(SPEC, None, trigger, Context(KEY, {}, {}, T0), ILLEGAL)


def test_admitting_a_pod_that_exists_is_illegal_unless_it_is_gone():
    for state in S:
        if state is not S.gone:
            check(SPEC, state, "admit", Context(KEY, BASE, {}, T0), ILLEGAL)


def test_a_pod_created_again_after_it_was_gone_starts_over_with_only_the_new_incarnations_data():
    old = {**BASE, "node": "node-a", "ip": "10.0.0.7", "cert": f"{KEY}/3", "failure": "step-timed-out in scheduled"}
    step = SPEC.step(S.gone, "admit", Context(KEY, old, {"namespace": "default", "name": "web-1",
                                                         "service_account": "web-v2"}, T0))
    assert step is not None and (step.source, step.dest, step.reason) == (S.gone, S.admitted, "readmitted")
    assert step.data == {"namespace": "default", "name": "web-1", "service_account": "web-v2", "labels": {},
                         "node": None, "ip": None, "cert": None, "failure": None}
    # Its certificate is asked for anew once it is scheduled, under the new service account.
    scheduled = SPEC.step(S.injected, "schedule", Context(KEY, step.data, {"node": "node-b", "ip": "10.0.0.9"}, T0))
    assert scheduled is not None
    assert scheduled.effects == (RequestIdentity(KEY, "spiffe://example.org/ns/default/sa/web-v2",
                                                 ("web-1.default.pod", "web-v2.default.sa")),)


def test_an_unknown_trigger_is_illegal():
    with pytest.raises(IllegalTrigger):
        SPEC.step(S.ready, "explode", Context(KEY, BASE, {}, T0))


def test_a_tick_before_the_deadline_changes_nothing_and_one_after_it_fails_the_pod_with_its_step():
    ctx = Context(KEY, BASE, {}, at(299.999), due_at=DEADLINE)
    assert SPEC.step(S.identity_requested, "tick", ctx) is None
    step = SPEC.step(S.identity_requested, "tick", Context(KEY, BASE, {}, DEADLINE, due_at=DEADLINE))
    assert step is not None and step.dest is S.failed
    assert step.data["failure"] == "step-timed-out in identity-requested"


def test_waiting_to_be_scheduled_has_no_deadline_because_the_platform_decides_it():
    step = SPEC.step(S.admitted, "injected", Context(KEY, BASE, {}, T0, due_at=DEADLINE))
    assert step is not None and step.due_at is None
    with pytest.raises(IllegalTrigger):
        SPEC.step(S.injected, "tick", Context(KEY, BASE, {}, at(10_000), due_at=DEADLINE))
