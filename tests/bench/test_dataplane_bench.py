"""The data-plane benchmark still runs against the code as it is: a quick round through two real sidecars and
directly, written to its results file (its figures are read from bench/results, not judged here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.dataplane import main, parse_wrk

pytestmark = pytest.mark.integration  # network namespaces, a control plane, sidecars, wrk

WRK_OUTPUT = """Running 2s test @ http://10.1.2.3:80/bench
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.31ms  601.29us  12.04ms   80.12%
    Req/Sec    24.51k     1.20k   26.10k    85.00%
  Latency Distribution
     50%    1.21ms
     75%    1.52ms
     90%    1.98ms
     99%    3.40ms
  48790 requests in 2.00s, 14.21MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 3
Requests/sec:  24392.31
Transfer/sec:      7.10MB
"""


def test_a_wrk_report_is_read_into_rate_percentiles_and_errors() -> None:
    parsed = parse_wrk(WRK_OUTPUT)
    assert parsed["requests_per_second"] == 24392.31 and parsed["requests"] == 48790 and parsed["seconds"] == 2.0
    assert parsed["latency_ms"] == {"p50": 1.21, "p75": 1.52, "p90": 1.98, "p99": 3.4}
    assert parsed["errors"] == {"read": 2, "timeout": 1, "non_2xx": 3}


def test_the_quick_run_measures_both_paths_and_both_sidecars_and_writes_its_results(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"the benchmark makes network namespaces, which needs root (uid {os.geteuid()})")
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "dataplane-quick.json").read_text())
    assert doc["benchmark"] == "dataplane" and doc["mode"] == "quick" and doc["rounds"] == 1
    figures = doc["figures"]
    for mode in ("keepalive", "new_connection"):
        t = figures[mode]
        assert t["mesh_rps"]["value"] > 0 and t["direct_rps"]["value"] > 0
        assert 0 < t["ratio_mesh_to_direct"]["value"]
        [run] = doc["round_results"]
        for path in ("mesh", "direct"):
            assert not run[mode][path]["errors"], run[mode][path]
    fixed = figures["fixed_rate"]
    for path in ("mesh", "direct"):
        [one] = doc["round_results"][0]["fixed_rate"][path]
        assert one["answered"] > 0 and not one["errors"], one
        assert 0 < fixed[f"{path}_p50"]["value"] <= fixed[f"{path}_p99"]["value"]
    assert fixed["added_p99"]["target"] == 1.0 and isinstance(fixed["added_p99"]["met"], bool)
    costs = figures["costs"]
    for side in ("client", "server"):
        # Both sidecars carried the load: their HAProxy used CPU, and both processes have memory.
        assert costs[f"{side}_haproxy_cpu"]["value"] > 0
        assert costs[f"{side}_agent_rss"]["value"] > 0 and costs[f"{side}_haproxy_rss"]["value"] > 0
        assert figures["keepalive"][f"{side}_haproxy_cpu_per_request"]["value"] > 0
