"""The catalog benchmark still runs against the code as it is (its figures are read from bench/results, not here)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.catalog import QUICK, main


def test_the_catalog_benchmark_renders_every_pod_of_its_world(tmp_path: Path, capsys) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "catalog-quick.json").read_text())["results"]
    pods = QUICK.namespaces * QUICK.services_per_namespace * QUICK.pods_per_service
    assert results["world"]["pods"] == results["sizes"]["sidecar_documents"] == pods
    assert results["sizes"]["shards"] == QUICK.namespaces
    assert results["change"]["shards_changed"] == ["outbound/ns0"]
    assert "render" in capsys.readouterr().out
