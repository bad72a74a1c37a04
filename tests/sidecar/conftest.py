"""Fixtures of the proxy tests: a test's proxies are always stopped, its directories always removed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sidecar.support import Proxies
from tests.support.pki import Authority


@pytest.fixture
def proxies() -> Iterator[Proxies]:
    started = Proxies()
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def root() -> Authority:
    return Authority.root()


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return tmp_path / "certs"
