"""The X.509-SVID lifecycle, pair by pair, and the half-life rotation time with its jitter."""

from __future__ import annotations

import pytest

from machines import SPECS, Context
from machines.base import Fire
from machines.certificate import CertReason as R
from machines.certificate import CertState as S
from machines.effects import DeliverSvid, SignSvid, WithdrawSvid
from tests.machines.tables import ILLEGAL, T0, Case, Moves, Nothing, at, check, context, product_params

SPEC = SPECS["cert"]
OWNER = "default/web-1"
KEY = f"{OWNER}/1"
NEXT = f"{OWNER}/2"
SPIFFE = "spiffe://example.org/ns/default/sa/web"
DNS = ["web-1.default.pod"]
NOT_AFTER = at(3600)
ROTATE_AT = at(1800)
RETRY_AT = at(60)

REQUESTED = {"owner": OWNER, "spiffe_id": SPIFFE, "dns_names": DNS, "index": 1, "supersedes": None,
             "notify_owner": True, "ttl_seconds": 3600.0}
SIGNED = {**REQUESTED, "serial": "1f", "generation": "1", "not_before": T0.isoformat(),
          "not_after": NOT_AFTER.isoformat(), "rotate_at": ROTATE_AT.isoformat()}
ISSUED_PAYLOAD = {"serial": "1f", "generation": "1", "not_before": T0.isoformat(), "not_after": NOT_AFTER.isoformat()}
# What a certificate carries in each state: nothing signed before `issued`, and a failed one may or may not have been.
DATA = {S.requested: REQUESTED, S.failed: REQUESTED}

TRIGGERS = ("request", "issued", "delivered", "activate", "tick", "rotate", "superseded", "revoke", "fail", "retry")

SIGN = SignSvid(KEY, SPIFFE, ("web-1.default.pod",), 3600.0)
REVOKE = Moves(S.revoked, R.REVOKED, effects=(WithdrawSvid(KEY, OWNER),))
SUCCESSOR = Fire("cert", NEXT, "request", {"owner": OWNER, "spiffe_id": SPIFFE, "dns_names": DNS, "index": 2,
                                           "supersedes": KEY})


def fail_cases() -> tuple[Case, ...]:
    return (
        Case("of the first certificate, which fails its pod",
             Moves(S.failed, R.FAILED, due=RETRY_AT, data={"failure": "CA refused"},
                   effects=(Fire("pod", OWNER, "fail", {"reason": "identity: CA refused"}),)),
             payload={"reason": "CA refused"}),
        Case("of a rotation, which leaves the pod alone",
             Moves(S.failed, R.FAILED, due=RETRY_AT, data={"failure": "unknown"}),
             data={"index": 2, "notify_owner": False}),
        Case("with a custom retry time", Moves(S.failed, R.FAILED, due=at(5), effects=(
            Fire("pod", OWNER, "fail", {"reason": "identity: unknown"}),)), settings={"cert_retry_after": 5}),
    )


def expiry_cases(dest_reason: str) -> tuple[Case, ...]:
    return (
        Case("before not-after", Nothing, now=at(3599), due_at=NOT_AFTER),
        Case("at not-after", Moves(S.expired, dest_reason), now=NOT_AFTER, due_at=NOT_AFTER),
    )


def serving_tick_cases() -> tuple[Case, ...]:
    return (
        Case("before rotate-at", Nothing, now=at(1799), due_at=ROTATE_AT),
        Case("at rotate-at", Moves(S.rotation_due, R.HALF_LIFE, effects=(SUCCESSOR,), due=NOT_AFTER),
             now=ROTATE_AT, due_at=ROTATE_AT),
        # A certificate that slept past not-after must not ask for a successor as if all was well.
        Case("past not-after", Moves(S.expired, R.EXPIRED_IN_USE, effects=()), now=NOT_AFTER, due_at=ROTATE_AT),
    )


def superseded_cases() -> tuple[Case, ...]:
    return (Case("always", Moves(S.superseded, R.SUPERSEDED, due=NOT_AFTER)),)


def rotate_cases() -> tuple[Case, ...]:
    return (Case("always", Moves(S.rotation_due, R.ROTATION_FORCED, effects=(SUCCESSOR,), due=NOT_AFTER)),)


TABLE: dict[tuple[S, str], tuple[Case, ...]] = {
    (S.requested, "issued"): (
        Case("for the first certificate, which tells its pod",
             Moves(S.issued, R.ISSUED, due=NOT_AFTER,
                   effects=(DeliverSvid(KEY, OWNER), Fire("pod", OWNER, "identity_issued", {"cert": KEY})),
                   data={"serial": "1f", "generation": "1", "rotate_at": ROTATE_AT.isoformat(),
                         "not_after": NOT_AFTER.isoformat()}),
             payload=ISSUED_PAYLOAD),
        Case("for a rotation, silently", Moves(S.issued, R.ISSUED, due=NOT_AFTER, effects=(DeliverSvid(KEY, OWNER),)),
             payload=ISSUED_PAYLOAD, data={"index": 2, "notify_owner": False}),
    ),
    (S.requested, "revoke"): (Case("always", REVOKE),),
    (S.requested, "fail"): fail_cases(),

    (S.issued, "activate"): (
        Case("before its delivery is recorded: kept for it", Moves(S.issued, R.PICKED_UP_EARLY, due=NOT_AFTER,
                                                                    data={"picked_up": True})),
    ),
    (S.issued, "delivered"): (
        Case("already picked up: active at once", Moves(S.active, R.ACTIVATED, due=ROTATE_AT),
             data={"picked_up": True}),
        Case("as a first certificate", Moves(S.delivered, R.DELIVERED, due=ROTATE_AT)),
        Case("as a successor, which supersedes its predecessor",
             Moves(S.delivered, R.DELIVERED, due=ROTATE_AT, effects=(Fire("cert", f"{OWNER}/0", "superseded"),)),
             data={"supersedes": f"{OWNER}/0"}),
    ),
    (S.issued, "tick"): (
        *expiry_cases(R.EXPIRED_IN_USE),
        Case("at rotate-at, which is not its business before delivery", Nothing, now=ROTATE_AT, due_at=NOT_AFTER),
    ),
    (S.issued, "revoke"): (Case("always", REVOKE),),
    (S.issued, "fail"): fail_cases(),

    (S.delivered, "activate"): (Case("always", Moves(S.active, R.ACTIVATED, due=ROTATE_AT)),),
    (S.delivered, "tick"): serving_tick_cases(),
    (S.delivered, "rotate"): rotate_cases(),
    (S.delivered, "superseded"): superseded_cases(),
    (S.delivered, "revoke"): (Case("always", REVOKE),),

    (S.active, "tick"): serving_tick_cases(),
    (S.active, "rotate"): rotate_cases(),
    (S.active, "superseded"): superseded_cases(),
    (S.active, "revoke"): (Case("always", REVOKE),),

    (S.rotation_due, "tick"): expiry_cases(R.EXPIRED_IN_USE),
    (S.rotation_due, "superseded"): superseded_cases(),
    (S.rotation_due, "revoke"): (Case("always", REVOKE),),

    (S.superseded, "tick"): expiry_cases(R.EXPIRED),
    (S.superseded, "revoke"): (Case("always", REVOKE),),

    (S.failed, "tick"): (
        Case("before its retry time", Nothing, now=at(59), due_at=RETRY_AT),
        Case("at its retry time", Moves(S.requested, R.RETRY, effects=(SIGN,)), now=RETRY_AT, due_at=RETRY_AT),
    ),
    (S.failed, "retry"): (Case("always", Moves(S.requested, R.RETRY, effects=(SIGN,))),),
    # Revoked when its owner leaves: its own retry must not sign it again for nobody.
    (S.failed, "revoke"): (Case("always", REVOKE),),
}


def test_the_table_names_every_trigger_of_the_certificate_lifecycle():
    assert set(TRIGGERS) == SPEC.triggers


@pytest.mark.parametrize(("state", "trigger", "case"), product_params(S, TRIGGERS, TABLE))
def test_every_state_takes_exactly_the_triggers_in_the_table(state, trigger, case):
    check(SPEC, state, trigger, context(KEY, DATA.get(state, SIGNED), case), case.outcome)


def test_requesting_a_certificate_creates_it_and_asks_the_ca_to_sign():
    payload = {"owner": OWNER, "spiffe_id": SPIFFE, "dns_names": DNS, "index": 1, "notify_owner": True}
    step = check(SPEC, None, "request", Context(KEY, {}, payload, T0), Moves(S.requested, R.REQUESTED, effects=(SIGN,)))
    assert step is not None and step.data == REQUESTED


def test_a_requested_lifetime_comes_from_the_payload_then_the_settings():
    payload = {"owner": OWNER, "spiffe_id": SPIFFE}
    step = SPEC.step(None, "request", Context(KEY, {}, {**payload, "ttl_seconds": 600}, T0, settings={"svid_ttl": 60}))
    assert step is not None and step.effects == (SignSvid(KEY, SPIFFE, (), 600.0),)
    step = SPEC.step(None, "request", Context(KEY, {}, payload, T0, settings={"svid_ttl": 60}))
    assert step is not None and step.effects == (SignSvid(KEY, SPIFFE, (), 60.0),)


@pytest.mark.parametrize("trigger", [t for t in TRIGGERS if t != "request"])
def test_a_trigger_other_than_request_on_a_certificate_that_does_not_exist_is_illegal(trigger):
    check(SPEC, None, trigger, Context(KEY, {}, {}, T0), ILLEGAL)


@pytest.mark.parametrize(("jitter", "rotate_after"), [(-1.0, 1620), (0.0, 1800), (1.0, 1980), (0.5, 1890),
                                                      (-7.0, 1620), (7.0, 1980)])
def test_rotation_is_due_at_half_the_lifetime_moved_by_at_most_ten_percent_of_it_by_the_jitter(jitter, rotate_after):
    step = SPEC.step(S.requested, "issued", Context(KEY, REQUESTED, ISSUED_PAYLOAD, T0, jitter=jitter))
    assert step is not None
    assert step.data["rotate_at"] == at(rotate_after).isoformat()
    delivered = SPEC.step(S.issued, "delivered", Context(KEY, step.data, {}, at(1)))
    assert delivered is not None and delivered.due_at == at(rotate_after)


def test_rotation_time_counts_from_not_before_not_from_when_the_outcome_arrived():
    payload = {**ISSUED_PAYLOAD, "not_before": at(-600).isoformat(), "not_after": at(600).isoformat()}
    step = SPEC.step(S.requested, "issued", Context(KEY, REQUESTED, payload, at(5)))
    assert step is not None and step.data["rotate_at"] == T0.isoformat()


def test_a_tick_before_rotate_at_changes_nothing():
    assert SPEC.step(S.active, "tick", Context(KEY, SIGNED, {}, at(1799.999), due_at=ROTATE_AT)) is None


def test_a_tick_at_rotate_at_asks_for_a_successor_that_names_its_predecessor():
    step = SPEC.step(S.active, "tick", Context(KEY, SIGNED, {}, ROTATE_AT, due_at=ROTATE_AT))
    assert step is not None and step.dest is S.rotation_due
    (successor,) = step.effects
    assert isinstance(successor, Fire)
    assert (successor.kind, successor.key, successor.trigger) == ("cert", NEXT, "request")
    assert successor.payload["supersedes"] == KEY and successor.payload["index"] == 2


def test_a_certificate_past_not_after_expires_in_use_rather_than_rotating():
    step = SPEC.step(S.delivered, "tick", Context(KEY, SIGNED, {}, at(4000), due_at=ROTATE_AT))
    assert step is not None and (step.dest, step.reason, step.effects) == (S.expired, R.EXPIRED_IN_USE, ())


def test_a_replaced_certificate_expires_quietly_at_not_after():
    assert SPEC.step(S.superseded, "tick", Context(KEY, SIGNED, {}, at(3599), due_at=NOT_AFTER)) is None
    step = SPEC.step(S.superseded, "tick", Context(KEY, SIGNED, {}, NOT_AFTER, due_at=NOT_AFTER))
    assert step is not None and (step.dest, step.reason) == (S.expired, R.EXPIRED)
