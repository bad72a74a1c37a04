"""Reading a mesh file: every problem is printed at the line of the YAML text that holds it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from catalog.meshfile import Located
from meshctl.meshfile import ManifestProblems, load, locate, read
from meshctl.problems import UsageProblem

MESH = """\
# The demo mesh.
apiVersion: meshloom.io/v1alpha1
kind: Mesh
metadata:
  name: demo
spec:
  workloads:
  - name: frontend
    namespace: demo
    labels: {app: frontend}
    annotations:
      config.nsm.nginx.com/mtls-mode: strict
    command: [meshctl, app, serve, --http, "8080"]
    ports:
    - {name: http, containerPort: 8080}
  - name: backend
    namespace: demo
    labels:
      app: backend
    command: [backend]
    ports:
    - name: http
      containerPort: 9090
  services:
  - name: frontend
    namespace: demo
    selector: {app: frontend}
    ports:
    - {name: http, port: 80, targetPort: 8080}
  - name: backend
    namespace: demo
    selector: {app: backend}
    ports:
    - {name: http, port: 80, targetPort: http}
---
---
apiVersion: split.smi-spec.io/v1alpha3
kind: TrafficSplit
metadata: {name: backend-split, namespace: demo}
spec:
  service: backend
  backends:
  - service: backend
    weight: 80
  - service: backend-v2
    weight: 20
"""


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    return str(path)


def _refused(tmp_path: Path, text: str) -> list[str]:
    path = _write(tmp_path, text)
    with pytest.raises(ManifestProblems) as caught:
        read(path)
    return [line.replace(path, "mesh.yaml") for line in caught.value.problems]


def _line_of(text: str, needle: str) -> int:
    """The 1-based line of the only line of `text` that contains `needle`."""
    (number,) = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    return number


def _lines_equal(text: str, whole: str) -> list[int]:
    """The 1-based lines of `text` that are exactly `whole`, in order."""
    return [i for i, line in enumerate(text.splitlines(), start=1) if line == whole]


def test_a_good_file_read_from_standard_input_is_its_mesh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(MESH.replace("backend-v2", "frontend")))
    spec = read("-")
    assert [p.key for p in spec.pods] == ["demo/frontend-0", "demo/backend-0"]
    assert [s.key for s in spec.services] == ["demo/frontend", "demo/backend"]
    assert len(spec.policies) == 1


def test_a_port_out_of_range_is_printed_at_its_line(tmp_path: Path) -> None:
    text = MESH.replace("containerPort: 9090", "containerPort: 70000")
    assert _refused(tmp_path, text.replace("backend-v2", "frontend")) == [
        f"mesh.yaml:{_line_of(text, '70000')}: spec.workloads[1].ports[0].containerPort: must be a whole number "
        "from 1 to 65535, got 70000"]


def test_a_field_in_a_flow_mapping_is_printed_at_its_line(tmp_path: Path) -> None:
    text = MESH.replace("containerPort: 8080}", "containerPort: 0}").replace("backend-v2", "frontend")
    (line,) = _refused(tmp_path, text)
    assert line.startswith(f"mesh.yaml:{_line_of(text, 'containerPort: 0}')}: spec.workloads[0].ports[0]"
                           ".containerPort: ")


def test_an_unknown_field_is_printed_at_its_line(tmp_path: Path) -> None:
    text = MESH.replace("    command: [backend]\n", "    command: [backend]\n    replica: 2\n")
    text = text.replace("backend-v2", "frontend")
    (line,) = _refused(tmp_path, text)
    assert line.startswith(f"mesh.yaml:{_line_of(text, 'replica: 2')}: spec.workloads[1].replica: unknown field")


def test_a_missing_field_is_printed_at_its_parents_line(tmp_path: Path) -> None:
    text = MESH.replace("    command: [backend]\n", "").replace("backend-v2", "frontend")
    assert _refused(tmp_path, text) == [
        f"mesh.yaml:{_lines_equal(text, '  - name: backend')[0]}: spec.workloads[1].command: is required"]


def test_a_selector_that_selects_nothing_is_printed_at_the_selector(tmp_path: Path) -> None:
    text = MESH.replace("selector: {app: backend}", "selector: {app: nobody}").replace("backend-v2", "frontend")
    assert _refused(tmp_path, text) == [
        f"mesh.yaml:{_line_of(text, 'app: nobody')}: spec.services[1].selector: selects no workload in namespace "
        "demo"]


def test_a_duplicate_workload_is_printed_at_the_later_name(tmp_path: Path) -> None:
    text = MESH.replace("  - name: backend\n    namespace: demo\n    labels:", "  - name: frontend\n"
                        "    namespace: demo\n    labels:").replace("backend-v2", "frontend")
    problems = _refused(tmp_path, text)
    later = _lines_equal(text, "  - name: frontend")[1]
    assert f"mesh.yaml:{later}: spec.workloads[1].name: duplicate pod name demo/frontend-0 (also " \
           "spec.workloads[0])" in problems


def test_a_split_naming_an_unknown_service_is_printed_in_its_document(tmp_path: Path) -> None:
    assert _refused(tmp_path, MESH) == [
        f"mesh.yaml:{_line_of(MESH, 'service: backend-v2')}: spec.backends[1].service: Service demo/backend-v2 "
        "does not exist yet: no traffic reaches it until it does"]


def test_a_pod_problem_is_printed_at_its_workloads_annotation(tmp_path: Path) -> None:
    text = MESH.replace("mtls-mode: strict", "mtls-mode: sometimes").replace("backend-v2", "frontend")
    (line,) = _refused(tmp_path, text)
    assert line.startswith(f"mesh.yaml:{_line_of(text, 'sometimes')}: "
                           'spec.workloads[0].annotations["config.nsm.nginx.com/mtls-mode"]: must be one of')


def test_a_document_of_the_wrong_kind_is_printed_at_its_kind(tmp_path: Path) -> None:
    text = MESH + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: x}\n"
    problems = _refused(tmp_path, text.replace("backend-v2", "frontend"))
    assert problems == [f"mesh.yaml:{_line_of(text, 'kind: Pod')}: kind: kind Pod: workloads and services belong "
                        "in the Mesh document's spec"]


def test_locate_skips_empty_documents_and_falls_back_to_the_document(tmp_path: Path) -> None:
    _, docs, nodes = load(_write(tmp_path, MESH))
    assert [d["kind"] for d in docs] == ["Mesh", "TrafficSplit"]
    assert locate(nodes, Located(1, "", "whole document")) == _line_of(MESH, "apiVersion: split")
    assert locate(nodes, Located(1, "spec.nothing.here", "absent")) == _lines_equal(MESH, "spec:")[1]
    assert locate(nodes, Located(0, "spec.workloads[9].name", "absent")) == _line_of(MESH, "  workloads:")
    assert locate(nodes, Located(5, "spec", "no such document")) is None


def test_a_yaml_syntax_error_is_a_usage_problem_with_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "kind: Mesh\nspec: {workloads: [\n")
    with pytest.raises(UsageProblem) as caught:
        read(path)
    assert str(caught.value).startswith(f"{path}: line ")
    assert "not valid YAML" in str(caught.value)


def test_a_list_document_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "apiVersion: v1\nkind: List\nitems: [{kind: Mesh}, {kind: TrafficSplit}]\n")
    with pytest.raises(UsageProblem, match="cannot hold a kind: List"):
        load(path)


def test_a_missing_file_is_a_usage_problem(tmp_path: Path) -> None:
    with pytest.raises(UsageProblem, match="cannot read"):
        read(str(tmp_path / "absent.yaml"))
