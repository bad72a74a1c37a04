"""The webhook benchmark still runs against the code as it is: a burst of pod creations on a real API server, every
pod injected (its figures are read from bench/results, not here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.webhook import main

pytestmark = pytest.mark.integration  # etcd, kube-apiserver and the webhook server


def test_the_quick_run_injects_every_pod_of_the_burst_and_times_the_webhook(tmp_path: Path, capsys: Any,
                                                                           kube_api: Any) -> None:
    # `kube_api` is asked for so that the test skips (or, in CI, fails) as every API server test does when
    # kube-apiserver is not built; the benchmark starts a server of its own, as it does when run by hand.
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "webhook-quick.json").read_text())
    result = doc["sections"]["admission"]
    assert "skipped" not in result, result
    assert result["checks"]["ok"], result["checks"]
    assert result["pods"] == result["checks"]["pods_injected"] == 100
    for spread in (result["webhook"], result["end_to_end"]):
        values = [spread[k]["value"] for k in ("p50", "p99", "max")]
        assert 0 < values[0] <= values[1] <= values[2], spread
    assert "p99" in doc["sections"]["admission"]["webhook"] and doc["targets"]["admission_webhook_p99"]["value"] == 50
