"""The CA generation lifecycle, pair by pair: prepare -> activate -> retire, with both roots trusted meanwhile."""

from __future__ import annotations

import pytest

from machines import SPECS, Context
from machines.base import Fire
from machines.certificate import CaReason as R
from machines.certificate import CaState as S
from machines.effects import (
    ActivateCa,
    CountOutstandingLeaves,
    GenerateCa,
    JoinBundle,
    PublishBundle,
    ReissueLeaves,
)
from tests.machines.tables import ILLEGAL, T0, Case, Moves, Nothing, at, check, context, product_params

SPEC = SPECS["ca"]
KEY = "2"
CA_TTL = 720 * 3600.0
BASE = {"previous": "1", "auto_activate": False}
CHECK_AT = at(60)  # the default retire check interval

TRIGGERS = ("prepare", "prepared", "bundled", "activate", "activated", "retire", "tick", "checked", "fail")

TABLE: dict[tuple[S, str], tuple[Case, ...]] = {
    (S.preparing, "prepared"): (
        # The bundle grows before the generation signs anything.
        Case("always", Moves(S.prepared, R.PREPARED, effects=(JoinBundle(KEY),),
                             data={"not_before": T0.isoformat(), "not_after": at(3600).isoformat(),
                                   "in_bundle": False}),
             payload={"not_before": T0.isoformat(), "not_after": at(3600).isoformat()}),
    ),
    (S.preparing, "fail"): (
        Case("with a reason", Moves(S.failed, R.FAILED, due=at(60), data={"failure": "disk full"}),
             payload={"reason": "disk full"}),
        Case("with a custom retry time", Moves(S.failed, R.FAILED, due=at(5), data={"failure": "unknown"}),
             settings={"ca_retry_after": 5}),
    ),

    (S.prepared, "bundled"): (
        Case("by hand", Moves(S.prepared, R.BUNDLED, data={"in_bundle": True})),
        Case("to be activated at once", Moves(S.prepared, R.BUNDLED, effects=(Fire("ca", KEY, "activate"),)),
             data={"auto_activate": True}),
    ),
    (S.prepared, "activate"): (
        Case("once it is in the bundle", Moves(S.active, R.ACTIVATED, effects=(ActivateCa(KEY),)),
             data={"in_bundle": True}),
        Case("before it is in the bundle, which must not sign yet", Nothing, data={"in_bundle": False}),
    ),

    (S.active, "activated"): (
        Case("replacing a previous generation",
             Moves(S.active, R.SIGNING, effects=(ReissueLeaves(KEY), Fire("ca", "1", "retire")))),
        Case("as the first generation", Moves(S.active, R.SIGNING, effects=(ReissueLeaves(KEY),)),
             data={"previous": None}),
    ),
    (S.active, "fail"): (
        Case("when the CA could not activate it", Moves(S.failed, R.FAILED, due=at(60), data={"failure": "hsm"}),
             payload={"reason": "hsm"}),
    ),

    (S.active, "retire"): (
        Case("always", Moves(S.retiring, R.RETIRING, due=CHECK_AT)),
        Case("with a custom check interval", Moves(S.retiring, R.RETIRING, due=at(600)),
             settings={"ca_retire_check": 600}),
    ),

    (S.retiring, "tick"): (
        Case("before its check time", Nothing, now=at(59), due_at=CHECK_AT),
        Case("at its check time", Moves(S.retiring, R.RETIRING, effects=(CountOutstandingLeaves(KEY),), due=at(120)),
             now=CHECK_AT, due_at=CHECK_AT),
    ),
    (S.retiring, "checked"): (
        Case("with no leaf left", Moves(S.retired, R.RETIRED, effects=(PublishBundle(),)),
             payload={"outstanding": 0}),
        Case("with leaves left", Moves(S.retiring, R.LEAVES_OUTSTANDING, due=CHECK_AT),
             payload={"outstanding": 3}),
        Case("with no count at all, which is not a zero", Moves(S.retiring, R.LEAVES_OUTSTANDING, due=CHECK_AT)),
    ),

    (S.failed, "tick"): (
        Case("before its retry time", Nothing, now=at(59), due_at=at(60)),
        Case("at its retry time", Moves(S.preparing, R.RETRY, effects=(GenerateCa(KEY, CA_TTL),)),
             now=at(60), due_at=at(60)),
    ),
}


def test_the_table_names_every_trigger_of_the_ca_lifecycle():
    assert set(TRIGGERS) == SPEC.triggers


@pytest.mark.parametrize(("state", "trigger", "case"), product_params(S, TRIGGERS, TABLE))
def test_every_state_takes_exactly_the_triggers_in_the_table(state, trigger, case):
    check(SPEC, state, trigger, context(KEY, BASE, case), case.outcome)


def test_preparing_a_generation_creates_it_and_makes_its_keys():
    step = check(SPEC, None, "prepare", Context(KEY, {}, {"previous": "1"}, T0),
                 Moves(S.preparing, R.PREPARING, effects=(GenerateCa(KEY, CA_TTL),)))
    assert step is not None and step.data == {"previous": "1", "auto_activate": False}
    step = SPEC.step(None, "prepare", Context(KEY, {}, {}, T0, settings={"ca_ttl": 3600}))
    assert step is not None and step.effects == (GenerateCa(KEY, 3600.0),)


@pytest.mark.parametrize("trigger", [t for t in TRIGGERS if t != "prepare"])
def test_a_trigger_other_than_prepare_on_a_generation_that_does_not_exist_is_illegal(trigger):
    check(SPEC, None, trigger, Context(KEY, {}, {}, T0), ILLEGAL)


def test_a_retiring_generation_leaves_the_bundle_only_when_no_leaf_is_outstanding():
    outstanding = SPEC.step(S.retiring, "checked", Context(KEY, BASE, {"outstanding": 1}, T0))
    assert outstanding is not None and outstanding.dest is S.retiring and PublishBundle() not in outstanding.effects
    none_left = SPEC.step(S.retiring, "checked", Context(KEY, BASE, {"outstanding": 0}, T0))
    assert none_left is not None and none_left.dest is S.retired and none_left.effects == (PublishBundle(),)


def test_a_generation_that_is_not_active_cannot_be_retired():
    for state in (S.preparing, S.prepared, S.retiring, S.retired, S.failed):
        check(SPEC, state, "retire", Context(KEY, BASE, {}, T0), ILLEGAL)
