"""The store's reads and its one bookkeeping write outside `apply`: retries, what is due, counts, prefixes, time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from store import EffectGone, Store
from tests.store.build import T0, at, effect, transition


def test_postponing_an_effect_records_the_attempt_on_the_outbox_row_and_on_the_entity(store: Store) -> None:
    _, [pending] = store.apply(transition(effects=[effect(pod="shop/web", run_at=at(30))]))

    store.postpone_effect(pending.id, 3, at(40), "platform unreachable")

    [row] = store.pending_effects("pod", "shop/web")
    assert (row.id, row.attempts, row.run_at, row.last_error) == (pending.id, 3, at(40), "platform unreachable")
    entity = store.get("pod", "shop/web")
    assert entity is not None
    assert (entity.retry_count, entity.retry_at, entity.version) == (3, at(40), 1)  # a retry is not a transition
    assert len(store.journal("pod", "shop/web")) == 1


def test_the_next_transition_clears_the_retry_it_answers(store: Store) -> None:
    _, [pending] = store.apply(transition(effects=[effect(pod="shop/web")]))
    store.postpone_effect(pending.id, 1, at(1), "busy")

    entity, _ = store.apply(transition(expected=1, from_state="admitted", to="injected", trigger="injected",
                                       when=at(2), consumes=pending.id))

    assert (entity.retry_count, entity.retry_at) == (0, None)
    assert store.get("pod", "shop/web") == entity


def test_postponing_an_effect_that_is_gone_raises(store: Store) -> None:
    with pytest.raises(EffectGone):
        store.postpone_effect(4242, 1, at(1), "busy")


def test_due_entities_are_those_whose_time_has_come_earliest_first(store: Store) -> None:
    for key, due in (("c", at(3)), ("a", at(2)), ("b", at(1)), ("never", None)):
        store.apply(transition(key, due_at=due))

    assert [e.key for e in store.due_entities(at(2))] == ["b", "a"]  # due exactly now counts
    assert [e.key for e in store.due_entities(at(2), limit=1)] == ["b"]
    assert store.due_entities(at(0)) == []
    assert [e.key for e in store.due_entities(at(10))] == ["b", "a", "c"]


def test_due_effects_are_those_whose_time_has_come_and_fresh_ones_on_recovery(store: Store) -> None:
    _, [leased, due] = store.apply(transition(effects=[effect(pod="leased", run_at=at(30)),
                                                       effect(pod="due", run_at=at(1))]))
    _, [tried] = store.apply(transition("other", effects=[effect(pod="tried", run_at=at(1))]))
    store.postpone_effect(tried.id, 1, at(60), "busy")

    assert [p.id for p in store.due_effects(at(5))] == [due.id]
    # On recovery, effects never tried are run at once whatever their lease; tried ones wait for their retry time.
    assert [p.id for p in store.due_effects(at(5), fresh_too=True)] == [leased.id, due.id]
    assert [p.id for p in store.due_effects(at(5), limit=1, fresh_too=True)] == [leased.id]
    assert [p.id for p in store.due_effects(at(60))] == [leased.id, due.id, tried.id]


def test_next_due_is_the_earliest_tick_or_effect(store: Store) -> None:
    assert store.next_due() is None

    _, [pending] = store.apply(transition(due_at=at(50), effects=[effect(pod="shop/web", run_at=at(20))]))
    assert store.next_due() == at(20)

    store.apply(transition(expected=1, from_state="admitted", to="injected", trigger="injected", due_at=at(50),
                           consumes=pending.id))
    due = store.next_due()
    assert due == at(50) and due.tzinfo is UTC


def test_counts_are_per_kind_and_state(store: Store) -> None:
    store.apply(transition("a"))
    store.apply(transition("b"))
    store.apply(transition("c"))
    store.apply(transition("c", expected=1, from_state="admitted", to="injected", trigger="injected"))
    store.apply(transition("a/1", kind="cert", to="requested", trigger="request"))

    assert store.counts() == {"pod": {"admitted": 2, "injected": 1}, "cert": {"requested": 1}}


def test_a_key_prefix_matches_literally_even_with_like_wildcards(store: Store) -> None:
    keys = ["a_b/1", "a_b/2", "axb/1", "a%b/1", "aXYb/1", "a\\b/1", "a_b"]
    for key in keys:
        store.apply(transition(key, kind="cert", to="requested", trigger="request"))
    store.apply(transition("a_b/9"))  # another kind

    def keys_with(prefix: str, kind: str | None = "cert") -> list[str]:
        return [e.key for e in store.list(kind, key_prefix=prefix)]

    assert keys_with("a_b/") == ["a_b/1", "a_b/2"]
    assert keys_with("a%b/") == ["a%b/1"]
    assert keys_with("a\\b/") == ["a\\b/1"]
    assert keys_with("a_") == ["a_b", "a_b/1", "a_b/2"]
    assert keys_with("a") == sorted(keys)
    assert keys_with("a_b/", kind=None) == ["a_b/1", "a_b/2", "a_b/9"]


def test_list_filters_by_kind_and_states(store: Store) -> None:
    store.apply(transition("a"))
    store.apply(transition("b"))
    store.apply(transition("b", expected=1, from_state="admitted", to="injected", trigger="injected"))
    store.apply(transition("a", kind="cert", to="requested", trigger="request"))

    assert [e.ref for e in store.list()] == ["cert/a", "pod/a", "pod/b"]
    assert [e.ref for e in store.list("pod", states=["injected"])] == ["pod/b"]
    assert [e.ref for e in store.list(states=["admitted", "requested"])] == ["cert/a", "pod/a"]


def test_times_come_back_aware_in_utc_whatever_zone_they_went_in(store: Store) -> None:
    paris = timezone(timedelta(hours=2))
    when = datetime(2026, 1, 1, 14, 0, tzinfo=paris)  # 12:00 UTC
    _, [pending] = store.apply(transition(when=when, due_at=when + timedelta(seconds=5),
                                          effects=[effect(pod="shop/web", run_at=when)]))
    store.postpone_effect(pending.id, 1, when + timedelta(seconds=1), "busy")

    entity = store.get("pod", "shop/web")
    [row] = store.pending_effects()
    [entry] = store.journal("pod", "shop/web")
    [due] = store.due_entities(at(10))
    times = [entity.created_at, entity.updated_at, entity.due_at, entity.retry_at,  # type: ignore[union-attr]
             row.run_at, entry.at, due.due_at, store.next_due()]
    assert times == [T0, T0, at(5), at(1), at(1), T0, at(5), at(1)]
    assert all(t is not None and t.tzinfo is UTC for t in times)


def test_a_naive_datetime_is_refused(store: Store) -> None:
    naive = datetime(2026, 1, 1, 12, 0)
    _, [pending] = store.apply(transition(effects=[effect(pod="shop/web")]))
    before = (store.list(), store.journal_all(), store.pending_effects())

    with pytest.raises(ValueError, match="naive datetime"):
        store.apply(transition(expected=1, from_state="admitted", to="injected", trigger="injected", when=naive))
    with pytest.raises(ValueError, match="naive datetime"):
        store.apply(transition("other", effects=[effect(pod="other", run_at=naive)]))
    with pytest.raises(ValueError, match="naive datetime"):
        store.postpone_effect(pending.id, 1, naive, "busy")
    with pytest.raises(ValueError, match="naive datetime"):
        store.due_entities(naive)

    assert (store.list(), store.journal_all(), store.pending_effects()) == before
