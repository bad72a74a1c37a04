"""Shared fixtures: database URLs already upgraded to the head schema, on SQLite and on a private PostgreSQL.

`db_url` runs a test once per database. The PostgreSQL server starts once per session, on loopback, and only when a
test asks for it. Where it cannot start, its tests are skipped -- except in CI (CI=true), where they must run.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from store import migrate
from store import sqlite_url as _sqlite_url
from tests.support.kube import kube_api  # noqa: F401  (the session's real API server, for every test)
from tests.support.netns import host_network  # noqa: F401  (the fixture, for every test)
from tests.support.postgres import PostgresServer, PostgresUnavailable, start_postgres


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = start_postgres()
    except (PostgresUnavailable, OSError, LookupError, subprocess.SubprocessError) as exc:
        reason = f"PostgreSQL could not be started: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the PostgreSQL tests must run)", pytrace=False)
        pytest.skip(reason)
    yield server
    server.stop()


def fresh_postgres_url(server: PostgresServer) -> str:
    """A new, empty database on the session's server, named uniquely so tests never share one."""
    return server.create_database(f"meshloom_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file in the test's tmp_path, upgraded to the head schema."""
    url = _sqlite_url(tmp_path)
    migrate.upgrade(url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database with no schema at all (SQLite: the file does not exist yet), once per database."""
    if request.param == "sqlite":
        return _sqlite_url(tmp_path)
    return fresh_postgres_url(request.getfixturevalue("postgres_server"))


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    """The same test on both databases (parametrized through `empty_db_url`), each upgraded to the head schema."""
    migrate.upgrade(empty_db_url)
    return empty_db_url
