"""The container definitions agree with the chart and the CLI (no container runtime here to build them): each
image copies every package of the project, runs as the user the chart and the iptables rules expect, and starts a
meshctl command that exists."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import typer
import yaml

from meshctl.cli import app

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
VALUES = yaml.safe_load((ROOT / "charts" / "meshloom" / "values.yaml").read_text())


def _instructions(name: str) -> dict[str, list[str]]:
    text = (IMAGES / name / "Containerfile").read_text().replace("\\\n", " ")
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            verb, _, rest = line.strip().partition(" ")
            out.setdefault(verb.upper(), []).append(rest.strip())
    return out


def _commands() -> set[str]:
    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["controller", "sidecar", "init"])
def test_every_image_copies_every_package_of_the_project_and_alembic(name: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {source.rstrip("/") for c in _instructions(name)["COPY"] for source in c.split()[:-1]}
    assert packages | {"alembic", "pyproject.toml", "README.md"} <= copied


def test_the_controller_image_runs_the_controller_as_the_user_the_chart_expects() -> None:
    image = _instructions("controller")
    assert image["USER"] == ["65532:65532"]
    assert json.loads(image["ENTRYPOINT"][0]) == ["meshctl"] and json.loads(image["CMD"][0]) == ["controller"]
    chart = (ROOT / "charts" / "meshloom" / "templates" / "controller.yaml").read_text()
    assert re.search(r"runAsUser: 65532\b", chart)
    assert {"controller", "node-agent"} <= _commands()


def test_the_sidecar_image_runs_as_uid_2102_which_the_redirect_leaves_alone() -> None:
    image = _instructions("sidecar")
    assert VALUES["sidecar"]["uid"] == 2102
    assert image["USER"] == ["2102:2102"]
    assert json.loads(image["ENTRYPOINT"][0]) == ["meshctl", "sidecar"]
    ports = VALUES["sidecar"]["ports"]
    assert image["EXPOSE"] == [f"{ports['inbound']} {ports['outbound']} {ports['admin']} {ports['metrics']}"]
    assert "sidecar" in _commands()


def test_the_init_image_has_iptables_and_runs_meshctl_init() -> None:
    image = _instructions("init")
    assert any("iptables" in run for run in image["RUN"])
    assert json.loads(image["ENTRYPOINT"][0]) == ["meshctl", "init"]
    assert "init" in _commands()
