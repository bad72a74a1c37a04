"""The SQL store: entity rows with optimistic concurrency, the outbox, and the append-only journal.

Every `apply()` is one transaction: the entity's new row (guarded by its version), its journal row, the effects it
emits, and the deletion of the outbox row it answers. Either all of it is there after a crash or none of it is.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, delete, event, func, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.pool import ConnectionPoolEntry

from store import migrate
from store.errors import DatabaseUnreachable, EffectGone, InvalidDatabaseUrl, SchemaMissing, StaleVersion
from store.records import Entity, JournalEntry, NewEffect, PendingEffect, Transition
from store.schema import entities, journal, outbox

SQLITE_BUSY_TIMEOUT_MS = 10_000  # a second writer waits this long for the lock before the store gives up


def sqlite_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'meshloom.db'}"


def redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _sqlite_pragmas(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
    # WAL lets readers (meshctl state) run beside the engine; synchronous=NORMAL in WAL mode keeps every commit
    # atomic and durable against a process crash, and loses at most the last commits on a power cut.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.close()


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidDatabaseUrl(url) from None
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            engine = create_engine(parsed, pool_pre_ping=True, connect_args=_pg_connect_args(parsed))
    except NoSuchModuleError:
        raise InvalidDatabaseUrl(url, "unsupported database (use sqlite:/// or postgresql://)") from None
    return engine


def _missing_sqlite_file(url: str) -> str | None:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidDatabaseUrl(url) from None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return None if Path(parsed.database).exists() else parsed.database


def _pg_connect_args(parsed: Any) -> dict[str, Any]:
    return {"connect_timeout": int(os.environ.get("MESHLOOM_DB_CONNECT_TIMEOUT", "5"))}


class Store:
    """The only door to SQL. Hands out records; takes `Transition`s."""

    def __init__(self, url: str, *, check_schema: bool = True) -> None:
        self.url = url
        if check_schema:
            missing = _missing_sqlite_file(url)
            if missing is not None:
                raise SchemaMissing(missing)  # reading must not leave an empty database behind
        self.engine = make_engine(url)
        if check_schema:
            with self._connect() as conn:
                migrate.require_head(conn, url)

    # ---- plumbing ------------------------------------------------------------------------------------------
    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except OperationalError as exc:
            if _is_unreachable(exc):
                raise DatabaseUnreachable(redact(self.url), _first_line(exc)) from None
            raise

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with self._connect() as conn, conn.begin():
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    # ---- entities ------------------------------------------------------------------------------------------
    def get(self, kind: str, key: str) -> Entity | None:
        with self._connect() as conn:
            row = conn.execute(select(entities).where(entities.c.kind == kind, entities.c.key == key)).first()
        return _entity(row) if row is not None else None

    def list(self, kind: str | None = None, states: Sequence[str] | None = None,
             key_prefix: str | None = None) -> builtins.list[Entity]:
        query = select(entities).order_by(entities.c.kind, entities.c.key)
        if kind is not None:
            query = query.where(entities.c.kind == kind)
        if key_prefix:
            query = query.where(entities.c.key.startswith(key_prefix, autoescape=True))
        if states:
            query = query.where(entities.c.state.in_(list(states)))
        with self._connect() as conn:
            return [_entity(r) for r in conn.execute(query)]

    def due_entities(self, now: datetime, limit: int = 1000) -> builtins.list[Entity]:
        query = select(entities).where(entities.c.due_at <= now).order_by(entities.c.due_at).limit(limit)
        with self._connect() as conn:
            return [_entity(r) for r in conn.execute(query)]

    def next_due(self) -> datetime | None:
        """The earliest moment anything asked for: an entity's tick or an effect's (re)try."""
        with self._connect() as conn:
            a = conn.execute(select(func.min(entities.c.due_at))).scalar()
            b = conn.execute(select(func.min(outbox.c.run_at))).scalar()
        times = [t for t in (a, b) if t is not None]
        return min(times) if times else None

    def counts(self) -> dict[str, dict[str, int]]:
        query = select(entities.c.kind, entities.c.state, func.count()).group_by(entities.c.kind, entities.c.state)
        out: dict[str, dict[str, int]] = {}
        with self._connect() as conn:
            for kind, state, n in conn.execute(query):
                out.setdefault(kind, {})[state] = n
        return out

    # ---- the one write ---------------------------------------------------------------------------------------
    def apply(self, t: Transition) -> tuple[Entity, builtins.list[PendingEffect]]:
        """Commit a transition with its journal row and effects; raise StaleVersion if another writer won."""
        version = t.expected_version + 1
        try:
            with self._transaction() as conn:
                if t.consumes is not None:
                    gone = conn.execute(delete(outbox).where(outbox.c.id == t.consumes)).rowcount
                    if gone != 1:
                        raise EffectGone(t.consumes)
                row = {"state": t.to_state, "version": version, "retry_count": 0, "retry_at": None,
                       "due_at": t.due_at, "data": dict(t.data), "updated_at": t.at}
                if t.expected_version == 0:
                    conn.execute(insert(entities).values(kind=t.kind, key=t.key, created_at=t.at, **row))
                    created = t.at
                else:
                    res = conn.execute(
                        update(entities)
                        .where(entities.c.kind == t.kind, entities.c.key == t.key,
                               entities.c.version == t.expected_version)
                        .values(**row)
                        .returning(entities.c.created_at)
                    )
                    found = res.first()
                    if found is None:
                        raise StaleVersion(t.kind, t.key, t.expected_version)
                    created = found[0]
                conn.execute(insert(journal).values(
                    kind=t.kind, key=t.key, version=version, from_state=t.from_state, to_state=t.to_state,
                    trigger=t.trigger, reason=t.reason, detail=t.detail, actor=t.actor, at=t.at))
                pending = self._insert_effects(conn, t.kind, t.key, t.effects, t.at)
        except IntegrityError:
            # A concurrent writer created the entity (or journaled this version) first.
            raise StaleVersion(t.kind, t.key, t.expected_version) from None
        entity = Entity(t.kind, t.key, t.to_state, version, 0, None, t.due_at, dict(t.data), created, t.at)
        return entity, pending

    @staticmethod
    def _insert_effects(conn: Connection, kind: str, key: str, effects: Sequence[NewEffect],
                        at: datetime) -> builtins.list[PendingEffect]:
        pending: builtins.list[PendingEffect] = []
        for e in effects:
            new_id = conn.execute(
                insert(outbox).values(kind=kind, key=key, effect=e.effect, payload=dict(e.payload), attempts=0,
                                      run_at=e.run_at, created_at=at).returning(outbox.c.id)
            ).scalar_one()
            pending.append(PendingEffect(new_id, kind, key, e.effect, e.payload, 0, e.run_at, None))
        return pending

    # ---- the outbox ------------------------------------------------------------------------------------------
    def due_effects(self, now: datetime, limit: int = 1000, *, fresh_too: bool = False) -> builtins.list[PendingEffect]:
        """Effects whose time has come; `fresh_too` adds never-tried ones whatever their lease (crash recovery)."""
        cond = outbox.c.run_at <= now
        if fresh_too:
            cond = cond | (outbox.c.attempts == 0)
        query = select(outbox).where(cond).order_by(outbox.c.id).limit(limit)
        with self._connect() as conn:
            return [_pending(r) for r in conn.execute(query)]

    def pending_effects(self, kind: str | None = None, key: str | None = None) -> builtins.list[PendingEffect]:
        query = select(outbox).order_by(outbox.c.id)
        if kind is not None:
            query = query.where(outbox.c.kind == kind)
        if key is not None:
            query = query.where(outbox.c.key == key)
        with self._connect() as conn:
            return [_pending(r) for r in conn.execute(query)]

    def postpone_effect(self, effect_id: int, attempts: int, run_at: datetime, error: str) -> None:
        """Record a failed attempt: the effect waits until `run_at`, and its entity shows the retry."""
        with self._transaction() as conn:
            row = conn.execute(
                update(outbox).where(outbox.c.id == effect_id)
                .values(attempts=attempts, run_at=run_at, last_error=error)
                .returning(outbox.c.kind, outbox.c.key)
            ).first()
            if row is None:
                raise EffectGone(effect_id)
            conn.execute(update(entities).where(entities.c.kind == row[0], entities.c.key == row[1])
                         .values(retry_count=attempts, retry_at=run_at))

    def drop_effect(self, effect_id: int) -> bool:
        """Remove a finished effect that feeds nothing back. False if it was already gone."""
        with self._transaction() as conn:
            return bool(conn.execute(delete(outbox).where(outbox.c.id == effect_id)).rowcount)

    # ---- the journal -----------------------------------------------------------------------------------------
    def journal(self, kind: str, key: str) -> builtins.list[JournalEntry]:
        query = (select(journal).where(journal.c.kind == kind, journal.c.key == key)
                 .order_by(journal.c.version))
        with self._connect() as conn:
            return [_journal(r) for r in conn.execute(query)]

    def journal_all(self, after_id: int = 0, limit: int = 10_000) -> builtins.list[JournalEntry]:
        query = select(journal).where(journal.c.id > after_id).order_by(journal.c.id).limit(limit)
        with self._connect() as conn:
            return [_journal(r) for r in conn.execute(query)]

    def ping(self) -> None:
        with self._connect() as conn:
            conn.execute(text("SELECT 1"))


def _entity(r: Any) -> Entity:
    return Entity(r.kind, r.key, r.state, r.version, r.retry_count, r.retry_at, r.due_at, r.data, r.created_at,
                  r.updated_at)


def _pending(r: Any) -> PendingEffect:
    return PendingEffect(r.id, r.kind, r.key, r.effect, r.payload, r.attempts, r.run_at, r.last_error)


def _journal(r: Any) -> JournalEntry:
    return JournalEntry(r.id, r.kind, r.key, r.version, r.from_state, r.to_state, r.trigger, r.reason, r.detail,
                        r.actor, r.at)


def _is_unreachable(exc: OperationalError) -> bool:
    msg = str(exc.orig).lower()
    return any(s in msg for s in ("connection", "could not connect", "unable to open", "timeout expired",
                                  "name or service", "no such host", "password authentication", "does not exist"))


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
