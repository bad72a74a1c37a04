"""The lifecycle engine: event in, machine step, one commit, effects out, outcomes back in.

Theory of operation
-------------------
`fire(kind, key, trigger)` loads the entity's row, asks its machine for a `Step`, and commits the new row, the
journal row and the step's effects in one transaction (`Store.apply`). Only then are the effects run. Each effect's
outcome comes back as a trigger on the same entity, committed in the transaction that also deletes the effect from
the outbox. So a crash at any point leaves either the effect in the outbox (it runs again: effects are idempotent)
or its outcome committed (it does not run again), and never a transition journaled twice.

Two engines may share a database (PostgreSQL), and so may two threads of one engine. Writes are guarded by the row's
version: the loser of a race gets `StaleVersion`, reloads the row and runs the machine again on what it finds, which
may now refuse the trigger. There is no lock in the engine: each thread runs the effects its own commits produced.

Effects a process commits are claimed for a lease (`effect_lease`): the process runs them at once, and only if it
dies do they become due for anyone's tick. `recover()` at start runs the never-tried ones without waiting.

A failed attempt is not a transition: the outbox row keeps the attempt count and the time of the next try
(exponential backoff, capped), the entity's row shows them as retry_count / retry_at, and after `max_attempts` the
failure is fed back as the effect's `on_fail` trigger, which every machine maps to an explicit failed state.

The scheduler calls `tick()`: entities whose `due_at` has come get the `tick` trigger, effects whose `run_at` has
come run. Nothing is scheduled in memory, so a restart loses nothing.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

from actions import Actions
from actions.clock import Clock
from actions.errors import TemporaryError
from engine import executor
from engine.errors import Contention, InvalidKey, UnknownEntity
from engine.executor import Fail, Ok, Retry
from engine.throttle import SigningSchedule
from machines import BadPayload, Context, IllegalTrigger, Spec, spec_for
from machines.base import effect_from_dict, effect_to_dict
from machines.effects import PublishConfig
from store import KEY_LENGTH, EffectGone, Entity, NewEffect, PendingEffect, StaleVersion, Store, Transition

log = logging.getLogger("meshloom.engine")


# Rotations are signed at most this fast. Signing costs about 1 ms of CPU (bench/identity.py): half a core is left
# for new pods and everything else, and 10,000 certificates due at once still rotate within 20 s.
DEFAULT_SIGNING_RATE = 500.0
DEFAULT_SIGNING_BURST = 50


@dataclass(frozen=True, slots=True)
class Policy:
    """How hard the engine tries. Numbers with their reasons."""

    effect_lease: float = 30.0  # seconds a committing process keeps its effects to itself before others may run them
    max_attempts: int = 8  # waits of 1+2+...+64 s: about two minutes of trying before an effect counts as failed
    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    conflict_retries: int = 50  # reload-and-retry rounds on StaleVersion before giving up
    tick_batch: int = 1000  # due entities or effects handled per tick; the rest wait for the next one


def backoff(attempt: int, policy: Policy) -> float:
    """Seconds before try number `attempt + 1`: exponential, capped."""
    return float(min(policy.backoff_cap, policy.backoff_base * 2 ** max(0, attempt - 1)))


@dataclass
class Stats:
    """Counters of this process's work, counted under a lock: several threads fire and drain at once."""

    transitions: int = 0
    conflicts: int = 0
    effects_run: int = 0
    retries: int = 0
    deferrals: int = 0
    failures: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def count(self, name: str, kind: str | None = None) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)
            if kind is not None:
                self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


@dataclass(frozen=True, slots=True)
class TickReport:
    entities: int
    effects: int


class Engine:
    def __init__(
        self,
        store: Store,
        actions: Actions | None,
        clock: Clock,
        *,
        settings: Mapping[str, Any] | None = None,
        policy: Policy | None = None,
        jitter: Callable[[], float] | None = None,
        actor: str = "engine",
    ) -> None:
        self.store, self.actions, self.clock = store, actions, clock
        self.settings: Mapping[str, Any] = dict(settings or {})
        self.policy = policy or Policy()
        self._jitter = jitter or random.Random().random
        self.actor = actor
        self.stats = Stats()
        # Rotations wait for the signing rate limit; first certificates do not (engine/throttle.py).
        rate = float(self.settings.get("signing_rate", DEFAULT_SIGNING_RATE))
        self.signing: SigningSchedule | None = (
            SigningSchedule(rate, int(self.settings.get("signing_burst", DEFAULT_SIGNING_BURST)), clock)
            if rate > 0 else None)
        # Each thread drains the effects its own commits produced: a slow effect in one thread (the scheduler's
        # tick) never holds up a trigger fired from another (a sidecar's acknowledgement). Two threads at the same
        # entity are kept apart by the version column, as two processes are.
        self._local = threading.local()
        # Hooks for the composition root: after each commit (tests use it to crash at the worst moment), and when a
        # commit asks for a tick at a time (the scheduler wakes up early for it).
        self.on_commit: Callable[[Entity, list[PendingEffect]], None] | None = None
        self.on_due: Callable[[datetime], None] | None = None
        # Where the tick's effects run: here by default; the runtime hands them to its workers.
        self.dispatch: Callable[[list[PendingEffect]], None] = self.run_all

    # ---- firing ----------------------------------------------------------------------------------------------
    def fire(self, kind: str, key: str, trigger: str, payload: Mapping[str, Any] | None = None, *,
             actor: str | None = None, drain: bool = True, consumes: int | None = None) -> Entity | None:
        """Run one trigger to commit; returns the entity after it (None if a guard made it a no-op on nothing)."""
        spec = spec_for(kind)
        if not 0 < len(key) <= KEY_LENGTH:
            raise InvalidKey(kind, key, KEY_LENGTH)
        for _ in range(self.policy.conflict_retries):
            current = self.store.get(kind, key)
            try:
                committed = self._step(spec, kind, key, current, trigger, payload or {}, actor, consumes)
            except StaleVersion:
                self.stats.count("conflicts")
                continue
            if drain:
                self.drain()
            return committed if committed is not None else current
        raise Contention(kind, key, self.policy.conflict_retries)

    def fire_many(self, kind: str, items: Sequence[tuple[str, Mapping[str, Any]]], trigger: str, *,
                  actor: str | Callable[[str], str] | None = None) -> int:
        """Fire one trigger on many existing entities of a kind (key, payload) and commit them together, in batches;
        entities whose guard makes it a no-op, that do not exist, or whose trigger is illegal in their state are
        skipped (as a late notification is). A batch that loses a race is fired again one by one. Effects are left
        to this thread's work list, as with `fire(drain=False)`. Returns how many transitions were committed."""
        return self._fire_batch(kind, [(key, payload, None) for key, payload in items], trigger, actor)

    def _fire_batch(self, kind: str, items: Sequence[tuple[str, Mapping[str, Any], int | None]], trigger: str,
                    actor: str | Callable[[str], str] | None) -> int:
        """`fire_many`, where each item may be the outcome of an outbox row (`consumes`), deleted in the commit."""
        spec = spec_for(kind)
        done = 0
        for i in range(0, len(items), self.policy.tick_batch):
            batch = items[i:i + self.policy.tick_batch]
            rows = self.store.get_many(kind, [key for key, _, _ in batch])
            steps: list[tuple[tuple[str, Mapping[str, Any], int | None], Transition]] = []
            for item in batch:
                key, payload, consumes = item
                current = rows.get(key)
                try:
                    if current is None:
                        raise UnknownEntity(kind, key)
                    t = self._transition(spec, kind, key, current, trigger, payload, _actor(actor, key), consumes)
                except (IllegalTrigger, BadPayload, UnknownEntity) as exc:
                    log.info("%s/%s %s skipped: %s", kind, key, trigger, exc)
                    t = None
                except Exception:  # one entity's trouble (a row another version wrote) must not stop the others
                    log.exception("%s/%s %s failed; it is left for a later try", kind, key, trigger)
                    continue
                if t is not None:
                    steps.append((item, t))
                elif consumes is not None:
                    self.store.drop_effect(consumes)  # an outcome that changes nothing is done with
            if not steps:
                continue
            steps.sort(key=lambda step: step[1].key)  # rows locked in one order by every batch: no deadlock
            keys = [t.key for _, t in steps]
            try:
                if len(set(keys)) != len(keys):  # two steps of one entity cannot share a commit
                    raise StaleVersion(kind, keys[0], 0)
                committed = self.store.apply_all([t for _, t in steps])
            except (StaleVersion, EffectGone):
                self.stats.count("conflicts")
                done += self._fire_each(kind, [item for item, _ in steps], trigger, actor)
                continue
            for (_, t), (entity, pending) in zip(steps, committed, strict=True):
                self._committed(t, entity, pending, wake=False)
            dues = [t.due_at for _, t in steps if t.due_at is not None]
            if dues and self.on_due is not None:
                self.on_due(min(dues))
            done += len(committed)
        return done

    def _fire_each(self, kind: str, items: Sequence[tuple[str, Mapping[str, Any], int | None]], trigger: str,
                   actor: str | Callable[[str], str] | None) -> int:
        done = 0
        for key, payload, consumes in items:
            try:
                if self.fire(kind, key, trigger, payload, actor=_actor(actor, key), drain=False,
                             consumes=consumes) is not None:
                    done += 1
            except (IllegalTrigger, UnknownEntity, BadPayload, EffectGone) as exc:
                log.info("%s/%s %s skipped: %s", kind, key, trigger, exc)
                if consumes is not None and not isinstance(exc, EffectGone):
                    self.store.drop_effect(consumes)
        return done

    def _transition(self, spec: Spec, kind: str, key: str, current: Entity | None, trigger: str,
                    payload: Mapping[str, Any], actor: str | None, consumes: int | None) -> Transition | None:
        """What the machine says `trigger` does to the entity, as a transition to commit (None: nothing)."""
        if current is None and trigger != spec.create:
            raise UnknownEntity(kind, key)
        now = self.clock.now()
        state = spec.state(current.state) if current is not None else None
        ctx = Context(key=key, data=current.data if current else {}, payload=payload, now=now,
                      jitter=self._jitter() * 2 - 1, settings=self.settings,
                      due_at=current.due_at if current else None)
        step = spec.step(state, trigger, ctx)
        if step is None:
            return None
        lease = now + timedelta(seconds=self.policy.effect_lease)
        return Transition(
            kind=kind, key=key, expected_version=current.version if current else 0,
            from_state=state.value if state is not None else None, to_state=step.dest.value, trigger=trigger,
            reason=str(step.reason), actor=actor or self.actor, at=now, data=step.data, due_at=step.due_at,
            detail=_detail(payload),
            effects=tuple(NewEffect(type(e).__name__, effect_to_dict(e), lease) for e in step.effects),
            consumes=consumes,
        )

    def _step(self, spec: Spec, kind: str, key: str, current: Entity | None, trigger: str,
              payload: Mapping[str, Any], actor: str | None, consumes: int | None) -> Entity | None:
        transition = self._transition(spec, kind, key, current, trigger, payload, actor, consumes)
        if transition is None:
            if consumes is not None:
                self.store.drop_effect(consumes)
            return None
        entity, pending = self.store.apply(transition)
        self._committed(transition, entity, pending)
        return entity

    def _committed(self, transition: Transition, entity: Entity, pending: list[PendingEffect], *,
                   wake: bool = True) -> None:
        self._record(transition)
        if self.on_commit is not None:
            self.on_commit(entity, pending)
        if wake and transition.due_at is not None and self.on_due is not None:
            self.on_due(transition.due_at)
        self._work().extend(pending)

    def _record(self, t: Transition) -> None:
        """Log the transition with the same fields the journal row has (the audit and the log say one thing)."""
        self.stats.count("transitions", t.kind)
        log.info("%s/%s %s -> %s on %s (%s)", t.kind, t.key, t.from_state or "-", t.to_state, t.trigger, t.reason,
                 extra={"kind": t.kind, "key": t.key, "from_state": t.from_state, "to_state": t.to_state,
                        "trigger": t.trigger, "reason": t.reason, "actor": t.actor})

    # ---- effects ---------------------------------------------------------------------------------------------
    def _work(self) -> deque[PendingEffect]:
        """The effects this thread committed and has not run yet."""
        work: deque[PendingEffect] | None = getattr(self._local, "work", None)
        if work is None:
            work = self._local.work = deque()
        return work

    def discard_work(self) -> list[PendingEffect]:
        """Hand back and forget the effects this thread committed without running them. They stay in the outbox
        for whoever runs effects (the control plane's tick); for callers that only commit, as the benchmarks."""
        work = self._work()
        left = list(work)
        work.clear()
        return left

    def drain(self) -> int:
        """Run the effects this thread committed, and those their outcomes commit, until none are left."""
        if getattr(self._local, "draining", False):
            return 0  # called from inside an effect: the drain already running will get to it
        self._local.draining = True
        work, n = self._work(), 0
        try:
            while work:
                self.run_effect(work.popleft())
                n += 1
        except BaseException:
            # What is left is in the outbox under its lease: a tick runs it. Kept here, it would run late, twice.
            work.clear()
            raise
        finally:
            self._local.draining = False
        return n

    def run_effect(self, pending: PendingEffect) -> None:
        try:
            eff = effect_from_dict(pending.effect, pending.payload)
        except (ValueError, TypeError) as exc:
            # Written by another version of Meshloom, or damaged: it stays in the outbox, visible, tried rarely.
            log.error("%s/%s outbox entry %d cannot be read: %s", pending.kind, pending.key, pending.id, exc)
            run_at = self.clock.now() + timedelta(seconds=self.policy.backoff_cap)
            self.store.postpone_effect(pending.id, pending.attempts + 1, run_at, f"cannot be read: {exc}")
            return
        outcome = executor.run(self, eff, f"{pending.kind}/{pending.key}")
        self.stats.count("effects_run")
        if isinstance(outcome, Retry):
            if self._postpone(pending, outcome):
                return
            outcome = Fail(f"gave up after {pending.attempts + 1} attempts: {outcome.reason}")
        if isinstance(outcome, Ok):
            trigger, payload = eff.on_ok, dict(outcome.payload)
        else:
            self.stats.count("failures")
            trigger, payload = eff.on_fail, {"reason": outcome.reason}
            log.warning("%s/%s effect %s failed: %s", pending.kind, pending.key, pending.effect, outcome.reason)
        if trigger is None:
            self.store.drop_effect(pending.id)
            return
        try:
            self.fire(pending.kind, pending.key, trigger, payload, actor=f"effect:{pending.effect}",
                      drain=False, consumes=pending.id)
        except EffectGone:
            pass  # another engine fed this outcome back first
        except (IllegalTrigger, UnknownEntity, BadPayload) as exc:
            log.info("outcome of %s for %s/%s dropped: %s", pending.effect, pending.kind, pending.key, exc)
            self.store.drop_effect(pending.id)

    def _postpone(self, pending: PendingEffect, outcome: Retry) -> bool:
        """Keep the effect for a later try; False when it has had its last attempt."""
        attempt = pending.attempts + 1 if outcome.counted else pending.attempts
        if attempt >= self.policy.max_attempts and outcome.counted:
            return False
        delay = outcome.after if outcome.after is not None else backoff(attempt, self.policy)
        run_at = self.clock.now() + timedelta(seconds=delay)
        self.stats.count("retries" if outcome.counted else "deferrals")
        try:
            self.store.postpone_effect(pending.id, attempt, run_at, outcome.reason)
        except EffectGone:
            return True
        if self.on_due is not None:
            self.on_due(run_at)
        return True

    # ---- time ------------------------------------------------------------------------------------------------
    def tick(self) -> TickReport:
        """One scheduler tick: fire `tick` on every due entity, then hand the effects due and those the ticks made
        to `dispatch`. The tick itself only commits, so a burst of rotations does not make the tick late."""
        now = self.clock.now()
        due = self.store.due_entities(now, self.policy.tick_batch)
        by_kind: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
        for entity in due:
            by_kind.setdefault(entity.kind, []).append((entity.key, {}))
        for kind, items in by_kind.items():  # one commit for all the entities of a kind that came due together
            self._isolated(kind, self.fire_many, kind, items, "tick", actor="scheduler")
        effects = self.store.due_effects(now, self.policy.tick_batch)
        made = self.discard_work()
        seen = {p.id for p in made}
        self.dispatch(made + [p for p in effects if p.id not in seen])
        return TickReport(len(due), len(effects))

    def run_publishes(self, pending: list[PendingEffect]) -> None:
        """PublishConfig effects together: the documents read in one query, their shards first, one `publish_many`,
        the outcomes committed in one transaction. Any trouble, and each effect is run on its own instead (the
        effect's own retry and failure rules then apply)."""
        effects: list[tuple[PendingEffect, PublishConfig]] = []
        alone: list[PendingEffect] = []
        for p in pending:
            try:
                eff = effect_from_dict(p.effect, p.payload)
            except (ValueError, TypeError):
                eff = None  # run_effect postpones an unreadable row
            if isinstance(eff, PublishConfig):
                effects.append((p, eff))
            else:
                alone.append(p)
        docs = self.store.documents([e.sidecar for _, e in effects])
        ready = [(p, e) for p, e in effects if e.sidecar in docs]
        alone += [p for p, e in effects if e.sidecar not in docs]
        if ready and self.actions is not None:
            try:
                executor.publish_shards(self, [docs[e.sidecar].body for _, e in ready])
                self.actions.publisher.publish_many([(e.sidecar, e.generation, docs[e.sidecar].body.encode())
                                                     for _, e in ready])
            except TemporaryError as exc:
                # NATS is away or slow: one by one would wait out a timeout each. The batch waits, as one effect.
                log.info("publishing %d documents together failed (%s); all of them try again", len(ready), exc)
                alone += [p for p, _ in ready if not self._postpone(p, Retry(exc.reason, exc.retry_after))]
            except Exception as exc:  # find the document at fault: each runs alone, with the engine's own rules
                log.info("publishing %d documents together failed (%s); one by one instead", len(ready), exc)
                alone += [p for p, _ in ready]
            else:
                for _ in ready:
                    self.stats.count("effects_run")
                self._fire_batch("sidecar", [(e.sidecar, {"generation": e.generation}, p.id) for p, e in ready],
                                 "published", "effect:PublishConfig")
        elif ready:
            alone += [p for p, _ in ready]
        self.run_all(alone)
        self.drain()

    def run_all(self, pending: list[PendingEffect]) -> None:
        """Run effects here and now, each isolated, with whatever their outcomes make (the default `dispatch`)."""
        for p in pending:
            self._isolated(f"{p.kind}/{p.key}", self._run_and_drain, p)

    def recover(self) -> int:
        """At start: run what a previous process committed but never ran, without waiting for its lease."""
        pending = self.store.due_effects(self.clock.now(), self.policy.tick_batch, fresh_too=True)
        self.run_all(pending)
        return len(pending)

    def _run_and_drain(self, pending: PendingEffect) -> None:
        self.run_effect(pending)
        self.drain()

    @staticmethod
    def _isolated(ref: str, work: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """One entity's trouble must not stop the batch: it would stop at the same row on every tick."""
        try:
            work(*args, **kwargs)
        except Exception:  # each commit is atomic, so nothing is left half-done; the entity is due again later
            log.exception("%s: scheduled work failed; the next tick tries again", ref)


def _actor(actor: str | Callable[[str], str] | None, key: str) -> str | None:
    return actor(key) if callable(actor) else actor


def _detail(payload: Mapping[str, Any]) -> str | None:
    reason = payload.get("reason")
    return str(reason) if reason is not None else None
