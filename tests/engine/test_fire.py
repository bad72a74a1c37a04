"""Event intake: refused triggers change nothing, unknown entities are named, and a restart runs what was left."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import timedelta

import pytest

from actions import fake_actions
from engine import Engine, InvalidKey, UnknownEntity
from machines import IllegalKind, IllegalTrigger
from tests.engine.conftest import POLICY
from tests.engine.support import POD, Mesh


def _snapshot(mesh: Mesh, kind: str, key: str):
    return mesh.store.get(kind, key), mesh.store.journal(kind, key), mesh.store.pending_effects()


def test_an_illegal_trigger_raises_and_leaves_the_row_the_journal_and_the_outbox_as_they_were(mesh: Mesh):
    mesh.publisher.down = True  # so that the outbox holds something the refused trigger could have disturbed
    mesh.engine.fire("sidecar", POD, "register", {"owner": POD})
    mesh.clock.advance(0.1)
    mesh.engine.tick()
    before = _snapshot(mesh, "sidecar", POD)
    assert before[0].state == "publishing" and len(before[2]) == 1

    for trigger, payload in (("tick", {}), ("prepare", {}), ("no-such-trigger", {})):
        with pytest.raises(IllegalTrigger) as raised:
            mesh.engine.fire("sidecar", POD, trigger, payload, actor="cli:operator")
        assert (raised.value.state, raised.value.trigger) == ("publishing", trigger)
        assert _snapshot(mesh, "sidecar", POD) == before
    assert mesh.engine.stats.transitions == 2


def test_a_trigger_on_an_entity_that_does_not_exist_raises_unknown_entity_and_creates_nothing(mesh: Mesh):
    with pytest.raises(UnknownEntity) as raised:
        mesh.engine.fire("pod", "default/nobody", "ready")
    assert (raised.value.kind, raised.value.key) == ("pod", "default/nobody")
    assert mesh.store.get("pod", "default/nobody") is None
    assert mesh.store.journal_all() == [] and mesh.outbox() == []


def test_a_trigger_on_a_kind_that_does_not_exist_is_refused_by_name(mesh: Mesh):
    with pytest.raises(IllegalKind):
        mesh.engine.fire("gateway", "x", "create")


def test_a_guard_that_says_not_yet_commits_nothing_and_returns_the_entity_as_it_is(mesh: Mesh):
    mesh.engine.fire("sidecar", POD, "register", {"owner": POD})
    before = _snapshot(mesh, "sidecar", POD)
    entity = mesh.engine.fire("sidecar", POD, "tick")  # the window is still open
    assert entity == before[0]
    assert _snapshot(mesh, "sidecar", POD) == before


def test_recover_runs_the_effects_a_dead_process_committed_but_never_ran_without_waiting_for_their_lease(mesh: Mesh):
    # A process commits the admission and dies before running its effect.
    mesh.engine.fire("pod", POD, "admit", drain=False)
    (left,) = mesh.outbox()
    assert (left.effect, left.attempts) == ("InjectSidecar", 0)
    assert left.run_at == mesh.clock.now() + timedelta(seconds=POLICY.effect_lease)

    restarted = Engine(mesh.store, mesh.actions, mesh.clock, policy=POLICY)
    assert restarted.tick().effects == 0  # its lease still holds: a tick leaves it to its owner
    assert mesh.state("pod", POD) == "admitted"

    assert restarted.recover() == 1
    assert mesh.path("pod", POD) == ["admitted", "injected"]
    assert mesh.journal("pod", POD)[-1].actor == "effect:InjectSidecar"
    assert mesh.outbox() == []
    assert mesh.platform.injected == {POD}


def test_recover_leaves_an_effect_that_is_waiting_out_its_backoff_alone(mesh: Mesh):
    mesh.publisher.down = True
    mesh.engine.fire("sidecar", POD, "register", {"owner": POD})
    mesh.clock.advance(0.1)
    mesh.engine.tick()
    (waiting,) = mesh.outbox()
    assert waiting.attempts == 1 and waiting.run_at > mesh.clock.now()

    restarted = Engine(mesh.store, mesh.actions, mesh.clock, policy=POLICY)
    mesh.publisher.down = False
    assert restarted.recover() == 0
    assert mesh.outbox() == [waiting]
    mesh.advance_to(waiting.run_at)
    assert restarted.tick().effects == 1
    assert mesh.state("sidecar", POD) == "sent"


def test_an_effect_whose_lease_ran_out_is_run_by_any_engine_on_a_tick(mesh: Mesh):
    mesh.engine.fire("pod", POD, "admit", drain=False)
    other = Engine(mesh.store, fake_actions(mesh.clock), mesh.clock, policy=POLICY)
    mesh.clock.advance(POLICY.effect_lease)
    assert other.tick().effects == 1
    assert mesh.state("pod", POD) == "injected"


def test_an_outcome_that_arrives_after_its_entity_moved_on_is_dropped_with_its_effect(mesh: Mesh):
    mesh.engine.fire("pod", POD, "admit", drain=False)
    mesh.engine.fire("pod", POD, "terminate", drain=False)  # InjectSidecar's "injected" is now illegal
    mesh.engine.drain()
    assert mesh.path("pod", POD) == ["admitted", "terminating", "gone"]
    assert mesh.outbox() == []


def test_a_key_longer_than_the_store_holds_is_refused_by_name_before_anything_is_written(mesh: Mesh):
    with pytest.raises(InvalidKey, match="a key must have 1 to 255 characters"):
        mesh.engine.fire("pod", "default/" + "x" * 300, "admit")
    assert mesh.store.list() == []


class _HoldingPlatform:
    """A platform whose injection of one pod waits until the test lets it go."""

    def __init__(self, inner, held: str) -> None:
        self.inner, self.held = inner, held
        self.entered, self.release = threading.Event(), threading.Event()

    def inject(self, pod: str) -> None:
        if pod == self.held:
            self.entered.set()
            assert self.release.wait(timeout=30)
        self.inner.inject(pod)

    def teardown(self, pod: str) -> None:
        self.inner.teardown(pod)


def test_a_slow_effect_in_one_thread_does_not_hold_up_a_trigger_fired_from_another(mesh: Mesh):
    platform = _HoldingPlatform(mesh.platform, "default/slow")
    engine = Engine(mesh.store, replace(mesh.actions, platform=platform), mesh.clock, policy=POLICY)
    slow = threading.Thread(target=engine.fire, args=("pod", "default/slow", "admit"))
    slow.start()
    try:
        assert platform.entered.wait(timeout=30)
        engine.fire("pod", "default/fast", "admit")  # runs its own InjectSidecar while the other one is held
        assert mesh.path("pod", "default/fast") == ["admitted", "injected"]
        assert mesh.state("pod", "default/slow") == "admitted"
    finally:
        platform.release.set()
        slow.join(timeout=30)
    assert mesh.path("pod", "default/slow") == ["admitted", "injected"]
