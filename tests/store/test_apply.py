"""`Store.apply` is the one write: the entity's row, its journal row and its effects commit together or not at all."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import delete, insert
from sqlalchemy.exc import IntegrityError

from store import EffectGone, StaleVersion, Store
from store.schema import entities, journal
from tests.store.build import T0, at, effect, transition


def nothing_changed(store: Store, before: tuple[object, ...]) -> bool:
    return snapshot(store) == before


def snapshot(store: Store) -> tuple[object, ...]:
    return (store.list(), store.journal_all(), store.pending_effects())


def test_a_transition_commits_its_row_its_journal_row_and_its_effects(store: Store) -> None:
    entity, pending = store.apply(transition(data={"labels": {"app": "web"}}, due_at=at(300),
                                             effects=[effect(pod="shop/web", run_at=at(30))]))

    assert store.get("pod", "shop/web") == entity
    assert (entity.state, entity.version, entity.data, entity.due_at) == ("admitted", 1, {"labels": {"app": "web"}},
                                                                         at(300))
    [row] = store.journal("pod", "shop/web")
    assert (row.version, row.from_state, row.to_state, row.trigger, row.actor, row.at) == (
        1, None, "admitted", "admit", "test", T0)
    assert store.pending_effects() == pending
    assert [(p.effect, p.payload, p.attempts, p.run_at) for p in pending] == [
        ("InjectSidecar", {"pod": "shop/web"}, 0, at(30))]


def test_the_outcome_of_an_effect_deletes_it_in_the_same_commit(store: Store) -> None:
    _, [pending] = store.apply(transition(effects=[effect(pod="shop/web")]))

    entity, new = store.apply(transition(expected=1, from_state="admitted", to="injected", trigger="injected",
                                         when=at(1), consumes=pending.id))

    assert (entity.version, entity.created_at, entity.updated_at, new) == (2, T0, at(1), [])
    assert store.pending_effects() == []
    assert [j.version for j in store.journal("pod", "shop/web")] == [1, 2]


def test_consuming_an_effect_that_is_gone_raises_and_stores_nothing(store: Store) -> None:
    store.apply(transition())
    before = snapshot(store)

    with pytest.raises(EffectGone) as err:
        store.apply(transition(expected=1, from_state="admitted", to="injected", trigger="injected",
                               effects=[effect("Fire", kind="pod", key="x", trigger="y")], consumes=4242))

    assert err.value.effect_id == 4242
    assert nothing_changed(store, before)


def test_a_stale_writer_does_not_consume_the_effect_it_answers(store: Store) -> None:
    _, [pending] = store.apply(transition(effects=[effect(pod="shop/web")]))
    store.apply(transition(expected=1, from_state="admitted", to="failed", trigger="fail"))
    before = snapshot(store)

    with pytest.raises(StaleVersion):
        store.apply(transition(expected=1, from_state="admitted", to="injected", trigger="injected",
                               consumes=pending.id))

    assert nothing_changed(store, before)
    assert [p.id for p in store.pending_effects()] == [pending.id]


def test_a_failure_after_the_row_and_the_journal_were_written_leaves_nothing(store: Store) -> None:
    store.apply(transition())
    before = snapshot(store)

    # The entity's row and its journal row are written before the effect, which JSON cannot encode.
    with pytest.raises(TypeError):
        store.apply(transition(expected=1, from_state="admitted", to="injected", trigger="injected",
                               effects=[effect(pod=object())]))

    assert nothing_changed(store, before)


def test_a_wrong_expected_version_is_a_stale_write(store: Store) -> None:
    store.apply(transition())
    store.apply(transition(expected=1, from_state="admitted", to="injected", trigger="injected"))
    before = snapshot(store)

    for expected in (1, 3):
        with pytest.raises(StaleVersion) as err:
            store.apply(transition(expected=expected, from_state="admitted", to="failed", trigger="fail"))
        assert (err.value.kind, err.value.key, err.value.expected) == ("pod", "shop/web", expected)

    assert nothing_changed(store, before)


def test_updating_an_entity_that_does_not_exist_is_a_stale_write(store: Store) -> None:
    with pytest.raises(StaleVersion):
        store.apply(transition(expected=1, from_state="admitted", to="injected", trigger="injected"))
    assert snapshot(store) == ([], [], [])


def test_creating_an_entity_that_already_exists_is_a_stale_write(store: Store) -> None:
    # Two engines both saw no row and both fire the creating trigger: the second insert loses.
    store.apply(transition(effects=[effect(pod="shop/web")]))
    before = snapshot(store)

    with pytest.raises(StaleVersion):
        store.apply(transition(when=at(1), effects=[effect(pod="shop/web")]))

    assert nothing_changed(store, before)


def test_the_journal_refuses_a_second_row_for_one_version(store: Store) -> None:
    store.apply(transition())
    row = {"kind": "pod", "key": "shop/web", "version": 1, "from_state": None, "to_state": "admitted",
           "trigger": "admit", "reason": "admitted", "actor": "someone else", "at": T0}

    with pytest.raises(IntegrityError), store.engine.begin() as conn:
        conn.execute(insert(journal).values(**row))

    assert len(store.journal("pod", "shop/web")) == 1


def test_a_version_already_journaled_rolls_back_the_row_written_before_it(store: Store) -> None:
    store.apply(transition())
    with store.engine.begin() as conn:  # the row vanishes, its journal stays: version 1 is taken
        conn.execute(delete(entities))
    before = snapshot(store)

    with pytest.raises(StaleVersion):
        store.apply(transition(when=at(1), effects=[effect(pod="shop/web")]))

    assert nothing_changed(store, before)
    assert store.get("pod", "shop/web") is None


def _race_to_answer(stores: tuple[Store, Store], key: str, effect_id: int) -> list[str]:
    """Both writers load the entity at version 1 and feed the same outcome back at the same moment."""
    barrier, outcomes = threading.Barrier(2), []

    def answer(store: Store) -> None:
        t = transition(key, expected=1, from_state="admitted", to="injected", trigger="injected",
                       effects=[effect("TeardownPod")], consumes=effect_id)
        barrier.wait(timeout=30)
        try:
            store.apply(t)
            outcomes.append("committed")
        except (EffectGone, StaleVersion) as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=answer, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return outcomes


def test_two_writers_answering_the_same_effect_at_once_give_one_outcome(db_url: str) -> None:
    """One commits; the other finds the effect gone (or the version stale); the outcome is journaled once."""
    stores = Store(db_url), Store(db_url)
    try:
        for i in range(20):
            key = f"shop/web-{i}"
            _, [pending] = stores[0].apply(transition(key, effects=[effect()]))
            outcomes = _race_to_answer(stores, key, pending.id)
            assert len(outcomes) == 2 and outcomes.count("committed") == 1, outcomes
            assert [j.to_state for j in stores[0].journal("pod", key)] == ["admitted", "injected"]
            assert [p.effect for p in stores[0].pending_effects("pod", key)] == ["TeardownPod"]
    finally:
        for s in stores:
            s.close()


def test_a_batch_commits_all_or_nothing_and_names_the_entity_that_lost(store: Store) -> None:
    store.apply(transition("shop/b"))  # "shop/b" exists already: the batch's creation of it loses
    before = snapshot(store)

    with pytest.raises(StaleVersion) as err:
        store.apply_all([transition("shop/a"), transition("shop/b"), transition("shop/c")])

    assert (err.value.kind, err.value.key, err.value.expected) == ("pod", "shop/b", 0)
    assert nothing_changed(store, before)
    committed = store.apply_all([transition("shop/a"), transition("shop/c")])
    assert [(e.key, e.version) for e, _ in committed] == [("shop/a", 1), ("shop/c", 1)]
    assert store.get_many("pod", ["shop/a", "shop/b", "shop/c", "shop/d"]).keys() == {"shop/a", "shop/b", "shop/c"}
