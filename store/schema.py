"""The tables. Alembic's migrations in alembic/versions must produce exactly this (a test runs `alembic check`)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, Integer, MetaData, String, Table, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from store.records import KEY_LENGTH

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, naive UTC in the database (SQLite has no time zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store: pass an aware UTC time")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


# SQLite's INTEGER PRIMARY KEY is its rowid (and autoincrements); BIGINT elsewhere.
Id = BigInteger().with_variant(Integer(), "sqlite")

entities = Table(
    "entities",
    metadata,
    Column("kind", String(32), primary_key=True),
    Column("key", String(KEY_LENGTH), primary_key=True),
    Column("state", String(32), nullable=False),
    Column("version", Integer, nullable=False),
    Column("retry_count", Integer, nullable=False, default=0),
    Column("retry_at", UtcDateTime(), nullable=True),
    Column("due_at", UtcDateTime(), nullable=True),
    Column("data", JSON, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Index(None, "due_at"),
    Index(None, "kind", "state"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),
    Column("key", String(KEY_LENGTH), nullable=False),
    Column("effect", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("run_at", UtcDateTime(), nullable=False),
    Column("last_error", Text, nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Index(None, "run_at"),
    Index(None, "kind", "key"),
)

journal = Table(
    "journal",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),
    Column("key", String(KEY_LENGTH), nullable=False),
    Column("version", Integer, nullable=False),
    Column("from_state", String(32), nullable=True),
    Column("to_state", String(32), nullable=False),
    Column("trigger", String(64), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("detail", Text, nullable=True),
    Column("actor", String(128), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
    # One row per version of an entity: the database itself refuses a transition journaled twice.
    Index(None, "kind", "key", "version", unique=True),
    Index(None, "at"),
)

# ---- the world: what the mesh is told (services, pods, policies), and what it computed from it ----------------
# One row per change of the world (a `meshctl apply`, a watch event batch): its id is the world's revision, so the
# control plane notices a change by reading one number, and an operator can see who changed the world and when.
world_changes = Table(
    "world_changes",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("actor", String(128), nullable=False),
    Column("summary", Text, nullable=False),
    Column("at", UtcDateTime(), nullable=False),
)

resources = Table(
    "resources",
    metadata,
    Column("kind", String(64), primary_key=True),
    Column("namespace", String(253), primary_key=True),  # "" for cluster-wide resources
    Column("name", String(253), primary_key=True),
    Column("api_version", String(128), nullable=False),
    Column("body", JSON, nullable=False),
    Column("revision", BigInteger, nullable=False),  # the world change that last wrote it
    Column("updated_at", UtcDateTime(), nullable=False),
)

# Each sidecar's current configuration document, as the catalog computed it from the world. The rollout machine
# publishes what is here; the digest tells which sidecars a change of the world touched.
documents = Table(
    "documents",
    metadata,
    Column("sidecar", String(KEY_LENGTH), primary_key=True),
    Column("digest", String(64), nullable=False),
    Column("body", Text, nullable=False),
    Column("revision", BigInteger, nullable=False),  # the world revision it was computed from
    Column("updated_at", UtcDateTime(), nullable=False),
)
