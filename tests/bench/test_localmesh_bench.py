"""The local-mesh benchmark still runs against the code as it is: its generated manifest is one `meshctl up -f`
accepts, and a two-pod run goes up, is measured and comes down leaving nothing (its figures are read from
bench/results, not judged here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.localmesh import main, manifest, pod_keys
from meshctl import meshfile


@pytest.mark.parametrize("pods", [2, 10, 50])
def test_the_generated_manifest_is_a_valid_mesh_of_exactly_the_pods_the_benchmark_follows(tmp_path: Path,
                                                                                          pods: int) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(manifest(pods))
    spec = meshfile.read(str(path))
    assert sorted(p.key for p in spec.pods) == pod_keys(pods)
    assert all(p.meshed for p in spec.pods)
    assert len(spec.services) == pods // 2


@pytest.mark.integration  # network namespaces, iptables, a control plane, NATS, HAProxy sidecars
def test_a_two_pod_run_measures_up_the_journal_and_memory_and_down_leaves_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"the benchmark makes network namespaces, which needs root (uid {os.geteuid()})")
    assert main(["--quick", "--sizes", "2", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "localmesh-quick.json").read_text())
    run = doc["sizes"]["2"]
    assert run["up"]["exit_code"] == 0 and run["up"]["pods_ready"] == 2
    assert 0 < run["up"]["admitted_to_ready"]["p50"]["value"] <= run["up"]["admitted_to_ready"]["max"]["value"]
    assert run["memory"]["control_plane"]["rss"]["value"] > 0 and run["memory"]["nats"]["rss"]["value"] > 0
    assert run["memory"]["per_pod_median"]["haproxy_rss"]["value"] > 0
    assert run["down"]["clean"], run["down"]
