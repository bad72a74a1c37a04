from __future__ import annotations

from collections.abc import Iterator

import pytest

from actions import fake_actions
from actions.clock import FakeClock
from engine import Engine, Policy
from tests.engine.support import Mesh
from tests.support.documents import DocumentedStore

# Four attempts (waits of 1, 2 and 4 s) keep the give-up tests short; the shape is the one Policy() has.
POLICY = Policy(max_attempts=4)


@pytest.fixture
def mesh(sqlite_url: str) -> Iterator[Mesh]:
    clock = FakeClock()
    actions = fake_actions(clock)
    store = DocumentedStore(sqlite_url)
    # A jitter source of 0.5 is a draw of 0 in [-1, 1]: rotation at exactly half the lifetime.
    engine = Engine(store, actions, clock, policy=POLICY, jitter=lambda: 0.5)
    yield Mesh(engine, store, clock, actions)
    store.close()
