"""Schema migrations with Alembic: upgrade, check the running schema, and detect drift from the models."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from alembic import command
from store.errors import SchemaMissing, SchemaOutdated, SchemaTooNew

# alembic/ lives at the top of the source tree, beside the packages (installs are editable; see README).
SCRIPT_LOCATION = Path(__file__).resolve().parent.parent / "alembic"


def config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head() -> str:
    rev = ScriptDirectory.from_config(config("sqlite://")).get_current_head()
    assert rev is not None
    return rev


def current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def current_at(url: str) -> str | None:
    """The schema revision of the database at `url` (None: no schema yet, or no SQLite file: none is made)."""
    from store.sql import make_engine, missing_sqlite_file, translated

    if missing_sqlite_file(url) is not None:
        return None
    engine = make_engine(url)
    try:
        with translated(url), engine.connect() as conn:
            return current(conn)
    finally:
        engine.dispose()


def require_head(conn: Connection, url: str) -> None:
    """Refuse to work on a database whose schema is not exactly the one this code was written for."""
    from store.sql import redact

    rev = current(conn)
    if rev is None:
        raise SchemaMissing(redact(url))
    want = head()
    if rev != want:
        known = {s.revision for s in ScriptDirectory.from_config(config(url)).walk_revisions()}
        if rev in known:
            raise SchemaOutdated(redact(url), rev, want)
        raise SchemaTooNew(redact(url), rev)


def upgrade(url: str, revision: str = "head") -> tuple[str | None, str]:
    """Bring the database to `revision`; returns (before, after)."""
    from store.sql import make_engine, translated

    engine = make_engine(url)
    try:
        with translated(url), engine.begin() as conn:
            before = current(conn)
            cfg = config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            after = current(conn)
    finally:
        engine.dispose()
    assert after is not None
    return before, after


def check(url: str) -> None:
    """Raise if the models in store/schema.py and the migrations disagree (`alembic check`)."""
    from store.sql import make_engine, translated

    engine = make_engine(url)
    try:
        with translated(url), engine.connect() as conn:
            cfg = config(url)
            cfg.attributes["connection"] = conn
            command.check(cfg)
    finally:
        engine.dispose()
