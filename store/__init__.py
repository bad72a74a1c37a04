"""SQL persistence: entity rows, the outbox and the journal. The only package that imports SQLAlchemy."""

from store.errors import (
    Conflict,
    DatabaseError,
    DatabaseUnreachable,
    EffectGone,
    SchemaMissing,
    SchemaOutdated,
    StaleVersion,
    StoreError,
)
from store.records import (
    KEY_LENGTH,
    Document,
    Entity,
    JournalEntry,
    NewEffect,
    PendingEffect,
    Resource,
    Transition,
    WorldChange,
)
from store.sql import Store, redact, sqlite_url

__all__ = [
    "KEY_LENGTH", "Conflict", "DatabaseError", "DatabaseUnreachable", "Document", "EffectGone", "Entity",
    "JournalEntry", "NewEffect", "PendingEffect", "Resource", "SchemaMissing", "SchemaOutdated", "StaleVersion",
    "Store", "StoreError", "Transition", "WorldChange", "redact", "sqlite_url",
]
