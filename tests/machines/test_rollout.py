"""The configuration rollout of one sidecar, pair by pair, and its windows: coalescing and stale backoff."""

from __future__ import annotations

import pytest

from machines import SPECS, Context
from machines.base import Fire
from machines.effects import DeleteConfig, PublishConfig
from machines.rollout import RolloutReason as R
from machines.rollout import RolloutState as S
from machines.rollout import SyncStatus, sync_status
from tests.machines.tables import ILLEGAL, T0, Case, Entity, Moves, Nothing, at, check, context, product_params

SPEC = SPECS["sidecar"]
KEY = "default/web-1"
OWNER = "default/web-1"

# desired / sent / acked as each state means them (see the theory of operation in machines/rollout.py).
COMMON = {"owner": OWNER, "window_start": T0.isoformat(), "republishes": 0, "owner_notified": True}
DATA = {
    S.pending: {**COMMON, "desired": 3, "sent": 2, "acked": 2},
    S.publishing: {**COMMON, "desired": 3, "sent": 2, "acked": 2},
    S.sent: {**COMMON, "desired": 3, "sent": 3, "acked": 2},
    S.synced: {**COMMON, "desired": 3, "sent": 3, "acked": 3},
    S.stale: {**COMMON, "desired": 3, "sent": 3, "acked": 2, "republishes": 2},
    S.failed: {**COMMON, "desired": 3, "sent": 2, "acked": 2},
    S.removed: {**COMMON, "desired": 3, "sent": 3, "acked": 3},
}
# The tick each state asked for, where it asked for one.
DUE = {S.pending: at(0.1), S.sent: at(5), S.stale: at(20), S.failed: at(30)}

TRIGGERS = ("register", "change", "tick", "published", "ack", "fail", "remove")

PUBLISH = PublishConfig(KEY, 3)
REMOVE = (Case("always", Moves(S.removed, R.REMOVED, effects=(DeleteConfig(KEY),))),)


def register_cases() -> tuple[Case, ...]:
    """A sidecar that connects again gets its document anew, and its next first acknowledgement tells the pod."""
    return (Case("again", Moves(S.pending, R.REREGISTERED, due=at(50.1),
                                data={"desired": 4, "window_start": at(50).isoformat(), "owner_notified": False,
                                      "republishes": 0}),
                 now=at(50)),)


def ack_cases(state: S) -> tuple[Case, ...]:
    due = DUE.get(state)
    return (
        Case("of the desired generation, the first ever, which tells the pod",
             Moves(S.synced, R.FIRST_ACK, effects=(Fire("pod", OWNER, "config_synced"),),
                   data={"acked": 3, "owner_notified": True, "republishes": 0}),
             payload={"generation": 3}, data={"owner_notified": False}, due_at=due),
        Case("of the desired generation", Moves(S.synced, R.ACKNOWLEDGED, data={"acked": 3, "republishes": 0}),
             payload={"generation": 3}, due_at=due),
        Case("of a generation newer than desired", Moves(S.synced, R.ACKNOWLEDGED, data={"acked": 4}),
             payload={"generation": 4}, due_at=due),
        Case("of an older generation, which keeps the tick it had",
             Moves(state, R.OLD_ACK, due=due, data={"acked": max(2, DATA[state]["acked"])}),
             payload={"generation": 2}, due_at=due),
    )


def change_after_publishing() -> tuple[Case, ...]:
    """A change after a publish opens a new burst: quiet window from now, maximum window from now."""
    return (Case("opens a new burst", Moves(S.pending, R.CHANGED, due=at(50.1),
                                            data={"desired": 4, "window_start": at(50).isoformat()}),
                 now=at(50)),)


def fail_cases() -> tuple[Case, ...]:
    return (
        Case("with a reason", Moves(S.failed, R.FAILED, due=at(30), data={"failure": "NATS unreachable"}),
             payload={"reason": "NATS unreachable"}),
        Case("with a custom retry time", Moves(S.failed, R.FAILED, due=at(2), data={"failure": "unknown"}),
             settings={"rollout_retry_after": 2}),
    )


TABLE: dict[tuple[S, str], tuple[Case, ...]] = {
    (S.pending, "register"): register_cases(),
    (S.publishing, "register"): register_cases(),
    (S.sent, "register"): register_cases(),
    (S.synced, "register"): register_cases(),
    (S.stale, "register"): register_cases(),
    (S.failed, "register"): register_cases(),
    (S.removed, "register"): register_cases(),
    (S.pending, "change"): (
        Case("inside the window, which waits for quiet again", Moves(S.pending, R.CHANGED, due=at(1.1),
                                                                     data={"desired": 4,
                                                                           "window_start": T0.isoformat()}),
             now=at(1), due_at=at(1)),
        Case("near the end of the maximum window, which caps the wait", Moves(S.pending, R.CHANGED, due=at(10)),
             now=at(9.95), due_at=at(9.95)),
    ),
    (S.pending, "tick"): (
        Case("before the window closes", Nothing, now=at(0.05), due_at=at(0.1)),
        Case("when the window closes", Moves(S.publishing, R.WINDOW_CLOSED, effects=(PUBLISH,), due=None),
             now=at(0.1), due_at=at(0.1)),
    ),
    (S.pending, "ack"): ack_cases(S.pending),
    (S.pending, "remove"): REMOVE,

    (S.publishing, "change"): (
        Case("while publishing, which waits for the outcome",
             Moves(S.publishing, R.CHANGED, due=None, data={"desired": 4, "window_start": at(1).isoformat()}),
             now=at(1)),
    ),
    (S.publishing, "published"): (
        Case("of the desired generation", Moves(S.sent, R.PUBLISHED, due=at(5), data={"sent": 3}),
             payload={"generation": 3}),
        Case("of a generation a change overtook", Moves(S.pending, R.OVERTAKEN, due=at(0.1), data={"sent": 2}),
             payload={"generation": 2}),
        Case("overtaken late in the maximum window", Moves(S.pending, R.OVERTAKEN, due=at(10)),
             payload={"generation": 2}, now=at(9.99)),
    ),
    (S.publishing, "ack"): ack_cases(S.publishing),
    (S.publishing, "fail"): fail_cases(),
    (S.publishing, "remove"): REMOVE,

    (S.sent, "change"): change_after_publishing(),
    (S.sent, "tick"): (
        Case("before the acknowledgement deadline", Nothing, now=at(4.9), due_at=at(5)),
        Case("at the acknowledgement deadline, which republishes",
             Moves(S.stale, R.ACK_TIMED_OUT, effects=(PUBLISH,), due=None, data={"republishes": 1}),
             now=at(5), due_at=at(5)),
    ),
    (S.sent, "ack"): ack_cases(S.sent),
    (S.sent, "remove"): REMOVE,

    (S.synced, "change"): change_after_publishing(),
    (S.synced, "published"): (
        Case("late, which changes nothing but the count", Moves(S.synced, R.PUBLISHED, data={"sent": 3}),
             payload={"generation": 3}),
    ),
    (S.synced, "ack"): ack_cases(S.synced),
    (S.synced, "remove"): REMOVE,

    (S.stale, "change"): change_after_publishing(),
    (S.stale, "published"): (
        Case("as a republish, which backs off", Moves(S.stale, R.REPUBLISHED, due=at(20), data={"sent": 3}),
             payload={"generation": 3}),
    ),
    (S.stale, "tick"): (
        Case("before its backoff is over", Nothing, now=at(19), due_at=at(20)),
        Case("when its backoff is over", Moves(S.stale, R.ACK_TIMED_OUT, effects=(PUBLISH,), data={"republishes": 3}),
             now=at(20), due_at=at(20)),
    ),
    (S.stale, "ack"): ack_cases(S.stale),
    (S.stale, "fail"): fail_cases(),
    (S.stale, "remove"): REMOVE,

    (S.failed, "change"): change_after_publishing(),
    (S.failed, "tick"): (
        Case("before its retry time", Nothing, now=at(29), due_at=at(30)),
        Case("at its retry time", Moves(S.publishing, R.RETRY, effects=(PUBLISH,)), now=at(30), due_at=at(30)),
    ),
    (S.failed, "ack"): ack_cases(S.failed),
    (S.failed, "remove"): REMOVE,
}


def test_the_table_names_every_trigger_of_the_rollout_lifecycle():
    assert set(TRIGGERS) == SPEC.triggers


@pytest.mark.parametrize(("state", "trigger", "case"), product_params(S, TRIGGERS, TABLE))
def test_every_state_takes_exactly_the_triggers_in_the_table(state, trigger, case):
    check(SPEC, state, trigger, context(KEY, DATA[state], case), case.outcome)


def test_registering_a_sidecar_creates_its_first_generation_and_opens_a_window():
    step = check(SPEC, None, "register", Context(KEY, {}, {"owner": OWNER}, T0),
                 Moves(S.pending, R.REGISTERED, due=at(0.1)))
    assert step is not None
    assert step.data == {"owner": OWNER, "desired": 1, "sent": 0, "acked": 0, "window_start": T0.isoformat(),
                         "republishes": 0, "owner_notified": False}


@pytest.mark.parametrize("trigger", [t for t in TRIGGERS if t != "register"])
def test_a_trigger_other_than_register_on_a_sidecar_that_does_not_exist_is_illegal(trigger):
    check(SPEC, None, trigger, Context(KEY, {}, {}, T0), ILLEGAL)


# ---- the coalescing window ---------------------------------------------------------------------------------------
def test_a_burst_of_changes_publishes_once_a_quiet_100_ms_after_the_last_change():
    sidecar = Entity(SPEC, KEY, {"owner": OWNER}, T0)
    for ms in (30, 60, 90, 120):
        sidecar.fire("change", at(ms / 1000))
        assert sidecar.state is S.pending and sidecar.due_at == at(ms / 1000 + 0.1)
    assert sidecar.fire("tick", at(0.219)) is None  # 99 ms after the last change: still quiet-waiting
    step = sidecar.fire("tick", at(0.220))
    assert step is not None and step.dest is S.publishing
    assert step.effects == (PublishConfig(KEY, 5),)  # one publish for the registration and its four changes


def test_a_steady_trickle_of_changes_cannot_postpone_a_publish_past_10_s_after_the_first_change():
    sidecar = Entity(SPEC, KEY, {"owner": OWNER}, T0)
    published_at = None
    for n in range(1, 400):
        now = at(n * 50 / 1000)  # a change every 50 ms: never 100 ms of quiet
        if sidecar.due_at is not None and now >= sidecar.due_at:
            assert sidecar.fire("tick", now) is not None
            published_at = now
            break
        sidecar.fire("change", now)
        assert sidecar.due_at is not None and sidecar.due_at <= at(10)
    assert published_at == at(10)
    assert sidecar.state is S.publishing


def test_the_maximum_window_counts_from_the_first_change_after_a_publish_not_from_registration():
    sidecar = Entity(SPEC, KEY, {"owner": OWNER}, T0)
    sidecar.fire("tick", at(0.1))
    sidecar.fire("published", at(0.2), {"generation": 1})
    sidecar.fire("ack", at(0.3), {"generation": 1})
    assert sidecar.state is S.synced
    sidecar.fire("change", at(100))
    for n in range(1, 400):
        sidecar.fire("change", at(100 + n * 50 / 1000))
        if sidecar.due_at == at(110):
            break
    assert sidecar.due_at == at(110)


def test_coalescing_windows_can_be_set():
    settings = {"rollout_quiet_window": 1, "rollout_max_window": 3}
    sidecar = Entity(SPEC, KEY, {"owner": OWNER}, T0, settings=settings)
    assert sidecar.due_at == at(1)
    sidecar.fire("change", at(2.5))
    assert sidecar.due_at == at(3)


# ---- stale backoff -----------------------------------------------------------------------------------------------
def test_an_unacknowledged_sidecar_is_republished_with_a_backoff_that_doubles_and_stops_at_60_s():
    sidecar = Entity(SPEC, KEY, {"owner": OWNER}, T0)
    sidecar.fire("tick", at(0.1))
    sidecar.fire("published", at(0.1), {"generation": 1})
    assert sidecar.state is S.sent and sidecar.due_at == at(5.1)  # the acknowledgement deadline
    now, waits = at(5.1), []
    for _ in range(7):
        step = sidecar.fire("tick", now)
        assert step is not None and step.dest is S.stale and step.effects == (PublishConfig(KEY, 1),)
        sidecar.fire("published", now, {"generation": 1})
        assert sidecar.due_at is not None
        waits.append((sidecar.due_at - now).total_seconds())
        now = sidecar.due_at
    assert waits == [10, 20, 40, 60, 60, 60, 60]


def test_an_acknowledgement_resets_the_stale_backoff():
    sidecar = Entity(SPEC, KEY, {"owner": OWNER}, T0)
    for trigger, at_s, payload in (("tick", 0.1, None), ("published", 0.1, {"generation": 1}), ("tick", 5.1, None),
                                   ("published", 5.1, {"generation": 1}), ("ack", 6, {"generation": 1})):
        sidecar.fire(trigger, at(at_s), payload)
    assert sidecar.state is S.synced and sidecar.data["republishes"] == 0


def test_the_stale_backoff_cap_can_be_set():
    data = {**DATA[S.stale], "republishes": 9}
    step = SPEC.step(S.stale, "published", Context(KEY, data, {"generation": 3}, T0,
                                                   settings={"rollout_stale_cap": 15}))
    assert step is not None and step.due_at == at(15)


def test_an_old_acknowledgement_while_publishing_asks_for_no_tick():
    step = SPEC.step(S.publishing, "ack", Context(KEY, DATA[S.publishing], {"generation": 1}, T0, due_at=None))
    assert step is not None and step.due_at is None


@pytest.mark.parametrize(("state", "shown"), [("synced", SyncStatus.SYNCED), ("sent", SyncStatus.SENT),
                                              ("stale", SyncStatus.STALE), ("pending", SyncStatus.NOT_SENT),
                                              ("publishing", SyncStatus.NOT_SENT), ("failed", SyncStatus.NOT_SENT),
                                              ("removed", SyncStatus.REMOVED)])
def test_each_rollout_state_is_shown_as_a_sync_status(state, shown):
    assert sync_status(state) is shown
