"""One of two engine processes for tests/integration/test_concurrency.py, writing to the same sidecars at once.

    rollout_child.py URL ACTOR ROUNDS KEY...

Opens the store, prints READY, waits for a GO line on stdin (so that both processes start together), then fires
`change` ROUNDS times at every KEY, round-robin. Prints DONE followed by JSON: the changes fired per key (each one
returned, so each was accepted) and the engine's stats, whose `conflicts` counts the stale writes it retried.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from actions import fake_actions
from actions.clock import SystemClock
from engine import Engine
from tests.support.documents import DocumentedStore


def main() -> None:
    url, actor, rounds, keys = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    clock = SystemClock()
    store = DocumentedStore(url)
    engine = Engine(store, fake_actions(clock), clock, actor=actor)
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        sys.exit(3)
    fired = dict.fromkeys(keys, 0)
    for _ in range(rounds):
        for key in keys:
            engine.fire("sidecar", key, "change")
            fired[key] += 1
    store.close()
    print("DONE " + json.dumps({"fired": fired, "stats": dataclasses.asdict(engine.stats)}), flush=True)


if __name__ == "__main__":
    main()
