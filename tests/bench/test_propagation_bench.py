"""The propagation benchmark still runs against the code as it is, both ways: the publisher driven directly, and a
control plane from a policy change to the acks (its figures are read from bench/results, not here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.propagation import STAGES, main

pytestmark = pytest.mark.integration  # a nats-server, a control plane and worker processes


def _sane(spread: dict, *, above: float = 0.0) -> None:
    values = [spread[k]["value"] for k in ("p50", "p99", "max")]
    assert above <= values[0] <= values[1] <= values[2] < 120_000, spread
    assert {spread[k]["unit"] for k in ("p50", "p99", "max")} == {"ms"}


def test_the_quick_run_measures_the_publisher_and_the_engine_and_every_ack_comes_back(tmp_path: Path,
                                                                                     capsys) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "propagation-quick.json").read_text())
    assert doc["mode"] == "quick" and set(doc["measurements"]) == {"publisher", "engine"}
    rounds, engine_rounds = doc["sizes"]["rounds"], doc["sizes"]["engine_rounds"]

    [publisher] = doc["measurements"]["publisher"]["results"]
    assert publisher["sidecars"] == 10 and set(publisher["steps"]) == {"batch", "sequential"}
    for step in publisher["steps"].values():
        assert step["acks"] == step["rounds"] * 10 == rounds * 10
        _sane(step)

    [engine] = doc["measurements"]["engine"]["results"]
    assert engine["sidecars"] == 10 and engine["rounds"] == engine_rounds >= 1
    assert engine["acks"] == engine_rounds * 10  # every sidecar acknowledged every change
    assert (engine["wrong_documents"], engine["extra_generations"]) == (0, 0)
    _sane(engine["acked"])
    _sane(engine["synced"])
    # The clock starts before the apply: the world watcher, the coalescing window and the publish all come after.
    assert engine["stages"]["change"]["p50"]["value"] >= engine["apply"]["p50"]["value"] > 0
    assert engine["stages"]["window_closed"]["p50"]["value"] >= engine["stages"]["change"]["p50"]["value"]
    for stage in STAGES:
        _sane(engine["stages"][stage])
    # The sidecar acknowledges before the control plane journals it (same clock, one machine).
    assert engine["synced"]["p50"]["value"] >= engine["acked"]["p50"]["value"]
    assert all(cost["value"] > 0 and cost["unit"] == "ms" for cost in engine["costs"].values())
