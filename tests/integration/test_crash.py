"""Crash safety with a real process: SIGKILL an engine at the worst moments; the next one finishes the work.

Each case runs engine_child.py on a SQLite file until it blocks at a chosen point, kills it with SIGKILL, checks what
the store holds, then runs a second child that only calls `engine.recover()`. Whatever the moment of the kill, every
transition is journaled exactly once (versions 1..n, no gap, no duplicate) and the outbox ends empty. An effect
killed before its outcome was committed runs again -- which is why effects are idempotent.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from store import Store
from tests.integration.children import Child
from tests.support.documents import DocumentedStore

pytestmark = pytest.mark.integration

CHILD = Path(__file__).with_name("engine_child.py")
POD = "shop/web"
CERT = "shop/web/1"

ADMITTED = [("admit", "admitted"), ("injected", "injected")]
SCHEDULED = {
    f"pod/{POD}": [*ADMITTED, ("schedule", "scheduled"), ("identity_requested", "identity-requested"),
                   ("identity_issued", "identity-issued")],
    f"cert/{CERT}": [("request", "requested"), ("issued", "issued"), ("delivered", "delivered")],
}


@dataclass(frozen=True)
class Case:
    scenario: str
    block: tuple[str, str]
    outbox_at_kill: list[str]  # effect names, oldest first; none of them has been tried
    runs_at_kill: dict[str, int]  # action runs logged before the kill
    runs_at_end: dict[str, int]
    recovered: int
    journals: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: {f"pod/{POD}": ADMITTED})


CASES = {
    "killed-after-commit-before-inject": Case(
        "admit", ("--block-on-commit", "InjectSidecar"), ["InjectSidecar"], {}, {"inject": 1}, recovered=1),
    "killed-after-inject-before-its-outcome": Case(
        "admit", ("--block-after", "inject"), ["InjectSidecar"], {"inject": 1}, {"inject": 2}, recovered=1),
    # The certificate's commit happens inside RequestIdentity, so the pod's own outcome is not committed either.
    "killed-after-commit-before-sign": Case(
        "schedule", ("--block-on-commit", "SignSvid"), ["RequestIdentity", "SignSvid"], {"inject": 1},
        {"inject": 1, "sign": 1}, recovered=2, journals=SCHEDULED),
    "killed-after-sign-before-its-outcome": Case(
        "schedule", ("--block-after", "sign"), ["SignSvid"], {"inject": 1, "sign": 1}, {"inject": 1, "sign": 2},
        recovered=1, journals=SCHEDULED),
}

KILL_TIMEOUT = 60.0  # seconds for a child to reach its blocking point (interpreter start and imports included)
RECOVER_TIMEOUT = 120.0


def runs(log: Path) -> Counter[str]:
    return Counter(line.split()[0] for line in log.read_text().splitlines()) if log.exists() else Counter()


def assert_every_transition_journaled_once(store: Store) -> None:
    entities = store.list()
    for e in entities:
        assert [j.version for j in store.journal(e.kind, e.key)] == list(range(1, e.version + 1)), e.ref
    assert len(store.journal_all()) == sum(e.version for e in entities)  # no journal row without its entity


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_killed_engine_leaves_its_work_to_the_next_one_which_finishes_it(
        case: Case, sqlite_url: str, tmp_path: Path) -> None:
    log = tmp_path / "actions.log"
    with Child(CHILD, sqlite_url, case.scenario, "--log", str(log), *case.block) as child:
        child.expect("BLOCKED", timeout=KILL_TIMEOUT)
        child.kill()

    store = DocumentedStore(sqlite_url)
    try:
        pending = store.pending_effects()
        assert [p.effect for p in pending] == case.outbox_at_kill
        assert all(p.attempts == 0 for p in pending)
        assert runs(log) == case.runs_at_kill
        assert_every_transition_journaled_once(store)

        with Child(CHILD, sqlite_url, "recover", "--log", str(log)) as child:
            done = json.loads(child.expect("DONE", timeout=RECOVER_TIMEOUT).removeprefix("DONE "))
            assert child.finish(timeout=RECOVER_TIMEOUT) == 0, child.stderr

        assert done["recovered"] == case.recovered
        assert store.pending_effects() == []
        assert runs(log) == case.runs_at_end
        assert_every_transition_journaled_once(store)
        journals = {e.ref: [(j.trigger, j.to_state) for j in store.journal(e.kind, e.key)] for e in store.list()}
        assert journals == case.journals
        if "sign" in case.runs_at_end:
            # The certificate on record is the one signed last: the run the killed process made left no trace.
            last_serial = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("sign ")][-1]
            cert = store.get("cert", CERT)
            assert cert is not None and cert.data["serial"] == last_serial
    finally:
        store.close()
