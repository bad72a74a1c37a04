"""The committed state diagrams are the tables drawn: a stale copy fails here; MESHLOOM_UPDATE_GOLDEN=1 redraws them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from machines import SPECS
from machines.diagram import document, mermaid, source_file

DIAGRAMS = Path(__file__).resolve().parents[2] / "docs" / "diagrams"
UPDATE = os.environ.get("MESHLOOM_UPDATE_GOLDEN") == "1"


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_the_committed_diagram_is_the_table_as_it_is_now(kind):
    path = DIAGRAMS / f"{kind}.md"
    want = document(SPECS[kind])
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != want:
            path.write_text(want, encoding="utf-8")
    assert path.exists(), f"{path} is missing: run MESHLOOM_UPDATE_GOLDEN=1 pytest tests/machines/test_diagrams.py"
    assert path.read_text(encoding="utf-8") == want, (
        f"{path} is stale: run MESHLOOM_UPDATE_GOLDEN=1 pytest tests/machines/test_diagrams.py and commit the result"
    )


def test_no_diagram_is_committed_for_a_lifecycle_that_does_not_exist():
    assert {p.stem for p in DIAGRAMS.glob("*.md")} <= set(SPECS)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_a_diagram_is_the_same_every_time_it_is_drawn(kind):
    assert mermaid(SPECS[kind]) == mermaid(SPECS[kind])


def test_the_pod_diagram_draws_creation_guards_and_readmission_and_the_cert_diagram_its_ends():
    drawn = mermaid(SPECS["pod"]).splitlines()
    assert drawn[0] == "stateDiagram-v2"
    assert '    state "identity-requested" as identity_requested' in drawn
    assert "    [*] --> admitted : admit" in drawn
    assert "    admitted --> injected : injected" in drawn
    assert "    identity_requested --> failed : tick [is_due]" in drawn
    assert "    gone --> admitted : admit" in drawn  # a pod created again under its name: no end
    assert "    failed --> [*]" not in drawn  # failed is a state to leave, not an end
    assert "    revoked --> [*]" in mermaid(SPECS["cert"]).splitlines()


def test_a_diagram_names_the_module_its_table_lives_in():
    assert source_file(SPECS["pod"]) == "machines/pod.py"
    assert source_file(SPECS["ca"]) == "machines/certificate.py"
    assert source_file(SPECS["sidecar"]) == "machines/rollout.py"
    assert "machines/certificate.py" in document(SPECS["cert"])
