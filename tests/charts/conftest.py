"""Fixtures of the chart tests: the helm binary (from the cache scripts/kube fills) and the chart's folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from actions.helm import Helm, HelmNotFound, default_chart


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """Helm with its cache and configuration in a temporary folder; skipped without it, except in CI (CI=true)."""
    try:
        home = tmp_path_factory.mktemp("helm-home")
        env = {"HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
               "HELM_DATA_HOME": str(home / "data")}
        return Helm(env=env, timeout=120)
    except HelmNotFound as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc} (CI=true: the chart tests must run)", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def chart() -> Path:
    return default_chart()
