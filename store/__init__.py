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
from store.records import KEY_LENGTH, Entity, JournalEntry, NewEffect, PendingEffect, Transition
from store.sql import Store, redact, sqlite_url

__all__ = [
    "KEY_LENGTH", "Conflict", "DatabaseError", "DatabaseUnreachable", "EffectGone", "Entity", "JournalEntry",
    "NewEffect", "PendingEffect", "SchemaMissing", "SchemaOutdated", "StaleVersion", "Store", "StoreError",
    "Transition", "redact", "sqlite_url",
]
