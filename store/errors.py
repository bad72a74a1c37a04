"""The store's errors, split by what the caller can do about them."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises."""


class Conflict(StoreError):
    """Retryable: another writer got there first; reload and try again."""


class StaleVersion(Conflict):
    def __init__(self, kind: str, key: str, expected: int) -> None:
        super().__init__(f"{kind}/{key}: changed by another writer (expected version {expected})")
        self.kind, self.key, self.expected = kind, key, expected


class EffectGone(Conflict):
    def __init__(self, effect_id: int) -> None:
        super().__init__(f"outbox entry {effect_id} was already handled")
        self.effect_id = effect_id


class DatabaseError(StoreError):
    """Not retryable by the caller: the operator must act (URL, server, schema)."""


class InvalidDatabaseUrl(DatabaseError):
    def __init__(self, url: str, why: str = "not a database URL") -> None:
        super().__init__(f"database URL '{url}': {why}")


class DatabaseUnreachable(DatabaseError):
    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"cannot reach the database at {url}: {detail}")


class DatabaseUnusable(DatabaseError):
    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"cannot use the database at {url}: {detail}")


class SchemaMissing(DatabaseError):
    def __init__(self, url: str) -> None:
        super().__init__(f"no Meshloom schema in {url}: run 'meshctl db upgrade' (or 'meshctl up') first")


class SchemaOutdated(DatabaseError):
    def __init__(self, url: str, current: str, head: str) -> None:
        super().__init__(
            f"the database at {url} is at schema {current}, this meshctl needs {head}: run 'meshctl db upgrade'"
        )
        self.current, self.head = current, head


class SchemaTooNew(DatabaseError):
    def __init__(self, url: str, current: str) -> None:
        super().__init__(
            f"the database at {url} is at schema {current}, newer than this meshctl knows: upgrade meshctl"
        )
