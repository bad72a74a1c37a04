"""The controller-memory benchmark still runs against the code as it is: a small cluster fed through the watches
converges, and the controller's memory is recorded (its figures are read from bench/results, not here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.webhook import main

pytestmark = pytest.mark.integration  # etcd, kube-apiserver and the controller in a process of its own


def test_the_quick_run_converges_and_records_the_controllers_memory(tmp_path: Path, capsys: Any,
                                                                     kube_api: Any) -> None:
    # `kube_api` makes the test skip (or, in CI, fail) where kube-apiserver is not built, as every API server test
    # does; the benchmark starts a server of its own, as it does when run by hand.
    assert main(["--quick", "--out", str(tmp_path), "--section", "controller"]) == 0
    doc = json.loads((tmp_path / "webhook-quick.json").read_text())
    result = doc["sections"]["controller"]
    assert "skipped" not in result, result
    assert result["checks"]["ok"], result["checks"]
    assert result["checks"]["pods_in_wiring"] == result["pods"] == 200
    assert result["checks"]["pod_states"] == {"injected": 200}
    assert 0 < result["rss_idle"]["value"] <= result["rss"]["value"] <= result["rss_peak"]["value"]
    assert result["rss"]["target"] == 500.0 and result["rss"]["unit"] == "MB"
    assert "controller" in capsys.readouterr().out
