"""Opening a database: the schema must be exactly the one this code knows, and every failure is one clear error."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

from store import DatabaseError, DatabaseUnreachable, SchemaMissing, SchemaOutdated, Store, migrate
from store.errors import SchemaTooNew


def schema_of(url: str) -> dict[str, Any]:
    """Tables, columns, indexes and the stamped revision, to show that opening a database changed none of them."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            insp = inspect(conn)
            shape: dict[str, Any] = {
                t: ([c["name"] for c in insp.get_columns(t)], sorted(i["name"] or "" for i in insp.get_indexes(t)))
                for t in sorted(insp.get_table_names())
            }
            if "alembic_version" in shape:
                shape["revision"] = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
            return shape
    finally:
        engine.dispose()


def closed_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_models_and_the_migrations_agree(db_url: str) -> None:
    migrate.check(db_url)  # raises if `alembic revision --autogenerate` would find anything to do


def test_upgrading_an_up_to_date_database_changes_nothing(db_url: str) -> None:
    before = schema_of(db_url)
    assert migrate.upgrade(db_url) == (migrate.head(), migrate.head())
    assert schema_of(db_url) == before


def test_a_database_at_an_older_schema_is_refused_untouched(empty_db_url: str) -> None:
    assert migrate.upgrade(empty_db_url, "0001") == (None, "0001")
    before = schema_of(empty_db_url)

    with pytest.raises(SchemaOutdated) as err:
        Store(empty_db_url)

    assert (err.value.current, err.value.head) == ("0001", migrate.head())
    assert "meshctl db upgrade" in str(err.value)
    assert schema_of(empty_db_url) == before


def test_a_database_at_a_schema_newer_than_this_code_is_refused(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()

    with pytest.raises(SchemaTooNew):
        Store(db_url)


def test_a_database_without_the_schema_is_refused(empty_db_url: str) -> None:
    engine = create_engine(empty_db_url)  # a database that exists and holds something else
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE unrelated (x INTEGER)"))
    engine.dispose()

    with pytest.raises(SchemaMissing):
        Store(empty_db_url)


def test_a_sqlite_file_that_does_not_exist_is_refused_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "meshloom.db"

    with pytest.raises(SchemaMissing) as err:
        Store(f"sqlite:///{path}")

    assert "meshctl db upgrade" in str(err.value)
    assert not path.parent.exists()


def test_an_unreachable_postgresql_is_one_line_without_the_password() -> None:
    port = closed_loopback_port()
    url = f"postgresql://meshloom:s3cr3t-pw@127.0.0.1:{port}/meshloom"

    with pytest.raises(DatabaseUnreachable) as err:
        Store(url)

    message = str(err.value)
    assert "s3cr3t-pw" not in message
    assert "\n" not in message
    assert f"postgresql://meshloom:***@127.0.0.1:{port}/meshloom" in message
    assert isinstance(err.value, DatabaseError)


@pytest.mark.parametrize("url", [
    "not a url",
    "",
    "nosuchdb://somewhere/db",
    "postgresql+nosuchdriver://meshloom:s3cr3t-pw@127.0.0.1/meshloom",
    "mysql://meshloom:s3cr3t-pw@127.0.0.1/meshloom",  # a dialect SQLAlchemy knows, with no driver installed
])
def test_an_invalid_url_is_a_database_error_without_the_password(url: str) -> None:
    with pytest.raises(DatabaseError) as err:
        Store(url)

    assert "s3cr3t-pw" not in str(err.value)
    assert "\n" not in str(err.value)
