"""The running engine: one periodic scheduler tick (APScheduler) over an `Engine`, and its bootstrap.

The tick asks the store what is due; nothing else is scheduled. When a commit asks for a tick sooner than the next
one (a 100 ms coalescing window), the job's next run is brought forward instead of adding a job. The tick only
commits; the effects it makes or finds due run on a small pool of workers, so a burst of rotations (each a signature
and a delivery) never makes the next tick late. An effect already with a worker is not handed out again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from engine.core import Engine
from engine.errors import EngineError
from store import PendingEffect

log = logging.getLogger("meshloom.engine")
JOB_ID = "meshloom-tick"
DEFAULT_TICK_SECONDS = 1.0
MIN_WAKE = 0.05  # seconds between the end of a tick and the next one, at the least
DEFAULT_WORKERS = 2  # effects wait on I/O (the CA's disk, NATS, the node agent) more than on the CPU


class Runner:
    def __init__(self, engine: Engine, tick_seconds: float = DEFAULT_TICK_SECONDS,
                 workers: int = DEFAULT_WORKERS) -> None:
        self.engine = engine
        self.tick_seconds = tick_seconds
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.ticks = 0
        self.ticked = threading.Event()
        self._started = False
        self._stopping = False
        self._ticking = threading.Lock()
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="meshloom-effects")
        self._in_flight: set[int] = set()
        self._lock = threading.Condition()

    def _dispatch(self, pending: list[PendingEffect]) -> None:
        with self._lock:
            fresh = [p for p in pending if p.id not in self._in_flight]
            self._in_flight.update(p.id for p in fresh)
        # Publishes go together, a slice per worker: a change that reaches a thousand sidecars is a few
        # `publish_many` calls and a few commits, not a thousand of each.
        publishes = [p for p in fresh if p.effect == "PublishConfig"]
        if len(publishes) > 1:
            size = -(-len(publishes) // self.workers)
            for i in range(0, len(publishes), size):
                self._pool.submit(self._run, publishes[i:i + size], self.engine.run_publishes)
            fresh = [p for p in fresh if p.effect != "PublishConfig"]
        for p in fresh:
            self._pool.submit(self._run, [p], self.engine.run_all)

    def _run(self, batch: list[PendingEffect], run: Callable[[list[PendingEffect]], None]) -> None:
        try:
            run(batch)
        except Exception:
            log.exception("running %d effect(s) failed; they are due again after their lease", len(batch))
        finally:
            with self._lock:
                self._in_flight.difference_update(p.id for p in batch)
                self._lock.notify_all()

    def settle(self, timeout: float) -> bool:
        """Wait until the workers have run everything handed to them; False if `timeout` passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._in_flight, timeout)

    def _tick(self) -> None:
        with self._ticking:
            if self._stopping:
                return
            self._tick_once()

    def _tick_once(self) -> None:
        try:
            self.engine.tick()
        except Exception:  # the scheduler must survive a bad tick; the next one tries again
            log.exception("scheduler tick failed")
        self.ticks += 1
        self.ticked.set()
        # What is due is in the store, so a wake-up lost while this tick ran (APScheduler skips a run that comes
        # while the job is still running) is found again here: the next run is brought forward to it.
        try:
            due = self.engine.store.next_due()
        except Exception:
            log.exception("reading the next due time failed")
            return
        if due is not None:
            # Never sooner than a moment from now (the scheduler's now: wall time): an entity whose tick changed
            # nothing keeps its due time.
            soonest = datetime.now(UTC) + timedelta(seconds=min(MIN_WAKE, self.tick_seconds))
            self._wake(max(due, soonest))

    def _wake(self, at: datetime) -> None:
        if self._stopping:
            return
        job = self.scheduler.get_job(JOB_ID)
        if job is not None and job.next_run_time is not None and at < job.next_run_time:
            job.modify(next_run_time=at)

    def start(self) -> int:
        """Run what a previous process left in the outbox, then start ticking; returns how many effects it ran."""
        recovered = self.engine.recover()
        self.engine.dispatch = self._dispatch
        self.scheduler.add_job(self._tick, "interval", seconds=self.tick_seconds, id=JOB_ID, max_instances=1,
                               coalesce=True, next_run_time=self.engine.clock.now())
        self.engine.on_due = self._wake
        self.scheduler.start()
        self._started = True
        return recovered

    def stop(self) -> None:
        if self._started:
            self.engine.on_due = None
            self._stopping = True
            # Not wait=True: APScheduler's shutdown holds its job-store lock while it waits for running jobs, and a
            # running tick asks that lock for its next run time. The tick that runs is waited for here instead.
            self.scheduler.shutdown(wait=False)
            with self._ticking:
                pass
            self._pool.shutdown(wait=True, cancel_futures=True)
            with self._lock:
                self._in_flight.clear()  # cancelled ones never ran their `finally`; their rows are in the outbox
            self.engine.dispatch = self.engine.run_all
            self._started = False
            self._stopping = False


class RotationUnderWay(EngineError):
    pass


def start_ca_rotation(engine: Engine) -> tuple[str, str]:
    """Prepare the next CA generation to replace the active one; returns (new, old)."""
    gens = engine.store.list("ca")
    busy = [g.key for g in gens if g.state in ("preparing", "prepared")]
    if busy:
        raise RotationUnderWay(f"ca/{busy[0]}: a CA rotation is already under way")
    active = [g.key for g in gens if g.state == "active"]
    if not active:
        raise RotationUnderWay("no active CA generation to rotate: start the control plane first ('meshctl up')")
    old = max(active, key=int)
    new = str(1 + max(int(g.key) for g in gens))
    engine.fire("ca", new, "prepare", {"previous": old, "auto_activate": True}, drain=False)
    return new, old


def ensure_ca(engine: Engine) -> None:
    """A fresh mesh gets its first CA generation, activated as soon as it is ready."""
    if not engine.store.list("ca"):
        engine.fire("ca", "1", "prepare", {"auto_activate": True}, actor="bootstrap")
