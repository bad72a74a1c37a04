"""`meshctl inject` as a user meets it: golden output for every kind, skips on stderr, one-line errors.

Golden files: tests/catalog/golden/inject/<name>.in.<yaml|json> is the input, <name>.out.<yaml|json> what meshctl
prints, <name>.err.txt what it says on stderr (absent: nothing). MESHLOOM_UPDATE_GOLDEN=1 rewrites the outputs.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meshctl.cli import main
from tests.meshctl.support import MESHCTL, meshctl, one_line

GOLDEN = Path(__file__).resolve().parents[1] / "catalog" / "golden" / "inject"
VALUES = GOLDEN / "values.yaml"
UPDATE = os.environ.get("MESHLOOM_UPDATE_GOLDEN") == "1"


def inputs() -> list[Path]:
    return sorted(p for p in GOLDEN.iterdir() if ".in." in p.name)


@pytest.mark.parametrize("source", inputs(), ids=lambda p: p.name.split(".")[0])
def test_the_output_for_each_kind_is_its_golden_copy(capsys: pytest.CaptureFixture[str], source: Path) -> None:
    fmt = "json" if source.suffix == ".json" else "yaml"
    code, out, err = meshctl(capsys, "inject", "-f", str(source), "--values", str(VALUES), "-o", fmt)
    assert code == 0, err
    out_file = GOLDEN / source.name.replace(".in.", ".out.")
    err_file = GOLDEN / f"{source.name.split('.')[0]}.err.txt"
    if UPDATE:
        out_file.write_text(out)
        if err:
            err_file.write_text(err)
        else:
            err_file.unlink(missing_ok=True)
    assert out_file.exists(), f"{out_file} is missing: run MESHLOOM_UPDATE_GOLDEN=1 pytest tests/meshctl"
    assert out == out_file.read_text(), \
        f"{out_file} is stale: run MESHLOOM_UPDATE_GOLDEN=1 pytest tests/meshctl and review the difference"
    assert err == (err_file.read_text() if err_file.exists() else "")


@pytest.mark.parametrize("output", sorted(GOLDEN.glob("*.out.*")), ids=lambda p: p.name.split(".")[0])
def test_every_injected_document_passes_kubernetes_strict_schema(output: Path) -> None:
    """The 1.20 API server of the round trip drops unknown fields without a word; the schemas do not."""
    import kubernetes_validate

    text = output.read_text()
    docs = [json.loads(text)] if output.suffix == ".json" else list(yaml.safe_load_all(text))
    for doc in [item for d in docs for item in (d["items"] if d["kind"] == "List" else [d])]:
        # The schemas know CronJob as batch/v1 only, with the same fields.
        version = "batch/v1" if doc["apiVersion"] == "batch/v1beta1" else doc["apiVersion"]
        kubernetes_validate.validate({**doc, "apiVersion": version}, "1.25", strict=True)


def test_documents_not_injected_pass_through_unchanged_with_the_reason_on_stderr(
        capsys: pytest.CaptureFixture[str]) -> None:
    source = GOLDEN / "multi.in.yaml"
    code, out, err = meshctl(capsys, "inject", "-f", str(source), "--values", str(VALUES))
    assert code == 0
    assert list(yaml.safe_load_all(out)) == list(yaml.safe_load_all(source.read_text()))  # nothing here is injected
    assert err.splitlines() == [
        "ConfigMap/settings: skipped: not a pod, nor a workload with a pod template",
        "DaemonSet/node-exporter: skipped: the pod uses the host's network, which the mesh's redirect rules would "
        "change",
        "Deployment/done: skipped: the pod already has the mesh's init container and sidecar",
        "Pod/signalling: skipped: the pod declares an SCTP port, which the sidecar cannot proxy (3868/SCTP in "
        "container sig)",
    ]


def test_the_port_flags_reach_the_init_container(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = meshctl(capsys, "inject", "-f", str(GOLDEN / "job.in.yaml"), "--values", str(VALUES),
                         "--ignore-incoming-ports", "8081,9000", "--ignore-outgoing-ports", "5432", "-o", "json")
    assert code == 0, err
    init = json.loads(out)["spec"]["template"]["spec"]["initContainers"][0]
    args = init["args"]
    assert args[args.index("--ignore-incoming-ports") + 1] == "53,8081,9000,15021,15090"
    assert args[args.index("--ignore-outgoing-ports") + 1] == "53,5432"


def test_standard_input_is_read_with_a_dash(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO((GOLDEN / "pod.in.yaml").read_text()))
    code, out, _ = meshctl(capsys, "inject", "-f", "-", "--values", str(VALUES))
    assert code == 0 and out == (GOLDEN / "pod.out.yaml").read_text()


def test_the_charts_values_are_used_when_no_values_file_is_given(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = meshctl(capsys, "inject", "-f", str(GOLDEN / "pod.in.yaml"))
    assert code == 0, err
    chart = yaml.safe_load((Path(__file__).resolve().parents[2] / "charts/meshloom/values.yaml").read_text())
    pod = yaml.safe_load(out)
    sidecar = next(c for c in pod["spec"]["containers"] if c["name"] == "meshloom-sidecar")
    assert sidecar["image"] == f"{chart['sidecar']['image']['repository']}:{chart['sidecar']['image']['tag']}"


def test_a_values_file_is_merged_over_the_charts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    override = tmp_path / "mine.yaml"
    override.write_text("sidecar:\n  image: {tag: '9.9.9'}\n")
    code, out, err = meshctl(capsys, "inject", "-f", str(GOLDEN / "pod.in.yaml"), "--values", str(override))
    assert code == 0, err
    images = {c["name"]: c["image"] for c in yaml.safe_load(out)["spec"]["containers"]}
    assert images["meshloom-sidecar"].endswith(":9.9.9")


@pytest.mark.parametrize(("text", "expected"), [
    ("kind: Pod\nmetadata: {name: [\n", "not valid YAML or JSON"),
    ('{"kind": "Pod", ', "not valid YAML or JSON"),
    ("- just\n- a list\n", "document 1: a manifest must be a mapping, not list"),
    ("", "no manifests in it"),
])
def test_a_manifest_that_is_not_yaml_is_one_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                        text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, out, err = meshctl(capsys, "inject", "-f", str(path), "--values", str(VALUES))
    assert code == 2 and out == ""
    line = one_line(err)
    assert line.startswith(f"meshctl: {path}") and expected in line


@pytest.mark.parametrize(("argv", "expected"), [
    (["--ignore-incoming-ports", "80,http"], "meshctl: --ignore-incoming-ports: must be port numbers (1-65535) "
                                             "separated by commas, got '80,http'"),
    (["--values", "/nonexistent/values.yaml"], "meshctl: /nonexistent/values.yaml: cannot read values: No such file"),
    (["-f", "/nonexistent/app.yaml"], "meshctl: /nonexistent/app.yaml: cannot read: No such file"),
    (["-o", "table"], "meshctl: Invalid value for '--output' / '-o'"),
])
def test_a_wrong_flag_is_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                  expected: str) -> None:
    base = ["inject", "-f", str(GOLDEN / "pod.in.yaml"), "--values", str(VALUES)]
    code, _, err = meshctl(capsys, *base, *argv)
    assert code == 2
    assert one_line(err).startswith(expected)


def test_wrong_values_are_one_line_naming_the_file_and_the_key(capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    bad = tmp_path / "values.yaml"
    bad.write_text(VALUES.read_text().replace("admin: 15021", "admin: http"))
    code, _, err = meshctl(capsys, "inject", "-f", str(GOLDEN / "pod.in.yaml"), "--values", str(bad))
    assert code == 2
    assert "sidecar.ports.admin: must be a whole number from 1 to 65535, got 'http'" in one_line(err)
    assert str(bad) in err


def test_a_workload_asking_the_impossible_is_rejected_naming_document_and_field(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    doc = yaml.safe_load((GOLDEN / "statefulset.in.yaml").read_text())
    doc["spec"]["template"]["metadata"]["annotations"] = {"config.nsm.nginx.com/mtls-mode": "on"}
    path = tmp_path / "db.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, out, err = meshctl(capsys, "inject", "-f", str(path), "--values", str(VALUES))
    assert code == 7 and out == ""
    assert one_line(err) == ('meshctl: StatefulSet shop/db: spec.template.metadata.annotations'
                             '["config.nsm.nginx.com/mtls-mode"]: must be one of off, permissive, strict, got \'on\'')


def test_the_installed_command_pipes_from_stdin_to_stdout() -> None:
    done = subprocess.run([MESHCTL, "inject", "-f", "-", "--values", str(VALUES)], check=False, timeout=60,
                          input=(GOLDEN / "deployment.in.yaml").read_text(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (GOLDEN / "deployment.out.yaml").read_text() and done.stderr == ""


def test_main_is_the_entry_point() -> None:
    assert main(["inject", "--help"]) == 0
