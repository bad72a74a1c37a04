"""The running engine: APScheduler really ticks the engine, and stops cleanly."""

from __future__ import annotations

from datetime import UTC, datetime

from actions.clock import FakeClock
from engine import Engine, Runner
from tests.engine.conftest import POLICY
from tests.engine.support import POD, Mesh

WAIT = 30.0  # seconds: how long a broken scheduler may take to be noticed, not how long a tick takes


def test_the_runner_recovers_then_ticks_the_engine_on_its_schedule_and_stops_cleanly(mesh: Mesh):
    # The scheduler runs on wall time; the engine's decisions on the fake clock, set to now so both agree.
    clock = FakeClock(datetime.now(UTC))
    engine = Engine(mesh.store, mesh.actions, clock, policy=POLICY, jitter=lambda: 0.5)
    engine.fire("pod", POD, "admit", drain=False)  # left behind by a "previous process"
    engine.fire("sidecar", POD, "register", {"owner": POD})
    clock.advance(1)  # the coalescing window has closed: the first tick must publish

    runner = Runner(engine, tick_seconds=0.05)
    runner.start()
    try:
        assert mesh.state("pod", POD) == "injected"  # recover() ran at start, before any tick
        assert runner.ticked.wait(timeout=WAIT)
        assert runner.ticks >= 1
        assert runner.settle(timeout=WAIT)  # the tick hands its effects to the workers
        assert mesh.state("sidecar", POD) == "sent"
        assert mesh.journal("sidecar", POD)[1].actor == "scheduler"
        assert mesh.publisher.published == {POD: 1}

        runner.ticked.clear()  # and it keeps ticking
        assert runner.ticked.wait(timeout=WAIT)
        assert runner.ticks >= 2
        assert runner.scheduler.running
        assert engine.on_due is not None
    finally:
        runner.stop()
    assert not runner.scheduler.running
    assert engine.on_due is None
    stopped_at = runner.ticks
    runner.stop()  # stopping twice is harmless
    assert runner.ticks == stopped_at


def test_a_runner_that_never_started_stops_without_complaint(mesh: Mesh):
    runner = Runner(mesh.engine)
    runner.stop()
    assert runner.ticks == 0 and not runner.ticked.is_set()
