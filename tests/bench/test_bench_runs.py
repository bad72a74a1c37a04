"""The benchmarks still run against the code as it is (their figures are read from bench/results, not here)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.engine import main


def test_the_engine_benchmark_runs_and_checks_the_rows_it_left(tmp_path: Path, capsys) -> None:
    assert main(["--quick", "--no-postgres", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "engine-quick.json").read_text())
    for workload in results["results"]["sqlite"]["fire"]:
        assert workload["checks"]["ok"], workload["checks"]
        for rows in workload["checks"]["rows"]:
            assert (rows["journal"], rows["outbox"]) == (rows["journal_expected"], rows["outbox_expected"])


def test_the_identity_benchmark_signs_and_rotates_end_to_end(tmp_path: Path, capsys) -> None:
    from bench.identity import main as identity

    assert identity(["--quick", "--out", str(tmp_path)]) == 0
    sections = json.loads((tmp_path / "identity-quick.json").read_text())["sections"]
    assert sections["signing"]["ec_p256"]["checks"]["ok"]
    assert sections["rotation"]["rotated"] == sections["rotation"]["svids"]
