"""Many entities at once: one commit for a batch of triggers, and publishes sent together."""

from __future__ import annotations

from store import StaleVersion
from tests.engine.support import Mesh

SIDECARS = [f"shop/web-{i}" for i in range(5)]


def _registered(mesh: Mesh) -> None:
    for key in SIDECARS:
        mesh.engine.fire("sidecar", key, "register", {"owner": key})


def test_fire_many_commits_every_transition_journals_each_and_skips_what_does_not_apply(mesh: Mesh) -> None:
    _registered(mesh)
    mesh.engine.fire("sidecar", SIDECARS[0], "remove")
    items = [(k, {}) for k in [*SIDECARS, "shop/nobody"]]
    assert mesh.engine.fire_many("sidecar", items, "change", actor=lambda key: f"test:{key}") == 4
    for key in SIDECARS[1:]:
        last = mesh.journal("sidecar", key)[-1]
        assert (last.trigger, last.actor, mesh.row("sidecar", key).data["desired"]) == ("change", f"test:{key}", 2)
    assert mesh.state("sidecar", SIDECARS[0]) == "removed"  # change is illegal there: skipped, nothing written


def test_a_batch_that_loses_a_race_is_fired_again_one_by_one(mesh: Mesh, monkeypatch) -> None:
    _registered(mesh)

    def lost(transitions):
        raise StaleVersion("sidecar", SIDECARS[0], 1)

    monkeypatch.setattr(mesh.store, "apply_all", lost)
    assert mesh.engine.fire_many("sidecar", [(k, {}) for k in SIDECARS], "change") == len(SIDECARS)
    assert all(mesh.row("sidecar", k).data["desired"] == 2 for k in SIDECARS)
    assert mesh.engine.stats.conflicts == 1


def test_publishes_due_together_go_in_one_publish_many_and_their_outcomes_in_one_commit(mesh: Mesh) -> None:
    _registered(mesh)
    mesh.clock.advance(0.2)
    mesh.engine.dispatch = mesh.engine.run_publishes
    calls: list[int] = []
    publish_many = mesh.publisher.publish_many

    def counting(items):
        items = list(items)
        calls.append(len(items))
        publish_many(items)

    mesh.publisher.publish_many = counting  # type: ignore[method-assign]
    mesh.engine.tick()
    assert calls == [len(SIDECARS)]
    assert {k: mesh.state("sidecar", k) for k in SIDECARS} == dict.fromkeys(SIDECARS, "sent")
    assert mesh.outbox() == []
    assert all(mesh.journal("sidecar", k)[-1].actor == "effect:PublishConfig" for k in SIDECARS)


def test_a_failed_batch_publish_falls_back_to_each_effects_own_retry(mesh: Mesh) -> None:
    _registered(mesh)
    mesh.clock.advance(0.2)
    mesh.engine.dispatch = mesh.engine.run_publishes
    mesh.publisher.down = True
    mesh.engine.tick()
    waiting = mesh.outbox()
    assert len(waiting) == len(SIDECARS) and all(p.attempts == 1 for p in waiting)
    assert "NATS unreachable" in (waiting[0].last_error or "")
    mesh.publisher.down = False
    mesh.clock.set(max(p.run_at for p in waiting))
    mesh.engine.tick()
    assert {k: mesh.state("sidecar", k) for k in SIDECARS} == dict.fromkeys(SIDECARS, "sent")


def test_an_unreadable_row_in_a_publish_batch_waits_alone_and_the_others_are_published(mesh: Mesh) -> None:
    from sqlalchemy import text

    _registered(mesh)
    mesh.clock.advance(0.2)
    handed: list = []
    mesh.engine.dispatch = handed.extend
    mesh.engine.tick()
    damaged = handed[0]
    with mesh.store.engine.begin() as conn:
        conn.execute(text("UPDATE outbox SET payload = :p WHERE id = :id"), {"p": '{"sidecar": 1}', "id": damaged.id})
    mesh.engine.run_publishes(mesh.store.pending_effects())
    assert [p.id for p in mesh.outbox()] == [damaged.id] and mesh.outbox()[0].attempts == 1
    assert sorted(k for k in SIDECARS if mesh.state("sidecar", k) == "sent") == sorted(
        k for k in SIDECARS if k != damaged.key)


def test_an_entity_in_a_state_this_version_does_not_know_does_not_stop_the_others_tick(mesh: Mesh) -> None:
    from sqlalchemy import text

    _registered(mesh)
    with mesh.store.engine.begin() as conn:
        conn.execute(text("UPDATE entities SET state = 'from-the-future' WHERE key = :k"), {"k": SIDECARS[0]})
    mesh.clock.advance(0.2)
    mesh.engine.tick()
    assert all(mesh.state("sidecar", k) == "sent" for k in SIDECARS[1:])
