"""Two engine processes on one PostgreSQL database, changing the same sidecars at the same time.

The version column is the only thing between them: a writer whose row changed since it read it gets StaleVersion,
reloads and runs the machine again. So no change is lost (each sidecar's `desired` generation counts every change
both made), none is journaled twice (one journal row per version, versions contiguous), and the race really happened
(the engines report conflicts).
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import pytest

from actions import fake_actions
from actions.clock import SystemClock
from engine import Engine
from store import migrate
from tests.integration.children import Child
from tests.support.documents import DocumentedStore
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.integration

CHILD = Path(__file__).with_name("rollout_child.py")
SIDECARS = [f"shop/web-{i}" for i in range(5)]
ROUNDS = 200  # per process: 200 changes at each of the 5 sidecars
ACTORS = ("engine-a", "engine-b")
START_TIMEOUT = 60.0
RUN_TIMEOUT = 300.0


def test_two_engines_changing_the_same_sidecars_lose_nothing_and_journal_everything_once(
        postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database(f"meshloom_race_{uuid.uuid4().hex[:12]}")
    migrate.upgrade(url)
    clock = SystemClock()
    store = DocumentedStore(url)
    try:
        engine = Engine(store, fake_actions(clock), clock, actor="test")
        for key in SIDECARS:
            engine.fire("sidecar", key, "register")

        with ExitStack() as stack:
            # Opposite orders: however far apart the two start, they cross at some sidecar in every round.
            orders = (SIDECARS, SIDECARS[::-1])
            children = [stack.enter_context(Child(CHILD, url, actor, str(ROUNDS), *keys))
                        for actor, keys in zip(ACTORS, orders, strict=True)]
            for child in children:
                child.expect("READY", timeout=START_TIMEOUT)
            for child in children:
                child.send("GO")
            reports = [json.loads(c.expect("DONE", timeout=RUN_TIMEOUT).removeprefix("DONE ")) for c in children]
            for child in children:
                assert child.finish(timeout=RUN_TIMEOUT) == 0, child.stderr

        for report in reports:
            assert report["fired"] == dict.fromkeys(SIDECARS, ROUNDS)
            assert report["stats"]["transitions"] == ROUNDS * len(SIDECARS)
        for key in SIDECARS:
            sidecar = store.get("sidecar", key)
            assert sidecar is not None
            changes = sum(report["fired"][key] for report in reports)
            assert sidecar.data["desired"] == 1 + changes  # no lost update
            journal = store.journal("sidecar", key)
            assert [j.version for j in journal] == list(range(1, sidecar.version + 1))
            assert sidecar.version == 1 + changes
            assert Counter(j.actor for j in journal) == {"test": 1, **dict.fromkeys(ACTORS, ROUNDS)}
        assert sum(report["stats"]["conflicts"] for report in reports) > 0
    finally:
        store.close()
